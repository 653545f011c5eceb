//! Publishing and delivery: routing across shards, shared groups, retained messages, QoS,
//! flow control and queue limits.

use super::*;

#[test]
fn publish_reaches_a_subscriber_on_another_shard_once_per_qos() {
    let mut node = Node::new(4, Limits::default());
    // Client ids chosen so that the two sessions live on different shards.
    let (subscriber, publisher) = ("sub-1", "pub-7");
    assert_ne!(owner_shard(subscriber, 4), owner_shard(publisher, 4));
    assert_eq!(
        node.connect(1, 0, connect(V5, subscriber, true)).reason,
        ReasonCode::SUCCESS
    );
    node.send(1, &subscribe(1, "a/+", QoS::ExactlyOnce));
    assert!(
        matches!(node.take(1).as_slice(), [Packet::SubAck(ack)] if ack.reasons == [ReasonCode::GRANTED_QOS_2])
    );
    node.connect(2, 0, connect(V311, publisher, true));
    node.send(2, &publish("a/b", QoS::AtMostOnce, 0, b"zero"));
    node.send(2, &publish("a/b", QoS::AtLeastOnce, 1, b"one"));
    node.send(2, &publish("a/b", QoS::ExactlyOnce, 2, b"two"));
    // A resent QoS 2 PUBLISH before PUBREL must not be delivered again.
    node.send(2, &publish("a/b", QoS::ExactlyOnce, 2, b"two"));
    node.send(2, &Packet::PubRel(PubAck::new(2)));
    let acks = node.take(2);
    assert!(
        matches!(
            acks.as_slice(),
            [
                Packet::PubAck(_),
                Packet::PubRec(_),
                Packet::PubRec(_),
                Packet::PubComp(_)
            ]
        ),
        "{acks:?}"
    );
    let delivered = node.take(1);
    assert_eq!(
        payloads(&delivered),
        [
            (&b"zero"[..], QoS::AtMostOnce),
            (b"one", QoS::AtLeastOnce),
            (b"two", QoS::ExactlyOnce)
        ]
    );
}

#[test]
fn shared_subscription_delivers_each_message_to_one_member_across_shards() {
    let mut node = Node::new(3, Limits::default());
    let members = ["m-a", "m-b", "m-c", "m-d"];
    for (index, member) in members.iter().enumerate() {
        let id = index as ConnectionId + 1;
        node.connect(id, 0, connect(V5, member, true));
        node.send(id, &subscribe(1, "$share/g/jobs/+", QoS::AtLeastOnce));
        node.take(id);
    }
    node.connect(9, 0, connect(V5, "producer", true));
    for _ in 0..40 {
        node.send(9, &publish("jobs/1", QoS::AtMostOnce, 0, b"job"));
    }
    let counts: Vec<usize> = (1..=4).map(|id| payloads(&node.take(id)).len()).collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        40,
        "each message to exactly one member: {counts:?}"
    );
    assert!(
        counts.iter().filter(|&&count| count > 0).count() >= 2,
        "spread over members: {counts:?}"
    );
}

#[test]
fn retained_message_is_sent_on_subscribe_and_cleared_by_an_empty_payload() {
    let mut node = Node::new(2, Limits::default());
    node.connect(1, 0, connect(V311, "retainer", true));
    let retained = |payload: &'static [u8]| {
        Packet::Publish(Publish {
            retain: true,
            ..match publish("r/t", QoS::AtLeastOnce, 1, payload) {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        })
    };
    node.send(1, &retained(b"state"));
    node.connect(2, 1, connect(V311, "late", true));
    node.send(2, &subscribe(1, "r/#", QoS::AtMostOnce));
    let got = node.take(2);
    assert!(
        matches!(got.as_slice(), [Packet::SubAck(_), Packet::Publish(p)] if p.retain && &p.payload[..] == b"state" && p.qos == QoS::AtMostOnce),
        "{got:?}"
    );
    node.send(1, &retained(b""));
    node.connect(3, 0, connect(V311, "later", true));
    node.send(3, &subscribe(1, "r/#", QoS::AtMostOnce));
    assert!(payloads(&node.take(3)).is_empty());
}

#[test]
fn overlapping_subscriptions_give_one_copy_at_the_highest_qos_with_all_identifiers() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "overlap", true));
    for (packet_id, filter, qos, identifier) in [
        (1, "a/#", QoS::AtMostOnce, 1),
        (2, "a/+", QoS::AtLeastOnce, 2),
    ] {
        node.send(
            1,
            &Packet::Subscribe(Subscribe {
                packet_id,
                properties: SubscribeProperties {
                    subscription_identifier: Some(identifier),
                    ..SubscribeProperties::default()
                },
                filters: vec![(
                    ByteString::from_static(filter),
                    SubscriptionOptions::new(qos),
                )],
            }),
        );
    }
    node.take(1);
    node.send(1, &publish("a/b", QoS::ExactlyOnce, 7, b"m"));
    let got = node.take(1);
    let publishes: Vec<&Publish> = publishes_in(&got);
    assert_eq!(publishes.len(), 1);
    assert_eq!(publishes[0].qos, QoS::AtLeastOnce);
    let mut identifiers = publishes[0].properties.subscription_identifiers.clone();
    identifiers.sort_unstable();
    assert_eq!(identifiers, [1, 2]);
}

#[test]
fn no_local_and_topic_alias_and_flow_control() {
    let limits = Limits {
        inflight_per_session_max: 2,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, connect(V5, "self", true));
    let mut options = SubscriptionOptions::new(QoS::AtLeastOnce);
    options.no_local = true;
    node.send(
        1,
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: SubscribeProperties::default(),
            filters: vec![(ByteString::from_static("loop"), options)],
        }),
    );
    node.send(1, &publish("loop", QoS::AtMostOnce, 0, b"echo"));
    assert!(payloads(&node.take(1)).is_empty(), "No Local");
    // Topic alias: set, then use with an empty topic.
    node.connect(2, 0, connect(V5, "aliaser", true));
    node.send(2, &subscribe(1, "long/topic/name", QoS::AtLeastOnce));
    node.take(2);
    let mut first = match publish("long/topic/name", QoS::AtLeastOnce, 1, b"1") {
        Packet::Publish(p) => p,
        _ => unreachable!(),
    };
    first.properties.topic_alias = Some(3);
    node.send(2, &Packet::Publish(first.clone()));
    let mut second = first.clone();
    second.topic = ByteString::new();
    second.packet_id = 2;
    second.payload = Bytes::from_static(b"2");
    node.send(2, &Packet::Publish(second.clone()));
    third_is_window_limited(&mut node);
}

fn third_is_window_limited(node: &mut Node) {
    // Two in flight at most: the third waits until one is acknowledged.
    let mut third = match publish("long/topic/name", QoS::AtLeastOnce, 3, b"3") {
        Packet::Publish(p) => p,
        _ => unreachable!(),
    };
    third.properties.topic_alias = None;
    node.send(2, &Packet::Publish(third));
    let got = node.take(2);
    let delivered: Vec<(u16, &[u8])> = got
        .iter()
        .filter_map(|p| {
            if let Packet::Publish(p) = p {
                Some((p.packet_id, &p.payload[..]))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        delivered.iter().map(|d| d.1).collect::<Vec<_>>(),
        [&b"1"[..], b"2"],
        "{got:?}"
    );
    node.send(2, &Packet::PubAck(PubAck::new(delivered[0].0)));
    assert_eq!(payloads(&node.take(2)), [(&b"3"[..], QoS::AtLeastOnce)]);
}

#[test]
fn message_expiry_drops_stale_messages_and_counts_down() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, v5_persistent("offline", 60));
    node.send(1, &subscribe(1, "x/+", QoS::AtLeastOnce));
    node.lose(1);
    node.connect(2, 0, connect(V5, "sender", true));
    let expiring = |topic: &'static str, seconds| {
        let Packet::Publish(mut publish) = publish(topic, QoS::AtLeastOnce, 1, b"m") else {
            unreachable!()
        };
        publish.properties.message_expiry_interval = Some(seconds);
        Packet::Publish(publish)
    };
    node.send(2, &expiring("x/short", 1));
    node.send(2, &expiring("x/long", 10));
    node.advance(3_000);
    node.connect(3, 0, v5_persistent("offline", 60));
    let got = node.take(3);
    let publishes: Vec<&Publish> = publishes_in(&got);
    assert_eq!(publishes.len(), 1, "the 1 s message expired: {got:?}");
    assert_eq!(&publishes[0].topic[..], "x/long");
    assert_eq!(
        publishes[0].properties.message_expiry_interval,
        Some(7),
        "10 s less the 3 s spent queued"
    );
}

#[test]
fn messages_larger_than_the_clients_maximum_packet_size_are_not_sent() {
    let mut node = Node::new(1, Limits::default());
    node.connect(
        1,
        0,
        Connect {
            properties: ConnectProperties {
                maximum_packet_size: Some(40),
                ..ConnectProperties::default()
            },
            ..connect(V5, "small", true)
        },
    );
    node.send(1, &subscribe(1, "s", QoS::AtLeastOnce));
    node.take(1);
    node.connect(2, 0, connect(V5, "big-sender", true));
    node.send(2, &publish("s", QoS::AtLeastOnce, 1, &[7; 100]));
    node.send(2, &publish("s", QoS::AtLeastOnce, 2, b"fits"));
    assert_eq!(payloads(&node.take(1)), [(&b"fits"[..], QoS::AtLeastOnce)]);
}

#[test]
fn full_queue_drops_the_oldest_message() {
    let limits = Limits {
        queued_messages_per_session_max: 3,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, connect(V311, "slow", false));
    node.send(1, &subscribe(1, "q", QoS::AtLeastOnce));
    node.lose(1);
    node.connect(2, 0, connect(V311, "fast", true));
    for payload in [b"1", b"2", b"3", b"4", b"5"] {
        node.send(2, &publish("q", QoS::AtLeastOnce, 1, payload));
    }
    node.connect(3, 0, connect(V311, "slow", false));
    let packets = node.take(3);
    let got: Vec<&[u8]> = payloads(&packets)
        .into_iter()
        .map(|(payload, _)| payload)
        .collect();
    assert_eq!(got, [&b"3"[..], b"4", b"5"]);
}

#[test]
fn client_id_hash_sends_each_publishers_messages_to_one_member() {
    let mut node = Node::with_strategy(3, Limits::default(), SharedStrategy::ClientIdHash);
    for (index, member) in ["h-a", "h-b", "h-c", "h-d"].iter().enumerate() {
        let id = index as ConnectionId + 1;
        node.connect(id, 0, connect(V5, member, true));
        node.send(id, &subscribe(1, "$share/g/work/#", QoS::AtLeastOnce));
        node.take(id);
    }
    let mut chosen = Vec::new();
    for (publisher_id, publisher) in [(20, "producer-a"), (21, "producer-b"), (22, "producer-c")] {
        node.connect(publisher_id, 0, connect(V5, publisher, true));
        for _ in 0..20 {
            node.send(publisher_id, &publish("work/x", QoS::AtMostOnce, 0, b"w"));
        }
        let counts: Vec<usize> = (1..=4).map(|id| payloads(&node.take(id)).len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 20);
        assert_eq!(
            counts.iter().filter(|&&c| c > 0).count(),
            1,
            "{publisher}: one member gets all: {counts:?}"
        );
        chosen.push(counts.iter().position(|&c| c > 0));
    }
    // The same publisher is sent to the same member again.
    node.send(20, &publish("work/x", QoS::AtMostOnce, 0, b"again"));
    let again: Vec<usize> = (1..=4).map(|id| payloads(&node.take(id)).len()).collect();
    assert_eq!(again.iter().position(|&c| c > 0), chosen[0]);
}

#[test]
fn maximum_qos_is_granted_and_enforced() {
    let limits = Limits {
        qos_max: QoS::AtLeastOnce,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    let connack = node.connect(1, 0, connect(V5, "limited", true));
    assert_eq!(connack.properties.maximum_qos, Some(1));
    node.send(1, &subscribe(1, "q", QoS::ExactlyOnce));
    assert!(
        matches!(node.take(1).as_slice(), [Packet::SubAck(ack)] if ack.reasons == [ReasonCode::GRANTED_QOS_1])
    );
    node.send(1, &publish("q", QoS::ExactlyOnce, 1, b"too high"));
    let got = node.take(1);
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::QOS_NOT_SUPPORTED),
        "{got:?}"
    );
}

#[test]
fn retained_messages_expire() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "ephemeral", true));
    let Packet::Publish(mut retained) = publish("r/e", QoS::AtMostOnce, 0, b"soon gone") else {
        unreachable!()
    };
    retained.retain = true;
    retained.properties.message_expiry_interval = Some(1);
    node.send(1, &Packet::Publish(retained));
    node.send(1, &subscribe(1, "r/#", QoS::AtMostOnce));
    assert_eq!(payloads(&node.take(1)).len(), 1, "still there at once");
    node.advance(1_500);
    node.connect(2, 0, connect(V5, "later", true));
    node.send(2, &subscribe(1, "r/#", QoS::AtMostOnce));
    assert!(payloads(&node.take(2)).is_empty(), "expired after 1 s");
}
