//! The durable log of one shard: per-shard append-only segments (DESIGN.md §5), sans-IO.
//!
//! Owns: the record format ([`record`]), segment headers and names ([`segment`]), the writer
//! state machine ([`log`]), replay at start ([`recovery`]), the live-state model that replay
//! builds and checkpoints write out ([`state`]), and when to compact ([`compaction`]).
//! Never: opens, reads, writes, syncs or removes a file, or reads a clock. Like quinn-proto,
//! it says what I/O must happen ([`Request`]) and is told when it has ([`Log::on_synced`]);
//! the shard's reactor carries the requests out on its io_uring ring, and at start the caller
//! maps the segment files and hands their bytes to [`recover`].
//!
//! The shard drives it (`shard/durable.rs`) and the binary carries out its I/O: see
//! "Storage" in ARCHITECTURE.md.

pub mod compaction;
pub mod log;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod state;

#[cfg(test)]
mod tests;

pub use compaction::CompactionPolicy;
pub use log::{Log, LogConfig, Lsn, Request, Ticket};
pub use record::{Malformed, RECORD_LENGTH_MAX, Record, RecordEncodeError, Will};
pub use recovery::{Recovery, Segment, Stop, StopReason, recover, recover_state};
pub use segment::{HeaderError, SegmentHeader, file_name, parse_file_name};
pub use state::{PendingWill, SessionState, State, StateLimits};
