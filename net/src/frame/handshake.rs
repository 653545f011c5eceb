//! The link handshake: each side of a new cluster link proves that it knows the cluster
//! secret, in a way that binds the proof to this one connection.
//!
//! Owns: the link key derived from the secret, the transcript of a handshake, the two proofs
//! over it, and the state machine that runs before a peer is authenticated ([`Handshake`]).
//! Never: performs I/O, reads a clock, or panics on a peer's frame: every failure is a
//! [`HandshakeError`] and the link closes.
//!
//! The construction (a three-pass mutual challenge-response in the style of ISO/IEC 9798-4,
//! with a transcript hash as in SCRAM and Noise-PSK):
//!
//! 1. initiator → responder: `Hello` (identity, purpose, shard, epoch, a fresh nonce `Ni`).
//! 2. responder → initiator: `Welcome` (identity, epoch, a fresh nonce `Nr`) and
//!    `proof_r = HMAC-SHA-256(K, "shardmq link responder proof" || T)`.
//! 3. initiator → responder, only once `proof_r` checks: `Proof` with
//!    `proof_i = HMAC-SHA-256(K, "shardmq link initiator proof" || T)`.
//!
//! `K = HKDF-SHA-256(salt = "shardmq cluster link key v1", ikm = secret, info = cluster name)`.
//! `T` is SHA-256 over a length-prefixed encoding of the cluster name, the protocol version
//! each side put in its frame header, every field of the `Hello` (both node identities, roles,
//! the purpose, the shard, the initiator's epoch and member record, `Ni`) and every field of
//! the `Welcome` but its proof (`Nr`, the responder's epoch). Both proofs are compared in
//! constant time. So a proof made for one connection is worthless on any other: another
//! connection has another `Nr` (chosen by its responder after it saw `Ni`) or another `Ni`,
//! and a proof of one role is never the proof of the other role for the same transcript, so
//! a node's answers can neither be relayed to another node nor reflected back to it.
//! A responder proves first, to anyone who connects: the secret must be long and random (an
//! observer could test guesses of a short one offline).

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{Body, Hello, NodeId, Purpose, Role, Welcome};

/// The largest frame body accepted before the peer is authenticated: room for a `Hello` with
/// two long host names, far below an authenticated link's `frame_size_max`, so that a stranger
/// can make a node hold only this much (plus one read) per connection.
pub const HANDSHAKE_BODY_LEN_MAX: usize = 4096;

const KEY_SALT: &[u8] = b"shardmq cluster link key v1";
const TRANSCRIPT_LABEL: &[u8] = b"shardmq link transcript v1";
/// The two labels have one length, so that `label || T` cannot be read as the other label.
const RESPONDER_LABEL: &[u8; 28] = b"shardmq link responder proof";
const INITIATOR_LABEL: &[u8; 28] = b"shardmq link initiator proof";

/// The key the proofs are made with, derived from the cluster secret and name.
#[derive(Clone)]
pub struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    pub fn derive(secret: &str, cluster_name: &str) -> Self {
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(KEY_SALT), secret.as_bytes())
            .expand(cluster_name.as_bytes(), &mut key)
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        Self(key)
    }

    fn mac(&self, label: &[u8; 28], transcript: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts a key of any length");
        mac.update(label);
        mac.update(transcript);
        mac
    }

    fn prove(&self, side: Side, transcript: &[u8; 32]) -> [u8; 32] {
        self.mac(side.label(), transcript)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks `candidate` in constant time.
    fn verify(&self, side: Side, transcript: &[u8; 32], candidate: &[u8; 32]) -> bool {
        self.mac(side.label(), transcript)
            .verify_slice(candidate)
            .is_ok()
    }
}

/// Which end of a link a proof is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Dialled the link and sent `Hello`.
    Initiator,
    /// Accepted the link and answered with `Welcome`.
    Responder,
}

impl Side {
    fn label(self) -> &'static [u8; 28] {
        match self {
            Side::Initiator => INITIATOR_LABEL,
            Side::Responder => RESPONDER_LABEL,
        }
    }
}

/// The protocol versions the two sides put in their frame headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub initiator: u16,
    pub responder: u16,
}

/// SHA-256 of everything both sides said, in a length-prefixed encoding that no two different
/// handshakes share. The `Welcome`'s own proof is left out (it is made over this).
pub fn transcript(
    cluster_name: &str,
    versions: Versions,
    hello: &Hello,
    welcome: &Welcome,
) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut bytes = |b: &[u8]| {
        hash.update((b.len() as u64).to_le_bytes());
        hash.update(b);
    };
    bytes(TRANSCRIPT_LABEL);
    bytes(cluster_name.as_bytes());
    bytes(&versions.initiator.to_le_bytes());
    bytes(&versions.responder.to_le_bytes());
    // The initiator's Hello.
    bytes(&hello.node.to_le_bytes());
    bytes(&[role_tag(hello.role), purpose_tag(hello.purpose)]);
    bytes(&hello.shard.to_le_bytes());
    bytes(&hello.epoch.to_le_bytes());
    bytes(&hello.nonce);
    bytes(&hello.member.node.to_le_bytes());
    bytes(&[role_tag(hello.member.role)]);
    bytes(hello.member.cluster_address.as_bytes());
    bytes(hello.member.mqtt_address.as_bytes());
    bytes(&hello.member.epoch.to_le_bytes());
    // The responder's Welcome.
    bytes(&welcome.node.to_le_bytes());
    bytes(&[role_tag(welcome.role)]);
    bytes(&welcome.epoch.to_le_bytes());
    bytes(&welcome.nonce);
    hash.finalize().into()
}

fn role_tag(role: Role) -> u8 {
    match role {
        Role::Core => 1,
        Role::Edge => 2,
    }
}

fn purpose_tag(purpose: Purpose) -> u8 {
    match purpose {
        Purpose::Control => 1,
        Purpose::Data => 2,
    }
}

/// Who this node is, as its side of a handshake needs it.
#[derive(Debug, Clone)]
pub struct Local {
    pub key: LinkKey,
    pub cluster_name: String,
    pub node: NodeId,
    pub role: Role,
    /// This node's start, told to the nodes that dial it.
    pub epoch: u64,
}

/// Why a handshake failed. The link closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer said why it refused us.
    Refused(String),
    /// A frame that this step of the handshake does not take.
    Unexpected { kind: u8, step: &'static str },
    /// The `Hello` claims this node's own identifier.
    OwnNode(NodeId),
    /// The `Hello`'s member record is not the node (or not the role) the `Hello` names.
    MemberMismatch { node: NodeId, member: NodeId },
    /// The proof does not check: a wrong secret, a tampered field or a relayed proof.
    Proof { node: NodeId, side: Side },
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Refused(reason) => {
                // The peer's words are shown escaped and cut short: they are not trusted.
                let reason: String = reason.chars().take(200).collect();
                write!(f, "the peer refused the link: {reason:?}")
            }
            HandshakeError::Unexpected { kind, step } => {
                write!(
                    f,
                    "unexpected frame kind {kind} during the handshake ({step})"
                )
            }
            HandshakeError::OwnNode(node) => {
                write!(f, "the peer claims our own node identifier {node}")
            }
            HandshakeError::MemberMismatch { node, member } => write!(
                f,
                "the Hello of node {node} does not match its member record (of node {member}, or of another role)"
            ),
            HandshakeError::Proof { node, side } => write!(
                f,
                "node {node} did not prove the cluster secret as the {} for this link (a wrong secret, or a relayed or tampered handshake?)",
                match side {
                    Side::Initiator => "initiator",
                    Side::Responder => "responder",
                }
            ),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl HandshakeError {
    /// What the peer is told in its `Refused` frame: a failed proof says only that the secret
    /// did not check, whichever side failed.
    pub fn reason_for_peer(&self) -> String {
        match self {
            HandshakeError::Proof { .. } => {
                "wrong cluster secret (or a relayed or tampered handshake)".into()
            }
            other => other.to_string(),
        }
    }
}

/// The handshake so far, on one side of one link.
#[derive(Debug, Clone)]
pub enum Handshake {
    /// We dialled and sent this `Hello`; the responder's `Welcome` is due.
    AwaitWelcome { hello: Hello },
    /// We accepted; the initiator's `Hello` is due. `nonce` is ours, fresh for this link.
    AwaitHello { nonce: [u8; 16] },
    /// We accepted and answered; the initiator's `Proof` over `transcript` is due.
    AwaitProof {
        hello: Hello,
        welcome: Welcome,
        transcript: [u8; 32],
    },
}

/// What one frame of the handshake leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this frame; the handshake goes on.
    Continue(Body),
    /// The peer is authenticated. `reply` is our last handshake frame, if we owe one.
    Done {
        hello: Hello,
        welcome: Welcome,
        reply: Option<Body>,
    },
}

impl Handshake {
    /// Dials: the handshake and the `Hello` to send first.
    pub fn initiate(hello: Hello) -> (Self, Body) {
        let body = Body::Hello(hello.clone());
        (Handshake::AwaitWelcome { hello }, body)
    }

    /// Accepts, with a fresh nonce of ours.
    pub fn accept(nonce: [u8; 16]) -> Self {
        Handshake::AwaitHello { nonce }
    }

    fn step_name(&self) -> &'static str {
        match self {
            Handshake::AwaitWelcome { .. } => "awaiting Welcome",
            Handshake::AwaitHello { .. } => "awaiting Hello",
            Handshake::AwaitProof { .. } => "awaiting Proof",
        }
    }

    /// Takes the peer's next frame, sent under protocol version `peer_version`. On `Err` the
    /// link must close; the handshake is then of no further use.
    pub fn step(
        &mut self,
        local: &Local,
        peer_version: u16,
        body: Body,
    ) -> Result<Step, HandshakeError> {
        let step = self.step_name();
        match (&*self, body) {
            (_, Body::Refused { reason }) => Err(HandshakeError::Refused(reason)),
            (Handshake::AwaitHello { nonce }, Body::Hello(hello)) => {
                if hello.node == local.node {
                    return Err(HandshakeError::OwnNode(hello.node));
                }
                if hello.member.node != hello.node || hello.member.role != hello.role {
                    return Err(HandshakeError::MemberMismatch {
                        node: hello.node,
                        member: hello.member.node,
                    });
                }
                let mut welcome = Welcome {
                    node: local.node,
                    role: local.role,
                    proof: [0; 32],
                    nonce: *nonce,
                    epoch: local.epoch,
                };
                let versions = Versions {
                    initiator: peer_version,
                    responder: super::PROTOCOL_VERSION,
                };
                let transcript = transcript(&local.cluster_name, versions, &hello, &welcome);
                welcome.proof = local.key.prove(Side::Responder, &transcript);
                let body = Body::Welcome(welcome.clone());
                *self = Handshake::AwaitProof {
                    hello,
                    welcome,
                    transcript,
                };
                Ok(Step::Continue(body))
            }
            (Handshake::AwaitWelcome { hello }, Body::Welcome(welcome)) => {
                let versions = Versions {
                    initiator: super::PROTOCOL_VERSION,
                    responder: peer_version,
                };
                let transcript = transcript(&local.cluster_name, versions, hello, &welcome);
                if !local
                    .key
                    .verify(Side::Responder, &transcript, &welcome.proof)
                {
                    return Err(HandshakeError::Proof {
                        node: welcome.node,
                        side: Side::Responder,
                    });
                }
                let proof = local.key.prove(Side::Initiator, &transcript);
                Ok(Step::Done {
                    hello: hello.clone(),
                    welcome,
                    reply: Some(Body::Proof { proof }),
                })
            }
            (
                Handshake::AwaitProof {
                    hello,
                    welcome,
                    transcript,
                },
                Body::Proof { proof },
            ) => {
                if !local.key.verify(Side::Initiator, transcript, &proof) {
                    return Err(HandshakeError::Proof {
                        node: hello.node,
                        side: Side::Initiator,
                    });
                }
                Ok(Step::Done {
                    hello: hello.clone(),
                    welcome: welcome.clone(),
                    reply: None,
                })
            }
            (_, body) => Err(HandshakeError::Unexpected {
                kind: body.kind(),
                step,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Member, PROTOCOL_VERSION};

    fn local(node: NodeId, secret: &str) -> Local {
        Local {
            key: LinkKey::derive(secret, "c"),
            cluster_name: "c".into(),
            node,
            role: Role::Core,
            epoch: 100 + u64::from(node),
        }
    }

    fn hello(node: NodeId, nonce: [u8; 16]) -> Hello {
        Hello {
            node,
            role: Role::Edge,
            purpose: Purpose::Data,
            member: Member {
                node,
                role: Role::Edge,
                cluster_address: "127.0.0.1:7000".into(),
                mqtt_address: "127.0.0.1:1883".into(),
                epoch: 5,
            },
            nonce,
            shard: 3,
            epoch: 5,
        }
    }

    /// Runs the three steps; returns the initiator's and the responder's results.
    fn run(initiator: &Local, responder: &Local) -> Result<(Step, Step), HandshakeError> {
        let (mut dialler, first) = Handshake::initiate(hello(initiator.node, [1; 16]));
        let mut acceptor = Handshake::accept([2; 16]);
        let Step::Continue(welcome) = acceptor.step(responder, PROTOCOL_VERSION, first)? else {
            panic!("a Hello is answered");
        };
        let done = dialler.step(initiator, PROTOCOL_VERSION, welcome)?;
        let Step::Done {
            reply: Some(proof), ..
        } = &done
        else {
            panic!("a checked Welcome is answered with a Proof");
        };
        let accepted = acceptor.step(responder, PROTOCOL_VERSION, proof.clone())?;
        Ok((done, accepted))
    }

    #[test]
    fn both_sides_authenticate_with_one_secret() {
        let (done, accepted) = run(&local(1, "s"), &local(2, "s")).unwrap();
        let Step::Done { hello, welcome, .. } = accepted else {
            panic!("the responder is done");
        };
        assert_eq!((hello.node, hello.shard, welcome.node), (1, 3, 2));
        assert!(matches!(done, Step::Done { welcome, .. } if welcome.epoch == 102));
    }

    #[test]
    fn a_wrong_secret_is_refused_by_the_initiator_before_it_proves() {
        let error = run(&local(1, "right"), &local(2, "wrong")).unwrap_err();
        assert_eq!(
            error,
            HandshakeError::Proof {
                node: 2,
                side: Side::Responder
            }
        );
    }

    fn responder_proof(
        versions: Versions,
        hello: &Hello,
        welcome: &Welcome,
        key: &LinkKey,
    ) -> [u8; 32] {
        key.prove(Side::Responder, &transcript("c", versions, hello, welcome))
    }

    /// Every field of the transcript changes the proofs: a proof checked against a transcript
    /// with any one field tampered is refused.
    #[test]
    fn each_tampered_transcript_field_is_refused() {
        let key = LinkKey::derive("s", "c");
        let versions = Versions {
            initiator: 1,
            responder: 1,
        };
        let base_hello = hello(1, [1; 16]);
        let base_welcome = Welcome {
            node: 2,
            role: Role::Core,
            proof: [0; 32],
            nonce: [2; 16],
            epoch: 9,
        };
        let good = responder_proof(versions, &base_hello, &base_welcome, &key);
        let mut hellos: Vec<(&str, Hello)> = Vec::new();
        let mut tamper = |name, change: fn(&mut Hello)| {
            let mut h = base_hello.clone();
            change(&mut h);
            hellos.push((name, h));
        };
        tamper("initiator node", |h| h.node = 7);
        tamper("initiator role", |h| h.role = Role::Core);
        tamper("purpose", |h| h.purpose = Purpose::Control);
        tamper("shard", |h| h.shard = 4);
        tamper("initiator epoch", |h| h.epoch = 6);
        tamper("initiator nonce", |h| h.nonce[15] ^= 1);
        tamper("member node", |h| h.member.node = 8);
        tamper("member role", |h| h.member.role = Role::Core);
        tamper("member cluster address", |h| {
            h.member.cluster_address.push('0')
        });
        tamper("member mqtt address", |h| h.member.mqtt_address.push('0'));
        tamper("member epoch", |h| h.member.epoch = 6);
        for (name, h) in &hellos {
            let transcript = transcript("c", versions, h, &base_welcome);
            assert!(
                !key.verify(Side::Responder, &transcript, &good),
                "tampered {name} accepted"
            );
        }
        let mut welcomes: Vec<(&str, Welcome)> = Vec::new();
        let mut tamper = |name, change: fn(&mut Welcome)| {
            let mut w = base_welcome.clone();
            change(&mut w);
            welcomes.push((name, w));
        };
        tamper("responder node", |w| w.node = 3);
        tamper("responder role", |w| w.role = Role::Edge);
        tamper("responder nonce", |w| w.nonce[0] ^= 1);
        tamper("responder epoch", |w| w.epoch = 10);
        for (name, w) in &welcomes {
            let transcript = transcript("c", versions, &base_hello, w);
            assert!(
                !key.verify(Side::Responder, &transcript, &good),
                "tampered {name} accepted"
            );
        }
        // The proof field itself is not in the transcript (it is made over it).
        let with_proof = Welcome {
            proof: good,
            ..base_welcome.clone()
        };
        let same = transcript("c", versions, &base_hello, &with_proof);
        assert!(key.verify(Side::Responder, &same, &good));
        for (name, other_versions) in [
            (
                "initiator version",
                Versions {
                    initiator: 2,
                    responder: 1,
                },
            ),
            (
                "responder version",
                Versions {
                    initiator: 1,
                    responder: 2,
                },
            ),
        ] {
            let transcript = transcript("c", other_versions, &base_hello, &base_welcome);
            assert!(
                !key.verify(Side::Responder, &transcript, &good),
                "tampered {name} accepted"
            );
        }
        let other_cluster = transcript("d", versions, &base_hello, &base_welcome);
        assert!(!key.verify(Side::Responder, &other_cluster, &good));
        let base = transcript("c", versions, &base_hello, &base_welcome);
        assert!(
            !key.verify(Side::Initiator, &base, &good),
            "a responder proof is not an initiator proof"
        );
        assert!(!LinkKey::derive("s", "d").verify(Side::Responder, &base, &good));
        assert!(!LinkKey::derive("t", "c").verify(Side::Responder, &base, &good));
        assert!(key.verify(Side::Responder, &base, &good));
    }

    /// The responder refuses the Proof when the Hello it answered was changed on the way or the
    /// Welcome it sent reached the initiator changed (the initiator then refuses first).
    #[test]
    fn a_tampered_hello_or_welcome_fails_the_handshake() {
        let (a, b) = (local(1, "s"), local(2, "s"));
        // The Hello's shard is changed on the way to the responder.
        let (mut dialler, first) = Handshake::initiate(hello(1, [1; 16]));
        let Body::Hello(mut changed) = first else {
            panic!("a Hello");
        };
        changed.shard = 0;
        let mut acceptor = Handshake::accept([2; 16]);
        let Ok(Step::Continue(welcome)) = acceptor.step(&b, PROTOCOL_VERSION, Body::Hello(changed))
        else {
            panic!("a Hello is answered");
        };
        assert!(matches!(
            dialler.step(&a, PROTOCOL_VERSION, welcome),
            Err(HandshakeError::Proof {
                side: Side::Responder,
                ..
            })
        ));
        // The Welcome's epoch is changed on the way to the initiator.
        let (mut dialler, first) = Handshake::initiate(hello(1, [1; 16]));
        let mut acceptor = Handshake::accept([2; 16]);
        let Ok(Step::Continue(Body::Welcome(mut welcome))) =
            acceptor.step(&b, PROTOCOL_VERSION, first)
        else {
            panic!("a Welcome");
        };
        welcome.epoch += 1;
        assert!(
            dialler
                .step(&a, PROTOCOL_VERSION, Body::Welcome(welcome))
                .is_err()
        );
        // The initiator's header version is changed on the way to the responder.
        let (mut dialler, first) = Handshake::initiate(hello(1, [1; 16]));
        let mut acceptor = Handshake::accept([2; 16]);
        let Ok(Step::Continue(welcome)) = acceptor.step(&b, PROTOCOL_VERSION + 1, first) else {
            panic!("a Hello is answered");
        };
        assert!(dialler.step(&a, PROTOCOL_VERSION, welcome).is_err());
    }

    /// A man in the middle with links to two nodes gets only responder proofs, each bound to
    /// its own link: neither relayed nor reflected, one logs it in.
    #[test]
    fn relayed_and_reflected_proofs_are_refused() {
        let (a, b) = (local(1, "s"), local(2, "s"));
        // To B as A.
        let mut at_b = Handshake::accept([0xB; 16]);
        let Ok(Step::Continue(Body::Welcome(from_b))) =
            at_b.step(&b, PROTOCOL_VERSION, Body::Hello(hello(1, [9; 16])))
        else {
            panic!("a Welcome");
        };
        // To A as B, with B's nonce: A's answer is a responder proof of another transcript.
        let mut at_a = Handshake::accept([0xA; 16]);
        let Ok(Step::Continue(Body::Welcome(from_a))) =
            at_a.step(&a, PROTOCOL_VERSION, Body::Hello(hello(2, from_b.nonce)))
        else {
            panic!("a Welcome");
        };
        for proof in [from_a.proof, from_b.proof] {
            let mut at_b_again = at_b.clone();
            assert!(matches!(
                at_b_again.step(&b, PROTOCOL_VERSION, Body::Proof { proof }),
                Err(HandshakeError::Proof {
                    node: 1,
                    side: Side::Initiator
                })
            ));
        }
    }

    #[test]
    fn frames_out_of_order_are_refused() {
        let b = local(2, "s");
        let mut acceptor = Handshake::accept([2; 16]);
        assert!(matches!(
            acceptor.step(&b, PROTOCOL_VERSION, Body::Proof { proof: [0; 32] }),
            Err(HandshakeError::Unexpected { kind: 3, .. })
        ));
        assert_eq!(
            Handshake::accept([2; 16])
                .step(&b, PROTOCOL_VERSION, Body::Hello(hello(2, [1; 16])))
                .unwrap_err(),
            HandshakeError::OwnNode(2)
        );
        let mut mismatched = hello(1, [1; 16]);
        mismatched.member.node = 4;
        assert!(matches!(
            Handshake::accept([2; 16]).step(&b, PROTOCOL_VERSION, Body::Hello(mismatched)),
            Err(HandshakeError::MemberMismatch { node: 1, member: 4 })
        ));
        let refused = HandshakeError::Refused("x\n".repeat(500));
        let shown = refused.to_string();
        assert!(shown.len() < 500 && !shown.contains('\n'), "{shown}");
    }

    #[test]
    fn a_hello_with_long_addresses_fits_the_handshake_limit() {
        let mut h = hello(1, [1; 16]);
        // Host names of the longest DNS length, with a port.
        h.member.cluster_address = format!("{}:65535", "h".repeat(253));
        h.member.mqtt_address = h.member.cluster_address.clone();
        let mut out = bytes::BytesMut::new();
        crate::frame::encode(&Body::Hello(h), 0, usize::MAX, &mut out).unwrap();
        assert!(out.len() - crate::frame::HEADER_LEN <= HANDSHAKE_BODY_LEN_MAX);
    }
}
