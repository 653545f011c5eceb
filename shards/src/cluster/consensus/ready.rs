//! raft-rs's ready cycle for the cores' group: what raft-rs hands back after a step or a
//! tick, staged for the durable store, applied, and turned into messages and committed
//! entries.
//!
//! Owns: [`Consensus::process`] and what it needs: applying committed entries to the registry
//! (in commit order, into `Consensus::committed` for the agent's route log), configuration
//! changes, compaction, and the outbox of encoded messages.
//! Invariants: a message raft-rs marks as depending on persistence (a vote, an append
//! response) leaves only once the store reports its ready synced; messages leave in the order
//! raft-rs produced them, each kind; a committed entry that does
//! not decode is skipped with a log line (it came from a peer core), never a panic; a retired
//! incarnation drops its group and rejoins as a new one.

use protobuf::Message as _;
use raft::prelude::{ConfChange, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, Storage};
use shardmq_net::frame::{NodeId, decode_entries, encode_entries};
use tracing::{info, warn};

use super::durable::Batch;
use super::store::Store;
use super::{Committed, Consensus, Registry, node_of};

/// Raft log entries kept behind the applied one before the log is compacted (a core that
/// falls further behind gets a snapshot).
const LOG_KEEP: u64 = 1_000;

impl Consensus {
    /// Runs raft-rs's ready cycle (its asynchronous form): what a ready asks to persist is
    /// put in raft-rs's cache at once and staged for the durable store; messages that depend
    /// on it wait until the store reports it synced (`files_done`); a leader's own messages
    /// leave at once (Raft thesis 10.2.1: the leader counts itself in a quorum only once its
    /// entries are persisted, which raft-rs does). Committed entries are applied in order.
    pub fn process(&mut self) {
        for _ in 0..8 {
            // The node is out of `self` for one cycle, so that applying entries can reach the
            // registry and the storage at once; it is put back unless the cycle retired it.
            let Some(mut raw) = self.raw.take() else {
                return;
            };
            if !raw.has_ready() {
                self.raw = Some(raw);
                break;
            }
            let mut ready = raw.ready();
            let number = ready.number();
            self.collect(ready.take_messages());
            let mut batch = Batch::default();
            if !ready.snapshot().is_empty() {
                batch.snapshot = self.take_snapshot(&mut raw, ready.snapshot().clone());
            }
            let committed = ready.take_committed_entries();
            self.apply(&mut raw, committed);
            if self.retired {
                // The group is dropped with the node (`reset` forgets it).
                self.retired = false;
                self.reset();
                self.hold = false;
                return;
            }
            batch.entries = ready.take_entries();
            if let Err(error) = raw.mut_store().mem.wl().append(&batch.entries) {
                warn!(%error, "Raft entries not appended");
            }
            if let Some(hard) = ready.hs() {
                raw.mut_store().mem.wl().set_hardstate(hard.clone());
                batch.hard = Some(hard.clone());
            }
            let persisted = ready.take_persisted_messages();
            raw.advance_append_async(ready);
            let now = match &mut self.disk {
                None => true,
                Some(disk) => disk.stage(batch, number),
            };
            if now {
                raw.on_persist_ready(number);
                self.collect(persisted);
            } else if self.disk.as_ref().is_some_and(|d| d.failed.is_none())
                && !persisted.is_empty()
            {
                self.held.push_back((number, persisted));
            }
            // A failed store never persists them: they are dropped (this core no longer
            // answers, as if it had crashed).
            advance_applied(&mut raw);
            compact(raw.mut_store());
            self.raw = Some(raw);
        }
        self.after_step();
    }

    /// Applies the leader's snapshot to raft-rs's cache and the registry; returns it to be
    /// persisted if it was taken.
    fn take_snapshot(&mut self, raw: &mut RawNode<Store>, snapshot: Snapshot) -> Option<Snapshot> {
        let entries = match decode_entries(snapshot.get_data()) {
            Ok(entries) => entries,
            Err(error) => {
                warn!(%error, "Raft snapshot data does not decode: ignored");
                return None;
            }
        };
        let meta = snapshot.get_metadata();
        let store = raw.mut_store();
        let (index, term, conf) = (meta.index, meta.term, meta.get_conf_state().clone());
        if let Err(error) = store.mem.wl().apply_snapshot(snapshot.clone()) {
            warn!(%error, "Raft snapshot not applied");
            return None;
        }
        store.applied = index;
        store.applied_term = term;
        store.conf = conf;
        store.registry = snapshot.get_data().to_vec();
        info!(index, "registry replaced by the leader's snapshot");
        self.registry = Registry::from_entries(&entries);
        self.committed.push(Committed::Snapshot);
        Some(snapshot)
    }

    pub(super) fn collect(&mut self, messages: Vec<Message>) {
        for message in messages {
            let Some(to) = node_of(message.to) else {
                continue;
            };
            match message.write_to_bytes() {
                Ok(bytes) => self.outbox.push((to, bytes)),
                Err(error) => warn!(%error, "Raft message does not encode"),
            }
        }
    }

    fn apply(&mut self, raw: &mut RawNode<Store>, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut last = (0, 0);
        for entry in entries {
            last = (entry.index, entry.term);
            if entry.data.is_empty() {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryConfChange => {
                    let mut change = ConfChange::default();
                    if let Err(error) = change.merge_from_bytes(&entry.data) {
                        warn!(%error, "committed Raft configuration change does not decode");
                        continue;
                    }
                    match raw.apply_conf_change(&change) {
                        Ok(conf) if !conf.voters.contains(&self.id) && !conf.voters.is_empty() => {
                            // This incarnation was retired: drop the group and join again as a
                            // new one (the leader adds it, as the registry lists this core).
                            warn!(
                                "this core's Raft identifier was removed from the voters: rejoining as a new one"
                            );
                            self.retired = true;
                            break;
                        }
                        Ok(conf) => {
                            info!(
                                voters = ?conf.voters.iter().filter_map(|&v| node_of(v)).collect::<Vec<_>>(),
                                "the cores' voters changed"
                            );
                            raw.mut_store().mem.wl().set_conf_state(conf.clone());
                            raw.mut_store().conf = conf;
                        }
                        Err(error) => warn!(%error, "Raft configuration change not applied"),
                    }
                }
                EntryType::EntryConfChangeV2 => {}
                EntryType::EntryNormal => match decode_entries(&entry.data) {
                    Ok(decoded) => {
                        for item in decoded {
                            self.registry.apply(&item);
                            self.committed.push(Committed::Entry(item));
                        }
                    }
                    Err(error) => warn!(%error, "committed Raft entry does not decode: skipped"),
                },
            }
        }
        let store = raw.mut_store();
        store.applied = last.0;
        store.applied_term = last.1;
        store.registry = encode_entries(&self.registry.entries());
    }

    /// The Raft messages to send, by core.
    pub fn take_outbox(&mut self) -> Vec<(NodeId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }
}

/// Tells raft-rs how far the registry has applied, as far as that is persisted too (a
/// snapshot from the leader is applied to the registry at once but counts only once synced;
/// raft-rs refuses an applied index beyond what is persisted).
pub(super) fn advance_applied(raw: &mut RawNode<Store>) {
    let log = &raw.raft.raft_log;
    let target = raw.store().applied.min(log.persisted).min(log.committed);
    if target > log.applied {
        raw.advance_apply_to(target);
    }
}

/// Drops log entries far behind the applied one.
fn compact(store: &mut Store) {
    let first = store.mem.first_index().unwrap_or(1);
    if store.applied > first + 2 * LOG_KEEP {
        let _ = store.mem.wl().compact(store.applied - LOG_KEEP);
    }
}
