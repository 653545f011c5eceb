//! Delivery to this shard's sessions: matching, the one copy per session, live sends within
//! the in-flight window, and the session queue.

use super::*;
use crate::limits::quote;

/// A PUBLISH of `message` for one subscriber.
pub(super) fn publish_packet(
    message: &Message,
    qos: QoS,
    packet_id: u16,
    dup: bool,
    subscription_identifiers: &[u32],
    now_ms: u64,
) -> Publish {
    let mut properties = message.properties.clone();
    properties.message_expiry_interval = message.remaining_expiry_seconds(now_ms);
    properties.subscription_identifiers = subscription_identifiers.to_vec();
    Publish {
        dup,
        qos,
        retain: message.retain,
        topic: message.topic.clone(),
        packet_id,
        properties,
        payload: message.payload.clone(),
    }
}

/// As [`publish_packet`], taking the message: for QoS 0, which keeps nothing after sending, the
/// topic, payload and properties move instead of being cloned.
fn publish_packet_owned(
    message: Message,
    subscription_identifiers: Vec<u32>,
    now_ms: u64,
) -> Publish {
    let message_expiry_interval = message.remaining_expiry_seconds(now_ms);
    let mut properties = message.properties;
    properties.message_expiry_interval = message_expiry_interval;
    properties.subscription_identifiers = subscription_identifiers;
    Publish {
        dup: false,
        qos: message.qos,
        retain: message.retain,
        topic: message.topic,
        packet_id: 0,
        properties,
        payload: message.payload,
    }
}

impl Shard {
    /// Delivers to this shard's sessions: every matching plain subscription, and one member of
    /// each listed shared group. A session with several matching subscriptions gets one copy at
    /// the highest of their QoS, with all their subscription identifiers [MQTT-3.3.4-2],
    /// [MQTT-3.3.4-3].
    pub(super) fn deliver_local(
        &mut self,
        message: Message,
        plain: bool,
        groups: &[(ByteString, ByteString)],
    ) {
        if message.is_expired(self.now_ms) {
            self.outbox.stats.dropped_expired += 1;
            return;
        }
        let mut matched = std::mem::take(&mut self.matched);
        matched.clear();
        if plain {
            self.subscriptions
                .for_each_match(&message.topic, |subscribers| {
                    matched.extend_from_slice(subscribers)
                });
        }
        let mut shared_targets = Vec::new();
        for (group, filter) in groups {
            let members: Vec<Subscriber> = self
                .shared
                .get(filter)
                .iter()
                .filter(|member| {
                    member.group == *group
                        && self.session(member.subscriber.session).connection.is_some()
                })
                .map(|member| member.subscriber)
                .collect();
            // Prefer connected members; with none connected, any member's session queues it.
            let members = if members.is_empty() {
                self.shared
                    .get(filter)
                    .iter()
                    .filter(|member| member.group == *group)
                    .map(|member| member.subscriber)
                    .collect()
            } else {
                members
            };
            if !members.is_empty() {
                let mut members = members;
                members.sort_unstable_by_key(|member| member.session);
                let choice = pick_member(
                    self.config.shared_strategy,
                    &mut self.shared_member_turn,
                    message.publisher.as_ref(),
                    members.len(),
                );
                shared_targets.push(members[choice]);
            }
        }
        // No Local: not back to the publisher's own session.
        matched.retain(|subscriber| {
            !(subscriber.options.no_local
                && message.publisher.as_ref() == Some(&self.session(subscriber.session).client_id))
        });
        matched.sort_unstable_by_key(|subscriber| subscriber.session);
        let (message_qos, message_retain) = (message.qos, message.retain);
        // The last delivery takes the message itself; the others get clones.
        let deliveries = matched
            .windows(2)
            .filter(|pair| pair[0].session != pair[1].session)
            .count()
            + usize::from(!matched.is_empty())
            + shared_targets.len();
        let mut delivered = 0;
        let mut message = Some(message);
        let mut take = |message: &mut Option<Message>| {
            delivered += 1;
            if delivered == deliveries {
                message
                    .take()
                    .expect("the message moves to the last delivery only")
            } else {
                message
                    .clone()
                    .expect("the message is still here before the last delivery")
            }
        };
        let mut start = 0;
        while start < matched.len() {
            let session = matched[start].session;
            let end = start
                + matched[start..]
                    .iter()
                    .take_while(|s| s.session == session)
                    .count();
            let group = &matched[start..end];
            let qos = group
                .iter()
                .map(|s| s.options.qos)
                .max()
                .expect("a non-empty group")
                .min(message_qos);
            let retain = message_retain && group.iter().any(|s| s.options.retain_as_published);
            let identifiers: Vec<u32> = group.iter().filter_map(|s| s.identifier).collect();
            let mut copy = take(&mut message);
            copy.retain = retain;
            self.deliver_to_session(session, copy, qos, identifiers);
            start = end;
        }
        for subscriber in shared_targets {
            let mut copy = take(&mut message);
            copy.retain = message_retain && subscriber.options.retain_as_published;
            let qos = subscriber.options.qos.min(message_qos);
            self.deliver_to_session(
                subscriber.session,
                copy,
                qos,
                subscriber.identifier.into_iter().collect(),
            );
        }
        self.matched = matched;
    }

    /// Sends the message to the session's connection now if its window and the connection's
    /// unsent bound allow, else queues it. QoS 0 is not queued: it is dropped for a session
    /// without a connection, and dropped (counted) for a connection at its unsent bound.
    pub(super) fn deliver_to_session(
        &mut self,
        index: SessionIndex,
        mut message: Message,
        qos: QoS,
        subscription_identifiers: Vec<u32>,
    ) {
        if !self.may_read(index, &message.topic) {
            // The subscription was granted, but this topic is not the reader's (a reload
            // changed the ACL since): not delivered.
            client_log!(DEBUG, self.who_session(index), topic = %quote(&message.topic), "delivery skipped: the ACL does not let the subscriber read the topic");
            self.outbox.stats.dropped_not_authorized += 1;
            return;
        }
        message.qos = qos;
        let limit = self.config.limits.queued_messages_per_session_max;
        let now_ms = self.now_ms;
        let Shard {
            sessions,
            connections,
            outbox,
            durable,
            ..
        } = self;
        let session = sessions[index as usize]
            .as_mut()
            .expect("a live session index");
        let Some(connection_id) = session.connection else {
            // QoS 0 is not kept for a session without a connection.
            if qos == QoS::AtMostOnce {
                return;
            }
            return Self::enqueue(
                session,
                message,
                subscription_identifiers,
                limit,
                durable,
                outbox,
            );
        };
        // Live delivery: with nothing waiting and room in the window, straight to the
        // connection, without passing through (and allocating) the session's queue.
        let window_open =
            qos == QoS::AtMostOnce || session.inflight.len() < usize::from(session.send_window);
        if session.queue.is_empty()
            && window_open
            && let Some(connection) = connections.get_mut(&connection_id).filter(|c| !c.closing)
        {
            if let Some(back) = Self::transmit(
                connection,
                session,
                outbox,
                Queued {
                    message,
                    subscription_identifiers,
                },
                now_ms,
                durable,
                false,
            ) {
                // At the unsent bound: QoS 1 and 2 wait for the backlog to fall.
                Self::enqueue(
                    session,
                    back.message,
                    back.subscription_identifiers,
                    limit,
                    durable,
                    outbox,
                );
            }
            return;
        }
        Self::enqueue(
            session,
            message,
            subscription_identifiers,
            limit,
            durable,
            outbox,
        );
        self.drain_queue(index);
    }

    /// Queues a message for the session, dropping the oldest when the queue is full. A
    /// logged session's QoS 1/2 messages are recorded (QoS 0 never is, and the log's queue
    /// holds the QoS 1/2 entries of the session's queue, in order).
    pub(super) fn enqueue(
        session: &mut Session,
        message: Message,
        subscription_identifiers: Vec<u32>,
        limit: usize,
        durable: &mut Option<Box<Durable>>,
        outbox: &mut Outbox,
    ) {
        let stats = &mut outbox.stats;
        if session.queue.len() >= limit {
            let dropped = session.queue.pop_front();
            stats.dropped_queue_full += u64::from(dropped.is_some());
            if session.logged && dropped.is_some_and(|d| d.message.qos != QoS::AtMostOnce) {
                let client_id = session.client_id.clone();
                durable::record(durable, |_| storage::Record::QueuedDropped { client_id });
            }
            session.dropped_messages += 1;
            if session.dropped_messages.is_power_of_two() {
                client_log!(
                    WARN,
                    session.who(outbox.node),
                    dropped = session.dropped_messages,
                    limit,
                    "session queue full: dropping its oldest messages"
                );
            }
        }
        if session.logged && message.qos != QoS::AtMostOnce {
            let client_id = session.client_id.clone();
            durable::record(durable, |durable| storage::Record::MessageQueued {
                client_id,
                delivery: storage::record::SavedDelivery {
                    message: durable.wall(&message),
                    subscription_identifiers: subscription_identifiers.clone(),
                },
            });
        }
        session.queue.push_back(Queued {
            message,
            subscription_identifiers,
        });
    }

    /// Sends queued messages while the connection's window has room and its unsent bytes are
    /// below the bound (queued QoS 0 messages at the bound are dropped, counted).
    pub(super) fn drain_queue(&mut self, index: SessionIndex) {
        let now_ms = self.now_ms;
        let Some(connection_id) = self.session(index).connection else {
            return;
        };
        let Shard {
            sessions,
            connections,
            outbox,
            durable,
            auth,
            ..
        } = self;
        let Some(connection) = connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        let session = sessions[index as usize].as_mut().expect("live session");
        while let Some(front) = session.queue.front() {
            let needs_slot = front.message.qos != QoS::AtMostOnce;
            if needs_slot && session.inflight.len() >= usize::from(session.send_window) {
                break;
            }
            let queued = session.queue.pop_front().expect("a front");
            // Queued while no principal was known (a session restored from the log) or under
            // an ACL a reload has changed since: checked again now that the client is here.
            if let Some(principal) = session.principal.as_deref()
                && !auth.may_subscribe(Some(principal), &session.client_id, &queued.message.topic)
            {
                let who = Who {
                    client_id: Some(&session.client_id),
                    ..connection.who(outbox.node)
                };
                client_log!(DEBUG, who, topic = %quote(&queued.message.topic), "queued message dropped: the ACL does not let the subscriber read the topic");
                outbox.stats.dropped_not_authorized += 1;
                if session.logged && queued.message.qos != QoS::AtMostOnce {
                    let client_id = session.client_id.clone();
                    durable::record(durable, |_| storage::Record::QueuedDropped { client_id });
                }
                continue;
            }
            let back = Self::transmit(connection, session, outbox, queued, now_ms, durable, true);
            if let Some(back) = back {
                session.queue.push_front(back);
                break;
            }
        }
        // A backlog has drained: give its memory back (live delivery does not use the queue).
        if session.queue.is_empty() && session.queue.capacity() > 0 {
            session.queue = VecDeque::new();
        }
    }

    /// Writes one message for the session's connection, holding a window slot for QoS 1/2.
    /// Expired messages are dropped, and so are messages larger than the client accepts
    /// [MQTT-3.1.2-24] (for QoS 1 and 2 that counts as delivered). At the connection's unsent
    /// bound a QoS 0 message is dropped (counted) and a QoS 1/2 message comes back, untouched,
    /// to wait in the queue.
    ///
    /// For a logged session, `from_queue` says whether the message is the head of the log's
    /// queue (taken from the session's queue) or a live delivery the log has not seen: it is
    /// recorded as sent, dropped, or (live) queued then sent.
    #[allow(clippy::too_many_arguments)]
    fn transmit(
        connection: &mut Connection,
        session: &mut Session,
        outbox: &mut Outbox,
        queued: Queued,
        now_ms: u64,
        durable: &mut Option<Box<Durable>>,
        from_queue: bool,
    ) -> Option<Queued> {
        let Queued {
            message,
            subscription_identifiers,
        } = queued;
        let logged = session.logged && message.qos != QoS::AtMostOnce;
        let dropped = |durable: &mut Option<Box<Durable>>, session: &Session| {
            if logged && from_queue {
                let client_id = session.client_id.clone();
                durable::record(durable, |_| storage::Record::QueuedDropped { client_id });
            }
        };
        if message.is_expired(now_ms) {
            outbox.stats.dropped_expired += 1;
            dropped(durable, session);
            return None;
        }
        if message.qos == QoS::AtMostOnce {
            let payload_bytes = message.payload.len();
            // QoS 0 keeps nothing after sending: the topic, payload and properties move.
            let packet = Packet::Publish(publish_packet_owned(
                message,
                subscription_identifiers,
                now_ms,
            ));
            match connection.write(&packet, Priority::Deferrable, outbox) {
                Write::Written => outbox.stats.sent(QoS::AtMostOnce, payload_bytes),
                Write::OverBound => {
                    outbox.dropped_over_bound_count += 1;
                    if outbox.dropped_over_bound_count.is_power_of_two() {
                        let who = Who {
                            client_id: Some(&session.client_id),
                            ..connection.who(outbox.node)
                        };
                        client_log!(
                            WARN,
                            who,
                            dropped = outbox.dropped_over_bound_count,
                            limit = outbox.unsent_bytes_max(),
                            "a subscriber is not reading: dropping QoS 0 messages for connections at their unsent limit"
                        );
                    }
                }
                // Counted by the writer (`dropped_too_large_count`).
                Write::TooLarge => {}
            }
            return None;
        }
        let packet_id = session.allocate_packet_id();
        let packet = Packet::Publish(publish_packet(
            &message,
            message.qos,
            packet_id,
            false,
            &subscription_identifiers,
            now_ms,
        ));
        match connection.write(&packet, Priority::Deferrable, outbox) {
            Write::Written => {
                outbox.stats.sent(message.qos, message.payload.len());
                if logged {
                    let client_id = &session.client_id;
                    if !from_queue {
                        durable::record(durable, |durable| storage::Record::MessageQueued {
                            client_id: client_id.clone(),
                            delivery: storage::record::SavedDelivery {
                                message: durable.wall(&message),
                                subscription_identifiers: subscription_identifiers.clone(),
                            },
                        });
                    }
                    durable::record(durable, |_| storage::Record::MessageSent {
                        client_id: client_id.clone(),
                        packet_id,
                    });
                    if message.qos == QoS::ExactlyOnce {
                        // Sent before its record is durable, a restart would not know the
                        // packet identifier and would send the message again as a new one.
                        connection.durable_barrier = durable::appended_lsn(durable);
                    }
                }
                session.inflight.push_back(Inflight {
                    packet_id,
                    message,
                    subscription_identifiers,
                    state: InflightState::Published,
                });
            }
            Write::TooLarge => dropped(durable, session),
            // The identifier taken is simply skipped: nothing is in flight under it.
            Write::OverBound => {
                return Some(Queued {
                    message,
                    subscription_identifiers,
                });
            }
        }
        None
    }
}
