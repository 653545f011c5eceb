//! The Raft group's storage: raft-rs's in-memory storage (the cache raft-rs reads) with
//! snapshots that carry the registry, the durable store's start and completions, the old
//! shutdown file of earlier versions, and raft-rs's log records.
//!
//! Owns: [`Store`], [`Consensus::open_store`], [`Consensus::take_file_calls`] and
//! [`Consensus::files_done`] (the file format and writer are `durable.rs`), the reading of an
//! old `raft.state` (a file from outside: every length is checked before use, and a bad one is
//! an error, never a panic), and the slog drain that hands raft-rs's records to `tracing`.
//! Invariant: what the durable store holds is everything this identifier acknowledged, so a
//! core that takes it up rejoins as the voter it was.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use shardmq_net::frame::decode_entries;
use tracing::{info, warn};

use super::durable::{self, Disk, RaftFileCall, RaftStoreFiles};
use super::{Committed, Consensus, Registry, node_of};

/// The first bytes of a saved Raft state.
const STATE_MAGIC: &[u8; 8] = b"SMQRAFT1";

/// In-memory Raft storage whose snapshots carry the registry as of the last applied entry
/// (raft-rs's `MemStorage` alone snapshots at the commit index with no data).
pub(super) struct Store {
    pub(super) mem: MemStorage,
    pub(super) applied: u64,
    pub(super) applied_term: u64,
    pub(super) conf: ConfState,
    pub(super) registry: Vec<u8>,
}

impl Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        self.mem.term(index)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if request_index > self.applied || self.applied == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_data(self.registry.clone().into());
        let meta = snapshot.mut_metadata();
        meta.index = self.applied;
        meta.term = self.applied_term;
        meta.set_conf_state(self.conf.clone());
        Ok(snapshot)
    }
}

impl Consensus {
    /// Takes up the durable Raft state the data directory holds (shard 0 of a core, before
    /// it runs), and from then on persists every ready there before what depends on it
    /// leaves: the same identifier, votes and log, so the core rejoins as the voter it was,
    /// after a crash too. Without segments, the old shutdown file (`raft.state`) is taken up
    /// once, and removed once the store holds its state. An error means synced state is
    /// damaged or missing: the caller refuses to start.
    pub fn open_store(&mut self, files: RaftStoreFiles) -> Result<(), String> {
        let recovery = durable::recover(&files.segments)?;
        if !recovery.skipped.is_empty() {
            warn!(
                segments = ?recovery.skipped,
                "Raft segments whose checkpoint a crash cut short: replaced"
            );
        }
        self.disk = Some(Disk::new(&recovery, files.legacy.is_some()));
        let Some(state) = recovery.state else {
            if let Some(bytes) = files.legacy
                && let Err(error) = self.restore(&bytes)
            {
                warn!(%error, "the Raft state of the last shutdown is not taken up: joining as a new voter");
            }
            return Ok(());
        };
        if files.legacy.is_some() {
            warn!(
                "both a durable Raft store and an old raft.state: the store is taken, the old file removed"
            );
        }
        if node_of(state.id) != Some(self.node) {
            return Err(format!(
                "the Raft store is of node {:?}, this is node {}",
                node_of(state.id),
                self.node
            ));
        }
        if state.torn_bytes > 0 {
            warn!(
                bytes = state.torn_bytes,
                segment = state.sequence,
                "the Raft store's last write was cut short by a crash: cut"
            );
        }
        let id = state.id;
        let store = state.into_store()?;
        let registry = if store.registry.is_empty() {
            Vec::new()
        } else {
            decode_entries(&store.registry)
                .map_err(|e| format!("the stored Raft snapshot's registry does not decode: {e}"))?
        };
        let applied = store.applied;
        self.id = id;
        self.registry = Registry::from_entries(&registry);
        self.make(store)?;
        self.committed.push(Committed::Snapshot);
        info!(applied, "durable Raft state taken up");
        Ok(())
    }

    /// The file calls the store needs carried out now, in order (one batch of the event loop:
    /// what was staged since the last call goes out as one write and one sync).
    pub fn take_file_calls(&mut self) -> Vec<RaftFileCall> {
        let Some(disk) = &mut self.disk else {
            return Vec::new();
        };
        disk.flush(self.raw.as_ref().map(|raw| (raw.store(), self.id)));
        disk.take_calls()
    }

    /// The reactor completed file call `tag`: raft-rs learns what is persisted, and the
    /// messages that waited for it are let out.
    pub fn files_done(&mut self, tag: u64, result: Result<(), String>) {
        let Some(disk) = &mut self.disk else {
            return;
        };
        let Some(number) = disk.done(tag, result) else {
            return;
        };
        if let Some(raw) = &mut self.raw {
            raw.on_persist_ready(number);
            super::ready::advance_applied(raw);
        }
        while self.held.front().is_some_and(|(n, _)| *n <= number) {
            if let Some((_, messages)) = self.held.pop_front() {
                self.collect(messages);
            }
        }
    }

    /// Whether the store has nothing staged or in flight (true without a store).
    pub fn store_idle(&self) -> bool {
        self.disk.as_ref().is_none_or(Disk::is_idle)
    }

    /// The error that stopped the store, if one did.
    pub fn store_failure(&self) -> Option<&str> {
        self.disk.as_ref()?.failed.as_deref()
    }

    /// Takes up the state an earlier version wrote at its last clean shutdown (`raft.state`):
    /// the same identifier, votes and log, so the core rejoins its group as the voter it was.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or("the Raft state is truncated")?;
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err("the Raft state's checksum does not match".into());
        }
        let rest = body
            .strip_prefix(STATE_MAGIC)
            .ok_or("not a shardmq Raft state")?;
        let (id, mut rest) = rest.split_first_chunk::<8>().ok_or("truncated")?;
        let id = u64::from_le_bytes(*id);
        if node_of(id) != Some(self.node) {
            return Err(format!(
                "the Raft state is of node {:?}, this is node {}",
                node_of(id),
                self.node
            ));
        }
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_first_chunk::<4>().ok_or("truncated")?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err("the Raft state is truncated".into());
            }
            parts.push(&tail[..len]);
            rest = &tail[len..];
        }
        let [hard, snapshot, entries @ ..] = parts.as_slice() else {
            return Err("the Raft state misses its hard state or snapshot".into());
        };
        let hard = HardState::parse_from_bytes(hard).map_err(|e| e.to_string())?;
        let snapshot = Snapshot::parse_from_bytes(snapshot).map_err(|e| e.to_string())?;
        let entries: Vec<Entry> = entries
            .iter()
            .map(|e| Entry::parse_from_bytes(e).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let registry = decode_entries(snapshot.get_data())?;
        let meta = snapshot.get_metadata().clone();
        let mem = MemStorage::new();
        mem.wl()
            .apply_snapshot(snapshot.clone())
            .map_err(|e| e.to_string())?;
        mem.wl().append(&entries).map_err(|e| e.to_string())?;
        mem.wl().set_hardstate(hard);
        let store = Store {
            mem,
            applied: meta.index,
            applied_term: meta.term,
            conf: meta.get_conf_state().clone(),
            registry: snapshot.get_data().to_vec(),
        };
        self.id = id;
        self.registry = Registry::from_entries(&registry);
        self.make(store)?;
        self.committed.push(Committed::Snapshot);
        info!(
            applied = meta.index,
            "Raft state of the last clean shutdown taken up"
        );
        Ok(())
    }
}

/// raft-rs logs through slog; this hands its records to `tracing` under the target
/// `shardmq::raft` (its informational chatter at debug level).
pub(super) struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        _values: &slog::OwnedKVList,
    ) -> Result<Self::Ok, Self::Err> {
        let message = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "shardmq::raft", "{message}")
            }
            slog::Level::Warning => tracing::warn!(target: "shardmq::raft", "{message}"),
            slog::Level::Info | slog::Level::Debug => {
                tracing::debug!(target: "shardmq::raft", "{message}")
            }
            slog::Level::Trace => tracing::trace!(target: "shardmq::raft", "{message}"),
        }
        Ok(())
    }
}
