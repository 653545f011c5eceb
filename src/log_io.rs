//! A running shard's log I/O: the log's `Request`s become the reactor's file operations
//! (`FileOp`), carried out in order on the shard's own io_uring ring (file queue 0,
//! `Actions::files`), and each call's completion (`Handler::files_done`) becomes
//! `Shard::on_log_synced` or `Shard::on_log_failed`. No file syscall runs on the shard thread
//! while it serves, and no other thread takes part.
//!
//! Owns: the file slots of the segments open for writing (two: the current segment and the
//! one before it, `FILE_SLOTS`), the tag of every call and the ticket it completes, and the
//! sync policy: "always" syncs as the log asks; "interval" and "none" leave out the
//! `fdatasync` of plain appends (the segment stays `unsynced`) but keep every sync that
//! orders segments (a segment's first sync with its directory, and every earlier segment's
//! before a new one is created), so that recovery after a power loss still sees a log a crash
//! explains; "interval" syncs what is unsynced every `interval_ms`.
//! Never: blocks, or submits an operation itself: it only builds them.
//! Invariants: one call per loop at most for the log's requests (one fdatasync a batch),
//! and no new one while one with a ticket is out (group commit: the records of every loop
//! meanwhile go out together); tags complete in the order given (file queue 0 is FIFO), so
//! tickets complete in order. A ticket completes once its writes are done (and, with
//! "always", synced), and only then do the acknowledgements it covers leave: with
//! "interval" and "none" an acknowledged record is at least in the kernel's page cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use shardmq_shards::Shard;
use shardmq_shards::storage::{Request, Ticket, file_name};
use tracing::warn;

use crate::durable::SyncPolicy;

/// The log's file operations are the reactor's: a call goes to `Actions::files` as built.
pub use shardmq_net::reactor::{Actions, FileOp};

/// The reactor's file queue of the shard's log (the broker uses 0 = the log,
/// 1 = the Raft store).
pub const LOG_QUEUE: u16 = 0;

/// The reactor file slots the log uses: `FILE_SLOTS.0 + segment % 2`. Other users of the
/// reactor's file slots (the Raft store) take slots from 2 on.
const FILE_SLOTS: (u32, u32) = (0, 2);

#[derive(Debug)]
pub struct LogFiles {
    /// `DIR/shard-N`.
    directory: PathBuf,
    policy: SyncPolicy,
    /// Segments open in a slot, by sequence number.
    open: BTreeSet<u64>,
    /// Segments written since their last fdatasync (policies other than "always").
    unsynced: BTreeSet<u64>,
    /// Calls in flight, by tag: the ticket each completes (None: syncs of the interval
    /// policy, or removals).
    calls: BTreeMap<u64, Option<Ticket>>,
    next_tag: u64,
    next_sync_ms: u64,
    failed: bool,
    /// fdatasyncs asked for since the start (for the shutdown's summary line).
    sync_count: u64,
}

impl LogFiles {
    pub fn new(directory: PathBuf, policy: SyncPolicy) -> Self {
        Self {
            directory,
            policy,
            open: BTreeSet::new(),
            unsynced: BTreeSet::new(),
            calls: BTreeMap::new(),
            next_tag: 0,
            next_sync_ms: 0,
            failed: false,
            sync_count: 0,
        }
    }

    fn slot(segment: u64) -> u32 {
        FILE_SLOTS.0 + (segment % u64::from(FILE_SLOTS.1)) as u32
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.directory.join(file_name(segment))
    }

    /// Opens `segment` into its slot if it is not open (the segment the first checkpoint
    /// wrote at start, before the ring was used).
    fn ensure_open(&mut self, segment: u64, ops: &mut Vec<FileOp>) {
        if self.open.insert(segment) {
            self.close_other(segment, ops);
            ops.push(FileOp::Open {
                file: Self::slot(segment),
                path: self.path(segment),
                create: false,
            });
        }
    }

    /// Closes an open segment that shares `segment`'s slot (an older one: the log writes
    /// only the newest segment).
    fn close_other(&mut self, segment: u64, ops: &mut Vec<FileOp>) {
        let slot = Self::slot(segment);
        let sharing: Vec<u64> = self
            .open
            .iter()
            .copied()
            .filter(|&other| other != segment && Self::slot(other) == slot)
            .collect();
        for other in sharing {
            self.sync_if_unsynced(other, ops);
            self.open.remove(&other);
            ops.push(FileOp::Close { file: slot });
        }
    }

    fn sync_if_unsynced(&mut self, segment: u64, ops: &mut Vec<FileOp>) {
        if self.unsynced.remove(&segment) && self.open.contains(&segment) {
            ops.push(FileOp::Datasync {
                file: Self::slot(segment),
            });
        }
    }

    /// The file operations for the log's requests, in order.
    pub fn operations(&mut self, requests: Vec<Request>) -> Vec<FileOp> {
        let mut ops = Vec::with_capacity(requests.len() + 2);
        for request in requests {
            match request {
                Request::Create { segment } => {
                    // A new segment gets its first byte only once every earlier one is
                    // synced (the log's seal), whatever the policy.
                    for earlier in self.unsynced.clone() {
                        self.sync_if_unsynced(earlier, &mut ops);
                    }
                    self.close_other(segment, &mut ops);
                    self.open.insert(segment);
                    ops.push(FileOp::Open {
                        file: Self::slot(segment),
                        path: self.path(segment),
                        create: true,
                    });
                }
                Request::Write {
                    segment,
                    offset,
                    bytes,
                } => {
                    self.ensure_open(segment, &mut ops);
                    ops.push(FileOp::Write {
                        file: Self::slot(segment),
                        offset,
                        bytes,
                    });
                }
                Request::Sync { segment, directory } => {
                    self.ensure_open(segment, &mut ops);
                    if self.policy == SyncPolicy::Always || directory {
                        self.unsynced.remove(&segment);
                        ops.push(FileOp::Datasync {
                            file: Self::slot(segment),
                        });
                    } else {
                        self.unsynced.insert(segment);
                    }
                    if directory {
                        ops.push(FileOp::SyncDirectory {
                            path: self.directory.clone(),
                        });
                    }
                }
                Request::Remove { segment } => {
                    if self.open.remove(&segment) {
                        self.unsynced.remove(&segment);
                        ops.push(FileOp::Close {
                            file: Self::slot(segment),
                        });
                    }
                    ops.push(FileOp::Remove {
                        path: self.path(segment),
                    });
                }
            }
        }
        ops
    }

    /// Once per loop, after the shard's outputs: the log's batch goes out as one call (one
    /// fdatasync for the whole batch), and with the interval policy a due sync.
    pub fn submit(&mut self, shard: &mut Shard, now_ms: u64, writer: &mut impl FileCalls) {
        if self.failed {
            return;
        }
        // Group commit: one call with a ticket out at a time. What the shard records while it
        // runs waits in the log's batch and goes out whole with the next call, so a slow
        // fdatasync (or write) makes batches larger, never a queue of calls behind it.
        if self.calls.values().any(Option::is_some) {
            return;
        }
        let mut requests = Vec::new();
        let ticket = shard.take_log_requests(&mut requests);
        if !requests.is_empty() || ticket.is_some() {
            let ops = self.operations(requests);
            self.call(ticket, ops, writer);
        }
        if let SyncPolicy::Interval { interval_ms } = self.policy
            && now_ms >= self.next_sync_ms
        {
            self.next_sync_ms = now_ms.saturating_add(interval_ms);
            let mut ops = Vec::new();
            for segment in self.unsynced.clone() {
                self.sync_if_unsynced(segment, &mut ops);
            }
            if !ops.is_empty() {
                self.call(None, ops, writer);
            }
        }
    }

    fn call(&mut self, ticket: Option<Ticket>, ops: Vec<FileOp>, writer: &mut impl FileCalls) {
        self.sync_count += ops
            .iter()
            .filter(|op| matches!(op, FileOp::Datasync { .. }))
            .count() as u64;
        let tag = self.next_tag;
        self.next_tag += 1;
        self.calls.insert(tag, ticket);
        writer.files(LOG_QUEUE, tag, ops);
    }

    /// A call completed: its ticket is synced, or the log failed.
    pub fn done(&mut self, shard: &mut Shard, tag: u64, result: std::io::Result<()>) {
        let Some(ticket) = self.calls.remove(&tag) else {
            warn!(tag, "a log file call completed that was not made");
            return;
        };
        if self.failed {
            return;
        }
        match result {
            Ok(()) => {
                if let Some(ticket) = ticket {
                    shard.on_log_synced(ticket);
                }
            }
            Err(error) => {
                self.failed = true;
                shard.on_log_failed(&error);
            }
        }
    }

    /// When the interval policy wants its next sync.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        match self.policy {
            SyncPolicy::Interval { .. } if !self.unsynced.is_empty() && !self.failed => {
                Some(self.next_sync_ms)
            }
            _ => None,
        }
    }

    /// fdatasyncs asked for since the start.
    pub fn sync_count(&self) -> u64 {
        self.sync_count
    }

    /// Whether the call `tag` was made and not reported yet.
    #[cfg(test)]
    pub fn is_pending(&self, tag: u64) -> bool {
        self.calls.contains_key(&tag)
    }

    /// Whether any call was made and not reported.
    pub fn has_pending(&self) -> bool {
        !self.calls.is_empty()
    }

    pub fn failed(&self) -> bool {
        self.failed
    }
}

/// What carries out a call of file operations, in order on file queue `queue`, and reports
/// it by `tag`: the reactor's `Actions::files` (tests record the calls instead).
pub trait FileCalls {
    fn files(&mut self, queue: u16, tag: u64, ops: Vec<FileOp>);
}

impl<M> FileCalls for Actions<M> {
    fn files(&mut self, queue: u16, tag: u64, ops: Vec<FileOp>) {
        Actions::files(self, queue, tag, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn kinds(ops: &[FileOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                FileOp::Open { file, create, .. } => format!("open {file} {create}"),
                FileOp::Write { file, offset, .. } => format!("write {file} @{offset}"),
                FileOp::Datasync { file } => format!("datasync {file}"),
                FileOp::SyncDirectory { .. } => "sync-directory".into(),
                FileOp::Close { file } => format!("close {file}"),
                FileOp::Remove { path } => format!("remove {}", path.display()),
            })
            .collect()
    }

    fn write(segment: u64, offset: u64) -> Request {
        Request::Write {
            segment,
            offset,
            bytes: Bytes::from_static(b"x"),
        }
    }

    fn sync(segment: u64, directory: bool) -> Request {
        Request::Sync { segment, directory }
    }

    #[test]
    fn always_syncs_each_batch_and_opens_the_start_checkpoint_first() {
        let mut files = LogFiles::new(PathBuf::from("/d"), SyncPolicy::Always);
        let ops = files.operations(vec![write(1, 100), sync(1, false)]);
        assert_eq!(kinds(&ops), ["open 1 false", "write 1 @100", "datasync 1"]);
        let ops = files.operations(vec![write(1, 101), sync(1, false)]);
        assert_eq!(kinds(&ops), ["write 1 @101", "datasync 1"]);
        // A new segment: created in the other slot; the old one is closed when a third
        // needs its slot, and removed by name.
        let ops = files.operations(vec![
            Request::Create { segment: 2 },
            write(2, 0),
            sync(2, true),
        ]);
        assert_eq!(
            kinds(&ops),
            ["open 0 true", "write 0 @0", "datasync 0", "sync-directory"]
        );
        let ops = files.operations(vec![
            Request::Create { segment: 3 },
            Request::Remove { segment: 1 },
        ]);
        assert_eq!(
            kinds(&ops),
            [
                "close 1",
                "open 1 true",
                "remove /d/00000000000000000001.log"
            ]
        );
    }

    #[test]
    fn interval_and_none_leave_out_plain_syncs_but_keep_the_ones_that_order_segments() {
        for policy in [SyncPolicy::Interval { interval_ms: 50 }, SyncPolicy::None] {
            let mut files = LogFiles::new(PathBuf::from("/d"), policy);
            let ops = files.operations(vec![write(1, 100), sync(1, false)]);
            assert_eq!(kinds(&ops), ["open 1 false", "write 1 @100"], "{policy:?}");
            assert_eq!(
                files.next_deadline_ms().is_some(),
                matches!(policy, SyncPolicy::Interval { .. })
            );
            // Before a new segment gets its first byte, the one before it is synced.
            let ops = files.operations(vec![
                Request::Create { segment: 2 },
                write(2, 0),
                sync(2, true),
            ]);
            assert_eq!(
                kinds(&ops),
                [
                    "datasync 1",
                    "open 0 true",
                    "write 0 @0",
                    "datasync 0",
                    "sync-directory"
                ],
                "{policy:?}"
            );
        }
    }

    /// Records the calls instead of carrying them out.
    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<FileOp>)>);

    impl FileCalls for Recorder {
        fn files(&mut self, queue: u16, tag: u64, ops: Vec<FileOp>) {
            assert_eq!(queue, LOG_QUEUE);
            self.0.push((tag, ops));
        }
    }

    #[test]
    fn always_keeps_one_sync_out_and_sends_what_came_meanwhile_together() {
        use bytes::BytesMut;
        use shardmq_net::mqtt::{self, Connect, ConnectProperties, Packet, ProtocolVersion};
        use shardmq_shards::shard::LogSettings;
        use shardmq_shards::storage::{Log, LogConfig, State};
        use shardmq_shards::{Input, Limits, ShardConfig, SharedStrategy};
        let limits = Limits::default();
        let mut shard = Shard::new(ShardConfig {
            index: 0,
            shard_count: 1,
            node: 0,
            takeover_timeout_ms: 5_000,
            limits: limits.clone(),
            shared_strategy: SharedStrategy::RoundRobin,
        });
        // A log whose first checkpoint is still to be written.
        let log = Log::open(LogConfig::default(), State::new((&limits).into()), &[]);
        let settings = LogSettings {
            hold_acks: true,
            wall_clock_at_zero_ms: 0,
            held_acks_max: 16,
        };
        shard.attach_log(log, settings);
        let mut recorder = Recorder::default();
        let mut files = LogFiles::new(PathBuf::from("/d"), SyncPolicy::Always);
        files.submit(&mut shard, 0, &mut recorder);
        assert_eq!(recorder.0.len(), 1, "the checkpoint goes out");
        // Persistent sessions connect while its sync is out: their records wait.
        for (connection, client_id) in [(1, "first"), (2, "second")] {
            let mut bytes = BytesMut::new();
            let connect = Packet::Connect(Box::new(Connect {
                protocol: ProtocolVersion::V3_1_1,
                clean_start: false,
                keep_alive_seconds: 0,
                properties: ConnectProperties::default(),
                client_id: client_id.into(),
                will: None,
                username: None,
                password: None,
            }));
            mqtt::encode(&connect, ProtocolVersion::V3_1_1, &mut bytes);
            shard.handle(
                connection,
                Input::Opened {
                    connection,
                    transport: shardmq_shards::Transport::default(),
                },
            );
            shard.handle(
                connection,
                Input::Received {
                    connection,
                    bytes: bytes.freeze(),
                },
            );
            files.submit(&mut shard, connection, &mut recorder);
        }
        assert_eq!(recorder.0.len(), 1, "one sync out at a time");
        let tag = recorder.0[0].0;
        files.done(&mut shard, tag, Ok(()));
        assert!(!files.is_pending(tag));
        // Both sessions' records go out in one call, with one fdatasync.
        files.submit(&mut shard, 3, &mut recorder);
        let calls = &recorder.0;
        assert_eq!(calls.len(), 2);
        let syncs = calls[1]
            .1
            .iter()
            .filter(|op| matches!(op, FileOp::Datasync { .. }))
            .count();
        assert_eq!(syncs, 1, "{:?}", calls[1].1);
        let tag = calls[1].0;
        // A failure gives the log up: nothing more goes out.
        files.done(&mut shard, tag, Err(std::io::Error::from_raw_os_error(28)));
        assert!(files.failed() && shard.log_failed());
        files.submit(&mut shard, 4, &mut recorder);
        assert_eq!(recorder.0.len(), 2);
    }
}
