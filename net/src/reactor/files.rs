//! File operations on the reactor's own ring ([`Actions::files`](super::Actions::files)):
//! the registered file table, the file queues, and the completion path that runs each queue's
//! operations one after another (open into a direct descriptor, write, fdatasync, directory
//! fsync, close, unlink), so that a handler's durable writes need neither a blocking syscall
//! on the reactor thread nor a writer thread.
//!
//! Owns: the reactor's sparse file table (`file_slots` slots for the handlers, then
//! [`DIRECTORY_SLOTS`] internal ones for directory syncs), which slots are open, and each
//! queue's calls with the buffers (`Bytes`, path strings) of the operation in flight.
//! Never: makes a file syscall itself (everything goes through the ring), runs two operations
//! of one queue at once, lets one call's failure skip another call's operations, or panics on
//! a handler's bad input (a path with a NUL byte, a slot out of range, a slot in use): those
//! are the op's error.
//! Invariants: a queue has at most one operation in the ring, and its state (with the memory
//! the kernel reads) lives in `FileQueue::in_flight` until that operation's completion is
//! reaped; a completion is matched by `KIND_FILE`, the queue and the queue's operation number,
//! so it can never be taken for a connection's; a handler slot is marked open only by a
//! successful open and is free again once its close completed.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use io_uring::{opcode, squeue, types};
use tracing::warn;

use super::{FileOp, Handler, KIND_FILE, Reactor};

/// File slots per reactor for handlers unless [`Reactor::with_file_slots`] says otherwise.
pub const FILE_SLOTS_DEFAULT: u32 = 64;

/// Internal slots after the handlers' for directory syncs in flight at once (one per queue
/// syncing a directory); a queue that finds none free fails that op.
pub const DIRECTORY_SLOTS: u32 = 8;

/// How long a stopping reactor waits for its file queues to drain after its connections are
/// done: a log's last writes must not be cut by the shutdown grace of the sockets.
pub const FILES_SHUTDOWN_MAX: Duration = Duration::from_secs(30);

/// The largest single write submitted; longer buffers go in pieces, one after another (a
/// write's length is a u32, and a piece this size keeps one op from holding the ring long).
const WRITE_PIECE_MAX: usize = 4 << 20;

/// The reactor's file table and queues.
#[derive(Debug)]
pub(super) struct Files {
    /// Handler slots: `0..open.len()`; whether each is open.
    open: Vec<bool>,
    /// Free internal slots (indices after the handler slots).
    directory_slots: Vec<u32>,
    /// Queues by id, in id order so that starting and reporting are deterministic.
    queues: BTreeMap<u16, FileQueue>,
    /// Set when the handler was told something outside a completion, so the loop must not
    /// sleep before it flushes again.
    pub(super) told: bool,
}

#[derive(Debug, Default)]
struct FileQueue {
    calls: VecDeque<Call>,
    in_flight: Option<InFlight>,
    /// Numbers this queue's operations (16 bits in the user data), so that a completion is
    /// checked against the operation it is for.
    sequence: u16,
}

#[derive(Debug)]
struct Call {
    tag: u64,
    ops: VecDeque<FileOp>,
}

/// An operation in the ring, with everything the kernel reads until it completes.
#[derive(Debug)]
enum InFlight {
    Open {
        file: u32,
        _path: CString,
    },
    Write {
        file: u32,
        offset: u64,
        bytes: Bytes,
        written: usize,
    },
    Datasync,
    Directory {
        slot: u32,
        stage: DirectoryStage,
        _path: CString,
    },
    Close {
        file: u32,
    },
    Remove {
        _path: CString,
    },
}

#[derive(Debug, Clone, Copy)]
enum DirectoryStage {
    Open,
    Fsync,
    /// Closing the internal slot; the fsync's error, if any, is the op's result.
    Close(Option<i32>),
}

fn file_user_data(queue: u16, sequence: u16) -> u64 {
    (KIND_FILE << 56) | (u64::from(sequence) << 32) | u64::from(queue)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("file path {} holds a NUL byte", path.display()),
        )
    })
}

fn os_error(result: i32) -> io::Error {
    io::Error::from_raw_os_error(result.saturating_neg())
}

impl Files {
    /// Registers `file_slots` handler slots plus the internal ones, sparse (all empty).
    pub(super) fn register(
        submitter: &io_uring::Submitter<'_>,
        file_slots: u32,
    ) -> io::Result<Self> {
        let total = file_slots
            .checked_add(DIRECTORY_SLOTS)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many file slots"))?;
        submitter.register_files_sparse(total)?;
        Ok(Self {
            open: vec![false; file_slots as usize],
            directory_slots: (file_slots..total).rev().collect(),
            queues: BTreeMap::new(),
            told: false,
        })
    }

    /// Whether no file operation is queued or in flight.
    pub(super) fn idle(&self) -> bool {
        self.queues
            .values()
            .all(|queue| queue.in_flight.is_none() && queue.calls.is_empty())
    }

    /// At a shutdown that could not wait any longer: the kernel may still read the buffers of
    /// the operations in flight after the ring is gone, so they are leaked, never freed.
    pub(super) fn abandon(&mut self, reactor: u16) {
        for (&queue, state) in &mut self.queues {
            if let Some(in_flight) = state.in_flight.take() {
                warn!(
                    reactor,
                    queue,
                    queued = state.calls.len(),
                    "file operations still in flight at the end of the shutdown: abandoned"
                );
                std::mem::forget(in_flight);
            }
        }
    }

    fn handler_slot(&self, file: u32) -> io::Result<()> {
        if (file as usize) < self.open.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "file slot {file} out of range (the reactor has {})",
                    self.open.len()
                ),
            ))
        }
    }

    /// Builds the ring entry for `op`, or the op's error when it cannot start.
    fn prepare(&mut self, op: FileOp) -> io::Result<(squeue::Entry, InFlight)> {
        Ok(match op {
            FileOp::Open { file, path, create } => {
                self.handler_slot(file)?;
                if self.open[file as usize] {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("file slot {file} is already open"),
                    ));
                }
                let path = c_path(&path)?;
                let destination = types::DestinationSlot::try_from_slot_target(file)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                let flags = libc::O_WRONLY | if create { libc::O_CREAT } else { 0 };
                let entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
                    .file_index(Some(destination))
                    .flags(flags)
                    .mode(0o600)
                    .build();
                (entry, InFlight::Open { file, _path: path })
            }
            FileOp::Write {
                file,
                offset,
                bytes,
            } => {
                self.handler_slot(file)?;
                let in_flight = InFlight::Write {
                    file,
                    offset,
                    bytes,
                    written: 0,
                };
                (write_entry(&in_flight), in_flight)
            }
            FileOp::Datasync { file } => {
                self.handler_slot(file)?;
                let entry = opcode::Fsync::new(types::Fixed(file))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                (entry, InFlight::Datasync)
            }
            FileOp::SyncDirectory { path } => {
                let path = c_path(&path)?;
                let slot = self.directory_slots.pop().ok_or_else(|| {
                    io::Error::other("no internal file slot free for a directory sync")
                })?;
                let destination = types::DestinationSlot::try_from_slot_target(slot)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                let entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
                    .file_index(Some(destination))
                    .flags(libc::O_RDONLY | libc::O_DIRECTORY)
                    .build();
                (
                    entry,
                    InFlight::Directory {
                        slot,
                        stage: DirectoryStage::Open,
                        _path: path,
                    },
                )
            }
            FileOp::Close { file } => {
                self.handler_slot(file)?;
                let entry = opcode::Close::new(types::Fixed(file)).build();
                (entry, InFlight::Close { file })
            }
            FileOp::Remove { path } => {
                let path = c_path(&path)?;
                let entry = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
                (entry, InFlight::Remove { _path: path })
            }
        })
    }
}

/// The write of what is left of `in_flight` (a `Write`), at most `WRITE_PIECE_MAX` bytes.
fn write_entry(in_flight: &InFlight) -> squeue::Entry {
    let InFlight::Write {
        file,
        offset,
        bytes,
        written,
    } = in_flight
    else {
        unreachable!("write_entry is called with a write");
    };
    let rest = bytes.get(*written..).unwrap_or_default();
    let length = rest.len().min(WRITE_PIECE_MAX) as u32;
    opcode::Write::new(types::Fixed(*file), rest.as_ptr(), length)
        .offset(offset.saturating_add(*written as u64))
        .build()
}

/// What a completion means for the queue's operation in flight.
enum Step {
    /// The op is done; the queue goes on.
    Done,
    Failed(io::Error),
    /// The op goes on with this entry (a write's rest, a directory sync's next stage).
    Again(squeue::Entry),
}

impl<H: Handler> Reactor<H> {
    /// Queues the handler's file calls and starts every idle queue that got one.
    pub(super) fn queue_files(
        &mut self,
        now_ms: u64,
        calls: impl Iterator<Item = (u16, u64, Vec<FileOp>)>,
    ) {
        let mut started = Vec::new();
        for (queue, tag, ops) in calls {
            let state = self.files.queues.entry(queue).or_default();
            state.calls.push_back(Call {
                tag,
                ops: ops.into(),
            });
            if state.in_flight.is_none() && !started.contains(&queue) {
                started.push(queue);
            }
        }
        for queue in started {
            self.start_file_op(now_ms, queue);
        }
    }

    /// Submits the next operation of `queue`, reporting the calls that end without one (empty,
    /// or failed before reaching the ring) on the way.
    fn start_file_op(&mut self, now_ms: u64, queue: u16) {
        loop {
            let Some(state) = self.files.queues.get_mut(&queue) else {
                return;
            };
            let Some(call) = state.calls.front_mut() else {
                return;
            };
            let tag = call.tag;
            let Some(op) = call.ops.pop_front() else {
                state.calls.pop_front();
                self.files_done(now_ms, queue, tag, Ok(()));
                continue;
            };
            match self.files.prepare(op) {
                Ok((entry, in_flight)) => {
                    let state = self.files.queues.get_mut(&queue).expect("queue exists");
                    state.sequence = state.sequence.wrapping_add(1);
                    let data = file_user_data(queue, state.sequence);
                    state.in_flight = Some(in_flight);
                    self.push(entry.user_data(data));
                    return;
                }
                Err(error) => self.fail_call(now_ms, queue, error),
            }
        }
    }

    /// Ends the front call of `queue` with `error`, skipping its remaining ops.
    fn fail_call(&mut self, now_ms: u64, queue: u16, error: io::Error) {
        let Some(call) = self
            .files
            .queues
            .get_mut(&queue)
            .and_then(|state| state.calls.pop_front())
        else {
            return;
        };
        self.files_done(now_ms, queue, call.tag, Err(error));
    }

    fn files_done(&mut self, now_ms: u64, queue: u16, tag: u64, result: io::Result<()>) {
        self.files.told = true;
        self.handler.files_done(now_ms, queue, tag, result);
    }

    /// Handles the completion of a file queue's operation.
    pub(super) fn complete_file(&mut self, now_ms: u64, data: u64, result: i32) {
        let queue = data as u16;
        let sequence = (data >> 32) as u16;
        let Some(state) = self.files.queues.get_mut(&queue) else {
            return;
        };
        if state.sequence != sequence {
            return;
        }
        let Some(mut in_flight) = state.in_flight.take() else {
            return;
        };
        let step = self.file_step(&mut in_flight, result);
        match step {
            Step::Again(entry) => {
                let state = self.files.queues.get_mut(&queue).expect("queue exists");
                state.in_flight = Some(in_flight);
                self.push(entry.user_data(data));
            }
            Step::Done => self.start_file_op(now_ms, queue),
            Step::Failed(error) => {
                self.fail_call(now_ms, queue, error);
                self.start_file_op(now_ms, queue);
            }
        }
    }

    fn file_step(&mut self, in_flight: &mut InFlight, result: i32) -> Step {
        let failed = |result: i32| {
            if result < 0 {
                Step::Failed(os_error(result))
            } else {
                Step::Done
            }
        };
        match in_flight {
            InFlight::Open { file, .. } => {
                if result >= 0 {
                    self.files.open[*file as usize] = true;
                }
                failed(result)
            }
            InFlight::Write { bytes, written, .. } => {
                if result == -libc::EINTR || result == -libc::EAGAIN {
                    return Step::Again(write_entry(in_flight));
                }
                if result < 0 {
                    return failed(result);
                }
                if result == 0 && *written < bytes.len() {
                    return Step::Failed(io::Error::from(io::ErrorKind::WriteZero));
                }
                *written = written.saturating_add(result as usize);
                if *written < bytes.len() {
                    Step::Again(write_entry(in_flight))
                } else {
                    Step::Done
                }
            }
            InFlight::Datasync | InFlight::Remove { .. } => failed(result),
            InFlight::Close { file } => {
                self.files.open[*file as usize] = false;
                failed(result)
            }
            InFlight::Directory { slot, stage, .. } => match *stage {
                DirectoryStage::Open if result < 0 => {
                    self.files.directory_slots.push(*slot);
                    failed(result)
                }
                DirectoryStage::Open => {
                    *stage = DirectoryStage::Fsync;
                    Step::Again(opcode::Fsync::new(types::Fixed(*slot)).build())
                }
                DirectoryStage::Fsync => {
                    *stage = DirectoryStage::Close((result < 0).then_some(result));
                    Step::Again(opcode::Close::new(types::Fixed(*slot)).build())
                }
                DirectoryStage::Close(fsync_error) => {
                    self.files.directory_slots.push(*slot);
                    failed(fsync_error.unwrap_or(result))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;
