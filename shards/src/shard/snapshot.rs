//! Snapshots at shutdown and start: the shard's durable state to and from snapshot records.
//!
//! A record is input from outside (a file, or another node's handover): restoring it holds it
//! to this node's limits. The session expiry is capped at `session_expiry_seconds_max`,
//! in-flight entries with a packet identifier already taken are skipped, subscriptions past
//! `subscriptions_per_session_max` and queued messages past the queue limit are dropped,
//! and a snapshot's sessions past `persistent_sessions_per_shard_max` are not loaded. Every
//! kept string and message gets buffers of its own (`own_buffers`): the decoded ones are
//! slices of the whole file or handover.

use super::*;
use crate::limits::quote;
use crate::retained::own_buffers;

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
            records.extend(
                self.retained
                    .iter()
                    .filter(|message| !sys::is_sys_topic(&message.topic))
                    .cloned()
                    .map(Record::Retained),
            );
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
                Record::Retained(mut message) => {
                    own_buffers(&mut message);
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
                    if self.persistent_quota_refuses(&saved.client_id, saved.expiry_seconds) {
                        client_log!(
                            WARN,
                            Who::client(self.config.node, &saved.client_id),
                            limit = self.config.limits.persistent_sessions_per_shard_max,
                            "a saved session is not loaded: the shard holds its maximum of persistent sessions"
                        );
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

    /// Installs a saved session (from a snapshot or a handover) as an offline session, held
    /// to this node's limits (see the module comment).
    pub(super) fn restore_session(&mut self, saved: crate::snapshot::SavedSession) {
        let limits = &self.config.limits;
        let expiry_seconds = saved.expiry_seconds.min(limits.session_expiry_seconds_max);
        let mut session = Session::new(
            ByteString::from(&*saved.client_id),
            saved.version,
            expiry_seconds,
            limits.inflight_per_session_max,
        );
        // Packet identifiers seen, so that the check is O(log n) an entry: a handover from a
        // peer can name up to 65,535 of them.
        let mut seen = std::collections::BTreeSet::new();
        for entry in saved.inflight {
            if !seen.insert(entry.packet_id) {
                // Two entries of one identifier: an acknowledgement could end only one, and
                // the invariants (and the client) expect identifiers to be unique.
                client_log!(
                    WARN,
                    Who::client(self.config.node, &session.client_id),
                    packet_id = entry.packet_id,
                    "a saved session names an in-flight packet identifier twice: the first is kept"
                );
                continue;
            }
            let mut message = entry.delivery.message;
            own_buffers(&mut message);
            session.inflight.push_back(Inflight {
                packet_id: entry.packet_id,
                message,
                subscription_identifiers: entry.delivery.subscription_identifiers,
                state: if entry.released {
                    InflightState::Released
                } else {
                    InflightState::Published
                },
            });
        }
        session.next_packet_id = session
            .inflight
            .iter()
            .map(|entry| entry.packet_id)
            .max()
            .unwrap_or(0);
        session.inflight_resumed_count = session.inflight.len();
        // Through the queue's own rule, so that a record from a run (or a node) with a higher
        // limit keeps the newest messages within this one's.
        let limit = limits.queued_messages_per_session_max;
        for delivery in saved.queue {
            let mut message = delivery.message;
            own_buffers(&mut message);
            Self::enqueue(
                &mut session,
                message,
                delivery.subscription_identifiers,
                limit,
                &mut None,
                &mut self.outbox,
            );
        }
        let subscriptions_max = limits.subscriptions_per_session_max;
        let index = self.insert_session(session);
        for (filter, options, identifier) in saved.subscriptions {
            let session = self.session(index);
            if session.subscriptions.contains_key(&filter) {
                // A record names each filter once; a second would leave the trie holding a
                // subscription the session does not.
                warn!(filter = %quote(&filter), "a saved session names a filter twice: the first is kept");
                continue;
            }
            if session.subscriptions.len() >= subscriptions_max {
                client_log!(WARN, Who::client(self.config.node, &session.client_id), filter = %quote(&filter), limit = subscriptions_max, "a saved session holds more subscriptions than the limit: the rest are dropped");
                break;
            }
            let filter = ByteString::from(&*filter);
            self.add_subscription(index, &filter, options, identifier);
            self.session_mut(index)
                .subscriptions
                .insert(filter, (options, identifier));
        }
        // The time offline before the restart is not known: expiry counts from the restart.
        if expiry_seconds != u32::MAX {
            let key = self.timers.arm(
                self.now_ms + u64::from(expiry_seconds) * 1000,
                Timer::SessionExpiry(index, 0),
            );
            self.session_mut(index).expiry_timer = Some(key);
        }
        // A session handed over from another node while a log is attached is written whole.
        self.log_session_presence(index);
    }
}
