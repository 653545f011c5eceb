//! Snapshots at shutdown and start: the shard's durable state to and from snapshot records.

use super::*;

// Snapshots at shutdown and start.
impl Shard {
    /// The durable state this shard owns, as a snapshot file's bytes: every persistent session
    /// (expiry above 0; by now none has a connection), and, on shard 0 only, the retained
    /// messages (every shard holds the whole set, so one copy is enough).
    pub fn snapshot(&self) -> Vec<u8> {
        use crate::snapshot::Record;
        let mut records = Vec::new();
        for session in self
            .sessions
            .iter()
            .flatten()
            .filter(|s| s.expiry_seconds > 0)
        {
            records.push(Record::Session(Self::saved_session(session)));
        }
        if self.config.index == 0 {
            records.extend(self.retained.iter().cloned().map(Record::Retained));
        }
        crate::snapshot::encode(&records, self.now_ms)
    }

    /// A session's durable state: what a snapshot keeps and a takeover across nodes moves.
    pub(super) fn saved_session(session: &Session) -> crate::snapshot::SavedSession {
        use crate::snapshot::{SavedDelivery, SavedInflight, SavedSession};
        SavedSession {
            client_id: session.client_id.clone(),
            version: session.version,
            expiry_seconds: session.expiry_seconds,
            subscriptions: session
                .subscriptions
                .iter()
                .map(|(filter, &(options, identifier))| (filter.clone(), options, identifier))
                .collect(),
            inflight: session
                .inflight
                .iter()
                .map(|entry| SavedInflight {
                    packet_id: entry.packet_id,
                    released: entry.state == InflightState::Released,
                    delivery: SavedDelivery {
                        message: entry.message.clone(),
                        subscription_identifiers: entry.subscription_identifiers.clone(),
                    },
                })
                .collect(),
            queue: session
                .queue
                .iter()
                .map(|queued| SavedDelivery {
                    message: queued.message.clone(),
                    subscription_identifiers: queued.subscription_identifiers.clone(),
                })
                .collect(),
        }
    }

    /// Loads one snapshot file (of any shard, from any earlier shard count): the sessions whose
    /// client identifier this shard owns now, and every retained message. Call before the first
    /// input. Returns (sessions, retained messages) loaded and a warning for a damaged file.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(usize, usize, Option<String>), String> {
        use crate::snapshot::Record;
        let (records, warning) = crate::snapshot::decode(bytes, self.now_ms)?;
        let (mut sessions, mut retained) = (0, 0);
        for record in records {
            match record {
                Record::Retained(message) => {
                    self.retained.store(message);
                    retained += 1;
                }
                Record::Session(saved)
                    if owner_shard(&saved.client_id, self.config.shard_count)
                        == self.config.index =>
                {
                    if self.client_ids.contains_key(&saved.client_id) {
                        continue;
                    }
                    sessions += 1;
                    self.restore_session(saved);
                }
                Record::Session(_) => {}
            }
        }
        Ok((sessions, retained, warning))
    }

    pub(super) fn restore_session(&mut self, saved: crate::snapshot::SavedSession) {
        let mut session = Session::new(
            saved.client_id,
            saved.version,
            saved.expiry_seconds,
            self.config.limits.inflight_per_session_max,
        );
        session.next_packet_id = saved
            .inflight
            .iter()
            .map(|entry| entry.packet_id)
            .max()
            .unwrap_or(0);
        session.inflight = saved
            .inflight
            .into_iter()
            .map(|entry| Inflight {
                packet_id: entry.packet_id,
                message: entry.delivery.message,
                subscription_identifiers: entry.delivery.subscription_identifiers,
                state: if entry.released {
                    InflightState::Released
                } else {
                    InflightState::Published
                },
            })
            .collect();
        session.inflight_resumed_count = session.inflight.len();
        // Through the queue's own rule, so that a record from a run (or a node) with a higher
        // limit keeps the newest messages within this one's.
        let limit = self.config.limits.queued_messages_per_session_max;
        for delivery in saved.queue {
            Self::enqueue(
                &mut session,
                delivery.message,
                delivery.subscription_identifiers,
                limit,
            );
        }
        let index = self.insert_session(session);
        for (filter, options, identifier) in saved.subscriptions {
            if self.session(index).subscriptions.contains_key(&filter) {
                // A record names each filter once; a second would leave the trie holding a
                // subscription the session does not.
                warn!(%filter, "a saved session names a filter twice: the first is kept");
                continue;
            }
            self.add_subscription(index, &filter, options, identifier);
            self.session_mut(index)
                .subscriptions
                .insert(filter, (options, identifier));
        }
        // The time offline before the restart is not known: expiry counts from the restart.
        if saved.expiry_seconds != u32::MAX {
            let key = self.timers.arm(
                self.now_ms + u64::from(saved.expiry_seconds) * 1000,
                Timer::SessionExpiry(index, 0),
            );
            self.session_mut(index).expiry_timer = Some(key);
        }
    }
}
