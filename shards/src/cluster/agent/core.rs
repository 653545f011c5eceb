//! A core's part of the agent: its route log, what each origin told it, and its followers.
//!
//! Owns: the route log (entries numbered from `base` within an epoch new at every start, at
//! most `log_entries_max` kept), one [`Origin`] per node linked to this core, one
//! [`Follower`] per link that follows the log, and the core's share of the Raft group with
//! what its leader decides from (the group's half lives in `govern.rs`).
//! Invariants: every appended entry is applied to the view at once (except the group's word
//! that this node itself is down, removed or of another run); a follower is sent entries only
//! from its `next` on, and a snapshot first when it asked for a point the log no longer
//! holds; an origin's route deltas are taken only in sequence (a gap ends its link).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use shardmq_net::frame::{Body, LogEntry, Member, NodeId, Route, RouteDelta};
use tracing::warn;

use super::super::consensus::{Consensus, Heard};
use super::super::view::View;
use super::super::{ClusterSettings, Io};
use super::Shared;
use crate::message::ConnectionId;

/// What a core knows of one origin.
#[derive(Debug)]
pub(super) struct Origin {
    pub(super) member: Member,
    pub(super) sequence: u64,
    pub(super) links: usize,
    /// Its routes, held back from the log until the Raft group has committed this run of the
    /// node as a member: a node that hears of a restarted node's new routes must already know
    /// of the restart, or it would drop what it queued for them with the previous run's queue.
    pub(super) held: Option<BTreeSet<Route>>,
}

/// An edge following this core's log.
#[derive(Debug)]
struct Follower {
    node: NodeId,
    /// It needs a snapshot first (sent once this core is warm).
    snapshot_due: bool,
    /// The next entry to send.
    next: u64,
    /// How far the follower says it has applied.
    applied: u64,
}

#[derive(Debug)]
struct Log {
    epoch: u64,
    /// The number of `entries[0]`.
    base: u64,
    /// Each entry with the time it was appended, for the replication lag.
    entries: VecDeque<(u64, LogEntry)>,
}

impl Log {
    fn next(&self) -> u64 {
        self.base + self.entries.len() as u64
    }
}

#[derive(Debug)]
pub(super) struct Core {
    log: Log,
    pub(super) origins: BTreeMap<NodeId, Origin>,
    followers: BTreeMap<ConnectionId, Follower>,
    /// A core serves snapshots from this time on: a core that has just started has heard
    /// from no one yet, and a follower that took its nearly empty view for the cluster's
    /// would drop every other node's routes. By then every live node has dialled it (they
    /// redial every `reconnect_ms`) and sent its routes.
    warm_at_ms: u64,
    /// The core's share of the Raft group, and what its leader acts on.
    pub(super) consensus: Consensus,
    /// Since when (as the leader saw it) each member has had no link to this core.
    pub(super) absent_since: BTreeMap<NodeId, u64>,
    /// Nodes that said they leave: removed without waiting for the grace period.
    pub(super) left: BTreeSet<NodeId>,
    /// What the leader proposed and when, so that it proposes again only if nothing came of
    /// it. Keyed by the proposal's text, in a B-tree: its order never reaches an output.
    pub(super) proposed: BTreeMap<String, u64>,
    /// The group state last told to the other cores.
    pub(super) told: Option<Heard>,
    /// A core leaving a group with other voters waits, until this time at most, for the
    /// leader to remove its voter, so that the cores left keep their quorum.
    pub(super) departing_until_ms: Option<u64>,
    /// When to say again why this core is not in a group yet.
    pub(super) waiting_logged_ms: u64,
    /// The leader's decisions are due: links, commits or the clock moved.
    pub(super) govern_due: bool,
    pub(super) next_govern_ms: u64,
    /// After `ctl cluster join` on a core that founded a group alone: it drops that group for
    /// the one it joins, once it hears of it.
    pub(super) merging: bool,
}

impl Core {
    pub(super) fn new(settings: &ClusterSettings, epoch: u64, now_ms: u64) -> Self {
        // A Raft tick is a heartbeat; an election needs a link timeout of silence.
        let election_tick =
            (settings.link_timeout_ms / settings.heartbeat_ms.max(1)).clamp(3, 100) as usize;
        Self {
            log: Log {
                epoch,
                base: 1,
                entries: VecDeque::new(),
            },
            origins: BTreeMap::new(),
            followers: BTreeMap::new(),
            warm_at_ms: now_ms + 2 * settings.reconnect_ms + settings.heartbeat_ms,
            consensus: Consensus::new(
                settings.link.member.node,
                epoch ^ 0x005E_ED0F_C0DE,
                settings.heartbeat_ms,
                election_tick,
                now_ms,
            ),
            absent_since: BTreeMap::new(),
            left: BTreeSet::new(),
            proposed: BTreeMap::new(),
            told: None,
            departing_until_ms: None,
            waiting_logged_ms: now_ms + 2 * settings.link_timeout_ms,
            govern_due: true,
            next_govern_ms: 0,
            merging: false,
        }
    }

    /// Appends to this core's log and applies the entry to its own view (except the group's
    /// word that this node itself is down or removed: a node always counts itself in).
    pub(super) fn append(
        &mut self,
        shared: &mut Shared,
        entry: LogEntry,
        settings: &ClusterSettings,
        now_ms: u64,
    ) {
        let about_self = match &entry {
            LogEntry::Down(n) | LogEntry::Removed(n) => *n == shared.node,
            // A committed member record of this node may be of an earlier run.
            LogEntry::Joined(m) => m.node == shared.node,
            _ => false,
        };
        if !about_self {
            shared.view.apply(&entry, &mut shared.changes);
        }
        let log = &mut self.log;
        log.entries.push_back((now_ms, entry));
        while log.entries.len() > settings.log_entries_max {
            log.entries.pop_front();
            log.base += 1;
        }
    }

    /// The earliest time the core's side has work: an absent member's grace period ends, a
    /// follower's snapshot may be served, or the Raft clock ticks.
    pub(super) fn next_deadline_ms(&self, settings: &ClusterSettings) -> Option<u64> {
        let grace = self
            .absent_since
            .values()
            .map(|since| since + settings.down_grace_ms);
        let warm = self
            .followers
            .values()
            .any(|f| f.snapshot_due)
            .then_some(self.warm_at_ms);
        grace
            .chain(warm)
            .chain(self.consensus.next_deadline_ms())
            .min()
    }

    /// A node dialled this core and its handshake named `member`: it counts as linked.
    pub(super) fn origin_linked(&mut self, node: NodeId, member: &Member) {
        // Membership is the Raft group's to decide: the leader sees this link and proposes
        // the node joined (or up again).
        self.govern_due = true;
        self.left.remove(&node);
        match self.origins.get_mut(&node) {
            Some(origin) if origin.member == *member => origin.links += 1,
            Some(origin) => {
                origin.member = member.clone();
                origin.sequence = 0;
                origin.links += 1;
                origin.held = None;
            }
            None => {
                self.origins.insert(
                    node,
                    Origin {
                        member: member.clone(),
                        sequence: 0,
                        links: 1,
                        held: None,
                    },
                );
            }
        }
    }

    /// A control link closed: it no longer follows, and (if the origin dialled it) no longer
    /// counts towards the origin being up.
    pub(super) fn link_lost(&mut self, connection: ConnectionId, node: Option<NodeId>) {
        self.govern_due = true;
        self.followers.remove(&connection);
        if let Some(node) = node
            && let Some(origin) = self.origins.get_mut(&node)
        {
            origin.links = origin.links.saturating_sub(1);
            if origin.links == 0 {
                warn!(
                    node,
                    "lost the last link from the node (the Raft leader decides when it is down)"
                );
            }
        }
    }

    pub(super) fn heartbeat(&mut self, connection: ConnectionId, applied: u64) {
        if let Some(follower) = self.followers.get_mut(&connection) {
            follower.applied = applied;
        }
    }

    /// Whether the Raft group has committed the run of `node` this core is linked to.
    fn admitted(&self, node: NodeId) -> bool {
        self.origins
            .get(&node)
            .is_some_and(|o| self.consensus.registry.members.get(&node) == Some(&o.member))
    }

    /// An origin's whole route set, into the log once its run is admitted.
    pub(super) fn route_sync(
        &mut self,
        shared: &mut Shared,
        node: NodeId,
        sequence: u64,
        routes: Vec<Route>,
        io: &Io,
    ) -> Result<(), String> {
        let admitted = self.admitted(node);
        let origin = self
            .origins
            .get_mut(&node)
            .ok_or("RouteSync to a node that is not a core")?;
        origin.sequence = sequence;
        if !admitted {
            origin.held = Some(routes.into_iter().collect());
            return Ok(());
        }
        origin.held = None;
        let entry = LogEntry::Replace {
            origin: node,
            routes,
        };
        self.append(shared, entry, &io.settings, io.now_ms);
        Ok(())
    }

    /// An origin's route changes, each the next of its sequence.
    pub(super) fn route_deltas(
        &mut self,
        shared: &mut Shared,
        node: NodeId,
        deltas: Vec<RouteDelta>,
        io: &Io,
    ) -> Result<(), String> {
        for delta in deltas {
            let origin = self
                .origins
                .get_mut(&node)
                .ok_or("RouteDeltas to a node that is not a core")?;
            if origin.sequence.checked_add(1) != Some(delta.sequence) {
                return Err(format!(
                    "route delta {} from node {node} after {}: a gap",
                    delta.sequence, origin.sequence
                ));
            }
            origin.sequence = delta.sequence;
            if let Some(held) = &mut origin.held {
                if delta.added {
                    held.insert(delta.route);
                } else {
                    held.remove(&delta.route);
                }
                continue;
            }
            let entry = LogEntry::Route {
                origin: node,
                route: delta.route,
                added: delta.added,
            };
            self.append(shared, entry, &io.settings, io.now_ms);
        }
        Ok(())
    }

    /// A node asks for the log from `next` of `epoch`: resumed there if the log still holds
    /// it, through a snapshot otherwise.
    pub(super) fn follow(&mut self, connection: ConnectionId, node: NodeId, epoch: u64, next: u64) {
        let log = &self.log;
        let resumable = epoch == log.epoch && next >= log.base && next <= log.next();
        self.followers.insert(
            connection,
            Follower {
                node,
                snapshot_due: !resumable,
                next,
                applied: 0,
            },
        );
    }

    /// Sends each follower what it has not been sent: a snapshot first where one is due
    /// (once this core is warm), then the entries after it. Followers in connection order.
    pub(super) fn replicate(&mut self, view: &View, io: &mut Io) {
        let log = &self.log;
        let next = log.next();
        let warm = io.now_ms >= self.warm_at_ms;
        for (&connection, follower) in &mut self.followers {
            if follower.snapshot_due {
                if !warm {
                    continue;
                }
                let (members, down, routes, settings) = view.parts();
                io.send(
                    connection,
                    &Body::LogSnapshot {
                        epoch: log.epoch,
                        next,
                        members,
                        down,
                        routes,
                        settings,
                    },
                );
                follower.snapshot_due = false;
                follower.next = next;
            }
            if follower.next >= next {
                continue;
            }
            if follower.next < log.base {
                // The log no longer holds where the follower is: a gap it will see and
                // answer with a new Follow.
                follower.next = log.base;
            }
            let skip = (follower.next - log.base) as usize;
            let entries: Vec<LogEntry> = log
                .entries
                .iter()
                .skip(skip)
                .map(|(_, e)| e.clone())
                .collect();
            io.send(
                connection,
                &Body::LogEntries {
                    epoch: log.epoch,
                    first: follower.next,
                    entries,
                },
            );
            follower.next = next;
        }
    }

    /// The log's epoch and next entry number, for status.
    pub(super) fn log_position(&self) -> (u64, u64) {
        (self.log.epoch, self.log.next())
    }

    /// How far behind each follower is, in connection order, for status.
    pub(super) fn follower_status(&self, now_ms: u64) -> Vec<super::FollowerStatus> {
        let log = &self.log;
        self.followers
            .values()
            .map(|f| {
                // `applied` is the next entry the follower needs (as it says: past the log's
                // end it is behind by nothing).
                let needed = f.applied.max(log.base);
                let behind = log.next().saturating_sub(needed);
                let lag_ms = log
                    .entries
                    .get((needed - log.base) as usize)
                    .map_or(0, |(at, _)| now_ms.saturating_sub(*at));
                super::FollowerStatus {
                    node: f.node,
                    applied: needed - 1,
                    behind_entries: behind,
                    lag_ms,
                }
            })
            .collect()
    }

    /// Forgets what the core's side knows of the cluster (the node leaves it).
    pub(super) fn leave(&mut self) {
        self.departing_until_ms = None;
        self.merging = false;
        self.consensus.reset();
        self.told = None;
        self.absent_since.clear();
        self.proposed.clear();
        self.origins.clear();
    }
}
