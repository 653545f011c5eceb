//! The crash-safe switch of the data directory's shard layout at start: every start writes
//! each shard's first checkpoint, and a start may change the shard count (sessions and
//! retained topics then move between shards), so the new logs replace the old ones in two
//! phases.
//!
//! Owns: `DIR/shards.next/` (the staging directory), its marker `DIR/shards.next/SWITCH`,
//! the order of the steps below, recovery of a switch a crash interrupted, and the test hook
//! `SHARDMQ_FAULT_INJECT=crash-start:STEP`.
//! Never: reads or writes records (`durable.rs` and `shards/src/storage/` do), or runs once a
//! shard serves.
//!
//! The steps, each durable before the next begins:
//! 1. `begin`: `DIR/shards.next/` created, `DIR` fsynced.
//! 2. Each shard's first checkpoint written into `DIR/shards.next/shard-N/` with blocking
//!    calls (`durable::run_synchronously`): segment fdatasynced, its directory fsynced.
//! 3. `commit`: `DIR/shards.next` fsynced (the shard directories' names), then the marker
//!    written to `SWITCH.tmp`, fdatasynced, renamed to `SWITCH`, `DIR/shards.next` fsynced.
//!    Up to here nothing old was touched: a crash or an error (a full disk) leaves the old
//!    logs whole, and the staging directory is removed (at once after an error, at the next
//!    start after a crash: no marker means roll back).
//! 4. Roll forward (the marker is there, so every new checkpoint is durable): for each
//!    staged `shard-N`, the old `DIR/shard-N` removed and the staged one renamed into its
//!    place, `DIR` and `DIR/shards.next` fsynced after each; then the directories of shards at or past the marker's
//!    count and the old snapshots (`DIR/shard-N.snapshot`) removed, `DIR` fsynced; then the
//!    marker removed and the staging directory with it, `DIR` fsynced. Every step of 4 can be
//!    done again: a start that finds the marker does the rest of it before reading anything.
//!
//! Why a staging directory rather than checkpoints in place: a shard's new checkpoint replaces
//! its old segments, but those old segments also hold sessions and retained topics that the
//! new count gives to other shards; removing them before every other shard's checkpoint is
//! durable could lose those (a crash or a full disk in between).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::supervise::FAULT_INJECT_VARIABLE;

/// The staging directory's name inside the data directory.
pub const STAGING: &str = "shards.next";
/// The marker's name inside the staging directory: its presence means roll forward.
pub const MARKER: &str = "SWITCH";
const MARKER_TEMPORARY: &str = "SWITCH.tmp";
/// The marker's first line; the second is `shards = N`.
const MARKER_HEAD: &str = "shardmq shard layout switch 1";
/// A marker is a few dozen bytes: anything larger is not one.
const MARKER_BYTES_MAX: u64 = 256;
/// The fault-injection prefix this module reads (see [`CrashStep`]).
pub const CRASH_START_PREFIX: &str = "crash-start:";

/// Where `SHARDMQ_FAULT_INJECT=crash-start:STEP` makes the start abort (a test hook for the
/// crash tests of the switch; only the process environment sets it, never a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashStep {
    /// Shard 0's checkpoint is staged, the other shards' not yet (no marker).
    Staging,
    /// Every checkpoint is staged and synced, no marker yet.
    Staged,
    /// The marker is durable, nothing old removed yet.
    Marked,
    /// Shard 0's new directory is in place, the others are still staged.
    Moving,
    /// Every new directory is in place; old shards past the count and old snapshots remain.
    Moved,
    /// Everything old is removed; the marker and staging directory remain.
    Removed,
}

impl CrashStep {
    pub const ALL: [CrashStep; 6] = [
        CrashStep::Staging,
        CrashStep::Staged,
        CrashStep::Marked,
        CrashStep::Moving,
        CrashStep::Moved,
        CrashStep::Removed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CrashStep::Staging => "staging",
            CrashStep::Staged => "staged",
            CrashStep::Marked => "marked",
            CrashStep::Moving => "moving",
            CrashStep::Moved => "moved",
            CrashStep::Removed => "removed",
        }
    }

    /// `crash-start:STEP` from the fault-injection variable; `Ok(None)` for no variable or
    /// one of the shard faults (`supervise.rs` reads those).
    pub fn from_environment() -> Result<Option<Self>, String> {
        let Ok(text) = std::env::var(FAULT_INJECT_VARIABLE) else {
            return Ok(None);
        };
        let Some(name) = text.trim().strip_prefix(CRASH_START_PREFIX) else {
            return Ok(None);
        };
        let step = Self::ALL
            .into_iter()
            .find(|step| step.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "{FAULT_INJECT_VARIABLE}={text:?}: expected crash-start:STEP, STEP one of {}",
                    names.join(", ")
                )
            })?;
        warn!(
            "FAULT INJECTION IS ON ({FAULT_INJECT_VARIABLE}): the start aborts at the shard layout step {:?}; this is a testing aid, never set it in production",
            step.name()
        );
        Ok(Some(step))
    }
}

fn crash_at(fault: Option<CrashStep>, step: CrashStep) {
    if fault == Some(step) {
        // stderr is unbuffered: the line is out before the abort.
        eprintln!(
            "{FAULT_INJECT_VARIABLE}: aborting at the shard layout step {:?}",
            step.name()
        );
        std::process::abort();
    }
}

fn sync_directory(path: &Path) -> Result<(), String> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync the directory {}: {e}", path.display()))
}

/// `shard-N` with N as this program writes it (`shard-01` is not shard 1).
fn shard_index(name: &str) -> Option<u16> {
    let rest = name.strip_prefix("shard-")?;
    let index: u16 = rest.parse().ok()?;
    (index.to_string() == rest).then_some(index)
}

/// Runs first at start, before anything is read: finishes a switch whose marker is durable
/// (roll forward) or discards a staging directory without one (roll back: the old logs were
/// never touched).
pub fn resume(directory: &Path, fault: Option<CrashStep>) -> Result<(), String> {
    let staging = directory.join(STAGING);
    if !staging.exists() {
        return Ok(());
    }
    let marker = staging.join(MARKER);
    if marker.exists() {
        let shard_count = read_marker(&marker)?;
        warn!(
            staging = %staging.display(),
            shard_count,
            "a shard layout switch was interrupted after its new checkpoints were durable: finishing it"
        );
        roll_forward(directory, shard_count, fault)?;
        info!("the interrupted shard layout switch is finished");
    } else {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| format!("cannot remove {}: {e}", staging.display()))?;
        sync_directory(directory)?;
        warn!(
            staging = %staging.display(),
            "a shard layout switch was interrupted before its new checkpoints were all durable: rolled back (the old logs were not touched)"
        );
    }
    Ok(())
}

fn read_marker(marker: &Path) -> Result<u16, String> {
    let damaged = |why: String| {
        format!(
            "{} is damaged ({why}): a shard layout switch was under way and cannot be finished or undone safely by itself. Keep a copy of the data directory and restore it from a backup",
            marker.display()
        )
    };
    let size = std::fs::metadata(marker)
        .map_err(|e| damaged(e.to_string()))?
        .len();
    if size > MARKER_BYTES_MAX {
        return Err(damaged(format!("{size} bytes")));
    }
    let text = std::fs::read_to_string(marker).map_err(|e| damaged(e.to_string()))?;
    let mut lines = text.lines();
    if lines.next() != Some(MARKER_HEAD) {
        return Err(damaged("not a switch marker".into()));
    }
    lines
        .next()
        .and_then(|line| line.strip_prefix("shards = "))
        .and_then(|count| count.parse::<u16>().ok())
        .filter(|&count| count > 0)
        .ok_or_else(|| damaged("no shard count".into()))
}

/// A switch under way: the new checkpoints go into [`Switch::staging`].
pub struct Switch {
    directory: PathBuf,
    staging: PathBuf,
    shard_count: u16,
    fault: Option<CrashStep>,
}

impl Switch {
    /// Creates the staging directory (after [`resume`], so none is left).
    pub fn begin(
        directory: &Path,
        shard_count: u16,
        fault: Option<CrashStep>,
    ) -> Result<Self, String> {
        let staging = directory.join(STAGING);
        std::fs::create_dir(&staging)
            .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
        let switch = Self {
            directory: directory.to_path_buf(),
            staging,
            shard_count,
            fault,
        };
        sync_directory(directory).map_err(|e| switch.fail(e))?;
        Ok(switch)
    }

    /// The directory the new shards' logs are written in (as `shard-N/` inside it) until
    /// [`commit`](Self::commit).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Shard `index`'s checkpoint is staged and synced.
    pub fn staged(&self, index: u16) {
        if index == 0 && self.shard_count > 1 {
            crash_at(self.fault, CrashStep::Staging);
        }
    }

    /// After an error before the marker: removes the staging directory (the old logs are
    /// whole) and returns the start's error message.
    pub fn fail(&self, error: String) -> String {
        let cleanup = std::fs::remove_dir_all(&self.staging)
            .map_err(|e| e.to_string())
            .and_then(|()| sync_directory(&self.directory));
        match cleanup {
            Ok(()) => format!(
                "{error}. The shard layout was not changed: the old logs are intact, and the new ones staged in {} were removed",
                self.staging.display()
            ),
            Err(cleanup) => format!(
                "{error}. The shard layout was not changed: the old logs are intact; {} could not be removed ({cleanup}) and is discarded at the next start",
                self.staging.display()
            ),
        }
    }

    /// Every shard's checkpoint is staged: makes the switch durable with the marker, then
    /// puts the new shards in place and removes the old logs and snapshots.
    pub fn commit(self) -> Result<(), String> {
        crash_at(self.fault, CrashStep::Staged);
        self.write_marker().map_err(|e| self.fail(e))?;
        crash_at(self.fault, CrashStep::Marked);
        roll_forward(&self.directory, self.shard_count, self.fault)
    }

    fn write_marker(&self) -> Result<(), String> {
        sync_directory(&self.staging)?;
        let temporary = self.staging.join(MARKER_TEMPORARY);
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(format!("{MARKER_HEAD}\nshards = {}\n", self.shard_count).as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, self.staging.join(MARKER))
        };
        write().map_err(|e| {
            format!(
                "cannot write the switch marker in {}: {e}",
                self.staging.display()
            )
        })?;
        sync_directory(&self.staging)
    }
}

/// Step 4 of the module comment; safe to run again from any point of it.
fn roll_forward(
    directory: &Path,
    shard_count: u16,
    fault: Option<CrashStep>,
) -> Result<(), String> {
    let staging = directory.join(STAGING);
    let list = |path: &Path| -> Result<Vec<(String, PathBuf)>, String> {
        let mut entries = std::fs::read_dir(path)
            .map_err(|e| format!("cannot list {}: {e}", path.display()))?
            .map(|entry| {
                entry
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .map_err(|e| format!("cannot list {}: {e}", path.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort();
        Ok(entries)
    };
    let mut moved = 0usize;
    for (name, path) in list(&staging)? {
        if name == MARKER || name == MARKER_TEMPORARY {
            continue;
        }
        match shard_index(&name) {
            Some(index) if index < shard_count && path.is_dir() => {}
            _ => {
                return Err(format!(
                    "{} is not part of a switch to {shard_count} shards: the staging directory was changed by hand. Keep a copy of the data directory and restore it from a backup",
                    path.display()
                ));
            }
        }
        let target = directory.join(&name);
        match std::fs::remove_dir_all(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot remove {}: {e}", target.display()));
            }
            _ => {}
        }
        std::fs::rename(&path, &target).map_err(|e| {
            format!(
                "cannot move {} to {}: {e}",
                path.display(),
                target.display()
            )
        })?;
        // Both directories of the rename: the name durable where it now is, and gone from
        // where it was.
        sync_directory(directory)?;
        sync_directory(&staging)?;
        moved += 1;
        if moved == 1 && shard_count > 1 {
            crash_at(fault, CrashStep::Moving);
        }
    }
    crash_at(fault, CrashStep::Moved);
    for (name, path) in list(directory)? {
        if let Some(index) = shard_index(&name) {
            if index >= shard_count && path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
                info!(directory = %path.display(), "log of a shard that no longer exists removed: its state is in the current shards' logs");
            }
        } else if name
            .strip_suffix(".snapshot")
            .and_then(shard_index)
            .is_some()
        {
            std::fs::remove_file(&path)
                .map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
            info!(file = %path.display(), "old shutdown snapshot removed: its state is in the logs");
        }
    }
    sync_directory(directory)?;
    crash_at(fault, CrashStep::Removed);
    std::fs::remove_dir_all(&staging)
        .map_err(|e| format!("cannot remove {}: {e}", staging.display()))?;
    sync_directory(directory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("shardmq-layout-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    fn names(path: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn old_layout(directory: &Path, shards: u16) {
        for index in 0..shards {
            let shard = directory.join(format!("shard-{index}"));
            std::fs::create_dir_all(&shard).unwrap();
            std::fs::write(shard.join("old.log"), b"old").unwrap();
        }
        std::fs::write(directory.join("shard-0.snapshot"), b"snap").unwrap();
    }

    fn stage(switch: &Switch, shards: u16) {
        for index in 0..shards {
            let shard = switch.staging().join(format!("shard-{index}"));
            std::fs::create_dir_all(&shard).unwrap();
            std::fs::write(shard.join("new.log"), b"new").unwrap();
        }
    }

    #[test]
    fn a_commit_replaces_every_old_shard_and_snapshot() {
        let directory = scratch("commit");
        old_layout(&directory, 3);
        let switch = Switch::begin(&directory, 2, None).unwrap();
        stage(&switch, 2);
        switch.commit().unwrap();
        assert_eq!(names(&directory), ["shard-0", "shard-1"]);
        assert_eq!(names(&directory.join("shard-1")), ["new.log"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_staging_directory_without_marker_is_rolled_back() {
        let directory = scratch("rollback");
        old_layout(&directory, 2);
        let switch = Switch::begin(&directory, 3, None).unwrap();
        stage(&switch, 3);
        drop(switch);
        resume(&directory, None).unwrap();
        assert_eq!(
            names(&directory),
            ["shard-0", "shard-0.snapshot", "shard-1"]
        );
        assert_eq!(names(&directory.join("shard-1")), ["old.log"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_marked_switch_is_finished_from_any_point() {
        let directory = scratch("forward");
        old_layout(&directory, 1);
        let switch = Switch::begin(&directory, 3, None).unwrap();
        stage(&switch, 3);
        switch.write_marker().unwrap();
        // As if shard 0 was already moved before a crash.
        std::fs::remove_dir_all(directory.join("shard-0")).unwrap();
        std::fs::rename(
            directory.join(STAGING).join("shard-0"),
            directory.join("shard-0"),
        )
        .unwrap();
        resume(&directory, None).unwrap();
        assert_eq!(names(&directory), ["shard-0", "shard-1", "shard-2"]);
        for index in 0..3 {
            assert_eq!(
                names(&directory.join(format!("shard-{index}"))),
                ["new.log"]
            );
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_damaged_marker_or_a_stranger_in_staging_stops_the_start() {
        let directory = scratch("damaged");
        old_layout(&directory, 1);
        let staging = directory.join(STAGING);
        std::fs::create_dir_all(staging.join("shard-7")).unwrap();
        std::fs::write(
            staging.join(MARKER),
            "shardmq shard layout switch 1\nshards = 2\n",
        )
        .unwrap();
        let error = resume(&directory, None).unwrap_err();
        assert!(error.contains("shard-7"), "{error}");
        std::fs::write(staging.join(MARKER), "garbage").unwrap();
        let error = resume(&directory, None).unwrap_err();
        assert!(error.contains("is damaged"), "{error}");
        std::fs::write(staging.join(MARKER), vec![b'x'; 4096]).unwrap();
        assert!(resume(&directory, None).is_err());
        // Nothing old was touched.
        assert_eq!(names(&directory.join("shard-0")), ["old.log"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
