//! Recovery: replaying the segments found at start into a caller's visitor.
//!
//! Owns: choosing where replay starts, walking the segments in order, and the report of what
//! was replayed, skipped and where replay stopped and why.
//! Never: panics, touches a file, or holds more than one record at a time (records stream
//! into the visitor; the caller maps the segment files and passes their bytes).
//!
//! The rules, which follow from the order in which [`super::Log`] writes (see its module):
//! - Replay starts at the newest *complete* checkpoint (its `CHECKPOINT_END` marker and every
//!   frame before it pass their checks). Every older segment is obsolete: a checkpoint is
//!   removed-after only once it is synced, and a crash during those removals leaves some of the
//!   old segments behind, which are ignored.
//! - Segments after the newest complete checkpoint that are incomplete checkpoints, or whose
//!   header is torn, and that come last (only others of the kind follow) are skipped: a crash
//!   while a segment was being created or a checkpoint written leaves exactly that (also after
//!   [`super::Log::open`]'s checkpoint, which follows whatever recovery found), and nothing in
//!   such a segment was ever acknowledged. A limit: a bit flip in the header of a synced
//!   segment that only such segments follow looks the same, and is reported in
//!   [`Recovery::skipped`] but not as damage.
//! - From the start, segments must follow each other by sequence number, and every frame must
//!   pass its checks. The first failure stops replay (records after a hole may depend on what
//!   is in it). [`Recovery::stop`] says where; [`Recovery::is_crash_consistent`] says whether
//!   a crash alone explains it: the writer gives a segment its first byte only once every
//!   earlier segment is synced, so a crash can tear only the last segment. Anything else
//!   (a gap, a bad frame in an earlier segment, no complete checkpoint) means synced data was
//!   lost or damaged, and the caller decides (refuse to start, or start with what was read).
//! - Every replayed segment but the last must end with its `SEGMENT_END` marker, and nothing
//!   may follow a marker, so an earlier segment cut at a frame boundary is caught too.

use super::record::{Malformed, Record};
use super::segment::{self, Frame, Frames, HeaderError, SegmentHeader};
use super::state::State;

/// A segment file as the caller found it: the sequence number from its name and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub sequence: u64,
    pub bytes: &'a [u8],
}

/// Why replay stopped before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Record(Malformed),
    Header(HeaderError),
    /// Segment `missing` is not there, but later ones are.
    Gap {
        missing: u64,
    },
    /// Segments other than incomplete checkpoints exist, but no complete checkpoint to start
    /// from.
    NoCompleteCheckpoint,
    /// An incomplete checkpoint followed by other segments.
    IncompleteCheckpoint,
    /// A segment followed by another does not end with its `SEGMENT_END` marker: it lost
    /// whole frames at its end.
    SegmentNotEnded,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Record(why) => write!(f, "{why}"),
            Self::Header(why) => write!(f, "{why}"),
            Self::Gap { missing } => write!(f, "segment {missing} is missing"),
            Self::NoCompleteCheckpoint => f.write_str("no complete checkpoint to start from"),
            Self::IncompleteCheckpoint => {
                f.write_str("an incomplete checkpoint is followed by other segments")
            }
            Self::SegmentNotEnded => f.write_str("a segment followed by another lost its end"),
        }
    }
}

/// Where replay stopped: nothing at or after `offset` of `segment` was replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub segment: u64,
    pub offset: u64,
    pub reason: StopReason,
    /// Segments after `segment` that were not replayed.
    pub unreplayed: Vec<u64>,
}

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint segment replay started at.
    pub start: Option<u64>,
    /// Segments older than the start, safe to remove.
    pub obsolete: Vec<u64>,
    /// Trailing segments skipped: incomplete checkpoints (a crash while one was written) and
    /// a last segment whose header is torn (a crash right after it was created).
    pub skipped: Vec<u64>,
    pub stop: Option<Stop>,
    /// Records handed to the visitor.
    pub records: u64,
    /// Every segment given, in order: what [`super::Log::open`] removes once its own
    /// checkpoint is synced.
    pub segments: Vec<u64>,
}

impl Recovery {
    /// Whether a crash alone explains what was found: replay stopped nowhere, or inside the
    /// last segment it replayed because of a torn frame or header. A `false` means data that
    /// was synced is missing or damaged.
    pub fn is_crash_consistent(&self) -> bool {
        let Some(stop) = &self.stop else {
            return true;
        };
        let torn = match stop.reason {
            StopReason::Record(why) => !matches!(why, Malformed::Body(_)),
            StopReason::Header(_) => true,
            _ => false,
        };
        torn && stop.unreplayed.is_empty()
    }
}

/// Replays `segments` (in any order; they are walked by sequence number) into `visit`.
pub fn recover(segments: &[Segment<'_>], mut visit: impl FnMut(Record)) -> Recovery {
    let mut ordered: Vec<&Segment<'_>> = segments.iter().collect();
    ordered.sort_by_key(|segment| segment.sequence);
    let headers: Vec<Result<SegmentHeader, HeaderError>> = ordered
        .iter()
        .map(|segment| {
            SegmentHeader::decode(segment.bytes).and_then(|header| {
                if header.sequence == segment.sequence {
                    Ok(header)
                } else {
                    Err(HeaderError::Sequence {
                        header: header.sequence,
                    })
                }
            })
        })
        .collect();
    let is_checkpoint = |index: usize| headers[index].is_ok_and(|header| header.checkpoint);

    // The newest complete checkpoint; incomplete ones found on the way down are remembered so
    // that the trailing run below is not scanned twice.
    let mut incomplete = vec![false; ordered.len()];
    let mut start = None;
    for index in (0..ordered.len()).rev() {
        if !is_checkpoint(index) {
            continue;
        }
        if segment::checkpoint_is_complete(ordered[index].bytes, ordered[index].sequence) {
            start = Some(index);
            break;
        }
        incomplete[index] = true;
    }
    // The trailing run to skip: incomplete checkpoints and segments whose header is damaged
    // (not one of another format version, which is never skipped silently).
    let mut end = ordered.len();
    let floor = start.map_or(0, |start| start + 1);
    while end > floor
        && (incomplete[end - 1]
            || matches!(
                headers[end - 1],
                Err(HeaderError::Truncated | HeaderError::Magic | HeaderError::Checksum)
            ))
    {
        end -= 1;
    }
    let mut recovery = Recovery {
        start: start.map(|index| ordered[index].sequence),
        obsolete: ordered[..start.unwrap_or(0)]
            .iter()
            .map(|segment| segment.sequence)
            .collect(),
        skipped: ordered[end..]
            .iter()
            .map(|segment| segment.sequence)
            .collect(),
        stop: None,
        records: 0,
        segments: ordered.iter().map(|segment| segment.sequence).collect(),
    };
    let Some(start) = start else {
        if end > 0 {
            recovery.stop = Some(Stop {
                segment: ordered[0].sequence,
                offset: 0,
                reason: StopReason::NoCompleteCheckpoint,
                unreplayed: ordered[1..end].iter().map(|s| s.sequence).collect(),
            });
        }
        return recovery;
    };
    for index in start..end {
        let segment = ordered[index];
        let stop = |offset: usize, reason| Stop {
            segment: segment.sequence,
            offset: offset as u64,
            reason,
            unreplayed: ordered[index + 1..end].iter().map(|s| s.sequence).collect(),
        };
        if index > start && ordered[index - 1].sequence.checked_add(1) != Some(segment.sequence) {
            let missing = ordered[index - 1].sequence.saturating_add(1);
            recovery.stop = Some(stop(0, StopReason::Gap { missing }));
            return recovery;
        }
        if let Err(why) = headers[index] {
            recovery.stop = Some(stop(0, StopReason::Header(why)));
            return recovery;
        }
        if index > start && is_checkpoint(index) {
            recovery.stop = Some(stop(0, StopReason::IncompleteCheckpoint));
            return recovery;
        }
        let mut marker_seen = false;
        let mut ended = false;
        for (offset, frame) in Frames::new(segment.bytes) {
            if ended {
                let why = Malformed::Body("a frame after the segment's end");
                recovery.stop = Some(stop(offset, StopReason::Record(why)));
                return recovery;
            }
            let record = match frame {
                Ok(Frame::SegmentEnd) => {
                    ended = true;
                    continue;
                }
                // The start's marker was checked by `checkpoint_is_complete`; no other
                // segment in the range is a checkpoint, and a second marker is damage.
                Ok(Frame::CheckpointEnd) if index == start && !marker_seen => {
                    marker_seen = true;
                    continue;
                }
                Ok(Frame::CheckpointEnd) => Err(Malformed::Body("a marker outside a checkpoint")),
                Ok(Frame::Record { kind, body }) => Record::decode(kind, body),
                Err(why) => Err(why),
            };
            match record {
                Ok(record) => {
                    recovery.records += 1;
                    visit(record);
                }
                Err(why) => {
                    recovery.stop = Some(stop(offset, StopReason::Record(why)));
                    return recovery;
                }
            }
        }
        // The last segment replayed may lack its marker (appends stopped there); any
        // earlier one was sealed with it.
        if !ended && index + 1 < end {
            let length = segment.bytes.len();
            recovery.stop = Some(stop(length, StopReason::SegmentNotEnded));
            return recovery;
        }
    }
    recovery
}

/// Replays `segments` into a fresh [`State`]; also returns how many records did not apply
/// (see [`State::apply`]).
pub fn recover_state(
    segments: &[Segment<'_>],
    limits: super::StateLimits,
) -> (State, Recovery, u64) {
    let mut state = State::new(limits);
    let mut ignored = 0;
    let recovery = recover(segments, |record| {
        if !state.apply(&record) {
            ignored += 1;
        }
    });
    (state, recovery, ignored)
}
