//! Whatever clients do, every cluster frame fits the frame size limit (review finding F1): a
//! backlog of large forwarded messages and a route set larger than a frame cross as several
//! frames, so the links stay up and routes converge. Clusters of 1 core + 1 edge, as separate
//! processes with their cluster ports on 127.0.0.x.

mod support;

use std::process::Command;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use support::{TestCluster, v5};

/// MQTT packets up to 2 MiB, so that a message of 1 MiB of payload and its header fit.
const LIMITS: &str = "\n[limits]\npacket_size_max = 2097152\n";

const PAYLOAD_LEN: usize = 1 << 20;

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {name} {pid}");
}

/// 20 retained QoS 1 messages of 1 MiB (more than the 16 MiB frame limit together) wait for
/// the edge while its data link is down; on the new link they go as several frames, and the
/// subscriber there gets every one, once, with the link up afterwards.
#[test]
fn a_backlog_larger_than_a_frame_crosses_in_several_frames() {
    let cluster = TestCluster::start_with(1, 1, |_| LIMITS.to_string());
    let big = |options: &mut rumqttc::v5::MqttOptions| {
        options.set_max_packet_size(Some(4 << 20));
    };
    let subscriber = v5(cluster.node(2).broker.port, "big-sub", big);
    subscriber.subscribe("big/#", QoS::AtLeastOnce);
    cluster.wait_routes(1, 2, 1);
    let publisher = v5(cluster.node(1).broker.port, "big-pub", big);
    // A first message brings the data link up.
    publisher
        .client
        .publish("big/first", QoS::AtLeastOnce, false, "first")
        .unwrap();
    assert_eq!(subscriber.publishes(1, Duration::from_secs(5)).len(), 1);

    // The edge stops answering: its data link times out (600 ms) and everything published
    // meanwhile waits in node 1's queue, to be sent on the next link at once. It is back well
    // within the 2 s grace, so it stays a member with its routes.
    let edge_pid = cluster.node(2).broker.pid();
    signal(edge_pid, "-STOP");
    for index in 0..20u8 {
        publisher
            .client
            .publish(
                format!("big/{index}"),
                QoS::AtLeastOnce,
                true,
                vec![index; PAYLOAD_LEN],
            )
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(900));
    signal(edge_pid, "-CONT");

    let got = subscriber.publishes(20, Duration::from_secs(30));
    let mut indices: Vec<u8> = got
        .iter()
        .map(|p| {
            assert_eq!(p.payload.len(), PAYLOAD_LEN);
            p.payload[0]
        })
        .collect();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(
        indices,
        (0..20).collect::<Vec<u8>>(),
        "all 20, from {} received",
        got.len()
    );

    // Forwarding carries on. (A slow box may have kept the edge away past its 2 s grace while
    // it caught up, which withdraws its routes until it is back: so ask a few times.)
    cluster.wait_routes(1, 2, 1);
    let arrived = (0..20).any(|attempt| {
        publisher
            .client
            .publish(
                format!("big/after/{attempt}"),
                QoS::AtLeastOnce,
                false,
                "after",
            )
            .unwrap();
        subscriber
            .publishes(1, Duration::from_millis(500))
            .iter()
            .any(|p| &p.payload[..] == b"after")
    });
    assert!(arrived, "a message after the backlog arrives");
    for id in [1, 2] {
        let log = cluster.node(id).broker.log_text();
        assert!(
            !log.contains("above the limit"),
            "node {id} refused no frame:\n{log}"
        );
    }
}

/// A session on the edge with 300 filters of about 60 KiB (18 MiB of routes, more than one
/// frame): after the core restarts, the edge's whole route set goes to it again, in frames
/// that fit, and a publish on the core matching the last filter reaches the subscriber.
#[test]
fn a_route_set_larger_than_a_frame_reaches_the_core() {
    let mut cluster = TestCluster::start_with(1, 1, |_| LIMITS.to_string());
    let subscriber = v5(cluster.node(2).broker.port, "many-filters", |options| {
        options.set_max_packet_size(Some(4 << 20));
    });
    let filter = |index: usize| format!("routes/{index:03}/{}", "x".repeat(60 * 1024));
    for index in 0..300 {
        subscriber.subscribe(&filter(index), QoS::AtLeastOnce);
    }
    cluster.wait_routes(1, 2, 300);
    // A restarted core knows nothing: the edge sends its whole route set on the new link.
    // The old process is gone first, so that the new one can take its ports.
    cluster.node_mut(1).broker.kill();
    cluster.restart(1);
    cluster.wait_all_members(Duration::from_secs(10));
    cluster.wait_routes(1, 2, 300);
    let publisher = v5(cluster.node(1).broker.port, "last-filter-pub", |options| {
        options.set_max_packet_size(Some(4 << 20));
    });
    publisher
        .client
        .publish(filter(299), QoS::AtLeastOnce, false, "to-the-last")
        .unwrap();
    let got = subscriber.publishes(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "the publish matching the last filter arrives");
    assert_eq!(&got[0].payload[..], b"to-the-last");
}
