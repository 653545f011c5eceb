//! Connections and sessions: resume, takeover, wills, keep alive, expiry, refusals and
//! snapshots.

use super::guards::open_with_bytes;
use super::*;

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
fn a_session_with_expiry_0_ends_when_taken_over_and_the_persistent_quota_holds() {
    let limits = Limits {
        persistent_sessions_per_shard_max: 1,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    node.connect(1, 0, v5_persistent("holder", 60));
    // Expiry 0: not persistent, so the full quota does not refuse it.
    let connack = node.connect(2, 0, connect(V5, "sneak", false));
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    node.send(2, &subscribe(1, "x", QoS::AtMostOnce));
    node.take(2);
    // Taking it over ends it (it ends with its connection), so this would be a new
    // persistent session: past the quota.
    let connack = node.connect(3, 0, v5_persistent("sneak", 60));
    assert_eq!(connack.reason, ReasonCode::QUOTA_EXCEEDED);
    assert!(!connack.session_present);
    // Without the quota in the way, the newcomer gets a new session, not the old one.
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "sneak", false));
    node.send(1, &subscribe(1, "x", QoS::AtMostOnce));
    node.take(1);
    let connack = node.connect(2, 0, v5_persistent("sneak", 60));
    assert!(
        !connack.session_present,
        "the expiry-0 session ended with its connection"
    );
    node.connect(4, 0, connect(V5, "pub", true));
    node.send(4, &publish("x", QoS::AtMostOnce, 0, b"gone"));
    assert!(
        payloads(&node.take(2)).is_empty(),
        "its subscription ended with it"
    );
}

#[test]
fn clean_start_discards_the_session_and_takeover_closes_the_old_connection() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, v5_persistent("dup", 60));
    node.send(1, &subscribe(1, "x", QoS::AtMostOnce));
    node.take(1);
    let connack = node.connect(2, 0, v5_persistent("dup", 60));
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
fn response_information_is_left_out_when_the_client_id_is_too_long_for_it() {
    let limits = Limits {
        client_id_length_max: 65_535,
        connect_packet_size_max: 128 * 1024,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    let long_id: &'static str = Box::leak("x".repeat(65_530).into_boxed_str());
    let connack = node.connect(
        1,
        0,
        Connect {
            properties: ConnectProperties {
                request_response_information: Some(true),
                ..ConnectProperties::default()
            },
            ..connect(V5, long_id, true)
        },
    );
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    assert_eq!(connack.properties.response_information, None);
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

/// This node (0) and node 2 claim one client at once; node 2 gave up waiting for this node
/// (it saw it down) and accepted its client, then got this node's claim and gave its client
/// up to it. Its answer names its completed claim, so this node, the lower one, must not
/// answer that claim after its own completes: that would end the session it has just given
/// its new connection and leave the client with no connection on either node (sim seed 958).
fn contested_claim(completed: Option<u64>) -> Node {
    let mut node = Node::new(1, Limits::default());
    node.peer_up(2);
    open_with_bytes(&mut node, 1, Bytes::new());
    node.send(
        1,
        &Packet::Connect(Box::new(v5_persistent("contested", 60))),
    );
    assert!(node.take(1).is_empty(), "waiting for node 2");
    let ours = node.shards[0].claims["contested"].claim_number();
    // Node 2's claim: deferred here, the lower node, until ours completes.
    node.run(
        0,
        Input::Shard(ShardMessage::Session {
            node: 2,
            transfer: SessionTransfer::Claim {
                client_id: ByteString::from_static("contested"),
                shard: 0,
                claim: 7,
                clean_start: false,
                after: None,
            },
        }),
    );
    assert_eq!(node.transfers.len(), 1, "only our own claim went out");
    node.run(
        0,
        Input::Shard(ShardMessage::Session {
            node: 2,
            transfer: SessionTransfer::Handover {
                client_id: ByteString::from_static("contested"),
                shard: 0,
                claim: ours,
                session: None,
                completed,
            },
        }),
    );
    node
}

#[test]
fn a_claim_the_other_node_completed_without_us_is_not_answered_late() {
    let mut node = contested_claim(Some(7));
    let got = node.take(1);
    let [Packet::ConnAck(connack)] = got.as_slice() else {
        panic!("{got:?}")
    };
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    assert!(node.closed.is_empty(), "the new connection stays");
    assert_eq!(
        node.transfers.len(),
        1,
        "node 2's completed claim gets no answer"
    );
    assert!(node.shards[0].client_ids.contains_key("contested"));
}

#[test]
fn a_claim_still_pending_on_the_other_node_is_answered_after_ours() {
    let mut node = contested_claim(None);
    let got = node.take(1);
    assert!(
        matches!(
            got.as_slice(),
            [Packet::ConnAck(connack), Packet::Disconnect(disconnect)]
                if connack.reason == ReasonCode::SUCCESS
                    && disconnect.reason == ReasonCode::SESSION_TAKEN_OVER
        ),
        "accepted, then handed on to node 2's claim: {got:?}"
    );
    assert_eq!(node.closed, [1]);
    let Some((2, SessionTransfer::Handover { claim: 7, .. })) = node.transfers.last() else {
        panic!("{:?}", node.transfers)
    };
}

#[test]
fn an_answer_names_the_claim_that_completed_here_lately() {
    let mut node = Node::new(1, Limits::default());
    node.peer_up(2);
    open_with_bytes(&mut node, 1, Bytes::new());
    node.send(1, &Packet::Connect(Box::new(v5_persistent("late", 60))));
    let ours = node.shards[0].claims["late"].claim_number();
    // Node 2 never answers: the claim completes by its timeout and the client is accepted.
    node.advance(5_000);
    assert!(matches!(node.take(1).as_slice(), [Packet::ConnAck(_)]));
    let claim = |number| {
        Input::Shard(ShardMessage::Session {
            node: 2,
            transfer: SessionTransfer::Claim {
                client_id: ByteString::from_static("late"),
                shard: 0,
                claim: number,
                clean_start: false,
                after: None,
            },
        })
    };
    node.run(0, claim(3));
    let Some((
        2,
        SessionTransfer::Handover {
            completed, session, ..
        },
    )) = node.transfers.last()
    else {
        panic!("{:?}", node.transfers)
    };
    assert_eq!(*completed, Some(ours));
    assert!(session.is_some(), "the persistent session moves");
    // Long after, the note is gone.
    node.advance(10_000);
    node.run(0, claim(4));
    let Some((2, SessionTransfer::Handover { completed, .. })) = node.transfers.last() else {
        panic!("{:?}", node.transfers)
    };
    assert_eq!(*completed, None);
}
