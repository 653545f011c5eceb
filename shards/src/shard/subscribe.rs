//! SUBSCRIBE and UNSUBSCRIBE: the session's subscriptions, this shard's tries of subscribers
//! and shared members, and the retained messages a new subscription receives.

use super::*;

impl Shard {
    pub(super) fn subscribe(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        subscribe: Subscribe,
    ) {
        let limits = self.config.limits.clone();
        let identifier = subscribe.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut retained_for = Vec::new();
        let v5 = self.session(index).version.is_v5();
        for (filter, mut options) in subscribe.filters {
            let plain = match topic::split_shared(&filter) {
                Some(Ok((_, inner))) => inner,
                _ => &filter[..],
            };
            let session = self.session(index);
            let is_new = !session.subscriptions.contains_key(&filter);
            if topic_levels(plain) > limits.topic_levels_max {
                reasons.push(if v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            if is_new && session.subscriptions.len() >= limits.subscriptions_per_session_max {
                info!(client_id = %session.client_id, %filter, "subscription refused: the session holds the maximum number of subscriptions");
                reasons.push(if v5 {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            options.qos = options.qos.min(limits.qos_max);
            // A new subscription with the same filter replaces the old one [MQTT-3.8.4-3].
            if !is_new {
                self.remove_subscription(index, &filter);
            }
            self.add_subscription(index, &filter, options, identifier);
            self.session_mut(index)
                .subscriptions
                .insert(filter.clone(), (options, identifier));
            reasons.push(ReasonCode(options.qos as u8));
            let shared = topic::split_shared(&filter).is_some();
            // Retained messages are not sent for shared subscriptions (MQTT 5.0 §4.8.2).
            let send_retained = !shared
                && match options.retain_handling {
                    RetainHandling::SendOnSubscribe => true,
                    RetainHandling::SendIfNew => is_new,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                retained_for.push((filter, options));
            }
        }
        self.send(
            connection_id,
            &Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                properties: AckProperties::default(),
                reasons,
            }),
        );
        // Retained messages follow the SUBACK [MQTT-3.8.4-4 in spirit: after the subscription
        // exists], with the retain flag set [MQTT-3.3.1-9].
        let now_ms = self.now_ms;
        for (filter, options) in retained_for {
            let messages: Vec<Message> = self.retained.matching(&filter, now_ms).cloned().collect();
            for mut message in messages {
                message.retain = true;
                let qos = message.qos.min(options.qos);
                self.deliver_to_session(index, message, qos, identifier.into_iter().collect());
            }
        }
    }

    pub(super) fn unsubscribe(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        unsubscribe: Unsubscribe,
    ) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            if self
                .session_mut(index)
                .subscriptions
                .remove(filter)
                .is_some()
            {
                self.remove_subscription(index, filter);
                reasons.push(ReasonCode::SUCCESS);
            } else {
                reasons.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.send(
            connection_id,
            &Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                properties: AckProperties::default(),
                reasons,
            }),
        );
    }

    pub(super) fn add_subscription(
        &mut self,
        index: SessionIndex,
        filter: &ByteString,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) {
        let subscriber = Subscriber {
            session: index,
            options,
            identifier,
        };
        let (change, group, plain) = match topic::split_shared(filter) {
            Some(Ok((group, inner))) => {
                let member = SharedMember {
                    group: ByteString::from(group),
                    subscriber,
                };
                let first = !self
                    .shared
                    .get(inner)
                    .iter()
                    .any(|m| m.group == member.group);
                self.shared.insert(inner, member);
                (
                    if first {
                        Change::FilterAdded
                    } else {
                        Change::Unchanged
                    },
                    Some(ByteString::from(group)),
                    ByteString::from(inner),
                )
            }
            _ => (
                self.subscriptions.insert(filter, subscriber),
                None,
                filter.clone(),
            ),
        };
        if change == Change::FilterAdded {
            self.broadcast_route(plain, group, true);
        }
    }

    pub(super) fn remove_subscription(&mut self, index: SessionIndex, filter: &ByteString) {
        match topic::split_shared(filter) {
            Some(Ok((group, inner))) => {
                self.shared.remove(inner, |member| {
                    member.group == group && member.subscriber.session == index
                });
                let group_left = !self
                    .shared
                    .get(inner)
                    .iter()
                    .any(|member| member.group == group);
                if group_left {
                    self.broadcast_route(
                        ByteString::from(inner),
                        Some(ByteString::from(group)),
                        false,
                    );
                }
            }
            _ => {
                if self
                    .subscriptions
                    .remove(filter, |subscriber| subscriber.session == index)
                    == Change::FilterRemoved
                {
                    self.broadcast_route(filter.clone(), None, false);
                }
            }
        }
    }
}
