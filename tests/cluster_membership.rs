//! Cluster membership with real processes: a wrong secret is refused and logged, `shardmq ctl`
//! joins, leaves and reports, and clients keep working on the other nodes when an edge or a
//! core is killed with SIGKILL; a restarted node rejoins.

mod support;

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use support::{Broker, CLUSTER_SECRET, TestCluster, payloads, round_trip, v5};

#[test]
fn a_node_with_the_wrong_secret_is_refused_and_logged() {
    let cluster = TestCluster::start(1, 0);
    let core = cluster.node(1);
    let intruder = Broker::start_with(
        1,
        &format!(
            "[cluster]\nenabled = true\nsecret = \"not-the-right-secret\"\nnode_id = 9\nrole = \"edge\"\nlisten = \"127.0.0.99:0\"\nseeds = [\"{}\"]\nreconnect_ms = 100\n",
            core.cluster_address
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !core.broker.log_text().contains("wrong cluster secret") {
        assert!(
            Instant::now() < deadline,
            "the core logs the refusal:\n{}",
            core.broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        intruder
            .log_text()
            .contains("did not prove the cluster secret"),
        "the intruder logs it too:\n{}",
        intruder.log_text()
    );
    let status = cluster.status(1);
    assert_eq!(
        status["members"].as_array().unwrap().len(),
        1,
        "not a member: {status:#}"
    );
    // And one of another cluster name, with the right secret.
    let stranger = Broker::start_with(
        1,
        &format!(
            "[cluster]\nenabled = true\nname = \"other\"\nsecret = \"{CLUSTER_SECRET}\"\nnode_id = 8\nrole = \"edge\"\nlisten = \"127.0.0.98:0\"\nseeds = [\"{}\"]\nreconnect_ms = 100\n",
            core.cluster_address
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !core.broker.log_text().contains("another cluster") {
        assert!(Instant::now() < deadline, "{}", core.broker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stranger);
    assert_eq!(cluster.status(1)["members"].as_array().unwrap().len(), 1);
}

#[test]
fn ctl_joins_reports_and_leaves() {
    // A core on its own, and a second core with no seeds that joins it through `ctl`.
    let cluster = TestCluster::start(1, 0);
    let address = std::net::SocketAddr::from(([127, 0, 0, 40], support::free_port()));
    let second = Broker::start_with(
        2,
        &format!(
            "[cluster]\nenabled = true\nsecret = \"{CLUSTER_SECRET}\"\nnode_id = 2\nrole = \"core\"\nlisten = \"{address}\"\nheartbeat_ms = 100\nlink_timeout_ms = 600\nreconnect_ms = 100\ndown_grace_seconds = 2\n"
        ),
    );
    let answer = second
        .ctl(&[
            "cluster",
            "join",
            &cluster.node(1).cluster_address.to_string(),
        ])
        .unwrap();
    assert!(answer["joining"].is_string(), "{answer:#}");
    cluster.wait_status(1, Duration::from_secs(10), "node 2 joined", |s| {
        s["members"].as_array().unwrap().len() == 2
    });
    // Core to core: node 1 dials node 2 back, so node 2 knows node 1's routes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = second.ctl(&["cluster", "status"]).unwrap();
        if status["members"].as_array().unwrap().len() == 2 {
            assert_eq!(status["role"], "core");
            assert!(status["log"]["entries"].as_u64().unwrap() >= 2);
            break;
        }
        assert!(Instant::now() < deadline, "{status:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let subscriber = v5(cluster.node(1).broker.port, "on-one", |_| {});
    subscriber.subscribe("joined/#", QoS::AtLeastOnce);
    let publisher = v5(second.port, "on-two", |_| {});
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = second.ctl(&["cluster", "status"]).unwrap();
        let known = status["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["node"] == 1 && m["route_count"] == 1);
        if known {
            break;
        }
        assert!(Instant::now() < deadline, "{status:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    round_trip(&publisher, &subscriber, "joined/x", "joined", 5);

    let answer = second.ctl(&["cluster", "leave"]).unwrap();
    assert_eq!(answer["left"], true);
    cluster.wait_status(1, Duration::from_secs(5), "node 2 left at once", |s| {
        s["members"].as_array().unwrap().len() == 1
    });
    // A leaving core goes once the leader has removed its voter (its quorum stays whole).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = second.ctl(&["cluster", "status"]).unwrap();
        if status["members"].as_array().unwrap().len() == 1 {
            assert_eq!(status["raft"]["state"], "waiting", "{status:#}");
            break;
        }
        assert!(Instant::now() < deadline, "{status:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = cluster.status(1);
    assert_eq!(first["raft"]["voters"], serde_json::json!([1]), "{first:#}");

    // A node that is not clustered says so; a bad address is refused by name.
    let plain = Broker::start(1);
    let error = plain.ctl(&["cluster", "status"]).unwrap_err();
    assert!(error.contains("not in a cluster"), "{error}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["ctl", "--admin", "127.0.0.1:1", "cluster", "status"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the admin endpoint"));
}

#[test]
fn clients_keep_working_when_an_edge_is_killed_and_it_rejoins_after_restart() {
    let mut cluster = TestCluster::start(1, 2);
    let subscriber = v5(cluster.node(2).broker.port, "steady-sub", |_| {});
    subscriber.subscribe("steady/#", QoS::AtLeastOnce);
    let doomed_sub = v5(cluster.node(3).broker.port, "doomed-sub", |_| {});
    doomed_sub.subscribe("steady/#", QoS::AtLeastOnce);
    cluster.wait_routes(1, 2, 1);
    cluster.wait_routes(1, 3, 1);
    let publisher = v5(cluster.node(1).broker.port, "steady-pub", |_| {});
    round_trip(&publisher, &subscriber, "steady/a", "before", 5);

    cluster.node_mut(3).broker.kill();
    cluster.wait_status(1, Duration::from_secs(5), "node 3 shown down", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["node"] == 3 && m["state"] == "down")
    });
    round_trip(&publisher, &subscriber, "steady/a", "while-down", 5);
    // Past the grace period its routes are withdrawn and it is no longer a member.
    cluster.wait_status(1, Duration::from_secs(6), "node 3 removed", |s| {
        !s["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["node"] == 3)
    });
    cluster.wait_status(
        2,
        Duration::from_secs(6),
        "edge 2 sees node 3 removed",
        |s| {
            !s["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["node"] == 3)
        },
    );

    cluster.restart(3);
    cluster.wait_all_members(Duration::from_secs(10));
    let back = v5(cluster.node(3).broker.port, "back-sub", |_| {});
    back.subscribe("steady/#", QoS::AtLeastOnce);
    cluster.wait_routes(1, 3, 1);
    let expected: Vec<String> = (0..5).map(|i| format!("after-{i}")).collect();
    for payload in &expected {
        publisher
            .client
            .publish("steady/b", QoS::AtLeastOnce, false, payload.clone())
            .unwrap();
    }
    assert_eq!(
        payloads(&back.publishes(5, Duration::from_secs(5))),
        expected
    );
    assert_eq!(
        payloads(&subscriber.publishes(5, Duration::from_secs(5))),
        expected
    );
}

#[test]
fn three_cores_two_edges_survive_the_loss_of_a_core() {
    let mut cluster = TestCluster::start(3, 2);
    let subscriber = v5(cluster.node(4).broker.port, "edge-sub", |_| {});
    subscriber.subscribe("fleet/+/pos", QoS::AtLeastOnce);
    let core_sub = v5(cluster.node(2).broker.port, "core-sub", |_| {});
    core_sub.subscribe("fleet/#", QoS::AtLeastOnce);
    for at in [1, 2, 3, 5] {
        if at != 4 {
            cluster.wait_routes(at, 4, 1);
        }
    }
    cluster.wait_routes(5, 2, 1);
    let publisher = v5(cluster.node(5).broker.port, "edge-pub", |_| {});
    round_trip(&publisher, &subscriber, "fleet/7/pos", "three-cores", 5);
    assert_eq!(core_sub.publishes(5, Duration::from_secs(5)).len(), 5);

    // Kill the core the edges are most likely to follow (the first seed), and one with a
    // subscriber: clients on the edges and the other cores keep working.
    cluster.node_mut(1).broker.kill();
    round_trip(&publisher, &subscriber, "fleet/7/pos", "core-1-dead", 5);
    // A subscription made after the core died still reaches every node, through the cores
    // that remain.
    let late = v5(cluster.node(5).broker.port, "late-sub", |_| {});
    late.subscribe("fleet/late", QoS::AtLeastOnce);
    cluster.wait_routes(4, 5, 1);
    cluster.wait_routes(2, 5, 1);
    let from_edge_4 = v5(cluster.node(4).broker.port, "edge4-pub", |_| {});
    round_trip(&from_edge_4, &late, "fleet/late", "late", 3);
    for at in [2, 3, 4, 5] {
        cluster.wait_status(at, Duration::from_secs(8), "core 1 removed", |s| {
            !s["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["node"] == 1)
        });
    }
    // The core comes back and the cluster is whole again.
    cluster.restart(1);
    cluster.wait_all_members(Duration::from_secs(10));
    cluster.wait_routes(1, 4, 1);
    let on_core_1 = v5(cluster.node(1).broker.port, "core1-pub", |_| {});
    round_trip(&on_core_1, &subscriber, "fleet/1/pos", "core-1-back", 5);
}
