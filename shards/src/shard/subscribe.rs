//! SUBSCRIBE and UNSUBSCRIBE: the session's subscriptions, this shard's tries of subscribers
//! and shared members, and the retained messages a new subscription receives.
//!
//! Invariants: a session holds at most `subscriptions_per_session_max` filters, each once,
//! and the tries hold exactly one entry per held filter; replacing a held filter's options
//! changes no route (the shard's count of subscribers of the filter never drops to 0). One
//! SUBSCRIBE does bounded work: see `subscribe`.

use super::*;
use crate::limits::quote;

/// A filter of a SUBSCRIBE whose retained messages follow the SUBACK, with its options.
type RetainedFor = (ByteString, SubscriptionOptions);

impl Shard {
    /// One SUBSCRIBE. The work it can cause is bounded: at most `subscribe_filters_max`
    /// filters are taken (the rest get 0x97), a filter named twice is taken once, at its last
    /// place with its last options (a later subscription replaces an earlier one
    /// [MQTT-3.8.4-3]; the earlier places get the same reason code), and at most
    /// `retained_per_subscribe_max` retained messages follow the SUBACK.
    pub(super) fn subscribe(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        subscribe: Subscribe,
    ) {
        let identifier = subscribe.properties.subscription_identifier;
        let v5 = self.session(index).version.is_v5();
        let refused = if v5 {
            ReasonCode::QUOTA_EXCEEDED
        } else {
            ReasonCode::UNSPECIFIED_ERROR
        };
        let log_failed = self.logs_session(index) && self.log_failed();
        if log_failed || (self.logs_session(index) && self.held_acks_full()) {
            let refused = if log_failed {
                // Nothing more can be written: the subscription would live in memory only,
                // and come back missing after a restart. Refused before anything changes.
                client_log!(
                    INFO,
                    self.who_session(index),
                    "SUBSCRIBE refused: the durable log failed"
                );
                ReasonCode::UNSPECIFIED_ERROR
            } else {
                client_log!(
                    INFO,
                    self.who_session(index),
                    "SUBSCRIBE refused: too many acknowledgements wait for the durable log"
                );
                refused
            };
            let reasons = vec![refused; subscribe.filters.len()];
            let suback = SubAck {
                packet_id: subscribe.packet_id,
                properties: AckProperties::default(),
                reasons,
            };
            self.send(connection_id, &Packet::SubAck(suback));
            return;
        }
        let before = self.durable_begin(false);
        let taken = self
            .config
            .limits
            .subscribe_filters_max
            .min(subscribe.filters.len());
        if taken < subscribe.filters.len() {
            client_log!(
                INFO,
                self.who_session(index),
                filters = subscribe.filters.len(),
                limit = taken,
                "SUBSCRIBE names more filters than the limit: the rest are refused"
            );
        }
        // Where each filter last appears among those taken. Looked up only, never iterated.
        let mut last_place: HashMap<&str, usize> = HashMap::with_capacity(taken);
        for (place, (filter, _)) in subscribe.filters.iter().take(taken).enumerate() {
            last_place.insert(filter, place);
        }
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut earlier_places = Vec::new();
        let mut retained_for: Vec<RetainedFor> = Vec::new();
        for (place, (filter, options)) in subscribe.filters.iter().enumerate() {
            let last = last_place.get(&filter[..]).copied();
            if place >= taken {
                reasons.push(refused);
            } else if last != Some(place) {
                // Given the reason of its last place below.
                reasons.push(refused);
                earlier_places.extend(last.map(|last| (place, last)));
            } else {
                let (reason, retained) = self.subscribe_filter(index, filter, *options, identifier);
                reasons.push(reason);
                retained_for.extend(retained);
            }
        }
        for (place, last) in earlier_places {
            if let Some(&reason) = reasons.get(last) {
                reasons[place] = reason;
            }
        }
        let suback = SubAck {
            packet_id: subscribe.packet_id,
            properties: AckProperties::default(),
            reasons,
        };
        // A logged session's SUBACK waits for its subscription records (`durable.rs`); the
        // retained messages may go before it (MQTT 5.0 §3.8.4).
        self.durable_finish(before, connection_id, HeldPacket::Subscribe(suback));
        self.send_retained(index, &retained_for, identifier);
    }

    /// Adds one filter to the session, or replaces the session's subscription of that filter
    /// in place (no route change). Returns its reason code, and the filter if its retained
    /// messages are to be sent.
    fn subscribe_filter(
        &mut self,
        index: SessionIndex,
        filter: &ByteString,
        mut options: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> (ReasonCode, Option<RetainedFor>) {
        let limits = &self.config.limits;
        let v5 = self.session(index).version.is_v5();
        let plain = match topic::split_shared(filter) {
            Some(Ok((_, inner))) => inner,
            _ => &filter[..],
        };
        if topic_levels(plain) > limits.topic_levels_max {
            let reason = if v5 {
                ReasonCode::TOPIC_FILTER_INVALID
            } else {
                ReasonCode::UNSPECIFIED_ERROR
            };
            return (reason, None);
        }
        if !self.may_subscribe(index, filter) {
            // Before anything changes: no subscription, no log record, no retained messages.
            client_log!(INFO, self.who_session(index), filter = %quote(filter), "subscription refused: the ACL does not allow it");
            let reason = if v5 {
                ReasonCode::NOT_AUTHORIZED
            } else {
                ReasonCode::UNSPECIFIED_ERROR
            };
            return (reason, None);
        }
        let session = self.session(index);
        let held = session.subscriptions.get(filter).copied();
        if held.is_none() && session.subscriptions.len() >= limits.subscriptions_per_session_max {
            client_log!(INFO, self.who_client(&session.client_id), filter = %quote(filter), "subscription refused: the session holds the maximum number of subscriptions");
            let reason = if v5 {
                ReasonCode::QUOTA_EXCEEDED
            } else {
                ReasonCode::UNSPECIFIED_ERROR
            };
            return (reason, None);
        }
        options.qos = options.qos.min(limits.qos_max);
        match held {
            // A new subscription with the same filter replaces the old one [MQTT-3.8.4-3].
            Some(old) => {
                self.replace_subscription(index, filter, old, (options, identifier));
                if let Some(slot) = self.session_mut(index).subscriptions.get_mut(filter) {
                    *slot = (options, identifier);
                }
            }
            None => {
                // A copy: the session keeps it for as long as it lives, and the decoded one
                // is a slice of the whole receive buffer.
                let filter = ByteString::from(&**filter);
                self.add_subscription(index, &filter, options, identifier);
                self.session_mut(index)
                    .subscriptions
                    .insert(filter, (options, identifier));
            }
        }
        if self.logs_session(index) {
            let client_id = self.session(index).client_id.clone();
            // A copy: the decoded filter is a slice of the whole receive buffer.
            let filter = ByteString::from(&**filter);
            self.log_record(|_| storage::Record::SubscriptionAdded {
                client_id,
                filter,
                options,
                identifier,
            });
        }
        let shared = topic::split_shared(filter).is_some();
        // Retained messages are not sent for shared subscriptions (MQTT 5.0 §4.8.2).
        let send_retained = !shared
            && match options.retain_handling {
                RetainHandling::SendOnSubscribe => true,
                RetainHandling::SendIfNew => held.is_none(),
                RetainHandling::DoNotSend => false,
            };
        (
            ReasonCode(options.qos as u8),
            send_retained.then(|| (filter.clone(), options)),
        )
    }

    /// Retained messages follow the SUBACK [MQTT-3.8.4-4 in spirit: after the subscription
    /// exists], with the retain flag set [MQTT-3.3.1-9], through the session's delivery like
    /// any other message, and at most `retained_per_subscribe_max` of them for one SUBSCRIBE.
    fn send_retained(
        &mut self,
        index: SessionIndex,
        retained_for: &[RetainedFor],
        identifier: Option<u32>,
    ) {
        let now_ms = self.now_ms;
        let mut budget = self.config.limits.retained_per_subscribe_max;
        for (filter, options) in retained_for {
            // One more than the budget, to tell whether some were left out.
            let messages: Vec<Message> = self
                .retained
                .matching(filter, now_ms)
                .take(budget.saturating_add(1))
                .cloned()
                .collect();
            if messages.len() > budget {
                client_log!(INFO, self.who_session(index), filter = %quote(filter), limit = self.config.limits.retained_per_subscribe_max, "more retained messages match a SUBSCRIBE than the limit: the rest are not sent");
            }
            for mut message in messages.into_iter().take(budget) {
                budget -= 1;
                message.retain = true;
                let qos = message.qos.min(options.qos);
                self.deliver_to_session(index, message, qos, identifier.into_iter().collect());
            }
            if budget == 0 {
                break;
            }
        }
    }

    /// Replaces the session's subscriber entry of `filter` in this shard's trie: the new entry
    /// goes in before the old one leaves, so that the filter never looks unheld and no route
    /// change reaches the other shards.
    fn replace_subscription(
        &mut self,
        index: SessionIndex,
        filter: &ByteString,
        old: (SubscriptionOptions, Option<u32>),
        new: (SubscriptionOptions, Option<u32>),
    ) {
        if old == new {
            return;
        }
        let subscriber = Subscriber {
            session: index,
            options: new.0,
            identifier: new.1,
        };
        match topic::split_shared(filter) {
            Some(Ok((group, inner))) => {
                let member = SharedMember {
                    group: ByteString::from(group),
                    subscriber,
                };
                self.shared.insert(inner, member);
                // The first of this session's members in the group is the old one: the new
                // one was appended just now.
                let change = self.shared.remove(inner, |member| {
                    member.group == group && member.subscriber.session == index
                });
                debug_assert_eq!(change, Change::Unchanged);
            }
            _ => {
                let change = self.subscriptions.insert(filter, subscriber);
                debug_assert_eq!(change, Change::Unchanged);
                let change = self
                    .subscriptions
                    .remove(filter, |subscriber| subscriber.session == index);
                debug_assert_eq!(change, Change::Unchanged);
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
                if self.logs_session(index) {
                    let client_id = self.session(index).client_id.clone();
                    let filter = ByteString::from(&**filter);
                    self.log_record(|_| storage::Record::SubscriptionRemoved { client_id, filter });
                }
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
