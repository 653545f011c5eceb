//! Sessions: the state a client identifier keeps across connections (subscriptions, in-flight
//! and queued messages, the will), where sessions are stored, and how one detaches and ends.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InflightState {
    /// PUBLISH sent, PUBACK (QoS 1) or PUBREC (QoS 2) awaited.
    Published,
    /// PUBREL sent, PUBCOMP awaited.
    Released,
}

#[derive(Debug)]
pub(super) struct Inflight {
    pub(super) packet_id: u16,
    pub(super) message: Message,
    pub(super) subscription_identifiers: Vec<u32>,
    pub(super) state: InflightState,
}

#[derive(Debug)]
pub(super) struct Queued {
    pub(super) message: Message,
    pub(super) subscription_identifiers: Vec<u32>,
}

#[derive(Debug)]
pub(super) struct StoredWill {
    pub(super) message: Message,
    pub(super) delay_seconds: u32,
}

#[derive(Debug)]
pub(super) struct Session {
    pub(super) client_id: ByteString,
    pub(super) connection: Option<ConnectionId>,
    pub(super) version: ProtocolVersion,
    /// Each held filter (with its `$share/{group}/` prefix) and its options and identifier.
    /// Ordered by filter, so that the route changes of an ending session and the
    /// subscriptions of a saved one come in the same order in every process; a B-tree also
    /// needs no hash that chosen filters could flood.
    pub(super) subscriptions: BTreeMap<ByteString, (SubscriptionOptions, Option<u32>)>,
    pub(super) expiry_seconds: u32,
    /// Bumped at every connect; a will delay or expiry timer names the generation it was
    /// armed in, and is cancelled before the next one starts.
    pub(super) generation: u64,
    /// The armed will delay, while a delayed will waits (only without a connection).
    pub(super) will_timer: Option<TimerKey>,
    /// The armed session expiry (only without a connection, and not for a session that
    /// never expires).
    pub(super) expiry_timer: Option<TimerKey>,
    pub(super) next_packet_id: u16,
    pub(super) inflight: VecDeque<Inflight>,
    pub(super) queue: VecDeque<Queued>,
    /// The client's Receive Maximum, capped by the limit.
    pub(super) send_window: u16,
    /// Messages in flight when the session was last resumed or restored. A client that comes
    /// back with a smaller Receive Maximum gets them all resent, and nothing new goes in flight
    /// until the window has room, so in flight stays within the larger of the two.
    pub(super) inflight_resumed_count: usize,
    /// QoS 2 packet identifiers received and forwarded, awaiting PUBREL.
    pub(super) awaiting_release: HashSet<u16>,
    /// Boxed: most sessions have no will, and a message inline would double every session.
    pub(super) will: Option<Box<StoredWill>>,
    pub(super) dropped_messages: u64,
    /// Whether the durable log holds this session (see `durable.rs`).
    pub(super) logged: bool,
    /// Who its client was when it last connected: each delivery is checked against the ACL
    /// as this principal. None for a session restored from the log whose client has not
    /// connected since the start (its deliveries are not checked until it does).
    pub(super) principal: Option<std::sync::Arc<Principal>>,
    /// Recovered from this node's data directory at the start, and its client has not
    /// connected here since: a copy another node may have taken over while this node was
    /// down (`replicate.rs`, fencing), so a session from elsewhere wins over it.
    pub(super) recovered: bool,
}

impl Session {
    /// A session without a connection, subscriptions or messages.
    pub(super) fn new(
        client_id: ByteString,
        version: ProtocolVersion,
        expiry_seconds: u32,
        send_window: u16,
    ) -> Self {
        Self {
            client_id,
            connection: None,
            version,
            subscriptions: BTreeMap::new(),
            expiry_seconds,
            generation: 0,
            will_timer: None,
            expiry_timer: None,
            next_packet_id: 0,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            send_window,
            inflight_resumed_count: 0,
            awaiting_release: HashSet::new(),
            will: None,
            dropped_messages: 0,
            logged: false,
            recovered: false,
            principal: None,
        }
    }

    pub(super) fn allocate_packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            let candidate = self.next_packet_id;
            if !self
                .inflight
                .iter()
                .any(|entry| entry.packet_id == candidate)
            {
                return candidate;
            }
        }
    }
}

impl Shard {
    /// The session's connection is gone: publish or schedule the will, and end or keep the
    /// session according to its expiry interval.
    pub(super) fn detach(&mut self, index: SessionIndex, publish_will: bool) {
        let now_ms = self.now_ms;
        let session = self.session_mut(index);
        session.connection = None;
        // Connected sessions hold no timers: `accept` cancelled those of the time offline.
        assert!(
            session.will_timer.is_none() && session.expiry_timer.is_none(),
            "a connected session has no will or expiry timer"
        );
        let generation = session.generation;
        let expiry_seconds = session.expiry_seconds;
        let will = session.will.take();
        let had_will = will.is_some();
        if let Some(will) = will.filter(|_| publish_will) {
            let delay = will.delay_seconds.min(expiry_seconds);
            if delay == 0 {
                self.publish(will.message);
            } else {
                let key = self.timers.arm(
                    now_ms + u64::from(delay) * 1000,
                    Timer::WillDelay(index, generation),
                );
                let session = self.session_mut(index);
                session.will = Some(will);
                session.will_timer = Some(key);
            }
        }
        // The session's will is no longer its connection's: gone, or pending on its own.
        if had_will && self.logs_session(index) {
            self.log_session_changed(index);
            let Shard {
                sessions, durable, ..
            } = self;
            let session = sessions[index as usize]
                .as_ref()
                .expect("a live session index");
            if let (Some(will), Some(key)) = (session.will.as_deref(), session.will_timer) {
                let client_id = session.client_id.clone();
                durable::record(durable, |durable| storage::Record::WillPending {
                    client_id,
                    will: storage::Will {
                        message: durable.wall(&will.message),
                        delay_seconds: will.delay_seconds,
                    },
                    publish_at_ms: key.deadline_ms().saturating_add(durable.wall_offset_ms()),
                });
            }
        }
        if expiry_seconds == 0 {
            self.end_session(index);
        } else if expiry_seconds != u32::MAX {
            let key = self.timers.arm(
                now_ms + u64::from(expiry_seconds) * 1000,
                Timer::SessionExpiry(index, generation),
            );
            self.session_mut(index).expiry_timer = Some(key);
        }
    }

    /// Stores a new session in a free slot and indexes its client identifier.
    pub(super) fn insert_session(&mut self, session: Session) -> SessionIndex {
        let client_id = session.client_id.clone();
        if session.expiry_seconds > 0 {
            self.persistent_sessions += 1;
        }
        let index = match self.free_sessions.pop() {
            Some(index) => {
                self.sessions[index as usize] = Some(session);
                index
            }
            None => {
                self.sessions.push(Some(session));
                SessionIndex::try_from(self.sessions.len() - 1).expect("session index overflow")
            }
        };
        self.client_ids.insert(client_id, index);
        index
    }

    /// Sets the session's expiry interval, keeping the count of persistent sessions.
    pub(super) fn set_session_expiry(&mut self, index: SessionIndex, expiry_seconds: u32) {
        let session = self.session_mut(index);
        let was_persistent = session.expiry_seconds > 0;
        session.expiry_seconds = expiry_seconds;
        match (was_persistent, expiry_seconds > 0) {
            (false, true) => self.persistent_sessions += 1,
            (true, false) => self.persistent_sessions -= 1,
            _ => {}
        }
    }

    pub(super) fn session(&self, index: SessionIndex) -> &Session {
        self.sessions[index as usize]
            .as_ref()
            .expect("a live session index")
    }

    pub(super) fn session_mut(&mut self, index: SessionIndex) -> &mut Session {
        self.sessions[index as usize]
            .as_mut()
            .expect("a live session index")
    }

    /// Removes a session and its subscriptions. A delayed will still pending is published now
    /// (MQTT 5.0 §3.1.3.2.2: at the latest when the session ends).
    pub(super) fn end_session(&mut self, index: SessionIndex) {
        let session = self.sessions[index as usize]
            .take()
            .expect("a live session index");
        client_log!(DEBUG, self.who_client(&session.client_id), "session ended");
        if session.expiry_seconds > 0 {
            self.persistent_sessions -= 1;
        }
        self.client_ids.remove(&session.client_id);
        self.free_sessions.push(index);
        self.timers.cancel(session.will_timer);
        self.timers.cancel(session.expiry_timer);
        for filter in session.subscriptions.keys() {
            self.remove_subscription(index, filter);
        }
        if session.logged {
            let client_id = session.client_id.clone();
            if session.will_timer.is_some() {
                let client_id = client_id.clone();
                self.log_record(|_| storage::Record::WillCancelled { client_id });
            }
            self.log_record(|_| storage::Record::SessionEnded { client_id });
        }
        if let Some(will) = session.will {
            self.publish(will.message);
        }
    }
}
