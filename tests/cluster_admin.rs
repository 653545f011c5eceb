//! The admin API for the whole cluster, with real processes: `GET /api/v1/nodes` asked of a
//! core lists every node with its own summary (relayed over the control links), asked of an
//! edge it lists the cores and itself and the other edges (which an edge has no link to) with
//! an error; a stopped or killed node is listed with an error within the gather timeout, and
//! the call does not hang; a client on node 3 is listed and kicked from core 1. A hostile peer that has the cluster secret gets error answers to
//! queries that do not parse or are too long, past the per-link cap, and the node stays up.
//! A client on node 3 is listed and kicked from node 1, through the API and `ctl`. A question
//! whose control link closes fails at once with that reason; a node whose client list does
//! not fit a relay frame answers its first clients with `truncated`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use shardmq_net::frame::handshake::{Handshake, LinkKey, Local, Step};
use shardmq_net::frame::{self, Body, Decoder, Hello, Member, Purpose, Role};
use support::{ADMIN_TOKEN, CLUSTER_SECRET, TestCluster, http_get, v5};

/// The admin API's wait for the nodes' answers (`api::GATHER_TIMEOUT`), and a margin.
const GATHER_BOUND: Duration = Duration::from_secs(5 + 3);

/// `GET /api/v1/nodes` of node `id`: the entries by node, and how long the call took.
fn nodes(cluster: &TestCluster, id: u32) -> (Vec<Value>, Duration) {
    let started = Instant::now();
    let (status, body) = http_get(
        cluster.node(id).broker.admin_address(),
        "/api/v1/nodes",
        Some(ADMIN_TOKEN),
    );
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let mut entries = value["nodes"].as_array().expect("a node list").clone();
    entries.sort_by_key(|entry| entry["node"].as_u64());
    (entries, took)
}

fn entry(entries: &[Value], node: u64) -> &Value {
    entries
        .iter()
        .find(|e| e["node"] == node)
        .unwrap_or_else(|| panic!("node {node} is listed: {entries:#?}"))
}

/// Waits until node `id`'s list shows `check`, asking again (summaries of a moment).
fn wait_nodes(cluster: &TestCluster, id: u32, what: &str, check: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (entries, took) = nodes(cluster, id);
        assert!(took < GATHER_BOUND, "the call took {took:?}");
        if check(&entries) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id}: {what}; last list: {entries:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_node_is_listed_from_any_node_and_a_lost_one_with_an_error() {
    let mut cluster = TestCluster::start(3, 2);
    let client = v5(cluster.node(3).broker.port, "on-node-3", |_| {});

    // From core 1: five nodes, each answering for itself.
    wait_nodes(&cluster, 1, "every node answers", |entries| {
        entries.len() == 5 && entries.iter().all(|e| e["error"].is_null())
    });
    let (entries, _) = nodes(&cluster, 1);
    for node in 1..=5u64 {
        let summary = entry(&entries, node);
        let role = if node <= 3 { "core" } else { "edge" };
        assert_eq!(summary["role"], role, "{summary:#}");
        assert_eq!(
            summary["state"],
            if node == 1 { "self" } else { "up" },
            "{summary:#}"
        );
        assert_eq!(summary["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(summary["shards"], 2, "{summary:#}");
        assert!(summary["uptime_seconds"].is_u64(), "{summary:#}");
        let connections = if node == 3 { 1 } else { 0 };
        assert_eq!(
            summary["connections"], connections,
            "node {node}: {summary:#}"
        );
    }

    // One node, asked by its identifier.
    let (status, body) = http_get(
        cluster.node(1).broker.admin_address(),
        "/api/v1/nodes/3",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{body}");
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["node"], 3);
    assert_eq!(one["connections"], 1);
    let (status, body) = http_get(
        cluster.node(1).broker.admin_address(),
        "/api/v1/nodes/77",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("no control link to node 77"), "{body}");

    // From edge 4: the cores and itself answer; the other edge is out of its reach.
    let (entries, took) = nodes(&cluster, 4);
    assert!(took < GATHER_BOUND, "{took:?}");
    assert_eq!(entries.len(), 5, "{entries:#?}");
    for node in [1u64, 2, 3, 4] {
        let summary = entry(&entries, node);
        assert!(summary["error"].is_null(), "node {node}: {summary:#}");
        assert_eq!(summary["node"], node);
    }
    assert_eq!(entry(&entries, 3)["connections"], 1);
    assert_eq!(entry(&entries, 4)["state"], "self");
    let other_edge = entry(&entries, 5);
    assert_eq!(
        other_edge["error"], "no control link to node 5",
        "{other_edge:#}"
    );
    assert_eq!(other_edge["state"], "up");

    // Killed (SIGKILL): listed with an error at once, the others answering.
    cluster.node_mut(2).broker.kill();
    let (entries, took) = nodes(&cluster, 1);
    assert!(took < GATHER_BOUND, "{took:?}");
    let lost = entry(&entries, 2);
    assert!(lost["error"].is_string(), "{lost:#}");
    for node in [1u64, 3, 4, 5] {
        assert!(entry(&entries, node)["error"].is_null(), "{entries:#?}");
    }

    // Edge 5 stops answering (SIGSTOP) with its links still open: listed with an error
    // within the timeout, and the call does not hang.
    let pid = cluster.node(5).broker.pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -STOP {pid}");
    let (entries, took) = nodes(&cluster, 1);
    assert!(
        took < GATHER_BOUND,
        "a stopped node holds the call: {took:?}"
    );
    let stopped = entry(&entries, 5);
    assert!(stopped["error"].is_string(), "{stopped:#}");
    assert_eq!(
        entry(&entries, 3)["connections"],
        1,
        "the others still answer"
    );
    cluster.node_mut(5).broker.kill();

    // Once the cores have seen both go, the call is quick again.
    wait_nodes(
        &cluster,
        1,
        "nodes 2 and 5 gone or shown with an error",
        |entries| {
            [2u64, 5].iter().all(|&node| {
                entries
                    .iter()
                    .find(|e| e["node"] == node)
                    .is_none_or(|e| e["error"].is_string())
            })
        },
    );
    let (_, took) = nodes(&cluster, 1);
    assert!(took < Duration::from_secs(3), "{took:?}");

    // The client on node 3, listed and kicked from core 1 (the queries of `api/inspect.rs`
    // ride the same relay).
    let admin = cluster.node(1).broker.admin_address();
    let (status, body) = http_get(admin, "/api/v1/clients", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let clients = listed["clients"].as_array().expect("a client list");
    assert!(
        clients
            .iter()
            .any(|c| c["client_id"] == "on-node-3" && c["node"] == 3),
        "{listed:#}"
    );
    let (status, body) = support::http_raw(
        admin,
        &format!(
            "DELETE /api/v1/clients/on-node-3 HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{body}");
    let kicked: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(kicked, serde_json::json!({ "kicked": true, "node": 3 }));
    assert!(
        client.ended_within(Duration::from_secs(5)),
        "the client on node 3 is disconnected"
    );
}

const CLUSTER_NAME: &str = "shardmq";
const FAKE_NODE: u32 = 9;

/// A control link to a node, logged in with the cluster secret as edge [`FAKE_NODE`]: a
/// hostile peer that has the secret.
struct Peer {
    stream: TcpStream,
    decoder: Decoder,
}

impl Peer {
    fn login(address: std::net::SocketAddr) -> Self {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut peer = Self {
            stream,
            decoder: Decoder::new(frame::cluster_id(CLUSTER_NAME), 1 << 20),
        };
        let member = Member {
            node: FAKE_NODE,
            role: Role::Edge,
            cluster_address: "127.0.0.99:7000".into(),
            mqtt_address: "127.0.0.99:1883".into(),
            epoch: 77,
        };
        let (mut handshake, hello) = Handshake::initiate(Hello {
            node: FAKE_NODE,
            role: Role::Edge,
            purpose: Purpose::Control,
            member,
            nonce: [7; 16],
            shard: 0,
            epoch: 77,
        });
        peer.send(&[hello]);
        let welcome = peer
            .frames(Duration::from_secs(3), |_| true)
            .pop()
            .expect("a Welcome");
        let local = Local {
            key: LinkKey::derive(CLUSTER_SECRET, CLUSTER_NAME),
            cluster_name: CLUSTER_NAME.into(),
            node: FAKE_NODE,
            role: Role::Edge,
            epoch: 77,
        };
        let version = peer.decoder.peer_version.expect("a version");
        let Ok(Step::Done {
            reply: Some(proof), ..
        }) = handshake.step(&local, version, welcome)
        else {
            panic!("the node proves the secret");
        };
        peer.send(&[proof]);
        peer
    }

    /// Sends `bodies` in one write.
    fn send(&mut self, bodies: &[Body]) {
        self.try_send(bodies).unwrap();
    }

    fn try_send(&mut self, bodies: &[Body]) -> std::io::Result<()> {
        let mut bytes = bytes::BytesMut::new();
        for body in bodies {
            frame::encode(
                body,
                frame::cluster_id(CLUSTER_NAME),
                usize::MAX,
                &mut bytes,
            )
            .expect("test frames fit");
        }
        self.stream.write_all(&bytes)
    }

    /// Frames received until `done` says the last one was enough or `timeout` passes, with a
    /// heartbeat every 100 ms (the test cluster's links time out after 600 ms of silence).
    fn frames(&mut self, timeout: Duration, done: impl Fn(&[Body]) -> bool) -> Vec<Body> {
        let deadline = Instant::now() + timeout;
        let mut bodies = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            while let Some(body) = self
                .decoder
                .next_frame()
                .expect("the node frames correctly")
            {
                bodies.push(body);
                if done(&bodies) {
                    return bodies;
                }
            }
            assert!(Instant::now() < deadline, "no answer in time: {bodies:?}");
            self.stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            match self.stream.read(&mut buffer) {
                Ok(0) => panic!("the node closed the link: {bodies:?}"),
                Ok(n) => self.decoder.extend(&buffer[..n]),
                Err(_) => {}
            }
            if self.decoder.peer_version.is_some() && !bodies.is_empty() {
                let _ = self.try_send(&[Body::Heartbeat { applied: 0 }]);
            }
        }
    }

    /// The answers to the queries `ids`, by id.
    fn answers(&mut self, ids: &[u64]) -> Vec<(u64, Result<Vec<u8>, String>)> {
        let wanted = ids.len();
        let answered = |bodies: &[Body]| {
            bodies
                .iter()
                .filter(|b| matches!(b, Body::NodeAnswer { id, .. } if ids.contains(id)))
                .count()
                >= wanted
        };
        let mut answers: Vec<(u64, Result<Vec<u8>, String>)> = self
            .frames(Duration::from_secs(10), answered)
            .into_iter()
            .filter_map(|body| match body {
                Body::NodeAnswer { id, answer } if ids.contains(&id) => Some((id, answer)),
                _ => None,
            })
            .collect();
        answers.sort_by_key(|(id, _)| *id);
        answers
    }
}

#[test]
fn hostile_queries_from_a_peer_with_the_secret_get_error_answers() {
    let cluster = TestCluster::start(1, 0);
    let mut peer = Peer::login(cluster.node(1).cluster_address);
    let query = |id: u64, query: &[u8]| Body::NodeQuery {
        id,
        query: query.to_vec(),
    };
    peer.send(&[
        query(1, br#"{"query":"drop_tables"}"#),
        query(2, br#"{"query":"summary","extra":1}"#),
        query(3, &[0xFF; 100]),
        query(4, &vec![b' '; frame::NODE_QUERY_LEN_MAX + 1]),
        query(5, br#"{"query":"summary"}"#),
    ]);
    let answers = peer.answers(&[1, 2, 3, 4, 5]);
    let error = |id: u64| match &answers[id as usize - 1] {
        (_, Err(error)) => error.clone(),
        other => panic!("query {id} is answered with an error: {other:?}"),
    };
    for (id, expected) in [
        (1, "not a query this node answers"),
        (2, "not a query this node answers"),
        (3, "not a query this node answers"),
        (4, "longer than a node takes"),
    ] {
        assert!(error(id).contains(expected), "{id}: {}", error(id));
    }
    let Ok(summary) = &answers[4].1 else {
        panic!("a summary: {:?}", answers[4]);
    };
    let summary: Value = serde_json::from_slice(summary).unwrap();
    assert_eq!(summary["node"], 1);
    assert_eq!(summary["role"], "core");

    // Twenty at once, in one write: the link's cap answers the ones past it at once.
    let ids: Vec<u64> = (100..120).collect();
    let burst: Vec<Body> = ids
        .iter()
        .map(|&id| query(id, br#"{"query":"summary"}"#))
        .collect();
    peer.send(&burst);
    let answers = peer.answers(&ids);
    assert_eq!(answers.len(), ids.len(), "every query is answered once");
    let capped = answers
        .iter()
        .filter(|(_, a)| {
            a.as_ref()
                .is_err_and(|e| e.contains("being answered already"))
        })
        .count();
    let answered = answers.iter().filter(|(_, a)| a.is_ok()).count();
    assert_eq!(capped + answered, ids.len(), "{answers:?}");
    assert!(capped >= 1 && answered >= 1, "{answers:?}");

    // The node is up and its API answers.
    let (status, body) = http_get(
        cluster.node(1).broker.admin_address(),
        "/api/v1/nodes",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{body}");
}

/// A question relayed to a node whose control link then closes fails at once with that
/// reason, rather than waiting out the gather timeout.
#[test]
fn a_question_whose_link_closes_fails_at_once() {
    let cluster = TestCluster::start(1, 0);
    let mut peer = Peer::login(cluster.node(1).cluster_address);
    let admin = cluster.node(1).broker.admin_address();
    let started = Instant::now();
    let asking = std::thread::spawn(move || {
        http_get(
            admin,
            &format!("/api/v1/nodes/{FAKE_NODE}"),
            Some(ADMIN_TOKEN),
        )
    });
    // The node asks the peer, which closes the link instead of answering.
    peer.frames(Duration::from_secs(5), |bodies| {
        matches!(bodies.last(), Some(Body::NodeQuery { .. }))
    });
    drop(peer);
    let (status, body) = asking.join().expect("the call returns");
    let took = started.elapsed();
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&format!("the control link to node {FAKE_NODE} closed")),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(3),
        "the call took {took:?}, not the 5 s gather timeout"
    );
}

/// An MQTT 3.1.1 client `client_id` connected (clean, no keep-alive) to `port` on loopback.
fn raw_client(port: u16, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    assert!(body.len() < 128, "one length byte");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    stream.write_all(&packet).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "{client_id} accepted");
    stream
}

/// A node whose client list does not fit a relay frame answers its first clients with
/// `truncated`, rather than an error.
#[test]
fn a_listing_longer_than_a_relay_frame_is_cut_and_truncated() {
    // Frames of 133,120 bytes (the least these packets allow): an answer takes about
    // 66,500; 250 clients of 100-byte identifiers take some 100,000.
    let cluster = TestCluster::start_with(1, 1, |_| {
        "frame_size_max = 133120\n[limits]\npacket_size_max = 1024\nconnect_packet_size_max = 1024"
            .into()
    });
    let port = cluster.node(2).broker.port;
    let clients: Vec<TcpStream> = (0..250)
        .map(|i| raw_client(port, &format!("{i:03}{}", "x".repeat(97))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let (status, body) = http_get(
            cluster.node(1).broker.admin_address(),
            "/api/v1/clients?limit=1000",
            Some(ADMIN_TOKEN),
        );
        assert_eq!(status, 200, "{body}");
        let value: Value = serde_json::from_str(&body).unwrap();
        let from_node_2 = value["clients"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["node"] == 2)
            .count();
        if from_node_2 > 0 || Instant::now() > deadline {
            break value;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["errors"], serde_json::json!([]), "{listed:#}");
    assert_eq!(listed["truncated"], true, "{listed:#}");
    let ids: Vec<&str> = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["node"] == 2)
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert!(ids.len() >= 100 && ids.len() < 250, "{} clients", ids.len());
    // The first ones, in order.
    for (i, id) in ids.iter().enumerate() {
        assert!(id.starts_with(&format!("{i:03}")), "{i}: {id}");
    }
    drop(clients);
}

/// A client connected to node 3 of three cores is listed by node 1's API and by `ctl`
/// against node 1, with its node, and kicked from node 1: it gets DISCONNECT 0x98 and is gone
/// from every node's list.
#[test]
fn a_client_on_node_3_is_listed_and_kicked_from_node_1() {
    let cluster = TestCluster::start(3, 0);
    cluster.wait_all_members(Duration::from_secs(30));
    let far = v5(cluster.node(3).broker.port, "far-client", |_| {});
    let _near = v5(cluster.node(1).broker.port, "near-client", |_| {});
    let first = cluster.node(1).broker.admin_address();
    let listed = |body: &str| -> Vec<(String, u64)> {
        let value: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        value["clients"]
            .as_array()
            .expect("a client list")
            .iter()
            .map(|c| {
                (
                    c["client_id"].as_str().unwrap_or_default().to_string(),
                    c["node"].as_u64().unwrap_or_default(),
                )
            })
            .collect()
    };
    let (status, body) = http_get(first, "/api/v1/clients", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        listed(&body),
        vec![
            ("far-client".to_string(), 3),
            ("near-client".to_string(), 1)
        ],
        "{body}"
    );
    let (status, body) = http_get(first, "/api/v1/clients?node=3", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed(&body), vec![("far-client".to_string(), 3)]);
    let shown = cluster
        .node(1)
        .broker
        .ctl(&["--json", "clients", "show", "far-client"])
        .unwrap();
    assert_eq!(shown["node"], 3, "{shown:#}");

    let kicked = cluster
        .node(1)
        .broker
        .ctl(&["--json", "clients", "kick", "far-client"])
        .unwrap();
    assert_eq!(
        kicked,
        serde_json::json!({ "kicked": true, "node": 3 }),
        "{kicked:#}"
    );
    let ended = far
        .ended
        .recv_timeout(Duration::from_secs(10))
        .expect("the client on node 3 is disconnected");
    assert!(
        format!("{ended:?}").contains("AdministrativeAction"),
        "DISCONNECT 0x98: {ended:?}"
    );
    // The kick is logged on node 3 with the node whose operator asked.
    let log = cluster.node(3).broker.log_text();
    let line = log
        .lines()
        .find(|line| line.contains("client kicked by the admin API"))
        .unwrap_or_else(|| panic!("node 3 logs the kick:\n{log}"));
    assert!(line.contains("asked_by=1"), "{line}");
    for id in [1, 2, 3] {
        let (status, body) = http_get(
            cluster.node(id).broker.admin_address(),
            "/api/v1/clients/far-client",
            Some(ADMIN_TOKEN),
        );
        assert_eq!(status, 404, "node {id} no longer has it: {body}");
    }
    let output = cluster
        .node(1)
        .broker
        .ctl(&["clients", "kick", "far-client"]);
    assert!(output.is_err(), "a second kick finds no client: {output:?}");
}
