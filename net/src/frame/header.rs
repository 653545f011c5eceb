//! The frame header: its fixed 32-byte layout, the protocol version window, the cluster
//! identifier, and the checks a header must pass before any byte of its body is kept.
//!
//! Never: looks at a body. A header that fails a check is a [`FrameError`] that ends the link.
//!
//! Header, little-endian:
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..4   | magic `SMQC` |
//! | 4..6   | protocol version of the sender |
//! | 6      | body kind (the [`Body`](super::Body) variant, for logs and quick refusal) |
//! | 7      | reserved, zero |
//! | 8..16  | cluster identifier: FNV-1a of the cluster name |
//! | 16..20 | body length |
//! | 20..24 | CRC-32 of the body |
//! | 24..28 | CRC-32 of bytes 0..24 |
//! | 28..32 | reserved, zero (keeps the header a multiple of rkyv's 16-byte alignment) |

use super::FrameError;

/// The frame protocol this build speaks. A node accepts a peer whose version is within one of
/// its own, so that a rolling upgrade can run a cluster of two adjacent versions; the link then
/// speaks the lower of the two: frame kinds newer than the peer's version are not sent to it
/// (version 2 added `NodeQuery` and `NodeAnswer`, see [`NODE_QUERY_VERSION`](super::NODE_QUERY_VERSION);
/// version 3 the data-link items `Replicate` and `ReplicaOffer`, see
/// [`REPLICATION_VERSION`](super::REPLICATION_VERSION); version 4 the item `Disown`, see
/// [`FENCE_VERSION`](super::FENCE_VERSION)).
pub const PROTOCOL_VERSION: u16 = 4;

pub const MAGIC: [u8; 4] = *b"SMQC";
pub const HEADER_LEN: usize = 32;

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
