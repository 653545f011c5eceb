//! Connections: the bytes in and out of one client socket, the protocol errors that end it,
//! and the way a connection ends (DISCONNECT, close, the session's detach).

use super::*;

#[derive(Debug)]
pub(super) struct Connection {
    pub(super) session: Option<SessionIndex>,
    pub(super) version: ProtocolVersion,
    /// Bytes of a packet not complete yet; empty (and unallocated) between packets.
    pub(super) pending: BytesMut,
    /// Packets encoded in this batch, sent by `take_outputs`.
    pub(super) outgoing: BytesMut,
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
}

impl Shard {
    pub(super) fn open(&mut self, connection: ConnectionId) {
        if self.connections.len() >= self.config.limits.connections_per_shard_max {
            warn!(
                connection,
                limit = self.config.limits.connections_per_shard_max,
                "connection refused: the shard is at its connection limit"
            );
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
        self.connections.insert(
            connection,
            Connection {
                session: None,
                version: ProtocolVersion::V5,
                pending: BytesMut::new(),
                outgoing: BytesMut::new(),
                keep_alive_ms: 0,
                keep_alive_timer: None,
                connect_timer,
                last_received_ms: self.now_ms,
                client_packet_size_max: mqtt::PACKET_SIZE_MAX,
                topic_aliases: Vec::new(),
                problem_information: true,
                claiming: false,
                closing: false,
            },
        );
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
            let connected = connection.session.map(|_| connection.version);
            let options = DecodeOptions {
                version: connection.version,
                max_packet_size: self.config.limits.packet_size_max_for(connected.is_some()),
                sender: Sender::Client,
            };
            match mqtt::decode(&buffer, &options) {
                Ok(Some((packet, used))) => {
                    buffer = buffer.slice(used..);
                    if connected.is_none() {
                        // Everything received so far, CONNECT first, in case the session lives
                        // on another shard.
                        let received = connect_bytes.clone().unwrap_or_default();
                        self.first_packet(connection_id, packet, received);
                        let Some(connection) = self.connections.get_mut(&connection_id) else {
                            return;
                        };
                        if connection.claiming {
                            // Read once the session is here.
                            self.received_while_claiming(connection_id, &buffer);
                            return;
                        }
                    } else {
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
        info!(connection = connection_id, %error, "closing the connection: the client broke the protocol");
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
            debug!(connection = connection_id, %reason, why, "closing the connection");
        } else {
            info!(connection = connection_id, %reason, why, "closing the connection");
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
        let mut packet = Packet::Disconnect(disconnect);
        if packet.encoded_len(ProtocolVersion::V5) > connection.client_packet_size_max as usize {
            packet = Packet::Disconnect(Disconnect::new(reason));
        }
        self.send(connection_id, &packet);
    }

    /// Queues the close and detaches the session (publishing its will if `publish_will`).
    pub(super) fn drop_connection(&mut self, connection_id: ConnectionId, publish_will: bool) {
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
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
        self.timers.cancel(connection.connect_timer.take());
        connection.session.take()
    }

    /// Forgets the connection (closed, lost or handed to another shard), with its timer.
    pub(super) fn remove_connection(&mut self, connection_id: ConnectionId) -> Option<Connection> {
        let connection = self.connections.remove(&connection_id)?;
        self.timers.cancel(connection.keep_alive_timer);
        self.timers.cancel(connection.connect_timer);
        Some(connection)
    }

    pub(super) fn connection_lost(&mut self, connection_id: ConnectionId, why: &str) {
        if let Some(connection) = self.remove_connection(connection_id) {
            if connection.closing {
                return;
            }
            debug!(connection = connection_id, why, "connection lost");
            if let Some(session) = connection.session {
                self.detach(session, true);
            }
        }
    }

    pub(super) fn encode_into(connection: &mut Connection, packet: &Packet) {
        mqtt::encode(packet, connection.version, &mut connection.outgoing);
    }

    /// Queues `packet` on the connection for this batch's send.
    pub(super) fn send(&mut self, connection_id: ConnectionId, packet: &Packet) {
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            if connection.outgoing.is_empty() {
                self.dirty.push(connection_id);
            }
            Self::encode_into(connection, packet);
        }
    }

    pub(super) fn send_connack_refusal(
        &mut self,
        connection_id: ConnectionId,
        version: ProtocolVersion,
        reason: ReasonCode,
    ) {
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
