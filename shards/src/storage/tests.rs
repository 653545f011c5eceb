//! The log against its model: records round-trip; random operations applied to a [`State`]
//! directly and through the log, a simulated disk and recovery give the same state, through
//! torn tails, bit flips, compaction and crashes at any step of it.
//!
//! The simulated disk keeps, per file, what was written and what a completed sync made
//! durable. A crash keeps the durable bytes and any part of the rest (with holes or flipped
//! bits in it), may lose a file whose directory entry no sync covered, and may bring back a
//! removed file with its durable bytes. After a crash, the recovered state must equal the
//! state after some prefix of the records, no shorter than what the log said was durable.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use bytestring::ByteString;
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};
use shardmq_net::mqtt::{
    ProtocolVersion, PublishProperties, QoS, RetainHandling, SubscriptionOptions,
};

use super::record::{self, SavedDelivery};
use super::*;
use crate::message::Message;

const LIMITS: StateLimits = StateLimits {
    queued_messages_per_session_max: 4,
    subscriptions_per_session_max: 2,
};

const CONFIG: LogConfig = LogConfig {
    segment_size_bytes: 300,
    compaction: CompactionPolicy {
        ratio: 1,
        min_bytes: 600,
    },
};

fn text(value: &'static str) -> ByteString {
    ByteString::from_static(value)
}

fn message(topic: &'static str, payload: &'static [u8], qos: QoS) -> Message {
    Message {
        topic: text(topic),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: PublishProperties {
            content_type: Some(text("text/plain")),
            user_properties: vec![(text("k"), text("v"))],
            ..PublishProperties::default()
        },
        expires_at_ms: Some(1_234_567),
        publisher: Some(text("publisher")),
    }
}

fn will() -> Will {
    Will {
        message: Message {
            retain: true,
            expires_at_ms: None,
            publisher: None,
            ..message("will/t", b"gone", QoS::AtLeastOnce)
        },
        delay_seconds: 30,
    }
}

/// One record of every kind, with every optional field both present and absent somewhere.
fn every_kind() -> Vec<Record> {
    let client_id = text("client");
    vec![
        Record::SessionCreated {
            client_id: client_id.clone(),
            version: ProtocolVersion::V5,
            expiry_seconds: 3600,
            will: Some(will()),
        },
        Record::SessionChanged {
            client_id: client_id.clone(),
            version: ProtocolVersion::V3_1,
            expiry_seconds: u32::MAX,
            will: None,
        },
        Record::SessionEnded {
            client_id: client_id.clone(),
        },
        Record::SubscriptionAdded {
            client_id: client_id.clone(),
            filter: text("$share/g/a/+"),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
            identifier: Some(268_435_455),
        },
        Record::SubscriptionAdded {
            client_id: client_id.clone(),
            filter: text("a/#"),
            options: SubscriptionOptions::new(QoS::AtMostOnce),
            identifier: None,
        },
        Record::SubscriptionRemoved {
            client_id: client_id.clone(),
            filter: text("a/#"),
        },
        Record::MessageQueued {
            client_id: client_id.clone(),
            delivery: SavedDelivery {
                message: message("q/t", b"queued", QoS::ExactlyOnce),
                subscription_identifiers: vec![1, 7],
            },
        },
        Record::QueuedDropped {
            client_id: client_id.clone(),
        },
        Record::MessageSent {
            client_id: client_id.clone(),
            packet_id: 65_535,
        },
        Record::MessageReleased {
            client_id: client_id.clone(),
            packet_id: 1,
        },
        Record::MessageAcknowledged {
            client_id: client_id.clone(),
            packet_id: 2,
        },
        Record::InboundAwaitingRelease {
            client_id: client_id.clone(),
            packet_id: 3,
        },
        Record::InboundReleased {
            client_id: client_id.clone(),
            packet_id: 4,
        },
        Record::RetainedSet {
            message: Message {
                retain: true,
                ..message("r/t", b"kept", QoS::AtMostOnce)
            },
        },
        Record::RetainedCleared { topic: text("r/t") },
        Record::WillPending {
            client_id: client_id.clone(),
            will: will(),
            publish_at_ms: u64::MAX,
        },
        Record::WillCancelled { client_id },
    ]
}

#[test]
fn every_record_kind_round_trips_through_its_frame() {
    let records = every_kind();
    let kinds: std::collections::BTreeSet<u8> = records.iter().map(Record::kind).collect();
    assert_eq!(kinds.len(), 16, "every kind is covered");
    for record in records {
        let mut out = bytes::BytesMut::new();
        let length = record::encode_frame(&record, &mut out).unwrap();
        assert_eq!(length, out.len());
        let (kind, body, used) = record::read_frame(&out).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(Record::decode(kind, body), Ok(record.clone()), "{record:?}");
        // Every cut of the frame is caught as cut short, never read as a record.
        for cut in 0..out.len() {
            assert!(record::read_frame(&out[..cut]).is_err(), "cut at {cut}");
        }
        // Every single bit flip is caught by the length bound or the checksum.
        for bit in 0..out.len() * 8 {
            let mut flipped = out.to_vec();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                record::read_frame(&flipped).is_err(),
                "bit {bit} of {record:?}"
            );
        }
        // A body with a byte more, or a byte fewer, is not the record.
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(Record::decode(kind, &longer).is_err());
        if !body.is_empty() {
            assert!(Record::decode(kind, &body[..body.len() - 1]).is_err());
        }
    }
}

#[test]
fn a_length_past_the_maximum_is_corruption_without_reading_further() {
    let mut frame = vec![0; 16];
    frame[..4].copy_from_slice(&(RECORD_LENGTH_MAX as u32 + 1).to_le_bytes());
    assert_eq!(record::read_frame(&frame), Err(Malformed::Length));
    frame[..4].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(record::read_frame(&frame), Err(Malformed::Length));
    // An unknown kind with a good checksum is named, not guessed at.
    assert!(matches!(Record::decode(200, b""), Err(Malformed::Body(_))));
}

#[test]
fn a_record_too_large_is_refused_and_changes_nothing() {
    let mut log = Log::open(CONFIG, State::new(LIMITS), &[]);
    let huge = Record::RetainedCleared {
        topic: ByteString::from("x".repeat(RECORD_LENGTH_MAX)),
    };
    assert!(matches!(
        log.append(&huge),
        Err(RecordEncodeError::TooLarge { .. })
    ));
    assert_eq!(log.appended_lsn(), 0);
}

/// Flushes, carries out and completes until the log is idle and the disk has nothing left.
fn drain(log: &mut Log, disk: &mut Disk) {
    for _ in 0..1000 {
        disk.flush(log);
        while disk.execute() {}
        while disk.complete(log, 0) {}
        if log.is_idle() && disk.batches.is_empty() {
            return;
        }
    }
    panic!("the log does not drain");
}

#[test]
fn group_commit_hands_out_one_write_and_one_sync_per_flush_and_acks_after_the_sync() {
    let mut log = Log::open(
        LogConfig {
            segment_size_bytes: 1 << 20,
            ..CONFIG
        },
        State::new(LIMITS),
        &[],
    );
    let mut disk = Disk::default();
    drain(&mut log, &mut disk);
    let records = every_kind();
    for record in &records[..3] {
        log.append(record).unwrap();
    }
    assert_eq!(log.unflushed_count(), 3);
    let ticket = log.flush().unwrap();
    let mut requests = Vec::new();
    log.take_requests(&mut requests);
    assert!(
        matches!(
            &requests[..],
            [
                Request::Write { segment: 1, .. },
                Request::Sync {
                    segment: 1,
                    directory: false
                }
            ]
        ),
        "{requests:?}"
    );
    assert_eq!((log.unflushed_count(), log.durable_lsn()), (0, 0));
    log.on_synced(ticket);
    assert_eq!(log.durable_lsn(), 3);
}

#[test]
fn the_durable_point_waits_for_every_earlier_ticket() {
    let mut log = Log::open(CONFIG, State::new(LIMITS), &[]);
    let first = log.flush().unwrap();
    let record = &every_kind()[0];
    log.append(record).unwrap();
    let second = log.flush().unwrap();
    log.on_synced(second);
    assert_eq!(log.durable_lsn(), 0, "the first ticket is still out");
    log.on_synced(first);
    assert_eq!(log.durable_lsn(), 1);
}

#[test]
fn a_new_segment_waits_for_the_seal_and_a_checkpoint_removes_only_after_its_sync() {
    let mut log = Log::open(CONFIG, State::new(LIMITS), &[4, 5]);
    let first = log.flush().unwrap();
    let mut requests = Vec::new();
    log.take_requests(&mut requests);
    assert!(
        matches!(
            &requests[..],
            [
                Request::Create { segment: 6 },
                Request::Write {
                    segment: 6,
                    offset: 0,
                    ..
                },
                Request::Sync {
                    segment: 6,
                    directory: true
                }
            ]
        ),
        "{requests:?}"
    );
    // Fill segment 6 so that the next record cuts segment 7.
    let record = &every_kind()[6];
    while log.segments().last() == Some(6) {
        log.append(record).unwrap();
    }
    let second = log.flush().unwrap();
    requests.clear();
    log.take_requests(&mut requests);
    assert!(
        requests
            .iter()
            .all(|request| !matches!(request, Request::Create { segment: 7 })),
        "segment 7 is not created before segment 6 is sealed: {requests:?}"
    );
    assert!(log.is_waiting());
    assert_eq!(log.flush(), None);
    log.on_synced(first);
    requests.clear();
    log.take_requests(&mut requests);
    assert_eq!(
        requests,
        [
            Request::Remove { segment: 5 },
            Request::Remove { segment: 4 }
        ],
        "the old segments go once the checkpoint is synced"
    );
    log.on_synced(second);
    assert!(!log.is_waiting());
    log.flush().unwrap();
    requests.clear();
    log.take_requests(&mut requests);
    assert!(
        matches!(requests[0], Request::Create { segment: 7 }),
        "{requests:?}"
    );
}

#[test]
fn recovery_starts_at_the_newest_complete_checkpoint_and_skips_a_torn_one() {
    let mut log = Log::open(CONFIG, State::new(LIMITS), &[]);
    let mut disk = Disk::default();
    let records = every_kind();
    log.append(&records[0]).unwrap();
    drain(&mut log, &mut disk);
    let expected = log.state().clone();
    // A checkpoint whose write is cut short, as by a crash before its sync.
    log.checkpoint();
    disk.flush(&mut log);
    while disk.execute() {}
    while disk.complete(&mut log, 0) {}
    disk.flush(&mut log);
    while disk.execute() {}
    let files = disk.files.clone();
    let (&sequence, torn) = files.last_key_value().unwrap();
    let mut segments: Vec<(u64, Vec<u8>)> =
        files.iter().map(|(&s, f)| (s, f.data.clone())).collect();
    segments.last_mut().unwrap().1.truncate(torn.data.len() / 2);
    let views: Vec<Segment<'_>> = segments
        .iter()
        .map(|(sequence, bytes)| Segment {
            sequence: *sequence,
            bytes,
        })
        .collect();
    let (state, recovery, ignored) = recover_state(&views, LIMITS);
    assert_eq!(state, expected);
    assert_eq!(ignored, 0);
    assert_eq!(recovery.skipped, [sequence]);
    assert!(recovery.is_crash_consistent());
}

// ---- The simulated disk ----

#[derive(Debug, Clone, Default)]
struct File {
    data: Vec<u8>,
    durable: Vec<u8>,
    name_durable: bool,
}

#[derive(Debug)]
struct Batch {
    ticket: Option<Ticket>,
    requests: VecDeque<Request>,
    /// Syncs carried out: the segment, its length when the sync began, and `directory`.
    syncs: Vec<(u64, usize, bool)>,
}

impl Batch {
    fn new(ticket: Option<Ticket>, requests: Vec<Request>) -> Self {
        Self {
            ticket,
            requests: requests.into(),
            syncs: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Disk {
    files: BTreeMap<u64, File>,
    removed: Vec<(u64, File)>,
    batches: VecDeque<Batch>,
}

impl Disk {
    fn flush(&mut self, log: &mut Log) {
        let ticket = log.flush();
        let mut requests = Vec::new();
        log.take_requests(&mut requests);
        if ticket.is_some() || !requests.is_empty() {
            self.batches.push_back(Batch::new(ticket, requests));
        }
    }

    /// Carries out the next request, in order across batches.
    fn execute(&mut self) -> bool {
        let Some(batch) = self.batches.iter_mut().find(|b| !b.requests.is_empty()) else {
            return false;
        };
        let request = batch.requests.pop_front().unwrap();
        match request {
            Request::Create { segment } => {
                self.files.insert(segment, File::default());
            }
            Request::Write {
                segment,
                offset,
                bytes,
            } => {
                let file = self
                    .files
                    .get_mut(&segment)
                    .expect("a write to a file created");
                assert_eq!(offset as usize, file.data.len(), "writes append");
                file.data.extend_from_slice(&bytes);
            }
            Request::Sync { segment, directory } => {
                let length = self
                    .files
                    .get(&segment)
                    .expect("a sync of a file")
                    .data
                    .len();
                batch.syncs.push((segment, length, directory));
            }
            Request::Remove { segment } => {
                let file = self.files.remove(&segment).expect("a removal of a file");
                self.removed.push((segment, file));
            }
        }
        true
    }

    /// Completes the `choice`-th batch whose requests are all carried out.
    fn complete(&mut self, log: &mut Log, choice: usize) -> bool {
        let done: Vec<usize> = (0..self.batches.len())
            .filter(|&i| self.batches[i].requests.is_empty())
            .collect();
        if done.is_empty() {
            return false;
        }
        let batch = self.batches.remove(done[choice % done.len()]).unwrap();
        for (segment, length, directory) in batch.syncs {
            if let Some(file) = self.files.get_mut(&segment) {
                // A sync that completes after a later one makes nothing less durable.
                if file.durable.len() < length {
                    file.durable = file.data[..length].to_vec();
                }
                file.name_durable |= directory;
            }
        }
        if let Some(ticket) = batch.ticket {
            log.on_synced(ticket);
            let mut requests = Vec::new();
            log.take_requests(&mut requests);
            if !requests.is_empty() {
                self.batches.push_back(Batch::new(None, requests));
            }
        }
        true
    }

    /// What a crash leaves: see the module comment.
    fn crash(&self, seed: u64) -> BTreeMap<u64, Vec<u8>> {
        // The crash's choices come from the one seed proptest generated (and shrinks).
        let mut seed_bytes = [0; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
        let mut left = BTreeMap::new();
        for (&segment, file) in &self.files {
            if !file.name_durable && rng.random_ratio(1, 2) {
                continue;
            }
            let durable = file.durable.len();
            let kept = durable + rng.random_range(0..=file.data.len() - durable);
            let mut bytes = file.data[..kept].to_vec();
            if kept > durable && rng.random_ratio(1, 3) {
                let at = durable + rng.random_range(0..kept - durable);
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            if kept > durable && rng.random_ratio(1, 4) {
                let from = durable + rng.random_range(0..kept - durable);
                let to = from + rng.random_range(0..kept - from);
                bytes[from..to].fill(0);
            }
            left.insert(segment, bytes);
        }
        for (segment, file) in &self.removed {
            if rng.random_ratio(1, 2) && !left.contains_key(segment) {
                left.insert(*segment, file.durable.clone());
            }
        }
        left
    }
}

fn recover_files(files: &BTreeMap<u64, Vec<u8>>) -> (State, Recovery) {
    let segments: Vec<Segment<'_>> = files
        .iter()
        .map(|(&sequence, bytes)| Segment { sequence, bytes })
        .collect();
    let (state, recovery, _) = recover_state(&segments, LIMITS);
    (state, recovery)
}

// ---- Random operations ----

const CLIENTS: [&str; 3] = ["a", "b", "c"];
const FILTERS: [&str; 3] = ["f/1", "f/+", "$share/g/f/#"];
const TOPICS: [&str; 2] = ["t/1", "t/2"];

fn client() -> impl Strategy<Value = ByteString> {
    prop::sample::select(&CLIENTS[..]).prop_map(ByteString::from_static)
}

fn packet_id() -> impl Strategy<Value = u16> {
    0u16..5
}

fn qos() -> impl Strategy<Value = QoS> {
    (0u8..3).prop_map(|bits| QoS::from_bits(bits).unwrap())
}

fn any_message() -> impl Strategy<Value = Message> {
    (
        prop::sample::select(&TOPICS[..]),
        prop::collection::vec(any::<u8>(), 0..12),
        qos(),
        any::<bool>(),
        prop::option::of(any::<u64>()),
        prop::option::of(client()),
        prop::option::of(prop::sample::select(&TOPICS[..])),
    )
        .prop_map(
            |(topic, payload, qos, retain, expires_at_ms, publisher, response)| Message {
                topic: ByteString::from_static(topic),
                payload: Bytes::from(payload),
                qos,
                retain,
                properties: PublishProperties {
                    response_topic: response.map(ByteString::from_static),
                    ..PublishProperties::default()
                },
                expires_at_ms,
                publisher,
            },
        )
}

fn any_will() -> impl Strategy<Value = Will> {
    (any_message(), any::<u32>()).prop_map(|(message, delay_seconds)| Will {
        message,
        delay_seconds,
    })
}

fn any_version() -> impl Strategy<Value = ProtocolVersion> {
    prop::sample::select(
        &[
            ProtocolVersion::V3_1,
            ProtocolVersion::V3_1_1,
            ProtocolVersion::V5,
        ][..],
    )
}

fn any_record() -> impl Strategy<Value = Record> {
    let options = (
        qos(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(
            &[
                RetainHandling::SendOnSubscribe,
                RetainHandling::SendIfNew,
                RetainHandling::DoNotSend,
            ][..],
        ),
    )
        .prop_map(|(qos, no_local, retain_as_published, retain_handling)| {
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            }
        });
    let filter = prop::sample::select(&FILTERS[..]).prop_map(ByteString::from_static);
    prop_oneof![
        3 => (client(), any_version(), any::<u32>(), prop::option::of(any_will())).prop_map(
            |(client_id, version, expiry_seconds, will)| Record::SessionCreated {
                client_id, version, expiry_seconds, will
            }
        ),
        1 => (client(), any_version(), any::<u32>(), prop::option::of(any_will())).prop_map(
            |(client_id, version, expiry_seconds, will)| Record::SessionChanged {
                client_id, version, expiry_seconds, will
            }
        ),
        1 => client().prop_map(|client_id| Record::SessionEnded { client_id }),
        2 => (client(), filter.clone(), options, prop::option::of(1u32..10)).prop_map(
            |(client_id, filter, options, identifier)| Record::SubscriptionAdded {
                client_id, filter, options, identifier
            }
        ),
        1 => (client(), filter).prop_map(|(client_id, filter)| Record::SubscriptionRemoved {
            client_id, filter
        }),
        4 => (client(), any_message(), prop::collection::vec(1u32..10, 0..3)).prop_map(
            |(client_id, message, subscription_identifiers)| Record::MessageQueued {
                client_id,
                delivery: SavedDelivery { message, subscription_identifiers },
            }
        ),
        1 => client().prop_map(|client_id| Record::QueuedDropped { client_id }),
        3 => (client(), packet_id()).prop_map(|(client_id, packet_id)| Record::MessageSent {
            client_id, packet_id
        }),
        1 => (client(), packet_id()).prop_map(|(client_id, packet_id)| Record::MessageReleased {
            client_id, packet_id
        }),
        2 => (client(), packet_id()).prop_map(|(client_id, packet_id)| {
            Record::MessageAcknowledged { client_id, packet_id }
        }),
        1 => (client(), packet_id()).prop_map(|(client_id, packet_id)| {
            Record::InboundAwaitingRelease { client_id, packet_id }
        }),
        1 => (client(), packet_id()).prop_map(|(client_id, packet_id)| {
            Record::InboundReleased { client_id, packet_id }
        }),
        2 => any_message().prop_map(|message| Record::RetainedSet { message }),
        1 => prop::sample::select(&TOPICS[..])
            .prop_map(|topic| Record::RetainedCleared { topic: ByteString::from_static(topic) }),
        1 => (client(), any_will(), any::<u64>()).prop_map(|(client_id, will, publish_at_ms)| {
            Record::WillPending { client_id, will, publish_at_ms }
        }),
        1 => client().prop_map(|client_id| Record::WillCancelled { client_id }),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Append(Box<Record>),
    Flush,
    Execute(u8),
    Complete(u8),
    Checkpoint,
    Crash(u64),
}

fn ops(crashes: bool) -> impl Strategy<Value = Vec<Op>> {
    let crash_weight = u32::from(crashes);
    prop::collection::vec(
        prop_oneof![
            12 => any_record().prop_map(|record| Op::Append(Box::new(record))),
            3 => Just(Op::Flush),
            4 => (1u8..4).prop_map(Op::Execute),
            3 => any::<u8>().prop_map(Op::Complete),
            1 => Just(Op::Checkpoint),
            crash_weight => any::<u64>().prop_map(Op::Crash),
        ],
        0..120,
    )
}

/// A log, its disk, and the model: the states after each record since the log opened.
struct Run {
    log: Log,
    disk: Disk,
    history: Vec<State>,
}

impl Run {
    fn new() -> Self {
        Self {
            log: Log::open(CONFIG, State::new(LIMITS), &[]),
            disk: Disk::default(),
            history: vec![State::new(LIMITS)],
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Append(record) => {
                let lsn = self.log.append(record).unwrap();
                let mut model = self.history.last().unwrap().clone();
                model.apply(record);
                assert_eq!(self.log.state(), &model);
                self.history.push(model);
                assert_eq!(lsn as usize, self.history.len() - 1);
            }
            Op::Flush => self.disk.flush(&mut self.log),
            Op::Execute(count) => {
                for _ in 0..*count {
                    self.disk.execute();
                }
            }
            Op::Complete(choice) => {
                self.disk.complete(&mut self.log, usize::from(*choice));
            }
            Op::Checkpoint => self.log.checkpoint(),
            Op::Crash(seed) => self.crash(*seed),
        }
    }

    /// Crashes, recovers, checks the recovered state, and opens the log again over it.
    fn crash(&mut self, seed: u64) {
        let files = self.disk.crash(seed);
        let (state, recovery) = recover_files(&files);
        assert!(
            recovery.is_crash_consistent(),
            "a crash alone cannot explain {recovery:?}"
        );
        let durable = self.log.durable_lsn() as usize;
        assert!(
            self.history[durable..].contains(&state),
            "the recovered state is not that after a prefix of at least {durable} records \
             (of {}): {recovery:?}",
            self.history.len() - 1
        );
        self.log = Log::open(CONFIG, state.clone(), &recovery.segments);
        self.disk = Disk {
            files: files
                .into_iter()
                .map(|(segment, data)| {
                    let file = File {
                        durable: data.clone(),
                        data,
                        name_durable: true,
                    };
                    (segment, file)
                })
                .collect(),
            removed: Vec::new(),
            batches: VecDeque::new(),
        };
        self.history = vec![state];
    }

    /// Runs `ops` from a new log, then [`finish`](Self::finish)es.
    fn synced(ops: &[Op]) -> (Self, BTreeMap<u64, Vec<u8>>) {
        let mut run = Self::new();
        for op in ops {
            run.step(op);
        }
        let files = run.finish();
        (run, files)
    }

    /// Syncs everything and checks that recovery then gives exactly the model's state.
    fn finish(&mut self) -> BTreeMap<u64, Vec<u8>> {
        drain(&mut self.log, &mut self.disk);
        assert_eq!(self.log.durable_lsn() as usize, self.history.len() - 1);
        let files: BTreeMap<u64, Vec<u8>> = self
            .disk
            .files
            .iter()
            .map(|(&segment, file)| (segment, file.data.clone()))
            .collect();
        let (state, recovery) = recover_files(&files);
        assert_eq!(recovery.stop, None);
        assert!(recovery.skipped.is_empty() && recovery.obsolete.is_empty());
        assert_eq!(&state, self.history.last().unwrap());
        files
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_record_round_trips(record in any_record()) {
        let mut out = bytes::BytesMut::new();
        record::encode_frame(&record, &mut out).unwrap();
        let (kind, body, used) = record::read_frame(&out).unwrap();
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(Record::decode(kind, body), Ok(record));
    }

    #[test]
    fn a_state_checkpointed_and_replayed_is_the_same_state(records in prop::collection::vec(any_record(), 0..80)) {
        let mut state = State::new(LIMITS);
        for record in &records {
            state.apply(record);
        }
        let mut rebuilt = State::new(LIMITS);
        let mut applied_all = true;
        state.for_each_record(|record| applied_all &= rebuilt.apply(&record));
        prop_assert!(applied_all);
        prop_assert_eq!(rebuilt, state);
    }

    /// Direct application and the log agree; every crash recovers a prefix no shorter than
    /// what was durable; a final full sync recovers everything.
    #[test]
    fn the_log_recovers_what_was_synced_through_crashes_at_any_step(ops in ops(true)) {
        Run::synced(&ops);
    }

    /// A flipped bit anywhere in a synced log never panics, is reported, and recovery gives
    /// the state after some prefix of the records.
    #[test]
    fn a_flipped_bit_is_detected_and_recovery_keeps_a_prefix(ops in ops(false), choice in any::<u64>()) {
        let (run, files) = Run::synced(&ops);
        let total_bits: usize = files.values().map(|bytes| bytes.len() * 8).sum();
        let mut bit = (choice % total_bits as u64) as usize;
        let mut damaged = files.clone();
        for bytes in damaged.values_mut() {
            if bit < bytes.len() * 8 {
                bytes[bit / 8] ^= 1 << (bit % 8);
                break;
            }
            bit -= bytes.len() * 8;
        }
        let (state, recovery) = recover_files(&damaged);
        prop_assert!(
            recovery.stop.is_some() || !recovery.skipped.is_empty(),
            "an undetected flip: {:?}", recovery
        );
        prop_assert!(run.history.contains(&state));
    }

    /// Any cut of the last segment recovers a prefix (a torn tail), and any cut of an earlier
    /// one is reported as more than a crash.
    #[test]
    fn a_cut_anywhere_recovers_a_prefix(ops in ops(false), choice in any::<u64>()) {
        let (run, files) = Run::synced(&ops);
        let (&segment, bytes) = files
            .iter()
            .nth((choice % files.len() as u64) as usize)
            .unwrap();
        let cut = ((choice >> 8) % (bytes.len() as u64 + 1)) as usize;
        let mut damaged = files.clone();
        damaged.get_mut(&segment).unwrap().truncate(cut);
        let (state, recovery) = recover_files(&damaged);
        prop_assert!(run.history.contains(&state), "{:?}", recovery);
        if cut < bytes.len() && Some(&segment) != files.keys().last() {
            prop_assert!(!recovery.is_crash_consistent(), "{:?}", recovery);
        }
    }
}
