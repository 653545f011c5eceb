//! The cores' Raft store's file calls, carried out off the shard thread.
//!
//! Interim executor: the calls run in order on a writer thread of shard 0 (`RaftWriter`),
//! which posts each call's completion back to shard 0's mailbox, until the reactor's file
//! operations on its own io_uring ring (branch `reactor-files`, `Actions::files` on file
//! queue 1, the same operations as `RaftFileOp`) replace it. Either way no file syscall runs
//! on the shard thread while it serves.
//!
//! Owns: the writer thread and the files open in the store's two slots.
//! Never: runs on the shard thread, or reorders calls (one channel, one thread: FIFO, each op
//! after the one before completed, as the file queue promises).
//! Invariants: at the first failing op the rest of that call is skipped and the call reports
//! the error; later calls still run. After `stop_posting` (the reactor no longer drains its
//! mailbox) completions are not posted, and `finish` waits until every call given has run,
//! so a clean stop leaves everything handed over on disk.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shardmq_net::reactor::Mailboxes;
use shardmq_shards::cluster::{RaftFileCall, RaftFileOp};
use tracing::warn;

use crate::admin::NodeMessage;

pub struct RaftWriter {
    calls: Option<std::sync::mpsc::Sender<RaftFileCall>>,
    thread: Option<std::thread::JoinHandle<()>>,
    posting: Arc<AtomicBool>,
}

impl std::fmt::Debug for RaftWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftWriter").finish_non_exhaustive()
    }
}

impl RaftWriter {
    /// A writer for the store under `directory` (the data directory), posting completions to
    /// shard `index`.
    pub fn spawn(
        index: u16,
        directory: PathBuf,
        mailboxes: Arc<Mailboxes<NodeMessage>>,
    ) -> std::io::Result<Self> {
        let (sender, calls) = std::sync::mpsc::channel::<RaftFileCall>();
        let posting = Arc::new(AtomicBool::new(true));
        let post = posting.clone();
        let thread = std::thread::Builder::new()
            .name("raft-store".into())
            .spawn(move || {
                let mut files: BTreeMap<u8, std::fs::File> = BTreeMap::new();
                while let Ok(call) = calls.recv() {
                    let result = call
                        .ops
                        .into_iter()
                        .try_for_each(|op| execute(&directory, &mut files, op))
                        .map_err(|e| e.to_string());
                    if let Err(error) = &result {
                        warn!(%error, "a Raft store file operation failed");
                    }
                    if post.load(Ordering::Acquire) {
                        mailboxes.post(
                            index,
                            NodeMessage::RaftFilesDone {
                                tag: call.tag,
                                result,
                            },
                        );
                    }
                }
            })?;
        Ok(Self {
            calls: Some(sender),
            thread: Some(thread),
            posting,
        })
    }

    /// Queues a call after every earlier one.
    pub fn submit(&self, call: RaftFileCall) {
        if let Some(calls) = &self.calls
            && calls.send(call).is_err()
        {
            warn!("the Raft store's writer is gone: a file call is dropped");
        }
    }

    /// The shard is stopping: completions are no longer posted.
    pub fn stop_posting(&self) {
        self.posting.store(false, Ordering::Release);
    }

    /// Waits until every call given has run.
    pub fn finish(&mut self) {
        self.stop_posting();
        self.calls = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RaftWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn execute(
    directory: &Path,
    files: &mut BTreeMap<u8, std::fs::File>,
    op: RaftFileOp,
) -> std::io::Result<()> {
    let slot =
        |files: &mut BTreeMap<u8, std::fs::File>, file: u8| -> std::io::Result<std::fs::File> {
            files
                .get(&file)
                .ok_or_else(|| std::io::Error::other(format!("Raft file slot {file} is not open")))?
                .try_clone()
        };
    match op {
        RaftFileOp::Open { file, path, create } => {
            if files.contains_key(&file) {
                return Err(std::io::Error::other(format!(
                    "Raft file slot {file} is in use"
                )));
            }
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create(create)
                .truncate(false)
                .mode(0o600)
                .open(directory.join(path))?;
            files.insert(file, opened);
        }
        RaftFileOp::Write {
            file,
            offset,
            bytes,
        } => slot(files, file)?.write_all_at(&bytes, offset)?,
        RaftFileOp::Datasync { file } => slot(files, file)?.sync_data()?,
        RaftFileOp::SyncDirectory { path } => {
            std::fs::File::open(directory.join(path))?.sync_all()?
        }
        RaftFileOp::Close { file } => {
            files.remove(&file).ok_or_else(|| {
                std::io::Error::other(format!("Raft file slot {file} is not open"))
            })?;
        }
        RaftFileOp::Remove { path } => std::fs::remove_file(directory.join(path))?,
    }
    Ok(())
}
