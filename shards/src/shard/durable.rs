//! The shard's durable log (DESIGN.md §5): which changes it records, the acknowledgements
//! that wait for their records to be synced, the receipts between shards for a publish whose
//! records land in another shard's log, and the start from a recovered `storage::State`.
//!
//! What is recorded: every change to a session the log knows (`Session::logged`: a session
//! with expiry above 0 while a log is attached), and, on the shard that owns a retained
//! topic (`owner_shard` of the topic), every change of that topic's retained message. Clean
//! sessions and QoS 0 deliveries never reach the log. Records carry wall-clock milliseconds
//! (`LogSettings::wall_clock_at_zero_ms` plus the shard clock), never the shard clock, which
//! starts again at every run.
//!
//! Held acknowledgements: with `hold_acks` (the binary sets it under every sync policy; what
//! "durable" means, written or synced, is the policy's), the PUBACK / PUBREC of a client's
//! QoS 1/2 PUBLISH and the SUBACK of a logged session wait in `held` until the records their
//! packet caused are durable on this shard, and every other shard the message
//! was handed to (`Receipt`s) has replied that its records are too. `held` is released in
//! order, so PUBACKs leave in the order their PUBLISHes came [MQTT-4.6.0-2]; it is bounded by
//! `held_acks_max` (a PUBLISH or SUBSCRIBE past it is refused with 0x97, or a 3.1.1
//! connection closed), and a publisher whose acknowledgements wait is flow-controlled by its
//! Receive Maximum.
//!
//! Never: does I/O. The log's requests go out through `take_log_requests`; the caller
//! reports `on_log_synced` or `on_log_failed`. After a failure the log is gone for the run:
//! nothing that needed a record is acknowledged (PUBACK/PUBREC 0x80 for 5.0, the connection
//! closed for 3.x, SUBACK 0x80, CONNACK 0x88 / return code 3 for a persistent session), and
//! clean sessions and QoS 0 go on as before.
//!
//! Invariants: a session is `logged` only while a log is attached (or failed) and its expiry
//! is above 0, and then the log's state holds it; `held` entries are in arrival order with
//! distinct ids; a receipt is answered exactly once.

use std::collections::BTreeMap;

use super::*;
use crate::storage::{Log, Lsn, PendingWill, Record, Request, SessionState, State, Ticket};

/// How a shard uses its log (from the binary's sync policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// Hold acknowledgements that promise durability until the log's ticket covering their
    /// records completes (synced with sync policy "always", written with the others).
    /// Without it they leave at once.
    pub hold_acks: bool,
    /// Wall-clock milliseconds (since the UNIX epoch) at the shard clock's zero.
    pub wall_clock_at_zero_ms: u64,
    /// At most this many acknowledgements wait for a sync on this shard at once.
    pub held_acks_max: usize,
}

/// Names a client's publish, on the shard that holds its acknowledgement, for another shard
/// that records it: that shard answers with `ShardMessage::Durable` once its records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub shard: ShardIndex,
    pub id: u64,
}

#[derive(Debug)]
pub(super) enum HeldPacket {
    /// PUBACK (QoS 1) or PUBREC (QoS 2) of a client's PUBLISH.
    Publish {
        qos: QoS,
        ack: PubAck,
        session: SessionIndex,
    },
    Subscribe(SubAck),
}

#[derive(Debug)]
struct HeldAck {
    id: u64,
    connection: ConnectionId,
    packet: HeldPacket,
    lsn: Lsn,
    remote_waiting: u32,
    failed: bool,
}

#[derive(Debug)]
pub(super) struct Durable {
    /// None once the log failed.
    log: Option<Log>,
    settings: LogSettings,
    failed: bool,
    /// A record was needed but could not be written, since the operation began.
    refused: bool,
    held: VecDeque<HeldAck>,
    next_held: u64,
    /// Answers owed to other shards, once the log covers the `Lsn`: (lsn, receipt, ok).
    replies: VecDeque<(Lsn, Receipt, bool)>,
    /// While a client's PUBLISH is routed: its held acknowledgement's id, and the receipts
    /// handed to other shards so far.
    collecting: Option<(u64, u32)>,
    /// Session replication (`replicate.rs`), in a cluster with `session_replicas` above 0:
    /// the session records go to the replicas too.
    pub(super) replication: Option<Box<super::replicate::Replication>>,
}

impl Durable {
    /// Acknowledgements waiting for the log (for the metrics endpoint).
    pub(super) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Whether the log failed (full disk, I/O error): durable work is refused.
    pub(super) fn has_failed(&self) -> bool {
        self.failed
    }

    fn appended(&self) -> Lsn {
        self.log.as_ref().map_or(0, Log::appended_lsn)
    }

    fn durable(&self) -> Lsn {
        self.log.as_ref().map_or(0, Log::durable_lsn)
    }

    /// Records for the replicas only: no data directory, so nothing is held for a sync.
    pub(super) fn without_log(
        wall_clock_at_zero_ms: u64,
        held_acks_max: usize,
        replication: super::replicate::Replication,
    ) -> Self {
        Self {
            log: None,
            settings: LogSettings {
                hold_acks: false,
                wall_clock_at_zero_ms,
                held_acks_max,
            },
            failed: false,
            refused: false,
            held: VecDeque::new(),
            next_held: 0,
            replies: VecDeque::new(),
            collecting: None,
            replication: Some(Box::new(replication)),
        }
    }

    /// Whether records go to a log on disk (or would, had it not failed).
    pub(super) fn has_log(&self) -> bool {
        self.log.is_some() || self.failed
    }

    /// Appends one record (and queues it for the replicas, which take it over: no copy);
    /// once the log failed, marks the operation refused.
    pub(super) fn append(&mut self, record: Record) {
        if self.log.is_some() || self.failed {
            self.append_to_log(&record);
        }
        // Without a data directory the record is for the replicas only.
        if let Some(replication) = &mut self.replication {
            replication.record(record);
        }
    }

    fn append_to_log(&mut self, record: &Record) {
        match &mut self.log {
            Some(log) => {
                if let Err(error) = log.append(record) {
                    // The shard's records come from bounded packets; one the log cannot
                    // encode is not written, and whatever promised it is not acknowledged.
                    warn!(
                        ?error,
                        "a record could not be encoded: its change is not durable"
                    );
                    self.refused = true;
                }
            }
            None => self.refused = true,
        }
    }

    /// `message` with its expiry deadline in wall-clock milliseconds.
    pub(super) fn wall(&self, message: &Message) -> Message {
        let mut message = message.clone();
        message.expires_at_ms = message
            .expires_at_ms
            .map(|at| at.saturating_add(self.settings.wall_clock_at_zero_ms));
        message
    }

    fn wall_will(&self, will: &StoredWill) -> storage::Will {
        storage::Will {
            message: self.wall(&will.message),
            delay_seconds: will.delay_seconds,
        }
    }

    pub(super) fn wall_offset_ms(&self) -> u64 {
        self.settings.wall_clock_at_zero_ms
    }

    /// A receipt that another shard answers to `shard` (this one), while a client's PUBLISH
    /// is routed (with `hold_acks`).
    pub(super) fn receipt(&mut self, shard: ShardIndex) -> Option<Receipt> {
        let (id, count) = self.collecting.as_mut()?;
        *count += 1;
        Some(Receipt { shard, id: *id })
    }
}

impl Durable {
    /// The records that rebuild `session` whole (created, subscriptions, in flight, queue,
    /// inbound identifiers, a pending will), in wall-clock time: for the log, and for a
    /// replica that is new to the session.
    pub(super) fn session_records(&self, session: &Session) -> Vec<Record> {
        let durable = self;
        let client_id = &session.client_id;
        let pending = session.will_timer.is_some();
        let mut records = vec![Record::SessionCreated {
            client_id: client_id.clone(),
            version: session.version,
            expiry_seconds: session.expiry_seconds,
            will: session
                .will
                .as_deref()
                .filter(|_| !pending)
                .map(|will| durable.wall_will(will)),
        }];
        for (filter, &(options, identifier)) in &session.subscriptions {
            records.push(Record::SubscriptionAdded {
                client_id: client_id.clone(),
                filter: filter.clone(),
                options,
                identifier,
            });
        }
        for entry in &session.inflight {
            records.push(Record::MessageQueued {
                client_id: client_id.clone(),
                delivery: storage::record::SavedDelivery {
                    message: durable.wall(&entry.message),
                    subscription_identifiers: entry.subscription_identifiers.clone(),
                },
            });
            records.push(Record::MessageSent {
                client_id: client_id.clone(),
                packet_id: entry.packet_id,
            });
            if entry.state == InflightState::Released {
                records.push(Record::MessageReleased {
                    client_id: client_id.clone(),
                    packet_id: entry.packet_id,
                });
            }
        }
        for queued in session
            .queue
            .iter()
            .filter(|q| q.message.qos != QoS::AtMostOnce)
        {
            records.push(Record::MessageQueued {
                client_id: client_id.clone(),
                delivery: storage::record::SavedDelivery {
                    message: durable.wall(&queued.message),
                    subscription_identifiers: queued.subscription_identifiers.clone(),
                },
            });
        }
        let mut awaiting: Vec<u16> = session.awaiting_release.iter().copied().collect();
        awaiting.sort_unstable();
        for packet_id in awaiting {
            records.push(Record::InboundAwaitingRelease {
                client_id: client_id.clone(),
                packet_id,
            });
        }
        if let (Some(will), Some(key)) = (session.will.as_deref(), session.will_timer) {
            records.push(Record::WillPending {
                client_id: client_id.clone(),
                will: durable.wall_will(will),
                publish_at_ms: key
                    .deadline_ms()
                    .saturating_add(durable.settings.wall_clock_at_zero_ms),
            });
        }
        records
    }
}

use crate::storage;

/// Appends the record `make` builds, if a log is attached. For the places that hold other
/// fields of the shard borrowed.
pub(super) fn record(durable: &mut Option<Box<Durable>>, make: impl FnOnce(&Durable) -> Record) {
    if let Some(durable) = durable {
        let record = make(durable);
        durable.append(record);
    }
}

/// The last record appended (0 without a log).
pub(super) fn appended_lsn(durable: &Option<Box<Durable>>) -> Lsn {
    durable.as_ref().map_or(0, |durable| durable.appended())
}

impl Shard {
    /// Gives the shard its log, opened (`Log::open`) over this shard's `durable_state()`.
    /// Every session with an expiry above 0 is in that state, so it counts as logged.
    pub fn attach_log(&mut self, log: Log, settings: LogSettings) {
        for session in self.sessions.iter_mut().flatten() {
            session.logged = session.expiry_seconds > 0;
        }
        self.durable = Some(Box::new(Durable {
            log: Some(log),
            settings,
            failed: false,
            refused: false,
            held: VecDeque::new(),
            next_held: 0,
            replies: VecDeque::new(),
            collecting: None,
            replication: self.durable.take().and_then(|durable| durable.replication),
        }));
    }

    /// Flushes the log (once per loop turn, after `take_outputs`) and hands out its I/O, in
    /// order, with the ticket to report to `on_log_synced` once all of it has completed.
    pub fn take_log_requests(&mut self, requests: &mut Vec<Request>) -> Option<Ticket> {
        let log = self.durable.as_mut()?.log.as_mut()?;
        let ticket = log.flush();
        log.take_requests(requests);
        ticket
    }

    /// Every request handed out with `ticket` has completed: acknowledgements and receipts
    /// the log now covers leave with the next `take_outputs`.
    pub fn on_log_synced(&mut self, ticket: Ticket) {
        if let Some(log) = self.durable.as_mut().and_then(|d| d.log.as_mut()) {
            log.on_synced(ticket);
        }
    }

    /// A log request failed: the log is given up for this run (after a failed `fdatasync`
    /// a retry proves nothing). What waited for it is refused, and so is new durable work.
    pub fn on_log_failed(&mut self, error: &std::io::Error) {
        let Some(durable) = self.durable.as_mut() else {
            return;
        };
        if durable.failed {
            return;
        }
        let durable_lsn = durable.durable();
        tracing::error!(shard = self.config.index, %error, "the durable log failed: from now on this shard refuses persistent sessions, their subscriptions and QoS 1/2 messages for them (reason codes 0x80 / 0x88), and serves clean sessions and QoS 0 only");
        durable.log = None;
        durable.failed = true;
        for held in &mut durable.held {
            if held.lsn > durable_lsn {
                held.failed = true;
            }
        }
        for (lsn, _, ok) in &mut durable.replies {
            if *lsn > durable_lsn {
                *ok = false;
            }
            *lsn = 0;
        }
        for held in &mut durable.held {
            held.lsn = 0;
        }
    }

    /// Whether the log (if any) has nothing in memory or in flight: what a clean shutdown
    /// waits for.
    pub fn log_is_idle(&self) -> bool {
        self.durable
            .as_ref()
            .and_then(|d| d.log.as_ref())
            .is_none_or(Log::is_idle)
    }

    /// Whether the log failed this run.
    pub fn log_failed(&self) -> bool {
        self.durable.as_ref().is_some_and(|d| d.failed)
    }

    /// Records appended to the log since it was opened (0 without one, or after a failure).
    pub fn log_record_count(&self) -> u64 {
        self.durable
            .as_ref()
            .and_then(|d| d.log.as_ref())
            .map_or(0, Log::appended_lsn)
    }

    /// Acknowledgements waiting for a sync.
    pub fn held_ack_count(&self) -> usize {
        self.durable.as_ref().map_or(0, |d| d.held.len())
    }

    /// Whether a persistent session may be created or resumed (its log works, or there is
    /// none).
    pub(super) fn log_refuses_persistent(&self) -> bool {
        self.log_failed()
    }

    /// Whether the held queue is full: the packet is refused before it does anything.
    pub(super) fn held_acks_full(&self) -> bool {
        self.durable
            .as_ref()
            .is_some_and(|d| d.settings.hold_acks && d.held.len() >= d.settings.held_acks_max)
    }

    /// Starts an operation whose acknowledgement may wait: returns the log's last record.
    pub(super) fn durable_begin(&mut self, collect_receipts: bool) -> Lsn {
        let Some(durable) = self.durable.as_mut() else {
            return 0;
        };
        durable.refused = false;
        if collect_receipts && durable.settings.hold_acks {
            durable.next_held += 1;
            durable.collecting = Some((durable.next_held, 0));
        }
        durable.appended()
    }

    /// Ends the operation begun at `before`: the acknowledgement goes now, or waits for the
    /// records and receipts it caused, or (a record could not be written) is refused.
    pub(super) fn durable_finish(
        &mut self,
        before: Lsn,
        connection: ConnectionId,
        packet: HeldPacket,
    ) {
        let Some(durable) = self.durable.as_mut() else {
            return self.send_held(connection, packet, false);
        };
        let collecting = durable.collecting.take();
        let failed = std::mem::take(&mut durable.refused);
        let after = durable.appended();
        let lsn = if after > before { after } else { 0 };
        let remote_waiting = collecting.map_or(0, |(_, count)| count);
        let waits = durable.settings.hold_acks
            && (lsn > durable.durable() || remote_waiting > 0 || !durable.held.is_empty());
        if !waits {
            return self.send_held(connection, packet, failed);
        }
        let id = match collecting {
            Some((id, _)) => id,
            None => {
                durable.next_held += 1;
                durable.next_held
            }
        };
        durable.held.push_back(HeldAck {
            id,
            connection,
            packet,
            lsn,
            remote_waiting,
            failed,
        });
    }

    /// Starts handling a message another shard gave this one with a receipt.
    pub(super) fn receipt_begin(&mut self) -> Lsn {
        self.durable_begin(false)
    }

    /// Ends it: the receipt is answered once this shard's records of it are durable.
    pub(super) fn receipt_finish(&mut self, before: Lsn, receipt: Receipt) {
        let Some(durable) = self.durable.as_mut() else {
            // No log here (it cannot happen within one node, whose shards share the
            // setting): nothing recorded, nothing to wait for.
            self.outputs.push(Output::ToShard {
                shard: receipt.shard,
                message: ShardMessage::Durable {
                    receipts: vec![(receipt.id, true)],
                },
            });
            return;
        };
        let ok = !std::mem::take(&mut durable.refused);
        let after = durable.appended();
        let lsn = if after > before { after } else { 0 };
        durable.replies.push_back((lsn, receipt, ok));
    }

    /// Answers from other shards: their records of our publishes are durable (or failed).
    pub(super) fn receipts_answered(&mut self, receipts: &[(u64, bool)]) {
        let Some(durable) = self.durable.as_mut() else {
            return;
        };
        for &(id, ok) in receipts {
            // Ids grow along the queue: a binary search finds the entry.
            if let Ok(position) = durable.held.binary_search_by_key(&id, |held| held.id)
                && let Some(held) = durable.held.get_mut(position)
            {
                held.remote_waiting = held.remote_waiting.saturating_sub(1);
                held.failed |= !ok;
            }
        }
    }

    /// Releases, in order, the held acknowledgements and the receipts the log now covers.
    /// Called at the start of `take_outputs`.
    pub(super) fn release_durable(&mut self) {
        let Some(durable) = self.durable.as_mut() else {
            return;
        };
        let durable_lsn = durable.durable();
        let mut answers: BTreeMap<ShardIndex, Vec<(u64, bool)>> = BTreeMap::new();
        while let Some(&(lsn, receipt, ok)) = durable.replies.front() {
            if lsn > durable_lsn {
                break;
            }
            durable.replies.pop_front();
            answers
                .entry(receipt.shard)
                .or_default()
                .push((receipt.id, ok));
        }
        let mut ready = Vec::new();
        while let Some(front) = durable.held.front() {
            if front.remote_waiting > 0 || front.lsn > durable_lsn {
                break;
            }
            if let Some(held) = durable.held.pop_front() {
                ready.push(held);
            }
        }
        for (shard, receipts) in answers {
            if shard == self.config.index {
                self.receipts_answered(&receipts);
            } else {
                self.outputs.push(Output::ToShard {
                    shard,
                    message: ShardMessage::Durable { receipts },
                });
            }
        }
        for held in ready {
            self.send_held(held.connection, held.packet, held.failed);
        }
        // Answers to ourselves may have made more ready; they go at the next call.
    }

    /// Sends an acknowledgement, or its refusal when its records could not be written.
    fn send_held(&mut self, connection: ConnectionId, packet: HeldPacket, failed: bool) {
        let Some(version) = self.connections.get(&connection).map(|c| c.version) else {
            return;
        };
        match (packet, failed) {
            (HeldPacket::Publish { qos, ack, .. }, false) => match qos {
                QoS::AtLeastOnce => self.send(connection, &Packet::PubAck(ack)),
                _ => self.send(connection, &Packet::PubRec(ack)),
            },
            (
                HeldPacket::Publish {
                    qos,
                    mut ack,
                    session,
                },
                true,
            ) => {
                // The exchange ends without the message being kept: a resend is a new one.
                if qos == QoS::ExactlyOnce
                    && self.connections.get(&connection).and_then(|c| c.session) == Some(session)
                {
                    let removed = self
                        .session_mut(session)
                        .awaiting_release
                        .remove(&ack.packet_id);
                    // Its InboundAwaitingRelease may be durable already: without this, a
                    // restart would take the client's next PUBLISH under the identifier for
                    // a duplicate of the refused one.
                    if removed && self.logs_session(session) {
                        let client_id = self.session(session).client_id.clone();
                        let packet_id = ack.packet_id;
                        self.log_record(|_| Record::InboundReleased {
                            client_id,
                            packet_id,
                        });
                    }
                }
                if version.is_v5() {
                    ack.reason = ReasonCode::UNSPECIFIED_ERROR;
                    match qos {
                        QoS::AtLeastOnce => self.send(connection, &Packet::PubAck(ack)),
                        _ => self.send(connection, &Packet::PubRec(ack)),
                    }
                } else {
                    // 3.x has no way to refuse a PUBLISH: closing is the only answer that
                    // does not acknowledge it.
                    self.disconnect(
                        connection,
                        ReasonCode::UNSPECIFIED_ERROR,
                        "a QoS 1/2 PUBLISH could not be written to the durable log",
                        true,
                    );
                }
            }
            (HeldPacket::Subscribe(suback), false) => {
                self.send(connection, &Packet::SubAck(suback))
            }
            (HeldPacket::Subscribe(mut suback), true) => {
                for reason in &mut suback.reasons {
                    if !reason.is_error() {
                        *reason = ReasonCode::UNSPECIFIED_ERROR;
                    }
                }
                self.send(connection, &Packet::SubAck(suback));
            }
        }
    }

    /// Appends a record built from the shard, if a log is attached.
    pub(super) fn log_record(&mut self, make: impl FnOnce(&Durable) -> Record) {
        record(&mut self.durable, make);
    }

    /// The last record whose barrier may pass (`Connection::durable_barrier`): the log's
    /// durable point, or everything when nothing is held for the log (no log, acks not held,
    /// or the log failed, after which nothing is promised by it).
    pub(super) fn durable_released_lsn(&self) -> Lsn {
        match &self.durable {
            Some(durable) if durable.settings.hold_acks && !durable.failed => durable.durable(),
            _ => Lsn::MAX,
        }
    }

    /// Whether changes of this session go to the log.
    pub(super) fn logs_session(&self, index: SessionIndex) -> bool {
        self.durable.is_some() && self.session(index).logged
    }

    /// Brings the log's view of the session in line with its expiry: a session that became
    /// persistent is written whole; one that stopped being persistent is ended.
    pub(super) fn log_session_presence(&mut self, index: SessionIndex) {
        if self.durable.is_none() {
            return;
        }
        let session = self.session(index);
        match (session.expiry_seconds > 0, session.logged) {
            (true, false) => {
                self.log_session_whole(index);
                self.session_mut(index).logged = true;
            }
            (false, true) => {
                let client_id = session.client_id.clone();
                self.log_record(|_| Record::SessionEnded { client_id });
                self.session_mut(index).logged = false;
            }
            _ => {}
        }
    }

    /// The session's version, expiry and will, after a change of one of them.
    pub(super) fn log_session_changed(&mut self, index: SessionIndex) {
        if !self.logs_session(index) {
            return;
        }
        let session = self.session(index);
        let (client_id, version, expiry_seconds) = (
            session.client_id.clone(),
            session.version,
            session.expiry_seconds,
        );
        let will = session
            .will
            .as_deref()
            .filter(|_| session.will_timer.is_none());
        let record = self.durable.as_ref().map(|durable| Record::SessionChanged {
            client_id,
            version,
            expiry_seconds,
            will: will.map(|will| durable.wall_will(will)),
        });
        if let (Some(durable), Some(record)) = (self.durable.as_mut(), record) {
            durable.append(record);
        }
    }

    /// Every record that rebuilds the session (created, subscriptions, in flight, queue,
    /// inbound identifiers, a pending will).
    fn log_session_whole(&mut self, index: SessionIndex) {
        let Some(durable) = self.durable.as_mut() else {
            return;
        };
        let session = self.sessions[index as usize]
            .as_ref()
            .expect("a live session index");
        for record in durable.session_records(session) {
            durable.append(record);
        }
    }

    /// A retained message stored or cleared here: recorded by the shard that owns its topic
    /// only, so that each topic's changes are in one log, in the order that shard applied
    /// them.
    pub(super) fn log_retained(&mut self, message: &Message, stored: bool) {
        if !self
            .durable
            .as_ref()
            .is_some_and(|durable| durable.has_log())
            || owner_shard(&message.topic, self.config.shard_count) != self.config.index
            || sys::is_sys_topic(&message.topic)
        {
            return;
        }
        if message.payload.is_empty() {
            let topic = message.topic.clone();
            self.log_record(|_| Record::RetainedCleared { topic });
        } else if stored {
            self.log_record(|durable| Record::RetainedSet {
                message: durable.wall(message),
            });
        } else if let Some(durable) = self.durable.as_mut() {
            // The store was full here: the message is not kept, so it is not durable.
            durable.refused = true;
        }
    }

    /// The durable state this shard owns, in wall-clock time, for `Log::open`: its
    /// persistent sessions, the retained messages of the topics it owns, the pending wills.
    pub fn durable_state(&self, wall_clock_at_zero_ms: u64) -> State {
        let wall = |message: &Message| {
            let mut message = message.clone();
            message.expires_at_ms = message
                .expires_at_ms
                .map(|at| at.saturating_add(wall_clock_at_zero_ms));
            message
        };
        let mut state = State::new((&self.config.limits).into());
        for session in self
            .sessions
            .iter()
            .flatten()
            .filter(|s| s.expiry_seconds > 0)
        {
            let pending = session.will_timer.is_some();
            let will = |will: &StoredWill| storage::Will {
                message: wall(&will.message),
                delay_seconds: will.delay_seconds,
            };
            let saved = SessionState {
                version: session.version,
                expiry_seconds: session.expiry_seconds,
                will: session.will.as_deref().filter(|_| !pending).map(will),
                subscriptions: session.subscriptions.clone(),
                inflight: session
                    .inflight
                    .iter()
                    .map(|entry| storage::record::SavedInflight {
                        packet_id: entry.packet_id,
                        released: entry.state == InflightState::Released,
                        delivery: storage::record::SavedDelivery {
                            message: wall(&entry.message),
                            subscription_identifiers: entry.subscription_identifiers.clone(),
                        },
                    })
                    .collect(),
                queue: session
                    .queue
                    .iter()
                    .filter(|q| q.message.qos != QoS::AtMostOnce)
                    .map(|queued| storage::record::SavedDelivery {
                        message: wall(&queued.message),
                        subscription_identifiers: queued.subscription_identifiers.clone(),
                    })
                    .collect(),
                awaiting_release: session.awaiting_release.iter().copied().collect(),
            };
            if let (Some(stored), Some(key)) = (session.will.as_deref(), session.will_timer) {
                state.pending_wills.insert(
                    session.client_id.clone(),
                    PendingWill {
                        will: will(stored),
                        publish_at_ms: key.deadline_ms().saturating_add(wall_clock_at_zero_ms),
                    },
                );
            }
            state.sessions.insert(session.client_id.clone(), saved);
        }
        for message in self.retained.iter() {
            if owner_shard(&message.topic, self.config.shard_count) == self.config.index
                && !sys::is_sys_topic(&message.topic)
            {
                state.retained.insert(message.topic.clone(), wall(message));
            }
        }
        state
    }

    /// Loads a recovered state (the merge of every shard directory's, from any earlier shard
    /// count): the sessions whose client identifier this shard owns now, with their pending
    /// wills, and every retained message. Call before the first input and before
    /// `attach_log`. Returns the sessions and retained messages loaded.
    pub fn restore_state(&mut self, state: &State, wall_clock_at_zero_ms: u64) -> (usize, usize) {
        let shard_time =
            |message: &Message| super::replicate::shard_time(message, wall_clock_at_zero_ms);
        let mut retained = 0;
        for message in state.retained.values() {
            self.retained.store(shard_time(message));
            retained += 1;
        }
        let mut sessions = 0;
        for (client_id, saved) in &state.sessions {
            if owner_shard(client_id, self.config.shard_count) != self.config.index
                || self.client_ids.contains_key(client_id)
            {
                continue;
            }
            if self.persistent_quota_refuses(client_id, saved.expiry_seconds) {
                client_log!(
                    WARN,
                    Who::client(self.config.node, client_id),
                    limit = self.config.limits.persistent_sessions_per_shard_max,
                    "a recovered session is not loaded: the shard holds its maximum of persistent sessions"
                );
                continue;
            }
            self.restore_session(super::replicate::saved_from_state(
                client_id,
                saved,
                wall_clock_at_zero_ms,
            ));
            sessions += 1;
            let Some(&index) = self.client_ids.get(client_id) else {
                continue;
            };
            let receive_maximum = usize::from(self.config.limits.receive_maximum);
            let session = self.session_mut(index);
            session.recovered = true;
            session.awaiting_release = saved
                .awaiting_release
                .iter()
                .copied()
                .take(receive_maximum)
                .collect();
            // A will of a session that was connected at the stop: its connection ended then,
            // so the will follows its delay from now.
            let pending = state.pending_wills.get(client_id);
            let will = match pending {
                Some(pending) => Some((&pending.will, pending.publish_at_ms)),
                None => saved.will.as_ref().map(|will| {
                    let delay = will.delay_seconds.min(saved.expiry_seconds);
                    (
                        will,
                        wall_clock_at_zero_ms
                            .saturating_add(self.now_ms)
                            .saturating_add(u64::from(delay) * 1000),
                    )
                }),
            };
            if let Some((will, publish_at_ms)) = will {
                let message = shard_time(&will.message);
                let deadline = publish_at_ms
                    .saturating_sub(wall_clock_at_zero_ms)
                    .max(self.now_ms);
                let key = self.timers.arm(deadline, Timer::WillDelay(index, 0));
                let session = self.session_mut(index);
                session.will = Some(Box::new(StoredWill {
                    message,
                    delay_seconds: will.delay_seconds,
                }));
                session.will_timer = Some(key);
            }
        }
        // Pending wills whose session ended before the stop: due now or at their time.
        for (client_id, pending) in &state.pending_wills {
            if state.sessions.contains_key(client_id)
                || owner_shard(client_id, self.config.shard_count) != self.config.index
            {
                continue;
            }
            self.publish(shard_time(&pending.will.message));
        }
        (sessions, retained)
    }
}

impl Shard {
    /// The invariants of the module header: `logged` follows the expiry while a log is
    /// attached; a logged session and the log's view of it agree (subscriptions, in flight,
    /// the QoS 1/2 entries of the queue); held acknowledgements are in id order.
    pub(super) fn check_durable(&self) {
        let Some(durable) = &self.durable else {
            assert!(
                self.sessions.iter().flatten().all(|s| !s.logged),
                "a session is logged without a log"
            );
            return;
        };
        assert!(
            durable
                .held
                .iter()
                .zip(durable.held.iter().skip(1))
                .all(|(a, b)| a.id < b.id),
            "held acknowledgements are in id order"
        );
        for session in self.sessions.iter().flatten() {
            assert_eq!(
                session.logged,
                session.expiry_seconds > 0,
                "a session is logged exactly while persistent"
            );
            let Some(log) = &durable.log else {
                continue;
            };
            if !session.logged {
                continue;
            }
            let Some(saved) = log.state().sessions.get(&session.client_id) else {
                panic!(
                    "logged session {} is not in the log's state",
                    session.client_id
                );
            };
            assert!(
                saved.subscriptions.keys().eq(session.subscriptions.keys()),
                "the log's subscriptions of {} differ",
                session.client_id
            );
            assert_eq!(
                saved.inflight.len(),
                session.inflight.len(),
                "the log's in-flight count of {} differs",
                session.client_id
            );
            let queued = session
                .queue
                .iter()
                .filter(|q| q.message.qos != QoS::AtMostOnce)
                .count();
            assert_eq!(
                saved.queue.len(),
                queued,
                "the log's queue of {} differs",
                session.client_id
            );
        }
    }
}
