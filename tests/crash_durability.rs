//! Crash durability against real broker processes (issue 13): a randomized crash harness
//! (rounds of QoS 1 and QoS 2 load, a SIGKILL at a random point of each, a restart on the
//! same data directory, sometimes with another shard count), a full disk, and recovery from a
//! torn tail, a corrupt tail and a missing middle segment.
//!
//! The clients here are written on the project's own codec (`shardmq_net::mqtt`) rather than
//! rumqttc, because the harness must act as a receiver that keeps its QoS 2 session state
//! across connections (the packet identifiers it has answered PUBREC to and not yet seen
//! PUBREL for): only then does a second delivery of a QoS 2 message mean that the broker
//! delivered it twice. rumqttc forgets that state with each connection.
//!
//! `SHARDMQ_CRASH_SEED=N` replays a harness run's choices (printed at its start);
//! `SHARDMQ_CRASH_ROUNDS=N` runs more rounds than the default 5.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use shardmq_net::mqtt::{
    self, AckProperties, Connect, ConnectProperties, DecodeOptions, Disconnect,
    DisconnectProperties, Packet, ProtocolVersion, PubAck, Publish, PublishProperties, QoS,
    ReasonCode, Sender, Subscribe, SubscribeProperties, SubscriptionOptions,
};
use support::Broker;

// ---------------------------------------------------------------------------------------
// A small MQTT 5.0 client on the project's codec.

/// One MQTT 5.0 connection: blocking writes, reads with a deadline.
struct Client {
    stream: TcpStream,
    received: Vec<u8>,
}

impl Client {
    /// Connects and returns the client with the broker's CONNACK, or the I/O error (the
    /// broker may be gone).
    fn connect(
        port: u16,
        client_id: &str,
        clean_start: bool,
        expiry_seconds: u32,
    ) -> std::io::Result<(Self, mqtt::ConnAck)> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream,
            received: Vec::new(),
        };
        client.send(&Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start,
            keep_alive_seconds: 0,
            properties: ConnectProperties {
                session_expiry_interval: (expiry_seconds > 0).then_some(expiry_seconds),
                ..ConnectProperties::default()
            },
            client_id: ByteString::from(client_id),
            will: None,
            username: None,
            password: None,
        })))?;
        match client.recv(Duration::from_secs(10))? {
            Some(Packet::ConnAck(connack)) => Ok((client, *connack)),
            other => Err(std::io::Error::other(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    fn send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut bytes = bytes::BytesMut::new();
        mqtt::encode(packet, ProtocolVersion::V5, &mut bytes);
        self.stream.write_all(&bytes)
    }

    /// The next packet within `timeout` (None when it passes), or the error that ended the
    /// connection (`UnexpectedEof` when the broker closed it).
    fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Packet>> {
        let deadline = Instant::now() + timeout;
        let options = DecodeOptions {
            version: ProtocolVersion::V5,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if !self.received.is_empty() {
                let bytes = Bytes::copy_from_slice(&self.received);
                match mqtt::decode(&bytes, &options) {
                    Ok(Some((packet, used))) => {
                        self.received.drain(..used);
                        return Ok(Some(packet));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        return Err(std::io::Error::other(format!(
                            "the broker sent bytes that do not decode: {error:?}"
                        )));
                    }
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => self.received.extend_from_slice(&chunk[..read]),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        packet_id: u16,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: ByteString::from(topic),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
            properties: PublishProperties::default(),
            payload: Bytes::copy_from_slice(payload),
        }))
    }

    fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) -> std::io::Result<()> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            properties: SubscribeProperties::default(),
            filters: vec![(ByteString::from(filter), SubscriptionOptions::new(qos))],
        }))
    }

    /// DISCONNECT with reason 0: the session stays (its expiry counts from now).
    fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect(Disconnect {
            reason: ReasonCode::SUCCESS,
            properties: DisconnectProperties::default(),
        }));
        // Wait for the broker to close, so that the session is offline when we return.
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self.recv(Duration::from_secs(5));
    }

    /// Waits for a SUBACK and returns its reason codes.
    fn suback(&mut self, timeout: Duration) -> Vec<ReasonCode> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("a SUBACK in time");
            match self.recv(left).expect("the connection stays up") {
                Some(Packet::SubAck(suback)) => return suback.reasons,
                Some(_) => {}
                None => panic!("no SUBACK within {timeout:?}"),
            }
        }
    }
}

/// An acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP) of success.
fn success(packet_id: u16) -> PubAck {
    PubAck {
        packet_id,
        reason: ReasonCode::SUCCESS,
        properties: AckProperties::default(),
    }
}

// ---------------------------------------------------------------------------------------
// The crash harness.

const SUBSCRIBER: &str = "crash-keeper";
const EXPIRY_SECONDS: u32 = 3600;
const RETAINED_TOPICS: usize = 5;
/// QoS 1/2 PUBLISHes the publisher keeps in flight at once.
const PUBLISH_WINDOW: usize = 24;
/// How long any one wait of the harness may take (generous: a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(30);

/// What the persistent subscriber saw, across all its connections (its client-side session
/// state included).
#[derive(Default)]
struct SubscriberState {
    /// Deliveries per payload (a QoS 2 payload counted once per first PUBLISH).
    delivered: BTreeMap<String, u32>,
    /// QoS 2 packet identifiers answered with PUBREC and not yet released, with the payload:
    /// the receiver's session state, kept across connections as MQTT asks of a client.
    awaiting_release: BTreeMap<u16, String>,
    /// Filters the broker granted with a SUBACK.
    granted: BTreeSet<String>,
    /// Broken promises seen (a QoS 2 message delivered twice, a packet identifier reused).
    violations: Vec<String>,
    next_packet_id: u16,
}

impl SubscriberState {
    /// Handles one packet from the broker on the subscriber's connection; what to answer.
    fn on_packet(
        &mut self,
        packet: Packet,
        pending_subscribes: &mut BTreeMap<u16, String>,
    ) -> Option<Packet> {
        match packet {
            Packet::Publish(publish) => {
                let payload = String::from_utf8_lossy(&publish.payload).into_owned();
                let ack = PubAck {
                    packet_id: publish.packet_id,
                    reason: ReasonCode::SUCCESS,
                    properties: AckProperties::default(),
                };
                match publish.qos {
                    QoS::AtMostOnce => {
                        *self.delivered.entry(payload).or_default() += 1;
                        None
                    }
                    QoS::AtLeastOnce => {
                        *self.delivered.entry(payload).or_default() += 1;
                        Some(Packet::PubAck(ack))
                    }
                    QoS::ExactlyOnce => {
                        match self.awaiting_release.get(&publish.packet_id) {
                            Some(held) if *held == payload => {
                                // A resend of what we hold: not a new delivery.
                            }
                            Some(held) => {
                                self.violations.push(format!(
                                    "packet identifier {} reused for {payload:?} before PUBREL of {held:?}",
                                    publish.packet_id
                                ));
                            }
                            None => {
                                let count = self.delivered.entry(payload.clone()).or_default();
                                *count += 1;
                                if *count > 1 {
                                    self.violations.push(format!(
                                        "QoS 2 message {payload:?} delivered {count} times"
                                    ));
                                }
                                self.awaiting_release.insert(publish.packet_id, payload);
                            }
                        }
                        Some(Packet::PubRec(ack))
                    }
                }
            }
            Packet::PubRel(release) => {
                self.awaiting_release.remove(&release.packet_id);
                Some(Packet::PubComp(PubAck {
                    packet_id: release.packet_id,
                    reason: ReasonCode::SUCCESS,
                    properties: AckProperties::default(),
                }))
            }
            Packet::SubAck(suback) => {
                if let Some(filter) = pending_subscribes.remove(&suback.packet_id)
                    && suback.reasons.iter().all(|r| r.0 < 0x80)
                {
                    self.granted.insert(filter);
                }
                None
            }
            _ => None,
        }
    }

    fn packet_id(&mut self) -> u16 {
        // The subscriber's own packet identifiers (SUBSCRIBE) are apart from the broker's.
        self.next_packet_id = self.next_packet_id % 60_000 + 1;
        self.next_packet_id
    }
}

/// The persistent subscriber's connection, run on its own thread until the connection ends
/// or `stop` says so (then it disconnects, keeping the session). It subscribes to a new
/// extra filter at each count of `subscribe_at` deliveries, and goes offline after
/// `offline_after` deliveries if set.
fn run_subscriber(
    mut client: Client,
    state: Arc<Mutex<SubscriberState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut subscribe_at: Vec<(usize, String)>,
    offline_after: Option<usize>,
) {
    use std::sync::atomic::Ordering;
    let mut pending = BTreeMap::new();
    let mut seen = 0usize;
    subscribe_at.sort();
    subscribe_at.reverse();
    loop {
        while subscribe_at.last().is_some_and(|(at, _)| *at <= seen) {
            let Some((_, filter)) = subscribe_at.pop() else {
                break;
            };
            let packet_id = state.lock().unwrap().packet_id();
            pending.insert(packet_id, filter.clone());
            if client
                .subscribe(packet_id, &filter, QoS::AtLeastOnce)
                .is_err()
            {
                return;
            }
        }
        if offline_after.is_some_and(|n| seen >= n) || stop.load(Ordering::Relaxed) {
            return client.disconnect();
        }
        match client.recv(Duration::from_millis(50)) {
            Ok(Some(packet)) => {
                if matches!(packet, Packet::Publish(_)) {
                    seen += 1;
                }
                let answer = state.lock().unwrap().on_packet(packet, &mut pending);
                if let Some(answer) = answer
                    && client.send(&answer).is_err()
                {
                    return;
                }
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// The publisher's view of what the broker acknowledged.
#[derive(Default)]
struct Acknowledged {
    /// Payloads with a PUBACK (QoS 1) or PUBCOMP (QoS 2) of success.
    messages: BTreeSet<String>,
    /// Per retained topic: the values a recovered broker may hold, oldest first (None: no
    /// retained message). The first is the last acknowledged (or the state at the round's
    /// start); the rest were sent after it and not (yet) acknowledged.
    retained: BTreeMap<String, Vec<(u64, Option<String>)>>,
}

/// What the publisher sends next.
enum Op {
    Message {
        qos: QoS,
        topic: String,
        payload: String,
    },
    Retain {
        topic: String,
        value: Option<String>,
    },
}

/// An operation in flight at the publisher.
struct InFlight {
    qos: QoS,
    /// For a message: its payload; for a retained change: (topic, sequence).
    payload: Option<String>,
    retained: Option<(String, u64)>,
    released: bool,
}

struct Rng(fastrand::Rng);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n.max(1))
    }
    fn chance(&mut self, percent: u8) -> bool {
        self.0.u8(..100) < percent
    }
}

/// The publisher: runs `ops` with a window of `PUBLISH_WINDOW`, and kills the broker once
/// `kill_after` acknowledgements have come (or when all are done). Returns how many
/// acknowledgements came.
fn run_publisher(
    broker: &mut Broker,
    round: usize,
    ops: Vec<Op>,
    acknowledged: &mut Acknowledged,
    kill_after: usize,
    kill_spin_micros: u64,
) -> usize {
    let (mut client, connack) =
        Client::connect(broker.port, &format!("crash-writer-{round}"), true, 0)
            .expect("the publisher connects");
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    let mut in_flight: BTreeMap<u16, InFlight> = BTreeMap::new();
    let mut next_id = 0u16;
    let mut ops = ops.into_iter();
    let mut acks = 0usize;
    let mut refusals = Vec::new();
    let deadline = Instant::now() + WAIT;
    let kill = |broker: &mut Broker| {
        let until = Instant::now() + Duration::from_micros(kill_spin_micros);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        broker.kill();
    };
    loop {
        if acks >= kill_after {
            kill(broker);
            break;
        }
        // Fill the window.
        let mut sent_any = false;
        while in_flight.len() < PUBLISH_WINDOW {
            let Some(op) = ops.next() else { break };
            next_id = next_id % 65_000 + 1;
            let sent = match op {
                Op::Message {
                    qos,
                    topic,
                    payload,
                } => {
                    in_flight.insert(
                        next_id,
                        InFlight {
                            qos,
                            payload: Some(payload.clone()),
                            retained: None,
                            released: false,
                        },
                    );
                    client.publish(&topic, qos, false, next_id, payload.as_bytes())
                }
                Op::Retain { topic, value } => {
                    let candidates = acknowledged
                        .retained
                        .entry(topic.clone())
                        .or_insert_with(|| vec![(0, None)]);
                    let sequence = candidates.last().map_or(1, |(s, _)| s + 1);
                    candidates.push((sequence, value.clone()));
                    in_flight.insert(
                        next_id,
                        InFlight {
                            qos: QoS::AtLeastOnce,
                            payload: None,
                            retained: Some((topic.clone(), sequence)),
                            released: false,
                        },
                    );
                    client.publish(
                        &topic,
                        QoS::AtLeastOnce,
                        true,
                        next_id,
                        value.as_deref().unwrap_or("").as_bytes(),
                    )
                }
            };
            sent_any = true;
            if sent.is_err() {
                break;
            }
        }
        if in_flight.is_empty() && !sent_any {
            // Everything acknowledged: the kill comes in a quiet moment.
            kill(broker);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: the publisher waited over {WAIT:?} for acknowledgements\n{}",
            broker.log_text()
        );
        let packet = match client.recv(Duration::from_millis(200)) {
            Ok(Some(packet)) => packet,
            Ok(None) => continue,
            Err(error) => panic!(
                "round {round}: the publisher's connection ended before the kill: {error}\n{}",
                broker.log_text()
            ),
        };
        match packet {
            Packet::PubAck(ack) | Packet::PubComp(ack) => {
                let Some(done) = in_flight.remove(&ack.packet_id) else {
                    panic!("round {round}: an acknowledgement of nothing in flight: {ack:?}");
                };
                if ack.reason.0 >= 0x80 {
                    refusals.push(format!("{ack:?}"));
                    continue;
                }
                acks += 1;
                if let Some(payload) = done.payload {
                    acknowledged.messages.insert(payload);
                }
                if let Some((topic, sequence)) = done.retained {
                    let candidates = acknowledged.retained.entry(topic).or_default();
                    candidates.retain(|(s, _)| *s >= sequence);
                }
            }
            Packet::PubRec(rec) => {
                let Some(entry) = in_flight.get_mut(&rec.packet_id) else {
                    panic!("round {round}: a PUBREC of nothing in flight: {rec:?}");
                };
                assert_eq!(entry.qos, QoS::ExactlyOnce);
                if rec.reason.0 >= 0x80 {
                    refusals.push(format!("{rec:?}"));
                    in_flight.remove(&rec.packet_id);
                    continue;
                }
                entry.released = true;
                let _ = client.send(&Packet::PubRel(success(rec.packet_id)));
            }
            other => panic!("round {round}: the publisher got {other:?}"),
        }
    }
    assert!(
        refusals.is_empty(),
        "round {round}: the broker refused work with a working disk: {refusals:?}\n{}",
        broker.log_text()
    );
    acks
}

/// After a restart: the subscriber's session is there with every subscription it was
/// granted, every acknowledged message reaches it, and the retained store holds for every
/// topic one of the values it may. Leaves the subscriber offline.
fn check_recovered(
    broker: &Broker,
    round: usize,
    state: &Arc<Mutex<SubscriberState>>,
    acknowledged: &mut Acknowledged,
) {
    let (mut keeper, connack) = Client::connect(broker.port, SUBSCRIBER, false, EXPIRY_SECONDS)
        .expect("the keeper resumes");
    assert_eq!(connack.reason, ReasonCode::SUCCESS, "{}", broker.log_text());
    assert!(
        connack.session_present,
        "round {round}: the persistent session survives\n{}",
        broker.log_text()
    );
    // Probes: a message on each granted filter, and a marker on the main one. Queue order
    // puts the marker after everything queued before the restart.
    let (mut writer, _) =
        Client::connect(broker.port, &format!("crash-prober-{round}"), true, 0).expect("prober");
    let granted: Vec<String> = state.lock().unwrap().granted.iter().cloned().collect();
    let mut expected: BTreeSet<String> = acknowledged.messages.clone();
    let mut packet_id = 0u16;
    for filter in &granted {
        let payload = format!("probe-r{round}-{filter}");
        packet_id += 1;
        writer
            .publish(
                filter,
                QoS::AtLeastOnce,
                false,
                packet_id,
                payload.as_bytes(),
            )
            .unwrap();
        expected.insert(payload);
    }
    let marker = format!("marker-r{round}");
    packet_id += 1;
    writer
        .publish(
            "crash/q1/marker",
            QoS::AtLeastOnce,
            false,
            packet_id,
            marker.as_bytes(),
        )
        .unwrap();
    expected.insert(marker);
    let deadline = Instant::now() + WAIT;
    let mut pending = BTreeMap::new();
    loop {
        let missing: Vec<String> = {
            let state = state.lock().unwrap();
            expected
                .iter()
                .filter(|payload| !state.delivered.contains_key(*payload))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: {} acknowledged messages (or probes of granted subscriptions) lost after the restart, e.g. {:?}; violations seen: {:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            state.lock().unwrap().violations,
            broker.log_text()
        );
        match keeper.recv(Duration::from_millis(200)) {
            Ok(Some(packet)) => {
                let answer = state.lock().unwrap().on_packet(packet, &mut pending);
                if let Some(answer) = answer {
                    keeper.send(&answer).unwrap();
                }
            }
            Ok(None) => {}
            Err(error) => panic!(
                "round {round}: the keeper's connection ended: {error}\n{}",
                broker.log_text()
            ),
        }
    }
    let violations = state.lock().unwrap().violations.clone();
    assert!(
        violations.is_empty(),
        "round {round}: {violations:?}\n{}",
        broker.log_text()
    );
    keeper.disconnect();
    writer.disconnect();

    // The retained store: a reader's SUBSCRIBE gets every retained message before the
    // marker it then publishes to itself (one connection, one shard, in order).
    let (mut reader, _) =
        Client::connect(broker.port, &format!("crash-reader-{round}"), true, 0).expect("reader");
    reader.subscribe(1, "crash/ret/#", QoS::AtMostOnce).unwrap();
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    let mut marked = false;
    let deadline = Instant::now() + WAIT;
    while !marked {
        assert!(
            Instant::now() < deadline,
            "round {round}: the retained check timed out"
        );
        match reader.recv(Duration::from_millis(200)).unwrap() {
            Some(Packet::SubAck(_)) => {
                reader
                    .publish("crash/ret/marker", QoS::AtMostOnce, false, 0, b"marker")
                    .unwrap();
            }
            Some(Packet::Publish(publish)) if publish.topic == "crash/ret/marker" => marked = true,
            Some(Packet::Publish(publish)) => {
                assert!(publish.retain, "round {round}: {publish:?}");
                found.insert(
                    publish.topic.to_string(),
                    String::from_utf8_lossy(&publish.payload).into_owned(),
                );
            }
            _ => {}
        }
    }
    reader.disconnect();
    for (topic, candidates) in &mut acknowledged.retained {
        let got = found.remove(topic);
        assert!(
            candidates.iter().any(|(_, value)| *value == got),
            "round {round}: retained {topic} is {got:?}, but the last acknowledged change and those after it are {candidates:?}\n{}",
            broker.log_text()
        );
        *candidates = vec![(candidates.last().map_or(0, |(s, _)| *s), got)];
    }
    assert!(
        found.is_empty(),
        "round {round}: retained messages no one set: {found:?}"
    );
}

fn seed_from_env() -> u64 {
    match std::env::var("SHARDMQ_CRASH_SEED") {
        Ok(text) => text.parse().expect("SHARDMQ_CRASH_SEED is a number"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("shardmq-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}

/// The harness with QoS 1 and QoS 2 publishers and the persistent subscriber taking the
/// QoS 2 topics at QoS 1: nothing acknowledged (PUBACK, PUBCOMP, SUBACK, retained changes)
/// is lost, nothing cleared comes back.
#[test]
fn randomized_sigkill_rounds_lose_nothing_acknowledged() {
    crash_harness(QoS::AtLeastOnce);
}

/// The same with the subscriber taking the QoS 2 topics at QoS 2, acting as a receiver that
/// keeps its session state: also no QoS 2 message delivered twice. (This found that the
/// shard wrote a QoS 2 PUBLISH and a PUBREL to a persistent session's connection before
/// their `MessageSent` / `MessageReleased` record was synced, so that a SIGKILL in between
/// made the restarted broker send the message again under a new packet identifier; the
/// connection's bytes now wait for that record: `Connection::durable_barrier`.)
#[test]
fn randomized_sigkill_rounds_deliver_qos2_once() {
    crash_harness(QoS::ExactlyOnce);
}

/// Rounds of load, each ended by a SIGKILL, each restart checked (`check_recovered`).
/// `q2_subscription` is the QoS at which the persistent subscriber takes `crash/q2/#`.
fn crash_harness(q2_subscription: QoS) {
    let seed = seed_from_env();
    let rounds: usize = std::env::var("SHARDMQ_CRASH_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(5);
    eprintln!(
        "crash harness: seed {seed}, {rounds} rounds (SHARDMQ_CRASH_SEED={seed} replays the choices)"
    );
    let mut rng = Rng(fastrand::Rng::with_seed(seed));
    let directory = temp_dir(&format!("crash-harness-q{}", q2_subscription as u8));
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let state = Arc::new(Mutex::new(SubscriberState::default()));
    let mut acknowledged = Acknowledged::default();
    let mut extra = 0usize;
    let mut shards = 2u16;
    let mut policy = "always";
    let started = Instant::now();

    // The persistent session and its first subscriptions.
    let mut broker = Broker::start_with(shards, &config);
    {
        let (mut keeper, connack) =
            Client::connect(broker.port, SUBSCRIBER, true, EXPIRY_SECONDS).unwrap();
        assert_eq!(connack.reason, ReasonCode::SUCCESS);
        keeper.subscribe(1, "crash/q1/#", QoS::AtLeastOnce).unwrap();
        assert_eq!(keeper.suback(WAIT), [ReasonCode(1)]);
        keeper.subscribe(2, "crash/q2/#", q2_subscription).unwrap();
        assert_eq!(keeper.suback(WAIT), [ReasonCode(q2_subscription as u8)]);
        keeper.disconnect();
    }

    for round in 0..rounds {
        if round > 0 {
            // Some restarts change the shard count: sessions and retained topics move.
            if rng.chance(50) {
                shards = 1 + rng.below(3) as u16;
            }
            // Every sync policy promises that a process crash loses nothing acknowledged.
            policy = ["always", "always", "interval", "none"][rng.below(4)];
            broker = Broker::start_with(shards, &format!("{config}[storage]\nsync = {policy:?}\n"));
            check_recovered(&broker, round, &state, &mut acknowledged);
        }
        let count = 60 + rng.below(200);
        let mut ops = Vec::with_capacity(count);
        for seq in 0..count {
            let pick = rng.below(100);
            ops.push(if pick < 45 {
                Op::Message {
                    qos: QoS::AtLeastOnce,
                    topic: format!("crash/q1/t{}", seq % 3),
                    payload: format!("q1-r{round}-{seq}"),
                }
            } else if pick < 90 {
                Op::Message {
                    qos: QoS::ExactlyOnce,
                    topic: format!("crash/q2/t{}", seq % 3),
                    payload: format!("q2-r{round}-{seq}"),
                }
            } else {
                let topic = format!("crash/ret/{}", rng.below(RETAINED_TOPICS));
                let value = rng.chance(60).then(|| format!("ret-r{round}-{seq}"));
                Op::Retain { topic, value }
            });
        }
        // The subscriber: online for the whole round, offline, or going offline midway.
        let mode = rng.below(3);
        let subscribes: Vec<(usize, String)> = (0..1 + rng.below(2))
            .map(|_| {
                extra += 1;
                (rng.below(count / 3), format!("crash/extra/{extra}"))
            })
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subscriber = (mode != 1).then(|| {
            let (client, connack) =
                Client::connect(broker.port, SUBSCRIBER, false, EXPIRY_SECONDS).unwrap();
            assert!(connack.session_present);
            let offline_after = (mode == 2).then(|| rng.below(count));
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                run_subscriber(client, state, stop, subscribes, offline_after)
            })
        });
        let kill_after = rng.below(count + 1);
        let spin = rng.0.u64(..2000);
        let acks = run_publisher(&mut broker, round, ops, &mut acknowledged, kill_after, spin);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(subscriber) = subscriber {
            subscriber.join().expect("the subscriber thread");
        }
        eprintln!(
            "round {round}: {shards} shards, sync {policy:?}, {count} operations, subscriber mode {mode}, killed after {acks} acknowledgements ({:?} so far)",
            started.elapsed()
        );
    }
    shards = 1 + rng.below(3) as u16;
    let broker = Broker::start_with(shards, &config);
    check_recovered(&broker, rounds, &state, &mut acknowledged);
    let state = state.lock().unwrap();
    let q2 = state
        .delivered
        .keys()
        .filter(|p| p.starts_with("q2-"))
        .count();
    eprintln!(
        "crash harness: {} acknowledged messages, {q2} messages published at QoS 2 delivered, {} subscriptions granted, all there after {rounds} kills ({:?})",
        acknowledged.messages.len(),
        state.granted.len(),
        started.elapsed()
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&directory);
}

// ---------------------------------------------------------------------------------------
// Shared by the tests below: one persistent subscriber, one publisher, one shard.

/// Connects the persistent subscriber `client_id` (5.0, clean start, expiry 3600 s),
/// subscribes it to `filter` at QoS 1 and takes it offline.
fn offline_subscriber(port: u16, client_id: &str, filter: &str) {
    let (mut keeper, connack) = Client::connect(port, client_id, true, EXPIRY_SECONDS).unwrap();
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    keeper.subscribe(1, filter, QoS::AtLeastOnce).unwrap();
    assert_eq!(keeper.suback(WAIT), [ReasonCode(1)]);
    keeper.disconnect();
}

/// Publishes `payload` at QoS 1 and waits for its PUBACK's reason code.
fn publish_acknowledged(
    client: &mut Client,
    topic: &str,
    packet_id: u16,
    payload: &str,
) -> ReasonCode {
    publish_with(client, topic, false, packet_id, payload)
}

/// [`publish_acknowledged`] with the retain flag `retain`.
fn publish_with(
    client: &mut Client,
    topic: &str,
    retain: bool,
    packet_id: u16,
    payload: &str,
) -> ReasonCode {
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            retain,
            packet_id,
            payload.as_bytes(),
        )
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("a PUBACK in time");
        match client.recv(left).expect("the publisher stays connected") {
            Some(Packet::PubAck(ack)) if ack.packet_id == packet_id => return ack.reason,
            Some(_) => {}
            None => panic!("no PUBACK for {payload}"),
        }
    }
}

/// Resumes `client_id`'s session, publishes a QoS 1 marker to `marker_topic` from another
/// client and returns the payloads the session gets before the marker, in order.
/// `log` gives the broker's log for a failure's message.
fn resume_until_marker(
    port: u16,
    log: &dyn Fn() -> String,
    client_id: &str,
    marker_topic: &str,
) -> Vec<String> {
    let (mut keeper, connack) = Client::connect(port, client_id, false, EXPIRY_SECONDS).unwrap();
    assert_eq!(connack.reason, ReasonCode::SUCCESS, "{}", log());
    assert!(connack.session_present, "{}", log());
    let (mut writer, _) = Client::connect(port, "marker-writer", true, 0).unwrap();
    assert_eq!(
        publish_acknowledged(&mut writer, marker_topic, 1, "marker"),
        ReasonCode::SUCCESS
    );
    writer.disconnect();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no marker after {got:?}\n{}",
            log()
        );
        if let Some(Packet::Publish(publish)) = keeper.recv(Duration::from_millis(200)).unwrap() {
            keeper
                .send(&Packet::PubAck(success(publish.packet_id)))
                .unwrap();
            let payload = String::from_utf8_lossy(&publish.payload).into_owned();
            if payload == "marker" {
                break;
            }
            got.push(payload);
        }
    }
    keeper.disconnect();
    got
}

/// The segment files of `directory/shard-0`, oldest first.
fn segments(directory: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(directory.join("shard-0"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    segments
}

// ---------------------------------------------------------------------------------------
// A full disk.

/// A tmpfs of a few MiB mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if output.status.success() {
            Ok(Self { path })
        } else {
            let _ = std::fs::remove_dir(&path);
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a broker that did not stop): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");
                break;
            }
        }
    }
    // Partial pages too: a byte at a time until nothing more fits.
    while file.write(&[0xA5]).is_ok_and(|n| n == 1) {}
}

#[test]
fn a_full_disk_refuses_durable_work_and_loses_nothing_acknowledged() {
    let mount = match Tmpfs::mount(temp_dir("full-disk"), "4m") {
        Ok(mount) => mount,
        Err(error) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the full-disk test (needs root): {error}");
            return;
        }
    };
    let directory = mount.path.join("data");
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let mut broker = Broker::start_with(1, &config);
    offline_subscriber(broker.port, "disk-keeper", "disk/#");
    let (mut writer, _) = Client::connect(broker.port, "disk-writer", true, 0).unwrap();
    let payload = |i: usize| format!("disk-{i}-{}", "x".repeat(500));
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let reason = publish_acknowledged(&mut writer, "disk/q", (i + 1) as u16, &payload(i));
        assert_eq!(reason, ReasonCode::SUCCESS, "{}", broker.log_text());
        acknowledged.push(payload(i));
    }

    fill(&mount.path.join("filler"));
    // What still fits in the log's last page is acknowledged; then the write fails, and
    // from then on nothing durable is acknowledged.
    let mut refused = None;
    for i in 20..5_000 {
        let reason =
            publish_acknowledged(&mut writer, "disk/q", (i % 60_000 + 1) as u16, &payload(i));
        if reason == ReasonCode::SUCCESS {
            acknowledged.push(payload(i));
        } else {
            refused = Some((i, reason));
            break;
        }
    }
    let Some((refused_at, reason)) = refused else {
        panic!("a full disk was never refused\n{}", broker.log_text());
    };
    assert_eq!(reason, ReasonCode(0x80), "PUBACK 0x80 on a full disk");
    assert_eq!(
        publish_acknowledged(&mut writer, "disk/q", 60_001, "after-the-failure"),
        ReasonCode(0x80),
        "the log stays given up"
    );
    let log = broker.log_text();
    assert!(
        log.contains("the durable log failed") && log.contains("No space left on device"),
        "the failure is logged with its cause:\n{log}"
    );
    // 3.1.1 has no refusing PUBACK: the publisher's connection is closed instead.
    let old_writer = support::v4(broker.port, "disk-writer-311", |_| {});
    old_writer
        .client
        .publish("disk/q", rumqttc::QoS::AtLeastOnce, false, "refused-311")
        .unwrap();
    let ended = old_writer.ended.recv_timeout(WAIT);
    assert!(
        ended.is_ok(),
        "a 3.1.1 publisher is disconnected, not acknowledged"
    );
    assert!(
        !old_writer
            .events
            .try_iter()
            .any(|event| matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))),
        "no PUBACK for a message the log could not take"
    );
    // A new persistent session is refused; clean sessions and QoS 0 go on.
    let (_, connack) =
        Client::connect(broker.port, "disk-new-keeper", true, EXPIRY_SECONDS).unwrap();
    assert_eq!(connack.reason, ReasonCode(0x88), "{}", broker.log_text());
    let (mut clean, connack) = Client::connect(broker.port, "disk-clean", true, 0).unwrap();
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    clean.subscribe(1, "open/#", QoS::AtLeastOnce).unwrap();
    assert_eq!(clean.suback(WAIT), [ReasonCode(1)]);
    writer
        .publish("open/zero", QoS::AtMostOnce, false, 0, b"qos0")
        .unwrap();
    assert_eq!(
        publish_acknowledged(&mut writer, "open/one", 60_002, "qos1-clean"),
        ReasonCode::SUCCESS,
        "a QoS 1 message that only a clean session takes needs no disk"
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 2 && Instant::now() < deadline {
        if let Some(Packet::Publish(publish)) = clean.recv(Duration::from_millis(200)).unwrap() {
            if publish.qos != QoS::AtMostOnce {
                clean
                    .send(&Packet::PubAck(success(publish.packet_id)))
                    .unwrap();
            }
            got.push(String::from_utf8_lossy(&publish.payload).into_owned());
        }
    }
    assert_eq!(got, ["qos0", "qos1-clean"], "{}", broker.log_text());
    assert!(broker.is_running());
    eprintln!(
        "full disk: {} acknowledged, refused from message {refused_at} on",
        acknowledged.len()
    );

    // Space again, a restart: every acknowledged message is there, and the log works.
    broker.kill();
    std::fs::remove_file(mount.path.join("filler")).unwrap();
    let broker = Broker::start_with(1, &config);
    let got = resume_until_marker(
        broker.port,
        &|| broker.log_text(),
        "disk-keeper",
        "disk/marker",
    );
    let missing: Vec<&String> = acknowledged.iter().filter(|p| !got.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost after the full disk: {:?}\n{}",
        missing.len(),
        missing.iter().map(|p| &p[..12]).collect::<Vec<_>>(),
        broker.log_text()
    );
    let (mut writer, _) = Client::connect(broker.port, "disk-writer-2", true, 0).unwrap();
    assert_eq!(
        publish_acknowledged(&mut writer, "disk/q", 1, "after-the-restart"),
        ReasonCode::SUCCESS
    );
    drop(broker);
    drop(mount);
}

// ---------------------------------------------------------------------------------------
// Damaged logs at start.

/// A shard-0 log holding an offline persistent session subscribed to `tail/#` and the
/// acknowledged QoS 1 messages `tail-0..count` for it, left by a SIGKILL.
fn killed_log(name: &str, count: usize, storage: &str) -> (PathBuf, String, Vec<String>) {
    let directory = temp_dir(name);
    let config = format!("data_dir = {:?}\n{storage}", directory.to_str().unwrap());
    let mut broker = Broker::start_with(1, &config);
    offline_subscriber(broker.port, "tail-keeper", "tail/#");
    let (mut writer, _) = Client::connect(broker.port, "tail-writer", true, 0).unwrap();
    let payloads: Vec<String> = (0..count)
        .map(|i| format!("tail-{i}-{}", "y".repeat(200)))
        .collect();
    for (i, payload) in payloads.iter().enumerate() {
        let reason = publish_acknowledged(&mut writer, "tail/q", (i + 1) as u16, payload);
        assert_eq!(reason, ReasonCode::SUCCESS);
    }
    broker.kill();
    (directory, config, payloads)
}

/// Damages the newest segment of a SIGKILLed log with `damage`, then checks that the broker
/// starts anyway (a crash explains damage at the tail), says it cut the tail, and gives the
/// session every message but the last.
fn tail_damage_is_cut(name: &str, damage: impl FnOnce(&Path)) {
    let (directory, config, payloads) = killed_log(name, 20, "");
    damage(&segments(&directory).pop().unwrap());
    let broker = Broker::start_with(1, &config);
    assert!(
        broker.log_text().contains("a torn tail from a crash, cut"),
        "{}",
        broker.log_text()
    );
    let got = resume_until_marker(
        broker.port,
        &|| broker.log_text(),
        "tail-keeper",
        "tail/marker",
    );
    assert_eq!(got, payloads[..payloads.len() - 1], "{}", broker.log_text());
    drop(broker);
    let _ = std::fs::remove_dir_all(&directory);
}

#[test]
fn a_torn_tail_is_cut_and_the_prefix_recovered() {
    // Cut inside the last record (the last message queued), as a crash mid-write would.
    tail_damage_is_cut("torn-tail", |newest| {
        let length = std::fs::metadata(newest).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(newest)
            .unwrap()
            .set_len(length - 3)
            .unwrap();
    });
}

#[test]
fn a_corrupt_tail_is_cut_and_the_prefix_recovered() {
    // A flipped byte in the last record's payload: its checksum no longer matches.
    tail_damage_is_cut("corrupt-tail", |newest| {
        let mut bytes = std::fs::read(newest).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x5A;
        std::fs::write(newest, &bytes).unwrap();
    });
}

/// A broker process started with extra command-line flags; SIGKILLed when dropped.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_missing_middle_segment_stops_the_start_unless_recover_damaged() {
    // Small segments and no checkpoint, so that the messages span several segments.
    let storage = "[storage]\nsegment_size_bytes = 4096\ncompaction_min_bytes = 1073741824\n";
    let (directory, _, payloads) = killed_log("missing-segment", 60, storage);
    let files = segments(&directory);
    assert!(files.len() >= 3, "several segments: {files:?}");
    std::fs::remove_file(&files[1]).unwrap();
    // Its own admin port (the default one is shared by every broker on the machine).
    let config = directory.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "[server]\npin_cores = false\nlog = \"info\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            support::free_port()
        ),
    )
    .unwrap();
    let serve = |extra: &[&str], port: u16| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shardmq"));
        command
            .env("SHARDMQ_ADMIN_TOKEN", support::ADMIN_TOKEN)
            .args(["serve", "--shards", "1", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&directory)
            .args(extra);
        command
    };
    let output = serve(&[], support::free_port()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is missing") && stderr.contains("--recover-damaged"),
        "the error names the damage and the way out:\n{stderr}"
    );

    // With the flag: it starts with what came before the gap.
    let port = support::free_port();
    let log = directory.with_extension("log");
    let child = serve(&["--recover-damaged"], port)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _forced = Spawned(child);
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no start with --recover-damaged:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("started anyway"), "{text}");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let got = resume_until_marker(port, &read_log, "tail-keeper", "tail/marker");
    assert!(
        got.len() < payloads.len() && got[..] == payloads[..got.len()],
        "a prefix, in order, of what was there before the gap: {} of {}",
        got.len(),
        payloads.len()
    );
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&directory);
}

// ---------------------------------------------------------------------------------------
// A change of the shard count, interrupted at each step of the switch (`src/layout.rs`).

/// Persistent sessions `reshard-keeper-I`, each subscribed to `reshard/I/#`.
const RESHARD_SESSIONS: usize = 6;
/// QoS 1 messages queued for each of them while offline.
const RESHARD_QUEUED: usize = 4;
/// Retained topics `r/0..` set; the expected set after the changes of [`reshard_base`].
const RESHARD_RETAINED: usize = 8;
/// The steps of the switch (`layout::CrashStep::name`), and whether a crash there rolls the
/// switch back (no marker yet) or forward.
const SWITCH_STEPS: [(&str, bool); 6] = [
    ("staging", true),
    ("staged", true),
    ("marked", false),
    ("moving", false),
    ("moved", false),
    ("removed", false),
];

fn keeper(i: usize) -> String {
    format!("reshard-keeper-{i}")
}

fn queued(i: usize) -> Vec<String> {
    (0..RESHARD_QUEUED).map(|k| format!("q-{i}-{k}")).collect()
}

fn expected_retained() -> Vec<(String, String)> {
    (0..RESHARD_RETAINED)
        .filter(|t| *t != 1 && *t != 4)
        .map(|t| {
            let value = if t == 2 {
                "v2b".into()
            } else {
                format!("v{t}")
            };
            (format!("r/{t}"), value)
        })
        .collect()
}

/// Leaves in `directory`, by a SIGKILL of a broker with `shards` shards: the offline
/// sessions with [`queued`] messages (and two earlier messages each, delivered and
/// acknowledged), the retained set of [`expected_retained`] (r/1 and r/4 set then cleared,
/// r/2 replaced) and the persistent session `reshard-ended`, ended.
fn reshard_base(directory: &Path, shards: u16) {
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let mut broker = Broker::start_with(shards, &config);
    let port = broker.port;
    let log = || broker.log_text();
    offline_subscriber(port, "reshard-ended", "reshard/ended/#");
    let (ender, connack) = Client::connect(port, "reshard-ended", true, 0).unwrap();
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    ender.disconnect();
    let (mut writer, _) = Client::connect(port, "reshard-writer", true, 0).unwrap();
    let mut packet_id = 0u16;
    let mut publish = |writer: &mut Client, topic: &str, retain: bool, payload: &str| {
        packet_id += 1;
        let reason = publish_with(writer, topic, retain, packet_id, payload);
        // A retained message nobody subscribes to is taken with 0x10 (no matching
        // subscribers); every other message here has its subscriber.
        let taken = reason == ReasonCode::SUCCESS || (retain && reason.0 == 0x10);
        assert!(taken, "{payload}: {reason:?}");
    };
    for i in 0..RESHARD_SESSIONS {
        offline_subscriber(port, &keeper(i), &format!("reshard/{i}/#"));
    }
    // A subscription reaches the other shards' routes a moment after its SUBACK.
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..RESHARD_SESSIONS {
        for k in 0..2 {
            publish(
                &mut writer,
                &format!("reshard/{i}/m"),
                false,
                &format!("early-{i}-{k}"),
            );
        }
        let marker = format!("reshard/{i}/marker");
        let got = resume_until_marker(port, &log, &keeper(i), &marker);
        assert_eq!(
            got,
            [format!("early-{i}-0"), format!("early-{i}-1")],
            "{}",
            log()
        );
        for payload in queued(i) {
            publish(&mut writer, &format!("reshard/{i}/m"), false, &payload);
        }
    }
    for t in 0..RESHARD_RETAINED {
        publish(&mut writer, &format!("r/{t}"), true, &format!("v{t}"));
    }
    publish(&mut writer, "r/1", true, "");
    publish(&mut writer, "r/4", true, "");
    publish(&mut writer, "r/2", true, "v2b");
    broker.kill();
}

/// The retained messages a new subscription to `r/#` gets, sorted.
fn retained_now(port: u16) -> Vec<(String, String)> {
    let (mut reader, _) = Client::connect(port, "reshard-reader", true, 0).unwrap();
    reader.subscribe(1, "r/#", QoS::AtMostOnce).unwrap();
    let mut got = Vec::new();
    // Retained messages follow the SUBACK at once; a quiet half second ends them.
    while let Some(packet) = reader.recv(Duration::from_millis(500)).unwrap() {
        if let Packet::Publish(publish) = packet {
            assert!(publish.retain);
            got.push((
                publish.topic.to_string(),
                String::from_utf8_lossy(&publish.payload).into_owned(),
            ));
        }
    }
    reader.disconnect();
    got.sort();
    got
}

/// Starts a broker with `shards` shards on `directory` and checks that it holds exactly what
/// [`reshard_base`] left: every session with its queue (once, in order), the retained set,
/// the ended session still ended; and that the layout is whole (no staging directory, one
/// directory per shard).
fn check_resharded(directory: &Path, shards: u16, context: &str) {
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let broker = Broker::start_with(shards, &config);
    let log = || format!("{context}\n{}", broker.log_text());
    for i in 0..RESHARD_SESSIONS {
        let marker = format!("reshard/{i}/marker");
        let got = resume_until_marker(broker.port, &log, &keeper(i), &marker);
        assert_eq!(got, queued(i), "{}: session {i}\n{}", context, log());
    }
    assert_eq!(retained_now(broker.port), expected_retained(), "{}", log());
    let (ended, connack) = Client::connect(broker.port, "reshard-ended", false, 0).unwrap();
    assert!(
        !connack.session_present,
        "an ended session came back\n{}",
        log()
    );
    ended.disconnect();
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("shard"))
        .collect();
    names.sort();
    let expected: Vec<String> = (0..shards).map(|i| format!("shard-{i}")).collect();
    assert_eq!(names, expected, "{}", log());
    drop(broker);
}

/// Copies a data directory (files and shard directories; no deeper).
fn copy_directory(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_directory(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn a_shard_count_change_crashed_at_any_step_loses_nothing() {
    const FROM: u16 = 2;
    const TO: u16 = 3;
    // What the change moves: sessions and retained topics whose owner is another shard
    // under the new count, some of them to a later shard than the one whose old log held
    // them (the window the two-phase switch closes).
    let owners = |name: &str| {
        (
            shardmq_shards::owner_shard(name, FROM),
            shardmq_shards::owner_shard(name, TO),
        )
    };
    let names: Vec<String> = (0..RESHARD_SESSIONS)
        .map(keeper)
        .chain((0..RESHARD_RETAINED).map(|t| format!("r/{t}")))
        .collect();
    assert!(
        names.iter().any(|n| owners(n).0 < owners(n).1),
        "the test's names move to a later shard: {:?}",
        names.iter().map(|n| owners(n)).collect::<Vec<_>>()
    );
    let base = temp_dir("reshard-base");
    reshard_base(&base, FROM);
    for (step, rolls_back) in SWITCH_STEPS {
        let crashed = temp_dir(&format!("reshard-{step}"));
        copy_directory(&base, &crashed);
        let (status, stderr) = support::serve_to_exit(
            &crashed,
            TO,
            "",
            &[("SHARDMQ_FAULT_INJECT", &format!("crash-start:{step}"))],
            WAIT,
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(6),
            "aborted at {step}:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("aborting at the shard layout step \"{step}\"")),
            "{stderr}"
        );
        assert!(
            crashed.join("shards.next").is_dir(),
            "{step}: the switch was under way"
        );
        // The same crashed directory, restarted with the new count and with the old one.
        let again = temp_dir(&format!("reshard-{step}-again"));
        copy_directory(&crashed, &again);
        for (directory, shards) in [(&crashed, TO), (&again, FROM)] {
            let context = format!("crashed at {step}, restarted with {shards} shards");
            let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
            {
                // The interrupted switch is rolled the right way before anything is read.
                let broker = Broker::start_with(shards, &config);
                let said = if rolls_back {
                    "rolled back"
                } else {
                    "finishing it"
                };
                assert!(
                    broker.log_text().contains(said),
                    "{context}: {said}\n{}",
                    broker.log_text()
                );
            }
            check_resharded(directory, shards, &context);
            let _ = std::fs::remove_dir_all(directory);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_full_disk_during_a_shard_count_change_keeps_the_old_logs() {
    let mount = match Tmpfs::mount(temp_dir("reshard-full"), "4m") {
        Ok(mount) => mount,
        Err(error) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the full-disk test (needs root): {error}");
            return;
        }
    };
    let directory = mount.path.join("data");
    reshard_base(&directory, 2);
    fill(&mount.path.join("filler"));
    let (status, stderr) = support::serve_to_exit(&directory, 3, "", &[], WAIT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "the start is refused:\n{stderr}"
    );
    assert!(
        stderr.contains("os error 28") && stderr.contains("The shard layout was not changed"),
        "the error says why and that nothing changed:\n{stderr}"
    );
    assert!(
        !directory.join("shards.next").exists(),
        "the staged logs are removed"
    );
    // Then a page more room at a time, until the disk fills up while a later shard's
    // checkpoint is staged (shard 0's already in `shards.next`): refused the same way.
    let filler = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path.join("filler"))
        .unwrap();
    let mut later_shard_refused = false;
    for _ in 0..64 {
        let length = filler.metadata().unwrap().len();
        filler.set_len(length.saturating_sub(4096)).unwrap();
        let (status, stderr) =
            support::serve_to_exit(&directory, 3, "", &[], Duration::from_secs(5));
        if status.is_none() {
            // Everything fitted: the change was made (the broker served and was killed).
            break;
        }
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
        assert!(
            stderr.contains("The shard layout was not changed"),
            "{stderr}"
        );
        assert!(!directory.join("shards.next").exists(), "{stderr}");
        if stderr.contains("shard 1's log") || stderr.contains("shard 2's log") {
            later_shard_refused = true;
            break;
        }
    }
    assert!(
        later_shard_refused,
        "a refusal while a later shard was staged"
    );
    drop(filler);
    std::fs::remove_file(mount.path.join("filler")).unwrap();
    check_resharded(&directory, 3, "after a full disk refused the change");
    drop(mount);
}
