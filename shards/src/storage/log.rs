//! The log writer: a state machine that turns appended records into I/O requests.
//!
//! Owns: the segment being appended to, the batch of frames not yet handed out, the order of
//! requests, the sync tickets and the durable point, and when to checkpoint.
//! Never: does I/O or reads a clock. The caller (the shard's reactor) takes the requests with
//! [`Log::take_requests`], carries them out in the order given on its own io_uring ring (each
//! after the ones before it have completed: a linked chain does this), and reports each
//! ticket with [`Log::on_synced`] once every request handed out with it has completed.
//!
//! Group commit: [`Log::append`] only encodes into memory; [`Log::flush`] (once per turn of
//! the event loop) hands out one write per segment touched and one `Sync` per segment, under
//! one [`Ticket`]. An acknowledgement that promises durability for record `lsn` may leave once
//! [`Log::durable_lsn`] `>= lsn`.
//!
//! Invariants, on which recovery relies:
//! - A segment gets its first byte only once every earlier segment's writes are synced (a
//!   seal: the writer waits for the tickets out before it creates the next segment), and a
//!   segment this log moves on from ends with a `SEGMENT_END` marker written before its seal.
//!   So a crash can tear only the last segment, and an earlier one that lost its end is seen.
//! - A checkpoint goes into a new segment; the segments it replaces are removed only once the
//!   ticket that synced the whole checkpoint has completed. So at any crash either the new
//!   checkpoint is complete and newest, or the old segments are all still there.
//! - `durable_lsn` is the end of a prefix: it covers ticket `t` only once every ticket before
//!   `t` has completed too, whatever order the syncs complete in.
//! - An I/O error is not recoverable here: after a failed `fdatasync` the kernel may have
//!   dropped the dirty pages, so a retry proves nothing (PostgreSQL's "fsyncgate"). The caller
//!   must stop using the log and the durable promises it backs.

use std::collections::{BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};

use super::compaction::{self, CompactionPolicy};
use super::record::{self, Record, RecordEncodeError};
use super::segment::{HEADER_LEN, SegmentHeader};
use super::state::State;

/// The number of a record: the first appended is 1. Counts from the log's opening, not
/// across restarts.
pub type Lsn = u64;

/// Names one flush's syncs; hand it back to [`Log::on_synced`] when they are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A new segment is cut before a record that would take the current one past this. A
    /// segment holds at least one record (or a checkpoint) whatever its size.
    pub segment_size_bytes: u64,
    pub compaction: CompactionPolicy,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_size_bytes: 64 * 1024 * 1024,
            compaction: CompactionPolicy::default(),
        }
    }
}

/// I/O for the caller to carry out, in order. Segments are named by sequence number (see
/// `segment::file_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create the segment's file, empty (truncating any file of that name).
    Create { segment: u64 },
    Write {
        segment: u64,
        offset: u64,
        bytes: Bytes,
    },
    /// `fdatasync` the segment; with `directory`, also fsync the directory, because the
    /// segment was created since its last sync and its name must be durable too.
    Sync { segment: u64, directory: bool },
    /// Remove the segment's file. Needs no sync: a removed segment that comes back after a
    /// crash is older than a complete checkpoint, and recovery ignores it.
    Remove { segment: u64 },
}

/// Work queued behind a seal, in order.
#[derive(Debug)]
enum Step {
    Create {
        segment: u64,
    },
    Write {
        segment: u64,
        offset: u64,
        bytes: Bytes,
        last_lsn: Lsn,
        checkpoint: bool,
    },
    /// Sync what is written and let nothing after this pass until it is durable.
    Seal,
}

#[derive(Debug)]
struct Outstanding {
    ticket: Ticket,
    lsn: Lsn,
    done: bool,
}

#[derive(Debug)]
pub struct Log {
    config: LogConfig,
    state: State,
    /// The last record appended.
    lsn: Lsn,
    /// The last record in a write handed out.
    flushed_lsn: Lsn,
    durable_lsn: Lsn,
    /// The segment appends go to, and where its next byte goes (after the batch).
    current: u64,
    current_end: u64,
    /// False only before the first segment this log creates: `current` then names the
    /// newest segment found on disk, which is never written to (it may be torn).
    current_is_ours: bool,
    /// Frames for `current` from `batch_offset` on, not handed out yet.
    batch: BytesMut,
    batch_offset: u64,
    /// Whether `batch` holds a checkpoint's head.
    batch_has_checkpoint: bool,
    steps: VecDeque<Step>,
    requests: Vec<Request>,
    /// Segments created whose directory entry no sync has covered yet.
    created: BTreeSet<u64>,
    outstanding: VecDeque<Outstanding>,
    next_ticket: u64,
    /// Steps wait until this ticket (and all before it) completed.
    barrier: Option<Ticket>,
    /// Segments on disk as far as this log knows, the current one included.
    segments: BTreeSet<u64>,
    /// Segments a checkpoint replaced, removed once `removal_gate` completes.
    replaced: BTreeSet<u64>,
    removal_gate: Option<Ticket>,
    /// The checkpoint in the batch or steps, not yet handed out with a ticket.
    checkpoint_unflushed: bool,
    appended_since_checkpoint_bytes: u64,
    checkpoint_bytes: u64,
}

impl Log {
    /// Opens the log over `state` (empty for a new log, or what recovery rebuilt) with the
    /// segments found on disk (`Recovery::segments`). Its first act is a checkpoint of `state`
    /// into a new segment, after which every existing segment is removed: so a torn tail or a
    /// damaged segment is never appended to, and whatever recovery accepted is written down
    /// whole before anything new.
    pub fn open(config: LogConfig, state: State, existing_segments: &[u64]) -> Self {
        assert!(config.segment_size_bytes > 0, "a segment size of zero");
        let segments: BTreeSet<u64> = existing_segments.iter().copied().collect();
        let mut log = Self {
            config,
            state,
            lsn: 0,
            flushed_lsn: 0,
            durable_lsn: 0,
            current: segments.last().copied().unwrap_or(0),
            current_end: 0,
            current_is_ours: false,
            batch: BytesMut::new(),
            batch_offset: 0,
            batch_has_checkpoint: false,
            steps: VecDeque::new(),
            requests: Vec::new(),
            created: BTreeSet::new(),
            outstanding: VecDeque::new(),
            next_ticket: 1,
            barrier: None,
            segments,
            replaced: BTreeSet::new(),
            removal_gate: None,
            checkpoint_unflushed: false,
            appended_since_checkpoint_bytes: 0,
            checkpoint_bytes: 0,
        };
        log.checkpoint();
        log
    }

    /// The live state the log describes, every appended record applied.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Appends a record to the batch and applies it to the state. Nothing reaches a disk until
    /// [`flush`](Self::flush). A record that cannot be encoded changes nothing.
    pub fn append(&mut self, record: &Record) -> Result<Lsn, RecordEncodeError> {
        let before = self.batch.len();
        let length = record::encode_frame(record, &mut self.batch)? as u64;
        let has_records = self.current_end > HEADER_LEN as u64;
        if has_records && self.current_end.saturating_add(length) > self.config.segment_size_bytes {
            let frame = self.batch.split_off(before);
            self.cut(false);
            self.batch.unsplit(frame);
        }
        self.current_end += length;
        self.appended_since_checkpoint_bytes += length;
        self.lsn += 1;
        // The result only counts damage on replay; the writer's records are what the shard did.
        self.state.apply(record);
        Ok(self.lsn)
    }

    /// Starts a new segment (a checkpoint of the state if `checkpoint`): the batch goes out to
    /// the current segment, a seal, then the new segment's creation; the new segment's header
    /// (and checkpoint) begins the batch.
    fn cut(&mut self, checkpoint: bool) {
        if self.current_is_ours {
            let length = record::encode_marker(record::SEGMENT_END, &mut self.batch);
            self.current_end += length as u64;
        }
        self.close_batch();
        if checkpoint {
            // A newer checkpoint supersedes one not yet handed out or synced: the segments
            // before it go only once the newer one is durable, or a crash could find neither.
            self.removal_gate = None;
            for step in &mut self.steps {
                if let Step::Write { checkpoint, .. } = step {
                    *checkpoint = false;
                }
            }
        }
        self.steps.push_back(Step::Seal);
        self.current += 1;
        self.steps.push_back(Step::Create {
            segment: self.current,
        });
        self.segments.insert(self.current);
        self.current_is_ours = true;
        self.batch_offset = 0;
        if checkpoint {
            let length = compaction::write_checkpoint(&self.state, self.current, &mut self.batch);
            self.current_end = length as u64;
            self.checkpoint_bytes = length as u64;
            self.appended_since_checkpoint_bytes = 0;
            self.batch_has_checkpoint = true;
            self.replaced = self.segments.range(..self.current).copied().collect();
        } else {
            let header = SegmentHeader {
                sequence: self.current,
                checkpoint: false,
            };
            self.batch.extend_from_slice(&header.encode());
            self.current_end = HEADER_LEN as u64;
        }
    }

    /// Moves the batch into a write step for the current segment.
    fn close_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let bytes = self.batch.split().freeze();
        let length = bytes.len() as u64;
        self.steps.push_back(Step::Write {
            segment: self.current,
            offset: self.batch_offset,
            bytes,
            last_lsn: self.lsn,
            checkpoint: std::mem::take(&mut self.batch_has_checkpoint),
        });
        self.batch_offset += length;
    }

    /// Writes the live state as a checkpoint into a new segment now, whatever the policy says;
    /// the segments before it are removed once it is synced.
    pub fn checkpoint(&mut self) {
        self.cut(true);
        self.checkpoint_unflushed = true;
    }

    /// Hands out what is appended (and, when the policy says so, a checkpoint) as requests,
    /// with the ticket that covers them; `None` when nothing needed a sync, or while the log
    /// waits for a seal (it then holds the batch until [`on_synced`](Self::on_synced)).
    pub fn flush(&mut self) -> Option<Ticket> {
        if !self.checkpoint_unflushed
            && self
                .config
                .compaction
                .is_due(self.appended_since_checkpoint_bytes, self.checkpoint_bytes)
        {
            self.checkpoint();
        }
        self.close_batch();
        if self.barrier.is_some() {
            return None;
        }
        let mut dirty = BTreeSet::new();
        let mut sealed = false;
        let mut checkpoint = false;
        while let Some(step) = self.steps.pop_front() {
            match step {
                Step::Create { segment } => {
                    self.requests.push(Request::Create { segment });
                    self.created.insert(segment);
                    dirty.insert(segment);
                }
                Step::Write {
                    segment,
                    offset,
                    bytes,
                    last_lsn,
                    checkpoint: has_checkpoint,
                } => {
                    self.requests.push(Request::Write {
                        segment,
                        offset,
                        bytes,
                    });
                    dirty.insert(segment);
                    self.flushed_lsn = self.flushed_lsn.max(last_lsn);
                    checkpoint |= has_checkpoint;
                }
                Step::Seal if dirty.is_empty() => {
                    // Nothing written in this flush: the seal waits for what is out, if any.
                    if let Some(last) = self.outstanding.back() {
                        self.barrier = Some(last.ticket);
                        return None;
                    }
                }
                Step::Seal => {
                    sealed = true;
                    break;
                }
            }
        }
        if dirty.is_empty() {
            return None;
        }
        for segment in dirty {
            let directory = self.created.remove(&segment);
            self.requests.push(Request::Sync { segment, directory });
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.outstanding.push_back(Outstanding {
            ticket,
            lsn: self.flushed_lsn,
            done: false,
        });
        if sealed {
            self.barrier = Some(ticket);
        }
        if checkpoint {
            self.removal_gate = Some(ticket);
            self.checkpoint_unflushed = false;
        }
        Some(ticket)
    }

    /// Every request handed out with `ticket` has completed. Advances the durable point over
    /// the tickets completed in order, lifts a seal, and releases the removal of segments a
    /// now durable checkpoint replaced. A ticket not out is a programmer error.
    pub fn on_synced(&mut self, ticket: Ticket) {
        let entry = self
            .outstanding
            .iter_mut()
            .find(|entry| entry.ticket == ticket);
        let Some(entry) = entry else {
            panic!("{ticket:?} is not out (completed twice, or not this log's)");
        };
        entry.done = true;
        while let Some(front) = self.outstanding.front().filter(|front| front.done) {
            self.durable_lsn = self.durable_lsn.max(front.lsn);
            let completed = front.ticket;
            self.outstanding.pop_front();
            if self.barrier.is_some_and(|barrier| barrier <= completed) {
                self.barrier = None;
            }
            if self.removal_gate.is_some_and(|gate| gate <= completed) {
                self.removal_gate = None;
                for segment in std::mem::take(&mut self.replaced).into_iter().rev() {
                    self.segments.remove(&segment);
                    self.requests.push(Request::Remove { segment });
                }
            }
        }
    }

    /// Moves the requests handed out since the last call into `requests`, in order.
    pub fn take_requests(&mut self, requests: &mut Vec<Request>) {
        requests.append(&mut self.requests);
    }

    /// The last record appended.
    pub fn appended_lsn(&self) -> Lsn {
        self.lsn
    }

    /// The last record that is durable: every record up to it is on disk and synced.
    pub fn durable_lsn(&self) -> Lsn {
        self.durable_lsn
    }

    /// Records appended since the last sync was handed out (still in memory).
    pub fn unflushed_count(&self) -> u64 {
        self.lsn - self.flushed_lsn
    }

    /// Whether everything appended and queued is handed out and every ticket has completed
    /// (what a clean shutdown flushes towards; removals may still be in `take_requests`).
    pub fn is_idle(&self) -> bool {
        self.batch.is_empty() && self.steps.is_empty() && self.outstanding.is_empty()
    }

    /// Whether the log waits for a seal before it hands out more (the caller need not flush
    /// until a ticket completes).
    pub fn is_waiting(&self) -> bool {
        self.barrier.is_some()
    }

    /// The segments on disk as far as the log knows (its removals may not have happened yet).
    pub fn segments(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.iter().copied()
    }
}
