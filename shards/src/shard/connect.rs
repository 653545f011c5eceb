//! CONNECT: refusal checks, placement on the owning shard, acceptance (session resume or a
//! new session, keep alive, CONNACK), takeover of a live connection, and resending on resume.

use super::*;

impl Shard {
    pub(super) fn first_packet(
        &mut self,
        connection_id: ConnectionId,
        packet: Packet,
        received: Bytes,
        size_bytes: usize,
    ) {
        // The first packet has come: the CONNECT deadline is over, whatever it is.
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            self.timers.cancel(connection.connect_timer.take());
        }
        // Traced from its CONNECT when the identifier it asks for is traced; on the shard
        // that owns it (a refusal is traced where it happens, a hand-off by the owner).
        let traced = self.is_traced(match &packet {
            Packet::Connect(connect) => &connect.client_id,
            _ => "",
        });
        let Packet::Connect(connect) = packet else {
            client_log!(
                INFO,
                self.who(connection_id),
                packet = packet.name(),
                "closing the connection: the first packet is not CONNECT [MQTT-3.1.0-1]"
            );
            self.drop_connection(connection_id, false);
            return;
        };
        let version = connect.protocol;
        let limits = &self.config.limits;
        let refuse = |reason| Some(reason);
        let refusal = if connect.client_id.len() > limits.client_id_length_max
            || (version == ProtocolVersion::V3_1
                && (connect.client_id.is_empty() || connect.client_id.len() > 23))
            || (connect.client_id.is_empty() && !connect.clean_start && !version.is_v5())
        {
            // 3.1 requires 1 to 23 characters; 3.1.1 refuses an empty identifier with clean
            // session 0 [MQTT-3.1.3-8]; every version is held to the configured length.
            refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID)
        } else if connect.properties.authentication_method.is_some() {
            // No authentication method is configured, so none is supported (§4.12).
            refuse(ReasonCode::BAD_AUTHENTICATION_METHOD)
        } else if connect
            .will
            .as_ref()
            .is_some_and(|will| will.qos > limits.qos_max)
        {
            refuse(ReasonCode::QOS_NOT_SUPPORTED)
        } else if connect
            .will
            .as_ref()
            .is_some_and(|will| will.retain && !limits.retain_available)
        {
            refuse(ReasonCode::RETAIN_NOT_SUPPORTED)
        } else if connect
            .will
            .as_ref()
            .is_some_and(|will| topic_levels(&will.topic) > limits.topic_levels_max)
        {
            refuse(ReasonCode::TOPIC_NAME_INVALID)
        } else {
            None
        };
        if traced
            && (refusal.is_some()
                || owner_shard(&connect.client_id, self.config.shard_count) == self.config.index)
        {
            let client_id = ByteString::from(&*connect.client_id);
            self.trace_connect(connection_id, &client_id, &connect, size_bytes);
        }
        if let Some(reason) = refusal {
            client_log!(INFO, self.who_connecting(connection_id, &connect.client_id), %reason, "CONNECT refused");
            self.send_connack_refusal(connection_id, version, reason);
            self.drop_connection(connection_id, false);
            return;
        }
        // A copy: the session keeps its identifier for as long as it lives, and the decoded one
        // is a slice of the whole receive buffer.
        let (client_id, assigned) = if connect.client_id.is_empty() {
            (self.assign_client_id(), true)
        } else {
            (ByteString::from(&*connect.client_id), false)
        };
        let owner = owner_shard(&client_id, self.config.shard_count);
        if owner != self.config.index {
            // The session belongs to another shard: pass the socket and its bytes on.
            self.remove_connection(connection_id);
            self.outputs.push(Output::HandOff {
                connection: connection_id,
                shard: owner,
                bytes: received,
            });
            return;
        }
        // Who the client is, then the claim (in a cluster) or acceptance (`authorize.rs`).
        self.authenticate(connection_id, connect, client_id, assigned);
    }

    /// An identifier for a client that sent none, chosen so that it hashes to this shard.
    pub(super) fn assign_client_id(&mut self) -> ByteString {
        loop {
            self.assigned_ids += 1;
            // The node is part of it, so that no two nodes of a cluster assign the same one.
            let candidate = format!(
                "shardmq-{}-{}-{:x}-{:x}",
                self.config.node, self.config.index, self.now_ms, self.assigned_ids
            );
            if owner_shard(&candidate, self.config.shard_count) == self.config.index
                && !self.client_ids.contains_key(candidate.as_str())
            {
                return ByteString::from(candidate);
            }
        }
    }

    /// Accepts a CONNECT on the shard that owns its client identifier, in steps: refuse a
    /// new persistent session past the quota, take over or replace the session already here
    /// (or create one), attach it to the connection, set up the connection (keep alive,
    /// client's limits), then CONNACK and what a resumed session has to send.
    pub(super) fn accept(
        &mut self,
        connection_id: ConnectionId,
        mut connect: Connect,
        client_id: ByteString,
        assigned: bool,
    ) {
        let version = connect.protocol;
        let expiry_seconds = self.granted_expiry_seconds(&connect);
        if expiry_seconds > 0 && self.log_refuses_persistent() {
            client_log!(
                WARN,
                self.who_connecting(connection_id, &client_id),
                "CONNECT refused: a persistent session cannot be kept, the durable log failed"
            );
            self.send_connack_refusal(connection_id, version, ReasonCode::SERVER_UNAVAILABLE);
            self.drop_connection(connection_id, false);
            return;
        }
        if self.persistent_quota_refuses(&client_id, expiry_seconds) {
            client_log!(
                WARN,
                self.who_connecting(connection_id, &client_id),
                limit = self.config.limits.persistent_sessions_per_shard_max,
                "CONNECT refused: the shard holds its maximum of persistent sessions"
            );
            self.send_connack_refusal(connection_id, version, ReasonCode::QUOTA_EXCEEDED);
            self.drop_connection(connection_id, false);
            return;
        }
        let (index, session_present) =
            self.session_for_connect(&client_id, version, expiry_seconds, connect.clean_start);
        let will = connect
            .will
            .take()
            .map(|will| stored_will(will, &client_id));
        let client_receive_maximum = connect.properties.receive_maximum.unwrap_or(u16::MAX);
        self.attach_session(
            index,
            connection_id,
            version,
            expiry_seconds,
            client_receive_maximum,
            will,
            session_present,
        );
        self.mark_traced(connection_id, &client_id);
        let server_keep_alive = self.set_up_connection(connection_id, index, &connect);
        let properties = self.connack_properties(
            &connect,
            expiry_seconds,
            assigned.then(|| client_id.clone()),
            server_keep_alive,
        );
        // Field values are evaluated only when the line is enabled: no lookup otherwise.
        client_log!(
            DEBUG,
            self.who(connection_id),
            ?version,
            session_present,
            "client connected"
        );
        self.trace_event(
            connection_id,
            format_args!(
                "client connected: session_present={}",
                u8::from(session_present)
            ),
        );
        self.send(
            connection_id,
            &Packet::ConnAck(Box::new(ConnAck {
                session_present,
                reason: ReasonCode::SUCCESS,
                properties,
            })),
        );
        if session_present {
            self.resend_inflight(index);
        }
        self.drain_queue(index);
    }

    /// Session expiry: 5.0 says it in CONNECT; 3.1.1 clean session 0 keeps the session until
    /// the configured maximum, clean session 1 ends it with the connection.
    fn granted_expiry_seconds(&self, connect: &Connect) -> u32 {
        if connect.protocol.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        }
        .min(self.config.limits.session_expiry_seconds_max)
    }

    /// Whether this CONNECT would create a persistent session past the shard's quota. A
    /// client with a persistent session here replaces or resumes it, which adds none; one
    /// whose session has expiry 0 gets a new session (it ends with the connection taken over).
    pub(super) fn persistent_quota_refuses(&self, client_id: &str, expiry_seconds: u32) -> bool {
        expiry_seconds > 0
            && self
                .client_ids
                .get(client_id)
                .is_none_or(|&index| self.session(index).expiry_seconds == 0)
            && self.persistent_sessions >= self.config.limits.persistent_sessions_per_shard_max
    }

    /// The session the connection gets, and whether it was present: a live connection of the
    /// same client identifier is taken over [MQTT-3.1.4-3], clean start ends the old session,
    /// and a client without one gets a new session.
    fn session_for_connect(
        &mut self,
        client_id: &ByteString,
        version: ProtocolVersion,
        expiry_seconds: u32,
        clean_start: bool,
    ) -> (SessionIndex, bool) {
        if let Some(index) = self.client_ids.get(client_id).copied() {
            self.take_over(index, clean_start);
            // A session whose expiry is 0 ends with its network connection [MQTT-3.1.2-23];
            // the takeover closed that connection, so the newcomer gets a new session (and
            // the persistent-session quota sees a new one).
            if self
                .client_ids
                .get(client_id)
                .is_some_and(|&index| self.session(index).expiry_seconds == 0)
            {
                self.end_session(index);
            }
        }
        match self.client_ids.get(client_id).copied() {
            Some(index) if !clean_start => (index, true),
            existing => {
                if let Some(index) = existing {
                    self.end_session(index);
                }
                let session = Session::new(
                    client_id.clone(),
                    version,
                    expiry_seconds,
                    self.config.limits.inflight_per_session_max,
                );
                (self.insert_session(session), false)
            }
        }
    }

    /// Binds the session to the connection for this generation: the timers of its time
    /// offline are cancelled, and it takes the connection's version, expiry, window and will.
    #[allow(clippy::too_many_arguments)]
    fn attach_session(
        &mut self,
        index: SessionIndex,
        connection_id: ConnectionId,
        version: ProtocolVersion,
        expiry_seconds: u32,
        client_receive_maximum: u16,
        will: Option<Box<StoredWill>>,
        session_present: bool,
    ) {
        self.set_session_expiry(index, expiry_seconds);
        let inflight_max = self.config.limits.inflight_per_session_max;
        let principal = self
            .connections
            .get(&connection_id)
            .and_then(|connection| connection.principal.clone());
        let session = self.session_mut(index);
        session.principal = principal;
        session.recovered = false;
        // Back online: the timers of its time offline no longer apply.
        let offline_timers = [session.will_timer.take(), session.expiry_timer.take()];
        session.connection = Some(connection_id);
        session.version = version;
        session.generation += 1;
        session.send_window = client_receive_maximum.min(inflight_max).max(1);
        session.will = will;
        session.inflight_resumed_count = session.inflight.len();
        if !session_present {
            session.awaiting_release.clear();
        }
        let will_was_pending = offline_timers[0].is_some();
        for key in offline_timers {
            self.timers.cancel(key);
        }
        // A resumed session the log knows changes; a new one (or one that just became
        // persistent) is written whole, and one that stopped being persistent ends.
        if session_present && self.logs_session(index) {
            if will_was_pending {
                let client_id = self.session(index).client_id.clone();
                self.log_record(|_| storage::Record::WillCancelled { client_id });
            }
            self.log_session_changed(index);
        }
        self.log_session_presence(index);
    }

    /// Binds the connection to session `index` with the client's limits and arms its keep
    /// alive: the client's value, capped by the server's. Returns the Server Keep Alive to
    /// tell a 5.0 client, if the cap changed its value.
    fn set_up_connection(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        connect: &Connect,
    ) -> Option<u16> {
        let keep_alive_max = self.config.limits.keep_alive_seconds_max;
        let mut keep_alive = connect.keep_alive_seconds;
        let mut server_keep_alive = None;
        if keep_alive_max != 0 && (keep_alive == 0 || keep_alive > keep_alive_max) {
            keep_alive = keep_alive_max;
            server_keep_alive = Some(keep_alive);
        }
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("the connecting connection");
        connection.session = Some(index);
        connection.version = connect.protocol;
        connection.keep_alive_ms = u64::from(keep_alive) * 1000;
        connection.connected_at_ms = self.now_ms;
        connection.clean_start = connect.clean_start;
        connection.client_packet_size_max = connect
            .properties
            .maximum_packet_size
            .unwrap_or(mqtt::PACKET_SIZE_MAX);
        connection.problem_information = connect
            .properties
            .request_problem_information
            .unwrap_or(true);
        if keep_alive > 0 {
            // The client must send something within one and a half keep alives [MQTT-3.1.2-22].
            assert!(
                connection.keep_alive_timer.is_none(),
                "a connection is accepted once"
            );
            let key = self.timers.arm(
                self.now_ms + u64::from(keep_alive) * 1500,
                Timer::KeepAlive(connection_id),
            );
            connection.keep_alive_timer = Some(key);
        }
        server_keep_alive
    }

    /// What a 5.0 CONNACK tells the client about the server's limits and its session (none
    /// for 3.x).
    fn connack_properties(
        &self,
        connect: &Connect,
        expiry_seconds: u32,
        assigned_client_id: Option<ByteString>,
        server_keep_alive: Option<u16>,
    ) -> ConnAckProperties {
        let limits = &self.config.limits;
        let mut properties = ConnAckProperties::default();
        if !connect.protocol.is_v5() {
            return properties;
        }
        properties.receive_maximum =
            (limits.receive_maximum != u16::MAX).then_some(limits.receive_maximum);
        properties.maximum_packet_size = Some(limits.packet_size_max);
        properties.topic_alias_maximum =
            (limits.topic_alias_max > 0).then_some(limits.topic_alias_max);
        properties.maximum_qos =
            (limits.qos_max != QoS::ExactlyOnce).then_some(limits.qos_max as u8);
        properties.retain_available = (!limits.retain_available).then_some(false);
        properties.server_keep_alive = server_keep_alive;
        // A basis for response topics, private to the client (MQTT 5.0 §4.10). The server may
        // leave it out; it does when the client identifier is too long for it to fit a UTF-8
        // string field, rather than send a CONNACK the codec must refuse.
        if connect.properties.request_response_information == Some(true) {
            let client_id = assigned_client_id.as_deref().unwrap_or(&connect.client_id);
            let information = format!("reply/{client_id}");
            if information.len() <= usize::from(u16::MAX) {
                properties.response_information = Some(ByteString::from(information));
            }
        }
        properties.assigned_client_identifier = assigned_client_id;
        let asked = connect.properties.session_expiry_interval.unwrap_or(0);
        properties.session_expiry_interval = (asked != expiry_seconds).then_some(expiry_seconds);
        properties
    }

    /// A new connection (here or on another node) takes session `index` over: the old
    /// connection, if any, gets DISCONNECT 0x8E (5.0) and is closed, and the session stays,
    /// without a connection, for the new one to continue or replace. The old connection's
    /// will is published unless the new one resumes the session (`clean_start` false) and
    /// the will is delayed (MQTT 5.0 §3.1.3.2.2); a delayed will not sent now is dropped, as
    /// its client is back.
    pub(super) fn take_over(&mut self, index: SessionIndex, clean_start: bool) {
        let Some(old_connection) = self.session(index).connection else {
            return;
        };
        let keep_will = !clean_start
            && self
                .session(index)
                .will
                .as_ref()
                .is_some_and(|will| will.delay_seconds > 0);
        client_log!(
            INFO,
            self.who_session(index),
            old_connection,
            "session taken over by a new connection"
        );
        if let Some(connection) = self.connections.get(&old_connection)
            && connection.version.is_v5()
        {
            self.send(
                old_connection,
                &Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)),
            );
        }
        self.mark_closing(old_connection);
        self.outputs.push(Output::Close {
            connection: old_connection,
        });
        let session = self.session_mut(index);
        session.connection = None;
        if let Some(will) = session.will.take()
            && !keep_will
        {
            self.publish(will.message);
        }
    }

    /// On resume, unacknowledged PUBLISH packets go again with DUP set, and PUBRELs again, in
    /// their original order [MQTT-4.4.0-1].
    pub(super) fn resend_inflight(&mut self, index: SessionIndex) {
        let now_ms = self.now_ms;
        let Some(connection_id) = self.session(index).connection else {
            return;
        };
        // A resent PUBLISH or PUBREL whose MessageSent / MessageReleased record is not durable
        // yet (it was written to an earlier connection in this same log call) waits for it,
        // as on the first connection (`Connection::durable_barrier`).
        let barrier = if self.logs_session(index) {
            durable::appended_lsn(&self.durable)
        } else {
            0
        };
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        let session = self.sessions[index as usize]
            .as_mut()
            .expect("live session");
        // Only QoS 2 needs it: a QoS 1 message sent twice after a crash is within its promise.
        if session
            .inflight
            .iter()
            .any(|entry| entry.message.qos == QoS::ExactlyOnce)
        {
            connection.durable_barrier = connection.durable_barrier.max(barrier);
        }
        // A PUBLISH now larger than the client's Maximum Packet Size (it came back with a
        // smaller one) is not sent [MQTT-3.1.2-24]; it counts as delivered, as a new delivery
        // would, rather than holding a place in the window for ever.
        let mut refused: Vec<u16> = Vec::new();
        for entry in &session.inflight {
            // A PUBLISH the client now connected may not read (the session resumed under
            // another principal, or a reload narrowed its ACL) is not sent again: it ends as
            // delivered, like one over the Maximum Packet Size.
            if entry.state == InflightState::Published
                && let Some(principal) = session.principal.as_deref()
                && !self.auth.may_subscribe(
                    Some(principal),
                    &session.client_id,
                    &entry.message.topic,
                )
            {
                let who = Who {
                    node: self.config.node,
                    client_id: Some(&session.client_id),
                    address: connection.transport.peer,
                    connection: Some(connection_id),
                };
                client_log!(DEBUG, who, topic = %crate::limits::quote(&entry.message.topic), "in-flight message not resent: the ACL does not let the client read the topic");
                self.outbox.stats.dropped_not_authorized += 1;
                refused.push(entry.packet_id);
                continue;
            }
            let packet = match entry.state {
                InflightState::Published => Packet::Publish(publish_packet(
                    &entry.message,
                    entry.message.qos,
                    entry.packet_id,
                    true,
                    &entry.subscription_identifiers,
                    now_ms,
                )),
                InflightState::Released => Packet::PubRel(PubAck::new(entry.packet_id)),
            };
            // Owed: a resend goes even past the unsent bound (the window bounds it).
            let written = connection.write(&packet, Priority::Owed, &mut self.outbox);
            if written == Write::TooLarge && entry.state == InflightState::Published {
                refused.push(entry.packet_id);
            }
        }
        if !refused.is_empty() {
            session
                .inflight
                .retain(|entry| !refused.contains(&entry.packet_id));
            session.inflight_resumed_count = session.inflight.len();
            if session.logged {
                let client_id = session.client_id.clone();
                for packet_id in refused {
                    let client_id = client_id.clone();
                    durable::record(&mut self.durable, |_| {
                        storage::Record::MessageAcknowledged {
                            client_id,
                            packet_id,
                        }
                    });
                }
            }
        }
    }
}

/// The will of a CONNECT as the session keeps it, in buffers of its own: the CONNECT's are
/// slices of its receive buffer, which a session offline for days would keep alive whole.
fn stored_will(will: mqtt::Will, client_id: &ByteString) -> Box<StoredWill> {
    let mut message = Message {
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        expires_at_ms: None,
        publisher: Some(client_id.clone()),
        properties: PublishProperties {
            payload_format_indicator: will.properties.payload_format_indicator,
            // Counted from the moment the will is published; set then.
            message_expiry_interval: will.properties.message_expiry_interval,
            content_type: will.properties.content_type,
            response_topic: will.properties.response_topic,
            correlation_data: will.properties.correlation_data,
            user_properties: will.properties.user_properties,
            ..PublishProperties::default()
        },
    };
    crate::retained::own_buffers(&mut message);
    Box::new(StoredWill {
        delay_seconds: will.properties.will_delay_interval.unwrap_or(0),
        message,
    })
}
