//! Authentication and the ACL in the shard: CONNECT waits for the verifier's answer (and
//! keeps what the client sends meanwhile), refusals carry the right codes in 5.0 and 3.1.1,
//! and SUBSCRIBE, PUBLISH, each delivery and wills obey the ACL.

use std::sync::Arc;

use super::*;
use crate::auth::{Acl, Credentials, Policy, Principal, Verdict};

fn acl(text: &str) -> Acl {
    Acl::parse(text.as_bytes()).expect("a valid ACL")
}

/// Every shard of `node` applies `policy`.
fn set_policy(node: &mut Node, policy: Policy) {
    let policy = Arc::new(policy);
    for shard in &mut node.shards {
        shard.set_auth_policy(policy.clone());
    }
}

/// A node whose clients must give credentials, with `acl`.
fn verifying_node(acl_text: Option<&str>) -> Node {
    let mut node = Node::new(1, Limits::default());
    set_policy(
        &mut node,
        Policy {
            allow_anonymous: false,
            verify: true,
            acl: acl_text.map(acl),
        },
    );
    node
}

/// A node where anyone connects, and a username is taken as given, under `acl_text`.
fn acl_node(acl_text: &str) -> Node {
    let mut node = Node::new(2, Limits::default());
    set_policy(
        &mut node,
        Policy {
            allow_anonymous: true,
            verify: false,
            acl: Some(acl(acl_text)),
        },
    );
    node
}

fn with_credentials(
    mut connect: Connect,
    username: &'static str,
    password: &'static [u8],
) -> Connect {
    connect.username = Some(ByteString::from_static(username));
    connect.password = Some(Bytes::from_static(password));
    connect
}

fn with_username(mut connect: Connect, username: &'static str) -> Connect {
    connect.username = Some(ByteString::from_static(username));
    connect
}

/// Opens `id` on shard 0 and sends `connect`, without expecting an answer yet.
fn open_and_send(node: &mut Node, id: ConnectionId, connect: Connect) {
    node.versions.insert(id, connect.protocol);
    node.location.insert(id, 0);
    node.run(
        0,
        Input::Opened {
            connection: id,
            transport: Transport::default(),
        },
    );
    node.send(id, &Packet::Connect(Box::new(connect)));
}

/// Answers the oldest verify request.
fn answer(node: &mut Node, verdict: Verdict) -> Credentials {
    let (shard, connection, ticket, credentials) = node.verifies.remove(0);
    node.run(
        shard,
        Input::Verified {
            connection,
            ticket,
            verdict,
        },
    );
    credentials
}

fn accepted(username: &'static str) -> Verdict {
    Verdict::Accepted(Principal {
        username: Some(ByteString::from_static(username)),
        claims: None,
    })
}

fn connack_reason(packets: &[Packet]) -> Option<ReasonCode> {
    packets.iter().find_map(|packet| match packet {
        Packet::ConnAck(connack) => Some(connack.reason),
        _ => None,
    })
}

fn acks(packets: &[Packet]) -> Vec<(&'static str, u16, ReasonCode)> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::PubAck(ack) => Some(("PUBACK", ack.packet_id, ack.reason)),
            Packet::PubRec(ack) => Some(("PUBREC", ack.packet_id, ack.reason)),
            Packet::PubComp(ack) => Some(("PUBCOMP", ack.packet_id, ack.reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn connect_waits_for_the_verifier_and_reads_what_came_meanwhile() {
    let mut node = verifying_node(None);
    open_and_send(
        &mut node,
        1,
        with_credentials(connect(V5, "waiter", true), "alice", b"secret"),
    );
    // Sent before CONNACK: kept until the verdict.
    node.send(1, &subscribe(1, "t", QoS::AtLeastOnce));
    assert!(
        node.take(1).is_empty(),
        "nothing is answered before the verdict"
    );
    assert_eq!(node.verifies.len(), 1, "one check asked for");
    let credentials = answer(&mut node, accepted("alice"));
    assert_eq!(credentials.username.as_deref(), Some("alice"));
    assert_eq!(credentials.password.as_deref(), Some(&b"secret"[..]));
    assert_eq!(credentials.client_id, "waiter");
    let packets = node.take(1);
    assert_eq!(connack_reason(&packets), Some(ReasonCode::SUCCESS));
    assert_eq!(subacks(&packets), [vec![ReasonCode::GRANTED_QOS_1]]);
}

#[test]
fn verdicts_refuse_with_the_codes_of_each_version() {
    let cases = [
        (
            Verdict::BadCredentials,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        ),
        (Verdict::NotAuthorized, ReasonCode::NOT_AUTHORIZED),
        (Verdict::Unavailable, ReasonCode::SERVER_UNAVAILABLE),
    ];
    let mut id = 0;
    for version in [V5, V311] {
        for (verdict, reason) in cases.clone() {
            id += 1;
            let mut node = verifying_node(None);
            open_and_send(
                &mut node,
                id,
                with_credentials(connect(version, "refused", true), "bob", b"wrong"),
            );
            answer(&mut node, verdict);
            // The 3.1.1 return codes 4, 5 and 3 decode to these same reason codes.
            assert_eq!(connack_reason(&node.take(id)), Some(reason), "{version:?}");
            assert!(node.closed.contains(&id));
            assert_eq!(node.shards[0].session_count(), 0);
        }
    }
}

#[test]
fn anonymous_clients_are_refused_when_not_allowed() {
    for version in [V5, V311] {
        let mut node = verifying_node(None);
        let connack = node.connect(1, 0, connect(version, "nobody", true));
        assert_eq!(connack.reason, ReasonCode::NOT_AUTHORIZED);
        assert!(node.verifies.is_empty(), "nothing to verify");
    }
    // Without a verifier, a username proves nothing: refused as well.
    let mut node = Node::new(1, Limits::default());
    set_policy(&mut node, Policy::default());
    let connack = node.connect(1, 0, with_username(connect(V5, "named", true), "carol"));
    assert_eq!(connack.reason, ReasonCode::NOT_AUTHORIZED);
}

#[test]
fn an_answer_after_the_connection_closed_is_dropped() {
    let mut node = verifying_node(None);
    open_and_send(
        &mut node,
        1,
        with_credentials(connect(V5, "gone", true), "alice", b"secret"),
    );
    node.lose(1);
    answer(&mut node, accepted("alice"));
    assert_eq!(node.shards[0].session_count(), 0);
    assert!(node.take(1).is_empty());
}

#[test]
fn a_certificate_name_is_the_username_without_a_verifier() {
    let mut node = verifying_node(Some("user device-7\ntopic readwrite devices/device-7/#\n"));
    node.versions.insert(1, V5);
    node.location.insert(1, 0);
    node.run(
        0,
        Input::Opened {
            connection: 1,
            transport: Transport {
                certificate_name: Some(ByteString::from_static("device-7")),
                ..Transport::default()
            },
        },
    );
    node.send(1, &Packet::Connect(Box::new(connect(V5, "d7", true))));
    assert!(node.verifies.is_empty(), "the certificate was the proof");
    assert_eq!(connack_reason(&node.take(1)), Some(ReasonCode::SUCCESS));
    node.send(1, &subscribe(1, "devices/device-7/#", QoS::AtMostOnce));
    node.send(1, &subscribe(2, "devices/device-8/#", QoS::AtMostOnce));
    assert_eq!(
        subacks(&node.take(1)),
        [
            vec![ReasonCode::GRANTED_QOS_0],
            vec![ReasonCode::NOT_AUTHORIZED]
        ]
    );
}

const ACL: &str = "\
user alice
topic readwrite public/#
topic read sensors/#
topic write commands/#
user writer
topic write #
";

#[test]
fn a_refused_subscription_gets_0x87_or_0x80_and_the_others_are_granted() {
    let mut node = acl_node(ACL);
    node.connect(1, 0, with_username(connect(V5, "a5", true), "alice"));
    node.connect(2, 0, with_username(connect(V311, "a3", true), "alice"));
    for (id, refused) in [
        (1, ReasonCode::NOT_AUTHORIZED),
        (2, ReasonCode::UNSPECIFIED_ERROR),
    ] {
        node.send(
            id,
            &subscribe_all(
                1,
                &["sensors/+", "commands/x", "#", "$share/g/public/a"],
                QoS::AtLeastOnce,
            ),
        );
        assert_eq!(
            subacks(&node.take(id)),
            [vec![
                ReasonCode::GRANTED_QOS_1,
                refused,
                refused,
                ReasonCode::GRANTED_QOS_1
            ]]
        );
    }
    // The refused filters are not held: nothing on `commands/x` reaches them.
    node.connect(3, 1, with_username(connect(V5, "pub", true), "writer"));
    node.send(3, &publish("commands/x", QoS::AtMostOnce, 0, b"c"));
    node.send(3, &publish("sensors/t", QoS::AtMostOnce, 0, b"s"));
    assert_eq!(payloads(&node.take(1)), [(&b"s"[..], QoS::AtMostOnce)]);
    assert_eq!(payloads(&node.take(2)), [(&b"s"[..], QoS::AtMostOnce)]);
}

#[test]
fn a_refused_publish_is_acknowledged_0x87_in_5_and_dropped_silently_in_3() {
    let mut node = acl_node(ACL);
    node.connect(1, 1, with_username(connect(V5, "reader", true), "alice"));
    node.send(1, &subscribe(1, "sensors/#", QoS::ExactlyOnce));
    node.take(1);
    node.connect(2, 0, with_username(connect(V5, "p5", true), "alice"));
    node.connect(3, 0, with_username(connect(V311, "p3", true), "alice"));
    // alice may read sensors/# but not write it.
    node.send(2, &publish("sensors/a", QoS::AtLeastOnce, 1, b"5-1"));
    node.send(2, &publish("sensors/a", QoS::ExactlyOnce, 2, b"5-2"));
    node.send(2, &publish("sensors/a", QoS::AtMostOnce, 0, b"5-0"));
    assert_eq!(
        acks(&node.take(2)),
        [
            ("PUBACK", 1, ReasonCode::NOT_AUTHORIZED),
            ("PUBREC", 2, ReasonCode::NOT_AUTHORIZED)
        ]
    );
    node.send(3, &publish("sensors/a", QoS::AtLeastOnce, 1, b"3-1"));
    node.send(3, &publish("sensors/a", QoS::ExactlyOnce, 2, b"3-2"));
    node.send(3, &Packet::PubRel(PubAck::new(2)));
    assert_eq!(
        acks(&node.take(3)),
        [
            ("PUBACK", 1, ReasonCode::SUCCESS),
            ("PUBREC", 2, ReasonCode::SUCCESS),
            ("PUBCOMP", 2, ReasonCode::SUCCESS)
        ],
        "acknowledged as usual, so the 3.1.1 client does not send it again"
    );
    assert!(
        payloads(&node.take(1)).is_empty(),
        "nothing refused was routed"
    );
    // Its connection stays: an allowed publish goes through.
    node.send(3, &publish("public/ok", QoS::AtMostOnce, 0, b"fine"));
    node.send(1, &subscribe(2, "public/#", QoS::AtMostOnce));
    node.take(1);
    node.send(3, &publish("public/ok", QoS::AtMostOnce, 0, b"fine"));
    assert_eq!(payloads(&node.take(1)), [(&b"fine"[..], QoS::AtMostOnce)]);
}

#[test]
fn deliveries_and_retained_messages_obey_the_acl_in_force() {
    let mut node = acl_node("user reader\ntopic read #\nuser writer\ntopic write #\n");
    node.connect(1, 0, with_username(connect(V5, "reader", true), "reader"));
    node.send(1, &subscribe(1, "#", QoS::AtMostOnce));
    assert_eq!(subacks(&node.take(1)), [vec![ReasonCode::GRANTED_QOS_0]]);
    node.connect(2, 1, with_username(connect(V5, "writer", true), "writer"));
    // A reload: the reader may read public/# only; its `#` subscription stays.
    set_policy(
        &mut node,
        Policy {
            allow_anonymous: true,
            verify: false,
            acl: Some(acl(
                "user reader\ntopic read public/#\nuser writer\ntopic write #\n",
            )),
        },
    );
    node.send(2, &publish("secret/x", QoS::AtMostOnce, 0, b"secret"));
    node.send(2, &publish("public/y", QoS::AtMostOnce, 0, b"public"));
    assert_eq!(payloads(&node.take(1)), [(&b"public"[..], QoS::AtMostOnce)]);
    // Retained messages: only the readable one comes with a new subscription.
    let retained = |topic: &'static str, packet_id, payload: &'static [u8]| {
        let Packet::Publish(mut publish) = publish(topic, QoS::AtLeastOnce, packet_id, payload)
        else {
            unreachable!()
        };
        publish.retain = true;
        Packet::Publish(publish)
    };
    node.send(2, &retained("public/r", 1, b"kept public"));
    node.send(2, &retained("public/s", 2, b"kept public too"));
    node.take(1);
    node.connect(3, 0, with_username(connect(V5, "reader-2", true), "reader"));
    node.send(3, &subscribe(1, "public/#", QoS::AtMostOnce));
    let packets = node.take(3);
    assert_eq!(subacks(&packets), [vec![ReasonCode::GRANTED_QOS_0]]);
    assert_eq!(payloads(&packets).len(), 2);
}

#[test]
fn a_will_the_client_may_not_write_refuses_the_connect() {
    let mut node = acl_node(ACL);
    for (id, version) in [(1, V5), (2, V311)] {
        let mut connect = with_username(connect(version, "willing", true), "alice");
        connect.will = Some(Will {
            topic: ByteString::from_static("sensors/last-words"),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties::default(),
        });
        assert_eq!(
            node.connect(id, 0, connect).reason,
            ReasonCode::NOT_AUTHORIZED
        );
    }
    let mut connect = with_username(connect(V5, "willing", true), "alice");
    connect.will = Some(Will {
        topic: ByteString::from_static("commands/last-words"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    assert_eq!(node.connect(3, 0, connect).reason, ReasonCode::SUCCESS);
}

#[test]
fn a_tokens_claims_apply_besides_the_file() {
    let mut node = verifying_node(Some("pattern readwrite #\n"));
    open_and_send(
        &mut node,
        1,
        with_credentials(connect(V5, "token-holder", true), "", b"a.jwt.token"),
    );
    answer(
        &mut node,
        Verdict::Accepted(Principal {
            username: Some(ByteString::from_static("svc")),
            claims: Some(Arc::new(acl(
                "pattern read svc/in/#\npattern write svc/out/#\n",
            ))),
        }),
    );
    assert_eq!(connack_reason(&node.take(1)), Some(ReasonCode::SUCCESS));
    node.send(1, &subscribe(1, "svc/in/#", QoS::AtMostOnce));
    node.send(1, &subscribe(2, "other/#", QoS::AtMostOnce));
    node.send(1, &publish("svc/out/a", QoS::AtLeastOnce, 3, b"ok"));
    node.send(1, &publish("svc/in/a", QoS::AtLeastOnce, 4, b"no"));
    let packets = node.take(1);
    assert_eq!(
        subacks(&packets),
        [
            vec![ReasonCode::GRANTED_QOS_0],
            vec![ReasonCode::NOT_AUTHORIZED]
        ]
    );
    assert_eq!(
        acks(&packets),
        [
            ("PUBACK", 3, ReasonCode::NO_MATCHING_SUBSCRIBERS),
            ("PUBACK", 4, ReasonCode::NOT_AUTHORIZED)
        ]
    );
}

#[test]
fn what_a_client_sends_while_it_waits_is_bounded() {
    let limits = Limits {
        takeover_pending_bytes_max: 64,
        ..Limits::default()
    };
    let mut node = Node::new(1, limits);
    set_policy(
        &mut node,
        Policy {
            allow_anonymous: false,
            verify: true,
            acl: None,
        },
    );
    open_and_send(
        &mut node,
        1,
        with_credentials(connect(V5, "chatty", true), "alice", b"secret"),
    );
    node.send(1, &publish("t", QoS::AtMostOnce, 0, &[0; 100]));
    assert_eq!(
        connack_reason(&node.take(1)),
        Some(ReasonCode::QUOTA_EXCEEDED)
    );
    assert!(node.closed.contains(&1));
    // The verdict that comes after finds nothing to admit.
    answer(&mut node, accepted("alice"));
    assert_eq!(node.shards[0].session_count(), 0);
}

#[test]
fn in_a_cluster_the_claim_starts_after_the_verdict_and_what_came_waits_for_it() {
    let mut node = verifying_node(None);
    node.peer_up(2);
    open_and_send(
        &mut node,
        1,
        with_credentials(connect(V5, "roamer", true), "alice", b"secret"),
    );
    node.send(1, &subscribe(1, "t", QoS::AtMostOnce));
    assert!(
        node.transfers.is_empty(),
        "no claim before the credentials are good"
    );
    answer(&mut node, accepted("alice"));
    let Some((2, SessionTransfer::Claim { claim, .. })) = node.transfers.last().cloned() else {
        panic!("no claim: {:?}", node.transfers);
    };
    assert!(node.take(1).is_empty(), "waiting for node 2");
    node.run(
        0,
        Input::Shard(ShardMessage::Session {
            node: 2,
            transfer: SessionTransfer::Handover {
                client_id: ByteString::from_static("roamer"),
                shard: 0,
                claim,
                session: None,
                completed: None,
            },
        }),
    );
    let packets = node.take(1);
    assert_eq!(connack_reason(&packets), Some(ReasonCode::SUCCESS));
    assert_eq!(subacks(&packets), [vec![ReasonCode::GRANTED_QOS_0]]);
}

#[test]
fn queued_messages_are_checked_again_when_the_reader_is_back() {
    let mut node = acl_node("user reader\ntopic read #\nuser writer\ntopic write #\n");
    let persistent = |client_id: &'static str, clean_start: bool| Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(3600),
            ..ConnectProperties::default()
        },
        ..with_username(connect(V5, client_id, clean_start), "reader")
    };
    node.connect(1, 0, persistent("reader", true));
    node.send(1, &subscribe(1, "#", QoS::AtLeastOnce));
    assert_eq!(subacks(&node.take(1)), [vec![ReasonCode::GRANTED_QOS_1]]);
    node.lose(1);
    node.connect(2, 1, with_username(connect(V5, "writer", true), "writer"));
    node.send(2, &publish("secret/x", QoS::AtLeastOnce, 1, b"secret"));
    node.send(2, &publish("public/y", QoS::AtLeastOnce, 2, b"public"));
    node.take(2);
    // Queued while the reader was away; then a reload narrows what it may read.
    set_policy(
        &mut node,
        Policy {
            allow_anonymous: true,
            verify: false,
            acl: Some(acl(
                "user reader\ntopic read public/#\nuser writer\ntopic write #\n",
            )),
        },
    );
    node.connect(3, 0, persistent("reader", false));
    assert_eq!(
        payloads(&node.take(3)),
        [(&b"public"[..], QoS::AtLeastOnce)],
        "the queued secret message is dropped, the public one delivered"
    );
    assert_eq!(node.shards[0].metrics().stats.dropped_not_authorized, 1);
}

#[test]
fn in_flight_messages_are_not_resent_to_a_reader_who_may_no_longer_read_them() {
    let mut node = acl_node("user reader\ntopic read #\nuser writer\ntopic write #\n");
    let persistent = |clean_start: bool| Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(3600),
            ..ConnectProperties::default()
        },
        ..with_username(connect(V5, "reader", clean_start), "reader")
    };
    node.connect(1, 0, persistent(true));
    node.send(1, &subscribe(1, "#", QoS::AtLeastOnce));
    node.take(1);
    node.connect(2, 1, with_username(connect(V5, "writer", true), "writer"));
    node.send(2, &publish("secret/x", QoS::AtLeastOnce, 1, b"secret"));
    node.send(2, &publish("public/y", QoS::AtLeastOnce, 2, b"public"));
    // Sent, never acknowledged: both in flight when the connection is lost.
    assert_eq!(payloads(&node.take(1)).len(), 2);
    node.lose(1);
    set_policy(
        &mut node,
        Policy {
            allow_anonymous: true,
            verify: false,
            acl: Some(acl(
                "user reader\ntopic read public/#\nuser writer\ntopic write #\n",
            )),
        },
    );
    node.connect(3, 0, persistent(false));
    assert_eq!(
        payloads(&node.take(3)),
        [(&b"public"[..], QoS::AtLeastOnce)],
        "only the readable message is resent"
    );
    assert_eq!(node.shards[0].metrics().stats.dropped_not_authorized, 1);
}
