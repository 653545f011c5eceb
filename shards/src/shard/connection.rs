//! Connections: the bytes in and out of one client socket, the protocol errors that end it,
//! and the way a connection ends (DISCONNECT, close, the session's detach).
//!
//! One writer per buffer: a connection's output buffer and its send accounting are private to
//! this file, and [`Connection::write`] is the only code that encodes into the buffer. It
//! marks the connection for the batch's flush in the same step, so no path can queue bytes
//! that are never handed out, and it applies the client's Maximum Packet Size and the unsent
//! bound to every packet.
//!
//! Invariants: a connection is in the flush list exactly once while its buffer holds bytes
//! (pushed when the first byte goes in, taken by [`Shard::flush_sends`]); the unsent count is
//! what the buffer holds plus what the reactor reported still queued (plus what was handed to
//! it since); a connection that is open holds a stuck timer exactly while the reactor holds at
//! least `unsent_bytes_per_connection_max` of its bytes.

use super::*;
use shardmq_net::mqtt::EncodeError;

/// What the transport under a client connection tells about it: the listener that accepted
/// it (its index among the node's listeners), the peer's address, and the name on the
/// client's certificate. Set when the connection opens (the reactor keeps the listener and
/// the peer across hand-offs between shards); authentication and the logs read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transport {
    pub listener: u16,
    /// The client's address: the socket's peer (after a PROXY protocol header, the address
    /// the header names). None when it could not be read.
    pub peer: Option<std::net::SocketAddr>,
    /// The name on the client's certificate (its CN or subjectAltName, as the listener's
    /// `tls_username_from` says), from a TLS handshake or a PROXY protocol SSL TLV; None
    /// without one.
    pub certificate_name: Option<ByteString>,
}

#[derive(Debug)]
pub(super) struct Connection {
    /// Its own identifier, for the flush list.
    id: ConnectionId,
    /// Where the connection came from.
    pub(super) transport: Transport,
    pub(super) session: Option<SessionIndex>,
    pub(super) version: ProtocolVersion,
    /// Bytes of a packet not complete yet; empty (and unallocated) between packets.
    pub(super) pending: BytesMut,
    /// Packets encoded in this batch, handed out by `flush_sends`. Only `write` adds to it.
    outgoing: BytesMut,
    /// Bytes handed to the reactor that the socket has not taken: the reactor's last report
    /// (`Input::Sent`), plus what was handed out since.
    reactor_unsent_bytes: usize,
    /// The log's record that must be durable before any more of this connection's bytes
    /// leave (0: none): set after a QoS 2 PUBLISH or a PUBREL of a logged session, whose
    /// `MessageSent` / `MessageReleased` record a restart must find, or the message would be
    /// sent again under a new packet identifier and delivered twice.
    pub(super) durable_barrier: u64,
    /// Armed while the reactor holds at least the unsent bound of this connection's bytes;
    /// when it fires the connection is ended (it stayed stuck too long).
    stuck_timer: Option<TimerKey>,
    pub(super) keep_alive_ms: u64,
    /// The armed keep-alive check, while the connection is connected and open with a keep
    /// alive.
    pub(super) keep_alive_timer: Option<TimerKey>,
    /// The armed CONNECT deadline, from the opening until CONNECT is decoded.
    pub(super) connect_timer: Option<TimerKey>,
    pub(super) last_received_ms: u64,
    /// The client's Maximum Packet Size: larger messages are not sent to it.
    pub(super) client_packet_size_max: u32,
    /// Topic aliases the client set (5.0), grown on first use up to the announced maximum.
    pub(super) topic_aliases: Vec<Option<ByteString>>,
    pub(super) problem_information: bool,
    /// CONNECT is waiting for the other nodes to hand over the session: what arrives
    /// meanwhile is kept in `pending` and read once the connection is accepted.
    pub(super) claiming: bool,
    pub(super) closing: bool,
    /// Who the client is, once its credentials were checked (`authorize.rs`).
    pub(super) principal: Option<std::sync::Arc<Principal>>,
    /// When its CONNECT was accepted (shard clock) and whether it asked for a clean start,
    /// for the admin API (`inspect.rs`).
    pub(super) connected_at_ms: u64,
    pub(super) clean_start: bool,
    /// The client identifier this connection is traced under (`trace.rs`); None when it is
    /// not traced, which is the one check a packet costs.
    pub(super) trace: Option<ByteString>,
}

/// Whether the protocol owes a packet to the client, or it may be held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Priority {
    /// Replies (CONNACK, acknowledgements, PINGRESP, DISCONNECT) and resent in-flight
    /// messages: always written. Replies are paced by what the client itself sends, and
    /// resends by its window.
    Owed,
    /// A new delivery: refused at the unsent bound, so that a client that does not read
    /// cannot make the broker hold what its publishers send.
    Deferrable,
}

/// What [`Connection::write`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(super) enum Write {
    Written,
    /// A deferrable packet found the connection at its unsent bound: nothing was written.
    OverBound,
    /// Larger than the client's Maximum Packet Size even without its droppable properties:
    /// nothing was written [MQTT-3.1.2-24] (counted).
    TooLarge,
}

/// Why the codec wrote nothing for a packet.
#[derive(Debug)]
enum Refused {
    /// Larger than the client's Maximum Packet Size even without the Reason String and User
    /// Properties, which `mqtt::encode_limited` leaves out when they do not fit
    /// [MQTT-3.1.2-25].
    TooLarge,
    /// A value no encoding can carry (a field past 65,535 bytes, say): a server bug or an
    /// unchecked peer value reaching output. Logged; the connection goes on.
    Invalid(&'static str),
}

/// Encodes `packet` within `packet_size_max`: the one place that calls the codec for client
/// output.
fn encode_limited(
    packet: &Packet,
    version: ProtocolVersion,
    packet_size_max: u32,
    buffer: &mut BytesMut,
) -> Result<(), Refused> {
    match mqtt::encode_limited(packet, version, packet_size_max, buffer) {
        Ok(_) => Ok(()),
        Err(EncodeError::TooLarge { .. }) => Err(Refused::TooLarge),
        Err(EncodeError::Invalid(why)) => Err(Refused::Invalid(why)),
    }
}

/// The batch's output side: which connections have bytes for the flush (in the order they
/// first got some), the unsent bound, and what the writer refused.
#[derive(Debug)]
pub(super) struct Outbox {
    dirty: Vec<ConnectionId>,
    /// Connections with bytes that wait for their `durable_barrier`, in the order they
    /// first got some.
    barred: Vec<ConnectionId>,
    unsent_bytes_max: usize,
    /// QoS 0 messages dropped because their connection was at its unsent bound.
    pub(super) dropped_over_bound_count: u64,
    /// PUBLISH packets not sent because they exceed their client's Maximum Packet Size
    /// (QoS 1 and 2 count as delivered).
    pub(super) dropped_too_large_count: u64,
    /// The shard's counters for the metrics endpoint (every write path holds the outbox).
    pub(super) stats: super::Stats,
    /// This node, for the trace records the writer emits.
    pub(super) node: NodeId,
}

impl Outbox {
    pub(super) fn new(unsent_bytes_max: usize, node: NodeId) -> Self {
        Self {
            node,
            dirty: Vec::new(),
            barred: Vec::new(),
            unsent_bytes_max: unsent_bytes_max.max(1),
            dropped_over_bound_count: 0,
            dropped_too_large_count: 0,
            stats: super::Stats::default(),
        }
    }

    pub(super) fn unsent_bytes_max(&self) -> usize {
        self.unsent_bytes_max
    }
}

impl Connection {
    /// This connection, for a line written where its session is out of reach (the writer):
    /// its address and identifier, no client identifier.
    pub(super) fn who(&self, node: NodeId) -> Who<'static> {
        Who {
            node,
            client_id: None,
            address: self.transport.peer,
            connection: Some(self.id),
        }
    }

    fn new(id: ConnectionId, transport: Transport, now_ms: u64) -> Self {
        Self {
            id,
            transport,
            session: None,
            version: ProtocolVersion::V5,
            pending: BytesMut::new(),
            outgoing: BytesMut::new(),
            reactor_unsent_bytes: 0,
            durable_barrier: 0,
            stuck_timer: None,
            connect_timer: None,
            keep_alive_ms: 0,
            keep_alive_timer: None,
            last_received_ms: now_ms,
            client_packet_size_max: mqtt::PACKET_SIZE_MAX,
            topic_aliases: Vec::new(),
            problem_information: true,
            claiming: false,
            closing: false,
            principal: None,
            connected_at_ms: now_ms,
            clean_start: true,
            trace: None,
        }
    }

    /// The one writer of the connection's output: encodes `packet` for this batch's flush
    /// and lists the connection for it when its buffer was empty. A deferrable packet is
    /// refused at the unsent bound; a PUBLISH larger than the client accepts is refused and
    /// counted.
    pub(super) fn write(
        &mut self,
        packet: &Packet,
        priority: Priority,
        outbox: &mut Outbox,
    ) -> Write {
        if priority == Priority::Deferrable && !self.has_room(outbox) {
            return Write::OverBound;
        }
        let was_empty = self.outgoing.is_empty();
        let before_bytes = self.outgoing.len();
        match encode_limited(
            packet,
            self.version,
            self.client_packet_size_max,
            &mut self.outgoing,
        ) {
            Ok(()) => {
                if was_empty {
                    outbox.dirty.push(self.id);
                }
                outbox.stats.packets_sent += 1;
                if let Some(client_id) = &self.trace {
                    let size_bytes = self.outgoing.len().saturating_sub(before_bytes);
                    trace::record(
                        client_id,
                        outbox.node,
                        self.transport.peer,
                        trace::Direction::Out,
                        &trace::describe(packet, size_bytes),
                    );
                }
                Write::Written
            }
            Err(Refused::Invalid(why)) => {
                client_log!(
                    WARN,
                    self.who(outbox.node),
                    why,
                    "a packet for the client cannot be encoded: not sent"
                );
                Write::TooLarge
            }
            Err(Refused::TooLarge) => {
                if matches!(packet, Packet::Publish(_)) {
                    outbox.dropped_too_large_count += 1;
                }
                client_log!(
                    DEBUG,
                    self.who(outbox.node),
                    limit = self.client_packet_size_max,
                    "packet larger than the client's maximum packet size: not sent"
                );
                Write::TooLarge
            }
        }
    }

    /// Whether a new delivery may be written: the bytes not yet taken by the socket are below
    /// the bound.
    pub(super) fn has_room(&self, outbox: &Outbox) -> bool {
        self.unsent_bytes() < outbox.unsent_bytes_max
    }

    /// Bytes encoded for this connection that its socket has not taken yet.
    pub(super) fn unsent_bytes(&self) -> usize {
        self.outgoing.len() + self.reactor_unsent_bytes
    }

    pub(super) fn reactor_unsent_bytes(&self) -> usize {
        self.reactor_unsent_bytes
    }

    pub(super) fn stuck_timer(&self) -> Option<TimerKey> {
        self.stuck_timer
    }

    /// Hands the batch's bytes to the reactor, which now holds them until the socket takes
    /// them. The whole buffer, not a split of it: a split would leave the connection holding
    /// the rest of the allocation while it idles.
    fn take_outgoing(&mut self) -> Option<Bytes> {
        if self.outgoing.is_empty() {
            return None;
        }
        let bytes = std::mem::take(&mut self.outgoing).freeze();
        self.reactor_unsent_bytes += bytes.len();
        Some(bytes)
    }

    /// Arms or cancels the stuck timer after the reactor's share changed: armed exactly
    /// while the connection is open and the reactor holds at least the bound.
    fn update_stuck_timer(&mut self, timers: &mut Timers, now_ms: u64, limits: &Limits) {
        let stuck = !self.closing
            && self.reactor_unsent_bytes >= limits.unsent_bytes_per_connection_max.max(1);
        match (stuck, self.stuck_timer) {
            (true, None) => {
                let deadline_ms = now_ms.saturating_add(limits.send_stuck_timeout_ms);
                self.stuck_timer = Some(timers.arm(deadline_ms, Timer::SendStuck(self.id)));
            }
            (false, Some(_)) => timers.cancel(self.stuck_timer.take()),
            _ => {}
        }
    }
}

impl Shard {
    /// The transport under a client connection, while it is open on this shard.
    pub fn transport(&self, connection: ConnectionId) -> Option<&Transport> {
        self.connections
            .get(&connection)
            .map(|connection| &connection.transport)
    }

    /// The client's address, for the logs.
    pub(super) fn peer(&self, connection: ConnectionId) -> Option<std::net::SocketAddr> {
        self.transport(connection)
            .and_then(|transport| transport.peer)
    }

    pub(super) fn open(&mut self, connection: ConnectionId, transport: Transport) {
        if self.connections.len() >= self.config.limits.connections_per_shard_max {
            let who = Who {
                node: self.config.node,
                client_id: None,
                address: transport.peer,
                connection: Some(connection),
            };
            client_log!(
                WARN,
                who,
                limit = self.config.limits.connections_per_shard_max,
                "connection refused: the shard is at its connection limit"
            );
            self.outbox.stats.connections_refused_shard_limit += 1;
            self.outputs.push(Output::Close { connection });
            return;
        }
        // The reactor names each open connection once; a second `Opened` would orphan the
        // first connection's session and timer.
        assert!(
            !self.connections.contains_key(&connection),
            "connection {connection} opened twice"
        );
        let connect_timer = Some(self.arm_connect_deadline(connection));
        let mut opened = Connection::new(connection, transport, self.now_ms);
        client_log!(
            DEBUG,
            opened.who(self.config.node),
            listener = opened.transport.listener,
            "connection opened"
        );
        opened.connect_timer = connect_timer;
        self.connections.insert(connection, opened);
        self.outbox.stats.connections_opened += 1;
    }

    pub(super) fn receive(&mut self, connection_id: ConnectionId, bytes: Bytes) {
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        connection.last_received_ms = self.now_ms;
        if connection.claiming {
            self.received_while_claiming(connection_id, &bytes);
            return;
        }
        // Without a partial packet the received buffer is decoded in place, so payloads are
        // slices of it; otherwise the bytes join the partial packet first.
        let mut buffer = if connection.pending.is_empty() {
            bytes
        } else {
            connection.pending.extend_from_slice(&bytes);
            connection.pending.split().freeze()
        };
        // Before CONNECT, everything received so far goes along if the session lives on another
        // shard; after it, nothing needs keeping (and cloning costs an atomic increment).
        let connect_bytes = connection.session.is_none().then(|| buffer.clone());
        loop {
            let Some(connection) = self.connections.get_mut(&connection_id) else {
                return;
            };
            if connection.closing {
                return;
            }
            // Checked here, where the connection is already at hand, before each packet: replies
            // to the packets before it may have passed the hard bound.
            if connection.unsent_bytes() >= self.outbox.unsent_bytes_max().saturating_mul(2) {
                self.end_owing_too_much(connection_id);
                return;
            }
            let connected = connection.session.map(|_| connection.version);
            let options = DecodeOptions {
                version: connection.version,
                max_packet_size: self.config.limits.packet_size_max_for(connected.is_some()),
                sender: Sender::Client,
            };
            match mqtt::decode(&buffer, &options) {
                Ok(Some((packet, used))) => {
                    buffer = buffer.slice(used..);
                    self.outbox.stats.packets_received += 1;
                    if connected.is_none() {
                        // Everything received so far, CONNECT first, in case the session lives
                        // on another shard.
                        let received = connect_bytes.clone().unwrap_or_default();
                        self.first_packet(connection_id, packet, received, used);
                        let Some(connection) = self.connections.get_mut(&connection_id) else {
                            return;
                        };
                        if connection.claiming {
                            // Read once the session is here.
                            self.received_while_claiming(connection_id, &buffer);
                            return;
                        }
                    } else {
                        if let Some(client_id) = &connection.trace {
                            trace::record(
                                client_id,
                                self.config.node,
                                connection.transport.peer,
                                trace::Direction::In,
                                &trace::describe(&packet, used),
                            );
                        }
                        self.packet(connection_id, packet);
                    }
                }
                Ok(None) => {
                    if !buffer.is_empty() {
                        connection.pending.extend_from_slice(&buffer);
                    }
                    return;
                }
                Err(error) => {
                    self.protocol_error(connection_id, connected, &error);
                    return;
                }
            }
        }
    }

    pub(super) fn protocol_error(
        &mut self,
        connection_id: ConnectionId,
        connected: Option<ProtocolVersion>,
        error: &DecodeError,
    ) {
        client_log!(INFO, self.who(connection_id), %error, "closing the connection: the client broke the protocol");
        match error.response(connected) {
            ErrorResponse::ConnackV5(reason) => {
                self.send_connack_refusal(connection_id, ProtocolVersion::V5, reason)
            }
            ErrorResponse::ConnackV3(code) => {
                let reason = ReasonCode::from_connack_return_code(code)
                    .unwrap_or(ReasonCode::UNSPECIFIED_ERROR);
                self.send_connack_refusal(connection_id, ProtocolVersion::V3_1_1, reason)
            }
            ErrorResponse::Disconnect(reason) => self.send_disconnect(
                connection_id,
                reason,
                Some(&format!("[{}] {}", error.rule, error.message)),
            ),
            ErrorResponse::Close => {}
        }
        self.drop_connection(connection_id, true);
    }

    /// Ends a connection with a reason: DISCONNECT for 5.0 clients (with `why` as its reason
    /// string), a plain close for 3.x; `why` also goes to the log.
    pub(super) fn disconnect(
        &mut self,
        connection_id: ConnectionId,
        reason: ReasonCode,
        why: &str,
        publish_will: bool,
    ) {
        if reason == SERVER_SHUTTING_DOWN {
            client_log!(DEBUG, self.who(connection_id), %reason, why, "closing the connection");
        } else {
            client_log!(INFO, self.who(connection_id), %reason, why, "closing the connection");
        }
        if let Some(connection) = self.connections.get(&connection_id)
            && connection.session.is_some()
        {
            // Takeover and shutdown are routine: their reason code says enough.
            let explain =
                reason != SERVER_SHUTTING_DOWN && reason != ReasonCode::SESSION_TAKEN_OVER;
            self.send_disconnect(connection_id, reason, explain.then_some(why));
        }
        self.drop_connection(connection_id, publish_will);
    }

    /// Sends a 5.0 DISCONNECT, with a reason string unless it would make the packet larger than
    /// the client accepts [MQTT-3.1.2-25]. Nothing for 3.x, which has no server DISCONNECT.
    pub(super) fn send_disconnect(
        &mut self,
        connection_id: ConnectionId,
        reason: ReasonCode,
        why: Option<&str>,
    ) {
        let Some(connection) = self.connections.get(&connection_id) else {
            return;
        };
        if !connection.version.is_v5() {
            return;
        }
        let mut disconnect = Disconnect::new(reason);
        disconnect.properties.reason_string = why.map(|why| ByteString::from(why.to_owned()));
        // The writer leaves the reason string out if the packet would not fit otherwise.
        self.send(connection_id, &Packet::Disconnect(disconnect));
    }

    /// Queues the close and detaches the session (publishing its will if `publish_will`).
    pub(super) fn drop_connection(&mut self, connection_id: ConnectionId, publish_will: bool) {
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        self.trace_event(connection_id, format_args!("closing the connection"));
        let session = self.mark_closing(connection_id);
        self.outputs.push(Output::Close {
            connection: connection_id,
        });
        if let Some(session) = session {
            self.detach(session, publish_will);
        }
    }

    /// The connection reads no more input and keeps no timer; its session (returned) is no
    /// longer its own. The caller queues the close.
    pub(super) fn mark_closing(&mut self, connection_id: ConnectionId) -> Option<SessionIndex> {
        let connection = self.connections.get_mut(&connection_id)?;
        connection.closing = true;
        self.timers.cancel(connection.keep_alive_timer.take());
        self.timers.cancel(connection.stuck_timer.take());
        self.timers.cancel(connection.connect_timer.take());
        connection.session.take()
    }

    /// Forgets the connection (closed, lost or handed to another shard), with its timer.
    pub(super) fn remove_connection(&mut self, connection_id: ConnectionId) -> Option<Connection> {
        let mut connection = self.connections.remove(&connection_id)?;
        // A verify answer that comes after the connection is gone is dropped (`verified`).
        self.verifying.remove(&connection_id);
        self.timers.cancel(connection.keep_alive_timer.take());
        self.timers.cancel(connection.stuck_timer.take());
        self.timers.cancel(connection.connect_timer.take());
        Some(connection)
    }

    pub(super) fn connection_lost(&mut self, connection_id: ConnectionId, why: &str) {
        self.trace_event(connection_id, format_args!("connection lost: {why}"));
        if let Some(connection) = self.remove_connection(connection_id) {
            if connection.closing {
                return;
            }
            let who = Who {
                client_id: connection
                    .session
                    .and_then(|index| self.sessions.get(index as usize))
                    .and_then(Option::as_ref)
                    .map(|session| session.client_id.as_ref()),
                ..connection.who(self.config.node)
            };
            client_log!(DEBUG, who, why, "connection lost");
            if let Some(session) = connection.session {
                self.detach(session, true);
            }
        }
    }

    /// Queues a reply (or any packet the protocol owes) on the connection for this batch's
    /// send.
    pub(super) fn send(&mut self, connection_id: ConnectionId, packet: &Packet) {
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            // A reply too large for the client is dropped (and logged) by the writer: it must
            // not be sent [MQTT-3.1.2-24].
            let _ = connection.write(packet, Priority::Owed, &mut self.outbox);
        }
    }

    /// Hands each listed connection's bytes of the batch to the reactor, in the order the
    /// connections first got a packet, and arms the stuck timer of those the reactor now holds
    /// too much of. A connection whose `durable_barrier` the log does not cover yet keeps its
    /// bytes (in order, counted against its unsent bound) until a later flush.
    pub(super) fn flush_sends(&mut self, outputs: &mut Vec<Output>) {
        let released = self.durable_released_lsn();
        let (now_ms, limits) = (self.now_ms, &self.config.limits);
        let mut pending = std::mem::take(&mut self.outbox.barred);
        pending.append(&mut self.outbox.dirty);
        for connection_id in pending.drain(..) {
            let Some(connection) = self.connections.get_mut(&connection_id) else {
                continue;
            };
            if connection.durable_barrier > released {
                // Not in `dirty` again meanwhile: its bytes stay, so no write marks it.
                self.outbox.barred.push(connection_id);
                continue;
            }
            connection.durable_barrier = 0;
            if let Some(bytes) = connection.take_outgoing() {
                outputs.push(Output::Send {
                    connection: connection_id,
                    bytes,
                });
                connection.update_stuck_timer(&mut self.timers, now_ms, limits);
            }
        }
        self.outbox.dirty = pending;
    }

    /// The last bytes of a connection that is being forgotten (closed by this shard), for a
    /// `Send` before its `Close`; none while its `durable_barrier` is past `released`: the
    /// client never had them, its session keeps what they carried in flight (resent on the
    /// next connection), and sent now they could be delivered twice after a crash.
    pub(super) fn last_bytes(&self, connection: &mut Connection, released: u64) -> Option<Bytes> {
        let bytes = connection.take_outgoing()?;
        if connection.durable_barrier > released {
            client_log!(
                DEBUG,
                connection.who(self.config.node),
                bytes = bytes.len(),
                "closing before the log covered what was written for it: its last bytes are not sent"
            );
            return None;
        }
        Some(bytes)
    }

    /// The reactor says how many of the connection's bytes its socket has not taken yet.
    /// Below the bound again, the connection stops being stuck and its session's queue drains.
    pub(super) fn sent(&mut self, connection_id: ConnectionId, unsent_bytes: usize) {
        let (now_ms, limits) = (self.now_ms, &self.config.limits);
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        // The reactor holds only what this shard handed it: the report replaces the count.
        debug_assert!(
            unsent_bytes <= connection.reactor_unsent_bytes,
            "the reactor reports more unsent bytes than it was given"
        );
        connection.reactor_unsent_bytes = unsent_bytes;
        connection.update_stuck_timer(&mut self.timers, now_ms, limits);
        if connection.closing || !connection.has_room(&self.outbox) {
            return;
        }
        if let Some(index) = connection.session
            && !self.session(index).queue.is_empty()
        {
            self.drain_queue(index);
        }
    }

    /// A connection's stuck timer fired: the socket has taken too little for too long.
    /// Ends a connection that owes too much: replies it asked for (PINGRESP,
    /// acknowledgements) go past the unsent bound, since the protocol owes them, so a client
    /// that sends requests and never reads the replies is ended with 0x97 once it holds twice
    /// the bound, rather than at the stuck timeout (by then it could hold what its upload
    /// rate carries in that time).
    fn end_owing_too_much(&mut self, connection_id: ConnectionId) {
        let unsent_bytes = self
            .connections
            .get(&connection_id)
            .map_or(0, |connection| connection.unsent_bytes());
        let why = format!(
            "the client sends requests and does not read the replies: {unsent_bytes} bytes unsent"
        );
        self.disconnect(connection_id, ReasonCode::QUOTA_EXCEEDED, &why, true);
    }

    pub(super) fn send_stuck_due(&mut self, key: TimerKey, connection_id: ConnectionId) {
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("a stuck timer names a live connection");
        assert!(
            connection.stuck_timer == Some(key) && !connection.closing,
            "a stuck timer is its open connection's"
        );
        connection.stuck_timer = None;
        let unsent_bytes = connection.unsent_bytes();
        let limits = &self.config.limits;
        let why = format!(
            "the client has not read its messages: {unsent_bytes} bytes unsent (limit {}) for {} ms",
            limits.unsent_bytes_per_connection_max, limits.send_stuck_timeout_ms
        );
        // 0x97: a limit the server imposes on this client was exceeded; 0x89 (Server busy)
        // would blame the server, which is not what happened.
        self.disconnect(connection_id, ReasonCode::QUOTA_EXCEEDED, &why, true);
    }

    pub(super) fn send_connack_refusal(
        &mut self,
        connection_id: ConnectionId,
        version: ProtocolVersion,
        reason: ReasonCode,
    ) {
        *self
            .outbox
            .stats
            .connects_refused
            .entry(reason.0)
            .or_default() += 1;
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            connection.version = version;
        }
        let connack = ConnAck {
            session_present: false,
            reason,
            properties: ConnAckProperties::default(),
        };
        self.send(connection_id, &Packet::ConnAck(Box::new(connack)));
    }
}
