//! Failover of persistent sessions (issue 16), with real processes: a persistent session's home
//! node is killed with SIGKILL while the session holds queued (and, for QoS 2, in-flight)
//! messages; the client resumes with clean start 0 on another node and must find its session,
//! its subscriptions and every message its publisher had acknowledged, in order, QoS 2 exactly
//! once, within about the link timeout (not the takeover timeout). Each failover scenario also
//! runs without the kill (a takeover from a live home, which the cluster already does), so that
//! a failure of the failover is not a fault of the scenario itself.
//!
//! The replication status read here is `ctl cluster status`'s `"sessions"` object: `home`,
//! `replica` and `replication_unacknowledged`; `[cluster] session_replicas` sets the count.
//! A scenario collects every expectation that failed and reports them together, so that one
//! run shows the whole picture (session, messages, time, later messages).

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use support::{
    ADMIN_TOKEN, Broker, TestCluster, V5, http_get, v4, v4_connected, v5, variable_byte_integer,
};

/// The longest a resuming client may wait for its CONNACK after the home node's death: the
/// test clusters' link timeout (600 ms) plus a second, with room for a loaded machine, and
/// well under the 5 s takeover timeout.
const FAILOVER_CONNACK_MAX: Duration = Duration::from_secs(4);

/// How long the replicas may take to acknowledge everything before the kill.
const REPLICATION_WAIT: Duration = Duration::from_secs(10);

/// How long a resumed client may take to receive what it is owed, and how long a silence ends
/// the wait early (everything there is arrives in well under a second).
const DELIVERY_WAIT: Duration = Duration::from_secs(10);
const DELIVERY_SILENCE: Duration = Duration::from_secs(3);

/// Where a scenario's clients connect, and whether the home node dies.
#[derive(Clone, Copy)]
struct Layout {
    cores: usize,
    edges: usize,
    /// The node the persistent subscriber first connects to (its session's home).
    home: u32,
    publisher: u32,
    /// The node the subscriber resumes on.
    resume: u32,
    kill: bool,
}

/// The expectations a scenario found unmet, reported together at its end.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            self.0.push(what());
        }
    }

    fn assert_none(self, scenario: &str) {
        assert!(
            self.0.is_empty(),
            "{scenario}:\n  - {}",
            self.0.join("\n  - ")
        );
    }
}

/// A 5.0 client that resumes its session (clean start 0, session kept for 300 s).
fn persistent(port: u16, id: &str) -> V5 {
    v5(port, id, |options| {
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(300));
    })
}

fn tags(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// Publishes `payloads` on `topic` at `qos` and waits until the broker has acknowledged each
/// (PUBACK for QoS 1; PUBREC, then PUBCOMP, for QoS 2).
fn publish_acknowledged(publisher: &V5, topic: &str, qos: QoS, payloads: &[String]) {
    for payload in payloads {
        publisher
            .client
            .publish(topic, qos, false, payload.clone())
            .unwrap();
    }
    let mut acknowledged = 0;
    while acknowledged < payloads.len() {
        let event = publisher.wait_for(Duration::from_secs(5), |event| {
            matches!(
                event,
                rumqttc::v5::Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))
            )
        });
        assert!(
            event.is_some(),
            "the broker acknowledged {acknowledged} of {} messages on {topic}",
            payloads.len()
        );
        acknowledged += 1;
    }
}

/// The sum over shards of a gauge of node `broker`'s `/metrics` (`shardmq_NAME{shard=..}`).
fn gauge_total(broker: &Broker, name: &str) -> u64 {
    let (status, body) = http_get(broker.admin_address(), "/metrics", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "metrics: {body}");
    let prefix = format!("shardmq_{name}{{");
    body.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// Waits until node `home`'s sessions hold `count` messages (queued or in flight): the
/// forwarded messages have landed there, and what follows starts from a known state.
fn wait_held(cluster: &TestCluster, home: u32, count: u64) {
    let broker = &cluster.node(home).broker;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held =
            gauge_total(broker, "queued_messages") + gauge_total(broker, "inflight_messages");
        if held == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {home} holds {held} messages, not {count}, after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A field of a status's `"sessions"` object, if it is there and an integer.
fn sessions_field(status: &serde_json::Value, field: &str) -> Option<u64> {
    status["sessions"][field].as_u64()
}

/// Every running node's `"sessions"` object, for a report.
fn sessions_of(cluster: &TestCluster, nodes: &[u32]) -> String {
    nodes
        .iter()
        .map(|&node| format!("node {node}: {}", cluster.status(node)["sessions"]))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits (up to [`REPLICATION_WAIT`]) until node `home` is home to a session and has no
/// unacknowledged replication items, and another node holds a replica. Err says what the
/// status showed last.
fn wait_replicated(cluster: &TestCluster, home: u32) -> Result<(), String> {
    let nodes: Vec<u32> = (1..=cluster.nodes.len() as u32).collect();
    let others: Vec<u32> = nodes.iter().copied().filter(|&n| n != home).collect();
    let deadline = Instant::now() + REPLICATION_WAIT;
    loop {
        let status = cluster.status(home);
        let caught_up = sessions_field(&status, "home").is_some_and(|h| h >= 1)
            && sessions_field(&status, "replication_unacknowledged") == Some(0);
        if caught_up
            && others
                .iter()
                .any(|&n| sessions_field(&cluster.status(n), "replica").is_some_and(|r| r >= 1))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "before the kill, within {REPLICATION_WAIT:?}: node {home} home >= 1 with \
                 replication_unacknowledged 0 and a replica elsewhere; status sessions: {}",
                sessions_of(cluster, &nodes)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether node `at` knows a route of node `of` within `timeout`.
fn routes_known(cluster: &TestCluster, at: u32, of: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let known = cluster.status(at)["members"]
            .as_array()
            .is_some_and(|members| {
                members
                    .iter()
                    .any(|m| m["node"] == of && m["route_count"].as_u64() >= Some(1))
            });
        if known || Instant::now() >= deadline {
            return known;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that the publisher's node learns the resumed session's route (its subscription
/// came along) within 5 s.
fn check_routed(cluster: &TestCluster, layout: Layout, findings: &mut Findings) {
    let routed = routes_known(
        cluster,
        layout.publisher,
        layout.resume,
        Duration::from_secs(5),
    );
    findings.check(routed, || {
        format!(
            "node {} knows no route of node {} after the resume",
            layout.publisher, layout.resume
        )
    });
}

/// The PUBLISH packets `client` receives until `expected` distinct payloads arrived, nothing
/// came for [`DELIVERY_SILENCE`], or [`DELIVERY_WAIT`] passed.
fn receive(client: &V5, expected: usize) -> Vec<Publish> {
    let mut received = Vec::new();
    let mut distinct = HashSet::new();
    let deadline = Instant::now() + DELIVERY_WAIT;
    while distinct.len() < expected {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match client.events.recv_timeout(left.min(DELIVERY_SILENCE)) {
            Ok(rumqttc::v5::Event::Incoming(Packet::Publish(publish))) => {
                distinct.insert(publish.payload.clone());
                received.push(publish);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    received
}

/// Checks that `received` holds each of `expected` in order of first appearance, nothing
/// else, and repeats only where `repeats_allowed` and marked DUP.
fn check_delivery(
    findings: &mut Findings,
    what: &str,
    expected: &[String],
    received: &[(String, bool)],
    repeats_allowed: bool,
) {
    let position: HashMap<&str, usize> = expected
        .iter()
        .enumerate()
        .map(|(i, payload)| (payload.as_str(), i))
        .collect();
    let mut seen = HashSet::new();
    let mut first_appearances = Vec::new();
    for (payload, dup) in received {
        if !seen.insert(payload.as_str()) {
            findings.check(repeats_allowed && *dup, || {
                format!("{what}: {payload} arrived again (DUP {dup})")
            });
            continue;
        }
        match position.get(payload.as_str()) {
            Some(&index) => first_appearances.push(index),
            None => findings
                .0
                .push(format!("{what}: unexpected payload {payload}")),
        }
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|p| !seen.contains(p.as_str()))
        .collect();
    findings.check(missing.is_empty(), || {
        format!(
            "{what}: {} of {} messages missing (first missing: {:?}; {} received in all)",
            missing.len(),
            expected.len(),
            missing.first(),
            received.len()
        )
    });
    let disorder = first_appearances.windows(2).find(|pair| pair[0] > pair[1]);
    findings.check(disorder.is_none(), || {
        format!("{what}: out of order: {disorder:?} (positions of first appearances)")
    });
}

fn with_dup(publishes: &[Publish]) -> Vec<(String, bool)> {
    publishes
        .iter()
        .map(|p| (String::from_utf8_lossy(&p.payload).into_owned(), p.dup))
        .collect()
}

/// The kill (when the layout asks for it) after the replication wait; the instant from which
/// the failover is timed.
fn kill_home(cluster: &mut TestCluster, layout: Layout, findings: &mut Findings) -> Instant {
    if layout.kill {
        if let Err(report) = wait_replicated(cluster, layout.home) {
            findings.0.push(report);
        }
        cluster.node_mut(layout.home).broker.kill();
    }
    Instant::now()
}

/// Checks the resumed session's CONNACK: session present, within [`FAILOVER_CONNACK_MAX`].
fn check_connack(findings: &mut Findings, layout: Layout, present: bool, elapsed: Duration) {
    let from = if layout.kill { "the kill" } else { "CONNECT" };
    println!(
        "resumed on node {} (home node {} {}): CONNACK after {elapsed:?} since {from}, session present {present}",
        layout.resume,
        layout.home,
        if layout.kill { "killed" } else { "alive" }
    );
    findings.check(present, || {
        format!(
            "CONNACK on node {}: session present is false",
            layout.resume
        )
    });
    findings.check(elapsed < FAILOVER_CONNACK_MAX, || {
        format!("CONNACK {elapsed:?} after {from} (at most {FAILOVER_CONNACK_MAX:?})")
    });
}

/// The QoS 1 scenario: a persistent subscriber of `fo/#` at QoS 1 goes offline; the publisher
/// gets PUBACKs for `count` messages; the home node dies (or not); the subscriber resumes
/// elsewhere and gets them all, then `count_after` more published after the failover.
fn qos1_failover(layout: Layout, count: usize) {
    let mut cluster = TestCluster::start(layout.cores, layout.edges);
    let mut findings = Findings::default();
    let subscriber = persistent(cluster.node(layout.home).broker.port, "fo-sub");
    assert!(!subscriber.connack.session_present, "a new session");
    subscriber.subscribe("fo/#", QoS::AtLeastOnce);
    cluster.wait_routes(layout.publisher, layout.home, 1);
    subscriber.client.disconnect().unwrap();
    assert!(
        subscriber.ended_within(Duration::from_secs(5)),
        "disconnected"
    );
    drop(subscriber);

    let publisher = v5(cluster.node(layout.publisher).broker.port, "fo-pub", |_| {});
    let before = tags("before", count);
    publish_acknowledged(&publisher, "fo/a", QoS::AtLeastOnce, &before);
    wait_held(&cluster, layout.home, count as u64);

    let killed = kill_home(&mut cluster, layout, &mut findings);
    let resumed = persistent(cluster.node(layout.resume).broker.port, "fo-sub");
    check_connack(
        &mut findings,
        layout,
        resumed.connack.session_present,
        killed.elapsed(),
    );
    let received = receive(&resumed, count);
    check_delivery(
        &mut findings,
        "queued before the kill",
        &before,
        &with_dup(&received),
        true,
    );

    // Published after the failover: the subscription serves from its new node.
    check_routed(&cluster, layout, &mut findings);
    let after = tags("after", 10);
    publish_acknowledged(&publisher, "fo/b", QoS::AtLeastOnce, &after);
    let received = receive(&resumed, after.len());
    check_delivery(
        &mut findings,
        "published after the failover",
        &after,
        &with_dup(&received),
        true,
    );
    findings.assert_none(&format!(
        "QoS 1 session of node {} resumed on node {} ({} cores, {} edges, home {})",
        layout.home,
        layout.resume,
        layout.cores,
        layout.edges,
        if layout.kill { "killed" } else { "alive" }
    ));
}

const THREE_CORES: Layout = Layout {
    cores: 3,
    edges: 0,
    home: 1,
    publisher: 2,
    resume: 3,
    kill: true,
};

const CORES_AND_EDGES: Layout = Layout {
    cores: 3,
    edges: 2,
    home: 4,
    publisher: 5,
    resume: 1,
    kill: true,
};

#[test]
fn queued_qos1_messages_survive_the_home_nodes_death() {
    qos1_failover(THREE_CORES, 300);
}

#[test]
fn control_queued_qos1_messages_follow_a_takeover_from_a_live_home() {
    qos1_failover(
        Layout {
            kill: false,
            ..THREE_CORES
        },
        300,
    );
}

#[test]
fn an_edges_session_survives_the_edges_death_and_resumes_on_a_core() {
    qos1_failover(CORES_AND_EDGES, 100);
}

#[test]
fn control_an_edges_session_follows_a_takeover_to_a_core() {
    qos1_failover(
        Layout {
            kill: false,
            ..CORES_AND_EDGES
        },
        100,
    );
}

// ---- QoS 2, with a raw client that controls each acknowledgement ----

/// A packet a raw 5.0 client receives.
#[derive(Debug)]
enum Incoming {
    Publish {
        dup: bool,
        qos: u8,
        packet_id: u16,
        payload: String,
    },
    PubRel {
        packet_id: u16,
    },
    Other {
        first_byte: u8,
        body: Vec<u8>,
    },
}

/// A 5.0 client on a raw socket, so that the test decides which QoS 2 steps it answers.
struct RawV5 {
    stream: TcpStream,
    buffer: Vec<u8>,
}

fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![first_byte];
    variable_byte_integer(body.len(), &mut bytes);
    bytes.extend_from_slice(body);
    bytes
}

/// A variable length integer at the start of `bytes`: its value and length.
fn read_variable_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().enumerate().take(4) {
        value += usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

impl RawV5 {
    /// CONNECT with clean start 0, session expiry 300 s and `receive_maximum`; the client and
    /// whether the session was present.
    fn connect(port: u16, client_id: &str, receive_maximum: u16) -> (Self, bool) {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut client = Self {
            stream,
            buffer: Vec::new(),
        };
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x00, 0x00, 0x3c];
        let mut properties = vec![0x11];
        properties.extend_from_slice(&300u32.to_be_bytes());
        properties.push(0x21);
        properties.extend_from_slice(&receive_maximum.to_be_bytes());
        variable_byte_integer(properties.len(), &mut body);
        body.extend(properties);
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        client.send(&packet(0x10, &body));
        match client.next(Duration::from_secs(10)) {
            Some(Incoming::Other {
                first_byte: 0x20,
                body,
            }) if body.len() >= 2 && body[1] == 0x00 => {
                let present = body[0] & 0x01 == 1;
                (client, present)
            }
            other => panic!("no successful CONNACK for {client_id}: {other:?}"),
        }
    }

    fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut body = vec![0x00, 0x01, 0x00];
        body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        body.push(qos);
        self.send(&packet(0x82, &body));
        match self.next(Duration::from_secs(5)) {
            Some(Incoming::Other {
                first_byte: 0x90,
                body,
            }) if body.last() == Some(&qos) => {}
            other => panic!("SUBACK granting QoS {qos} for {filter}: {other:?}"),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn acknowledge(&mut self, first_byte: u8, packet_id: u16) {
        let id = packet_id.to_be_bytes();
        self.send(&[first_byte, 0x02, id[0], id[1]]);
    }

    /// DISCONNECT, normal: the session stays for its expiry.
    fn disconnect(mut self) {
        self.send(&[0xE0, 0x00]);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// The next packet within `timeout`, or None (nothing came, or the connection ended).
    fn next(&mut self, timeout: Duration) -> Option<Incoming> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((first_byte, body)) = self.take_packet() {
                return Some(Self::parse(first_byte, body));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn take_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        let (length, length_size) = read_variable_length(self.buffer.get(1..)?)?;
        let end = 1 + length_size + length;
        if self.buffer.len() < end {
            return None;
        }
        let first_byte = self.buffer[0];
        let body = self.buffer[1 + length_size..end].to_vec();
        self.buffer.drain(..end);
        Some((first_byte, body))
    }

    /// The packet, or `Other` with its bytes when it is not a well-formed PUBLISH or PUBREL.
    fn parse(first_byte: u8, body: Vec<u8>) -> Incoming {
        let parsed = match first_byte >> 4 {
            3 => Self::parse_publish(first_byte, &body),
            6 => body.get(..2).map(|id| Incoming::PubRel {
                packet_id: u16::from_be_bytes([id[0], id[1]]),
            }),
            _ => None,
        };
        parsed.unwrap_or(Incoming::Other { first_byte, body })
    }

    fn parse_publish(first_byte: u8, body: &[u8]) -> Option<Incoming> {
        let qos = (first_byte >> 1) & 0x03;
        let topic_length = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
        let mut at = 2 + topic_length;
        let mut packet_id = 0;
        if qos > 0 {
            packet_id = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
            at += 2;
        }
        let (properties, size) = read_variable_length(body.get(at..)?)?;
        at += size + properties;
        Some(Incoming::Publish {
            dup: first_byte & 0x08 != 0,
            qos,
            packet_id,
            payload: String::from_utf8_lossy(body.get(at..)?).into_owned(),
        })
    }
}

/// What a resumed raw QoS 2 receiver saw: the payloads it took, in order with their DUP flag
/// (it takes a message when it sends PUBREC, and drops a resent PUBLISH of a packet
/// identifier it has PUBREC'd and not yet seen released), and the packet identifiers released.
#[derive(Default)]
struct Qos2Receipt {
    taken: Vec<(String, bool)>,
    released: Vec<u16>,
    other: Vec<String>,
}

/// Answers every QoS 2 step (PUBREC, PUBCOMP) until `expected` payloads are taken, a silence
/// of [`DELIVERY_SILENCE`] or [`DELIVERY_WAIT`]; then listens a little longer for repeats.
fn receive_qos2(client: &mut RawV5, expected: usize, receipt: &mut Qos2Receipt) {
    let mut unreleased: HashSet<u16> = HashSet::new();
    let start = receipt.taken.len();
    let deadline = Instant::now() + DELIVERY_WAIT;
    let mut settle_until: Option<Instant> = None;
    loop {
        let until = settle_until.unwrap_or(deadline);
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return;
        };
        let Some(incoming) = client.next(left.min(DELIVERY_SILENCE)) else {
            return;
        };
        match incoming {
            Incoming::Publish {
                dup,
                qos: 2,
                packet_id,
                payload,
            } => {
                client.acknowledge(0x50, packet_id);
                if unreleased.insert(packet_id) {
                    receipt.taken.push((payload, dup));
                }
            }
            Incoming::PubRel { packet_id } => {
                client.acknowledge(0x70, packet_id);
                unreleased.remove(&packet_id);
                receipt.released.push(packet_id);
            }
            other => receipt.other.push(format!("{other:?}")),
        }
        if settle_until.is_none() && receipt.taken.len() - start >= expected {
            settle_until = Some(Instant::now() + Duration::from_millis(500));
        }
    }
}

/// The QoS 2 scenario: a raw persistent subscriber of `fo2/#` at QoS 2 with receive maximum
/// 4 gets 4 of `count` messages in flight, PUBRECs the first 2 (the broker answers PUBREL,
/// which it does not complete) and leaves the others unanswered, then goes offline. The home
/// node dies (or not); the subscriber resumes elsewhere: PUBREL again for the 2, every other
/// message exactly once, in order; then 10 more published after the failover.
fn qos2_failover(layout: Layout, count: usize) {
    let mut cluster = TestCluster::start(layout.cores, layout.edges);
    let mut findings = Findings::default();
    let (mut subscriber, present) =
        RawV5::connect(cluster.node(layout.home).broker.port, "fo2-sub", 4);
    assert!(!present, "a new session");
    subscriber.subscribe("fo2/#", 2);
    cluster.wait_routes(layout.publisher, layout.home, 1);

    let publisher = v5(
        cluster.node(layout.publisher).broker.port,
        "fo2-pub",
        |_| {},
    );
    let before = tags("before", count);
    publish_acknowledged(&publisher, "fo2/a", QoS::ExactlyOnce, &before);

    // The window: the first 4, in order; PUBREC the first 2 and read their PUBRELs.
    let mut in_flight = Vec::new();
    while in_flight.len() < 4 {
        match subscriber.next(Duration::from_secs(5)) {
            Some(Incoming::Publish {
                qos: 2,
                packet_id,
                payload,
                ..
            }) => in_flight.push((packet_id, payload)),
            other => panic!("the 4 in-flight QoS 2 PUBLISHes: {other:?} after {in_flight:?}"),
        }
    }
    let window: Vec<&str> = in_flight.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        window,
        &before[..4],
        "the window holds the first 4, in order"
    );
    let mut receipt = Qos2Receipt::default();
    let recorded: Vec<u16> = in_flight[..2].iter().map(|&(id, _)| id).collect();
    for (packet_id, payload) in &in_flight[..2] {
        subscriber.acknowledge(0x50, *packet_id);
        receipt.taken.push((payload.clone(), false));
    }
    for &packet_id in &recorded {
        match subscriber.next(Duration::from_secs(5)) {
            Some(Incoming::PubRel { packet_id: id }) if id == packet_id => {}
            other => panic!("PUBREL for packet {packet_id}: {other:?}"),
        }
    }
    assert!(
        subscriber.next(Duration::from_millis(300)).is_none(),
        "nothing beyond the window of 4 (PUBREC does not free a slot)"
    );
    subscriber.disconnect();
    wait_held(&cluster, layout.home, count as u64);

    let killed = kill_home(&mut cluster, layout, &mut findings);
    let (mut resumed, present) =
        RawV5::connect(cluster.node(layout.resume).broker.port, "fo2-sub", 1000);
    check_connack(&mut findings, layout, present, killed.elapsed());
    receive_qos2(&mut resumed, count - recorded.len(), &mut receipt);
    let mut released = receipt.released.clone();
    released.sort_unstable();
    findings.check(released.iter().take(2).eq(recorded.iter()), || {
        format!("PUBREL resent for packets {recorded:?}: released {released:?}")
    });
    check_delivery(
        &mut findings,
        "QoS 2 before the kill",
        &before,
        &receipt.taken,
        false,
    );
    findings.check(receipt.other.is_empty(), || {
        format!("unexpected packets: {:?}", receipt.other)
    });

    check_routed(&cluster, layout, &mut findings);
    let after = tags("after", 10);
    publish_acknowledged(&publisher, "fo2/b", QoS::ExactlyOnce, &after);
    let mut later = Qos2Receipt::default();
    receive_qos2(&mut resumed, after.len(), &mut later);
    check_delivery(
        &mut findings,
        "QoS 2 published after the failover",
        &after,
        &later.taken,
        false,
    );
    findings.assert_none(&format!(
        "QoS 2 session of node {} resumed on node {} (home {})",
        layout.home,
        layout.resume,
        if layout.kill { "killed" } else { "alive" }
    ));
}

#[test]
fn queued_and_in_flight_qos2_messages_survive_the_home_nodes_death_exactly_once() {
    qos2_failover(THREE_CORES, 100);
}

#[test]
fn control_queued_and_in_flight_qos2_messages_follow_a_takeover_exactly_once() {
    qos2_failover(
        Layout {
            kill: false,
            ..THREE_CORES
        },
        100,
    );
}

// ---- 3.1.1, clean session 0 ----

/// A 3.1.1 persistent subscriber (clean session 0) of `fo4/#` at QoS 1 goes offline; 50
/// messages are acknowledged; the home node dies (or not); it resumes on node 3.
fn v311_failover(kill: bool) {
    let layout = Layout {
        kill,
        ..THREE_CORES
    };
    let mut cluster = TestCluster::start(layout.cores, layout.edges);
    let mut findings = Findings::default();
    let persistent_v4 = |options: &mut rumqttc::MqttOptions| {
        options.set_clean_session(false);
    };
    let (subscriber, connack) = v4_connected(
        cluster.node(layout.home).broker.port,
        "fo4-sub",
        persistent_v4,
        Duration::from_secs(10),
    );
    assert!(!connack.session_present, "a new session");
    subscriber.subscribe("fo4/#", rumqttc::QoS::AtLeastOnce);
    cluster.wait_routes(layout.publisher, layout.home, 1);
    subscriber.client.disconnect().unwrap();
    assert!(
        subscriber
            .ended
            .recv_timeout(Duration::from_secs(5))
            .is_ok(),
        "disconnected"
    );
    drop(subscriber);

    let publisher = v4(
        cluster.node(layout.publisher).broker.port,
        "fo4-pub",
        |_| {},
    );
    let before = tags("before", 50);
    for payload in &before {
        publisher
            .client
            .publish("fo4/a", rumqttc::QoS::AtLeastOnce, false, payload.clone())
            .unwrap();
    }
    publisher.acknowledged(before.len(), Duration::from_secs(5));
    wait_held(&cluster, layout.home, before.len() as u64);

    let killed = kill_home(&mut cluster, layout, &mut findings);
    let (resumed, connack) = v4_connected(
        cluster.node(layout.resume).broker.port,
        "fo4-sub",
        persistent_v4,
        Duration::from_secs(10),
    );
    check_connack(
        &mut findings,
        layout,
        connack.session_present,
        killed.elapsed(),
    );
    let received: Vec<(String, bool)> = resumed
        .publishes(before.len(), DELIVERY_WAIT)
        .iter()
        .map(|p| (String::from_utf8_lossy(&p.payload).into_owned(), p.dup))
        .collect();
    check_delivery(
        &mut findings,
        "3.1.1 queued before the kill",
        &before,
        &received,
        true,
    );
    findings.assert_none(&format!(
        "3.1.1 session of node 1 resumed on node 3 (home {})",
        if kill { "killed" } else { "alive" }
    ));
}

#[test]
fn a_v311_clean_session_0_session_survives_the_home_nodes_death() {
    v311_failover(true);
}

#[test]
fn control_a_v311_clean_session_0_session_follows_a_takeover() {
    v311_failover(false);
}

// ---- configuration ----

/// With `session_replicas = 0` no node holds a replica, while the home node reports its
/// persistent session and nothing waiting for replication.
#[test]
fn session_replicas_0_keeps_no_replicas() {
    let cluster = TestCluster::start_with(3, 0, |_| "session_replicas = 0".to_string());
    let subscriber = persistent(cluster.node(1).broker.port, "fo0-sub");
    subscriber.subscribe("fo0/#", QoS::AtLeastOnce);
    cluster.wait_routes(2, 1, 1);
    subscriber.client.disconnect().unwrap();
    assert!(
        subscriber.ended_within(Duration::from_secs(5)),
        "disconnected"
    );
    let publisher = v5(cluster.node(2).broker.port, "fo0-pub", |_| {});
    publish_acknowledged(&publisher, "fo0/a", QoS::AtLeastOnce, &tags("m", 20));
    wait_held(&cluster, 1, 20);

    cluster.wait_status(1, Duration::from_secs(10), "home to 1 session", |s| {
        sessions_field(s, "home") == Some(1)
    });
    // Long enough for replication, had it been on, to show (the test links beat every 100 ms).
    std::thread::sleep(Duration::from_secs(1));
    for node in 1..=3 {
        let status = cluster.status(node);
        assert_eq!(
            (
                sessions_field(&status, "replica"),
                sessions_field(&status, "replication_unacknowledged")
            ),
            (Some(0), Some(0)),
            "node {node}: no replica and nothing to replicate; sessions: {}",
            status["sessions"]
        );
    }
}

/// The delivery checker itself, on made-up receipts: it must see a gap, a reordering, a QoS 1
/// repeat without DUP and any QoS 2 repeat, and pass a QoS 1 repeat marked DUP.
#[test]
fn the_delivery_check_finds_gaps_reorderings_and_repeats() {
    let expected = tags("m", 3);
    let received = |list: &[(&str, bool)]| -> Vec<(String, bool)> {
        list.iter().map(|&(p, dup)| (p.to_string(), dup)).collect()
    };
    let findings_of = |list: &[(&str, bool)], repeats_allowed: bool| {
        let mut findings = Findings::default();
        check_delivery(
            &mut findings,
            "t",
            &expected,
            &received(list),
            repeats_allowed,
        );
        findings.0
    };
    let in_order = [("m-000", false), ("m-001", false), ("m-002", false)];
    assert!(findings_of(&in_order, false).is_empty());
    let redelivered = [
        ("m-000", false),
        ("m-001", false),
        ("m-001", true),
        ("m-002", false),
    ];
    assert!(findings_of(&redelivered, true).is_empty());
    assert_eq!(
        findings_of(&redelivered, false).len(),
        1,
        "QoS 2: no repeat"
    );
    let repeated_fresh = [
        ("m-000", false),
        ("m-000", false),
        ("m-001", false),
        ("m-002", false),
    ];
    assert_eq!(
        findings_of(&repeated_fresh, true).len(),
        1,
        "a repeat without DUP"
    );
    let gap = [("m-000", false), ("m-002", false)];
    assert_eq!(findings_of(&gap, false).len(), 1, "a missing message");
    let reordered = [("m-001", false), ("m-000", false), ("m-002", false)];
    assert_eq!(findings_of(&reordered, false).len(), 1, "out of order");
    let stranger = [
        ("m-000", false),
        ("m-001", false),
        ("m-002", false),
        ("x", false),
    ];
    assert_eq!(
        findings_of(&stranger, false).len(),
        1,
        "an unexpected payload"
    );
}

// ---- one owner: the old home comes back; two clients reconnect at once ----

/// The sum of `"home"` (persistent sessions) over `nodes`.
fn homes(cluster: &TestCluster, nodes: &[u32]) -> u64 {
    nodes
        .iter()
        .map(|&node| sessions_field(&cluster.status(node), "home").unwrap_or(0))
        .sum()
}

/// A persistent subscriber `PREFIX-sub` of `PREFIX/#` on node 1 goes offline; `PREFIX-pub` on
/// node 2 gets PUBACKs for `count` messages on `PREFIX/a`; once node 1 holds and has
/// replicated them, node 1 is killed. Returns the publisher and the payloads.
fn queue_then_kill_home(
    cluster: &mut TestCluster,
    findings: &mut Findings,
    prefix: &str,
    count: usize,
) -> (V5, Vec<String>) {
    let subscriber = persistent(cluster.node(1).broker.port, &format!("{prefix}-sub"));
    subscriber.subscribe(&format!("{prefix}/#"), QoS::AtLeastOnce);
    cluster.wait_routes(2, 1, 1);
    cluster.wait_routes(3, 1, 1);
    subscriber.client.disconnect().unwrap();
    assert!(
        subscriber.ended_within(Duration::from_secs(5)),
        "disconnected"
    );
    drop(subscriber);
    let publisher = v5(
        cluster.node(2).broker.port,
        &format!("{prefix}-pub"),
        |_| {},
    );
    let before = tags("before", count);
    publish_acknowledged(
        &publisher,
        &format!("{prefix}/a"),
        QoS::AtLeastOnce,
        &before,
    );
    wait_held(cluster, 1, before.len() as u64);
    if let Err(report) = wait_replicated(cluster, 1) {
        findings.0.push(report);
    }
    cluster.node_mut(1).broker.kill();
    (publisher, before)
}

/// The home node (with a data directory) dies with 20 queued messages; the client resumes on
/// node 3 and takes them; 10 more queue for it there while it is offline; the old home
/// restarts and recovers its stale copy from disk. That copy must end (fenced: node 3 serves
/// the session), so that the client, back on the old home, gets exactly the 10 messages it
/// is owed, and what is published afterwards arrives once.
#[test]
fn the_old_home_restarting_does_not_make_a_second_owner() {
    let root = std::env::temp_dir().join(format!("shardmq-fence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut cluster = TestCluster::start_persistent(3, 0, &root);
    let mut findings = Findings::default();
    let (publisher, before) = queue_then_kill_home(&mut cluster, &mut findings, "fr", 20);
    // Resumed once the others see node 1 down: the claim then does not wait in node 3's
    // queue for node 1 (which, delivered to its next run, would end the recovered copy as a
    // takeover, not as the fencing this test is about).
    for node in [2, 3] {
        cluster.wait_status(
            node,
            Duration::from_secs(10),
            "node 1 is not up",
            |status| {
                status["members"].as_array().is_some_and(|members| {
                    !members.iter().any(|m| m["node"] == 1 && m["state"] == "up")
                })
            },
        );
    }
    std::thread::sleep(Duration::from_millis(200));

    let resumed = persistent(cluster.node(3).broker.port, "fr-sub");
    findings.check(resumed.connack.session_present, || {
        "resume on node 3: session present is false".into()
    });
    let received = receive(&resumed, before.len());
    check_delivery(
        &mut findings,
        "queued before the kill",
        &before,
        &with_dup(&received),
        true,
    );
    resumed.client.disconnect().unwrap();
    assert!(resumed.ended_within(Duration::from_secs(5)), "disconnected");
    drop(resumed);
    let during = tags("during", 10);
    publish_acknowledged(&publisher, "fr/b", QoS::AtLeastOnce, &during);
    wait_held(&cluster, 3, during.len() as u64);

    cluster.restart(1);
    cluster.wait_all_members(Duration::from_secs(20));
    // The recovered copy ends once node 1 hears that node 3 (or the node that installed the
    // replica) serves the session; until then node 1 may count it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while homes(&cluster, &[1]) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    findings.check(homes(&cluster, &[1, 2, 3]) == 1, || {
        format!(
            "one owner after the old home's restart; status sessions: {}",
            sessions_of(&cluster, &[1, 2, 3])
        )
    });
    findings.check(
        sessions_field(&cluster.status(1), "sessions_fenced") == Some(1),
        || {
            let log = cluster.node(1).broker.log_text();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("fr-sub")).collect();
            format!(
                "node 1 ends the copy it recovered; status sessions: {}; node 1's log of the client:\n{}",
                sessions_of(&cluster, &[1]),
                lines.join("\n")
            )
        },
    );

    // Back on the old home: exactly what node 3 held, not the stale copy's 20.
    let back = persistent(cluster.node(1).broker.port, "fr-sub");
    findings.check(back.connack.session_present, || {
        "back on node 1: session present is false".into()
    });
    let received = receive(&back, during.len());
    check_delivery(
        &mut findings,
        "queued on node 3 while offline",
        &during,
        &with_dup(&received),
        true,
    );
    // The session moved to node 1 by the claim: its route spreads to the publisher's node
    // (as after any takeover) before what follows is published.
    findings.check(routes_known(&cluster, 2, 1, Duration::from_secs(5)), || {
        "node 2 knows no route of node 1 after the client came back".into()
    });
    let after = tags("after", 10);
    publish_acknowledged(&publisher, "fr/c", QoS::AtLeastOnce, &after);
    let received = receive(&back, after.len());
    check_delivery(
        &mut findings,
        "published after the old home's return",
        &after,
        &with_dup(&received),
        false,
    );
    findings.check(homes(&cluster, &[1, 2, 3]) == 1, || {
        format!(
            "one owner at the end; status sessions: {}",
            sessions_of(&cluster, &[1, 2, 3])
        )
    });
    drop(cluster);
    let _ = std::fs::remove_dir_all(&root);
    findings.assert_none("the old home restarts after a failover");
}

/// After the home's death the client connects to nodes 2 and 3 at the same moment: the
/// claims line up, one connection is taken over (0x8E), and one session remains, owning
/// every acknowledged message (each first arrives on one of the two connections) and
/// receiving what is published next exactly once.
#[test]
fn two_simultaneous_reconnects_after_a_failover_leave_one_owner() {
    let mut cluster = TestCluster::start(3, 0);
    let mut findings = Findings::default();
    let (publisher, before) = queue_then_kill_home(&mut cluster, &mut findings, "fs", 30);

    let ports = [cluster.node(2).broker.port, cluster.node(3).broker.port];
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let clients: Vec<V5> = ports
        .iter()
        .map(|&port| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                persistent(port, "fs-sub")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|handle| handle.join().expect("a connecting thread"))
        .collect();
    // Everything either connection received until the dust settles.
    let mut received: Vec<Vec<Publish>> = vec![Vec::new(), Vec::new()];
    let settle = Instant::now() + Duration::from_secs(5);
    let mut ended = [false, false];
    while Instant::now() < settle {
        for (i, client) in clients.iter().enumerate() {
            while let Ok(event) = client.events.try_recv() {
                if let rumqttc::v5::Event::Incoming(Packet::Publish(publish)) = event {
                    received[i].push(publish);
                }
            }
            ended[i] |= client.ended.try_recv().is_ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    findings.check(ended.iter().filter(|&&e| e).count() == 1, || {
        format!("exactly one of the two connections is taken over (ended: {ended:?})")
    });
    findings.check(clients.iter().any(|c| c.connack.session_present), || {
        "neither connection found the session".into()
    });
    // Every acknowledged message reached the client, on one connection or the other.
    let union: Vec<(String, bool)> = received.iter().flat_map(|r| with_dup(r)).collect();
    let mut first = HashSet::new();
    let union_firsts: Vec<(String, bool)> = union
        .into_iter()
        .filter(|(payload, _)| first.insert(payload.clone()))
        .collect();
    let mut sorted = union_firsts.clone();
    sorted.sort();
    check_delivery(
        &mut findings,
        "queued before the kill (both connections)",
        &before,
        &sorted,
        true,
    );
    findings.check(homes(&cluster, &[2, 3]) == 1, || {
        format!(
            "one owner after the two reconnects; status sessions: {}",
            sessions_of(&cluster, &[2, 3])
        )
    });
    if let Some(live) = ended.iter().position(|&e| !e) {
        let after = tags("after", 10);
        publish_acknowledged(&publisher, "fs/b", QoS::AtLeastOnce, &after);
        let got = receive(&clients[live], after.len());
        check_delivery(
            &mut findings,
            "published after the reconnects (the connection that stayed)",
            &after,
            &with_dup(&got),
            false,
        );
        let other = &clients[1 - live];
        findings.check(
            other
                .events
                .try_iter()
                .all(|e| !matches!(e, rumqttc::v5::Event::Incoming(Packet::Publish(_)))),
            || "the connection that was taken over received later messages".into(),
        );
    }
    findings.assert_none("two simultaneous reconnects after a failover");
}
