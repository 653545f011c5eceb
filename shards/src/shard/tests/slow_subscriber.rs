//! A subscriber that does not read: the unsent bound per connection, what happens to QoS 0
//! and QoS 1 messages at it, the drain once the client reads again, and the disconnect of a
//! connection that stays stuck; also the one writer's Maximum Packet Size rule.

use super::*;

/// A bound that a handful of 100-byte messages reach, and a short stuck timeout.
fn slow_limits() -> Limits {
    Limits {
        unsent_bytes_per_connection_max: 1_000,
        send_stuck_timeout_ms: 2_000,
        ..Limits::default()
    }
}

const PAYLOAD: &[u8] = &[b'x'; 100];

/// A 5.0 subscriber `1` of `t` at `qos` that has stopped reading, and a publisher `2`.
fn stalled_subscriber(limits: Limits, qos: QoS) -> Node {
    let mut node = Node::new(1, limits);
    node.connect(1, 0, connect(V5, "slow", true));
    node.send(1, &subscribe(1, "t", qos));
    node.take(1);
    node.stall(1);
    node.connect(2, 0, connect(V311, "publisher", true));
    node
}

fn unsent_bytes(node: &Node, id: ConnectionId) -> usize {
    node.shards[0].connections[&id].unsent_bytes()
}

fn queued(node: &Node, client_id: &str) -> usize {
    let shard = &node.shards[0];
    let index = shard.client_ids[client_id];
    shard.session(index).queue.len()
}

#[test]
fn qos0_past_the_unsent_bound_is_dropped_and_counted() {
    let mut node = stalled_subscriber(slow_limits(), QoS::AtMostOnce);
    for _ in 0..50 {
        node.send(2, &publish("t", QoS::AtMostOnce, 0, PAYLOAD));
    }
    let handed_out = publishes_in(&node.take(1)).len();
    // Messages go while the unsent bytes are below 1000: about nine of 100 bytes and more.
    assert!(
        (8..=11).contains(&handed_out),
        "{handed_out} messages handed out"
    );
    assert_eq!(
        node.shards[0].dropped_over_bound_count(),
        (50 - handed_out) as u64
    );
    assert!(unsent_bytes(&node, 1) < 1_000 + 200);
    // Nothing of QoS 0 waits in the session either: the memory is bounded by the limit.
    assert_eq!(queued(&node, "slow"), 0);
    // Once the client reads, messages flow again.
    node.resume(1);
    node.send(2, &publish("t", QoS::AtMostOnce, 0, b"after"));
    assert_eq!(payloads(&node.take(1)), [(&b"after"[..], QoS::AtMostOnce)]);
    assert!(!node.closed.contains(&1));
}

#[test]
fn qos1_past_the_unsent_bound_waits_in_the_queue_and_drains_in_order() {
    let mut node = stalled_subscriber(slow_limits(), QoS::AtLeastOnce);
    for sequence in 0..30u16 {
        let mut payload = PAYLOAD.to_vec();
        payload[..2].copy_from_slice(&sequence.to_be_bytes());
        node.send(
            2,
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: ByteString::from_static("t"),
                packet_id: sequence + 1,
                properties: PublishProperties::default(),
                payload: Bytes::from(payload),
            }),
        );
    }
    let first = node.take(1);
    let first_count = publishes_in(&first).len();
    assert!((8..=11).contains(&first_count), "{first_count} handed out");
    // The rest waits in the session's queue (the window of 64 is not what holds them).
    assert_eq!(queued(&node, "slow"), 30 - first_count);
    assert_eq!(node.shards[0].dropped_over_bound_count(), 0);
    // The client reads: the queue drains, every message once, in order.
    node.resume(1);
    let mut all = first;
    all.extend(node.take(1));
    let sequences: Vec<u16> = publishes_in(&all)
        .iter()
        .map(|publish| u16::from_be_bytes([publish.payload[0], publish.payload[1]]))
        .collect();
    assert_eq!(sequences, (0..30).collect::<Vec<u16>>());
    assert_eq!(queued(&node, "slow"), 0);
    assert!(!node.closed.contains(&1));
}

#[test]
fn a_connection_stuck_past_the_bound_for_the_timeout_is_disconnected_with_quota_exceeded() {
    let mut node = stalled_subscriber(slow_limits(), QoS::AtMostOnce);
    for _ in 0..20 {
        node.send(2, &publish("t", QoS::AtMostOnce, 0, PAYLOAD));
    }
    node.take(1);
    node.advance(1_999);
    assert!(!node.closed.contains(&1), "closed before the stuck timeout");
    node.advance(1);
    assert!(
        node.closed.contains(&1),
        "still open after the stuck timeout"
    );
    let packets = node.take(1);
    assert!(
        matches!(packets.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::QUOTA_EXCEEDED),
        "{packets:?}"
    );
    // The publisher is untouched.
    node.send(2, &Packet::PingReq);
    assert_eq!(node.take(2), [Packet::PingResp]);
}

#[test]
fn a_connection_that_falls_below_the_bound_in_time_is_not_disconnected() {
    let mut node = stalled_subscriber(slow_limits(), QoS::AtMostOnce);
    for _ in 0..20 {
        node.send(2, &publish("t", QoS::AtMostOnce, 0, PAYLOAD));
    }
    node.advance(1_500);
    // The socket takes part of the backlog: below the bound, the stuck timer stops.
    let shard = node.location[&1];
    node.run(
        shard,
        Input::Sent {
            connection: 1,
            unsent_bytes: 500,
        },
    );
    assert_eq!(unsent_bytes(&node, 1), 500);
    node.advance(5_000);
    assert!(!node.closed.contains(&1));
    // Stuck again (more messages, nothing read): the timeout counts from then.
    for _ in 0..20 {
        node.send(2, &publish("t", QoS::AtMostOnce, 0, PAYLOAD));
    }
    node.advance(1_999);
    assert!(!node.closed.contains(&1));
    node.advance(1);
    assert!(node.closed.contains(&1));
}

#[test]
fn a_queue_waiting_on_the_bound_is_kept_while_offline_and_sent_on_resume() {
    let limits = Limits {
        unsent_bytes_per_connection_max: 1_000,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, v5_persistent("slow", 600));
    node.send(1, &subscribe(1, "t", QoS::AtLeastOnce));
    node.take(1);
    node.stall(1);
    node.connect(2, 0, connect(V311, "publisher", true));
    for packet_id in 1..=20 {
        node.send(2, &publish("t", QoS::AtLeastOnce, packet_id, PAYLOAD));
    }
    let first = publishes_in(&node.take(1)).len();
    assert_eq!(queued(&node, "slow"), 20 - first);
    node.lose(1);
    // A new connection of the session starts with no backlog: the in-flight messages go
    // again and the queue after them.
    node.connect(3, 0, v5_persistent("slow", 600));
    let resumed = node.take(3);
    assert_eq!(publishes_in(&resumed).len(), 20);
    assert_eq!(queued(&node, "slow"), 0);
}

#[test]
fn publish_larger_than_the_clients_maximum_is_dropped_and_counted() {
    let mut node = Node::new(1, Limits::default());
    node.connect(
        1,
        0,
        Connect {
            properties: ConnectProperties {
                maximum_packet_size: Some(60),
                ..ConnectProperties::default()
            },
            ..connect(V5, "small", true)
        },
    );
    node.send(1, &subscribe(1, "s", QoS::AtMostOnce));
    node.take(1);
    node.connect(2, 0, connect(V5, "sender", true));
    node.send(2, &publish("s", QoS::AtMostOnce, 0, &[7; 100]));
    node.send(2, &publish("s", QoS::AtMostOnce, 0, b"fits"));
    assert_eq!(payloads(&node.take(1)), [(&b"fits"[..], QoS::AtMostOnce)]);
    assert_eq!(node.shards[0].dropped_too_large_count(), 1);
}

#[test]
fn a_client_that_sends_requests_and_never_reads_the_replies_is_ended_at_twice_the_bound() {
    let mut node = Node::new(1, slow_limits());
    node.connect(1, 0, connect(V5, "pinger", true));
    node.take(1);
    node.stall(1);
    // Each PINGRESP is 2 bytes: 1,000 of them reach twice the 1,000-byte bound.
    let mut pings = BytesMut::new();
    for _ in 0..2_000 {
        pings.extend_from_slice(&[0xC0, 0x00]);
    }
    node.run(
        0,
        Input::Received {
            connection: 1,
            bytes: pings.freeze(),
        },
    );
    let got = node.take(1);
    let pongs = got.iter().filter(|p| matches!(p, Packet::PingResp)).count();
    assert_eq!(pongs, 1_000, "replies go until the hard bound");
    assert!(
        matches!(got.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::QUOTA_EXCEEDED),
        "{:?}",
        got.last()
    );
    assert!(node.closed.contains(&1));
}

#[test]
fn an_inflight_publish_too_large_for_the_resumed_client_counts_as_delivered() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, v5_persistent("shrinks", 3600));
    node.send(1, &subscribe(1, "s", QoS::AtLeastOnce));
    node.take(1);
    node.connect(2, 0, connect(V5, "sender", true));
    node.send(2, &publish("s", QoS::AtLeastOnce, 1, &[7; 100]));
    assert_eq!(
        publishes_in(&node.take(1)).len(),
        1,
        "in flight, never acknowledged"
    );
    node.lose(1);
    // Back with a maximum that the in-flight PUBLISH no longer fits.
    let connack = node.connect(
        3,
        0,
        Connect {
            properties: ConnectProperties {
                session_expiry_interval: Some(3600),
                maximum_packet_size: Some(60),
                ..ConnectProperties::default()
            },
            ..connect(V5, "shrinks", false)
        },
    );
    assert!(connack.session_present);
    assert!(
        publishes_in(&node.take(3)).is_empty(),
        "too large: not resent"
    );
    assert_eq!(node.shards[0].dropped_too_large_count(), 1);
    // Its place in the window is free again: the next message goes out.
    node.send(2, &publish("s", QoS::AtLeastOnce, 2, b"fits"));
    assert_eq!(payloads(&node.take(3)), [(&b"fits"[..], QoS::AtLeastOnce)]);
    let index = node.shards[0].client_ids["shrinks"];
    assert_eq!(node.shards[0].session(index).inflight.len(), 1);
}

#[test]
#[should_panic(expected = "holds a QoS 0 message back while connected")]
fn check_invariants_catches_a_qos0_message_held_back() {
    let mut node = stalled_subscriber(slow_limits(), QoS::AtMostOnce);
    let shard = &mut node.shards[0];
    let index = shard.client_ids["slow"];
    let message = Message::from_publish(
        match publish("t", QoS::AtMostOnce, 0, b"held") {
            Packet::Publish(publish) => publish,
            other => panic!("{other:?}"),
        },
        0,
        None,
    );
    shard.session_mut(index).queue.push_back(Queued {
        message,
        subscription_identifiers: Vec::new(),
    });
    shard.check_invariants();
}

#[test]
#[should_panic(expected = "a stuck timer names connection 1, which does not hold it")]
fn check_invariants_catches_a_stuck_timer_nobody_holds() {
    let mut node = stalled_subscriber(slow_limits(), QoS::AtMostOnce);
    let shard = &mut node.shards[0];
    shard.timers.arm(5_000, Timer::SendStuck(1));
    shard.check_invariants();
}
