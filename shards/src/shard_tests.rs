//! Shard behaviour, driven in memory: a `Node` of shards routes outputs between them the way
//! the reactor does, and clients are byte streams encoded and decoded with the codec.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::HashMap;
use shardmq_net::mqtt::{
    self, Connect, ConnectProperties, DecodeOptions, Disconnect, Packet, ProtocolVersion, PubAck,
    Publish, PublishProperties, QoS, ReasonCode, Sender, Subscribe, SubscribeProperties,
    SubscriptionOptions, Will, WillProperties,
};

use super::*;

struct Node {
    shards: Vec<Shard>,
    /// Which shard holds each connection now.
    location: HashMap<ConnectionId, usize>,
    received: HashMap<ConnectionId, Vec<Packet>>,
    versions: HashMap<ConnectionId, ProtocolVersion>,
    closed: Vec<ConnectionId>,
    now_ms: u64,
}

impl Node {
    fn new(shard_count: u16, limits: Limits) -> Self {
        Self::with_strategy(shard_count, limits, SharedStrategy::RoundRobin)
    }

    fn with_strategy(shard_count: u16, limits: Limits, shared_strategy: SharedStrategy) -> Self {
        let shards = (0..shard_count)
            .map(|index| {
                Shard::new(ShardConfig {
                    index,
                    shard_count,
                    node: 0,
                    takeover_timeout_ms: 5_000,
                    limits: limits.clone(),
                    shared_strategy,
                })
            })
            .collect();
        Self {
            shards,
            location: HashMap::new(),
            received: HashMap::new(),
            versions: HashMap::new(),
            closed: Vec::new(),
            now_ms: 1_000,
        }
    }

    fn run(&mut self, shard: usize, input: Input) {
        let mut work = VecDeque::from([(shard, input)]);
        while let Some((shard, input)) = work.pop_front() {
            self.shards[shard].handle(self.now_ms, input);
            let mut outputs = Vec::new();
            self.shards[shard].take_outputs(&mut outputs);
            for output in outputs {
                match output {
                    Output::Send { connection, bytes } => self.decode_sent(connection, bytes),
                    Output::Close { connection } => {
                        self.location.remove(&connection);
                        self.closed.push(connection);
                    }
                    Output::HandOff {
                        connection,
                        shard,
                        bytes,
                    } => {
                        self.location.insert(connection, usize::from(shard));
                        work.push_back((usize::from(shard), Input::Opened { connection }));
                        work.push_back((usize::from(shard), Input::Received { connection, bytes }));
                    }
                    Output::ToShard { shard, message } => {
                        work.push_back((usize::from(shard), Input::Shard(message)))
                    }
                    // A node on its own: no cluster to tell or forward to.
                    Output::ToNode { .. }
                    | Output::SessionToNode { .. }
                    | Output::NodeRoute { .. }
                    | Output::Connect { .. } => {}
                }
            }
        }
    }

    fn decode_sent(&mut self, connection: ConnectionId, mut bytes: Bytes) {
        let version = self.versions[&connection];
        let options = DecodeOptions {
            version,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        while !bytes.is_empty() {
            let (packet, used) = mqtt::decode(&bytes, &options)
                .expect("the shard sends valid packets")
                .expect("whole packets");
            self.received.entry(connection).or_default().push(packet);
            bytes = bytes.slice(used..);
        }
    }

    /// Opens connection `id` on `shard` and sends `connect`.
    fn connect(&mut self, id: ConnectionId, shard: usize, connect: Connect) -> ConnAck {
        self.versions.insert(id, connect.protocol);
        self.location.insert(id, shard);
        self.run(shard, Input::Opened { connection: id });
        self.send(id, &Packet::Connect(Box::new(connect)));
        let mut packets = self.take(id);
        assert!(!packets.is_empty(), "no answer to CONNECT");
        let Packet::ConnAck(connack) = packets.remove(0) else {
            panic!("expected CONNACK first, got {packets:?}");
        };
        // What followed CONNACK in the same batch stays for the test to take.
        if !packets.is_empty() {
            self.received.insert(id, packets);
        }
        *connack
    }

    fn send(&mut self, id: ConnectionId, packet: &Packet) {
        let mut buf = BytesMut::new();
        mqtt::encode(packet, self.versions[&id], &mut buf);
        let shard = *self.location.get(&id).expect("an open connection");
        self.run(
            shard,
            Input::Received {
                connection: id,
                bytes: buf.freeze(),
            },
        );
    }

    fn take(&mut self, id: ConnectionId) -> Vec<Packet> {
        self.received.remove(&id).unwrap_or_default()
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        for shard in 0..self.shards.len() {
            self.run(shard, Input::Tick);
        }
    }

    fn lose(&mut self, id: ConnectionId) {
        let shard = self.location.remove(&id).expect("an open connection");
        self.run(shard, Input::Closed { connection: id });
    }
}

fn connect(version: ProtocolVersion, client_id: &'static str, clean_start: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start,
        keep_alive_seconds: 0,
        properties: ConnectProperties::default(),
        client_id: ByteString::from_static(client_id),
        will: None,
        username: None,
        password: None,
    }
}

fn subscribe(packet_id: u16, filter: &'static str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        properties: SubscribeProperties::default(),
        filters: vec![(
            ByteString::from_static(filter),
            SubscriptionOptions::new(qos),
        )],
    })
}

fn publish(topic: &'static str, qos: QoS, packet_id: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: ByteString::from_static(topic),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::from_static(payload),
    })
}

/// The PUBLISH packets among `packets`.
fn publishes_in(packets: &[Packet]) -> Vec<&Publish> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::Publish(publish) => Some(publish),
            _ => None,
        })
        .collect()
}

fn payloads(packets: &[Packet]) -> Vec<(&[u8], QoS)> {
    publishes_in(packets)
        .into_iter()
        .map(|publish| (&publish.payload[..], publish.qos))
        .collect()
}

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

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
fn persistent_session_queues_while_offline_and_resends_unacknowledged_with_dup() {
    let mut node = Node::new(2, Limits::default());
    node.connect(1, 0, connect(V311, "keeper", false));
    node.send(1, &subscribe(1, "t", QoS::AtLeastOnce));
    node.connect(2, 1, connect(V311, "sender", true));
    node.send(2, &publish("t", QoS::AtLeastOnce, 1, b"first"));
    assert_eq!(payloads(&node.take(1)), [(&b"first"[..], QoS::AtLeastOnce)]);
    // Not acknowledged; the connection drops; more arrives while offline.
    node.lose(1);
    node.send(2, &publish("t", QoS::AtLeastOnce, 2, b"second"));
    node.send(2, &publish("t", QoS::AtMostOnce, 0, b"qos0-dropped"));
    let connack = node.connect(3, 1, connect(V311, "keeper", false));
    assert!(connack.session_present);
    let resumed = node.take(3);
    let publishes: Vec<&Publish> = publishes_in(&resumed);
    assert_eq!(publishes.len(), 2, "{resumed:?}");
    assert!(publishes[0].dup && &publishes[0].payload[..] == b"first");
    assert!(!publishes[1].dup && &publishes[1].payload[..] == b"second");
}

#[test]
fn clean_start_discards_the_session_and_takeover_closes_the_old_connection() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "dup", false));
    node.send(1, &subscribe(1, "x", QoS::AtMostOnce));
    node.take(1);
    let connack = node.connect(2, 0, connect(V5, "dup", false));
    assert!(connack.session_present);
    assert!(
        matches!(node.take(1).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::SESSION_TAKEN_OVER)
    );
    assert!(node.closed.contains(&1));
    let connack = node.connect(3, 0, connect(V5, "dup", true));
    assert!(!connack.session_present);
    node.connect(4, 0, connect(V5, "pub", true));
    node.send(4, &publish("x", QoS::AtMostOnce, 0, b"gone"));
    assert!(
        payloads(&node.take(3)).is_empty(),
        "the clean start dropped the subscription"
    );
}

#[test]
fn will_is_published_on_loss_not_on_normal_disconnect_and_after_its_delay() {
    let mut node = Node::new(2, Limits::default());
    node.connect(1, 0, connect(V5, "watcher", true));
    node.send(1, &subscribe(1, "wills/#", QoS::AtLeastOnce));
    node.take(1);
    let with_will = |client_id, delay| Connect {
        will: Some(Will {
            topic: ByteString::from_static("wills/x"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: delay,
                ..WillProperties::default()
            },
        }),
        properties: ConnectProperties {
            session_expiry_interval: Some(60),
            ..ConnectProperties::default()
        },
        ..connect(V5, client_id, true)
    };
    node.connect(2, 0, with_will("normal", None));
    node.send(2, &Packet::Disconnect(Disconnect::default()));
    node.connect(3, 0, with_will("lost", None));
    node.lose(3);
    node.connect(4, 0, with_will("delayed", Some(5)));
    node.lose(4);
    assert_eq!(
        payloads(&node.take(1)).len(),
        1,
        "only the lost connection's will so far"
    );
    node.advance(4_000);
    assert!(payloads(&node.take(1)).is_empty());
    node.advance(1_500);
    assert_eq!(
        payloads(&node.take(1)).len(),
        1,
        "the delayed will after 5 s"
    );
}

#[test]
fn keep_alive_timeout_after_one_and_a_half_intervals() {
    let mut node = Node::new(1, Limits::default());
    node.connect(
        1,
        0,
        Connect {
            keep_alive_seconds: 10,
            ..connect(V5, "sleepy", true)
        },
    );
    node.advance(14_000);
    assert!(node.take(1).is_empty());
    node.advance(1_500);
    assert!(
        matches!(node.take(1).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::KEEP_ALIVE_TIMEOUT)
    );
    assert!(node.closed.contains(&1));
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
fn bad_input_closes_only_that_connection_with_the_reason() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "good", true));
    node.send(1, &subscribe(1, "x", QoS::AtMostOnce));
    node.take(1);
    node.connect(2, 0, connect(V5, "bad", true));
    // PUBLISH with QoS 3.
    node.run(
        0,
        Input::Received {
            connection: 2,
            bytes: Bytes::from_static(b"\x36\x07\x00\x01x\x00\x01\x00z"),
        },
    );
    assert!(
        matches!(node.take(2).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::MALFORMED_PACKET)
    );
    assert!(node.closed.contains(&2));
    node.connect(3, 0, connect(V5, "other", true));
    node.send(3, &publish("x", QoS::AtMostOnce, 0, b"still"));
    assert_eq!(payloads(&node.take(1)).len(), 1);
}

#[test]
fn empty_client_id_is_assigned_on_v5_and_refused_for_a_persistent_v311_session() {
    let mut node = Node::new(4, Limits::default());
    let connack = node.connect(1, 2, connect(V5, "", true));
    let assigned = connack
        .properties
        .assigned_client_identifier
        .expect("an assigned identifier");
    assert_eq!(
        owner_shard(&assigned, 4),
        2,
        "assigned on the accepting shard"
    );
    let connack = node.connect(2, 0, connect(V311, "", false));
    assert_eq!(connack.reason, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    assert!(node.closed.contains(&2));
}

fn v5_persistent(client_id: &'static str, expiry: u32) -> Connect {
    Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..ConnectProperties::default()
        },
        ..connect(V5, client_id, false)
    }
}

#[test]
fn session_expiry_keeps_the_session_until_the_interval_passes() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, v5_persistent("expiring", 2));
    node.send(1, &subscribe(1, "e", QoS::AtLeastOnce));
    node.lose(1);
    node.advance(1_000);
    assert!(
        node.connect(2, 0, v5_persistent("expiring", 2))
            .session_present
    );
    node.lose(2);
    node.advance(2_500);
    assert!(
        !node
            .connect(3, 0, v5_persistent("expiring", 2))
            .session_present,
        "expired after 2 s"
    );
    assert_eq!(node.shards[0].session_count(), 1);
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
fn authentication_method_is_refused_as_unsupported() {
    let mut node = Node::new(1, Limits::default());
    let connack = node.connect(
        1,
        0,
        Connect {
            properties: ConnectProperties {
                authentication_method: Some(ByteString::from_static("SCRAM-SHA-1")),
                ..ConnectProperties::default()
            },
            ..connect(V5, "authenticator", true)
        },
    );
    assert_eq!(connack.reason, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert!(node.closed.contains(&1));
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
fn subscription_limit_and_topic_levels_are_enforced_with_reason_codes() {
    let limits = Limits {
        subscriptions_per_session_max: 2,
        topic_levels_max: 3,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, connect(V5, "greedy", true));
    node.send(
        1,
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: SubscribeProperties::default(),
            filters: ["a", "b", "c", "a/b/c/d"]
                .iter()
                .map(|f| {
                    (
                        ByteString::from_static(f),
                        SubscriptionOptions::new(QoS::AtLeastOnce),
                    )
                })
                .collect(),
        }),
    );
    let Some(Packet::SubAck(ack)) = node.take(1).into_iter().next() else {
        panic!("SUBACK")
    };
    assert_eq!(
        ack.reasons,
        [
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::QUOTA_EXCEEDED,
            ReasonCode::TOPIC_FILTER_INVALID
        ]
    );
    node.send(1, &publish("a/b/c/d", QoS::AtMostOnce, 0, b"deep"));
    let got = node.take(1);
    let [Packet::Disconnect(disconnect)] = got.as_slice() else {
        panic!("{got:?}")
    };
    assert_eq!(disconnect.reason, ReasonCode::TOPIC_NAME_INVALID);
    assert!(
        disconnect
            .properties
            .reason_string
            .as_deref()
            .is_some_and(|why| why.contains("a/b/c/d"))
    );
}

#[test]
fn protocol_errors_name_the_rule_and_response_information_is_given_on_request() {
    let mut node = Node::new(1, Limits::default());
    let connack = node.connect(
        1,
        0,
        Connect {
            properties: ConnectProperties {
                request_response_information: Some(true),
                ..ConnectProperties::default()
            },
            ..connect(V5, "asker", true)
        },
    );
    assert_eq!(
        connack.properties.response_information.as_deref(),
        Some("reply/asker")
    );
    // PUBLISH QoS 1 with packet identifier 0.
    node.run(
        0,
        Input::Received {
            connection: 1,
            bytes: Bytes::from_static(b"\x32\x06\x00\x01t\x00\x00\x00"),
        },
    );
    let got = node.take(1);
    let [Packet::Disconnect(disconnect)] = got.as_slice() else {
        panic!("{got:?}")
    };
    assert_eq!(disconnect.reason, ReasonCode::PROTOCOL_ERROR);
    assert_eq!(
        disconnect.properties.reason_string.as_deref(),
        Some("[MQTT-2.2.1-3] Packet Identifier of 0")
    );
}

#[test]
fn snapshot_restores_sessions_queues_and_retained_under_a_new_shard_count() {
    let mut node = Node::new(2, Limits::default());
    node.connect(1, 0, v5_persistent("keeper", 3600));
    node.send(1, &subscribe(1, "keep/#", QoS::AtLeastOnce));
    node.lose(1);
    node.connect(2, 0, connect(V5, "writer", true));
    let Packet::Publish(mut retained) = publish("keep/state", QoS::AtLeastOnce, 1, b"retained")
    else {
        unreachable!()
    };
    retained.retain = true;
    node.send(2, &Packet::Publish(retained));
    node.send(2, &publish("keep/q", QoS::AtLeastOnce, 2, b"queued"));
    node.run(0, Input::Shutdown);
    node.run(1, Input::Shutdown);
    let files: Vec<Vec<u8>> = node.shards.iter().map(Shard::snapshot).collect();

    let mut restarted = Node::new(3, Limits::default());
    let (mut sessions, mut retained) = (0, 0);
    for shard in &mut restarted.shards {
        for file in &files {
            let (s, r, warning) = shard.restore(file).unwrap();
            assert_eq!(warning, None);
            sessions += s;
            retained += r;
        }
    }
    assert_eq!(sessions, 1, "the persistent session, on its new owner only");
    assert_eq!(
        retained, 3,
        "each of 3 shards loads the one retained message"
    );
    // Route deltas from the restore reach every shard.
    for shard in 0..3 {
        restarted.run(shard, Input::Tick);
    }
    let connack = restarted.connect(10, 1, v5_persistent("keeper", 3600));
    assert!(connack.session_present);
    let got = restarted.take(10);
    assert_eq!(
        payloads(&got),
        [
            (&b"retained"[..], QoS::AtLeastOnce),
            (b"queued", QoS::AtLeastOnce)
        ],
        "{got:?}"
    );
    restarted.connect(11, 2, connect(V5, "late", true));
    restarted.send(11, &subscribe(1, "keep/state", QoS::AtMostOnce));
    assert_eq!(
        payloads(&restarted.take(11)),
        [(&b"retained"[..], QoS::AtMostOnce)]
    );
    // And the restored subscription routes new messages across shards.
    restarted.connect(12, 0, connect(V5, "writer2", true));
    restarted.send(12, &publish("keep/new", QoS::AtLeastOnce, 1, b"after"));
    assert_eq!(
        payloads(&restarted.take(10)),
        [(&b"after"[..], QoS::AtLeastOnce)]
    );
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
fn server_keep_alive_caps_the_clients_value() {
    let limits = Limits {
        keep_alive_seconds_max: 30,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    let connack = node.connect(
        1,
        0,
        Connect {
            keep_alive_seconds: 0,
            ..connect(V5, "forever", true)
        },
    );
    assert_eq!(
        connack.properties.server_keep_alive,
        Some(30),
        "0 (no keep alive) is capped"
    );
    let connack = node.connect(
        2,
        0,
        Connect {
            keep_alive_seconds: 10,
            ..connect(V5, "modest", true)
        },
    );
    assert_eq!(
        connack.properties.server_keep_alive, None,
        "within the cap: the client's own value"
    );
    // The capped connection is held to 30 s: closed after 45 s of silence.
    node.advance(44_000);
    assert!(!node.closed.contains(&1));
    node.advance(2_000);
    assert!(node.closed.contains(&1));
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
