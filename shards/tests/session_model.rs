//! The session state machine against a model of what MQTT 3.1.1 and 5.0 promise.
//!
//! Random operation sequences over three client identifiers, four topics and six filters drive
//! one `Shard` (shard count 1) with encoded MQTT bytes; every `Output::Send` is decoded per
//! connection. After every operation the packets that carry delivery state (CONNACK's Session
//! Present, PUBLISH with its message, QoS and DUP flag, PUBREL) that each client received must be
//! exactly the ones the model predicts, in order, and the shard's session count must be the
//! model's. The simulated clients also check the promises on their own, so a failure names the
//! rule it breaks: QoS 2 reaches the application at most once, each publisher's messages reach
//! the application in the order they were published, the client's Receive Maximum is never
//! exceeded by new messages, and PUBREL only follows our PUBREC.
//!
//! The model (`Model`) is a plain transcription of the specification plus the policies that
//! shardmq documents where the specification leaves a choice (ARCHITECTURE.md, "QoS" and
//! "Queue overflow policy", and `Limits`):
//! - a session exists from a CONNECT until Clean Start / Clean Session 1 replaces it, its
//!   connection ends with a session expiry of 0, or its expiry interval (capped by
//!   `session_expiry_seconds_max`; 3.1.1 Clean Session 0 gets the cap) passes without a
//!   connection; Session Present is 1 exactly when Clean Start is 0 and the session exists;
//! - a message matching several filters of one session reaches it once, at the highest granted
//!   QoS of those filters, never above the published QoS;
//! - at most `min(Receive Maximum, inflight_per_session_max)` QoS 1 and 2 messages are in flight
//!   per session; the others wait in the session's queue, in order; the queue holds at most
//!   `queued_messages_per_session_max` messages, and a full queue drops its oldest message;
//!   QoS 0 is not kept for a session without a connection, but waits behind a backlog;
//! - nothing is retried while a connection lives; on resume every in-flight message is sent
//!   again in its original order, PUBLISH with DUP before PUBREC, PUBREL after it;
//! - an inbound QoS 2 message is delivered on its first PUBLISH and its packet identifier kept
//!   until PUBREL, so a resent PUBLISH is acknowledged and not delivered again;
//! - a 5.0 DISCONNECT may change the session expiry, except from 0 to non-zero, which is a
//!   protocol error that ends the session with the connection [MQTT-3.14.2-2].
//!
//! Not covered here: wills, retained messages, shared subscriptions, keep alive, topic aliases,
//! No Local, and PUBREC / PUBACK with an error reason code.
//!
//! `PROPTEST_CASES` sets the number of cases (512 by default, of up to 100 operations each).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shardmq_net::mqtt::{
    self, Connect, ConnectProperties, DecodeOptions, Disconnect, DisconnectProperties, Packet,
    ProtocolVersion, PubAck, Publish, PublishProperties, QoS, ReasonCode, Sender, Subscribe,
    SubscribeProperties, SubscriptionOptions, Unsubscribe, UnsubscribeProperties,
};
use shardmq_shards::{ConnectionId, Input, Limits, Output, Shard, ShardConfig, SharedStrategy};

const CLIENTS: [&str; 3] = ["alice", "bob", "carol"];
const TOPICS: [&str; 4] = ["t/a", "t/b", "u/a", "t/a/x"];
const FILTERS: [&str; 6] = ["t/a", "t/+", "#", "+/a", "t/#", "u/a"];

/// Small limits, so that short sequences fill the in-flight window and the queue.
const INFLIGHT_MAX: u16 = 3;
const QUEUE_MAX: usize = 4;
const SESSION_EXPIRY_SECONDS_MAX: u32 = 600;

fn limits() -> Limits {
    Limits {
        inflight_per_session_max: INFLIGHT_MAX,
        queued_messages_per_session_max: QUEUE_MAX,
        session_expiry_seconds_max: SESSION_EXPIRY_SECONDS_MAX,
        ..Limits::default()
    }
}

/// The naive matcher of MQTT 5.0 §4.7 for the filters above (none starts with `$`). It repeats
/// what `shardmq_net::mqtt::topic` does on purpose: the model must not share code with the
/// implementation it checks.
fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(wanted), Some(level)) if wanted == level => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One step of a test: what a client does, or time passing. An operation on a client that has
/// no connection (or nothing to acknowledge) does nothing, so that any sequence is valid.
#[derive(Debug, Clone)]
enum Op {
    Connect {
        client: usize,
        v5: bool,
        clean_start: bool,
        /// 5.0 only: the Session Expiry Interval property.
        expiry_seconds: Option<u32>,
        /// 5.0 only: the Receive Maximum property.
        receive_maximum: Option<u16>,
    },
    Subscribe {
        client: usize,
        filter: usize,
        qos: u8,
    },
    Unsubscribe {
        client: usize,
        filter: usize,
    },
    /// PUBLISH, answered by PUBACK or PUBREC; for QoS 2 with `release`, PUBREL and PUBCOMP too.
    Publish {
        client: usize,
        topic: usize,
        qos: u8,
        release: bool,
    },
    /// PUBREL for one of the client's QoS 2 messages still awaiting it.
    Release {
        client: usize,
        pick: usize,
    },
    /// The PUBLISH of one of those again, with DUP.
    Resend {
        client: usize,
        pick: usize,
    },
    /// The next acknowledgement (PUBACK, PUBREC or PUBCOMP) of one message the client received.
    Ack {
        client: usize,
        pick: usize,
    },
    /// The next acknowledgement of every message the client received.
    AckAll {
        client: usize,
    },
    /// DISCONNECT; for 5.0 with `expiry_seconds`, a new Session Expiry Interval.
    Disconnect {
        client: usize,
        expiry_seconds: Option<u32>,
    },
    /// The connection ends without DISCONNECT.
    Lose {
        client: usize,
    },
    Tick {
        advance_ms: u64,
    },
}

/// A packet that carries delivery state, as the model predicts it and the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    ConnAck { session_present: bool },
    Publish { message: u32, qos: u8, dup: bool },
    PubRel { message: u32 },
}

#[derive(Debug, Clone, Copy)]
struct MessageInfo {
    publisher: usize,
    topic: usize,
    qos: u8,
}

#[derive(Debug)]
struct ModelInflight {
    message: u32,
    qos: u8,
    /// PUBREC received and PUBREL sent: PUBCOMP awaited.
    released: bool,
}

#[derive(Debug, Default)]
struct ModelSession {
    /// Filter index to granted QoS.
    subscriptions: BTreeMap<usize, u8>,
    expiry_seconds: u32,
    connected: bool,
    /// While without a connection: when the session ends.
    expires_at_ms: Option<u64>,
    window: usize,
    inflight: VecDeque<ModelInflight>,
    queue: VecDeque<(u32, u8)>,
    /// Inbound QoS 2 packet identifiers delivered and awaiting PUBREL.
    awaiting_release: BTreeSet<u16>,
}

impl ModelSession {
    fn transmit(&mut self, expected: &mut Vec<Expect>, message: u32, qos: u8) {
        expected.push(Expect::Publish {
            message,
            qos,
            dup: false,
        });
        if qos > 0 {
            self.inflight.push_back(ModelInflight {
                message,
                qos,
                released: false,
            });
        }
    }

    fn enqueue(&mut self, message: u32, qos: u8) {
        if self.queue.len() >= QUEUE_MAX {
            self.queue.pop_front();
        }
        self.queue.push_back((message, qos));
    }

    fn drain(&mut self, expected: &mut Vec<Expect>) {
        if !self.connected {
            return;
        }
        while let Some(&(message, qos)) = self.queue.front() {
            if qos > 0 && self.inflight.len() >= self.window {
                break;
            }
            self.queue.pop_front();
            self.transmit(expected, message, qos);
        }
    }

    fn deliver(&mut self, expected: &mut Vec<Expect>, message: u32, qos: u8) {
        if !self.connected {
            if qos > 0 {
                self.enqueue(message, qos);
            }
            return;
        }
        if self.queue.is_empty() && (qos == 0 || self.inflight.len() < self.window) {
            self.transmit(expected, message, qos);
        } else {
            self.enqueue(message, qos);
            self.drain(expected);
        }
    }
}

/// What the server owes each client, and what it must send in this step.
#[derive(Debug, Default)]
struct Model {
    sessions: BTreeMap<usize, ModelSession>,
    messages: Vec<MessageInfo>,
    now_ms: u64,
    expected: BTreeMap<usize, Vec<Expect>>,
}

impl Model {
    fn connect(
        &mut self,
        client: usize,
        v5: bool,
        clean_start: bool,
        expiry_seconds: Option<u32>,
        receive_maximum: Option<u16>,
    ) {
        let expiry_seconds = if v5 {
            expiry_seconds.unwrap_or(0)
        } else if clean_start {
            0
        } else {
            u32::MAX
        }
        .min(SESSION_EXPIRY_SECONDS_MAX);
        // A session with expiry 0 ends with its network connection, which a takeover
        // closes [MQTT-3.1.2-23]; clean start ends any session.
        if clean_start
            || self
                .sessions
                .get(&client)
                .is_some_and(|s| s.connected && s.expiry_seconds == 0)
        {
            self.sessions.remove(&client);
        }
        let session_present = self.sessions.contains_key(&client);
        let session = self.sessions.entry(client).or_default();
        session.expiry_seconds = expiry_seconds;
        session.connected = true;
        session.expires_at_ms = None;
        let receive_maximum = if v5 { receive_maximum } else { None };
        session.window = usize::from(receive_maximum.unwrap_or(u16::MAX).clamp(1, INFLIGHT_MAX));
        let expected = self.expected.entry(client).or_default();
        expected.push(Expect::ConnAck { session_present });
        for entry in &session.inflight {
            expected.push(if entry.released {
                Expect::PubRel {
                    message: entry.message,
                }
            } else {
                Expect::Publish {
                    message: entry.message,
                    qos: entry.qos,
                    dup: true,
                }
            });
        }
        session.drain(expected);
    }

    fn subscribe(&mut self, client: usize, filter: usize, qos: u8) {
        if let Some(session) = self.sessions.get_mut(&client) {
            session.subscriptions.insert(filter, qos);
        }
    }

    fn unsubscribe(&mut self, client: usize, filter: usize) {
        if let Some(session) = self.sessions.get_mut(&client) {
            session.subscriptions.remove(&filter);
        }
    }

    fn new_message(&mut self, publisher: usize, topic: usize, qos: u8) -> u32 {
        self.messages.push(MessageInfo {
            publisher,
            topic,
            qos,
        });
        u32::try_from(self.messages.len() - 1).expect("few messages")
    }

    /// A PUBLISH from `publisher` with `packet_id` arrived: route it, unless it is a QoS 2
    /// message whose identifier still awaits PUBREL.
    fn publish(&mut self, publisher: usize, packet_id: u16, message: u32) {
        let info = self.messages[message as usize];
        if info.qos == 2
            && let Some(session) = self.sessions.get_mut(&publisher)
            && !session.awaiting_release.insert(packet_id)
        {
            return;
        }
        let topic = TOPICS[info.topic];
        for (&client, session) in &mut self.sessions {
            let granted = session
                .subscriptions
                .iter()
                .filter(|(filter, _)| filter_matches(FILTERS[**filter], topic))
                .map(|(_, &qos)| qos)
                .max();
            if let Some(granted) = granted {
                let expected = self.expected.entry(client).or_default();
                session.deliver(expected, message, granted.min(info.qos));
            }
        }
    }

    fn release(&mut self, publisher: usize, packet_id: u16) {
        if let Some(session) = self.sessions.get_mut(&publisher) {
            session.awaiting_release.remove(&packet_id);
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2, `released`): the message is done.
    fn acknowledged(&mut self, client: usize, message: u32, released: bool) {
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        if let Some(position) = session
            .inflight
            .iter()
            .position(|e| e.message == message && e.released == released)
        {
            session.inflight.remove(position);
            session.drain(self.expected.entry(client).or_default());
        }
    }

    fn received(&mut self, client: usize, message: u32) {
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        if let Some(entry) = session
            .inflight
            .iter_mut()
            .find(|e| e.message == message && e.qos == 2 && !e.released)
        {
            entry.released = true;
            self.expected
                .entry(client)
                .or_default()
                .push(Expect::PubRel { message });
        }
    }

    /// The client's connection ended; `expiry_seconds` is what its DISCONNECT asked for.
    fn disconnected(&mut self, client: usize, expiry_seconds: Option<u32>) {
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        match expiry_seconds {
            // [MQTT-3.14.2-2]: a protocol error, and the session ends with the connection.
            Some(asked) if session.expiry_seconds == 0 && asked != 0 => {}
            Some(asked) => session.expiry_seconds = asked.min(SESSION_EXPIRY_SECONDS_MAX),
            None => {}
        }
        session.connected = false;
        if session.expiry_seconds == 0 {
            self.sessions.remove(&client);
        } else {
            session.expires_at_ms = Some(self.now_ms + u64::from(session.expiry_seconds) * 1000);
        }
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.sessions
            .retain(|_, session| session.expires_at_ms.is_none_or(|at| at > now_ms));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH received, nothing answered yet.
    Published,
    /// QoS 2: PUBREC sent, PUBREL awaited.
    Received,
    /// QoS 2: PUBREL received, PUBCOMP not sent yet.
    Released,
}

#[derive(Debug)]
struct Inbound {
    packet_id: u16,
    message: u32,
    qos: u8,
    stage: Stage,
}

/// A client as the application behind it sees it; its session state lives across connections
/// and is dropped when CONNACK says no session is present.
#[derive(Debug)]
struct Client {
    connection: Option<ConnectionId>,
    version: ProtocolVersion,
    receive_maximum: Option<u16>,
    inbound: Vec<Inbound>,
    next_packet_id: u16,
    /// QoS 2 messages this client published that await its PUBREL: (packet id, message).
    outbound: Vec<(u16, u32)>,
    /// Messages that reached the application, and the last one of each publisher.
    delivered_qos2: BTreeSet<u32>,
    last_from_publisher: BTreeMap<usize, u32>,
    seen: BTreeSet<u32>,
}

impl Client {
    fn new() -> Self {
        Self {
            connection: None,
            version: ProtocolVersion::V5,
            receive_maximum: None,
            inbound: Vec::new(),
            next_packet_id: 0,
            outbound: Vec::new(),
            delivered_qos2: BTreeSet::new(),
            last_from_publisher: BTreeMap::new(),
            seen: BTreeSet::new(),
        }
    }

    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            let candidate = self.next_packet_id;
            if !self.outbound.iter().any(|&(id, _)| id == candidate) {
                return candidate;
            }
        }
    }

    /// Takes in one packet from the server; returns what it means for the comparison with the
    /// model, checking on the way the promises a client can see on its own.
    fn take(
        &mut self,
        packet: &Packet,
        messages: &[MessageInfo],
        name: &str,
    ) -> Result<Option<Expect>, String> {
        match packet {
            Packet::ConnAck(connack) => {
                if connack.reason != ReasonCode::SUCCESS {
                    return Err(format!("{name}: CONNACK refused with {}", connack.reason));
                }
                if !connack.session_present {
                    self.inbound.clear();
                    self.outbound.clear();
                }
                Ok(Some(Expect::ConnAck {
                    session_present: connack.session_present,
                }))
            }
            Packet::Publish(publish) => self.take_publish(publish, messages, name).map(Some),
            Packet::PubRel(ack) => {
                let Some(entry) = self
                    .inbound
                    .iter_mut()
                    .find(|entry| entry.packet_id == ack.packet_id)
                else {
                    return Err(format!(
                        "{name}: PUBREL for packet id {} that it never received",
                        ack.packet_id
                    ));
                };
                if entry.stage == Stage::Published {
                    return Err(format!(
                        "{name}: PUBREL for packet id {} before its PUBREC",
                        ack.packet_id
                    ));
                }
                entry.stage = Stage::Released;
                Ok(Some(Expect::PubRel {
                    message: entry.message,
                }))
            }
            _ => Ok(None),
        }
    }

    fn take_publish(
        &mut self,
        publish: &Publish,
        messages: &[MessageInfo],
        name: &str,
    ) -> Result<Expect, String> {
        let payload: [u8; 4] = publish.payload[..]
            .try_into()
            .map_err(|_| format!("{name}: PUBLISH with a foreign payload"))?;
        let message = u32::from_be_bytes(payload);
        let info = messages
            .get(message as usize)
            .ok_or_else(|| format!("{name}: PUBLISH of unknown message {message}"))?;
        if publish.topic != TOPICS[info.topic] {
            return Err(format!(
                "{name}: message {message} on {} instead of {}",
                publish.topic, TOPICS[info.topic]
            ));
        }
        let qos = publish.qos as u8;
        let expect = Expect::Publish {
            message,
            qos,
            dup: publish.dup,
        };
        // QoS 2: a PUBLISH of a packet id that is still ours (before PUBCOMP) is the same
        // delivery, whatever its DUP flag says.
        let known = self
            .inbound
            .iter()
            .find(|entry| entry.packet_id == publish.packet_id && qos > 0);
        if let Some(entry) = known {
            if entry.message != message {
                return Err(format!(
                    "{name}: packet id {} reused for message {message} while message {} is unacknowledged",
                    publish.packet_id, entry.message
                ));
            }
            if entry.stage != Stage::Published {
                return Err(format!(
                    "{name}: PUBLISH of message {message} again after PUBREC"
                ));
            }
            return Ok(expect);
        }
        if qos > 0
            && !publish.dup
            && let Some(maximum) = self.receive_maximum
            && self.inbound.len() >= usize::from(maximum)
        {
            return Err(format!(
                "{name}: message {message} beyond the Receive Maximum {maximum} [MQTT-3.3.4-9]"
            ));
        }
        if qos > 0 {
            self.inbound.push(Inbound {
                packet_id: publish.packet_id,
                message,
                qos,
                stage: Stage::Published,
            });
        }
        if qos == 2 && !self.delivered_qos2.insert(message) {
            return Err(format!(
                "{name}: QoS 2 message {message} reached the application twice"
            ));
        }
        // Per-publisher order, over first arrivals (a QoS 1 resend of an earlier message after
        // a later one was acknowledged is allowed).
        if self.seen.insert(message) {
            let last = self.last_from_publisher.insert(info.publisher, message);
            if let Some(last) = last
                && last > message
            {
                return Err(format!(
                    "{name}: message {message} of {} after its later message {last}",
                    CLIENTS[info.publisher]
                ));
            }
        }
        Ok(expect)
    }
}

struct Harness {
    shard: Shard,
    now_ms: u64,
    next_connection: ConnectionId,
    clients: Vec<Client>,
    /// Every connection ever opened: its client and protocol version.
    owners: HashMap<ConnectionId, (usize, ProtocolVersion)>,
    model: Model,
    /// Packets each client received in this step, in order.
    received: BTreeMap<usize, Vec<Packet>>,
    /// Connections the shard has closed.
    closed: BTreeSet<ConnectionId>,
}

impl Harness {
    fn new() -> Self {
        let shard = Shard::new(ShardConfig {
            index: 0,
            shard_count: 1,
            node: 0,
            takeover_timeout_ms: 5_000,
            limits: limits(),
            shared_strategy: SharedStrategy::RoundRobin,
        });
        Self {
            shard,
            now_ms: 1_000,
            next_connection: 1,
            clients: CLIENTS.iter().map(|_| Client::new()).collect(),
            owners: HashMap::new(),
            model: Model {
                now_ms: 1_000,
                ..Model::default()
            },
            received: BTreeMap::new(),
            closed: BTreeSet::new(),
        }
    }

    fn run(&mut self, input: Input) -> Result<(), String> {
        self.shard.handle(self.now_ms, input);
        let mut outputs = Vec::new();
        self.shard.take_outputs(&mut outputs);
        for output in outputs {
            match output {
                Output::Send { connection, bytes } => self.decode_sent(connection, bytes)?,
                Output::Close { connection } => {
                    self.closed.insert(connection);
                    let (client, _) = self.owners[&connection];
                    if self.clients[client].connection == Some(connection) {
                        self.clients[client].connection = None;
                    }
                }
                // Shard 0 tells the cluster layer about its filters; there is no cluster here.
                Output::NodeRoute { .. } => {}
                other => return Err(format!("unexpected output of a lone shard: {other:?}")),
            }
        }
        Ok(())
    }

    fn decode_sent(&mut self, connection: ConnectionId, mut bytes: Bytes) -> Result<(), String> {
        let (client, version) = self.owners[&connection];
        let options = DecodeOptions {
            version,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        while !bytes.is_empty() {
            let (packet, used) = mqtt::decode(&bytes, &options)
                .map_err(|error| format!("the shard sent an invalid packet: {error}"))?
                .ok_or("the shard sent part of a packet")?;
            self.received.entry(client).or_default().push(packet);
            bytes = bytes.slice(used..);
        }
        Ok(())
    }

    fn send(&mut self, client: usize, packet: &Packet) -> Result<(), String> {
        let Some(connection) = self.clients[client].connection else {
            return Ok(());
        };
        let mut buffer = BytesMut::new();
        mqtt::encode(packet, self.clients[client].version, &mut buffer);
        self.run(Input::Received {
            connection,
            bytes: buffer.freeze(),
        })
    }

    /// Checks that `client` received an acknowledgement that `wanted` accepts in this step.
    fn acknowledged(
        &self,
        client: usize,
        what: &str,
        wanted: impl Fn(&Packet) -> bool,
    ) -> Result<(), String> {
        let received = self.received.get(&client).map_or(&[][..], Vec::as_slice);
        if received.iter().any(wanted) {
            Ok(())
        } else {
            Err(format!(
                "{}: no {what}; received {received:?}",
                CLIENTS[client]
            ))
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Connect {
                client,
                v5,
                clean_start,
                expiry_seconds,
                receive_maximum,
            } => self.connect(client, v5, clean_start, expiry_seconds, receive_maximum)?,
            Op::Subscribe {
                client,
                filter,
                qos,
            } => {
                if self.clients[client].connection.is_none() {
                    return Ok(());
                }
                let packet_id = self.clients[client].allocate_packet_id();
                let qos_level = QoS::from_bits(qos).ok_or("QoS 0 to 2")?;
                self.send(
                    client,
                    &Packet::Subscribe(Subscribe {
                        packet_id,
                        properties: SubscribeProperties::default(),
                        filters: vec![(
                            ByteString::from_static(FILTERS[filter]),
                            SubscriptionOptions::new(qos_level),
                        )],
                    }),
                )?;
                self.model.subscribe(client, filter, qos);
                self.acknowledged(client, "SUBACK granting the QoS", |packet| {
                    matches!(packet, Packet::SubAck(ack)
                        if ack.packet_id == packet_id && ack.reasons == [ReasonCode(qos)])
                })?;
            }
            Op::Unsubscribe { client, filter } => {
                if self.clients[client].connection.is_none() {
                    return Ok(());
                }
                let packet_id = self.clients[client].allocate_packet_id();
                self.send(
                    client,
                    &Packet::Unsubscribe(Unsubscribe {
                        packet_id,
                        properties: UnsubscribeProperties::default(),
                        filters: vec![ByteString::from_static(FILTERS[filter])],
                    }),
                )?;
                self.model.unsubscribe(client, filter);
                self.acknowledged(
                    client,
                    "UNSUBACK",
                    |packet| matches!(packet, Packet::UnsubAck(ack) if ack.packet_id == packet_id),
                )?;
            }
            Op::Publish {
                client,
                topic,
                qos,
                release,
            } => self.publish(client, topic, qos, release)?,
            Op::Release { client, pick } => {
                let sender = &mut self.clients[client];
                if sender.connection.is_none() || sender.outbound.is_empty() {
                    return Ok(());
                }
                let (packet_id, _) = sender.outbound.remove(pick % sender.outbound.len());
                self.release(client, packet_id)?;
            }
            Op::Resend { client, pick } => {
                let sender = &self.clients[client];
                if sender.connection.is_none() || sender.outbound.is_empty() {
                    return Ok(());
                }
                let (packet_id, message) = sender.outbound[pick % sender.outbound.len()];
                let topic = self.model.messages[message as usize].topic;
                self.send(client, &publish_packet(topic, 2, packet_id, message, true))?;
                self.model.publish(client, packet_id, message);
                self.acknowledged(
                    client,
                    "PUBREC for the resent PUBLISH",
                    |packet| matches!(packet, Packet::PubRec(ack) if ack.packet_id == packet_id),
                )?;
            }
            Op::Ack { client, pick } => {
                let answerable = self.answerable(client);
                if let Some(count) = std::num::NonZeroUsize::new(answerable.len()) {
                    self.answer(client, answerable[pick % count])?;
                }
            }
            Op::AckAll { client } => {
                for packet_id in self.answerable(client) {
                    self.answer(client, packet_id)?;
                }
            }
            Op::Disconnect {
                client,
                expiry_seconds,
            } => {
                if self.clients[client].connection.is_none() {
                    return Ok(());
                }
                let v5 = self.clients[client].version.is_v5();
                let expiry_seconds = expiry_seconds.filter(|_| v5);
                self.send(
                    client,
                    &Packet::Disconnect(Disconnect {
                        reason: ReasonCode::NORMAL_DISCONNECTION,
                        properties: DisconnectProperties {
                            session_expiry_interval: expiry_seconds,
                            ..DisconnectProperties::default()
                        },
                    }),
                )?;
                self.model.disconnected(client, expiry_seconds);
                if self.clients[client].connection.is_some() {
                    return Err(format!(
                        "{}: the shard kept the connection open after DISCONNECT",
                        CLIENTS[client]
                    ));
                }
            }
            Op::Lose { client } => {
                let Some(connection) = self.clients[client].connection.take() else {
                    return Ok(());
                };
                self.run(Input::Closed { connection })?;
                self.model.disconnected(client, None);
            }
            Op::Tick { advance_ms } => {
                self.now_ms += advance_ms;
                self.run(Input::Tick)?;
                self.model.tick(self.now_ms);
            }
        }
        Ok(())
    }

    fn connect(
        &mut self,
        client: usize,
        v5: bool,
        clean_start: bool,
        expiry_seconds: Option<u32>,
        receive_maximum: Option<u16>,
    ) -> Result<(), String> {
        let connection = self.next_connection;
        self.next_connection += 1;
        let version = if v5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V3_1_1
        };
        self.owners.insert(connection, (client, version));
        // The new connection is the client's from now on; the shard closes the old one.
        let state = &mut self.clients[client];
        let old_connection = state.connection.replace(connection);
        state.version = version;
        state.receive_maximum = receive_maximum.filter(|_| v5);
        self.run(Input::Opened {
            connection,
            transport: shardmq_shards::Transport::default(),
        })?;
        let properties = if v5 {
            ConnectProperties {
                session_expiry_interval: expiry_seconds,
                receive_maximum,
                ..ConnectProperties::default()
            }
        } else {
            ConnectProperties::default()
        };
        self.send(
            client,
            &Packet::Connect(Box::new(Connect {
                protocol: version,
                clean_start,
                keep_alive_seconds: 0,
                properties,
                client_id: ByteString::from_static(CLIENTS[client]),
                will: None,
                username: None,
                password: None,
            })),
        )?;
        self.model
            .connect(client, v5, clean_start, expiry_seconds, receive_maximum);
        match old_connection {
            // [MQTT-3.1.4-3]: the server closes the connection it takes the session from.
            Some(old) if !self.closed.contains(&old) => Err(format!(
                "{}: the connection taken over stays open",
                CLIENTS[client]
            )),
            _ => Ok(()),
        }
    }

    fn publish(
        &mut self,
        client: usize,
        topic: usize,
        qos: u8,
        release: bool,
    ) -> Result<(), String> {
        if self.clients[client].connection.is_none() {
            return Ok(());
        }
        let message = self.model.new_message(client, topic, qos);
        let packet_id = if qos > 0 {
            self.clients[client].allocate_packet_id()
        } else {
            0
        };
        self.send(
            client,
            &publish_packet(topic, qos, packet_id, message, false),
        )?;
        self.model.publish(client, packet_id, message);
        match qos {
            1 => self.acknowledged(
                client,
                "PUBACK",
                |packet| matches!(packet, Packet::PubAck(ack) if ack.packet_id == packet_id),
            )?,
            2 => {
                self.acknowledged(
                    client,
                    "PUBREC",
                    |packet| matches!(packet, Packet::PubRec(ack) if ack.packet_id == packet_id),
                )?;
                if release {
                    self.release(client, packet_id)?;
                } else {
                    self.clients[client].outbound.push((packet_id, message));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn release(&mut self, client: usize, packet_id: u16) -> Result<(), String> {
        self.send(client, &Packet::PubRel(PubAck::new(packet_id)))?;
        self.model.release(client, packet_id);
        self.acknowledged(client, "successful PUBCOMP", |packet| {
            matches!(packet, Packet::PubComp(ack)
                if ack.packet_id == packet_id && ack.reason == ReasonCode::SUCCESS)
        })
    }

    /// Packet ids of received messages that the client has an acknowledgement to send for.
    fn answerable(&self, client: usize) -> Vec<u16> {
        let state = &self.clients[client];
        if state.connection.is_none() {
            return Vec::new();
        }
        state
            .inbound
            .iter()
            .filter(|entry| entry.stage != Stage::Received)
            .map(|entry| entry.packet_id)
            .collect()
    }

    /// Sends the next acknowledgement of the message with `packet_id`.
    fn answer(&mut self, client: usize, packet_id: u16) -> Result<(), String> {
        let state = &mut self.clients[client];
        let position = state
            .inbound
            .iter()
            .position(|entry| entry.packet_id == packet_id)
            .ok_or("an inbound entry")?;
        let entry = &state.inbound[position];
        let message = entry.message;
        match (entry.qos, entry.stage) {
            (1, Stage::Published) => {
                state.inbound.remove(position);
                self.send(client, &Packet::PubAck(PubAck::new(packet_id)))?;
                self.model.acknowledged(client, message, false);
            }
            (2, Stage::Published) => {
                state.inbound[position].stage = Stage::Received;
                self.send(client, &Packet::PubRec(PubAck::new(packet_id)))?;
                self.model.received(client, message);
            }
            (2, Stage::Released) => {
                state.inbound.remove(position);
                self.send(client, &Packet::PubComp(PubAck::new(packet_id)))?;
                self.model.acknowledged(client, message, true);
            }
            other => return Err(format!("nothing to answer for {other:?}")),
        }
        Ok(())
    }

    /// Compares what every client received in this step with the model.
    fn check(&mut self) -> Result<(), String> {
        let received = std::mem::take(&mut self.received);
        let mut expected = std::mem::take(&mut self.model.expected);
        for (client, name) in CLIENTS.iter().enumerate() {
            let mut actual = Vec::new();
            for packet in received.get(&client).into_iter().flatten() {
                if let Some(expect) =
                    self.clients[client].take(packet, &self.model.messages, name)?
                {
                    actual.push(expect);
                }
            }
            let wanted = expected.remove(&client).unwrap_or_default();
            if actual != wanted {
                return Err(format!(
                    "{name}: received {actual:?}, the model expects {wanted:?}"
                ));
            }
        }
        let sessions = self.model.sessions.len();
        if self.shard.session_count() != sessions {
            return Err(format!(
                "the shard holds {} sessions, the model {sessions}: {:?}",
                self.shard.session_count(),
                self.model
                    .sessions
                    .keys()
                    .map(|&c| CLIENTS[c])
                    .collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

fn publish_packet(topic: usize, qos: u8, packet_id: u16, message: u32, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos: QoS::from_bits(qos).unwrap_or(QoS::AtMostOnce),
        retain: false,
        topic: ByteString::from_static(TOPICS[topic]),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(&message.to_be_bytes()),
    })
}

fn expiry_seconds() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        Just(Some(0)),
        Just(Some(2)),
        Just(Some(10)),
        Just(Some(300)),
        Just(Some(u32::MAX)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..CLIENTS.len();
    let pick = 0..8usize;
    prop_oneof![
        6 => (
            client.clone(),
            any::<bool>(),
            prop::bool::weighted(0.3),
            expiry_seconds(),
            prop::option::of(1u16..=2)
        )
            .prop_map(|(client, v5, clean_start, expiry_seconds, receive_maximum)| Op::Connect {
                client,
                v5,
                clean_start,
                expiry_seconds,
                receive_maximum,
            }),
        5 => (client.clone(), 0..FILTERS.len(), 0u8..=2)
            .prop_map(|(client, filter, qos)| Op::Subscribe { client, filter, qos }),
        1 => (client.clone(), 0..FILTERS.len())
            .prop_map(|(client, filter)| Op::Unsubscribe { client, filter }),
        10 => (client.clone(), 0..TOPICS.len(), 0u8..=2, prop::bool::weighted(0.7)).prop_map(
            |(client, topic, qos, release)| Op::Publish {
                client,
                topic,
                qos,
                release,
            }
        ),
        1 => (client.clone(), pick.clone()).prop_map(|(client, pick)| Op::Release { client, pick }),
        1 => (client.clone(), pick.clone()).prop_map(|(client, pick)| Op::Resend { client, pick }),
        6 => (client.clone(), pick).prop_map(|(client, pick)| Op::Ack { client, pick }),
        2 => client.clone().prop_map(|client| Op::AckAll { client }),
        1 => (client.clone(), expiry_seconds()).prop_map(|(client, expiry_seconds)| {
            Op::Disconnect {
                client,
                expiry_seconds,
            }
        }),
        1 => client.prop_map(|client| Op::Lose { client }),
        2 => prop_oneof![Just(500u64), Just(3_000), Just(20_000), Just(700_000)]
            .prop_map(|advance_ms| Op::Tick { advance_ms }),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(512)
}

/// Applies `ops` one by one, checking the shard against the model after each.
fn run(ops: &[Op]) -> Result<(), String> {
    let mut harness = Harness::new();
    for (step, op) in ops.iter().enumerate() {
        harness
            .apply(op)
            .and_then(|()| harness.check())
            .map_err(|why| format!("step {step} ({op:?}): {why}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn sessions_keep_what_mqtt_promises(ops in prop::collection::vec(op(), 1..100)) {
        run(&ops).map_err(TestCaseError::fail)?;
    }
}

/// Runs a fixed sequence, failing with the model's explanation.
fn replay(ops: &[Op]) {
    if let Err(why) = run(ops) {
        panic!("{why}");
    }
}

fn connect_v5(client: usize, clean_start: bool, expiry_seconds: u32) -> Op {
    Op::Connect {
        client,
        v5: true,
        clean_start,
        expiry_seconds: Some(expiry_seconds),
        receive_maximum: None,
    }
}

fn disconnect(client: usize) -> Op {
    Op::Disconnect {
        client,
        expiry_seconds: None,
    }
}

/// Found by the property test. A session that ends while its expiry timer is pending (here:
/// replaced by Clean Start) frees its slot; the next session in that slot starts again at the
/// same generation, so the stale timer ends it at the old deadline: 2 s instead of 300 s.
#[test]
fn a_replaced_session_keeps_its_own_expiry() {
    let ops = [
        connect_v5(0, false, 2),
        disconnect(0),
        connect_v5(0, true, 300),
        disconnect(0),
        Op::Tick { advance_ms: 3_000 },
    ];
    replay(&ops);
}

/// The same stale timer, across clients: alice's ended session leaves its slot and timer to
/// bob's new session, which ends at alice's deadline.
#[test]
fn a_session_in_a_reused_slot_keeps_its_own_expiry() {
    let ops = [
        connect_v5(0, false, 2),
        disconnect(0),
        connect_v5(0, false, 0),
        disconnect(0),
        connect_v5(1, false, 300),
        disconnect(1),
        Op::Tick { advance_ms: 3_000 },
    ];
    replay(&ops);
}
