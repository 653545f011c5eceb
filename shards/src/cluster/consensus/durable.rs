//! The cores' Raft state on disk: hard state, log and snapshot (which carries the registry),
//! as segment files under `DIR/raft/`, written through file requests the node layer hands to
//! the reactor, and read back at start.
//!
//! Owns: the file format (frames of a length, its complement, a CRC32C and a kind, as the
//! shard's log `storage/record.rs` frames its records, plus the complement that tells a
//! damaged length from an unwritten one), [`recover`] (segments' bytes to a validated Raft
//! state), and [`Disk`], the writer: what raft-rs hands over in a ready is staged, written as
//! one frame per batch followed by an `fdatasync`, and reported done by the reactor's
//! completion; at a checkpoint the whole state goes into a new segment and the old one is
//! removed, so the files stay bounded.
//! Never: does I/O (it emits [`RaftFileOp`]s and takes their completions), panics on what it
//! reads (every byte of a file is hostile: lengths are checked, protobuf decode errors are
//! errors, and the state is checked against what raft-rs would panic on before raft-rs sees it).
//! Invariants: the ops of one queue run one after another, so a frame is written only once
//! every earlier one is synced: at a crash only the last frame of the last segment can be torn.
//! A new segment becomes the one replayed only once its checkpoint is synced and its name is
//! in the directory, and the old segment is removed (durably) before anything is appended to
//! the new one. Completions come back in the order the calls were made.
//!
//! Layout of a segment `{sequence:020}.raft`: a checkpoint frame (the sequence, the Raft
//! identifier, the snapshot, the entries after it, the hard state), then batch frames (each
//! a snapshot, entries and a hard state, any of them absent), applied in order: a snapshot
//! replaces the log, entries replace the log from their first index on, a hard state replaces
//! the hard state.

use std::collections::VecDeque;
use std::path::PathBuf;

use bytes::{BufMut, Bytes, BytesMut};
use protobuf::Message as _;
use raft::Storage;
use raft::prelude::{Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use tracing::warn;

use super::store::Store;

/// The folder under the data directory that holds the Raft segments.
pub const RAFT_DIRECTORY: &str = "raft";

/// The file a core wrote its Raft state to at a clean shutdown before the state was durable;
/// read once at start (an upgrade), removed once the durable store holds the state.
pub const LEGACY_STATE_FILE: &str = "raft.state";

/// Bytes before a frame's kind byte: the length, its complement and the checksum. The
/// complement tells a damaged length (refused) from one a crash left unwritten (zeros).
const FRAME_HEADER_LEN: usize = 12;

/// The longest frame body (kind byte included) written or read. The largest frame is a
/// checkpoint: the registry (about a hundred bytes a member) and the entries after the last
/// applied one; 64 MiB is room for hundreds of thousands of members. A length above it is
/// corruption, so a flipped bit never makes recovery read gigabytes.
pub const FRAME_LENGTH_MAX: usize = 64 << 20;

/// The largest segment file read at start; a larger one is refused (a checkpoint keeps
/// segments near `CHECKPOINT_MIN_BYTES` plus one checkpoint).
pub const SEGMENT_BYTES_MAX: u64 = 4 * FRAME_LENGTH_MAX as u64;

/// The most segment files a store holds: the writer keeps one, and two for the moment of a
/// checkpoint (the old one is removed once the new one is synced). More is not this store's
/// doing, and recovery refuses it rather than reading them all.
pub const SEGMENTS_MAX: usize = 4;

/// The most bytes all segments together may hold at start (two full segments: the moment of
/// a checkpoint); recovery reads no more than this into memory.
pub const STORE_BYTES_MAX: u64 = 2 * SEGMENT_BYTES_MAX;

/// The most log entries recovery keeps after the snapshot. The store holds the entries
/// raft-rs has not compacted (about a thousand behind the applied one, and what is not yet
/// applied), far fewer than this; the bound keeps a crafted store (a frame of empty entries
/// costs a few bytes each on disk and far more in memory) from taking the memory.
pub const ENTRIES_MAX: usize = 1 << 20;

fn too_many_entries() -> String {
    format!("the stored Raft log holds more than {ENTRIES_MAX} entries: not what this store writes")
}

/// A checkpoint is written once the frames appended since the last one reach this many
/// bytes and four times the checkpoint's size (so its cost stays a fraction of the appends).
const CHECKPOINT_MIN_BYTES: u64 = 1 << 20;

const KIND_CHECKPOINT: u8 = 1;
const KIND_BATCH: u8 = 2;

const ITEM_SNAPSHOT: u8 = 1;
const ITEM_ENTRY: u8 = 2;
const ITEM_HARD_STATE: u8 = 3;

/// One file operation of the Raft store, for the reactor's file queue. Paths are relative to
/// the data directory; `file` is one of the store's two file slots (0 or 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftFileOp {
    /// Opens `path` for writing (created when `create`, never truncated) into slot `file`.
    Open {
        file: u8,
        path: PathBuf,
        create: bool,
    },
    /// Writes all of `bytes` at `offset`.
    Write {
        file: u8,
        offset: u64,
        bytes: Bytes,
    },
    /// fdatasync.
    Datasync {
        file: u8,
    },
    /// Makes created and removed names in the directory `path` durable.
    SyncDirectory {
        path: PathBuf,
    },
    Close {
        file: u8,
    },
    Remove {
        path: PathBuf,
    },
}

/// Ops that run in order on the store's file queue; `tag` names their completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftFileCall {
    pub tag: u64,
    pub ops: Vec<RaftFileOp>,
}

/// What the data directory holds of the Raft state at start, read by the binary before the
/// shard runs: the segment files (by sequence, from [`parse_segment_name`]) and the old
/// shutdown file, if there is one.
#[derive(Debug, Default, Clone)]
pub struct RaftStoreFiles {
    pub segments: Vec<(u64, Vec<u8>)>,
    pub legacy: Option<Vec<u8>>,
}

/// The sequence number of a segment file's name, `None` for any other name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".raft")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_path(sequence: u64) -> PathBuf {
    PathBuf::from(RAFT_DIRECTORY).join(format!("{sequence:020}.raft"))
}

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadFrame {
    /// The bytes end inside the frame.
    Truncated,
    /// The header is zeros, wholly or in part: bytes a crash left unwritten.
    Hole,
    /// The length and its complement disagree, or the length is above the limit: no write
    /// produces that, a crash neither.
    Damaged,
    Checksum,
}

/// Appends a frame of `kind` whose body `fill` writes; returns its length.
fn encode_frame(kind: u8, out: &mut BytesMut, fill: impl FnOnce(&mut BytesMut)) -> usize {
    let start = out.len();
    out.put_bytes(0, FRAME_HEADER_LEN);
    out.put_u8(kind);
    fill(out);
    let length = (out.len() - start - FRAME_HEADER_LEN) as u32;
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&length.to_le_bytes()),
        &out[start + FRAME_HEADER_LEN..],
    );
    out[start..start + 4].copy_from_slice(&length.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&(!length).to_le_bytes());
    out[start + 8..start + FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// One frame at the start of `bytes`: its kind, its body and its whole length.
fn read_frame(bytes: &[u8]) -> Result<(u8, &[u8], usize), BadFrame> {
    let (header, rest) = bytes
        .split_first_chunk::<FRAME_HEADER_LEN>()
        .ok_or(BadFrame::Truncated)?;
    let word = |at: usize| {
        header
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes)
    };
    let (length, complement, crc) = (word(0), word(4), word(8));
    if length != !complement {
        return Err(if length == 0 || complement == 0 {
            BadFrame::Hole
        } else {
            BadFrame::Damaged
        });
    }
    let length = length as usize;
    if length == 0 || length > FRAME_LENGTH_MAX {
        return Err(BadFrame::Damaged);
    }
    let record = rest.get(..length).ok_or(BadFrame::Truncated)?;
    if crc32c::crc32c_append(crc32c::crc32c(&word(0).to_le_bytes()), record) != crc {
        return Err(BadFrame::Checksum);
    }
    let (&kind, body) = record.split_first().ok_or(BadFrame::Damaged)?;
    Ok((kind, body, FRAME_HEADER_LEN + length))
}

/// Whether a bad frame at `position` can be a write a crash cut short: it must be the file's
/// last frame. Every frame but the last was synced before the next was written, so damage
/// with a frame after it is damage to synced data. A frame cut short or failing its checksum
/// must run to the end of the file (its length is checked by its complement); a header left
/// unwritten leaves at most one frame's bytes after it.
fn is_torn_tail(bytes: &[u8], position: usize, bad: BadFrame) -> bool {
    let rest = bytes.len().saturating_sub(position);
    match bad {
        BadFrame::Truncated => true,
        BadFrame::Hole => rest <= FRAME_HEADER_LEN + FRAME_LENGTH_MAX,
        BadFrame::Damaged => false,
        BadFrame::Checksum => {
            let declared = bytes
                .get(position..position + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, |b| u32::from_le_bytes(b) as usize);
            FRAME_HEADER_LEN + declared >= rest
        }
    }
}

fn put_item(out: &mut BytesMut, kind: u8, bytes: &[u8]) {
    out.put_u8(kind);
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

/// What one batch or checkpoint frame holds, in the order it applies.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Batch {
    pub(super) snapshot: Option<Snapshot>,
    pub(super) entries: Vec<Entry>,
    pub(super) hard: Option<HardState>,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard.is_none()
    }

    fn encode(&self, out: &mut BytesMut) -> Result<(), String> {
        let error = |e: protobuf::ProtobufError| format!("a Raft record does not encode: {e}");
        if let Some(snapshot) = &self.snapshot {
            put_item(
                out,
                ITEM_SNAPSHOT,
                &snapshot.write_to_bytes().map_err(error)?,
            );
        }
        for entry in &self.entries {
            put_item(out, ITEM_ENTRY, &entry.write_to_bytes().map_err(error)?);
        }
        if let Some(hard) = &self.hard {
            put_item(out, ITEM_HARD_STATE, &hard.write_to_bytes().map_err(error)?);
        }
        Ok(())
    }

    /// Reads the items of a frame body; the order is the one `encode` writes.
    fn decode(mut body: &[u8]) -> Result<Self, String> {
        let mut batch = Self::default();
        while let Some((&kind, rest)) = body.split_first() {
            let (length, rest) = rest
                .split_first_chunk::<4>()
                .ok_or("a Raft record item is cut short")?;
            let length = u32::from_le_bytes(*length) as usize;
            let (bytes, after) = rest
                .split_at_checked(length)
                .ok_or("a Raft record item runs past its frame")?;
            body = after;
            let order_error = || "Raft record items are out of order".to_string();
            match kind {
                ITEM_SNAPSHOT => {
                    if batch.snapshot.is_some() || !batch.entries.is_empty() || batch.hard.is_some()
                    {
                        return Err(order_error());
                    }
                    batch.snapshot = Some(
                        Snapshot::parse_from_bytes(bytes)
                            .map_err(|e| format!("a stored Raft snapshot does not decode: {e}"))?,
                    );
                }
                ITEM_ENTRY => {
                    if batch.hard.is_some() {
                        return Err(order_error());
                    }
                    if batch.entries.len() >= ENTRIES_MAX {
                        return Err(too_many_entries());
                    }
                    batch.entries.push(
                        Entry::parse_from_bytes(bytes)
                            .map_err(|e| format!("a stored Raft entry does not decode: {e}"))?,
                    );
                }
                ITEM_HARD_STATE => {
                    if batch.hard.is_some() {
                        return Err(order_error());
                    }
                    batch.hard =
                        Some(HardState::parse_from_bytes(bytes).map_err(|e| {
                            format!("a stored Raft hard state does not decode: {e}")
                        })?);
                }
                other => return Err(format!("unknown Raft record item {other}")),
            }
        }
        Ok(batch)
    }
}

/// The Raft state the segments hold, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    /// The Raft identifier the state belongs to.
    pub id: u64,
    pub snapshot: Snapshot,
    /// The entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
    pub hard: HardState,
    /// The segment replayed.
    pub sequence: u64,
    /// Bytes cut from the end of the segment (a write a crash cut short).
    pub torn_bytes: usize,
}

impl Recovered {
    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    /// Applies one frame's items (the state is checked as a whole afterwards; here only
    /// what the next step relies on).
    fn apply(&mut self, batch: Batch) -> Result<(), String> {
        if let Some(snapshot) = batch.snapshot {
            let index = snapshot.get_metadata().index;
            if index < self.snapshot.get_metadata().index {
                return Err(format!(
                    "a stored Raft snapshot at {index} is older than the one before it"
                ));
            }
            self.snapshot = snapshot;
            self.entries.clear();
            self.hard.commit = self.hard.commit.max(index);
        }
        if let Some(first) = batch.entries.first() {
            let floor = self.snapshot.get_metadata().index;
            if first.index <= floor || first.index > self.last_index().saturating_add(1) {
                return Err(format!(
                    "stored Raft entries from {} do not follow the log (snapshot {floor}, last {})",
                    first.index,
                    self.last_index()
                ));
            }
            let keep = (first.index - floor - 1) as usize;
            self.entries.truncate(keep);
            if self.entries.len().saturating_add(batch.entries.len()) > ENTRIES_MAX {
                return Err(too_many_entries());
            }
            self.entries.extend(batch.entries);
        }
        if let Some(hard) = batch.hard {
            self.hard = hard;
        }
        Ok(())
    }

    /// What raft-rs relies on and would panic on: contiguous entries after the snapshot with
    /// terms that never fall, a commit index inside the log, a term no lower than the log's.
    fn check(&mut self) -> Result<(), String> {
        let meta = self.snapshot.get_metadata();
        let (mut index, mut term) = (meta.index, meta.term);
        for entry in &self.entries {
            if Some(entry.index) != index.checked_add(1) || entry.term < term {
                return Err(format!(
                    "stored Raft entry {} (term {}) does not follow {index} (term {term})",
                    entry.index, entry.term
                ));
            }
            (index, term) = (entry.index, entry.term);
        }
        self.hard.commit = self.hard.commit.max(meta.index);
        if self.hard.commit > index {
            return Err(format!(
                "the stored Raft commit index {} is beyond the last stored entry {index}: synced entries are missing",
                self.hard.commit
            ));
        }
        if self.hard.term < term {
            return Err(format!(
                "the stored Raft term {} is below the last entry's term {term}",
                self.hard.term
            ));
        }
        Ok(())
    }

    /// raft-rs's storage holding this state.
    pub(super) fn into_store(self) -> Result<Store, String> {
        let meta = self.snapshot.get_metadata().clone();
        let registry = self.snapshot.get_data().to_vec();
        let mem = MemStorage::new();
        {
            let mut core = mem.wl();
            if meta.index > 0 {
                core.apply_snapshot(self.snapshot)
                    .map_err(|e| format!("the stored Raft snapshot is not taken: {e}"))?;
            }
            // Checked contiguous after the snapshot, which `append` would panic on otherwise.
            core.append(&self.entries)
                .map_err(|e| format!("the stored Raft entries are not taken: {e}"))?;
            core.set_hardstate(self.hard);
        }
        Ok(Store {
            mem,
            applied: meta.index,
            applied_term: meta.term,
            conf: meta.get_conf_state().clone(),
            registry,
        })
    }
}

/// How the segments read at start turned out.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The state, if any segment holds a complete checkpoint.
    pub state: Option<Recovered>,
    /// Every segment found (all are replaced by a new checkpoint at start).
    pub sequences: Vec<u64>,
    /// Segments newer than the replayed one whose checkpoint a crash cut short.
    pub skipped: Vec<u64>,
}

/// Reads the segments (any order) into the state they hold. Refuses, with the reason, what a
/// crash cannot explain: a damaged frame with frames after it, a checkpoint of another
/// sequence, records that do not follow each other, a commit index beyond the log.
pub fn recover(segments: &[(u64, Vec<u8>)]) -> Result<Recovery, String> {
    let mut sorted: Vec<&(u64, Vec<u8>)> = segments.iter().collect();
    sorted.sort_by_key(|(sequence, _)| *sequence);
    let sequences: Vec<u64> = sorted.iter().map(|(s, _)| *s).collect();
    let mut skipped = Vec::new();
    for (sequence, bytes) in sorted.into_iter().rev() {
        let path = segment_path(*sequence);
        let (kind, body, mut position) = match read_frame(bytes) {
            Ok(frame) => frame,
            Err(bad)
                if is_torn_tail(bytes, 0, bad)
                    && (*sequence == 1 || sequences.iter().any(|older| older < sequence)) =>
            {
                // A crash while the checkpoint was written: the segment before holds the state
                // (it is removed only once this checkpoint is synced), or this was the store's
                // first segment and there was no state yet.
                skipped.push(*sequence);
                continue;
            }
            Err(bad) if is_torn_tail(bytes, 0, bad) => {
                // No segment before it: a crash cannot explain a lost checkpoint here.
                return Err(format!(
                    "{}: the checkpoint is unreadable ({bad:?}) and no earlier segment holds the state: synced Raft state is damaged",
                    path.display()
                ));
            }
            Err(bad) => {
                return Err(format!(
                    "{}: the checkpoint is damaged ({bad:?}) and frames follow it: synced Raft state is damaged",
                    path.display()
                ));
            }
        };
        if kind != KIND_CHECKPOINT {
            return Err(format!(
                "{}: the segment does not start with a checkpoint",
                path.display()
            ));
        }
        let (header, items) = body
            .split_first_chunk::<16>()
            .ok_or_else(|| format!("{}: the checkpoint is cut short", path.display()))?;
        let (stored_sequence, id) = header.split_at(8);
        let stored_sequence = u64::from_le_bytes(stored_sequence.try_into().unwrap_or_default());
        let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
        if stored_sequence != *sequence {
            return Err(format!(
                "{}: the checkpoint is of segment {stored_sequence}: a segment is missing or was renamed",
                path.display()
            ));
        }
        let checkpoint = Batch::decode(items).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut state = Recovered {
            id,
            snapshot: checkpoint.snapshot.clone().unwrap_or_default(),
            entries: Vec::new(),
            hard: HardState::default(),
            sequence: *sequence,
            torn_bytes: 0,
        };
        state
            .apply(Batch {
                snapshot: None,
                ..checkpoint
            })
            .map_err(|e| format!("{}: {e}", path.display()))?;
        while position < bytes.len() {
            let rest = bytes.get(position..).unwrap_or_default();
            match read_frame(rest) {
                Ok((KIND_BATCH, body, length)) => {
                    let batch =
                        Batch::decode(body).map_err(|e| format!("{}: {e}", path.display()))?;
                    state
                        .apply(batch)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    position += length;
                }
                Ok((kind, _, _)) => {
                    return Err(format!(
                        "{}: unexpected frame kind {kind} at byte {position}",
                        path.display()
                    ));
                }
                Err(bad) if is_torn_tail(bytes, position, bad) => {
                    state.torn_bytes = bytes.len() - position;
                    break;
                }
                Err(bad) => {
                    return Err(format!(
                        "{}: the frame at byte {position} is damaged ({bad:?}) and frames follow it: synced Raft state is damaged",
                        path.display()
                    ));
                }
            }
        }
        state
            .check()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        skipped.reverse();
        return Ok(Recovery {
            state: Some(state),
            sequences,
            skipped,
        });
    }
    skipped.reverse();
    Ok(Recovery {
        state: None,
        sequences,
        skipped,
    })
}

/// A call made and not completed yet: the ready (of raft-rs's current node) it persists.
#[derive(Debug)]
struct Pending {
    tag: u64,
    ready: Option<u64>,
}

/// The writer of the Raft segments (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct Disk {
    /// The segment appended to (0: none yet).
    sequence: u64,
    /// The next segment's sequence.
    next_sequence: u64,
    /// Where the next frame goes in the segment.
    offset: u64,
    since_checkpoint: u64,
    checkpoint_len: u64,
    /// Items staged for the next batch frame, and the last ready they cover.
    staged: Batch,
    staged_ready: Option<u64>,
    /// A checkpoint (of the whole state) is due at the next flush.
    checkpoint_due: bool,
    /// The segment files to remove at the next checkpoint (or cleanup).
    obsolete: Vec<u64>,
    /// The old shutdown file is to be removed once the store holds the state.
    legacy: bool,
    pending: VecDeque<Pending>,
    next_tag: u64,
    calls: Vec<RaftFileCall>,
    /// The first I/O error: nothing is written after it.
    pub(super) failed: Option<String>,
}

fn slot(sequence: u64) -> u8 {
    (sequence % 2) as u8
}

impl Disk {
    /// A writer after start: `recovery`'s segments are replaced by a new one at the first
    /// checkpoint; `legacy` says whether the old shutdown file is there to remove.
    pub(super) fn new(recovery: &Recovery, legacy: bool) -> Self {
        let newest = recovery.sequences.iter().copied().max().unwrap_or(0);
        Self {
            next_sequence: newest + 1,
            obsolete: recovery.sequences.clone(),
            legacy,
            next_tag: 1,
            ..Self::default()
        }
    }

    /// The Raft node was made anew (founded, joined, recovered): its readies are numbered
    /// from 1 again, and the whole state goes into a new checkpoint.
    pub(super) fn new_node(&mut self) {
        for pending in &mut self.pending {
            pending.ready = None;
        }
        self.staged = Batch::default();
        self.staged_ready = None;
        self.checkpoint_due = true;
    }

    /// Stages what ready `number` asks to persist. Returns whether it is persisted already
    /// (nothing of it nor before it waits), so raft-rs can be told at once.
    pub(super) fn stage(&mut self, batch: Batch, number: u64) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if !batch.is_empty() {
            if let Some(snapshot) = batch.snapshot {
                // A snapshot replaces whatever was staged before it.
                self.staged = Batch {
                    snapshot: Some(snapshot),
                    ..Batch::default()
                };
            }
            if let Some(first) = batch.entries.first() {
                let first = first.index;
                self.staged.entries.retain(|e| e.index < first);
                self.staged.entries.extend(batch.entries);
            }
            if batch.hard.is_some() {
                self.staged.hard = batch.hard;
            }
            self.staged_ready = Some(number);
            return false;
        }
        if self.staged_ready.is_some() || self.checkpoint_due {
            self.staged_ready = Some(number);
            return false;
        }
        match self.pending.back_mut() {
            // Persisted when the call before it is.
            Some(last) => {
                last.ready = Some(number);
                false
            }
            None => true,
        }
    }

    /// Turns what is staged into a file call (a checkpoint of `store` when one is due; the
    /// checkpoint holds everything staged). `store` is `None` when the core is in no group:
    /// its segments are removed.
    pub(super) fn flush(&mut self, store: Option<(&Store, u64)>) {
        if self.failed.is_some() {
            return;
        }
        let Some((store, id)) = store else {
            self.staged = Batch::default();
            self.staged_ready = None;
            self.checkpoint_due = false;
            let mut ops = Vec::new();
            if self.sequence != 0 {
                ops.push(RaftFileOp::Close {
                    file: slot(self.sequence),
                });
                self.obsolete.push(self.sequence);
                self.sequence = 0;
                self.offset = 0;
            }
            ops.extend(self.cleanup_ops(None));
            if !ops.is_empty() {
                self.call(ops, None);
            }
            return;
        };
        if !self.checkpoint_due
            && self.since_checkpoint >= CHECKPOINT_MIN_BYTES.max(4 * self.checkpoint_len)
        {
            self.checkpoint_due = true;
        }
        if self.checkpoint_due {
            if let Err(error) = self.checkpoint(store, id) {
                self.fail(error);
            }
            return;
        }
        if self.staged.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.staged);
        let ready = self.staged_ready.take();
        let mut out = BytesMut::new();
        let mut encoded = Ok(());
        let length = encode_frame(KIND_BATCH, &mut out, |out| encoded = batch.encode(out));
        if let Err(error) = encoded {
            self.fail(error);
            return;
        }
        if length > FRAME_HEADER_LEN + FRAME_LENGTH_MAX {
            self.fail(format!(
                "a Raft batch of {length} bytes is above the frame limit"
            ));
            return;
        }
        let file = slot(self.sequence);
        let ops = vec![
            RaftFileOp::Write {
                file,
                offset: self.offset,
                bytes: out.freeze(),
            },
            RaftFileOp::Datasync { file },
        ];
        self.offset += length as u64;
        self.since_checkpoint += length as u64;
        self.call(ops, ready);
    }

    /// Writes the whole state into a new segment, then removes the ones before it.
    fn checkpoint(&mut self, store: &Store, id: u64) -> Result<(), String> {
        let snapshot = store.snapshot(store.applied, 0).unwrap_or_default();
        let first = store.applied + 1;
        let last = store.mem.last_index().map_err(|e| e.to_string())?;
        let entries = if last >= first {
            store
                .mem
                .entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
                .map_err(|e| format!("the Raft log to checkpoint is not there: {e}"))?
        } else {
            Vec::new()
        };
        let batch = Batch {
            snapshot: Some(snapshot),
            entries,
            hard: Some(store.mem.rl().hard_state().clone()),
        };
        let sequence = self.next_sequence;
        let mut out = BytesMut::new();
        let mut encoded = Ok(());
        let length = encode_frame(KIND_CHECKPOINT, &mut out, |out| {
            out.put_u64_le(sequence);
            out.put_u64_le(id);
            encoded = batch.encode(out);
        });
        encoded?;
        if length > FRAME_HEADER_LEN + FRAME_LENGTH_MAX {
            return Err(format!(
                "a Raft checkpoint of {length} bytes is above the frame limit"
            ));
        }
        let file = slot(sequence);
        let mut ops = vec![
            RaftFileOp::Open {
                file,
                path: segment_path(sequence),
                create: true,
            },
            RaftFileOp::Write {
                file,
                offset: 0,
                bytes: out.freeze(),
            },
            RaftFileOp::Datasync { file },
            RaftFileOp::SyncDirectory {
                path: PathBuf::from(RAFT_DIRECTORY),
            },
        ];
        if self.sequence != 0 {
            ops.push(RaftFileOp::Close {
                file: slot(self.sequence),
            });
            self.obsolete.push(self.sequence);
        }
        ops.extend(self.cleanup_ops(Some(sequence)));
        self.sequence = sequence;
        self.next_sequence = sequence + 1;
        self.offset = length as u64;
        self.since_checkpoint = 0;
        self.checkpoint_len = length as u64;
        self.checkpoint_due = false;
        self.staged = Batch::default();
        let ready = self.staged_ready.take();
        self.call(ops, ready);
        Ok(())
    }

    /// Removes the obsolete segments and the old shutdown file (durably), all but `keep`.
    fn cleanup_ops(&mut self, keep: Option<u64>) -> Vec<RaftFileOp> {
        let mut ops = Vec::new();
        for sequence in std::mem::take(&mut self.obsolete) {
            if Some(sequence) != keep {
                ops.push(RaftFileOp::Remove {
                    path: segment_path(sequence),
                });
            }
        }
        if !ops.is_empty() {
            ops.push(RaftFileOp::SyncDirectory {
                path: PathBuf::from(RAFT_DIRECTORY),
            });
        }
        if std::mem::take(&mut self.legacy) {
            ops.push(RaftFileOp::Remove {
                path: PathBuf::from(LEGACY_STATE_FILE),
            });
            ops.push(RaftFileOp::SyncDirectory {
                path: PathBuf::new(),
            });
        }
        ops
    }

    fn call(&mut self, ops: Vec<RaftFileOp>, ready: Option<u64>) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.pending.push_back(Pending { tag, ready });
        self.calls.push(RaftFileCall { tag, ops });
    }

    fn fail(&mut self, error: String) {
        if self.failed.is_none() {
            tracing::error!(%error, "the Raft store failed: this core persists nothing more and stops acknowledging Raft messages until it is restarted");
            self.failed = Some(error);
        }
    }

    /// The file calls to carry out, in order.
    pub(super) fn take_calls(&mut self) -> Vec<RaftFileCall> {
        std::mem::take(&mut self.calls)
    }

    /// Call `tag` completed. Returns the ready it persisted (raft-rs is told; every earlier
    /// one is persisted too), if it persisted one of the current node.
    pub(super) fn done(&mut self, tag: u64, result: Result<(), String>) -> Option<u64> {
        if let Err(error) = result {
            self.fail(error);
            return None;
        }
        if self.failed.is_some() {
            return None;
        }
        match self.pending.pop_front() {
            Some(pending) if pending.tag == tag => pending.ready,
            other => {
                warn!(
                    tag,
                    expected = other.map(|p| p.tag),
                    "Raft file completion out of order"
                );
                self.fail(format!("a Raft file completion ({tag}) out of order"));
                None
            }
        }
    }

    /// Whether nothing is staged or waiting for the disk.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.calls.is_empty()
            && self.staged.is_empty()
            && !self.checkpoint_due
    }
}

#[cfg(test)]
pub(super) mod tests;
