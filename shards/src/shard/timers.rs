//! Timers (keep alive, will delay, session expiry, claims) and shutdown.
//!
//! Owns: the store of armed timers, ordered by deadline and then by the order they were
//! armed, so that timers due at one instant fire in the same order in every process and run.
//!
//! Invariants: a timer is in the store exactly while its owner holds its key (a connection its
//! CONNECT deadline and its keep alive, a session its will delay and its expiry, a pending claim its timeout); whoever
//! drops the key cancels the timer, so the store holds live timers only, and a client that
//! reconnects in a loop does not grow it. Cancelling is O(log n), like arming and firing.

use std::collections::BTreeMap;

use super::*;
use crate::storage::Record;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    KeepAlive(ConnectionId),
    /// A connection has stayed at its unsent bound for the stuck timeout.
    SendStuck(ConnectionId),
    /// A connection opened `connect_timeout_ms` ago and has not completed CONNECT.
    ConnectDeadline(ConnectionId),
    /// A session claim across nodes waited long enough (its number).
    Claim(u64),
    /// A session's delayed will is due (the session and its generation when it was armed).
    WillDelay(SessionIndex, u64),
    /// A session without a connection has expired (the session and its generation).
    SessionExpiry(SessionIndex, u64),
}

/// Where an armed timer sits in the store: its deadline, then the order of arming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TimerKey {
    deadline_ms: u64,
    sequence: u64,
}

/// The armed timers, earliest first.
#[derive(Debug, Default)]
pub(super) struct Timers {
    armed: BTreeMap<TimerKey, Timer>,
    next_sequence: u64,
}

impl TimerKey {
    pub(super) fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }
}

impl Timers {
    /// Arms `timer` for `deadline_ms`; the owner keeps the key to cancel it.
    pub(super) fn arm(&mut self, deadline_ms: u64, timer: Timer) -> TimerKey {
        self.next_sequence += 1;
        let key = TimerKey {
            deadline_ms,
            sequence: self.next_sequence,
        };
        self.armed.insert(key, timer);
        key
    }

    /// Cancels the timer of `key` (nothing without a key). The timer must be armed: a key
    /// names a timer until it fires or is cancelled, and both take the key from its owner.
    pub(super) fn cancel(&mut self, key: Option<TimerKey>) {
        if let Some(key) = key {
            let removed = self.armed.remove(&key);
            assert!(removed.is_some(), "a timer key names an armed timer");
        }
    }

    pub(super) fn next_deadline_ms(&self) -> Option<u64> {
        self.armed.first_key_value().map(|(key, _)| key.deadline_ms)
    }

    /// Takes the earliest timer due at `now_ms`.
    pub(super) fn pop_due(&mut self, now_ms: u64) -> Option<(TimerKey, Timer)> {
        let entry = self.armed.first_entry()?;
        if entry.key().deadline_ms > now_ms {
            return None;
        }
        let key = *entry.key();
        Some((key, entry.remove()))
    }

    /// Every armed timer, earliest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (TimerKey, Timer)> + '_ {
        self.armed.iter().map(|(&key, &timer)| (key, timer))
    }

    pub(super) fn len(&self) -> usize {
        self.armed.len()
    }
}

// Time and shutdown.
impl Shard {
    pub(super) fn fire_timers(&mut self) {
        while let Some((key, timer)) = self.timers.pop_due(self.now_ms) {
            match timer {
                Timer::KeepAlive(connection_id) => self.keep_alive_due(key, connection_id),
                Timer::SendStuck(connection_id) => self.send_stuck_due(key, connection_id),
                Timer::ConnectDeadline(connection_id) => {
                    self.connect_deadline_due(key, connection_id)
                }
                Timer::Claim(claim) => self.claim_timed_out(claim),
                Timer::WillDelay(index, generation) => {
                    let session = self
                        .timed_session(index, generation, key, |session| &mut session.will_timer);
                    if let Some(will) = session.will.take() {
                        if session.logged {
                            let client_id = session.client_id.clone();
                            self.log_record(|_| Record::WillCancelled { client_id });
                        }
                        self.publish(will.message);
                    }
                }
                Timer::SessionExpiry(index, generation) => {
                    self.timed_session(index, generation, key, |session| &mut session.expiry_timer);
                    self.end_session(index);
                }
            }
        }
    }

    /// Arms the CONNECT deadline of a connection that opens now; the connection keeps the key
    /// until CONNECT is decoded or it closes.
    pub(super) fn arm_connect_deadline(&mut self, connection_id: ConnectionId) -> TimerKey {
        let deadline_ms = self
            .now_ms
            .saturating_add(self.config.limits.connect_timeout_ms);
        self.timers
            .arm(deadline_ms, Timer::ConnectDeadline(connection_id))
    }

    /// A connection did not complete CONNECT in time: closed, with nothing sent (its protocol
    /// version, and so the form of a refusal, is not known).
    fn connect_deadline_due(&mut self, key: TimerKey, connection_id: ConnectionId) {
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("a CONNECT deadline names a live connection");
        assert!(
            connection.connect_timer == Some(key)
                && connection.session.is_none()
                && !connection.closing,
            "a CONNECT deadline is its open, unconnected connection's"
        );
        connection.connect_timer = None;
        let buffered_bytes = connection.pending.len();
        client_log!(
            INFO,
            connection.who(self.config.node),
            timeout_ms = self.config.limits.connect_timeout_ms,
            buffered_bytes,
            "closing the connection: no CONNECT in time"
        );
        self.drop_connection(connection_id, false);
    }

    /// The keep alive of a connection is checked: closed if the client has been silent for
    /// one and a half keep alives [MQTT-3.1.2-22], else checked again when that time comes
    /// (re-armed lazily, so that a receive costs nothing).
    fn keep_alive_due(&mut self, key: TimerKey, connection_id: ConnectionId) {
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("a keep-alive timer names a live connection");
        assert!(
            connection.keep_alive_timer == Some(key) && !connection.closing,
            "a keep-alive timer is its open connection's"
        );
        connection.keep_alive_timer = None;
        let deadline = connection.last_received_ms + connection.keep_alive_ms * 3 / 2;
        if deadline <= self.now_ms {
            self.disconnect(
                connection_id,
                ReasonCode::KEEP_ALIVE_TIMEOUT,
                "keep alive timeout",
                true,
            );
        } else {
            let key = self.timers.arm(deadline, Timer::KeepAlive(connection_id));
            connection.keep_alive_timer = Some(key);
        }
    }

    /// The session a will delay or expiry timer (fired with `key`) belongs to, with the
    /// timer's key taken from its slot.
    fn timed_session(
        &mut self,
        index: SessionIndex,
        generation: u64,
        key: TimerKey,
        slot: impl FnOnce(&mut Session) -> &mut Option<TimerKey>,
    ) -> &mut Session {
        let session = self.session_mut(index);
        assert!(
            session.generation == generation && session.connection.is_none(),
            "a session timer names a live generation of a session without a connection"
        );
        let slot = slot(session);
        assert!(*slot == Some(key), "a session timer is its session's");
        *slot = None;
        session
    }

    /// Every client gets DISCONNECT 0x8B (5.0) and is closed, in connection order.
    pub(super) fn shutdown(&mut self) {
        let mut connections: Vec<ConnectionId> = self.connections.keys().copied().collect();
        // The map's order is the hasher's, which differs per process: sort it away.
        connections.sort_unstable();
        for connection_id in connections {
            self.disconnect(
                connection_id,
                SERVER_SHUTTING_DOWN,
                "server shutting down",
                false,
            );
        }
    }
}
