//! Cluster frames: what nodes say to each other on their links.
//!
//! Owns: the frame format (a fixed 32-byte header checked before anything else, then an rkyv
//! body), the bodies ([`Body`]) and, in [`handshake`], the link handshake that authenticates
//! both ends of a link before anything else crosses it.
//! Never: performs I/O or reads a clock. A peer's bytes never panic a node: every failure is a
//! [`FrameError`] that ends that link and nothing else.
//!
//! Header, little-endian:
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..4   | magic `SMQC` |
//! | 4..6   | protocol version of the sender |
//! | 6      | body kind (the [`Body`] variant, for logs and quick refusal) |
//! | 7      | reserved, zero |
//! | 8..16  | cluster identifier: FNV-1a of the cluster name |
//! | 16..20 | body length |
//! | 20..24 | CRC-32 of the body |
//! | 24..28 | CRC-32 of bytes 0..24 |
//! | 28..32 | reserved, zero (keeps the header a multiple of rkyv's 16-byte alignment) |
//!
//! The body is validated by rkyv's bytecheck once, where it enters ([`Decoder::next_frame`]), and
//! deserialized into the owned types below. A receive buffer is not aligned for rkyv, so the
//! body is first copied into an aligned buffer; bodies are small next to the work they cause.

use bytes::{Buf, BufMut, BytesMut};
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

pub mod handshake;

/// The frame protocol this build speaks. A node accepts a peer whose version is within one of
/// its own, so that a rolling upgrade can run a cluster of two adjacent versions; the link then
/// speaks the lower of the two.
pub const PROTOCOL_VERSION: u16 = 1;

pub const MAGIC: [u8; 4] = *b"SMQC";
pub const HEADER_LEN: usize = 32;

/// A node's identifier within its cluster, from its configuration.
pub type NodeId = u32;

/// The cluster identifier carried by every frame: FNV-1a of the cluster name.
pub fn cluster_id(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Whether a peer speaking `version` may join a cluster with this build.
pub fn version_compatible(version: u16) -> bool {
    version.abs_diff(PROTOCOL_VERSION) <= 1
}

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
    },
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
    /// The responder's proof over the handshake's transcript ([`handshake`]).
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
    /// The accepting side's answer, with its proof ([`handshake`]).
    Welcome(Welcome),
    /// The connector's proof over the handshake's transcript ([`handshake`]); the link is up
    /// once it checks.
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
        }
    }
}

/// Why a frame was refused. The link ends; nothing else does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    BadMagic,
    HeaderChecksum,
    /// The peer speaks a protocol version too far from ours.
    Version(u16),
    /// The peer belongs to another cluster.
    Cluster(u64),
    TooLong(usize),
    BodyChecksum,
    /// The body does not validate as the kind its header names.
    Body(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic => write!(f, "not a shardmq cluster frame (bad magic)"),
            FrameError::HeaderChecksum => write!(f, "frame header checksum mismatch"),
            FrameError::Version(v) => write!(
                f,
                "protocol version {v} is not compatible with ours ({PROTOCOL_VERSION})"
            ),
            FrameError::Cluster(id) => {
                write!(f, "frame of another cluster (identifier {id:016x})")
            }
            FrameError::TooLong(n) => write!(f, "frame body of {n} bytes is above the limit"),
            FrameError::BodyChecksum => write!(f, "frame body checksum mismatch"),
            FrameError::Body(e) => write!(f, "frame body does not validate: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends the frame of `body` to `out`, if its body is at most `body_len_max` bytes (the
/// limit the peer decodes with) and fits the header's 32-bit length. A body above either is
/// refused with [`FrameError::TooLong`] and nothing is written: a peer would refuse the frame
/// and close the link, so a caller must cut what it sends to fit ([`FRAME_BUDGET_DIVISOR`])
/// rather than ever emit it.
pub fn encode(
    body: &Body,
    cluster: u64,
    body_len_max: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let bytes = rkyv::to_bytes::<rancor::Error>(body).expect("frame bodies always serialize");
    let body_len = u32::try_from(bytes.len())
        .ok()
        .filter(|&len| len as usize <= body_len_max)
        .ok_or(FrameError::TooLong(bytes.len()))?;
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6] = body.kind();
    header[8..16].copy_from_slice(&cluster.to_le_bytes());
    header[16..20].copy_from_slice(&body_len.to_le_bytes());
    header[20..24].copy_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let header_crc = crc32fast::hash(&header[0..24]);
    header[24..28].copy_from_slice(&header_crc.to_le_bytes());
    out.reserve(HEADER_LEN + bytes.len());
    out.put_slice(&header);
    out.put_slice(&bytes);
    Ok(())
}

/// Producers of long bodies (forwarded messages, route sets, the route log) fill a frame up
/// to `body_len_max / FRAME_BUDGET_DIVISOR` of estimated length ([`Forwarded::len_bound`],
/// [`Route::len_bound`], [`LogEntry::len_bound`]): half the limit, so that the estimate's
/// slack, the body's own fields and one last item always fit under the limit itself.
pub const FRAME_BUDGET_DIVISOR: usize = 2;

/// What rkyv may add around one field or element beyond its variable bytes: its inline part
/// (at most 16 bytes for what these bodies hold) and alignment padding (at most 15).
const FIELD_LEN_BOUND: usize = 32;

fn string_bound(s: &str) -> usize {
    s.len() + FIELD_LEN_BOUND
}

fn option_bound(s: Option<&str>) -> usize {
    s.map_or(0, str::len) + FIELD_LEN_BOUND
}

impl Route {
    /// An upper bound of this route's share of an encoded body.
    pub fn len_bound(&self) -> usize {
        string_bound(&self.filter) + option_bound(self.group.as_deref()) + FIELD_LEN_BOUND
    }
}

impl LogEntry {
    /// An upper bound of this entry's share of an encoded body.
    pub fn len_bound(&self) -> usize {
        FIELD_LEN_BOUND
            + match self {
                LogEntry::Joined(member) => {
                    string_bound(&member.cluster_address)
                        + string_bound(&member.mqtt_address)
                        + 3 * FIELD_LEN_BOUND
                }
                LogEntry::Down(_) | LogEntry::Up(_) | LogEntry::Removed(_) => FIELD_LEN_BOUND,
                LogEntry::Route { route, .. } => route.len_bound() + 2 * FIELD_LEN_BOUND,
                LogEntry::Replace { routes, .. } => {
                    routes.iter().map(Route::len_bound).sum::<usize>() + 2 * FIELD_LEN_BOUND
                }
                LogEntry::Setting { key, value } => string_bound(key) + string_bound(value),
            }
    }
}

impl Forwarded {
    /// An upper bound of this item's share of an encoded `Forward` body, from the lengths it
    /// holds (no encoding: this runs for every forwarded message).
    pub fn len_bound(&self) -> usize {
        let fixed = 4 * FIELD_LEN_BOUND;
        fixed
            + match &self.item {
                Item::Publish {
                    message, groups, ..
                } => {
                    let pairs = |pairs: &[(String, String)]| {
                        pairs
                            .iter()
                            .map(|(a, b)| string_bound(a) + string_bound(b) + FIELD_LEN_BOUND)
                            .sum::<usize>()
                    };
                    string_bound(&message.topic)
                        + message.payload.len()
                        + option_bound(message.publisher.as_deref())
                        + option_bound(message.response_topic.as_deref())
                        + message.correlation_data.as_ref().map_or(0, Vec::len)
                        + option_bound(message.content_type.as_deref())
                        + pairs(&message.user_properties)
                        + pairs(groups)
                        + 10 * FIELD_LEN_BOUND
                }
                Item::Claim { client_id, .. } => string_bound(client_id) + 4 * FIELD_LEN_BOUND,
                Item::Handover {
                    client_id, session, ..
                } => {
                    string_bound(client_id)
                        + session.as_ref().map_or(0, Vec::len)
                        + 4 * FIELD_LEN_BOUND
                }
            }
    }
}

/// Cuts `items` into runs, in order, each of whose bounds sum to at most `budget`; an item
/// whose bound alone is above it gets a run of its own (the caller decides whether such an
/// item can go at all).
pub fn cut_by_len<T>(
    items: impl IntoIterator<Item = T>,
    len_bound: impl Fn(&T) -> usize,
    budget: usize,
) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut run_len = 0usize;
    for item in items {
        let len = len_bound(&item);
        match runs.last_mut() {
            Some(run) if !run.is_empty() && run_len.saturating_add(len) <= budget => {
                run_len += len;
                run.push(item);
            }
            _ => {
                run_len = len;
                runs.push(vec![item]);
            }
        }
    }
    runs
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

/// Splits a link's byte stream into checked frames.
///
/// Memory: the buffer holds at most one frame whose header has been checked (at most
/// `body_len_max` of body) plus the bytes of the last [`Decoder::extend`]; a header announcing a
/// longer body is refused before any of that body is kept.
#[derive(Debug)]
pub struct Decoder {
    cluster: u64,
    body_len_max: usize,
    buffer: BytesMut,
    /// The peer's protocol version, from its last frame.
    pub peer_version: Option<u16>,
}

impl Decoder {
    pub fn new(cluster: u64, body_len_max: usize) -> Self {
        Self {
            cluster,
            body_len_max,
            buffer: BytesMut::new(),
            peer_version: None,
        }
    }

    /// Changes the largest body accepted from the next frame on: a link takes only
    /// handshake-sized frames until its peer is authenticated
    /// ([`handshake::HANDSHAKE_BODY_LEN_MAX`]), then up to the configured limit.
    pub fn set_body_len_max(&mut self, body_len_max: usize) {
        self.body_len_max = body_len_max;
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. After an error the link
    /// must be closed: the stream has lost its framing.
    pub fn next_frame(&mut self) -> Result<Option<Body>, FrameError> {
        Ok(self.next_versioned()?.map(|(_, body)| body))
    }

    /// [`Decoder::next_frame`], with the protocol version of the frame's header.
    pub fn next_versioned(&mut self) -> Result<Option<(u16, Body)>, FrameError> {
        let Some(header) = self.buffer.get(..HEADER_LEN) else {
            // A wrong magic is refused as soon as it can be seen, so that a stranger (an MQTT
            // client on the wrong port) is told at once.
            let seen = self.buffer.len().min(MAGIC.len());
            if self.buffer.get(..seen) != MAGIC.get(..seen) {
                return Err(FrameError::BadMagic);
            }
            return Ok(None);
        };
        let header: &[u8; HEADER_LEN] = header.try_into().expect("HEADER_LEN bytes");
        let header = Header::check(header, self.cluster, self.body_len_max)?;
        let Some(frame_len) = HEADER_LEN.checked_add(header.body_len) else {
            return Err(FrameError::TooLong(header.body_len));
        };
        if self.buffer.len() < frame_len {
            return Ok(None);
        }
        self.peer_version = Some(header.version);
        self.buffer.advance(HEADER_LEN);
        let raw = self.buffer.split_to(header.body_len);
        let body = decode_body(&raw, header.kind, header.body_crc)?;
        Ok(Some((header.version, body)))
    }
}

/// A frame header that passed every check that needs no body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub kind: u8,
    pub body_len: usize,
    pub body_crc: u32,
}

impl Header {
    /// Checks a header of cluster `cluster` announcing at most `body_len_max` bytes of body.
    pub fn check(
        header: &[u8; HEADER_LEN],
        cluster: u64,
        body_len_max: usize,
    ) -> Result<Header, FrameError> {
        let [m0, m1, m2, m3, v0, v1, kind, _reserved, rest @ ..] = *header;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let word = |at: usize| {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(&header[at..at + 4]);
            u32::from_le_bytes(bytes)
        };
        if crc32fast::hash(&header[0..24]) != word(24) {
            return Err(FrameError::HeaderChecksum);
        }
        let version = u16::from_le_bytes([v0, v1]);
        if !version_compatible(version) {
            return Err(FrameError::Version(version));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&rest[0..8]);
        let id = u64::from_le_bytes(id);
        if id != cluster {
            return Err(FrameError::Cluster(id));
        }
        let body_len = usize::try_from(word(16)).unwrap_or(usize::MAX);
        if body_len > body_len_max {
            return Err(FrameError::TooLong(body_len));
        }
        Ok(Header {
            version,
            kind,
            body_len,
            body_crc: word(20),
        })
    }
}

/// Checks a frame body against its header's checksum and kind, and validates it.
pub fn decode_body(raw: &[u8], kind: u8, body_crc: u32) -> Result<Body, FrameError> {
    if crc32fast::hash(raw) != body_crc {
        return Err(FrameError::BodyChecksum);
    }
    let mut aligned = AlignedVec::<16>::with_capacity(raw.len());
    aligned.extend_from_slice(raw);
    let body = rkyv::from_bytes::<Body, rancor::Error>(&aligned)
        .map_err(|e| FrameError::Body(e.to_string()))?;
    if body.kind() != kind {
        return Err(FrameError::Body(format!(
            "header says kind {kind}, body is kind {}",
            body.kind()
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Body> {
        let route = Route {
            filter: "a/+/c".into(),
            group: Some("g".into()),
        };
        let message = WireMessage {
            topic: "a/b/c".into(),
            payload: vec![1, 2, 3],
            qos: 1,
            retain: false,
            expiry_ms: Some(5000),
            publisher: Some("client".into()),
            payload_format_indicator: Some(1),
            response_topic: Some("reply".into()),
            correlation_data: Some(vec![9]),
            user_properties: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
        };
        vec![
            Body::Heartbeat { applied: 3 },
            Body::RouteDeltas {
                deltas: vec![RouteDelta {
                    sequence: 7,
                    route: route.clone(),
                    added: true,
                }],
            },
            Body::LogEntries {
                epoch: 3,
                first: 10,
                entries: vec![
                    LogEntry::Down(4),
                    LogEntry::Replace {
                        origin: 2,
                        routes: vec![route],
                    },
                    LogEntry::Setting {
                        key: "forward_queue_max".into(),
                        value: "10".into(),
                    },
                ],
            },
            Body::Raft {
                message: vec![8, 3, 16, 1],
            },
            Body::GroupState {
                initialized: false,
                id: 1 << 63 | 2,
                founders: vec![1 << 63 | 1, 1 << 63 | 2],
            },
            Body::Forward {
                messages: vec![
                    Forwarded {
                        sequence: 1,
                        item: Item::Publish {
                            message,
                            plain: true,
                            groups: vec![("g".into(), "a/#".into())],
                        },
                    },
                    Forwarded {
                        sequence: 2,
                        item: Item::Claim {
                            client_id: "c".into(),
                            shard: 1,
                            claim: 9,
                            clean_start: false,
                            after: Some(4),
                        },
                    },
                    Forwarded {
                        sequence: 3,
                        item: Item::Handover {
                            client_id: "c".into(),
                            shard: 1,
                            claim: 9,
                            session: Some(vec![1, 2, 3]),
                        },
                    },
                ],
            },
        ]
    }

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let entries = vec![
            LogEntry::Down(4),
            LogEntry::Setting {
                key: "k".into(),
                value: "v".into(),
            },
        ];
        assert_eq!(decode_entries(&encode_entries(&entries)).unwrap(), entries);
        assert!(decode_entries(&[0xFF; 7]).is_err());
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let cluster = cluster_id("test");
        let mut stream = BytesMut::new();
        for body in sample() {
            encode(&body, cluster, 1 << 20, &mut stream).unwrap();
        }
        let mut whole = Decoder::new(cluster, 1 << 20);
        whole.extend(&stream);
        let mut decoded = Vec::new();
        while let Some(body) = whole.next_frame().unwrap() {
            decoded.push(body);
        }
        assert_eq!(decoded, sample());

        let mut trickle = Decoder::new(cluster, 1 << 20);
        let mut decoded = Vec::new();
        for byte in stream.iter() {
            trickle.extend(&[*byte]);
            while let Some(body) = trickle.next_frame().unwrap() {
                decoded.push(body);
            }
        }
        assert_eq!(decoded, sample());
        assert_eq!(trickle.peer_version, Some(PROTOCOL_VERSION));
    }

    #[test]
    fn damaged_frames_are_refused() {
        let cluster = cluster_id("test");
        let mut frame = BytesMut::new();
        encode(
            &Body::Heartbeat { applied: 0 },
            cluster,
            1 << 20,
            &mut frame,
        )
        .unwrap();
        let refused = |bytes: &[u8], cluster: u64, max: usize| {
            let mut decoder = Decoder::new(cluster, max);
            decoder.extend(bytes);
            decoder.next_frame().unwrap_err()
        };
        assert_eq!(
            refused(b"\x10\x0c\x00\x04MQTT", cluster, 1024),
            FrameError::BadMagic
        );
        assert_eq!(
            refused(&frame, cluster_id("other"), 1024),
            FrameError::Cluster(cluster)
        );
        let mut bad = frame.to_vec();
        bad[5] ^= 1;
        assert_eq!(refused(&bad, cluster, 1024), FrameError::HeaderChecksum);
        let mut body_flip = BytesMut::new();
        encode(
            &Body::Refused { reason: "x".into() },
            cluster,
            1 << 20,
            &mut body_flip,
        )
        .unwrap();
        let last = body_flip.len() - 1;
        body_flip[last] ^= 0xFF;
        assert_eq!(refused(&body_flip, cluster, 1024), FrameError::BodyChecksum);
        let mut long = BytesMut::new();
        encode(
            &Body::Refused {
                reason: "y".repeat(100),
            },
            cluster,
            1 << 20,
            &mut long,
        )
        .unwrap();
        assert!(matches!(
            refused(&long, cluster, 16),
            FrameError::TooLong(_)
        ));
        // A version two steps away, with a correct header checksum.
        let mut far = frame.to_vec();
        far[4..6].copy_from_slice(&(PROTOCOL_VERSION + 2).to_le_bytes());
        let crc = crc32fast::hash(&far[0..24]);
        far[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            refused(&far, cluster, 1024),
            FrameError::Version(PROTOCOL_VERSION + 2)
        );
        // A body of garbage with correct checksums fails validation, not the process.
        let mut garbage = frame.to_vec();
        let junk = [0xFFu8; 24];
        garbage[16..20].copy_from_slice(&(junk.len() as u32).to_le_bytes());
        garbage[20..24].copy_from_slice(&crc32fast::hash(&junk).to_le_bytes());
        let crc = crc32fast::hash(&garbage[0..24]);
        garbage[24..28].copy_from_slice(&crc.to_le_bytes());
        garbage.truncate(HEADER_LEN);
        garbage.extend_from_slice(&junk);
        assert!(matches!(
            refused(&garbage, cluster, 1024),
            FrameError::Body(_)
        ));
    }

    #[test]
    fn adjacent_versions_are_compatible() {
        assert!(version_compatible(PROTOCOL_VERSION));
        assert!(version_compatible(PROTOCOL_VERSION + 1));
        assert!(!version_compatible(PROTOCOL_VERSION + 2));
    }

    /// A header announcing a body above the limit is refused from the header alone: the
    /// decoder does not wait for (and keep) the body.
    #[test]
    fn a_long_body_is_refused_at_its_header() {
        let cluster = cluster_id("test");
        let mut frame = BytesMut::new();
        encode(
            &Body::Refused {
                reason: "z".repeat(5000),
            },
            cluster,
            1 << 20,
            &mut frame,
        )
        .unwrap();
        let mut decoder = Decoder::new(cluster, handshake::HANDSHAKE_BODY_LEN_MAX);
        decoder.extend(&frame[..HEADER_LEN]);
        assert!(matches!(decoder.next_frame(), Err(FrameError::TooLong(_))));
        let mut raised = Decoder::new(cluster, handshake::HANDSHAKE_BODY_LEN_MAX);
        raised.set_body_len_max(1 << 20);
        raised.extend(&frame);
        assert!(matches!(
            raised.next_frame(),
            Ok(Some(Body::Refused { .. }))
        ));
    }

    /// A body above the limit is refused by the encoder, whole, so that no caller can emit a
    /// frame its peer must refuse; at the limit it goes.
    #[test]
    fn the_encoder_refuses_a_body_above_the_limit() {
        let cluster = cluster_id("test");
        let body = Body::Refused {
            reason: "r".repeat(1000),
        };
        let mut sized = BytesMut::new();
        encode(&body, cluster, usize::MAX, &mut sized).unwrap();
        let body_len = sized.len() - HEADER_LEN;
        let mut out = BytesMut::new();
        assert_eq!(
            encode(&body, cluster, body_len - 1, &mut out),
            Err(FrameError::TooLong(body_len))
        );
        assert!(out.is_empty(), "nothing written for a refused body");
        encode(&body, cluster, body_len, &mut out).unwrap();
        assert_eq!(out, sized);
    }

    /// The length bounds that producers cut by are upper bounds of what the items take in an
    /// encoded body, for small and large items alike.
    #[test]
    fn length_bounds_hold_for_encoded_bodies() {
        let encoded_len = |body: &Body| rkyv::to_bytes::<rancor::Error>(body).unwrap().len();
        let messages = sample()
            .into_iter()
            .find_map(|body| match body {
                Body::Forward { messages } => Some(messages),
                _ => None,
            })
            .expect("the samples hold a Forward");
        for (count, payload_len) in [(1, 0), (3, 1), (17, 9), (5, 100_000)] {
            let mut items = Vec::new();
            for n in 0..count {
                let mut item = messages[0].clone();
                item.sequence = n;
                if let Item::Publish { message, .. } = &mut item.item {
                    message.payload = vec![7; payload_len + n as usize];
                }
                items.push(item);
                items.extend(messages[1..].iter().cloned());
            }
            let bound: usize = items.iter().map(Forwarded::len_bound).sum();
            let body = Body::Forward { messages: items };
            assert!(encoded_len(&body) <= bound + 64, "{count} x {payload_len}");
        }
        let routes: Vec<Route> = (0..50)
            .map(|n| Route {
                filter: "f".repeat(n * 7),
                group: (n % 2 == 0).then(|| "g".repeat(n)),
            })
            .collect();
        let entries = vec![
            LogEntry::Replace {
                origin: 1,
                routes: routes.clone(),
            },
            LogEntry::Route {
                origin: 2,
                route: routes[9].clone(),
                added: true,
            },
            LogEntry::Setting {
                key: "k".repeat(30),
                value: "v".repeat(3),
            },
            LogEntry::Removed(3),
        ];
        let bound: usize = entries.iter().map(LogEntry::len_bound).sum();
        let body = Body::LogEntries {
            epoch: 1,
            first: 1,
            entries,
        };
        assert!(encoded_len(&body) <= bound + 64);
        let bound: usize = routes.iter().map(Route::len_bound).sum();
        let body = Body::RouteSync {
            sequence: 1,
            routes,
        };
        assert!(encoded_len(&body) <= bound + 64);
    }

    #[test]
    fn cutting_by_length_keeps_order_and_fits_the_budget() {
        let runs = cut_by_len([3usize, 4, 2, 9, 1, 1, 5], |&n| n, 6);
        assert_eq!(runs, [vec![3], vec![4, 2], vec![9], vec![1, 1], vec![5]]);
        assert!(cut_by_len(Vec::<usize>::new(), |&n| n, 6).is_empty());
    }
}
