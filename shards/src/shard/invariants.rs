//! The shard's invariants as code: `check_invariants` walks the whole state and panics, naming
//! the rule, at the first violation. It costs time in proportion to the state, so it is for
//! tests and the simulation (which call it after every step), not for the reactor; the cheap
//! checks at the transitions are `assert!`s where the state changes.
//!
//! The rules:
//! - sessions: each live session is indexed by its client identifier, lives on the shard that
//!   owns that identifier, and its slot is not on the free list;
//! - connections and sessions are one to one: a session's connection is open and names the
//!   session back; a closing connection has no session; a claiming connection waits on a
//!   pending claim;
//! - the trie holds exactly the sessions' subscriptions (one entry per session and filter,
//!   with its options and identifier), and this shard's own rows of the node route table
//!   name exactly the filters (and shared groups) held here;
//! - flows: in flight stays within the window (or within what a resumed session brought
//!   back), the queue within its limit, QoS 2 identifiers awaiting PUBREL within the Receive
//!   Maximum, and a connected session's queue waits only for a full window or a connection
//!   at its unsent bound (and starts with a QoS 1/2 message: QoS 0 is never held back);
//! - output: an open connection holds a stuck timer exactly while the reactor holds at least
//!   the unsent bound of its bytes (the reactor's share is what it reported plus what was
//!   handed out since, and a report never exceeds it, checked where it arrives);
//! - timers: every armed timer is held by exactly one owner (an open connection's keep
//!   alive or stuck timer, an offline session's will delay or expiry of its current generation, a pending
//!   claim's timeout), and every owner that should hold one does.

use std::collections::BTreeSet;

use super::*;

impl Shard {
    /// Panics with the broken rule if the shard's state is inconsistent (see the module
    /// comment). For tests and the simulation.
    pub fn check_invariants(&self) {
        self.check_sessions();
        self.check_connections();
        self.check_subscriptions();
        self.check_flows();
        self.check_timers();
        self.check_guards();
        self.check_durable();
        self.check_traces();
    }

    fn live_sessions(&self) -> impl Iterator<Item = (SessionIndex, &Session)> {
        self.sessions
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                let index = SessionIndex::try_from(index).expect("session indexes fit in u32");
                slot.as_ref().map(|session| (index, session))
            })
    }

    fn check_sessions(&self) {
        let free: BTreeSet<SessionIndex> = self.free_sessions.iter().copied().collect();
        assert_eq!(
            free.len(),
            self.free_sessions.len(),
            "a free session slot is listed twice"
        );
        for &index in &free {
            assert!(
                self.sessions[index as usize].is_none(),
                "free session slot {index} holds a session"
            );
        }
        let mut live = 0;
        for (index, session) in self.live_sessions() {
            live += 1;
            let client_id = &session.client_id;
            assert_eq!(
                self.client_ids.get(client_id),
                Some(&index),
                "session {index} ({client_id}) is not indexed by its client identifier"
            );
            assert_eq!(
                owner_shard(client_id, self.config.shard_count),
                self.config.index,
                "session {client_id} lives on a shard that does not own it"
            );
            if let Some(connection_id) = session.connection {
                let connection = self.connections.get(&connection_id).unwrap_or_else(|| {
                    panic!("session {client_id} names connection {connection_id}, which is gone")
                });
                assert_eq!(
                    connection.session,
                    Some(index),
                    "session {client_id}'s connection {connection_id} does not name it back"
                );
                assert!(
                    !connection.closing,
                    "session {client_id} is bound to closing connection {connection_id}"
                );
            }
        }
        assert_eq!(
            live,
            self.client_ids.len(),
            "client identifiers index sessions that are gone"
        );
        assert_eq!(
            live + free.len(),
            self.sessions.len(),
            "a session slot is neither live nor free"
        );
    }

    fn check_connections(&self) {
        for (&connection_id, connection) in &self.connections {
            if let Some(index) = connection.session {
                let session = self.sessions[index as usize].as_ref().unwrap_or_else(|| {
                    panic!("connection {connection_id} names session {index}, which is gone")
                });
                assert_eq!(
                    session.connection,
                    Some(connection_id),
                    "connection {connection_id}'s session {} does not name it back",
                    session.client_id
                );
            }
            assert!(
                !connection.closing || connection.session.is_none(),
                "closing connection {connection_id} still has a session"
            );
            if connection.claiming && !connection.closing {
                // It waits for the other nodes, or for the verifier pool.
                assert!(
                    connection.session.is_none()
                        && (self.verifying.contains_key(&connection_id)
                            || self
                                .claims
                                .values()
                                .any(|pending| pending.connection() == connection_id)),
                    "claiming connection {connection_id} waits on no pending claim or verify"
                );
            }
        }
    }

    fn check_subscriptions(&self) {
        let me = Target::Shard(self.config.index);
        let (mut plain_count, mut shared_count) = (0, 0);
        let mut plain_filters: BTreeSet<&str> = BTreeSet::new();
        let mut shared_groups: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (index, session) in self.live_sessions() {
            let subscriber =
                |&(options, identifier): &(SubscriptionOptions, Option<u32>)| Subscriber {
                    session: index,
                    options,
                    identifier,
                };
            for (filter, held) in &session.subscriptions {
                let client_id = &session.client_id;
                // The same split as `add_subscription`: a malformed `$share` is a plain filter.
                match topic::split_shared(filter) {
                    Some(Ok((group, inner))) => {
                        shared_count += 1;
                        shared_groups.insert((group, inner));
                        let members: Vec<&SharedMember> = self
                            .shared
                            .get(inner)
                            .iter()
                            .filter(|m| m.group == group && m.subscriber.session == index)
                            .collect();
                        assert!(
                            members.len() == 1 && members[0].subscriber == subscriber(held),
                            "{client_id}'s shared subscription {filter} is not in the trie once, as held"
                        );
                        assert!(
                            self.shared_routes
                                .get(inner)
                                .iter()
                                .any(|r| r.group == group && r.target == me),
                            "the shared route table lacks this shard for {filter}"
                        );
                    }
                    _ => {
                        plain_count += 1;
                        plain_filters.insert(filter);
                        let entries: Vec<&Subscriber> = self
                            .subscriptions
                            .get(filter)
                            .iter()
                            .filter(|s| s.session == index)
                            .collect();
                        assert!(
                            entries.len() == 1 && *entries[0] == subscriber(held),
                            "{client_id}'s subscription {filter} is not in the trie once, as held"
                        );
                        assert!(
                            self.routes.get(filter).contains(&me),
                            "the node route table lacks this shard for {filter}"
                        );
                    }
                }
            }
        }
        // Every session's entry is there once, so equal totals mean nothing else is.
        assert_eq!(
            self.subscriptions.values().count(),
            plain_count,
            "the trie holds subscriptions no session holds"
        );
        assert_eq!(
            self.subscriptions.filter_count(),
            plain_filters.len(),
            "the trie's filter count disagrees with the sessions' filters"
        );
        assert_eq!(
            self.shared.values().count(),
            shared_count,
            "the shared trie holds members no session holds"
        );
        assert_eq!(
            self.routes.values().filter(|&&t| t == me).count(),
            plain_filters.len(),
            "the node route table names this shard for filters nobody here holds"
        );
        assert_eq!(
            self.shared_routes
                .values()
                .filter(|r| r.target == me)
                .count(),
            shared_groups.len(),
            "the shared route table names this shard for groups nobody here is in"
        );
    }

    fn check_flows(&self) {
        let limits = &self.config.limits;
        for (_, session) in self.live_sessions() {
            let client_id = &session.client_id;
            let window = usize::from(session.send_window);
            assert!(
                window >= 1 && window <= usize::from(limits.inflight_per_session_max.max(1)),
                "{client_id}'s window {window} is outside 1 ..= the in-flight limit"
            );
            assert!(
                session.inflight.len() <= window.max(session.inflight_resumed_count),
                "{client_id} has {} in flight, beyond its window {window}",
                session.inflight.len()
            );
            assert!(
                session.queue.len() <= limits.queued_messages_per_session_max.max(1),
                "{client_id}'s queue holds {} messages, beyond its limit",
                session.queue.len()
            );
            assert!(
                session.awaiting_release.len() <= usize::from(limits.receive_maximum),
                "{client_id} has more QoS 2 messages awaiting PUBREL than the Receive Maximum"
            );
            if let Some(connection_id) = session.connection
                && let Some(front) = session.queue.front()
            {
                let connection = &self.connections[&connection_id];
                assert!(
                    front.message.qos != QoS::AtMostOnce,
                    "{client_id}'s queue holds a QoS 0 message back while connected"
                );
                assert!(
                    session.inflight.len() >= window || !connection.has_room(&self.outbox),
                    "{client_id}'s queue waits while its window has room and its connection is below its unsent bound: the connection stalls"
                );
            }
        }
    }

    fn check_timers(&self) {
        let mut owners = 0;
        for (&connection_id, connection) in &self.connections {
            let open = connection.session.is_some() && !connection.closing;
            assert_eq!(
                connection.keep_alive_timer.is_some(),
                open && connection.keep_alive_ms > 0,
                "connection {connection_id} holds a keep-alive timer exactly while open with a keep alive"
            );
            owners += usize::from(connection.keep_alive_timer.is_some());
            let bound = self.outbox.unsent_bytes_max();
            assert_eq!(
                connection.stuck_timer().is_some(),
                !connection.closing && connection.reactor_unsent_bytes() >= bound,
                "connection {connection_id} holds a stuck timer exactly while open with the reactor holding its unsent bound"
            );
            owners += usize::from(connection.stuck_timer().is_some());
            owners += usize::from(connection.connect_timer.is_some());
        }
        for (_, session) in self.live_sessions() {
            let client_id = &session.client_id;
            let offline = session.connection.is_none();
            assert_eq!(
                session.will_timer.is_some(),
                offline && session.will.is_some(),
                "{client_id} holds a will timer exactly while offline with a will"
            );
            assert_eq!(
                session.expiry_timer.is_some(),
                offline && session.expiry_seconds != u32::MAX,
                "{client_id} holds an expiry timer exactly while offline with an expiry"
            );
            owners += usize::from(session.will_timer.is_some());
            owners += usize::from(session.expiry_timer.is_some());
        }
        assert_eq!(
            self.claim_clients.len(),
            self.claims.len(),
            "claim numbers and pending claims disagree"
        );
        for (client_id, pending) in &self.claims {
            assert_eq!(
                self.claim_clients.get(&pending.claim_number()),
                Some(client_id),
                "pending claim of {client_id} is not indexed by its number"
            );
            // Only a firing timeout takes the key, and the claim completes in the same step.
            assert!(
                pending.timer().is_some(),
                "pending claim of {client_id} has no timeout"
            );
            owners += 1;
        }
        for (key, timer) in self.timers.iter() {
            match timer {
                Timer::KeepAlive(connection_id) => assert!(
                    self.connections
                        .get(&connection_id)
                        .is_some_and(|c| c.keep_alive_timer == Some(key)),
                    "a keep-alive timer names connection {connection_id}, which does not hold it"
                ),
                Timer::SendStuck(connection_id) => assert!(
                    self.connections
                        .get(&connection_id)
                        .is_some_and(|c| c.stuck_timer() == Some(key)),
                    "a stuck timer names connection {connection_id}, which does not hold it"
                ),
                Timer::ConnectDeadline(connection_id) => assert!(
                    self.connections
                        .get(&connection_id)
                        .is_some_and(|c| c.connect_timer == Some(key)),
                    "a CONNECT deadline names connection {connection_id}, which does not hold it"
                ),
                Timer::Claim(claim) => assert!(
                    self.claim_clients
                        .get(&claim)
                        .and_then(|client_id| self.claims.get(client_id))
                        .is_some_and(|p| p.claim_number() == claim && p.timer() == Some(key)),
                    "a claim timer names claim {claim}, which is not pending with it"
                ),
                Timer::WillDelay(index, generation) | Timer::SessionExpiry(index, generation) => {
                    let session = self
                        .sessions
                        .get(index as usize)
                        .and_then(Option::as_ref)
                        .unwrap_or_else(|| panic!("a session timer names session {index}, gone"));
                    let slot = match timer {
                        Timer::WillDelay(..) => session.will_timer,
                        _ => session.expiry_timer,
                    };
                    assert!(
                        session.generation == generation && slot == Some(key),
                        "a session timer of {} names an old generation or is not held",
                        session.client_id
                    );
                }
            }
        }
        // Each armed timer has its own holder, so equal counts mean no holder's key is stale.
        assert_eq!(
            self.timers.len(),
            owners,
            "timers are held that are not armed"
        );
    }

    /// The bounds on what peers can make the shard hold: a connection keeps its CONNECT
    /// deadline exactly until CONNECT is decoded and buffers at most a CONNECT before it,
    /// a claiming connection at most `takeover_pending_bytes_max`; sessions hold at most
    /// their quota of subscriptions; the count of persistent sessions is exact; the retained
    /// store is within its limits.
    fn check_guards(&self) {
        let limits = &self.config.limits;
        for (&connection_id, connection) in &self.connections {
            let awaiting_connect =
                connection.session.is_none() && !connection.claiming && !connection.closing;
            assert_eq!(
                connection.connect_timer.is_some(),
                awaiting_connect,
                "connection {connection_id} holds a CONNECT deadline exactly until CONNECT"
            );
            if awaiting_connect {
                assert!(
                    connection.pending.len() < limits.packet_size_max_for(false) as usize,
                    "connection {connection_id} buffers more than a CONNECT before CONNECT"
                );
            }
            if connection.claiming && !connection.closing {
                assert!(
                    connection.pending.len() <= limits.takeover_pending_bytes_max,
                    "claiming connection {connection_id} buffers past its limit"
                );
            }
        }
        let mut persistent = 0;
        for (_, session) in self.live_sessions() {
            persistent += usize::from(session.expiry_seconds > 0);
            assert!(
                session.subscriptions.len() <= limits.subscriptions_per_session_max,
                "{} holds more subscriptions than its quota",
                session.client_id
            );
        }
        assert_eq!(
            persistent, self.persistent_sessions,
            "the count of persistent sessions is exact"
        );
        self.retained.check_invariants();
    }
}
