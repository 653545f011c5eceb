//! Authentication of a CONNECT and the ACL checks of PUBLISH, SUBSCRIBE and each delivery.
//!
//! Owns: the CONNECTs waiting for the verifier pool (`Output::Verify`, answered with
//! `Input::Verified`), and who each connected client is (`Connection::principal`, copied to
//! its session).
//! How: on the shard that owns the client identifier, before any session is touched, a
//! CONNECT is admitted as the name on its client certificate (a listener with
//! `tls_username_from`), or sent to the verifier pool when it has a username or password and
//! a verifier is configured, or admitted as given (anonymous, or a username taken on trust
//! when no verifier exists) when the policy allows anonymous clients, else refused with 0x87.
//! While it waits, what the client sends is kept as during a takeover claim
//! (`received_while_claiming`, bounded by `takeover_pending_bytes_max`), and read once it is
//! accepted. A will whose topic the client may not write refuses the CONNECT (0x87), as
//! Mosquitto does, so no will is ever published that its writer could not publish.
//! Never: hashes a password or reads a file (the pool does), or lets a refused SUBSCRIBE
//! reach the session or the durable log.

use super::*;
use crate::limits::quote;

/// A CONNECT waiting for the verifier pool's answer.
#[derive(Debug)]
pub(super) struct PendingVerify {
    ticket: u64,
    connect: Box<Connect>,
    client_id: ByteString,
    assigned: bool,
}

impl Shard {
    /// Checks who the client of `connect` is, then admits it (now, or when the verifier
    /// answers) or refuses it.
    pub(super) fn authenticate(
        &mut self,
        connection_id: ConnectionId,
        connect: Box<Connect>,
        client_id: ByteString,
        assigned: bool,
    ) {
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        let version = connect.protocol;
        let policy = &self.auth;
        let principal = if let Some(name) = &connection.transport.certificate_name {
            // The listener names its clients by their verified certificate.
            Principal {
                username: Some(name.clone()),
                claims: None,
            }
        } else if policy.verify && (connect.username.is_some() || connect.password.is_some()) {
            self.next_verify_ticket += 1;
            let ticket = self.next_verify_ticket;
            self.outputs.push(Output::Verify {
                connection: connection_id,
                ticket,
                credentials: Credentials {
                    client_id: client_id.clone(),
                    username: connect.username.clone(),
                    password: connect.password.clone(),
                },
            });
            // What arrives meanwhile waits in `pending`, as during a claim.
            connection.claiming = true;
            connection.version = version;
            self.verifying.insert(
                connection_id,
                PendingVerify {
                    ticket,
                    connect,
                    client_id,
                    assigned,
                },
            );
            return;
        } else if policy.allow_anonymous {
            // Without a verifier a username proves nothing, but the ACL's user sections
            // still apply to it (Mosquitto's behaviour).
            Principal {
                username: connect.username.as_deref().map(ByteString::from),
                claims: None,
            }
        } else {
            client_log!(
                INFO,
                self.who_connecting(connection_id, &client_id),
                "CONNECT refused: anonymous clients are not allowed"
            );
            self.refuse_connect(connection_id, version, ReasonCode::NOT_AUTHORIZED);
            return;
        };
        self.admit(connection_id, connect, client_id, assigned, principal);
    }

    /// The verifier pool's answer for `connection_id`'s CONNECT. One for a connection that
    /// closed meanwhile (or a ticket it no longer waits for) is dropped.
    pub(super) fn verified(&mut self, connection_id: ConnectionId, ticket: u64, verdict: Verdict) {
        match self.verifying.get(&connection_id) {
            Some(pending) if pending.ticket == ticket => {}
            _ => return,
        }
        let Some(pending) = self.verifying.remove(&connection_id) else {
            return;
        };
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        connection.claiming = false;
        let version = pending.connect.protocol;
        let reason = match verdict {
            Verdict::Accepted(principal) => {
                self.admit(
                    connection_id,
                    pending.connect,
                    pending.client_id,
                    pending.assigned,
                    principal,
                );
                // What arrived while it waited is read now, unless a claim took over the wait.
                let rest = match self.connections.get_mut(&connection_id) {
                    Some(connection) if !connection.closing && !connection.claiming => {
                        connection.pending.split().freeze()
                    }
                    _ => Bytes::new(),
                };
                if !rest.is_empty() {
                    self.receive(connection_id, rest);
                }
                return;
            }
            Verdict::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            Verdict::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
            Verdict::Unavailable => ReasonCode::SERVER_UNAVAILABLE,
        };
        client_log!(INFO, self.who_connecting(connection_id, &pending.client_id), username = ?pending.connect.username.as_deref().map(quote), %reason, "CONNECT refused by the credentials check");
        self.refuse_connect(connection_id, version, reason);
    }

    /// A client whose identity is settled: its will must be writable by it, then it goes on
    /// to the session's claim (in a cluster) or acceptance.
    fn admit(
        &mut self,
        connection_id: ConnectionId,
        connect: Box<Connect>,
        client_id: ByteString,
        assigned: bool,
        principal: Principal,
    ) {
        if let Some(will) = &connect.will
            && (sys::is_sys_topic(&will.topic)
                || !self
                    .auth
                    .may_publish(Some(&principal), &client_id, &will.topic))
        {
            client_log!(INFO, self.who_connecting(connection_id, &client_id), topic = %quote(&will.topic), "CONNECT refused: the ACL does not let the client write its will topic");
            self.refuse_connect(connection_id, connect.protocol, ReasonCode::NOT_AUTHORIZED);
            return;
        }
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        connection.principal = Some(std::sync::Arc::new(principal));
        if !assigned && !self.cluster_nodes_up.is_empty() {
            // The session may live on another node, or the client be connected there.
            self.claim(connection_id, connect, client_id);
            return;
        }
        self.accept(connection_id, *connect, client_id, assigned);
    }

    fn refuse_connect(
        &mut self,
        connection_id: ConnectionId,
        version: ProtocolVersion,
        reason: ReasonCode,
    ) {
        self.send_connack_refusal(connection_id, version, reason);
        self.drop_connection(connection_id, false);
    }

    /// Whether the session's client may publish to `topic`: never under `$SYS/`, which the
    /// broker alone writes, else as the ACL says.
    pub(super) fn may_publish(&self, index: SessionIndex, topic: &str) -> bool {
        if sys::is_sys_topic(topic) {
            return false;
        }
        let session = self.session(index);
        self.auth
            .may_publish(session.principal.as_deref(), &session.client_id, topic)
    }

    /// Whether the session's client may subscribe to `filter` (with `$share/GROUP/`, the
    /// filter inside is checked, as Mosquitto does).
    pub(super) fn may_subscribe(&self, index: SessionIndex, filter: &str) -> bool {
        let plain = match topic::split_shared(filter) {
            Some(Ok((_, inner))) => inner,
            _ => filter,
        };
        let session = self.session(index);
        self.auth
            .may_subscribe(session.principal.as_deref(), &session.client_id, plain)
    }

    /// Whether the session's client may read `topic` (each delivery, retained messages
    /// too). A session restored from the log whose client has not connected since is not
    /// checked here (no principal is known for it yet): what it queues is checked again
    /// when its client is back and the queue drains (`drain_queue`).
    pub(super) fn may_read(&self, index: SessionIndex, topic: &str) -> bool {
        let session = self.session(index);
        match session.principal.as_deref() {
            None => true,
            Some(principal) => self
                .auth
                .may_subscribe(Some(principal), &session.client_id, topic),
        }
    }
}
