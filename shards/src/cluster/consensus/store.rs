//! The Raft group's storage: raft-rs's in-memory storage with snapshots that carry the
//! registry, its saved form for the data directory, and raft-rs's log records.
//!
//! Owns: [`Store`], [`Consensus::save`] and [`Consensus::restore`] (a saved state is a file
//! from outside: every length is checked before use, and a bad one is an error, never a
//! panic), and the slog drain that hands raft-rs's records to `tracing`.
//! Invariant: a saved state holds exactly what the core acknowledged (it is written only once
//! the core stopped taking part), so a core that takes it up rejoins as the voter it was.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use shardmq_net::frame::decode_entries;
use tracing::info;

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
    /// This core's Raft state at a clean shutdown, for the data directory: its identifier,
    /// hard state, the registry as of the last applied entry, and the log after it. `None`
    /// outside a group. Saved only once the core has stopped taking part, so that it holds
    /// exactly what the core acknowledged.
    pub fn save(&self) -> Option<Vec<u8>> {
        let raw = self.raw.as_ref()?;
        let store = raw.store();
        if store.conf.voters.is_empty() {
            return None;
        }
        let snapshot = store.snapshot(0, 0).ok()?;
        let hard = store.mem.rl().hard_state().clone();
        let first = store.applied + 1;
        let last = store.mem.last_index().ok()?;
        let entries = if last >= first {
            store
                .mem
                .entries(first, last + 1, None, GetEntriesContext::empty(false))
                .ok()?
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&self.id.to_le_bytes());
        let mut part = |bytes: Vec<u8>| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        };
        part(hard.write_to_bytes().ok()?);
        part(snapshot.write_to_bytes().ok()?);
        for entry in &entries {
            part(entry.write_to_bytes().ok()?);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Some(out)
    }

    /// Takes up the state [`Consensus::save`] wrote at the last clean shutdown: the same
    /// identifier, votes and log, so the core rejoins its group as the voter it was.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
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
