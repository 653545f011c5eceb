//! The cores' Raft group: membership, roles and cluster-wide settings, agreed by consensus.
//!
//! Owns, on shard 0 of a core: a raft-rs [`RawNode`] over in-memory storage, the [`Registry`]
//! its committed entries build (the members with their roles, which of them are down, the
//! cluster-wide settings), and the founding handshake.
//! Never: does I/O, reads a clock or draws randomness of its own. Whenever raft-rs draws a
//! new randomized election timeout (from the thread's generator), it is replaced at once by
//! one from the node's seeded generator, so a simulation replays exactly.
//!
//! How a group starts: a core that is not in a group yet tells every core it links to which
//! voters it would found the group with (`GroupState`): itself and the cores of its configured
//! seed list, once it has reached all of them. When every one of those cores names the same
//! voters and none is in a group yet, each of them founds the group with them: the same
//! initial configuration on every founder. A core that finds a group already running waits
//! until the leader adds it (it then receives the leader's messages and a snapshot).
//! What the group decides is the leader's to propose (see `Agent::govern`); every core applies
//! what is committed, in order, and mirrors it into its route log, so the edges following any
//! core see the same membership.
//!
//! Storage is in memory, so a Raft identity lives exactly as long as the state it stands for:
//! a core takes a new Raft identifier (its node identifier with a fresh incarnation above it)
//! at every start and whenever it drops its group. A restarted core therefore joins as a new
//! voter, and the leader retires the old identifier; no voter ever forgets a vote or a log it
//! acknowledged under the same identifier, which Raft's safety rests on.
//! A core whose group has had no leader for `LEADERLESS_TIMEOUTS` election timeouts (the
//! majority of cores is gone) drops the group and founds a new one with the cores of its seed
//! list once they agree again. The membership is rebuilt from the links; the cluster-wide
//! settings of the lost group are not carried over.

use std::collections::{BTreeMap, BTreeSet};

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, Snapshot,
};
use raft::storage::MemStorage;
use raft::{Config, GetEntriesContext, RaftState, RawNode, StateRole, Storage, StorageError};
use shardmq_net::frame::{LogEntry, Member, NodeId, Role, decode_entries, encode_entries};
use tracing::{debug, info, warn};

use super::splitmix;

/// The settings the cluster holds one value of, with what each accepts.
pub const SETTINGS: &[(&str, &str)] = &[
    ("down_grace_seconds", "0 to 86400"),
    ("forward_queue_max", "1 to 100000000"),
    ("takeover_timeout_ms", "1 to 600000"),
];

/// Checks a cluster-wide setting; the error says what is accepted.
pub fn check_setting(key: &str, value: &str) -> Result<u64, String> {
    let Some((_, accepted)) = SETTINGS.iter().find(|(k, _)| *k == key) else {
        let known: Vec<&str> = SETTINGS.iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "{key:?} is not a cluster-wide setting (known: {})",
            known.join(", ")
        ));
    };
    let range = match key {
        "down_grace_seconds" => 0..=86_400,
        "forward_queue_max" => 1..=100_000_000,
        _ => 1..=600_000,
    };
    value
        .parse::<u64>()
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| format!("{key} must be a whole number from {accepted}, not {value:?}"))
}

/// What the committed entries of the group have built.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registry {
    pub members: BTreeMap<NodeId, Member>,
    pub down: BTreeSet<NodeId>,
    pub settings: BTreeMap<String, String>,
    /// Nodes removed and not back since: their Raft voters are retired.
    pub removed: BTreeSet<NodeId>,
}

impl Registry {
    fn apply(&mut self, entry: &LogEntry) {
        match entry {
            LogEntry::Joined(member) => {
                self.down.remove(&member.node);
                self.removed.remove(&member.node);
                self.members.insert(member.node, member.clone());
            }
            LogEntry::Down(node) => {
                if self.members.contains_key(node) {
                    self.down.insert(*node);
                }
            }
            LogEntry::Up(node) => {
                self.down.remove(node);
            }
            LogEntry::Removed(node) => {
                self.members.remove(node);
                self.down.remove(node);
                self.removed.insert(*node);
            }
            LogEntry::Setting { key, value } => {
                self.settings.insert(key.clone(), value.clone());
            }
            LogEntry::Route { .. } | LogEntry::Replace { .. } => {}
        }
    }

    /// The registry as entries that build it from nothing (a snapshot's data).
    pub fn entries(&self) -> Vec<LogEntry> {
        let members = self.members.values().cloned().map(LogEntry::Joined);
        let down = self.down.iter().copied().map(LogEntry::Down);
        let removed = self.removed.iter().copied().map(LogEntry::Removed);
        let settings = self.settings.iter().map(|(key, value)| LogEntry::Setting {
            key: key.clone(),
            value: value.clone(),
        });
        removed.chain(members).chain(down).chain(settings).collect()
    }

    fn from_entries(entries: &[LogEntry]) -> Self {
        let mut registry = Self::default();
        for entry in entries {
            registry.apply(entry);
        }
        registry
    }
}

/// The node of a Raft identifier: its low 32 bits (the incarnation is above them).
fn node_of(id: u64) -> Option<NodeId> {
    (id != 0).then_some(id as NodeId)
}

/// In-memory Raft storage whose snapshots carry the registry as of the last applied entry
/// (raft-rs's `MemStorage` alone snapshots at the commit index with no data).
struct Store {
    mem: MemStorage,
    applied: u64,
    applied_term: u64,
    conf: ConfState,
    registry: Vec<u8>,
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

/// What the agent mirrors into its route log, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    Entry(LogEntry),
    /// The registry was replaced by a snapshot from the leader.
    Snapshot,
}

/// The group as one core sees it, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsensusStatus {
    pub initialized: bool,
    /// "leader", "follower", "candidate", "pre-candidate", or "waiting" before the core is in
    /// a group.
    pub state: &'static str,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    /// The voters this core would found the group with, while it waits to.
    pub founders: Vec<NodeId>,
    /// This core's Raft identifier (incarnation above, node below).
    pub id: u64,
    /// The voters' Raft identifiers, sorted.
    pub voter_ids: Vec<u64>,
}

/// A group without a leader for this many election timeouts is dropped (see the module
/// documentation).
const LEADERLESS_TIMEOUTS: u64 = 10;

/// The first bytes of a saved Raft state.
const STATE_MAGIC: &[u8; 8] = b"SMQRAFT1";

/// Raft log entries kept behind the applied one before the log is compacted (a core that
/// falls further behind gets a snapshot).
const LOG_KEEP: u64 = 1_000;

/// What a core said of itself in its last `GroupState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub initialized: bool,
    pub id: u64,
    pub founders: Vec<u64>,
}

pub struct Consensus {
    node: NodeId,
    raw: Option<RawNode<Store>>,
    logger: slog::Logger,
    random: u64,
    election_tick: usize,
    tick_ms: u64,
    next_tick_ms: u64,
    /// The role, term and election timeout raft-rs had when we last looked: a change of any
    /// of them means it drew a timeout of its own, which we replace.
    seen: (StateRole, u64, usize),
    pub registry: Registry,
    pub committed: Vec<Committed>,
    outbox: Vec<(NodeId, Vec<u8>)>,
    /// What each core said of its group state.
    heard: BTreeMap<NodeId, Heard>,
    /// The Raft identifiers this core would found the group with.
    founders: Vec<u64>,
    id: u64,
    leaderless_since_ms: Option<u64>,
    /// When a message of the leader last came (a core that is not a voter never campaigns,
    /// so raft-rs keeps naming a leader that may be long gone).
    leader_heard_ms: Option<u64>,
    /// Founding waits for a `join` after this core left.
    pub hold: bool,
    /// A committed configuration removed this incarnation.
    retired: bool,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus")
            .field("node", &self.node)
            .field("initialized", &self.raw.is_some())
            .field("seen", &self.seen)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Consensus {
    /// `tick_ms` is one Raft tick (a heartbeat); an election starts after `election_tick` to
    /// twice that many silent ticks.
    pub fn new(node: NodeId, seed: u64, tick_ms: u64, election_tick: usize, now_ms: u64) -> Self {
        let mut consensus = Self {
            node,
            raw: None,
            logger: slog::Logger::root(TracingDrain, slog::o!()),
            random: seed,
            election_tick: election_tick.max(2),
            tick_ms: tick_ms.max(1),
            next_tick_ms: now_ms + tick_ms.max(1),
            seen: (StateRole::Follower, 0, 0),
            registry: Registry::default(),
            committed: Vec::new(),
            outbox: Vec::new(),
            heard: BTreeMap::new(),
            founders: Vec::new(),
            id: 0,
            leaderless_since_ms: None,
            leader_heard_ms: None,
            hold: false,
            retired: false,
        };
        consensus.new_incarnation();
        consensus
    }

    /// A new Raft identifier: this node with a fresh incarnation (never 0).
    fn new_incarnation(&mut self) {
        let incarnation = (splitmix(&mut self.random) as u32) | 0x8000_0000;
        self.id = (u64::from(incarnation) << 32) | u64::from(self.node);
    }

    fn config(&self) -> Config {
        Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: 1,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 64,
            ..Config::default()
        }
    }

    fn election_timeout(&mut self) -> usize {
        self.election_tick + (splitmix(&mut self.random) % self.election_tick as u64) as usize
    }

    fn make(&mut self, store: Store) -> Result<(), String> {
        let config = self.config();
        let raw = RawNode::new(&config, store, &self.logger).map_err(|e| e.to_string())?;
        self.raw = Some(raw);
        self.seen = (StateRole::Follower, u64::MAX, 0);
        self.after_step();
        Ok(())
    }

    pub fn is_initialized(&self) -> bool {
        self.raw.is_some()
    }

    pub fn is_leader(&self) -> bool {
        self.raw
            .as_ref()
            .is_some_and(|r| r.raft.state == StateRole::Leader)
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raw.as_ref().and_then(|r| node_of(r.raft.leader_id))
    }

    /// The Raft identifiers of the configuration this core has applied.
    pub fn voters(&self) -> BTreeSet<u64> {
        self.raw
            .as_ref()
            .map(|r| r.store().conf.voters.iter().copied().collect())
            .unwrap_or_default()
    }

    /// What this core tells other cores of itself (`GroupState`).
    pub fn group_state(&self) -> Heard {
        Heard {
            // A core made by a leader's first message has no configuration until the
            // leader's snapshot arrives: it is not in a group yet for the others.
            initialized: !self.voters_empty(),
            id: self.id,
            founders: self.founders.clone(),
        }
    }

    /// Whether `told` is still what this core tells the others (compared without building
    /// the state anew).
    pub fn tells(&self, told: &Heard) -> bool {
        told.id == self.id
            && told.initialized != self.voters_empty()
            && told.founders == self.founders
    }

    fn voters_empty(&self) -> bool {
        self.raw
            .as_ref()
            .is_none_or(|r| r.store().conf.voters.is_empty())
    }

    /// A core told us its group state.
    pub fn heard(&mut self, node: NodeId, heard: Heard) -> Result<(), String> {
        if node_of(heard.id) != Some(node) {
            return Err(format!(
                "node {node} names Raft identifier {:x}, which is not its own",
                heard.id
            ));
        }
        self.heard.insert(node, heard);
        Ok(())
    }

    /// Sets the cores this core would found the group with (itself and the cores of its
    /// configured seeds; empty while some are not reached), as Raft identifiers once each
    /// has told its own.
    pub fn set_founders(&mut self, nodes: &[NodeId]) {
        if self.raw.is_some() {
            // Kept as founded (or as joined), so that the others can tell this group apart.
            return;
        }
        let mut founders = Vec::with_capacity(nodes.len());
        for &node in nodes {
            let id = if node == self.node {
                Some(self.id)
            } else {
                self.heard.get(&node).map(|h| h.id)
            };
            match id {
                Some(id) => founders.push(id),
                None => {
                    founders.clear();
                    break;
                }
            }
        }
        founders.sort_unstable();
        self.founders = founders;
    }

    /// Founds the group if every founder agrees and none is in a group yet. Returns whether it
    /// did.
    pub fn try_found(&mut self) -> bool {
        if self.raw.is_some() || self.hold || !self.founders.contains(&self.id) {
            return false;
        }
        let agreed = self
            .founders
            .iter()
            .filter(|&&id| id != self.id)
            .all(|&id| {
                node_of(id)
                    .and_then(|n| self.heard.get(&n))
                    .is_some_and(|h| h.id == id && h.founders == self.founders)
            });
        // A founder that already founded with these voters counts (founders start in any
        // order); a group founded otherwise means this core waits to be added to it.
        let other_group = self
            .heard
            .values()
            .any(|h| h.initialized && h.founders != self.founders);
        if !agreed || other_group {
            return false;
        }
        let registry = encode_entries(&Registry::default().entries());
        let conf = ConfState::from((self.founders.iter().copied(), Vec::new()));
        let mut snapshot = Snapshot::default();
        snapshot.set_data(registry.clone().into());
        let meta = snapshot.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(conf.clone());
        let mem = MemStorage::new();
        mem.wl()
            .apply_snapshot(snapshot)
            .expect("a fresh storage takes any snapshot");
        let store = Store {
            mem,
            applied: 1,
            applied_term: 1,
            conf,
            registry,
        };
        match self.make(store) {
            Ok(()) => {
                let nodes: Vec<NodeId> =
                    self.founders.iter().filter_map(|&id| node_of(id)).collect();
                info!(founders = ?nodes, "founded the cores' Raft group");
                true
            }
            Err(error) => {
                warn!(%error, "cannot found the Raft group");
                false
            }
        }
    }

    /// A Raft message from core `from`.
    pub fn step(&mut self, from: NodeId, bytes: &[u8], now_ms: u64) -> Result<(), String> {
        let message = Message::parse_from_bytes(bytes).map_err(|e| e.to_string())?;
        if node_of(message.from) != Some(from) {
            return Err(format!(
                "a Raft message from {:x} on the link of node {from}",
                message.from
            ));
        }
        if message.to != self.id {
            // For an earlier incarnation of this core: that one is gone with its state.
            debug!(
                from,
                to = message.to,
                "Raft message for another incarnation: dropped"
            );
            return Ok(());
        }
        if self.raw.is_none() {
            // A founder whose peers founded first: found too, with the same configuration.
            self.try_found();
        }
        if self.raw.is_none() {
            // A message for this incarnation means the group counts it as a voter: start
            // empty and take part (its vote may be what an election needs); the leader sends
            // the configuration and the log or a snapshot.
            if self.hold {
                return Ok(());
            }
            // The leader added this core (or it restarted): start empty, the leader sends
            // the log or a snapshot.
            let store = Store {
                mem: MemStorage::new(),
                applied: 0,
                applied_term: 0,
                conf: ConfState::default(),
                registry: Vec::new(),
            };
            self.make(store)?;
            info!(leader = from, "joined the cores' Raft group");
        }
        let raw = self.raw.as_mut().expect("made above");
        let sender = message.from;
        if let Err(error) = raw.step(message) {
            debug!(from, %error, "Raft message not taken");
        }
        if raw.raft.leader_id == sender {
            self.leader_heard_ms = Some(now_ms);
        }
        self.after_step();
        Ok(())
    }

    /// Ticks the Raft clock up to `now_ms`.
    pub fn tick(&mut self, now_ms: u64) {
        if now_ms < self.next_tick_ms {
            return;
        }
        let election_ms = 2 * self.election_tick as u64 * self.tick_ms;
        let leader_silent = !self.is_leader()
            && now_ms >= *self.leader_heard_ms.get_or_insert(now_ms) + election_ms;
        if self.raw.is_some() && (self.leader().is_none() || leader_silent) {
            let since = *self.leaderless_since_ms.get_or_insert(now_ms);
            let limit = LEADERLESS_TIMEOUTS * 2 * self.election_tick as u64 * self.tick_ms;
            let lost = self.voters_lost(now_ms >= since + 2 * election_ms);
            if now_ms >= since + limit || lost {
                warn!(
                    waited_ms = now_ms - since,
                    majority_restarted = lost,
                    "the cores' Raft group has no leader and cannot get one: dropping it, to found a new one with the seed cores"
                );
                self.reset();
                self.hold = false;
                return;
            }
        } else {
            self.leaderless_since_ms = None;
        }
        let ticks =
            ((now_ms - self.next_tick_ms) / self.tick_ms + 1).min(self.election_tick as u64);
        self.next_tick_ms = now_ms + self.tick_ms;
        if let Some(raw) = &mut self.raw {
            for _ in 0..ticks {
                raw.tick();
            }
        }
        self.after_step();
    }

    /// Whether a majority of the voters are incarnations that are provably gone: their cores
    /// told us a newer identifier (they restarted, and their state went with them). Such a
    /// group can never elect a leader again. A core not heard from counts as alive. A core
    /// that has not received the leader's configuration for two election timeouts
    /// (`waited`) has nothing to keep.
    fn voters_lost(&self, waited: bool) -> bool {
        let voters = self.voters();
        if voters.is_empty() {
            return waited;
        }
        let alive = voters
            .iter()
            .filter(|&&v| {
                v == self.id
                    || node_of(v)
                        .and_then(|n| self.heard.get(&n))
                        .is_none_or(|h| h.id == v)
            })
            .count();
        alive * 2 <= voters.len()
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.raw.as_ref().map(|_| self.next_tick_ms)
    }

    /// Replaces a timeout raft-rs drew by one from the seeded generator.
    fn after_step(&mut self) {
        let Some(raw) = &self.raw else {
            return;
        };
        let now = (
            raw.raft.state,
            raw.raft.term,
            raw.raft.randomized_election_timeout(),
        );
        if now != self.seen {
            let timeout = self.election_timeout();
            let raw = self.raw.as_mut().expect("checked");
            raw.raft.set_randomized_election_timeout(timeout);
            self.seen = (now.0, now.1, timeout);
        }
    }

    /// Proposes a registry entry (a follower forwards it to the leader).
    pub fn propose(&mut self, entry: &LogEntry) -> Result<(), String> {
        let raw = self
            .raw
            .as_mut()
            .ok_or("this core is not in the cores' Raft group yet")?;
        raw.propose(Vec::new(), encode_entries(std::slice::from_ref(entry)))
            .map_err(|e| format!("the Raft group did not take the proposal: {e}"))
    }

    /// Proposes adding (or removing) the voter with Raft identifier `id`.
    pub fn propose_voter(&mut self, id: u64, add: bool) -> Result<(), String> {
        let raw = self
            .raw
            .as_mut()
            .ok_or("this core is not in the cores' Raft group yet")?;
        let mut change = ConfChange::default();
        change.set_change_type(if add {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        change.node_id = id;
        raw.propose_conf_change(Vec::new(), change)
            .map_err(|e| format!("the Raft group did not take the change: {e}"))
    }

    /// Whether this core votes in a group that has other voters too.
    pub fn has_other_voters(&self) -> bool {
        self.voters().iter().any(|&v| v != self.id)
    }

    /// Whether this core's incarnation votes in the group.
    pub fn is_voter(&self) -> bool {
        self.voters().contains(&self.id)
    }

    /// Hands the leadership to another voter (before this core leaves).
    pub fn transfer_leadership(&mut self) {
        let other = self.voters().into_iter().find(|&v| v != self.id);
        if let (Some(raw), Some(to)) = (&mut self.raw, other) {
            if raw.raft.state == StateRole::Leader {
                info!(
                    to = node_of(to),
                    "handing the Raft leadership over before leaving"
                );
                raw.transfer_leader(to);
            }
        }
    }

    /// A group other than this core's runs among the cores it heard from.
    pub fn other_group_runs(&self) -> bool {
        self.heard
            .values()
            .any(|h| h.initialized && h.founders != self.founders)
    }

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

    /// Leaves the group: forgets it and waits for a `join` before founding or joining again.
    pub fn reset(&mut self) {
        self.raw = None;
        self.new_incarnation();
        self.leaderless_since_ms = None;
        self.leader_heard_ms = None;
        self.registry = Registry::default();
        // The core's view follows: members it has no link to go now (the ones it has stay,
        // and the next leader has them join again).
        self.committed.push(Committed::Snapshot);
        self.founders.clear();
        self.outbox.clear();
        self.hold = true;
    }

    /// Runs raft-rs's ready cycle: persists (in memory), applies what is committed, and
    /// collects the messages to send.
    pub fn process(&mut self) {
        for _ in 0..8 {
            let Some(raw) = &mut self.raw else {
                return;
            };
            if !raw.has_ready() {
                break;
            }
            let mut ready = raw.ready();
            self.collect(ready.take_messages());
            let raw = self.raw.as_mut().expect("checked");
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                match decode_entries(snapshot.get_data()) {
                    Ok(entries) => {
                        let meta = snapshot.get_metadata();
                        let store = raw.mut_store();
                        store.applied = meta.index;
                        store.applied_term = meta.term;
                        store.conf = meta.get_conf_state().clone();
                        store.registry = snapshot.get_data().to_vec();
                        if let Err(error) = store.mem.wl().apply_snapshot(snapshot) {
                            warn!(%error, "Raft snapshot not applied");
                        } else {
                            info!(
                                index = store.applied,
                                "registry replaced by the leader's snapshot"
                            );
                            self.registry = Registry::from_entries(&entries);
                            self.committed.push(Committed::Snapshot);
                        }
                    }
                    Err(error) => warn!(%error, "Raft snapshot data does not decode: ignored"),
                }
            }
            let committed = ready.take_committed_entries();
            self.apply(committed);
            let raw = self.raw.as_mut().expect("checked");
            if let Err(error) = raw.mut_store().mem.wl().append(ready.entries()) {
                warn!(%error, "Raft entries not appended");
            }
            if let Some(hard) = ready.hs() {
                raw.mut_store().mem.wl().set_hardstate(hard.clone());
            }
            let persisted = ready.take_persisted_messages();
            let mut light = raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                raw.mut_store().mem.wl().mut_hard_state().set_commit(commit);
            }
            let messages = light.take_messages();
            let committed = light.take_committed_entries();
            self.collect(persisted);
            self.collect(messages);
            self.apply(committed);
            if self.retired {
                self.retired = false;
                self.reset();
                self.hold = false;
                return;
            }
            let raw = self.raw.as_mut().expect("checked");
            raw.advance_apply();
            self.compact();
        }
        self.after_step();
    }

    fn collect(&mut self, messages: Vec<Message>) {
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

    fn apply(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let raw = self.raw.as_mut().expect("only an initialized core applies");
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

    /// Drops log entries far behind the applied one.
    fn compact(&mut self) {
        let Some(raw) = &mut self.raw else {
            return;
        };
        let store = raw.mut_store();
        let first = store.mem.first_index().unwrap_or(1);
        if store.applied > first + 2 * LOG_KEEP {
            let _ = store.mem.wl().compact(store.applied - LOG_KEEP);
        }
    }

    /// The Raft messages to send, by core.
    pub fn take_outbox(&mut self) -> Vec<(NodeId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// The voter change the leader should propose next, if any: the current incarnation of
    /// every core the registry holds is a voter; earlier incarnations and removed nodes are
    /// not (a voter of a node the registry has not heard of yet, such as a founder before its
    /// `Joined` commits, stays). Additions come first, so that replacing a restarted core's
    /// old identifier never shrinks the quorum.
    pub fn voter_change(&self) -> Option<(u64, bool)> {
        let voters = self.voters();
        // The leader never removes itself (raft-rs does not step down for that).
        let mut wanted = BTreeSet::from([self.id]);
        for member in self.registry.members.values() {
            if member.role != Role::Core {
                continue;
            }
            let current = if member.node == self.node {
                Some(self.id)
            } else {
                self.heard.get(&member.node).map(|h| h.id)
            };
            match current {
                Some(id) => {
                    wanted.insert(id);
                }
                // Not heard from yet: keep whatever voter it has.
                None => wanted.extend(voters.iter().filter(|&&v| node_of(v) == Some(member.node))),
            }
        }
        let unknown = |id: u64| {
            node_of(id).is_some_and(|n| {
                !self.registry.members.contains_key(&n) && !self.registry.removed.contains(&n)
            })
        };
        wanted.extend(voters.iter().filter(|&&v| unknown(v)));
        wanted
            .difference(&voters)
            .next()
            .map(|&id| (id, true))
            .or_else(|| voters.difference(&wanted).next().map(|&id| (id, false)))
    }

    pub fn status(&self) -> ConsensusStatus {
        let (state, leader, term, commit, applied) = match &self.raw {
            None => ("waiting", None, 0, 0, 0),
            Some(raw) => (
                match raw.raft.state {
                    StateRole::Leader => "leader",
                    StateRole::Follower => "follower",
                    StateRole::Candidate => "candidate",
                    StateRole::PreCandidate => "pre-candidate",
                },
                node_of(raw.raft.leader_id),
                raw.raft.term,
                raw.raft.raft_log.committed,
                raw.store().applied,
            ),
        };
        ConsensusStatus {
            initialized: self.raw.is_some(),
            state,
            leader,
            term,
            commit,
            applied,
            voters: self.voters().iter().filter_map(|&v| node_of(v)).collect(),
            voter_ids: self.voters().into_iter().collect(),
            founders: self.founders.iter().filter_map(|&v| node_of(v)).collect(),
            id: self.id,
        }
    }
}

/// raft-rs logs through slog; this hands its records to `tracing` under the target
/// `shardmq::raft` (its informational chatter at debug level).
struct TracingDrain;

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
