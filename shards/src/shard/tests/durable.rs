//! The durable log wired into the shard: acknowledgements held until their records are
//! synced, nothing logged for clean sessions and QoS 0, a restart from the recovered state,
//! and what a failed log refuses. The log's requests run against an in-memory disk that
//! keeps each segment's bytes, as the reactor would write them.

use std::collections::BTreeMap;

use super::*;
use crate::storage::{self, Log, LogConfig, Request, State, Ticket};

/// Wall-clock milliseconds at the shard clock's zero, for the tests' runs.
const WALL_AT_ZERO_MS: u64 = 1_700_000_000_000;

/// The segments of each shard's log, by sequence number.
#[derive(Default)]
struct Disks {
    files: Vec<BTreeMap<u64, Vec<u8>>>,
}

impl Disks {
    /// Opens a log on every shard of `node` over what it holds, with `hold_acks`.
    fn attach(node: &mut Node, hold_acks: bool) -> Self {
        let mut disks = Disks::default();
        for shard in &mut node.shards {
            let state = shard.durable_state(WALL_AT_ZERO_MS);
            let log = Log::open(LogConfig::default(), state, &[]);
            shard.attach_log(
                log,
                LogSettings {
                    hold_acks,
                    wall_clock_at_zero_ms: WALL_AT_ZERO_MS,
                    held_acks_max: 16,
                },
            );
            disks.files.push(BTreeMap::new());
        }
        disks
    }

    /// Takes every shard's requests without carrying them out: what a loop hands out.
    fn take(&mut self, node: &mut Node, shard: usize) -> (Vec<Request>, Option<Ticket>) {
        let mut requests = Vec::new();
        let ticket = node.shards[shard].take_log_requests(&mut requests);
        (requests, ticket)
    }

    fn execute(&mut self, shard: usize, requests: Vec<Request>) {
        let files = &mut self.files[shard];
        for request in requests {
            match request {
                Request::Create { segment } => {
                    files.insert(segment, Vec::new());
                }
                Request::Write {
                    segment,
                    offset,
                    bytes,
                } => {
                    let file = files.entry(segment).or_default();
                    let offset = offset as usize;
                    if file.len() < offset + bytes.len() {
                        file.resize(offset + bytes.len(), 0);
                    }
                    file[offset..offset + bytes.len()].copy_from_slice(&bytes);
                }
                Request::Sync { .. } => {}
                Request::Remove { segment } => {
                    files.remove(&segment);
                }
            }
        }
    }

    /// One loop's worth for every shard: requests out, carried out, synced, and the
    /// outputs this releases delivered (until no shard has more to write).
    fn sync(&mut self, node: &mut Node) {
        for _ in 0..8 {
            let mut any = false;
            for shard in 0..node.shards.len() {
                let (requests, ticket) = self.take(node, shard);
                self.execute(shard, requests);
                if let Some(ticket) = ticket {
                    any = true;
                    node.shards[shard].on_log_synced(ticket);
                }
                // Removals handed out after a sync, and the released outputs.
                let (requests, _) = self.take(node, shard);
                self.execute(shard, requests);
                node.run(shard, Input::Tick);
            }
            if !any {
                return;
            }
        }
    }

    /// Every shard's recovered state, merged (what the binary does at start).
    fn recover(&self) -> State {
        let mut merged = State::new((&Limits::default()).into());
        for files in &self.files {
            let segments: Vec<storage::Segment<'_>> = files
                .iter()
                .map(|(&sequence, bytes)| storage::Segment { sequence, bytes })
                .collect();
            let (state, recovery, ignored) =
                storage::recover_state(&segments, (&Limits::default()).into());
            assert!(recovery.is_crash_consistent(), "{recovery:?}");
            assert_eq!(ignored, 0, "every record applied");
            for (client_id, session) in state.sessions {
                merged.sessions.entry(client_id).or_insert(session);
            }
            merged.retained.extend(state.retained);
            merged.pending_wills.extend(state.pending_wills);
        }
        merged
    }
}

fn retained_publish(topic: &'static str, packet_id: u16, payload: &'static [u8]) -> Packet {
    let Packet::Publish(mut publish) = publish(topic, QoS::AtLeastOnce, packet_id, payload) else {
        unreachable!()
    };
    publish.retain = true;
    Packet::Publish(publish)
}

fn pubacks(packets: &[Packet]) -> Vec<(u16, ReasonCode)> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::PubAck(ack) | Packet::PubRec(ack) => Some((ack.packet_id, ack.reason)),
            _ => None,
        })
        .collect()
}

/// A node of two shards with logs, a persistent subscriber of `t/#` offline (its session
/// on shard 0 or 1, whichever owns "keeper"), and a clean publisher on the other shard.
fn offline_subscriber(hold_acks: bool) -> (Node, Disks) {
    let mut node = Node::new(2, Limits::default());
    let mut disks = Disks::attach(&mut node, hold_acks);
    let owner = usize::from(owner_shard("keeper", 2));
    node.connect(1, owner, v5_persistent("keeper", 3600));
    node.send(1, &subscribe(1, "t/#", QoS::AtLeastOnce));
    disks.sync(&mut node);
    node.take(1);
    node.lose(1);
    node.connect(2, 1 - owner, connect(V5, "sender", true));
    disks.sync(&mut node);
    (node, disks)
}

#[test]
fn a_puback_for_a_persistent_session_waits_for_the_sync_of_its_record() {
    let (mut node, mut disks) = offline_subscriber(true);
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 7, b"one"));
    assert!(
        pubacks(&node.take(2)).is_empty(),
        "no PUBACK before the subscriber's shard synced the message"
    );
    disks.sync(&mut node);
    assert_eq!(pubacks(&node.take(2)), [(7, ReasonCode::SUCCESS)]);
    // The subscriber's own shard writes; the publisher's shard logs nothing for a clean
    // session.
    let owner = usize::from(owner_shard("keeper", 2));
    let state = disks.recover();
    assert_eq!(state.sessions["keeper"].queue.len(), 1);
    assert_eq!(node.shards[1 - owner].held_ack_count(), 0);
}

#[test]
fn a_suback_of_a_persistent_session_waits_and_a_clean_one_does_not() {
    let mut node = Node::new(1, Limits::default());
    let mut disks = Disks::attach(&mut node, true);
    node.connect(1, 0, v5_persistent("keeper", 60));
    node.send(1, &subscribe(1, "a", QoS::AtLeastOnce));
    assert!(
        subacks(&node.take(1)).is_empty(),
        "SUBACK waits for the sync"
    );
    disks.sync(&mut node);
    assert_eq!(subacks(&node.take(1)), [vec![ReasonCode::GRANTED_QOS_1]]);
    node.connect(2, 0, connect(V5, "clean", true));
    node.send(2, &subscribe(1, "a", QoS::AtLeastOnce));
    assert_eq!(
        subacks(&node.take(2)),
        [vec![ReasonCode::GRANTED_QOS_1]],
        "a clean session's SUBACK goes at once"
    );
}

#[test]
fn clean_sessions_and_qos_0_write_nothing() {
    let mut node = Node::new(2, Limits::default());
    let mut disks = Disks::attach(&mut node, true);
    disks.sync(&mut node);
    let before: Vec<_> = disks.files.clone();
    node.connect(1, 0, connect(V5, "sub", true));
    node.send(1, &subscribe(1, "t", QoS::AtLeastOnce));
    node.connect(2, 1, v5_persistent("persistent-publisher", 60));
    disks.sync(&mut node);
    let after_connect = disks.files.clone();
    node.send(2, &publish("t", QoS::AtLeastOnce, 1, b"to a clean session"));
    node.send(2, &publish("t", QoS::AtMostOnce, 0, b"qos 0"));
    disks.sync(&mut node);
    assert_eq!(
        pubacks(&node.take(2)),
        [(1, ReasonCode::SUCCESS)],
        "acknowledged once the subscriber's shard answered"
    );
    assert_eq!(payloads(&node.take(1)).len(), 2);
    assert_eq!(
        disks.files, after_connect,
        "only the persistent publisher's session was written"
    );
    assert_ne!(before, after_connect);
    // A clean session taking part in everything above left no record at all.
    let state = disks.recover();
    assert_eq!(
        state.sessions.keys().collect::<Vec<_>>(),
        ["persistent-publisher"]
    );
}

#[test]
fn without_held_acks_the_puback_goes_at_once_and_the_record_is_still_written() {
    let (mut node, mut disks) = offline_subscriber(false);
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 3, b"one"));
    assert_eq!(pubacks(&node.take(2)), [(3, ReasonCode::SUCCESS)]);
    disks.sync(&mut node);
    assert_eq!(disks.recover().sessions["keeper"].queue.len(), 1);
}

#[test]
fn restore_rebuilds_sessions_queues_in_flight_inbound_ids_retained_and_wills() {
    let (mut node, mut disks) = offline_subscriber(true);
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 1, b"queued-1"));
    node.send(2, &publish("t/b", QoS::AtLeastOnce, 2, b"queued-2"));
    node.send(2, &retained_publish("r/kept", 3, b"kept"));
    node.send(2, &retained_publish("r/cleared", 4, b"soon gone"));
    node.send(2, &retained_publish("r/cleared", 5, b""));
    // A persistent QoS 2 publisher halfway through: PUBREC sent, PUBREL not yet.
    node.connect(3, 0, v5_persistent("q2", 600));
    let Packet::Publish(mut qos2) = publish("t/c", QoS::ExactlyOnce, 9, b"exactly-once") else {
        unreachable!()
    };
    qos2.qos = QoS::ExactlyOnce;
    node.send(3, &Packet::Publish(qos2.clone()));
    // A persistent session with a delayed will, gone: its will is pending.
    let mut with_will = v5_persistent("willing", 600);
    with_will.will = Some(Will {
        topic: ByteString::from_static("t/will"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(30),
            ..WillProperties::default()
        },
    });
    node.connect(4, 1, with_will);
    node.lose(4);
    disks.sync(&mut node);
    assert_eq!(
        pubacks(&node.take(2)),
        [
            (1, ReasonCode::SUCCESS),
            (2, ReasonCode::SUCCESS),
            (3, ReasonCode::NO_MATCHING_SUBSCRIBERS),
            (4, ReasonCode::NO_MATCHING_SUBSCRIBERS),
            (5, ReasonCode::NO_MATCHING_SUBSCRIBERS),
        ],
        "in order"
    );
    assert_eq!(pubacks(&node.take(3)).len(), 1);

    // A restart with three shards instead of two.
    let state = disks.recover();
    assert_eq!(state.retained.keys().collect::<Vec<_>>(), ["r/kept"]);
    assert!(state.pending_wills.contains_key("willing"));
    let mut restarted = Node::new(3, Limits::default());
    let mut loaded = (0, 0);
    for shard in &mut restarted.shards {
        let (sessions, retained) = shard.restore_state(&state, WALL_AT_ZERO_MS);
        loaded.0 += sessions;
        loaded.1 += retained;
    }
    assert_eq!(
        loaded,
        (3, 3),
        "three sessions once each, the retained message on every shard"
    );
    let mut disks = Disks::attach(&mut restarted, true);
    for shard in 0..3 {
        restarted.run(shard, Input::Tick);
    }
    disks.sync(&mut restarted);
    // The subscriber's queue, in order.
    let owner = usize::from(owner_shard("keeper", 3));
    let connack = restarted.connect(10, owner, v5_persistent("keeper", 3600));
    assert!(connack.session_present);
    assert_eq!(
        payloads(&restarted.take(10)),
        [
            (&b"queued-1"[..], QoS::AtLeastOnce),
            (b"queued-2", QoS::AtLeastOnce),
            (b"exactly-once", QoS::AtLeastOnce)
        ]
    );
    // The QoS 2 publisher's identifier still awaits PUBREL: a resend is not delivered again.
    let q2 = usize::from(owner_shard("q2", 3));
    assert!(
        restarted
            .connect(11, q2, v5_persistent("q2", 600))
            .session_present
    );
    restarted.send(11, &subscribe(1, "t/c", QoS::AtLeastOnce));
    qos2.dup = true;
    restarted.send(11, &Packet::Publish(qos2));
    disks.sync(&mut restarted);
    let got = restarted.take(11);
    assert!(payloads(&got).is_empty(), "{got:?}");
    assert_eq!(pubacks(&got), [(9, ReasonCode::SUCCESS)]);
    // Retained: kept, and the cleared one stays cleared.
    restarted.connect(12, 0, connect(V5, "late", true));
    restarted.send(12, &subscribe(1, "r/#", QoS::AtMostOnce));
    assert_eq!(
        payloads(&restarted.take(12)),
        [(&b"kept"[..], QoS::AtMostOnce)]
    );
    // The pending will is published at its time.
    restarted.send(12, &subscribe(2, "t/will", QoS::AtMostOnce));
    restarted.take(12);
    restarted.advance(31_000);
    assert_eq!(
        payloads(&restarted.take(12)),
        [(&b"bye"[..], QoS::AtMostOnce)]
    );
}

#[test]
fn an_acknowledged_message_in_flight_comes_back_in_flight_and_an_acked_one_does_not() {
    let (mut node, mut disks) = offline_subscriber(true);
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 1, b"acked"));
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 2, b"in-flight"));
    disks.sync(&mut node);
    let owner = usize::from(owner_shard("keeper", 2));
    node.connect(5, owner, v5_persistent("keeper", 3600));
    let got = node.take(5);
    let sent = publishes_in(&got);
    assert_eq!(sent.len(), 2);
    let first = sent[0].packet_id;
    node.send(5, &Packet::PubAck(PubAck::new(first)));
    disks.sync(&mut node);
    let state = disks.recover();
    let session = &state.sessions["keeper"];
    assert_eq!(session.inflight.len(), 1);
    assert_eq!(
        &session.inflight[0].delivery.message.payload[..],
        b"in-flight"
    );
    assert!(session.queue.is_empty());
}

#[test]
fn a_failed_log_refuses_durable_work_and_keeps_serving_clean_sessions() {
    let (mut node, mut disks) = offline_subscriber(true);
    let owner = usize::from(owner_shard("keeper", 2));
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 1, b"waiting"));
    // The subscriber's shard hands out the write, and it fails.
    let (_requests, ticket) = disks.take(&mut node, owner);
    assert!(ticket.is_some());
    let error = std::io::Error::from_raw_os_error(28); // ENOSPC
    node.shards[owner].on_log_failed(&error);
    disks.sync(&mut node);
    assert_eq!(
        pubacks(&node.take(2)),
        [(1, ReasonCode::UNSPECIFIED_ERROR)],
        "what could not be written is not acknowledged"
    );
    // New durable work on that shard: refused with a reason code.
    node.send(2, &publish("t/a", QoS::AtLeastOnce, 2, b"after"));
    disks.sync(&mut node);
    assert_eq!(pubacks(&node.take(2)), [(2, ReasonCode::UNSPECIFIED_ERROR)]);
    let connack = node.connect(6, owner, v5_persistent("keeper", 3600));
    assert_eq!(connack.reason, ReasonCode::SERVER_UNAVAILABLE);
    let connack = node.connect(7, owner, connect(V311, "keeper", false));
    assert_eq!(
        connack.reason,
        ReasonCode::SERVER_UNAVAILABLE,
        "return code 3"
    );
    // A 3.1.1 publisher whose message cannot be written is disconnected instead.
    node.connect(8, 1 - owner, connect(V311, "old", true));
    node.send(8, &publish("t/a", QoS::AtLeastOnce, 3, b"3.1.1"));
    disks.sync(&mut node);
    assert!(pubacks(&node.take(8)).is_empty());
    assert!(node.closed.contains(&8));
    // Clean sessions and QoS 0 go on.
    node.connect(9, owner, connect(V5, "clean", true));
    node.send(9, &subscribe(1, "c", QoS::AtLeastOnce));
    assert_eq!(subacks(&node.take(9)), [vec![ReasonCode::GRANTED_QOS_1]]);
    node.send(2, &publish("c", QoS::AtLeastOnce, 4, b"clean"));
    disks.sync(&mut node);
    assert_eq!(pubacks(&node.take(2)), [(4, ReasonCode::SUCCESS)]);
    assert_eq!(payloads(&node.take(9)), [(&b"clean"[..], QoS::AtLeastOnce)]);
}

#[test]
fn a_logged_session_cannot_subscribe_after_the_log_failed() {
    let mut node = Node::new(2, Limits::default());
    let mut disks = Disks::attach(&mut node, true);
    let owner = usize::from(owner_shard("keeper", 2));
    node.connect(5, owner, v5_persistent("keeper", 3600));
    disks.sync(&mut node);
    node.take(5);
    node.shards[owner].on_log_failed(&std::io::Error::from_raw_os_error(5)); // EIO
    node.send(5, &subscribe(1, "after/failure", QoS::AtLeastOnce));
    disks.sync(&mut node);
    assert_eq!(
        subacks(&node.take(5)),
        [vec![ReasonCode::UNSPECIFIED_ERROR]],
        "refused: the subscription could not be made durable"
    );
    // Refused before anything changed: nothing is routed to it.
    node.connect(9, 1 - owner, connect(V5, "clean", true));
    node.send(9, &publish("after/failure", QoS::AtMostOnce, 0, b"x"));
    disks.sync(&mut node);
    assert!(payloads(&node.take(5)).is_empty());
}

#[test]
fn the_held_queue_is_bounded() {
    let (mut node, _disks) = offline_subscriber(true);
    // Never synced: 16 wait, the 17th is refused before it is routed.
    for packet_id in 1..=17 {
        node.send(2, &publish("t/a", QoS::AtLeastOnce, packet_id, b"x"));
    }
    assert_eq!(pubacks(&node.take(2)), [(17, ReasonCode::QUOTA_EXCEEDED)]);
}

#[test]
fn retained_changes_from_different_shards_are_recorded_in_order_by_the_topics_owner() {
    let mut node = Node::new(3, Limits::default());
    let mut disks = Disks::attach(&mut node, true);
    node.connect(1, 0, connect(V5, "writer-0", true));
    node.connect(2, 1, connect(V5, "writer-1", true));
    node.connect(3, 2, connect(V5, "writer-2", true));
    node.send(1, &retained_publish("shared/topic", 1, b"first"));
    node.send(2, &retained_publish("shared/topic", 1, b""));
    node.send(3, &retained_publish("other/topic", 1, b"kept"));
    disks.sync(&mut node);
    for id in 1..=3 {
        assert_eq!(pubacks(&node.take(id)).len(), 1, "writer {id} acknowledged");
    }
    let owner = usize::from(owner_shard("shared/topic", 3));
    let state = disks.recover();
    assert_eq!(
        state.retained.keys().collect::<Vec<_>>(),
        ["other/topic"],
        "the clear came after the set"
    );
    // Only the owner's log holds the topic.
    for (shard, files) in disks.files.iter().enumerate() {
        let segments: Vec<storage::Segment<'_>> = files
            .iter()
            .map(|(&sequence, bytes)| storage::Segment { sequence, bytes })
            .collect();
        let mut topics = Vec::new();
        storage::recover(&segments, |record| {
            if let storage::Record::RetainedSet { message } = record {
                topics.push(message.topic);
            }
        });
        if shard != owner {
            assert!(!topics.iter().any(|t| t == "shared/topic"), "shard {shard}");
        }
    }
    node.send(2, &retained_publish("shared/topic", 2, b"again"));
    disks.sync(&mut node);
    assert_eq!(
        &disks.recover().retained["shared/topic"].payload[..],
        b"again"
    );
}

#[test]
fn a_subscription_the_acl_refuses_is_not_logged() {
    let mut node = Node::new(1, Limits::default());
    node.shards[0].set_auth_policy(std::sync::Arc::new(crate::auth::Policy {
        allow_anonymous: true,
        verify: false,
        acl: Some(crate::auth::Acl::parse(b"topic read allowed/#\n").unwrap()),
    }));
    let mut disks = Disks::attach(&mut node, true);
    node.connect(1, 0, v5_persistent("keeper", 60));
    node.send(
        1,
        &subscribe_all(1, &["allowed/+", "denied/+"], QoS::AtLeastOnce),
    );
    disks.sync(&mut node);
    assert_eq!(
        subacks(&node.take(1)),
        [vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]]
    );
    let state = disks.recover();
    let filters: Vec<&str> = state.sessions["keeper"]
        .subscriptions
        .keys()
        .map(|filter| &filter[..])
        .collect();
    assert_eq!(filters, ["allowed/+"], "the refused filter left no record");
}
