//! Compaction: when the log is rewritten as a checkpoint of its live state, and the bytes of
//! that checkpoint.
//!
//! Owns: [`CompactionPolicy`] and the encoding of a checkpoint segment's head.
//! Never: decides the order of the I/O (that is [`super::Log`]'s, which writes the checkpoint
//! into a new segment, syncs it, and only then removes the segments it replaces).
//!
//! The policy is the one Redis uses for its append-only file rewrite: compact once the bytes
//! appended since the last checkpoint reach `ratio` times the size of that checkpoint (and at
//! least `min_bytes`). Each checkpoint then costs at most `1 / ratio` of the bytes appended
//! before it (write amplification `1 + 1/ratio`), and the log on disk stays within about
//! `(1 + ratio)` times the live state plus `min_bytes`, which bounds recovery time.

use bytes::BytesMut;

use super::record::{self, CHECKPOINT_END};
use super::segment::SegmentHeader;
use super::state::State;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Compact when the bytes appended since the last checkpoint reach this many times the
    /// checkpoint's size.
    pub ratio: u64,
    /// ... and at least this many bytes, so that a small state is not rewritten constantly.
    pub min_bytes: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            ratio: 2,
            min_bytes: 64 * 1024 * 1024,
        }
    }
}

impl CompactionPolicy {
    pub fn is_due(&self, appended_bytes: u64, checkpoint_bytes: u64) -> bool {
        appended_bytes
            >= self
                .min_bytes
                .max(self.ratio.saturating_mul(checkpoint_bytes))
    }
}

/// Appends the head of checkpoint segment `sequence` to `out`: its header, the records of
/// `state`, and the `CHECKPOINT_END` marker. Returns the bytes written.
pub(super) fn write_checkpoint(state: &State, sequence: u64, out: &mut BytesMut) -> usize {
    let start = out.len();
    out.extend_from_slice(
        &SegmentHeader {
            sequence,
            checkpoint: true,
        }
        .encode(),
    );
    state.for_each_record(|record| {
        // Every part of the state came from a record that encoded, and a checkpoint record
        // carries no more than the record it came from, so this cannot fail but by a bug.
        if let Err(error) = record::encode_frame(&record, out) {
            panic!("a checkpoint record does not encode ({error:?}): {record:?}");
        }
    });
    record::encode_marker(CHECKPOINT_END, out);
    out.len() - start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_is_due_at_the_ratio_and_never_below_the_minimum() {
        let policy = CompactionPolicy {
            ratio: 2,
            min_bytes: 100,
        };
        assert!(!policy.is_due(99, 0));
        assert!(policy.is_due(100, 0));
        assert!(!policy.is_due(199, 100));
        assert!(policy.is_due(200, 100));
        assert!(!policy.is_due(u64::MAX - 1, u64::MAX));
    }
}
