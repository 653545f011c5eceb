//! `GET /metrics` on a real broker, read with the Prometheus project's own OpenMetrics parser
//! (Python `prometheus_client`, installed by the test command): the text parses strictly, the
//! token is required, and the counters move by exactly what a scripted workload did (PUBLISH
//! packets in and out by QoS and their payload bytes, a refused CONNECT by its reason code,
//! connections accepted), while the gauges show its sessions and subscriptions.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use support::{ADMIN_TOKEN, Broker, http_get, read_until_closed, v5, write_all};

/// One sample: its name and labels.
type Key = (String, BTreeMap<String, String>);

/// Scrapes `/metrics` and parses it with the Prometheus parser.
fn scrape(broker: &Broker) -> BTreeMap<Key, f64> {
    let (status, body) = http_get(broker.admin_address(), "/metrics", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metrics/parse.py");
    let mut child = Command::new("timeout")
        .args(["30", "python3"])
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the text: {}\n{body}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&output.stdout).unwrap();
    samples
        .into_iter()
        .map(|(name, labels, value)| ((name, labels), value))
        .collect()
}

/// The sum of the samples named `name` whose labels include `want`.
fn total(samples: &BTreeMap<Key, f64>, name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|((sample, labels), _)| {
            sample == name
                && want
                    .iter()
                    .all(|(key, value)| labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|(_, value)| value)
        .sum()
}

#[test]
fn metrics_need_the_token_and_parse_with_the_prometheus_parser() {
    let broker = Broker::start(2);
    let (status, _) = http_get(broker.admin_address(), "/metrics", None);
    assert_eq!(status, 401, "/metrics without the token");
    let samples = scrape(&broker);
    assert!(total(&samples, "shardmq_process_open_files", &[]) > 0.0);
    assert!(total(&samples, "shardmq_process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(total(&samples, "shardmq_scrape_shards_missing", &[]), 0.0);
    for shard in ["0", "1"] {
        assert!(
            samples.contains_key(&(
                "shardmq_connections".to_string(),
                [("shard".to_string(), shard.to_string())].into()
            )),
            "shard {shard} answered"
        );
    }
}

#[test]
fn counters_move_by_exactly_what_the_workload_did() {
    let broker = Broker::start(2);
    let before = scrape(&broker);
    let subscriber = v5(broker.port, "metrics-subscriber", |_| {});
    subscriber.subscribe("m/#", QoS::AtLeastOnce);
    let publisher = v5(broker.port, "metrics-publisher", |_| {});
    let payload = vec![b'x'; 100];
    for i in 0..10 {
        publisher
            .client
            .publish(
                format!("m/zero/{i}"),
                QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .unwrap();
    }
    for i in 0..5 {
        publisher
            .client
            .publish(
                format!("m/one/{i}"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .unwrap();
    }
    let received = subscriber.publishes(15, Duration::from_secs(10));
    assert_eq!(received.len(), 15, "every message arrived");
    // A CONNECT with an unknown protocol level: refused with 0x84 (3.1.1 return code 1).
    let mut raw = support::raw(broker.port);
    write_all(
        &mut raw,
        &[
            0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x09, 0x02, 0x00, 0x3c, 0x00, 0x01,
            b'z',
        ],
    );
    let (answer, closed) = read_until_closed(&mut raw, Duration::from_secs(5));
    assert!(closed, "the refused connection is closed");
    assert_eq!(
        answer.first(),
        Some(&0x20),
        "a CONNACK came first: {answer:?}"
    );

    let after = scrape(&broker);
    let delta =
        |name: &str, want: &[(&str, &str)]| total(&after, name, want) - total(&before, name, want);
    assert_eq!(
        delta("shardmq_messages_received_total", &[("qos", "0")]),
        10.0
    );
    assert_eq!(
        delta("shardmq_messages_received_total", &[("qos", "1")]),
        5.0
    );
    assert_eq!(
        delta("shardmq_messages_received_total", &[("qos", "2")]),
        0.0
    );
    assert_eq!(delta("shardmq_messages_sent_total", &[("qos", "0")]), 10.0);
    assert_eq!(delta("shardmq_messages_sent_total", &[("qos", "1")]), 5.0);
    assert_eq!(
        delta("shardmq_message_payload_bytes_received_total", &[]),
        1500.0
    );
    assert_eq!(
        delta("shardmq_message_payload_bytes_sent_total", &[]),
        1500.0
    );
    assert_eq!(
        delta("shardmq_connects_refused_total", &[("reason_code", "0x84")]),
        1.0
    );
    assert_eq!(delta("shardmq_connects_refused_total", &[]), 1.0);
    assert_eq!(delta("shardmq_connections_accepted_total", &[]), 3.0);
    assert_eq!(delta("shardmq_messages_dropped_total", &[]), 0.0);
    assert_eq!(
        total(&after, "shardmq_sessions", &[("state", "online")]),
        2.0
    );
    assert_eq!(total(&after, "shardmq_subscriptions", &[]), 1.0);
    assert_eq!(total(&after, "shardmq_connections", &[]), 2.0);
    assert_eq!(total(&after, "shardmq_routes", &[]), 1.0);

    // The node summary of the admin API counts the same workload.
    let (status, _) = http_get(broker.admin_address(), "/api/v1/nodes", None);
    assert_eq!(status, 401, "/api/v1/nodes without the token");
    let (status, body) = http_get(broker.admin_address(), "/api/v1/nodes", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let [node] = nodes["nodes"].as_array().unwrap().as_slice() else {
        panic!("one node: {nodes}");
    };
    assert_eq!(node["role"], "standalone");
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["connections"], 2);
    assert_eq!(node["sessions_online"], 2);
    assert_eq!(node["subscriptions"], 1);
    assert_eq!(node["messages_received"], 15);
    assert_eq!(node["messages_sent"], 15);
    assert_eq!(node["bytes_received"], 1500);
}

#[test]
fn a_core_reports_its_cluster_and_raft_state() {
    let cluster = support::TestCluster::start(3, 1);
    cluster.wait_all_members(Duration::from_secs(30));
    let leader = cluster.wait_leader(&[1, 2, 3]);
    let mut leaders = 0.0;
    for id in 1..=3 {
        let samples = scrape(&cluster.node(id).broker);
        assert_eq!(
            total(&samples, "shardmq_cluster_members", &[("state", "up")]),
            3.0,
            "node {id} sees the three other members up"
        );
        assert_eq!(
            total(&samples, "shardmq_cluster_members", &[("state", "self")]),
            1.0
        );
        assert!(total(&samples, "shardmq_raft_term", &[]) >= 1.0);
        assert_eq!(
            total(&samples, "shardmq_raft_leader", &[]),
            f64::from(leader),
            "node {id} knows the leader"
        );
        leaders += total(&samples, "shardmq_raft_is_leader", &[]);
    }
    assert_eq!(leaders, 1.0, "exactly one core leads");
    // The edge follows a core and has no Raft state of its own.
    let edge = scrape(&cluster.node(4).broker);
    assert!(
        !edge.keys().any(|(name, _)| name == "shardmq_raft_term"),
        "an edge reports no Raft term"
    );
}

/// A 2-core cluster: messages published on node 1 reach a subscriber on node 2 over the data
/// links. The link counters move (frames on the data links both ways, at least the payload
/// bytes, control and data links up), the forward queue is empty once idle, and the cluster
/// status shows the same links.
#[test]
fn cluster_links_count_frames_and_bytes_and_the_forward_queue_drains() {
    let cluster = support::TestCluster::start(2, 0);
    cluster.wait_leader(&[1, 2]);
    let subscriber = v5(cluster.node(2).broker.port, "links-subscriber", |_| {});
    subscriber.subscribe("links/#", QoS::AtLeastOnce);
    cluster.wait_routes(1, 2, 1);
    let publisher = v5(cluster.node(1).broker.port, "links-publisher", |_| {});
    let (count, payload) = (40, vec![b'p'; 200]);
    for i in 0..count {
        publisher
            .client
            .publish(
                format!("links/{i}"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .unwrap();
    }
    let received = subscriber.publishes(count, Duration::from_secs(10));
    assert_eq!(received.len(), count, "every message crossed");
    let payload_bytes = (count * payload.len()) as f64;
    let link = |samples: &BTreeMap<Key, f64>, name: &str, purpose: &str, peer: &str| {
        total(samples, name, &[("purpose", purpose), ("peer", peer)])
    };
    let sender = scrape(&cluster.node(1).broker);
    let receiver = scrape(&cluster.node(2).broker);
    for (samples, peer) in [(&sender, "2"), (&receiver, "1")] {
        assert!(link(samples, "shardmq_cluster_links_up", "control", peer) >= 1.0);
        assert!(link(samples, "shardmq_cluster_links_up", "data", peer) >= 1.0);
        assert!(
            link(
                samples,
                "shardmq_cluster_link_frames_sent_total",
                "control",
                peer
            ) > 0.0
        );
        assert!(
            link(
                samples,
                "shardmq_cluster_link_frames_received_total",
                "data",
                peer
            ) > 0.0
        );
    }
    assert!(
        link(
            &sender,
            "shardmq_cluster_link_frames_sent_total",
            "data",
            "2"
        ) > 0.0
    );
    assert!(
        link(
            &sender,
            "shardmq_cluster_link_bytes_sent_total",
            "data",
            "2"
        ) >= payload_bytes,
        "node 1 sent at least the payloads on its data links"
    );
    assert!(
        link(
            &receiver,
            "shardmq_cluster_link_bytes_received_total",
            "data",
            "1"
        ) >= payload_bytes,
        "node 2 received at least the payloads on its data links"
    );
    // Once idle (the QoS 1 messages acknowledged), nothing waits for node 2.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(&cluster.node(1).broker);
        let waiting = total(
            &samples,
            "shardmq_cluster_forward_queue_messages",
            &[("peer", "2")],
        );
        let bytes = total(
            &samples,
            "shardmq_cluster_forward_queue_bytes",
            &[("peer", "2")],
        );
        assert!(
            samples.keys().any(
                |(name, labels)| name == "shardmq_cluster_forward_queue_messages"
                    && labels.get("peer").map(String::as_str) == Some("2")
            ),
            "node 1 reports its forward queues to node 2"
        );
        if waiting == 0.0 && bytes == 0.0 {
            assert_eq!(
                total(&samples, "shardmq_cluster_forward_queue_dropped_total", &[]),
                0.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} messages still queued"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = cluster.status(1);
    let links = status["links"].as_array().unwrap();
    assert!(
        links.iter().any(|l| l["peer"] == 2
            && l["purpose"] == "data"
            && l["up"].as_u64() >= Some(1)
            && l["bytes_sent"].as_u64() >= Some(payload_bytes as u64)),
        "the status shows the data links: {links:?}"
    );
    assert!(
        status["forward_queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["peer"] == 2 && q["messages"] == 0),
        "{status}"
    );
}
