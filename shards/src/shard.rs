//! One shard: the connections, sessions, subscriptions and routes of one core, as a state
//! machine. `handle(now_ms, input)` changes the state and queues outputs; `take_outputs`
//! hands them to the reactor, with each connection's packets of the batch in one buffer.
//!
//! Invariants: a session lives on the shard its client identifier hashes to
//! ([`owner_shard`]); a connection belongs to at most one session and a session to at most one
//! connection; a filter is in the trie exactly while some session here holds it, and the node
//! route table (every shard's copy) names this shard for it exactly then.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::{HashMap, HashSet};
use shardmq_net::mqtt::{
    self, AckProperties, ConnAck, ConnAckProperties, Connect, DecodeError, DecodeOptions,
    Disconnect, ErrorResponse, Packet, ProtocolVersion, PubAck, Publish, PublishProperties, QoS,
    ReasonCode, RetainHandling, Sender, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe, topic,
};
use tracing::{debug, info, warn};

use crate::limits::Limits;
use crate::message::{
    ConnectionId, Forwarded, Message, NodeId, SessionTransfer, ShardIndex, ShardMessage,
};
use crate::retained::Retained;
use crate::trie::{Change, Trie};

mod takeover;

/// The shard that owns the session of `client_id`: FNV-1a of the identifier, so that every
/// shard (and every restart) computes the same owner.
pub fn owner_shard(client_id: &str, shard_count: u16) -> ShardIndex {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in client_id.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shard_count.max(1))) as ShardIndex
}

/// What the reactor tells the shard.
// Inputs and outputs live for one batch and are never stored in bulk, so the size of a
// delivered message inline costs less than boxing it (an allocation per message).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// A connection was accepted by this shard, or handed to it by another shard.
    Opened { connection: ConnectionId },
    /// Bytes arrived on a connection.
    Received {
        connection: ConnectionId,
        bytes: Bytes,
    },
    /// The peer closed the connection, or it failed.
    Closed { connection: ConnectionId },
    /// A batch of messages from other shards.
    Shard(ShardMessage),
    /// A message forwarded by another node of the cluster: delivered here, never forwarded on.
    FromNode(Forwarded),
    /// Time passed: deadlines (keep alive, will delay, session expiry) are checked.
    Tick,
    /// The server is shutting down: every client gets DISCONNECT 0x8B (5.0) and is closed.
    Shutdown,
}

/// What the shard asks the reactor to do.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Send these bytes on the connection, after anything sent before.
    Send {
        connection: ConnectionId,
        bytes: Bytes,
    },
    /// Close the connection once everything queued for it is sent.
    Close { connection: ConnectionId },
    /// Move the connection to `shard`, which owns its client identifier, and give that shard
    /// `bytes` (everything received so far) as the connection's first input. This shard has
    /// already forgotten the connection.
    HandOff {
        connection: ConnectionId,
        shard: ShardIndex,
        bytes: Bytes,
    },
    /// Deliver a message to another shard.
    ToShard {
        shard: ShardIndex,
        message: ShardMessage,
    },
    /// Forward a message to another node of the cluster.
    ToNode { node: NodeId, forwarded: Forwarded },
    /// Send a session claim or handover to another node of the cluster.
    SessionToNode {
        node: NodeId,
        transfer: SessionTransfer,
    },
    /// Open a TCP connection (a cluster link); the reactor answers with the connection or the
    /// failure, named by `tag`. Emitted by the cluster layer, never by the shard itself.
    Connect {
        address: std::net::SocketAddr,
        tag: u64,
    },
    /// This node gained its first (`added`) or lost its last shard holding `filter` (for a
    /// shared subscription, `group`'s `filter`): a route delta for the cluster. Only shard 0
    /// emits these, so each change is told once.
    NodeRoute {
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    },
}

/// Settings of one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub index: ShardIndex,
    pub shard_count: u16,
    /// This node's identifier in its cluster (0 alone): part of assigned client identifiers,
    /// and the tie-break of concurrent takeovers across nodes.
    pub node: NodeId,
    /// How long a CONNECT waits for the other nodes to hand over its client's session.
    pub takeover_timeout_ms: u64,
    pub limits: Limits,
    pub shared_strategy: SharedStrategy,
}

/// How a shared subscription group picks the member for a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SharedStrategy {
    /// Members in turn.
    #[default]
    RoundRobin,
    /// By a hash of the publisher's client identifier: one publisher's messages go to one
    /// member (while the group's membership stays the same), so they stay in order.
    ClientIdHash,
}

/// The member of `count` that gets a message: the next in turn, or by the publisher's hash.
fn pick_member(
    strategy: SharedStrategy,
    turn: &mut u64,
    publisher: Option<&ByteString>,
    count: usize,
) -> usize {
    match strategy {
        SharedStrategy::RoundRobin => {
            *turn += 1;
            (*turn % count as u64) as usize
        }
        SharedStrategy::ClientIdHash => {
            let hash = owner_shard(publisher.map_or("", |p| &p[..]), u16::MAX);
            usize::from(hash) % count
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subscriber {
    session: SessionIndex,
    options: SubscriptionOptions,
    identifier: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SharedMember {
    group: ByteString,
    subscriber: Subscriber,
}

/// Where a route leads: a shard of this node, or another node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Shard(ShardIndex),
    Node(NodeId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SharedRoute {
    group: ByteString,
    filter: ByteString,
    target: Target,
}

type SessionIndex = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    KeepAlive(ConnectionId),
    /// A session claim across nodes waited long enough (its number).
    Claim(u64),
    WillDelay(SessionIndex, u64),
    SessionExpiry(SessionIndex, u64),
}

#[derive(Debug)]
struct Connection {
    session: Option<SessionIndex>,
    version: ProtocolVersion,
    /// Bytes of a packet not complete yet; empty (and unallocated) between packets.
    pending: BytesMut,
    /// Packets encoded in this batch, sent by `take_outputs`.
    outgoing: BytesMut,
    keep_alive_ms: u64,
    last_received_ms: u64,
    /// The client's Maximum Packet Size: larger messages are not sent to it.
    client_packet_size_max: u32,
    /// Topic aliases the client set (5.0), grown on first use up to the announced maximum.
    topic_aliases: Vec<Option<ByteString>>,
    problem_information: bool,
    /// CONNECT is waiting for the other nodes to hand over the session: what arrives
    /// meanwhile is kept in `pending` and read once the connection is accepted.
    claiming: bool,
    closing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InflightState {
    /// PUBLISH sent, PUBACK (QoS 1) or PUBREC (QoS 2) awaited.
    Published,
    /// PUBREL sent, PUBCOMP awaited.
    Released,
}

#[derive(Debug)]
struct Inflight {
    packet_id: u16,
    message: Message,
    subscription_identifiers: Vec<u32>,
    state: InflightState,
}

#[derive(Debug)]
struct Queued {
    message: Message,
    subscription_identifiers: Vec<u32>,
}

#[derive(Debug)]
struct StoredWill {
    message: Message,
    delay_seconds: u32,
}

#[derive(Debug)]
struct Session {
    client_id: ByteString,
    connection: Option<ConnectionId>,
    version: ProtocolVersion,
    /// Each held filter (with its `$share/{group}/` prefix) and its options and identifier.
    subscriptions: HashMap<ByteString, (SubscriptionOptions, Option<u32>)>,
    expiry_seconds: u32,
    /// Bumped at every connect, so that timers set for an earlier connection are ignored.
    generation: u64,
    next_packet_id: u16,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Queued>,
    /// The client's Receive Maximum, capped by the limit.
    send_window: u16,
    /// QoS 2 packet identifiers received and forwarded, awaiting PUBREL.
    awaiting_release: HashSet<u16>,
    /// Boxed: most sessions have no will, and a message inline would double every session.
    will: Option<Box<StoredWill>>,
    dropped_messages: u64,
}

impl Session {
    /// A session without a connection, subscriptions or messages.
    fn new(
        client_id: ByteString,
        version: ProtocolVersion,
        expiry_seconds: u32,
        send_window: u16,
    ) -> Self {
        Self {
            client_id,
            connection: None,
            version,
            subscriptions: HashMap::new(),
            expiry_seconds,
            generation: 0,
            next_packet_id: 0,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            send_window,
            awaiting_release: HashSet::new(),
            will: None,
            dropped_messages: 0,
        }
    }

    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            let candidate = self.next_packet_id;
            if !self
                .inflight
                .iter()
                .any(|entry| entry.packet_id == candidate)
            {
                return candidate;
            }
        }
    }
}

/// One shard's broker state.
#[derive(Debug)]
pub struct Shard {
    config: ShardConfig,
    now_ms: u64,
    connections: HashMap<ConnectionId, Connection>,
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<SessionIndex>,
    client_ids: HashMap<ByteString, SessionIndex>,
    subscriptions: Trie<Subscriber>,
    shared: Trie<SharedMember>,
    /// The node route table (which shards of this node hold a filter) and the cluster route
    /// table (which other nodes do), in one trie so that a publish matches once.
    routes: Trie<Target>,
    shared_routes: Trie<SharedRoute>,
    /// The other nodes of the cluster that are members now: a retained message goes to each.
    cluster_nodes: Vec<NodeId>,
    /// Those of them that are up: a CONNECT claims its client's session from each.
    cluster_nodes_up: Vec<NodeId>,
    /// CONNECTs waiting for other nodes to hand over their session, by client identifier,
    /// and the client identifier of each claim number.
    claims: HashMap<ByteString, takeover::PendingClaim>,
    claim_clients: HashMap<u64, ByteString>,
    next_claim: u64,
    /// Other nodes' claims this shard answered with no claim of its own pending, by client:
    /// (node, its claim, when). A claim this shard starts soon after names them (`after`).
    answered: HashMap<ByteString, Vec<(NodeId, u64, u64)>>,
    answered_prune_at: usize,
    retained: Retained,
    timers: BinaryHeap<Reverse<(u64, Timer)>>,
    outputs: Vec<Output>,
    dirty: Vec<ConnectionId>,
    /// Turn counters for shared subscriptions: which member shard (on the publishing shard)
    /// and which member session (on the member shard). Kept apart so that one never steps the
    /// other.
    shared_shard_turn: u64,
    shared_member_turn: u64,
    assigned_ids: u64,
    /// Scratch space for one delivery, kept to avoid an allocation per message.
    matched: Vec<Subscriber>,
    /// Scratch space for routing one message: which shards have plain subscribers.
    plain_targets: Vec<bool>,
}

const SERVER_SHUTTING_DOWN: ReasonCode = ReasonCode::SERVER_SHUTTING_DOWN;

impl Shard {
    /// A session claim waits this long for other nodes (a cluster-wide setting can change it).
    pub fn set_takeover_timeout_ms(&mut self, timeout_ms: u64) {
        self.config.takeover_timeout_ms = timeout_ms;
    }

    pub fn new(config: ShardConfig) -> Self {
        assert!(
            config.index < config.shard_count,
            "shard index out of range"
        );
        Self {
            config,
            now_ms: 0,
            connections: HashMap::new(),
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            client_ids: HashMap::new(),
            subscriptions: Trie::new(),
            shared: Trie::new(),
            routes: Trie::new(),
            shared_routes: Trie::new(),
            cluster_nodes: Vec::new(),
            cluster_nodes_up: Vec::new(),
            claims: HashMap::new(),
            claim_clients: HashMap::new(),
            next_claim: 0,
            answered: HashMap::new(),
            answered_prune_at: 1024,
            retained: Retained::default(),
            timers: BinaryHeap::new(),
            outputs: Vec::new(),
            dirty: Vec::new(),
            shared_shard_turn: 0,
            shared_member_turn: 0,
            assigned_ids: 0,
            matched: Vec::new(),
            plain_targets: Vec::new(),
        }
    }

    pub fn session_count(&self) -> usize {
        self.client_ids.len()
    }

    /// The earliest deadline, for the reactor's timer.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Applies one input at time `now_ms` (milliseconds on a monotonic clock).
    pub fn handle(&mut self, now_ms: u64, input: Input) {
        debug_assert!(now_ms >= self.now_ms, "the clock went backwards");
        self.now_ms = now_ms;
        match input {
            Input::Opened { connection } => self.open(connection),
            Input::Received { connection, bytes } => self.receive(connection, bytes),
            Input::Closed { connection } => self.connection_lost(connection, "closed by the peer"),
            Input::Shard(message) => self.shard_message(message),
            Input::FromNode(forwarded) => {
                self.route(
                    forwarded.message,
                    Some((forwarded.plain, &forwarded.groups)),
                );
            }
            Input::Tick => self.fire_timers(),
            Input::Shutdown => self.shutdown(),
        }
    }

    /// The outputs of everything handled since the last call; each connection's packets come
    /// as one `Send`, before its `Close`.
    pub fn take_outputs(&mut self, outputs: &mut Vec<Output>) {
        for connection_id in self.dirty.drain(..) {
            if let Some(connection) = self.connections.get_mut(&connection_id)
                && !connection.outgoing.is_empty()
            {
                // Take the whole buffer, not a split of it: a split would leave the connection
                // holding the rest of the allocation while it idles.
                let bytes = std::mem::take(&mut connection.outgoing).freeze();
                outputs.push(Output::Send {
                    connection: connection_id,
                    bytes,
                });
            }
        }
        // Closes go after the sends of the same batch, and closed connections are forgotten.
        for output in self.outputs.drain(..) {
            if let Output::Close { connection } = output {
                if let Some(closed) = self.connections.remove(&connection)
                    && !closed.outgoing.is_empty()
                {
                    outputs.push(Output::Send {
                        connection,
                        bytes: closed.outgoing.freeze(),
                    });
                }
            }
            outputs.push(output);
        }
    }

    fn open(&mut self, connection: ConnectionId) {
        if self.connections.len() >= self.config.limits.connections_per_shard_max {
            warn!(
                connection,
                limit = self.config.limits.connections_per_shard_max,
                "connection refused: the shard is at its connection limit"
            );
            self.outputs.push(Output::Close { connection });
            return;
        }
        self.connections.insert(
            connection,
            Connection {
                session: None,
                version: ProtocolVersion::V5,
                pending: BytesMut::new(),
                outgoing: BytesMut::new(),
                keep_alive_ms: 0,
                last_received_ms: self.now_ms,
                client_packet_size_max: mqtt::PACKET_SIZE_MAX,
                topic_aliases: Vec::new(),
                problem_information: true,
                claiming: false,
                closing: false,
            },
        );
    }

    fn receive(&mut self, connection_id: ConnectionId, bytes: Bytes) {
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        connection.last_received_ms = self.now_ms;
        if connection.claiming {
            connection.pending.extend_from_slice(&bytes);
            return;
        }
        // Without a partial packet the received buffer is decoded in place, so payloads are
        // slices of it; otherwise the bytes join the partial packet first.
        let mut buffer = if connection.pending.is_empty() {
            bytes
        } else {
            connection.pending.extend_from_slice(&bytes);
            connection.pending.split().freeze()
        };
        // Before CONNECT, everything received so far goes along if the session lives on another
        // shard; after it, nothing needs keeping (and cloning costs an atomic increment).
        let connect_bytes = connection.session.is_none().then(|| buffer.clone());
        loop {
            let Some(connection) = self.connections.get_mut(&connection_id) else {
                return;
            };
            if connection.closing {
                return;
            }
            let connected = connection.session.map(|_| connection.version);
            let options = DecodeOptions {
                version: connection.version,
                max_packet_size: self.config.limits.packet_size_max,
                sender: Sender::Client,
            };
            match mqtt::decode(&buffer, &options) {
                Ok(Some((packet, used))) => {
                    buffer = buffer.slice(used..);
                    if connected.is_none() {
                        // Everything received so far, CONNECT first, in case the session lives
                        // on another shard.
                        let received = connect_bytes.clone().unwrap_or_default();
                        self.first_packet(connection_id, packet, received);
                        let Some(connection) = self.connections.get_mut(&connection_id) else {
                            return;
                        };
                        if connection.claiming {
                            // Read once the session is here.
                            connection.pending.extend_from_slice(&buffer);
                            return;
                        }
                    } else {
                        self.packet(connection_id, packet);
                    }
                }
                Ok(None) => {
                    if !buffer.is_empty() {
                        connection.pending.extend_from_slice(&buffer);
                    }
                    return;
                }
                Err(error) => {
                    self.protocol_error(connection_id, connected, &error);
                    return;
                }
            }
        }
    }

    fn protocol_error(
        &mut self,
        connection_id: ConnectionId,
        connected: Option<ProtocolVersion>,
        error: &DecodeError,
    ) {
        info!(connection = connection_id, %error, "closing the connection: the client broke the protocol");
        match error.response(connected) {
            ErrorResponse::ConnackV5(reason) => {
                self.send_connack_refusal(connection_id, ProtocolVersion::V5, reason)
            }
            ErrorResponse::ConnackV3(code) => {
                let reason = ReasonCode::from_connack_return_code(code)
                    .unwrap_or(ReasonCode::UNSPECIFIED_ERROR);
                self.send_connack_refusal(connection_id, ProtocolVersion::V3_1_1, reason)
            }
            ErrorResponse::Disconnect(reason) => self.send_disconnect(
                connection_id,
                reason,
                Some(&format!("[{}] {}", error.rule, error.message)),
            ),
            ErrorResponse::Close => {}
        }
        self.drop_connection(connection_id, true);
    }

    /// Ends a connection with a reason: DISCONNECT for 5.0 clients (with `why` as its reason
    /// string), a plain close for 3.x; `why` also goes to the log.
    fn disconnect(
        &mut self,
        connection_id: ConnectionId,
        reason: ReasonCode,
        why: &str,
        publish_will: bool,
    ) {
        if reason == SERVER_SHUTTING_DOWN {
            debug!(connection = connection_id, %reason, why, "closing the connection");
        } else {
            info!(connection = connection_id, %reason, why, "closing the connection");
        }
        if let Some(connection) = self.connections.get(&connection_id)
            && connection.session.is_some()
        {
            // Takeover and shutdown are routine: their reason code says enough.
            let explain =
                reason != SERVER_SHUTTING_DOWN && reason != ReasonCode::SESSION_TAKEN_OVER;
            self.send_disconnect(connection_id, reason, explain.then_some(why));
        }
        self.drop_connection(connection_id, publish_will);
    }

    /// Sends a 5.0 DISCONNECT, with a reason string unless it would make the packet larger than
    /// the client accepts [MQTT-3.1.2-25]. Nothing for 3.x, which has no server DISCONNECT.
    fn send_disconnect(
        &mut self,
        connection_id: ConnectionId,
        reason: ReasonCode,
        why: Option<&str>,
    ) {
        let Some(connection) = self.connections.get(&connection_id) else {
            return;
        };
        if !connection.version.is_v5() {
            return;
        }
        let mut disconnect = Disconnect::new(reason);
        disconnect.properties.reason_string = why.map(|why| ByteString::from(why.to_owned()));
        let mut packet = Packet::Disconnect(disconnect);
        if packet.encoded_len(ProtocolVersion::V5) > connection.client_packet_size_max as usize {
            packet = Packet::Disconnect(Disconnect::new(reason));
        }
        self.send(connection_id, &packet);
    }

    /// Queues the close and detaches the session (publishing its will if `publish_will`).
    fn drop_connection(&mut self, connection_id: ConnectionId, publish_will: bool) {
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        connection.closing = true;
        let session = connection.session.take();
        self.outputs.push(Output::Close {
            connection: connection_id,
        });
        if let Some(session) = session {
            self.detach(session, publish_will);
        }
    }

    fn connection_lost(&mut self, connection_id: ConnectionId, why: &str) {
        if let Some(connection) = self.connections.remove(&connection_id) {
            if connection.closing {
                return;
            }
            debug!(connection = connection_id, why, "connection lost");
            if let Some(session) = connection.session {
                self.detach(session, true);
            }
        }
    }

    /// The session's connection is gone: publish or schedule the will, and end or keep the
    /// session according to its expiry interval.
    fn detach(&mut self, index: SessionIndex, publish_will: bool) {
        let now_ms = self.now_ms;
        let session = self.session_mut(index);
        session.connection = None;
        let generation = session.generation;
        let expiry_seconds = session.expiry_seconds;
        let will = session.will.take();
        if let Some(will) = will.filter(|_| publish_will) {
            let delay = will.delay_seconds.min(expiry_seconds);
            if delay == 0 {
                self.publish(will.message);
            } else {
                self.session_mut(index).will = Some(will);
                self.timers.push(Reverse((
                    now_ms + u64::from(delay) * 1000,
                    Timer::WillDelay(index, generation),
                )));
            }
        }
        if expiry_seconds == 0 {
            self.end_session(index);
        } else if expiry_seconds != u32::MAX {
            self.timers.push(Reverse((
                now_ms + u64::from(expiry_seconds) * 1000,
                Timer::SessionExpiry(index, generation),
            )));
        }
    }

    /// Stores a new session in a free slot and indexes its client identifier.
    fn insert_session(&mut self, session: Session) -> SessionIndex {
        let client_id = session.client_id.clone();
        let index = match self.free_sessions.pop() {
            Some(index) => {
                self.sessions[index as usize] = Some(session);
                index
            }
            None => {
                self.sessions.push(Some(session));
                SessionIndex::try_from(self.sessions.len() - 1).expect("session index overflow")
            }
        };
        self.client_ids.insert(client_id, index);
        index
    }

    fn session(&self, index: SessionIndex) -> &Session {
        self.sessions[index as usize]
            .as_ref()
            .expect("a live session index")
    }

    fn session_mut(&mut self, index: SessionIndex) -> &mut Session {
        self.sessions[index as usize]
            .as_mut()
            .expect("a live session index")
    }

    /// Removes a session and its subscriptions. A delayed will still pending is published now
    /// (MQTT 5.0 §3.1.3.2.2: at the latest when the session ends).
    fn end_session(&mut self, index: SessionIndex) {
        let session = self.sessions[index as usize]
            .take()
            .expect("a live session index");
        debug!(client_id = %session.client_id, "session ended");
        self.client_ids.remove(&session.client_id);
        self.free_sessions.push(index);
        for (filter, _) in &session.subscriptions {
            self.remove_subscription(index, filter);
        }
        if let Some(will) = session.will {
            self.publish(will.message);
        }
    }

    fn encode_into(connection: &mut Connection, packet: &Packet) {
        mqtt::encode(packet, connection.version, &mut connection.outgoing);
    }

    /// Queues `packet` on the connection for this batch's send.
    fn send(&mut self, connection_id: ConnectionId, packet: &Packet) {
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            if connection.outgoing.is_empty() {
                self.dirty.push(connection_id);
            }
            Self::encode_into(connection, packet);
        }
    }

    fn send_connack_refusal(
        &mut self,
        connection_id: ConnectionId,
        version: ProtocolVersion,
        reason: ReasonCode,
    ) {
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            connection.version = version;
        }
        let connack = ConnAck {
            session_present: false,
            reason,
            properties: ConnAckProperties::default(),
        };
        self.send(connection_id, &Packet::ConnAck(Box::new(connack)));
    }
}

// CONNECT and sessions.
impl Shard {
    fn first_packet(&mut self, connection_id: ConnectionId, packet: Packet, received: Bytes) {
        let Packet::Connect(connect) = packet else {
            info!(
                connection = connection_id,
                packet = packet.name(),
                "closing the connection: the first packet is not CONNECT [MQTT-3.1.0-1]"
            );
            self.drop_connection(connection_id, false);
            return;
        };
        let version = connect.protocol;
        let limits = &self.config.limits;
        let refuse = |reason| Some(reason);
        let refusal = if connect.client_id.len() > limits.client_id_length_max
            || (version == ProtocolVersion::V3_1
                && (connect.client_id.is_empty() || connect.client_id.len() > 23))
            || (connect.client_id.is_empty() && !connect.clean_start && !version.is_v5())
        {
            // 3.1 requires 1 to 23 characters; 3.1.1 refuses an empty identifier with clean
            // session 0 [MQTT-3.1.3-8]; every version is held to the configured length.
            refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID)
        } else if connect.properties.authentication_method.is_some() {
            // No authentication method is configured, so none is supported (§4.12).
            refuse(ReasonCode::BAD_AUTHENTICATION_METHOD)
        } else if connect
            .will
            .as_ref()
            .is_some_and(|will| will.qos > limits.qos_max)
        {
            refuse(ReasonCode::QOS_NOT_SUPPORTED)
        } else if connect
            .will
            .as_ref()
            .is_some_and(|will| will.retain && !limits.retain_available)
        {
            refuse(ReasonCode::RETAIN_NOT_SUPPORTED)
        } else if connect
            .will
            .as_ref()
            .is_some_and(|will| topic_levels(&will.topic) > limits.topic_levels_max)
        {
            refuse(ReasonCode::TOPIC_NAME_INVALID)
        } else {
            None
        };
        if let Some(reason) = refusal {
            info!(connection = connection_id, client_id = %connect.client_id, %reason, "CONNECT refused");
            self.send_connack_refusal(connection_id, version, reason);
            self.drop_connection(connection_id, false);
            return;
        }
        let (client_id, assigned) = if connect.client_id.is_empty() {
            (self.assign_client_id(), true)
        } else {
            (connect.client_id.clone(), false)
        };
        let owner = owner_shard(&client_id, self.config.shard_count);
        if owner != self.config.index {
            // The session belongs to another shard: pass the socket and its bytes on.
            self.connections.remove(&connection_id);
            self.outputs.push(Output::HandOff {
                connection: connection_id,
                shard: owner,
                bytes: received,
            });
            return;
        }
        if !assigned && !self.cluster_nodes_up.is_empty() {
            // The session may live on another node, or the client be connected there.
            self.claim(connection_id, connect, client_id);
            return;
        }
        self.accept(connection_id, *connect, client_id, assigned);
    }

    /// An identifier for a client that sent none, chosen so that it hashes to this shard.
    fn assign_client_id(&mut self) -> ByteString {
        loop {
            self.assigned_ids += 1;
            // The node is part of it, so that no two nodes of a cluster assign the same one.
            let candidate = format!(
                "shardmq-{}-{}-{:x}-{:x}",
                self.config.node, self.config.index, self.now_ms, self.assigned_ids
            );
            if owner_shard(&candidate, self.config.shard_count) == self.config.index
                && !self.client_ids.contains_key(candidate.as_str())
            {
                return ByteString::from(candidate);
            }
        }
    }

    fn accept(
        &mut self,
        connection_id: ConnectionId,
        connect: Connect,
        client_id: ByteString,
        assigned: bool,
    ) {
        let limits = self.config.limits.clone();
        let version = connect.protocol;
        let v5 = version.is_v5();
        let now_ms = self.now_ms;

        // Session expiry: 5.0 says it in CONNECT; 3.1.1 clean session 0 keeps the session until
        // the configured maximum, clean session 1 ends it with the connection.
        let expiry_seconds = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        }
        .min(limits.session_expiry_seconds_max);

        // Take over a live connection of the same client identifier [MQTT-3.1.4-3].
        if let Some(index) = self.client_ids.get(&client_id).copied() {
            self.take_over(index, connect.clean_start);
        }

        let existing = self.client_ids.get(&client_id).copied();
        let session_present = match existing {
            Some(index) if connect.clean_start => {
                self.end_session(index);
                false
            }
            Some(_) => true,
            None => false,
        };
        let index = match self.client_ids.get(&client_id) {
            Some(&index) => index,
            None => {
                let session = Session::new(
                    client_id.clone(),
                    version,
                    expiry_seconds,
                    limits.inflight_per_session_max,
                );
                self.insert_session(session)
            }
        };

        let client_receive_maximum = connect.properties.receive_maximum.unwrap_or(u16::MAX);
        let will = connect.will.map(|will| {
            Box::new(StoredWill {
                delay_seconds: will.properties.will_delay_interval.unwrap_or(0),
                message: Message {
                    topic: will.topic,
                    payload: will.payload,
                    qos: will.qos,
                    retain: will.retain,
                    expires_at_ms: None,
                    publisher: Some(client_id.clone()),
                    properties: PublishProperties {
                        payload_format_indicator: will.properties.payload_format_indicator,
                        // Counted from the moment the will is published; set then.
                        message_expiry_interval: will.properties.message_expiry_interval,
                        content_type: will.properties.content_type,
                        response_topic: will.properties.response_topic,
                        correlation_data: will.properties.correlation_data,
                        user_properties: will.properties.user_properties,
                        ..PublishProperties::default()
                    },
                },
            })
        });
        let session = self.session_mut(index);
        session.connection = Some(connection_id);
        session.version = version;
        session.expiry_seconds = expiry_seconds;
        session.generation += 1;
        session.send_window = client_receive_maximum
            .min(limits.inflight_per_session_max)
            .max(1);
        session.will = will;
        if !session_present {
            session.awaiting_release.clear();
        }

        // Keep alive: the client's value, capped by the server's (5.0 tells the client).
        let mut keep_alive = connect.keep_alive_seconds;
        let mut server_keep_alive = None;
        if limits.keep_alive_seconds_max != 0
            && (keep_alive == 0 || keep_alive > limits.keep_alive_seconds_max)
        {
            keep_alive = limits.keep_alive_seconds_max;
            server_keep_alive = Some(keep_alive);
        }
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("the connecting connection");
        connection.session = Some(index);
        connection.version = version;
        connection.keep_alive_ms = u64::from(keep_alive) * 1000;
        connection.client_packet_size_max = connect
            .properties
            .maximum_packet_size
            .unwrap_or(mqtt::PACKET_SIZE_MAX);
        connection.problem_information = connect
            .properties
            .request_problem_information
            .unwrap_or(true);
        if keep_alive > 0 {
            // The client must send something within one and a half keep alives [MQTT-3.1.2-22].
            self.timers.push(Reverse((
                now_ms + u64::from(keep_alive) * 1500,
                Timer::KeepAlive(connection_id),
            )));
        }

        let mut properties = ConnAckProperties::default();
        if v5 {
            properties.receive_maximum =
                (limits.receive_maximum != u16::MAX).then_some(limits.receive_maximum);
            properties.maximum_packet_size = Some(limits.packet_size_max);
            properties.topic_alias_maximum =
                (limits.topic_alias_max > 0).then_some(limits.topic_alias_max);
            properties.maximum_qos =
                (limits.qos_max != QoS::ExactlyOnce).then_some(limits.qos_max as u8);
            properties.retain_available = (!limits.retain_available).then_some(false);
            properties.server_keep_alive = server_keep_alive;
            properties.assigned_client_identifier = assigned.then(|| client_id.clone());
            // A basis for response topics, private to the client (MQTT 5.0 §4.10).
            if connect.properties.request_response_information == Some(true) {
                properties.response_information =
                    Some(ByteString::from(format!("reply/{client_id}")));
            }
            let asked = connect.properties.session_expiry_interval.unwrap_or(0);
            properties.session_expiry_interval =
                (asked != expiry_seconds).then_some(expiry_seconds);
        }
        debug!(connection = connection_id, %client_id, ?version, session_present, "client connected");
        self.send(
            connection_id,
            &Packet::ConnAck(Box::new(ConnAck {
                session_present,
                reason: ReasonCode::SUCCESS,
                properties,
            })),
        );
        if session_present {
            self.resend_inflight(index);
        }
        self.drain_queue(index);
    }

    /// A new connection (here or on another node) takes session `index` over: the old
    /// connection, if any, gets DISCONNECT 0x8E (5.0) and is closed, and the session stays,
    /// without a connection, for the new one to continue or replace. The old connection's
    /// will is published unless the new one resumes the session (`clean_start` false) and
    /// the will is delayed (MQTT 5.0 §3.1.3.2.2); a delayed will not sent now is dropped, as
    /// its client is back.
    fn take_over(&mut self, index: SessionIndex, clean_start: bool) {
        let Some(old_connection) = self.session(index).connection else {
            return;
        };
        let keep_will = !clean_start
            && self
                .session(index)
                .will
                .as_ref()
                .is_some_and(|will| will.delay_seconds > 0);
        info!(client_id = %self.session(index).client_id, old = old_connection, "session taken over by a new connection");
        if let Some(connection) = self.connections.get(&old_connection)
            && connection.version.is_v5()
        {
            self.send(
                old_connection,
                &Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)),
            );
        }
        if let Some(connection) = self.connections.get_mut(&old_connection) {
            connection.closing = true;
            connection.session = None;
        }
        self.outputs.push(Output::Close {
            connection: old_connection,
        });
        let session = self.session_mut(index);
        session.connection = None;
        if let Some(will) = session.will.take()
            && !keep_will
        {
            self.publish(will.message);
        }
    }

    /// On resume, unacknowledged PUBLISH packets go again with DUP set, and PUBRELs again, in
    /// their original order [MQTT-4.4.0-1].
    fn resend_inflight(&mut self, index: SessionIndex) {
        let now_ms = self.now_ms;
        let Some(connection_id) = self.session(index).connection else {
            return;
        };
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        let session = self.sessions[index as usize]
            .as_mut()
            .expect("live session");
        let was_empty = connection.outgoing.is_empty();
        for entry in &session.inflight {
            let packet = match entry.state {
                InflightState::Published => Packet::Publish(publish_packet(
                    &entry.message,
                    entry.message.qos,
                    entry.packet_id,
                    true,
                    &entry.subscription_identifiers,
                    now_ms,
                )),
                InflightState::Released => Packet::PubRel(PubAck::new(entry.packet_id)),
            };
            Self::encode_into(connection, &packet);
        }
        if was_empty && !connection.outgoing.is_empty() {
            self.dirty.push(connection_id);
        }
    }
}

fn topic_levels(topic: &str) -> usize {
    topic.bytes().filter(|&byte| byte == b'/').count() + 1
}

/// A PUBLISH of `message` for one subscriber.
fn publish_packet(
    message: &Message,
    qos: QoS,
    packet_id: u16,
    dup: bool,
    subscription_identifiers: &[u32],
    now_ms: u64,
) -> Publish {
    let mut properties = message.properties.clone();
    properties.message_expiry_interval = message.remaining_expiry_seconds(now_ms);
    properties.subscription_identifiers = subscription_identifiers.to_vec();
    Publish {
        dup,
        qos,
        retain: message.retain,
        topic: message.topic.clone(),
        packet_id,
        properties,
        payload: message.payload.clone(),
    }
}

/// As [`publish_packet`], taking the message: for QoS 0, which keeps nothing after sending, the
/// topic, payload and properties move instead of being cloned.
fn publish_packet_owned(
    message: Message,
    subscription_identifiers: Vec<u32>,
    now_ms: u64,
) -> Publish {
    let message_expiry_interval = message.remaining_expiry_seconds(now_ms);
    let mut properties = message.properties;
    properties.message_expiry_interval = message_expiry_interval;
    properties.subscription_identifiers = subscription_identifiers;
    Publish {
        dup: false,
        qos: message.qos,
        retain: message.retain,
        topic: message.topic,
        packet_id: 0,
        properties,
        payload: message.payload,
    }
}

// Packets from a connected client.
impl Shard {
    fn packet(&mut self, connection_id: ConnectionId, packet: Packet) {
        let Some(index) = self.connections.get(&connection_id).and_then(|c| c.session) else {
            return;
        };
        match packet {
            Packet::Publish(publish) => self.client_publish(connection_id, index, publish),
            Packet::PubAck(ack) => self.acknowledged(
                connection_id,
                index,
                ack.packet_id,
                InflightState::Published,
                QoS::AtLeastOnce,
            ),
            Packet::PubRec(ack) => self.received(connection_id, index, ack),
            Packet::PubRel(ack) => self.released(connection_id, index, ack.packet_id),
            Packet::PubComp(ack) => self.acknowledged(
                connection_id,
                index,
                ack.packet_id,
                InflightState::Released,
                QoS::ExactlyOnce,
            ),
            Packet::Subscribe(subscribe) => self.subscribe(connection_id, index, subscribe),
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(connection_id, index, unsubscribe),
            Packet::PingReq => self.send(connection_id, &Packet::PingResp),
            Packet::Disconnect(disconnect) => {
                self.client_disconnect(connection_id, index, disconnect)
            }
            Packet::Connect(_) => {
                self.disconnect(
                    connection_id,
                    ReasonCode::PROTOCOL_ERROR,
                    "a second CONNECT [MQTT-3.1.0-2]",
                    true,
                );
            }
            Packet::Auth(_) => {
                // Only a client that chose an authentication method in CONNECT may send AUTH,
                // and no method is supported.
                self.disconnect(
                    connection_id,
                    ReasonCode::PROTOCOL_ERROR,
                    "AUTH without an authentication method",
                    true,
                );
            }
            // The decoder refuses server-only packets from clients.
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                unreachable!("the decoder accepts only client packets here")
            }
        }
    }

    fn client_publish(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        mut publish: Publish,
    ) {
        let limits = &self.config.limits;
        let connection = self
            .connections
            .get_mut(&connection_id)
            .expect("live connection");
        let version = connection.version;
        // Topic alias (5.0): set the mapping, or use it when the topic is empty. The table
        // grows on first use, so a client that never sets an alias holds none.
        if let Some(alias) = publish.properties.topic_alias.take() {
            let slot = usize::from(alias) - 1;
            if alias > limits.topic_alias_max {
                self.disconnect(
                    connection_id,
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    &format!("topic alias above the maximum ({alias})"),
                    true,
                );
                return;
            }
            if publish.topic.is_empty() {
                match connection.topic_aliases.get(slot).and_then(Option::as_ref) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        self.disconnect(
                            connection_id,
                            ReasonCode::PROTOCOL_ERROR,
                            &format!("unknown topic alias ({alias})"),
                            true,
                        );
                        return;
                    }
                }
            } else {
                if connection.topic_aliases.len() <= slot {
                    connection.topic_aliases.resize(slot + 1, None);
                }
                connection.topic_aliases[slot] = Some(publish.topic.clone());
            }
        }
        let refusal = if publish.qos > limits.qos_max {
            Some(ReasonCode::QOS_NOT_SUPPORTED)
        } else if publish.retain && !limits.retain_available {
            Some(ReasonCode::RETAIN_NOT_SUPPORTED)
        } else if topic_levels(&publish.topic) > limits.topic_levels_max {
            Some(ReasonCode::TOPIC_NAME_INVALID)
        } else if publish.qos == QoS::ExactlyOnce
            && !self
                .session(index)
                .awaiting_release
                .contains(&publish.packet_id)
            && self.session(index).awaiting_release.len() >= usize::from(limits.receive_maximum)
        {
            Some(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.disconnect(
                connection_id,
                reason,
                &format!("PUBLISH to {} refused", publish.topic),
                true,
            );
            return;
        }
        // QoS 2 is delivered once, on first receipt; a resent PUBLISH with the same packet
        // identifier before PUBREL is only acknowledged again (method B of MQTT 5.0 §4.3.3).
        let (qos, packet_id) = (publish.qos, publish.packet_id);
        let duplicate =
            qos == QoS::ExactlyOnce && !self.session_mut(index).awaiting_release.insert(packet_id);
        let mut matched = true;
        if !duplicate {
            let publisher = Some(self.session(index).client_id.clone());
            let message = Message::from_publish(publish, self.now_ms, publisher);
            matched = self.publish(message);
        }
        let no_subscribers = version.is_v5() && !matched;
        let ack = PubAck {
            packet_id,
            reason: if no_subscribers {
                ReasonCode::NO_MATCHING_SUBSCRIBERS
            } else {
                ReasonCode::SUCCESS
            },
            properties: AckProperties::default(),
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(connection_id, &Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(connection_id, &Packet::PubRec(ack)),
        }
    }

    /// PUBREL from the client: the QoS 2 exchange ends; the identifier may be reused.
    fn released(&mut self, connection_id: ConnectionId, index: SessionIndex, packet_id: u16) {
        let known = self.session_mut(index).awaiting_release.remove(&packet_id);
        let reason = if known {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.send(
            connection_id,
            &Packet::PubComp(PubAck {
                reason,
                ..PubAck::new(packet_id)
            }),
        );
    }

    /// PUBREC from the client for a QoS 2 message we sent: answer PUBREL.
    fn received(&mut self, connection_id: ConnectionId, index: SessionIndex, ack: PubAck) {
        let session = self.session_mut(index);
        let position = session.inflight.iter().position(|entry| {
            entry.packet_id == ack.packet_id
                && entry.state == InflightState::Published
                && entry.message.qos == QoS::ExactlyOnce
        });
        match position {
            Some(position) if ack.reason.is_error() => {
                // The client refused the message: the exchange ends here (MQTT 5.0 §4.3.3).
                session.inflight.remove(position);
                self.drain_queue(index);
            }
            Some(position) => {
                session.inflight[position].state = InflightState::Released;
                self.send(connection_id, &Packet::PubRel(PubAck::new(ack.packet_id)));
            }
            None => {
                let reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                self.send(
                    connection_id,
                    &Packet::PubRel(PubAck {
                        reason,
                        ..PubAck::new(ack.packet_id)
                    }),
                );
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the message is delivered; its window slot frees.
    fn acknowledged(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        packet_id: u16,
        state: InflightState,
        qos: QoS,
    ) {
        let session = self.session_mut(index);
        match session.inflight.iter().position(|entry| {
            entry.packet_id == packet_id && entry.state == state && entry.message.qos == qos
        }) {
            Some(position) => {
                session.inflight.remove(position);
                self.drain_queue(index);
            }
            None => debug!(
                connection = connection_id,
                packet_id, "acknowledgement for an unknown packet identifier ignored"
            ),
        }
    }

    fn client_disconnect(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        disconnect: Disconnect,
    ) {
        let expiry_max = self.config.limits.session_expiry_seconds_max;
        let session = self.session_mut(index);
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            // A session that was to end with the connection cannot be extended now [MQTT-3.14.2-2].
            if session.expiry_seconds == 0 && expiry != 0 {
                self.disconnect(
                    connection_id,
                    ReasonCode::PROTOCOL_ERROR,
                    "DISCONNECT sets a session expiry after CONNECT set none",
                    true,
                );
                return;
            }
            session.expiry_seconds = expiry.min(expiry_max);
        }
        // A normal DISCONNECT discards the will, except 0x04 (MQTT 5.0 §3.14.2.1).
        let publish_will = disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE;
        debug!(connection = connection_id, client_id = %session.client_id, reason = %disconnect.reason, "client disconnected");
        self.drop_connection(connection_id, publish_will);
    }
}

// Subscriptions and routes.
impl Shard {
    fn subscribe(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        subscribe: Subscribe,
    ) {
        let limits = self.config.limits.clone();
        let identifier = subscribe.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut retained_for = Vec::new();
        let v5 = self.session(index).version.is_v5();
        for (filter, mut options) in subscribe.filters {
            let plain = match topic::split_shared(&filter) {
                Some(Ok((_, inner))) => inner,
                _ => &filter[..],
            };
            let session = self.session(index);
            let is_new = !session.subscriptions.contains_key(&filter);
            if topic_levels(plain) > limits.topic_levels_max {
                reasons.push(if v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            if is_new && session.subscriptions.len() >= limits.subscriptions_per_session_max {
                info!(client_id = %session.client_id, %filter, "subscription refused: the session holds the maximum number of subscriptions");
                reasons.push(if v5 {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            options.qos = options.qos.min(limits.qos_max);
            // A new subscription with the same filter replaces the old one [MQTT-3.8.4-3].
            if !is_new {
                self.remove_subscription(index, &filter);
            }
            self.add_subscription(index, &filter, options, identifier);
            self.session_mut(index)
                .subscriptions
                .insert(filter.clone(), (options, identifier));
            reasons.push(ReasonCode(options.qos as u8));
            let shared = topic::split_shared(&filter).is_some();
            // Retained messages are not sent for shared subscriptions (MQTT 5.0 §4.8.2).
            let send_retained = !shared
                && match options.retain_handling {
                    RetainHandling::SendOnSubscribe => true,
                    RetainHandling::SendIfNew => is_new,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                retained_for.push((filter, options));
            }
        }
        self.send(
            connection_id,
            &Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                properties: AckProperties::default(),
                reasons,
            }),
        );
        // Retained messages follow the SUBACK [MQTT-3.8.4-4 in spirit: after the subscription
        // exists], with the retain flag set [MQTT-3.3.1-9].
        let now_ms = self.now_ms;
        for (filter, options) in retained_for {
            let messages: Vec<Message> = self.retained.matching(&filter, now_ms).cloned().collect();
            for mut message in messages {
                message.retain = true;
                let qos = message.qos.min(options.qos);
                self.deliver_to_session(index, message, qos, identifier.into_iter().collect());
            }
        }
    }

    fn unsubscribe(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        unsubscribe: Unsubscribe,
    ) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            if self
                .session_mut(index)
                .subscriptions
                .remove(filter)
                .is_some()
            {
                self.remove_subscription(index, filter);
                reasons.push(ReasonCode::SUCCESS);
            } else {
                reasons.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.send(
            connection_id,
            &Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                properties: AckProperties::default(),
                reasons,
            }),
        );
    }

    fn add_subscription(
        &mut self,
        index: SessionIndex,
        filter: &ByteString,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) {
        let subscriber = Subscriber {
            session: index,
            options,
            identifier,
        };
        let (change, group, plain) = match topic::split_shared(filter) {
            Some(Ok((group, inner))) => {
                let member = SharedMember {
                    group: ByteString::from(group),
                    subscriber,
                };
                let first = !self
                    .shared
                    .get(inner)
                    .iter()
                    .any(|m| m.group == member.group);
                self.shared.insert(inner, member);
                (
                    if first {
                        Change::FilterAdded
                    } else {
                        Change::Unchanged
                    },
                    Some(ByteString::from(group)),
                    ByteString::from(inner),
                )
            }
            _ => (
                self.subscriptions.insert(filter, subscriber),
                None,
                filter.clone(),
            ),
        };
        if change == Change::FilterAdded {
            self.broadcast_route(plain, group, true);
        }
    }

    fn remove_subscription(&mut self, index: SessionIndex, filter: &ByteString) {
        match topic::split_shared(filter) {
            Some(Ok((group, inner))) => {
                self.shared.remove(inner, |member| {
                    member.group == group && member.subscriber.session == index
                });
                let group_left = !self
                    .shared
                    .get(inner)
                    .iter()
                    .any(|member| member.group == group);
                if group_left {
                    self.broadcast_route(
                        ByteString::from(inner),
                        Some(ByteString::from(group)),
                        false,
                    );
                }
            }
            _ => {
                if self
                    .subscriptions
                    .remove(filter, |subscriber| subscriber.session == index)
                    == Change::FilterRemoved
                {
                    self.broadcast_route(filter.clone(), None, false);
                }
            }
        }
    }

    /// Tells every shard (this one directly) that this shard gained or lost `filter`.
    fn broadcast_route(&mut self, filter: ByteString, group: Option<ByteString>, added: bool) {
        let shard = self.config.index;
        for target in 0..self.config.shard_count {
            let message = ShardMessage::Route {
                shard,
                filter: filter.clone(),
                group: group.clone(),
                added,
            };
            if target == shard {
                self.shard_message(message);
            } else {
                self.outputs.push(Output::ToShard {
                    shard: target,
                    message,
                });
            }
        }
    }

    fn shard_message(&mut self, message: ShardMessage) {
        match message {
            ShardMessage::Route {
                shard,
                filter,
                group,
                added,
            } => {
                self.change_route(Target::Shard(shard), filter, group, added);
            }
            ShardMessage::RemoteRoute {
                node,
                filter,
                group,
                added,
            } => {
                self.change_route(Target::Node(node), filter, group, added);
            }
            // Taken by the cluster side (`NodeShard`); a shard on its own has none.
            ShardMessage::ClusterSettings(_) => {}
            ShardMessage::ClusterNodes(nodes) => {
                self.cluster_nodes = nodes.iter().map(|n| n.node).collect();
                self.cluster_nodes_up = nodes.iter().filter(|n| n.up).map(|n| n.node).collect();
                debug!(nodes = ?self.cluster_nodes, up = ?self.cluster_nodes_up, "cluster member list");
                self.stop_waiting_for_gone_nodes();
            }
            ShardMessage::Session { node, transfer } => self.session_transfer(node, transfer),
            ShardMessage::Deliver {
                message,
                plain,
                groups,
            } => self.deliver_local(message, plain, &groups),
            ShardMessage::Retain { message } => {
                self.retained.store(message);
            }
        }
    }

    /// Adds or removes one route of the node or cluster table. Shard 0 tells the cluster when
    /// the node's count of shards for the route goes 0 -> 1 or 1 -> 0.
    fn change_route(
        &mut self,
        target: Target,
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    ) {
        let shard_count = match &group {
            None => {
                if added {
                    if !self.routes.get(&filter).contains(&target) {
                        self.routes.insert(&filter, target);
                    }
                } else {
                    self.routes.remove(&filter, |t| *t == target);
                }
                self.routes
                    .get(&filter)
                    .iter()
                    .filter(|t| matches!(t, Target::Shard(_)))
                    .count()
            }
            Some(group) => {
                let present = self
                    .shared_routes
                    .get(&filter)
                    .iter()
                    .any(|r| r.target == target && r.group == *group);
                if added && !present {
                    self.shared_routes.insert(
                        &filter.clone(),
                        SharedRoute {
                            group: group.clone(),
                            filter: filter.clone(),
                            target,
                        },
                    );
                } else if !added {
                    self.shared_routes
                        .remove(&filter, |r| r.target == target && r.group == *group);
                }
                self.shared_routes
                    .get(&filter)
                    .iter()
                    .filter(|r| r.group == *group && matches!(r.target, Target::Shard(_)))
                    .count()
            }
        };
        let node_level_change = if added {
            shard_count == 1
        } else {
            shard_count == 0
        };
        if self.config.index == 0 && matches!(target, Target::Shard(_)) && node_level_change {
            self.outputs.push(Output::NodeRoute {
                filter,
                group,
                added,
            });
        }
    }
}

// Publishing and delivery.
impl Shard {
    /// Routes a message published by a client of this node; returns whether any subscription
    /// (here or on another node) matched.
    fn publish(&mut self, message: Message) -> bool {
        self.route(message, None)
    }

    /// Routes a message to every shard of this node with a matching subscription and, for a
    /// message published here (`from_node` is None), to every other node with one. A message
    /// from another node carries what it is for here: plain subscriptions, and the shared
    /// groups whose member that node picked to be on this node.
    fn route(
        &mut self,
        message: Message,
        from_node: Option<(bool, &[(ByteString, ByteString)])>,
    ) -> bool {
        let local_origin = from_node.is_none();
        // A retained message is stored by every shard of every node. A message from another
        // node was sent here for that alone when it matched nothing here.
        if message.retain {
            for target in 0..self.config.shard_count {
                if target != self.config.index {
                    self.outputs.push(Output::ToShard {
                        shard: target,
                        message: ShardMessage::Retain {
                            message: message.clone(),
                        },
                    });
                }
            }
            self.retained.store(message.clone());
        }
        // Which shards have matching plain subscriptions: a scratch vector kept between
        // messages, so routing allocates nothing unless shared subscriptions or other nodes
        // match.
        let shard_count = usize::from(self.config.shard_count);
        let mut plain = std::mem::take(&mut self.plain_targets);
        plain.clear();
        plain.resize(shard_count, false);
        let mut plain_nodes: Vec<NodeId> = Vec::new();
        if from_node.is_none_or(|(plain, _)| plain) {
            self.routes.for_each_match(&message.topic, |targets| {
                for &target in targets {
                    match target {
                        Target::Shard(shard) => plain[usize::from(shard)] = true,
                        Target::Node(node) if local_origin => {
                            if !plain_nodes.contains(&node) {
                                plain_nodes.push(node);
                            }
                        }
                        Target::Node(_) => {}
                    }
                }
            });
        }
        // One member per shared group and filter, cluster-wide: a shard of this node or
        // another node, taken in turn.
        let mut chosen_groups: Vec<(Target, ByteString, ByteString)> = Vec::new();
        let turn = &mut self.shared_shard_turn;
        let strategy = self.config.shared_strategy;
        let publisher = message.publisher.as_ref();
        let mut choose = |routes: &[SharedRoute], group: &ByteString, remote_allowed: bool| {
            // Members in target order, so a hash picks the same one every time.
            let mut members: Vec<&SharedRoute> = routes
                .iter()
                .filter(|r| {
                    r.group == *group && (remote_allowed || matches!(r.target, Target::Shard(_)))
                })
                .collect();
            if members.is_empty() {
                return None;
            }
            members.sort_unstable_by_key(|r| r.target);
            let chosen = members[pick_member(strategy, turn, publisher, members.len())];
            Some((chosen.target, chosen.group.clone(), chosen.filter.clone()))
        };
        match from_node {
            None if self.shared_routes.filter_count() > 0 => {
                self.shared_routes.for_each_match(&message.topic, |routes| {
                    for (position, route) in routes.iter().enumerate() {
                        // Each group once per filter: at its first route.
                        if routes[..position]
                            .iter()
                            .any(|earlier| earlier.group == route.group)
                        {
                            continue;
                        }
                        chosen_groups.extend(choose(routes, &route.group, true));
                    }
                });
            }
            None => {}
            Some((_, groups)) => {
                for (group, filter) in groups {
                    let routes = self.shared_routes.get(filter);
                    match choose(routes, group, false) {
                        Some(chosen) => chosen_groups.push(chosen),
                        None => {
                            debug!(%group, %filter, "forwarded for a shared group that has no member here now")
                        }
                    }
                }
            }
        }
        let groups_for = |target: Target| -> Vec<(ByteString, ByteString)> {
            chosen_groups
                .iter()
                .filter(|(t, _, _)| *t == target)
                .map(|(_, group, filter)| (group.clone(), filter.clone()))
                .collect()
        };
        // Other nodes: one forward each, for its plain subscriptions, its chosen groups and
        // (retained messages go to every node) its retained store.
        let mut matched = !plain_nodes.is_empty();
        if local_origin {
            let mut nodes = plain_nodes.clone();
            for (target, _, _) in &chosen_groups {
                if let Target::Node(node) = *target
                    && !nodes.contains(&node)
                {
                    nodes.push(node);
                }
            }
            if message.retain {
                for &node in &self.cluster_nodes {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
            }
            for node in nodes {
                let groups = groups_for(Target::Node(node));
                matched |= !groups.is_empty();
                self.outputs.push(Output::ToNode {
                    node,
                    forwarded: Forwarded {
                        message: message.clone(),
                        plain: plain_nodes.contains(&node),
                        groups,
                    },
                });
            }
        }
        // The last shard takes the message itself; the others get clones (each clone is a few
        // reference-count increments and a copy of the properties).
        let has_groups = |target: usize| {
            chosen_groups
                .iter()
                .any(|(t, _, _)| *t == Target::Shard(target as ShardIndex))
        };
        let last_target = (0..shard_count)
            .rev()
            .find(|&target| plain[target] || has_groups(target));
        let mut message = Some(message);
        for (target, &has_plain) in plain.iter().enumerate() {
            let groups = groups_for(Target::Shard(target as ShardIndex));
            if !has_plain && groups.is_empty() {
                continue;
            }
            let copy = if Some(target) == last_target {
                message
                    .take()
                    .expect("the message moves to the last target only")
            } else {
                message
                    .clone()
                    .expect("the message is still here before the last target")
            };
            if target == usize::from(self.config.index) {
                self.deliver_local(copy, has_plain, &groups);
            } else {
                self.outputs.push(Output::ToShard {
                    shard: target as ShardIndex,
                    message: ShardMessage::Deliver {
                        message: copy,
                        plain: has_plain,
                        groups,
                    },
                });
            }
        }
        matched |= last_target.is_some();
        self.plain_targets = plain;
        matched
    }

    /// Delivers to this shard's sessions: every matching plain subscription, and one member of
    /// each listed shared group. A session with several matching subscriptions gets one copy at
    /// the highest of their QoS, with all their subscription identifiers [MQTT-3.3.4-2],
    /// [MQTT-3.3.4-3].
    fn deliver_local(
        &mut self,
        message: Message,
        plain: bool,
        groups: &[(ByteString, ByteString)],
    ) {
        if message.is_expired(self.now_ms) {
            return;
        }
        let mut matched = std::mem::take(&mut self.matched);
        matched.clear();
        if plain {
            self.subscriptions
                .for_each_match(&message.topic, |subscribers| {
                    matched.extend_from_slice(subscribers)
                });
        }
        let mut shared_targets = Vec::new();
        for (group, filter) in groups {
            let members: Vec<Subscriber> = self
                .shared
                .get(filter)
                .iter()
                .filter(|member| {
                    member.group == *group
                        && self.session(member.subscriber.session).connection.is_some()
                })
                .map(|member| member.subscriber)
                .collect();
            // Prefer connected members; with none connected, any member's session queues it.
            let members = if members.is_empty() {
                self.shared
                    .get(filter)
                    .iter()
                    .filter(|member| member.group == *group)
                    .map(|member| member.subscriber)
                    .collect()
            } else {
                members
            };
            if !members.is_empty() {
                let mut members = members;
                members.sort_unstable_by_key(|member| member.session);
                let choice = pick_member(
                    self.config.shared_strategy,
                    &mut self.shared_member_turn,
                    message.publisher.as_ref(),
                    members.len(),
                );
                shared_targets.push(members[choice]);
            }
        }
        // No Local: not back to the publisher's own session.
        matched.retain(|subscriber| {
            !(subscriber.options.no_local
                && message.publisher.as_ref() == Some(&self.session(subscriber.session).client_id))
        });
        matched.sort_unstable_by_key(|subscriber| subscriber.session);
        let (message_qos, message_retain) = (message.qos, message.retain);
        // The last delivery takes the message itself; the others get clones.
        let deliveries = matched
            .windows(2)
            .filter(|pair| pair[0].session != pair[1].session)
            .count()
            + usize::from(!matched.is_empty())
            + shared_targets.len();
        let mut delivered = 0;
        let mut message = Some(message);
        let mut take = |message: &mut Option<Message>| {
            delivered += 1;
            if delivered == deliveries {
                message
                    .take()
                    .expect("the message moves to the last delivery only")
            } else {
                message
                    .clone()
                    .expect("the message is still here before the last delivery")
            }
        };
        let mut start = 0;
        while start < matched.len() {
            let session = matched[start].session;
            let end = start
                + matched[start..]
                    .iter()
                    .take_while(|s| s.session == session)
                    .count();
            let group = &matched[start..end];
            let qos = group
                .iter()
                .map(|s| s.options.qos)
                .max()
                .expect("a non-empty group")
                .min(message_qos);
            let retain = message_retain && group.iter().any(|s| s.options.retain_as_published);
            let identifiers: Vec<u32> = group.iter().filter_map(|s| s.identifier).collect();
            let mut copy = take(&mut message);
            copy.retain = retain;
            self.deliver_to_session(session, copy, qos, identifiers);
            start = end;
        }
        for subscriber in shared_targets {
            let mut copy = take(&mut message);
            copy.retain = message_retain && subscriber.options.retain_as_published;
            let qos = subscriber.options.qos.min(message_qos);
            self.deliver_to_session(
                subscriber.session,
                copy,
                qos,
                subscriber.identifier.into_iter().collect(),
            );
        }
        self.matched = matched;
    }

    /// Sends the message to the session's connection now if its window allows, else queues it
    /// (QoS 0 is not queued for a session without a connection).
    fn deliver_to_session(
        &mut self,
        index: SessionIndex,
        mut message: Message,
        qos: QoS,
        subscription_identifiers: Vec<u32>,
    ) {
        message.qos = qos;
        let limit = self.config.limits.queued_messages_per_session_max;
        let now_ms = self.now_ms;
        let Shard {
            sessions,
            connections,
            dirty,
            ..
        } = self;
        let session = sessions[index as usize]
            .as_mut()
            .expect("a live session index");
        let Some(connection_id) = session.connection else {
            // QoS 0 is not kept for a session without a connection.
            if qos == QoS::AtMostOnce {
                return;
            }
            return Self::enqueue(session, message, subscription_identifiers, limit);
        };
        // Live delivery: with nothing waiting and room in the window, straight to the
        // connection, without passing through (and allocating) the session's queue.
        let window_open =
            qos == QoS::AtMostOnce || session.inflight.len() < usize::from(session.send_window);
        if session.queue.is_empty()
            && window_open
            && let Some(connection) = connections.get_mut(&connection_id).filter(|c| !c.closing)
        {
            let was_empty = connection.outgoing.is_empty();
            Self::transmit(
                connection,
                session,
                message,
                subscription_identifiers,
                now_ms,
            );
            if was_empty && !connection.outgoing.is_empty() {
                dirty.push(connection_id);
            }
            return;
        }
        Self::enqueue(session, message, subscription_identifiers, limit);
        self.drain_queue(index);
    }

    /// Queues a message for the session, dropping the oldest when the queue is full.
    fn enqueue(
        session: &mut Session,
        message: Message,
        subscription_identifiers: Vec<u32>,
        limit: usize,
    ) {
        if session.queue.len() >= limit {
            session.queue.pop_front();
            session.dropped_messages += 1;
            if session.dropped_messages.is_power_of_two() {
                warn!(client_id = %session.client_id, dropped = session.dropped_messages, limit, "session queue full: dropping its oldest messages");
            }
        }
        session.queue.push_back(Queued {
            message,
            subscription_identifiers,
        });
    }

    /// Sends queued messages while the connection's window has room.
    fn drain_queue(&mut self, index: SessionIndex) {
        let now_ms = self.now_ms;
        let Some(connection_id) = self.session(index).connection else {
            return;
        };
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.closing {
            return;
        }
        let session = self.sessions[index as usize]
            .as_mut()
            .expect("live session");
        let was_empty = connection.outgoing.is_empty();
        while let Some(front) = session.queue.front() {
            let needs_slot = front.message.qos != QoS::AtMostOnce;
            if needs_slot && session.inflight.len() >= usize::from(session.send_window) {
                break;
            }
            let Queued {
                message,
                subscription_identifiers,
            } = session.queue.pop_front().expect("a front");
            Self::transmit(
                connection,
                session,
                message,
                subscription_identifiers,
                now_ms,
            );
        }
        // A backlog has drained: give its memory back (live delivery does not use the queue).
        if session.queue.is_empty() && session.queue.capacity() > 0 {
            session.queue = VecDeque::new();
        }
        if was_empty && !connection.outgoing.is_empty() {
            self.dirty.push(connection_id);
        }
    }
    /// Encodes one message for the session's connection, holding a window slot for QoS 1/2.
    /// Expired messages are dropped, and so are messages larger than the client accepts
    /// [MQTT-3.1.2-25] (for QoS 1 and 2 that counts as delivered).
    fn transmit(
        connection: &mut Connection,
        session: &mut Session,
        message: Message,
        subscription_identifiers: Vec<u32>,
        now_ms: u64,
    ) {
        if message.is_expired(now_ms) {
            return;
        }
        let needs_slot = message.qos != QoS::AtMostOnce;
        let packet_id = if needs_slot {
            session.allocate_packet_id()
        } else {
            0
        };
        // QoS 1 and 2 keep the message for acknowledgement and resending; QoS 0 gives it up.
        let (packet, kept) = if needs_slot {
            let packet = publish_packet(
                &message,
                message.qos,
                packet_id,
                false,
                &subscription_identifiers,
                now_ms,
            );
            (
                Packet::Publish(packet),
                Some((message, subscription_identifiers)),
            )
        } else {
            (
                Packet::Publish(publish_packet_owned(
                    message,
                    subscription_identifiers,
                    now_ms,
                )),
                None,
            )
        };
        if packet.encoded_len(connection.version) > connection.client_packet_size_max as usize {
            debug!(client_id = %session.client_id, "message larger than the client's maximum packet size: not sent");
            return;
        }
        Self::encode_into(connection, &packet);
        if let Some((message, subscription_identifiers)) = kept {
            session.inflight.push_back(Inflight {
                packet_id,
                message,
                subscription_identifiers,
                state: InflightState::Published,
            });
        }
    }
}

// Time and shutdown.
impl Shard {
    fn fire_timers(&mut self) {
        while let Some(&Reverse((at, timer))) = self.timers.peek() {
            if at > self.now_ms {
                return;
            }
            self.timers.pop();
            match timer {
                Timer::KeepAlive(connection_id) => {
                    let Some(connection) = self.connections.get(&connection_id) else {
                        continue;
                    };
                    if connection.closing || connection.keep_alive_ms == 0 {
                        continue;
                    }
                    let deadline = connection.last_received_ms + connection.keep_alive_ms * 3 / 2;
                    if deadline <= self.now_ms {
                        self.disconnect(
                            connection_id,
                            ReasonCode::KEEP_ALIVE_TIMEOUT,
                            "keep alive timeout",
                            true,
                        );
                    } else {
                        self.timers.push(Reverse((deadline, timer)));
                    }
                }
                Timer::Claim(claim) => self.claim_timed_out(claim),
                Timer::WillDelay(index, generation) => {
                    let live = self
                        .sessions
                        .get(index as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.generation == generation && s.connection.is_none());
                    if live && let Some(will) = self.session_mut(index).will.take() {
                        self.publish(will.message);
                    }
                }
                Timer::SessionExpiry(index, generation) => {
                    let live = self
                        .sessions
                        .get(index as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.generation == generation && s.connection.is_none());
                    if live {
                        self.end_session(index);
                    }
                }
            }
        }
    }

    fn shutdown(&mut self) {
        let connections: Vec<ConnectionId> = self.connections.keys().copied().collect();
        for connection_id in connections {
            self.disconnect(
                connection_id,
                SERVER_SHUTTING_DOWN,
                "server shutting down",
                false,
            );
        }
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;

// Snapshots at shutdown and start.
impl Shard {
    /// The durable state this shard owns, as a snapshot file's bytes: every persistent session
    /// (expiry above 0; by now none has a connection), and, on shard 0 only, the retained
    /// messages (every shard holds the whole set, so one copy is enough).
    pub fn snapshot(&self) -> Vec<u8> {
        use crate::snapshot::Record;
        let mut records = Vec::new();
        for session in self
            .sessions
            .iter()
            .flatten()
            .filter(|s| s.expiry_seconds > 0)
        {
            records.push(Record::Session(Self::saved_session(session)));
        }
        if self.config.index == 0 {
            records.extend(self.retained.iter().cloned().map(Record::Retained));
        }
        crate::snapshot::encode(&records, self.now_ms)
    }

    /// A session's durable state: what a snapshot keeps and a takeover across nodes moves.
    fn saved_session(session: &Session) -> crate::snapshot::SavedSession {
        use crate::snapshot::{SavedDelivery, SavedInflight, SavedSession};
        SavedSession {
            client_id: session.client_id.clone(),
            version: session.version,
            expiry_seconds: session.expiry_seconds,
            subscriptions: session
                .subscriptions
                .iter()
                .map(|(filter, &(options, identifier))| (filter.clone(), options, identifier))
                .collect(),
            inflight: session
                .inflight
                .iter()
                .map(|entry| SavedInflight {
                    packet_id: entry.packet_id,
                    released: entry.state == InflightState::Released,
                    delivery: SavedDelivery {
                        message: entry.message.clone(),
                        subscription_identifiers: entry.subscription_identifiers.clone(),
                    },
                })
                .collect(),
            queue: session
                .queue
                .iter()
                .map(|queued| SavedDelivery {
                    message: queued.message.clone(),
                    subscription_identifiers: queued.subscription_identifiers.clone(),
                })
                .collect(),
        }
    }

    /// Loads one snapshot file (of any shard, from any earlier shard count): the sessions whose
    /// client identifier this shard owns now, and every retained message. Call before the first
    /// input. Returns (sessions, retained messages) loaded and a warning for a damaged file.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(usize, usize, Option<String>), String> {
        use crate::snapshot::Record;
        let (records, warning) = crate::snapshot::decode(bytes, self.now_ms)?;
        let (mut sessions, mut retained) = (0, 0);
        for record in records {
            match record {
                Record::Retained(message) => {
                    self.retained.store(message);
                    retained += 1;
                }
                Record::Session(saved)
                    if owner_shard(&saved.client_id, self.config.shard_count)
                        == self.config.index =>
                {
                    if self.client_ids.contains_key(&saved.client_id) {
                        continue;
                    }
                    sessions += 1;
                    self.restore_session(saved);
                }
                Record::Session(_) => {}
            }
        }
        Ok((sessions, retained, warning))
    }

    fn restore_session(&mut self, saved: crate::snapshot::SavedSession) {
        let mut session = Session::new(
            saved.client_id,
            saved.version,
            saved.expiry_seconds,
            self.config.limits.inflight_per_session_max,
        );
        session.next_packet_id = saved
            .inflight
            .iter()
            .map(|entry| entry.packet_id)
            .max()
            .unwrap_or(0);
        session.inflight = saved
            .inflight
            .into_iter()
            .map(|entry| Inflight {
                packet_id: entry.packet_id,
                message: entry.delivery.message,
                subscription_identifiers: entry.delivery.subscription_identifiers,
                state: if entry.released {
                    InflightState::Released
                } else {
                    InflightState::Published
                },
            })
            .collect();
        session.queue = saved
            .queue
            .into_iter()
            .map(|d| Queued {
                message: d.message,
                subscription_identifiers: d.subscription_identifiers,
            })
            .collect();
        let index = self.insert_session(session);
        for (filter, options, identifier) in saved.subscriptions {
            self.add_subscription(index, &filter, options, identifier);
            self.session_mut(index)
                .subscriptions
                .insert(filter, (options, identifier));
        }
        // The time offline before the restart is not known: expiry counts from the restart.
        if saved.expiry_seconds != u32::MAX {
            self.timers.push(Reverse((
                self.now_ms + u64::from(saved.expiry_seconds) * 1000,
                Timer::SessionExpiry(index, 0),
            )));
        }
    }
}
