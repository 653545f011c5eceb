//! The bounds on what a peer can make a shard hold or do (issue 12): the CONNECT deadline and
//! size, the work of one SUBSCRIBE, the retained store, persistent sessions, what a claiming
//! connection buffers, restored records, and quoting peer input.

use super::*;
use crate::snapshot::{SavedDelivery, SavedInflight, SavedSession};

fn subscribe_many(packet_id: u16, filters: &[(&'static str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        properties: SubscribeProperties::default(),
        filters: filters
            .iter()
            .map(|&(filter, qos)| {
                (
                    ByteString::from_static(filter),
                    SubscriptionOptions::new(qos),
                )
            })
            .collect(),
    })
}

fn suback_reasons(packets: &[Packet]) -> Vec<ReasonCode> {
    match packets.first() {
        Some(Packet::SubAck(ack)) => ack.reasons.clone(),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn retained_publish(
    topic: &'static str,
    qos: QoS,
    packet_id: u16,
    payload: &'static [u8],
) -> Packet {
    let Packet::Publish(mut publish) = publish(topic, qos, packet_id, payload) else {
        unreachable!()
    };
    publish.retain = true;
    Packet::Publish(publish)
}

/// The route messages between shards in the log since `from`.
fn route_messages(node: &Node, from: usize) -> usize {
    node.log[from..]
        .iter()
        .filter(|line| line.contains("Route {"))
        .count()
}

/// Opens connection `id` on shard 0 of `node` (a 5.0 client) and hands it `bytes`, as they
/// are, without waiting for an answer.
pub(super) fn open_with_bytes(node: &mut Node, id: ConnectionId, bytes: Bytes) {
    node.versions.insert(id, V5);
    node.location.insert(id, 0);
    node.run(
        0,
        Input::Opened {
            connection: id,
            transport: Transport::default(),
        },
    );
    if !bytes.is_empty() {
        node.run(
            0,
            Input::Received {
                connection: id,
                bytes,
            },
        );
    }
}

#[test]
fn a_connection_without_connect_is_closed_at_the_deadline_and_one_with_connect_is_not() {
    let limits = Limits {
        connect_timeout_ms: 2_000,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    // A partial CONNECT: a fixed header and a few bytes of a larger body.
    open_with_bytes(&mut node, 1, Bytes::from_static(&[0x10, 0x20, 0x00, 0x04]));
    node.connect(2, 0, connect(V5, "prompt", true));
    node.advance(1_999);
    assert!(node.closed.is_empty(), "not before the deadline");
    node.advance(1);
    assert_eq!(
        node.closed,
        [1],
        "only the connection without CONNECT is closed"
    );
    assert!(node.take(1).is_empty(), "nothing is sent to it");
    assert_eq!(
        node.shards[0].timers.len(),
        0,
        "the deadline timers are gone"
    );
}

#[test]
fn a_connect_larger_than_its_limit_is_refused_from_the_fixed_header() {
    let limits = Limits {
        connect_packet_size_max: 1024,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    // Remaining length 2000 (0xD0 0x0F): 2003 bytes in all, over 1024, told by 3 bytes.
    open_with_bytes(&mut node, 1, Bytes::from_static(&[0x10, 0xD0, 0x0F]));
    assert_eq!(node.closed, [1]);
    // A CONNECT within it is accepted, and larger packets after it are fine.
    let connack = node.connect(2, 0, connect(V5, "small", true));
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    let payload: &'static [u8] = Box::leak(vec![7u8; 4096].into_boxed_slice());
    node.send(2, &publish("t", QoS::AtMostOnce, 0, payload));
    assert!(!node.closed.contains(&2));
}

#[test]
fn duplicate_filters_in_one_subscribe_are_taken_once_at_their_last_place() {
    let mut node = Node::new(2, Limits::default());
    node.connect(1, 0, connect(V5, "writer", true));
    node.send(1, &retained_publish("d/x", QoS::AtMostOnce, 0, b"kept"));
    node.connect(2, 0, connect(V5, "dup", true));
    let before = node.log.len();
    node.send(
        2,
        &subscribe_many(
            1,
            &[
                ("d/#", QoS::AtMostOnce),
                ("d/#", QoS::AtLeastOnce),
                ("e", QoS::AtMostOnce),
                ("d/#", QoS::AtLeastOnce),
            ],
        ),
    );
    let got = node.take(2);
    let granted_1 = ReasonCode::GRANTED_QOS_1;
    assert_eq!(
        suback_reasons(&got),
        [granted_1, granted_1, ReasonCode::SUCCESS, granted_1],
        "each place of a filter gets the reason of its last place"
    );
    assert_eq!(
        payloads(&got),
        [(&b"kept"[..], QoS::AtMostOnce)],
        "the retained message once"
    );
    // Two new filters, each told to both shards once.
    assert_eq!(route_messages(&node, before), 2 * 2);
    let dup = node.shards[0].client_ids["dup"];
    assert_eq!(node.shards[0].session(dup).subscriptions.len(), 2);

    // Subscribing again to a held filter replaces it in place: no route change at all.
    let before = node.log.len();
    node.send(
        2,
        &subscribe_many(2, &[("d/#", QoS::AtMostOnce), ("d/#", QoS::ExactlyOnce)]),
    );
    let got = node.take(2);
    assert_eq!(suback_reasons(&got), [ReasonCode::GRANTED_QOS_2; 2]);
    assert_eq!(
        route_messages(&node, before),
        0,
        "no remove and add for a held filter"
    );
    let held = node.shards[0].subscriptions.get("d/#");
    assert_eq!(held.len(), 1);
    assert_eq!(
        held[0].options.qos,
        QoS::ExactlyOnce,
        "the new options are in the trie"
    );
    node.send(1, &publish("d/y", QoS::ExactlyOnce, 1, b"live"));
    assert_eq!(payloads(&node.take(2)), [(&b"live"[..], QoS::ExactlyOnce)]);
}

#[test]
fn one_subscribe_is_bounded_in_filters_retained_messages_and_the_quota_stays_exact() {
    let limits = Limits {
        subscribe_filters_max: 4,
        retained_per_subscribe_max: 3,
        subscriptions_per_session_max: 2,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, connect(V5, "writer", true));
    for topic in ["r/1", "r/2", "r/3", "r/4", "r/5"] {
        node.send(1, &retained_publish(topic, QoS::AtMostOnce, 0, b"r"));
    }
    node.connect(2, 0, connect(V5, "greedy", true));
    node.send(
        2,
        &subscribe_many(
            1,
            &[
                ("r/#", QoS::AtMostOnce),
                ("r/#", QoS::AtMostOnce),
                ("r/+", QoS::AtMostOnce),
                ("s", QoS::AtMostOnce),
                ("t", QoS::AtMostOnce),
            ],
        ),
    );
    let got = node.take(2);
    assert_eq!(
        suback_reasons(&got),
        [
            ReasonCode::SUCCESS,
            ReasonCode::SUCCESS,
            ReasonCode::SUCCESS,
            ReasonCode::QUOTA_EXCEEDED, // the session's quota of 2 subscriptions
            ReasonCode::QUOTA_EXCEEDED, // past the 4 filters of one SUBSCRIBE
        ]
    );
    assert_eq!(
        publishes_in(&got).len(),
        3,
        "three retained messages for the whole SUBSCRIBE"
    );
    let session = node.shards[0].session(node.shards[0].client_ids["greedy"]);
    assert_eq!(session.subscriptions.len(), 2, "exactly the quota");
}

#[test]
fn a_full_retained_store_refuses_new_topics_with_quota_exceeded_and_routes_nothing() {
    let limits = Limits {
        retained_messages_max: 1,
        ..Limits::default()
    };
    let mut node = Node::new(2, limits);
    node.connect(1, 0, connect(V5, "reader", true));
    node.send(1, &subscribe(1, "#", QoS::AtLeastOnce));
    node.take(1);
    node.connect(2, 0, connect(V5, "writer", true));
    node.send(2, &retained_publish("a", QoS::AtLeastOnce, 1, b"1"));
    node.send(2, &retained_publish("b", QoS::AtLeastOnce, 2, b"2"));
    node.send(2, &retained_publish("a", QoS::AtLeastOnce, 3, b"3"));
    let acks: Vec<ReasonCode> = node
        .take(2)
        .iter()
        .filter_map(|packet| match packet {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        [
            ReasonCode::SUCCESS,
            ReasonCode::QUOTA_EXCEEDED,
            ReasonCode::SUCCESS
        ]
    );
    let got = node.take(1);
    let delivered: Vec<&[u8]> = payloads(&got).into_iter().map(|(p, _)| p).collect();
    assert_eq!(delivered, [b"1", b"3"], "the refused message is not routed");
    for shard in &node.shards {
        assert_eq!(shard.retained.len(), 1);
        assert_eq!(
            shard.retained.refused_count(),
            u64::from(shard.config.index == 0)
        );
    }
}

#[test]
fn a_new_persistent_session_past_the_shard_quota_is_refused() {
    let limits = Limits {
        persistent_sessions_per_shard_max: 1,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    assert_eq!(
        node.connect(1, 0, v5_persistent("first", 60)).reason,
        ReasonCode::SUCCESS
    );
    node.lose(1);
    let refused = node.connect(2, 0, v5_persistent("second", 60));
    assert_eq!(refused.reason, ReasonCode::QUOTA_EXCEEDED);
    assert!(node.closed.contains(&2));
    let refused = node.connect(3, 0, connect(V311, "third", false));
    assert_eq!(
        refused.reason.to_connack_return_code(),
        3,
        "Server unavailable for 3.1.1"
    );
    // Sessions that end with their connection, and the held session's own client, are fine.
    assert_eq!(
        node.connect(4, 0, connect(V5, "passing", true)).reason,
        ReasonCode::SUCCESS
    );
    let back = node.connect(5, 0, v5_persistent("first", 60));
    assert!(back.session_present);
    // A clean start replaces the held session with a new one: still one.
    node.lose(5);
    let mut fresh = v5_persistent("first", 60);
    fresh.clean_start = true;
    assert_eq!(node.connect(6, 0, fresh).reason, ReasonCode::SUCCESS);
    assert_eq!(node.shards[0].persistent_sessions, 1);
}

#[test]
fn stored_client_identifier_and_will_do_not_pin_the_receive_buffer() {
    let mut node = Node::new(1, Limits::default());
    let mut with_will = v5_persistent("pinned", 60);
    with_will.will = Some(Will {
        topic: ByteString::from_static("last/words"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    let mut buffer = BytesMut::new();
    mqtt::encode(&Packet::Connect(Box::new(with_will)), V5, &mut buffer);
    // Followed, in the same receive, by a large PUBLISH that is read after CONNECT.
    let big: &'static [u8] = Box::leak(vec![1u8; 32 * 1024].into_boxed_slice());
    let Packet::Publish(large) = publish("big", QoS::AtMostOnce, 0, big) else {
        unreachable!()
    };
    mqtt::encode(&Packet::Publish(large), V5, &mut buffer);
    let received = buffer.freeze();
    open_with_bytes(&mut node, 1, received.clone());
    let start = received.as_ptr() as usize;
    let inside = |at: *const u8| (start..start + received.len()).contains(&(at as usize));
    let shard = &node.shards[0];
    let session = shard.session(shard.client_ids["pinned"]);
    assert!(
        !inside(session.client_id.as_ptr()),
        "the client identifier is a copy"
    );
    let will = session.will.as_ref().expect("a will");
    assert!(
        !inside(will.message.topic.as_ptr()),
        "the will topic is a copy"
    );
    assert!(
        !inside(will.message.payload.as_ptr()),
        "the will payload is a copy"
    );
}

#[test]
fn bytes_sent_while_a_takeover_is_pending_are_bounded() {
    let limits = Limits {
        takeover_pending_bytes_max: 100,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.peer_up(2);
    open_with_bytes(&mut node, 1, Bytes::new());
    node.send(1, &Packet::Connect(Box::new(connect(V5, "moving", true))));
    assert!(node.take(1).is_empty(), "waiting for the other node");
    node.send(1, &Packet::PingReq);
    assert!(node.closed.is_empty(), "a little is kept");
    node.send(1, &publish("t", QoS::AtMostOnce, 0, &[0u8; 200]));
    let got = node.take(1);
    let [Packet::ConnAck(connack)] = got.as_slice() else {
        panic!("{got:?}")
    };
    assert_eq!(connack.reason, ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(node.closed, [1]);
    // The claim still completes (here by its timeout) without the connection.
    node.advance(5_000);
    assert!(node.shards[0].claims.is_empty());
    assert_eq!(node.shards[0].session_count(), 0);
}

#[test]
fn a_restored_session_is_held_to_the_expiry_cap_and_unique_packet_identifiers() {
    let limits = Limits {
        session_expiry_seconds_max: 10,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    let delivery = |payload: &'static [u8]| SavedDelivery {
        message: Message {
            topic: ByteString::from_static("t"),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            expires_at_ms: None,
            publisher: None,
        },
        subscription_identifiers: Vec::new(),
    };
    let inflight = |packet_id, payload| SavedInflight {
        packet_id,
        released: false,
        delivery: delivery(payload),
    };
    node.shards[0].restore_session(SavedSession {
        client_id: ByteString::from_static("saved"),
        version: V5,
        expiry_seconds: 3600,
        subscriptions: Vec::new(),
        inflight: vec![
            inflight(7, b"first"),
            inflight(7, b"again"),
            inflight(8, b"other"),
        ],
        queue: Vec::new(),
    });
    node.shards[0].check_invariants();
    let index = node.shards[0].client_ids["saved"];
    let session = node.shards[0].session(index);
    assert_eq!(session.expiry_seconds, 10, "capped at the maximum");
    let ids: Vec<u16> = session
        .inflight
        .iter()
        .map(|entry| entry.packet_id)
        .collect();
    assert_eq!(ids, [7, 8], "the duplicate identifier is skipped");
    assert_eq!(&session.inflight[0].message.payload[..], b"first");
    node.advance(10_000);
    assert_eq!(
        node.shards[0].session_count(),
        0,
        "expired at the capped interval"
    );
}

#[test]
fn a_reason_string_quotes_at_most_a_short_prefix_of_a_topic() {
    let limits = Limits {
        topic_levels_max: 3,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, connect(V5, "verbose", true));
    let topic: &'static str = Box::leak(format!("a/b/c/{}", "x".repeat(10_000)).into_boxed_str());
    node.send(1, &publish(topic, QoS::AtMostOnce, 0, b"deep"));
    let got = node.take(1);
    let [Packet::Disconnect(disconnect)] = got.as_slice() else {
        panic!("{got:?}")
    };
    let why = disconnect
        .properties
        .reason_string
        .as_deref()
        .expect("a reason string");
    assert!(why.len() < 100, "a short reason string: {why}");
    assert!(why.contains("a/b/c/xxx") && why.contains("..."), "{why}");
}

/// An unsolicited Handover (no claim of ours waits for it) as a peer node would send it.
fn late_handover(client_id: &'static str, expiry_seconds: u32) -> Input {
    let saved = crate::snapshot::SavedSession {
        client_id: ByteString::from_static(client_id),
        version: V5,
        expiry_seconds,
        subscriptions: Vec::new(),
        inflight: Vec::new(),
        queue: Vec::new(),
    };
    Input::Shard(ShardMessage::Session {
        node: 2,
        transfer: SessionTransfer::Handover {
            client_id: ByteString::from_static(client_id),
            shard: 0,
            claim: 999,
            session: Some(Bytes::from(crate::snapshot::encode(
                &[crate::snapshot::Record::Session(saved)],
                0,
            ))),
            completed: None,
        },
    })
}

#[test]
fn an_unsolicited_handover_is_kept_only_by_its_owner_shard_within_the_quota() {
    let limits = Limits {
        persistent_sessions_per_shard_max: 1,
        ..Limits::default()
    };
    let mut node = Node::new(2, limits);
    // Client identifiers owned by shard 0 and by shard 1.
    let ids: Vec<&'static str> = ["a", "b", "c", "d", "e", "f", "g", "h"]
        .into_iter()
        .collect();
    let on = |shard: u16| {
        ids.iter()
            .copied()
            .filter(|id| owner_shard(id, 2) == shard)
            .collect::<Vec<_>>()
    };
    let (zero, one) = (on(0), on(1));
    assert!(zero.len() >= 2 && !one.is_empty());
    // A session for shard 1's client sent to shard 0: not its own, dropped.
    node.run(0, late_handover(one[0], 60));
    assert_eq!(node.shards[0].session_count(), 0);
    // Its own client: kept, up to the quota.
    node.run(0, late_handover(zero[0], 60));
    assert_eq!(node.shards[0].session_count(), 1);
    node.run(0, late_handover(zero[1], 60));
    assert_eq!(node.shards[0].session_count(), 1, "past the quota: dropped");
}
