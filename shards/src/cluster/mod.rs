//! A shard as a member of a cluster: the node layer between the [`Shard`] and the reactor.
//!
//! Layers, each speaking its own language (as quinn-proto's `Connection` returns what only
//! its `Endpoint` consumes, and the `Endpoint` returns what only the socket layer consumes):
//! the reactor's events come in as [`NodeInput`]; the shard's [`Output`] (its sends and
//! closes, and its cluster work: `ToNode`, `SessionToNode`, `NodeRoute`) is consumed here;
//! what leaves is [`NodeOutput`], which holds only what the reactor carries out (send, close,
//! hand off, post to a shard, connect, answer an operator).
//!
//! Owns: every cluster link of this reactor (outbound data links to other nodes on every
//! shard; the inbound data links that other nodes' shards opened to this one, see
//! `accept.rs`; on shard 0 also the control links and the [`Agent`]), and the wiring between
//! them and the shard: `ToNode` outputs become forwarded frames, `NodeRoute` outputs route
//! deltas, and the agent's view changes the shards' cluster route tables.
//! Never: does I/O, or iterates in an order that is not a function of its inputs (maps here
//! are B-trees, so a seeded simulation replays exactly). Like the shard, a `NodeShard` takes
//! `(now, input)` and returns outputs, so the same code runs under the reactor and in the
//! cluster simulation (`tests/sim/`).
//!
//! Rooms: `mod.rs` (inputs, outputs, the one pass of `take_outputs`, deadlines), `io.rs`
//! (links and their bytes), `accept.rs` (the cluster port: which shard serves a new link),
//! `data.rs` (forwarding and inbound data links), `control.rs` (the agent's side: control
//! links, view changes, operator requests).
//!
//! Order of one batch (`take_outputs`), fixed so that nothing re-enters: the shard's outputs
//! are carried out; the agent flushes; its view changes go to the other shards and, once, to
//! this one; the shard's outputs of that are carried out (route changes they cause are told
//! at the next flush); then the forwarded frames, heartbeats and link bytes.

pub mod agent;
pub mod consensus;
pub mod forward;
pub mod link;
pub mod view;

mod accept;
mod control;
mod data;
mod io;
mod query;
mod stats;
pub use stats::CLOSED_LINK_PEERS_MAX;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use shardmq_net::frame::{Body, NodeId, Purpose, Route};
use tracing::{debug, warn};

pub use agent::{Agent, Status};
pub use io::Io;
pub use link::{Link, LinkSettings};
pub use query::answer_len_max;

pub use consensus::{RaftFileCall, RaftFileOp, RaftStoreFiles};

use crate::message::{ConnectionId, ShardIndex, ShardMessage};
use crate::shard::{Input, Output, Shard, Transport};
use io::{Cluster, splitmix};

/// Outbound connection tags: the kind in the high bits, the seed index or node below.
pub const TAG_SEED: u64 = 1 << 40;
pub const TAG_DATA: u64 = 2 << 40;
const TAG_KIND: u64 = 0xFF << 40;

/// The cluster settings of a node.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub link: LinkSettings,
    /// Cluster addresses of core nodes to dial.
    pub seeds: Vec<SocketAddr>,
    /// Seeds given by name: resolved off the shard threads (`NodeOutput::Resolve`) before
    /// each redial of their links, each address found becoming a seed.
    pub seed_names: Vec<SeedName>,
    /// A control or data link sends a heartbeat when it has been quiet this long.
    pub heartbeat_ms: u64,
    /// A link silent this long is closed (and redialled, if it is ours).
    pub link_timeout_ms: u64,
    pub reconnect_ms: u64,
    /// How long a core keeps the routes of a node that is down before withdrawing them.
    pub down_grace_ms: u64,
    /// Entries a core's route log keeps for followers that fall behind; older ones are
    /// served as a snapshot.
    pub log_entries_max: usize,
    /// Messages per shard and peer node waiting to be sent or acknowledged.
    pub forward_queue_max: usize,
    /// When this run started (wall clock, ms): the high bits of its epoch, so that a later
    /// run's epoch is larger and a peer can tell news of a restart from stale news.
    pub start_ms: u64,
    /// Other nodes that keep a replica of each persistent session (0: none).
    pub session_replicas: usize,
}

/// Addresses one seed name may stand for: a name that resolves to more (or SRV records with
/// more targets) is cut to the first this many, in the resolver's order.
pub const SEED_ADDRESSES_PER_NAME_MAX: usize = 16;

/// A seed given by name in `cluster.seeds`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SeedName {
    /// `host:port`: the name's A and AAAA records at `port`.
    Host { host: String, port: u16 },
    /// `srv:NAME`: the targets of NAME's SRV records, each at the port its record gives.
    Srv(String),
}

impl std::fmt::Display for SeedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeedName::Host { host, port } => write!(f, "{host}:{port}"),
            SeedName::Srv(name) => write!(f, "srv:{name}"),
        }
    }
}

/// What the reactor tells the node layer. Client connections and cluster links come apart
/// here, as the reactor tells them apart (a link is accepted on the cluster port, or dialled
/// with `NodeOutput::Connect`, and its connection is tagged so), so that no receive needs a
/// lookup to know which it is.
// Inputs live for one call; the size of a delivered message inline costs less than boxing it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum NodeInput {
    /// A client connection was accepted by this shard, or handed to it by another shard.
    Opened {
        connection: ConnectionId,
        transport: Transport,
    },
    Received {
        connection: ConnectionId,
        bytes: Bytes,
    },
    Closed {
        connection: ConnectionId,
    },
    /// The reactor's report of what a client connection's socket has not taken yet.
    Sent {
        connection: ConnectionId,
        unsent_bytes: usize,
    },
    /// A cluster link was accepted on the cluster port, or handed to this shard by the shard
    /// that accepted it (`accept.rs`).
    LinkOpened {
        connection: ConnectionId,
    },
    LinkReceived {
        connection: ConnectionId,
        bytes: Bytes,
    },
    LinkClosed {
        connection: ConnectionId,
    },
    /// A link asked for with `NodeOutput::Connect` is open.
    Connected {
        connection: ConnectionId,
        tag: u64,
    },
    /// A link asked for with `NodeOutput::Connect` could not be opened.
    ConnectFailed {
        tag: u64,
        error: String,
    },
    /// A message from another shard of this node.
    Shard(ShardMessage),
    /// An operator's request (shard 0), answered with `NodeOutput::Reply` and its ticket.
    Control {
        ticket: u64,
        request: Request,
    },
    /// The reactor carried out the Raft store's file call `tag` (`NodeOutput::RaftFiles`),
    /// or failed at one of its ops.
    RaftFilesDone {
        tag: u64,
        result: Result<(), String>,
    },
    /// The verifier pool's answer to `NodeOutput::Verify` `ticket`.
    Verified {
        connection: ConnectionId,
        ticket: u64,
        verdict: crate::auth::Verdict,
    },
    /// Time passed: the shard's and the links' deadlines are checked.
    Tick,
    /// The node is stopping: clients are told, links closed.
    Shutdown,
    /// An admin question (the API's `NodeQuery` as JSON) for node `node` (shard 0): sent as
    /// a `NodeQuery` frame on the control link to it, answered with `NodeOutput::NodeAnswer`
    /// and the same `id`, at once with an error when no link can carry it (`query.rs`).
    AskNode {
        id: u64,
        node: NodeId,
        query: Vec<u8>,
    },
    /// This node's answer to the peer's question `NodeOutput::NodeQuery` `connection`/`id`.
    AnswerNode {
        connection: ConnectionId,
        id: u64,
        answer: Result<Vec<u8>, String>,
    },
    /// The resolver's answer to `NodeOutput::Resolve` of seed name `index` (shard 0): the
    /// addresses found (at most [`SEED_ADDRESSES_PER_NAME_MAX`]), or why none were.
    Resolved {
        index: usize,
        result: Result<Vec<SocketAddr>, String>,
    },
}

/// What an operator asks of the cluster side (`ctl cluster ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    /// This shard's counters and gauges (asked of every shard, not only shard 0).
    Metrics,
    /// Publish the node's `$SYS` values (`Shard::publish_sys`) to this node's subscribers.
    Sys(Vec<(String, String)>),
    Join(SocketAddr),
    Leave,
    Set {
        key: String,
        value: String,
    },
    /// The admin API's question about this shard's clients, subscriptions, routes or
    /// retained messages, or its kick or retained deletion (`shard::inspect`).
    Inspect(crate::shard::inspect::Query),
    /// Trace these client identifiers from now on, and no others (`Shard::set_traced`); asked
    /// of every shard.
    Trace(Vec<bytestring::ByteString>),
}

/// A request's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Status(Box<Status>),
    Metrics(Box<crate::shard::ShardMetrics>),
    /// Done (join, leave, set).
    Done,
    Inspect(crate::shard::inspect::Reply),
}

/// What the node layer asks the reactor to do; nothing else leaves it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum NodeOutput {
    /// Send these bytes on the connection, after anything sent before.
    Send {
        connection: ConnectionId,
        bytes: Bytes,
    },
    /// Close the connection once everything queued for it is sent.
    Close { connection: ConnectionId },
    /// Move the connection to `shard`'s reactor, whose node layer gets it opened (of the same
    /// kind: client or link) with `bytes` as its first input. This shard has forgotten it.
    HandOff {
        connection: ConnectionId,
        shard: ShardIndex,
        bytes: Bytes,
    },
    /// Deliver a message to another shard of this node.
    Post {
        shard: ShardIndex,
        message: ShardMessage,
    },
    /// Open a TCP connection (a cluster link); the reactor answers with `Connected` or
    /// `ConnectFailed`, named by `tag`.
    Connect { address: SocketAddr, tag: u64 },
    /// The answer to the operator's request `ticket`.
    Reply {
        ticket: u64,
        answer: Result<Answer, String>,
    },
    /// Check a CONNECT's credentials off this thread (the verifier pool); answered with
    /// `NodeInput::Verified` and the same ticket.
    Verify {
        connection: ConnectionId,
        ticket: u64,
        credentials: crate::auth::Credentials,
    },
    /// File operations of the cores' Raft store (shard 0 of a core with a data directory),
    /// carried out in order after every earlier call; answered with `RaftFilesDone`.
    RaftFiles(RaftFileCall),
    /// A peer's admin question about this node, from an authenticated control link (at most
    /// `frame::NODE_QUERY_LEN_MAX` bytes, not parsed here): answer it with
    /// `NodeInput::AnswerNode` and the same connection and id.
    NodeQuery {
        connection: ConnectionId,
        node: NodeId,
        id: u64,
        query: Vec<u8>,
    },
    /// Node `node`'s answer to `NodeInput::AskNode` `id` (or why there is none).
    NodeAnswer {
        id: u64,
        node: NodeId,
        answer: Result<Vec<u8>, String>,
    },
    /// Resolve seed name `index` off the shard threads (blocking DNS); answered with
    /// `NodeInput::Resolved` on this shard (shard 0).
    Resolve { index: usize, name: SeedName },
}

/// A shard and, in a cluster, its links.
#[derive(Debug)]
pub struct NodeShard {
    pub shard: Shard,
    index: ShardIndex,
    shard_count: u16,
    cluster: Option<Cluster>,
    now_ms: u64,
    /// Outputs of a shard on its own (a clustered one queues them in its `Io`).
    scratch: Vec<NodeOutput>,
    /// The shard's outputs of one pass, kept for their allocation.
    shard_outputs: Vec<Output>,
}

impl NodeShard {
    /// A shard of a node on its own (no cluster configured).
    pub fn standalone(shard: Shard, index: ShardIndex, shard_count: u16) -> Self {
        Self {
            shard,
            index,
            shard_count,
            cluster: None,
            now_ms: 0,
            scratch: Vec::new(),
            shard_outputs: Vec::new(),
        }
    }

    /// A shard of a cluster member. `seed` makes this start's epoch and nonces (the glue
    /// passes real randomness, the simulation its seeded generator).
    pub fn clustered(
        mut shard: Shard,
        index: ShardIndex,
        shard_count: u16,
        mut settings: ClusterSettings,
        seed: u64,
        now_ms: u64,
    ) -> Self {
        // Every shard of one start computes the same epoch: a data link is served by any
        // shard, and its Welcome tells the node's epoch, which the dialling side compares
        // with the member list's (a different one there would mean a restart).
        let mut start = settings.start_ms ^ u64::from(settings.link.node());
        let epoch = (settings.start_ms << 16) | (splitmix(&mut start) & 0xFFFF);
        let random = seed;
        settings.link.epoch = epoch;
        settings.link.member.epoch = epoch;
        let agent = (index == 0).then(|| Agent::new(&settings, epoch, now_ms));
        // Records carry wall-clock times: the shard clock's zero is `now_ms` before the start.
        shard.attach_replication(
            settings.session_replicas,
            settings.start_ms.saturating_sub(now_ms),
        );
        Self {
            shard,
            index,
            shard_count,
            cluster: Some(Cluster {
                io: Io::new(settings, now_ms),
                accepting: BTreeMap::new(),
                epoch,
                random,
                agent,
                peers: BTreeMap::new(),
                data_out: BTreeMap::new(),
                delivered: forward::Delivered::default(),
                refused_pending: 0,
                owed: BTreeMap::new(),
                replication_dropped: 0,
            }),
            now_ms,
            scratch: Vec::new(),
            shard_outputs: Vec::new(),
        }
    }

    /// The cluster agent (shard 0 of a cluster member only), for status and for checkers.
    pub fn agent(&self) -> Option<&Agent> {
        self.cluster.as_ref()?.agent.as_ref()
    }

    pub fn is_clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// Panics with the broken rule if the shard's state, or this layer's, is inconsistent.
    /// For tests and the simulation (it walks the whole state).
    pub fn check_invariants(&self) {
        self.shard.check_invariants();
        if let Some(cluster) = &self.cluster {
            for connection in cluster.accepting.keys() {
                assert!(
                    !cluster.io.links.contains_key(connection),
                    "connection {connection} is both accepting and a link"
                );
            }
            for (connection, node) in &cluster.data_out {
                let peer = cluster.peers.get(node);
                assert!(
                    peer.is_some_and(|p| p.connection == Some(*connection)),
                    "dialled data link {connection} is not its peer's ({node}) link"
                );
                assert!(
                    cluster.io.links.contains_key(connection),
                    "dialled data link {connection} is not a link"
                );
            }
            assert_eq!(
                cluster.agent.is_some(),
                self.index == 0,
                "the agent lives on shard 0 alone"
            );
            query::check_invariants(cluster);
        }
    }

    pub fn handle(&mut self, now_ms: u64, input: NodeInput) {
        self.now_ms = now_ms;
        match input {
            NodeInput::Opened {
                connection,
                transport,
            } => self.shard.handle(
                now_ms,
                Input::Opened {
                    connection,
                    transport,
                },
            ),
            NodeInput::Received { connection, bytes } => self
                .shard
                .handle(now_ms, Input::Received { connection, bytes }),
            NodeInput::Closed { connection } => {
                self.shard.handle(now_ms, Input::Closed { connection })
            }
            NodeInput::Sent {
                connection,
                unsent_bytes,
            } => self.shard.handle(
                now_ms,
                Input::Sent {
                    connection,
                    unsent_bytes,
                },
            ),
            NodeInput::LinkOpened { connection } => self.link_opened(connection),
            NodeInput::LinkReceived { connection, bytes } => {
                let accepting = self
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.accepting.contains_key(&connection));
                if accepting {
                    self.accepting_received(connection, &bytes);
                } else {
                    self.link_received(connection, &bytes);
                }
            }
            NodeInput::LinkClosed { connection } => {
                if let Some(cluster) = &mut self.cluster
                    && cluster.accepting.remove(&connection).is_none()
                {
                    self.link_closed(connection, "closed by the peer");
                }
            }
            NodeInput::Connected { connection, tag } => self.connected(connection, tag),
            NodeInput::ConnectFailed { tag, error } => self.connect_failed(tag, &error),
            NodeInput::Shard(message) => self.shard_message(message),
            NodeInput::Control { ticket, request } => self.request(ticket, request),
            NodeInput::RaftFilesDone { tag, result } => {
                if let Some(agent) = self.cluster.as_mut().and_then(|c| c.agent.as_mut()) {
                    agent.raft_files_done(tag, result);
                }
            }
            NodeInput::Verified {
                connection,
                ticket,
                verdict,
            } => self.shard.handle(
                now_ms,
                Input::Verified {
                    connection,
                    ticket,
                    verdict,
                },
            ),
            NodeInput::Resolved { index, result } => {
                if let Some(cluster) = &mut self.cluster
                    && let Some(agent) = &mut cluster.agent
                {
                    cluster.io.now_ms = now_ms;
                    agent.seed_resolved(index, result, &cluster.io);
                }
            }
            NodeInput::Tick => {
                self.shard.handle(now_ms, Input::Tick);
                self.cluster_tick();
            }
            NodeInput::AskNode { id, node, query } => self.ask_node(id, node, query),
            NodeInput::AnswerNode {
                connection,
                id,
                answer,
            } => self.answer_node(connection, id, answer),
            NodeInput::Shutdown => {
                self.shard.handle(now_ms, Input::Shutdown);
                if let Some(cluster) = &mut self.cluster {
                    cluster.io.now_ms = now_ms;
                    let links: Vec<ConnectionId> = cluster.io.links.keys().copied().collect();
                    for connection in links {
                        cluster.io.close(connection);
                    }
                    let accepting = std::mem::take(&mut cluster.accepting);
                    for connection in accepting.into_keys() {
                        cluster.io.outputs.push(NodeOutput::Close { connection });
                    }
                }
            }
        }
    }

    /// An outbound connection asked for with `NodeOutput::Connect` is open.
    fn connected(&mut self, connection: ConnectionId, tag: u64) {
        let now_ms = self.now_ms;
        let index = self.index;
        let Some(cluster) = &mut self.cluster else {
            self.scratch.push(NodeOutput::Close { connection });
            return;
        };
        let (purpose, epoch) = if tag & TAG_KIND == TAG_SEED {
            (Purpose::Control, cluster.epoch)
        } else {
            match self.data_connected(connection, (tag & !TAG_KIND) as NodeId) {
                Some(epoch) => (Purpose::Data, epoch),
                None => return,
            }
        };
        let cluster = self.cluster.as_mut().expect("checked above");
        let nonce = cluster.nonce();
        let link = Link::connecting(
            connection,
            &cluster.io.settings.link,
            purpose,
            index,
            epoch,
            nonce,
            now_ms,
        );
        cluster.io.links.insert(connection, link);
        if purpose == Purpose::Control {
            let reconnect_ms = cluster.io.settings.reconnect_ms;
            if let Some(agent) = &mut cluster.agent {
                agent.seed_connected(
                    (tag & !TAG_KIND) as usize,
                    Some(connection),
                    now_ms,
                    reconnect_ms,
                );
            }
        }
    }

    /// An outbound connection failed.
    fn connect_failed(&mut self, tag: u64, error: &str) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let reconnect_ms = cluster.io.settings.reconnect_ms;
        if tag & TAG_KIND == TAG_SEED {
            debug!(error, "cannot reach a seed core; retrying");
            if let Some(agent) = &mut cluster.agent {
                agent.seed_connected((tag & !TAG_KIND) as usize, None, now_ms, reconnect_ms);
            }
        } else {
            self.data_connect_failed((tag & !TAG_KIND) as NodeId, error);
        }
    }

    fn link_received(&mut self, connection: ConnectionId, bytes: &[u8]) {
        let now_ms = self.now_ms;
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        // Bytes still in flight for a link closed in this batch.
        let Some(link) = cluster.io.links.get_mut(&connection) else {
            return;
        };
        let was_up = link.is_up();
        let mut bodies = Vec::new();
        let result = link.receive(&cluster.io.settings.link, bytes, now_ms, &mut bodies);
        if let Err(reason) = result {
            let node = link.up_peer().map_or(0, |p| p.node);
            warn!(connection, node, %reason, "cluster link closed");
            self.link_closed(connection, "refused");
            return;
        }
        let Some(peer) = link.up_peer().cloned() else {
            return;
        };
        if !was_up {
            debug!(connection, node = peer.node, purpose = ?peer.purpose, "cluster link up");
            match peer.purpose {
                Purpose::Control => self.control_link_up(connection),
                Purpose::Data => {
                    if !self.data_link_up(connection, &peer) {
                        return;
                    }
                }
            }
        }
        let mut through = None;
        for body in bodies {
            let result = match peer.purpose {
                Purpose::Control => self.control_frame(connection, body),
                Purpose::Data => self.data_frame(connection, &peer, body, &mut through),
            };
            if let Err(reason) = result {
                warn!(connection, node = peer.node, %reason, "cluster link closed");
                self.link_closed(connection, "protocol error");
                return;
            }
            let cluster = self.cluster.as_ref().expect("a cluster");
            if !cluster.io.links.contains_key(&connection) {
                return;
            }
        }
        if let Some(through) = through {
            let cluster = self.cluster.as_mut().expect("a cluster");
            cluster.io.now_ms = now_ms;
            cluster.io.send(connection, &Body::ForwardAck { through });
        }
    }

    fn link_closed(&mut self, connection: ConnectionId, why: &str) {
        let now_ms = self.now_ms;
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if !cluster.io.links.contains_key(&connection) {
            return;
        }
        debug!(connection, why, "cluster link gone");
        cluster.io.now_ms = now_ms;
        query::link_gone(cluster, connection);
        let io = &mut cluster.io;
        io.close(connection);
        if let Some(agent) = &mut cluster.agent {
            agent.link_closed(connection, io);
        }
        if let Some(node) = cluster.data_out.remove(&connection) {
            if let Some(peer) = cluster.peers.get_mut(&node) {
                peer.connection = None;
                peer.retry_at_ms = now_ms + cluster.io.settings.reconnect_ms;
            }
            // Claims waiting for that node may resume from a replica at once rather than
            // when the cluster decides the node is down (seconds when it led the cores).
            self.shard.data_link_lost(node);
        }
    }

    fn cluster_tick(&mut self) {
        let now_ms = self.now_ms;
        self.expire_accepting();
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        // Links silent past the timeout, or not authenticated in time, are dead.
        let timeout_ms = cluster.io.settings.link_timeout_ms;
        let dead: Vec<(ConnectionId, String)> = cluster
            .io
            .links
            .values()
            .filter_map(|l| Some((l.connection, l.expired(now_ms, timeout_ms)?)))
            .collect();
        for (connection, reason) in dead {
            warn!(connection, %reason, "cluster link closed");
            self.link_closed(connection, "timeout");
        }
        let cluster = self.cluster.as_mut().expect("a cluster");
        if let Some(agent) = &mut cluster.agent {
            cluster.io.now_ms = now_ms;
            agent.tick(&mut cluster.io);
        }
        data::dial_peers(cluster, now_ms);
        data::forget_gone_peers(cluster, now_ms);
    }

    /// When the cluster side next needs a tick.
    fn cluster_deadline_ms(&self) -> Option<u64> {
        let cluster = self.cluster.as_ref()?;
        let settings = &cluster.io.settings;
        // A link due a heartbeat (up links only send them) or due to time out.
        let links = cluster.io.links.values().map(|l| {
            let timeout = l.deadline_ms(settings.link_timeout_ms);
            if l.is_up() {
                timeout.min(l.last_sent_ms + settings.heartbeat_ms)
            } else {
                timeout
            }
        });
        let accepting = cluster
            .accepting
            .values()
            .map(|a| a.deadline_ms(settings.link_timeout_ms));
        let agent = cluster
            .agent
            .as_ref()
            .and_then(|a| a.next_deadline_ms(settings));
        links
            .chain(accepting)
            .chain(agent)
            .chain(data::peers_deadline_ms(cluster))
            .min()
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        match (self.shard.next_deadline_ms(), self.cluster_deadline_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Carries out the shard's outputs of everything handled since the last pass: what the
    /// reactor does goes to `outputs`, the cluster work to the peers and the agent.
    fn shard_pass(&mut self, outputs: &mut Vec<NodeOutput>) {
        let mut shard_outputs = std::mem::take(&mut self.shard_outputs);
        self.shard.take_outputs(&mut shard_outputs);
        for output in shard_outputs.drain(..) {
            match output {
                Output::Send { connection, bytes } => {
                    outputs.push(NodeOutput::Send { connection, bytes })
                }
                Output::Close { connection } => outputs.push(NodeOutput::Close { connection }),
                Output::HandOff {
                    connection,
                    shard,
                    bytes,
                } => outputs.push(NodeOutput::HandOff {
                    connection,
                    shard,
                    bytes,
                }),
                Output::ToShard { shard, message } => {
                    outputs.push(NodeOutput::Post { shard, message })
                }
                Output::ToNode { node, forwarded } => self.forward(node, &forwarded),
                Output::SessionToNode { node, transfer } => self.transfer(node, &transfer),
                Output::Verify {
                    connection,
                    ticket,
                    credentials,
                } => outputs.push(NodeOutput::Verify {
                    connection,
                    ticket,
                    credentials,
                }),
                Output::NodeRoute {
                    filter,
                    group,
                    added,
                } => {
                    // Alone, a node's route changes have no one to go to.
                    if let Some(cluster) = &mut self.cluster {
                        let agent = cluster
                            .agent
                            .as_mut()
                            .expect("only shard 0 emits node routes, and it has the agent");
                        let route = Route {
                            filter: filter.to_string(),
                            group: group.map(|g| g.to_string()),
                        };
                        agent.node_route(route, added, &cluster.io.settings, self.now_ms);
                    }
                }
            }
        }
        self.shard_outputs = shard_outputs;
    }

    /// Everything the batch produced, in the one pass the module comment describes.
    pub fn take_outputs(&mut self, outputs: &mut Vec<NodeOutput>) {
        let now_ms = self.now_ms;
        outputs.append(&mut self.scratch);
        self.shard_pass(outputs);
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        cluster.io.now_ms = now_ms;
        let applied = match &mut cluster.agent {
            Some(agent) => {
                agent.flush(&mut cluster.io);
                outputs.extend(
                    agent
                        .take_raft_file_calls()
                        .into_iter()
                        .map(NodeOutput::RaftFiles),
                );
                agent.applied()
            }
            None => 0,
        };
        if self.agent_changes() {
            self.shard_pass(outputs);
        }
        let cluster = self.cluster.as_mut().expect("checked above");
        data::send_frames(cluster);
        // Heartbeats on quiet links that are up.
        let io = &mut cluster.io;
        let quiet: Vec<ConnectionId> = io
            .links
            .values()
            .filter(|l| l.is_up() && now_ms >= l.last_sent_ms + io.settings.heartbeat_ms)
            .map(|l| l.connection)
            .collect();
        for connection in quiet {
            io.send(connection, &Body::Heartbeat { applied });
        }
        data::dial_peers(cluster, now_ms);
        outputs.append(&mut cluster.io.outputs);
        cluster.io.take_link_bytes();
        outputs.append(&mut cluster.io.outputs);
    }

    /// Takes up the durable Raft state of the data directory (shard 0, before it runs); from
    /// then on the Raft state is persisted there through `NodeOutput::RaftFiles`. An error
    /// means synced state is damaged or missing.
    pub fn open_raft_store(&mut self, files: RaftStoreFiles) -> Result<(), String> {
        self.agent_mut()?.open_raft_store(files)
    }
}
