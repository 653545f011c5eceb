//! The live state the log describes: what replaying every record up to now leaves.
//!
//! Owns: [`State`] (persistent sessions with their subscriptions, queued and in-flight
//! messages and inbound QoS 2 identifiers; retained messages; pending delayed wills),
//! [`State::apply`], and [`State::for_each_record`], which writes the state out as the
//! shortest records that rebuild it (a checkpoint).
//! Invariants: every collection is ordered (B-trees, queues in arrival order), so a checkpoint
//! comes out byte for byte the same in every process; a session's in-flight packet
//! identifiers are distinct and never zero; its queue and subscriptions stay within the
//! limits it was made with, so a hostile log cannot grow one session without bound (the whole
//! state is bounded by the bytes replayed, as each record adds at most what it carries).
//! Replaying `for_each_record`'s output into an empty state gives an equal state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytestring::ByteString;
use shardmq_net::mqtt::{ProtocolVersion, SubscriptionOptions};

use super::record::{Record, SavedDelivery, SavedInflight, Will};
use crate::message::Message;

/// The limits a [`State`] keeps each session within (the shard's own, from `Limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// As `Limits::queued_messages_per_session_max`: a message queued beyond it drops the
    /// oldest, as the shard does.
    pub queued_messages_per_session_max: usize,
    /// As `Limits::subscriptions_per_session_max`: a subscription beyond it is ignored.
    pub subscriptions_per_session_max: usize,
}

impl From<&crate::Limits> for StateLimits {
    fn from(limits: &crate::Limits) -> Self {
        Self {
            queued_messages_per_session_max: limits.queued_messages_per_session_max,
            subscriptions_per_session_max: limits.subscriptions_per_session_max,
        }
    }
}

/// A persistent session as the log knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub version: ProtocolVersion,
    pub expiry_seconds: u32,
    pub will: Option<Will>,
    pub subscriptions: BTreeMap<ByteString, (SubscriptionOptions, Option<u32>)>,
    /// In the order they went in flight (the order they are resent in).
    pub inflight: Vec<SavedInflight>,
    pub queue: VecDeque<SavedDelivery>,
    /// Inbound QoS 2 packet identifiers awaiting PUBREL.
    pub awaiting_release: BTreeSet<u16>,
}

/// A delayed will waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWill {
    pub will: Will,
    pub publish_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub limits: StateLimits,
    pub sessions: BTreeMap<ByteString, SessionState>,
    pub retained: BTreeMap<ByteString, Message>,
    pub pending_wills: BTreeMap<ByteString, PendingWill>,
}

impl State {
    pub fn new(limits: StateLimits) -> Self {
        Self {
            limits,
            sessions: BTreeMap::new(),
            retained: BTreeMap::new(),
            pending_wills: BTreeMap::new(),
        }
    }

    /// Applies one record. Returns false, changing nothing, for a record that names a session,
    /// message or packet identifier that is not there (or would break an invariant): a log
    /// this code wrote has none, so the caller counts them as a sign of damage.
    pub fn apply(&mut self, record: &Record) -> bool {
        let limits = self.limits;
        match record {
            Record::SessionCreated {
                client_id,
                version,
                expiry_seconds,
                will,
            } => {
                let session = SessionState {
                    version: *version,
                    expiry_seconds: *expiry_seconds,
                    will: will.clone(),
                    subscriptions: BTreeMap::new(),
                    inflight: Vec::new(),
                    queue: VecDeque::new(),
                    awaiting_release: BTreeSet::new(),
                };
                self.sessions.insert(client_id.clone(), session);
                true
            }
            Record::SessionChanged {
                client_id,
                version,
                expiry_seconds,
                will,
            } => self.with_session(client_id, |session| {
                session.version = *version;
                session.expiry_seconds = *expiry_seconds;
                session.will = will.clone();
                true
            }),
            Record::SessionEnded { client_id } => self.sessions.remove(client_id).is_some(),
            Record::SubscriptionAdded {
                client_id,
                filter,
                options,
                identifier,
            } => self.with_session(client_id, |session| {
                let held = session.subscriptions.len();
                if held >= limits.subscriptions_per_session_max
                    && !session.subscriptions.contains_key(filter)
                {
                    return false;
                }
                session
                    .subscriptions
                    .insert(filter.clone(), (*options, *identifier));
                true
            }),
            Record::SubscriptionRemoved { client_id, filter } => self
                .with_session(client_id, |session| {
                    session.subscriptions.remove(filter).is_some()
                }),
            Record::MessageQueued {
                client_id,
                delivery,
            } => self.with_session(client_id, |session| {
                if limits.queued_messages_per_session_max == 0 {
                    return false;
                }
                if session.queue.len() >= limits.queued_messages_per_session_max {
                    session.queue.pop_front();
                }
                session.queue.push_back(delivery.clone());
                true
            }),
            Record::QueuedDropped { client_id } => {
                self.with_session(client_id, |session| session.queue.pop_front().is_some())
            }
            Record::MessageSent {
                client_id,
                packet_id,
            } => self.with_session(client_id, |session| {
                if *packet_id == 0
                    || session.queue.is_empty()
                    || session.inflight.iter().any(|i| i.packet_id == *packet_id)
                {
                    return false;
                }
                let Some(delivery) = session.queue.pop_front() else {
                    return false;
                };
                session.inflight.push(SavedInflight {
                    packet_id: *packet_id,
                    released: false,
                    delivery,
                });
                true
            }),
            Record::MessageReleased {
                client_id,
                packet_id,
            } => self.with_session(client_id, |session| {
                match session
                    .inflight
                    .iter_mut()
                    .find(|i| i.packet_id == *packet_id && !i.released)
                {
                    Some(inflight) => {
                        inflight.released = true;
                        true
                    }
                    None => false,
                }
            }),
            Record::MessageAcknowledged {
                client_id,
                packet_id,
            } => self.with_session(client_id, |session| {
                let before = session.inflight.len();
                session.inflight.retain(|i| i.packet_id != *packet_id);
                session.inflight.len() != before
            }),
            Record::InboundAwaitingRelease {
                client_id,
                packet_id,
            } => self.with_session(client_id, |session| {
                session.awaiting_release.insert(*packet_id)
            }),
            Record::InboundReleased {
                client_id,
                packet_id,
            } => self.with_session(client_id, |session| {
                session.awaiting_release.remove(packet_id)
            }),
            Record::RetainedSet { message } => {
                // An empty retained payload clears the topic (MQTT 5.0 §3.3.1.3); the shard
                // logs a clear as `RetainedCleared`, but the rule holds whatever wrote it.
                if message.payload.is_empty() {
                    self.retained.remove(&message.topic).is_some()
                } else {
                    self.retained.insert(message.topic.clone(), message.clone());
                    true
                }
            }
            Record::RetainedCleared { topic } => self.retained.remove(topic).is_some(),
            Record::WillPending {
                client_id,
                will,
                publish_at_ms,
            } => {
                let pending = PendingWill {
                    will: will.clone(),
                    publish_at_ms: *publish_at_ms,
                };
                self.pending_wills.insert(client_id.clone(), pending);
                true
            }
            Record::WillCancelled { client_id } => self.pending_wills.remove(client_id).is_some(),
        }
    }

    fn with_session(
        &mut self,
        client_id: &ByteString,
        change: impl FnOnce(&mut SessionState) -> bool,
    ) -> bool {
        self.sessions.get_mut(client_id).is_some_and(change)
    }

    /// Hands `visit` the records that rebuild this state from an empty one, in a fixed order:
    /// sessions by client identifier (each: created, subscriptions by filter, in-flight
    /// messages as queued-then-sent in their order, the queue, inbound identifiers), then
    /// retained messages by topic, then pending wills by client identifier.
    pub fn for_each_record(&self, mut visit: impl FnMut(Record)) {
        for (client_id, session) in &self.sessions {
            visit(Record::SessionCreated {
                client_id: client_id.clone(),
                version: session.version,
                expiry_seconds: session.expiry_seconds,
                will: session.will.clone(),
            });
            for (filter, (options, identifier)) in &session.subscriptions {
                visit(Record::SubscriptionAdded {
                    client_id: client_id.clone(),
                    filter: filter.clone(),
                    options: *options,
                    identifier: *identifier,
                });
            }
            // Each in-flight entry goes through the queue while the queue is still empty, so
            // `MessageSent` takes exactly that entry.
            for inflight in &session.inflight {
                visit(Record::MessageQueued {
                    client_id: client_id.clone(),
                    delivery: inflight.delivery.clone(),
                });
                let packet_id = inflight.packet_id;
                visit(Record::MessageSent {
                    client_id: client_id.clone(),
                    packet_id,
                });
                if inflight.released {
                    visit(Record::MessageReleased {
                        client_id: client_id.clone(),
                        packet_id,
                    });
                }
            }
            for delivery in &session.queue {
                visit(Record::MessageQueued {
                    client_id: client_id.clone(),
                    delivery: delivery.clone(),
                });
            }
            for &packet_id in &session.awaiting_release {
                visit(Record::InboundAwaitingRelease {
                    client_id: client_id.clone(),
                    packet_id,
                });
            }
        }
        for message in self.retained.values() {
            visit(Record::RetainedSet {
                message: message.clone(),
            });
        }
        for (client_id, pending) in &self.pending_wills {
            visit(Record::WillPending {
                client_id: client_id.clone(),
                will: pending.will.clone(),
                publish_at_ms: pending.publish_at_ms,
            });
        }
    }
}
