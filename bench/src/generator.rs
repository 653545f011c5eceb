//! The load generator's per-reactor state machine: many simulated MQTT clients on one reactor.
//!
//! Owns: its clients (connecting, subscribing, publishing on an open-loop schedule), their
//! partial input, and the statistics they produce (histograms, counters, per-stream sequence
//! tracking).
//! Never: waits for a reply before the next scheduled publish (open loop, so queueing in the
//! broker shows up as latency instead of being hidden), or allocates per idle client beyond its
//! small record.
//!
//! Each payload starts with the intended send time (CLOCK_MONOTONIC nanoseconds, the same in
//! every process on the host, so worker processes can measure each other's messages), the
//! publisher's index and a sequence number; latency is measured from the intended send time,
//! not from when the send happened, so coordinated omission cannot hide a stall.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use hdrhistogram::Histogram;
use shardmq_net::ingress::tls::TlsSession;
use shardmq_net::ingress::ws::WsSession;
use shardmq_net::mqtt::{
    self, Connect, ConnectProperties, DecodeOptions, Packet, ProtocolVersion, PubAck, Publish,
    PublishProperties, QoS, Sender, Subscribe, SubscribeProperties, SubscriptionOptions,
};
use shardmq_net::reactor::{Actions, ConnectionId, Event, Handler};
use shardmq_net::rustls;
use shardmq_net::rustls::pki_types::ServerName;

/// The bytes at the start of every payload: intended time, publisher, sequence.
pub const HEADER_LEN: usize = 8 + 4 + 8;

/// The highest latency recorded, in microseconds (a minute).
const LATENCY_MAX_US: u64 = 60_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

/// What one simulated client does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Publishes to `topic` at the plan's rate.
    Publisher { index: u32, topic: String },
    /// Subscribes to `filter` and measures what arrives. Streams are counted under `tally`:
    /// the subscriber's own index, or one shared index for all members of a shared group (a
    /// group receives each message once, whichever member gets it).
    Subscriber { filter: String, tally: u32 },
    /// Connects and holds the connection.
    Idle,
}

/// One client of the plan: its global index and role.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub index: u32,
    pub role: Role,
}

/// The parts of a run every reactor shares.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub hosts: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub version: ProtocolVersion,
    pub qos: QoS,
    pub payload_bytes: usize,
    /// Messages per second per publisher.
    pub rate_per_publisher: f64,
    pub connect_rate_per_second: u32,
    pub keep_alive_seconds: u16,
    pub client_prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS for every connection (`--tls`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT over WebSocket at this path (`--ws`), over TLS with `--tls`.
    pub ws_path: Option<String>,
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval, seconds.
    pub session_expiry_seconds: Option<u32>,
    /// The reactor's epoch (deadlines are counted from it).
    pub epoch: Instant,
}

/// Takes every send whose intended time has come (`<= now_ns`), in time order, and schedules
/// each publisher's next send one interval after its last intended time: a loop that falls
/// behind sends the missed messages at once, with their original intended times, so the
/// schedule never slips and the delay shows in the measured latency. Sends at or after
/// `until_ns` are dropped from the schedule.
pub fn take_due(
    schedule: &mut BinaryHeap<Reverse<(u64, usize)>>,
    now_ns: u64,
    until_ns: u64,
    interval_ns: u64,
) -> Vec<(u64, usize)> {
    let mut due = Vec::new();
    while let Some(&Reverse((at, client))) = schedule.peek() {
        if at >= until_ns {
            schedule.pop();
            continue;
        }
        if at > now_ns {
            break;
        }
        schedule.pop();
        due.push((at, client));
        schedule.push(Reverse((at.saturating_add(interval_ns), client)));
    }
    due
}

/// The client identifier of client `index`.
pub fn client_id(prefix: &str, index: u32) -> String {
    format!("{prefix}{index}")
}

/// A topic pattern with `%i` (the client's index) and `%c` (its client identifier) filled in.
pub fn expand_topic(pattern: &str, prefix: &str, index: u32) -> String {
    pattern
        .replace("%i", &index.to_string())
        .replace("%c", &client_id(prefix, index))
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host.
pub fn monotonic_ns() -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut time) };
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

/// Progress and results shared with the main thread.
#[derive(Debug, Default)]
pub struct Shared {
    pub connected: u64,
    pub failed: u64,
    pub ready: u64,
    pub sent: u64,
    pub received: u64,
    /// Latencies of the current progress interval.
    pub interval: Option<Histogram<u64>>,
    /// Set by the main thread when the run is over.
    pub stopping: bool,
}

/// Per (subscriber, publisher) stream: what arrived, against the publisher's sequence.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    pub next: u64,
    pub unique: u64,
    pub duplicated: u64,
    pub reordered: u64,
    missing: BTreeSet<u64>,
}

impl Stream {
    pub fn record(&mut self, sequence: u64) {
        use std::cmp::Ordering;
        match sequence.cmp(&self.next) {
            Ordering::Equal => {
                self.next += 1;
                self.unique += 1;
            }
            Ordering::Greater => {
                // A gap: remember the missing sequence numbers (bounded) in case they come late.
                for missing in self.next..sequence {
                    if self.missing.len() < 100_000 {
                        self.missing.insert(missing);
                    }
                }
                self.next = sequence + 1;
                self.unique += 1;
            }
            Ordering::Less => {
                if self.missing.remove(&sequence) {
                    self.reordered += 1;
                    self.unique += 1;
                } else {
                    self.duplicated += 1;
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Connecting,
    AwaitingConnack,
    AwaitingSuback,
    Ready,
    Failed,
}

#[derive(Debug)]
struct Client {
    plan: ClientPlan,
    state: State,
    connection: Option<ConnectionId>,
    pending: BytesMut,
    sequence: u64,
    next_packet_id: u16,
    /// QoS 1/2 publishes awaiting their final acknowledgement: (packet id, intended time).
    unacknowledged: Vec<(u16, u64)>,
    connect_started_ns: u64,
    /// The connection's TLS session, with `--tls`.
    tls: Option<TlsSession>,
    /// The connection's WebSocket session, with `--ws` (inside TLS with `--tls`).
    ws: Option<WsSession>,
}

/// The most ciphertext a client's session takes before its handshake completes.
const TLS_HANDSHAKE_LEN_MAX: usize = 64 * 1024;

/// The final numbers of one reactor, merged by the main thread.
#[derive(Debug)]
pub struct Results {
    pub end_to_end: Histogram<u64>,
    pub acknowledgement: Histogram<u64>,
    pub connect: Histogram<u64>,
    /// Messages each publisher sent, by publisher index.
    pub sent: HashMap<u32, u64>,
    /// Streams by (subscriber index, publisher index).
    pub streams: HashMap<(u32, u32), Stream>,
    /// Messages whose intended send time falls in the measured window.
    pub received_in_window: u64,
    /// Messages that arrived during the measured window, whenever they were sent: the
    /// delivered rate, which an overloaded broker cannot inflate.
    pub arrived_in_window: u64,
}

pub struct Generator {
    plan: RunPlan,
    clients: Vec<Client>,
    by_connection: HashMap<ConnectionId, usize>,
    waiting: std::collections::VecDeque<usize>,
    /// Publishers by their next intended send time (ns).
    schedule: BinaryHeap<Reverse<(u64, usize)>>,
    interval_ns: u64,
    /// When publishing starts and stops, and the measured window (monotonic ns).
    publish_from_ns: Option<u64>,
    measure_from_ns: u64,
    measure_until_ns: u64,
    publish_until_ns: u64,
    results: Results,
    shared: Arc<Mutex<Shared>>,
    outbox: Vec<(ConnectionId, Bytes)>,
    encode: BytesMut,
    last_connect_tick_ms: u64,
    connect_budget: f64,
    interval_histogram: Histogram<u64>,
    local_counts: (u64, u64),
    last_report_ms: u64,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("clients", &self.clients.len())
            .finish()
    }
}

/// Messages the main thread sends to a generator.
#[derive(Debug)]
pub enum Control {
    /// Start publishing at `start_ns`; measure from `measure_from_ns` to `measure_until_ns`;
    /// stop publishing at `measure_until_ns`.
    Start {
        start_ns: u64,
        measure_from_ns: u64,
        measure_until_ns: u64,
    },
}

impl Generator {
    pub fn new(plan: RunPlan, clients: Vec<ClientPlan>, shared: Arc<Mutex<Shared>>) -> Self {
        let interval_ns = if plan.rate_per_publisher > 0.0 {
            (1e9 / plan.rate_per_publisher) as u64
        } else {
            u64::MAX
        };
        let waiting = (0..clients.len()).collect();
        Self {
            clients: clients
                .into_iter()
                .map(|plan| Client {
                    plan,
                    state: State::Waiting,
                    connection: None,
                    pending: BytesMut::new(),
                    sequence: 0,
                    next_packet_id: 0,
                    unacknowledged: Vec::new(),
                    connect_started_ns: 0,
                    tls: None,
                    ws: None,
                })
                .collect(),
            plan,
            by_connection: HashMap::new(),
            waiting,
            schedule: BinaryHeap::new(),
            interval_ns,
            publish_from_ns: None,
            measure_from_ns: 0,
            measure_until_ns: 0,
            publish_until_ns: 0,
            results: Results {
                end_to_end: histogram(),
                acknowledgement: histogram(),
                connect: histogram(),
                sent: HashMap::new(),
                streams: HashMap::new(),
                received_in_window: 0,
                arrived_in_window: 0,
            },
            shared,
            outbox: Vec::new(),
            encode: BytesMut::new(),
            last_connect_tick_ms: 0,
            connect_budget: 0.0,
            interval_histogram: histogram(),
            local_counts: (0, 0),
            last_report_ms: 0,
        }
    }

    fn shutting_down(&self) -> bool {
        self.shared.lock().expect("shared").stopping
    }

    pub fn into_results(self) -> Results {
        self.results
    }

    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }

    fn send(&mut self, client: usize, packet: &Packet) {
        let Some(connection) = self.clients[client].connection else {
            return;
        };
        self.encode.clear();
        mqtt::encode(packet, self.plan.version, &mut self.encode);
        let mqtt = self.encode.split();
        match &mut self.clients[client].ws {
            Some(ws) => {
                let mut framed = BytesMut::new();
                ws.write(&mqtt, &mut framed);
                self.transmit(connection, client, framed);
            }
            None => self.transmit(connection, client, mqtt),
        }
    }

    /// Bytes for the socket (MQTT, or WebSocket frames): through the client's TLS session
    /// first, with `--tls`.
    fn transmit(&mut self, connection: ConnectionId, client: usize, bytes: BytesMut) {
        if bytes.is_empty() {
            return;
        }
        match &mut self.clients[client].tls {
            Some(session) => {
                let mut wire = BytesMut::new();
                if let Err(error) = session.send(&bytes, &mut wire) {
                    eprintln!("shardmq-bench: client {client}: {error}");
                }
                if !wire.is_empty() {
                    self.outbox.push((connection, wire.freeze()));
                }
            }
            None => self.outbox.push((connection, bytes.freeze())),
        }
    }

    /// Bytes out of TLS (or the socket's): through the client's WebSocket session, with
    /// `--ws`, then to the MQTT decoder.
    fn received_plain(&mut self, connection: ConnectionId, client: usize, bytes: Bytes) {
        let Some(ws) = &mut self.clients[client].ws else {
            return self.received(client, bytes);
        };
        let (mut mqtt, mut answers) = (BytesMut::new(), BytesMut::new());
        let result = ws.read(&bytes, &mut mqtt, &mut answers);
        self.transmit(connection, client, answers);
        if let Err(error) = result {
            eprintln!(
                "shardmq-bench: client {} WebSocket: {error}",
                self.clients[client].plan.index
            );
            self.clients[client].state = State::Failed;
            self.shared.lock().expect("shared").failed += 1;
            return;
        }
        if !mqtt.is_empty() {
            self.received(client, mqtt.freeze());
        }
    }

    /// Bytes from the socket: through the client's TLS session first, with `--tls`.
    fn received_wire(&mut self, connection: ConnectionId, client: usize, bytes: Bytes) {
        let Some(session) = &mut self.clients[client].tls else {
            return self.received_plain(connection, client, bytes);
        };
        let (mut plain, mut wire) = (BytesMut::new(), BytesMut::new());
        let result = session.receive(&bytes, &mut plain, &mut wire);
        if !wire.is_empty() {
            self.outbox.push((connection, wire.freeze()));
        }
        if let Err(error) = result {
            eprintln!(
                "shardmq-bench: client {} TLS: {error}",
                self.clients[client].plan.index
            );
            self.clients[client].state = State::Failed;
            self.shared.lock().expect("shared").failed += 1;
            return;
        }
        if !plain.is_empty() {
            self.received_plain(connection, client, plain.freeze());
        }
    }

    fn start_connects(&mut self, now_ms: u64, actions: &mut Actions<Control>) {
        let elapsed = now_ms.saturating_sub(self.last_connect_tick_ms).min(1000);
        self.last_connect_tick_ms = now_ms;
        self.connect_budget = (self.connect_budget
            + elapsed as f64 * f64::from(self.plan.connect_rate_per_second) / 1000.0)
            .min(f64::from(self.plan.connect_rate_per_second.max(1)));
        while self.connect_budget >= 1.0 {
            let Some(client) = self.waiting.pop_front() else {
                break;
            };
            self.connect_budget -= 1.0;
            let index = self.clients[client].plan.index as usize;
            let host = self.plan.hosts[index % self.plan.hosts.len()];
            let source = (!self.plan.sources.is_empty())
                .then(|| self.plan.sources[index % self.plan.sources.len()]);
            self.clients[client].state = State::Connecting;
            self.clients[client].connect_started_ns = self.now_ns();
            actions.connect(host, source, client as u64);
        }
    }

    fn connected(&mut self, connection: ConnectionId, client: usize) {
        self.by_connection.insert(connection, client);
        let index = self.clients[client].plan.index as usize;
        if let Some(config) = &self.plan.tls {
            let host = self.plan.hosts[index % self.plan.hosts.len()];
            match TlsSession::client(
                config.clone(),
                ServerName::from(host.ip()),
                TLS_HANDSHAKE_LEN_MAX,
            ) {
                Ok(session) => self.clients[client].tls = Some(session),
                Err(error) => eprintln!("shardmq-bench: client {index}: {error}"),
            }
        }
        self.clients[client].connection = Some(connection);
        if let Some(path) = &self.plan.ws_path {
            let host = self.plan.hosts[index % self.plan.hosts.len()];
            let mut request = BytesMut::new();
            self.clients[client].ws =
                Some(WsSession::client(path, &host.to_string(), &mut request));
            self.transmit(connection, client, request);
        }
        let state = &mut self.clients[client];
        state.state = State::AwaitingConnack;
        let connect = Connect {
            protocol: self.plan.version,
            clean_start: self.plan.clean_start,
            keep_alive_seconds: self.plan.keep_alive_seconds,
            properties: ConnectProperties {
                session_expiry_interval: self
                    .plan
                    .session_expiry_seconds
                    .filter(|_| self.plan.version.is_v5()),
                ..ConnectProperties::default()
            },
            client_id: ByteString::from(client_id(&self.plan.client_prefix, state.plan.index)),
            will: None,
            username: self.plan.username.clone().map(ByteString::from),
            password: self
                .plan
                .password
                .clone()
                .map(|p| Bytes::from(p.into_bytes())),
        };
        self.send(client, &Packet::Connect(Box::new(connect)));
        self.shared.lock().expect("shared").connected += 1;
    }

    fn received(&mut self, client: usize, bytes: Bytes) {
        let mut buffer = if self.clients[client].pending.is_empty() {
            bytes
        } else {
            self.clients[client].pending.extend_from_slice(&bytes);
            self.clients[client].pending.split().freeze()
        };
        let options = DecodeOptions {
            version: self.plan.version,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        loop {
            match mqtt::decode(&buffer, &options) {
                Ok(Some((packet, used))) => {
                    buffer = buffer.slice(used..);
                    self.packet(client, packet);
                }
                Ok(None) => {
                    if !buffer.is_empty() {
                        self.clients[client].pending.extend_from_slice(&buffer);
                    }
                    return;
                }
                Err(error) => {
                    eprintln!(
                        "shardmq-bench: client {} got a malformed packet: {error}",
                        self.clients[client].plan.index
                    );
                    self.clients[client].state = State::Failed;
                    return;
                }
            }
        }
    }

    fn packet(&mut self, client: usize, packet: Packet) {
        let now_ns = self.now_ns();
        match packet {
            Packet::ConnAck(connack) => {
                if connack.reason.is_error() {
                    eprintln!(
                        "shardmq-bench: client {} refused: {}",
                        self.clients[client].plan.index, connack.reason
                    );
                    self.clients[client].state = State::Failed;
                    self.shared.lock().expect("shared").failed += 1;
                    return;
                }
                let started = self.clients[client].connect_started_ns;
                let _ = self
                    .results
                    .connect
                    .record(((now_ns - started) / 1000).clamp(1, LATENCY_MAX_US));
                if let Role::Subscriber { filter, .. } = &self.clients[client].plan.role {
                    let subscribe = Subscribe {
                        packet_id: 1,
                        properties: SubscribeProperties::default(),
                        filters: vec![(
                            ByteString::from(filter.clone()),
                            SubscriptionOptions::new(self.plan.qos),
                        )],
                    };
                    self.clients[client].state = State::AwaitingSuback;
                    self.send(client, &Packet::Subscribe(subscribe));
                } else {
                    self.ready(client);
                }
            }
            Packet::SubAck(_) => self.ready(client),
            Packet::Publish(publish) => {
                match publish.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        self.send(client, &Packet::PubAck(PubAck::new(publish.packet_id)))
                    }
                    QoS::ExactlyOnce => {
                        self.send(client, &Packet::PubRec(PubAck::new(publish.packet_id)))
                    }
                }
                self.measure(client, &publish.payload, now_ns);
            }
            Packet::PubRel(ack) => self.send(client, &Packet::PubComp(PubAck::new(ack.packet_id))),
            Packet::PubRec(ack) => self.send(client, &Packet::PubRel(PubAck::new(ack.packet_id))),
            Packet::PubAck(ack) | Packet::PubComp(ack) => {
                let unacknowledged = &mut self.clients[client].unacknowledged;
                if let Some(position) = unacknowledged
                    .iter()
                    .position(|(id, _)| *id == ack.packet_id)
                {
                    let (_, intended) = unacknowledged.swap_remove(position);
                    if intended >= self.measure_from_ns && intended < self.measure_until_ns {
                        let _ = self.results.acknowledgement.record(
                            ((now_ns.saturating_sub(intended)) / 1000).clamp(1, LATENCY_MAX_US),
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn ready(&mut self, client: usize) {
        self.clients[client].state = State::Ready;
        self.shared.lock().expect("shared").ready += 1;
    }

    fn measure(&mut self, client: usize, payload: &[u8], now_ns: u64) {
        if payload.len() < HEADER_LEN {
            return;
        }
        let intended = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
        let publisher = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
        let sequence = u64::from_be_bytes(payload[12..20].try_into().expect("8 bytes"));
        let Role::Subscriber { tally, .. } = self.clients[client].plan.role else {
            return;
        };
        self.results
            .streams
            .entry((tally, publisher))
            .or_default()
            .record(sequence);
        self.local_counts.1 += 1;
        if now_ns >= self.measure_from_ns && now_ns < self.measure_until_ns {
            self.results.arrived_in_window += 1;
        }
        if intended >= self.measure_from_ns && intended < self.measure_until_ns {
            let latency = (now_ns.saturating_sub(intended) / 1000).clamp(1, LATENCY_MAX_US);
            let _ = self.results.end_to_end.record(latency);
            let _ = self.interval_histogram.record(latency);
            self.results.received_in_window += 1;
        }
    }

    /// Sends every publish whose intended time has come (several if the loop fell behind: the
    /// schedule does not slip).
    fn publish_due(&mut self) {
        if self.publish_from_ns.is_none() {
            return;
        }
        let now_ns = self.now_ns();
        let due = take_due(
            &mut self.schedule,
            now_ns,
            self.publish_until_ns,
            self.interval_ns,
        );
        for (intended_ns, client) in due {
            self.publish_one(client, intended_ns);
        }
    }

    fn publish_one(&mut self, client: usize, intended_ns: u64) {
        let state = &mut self.clients[client];
        let Role::Publisher { index, topic } = &state.plan.role else {
            return;
        };
        if state.state != State::Ready {
            return;
        }
        let mut payload = BytesMut::with_capacity(self.plan.payload_bytes.max(HEADER_LEN));
        payload.put_u64(intended_ns);
        payload.put_u32(*index);
        payload.put_u64(state.sequence);
        payload.resize(self.plan.payload_bytes.max(HEADER_LEN), 0xA5);
        let packet_id = if self.plan.qos == QoS::AtMostOnce {
            0
        } else {
            state.next_packet_id = state.next_packet_id.wrapping_add(1).max(1);
            state
                .unacknowledged
                .push((state.next_packet_id, intended_ns));
            state.next_packet_id
        };
        state.sequence += 1;
        let publisher = *index;
        let publish = Publish {
            dup: false,
            qos: self.plan.qos,
            retain: false,
            topic: ByteString::from(topic.clone()),
            packet_id,
            properties: PublishProperties::default(),
            payload: payload.freeze(),
        };
        *self.results.sent.entry(publisher).or_default() += 1;
        self.local_counts.0 += 1;
        self.send(client, &Packet::Publish(publish));
    }

    fn report_progress(&mut self) {
        let mut shared = self.shared.lock().expect("shared");
        shared.sent += self.local_counts.0;
        shared.received += self.local_counts.1;
        self.local_counts = (0, 0);
        match &mut shared.interval {
            Some(histogram) => {
                let _ = histogram.add(&self.interval_histogram);
            }
            None => shared.interval = Some(self.interval_histogram.clone()),
        }
        self.interval_histogram.reset();
    }
}

impl Handler for Generator {
    type Message = Control;

    fn event(&mut self, now_ms: u64, event: Event<Control>) {
        match event {
            Event::Connected(connection, tag) => self.connected(connection, tag as usize),
            Event::ConnectFailed(tag, error) => {
                let client = tag as usize;
                eprintln!(
                    "shardmq-bench: client {} could not connect: {error}",
                    self.clients[client].plan.index
                );
                self.clients[client].state = State::Failed;
                self.shared.lock().expect("shared").failed += 1;
            }
            Event::Received(connection, bytes) => {
                if let Some(&client) = self.by_connection.get(&connection) {
                    self.received_wire(connection, client, bytes);
                }
            }
            Event::Closed(connection) => {
                if let Some(client) = self.by_connection.remove(&connection) {
                    if self.clients[client].state != State::Failed {
                        eprintln!(
                            "shardmq-bench: the broker closed client {}",
                            self.clients[client].plan.index
                        );
                    }
                    self.clients[client].state = State::Failed;
                    self.clients[client].connection = None;
                }
            }
            Event::Message(Control::Start {
                start_ns,
                measure_from_ns,
                measure_until_ns,
            }) => {
                self.publish_from_ns = Some(start_ns);
                self.measure_from_ns = measure_from_ns;
                self.measure_until_ns = measure_until_ns;
                self.publish_until_ns = measure_until_ns;
                // Publishers start spread over one interval, not all at once.
                let publishers: Vec<usize> = (0..self.clients.len())
                    .filter(|&c| matches!(self.clients[c].plan.role, Role::Publisher { .. }))
                    .collect();
                let count = publishers.len().max(1) as u64;
                for (position, client) in publishers.into_iter().enumerate() {
                    let phase = if self.interval_ns == u64::MAX {
                        0
                    } else {
                        self.interval_ns / count * position as u64
                    };
                    self.schedule.push(Reverse((start_ns + phase, client)));
                }
            }
            Event::Tick => {
                if now_ms >= self.last_report_ms + 250 {
                    self.last_report_ms = now_ms;
                    self.report_progress();
                }
            }
            Event::Shutdown => {
                // Say goodbye politely, then close.
                for client in 0..self.clients.len() {
                    if self.clients[client].connection.is_some() {
                        self.send(client, &Packet::Disconnect(mqtt::Disconnect::default()));
                    }
                }
                self.report_progress();
            }
            Event::Opened(..) | Event::Adopted(..) | Event::OpenedSide(_) | Event::Sent(..) => {}
        }
    }

    fn flush(&mut self, actions: &mut Actions<Control>) {
        let now_ms = self.plan.epoch.elapsed().as_millis() as u64;
        if !self.waiting.is_empty() {
            self.start_connects(now_ms, actions);
        }
        self.publish_due();
        for (connection, bytes) in self.outbox.drain(..) {
            actions.send(connection, bytes);
        }
        if self.shutting_down() {
            for client in &mut self.clients {
                if let Some(connection) = client.connection.take() {
                    actions.close(connection);
                }
            }
        }
    }

    fn next_deadline_us(&self) -> Option<u64> {
        let now_us = self.plan.epoch.elapsed().as_micros() as u64;
        // Publish times are monotonic ns; deadlines count from the reactor's epoch.
        let now_ns = monotonic_ns();
        let next_publish = self
            .schedule
            .peek()
            .map(|Reverse((due, _))| now_us + due.saturating_sub(now_ns).div_ceil(1000));
        let connects = (!self.waiting.is_empty()).then_some(now_us + 1000);
        // At least every 250 ms, for progress reports.
        [next_publish, connects, Some(now_us + 250_000)]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_schedule_does_not_slip_when_the_loop_is_late() {
        // Two publishers every 1000 ns, the second offset by 500 ns.
        let mut schedule: BinaryHeap<Reverse<(u64, usize)>> =
            [Reverse((0, 0)), Reverse((500, 1))].into_iter().collect();
        assert_eq!(take_due(&mut schedule, 0, 10_000, 1000), [(0, 0)]);
        // The loop wakes 3.2 intervals late: everything missed goes now, at its intended time.
        assert_eq!(
            take_due(&mut schedule, 3_200, 10_000, 1000),
            [
                (500, 1),
                (1000, 0),
                (1500, 1),
                (2000, 0),
                (2500, 1),
                (3000, 0)
            ]
        );
        assert_eq!(
            take_due(&mut schedule, 3_200, 10_000, 1000),
            [],
            "nothing twice"
        );
        // Past the end of the window the schedule empties.
        let rest = take_due(&mut schedule, 20_000, 4_000, 1000);
        assert_eq!(rest, [(3500, 1)]);
        assert!(schedule.is_empty());
    }

    #[test]
    fn topic_patterns_and_client_ids() {
        assert_eq!(
            expand_topic("t/%i/x/%c", "bench-7-", 42),
            "t/42/x/bench-7-42"
        );
        assert_eq!(client_id("bench-7-", 3), "bench-7-3");
    }

    #[test]
    fn streams_count_loss_duplicates_and_reordering() {
        let mut stream = Stream::default();
        for sequence in [0, 1, 2, 2, 5, 3, 6] {
            stream.record(sequence);
        }
        // 0,1,2 in order; 2 again is a duplicate; 5 skips 3 and 4; 3 arrives late; 6 follows.
        assert_eq!(
            (
                stream.unique,
                stream.duplicated,
                stream.reordered,
                stream.next
            ),
            (6, 1, 1, 7)
        );
        assert_eq!(
            stream.missing.iter().copied().collect::<Vec<_>>(),
            [4],
            "4 is still missing"
        );
    }
}
