//! Segments: the files of the log, each a header followed by frames.
//!
//! Owns: the segment header, segment file names, and walking a segment's frames.
//! Never: panics on a header or frame it reads (see `record`).
//!
//! Header (24 bytes, little-endian): the magic `SHMQLOG\n`, the format version (u16), flags
//! (u8: bit 0 marks a checkpoint segment), a reserved zero byte, the segment's sequence number
//! (u64, also in its file name), and a CRC32C of the 20 bytes before it. A future format
//! changes [`FORMAT_VERSION`]; a reader that meets an unknown version stops there and says so,
//! rather than guess.
//!
//! A checkpoint segment starts with the live state written as records, then a
//! `CHECKPOINT_END` marker frame; only then is it complete. Records appended after the
//! checkpoint follow the marker in the same segment. A segment the writer moved on from ends
//! with a `SEGMENT_END` marker (written before the seal), so that an earlier segment that
//! lost whole frames at its end cannot pass for a whole one.

use super::record::{self, Malformed};

pub const MAGIC: [u8; 8] = *b"SHMQLOG\n";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
const FLAG_CHECKPOINT: u8 = 1;

/// What a segment's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub sequence: u64,
    pub checkpoint: bool,
}

/// Why a segment's header is not one this code wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes (a segment created just before a crash).
    Truncated,
    Magic,
    Checksum,
    /// A format this code does not know (a newer one, or a flipped bit that kept the CRC).
    Version(u16),
    /// Flag bits this code does not know.
    Flags(u8),
    /// The header names another sequence number than the file name.
    Sequence {
        header: u64,
    },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("segment header cut short"),
            Self::Magic => f.write_str("not a shardmq log segment (bad magic)"),
            Self::Checksum => f.write_str("segment header fails its checksum"),
            Self::Version(version) => write!(f, "unknown segment format version {version}"),
            Self::Flags(flags) => write!(f, "unknown segment flags {flags:#04x}"),
            Self::Sequence { header } => {
                write!(f, "segment header names sequence {header}, not its file's")
            }
        }
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut header = [0; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[10] = if self.checkpoint { FLAG_CHECKPOINT } else { 0 };
        header[12..20].copy_from_slice(&self.sequence.to_le_bytes());
        let crc = crc32c::crc32c(&header[..20]);
        header[20..].copy_from_slice(&crc.to_le_bytes());
        header
    }

    /// Reads the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|header| header.try_into().ok())
            .ok_or(HeaderError::Truncated)?;
        if header[..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let crc = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
        if crc32c::crc32c(&header[..20]) != crc {
            return Err(HeaderError::Checksum);
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        if header[10] & !FLAG_CHECKPOINT != 0 || header[11] != 0 {
            return Err(HeaderError::Flags(header[10]));
        }
        let mut sequence = [0; 8];
        sequence.copy_from_slice(&header[12..20]);
        Ok(Self {
            sequence: u64::from_le_bytes(sequence),
            checkpoint: header[10] & FLAG_CHECKPOINT != 0,
        })
    }
}

/// The file name of segment `sequence`: zero-padded so that names sort as numbers do.
pub fn file_name(sequence: u64) -> String {
    format!("{sequence:020}.log")
}

/// The sequence number a segment file name carries, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One frame of a segment: where it starts and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame<'a> {
    Record {
        kind: u8,
        body: &'a [u8],
    },
    /// The end of a checkpoint's records.
    CheckpointEnd,
    /// The end of a sealed segment: nothing follows it.
    SegmentEnd,
}

/// Walks the frames after a segment's header; yields `(offset, frame)` until the end of the
/// bytes or the first frame that fails its checks, which it yields as an error and then stops.
pub(super) struct Frames<'a> {
    bytes: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Frames<'a> {
    pub(super) fn new(segment: &'a [u8]) -> Self {
        Self {
            bytes: segment,
            offset: HEADER_LEN,
            failed: false,
        }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = (usize, Result<Frame<'a>, Malformed>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.bytes.len() {
            return None;
        }
        let offset = self.offset;
        let rest = self.bytes.get(offset..)?;
        match record::read_frame(rest) {
            Ok((kind, body, length)) => {
                self.offset = offset.saturating_add(length);
                let frame = match (kind, body.is_empty()) {
                    (record::CHECKPOINT_END, true) => Frame::CheckpointEnd,
                    (record::SEGMENT_END, true) => Frame::SegmentEnd,
                    (record::CHECKPOINT_END | record::SEGMENT_END, false) => {
                        self.failed = true;
                        return Some((offset, Err(Malformed::Body("a marker with a body"))));
                    }
                    _ => Frame::Record { kind, body },
                };
                Some((offset, Ok(frame)))
            }
            Err(error) => {
                self.failed = true;
                Some((offset, Err(error)))
            }
        }
    }
}

/// Whether `segment` (whose header says it is checkpoint `sequence`) holds a whole checkpoint:
/// every frame up to a `CHECKPOINT_END` passes its checks. Checks checksums, not bodies.
pub(super) fn checkpoint_is_complete(segment: &[u8], sequence: u64) -> bool {
    let header = SegmentHeader::decode(segment);
    if header
        != Ok(SegmentHeader {
            sequence,
            checkpoint: true,
        })
    {
        return false;
    }
    for (_, frame) in Frames::new(segment) {
        match frame {
            Ok(Frame::CheckpointEnd) => return true,
            Ok(Frame::Record { .. }) => {}
            Ok(Frame::SegmentEnd) | Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_every_damage_is_named() {
        for checkpoint in [false, true] {
            let header = SegmentHeader {
                sequence: 0x0102_0304_0506_0708,
                checkpoint,
            };
            assert_eq!(SegmentHeader::decode(&header.encode()), Ok(header));
        }
        let good = SegmentHeader {
            sequence: 7,
            checkpoint: true,
        }
        .encode();
        assert_eq!(
            SegmentHeader::decode(&good[..HEADER_LEN - 1]),
            Err(HeaderError::Truncated)
        );
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::Magic));
        for byte in 8..HEADER_LEN {
            let mut flipped = good;
            flipped[byte] ^= 0x10;
            assert_eq!(
                SegmentHeader::decode(&flipped),
                Err(HeaderError::Checksum),
                "byte {byte}"
            );
        }
        // A future version with a valid checksum is named as such, not as damage.
        let mut future = good;
        future[8..10].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32c::crc32c(&future[..20]);
        future[20..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(SegmentHeader::decode(&future), Err(HeaderError::Version(2)));
    }

    #[test]
    fn file_names_carry_the_sequence_and_sort_as_numbers() {
        assert_eq!(file_name(42), "00000000000000000042.log");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert!(file_name(9) < file_name(10));
        for other in [
            "42.log",
            "0000000000000000004x.log",
            "00000000000000000042.tmp",
            "",
        ] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
    }
}
