//! Cluster frames: what nodes say to each other on their links.
//!
//! Owns: the frame format (a fixed 32-byte header checked before anything else, then an rkyv
//! body), the bodies ([`Body`]) and, in [`handshake`], the link handshake that authenticates
//! both ends of a link before anything else crosses it.
//! Never: performs I/O or reads a clock. A peer's bytes never panic a node: every failure is a
//! [`FrameError`] that ends that link and nothing else.
//!
//! The files follow the format's seams: `header.rs` (the header's layout, the protocol version
//! window, the cluster identifier and the checks that need no body), `body.rs` (the body
//! types, and log entries as bytes outside a frame), `decoder.rs` (the [`Decoder`] that splits
//! a link's stream into checked frames, and body validation), `encode.rs` ([`encode`], and the
//! length bounds that producers cut long bodies by), and `handshake.rs`. Every public item is
//! re-exported here, so that callers name `frame::Body`, `frame::encode` and so on.

mod body;
mod decoder;
mod encode;
pub mod handshake;
mod header;
#[cfg(test)]
mod tests;

pub use body::{
    Body, BytesAsVec, FENCE_VERSION, Forwarded, Hello, Item, LogEntry, Member, NODE_ERROR_LEN_MAX,
    NODE_QUERY_LEN_MAX, NODE_QUERY_VERSION, NodeId, Purpose, REPLICATION_VERSION, Role, Route,
    RouteDelta, Welcome, WireMessage, decode_entries, encode_entries,
};
pub use decoder::{Decoder, decode_body};
pub use encode::{FRAME_BUDGET_DIVISOR, cut_by_len, encode, node_answer_len_bound};
pub use header::{HEADER_LEN, Header, MAGIC, PROTOCOL_VERSION, cluster_id, version_compatible};

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
