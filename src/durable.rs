//! The binary's side of the durable log (DESIGN.md §5): the data directory at start, and the
//! sync policy.
//!
//! Owns: the layout `DIR/shard-N/{sequence:020}.log`; recovery at start (every shard
//! directory mapped with memmap2 and replayed, refused unless crash-consistent or
//! `--recover-damaged`, the states merged so that the shard count may change between runs);
//! the blocking I/O of every shard's first checkpoint, which the start writes into the staging
//! directory of `layout.rs` (the crash-safe switch that then replaces the old logs and the
//! old shutdown snapshots, `DIR/shard-N.snapshot`, read once for the upgrade). What recovery
//! reads is bounded: no file above `storage.recovery_file_bytes_max` is mapped or read.
//! Never: runs on a shard thread while it serves: what a running shard writes goes through
//! its reactor's ring (`main.rs`, `ShardHandler`).
//!
//! Why the start-up I/O is synchronous: nothing is served yet, so blocking costs nothing, and
//! it orders the one step that spans directories (see `layout.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use shardmq_shards::storage::{
    self, Log, Request, Segment, State, StateLimits, Ticket, parse_file_name, recover_state,
};
use tracing::{info, warn};

/// When the log is synced (`storage.sync`). Acknowledgements that promise durability always
/// wait for the log call that carries their records: with `Always` that call ends with the
/// fdatasync, with the others once the write is in the kernel's hands (which a process crash
/// does not undo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fdatasync in every call.
    Always,
    /// fdatasync every this many milliseconds.
    Interval { interval_ms: u64 },
    /// The kernel writes back when it will.
    None,
}

/// What was found in the data directory.
pub struct Found {
    /// Every shard directory's recovered state, merged.
    pub state: State,
    /// Old shutdown snapshots (`shard-N.snapshot`), read once for the upgrade, each checked
    /// to decode whole (a damaged one stops the start unless `recover_damaged`).
    pub snapshots: Vec<(PathBuf, Vec<u8>)>,
}

pub fn shard_directory(directory: &Path, index: u16) -> PathBuf {
    directory.join(format!("shard-{index}"))
}

/// The size of `path`, refused above `file_bytes_max` (`storage.recovery_file_bytes_max`):
/// recovery maps or reads no file larger than that.
fn checked_size(path: &Path, file: &File, file_bytes_max: u64) -> Result<u64, String> {
    let length = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if length > file_bytes_max {
        return Err(format!(
            "{} holds {length} bytes, more than storage.recovery_file_bytes_max ({file_bytes_max}): not read, and kept. Raise the limit if the file is genuine, or move it away",
            path.display()
        ));
    }
    Ok(length)
}

/// An old shutdown snapshot, read (bounded) and checked to decode before anything is
/// changed: a damaged one is kept and stops the start unless `recover_damaged`.
fn read_snapshot(
    path: &Path,
    file_bytes_max: u64,
    recover_damaged: bool,
) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let length = checked_size(path, &file, file_bytes_max)?;
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
    // `take`: a file that grows after the check is still read only up to the limit.
    file.take(file_bytes_max)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let kept = "it is kept (nothing was changed); move it away to start without what it holds";
    match shardmq_shards::snapshot::decode(&bytes, 0) {
        Err(error) => Err(format!(
            "old snapshot {} cannot be read: {error}; {kept}",
            path.display()
        )),
        Ok((_, Some(warning))) if !recover_damaged => Err(format!(
            "old snapshot {} is damaged: {warning}; {kept}, or start with --recover-damaged to load what it holds before the damage",
            path.display()
        )),
        Ok(_) => Ok(bytes),
    }
}

fn segment_path(directory: &Path, index: u16, sequence: u64) -> PathBuf {
    shard_directory(directory, index).join(storage::file_name(sequence))
}

/// Reads the data directory (created if missing): every shard directory's log, recovered
/// and merged, and any old snapshot files. Refuses a log that a crash alone does not explain
/// unless `recover_damaged`, which keeps what replayed before the damage.
pub fn recover(
    directory: &Path,
    limits: StateLimits,
    recover_damaged: bool,
    file_bytes_max: u64,
) -> Result<Found, String> {
    std::fs::create_dir_all(directory)
        .map_err(|e| format!("data directory {}: {e}", directory.display()))?;
    let probe = directory.join(".write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            format!(
                "data directory {} is not writable: {e}",
                directory.display()
            )
        })?;
    let mut found = Found {
        state: State::new(limits),
        snapshots: Vec::new(),
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(directory)
        .map_err(|e| format!("{}: {e}", directory.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", directory.display()))?;
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(rest) = name.strip_prefix("shard-") else {
            continue;
        };
        if let Some(index) = rest.strip_suffix(".snapshot") {
            // Only the names the old shutdown wrote (`shard-N.snapshot`), the ones the
            // layout switch removes once their state is in the logs: another name would be
            // read again at every start, bringing back what was deleted since.
            if index.parse::<u16>().ok().map(|i| i.to_string()).as_deref() != Some(index) {
                warn!(file = %path.display(), "not an old shutdown snapshot's name (shard-N.snapshot): ignored");
                continue;
            }
            let bytes = read_snapshot(&path, file_bytes_max, recover_damaged)?;
            found.snapshots.push((path, bytes));
        } else if let Ok(index) = rest.parse::<u16>()
            // Only the name this module writes: `shard-01` or `shard-+1` would be read as
            // shard 1 while removals and new segments go to `shard-1`.
            && index.to_string() == rest
            && path.is_dir()
        {
            let state = recover_shard(&path, limits, recover_damaged, file_bytes_max)?;
            merge(&mut found.state, state);
        }
    }
    Ok(found)
}

/// One shard directory: its segments mapped and replayed.
fn recover_shard(
    path: &Path,
    limits: StateLimits,
    recover_damaged: bool,
    file_bytes_max: u64,
) -> Result<State, String> {
    let started = std::time::Instant::now();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
        let file = entry
            .map_err(|e| format!("{}: {e}", path.display()))?
            .path();
        let Some(sequence) = file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_file_name)
        else {
            continue;
        };
        files.push((sequence, file));
    }
    files.sort();
    let mut maps = Vec::with_capacity(files.len());
    for (sequence, file) in &files {
        let handle = File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let length = checked_size(file, &handle, file_bytes_max)?;
        // An empty file (a crash right after its creation) has nothing to map.
        let map = if length == 0 {
            None
        } else {
            // SAFETY: the segments of a shard directory are written only by this process
            // (one broker per data directory), and not while they are mapped here: the
            // logs that write them are opened after recovery, and the maps are dropped
            // before this function returns. The bytes are treated as hostile all the same.
            Some(
                unsafe { memmap2::Mmap::map(&handle) }
                    .map_err(|e| format!("cannot map {}: {e}", file.display()))?,
            )
        };
        maps.push((*sequence, map));
    }
    let segments: Vec<Segment<'_>> = maps
        .iter()
        .map(|(sequence, map)| Segment {
            sequence: *sequence,
            bytes: map.as_deref().unwrap_or(&[]),
        })
        .collect();
    let (state, recovery, ignored) = recover_state(&segments, limits);
    if let Some(stop) = &recovery.stop {
        let consistent = recovery.is_crash_consistent();
        let message = format!(
            "{}: replay stopped in segment {} at byte {}: {} ({} later segments not replayed)",
            path.display(),
            stop.segment,
            stop.offset,
            stop.reason,
            stop.unreplayed.len()
        );
        if consistent {
            info!("{message}: a torn tail from a crash, cut");
        } else if recover_damaged {
            warn!(
                "{message}: synced data is missing or damaged; started anyway (--recover-damaged) with what replayed before it"
            );
        } else {
            return Err(format!(
                "{message}: synced data is missing or damaged, which a crash alone does not explain. Keep a copy of the directory; start with --recover-damaged to continue with what replayed before the damage"
            ));
        }
    }
    if ignored > 0 {
        warn!(directory = %path.display(), ignored, "records that named something not there were ignored");
    }
    info!(
        directory = %path.display(),
        segments = files.len(),
        records = recovery.records,
        sessions = state.sessions.len(),
        retained = state.retained.len(),
        replay_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "durable log recovered"
    );
    Ok(state)
}

/// Adds `other` to `into`, keeping what `into` has (see the module comment).
fn merge(into: &mut State, other: State) {
    for (client_id, session) in other.sessions {
        into.sessions.entry(client_id).or_insert(session);
    }
    for (topic, message) in other.retained {
        into.retained.entry(topic).or_insert(message);
    }
    for (client_id, will) in other.pending_wills {
        into.pending_wills.entry(client_id).or_insert(will);
    }
}

/// What hands out log requests and is told of their tickets: a `Log` at start, a shard's
/// attached log at the end of a clean shutdown.
pub trait Requests {
    fn take(&mut self, requests: &mut Vec<Request>) -> Option<Ticket>;
    fn synced(&mut self, ticket: Ticket);
}

impl Requests for Log {
    fn take(&mut self, requests: &mut Vec<Request>) -> Option<Ticket> {
        let ticket = self.flush();
        self.take_requests(requests);
        ticket
    }

    fn synced(&mut self, ticket: Ticket) {
        self.on_synced(ticket);
    }
}

impl Requests for shardmq_shards::Shard {
    fn take(&mut self, requests: &mut Vec<Request>) -> Option<Ticket> {
        self.take_log_requests(requests)
    }

    fn synced(&mut self, ticket: Ticket) {
        self.on_log_synced(ticket);
    }
}

/// Carries out the requests of shard `index`'s log with blocking calls until it has none:
/// the first checkpoint at start, and what is left at the end of a clean shutdown (after the
/// reactor stopped). Every earlier ticket must have completed.
pub fn run_synchronously(
    directory: &Path,
    index: u16,
    log: &mut impl Requests,
) -> std::io::Result<()> {
    std::fs::create_dir_all(shard_directory(directory, index))?;
    let mut requests = Vec::new();
    loop {
        let ticket = log.take(&mut requests);
        if ticket.is_none() && requests.is_empty() {
            return Ok(());
        }
        execute(directory, index, &requests)?;
        requests.clear();
        if let Some(ticket) = ticket {
            log.synced(ticket);
        }
    }
}

fn execute(directory: &Path, index: u16, requests: &[Request]) -> std::io::Result<()> {
    let shard_directory = shard_directory(directory, index);
    for request in requests {
        match request {
            Request::Create { segment } => {
                File::create(segment_path(directory, index, *segment))?;
            }
            Request::Write {
                segment,
                offset,
                bytes,
            } => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(segment_path(directory, index, *segment))?;
                file.write_all_at(bytes, *offset)?;
            }
            Request::Sync {
                segment,
                directory: created,
            } => {
                File::options()
                    .write(true)
                    .open(segment_path(directory, index, *segment))?
                    .sync_data()?;
                if *created {
                    File::open(&shard_directory)?.sync_all()?;
                }
            }
            Request::Remove { segment } => {
                match std::fs::remove_file(segment_path(directory, index, *segment)) {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        return Err(error);
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}
