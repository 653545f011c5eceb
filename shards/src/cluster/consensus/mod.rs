//! The cores' Raft group: membership, roles and cluster-wide settings, agreed by consensus.
//!
//! Owns, on shard 0 of a core: a raft-rs [`RawNode`] over in-memory storage written through
//! to a durable store when the node has a data directory (`durable.rs`), the [`Registry`]
//! its committed entries build (the members with their roles, which of them are down, the
//! cluster-wide settings), and the founding handshake.
//! Never: does I/O (the durable store emits file calls and takes their completions), reads a
//! clock or draws randomness of its own. Whenever raft-rs draws a
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
//! A Raft identity lives exactly as long as the state it stands for: with a durable store a
//! core takes its identifier up again at start (votes, log and registry with it), and a
//! message that depends on a ready leaves only once that ready is synced; without one it
//! takes a new identifier (its node identifier with a fresh incarnation above it) at every
//! start, joins as a new voter, and the leader retires the old identifier. Either way, and
//! whenever a core drops its group (which also removes its stored state), no voter ever
//! forgets a vote or a log it acknowledged under the same identifier, which Raft's safety
//! rests on.
//! A core whose group has had no leader for `LEADERLESS_TIMEOUTS` election timeouts (the
//! majority of cores is gone) drops the group and founds a new one with the cores of its seed
//! list once they agree again. The membership is rebuilt from the links; the cluster-wide
//! settings of the lost group are not carried over.
//!
//! What the links lose, raft-rs cannot see: the leader reports a core unreachable when its
//! control link closes or a message to it had no link, and reports a snapshot lost when the
//! follower has not answered it within `SNAPSHOT_TIMEOUTS` election timeouts. raft-rs sends a
//! follower waiting for a snapshot nothing else until the snapshot is reported, so without
//! this a snapshot lost once would leave that follower without the log for good.

mod durable;
mod ready;
mod registry;
mod store;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Message, Snapshot};
use raft::storage::MemStorage;
use raft::{Config, ProgressState, RawNode, SnapshotStatus, StateRole};
use shardmq_net::frame::{LogEntry, NodeId, Role, encode_entries};
use tracing::{debug, info, warn};

use self::durable::Disk;
pub use self::durable::{
    FRAME_LENGTH_MAX, LEGACY_STATE_FILE, RAFT_DIRECTORY, RaftFileCall, RaftFileOp, RaftStoreFiles,
    SEGMENT_BYTES_MAX, SEGMENTS_MAX, STORE_BYTES_MAX, parse_segment_name,
};
pub use self::registry::{Registry, SETTINGS, check_setting};
use self::store::{Store, TracingDrain};
use super::splitmix;

/// The node of a Raft identifier: its low 32 bits (the incarnation is above them).
fn node_of(id: u64) -> Option<NodeId> {
    (id != 0).then_some(id as NodeId)
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
    /// The I/O error that stopped the durable Raft store, if one did.
    pub store_error: Option<String>,
}

/// A group without a leader for this many election timeouts is dropped (see the module
/// documentation).
const LEADERLESS_TIMEOUTS: u64 = 10;

/// A leader gives up a snapshot it sent when the follower has not answered it within this
/// many election timeouts, and sends it again (see [`Consensus::unreachable`]).
const SNAPSHOT_TIMEOUTS: u64 = 2;

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
    /// On the leader: for how many ticks each follower (by Raft identifier) has been waiting
    /// for a snapshot, that is, raft-rs has sent it one and sends it nothing else until the
    /// snapshot is answered or reported lost.
    snapshot_ticks: BTreeMap<u64, u64>,
    /// The durable store (with a data directory); without one, the state is in memory only
    /// and counts as persisted at once.
    disk: Option<Disk>,
    /// Messages raft-rs may send only once the ready they came with is persisted, with that
    /// ready's number.
    held: VecDeque<(u64, Vec<Message>)>,
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
            snapshot_ticks: BTreeMap::new(),
            disk: None,
            held: VecDeque::new(),
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
        let raw = self.new_node(store)?;
        self.raw = Some(raw);
        Ok(())
    }

    /// A Raft node over `store`, its first election timeout drawn from the seeded generator.
    fn new_node(&mut self, store: Store) -> Result<RawNode<Store>, String> {
        let config = self.config();
        let mut raw = RawNode::new(&config, store, &self.logger).map_err(|e| e.to_string())?;
        // The readies of the node before are numbered apart from this one's.
        self.held.clear();
        if let Some(disk) = &mut self.disk {
            disk.new_node();
        }
        self.seen = (StateRole::Follower, u64::MAX, 0);
        self.replace_timeout(&mut raw);
        Ok(raw)
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
        if let Err(error) = mem.wl().apply_snapshot(snapshot) {
            warn!(%error, "cannot found the Raft group: its first snapshot is not taken");
            return false;
        }
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
        let mut raw = match self.raw.take() {
            Some(raw) => raw,
            None => {
                // A message for this incarnation means the group counts it as a voter: start
                // empty and take part (its vote may be what an election needs); the leader
                // sends the configuration and the log or a snapshot.
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
                let raw = self.new_node(store)?;
                info!(leader = from, "joined the cores' Raft group");
                raw
            }
        };
        let sender = message.from;
        if let Err(error) = raw.step(message) {
            debug!(from, %error, "Raft message not taken");
        }
        if raw.raft.leader_id == sender {
            self.leader_heard_ms = Some(now_ms);
        }
        self.raw = Some(raw);
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
        self.expire_snapshots(ticks);
        self.after_step();
    }

    /// The Raft messages last sent to core `node` may be lost: its control link closed, or
    /// there was no link to send them on. raft-rs cannot tell by itself. A follower it sent
    /// entries optimistically goes back to probing, and a follower it sent a snapshot is
    /// sent the snapshot again: raft-rs sends a follower in snapshot state nothing else until
    /// the snapshot is reported, so a snapshot lost with a link would leave that follower
    /// without the log for good, and with it every change that needs its vote.
    pub fn unreachable(&mut self, node: NodeId) {
        let Some(raw) = &mut self.raw else {
            return;
        };
        if raw.raft.state != StateRole::Leader {
            return;
        }
        let ids: Vec<u64> = raw
            .raft
            .prs()
            .iter()
            .map(|(&id, _)| id)
            .filter(|&id| id != self.id && node_of(id) == Some(node))
            .collect();
        for id in ids {
            raw.report_unreachable(id);
            let waiting = raw
                .raft
                .prs()
                .get(id)
                .is_some_and(|pr| pr.state == ProgressState::Snapshot);
            if waiting {
                debug!(
                    node,
                    "Raft snapshot to the core may be lost with its link: sending it again"
                );
                raw.report_snapshot(id, SnapshotStatus::Failure);
                self.snapshot_ticks.remove(&id);
            }
        }
    }

    /// On the leader: a snapshot that has waited `SNAPSHOT_TIMEOUTS` election timeouts for
    /// its follower's answer is reported lost, so that raft-rs sends it again (a snapshot
    /// can be lost while its link stays up, in a frame the peer refused, say). A follower
    /// that took it answers within a round trip, which takes it out of snapshot state.
    fn expire_snapshots(&mut self, ticks: u64) {
        let Some(raw) = &mut self.raw else {
            return;
        };
        if raw.raft.state != StateRole::Leader {
            self.snapshot_ticks.clear();
            return;
        }
        let waiting: Vec<u64> = raw
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == ProgressState::Snapshot)
            .map(|(&id, _)| id)
            .collect();
        self.snapshot_ticks.retain(|id, _| waiting.contains(id));
        let limit = SNAPSHOT_TIMEOUTS * 2 * self.election_tick as u64;
        for id in waiting {
            let waited = self.snapshot_ticks.entry(id).or_insert(0);
            *waited += ticks;
            if *waited >= limit {
                debug!(
                    node = node_of(id),
                    "Raft snapshot not answered: sending it again"
                );
                raw.report_snapshot(id, SnapshotStatus::Failure);
                self.snapshot_ticks.remove(&id);
            }
        }
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
        if let Some(mut raw) = self.raw.take() {
            self.replace_timeout(&mut raw);
            self.raw = Some(raw);
        }
    }

    fn replace_timeout(&mut self, raw: &mut RawNode<Store>) {
        let now = (
            raw.raft.state,
            raw.raft.term,
            raw.raft.randomized_election_timeout(),
        );
        if now != self.seen {
            let timeout = self.election_timeout();
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
        self.snapshot_ticks.clear();
        self.held.clear();
        if let Some(disk) = &mut self.disk {
            // The segments of the dropped group are removed at the next flush: a restart must
            // not bring back an identifier this core gave up.
            disk.new_node();
        }
        self.hold = true;
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
            store_error: self.store_failure().map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::prelude::MessageType;

    use super::*;

    const TICK_MS: u64 = 10;
    const ELECTION_TICK: usize = 5;

    /// A group of one founded by core 1, led by it, with core 2 (not yet in a group) added as
    /// a voter: the leader has committed the change and waits for core 2.
    fn leader_adding_core_2() -> (Consensus, Consensus, u64) {
        let mut leader = Consensus::new(1, 7, TICK_MS, ELECTION_TICK, 0);
        let joiner = Consensus::new(2, 8, TICK_MS, ELECTION_TICK, 0);
        leader.set_founders(&[1]);
        assert!(leader.try_found(), "a lone seed core founds at once");
        let mut now_ms = 0;
        while !leader.is_leader() {
            now_ms += TICK_MS;
            leader.tick(now_ms);
            leader.process();
            assert!(now_ms < 10_000, "a group of one elects its core");
        }
        leader
            .propose_voter(joiner.id, true)
            .expect("the leader takes the change");
        leader.process();
        assert!(
            leader.voters().contains(&joiner.id),
            "a group of one commits at once"
        );
        (leader, joiner, now_ms)
    }

    fn is_snapshot(bytes: &[u8]) -> bool {
        Message::parse_from_bytes(bytes).is_ok_and(|m| m.get_msg_type() == MessageType::MsgSnapshot)
    }

    /// Delivers every message between the two cores until none is left; snapshots from the
    /// leader are dropped while `lose_snapshots`. Returns how many snapshots were sent.
    fn exchange(leader: &mut Consensus, joiner: &mut Consensus, lose_snapshots: bool) -> usize {
        let mut snapshots = 0;
        for _ in 0..100 {
            leader.process();
            joiner.process();
            let to_joiner = leader.take_outbox();
            let to_leader = joiner.take_outbox();
            if to_joiner.is_empty() && to_leader.is_empty() {
                return snapshots;
            }
            for (to, bytes) in to_joiner {
                assert_eq!(to, 2);
                if is_snapshot(&bytes) {
                    snapshots += 1;
                    if lose_snapshots {
                        continue;
                    }
                }
                joiner.step(1, &bytes, 0).expect("a message of the leader");
            }
            for (to, bytes) in to_leader {
                assert_eq!(to, 1);
                leader.step(2, &bytes, 0).expect("a message of core 2");
            }
        }
        panic!("two cores kept exchanging messages");
    }

    fn waits_for_snapshot(leader: &Consensus, id: u64) -> bool {
        leader.raw.as_ref().is_some_and(|raw| {
            raw.raft
                .prs()
                .get(id)
                .is_some_and(|pr| pr.state == ProgressState::Snapshot)
        })
    }

    /// Ticks both cores by one heartbeat and exchanges what that sends.
    fn heartbeat(leader: &mut Consensus, joiner: &mut Consensus, now_ms: &mut u64) -> usize {
        *now_ms += TICK_MS;
        leader.tick(*now_ms);
        joiner.tick(*now_ms);
        exchange(leader, joiner, false)
    }

    #[test]
    fn a_snapshot_lost_with_its_link_is_sent_again() {
        let (mut leader, mut joiner, mut now_ms) = leader_adding_core_2();
        assert_eq!(exchange(&mut leader, &mut joiner, true), 1);
        assert!(waits_for_snapshot(&leader, joiner.id));
        // Heartbeats alone never resend it: raft-rs waits for the snapshot's report.
        for _ in 0..3 {
            assert_eq!(heartbeat(&mut leader, &mut joiner, &mut now_ms), 0);
        }
        assert!(joiner.voters().is_empty());
        // The link to core 2 closed.
        leader.unreachable(2);
        assert!(!waits_for_snapshot(&leader, joiner.id));
        assert_eq!(heartbeat(&mut leader, &mut joiner, &mut now_ms), 1);
        assert_eq!(joiner.voters(), leader.voters());
        assert!(joiner.is_voter());
    }

    #[test]
    fn an_unanswered_snapshot_is_sent_again_after_its_timeout() {
        let (mut leader, mut joiner, mut now_ms) = leader_adding_core_2();
        assert_eq!(exchange(&mut leader, &mut joiner, true), 1);
        let limit = SNAPSHOT_TIMEOUTS * 2 * ELECTION_TICK as u64;
        let mut resent_after = None;
        for tick in 1..=limit {
            if heartbeat(&mut leader, &mut joiner, &mut now_ms) > 0 {
                resent_after = Some(tick);
                break;
            }
        }
        assert_eq!(
            resent_after,
            Some(limit),
            "resent once the timeout has passed"
        );
        assert_eq!(joiner.voters(), leader.voters());
        assert!(!waits_for_snapshot(&leader, joiner.id));
    }

    #[test]
    fn a_follower_ignores_a_report_of_its_peers_unreachable() {
        let (mut leader, mut joiner, mut now_ms) = leader_adding_core_2();
        exchange(&mut leader, &mut joiner, false);
        assert!(joiner.is_voter());
        let before = joiner.status();
        joiner.unreachable(1);
        heartbeat(&mut leader, &mut joiner, &mut now_ms);
        assert_eq!(joiner.status().leader, before.leader);
        assert_eq!(joiner.voters(), leader.voters());
    }
}
