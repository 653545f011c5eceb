//! Authorization rules the shard checks on its own thread, and what the shard and the
//! verifier pool (the binary's `auth.rs`) tell each other.
//!
//! Owns: parsing Mosquitto's ACL syntax and answering "may this client publish to this
//! topic / subscribe to this filter / read this topic" in about one trie walk; the policy a
//! shard applies ([`Policy`]), who a connected client is ([`Principal`]), and the verify
//! request and its answer ([`Credentials`], [`Verdict`]).
//! Never: reads a file (the caller hands the bytes in), hashes a password, or blocks.
//! Invariants: a compiled [`Acl`] and a [`Policy`] are immutable; a reload builds new ones and
//! hands them to every shard.

pub mod acl;

use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;

pub use acl::{Acl, AclError};

/// What a shard applies to CONNECT, PUBLISH, SUBSCRIBE and each delivery.
#[derive(Debug, Default)]
pub struct Policy {
    /// Whether a client without a username (and without a certificate name) may connect.
    pub allow_anonymous: bool,
    /// Whether a password file or JWT key is configured: a CONNECT with a username or a
    /// password then goes to the verifier pool (`Output::Verify`). Without one, a username
    /// is taken as given (as Mosquitto does), and only when `allow_anonymous` is set.
    pub verify: bool,
    /// The ACL file's rules; None: no file, everything is allowed (unless a principal's
    /// own claims say otherwise).
    pub acl: Option<Acl>,
}

impl Policy {
    /// Anyone may connect and do anything: the policy without an `[auth]` section.
    pub fn open() -> Self {
        Self {
            allow_anonymous: true,
            verify: false,
            acl: None,
        }
    }

    /// Whether nothing is ever refused after CONNECT (so no check needs to run).
    fn checks_nothing(&self, principal: Option<&Principal>) -> bool {
        self.acl.is_none() && principal.is_none_or(|p| p.claims.is_none())
    }

    /// Whether both the ACL file and the principal's claims (a JWT's) allow what `check`
    /// asks, each where it exists.
    fn allows(
        &self,
        principal: Option<&Principal>,
        check: impl Fn(&Acl, Option<&str>) -> bool,
    ) -> bool {
        if self.checks_nothing(principal) {
            return true;
        }
        let username = principal.and_then(|p| p.username.as_deref());
        self.acl.as_ref().is_none_or(|acl| check(acl, username))
            && principal
                .and_then(|p| p.claims.as_deref())
                .is_none_or(|claims| check(claims, username))
    }

    /// May the client publish to `topic`?
    pub fn may_publish(&self, principal: Option<&Principal>, client_id: &str, topic: &str) -> bool {
        self.allows(principal, |acl, username| {
            acl.may_publish(client_id, username, topic)
        })
    }

    /// May the client subscribe to `filter` (the filter of a shared subscription without its
    /// `$share/GROUP/`)? Also the read check of one topic (a topic is a filter that matches
    /// only itself).
    pub fn may_subscribe(
        &self,
        principal: Option<&Principal>,
        client_id: &str,
        filter: &str,
    ) -> bool {
        self.allows(principal, |acl, username| {
            acl.may_subscribe(client_id, username, filter)
        })
    }
}

/// Who a connected client is, as far as the ACL is concerned.
#[derive(Debug, Default, Clone)]
pub struct Principal {
    /// The verified username (or the certificate's name, or the unverified username when no
    /// verifier is configured); None for an anonymous client.
    pub username: Option<ByteString>,
    /// The client's own rules (a JWT's ACL claim), checked besides the ACL file's.
    pub claims: Option<Arc<Acl>>,
}

/// What a CONNECT presented, for the verifier pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub client_id: ByteString,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
}

/// The verifier pool's answer.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The credentials are good: the client is this principal.
    Accepted(Principal),
    /// Unknown user, wrong password, a bad or expired token: CONNACK 0x86 (return code 4).
    BadCredentials,
    /// The credentials are good but the client may not connect: 0x87 (return code 5).
    NotAuthorized,
    /// The pool could not take the request (its queue is full): 0x88 (return code 3).
    Unavailable,
}
