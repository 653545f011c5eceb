//! A cluster behaves as one broker: real clients subscribe on one node and publish on another,
//! for every QoS, with wildcards, shared subscriptions, retained messages and wills. Clusters
//! of 1 core + 2 edges, as separate processes with their cluster ports on 127.0.0.x.

mod support;

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use support::{TestCluster, payloads, v5};

#[test]
fn every_qos_crosses_nodes_in_order_exactly_once() {
    let cluster = TestCluster::start(1, 2);
    let (core, edge_a, edge_b) = (cluster.node(1), cluster.node(2), cluster.node(3));
    let subscriber = v5(edge_a.broker.port, "sub-on-edge-a", |_| {});
    subscriber.subscribe("orders/+/created", QoS::ExactlyOnce);
    cluster.wait_routes(3, 2, 1);
    cluster.wait_routes(1, 2, 1);
    let on_b = v5(edge_b.broker.port, "pub-on-edge-b", |_| {});
    let on_core = v5(core.broker.port, "pub-on-core", |_| {});
    let mut expected = Vec::new();
    for (round, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        for index in 0..20 {
            let payload = format!("b-{round}-{index}");
            on_b.client
                .publish(
                    format!("orders/{index}/created"),
                    qos,
                    false,
                    payload.clone(),
                )
                .unwrap();
            expected.push(payload);
        }
    }
    let got = subscriber.publishes(expected.len(), Duration::from_secs(10));
    assert_eq!(payloads(&got), expected, "from edge B: all, in order, once");
    assert!(
        subscriber
            .publishes(1, Duration::from_millis(500))
            .is_empty(),
        "no duplicates"
    );
    // The granted QoS is the lower of the publish and the subscription.
    assert_eq!(got[0].qos, QoS::AtMostOnce);
    assert_eq!(got[20].qos, QoS::AtLeastOnce);
    assert_eq!(got[40].qos, QoS::ExactlyOnce);

    on_core
        .client
        .publish("orders/7/created", QoS::AtLeastOnce, false, "from-core")
        .unwrap();
    on_core
        .client
        .publish("orders/7/deleted", QoS::AtLeastOnce, false, "not-matching")
        .unwrap();
    let got = subscriber.publishes(2, Duration::from_secs(3));
    assert_eq!(
        payloads(&got),
        ["from-core"],
        "from the core, and only what matches"
    );
}

#[test]
fn wildcards_and_subscribers_on_every_node_each_get_one_copy() {
    let cluster = TestCluster::start(1, 2);
    let subscribers: Vec<_> = (1..=3)
        .map(|id| {
            let client = v5(cluster.node(id).broker.port, &format!("wild-{id}"), |_| {});
            // Two overlapping filters on one session: still one copy per message.
            client.subscribe("sensors/#", QoS::AtLeastOnce);
            client.subscribe("sensors/+/temp", QoS::AtLeastOnce);
            client
        })
        .collect();
    for at in 1..=3 {
        for of in 1..=3 {
            if at != of {
                cluster.wait_routes(at, of, 2);
            }
        }
    }
    let publisher = v5(cluster.node(2).broker.port, "wild-pub", |_| {});
    for index in 0..10 {
        publisher
            .client
            .publish(
                format!("sensors/{index}/temp"),
                QoS::AtLeastOnce,
                false,
                format!("{index}"),
            )
            .unwrap();
    }
    let expected: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    for (position, subscriber) in subscribers.iter().enumerate() {
        let got = subscriber.publishes(11, Duration::from_secs(3));
        assert_eq!(
            payloads(&got),
            expected,
            "subscriber on node {}",
            position + 1
        );
    }
}

#[test]
fn a_shared_group_spread_over_nodes_gets_each_message_once() {
    let cluster = TestCluster::start(1, 2);
    let members: Vec<_> = [2u32, 3]
        .iter()
        .flat_map(|&id| {
            let port = cluster.node(id).broker.port;
            (0..2).map(move |n| (port, format!("worker-{id}-{n}")))
        })
        .map(|(port, name)| {
            let member = v5(port, &name, |_| {});
            member.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce);
            member
        })
        .collect();
    cluster.wait_routes(1, 2, 1);
    cluster.wait_routes(1, 3, 1);
    let publisher = v5(cluster.node(1).broker.port, "jobs-source", |_| {});
    const JOBS: usize = 60;
    for index in 0..JOBS {
        publisher
            .client
            .publish("jobs/build", QoS::AtLeastOnce, false, index.to_string())
            .unwrap();
    }
    let mut seen: Vec<usize> = Vec::new();
    let mut per_node = [0usize; 2];
    for (position, member) in members.iter().enumerate() {
        let got = member.publishes(JOBS, Duration::from_millis(2500));
        per_node[position / 2] += got.len();
        seen.extend(payloads(&got).iter().map(|p| p.parse::<usize>().unwrap()));
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..JOBS).collect::<Vec<_>>(),
        "every job exactly once across the cluster-wide group: {per_node:?}"
    );
    assert!(
        per_node.iter().all(|&n| n > 0),
        "both nodes take a share: {per_node:?}"
    );
}

#[test]
fn retained_messages_and_wills_work_across_nodes() {
    let cluster = TestCluster::start(1, 2);
    let publisher = v5(cluster.node(2).broker.port, "retainer", |_| {});
    publisher
        .client
        .publish("status/boiler", QoS::AtLeastOnce, true, "on")
        .unwrap();
    publisher
        .wait_for(Duration::from_secs(3), |e| {
            matches!(
                e,
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))
            )
        })
        .expect("PUBACK");
    // A subscriber that arrives later on another node gets it from that node's store.
    let late = v5(cluster.node(3).broker.port, "late-reader", |_| {});
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let got = loop {
        late.subscribe("status/#", QoS::AtLeastOnce);
        let got = late.publishes(1, Duration::from_millis(300));
        if !got.is_empty() || std::time::Instant::now() > deadline {
            break got;
        }
        late.client.unsubscribe("status/#").unwrap();
    };
    assert_eq!(payloads(&got), ["on"]);
    assert!(got[0].retain, "delivered as retained");

    // A will published by node 1 when its client vanishes reaches a subscriber on node 3.
    let watcher = v5(cluster.node(3).broker.port, "will-watcher", |_| {});
    watcher.subscribe("wills/#", QoS::AtLeastOnce);
    cluster.wait_routes(1, 3, 2);
    let mut stream = support::raw(cluster.node(1).broker.port);
    use std::io::Write;
    // CONNECT 3.1.1, client "doomed", will "wills/doomed" = "gone" at QoS 1, keep alive 60.
    let mut connect = vec![0x10, 0];
    let body: Vec<u8> = [
        &[0, 4][..],
        b"MQTT",
        &[4, 0b0000_1110, 0, 60],
        &[0, 6],
        b"doomed",
        &[0, 12],
        b"wills/doomed",
        &[0, 4],
        b"gone",
    ]
    .concat();
    connect[1] = body.len() as u8;
    connect.extend(body);
    stream.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    std::io::Read::read_exact(&mut stream, &mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    drop(stream);
    let got = watcher.publishes(1, Duration::from_secs(5));
    assert_eq!(payloads(&got), ["gone"]);
}
