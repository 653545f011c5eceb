//! Packets from a connected client: PUBLISH with its QoS flows, the acknowledgements of the
//! messages sent to it, PINGREQ and DISCONNECT.

use super::*;
use crate::limits::quote;

impl Shard {
    pub(super) fn packet(&mut self, connection_id: ConnectionId, packet: Packet) {
        let Some(index) = self.connections.get(&connection_id).and_then(|c| c.session) else {
            return;
        };
        match packet {
            Packet::Publish(publish) => self.client_publish(connection_id, index, publish),
            Packet::PubAck(ack) => self.acknowledged(
                connection_id,
                index,
                ack.packet_id,
                InflightState::Published,
                QoS::AtLeastOnce,
            ),
            Packet::PubRec(ack) => self.received(connection_id, index, ack),
            Packet::PubRel(ack) => self.released(connection_id, index, ack.packet_id),
            Packet::PubComp(ack) => self.acknowledged(
                connection_id,
                index,
                ack.packet_id,
                InflightState::Released,
                QoS::ExactlyOnce,
            ),
            Packet::Subscribe(subscribe) => self.subscribe(connection_id, index, subscribe),
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(connection_id, index, unsubscribe),
            Packet::PingReq => self.send(connection_id, &Packet::PingResp),
            Packet::Disconnect(disconnect) => {
                self.client_disconnect(connection_id, index, disconnect)
            }
            Packet::Connect(_) => {
                self.disconnect(
                    connection_id,
                    ReasonCode::PROTOCOL_ERROR,
                    "a second CONNECT [MQTT-3.1.0-2]",
                    true,
                );
            }
            Packet::Auth(_) => {
                // Only a client that chose an authentication method in CONNECT may send AUTH,
                // and no method is supported.
                self.disconnect(
                    connection_id,
                    ReasonCode::PROTOCOL_ERROR,
                    "AUTH without an authentication method",
                    true,
                );
            }
            // The decoder refuses server-only packets from clients.
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                unreachable!("the decoder accepts only client packets here")
            }
        }
    }

    pub(super) fn client_publish(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        mut publish: Publish,
    ) {
        self.outbox
            .stats
            .received(publish.qos, publish.payload.len());
        let limits = &self.config.limits;
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("live connection");
        let version = connection.version;
        // Topic alias (5.0): set the mapping, or use it when the topic is empty. The table
        // grows on first use, so a client that never sets an alias holds none.
        if let Some(alias) = publish.properties.topic_alias.take() {
            let slot = usize::from(alias) - 1;
            if alias > limits.topic_alias_max {
                self.disconnect(
                    connection_id,
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    &format!("topic alias above the maximum ({alias})"),
                    true,
                );
                return;
            }
            if publish.topic.is_empty() {
                match connection.topic_aliases.get(slot).and_then(Option::as_ref) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        self.disconnect(
                            connection_id,
                            ReasonCode::PROTOCOL_ERROR,
                            &format!("unknown topic alias ({alias})"),
                            true,
                        );
                        return;
                    }
                }
            } else {
                if connection.topic_aliases.len() <= slot {
                    connection.topic_aliases.resize(slot + 1, None);
                }
                connection.topic_aliases[slot] = Some(publish.topic.clone());
            }
        }
        let refusal = if publish.qos > limits.qos_max {
            Some(ReasonCode::QOS_NOT_SUPPORTED)
        } else if publish.retain && !limits.retain_available {
            Some(ReasonCode::RETAIN_NOT_SUPPORTED)
        } else if topic_levels(&publish.topic) > limits.topic_levels_max {
            Some(ReasonCode::TOPIC_NAME_INVALID)
        } else if publish.qos == QoS::ExactlyOnce
            && !self
                .session(index)
                .awaiting_release
                .contains(&publish.packet_id)
            && self.session(index).awaiting_release.len() >= usize::from(limits.receive_maximum)
        {
            Some(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.disconnect(
                connection_id,
                reason,
                &format!(
                    "PUBLISH to {} refused",
                    crate::limits::quote(&publish.topic)
                ),
                true,
            );
            return;
        }
        if !self.may_publish(index, &publish.topic) {
            self.refuse_unauthorized_publish(connection_id, index, version, &publish);
            return;
        }
        if self.retained_store_refuses(connection_id, index, &publish) {
            return;
        }
        if publish.qos != QoS::AtMostOnce && self.held_acks_full() {
            self.refuse_over_held(connection_id, version, publish.qos, publish.packet_id);
            return;
        }
        // QoS 2 is delivered once, on first receipt; a resent PUBLISH with the same packet
        // identifier before PUBREL is only acknowledged again (method B of MQTT 5.0 §4.3.3).
        let (qos, packet_id) = (publish.qos, publish.packet_id);
        let before = self.durable_begin(qos != QoS::AtMostOnce);
        let duplicate =
            qos == QoS::ExactlyOnce && !self.session_mut(index).awaiting_release.insert(packet_id);
        if qos == QoS::ExactlyOnce && !duplicate && self.logs_session(index) {
            let client_id = self.session(index).client_id.clone();
            self.log_record(|_| storage::Record::InboundAwaitingRelease {
                client_id,
                packet_id,
            });
        }
        let mut matched = true;
        if !duplicate {
            let publisher = Some(self.session(index).client_id.clone());
            let message = Message::from_publish(publish, self.now_ms, publisher);
            matched = self.publish(message);
        }
        let no_subscribers = version.is_v5() && !matched;
        let ack = PubAck {
            packet_id,
            reason: if no_subscribers {
                ReasonCode::NO_MATCHING_SUBSCRIBERS
            } else {
                ReasonCode::SUCCESS
            },
            properties: AckProperties::default(),
        };
        if qos != QoS::AtMostOnce {
            let packet = HeldPacket::Publish {
                qos,
                ack,
                session: index,
            };
            self.durable_finish(before, connection_id, packet);
        }
    }

    /// A PUBLISH the ACL refuses: not routed, not retained. 5.0 answers PUBACK or PUBREC 0x87
    /// (which ends a QoS 2 exchange). 3.x has no refusal: the message is dropped but
    /// acknowledged as usual, so that the
    /// client does not send it again forever.
    fn refuse_unauthorized_publish(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        version: ProtocolVersion,
        publish: &Publish,
    ) {
        client_log!(INFO, self.who_session(index), topic = %quote(&publish.topic), "PUBLISH refused: the ACL does not allow it");
        let reason = if version.is_v5() {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS
        };
        let ack = PubAck {
            packet_id: publish.packet_id,
            reason,
            properties: AckProperties::default(),
        };
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(connection_id, &Packet::PubAck(ack)),
            // A 3.x client's PUBREL then gets its PUBCOMP (`released`: 3.x has no reason
            // code to say the identifier was unknown).
            QoS::ExactlyOnce => self.send(connection_id, &Packet::PubRec(ack)),
        }
    }

    /// A QoS 1/2 PUBLISH that arrives while this shard's held acknowledgements are at their
    /// limit: refused before anything happens (0x97 for 5.0; 3.x has no refusal, so the
    /// connection is closed).
    fn refuse_over_held(
        &mut self,
        connection_id: ConnectionId,
        version: ProtocolVersion,
        qos: QoS,
        packet_id: u16,
    ) {
        if !version.is_v5() {
            self.disconnect(
                connection_id,
                ReasonCode::QUOTA_EXCEEDED,
                "too many acknowledgements wait for the durable log",
                true,
            );
            return;
        }
        let ack = PubAck {
            packet_id,
            reason: ReasonCode::QUOTA_EXCEEDED,
            properties: AckProperties::default(),
        };
        match qos {
            QoS::AtLeastOnce => self.send(connection_id, &Packet::PubAck(ack)),
            _ => self.send(connection_id, &Packet::PubRec(ack)),
        }
    }

    /// Records an in-flight message's end (acknowledged, or refused by the client).
    fn log_acknowledged(&mut self, index: SessionIndex, packet_id: u16) {
        if self.logs_session(index) {
            let client_id = self.session(index).client_id.clone();
            self.log_record(|_| storage::Record::MessageAcknowledged {
                client_id,
                packet_id,
            });
        }
    }

    /// PUBREL from the client: the QoS 2 exchange ends; the identifier may be reused.
    pub(super) fn released(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        packet_id: u16,
    ) {
        let known = self.session_mut(index).awaiting_release.remove(&packet_id);
        if known && self.logs_session(index) {
            let client_id = self.session(index).client_id.clone();
            self.log_record(|_| storage::Record::InboundReleased {
                client_id,
                packet_id,
            });
            // PUBCOMP lets the client reuse the identifier: a restart that still found it
            // awaiting release would take the next QoS 2 PUBLISH under it for a duplicate,
            // acknowledge it and drop it.
            let barrier = durable::appended_lsn(&self.durable);
            if let Some(connection) = self.connections.get_mut(&connection_id) {
                connection.durable_barrier = barrier;
            }
        }
        let reason = if known {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.send(
            connection_id,
            &Packet::PubComp(PubAck {
                reason,
                ..PubAck::new(packet_id)
            }),
        );
    }

    /// PUBREC from the client for a QoS 2 message we sent: answer PUBREL.
    pub(super) fn received(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        ack: PubAck,
    ) {
        let session = self.session_mut(index);
        let position = session.inflight.iter().position(|entry| {
            entry.packet_id == ack.packet_id
                && entry.state == InflightState::Published
                && entry.message.qos == QoS::ExactlyOnce
        });
        match position {
            Some(position) if ack.reason.is_error() => {
                // The client refused the message: the exchange ends here (MQTT 5.0 §4.3.3).
                session.inflight.remove(position);
                self.log_acknowledged(index, ack.packet_id);
                self.drain_queue(index);
            }
            Some(position) => {
                session.inflight[position].state = InflightState::Released;
                if self.logs_session(index) {
                    let client_id = self.session(index).client_id.clone();
                    let packet_id = ack.packet_id;
                    self.log_record(|_| storage::Record::MessageReleased {
                        client_id,
                        packet_id,
                    });
                    // The PUBREL leaves once the release is durable: a restart that found
                    // the message unreleased would publish it again.
                    let barrier = durable::appended_lsn(&self.durable);
                    if let Some(connection) = self.connections.get_mut(&connection_id) {
                        connection.durable_barrier = barrier;
                    }
                }
                self.send(connection_id, &Packet::PubRel(PubAck::new(ack.packet_id)));
            }
            None => {
                let reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                self.send(
                    connection_id,
                    &Packet::PubRel(PubAck {
                        reason,
                        ..PubAck::new(ack.packet_id)
                    }),
                );
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the message is delivered; its window slot frees.
    pub(super) fn acknowledged(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        packet_id: u16,
        state: InflightState,
        qos: QoS,
    ) {
        let session = self.session_mut(index);
        match session.inflight.iter().position(|entry| {
            entry.packet_id == packet_id && entry.state == state && entry.message.qos == qos
        }) {
            Some(position) => {
                session.inflight.remove(position);
                self.log_acknowledged(index, packet_id);
                self.drain_queue(index);
            }
            None => client_log!(
                DEBUG,
                self.who(connection_id),
                packet_id,
                "acknowledgement for an unknown packet identifier ignored"
            ),
        }
    }

    pub(super) fn client_disconnect(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        disconnect: Disconnect,
    ) {
        let expiry_max = self.config.limits.session_expiry_seconds_max;
        let session = self.session_mut(index);
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            // A session that was to end with the connection cannot be extended now [MQTT-3.14.2-2].
            if session.expiry_seconds == 0 && expiry != 0 {
                self.disconnect(
                    connection_id,
                    ReasonCode::PROTOCOL_ERROR,
                    "DISCONNECT sets a session expiry after CONNECT set none",
                    true,
                );
                return;
            }
            self.set_session_expiry(index, expiry.min(expiry_max));
            self.log_session_changed(index);
            self.log_session_presence(index);
        }
        // A normal DISCONNECT discards the will, except 0x04 (MQTT 5.0 §3.14.2.1).
        let publish_will = disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE;
        client_log!(DEBUG, self.who(connection_id), reason = %disconnect.reason, "client disconnected");
        self.drop_connection(connection_id, publish_will);
    }
}
