//! The shard's own rules: outputs in a defined order whatever the hasher's seed, a timer store
//! that holds live timers only, and `check_invariants` catching a broken state.

use super::*;

fn retained(topic: &'static str, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        retain: true,
        ..match publish(topic, QoS::AtLeastOnce, 1, payload) {
            Packet::Publish(p) => p,
            _ => unreachable!("publish builds a PUBLISH"),
        }
    })
}

fn named(client_id: String) -> Connect {
    Connect {
        client_id: ByteString::from(client_id),
        ..connect(V5, "unused", true)
    }
}

const FILTERS: [&str; 8] = ["f/q", "f/b", "f/x", "f/a", "f/m", "f/c", "f/z", "f/k"];

/// One script through every path whose output order a hash map could decide: retained
/// messages on a wildcard subscribe, the route changes of an ending session, a snapshot of a
/// persistent session, and the DISCONNECTs of a shutdown. Returns the snapshots.
fn script(node: &mut Node) -> Vec<Vec<u8>> {
    node.connect(1, 0, connect(V5, "retainer", true));
    for topic in ["r/q", "r/b", "r/x", "r/a", "r/m", "r/c", "r/z", "r/k"] {
        node.send(1, &retained(topic, b"kept"));
    }
    node.connect(2, 1, v5_persistent("keeper", 600));
    for (packet_id, filter) in (1..).zip(FILTERS) {
        node.send(2, &subscribe(packet_id, filter, QoS::AtLeastOnce));
    }
    node.send(2, &subscribe(20, "r/#", QoS::AtMostOnce));
    node.connect(3, 0, connect(V5, "leaver", true));
    for (packet_id, filter) in (1..).zip(FILTERS) {
        node.send(3, &subscribe(packet_id, filter, QoS::AtMostOnce));
    }
    node.lose(3);
    for id in (10..40).rev() {
        node.connect(id, usize::from(id % 2 == 0), named(format!("client-{id}")));
    }
    node.run(0, Input::Shutdown);
    node.run(1, Input::Shutdown);
    node.shards.iter().map(Shard::snapshot).collect()
}

#[test]
fn outputs_and_snapshots_do_not_depend_on_the_hashers_seed() {
    // Every map of every shard has its own random seed, so two nodes differ as two processes.
    let (mut first, mut second) = (
        Node::new(2, Limits::default()),
        Node::new(2, Limits::default()),
    );
    let snapshots = script(&mut first);
    assert_eq!(snapshots, script(&mut second));
    assert_eq!(first.log, second.log);

    let topics: Vec<String> = publishes_in(&first.take(2))
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    assert_eq!(
        topics,
        ["r/a", "r/b", "r/c", "r/k", "r/m", "r/q", "r/x", "r/z"],
        "retained messages come by topic"
    );
    // The leaver's filters are also the keeper's, so its end tells the other shard only.
    let removed: Vec<&str> = first
        .log
        .iter()
        .filter(|line| line.contains("added: false"))
        .filter_map(|line| line.split('"').nth(1))
        .collect();
    assert_eq!(removed.len(), FILTERS.len(), "{removed:?}");
    assert!(
        removed.is_sorted(),
        "an ending session's routes go by filter: {removed:?}"
    );
    for shard in ["shard 0: ", "shard 1: "] {
        let closed: Vec<ConnectionId> = first
            .log
            .iter()
            .filter_map(|line| {
                line.strip_prefix(shard)?
                    .strip_prefix("Close { connection: ")
            })
            .map(|rest| {
                rest.trim_end_matches(" }")
                    .parse()
                    .expect("a connection id")
            })
            .collect();
        assert!(
            !closed.is_empty() && closed.is_sorted(),
            "shutdown closes {shard}connections by identifier: {closed:?}"
        );
    }
    assert_eq!(first.closed.len(), 32, "every open connection is closed");
}

#[test]
fn a_reconnect_loop_does_not_grow_the_timer_store() {
    let mut node = Node::new(1, Limits::default());
    let looper = Connect {
        keep_alive_seconds: 30,
        will: Some(Will {
            topic: ByteString::from_static("wills/looper"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(10),
                ..WillProperties::default()
            },
        }),
        ..v5_persistent("looper", 60)
    };
    for id in 0..100 {
        node.connect(id, 0, looper.clone());
        assert_eq!(node.shards[0].timers.len(), 1, "connected: its keep alive");
        node.lose(id);
        assert_eq!(
            node.shards[0].timers.len(),
            2,
            "offline: its will delay and expiry, nothing of the connections before"
        );
    }
    // The last round's timers still fire: the will after its delay, the expiry after 60 s.
    node.connect(500, 0, connect(V5, "watcher", true));
    node.send(500, &subscribe(1, "wills/#", QoS::AtMostOnce));
    node.take(500);
    node.advance(10_000);
    assert_eq!(payloads(&node.take(500)), [(&b"gone"[..], QoS::AtMostOnce)]);
    node.advance(50_000);
    assert_eq!(
        node.shards[0].session_count(),
        1,
        "only the watcher is left"
    );
}

#[test]
#[should_panic(expected = "is not in the trie once")]
fn check_invariants_catches_a_trie_that_lost_a_subscription() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "holder", true));
    node.send(1, &subscribe(1, "t/#", QoS::AtMostOnce));
    node.shards[0].subscriptions.remove("t/#", |_| true);
    node.shards[0].check_invariants();
}

#[test]
#[should_panic(expected = "does not hold it")]
fn check_invariants_catches_a_timer_that_nobody_holds() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "holder", true));
    node.shards[0].timers.arm(5_000, Timer::KeepAlive(1));
    node.shards[0].check_invariants();
}

#[test]
#[should_panic(expected = "waits while its window has room")]
fn check_invariants_catches_a_queue_that_stalls() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, v5_persistent("holder", 60));
    node.send(1, &subscribe(1, "t", QoS::AtLeastOnce));
    node.lose(1);
    node.connect(2, 0, connect(V5, "sender", true));
    node.send(2, &publish("t", QoS::AtLeastOnce, 1, b"queued"));
    // Bound to a new connection behind the shard's back, without draining the queue.
    node.run(
        0,
        Input::Opened {
            connection: 3,
            transport: Transport::default(),
        },
    );
    let shard = &mut node.shards[0];
    let index = shard.client_ids[&ByteString::from_static("holder")];
    let [will_timer, expiry_timer] = {
        let session = shard.session_mut(index);
        [session.will_timer.take(), session.expiry_timer.take()]
    };
    shard.timers.cancel(will_timer);
    shard.timers.cancel(expiry_timer);
    shard.session_mut(index).connection = Some(3);
    shard.connections.get_mut(&3).expect("open").session = Some(index);
    shard.check_invariants();
}

#[test]
fn an_old_sessions_expiry_does_not_end_the_new_session_in_its_slot() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, v5_persistent("slot", 60));
    node.lose(1);
    // A clean start ends that session; the new one takes its slot, at the same generation.
    let again = Connect {
        clean_start: true,
        ..v5_persistent("slot", 600)
    };
    assert!(!node.connect(2, 0, again).session_present);
    node.lose(2);
    node.advance(61_000);
    assert_eq!(
        node.shards[0].session_count(),
        1,
        "the first session's expiry went with it"
    );
    node.advance(540_000);
    assert_eq!(node.shards[0].session_count(), 0, "its own expiry ends it");
}
