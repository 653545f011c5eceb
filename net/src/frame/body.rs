//! The frame bodies: every type nodes exchange on their links ([`Body`] and what it holds),
//! the kind byte each body names in its header, and log entries as bytes outside a frame
//! (for the cores' Raft group).
//!
//! Never: checks a header or cuts a body to fit a frame (`header.rs`, `encode.rs`). Bodies are
//! owned values: a peer's body is validated once where it enters, then deserialized into these.

use bytes::Bytes;
use rkyv::rancor::{self, Fallible};
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::{Archive, Deserialize, Place, Serialize};

/// A node's identifier within its cluster, from its configuration.
pub type NodeId = u32;

/// A node's role (DESIGN §4).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Holds the authoritative route table and streams it to edges.
    Core,
    /// Serves clients and replicates the route table from a core.
    Edge,
}

/// What a link carries; said in its first frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Route deltas, the route log and heartbeats: one link per node and core.
    Control,
    /// Forwarded messages, from one shard of the sender.
    Data,
}

/// A route: a topic filter and, for a shared subscription, its group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub filter: String,
    pub group: Option<String>,
}

/// One change of one origin's routes, numbered per origin from 1.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RouteDelta {
    pub sequence: u64,
    pub route: Route,
    pub added: bool,
}

/// A cluster member as the cores know it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub role: Role,
    /// Where its cluster port listens.
    pub cluster_address: String,
    /// Where it serves MQTT, for status.
    pub mqtt_address: String,
    /// Its start: new at every start, so that a restarted node is told from the run before.
    pub epoch: u64,
}

/// One entry of a core's ordered route log.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// A node joined (or came back).
    Joined(Member),
    /// A node's link to the core broke; it is shown down, its routes stay for the grace period.
    Down(NodeId),
    /// A node is back up within its grace period.
    Up(NodeId),
    /// A node left, or stayed down past the grace period: its routes are withdrawn.
    Removed(NodeId),
    /// A route of `origin` was added or removed.
    Route {
        origin: NodeId,
        route: Route,
        added: bool,
    },
    /// `origin` resent its whole route set (after a reconnect or a gap): it replaces what the
    /// cluster held for it.
    Replace { origin: NodeId, routes: Vec<Route> },
    /// A cluster-wide setting, committed by the cores' Raft group.
    Setting { key: String, value: String },
}

/// A published message crossing to another node.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds left before the message expires (clocks of two nodes are not compared).
    pub expiry_ms: Option<u64>,
    pub publisher: Option<String>,
    pub payload_format_indicator: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// One item of a data link, numbered: every item but a QoS 0 message is kept by the sender
/// until acknowledged and resent on a new link, and the receiver takes each number once.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// Numbered per sending shard and receiving node, rising; an item resent after a
    /// reconnect keeps its number, so the receiver acts on it once.
    pub sequence: u64,
    pub item: Item,
}

/// What a data link carries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A published message and whom it is for on the receiving node.
    Publish {
        message: WireMessage,
        /// Deliver to every matching plain subscription there.
        plain: bool,
        /// Deliver to one member there of each listed shared group: `(group, filter)`. A
        /// retained message goes to every node, to be stored, even if these say there is no
        /// one to deliver it to.
        groups: Vec<(String, String)>,
    },
    /// The sender's shard `shard` is accepting a connection for `client_id`: the receiver
    /// closes its connection of that client (0x8E) and answers with `Handover`.
    Claim {
        client_id: String,
        shard: u16,
        /// Names the claim in its answer.
        claim: u64,
        /// The new connection starts clean: the old session is ended, not sent.
        clean_start: bool,
        /// The receiver's own claim for this client that the sender has already answered:
        /// this claim comes after it, so the receiver answers once its claim completes.
        after: Option<u64>,
    },
    /// The answer to a claim, for the claimant's shard `shard`: the session, if the sender
    /// had one (a snapshot record: subscriptions, in-flight and queued messages).
    Handover {
        client_id: String,
        shard: u16,
        claim: u64,
        session: Option<Vec<u8>>,
        /// The sender's own claim for this client that completed before this answer: the
        /// receiver's deferred answer to it would come too late (and would take the session
        /// from the receiver's new connection), so the receiver drops it.
        completed: Option<u64>,
    },
    /// Session replication (protocol version [`REPLICATION_VERSION`] on): records of the
    /// sending shard (the data link's) about the persistent sessions it is home to and this
    /// node keeps a replica of, each framed as in the durable log
    /// (`[length][CRC32C][kind][body]`), in the order they were made. `reset`: forget every
    /// replica of that shard first.
    ///
    /// `records` is `Bytes` so that one encoding is shared by every queue that holds the
    /// item (unacknowledged and unsent, resent on a new link) without a copy; it is archived
    /// exactly as a `Vec<u8>` ([`BytesAsVec`]), so the wire format is that of version 3.
    Replicate {
        reset: bool,
        #[rkyv(with = BytesAsVec)]
        records: Bytes,
    },
    /// Sent before a `Handover` without a session, for the claimant's shard `shard`: this
    /// node keeps a replica of the client's session, whose home was node `home`. The claimant
    /// takes it only if that home did not answer the claim (it is down), so that a session
    /// outlives its home node.
    ReplicaOffer {
        client_id: String,
        shard: u16,
        claim: u64,
        home: NodeId,
        session: Vec<u8>,
    },
    /// Fencing (protocol version [`FENCE_VERSION`] on): the client's session whose home was
    /// node `home` is now served by the sender, which installed that node's replica of it or
    /// gave it to a claim while `home` was down. A node that keeps a replica of it from `home`
    /// drops that replica; `home` itself, back after a restart, ends the copy it recovered
    /// from its data directory if the client has not connected to it since, so that the
    /// session keeps one owner.
    Disown { client_id: String, home: NodeId },
}

/// Archives `Bytes` exactly as rkyv archives a `Vec<u8>` (an `ArchivedVec<u8>`), so a field
/// can change from one to the other without changing the wire format. Deserializing copies
/// the bytes out of the (aligned) receive buffer, as for a `Vec<u8>`.
#[derive(Debug)]
pub struct BytesAsVec;

impl ArchiveWith<Bytes> for BytesAsVec {
    type Archived = ArchivedVec<u8>;
    type Resolver = VecResolver;

    fn resolve_with(field: &Bytes, resolver: VecResolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_slice(field.as_ref(), resolver, out);
    }
}

impl<S: Fallible + Allocator + Writer + ?Sized> SerializeWith<Bytes, S> for BytesAsVec {
    fn serialize_with(field: &Bytes, serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::<u8>::serialize_from_slice(field.as_ref(), serializer)
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<ArchivedVec<u8>, Bytes, D> for BytesAsVec {
    fn deserialize_with(field: &ArchivedVec<u8>, _: &mut D) -> Result<Bytes, D::Error> {
        Ok(Bytes::copy_from_slice(field.as_slice()))
    }
}

/// The first frame of the connecting side: who it is, what the link is for, and its nonce.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node: NodeId,
    pub role: Role,
    pub purpose: Purpose,
    pub member: Member,
    /// Fresh for this link: the responder's proof covers it.
    pub nonce: [u8; 16],
    /// For a data link: which shard of the sender it comes from, and the sender's start
    /// (its forward numbering restarts with a new epoch).
    pub shard: u16,
    pub epoch: u64,
}

/// The accepting side's answer to a [`Hello`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub node: NodeId,
    pub role: Role,
    /// The responder's proof over the handshake's transcript ([`handshake`](super::handshake)).
    pub proof: [u8; 32],
    /// Fresh for this link, chosen after the initiator's: the initiator's proof covers it.
    pub nonce: [u8; 16],
    /// The acceptor's start (new at every start): a sender that sees it change knows that
    /// what it queued for the node's previous run has no one left to go to.
    pub epoch: u64,
}

/// A frame body.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The first frame of the connecting side.
    Hello(Hello),
    /// The accepting side's answer, with its proof ([`handshake`](super::handshake)).
    Welcome(Welcome),
    /// The connector's proof over the handshake's transcript
    /// ([`handshake`](super::handshake)); the link is up once it checks.
    Proof { proof: [u8; 32] },
    /// Why the link is refused, just before it closes.
    Refused { reason: String },
    /// Sent on a control link every heartbeat interval, so that silence means failure. From an
    /// edge, `applied` says how far it has applied the core's log (replication lag).
    Heartbeat { applied: u64 },
    /// To a core: the sender's whole route set, as of its route `sequence`.
    RouteSync { sequence: u64, routes: Vec<Route> },
    /// To a core: changes of the sender's routes, in order.
    RouteDeltas { deltas: Vec<RouteDelta> },
    /// To a core: stream your log to me from entry `next` of log `epoch` (0: from a snapshot).
    Follow { epoch: u64, next: u64 },
    /// From a core: the whole state its log has built, as of entry `next - 1`.
    LogSnapshot {
        epoch: u64,
        next: u64,
        members: Vec<Member>,
        down: Vec<NodeId>,
        routes: Vec<(NodeId, Route)>,
        settings: Vec<(String, String)>,
    },
    /// From a core: log entries `first`, `first + 1`, ...
    LogEntries {
        epoch: u64,
        first: u64,
        entries: Vec<LogEntry>,
    },
    /// From a core, right after a `LogSnapshot` whose routes do not fit one frame: more routes
    /// of that snapshot (the one of log `epoch` as of entry `next - 1`), added to it.
    SnapshotRoutes {
        epoch: u64,
        next: u64,
        routes: Vec<(NodeId, Route)>,
    },
    /// Messages from one shard of the sender, in order.
    Forward { messages: Vec<Forwarded> },
    /// Every forwarded message numbered up to `through` has been handed to the receiving
    /// node's shards.
    ForwardAck { through: u64 },
    /// The sender is leaving the cluster: forget it and its routes now.
    Leave,
    /// Core to core: a Raft message of the cores' group (raft-rs's protobuf encoding).
    Raft { message: Vec<u8> },
    /// Core to core, when a control link comes up and whenever it changes: the sender's Raft
    /// identifier (its node, with an incarnation new at every start), whether it is in the
    /// cores' Raft group yet, and (before it is) the voters it would found the group with.
    /// Cores found a group only when all of them name the same voters.
    GroupState {
        initialized: bool,
        id: u64,
        founders: Vec<u64>,
    },
    /// On a control link, either way (protocol version 2 on): an admin question for the
    /// receiving node about itself (the admin API's `NodeQuery` as JSON, at most
    /// [`NODE_QUERY_LEN_MAX`] bytes), answered with a `NodeAnswer` of the same `id`.
    NodeQuery { id: u64, query: Vec<u8> },
    /// The answer to `NodeQuery` `id`: the answer as JSON, or why there is none (at most
    /// [`NODE_ERROR_LEN_MAX`] bytes). The whole frame stays within the link's frame budget.
    NodeAnswer {
        id: u64,
        answer: Result<Vec<u8>, String>,
    },
}

/// The longest `NodeQuery` a node sends or answers: a question is a small JSON object, but
/// it may name a client identifier, which can be 65,535 bytes (`client_id_length_max`), and
/// JSON escaping can double that.
pub const NODE_QUERY_LEN_MAX: usize = 160 * 1024;

/// The longest error a `NodeAnswer` carries; a longer one is cut (at a character boundary).
pub const NODE_ERROR_LEN_MAX: usize = 1024;

/// The first protocol version that has `NodeQuery` and `NodeAnswer`: a peer of an older
/// version would refuse their kinds (and close the link), so they are never sent to one.
pub const NODE_QUERY_VERSION: u16 = 2;

/// The first protocol version that has the `Replicate` and `ReplicaOffer` items: a peer of
/// an older version would refuse them (and close the link), so they are never sent to one.
pub const REPLICATION_VERSION: u16 = 3;

/// The first protocol version that has the `Disown` item: never sent to an older peer.
pub const FENCE_VERSION: u16 = 4;

impl Item {
    /// The lowest protocol version whose peers know this item: a peer of an older version
    /// refuses the whole frame that holds it (and closes the link).
    pub fn version_min(&self) -> u16 {
        match self {
            Item::Publish { .. } | Item::Claim { .. } | Item::Handover { .. } => 1,
            Item::Replicate { .. } | Item::ReplicaOffer { .. } => REPLICATION_VERSION,
            Item::Disown { .. } => FENCE_VERSION,
        }
    }
}

impl Body {
    /// The kind byte of the header.
    pub fn kind(&self) -> u8 {
        match self {
            Body::Hello(_) => 1,
            Body::Welcome(_) => 2,
            Body::Proof { .. } => 3,
            Body::Refused { .. } => 4,
            Body::Heartbeat { .. } => 5,
            Body::RouteSync { .. } => 6,
            Body::RouteDeltas { .. } => 7,
            Body::Follow { .. } => 8,
            Body::LogSnapshot { .. } => 9,
            Body::LogEntries { .. } => 10,
            Body::Forward { .. } => 11,
            Body::ForwardAck { .. } => 12,
            Body::Leave => 13,
            Body::Raft { .. } => 14,
            Body::GroupState { .. } => 15,
            Body::SnapshotRoutes { .. } => 16,
            Body::NodeQuery { .. } => 17,
            Body::NodeAnswer { .. } => 18,
        }
    }
}

/// Log entries as bytes outside a frame: the cores' Raft group stores its commands (one entry)
/// and its snapshots (the registry as entries) this way.
pub fn encode_entries(entries: &[LogEntry]) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(&entries.to_vec())
        .expect("log entries always serialize")
        .into_vec()
}

/// The entries of [`encode_entries`], validated.
pub fn decode_entries(bytes: &[u8]) -> Result<Vec<LogEntry>, String> {
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<Vec<LogEntry>, rancor::Error>(&aligned).map_err(|e| e.to_string())
}
