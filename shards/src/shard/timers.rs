//! Timers (keep alive, will delay, session expiry, claims) and shutdown.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    KeepAlive(ConnectionId),
    /// A session claim across nodes waited long enough (its number).
    Claim(u64),
    WillDelay(SessionIndex, u64),
    SessionExpiry(SessionIndex, u64),
}

// Time and shutdown.
impl Shard {
    pub(super) fn fire_timers(&mut self) {
        while let Some(&Reverse((at, timer))) = self.timers.peek() {
            if at > self.now_ms {
                return;
            }
            self.timers.pop();
            match timer {
                Timer::KeepAlive(connection_id) => {
                    let Some(connection) = self.connections.get(&connection_id) else {
                        continue;
                    };
                    if connection.closing || connection.keep_alive_ms == 0 {
                        continue;
                    }
                    let deadline = connection.last_received_ms + connection.keep_alive_ms * 3 / 2;
                    if deadline <= self.now_ms {
                        self.disconnect(
                            connection_id,
                            ReasonCode::KEEP_ALIVE_TIMEOUT,
                            "keep alive timeout",
                            true,
                        );
                    } else {
                        self.timers.push(Reverse((deadline, timer)));
                    }
                }
                Timer::Claim(claim) => self.claim_timed_out(claim),
                Timer::WillDelay(index, generation) => {
                    let live = self
                        .sessions
                        .get(index as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.generation == generation && s.connection.is_none());
                    if live && let Some(will) = self.session_mut(index).will.take() {
                        self.publish(will.message);
                    }
                }
                Timer::SessionExpiry(index, generation) => {
                    let live = self
                        .sessions
                        .get(index as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.generation == generation && s.connection.is_none());
                    if live {
                        self.end_session(index);
                    }
                }
            }
        }
    }

    pub(super) fn shutdown(&mut self) {
        let connections: Vec<ConnectionId> = self.connections.keys().copied().collect();
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
