//! One shard: the connections, sessions, subscriptions and routes of one core, as a state
//! machine. `handle(now_ms, input)` changes the state and queues outputs; `take_outputs`
//! hands them to the reactor, with each connection's packets of the batch in one buffer.
//!
//! Rooms: `connection` (bytes in and out, protocol errors, closing), `session` (storage,
//! detach, end), `connect` (CONNECT, takeover, resume), `client` (a connected client's
//! packets and QoS flows), `subscribe`, `route` (route tables, messages between shards,
//! routing a publish), `deliver` (to this shard's sessions), `timers` (the timer store and
//! what fires), `snapshot`, `durable` (the durable log: records, held acknowledgements),
//! `takeover` (across nodes), `authorize` (CONNECT's credentials, the ACL checks),
//! `invariants` (`check_invariants`), `inspect` (the admin API's questions and its kick and
//! retained deletion).
//!
//! Invariants (checked by `check_invariants`, which the tests and the simulation call after
//! every step): a session lives on the shard its client identifier hashes to
//! ([`owner_shard`]); a connection belongs to at most one session and a session to at most one
//! connection; a filter is in the trie exactly while some session here holds it, and the node
//! route table (every shard's copy) names this shard for it exactly then; in flight stays
//! within the client's window and queues within their limit; every armed timer has one live
//! owner, and cancelled timers leave the store.
//!
//! Order: the outputs of one input come in an order fixed by the inputs alone, never by a
//! hasher's seed (maps keyed by client identifiers or topics keep a seeded hash against
//! flooding, and nothing iterates them into outputs). Sends come per connection in the order
//! the connections first got a packet in the batch, then the other outputs in the order they
//! arose, each close after its connection's send. Within that: an ending session's route
//! changes go by filter (`Session::subscriptions` is a B-tree); retained messages for a new
//! subscription and in shard 0's snapshot go by topic (`Retained` is a B-tree); a snapshot's
//! sessions go in slot order; timers due together fire by deadline, then in the order they
//! were armed; claims completed together (nodes gone) go in the order they started; shutdown
//! disconnects connections by identifier.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::{HashMap, HashSet};
use shardmq_net::mqtt::{
    self, AckProperties, ConnAck, ConnAckProperties, Connect, DecodeError, DecodeOptions,
    Disconnect, ErrorResponse, Packet, ProtocolVersion, PubAck, Publish, PublishProperties, QoS,
    ReasonCode, RetainHandling, Sender, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe, topic,
};
use tracing::{debug, warn};

use crate::auth::{Credentials, Policy, Principal, Verdict};
use crate::limits::Limits;
use crate::message::{
    ConnectionId, Forwarded, Message, NodeId, SessionTransfer, ShardIndex, ShardMessage,
};
use crate::retained::Retained;
use crate::storage;
use crate::trie::{Change, Trie};

#[macro_use]
mod client_log;
mod authorize;
mod client;
mod connect;
mod connection;
mod deliver;
mod durable;
pub mod inspect;
mod invariants;
mod metrics;
mod replicate;
mod route;
mod session;
mod snapshot;
mod subscribe;
mod sys;
mod takeover;
mod timers;
mod trace;

use client_log::Who;
pub use connection::Transport;
use connection::{Connection, Outbox, Priority, Write};
use deliver::publish_packet;
use durable::{Durable, HeldPacket};
pub use durable::{LogSettings, Receipt};
pub use metrics::{ForwardQueueMetrics, LinkMetrics, ShardMetrics, Stats};
use route::pick_member;
use session::{Inflight, InflightState, Queued, Session, StoredWill};
pub use sys::{SYS_PREFIX, is_sys_topic};
use timers::{Timer, TimerKey, Timers};
pub use trace::{PAYLOAD_QUOTE_BYTES_MAX, TRACE_TARGET};

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
    Opened {
        connection: ConnectionId,
        transport: Transport,
    },
    /// Bytes arrived on a connection.
    Received {
        connection: ConnectionId,
        bytes: Bytes,
    },
    /// The peer closed the connection, or it failed.
    Closed { connection: ConnectionId },
    /// After the socket took some of the connection's bytes: how many of those handed out
    /// (`Output::Send`) it has not taken yet. The reactor reports this after its send
    /// completions, at most once per connection per loop; a driver that never reports leaves
    /// every byte counted as unsent, so a connection then reaches its unsent bound
    /// (`Limits::unsent_bytes_per_connection_max`) after that many bytes.
    Sent {
        connection: ConnectionId,
        unsent_bytes: usize,
    },
    /// A batch of messages from other shards.
    Shard(ShardMessage),
    /// A message forwarded by another node of the cluster: delivered here, never forwarded on.
    FromNode(Forwarded),
    /// The verifier pool's answer to `Output::Verify` `ticket` of `connection`.
    Verified {
        connection: ConnectionId,
        ticket: u64,
        verdict: Verdict,
    },
    /// Time passed: deadlines (keep alive, will delay, session expiry) are checked.
    Tick,
    /// The server is shutting down: every client gets DISCONNECT 0x8B (5.0) and is closed.
    Shutdown,
}

/// What the shard asks its caller, the node layer (`cluster::NodeShard`), to do: the sends,
/// closes, hand-offs and messages between shards it passes on to the reactor, and the
/// cluster work it carries out itself (`ToNode`, `SessionToNode`, `NodeRoute`).
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
    /// This node gained its first (`added`) or lost its last shard holding `filter` (for a
    /// shared subscription, `group`'s `filter`): a route delta for the cluster. Only shard 0
    /// emits these, so each change is told once.
    NodeRoute {
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    },
    /// Check these credentials off the shard's thread (a password hash takes milliseconds);
    /// answered with `Input::Verified` and the same ticket. The connection waits meanwhile.
    Verify {
        connection: ConnectionId,
        ticket: u64,
        credentials: Credentials,
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
    /// Nodes this shard's data link to is closed (since it closed, until one is up again):
    /// a claim may take a replica of their sessions without waiting for the member list.
    unreachable: Vec<NodeId>,
    claim_clients: HashMap<u64, ByteString>,
    next_claim: u64,
    /// Other nodes' claims this shard answered with no claim of its own pending, by client:
    /// (node, its claim, when). A claim this shard starts soon after names them (`after`).
    answered: HashMap<ByteString, Vec<(NodeId, u64, u64)>>,
    answered_prune_at: usize,
    /// This shard's claims that completed lately, by client: (claim, when). An answer to
    /// another node's claim names the latest (`Handover::completed`), so that node does not
    /// answer it late at the cost of its own new connection.
    completed_claims: HashMap<ByteString, (u64, u64)>,
    completed_prune_at: usize,
    retained: Retained,
    /// Sessions here with a session expiry above 0 (`session::set_session_expiry` keeps it).
    persistent_sessions: usize,
    /// Sessions recovered here that ended because another node served them while this node
    /// was down (`replicate.rs`, fencing).
    sessions_fenced: u64,
    timers: Timers,
    outputs: Vec<Output>,
    /// The connections with bytes for this batch's flush, and what the writer refused.
    outbox: Outbox,
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
    /// The durable log and the acknowledgements waiting for it (with a data directory).
    durable: Option<Box<Durable>>,
    /// Who may connect and what they may do; replaced whole on a reload.
    auth: std::sync::Arc<Policy>,
    /// CONNECTs waiting for the verifier pool, by connection.
    verifying: HashMap<ConnectionId, authorize::PendingVerify>,
    next_verify_ticket: u64,
    /// The client identifiers an operator traces (`trace.rs`); empty when no trace runs.
    traced: HashSet<ByteString>,
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
        let outbox = Outbox::new(config.limits.unsent_bytes_per_connection_max, config.node);
        let (retained_messages_max, retained_bytes_max) = (
            config.limits.retained_messages_max,
            config.limits.retained_bytes_max,
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
            unreachable: Vec::new(),
            claim_clients: HashMap::new(),
            next_claim: 0,
            answered: HashMap::new(),
            answered_prune_at: 1024,
            completed_claims: HashMap::new(),
            completed_prune_at: 1024,
            retained: Retained::new(retained_messages_max, retained_bytes_max),
            persistent_sessions: 0,
            sessions_fenced: 0,
            timers: Timers::default(),
            outputs: Vec::new(),
            outbox,
            shared_shard_turn: 0,
            shared_member_turn: 0,
            assigned_ids: 0,
            matched: Vec::new(),
            plain_targets: Vec::new(),
            durable: None,
            auth: std::sync::Arc::new(Policy::open()),
            verifying: HashMap::new(),
            next_verify_ticket: 0,
            traced: HashSet::new(),
        }
    }

    /// The authentication and authorization policy from now on: new CONNECTs and every later
    /// check use it; connected clients stay connected.
    pub fn set_auth_policy(&mut self, policy: std::sync::Arc<Policy>) {
        self.auth = policy;
    }

    pub fn session_count(&self) -> usize {
        self.client_ids.len()
    }

    /// QoS 0 messages dropped because their subscriber's connection was at its unsent bound
    /// (a subscriber that does not read), since the shard started.
    pub fn dropped_over_bound_count(&self) -> u64 {
        self.outbox.dropped_over_bound_count
    }

    /// PUBLISH packets not sent because they exceed their client's Maximum Packet Size.
    pub fn dropped_too_large_count(&self) -> u64 {
        self.outbox.dropped_too_large_count
    }

    /// The earliest deadline, for the reactor's timer.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.timers.next_deadline_ms()
    }

    /// Applies one input at time `now_ms` (milliseconds on a monotonic clock).
    pub fn handle(&mut self, now_ms: u64, input: Input) {
        debug_assert!(now_ms >= self.now_ms, "the clock went backwards");
        self.now_ms = now_ms;
        match input {
            Input::Opened {
                connection,
                transport,
            } => self.open(connection, transport),
            Input::Received { connection, bytes } => self.receive(connection, bytes),
            Input::Closed { connection } => self.connection_lost(connection, "closed by the peer"),
            Input::Sent {
                connection,
                unsent_bytes,
            } => self.sent(connection, unsent_bytes),
            Input::Shard(message) => self.shard_message(message),
            Input::FromNode(forwarded) => {
                self.route(
                    forwarded.message,
                    Some((forwarded.plain, &forwarded.groups)),
                );
            }
            Input::Verified {
                connection,
                ticket,
                verdict,
            } => self.verified(connection, ticket, verdict),
            Input::Tick => self.fire_timers(),
            Input::Shutdown => self.shutdown(),
        }
    }

    /// The outputs of everything handled since the last call; each connection's packets come
    /// as one `Send`, before its `Close`.
    pub fn take_outputs(&mut self, outputs: &mut Vec<Output>) {
        self.flush_replication();
        self.release_durable();
        self.flush_sends(outputs);
        // Closes go after the sends of the same batch, and closed connections are forgotten.
        // Taken out while forgetting connections, and put back to keep its allocation.
        let mut queued = std::mem::take(&mut self.outputs);
        let released = self.durable_released_lsn();
        for output in queued.drain(..) {
            if let Output::Close { connection } = output
                && let Some(mut closed) = self.remove_connection(connection)
                && let Some(bytes) = self.last_bytes(&mut closed, released)
            {
                outputs.push(Output::Send { connection, bytes });
            }
            outputs.push(output);
        }
        self.outputs = queued;
    }
}

fn topic_levels(topic: &str) -> usize {
    topic.bytes().filter(|&byte| byte == b'/').count() + 1
}

#[cfg(test)]
mod tests;
