//! The cluster agent: route replication and membership, on shard 0 of every node.
//!
//! Owns, on every node: this node's route set and its route sequence (each change numbered
//! from 1), a control link to every core it knows (the seeds and the cores that dialled it),
//! and the [`View`] the shards' cluster route tables are kept equal to.
//! Owns, on a core: the ordered route log (entries numbered within an epoch that is new at
//! every start), what each origin has told it, and the edges that follow the log.
//!
//! How routes move: a node sends its whole route set (`RouteSync`) when a control link to a
//! core comes up, then each change (`RouteDeltas`) as the batch that made it flushes. A core
//! appends what it hears to its log, applies it to its own view, and streams new entries to
//! its followers. An edge follows one core: it asks for the log from where it is
//! (`Follow`); a core that no longer holds that point, or a follower that sees a gap, goes
//! through a snapshot and then the tail.
//!
//! Failure detection: every control link carries a heartbeat; a link silent for the timeout
//! is closed. When a core loses its last link to an origin, it logs the origin `Down` (shown
//! in status, routes kept) and `Removed` (routes withdrawn) once the grace period passes
//! without it coming back. Links run from every node to the cores only, never N x N.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;

use shardmq_net::frame::{Body, LogEntry, Member, NodeId, Role, Route, RouteDelta};
use std::collections::BTreeMap;
use tracing::{debug, info, warn};

use super::consensus::{Committed, Consensus, ConsensusStatus, Heard, check_setting};
use super::view::{Change, View};
use super::{ClusterSettings, Io, TAG_SEED};
use crate::message::ConnectionId;

/// A core address this node keeps a control link to.
#[derive(Debug)]
struct Seed {
    address: SocketAddr,
    connection: Option<ConnectionId>,
    connecting: bool,
    retry_at_ms: u64,
    /// The node found there, once a handshake has said.
    node: Option<NodeId>,
    /// The address is this node itself (a core listing every core): never dialled again.
    is_self: bool,
    /// From the configuration or `ctl cluster join` (not learnt from the member list or from
    /// a core that dialled us): a core founds the Raft group with the cores of these.
    configured: bool,
}

/// What a core knows of one origin.
#[derive(Debug)]
struct Origin {
    member: Member,
    sequence: u64,
    links: usize,
    /// Its routes, held back from the log until the Raft group has committed this run of the
    /// node as a member: a node that hears of a restarted node's new routes must already know
    /// of the restart, or it would drop what it queued for them with the previous run's queue.
    held: Option<BTreeSet<Route>>,
}

/// An edge (or core) following this core's log.
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

/// Status of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node: NodeId,
    pub role: Role,
    pub members: Vec<MemberStatus>,
    pub seeds: Vec<(SocketAddr, &'static str)>,
    /// An edge's core and how far it has applied that core's log.
    pub following: Option<(NodeId, u64)>,
    /// A core's log: epoch and next entry number.
    pub log: Option<(u64, u64)>,
    pub followers: Vec<FollowerStatus>,
    pub route_count: usize,
    pub own_route_count: usize,
    /// A core's view of the cores' Raft group.
    pub consensus: Option<ConsensusStatus>,
    /// Cluster-wide settings as committed (on an edge: as its core's log said).
    pub settings: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub member: Member,
    /// "self", "up" or "down".
    pub state: &'static str,
    pub route_count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerStatus {
    pub node: NodeId,
    pub applied: u64,
    /// Entries appended that the follower has not applied.
    pub behind_entries: u64,
    /// How long ago the oldest entry it has not applied was appended.
    pub lag_ms: u64,
}

#[derive(Debug)]
pub struct Agent {
    node: NodeId,
    role: Role,
    /// This node's routes and the number of their last change.
    routes: BTreeSet<Route>,
    sequence: u64,
    /// Changes since the last flush, numbered.
    pending: Vec<RouteDelta>,
    seeds: Vec<Seed>,
    /// Control links that finished their handshake: to cores we dialled, and (on a core) from
    /// nodes that dialled us.
    up_links: BTreeMap<ConnectionId, (NodeId, Role)>,
    // The core's side.
    log: Option<Log>,
    origins: BTreeMap<NodeId, Origin>,
    followers: BTreeMap<ConnectionId, Follower>,
    // The follower's side: the view, and (on an edge) which link it follows and where.
    view: View,
    following: Option<(ConnectionId, u64, u64)>,
    /// Shard-facing changes not yet told to the shards.
    pub changes: Vec<Change>,
    /// A core serves snapshots from this time on: a core that has just started has heard
    /// from no one yet, and a follower that took its nearly empty view for the cluster's
    /// would drop every other node's routes. By then every live node has dialled it (they
    /// redial every `reconnect_ms`) and sent its routes.
    warm_at_ms: u64,
    leaving: bool,
    // A core's share of the Raft group, and what its leader acts on.
    consensus: Option<Consensus>,
    /// Since when (as the leader saw it) each member has had no link to this core.
    absent_since: BTreeMap<NodeId, u64>,
    /// Nodes that said they leave: removed without waiting for the grace period.
    left: BTreeSet<NodeId>,
    /// What the leader proposed and when, so that it proposes again only if nothing came of it.
    proposed: BTreeMap<String, u64>,
    /// The group state last told to the other cores.
    told: Option<Heard>,
    /// A core leaving a group with other voters waits, until this time at most, for the
    /// leader to remove its voter, so that the cores left keep their quorum.
    departing_until_ms: Option<u64>,
    /// When to say again why this core is not in a group yet.
    waiting_logged_ms: u64,
    /// The member list changed since the cores were last learnt from it.
    pub members_dirty: bool,
    /// The leader's decisions are due: links, commits or the clock moved.
    govern_due: bool,
    next_govern_ms: u64,
    /// After `ctl cluster join` on a core that founded a group alone: it drops that group for
    /// the one it joins, once it hears of it.
    merging: bool,
}

impl Agent {
    pub fn new(settings: &ClusterSettings, epoch: u64, now_ms: u64) -> Self {
        let member = settings.link.member.clone();
        let mut agent = Self {
            node: member.node,
            role: member.role,
            routes: BTreeSet::new(),
            sequence: 0,
            pending: Vec::new(),
            seeds: Vec::new(),
            up_links: BTreeMap::new(),
            log: None,
            origins: BTreeMap::new(),
            followers: BTreeMap::new(),
            view: View::default(),
            following: None,
            changes: Vec::new(),
            leaving: false,
            warm_at_ms: now_ms + 2 * settings.reconnect_ms + settings.heartbeat_ms,
            consensus: (member.role == Role::Core).then(|| {
                // A Raft tick is a heartbeat; an election needs a link timeout of silence.
                let election_tick = (settings.link_timeout_ms / settings.heartbeat_ms.max(1))
                    .clamp(3, 100) as usize;
                Consensus::new(
                    member.node,
                    epoch ^ 0x005E_ED0F_C0DE,
                    settings.heartbeat_ms,
                    election_tick,
                    now_ms,
                )
            }),
            absent_since: BTreeMap::new(),
            left: BTreeSet::new(),
            proposed: BTreeMap::new(),
            told: None,
            departing_until_ms: None,
            waiting_logged_ms: now_ms + 2 * settings.link_timeout_ms,
            members_dirty: true,
            govern_due: true,
            next_govern_ms: 0,
            merging: false,
        };
        for &address in &settings.seeds {
            agent.add_seed(address, true);
        }
        // A core listing every core lists itself: never dial it.
        for seed in &mut agent.seeds {
            seed.is_self = seed.address.to_string() == member.cluster_address;
        }
        agent.view.members.insert(member.node, member.clone());
        if member.role == Role::Core {
            agent.log = Some(Log {
                epoch,
                base: 1,
                entries: VecDeque::new(),
            });
        }
        agent
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// The Raft state to keep in the data directory at a clean shutdown (a core in a group).
    pub fn consensus_state(&self) -> Option<Vec<u8>> {
        self.consensus.as_ref()?.save()
    }

    /// Takes up the Raft state of the last clean shutdown.
    pub fn restore_consensus(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.consensus
            .as_mut()
            .ok_or("this node is an edge: it has no Raft state")?
            .restore(bytes)
    }

    /// A core's view of the Raft group (none on an edge), for status and checkers.
    pub fn consensus(&self) -> Option<ConsensusStatus> {
        self.consensus.as_ref().map(Consensus::status)
    }

    /// This node's own routes, as it tells the cores.
    pub fn routes(&self) -> &BTreeSet<Route> {
        &self.routes
    }

    /// Dial `address` as a core from now on: `configured` for the configuration's seeds and
    /// `ctl cluster join`, not for cores learnt from the member list or that dialled us.
    pub fn add_seed(&mut self, address: SocketAddr, configured: bool) {
        if let Some(seed) = self.seeds.iter_mut().find(|s| s.address == address) {
            seed.configured |= configured;
        } else {
            self.seeds.push(Seed {
                address,
                connection: None,
                connecting: false,
                retry_at_ms: 0,
                node: None,
                is_self: false,
                configured,
            });
        }
        if configured {
            self.leaving = false;
            if let Some(consensus) = &mut self.consensus {
                consensus.hold = false;
            }
        }
    }

    /// `ctl cluster join`: dial `address` as a core from now on. A core that founded a group
    /// alone (a cluster of one) drops it for the group it finds there; a core whose group
    /// has other voters keeps its own (two multi-core clusters are not merged).
    pub fn join(&mut self, address: SocketAddr) {
        self.add_seed(address, true);
        self.merging = self
            .consensus
            .as_ref()
            .is_some_and(|c| c.is_initialized() && !c.has_other_voters());
    }

    /// This node's route set changed (from shard 0's node route table).
    pub fn node_route(
        &mut self,
        route: Route,
        added: bool,
        settings: &ClusterSettings,
        now_ms: u64,
    ) {
        let changed = if added {
            self.routes.insert(route.clone())
        } else {
            self.routes.remove(&route)
        };
        if !changed {
            return;
        }
        self.sequence += 1;
        if self.log.is_some() {
            self.append(
                LogEntry::Route {
                    origin: self.node,
                    route: route.clone(),
                    added,
                },
                settings,
                now_ms,
            );
        }
        self.pending.push(RouteDelta {
            sequence: self.sequence,
            route,
            added,
        });
    }

    /// Appends to this core's log and applies the entry to its own view (except the group's
    /// word that this node itself is down or removed: a node always counts itself in).
    fn append(&mut self, entry: LogEntry, settings: &ClusterSettings, now_ms: u64) {
        let log = self.log.as_mut().expect("only a core appends");
        let about_self = match &entry {
            LogEntry::Down(n) | LogEntry::Removed(n) => *n == self.node,
            // A committed member record of this node may be of an earlier run.
            LogEntry::Joined(m) => m.node == self.node,
            _ => false,
        };
        if !about_self {
            self.view.apply(&entry, &mut self.changes);
        }
        log.entries.push_back((now_ms, entry));
        while log.entries.len() > settings.log_entries_max {
            log.entries.pop_front();
            log.base += 1;
        }
    }

    /// Dials the seeds that are due.
    pub fn tick(&mut self, io: &mut Io) {
        let now_ms = io.now_ms;
        if self.departure_due(now_ms) {
            self.finish_leave(io);
        }
        if !self.leaving {
            for (index, seed) in self.seeds.iter_mut().enumerate() {
                if seed.connection.is_none()
                    && !seed.connecting
                    && !seed.is_self
                    && now_ms >= seed.retry_at_ms
                {
                    seed.connecting = true;
                    io.connect(seed.address, TAG_SEED | index as u64);
                }
            }
        }
        if let Some(consensus) = &mut self.consensus {
            consensus.tick(now_ms);
        }
    }

    /// The earliest time `tick` has work.
    pub fn next_deadline_ms(&self, settings: &ClusterSettings) -> Option<u64> {
        let seeds = self
            .seeds
            .iter()
            .filter(|s| s.connection.is_none() && !s.connecting && !s.is_self && !self.leaving)
            .map(|s| s.retry_at_ms);
        let grace = self
            .absent_since
            .values()
            .map(|since| since + settings.down_grace_ms);
        let warm = self
            .followers
            .values()
            .any(|f| f.snapshot_due)
            .then_some(self.warm_at_ms);
        let raft = self
            .consensus
            .as_ref()
            .and_then(Consensus::next_deadline_ms);
        seeds.chain(grace).chain(warm).chain(raft).min()
    }

    /// An outbound connection to seed `index` is open (its handshake starts) or failed.
    pub fn seed_connected(
        &mut self,
        index: usize,
        connection: Option<ConnectionId>,
        now_ms: u64,
        reconnect_ms: u64,
    ) {
        let Some(seed) = self.seeds.get_mut(index) else {
            return;
        };
        seed.connecting = false;
        seed.connection = connection;
        if connection.is_none() {
            seed.retry_at_ms = now_ms + reconnect_ms;
        }
    }

    /// Whether `connection` is a control link of ours (dialled to a seed).
    pub fn is_seed_link(&self, connection: ConnectionId) -> bool {
        self.seeds.iter().any(|s| s.connection == Some(connection))
    }

    /// A control link finished its handshake.
    pub fn link_up(&mut self, connection: ConnectionId, io: &mut Io) {
        self.govern_due = true;
        let link = io.links.get(&connection).expect("the link is up");
        let peer = link.up_peer().expect("the handshake is over").clone();
        let outbound = self.is_seed_link(connection);
        if outbound {
            let seed = self
                .seeds
                .iter_mut()
                .find(|s| s.connection == Some(connection))
                .expect("a seed link");
            seed.node = Some(peer.node);
            if peer.node == self.node {
                seed.is_self = true;
                io.close(connection);
                return;
            }
            if peer.role != Role::Core {
                warn!(address = %seed.address, node = peer.node, "seed is not a core node: not used");
                seed.is_self = true;
                io.close(connection);
                return;
            }
            if self.up_links.values().any(|&(n, _)| n == peer.node)
                && self.seeds.iter().any(|s| {
                    s.node == Some(peer.node)
                        && s.connection != Some(connection)
                        && s.connection.is_some()
                })
            {
                // Two seed addresses lead to one core: one link is enough.
                let seed = self
                    .seeds
                    .iter_mut()
                    .find(|s| s.connection == Some(connection))
                    .expect("a seed link");
                seed.is_self = true;
                io.close(connection);
                return;
            }
            info!(node = peer.node, "control link to core up");
            self.up_links.insert(connection, (peer.node, peer.role));
            if let Some(consensus) = &self.consensus {
                io.send(connection, &group_state(consensus.group_state()));
            }
            io.send(
                connection,
                &Body::RouteSync {
                    sequence: self.sequence,
                    routes: self.routes.iter().cloned().collect(),
                },
            );
            if self.role == Role::Edge && self.following.is_none() {
                self.follow(connection, io);
            }
        } else {
            if self.log.is_none() {
                io.refuse(connection, "this node is an edge: dial a core");
                return;
            }
            let member = peer
                .member
                .clone()
                .expect("an inbound link's Hello names its member");
            info!(node = peer.node, role = ?peer.role, address = %member.cluster_address, "node joined through a control link");
            self.up_links.insert(connection, (peer.node, peer.role));
            // Membership is the Raft group's to decide: the leader sees this link and
            // proposes the node joined (or up again).
            self.left.remove(&peer.node);
            match self.origins.get_mut(&peer.node) {
                Some(origin) if origin.member == member => origin.links += 1,
                Some(origin) => {
                    origin.member = member.clone();
                    origin.sequence = 0;
                    origin.links += 1;
                    origin.held = None;
                }
                None => {
                    self.origins.insert(
                        peer.node,
                        Origin {
                            member: member.clone(),
                            sequence: 0,
                            links: 1,
                            held: None,
                        },
                    );
                }
            }
            // Cores link both ways: a core that dials us is dialled back, so that our routes
            // reach it too.
            if peer.role == Role::Core
                && let Ok(address) = member.cluster_address.parse::<SocketAddr>()
                && !self.seeds.iter().any(|s| s.node == Some(peer.node))
            {
                self.add_seed(address, false);
            }
        }
    }

    fn follow(&mut self, connection: ConnectionId, io: &mut Io) {
        self.following = Some((connection, 0, 0));
        io.send(connection, &Body::Follow { epoch: 0, next: 0 });
    }

    /// A frame on an up control link.
    pub fn receive(
        &mut self,
        connection: ConnectionId,
        body: Body,
        io: &mut Io,
    ) -> Result<(), String> {
        let &(node, _) = self
            .up_links
            .get(&connection)
            .ok_or("not an up control link")?;
        let now_ms = io.now_ms;
        match body {
            Body::Heartbeat { applied } => {
                if let Some(follower) = self.followers.get_mut(&connection) {
                    follower.applied = applied;
                }
            }
            Body::RouteSync { sequence, routes } => {
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
                self.append(
                    LogEntry::Replace {
                        origin: node,
                        routes,
                    },
                    &io.settings,
                    now_ms,
                );
            }
            Body::RouteDeltas { deltas } => {
                for delta in deltas {
                    let origin = self
                        .origins
                        .get_mut(&node)
                        .ok_or("RouteDeltas to a node that is not a core")?;
                    if delta.sequence != origin.sequence + 1 {
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
                    self.append(
                        LogEntry::Route {
                            origin: node,
                            route: delta.route,
                            added: delta.added,
                        },
                        &io.settings,
                        now_ms,
                    );
                }
            }
            Body::Follow { epoch, next } => {
                let log = self.log.as_ref().ok_or("Follow sent to an edge")?;
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
            Body::LogSnapshot {
                epoch,
                next,
                members,
                down,
                routes,
                settings,
            } => {
                let Some((following, _, _)) = self.following else {
                    return Ok(());
                };
                if following != connection {
                    return Ok(());
                }
                info!(
                    core = node,
                    entries = next - 1,
                    "route table replaced by a snapshot of the core's log"
                );
                let mut view = View::from_parts((members, down, routes, settings));
                // This node's own routes are its own to tell; the core's copy may lag.
                view.routes.remove(&self.node);
                view.members.insert(self.node, self.member_of(io));
                self.view.replace(view, &mut self.changes);
                self.following = Some((connection, epoch, next));
                // Tell the core at once how far we are: its replication lag stays exact.
                io.send(connection, &Body::Heartbeat { applied: next });
            }
            Body::LogEntries {
                epoch,
                first,
                entries,
            } => {
                let Some((following, follow_epoch, follow_next)) = self.following else {
                    return Ok(());
                };
                if following != connection {
                    return Ok(());
                }
                if epoch != follow_epoch || first != follow_next {
                    warn!(
                        core = node,
                        first,
                        expected = follow_next,
                        "gap in the route log: asking for a snapshot"
                    );
                    self.follow(connection, io);
                    return Ok(());
                }
                let count = entries.len() as u64;
                for entry in entries {
                    let own = match &entry {
                        LogEntry::Route { origin, .. } | LogEntry::Replace { origin, .. } => {
                            *origin == self.node
                        }
                        LogEntry::Removed(n) => *n == self.node,
                        _ => false,
                    };
                    if !own {
                        self.view.apply(&entry, &mut self.changes);
                    }
                }
                self.following = Some((connection, epoch, first + count));
                io.send(
                    connection,
                    &Body::Heartbeat {
                        applied: first + count,
                    },
                );
            }
            Body::Leave => {
                self.govern_due = true;
                info!(node, "node left the cluster");
                self.left.insert(node);
                // A core that leaves keeps its links until the leader has removed its voter
                // (it closes them itself); an edge goes at once.
                let from_core = self
                    .up_links
                    .get(&connection)
                    .is_some_and(|&(_, r)| r == Role::Core);
                if !from_core {
                    io.close(connection);
                    self.link_closed(connection, io);
                }
            }
            Body::Raft { message } => {
                let consensus = self.consensus.as_mut().ok_or("a Raft message to an edge")?;
                consensus.step(node, &message, now_ms)?;
            }
            Body::GroupState {
                initialized,
                id,
                founders,
            } => {
                let consensus = self
                    .consensus
                    .as_mut()
                    .ok_or("a Raft group state to an edge")?;
                consensus.heard(
                    node,
                    Heard {
                        initialized,
                        id,
                        founders,
                    },
                )?;
            }
            other => {
                return Err(format!(
                    "unexpected frame kind {} on a control link",
                    other.kind()
                ));
            }
        }
        Ok(())
    }

    /// Whether the Raft group has committed the run of `node` this core is linked to.
    fn admitted(&self, node: NodeId) -> bool {
        let Some(consensus) = &self.consensus else {
            return true;
        };
        self.origins
            .get(&node)
            .is_some_and(|o| consensus.registry.members.get(&node) == Some(&o.member))
    }

    fn member_of(&self, io: &Io) -> Member {
        io.settings.link.member.clone()
    }

    /// A control link closed (or failed its handshake).
    pub fn link_closed(&mut self, connection: ConnectionId, io: &mut Io) {
        self.govern_due = true;
        let now_ms = io.now_ms;
        // Only links the origin dialled count towards it being up: our own link to a core
        // says nothing of whether that core reaches us.
        let inbound = !self.is_seed_link(connection);
        for seed in &mut self.seeds {
            if seed.connection == Some(connection) {
                seed.connection = None;
                seed.retry_at_ms = now_ms + io.settings.reconnect_ms;
            }
        }
        self.followers.remove(&connection);
        let Some((node, _)) = self.up_links.remove(&connection) else {
            return;
        };
        if self.following.is_some_and(|(c, _, _)| c == connection) {
            self.following = None;
            warn!(core = node, "lost the core this edge follows");
            let other = self
                .up_links
                .iter()
                .find(|(_, (_, role))| *role == Role::Core)
                .map(|(c, _)| *c);
            if let Some(other) = other {
                self.follow(other, io);
            }
        }
        if self.log.is_some()
            && inbound
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

    /// Sends what the batch produced: route deltas to every core, new log entries to
    /// followers, and heartbeats where a link has been quiet.
    pub fn flush(&mut self, io: &mut Io) {
        self.learn_cores();
        self.consensus_round(io);
        let cores: Vec<ConnectionId> = self
            .up_links
            .iter()
            .filter(|(c, (_, role))| *role == Role::Core && self.is_seed_link(**c))
            .map(|(c, _)| *c)
            .collect();
        if !self.pending.is_empty() {
            let deltas = std::mem::take(&mut self.pending);
            for &connection in &cores {
                io.send(
                    connection,
                    &Body::RouteDeltas {
                        deltas: deltas.clone(),
                    },
                );
            }
        }
        if let Some(log) = &self.log {
            let next = log.next();
            let warm = io.now_ms >= self.warm_at_ms;
            for (&connection, follower) in &mut self.followers {
                if follower.snapshot_due {
                    if !warm {
                        continue;
                    }
                    let (members, down, routes, settings) = self.view.parts();
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
    }

    /// Every node keeps a control link to every core of the member list, not only to its
    /// seeds: the Raft leader sees every node directly, and an edge can follow any core.
    fn learn_cores(&mut self) {
        if !std::mem::take(&mut self.members_dirty) {
            return;
        }
        let unknown: Vec<SocketAddr> = self
            .view
            .members
            .values()
            .filter(|m| m.role == Role::Core && m.node != self.node)
            .filter(|m| !self.seeds.iter().any(|s| s.node == Some(m.node)))
            .filter_map(|m| m.cluster_address.parse().ok())
            .collect();
        for address in unknown {
            if !self.leaving {
                self.add_seed(address, false);
            }
        }
    }

    /// The voters this core would found the Raft group with: itself and the cores of its
    /// configured seeds, once every one of those has answered; none before.
    fn founders(&self) -> Vec<NodeId> {
        let configured = self.seeds.iter().filter(|s| s.configured);
        let mut founders = vec![self.node];
        // Addresses of this node itself, of an edge, or a second address of a core: skipped.
        for seed in configured.filter(|s| !s.is_self) {
            match seed.node {
                Some(node)
                    if seed
                        .connection
                        .is_some_and(|c| self.up_links.get(&c) == Some(&(node, Role::Core))) =>
                {
                    founders.push(node)
                }
                _ => return Vec::new(),
            }
        }
        founders.sort_unstable();
        founders.dedup();
        founders
    }

    /// One round of the Raft group: founding, the leader's decisions, raft-rs's ready cycle,
    /// the committed entries into the route log, and the messages out.
    fn consensus_round(&mut self, io: &mut Io) {
        if self.consensus.is_none() {
            return;
        }
        if self.departure_due(io.now_ms) {
            self.finish_leave(io);
            return;
        }
        // Runs after every batch: allocates only while the core is not in a group, or when
        // what it tells the other cores changed.
        let founders = match &self.consensus {
            Some(c) if !c.is_initialized() => self.founders(),
            _ => Vec::new(),
        };
        let consensus = self.consensus.as_mut().expect("checked");
        if self.merging && consensus.other_group_runs() {
            self.merging = false;
            if consensus.is_initialized() {
                info!(
                    "joining another cluster's Raft group: this core's own group of one is dropped"
                );
                consensus.reset();
                consensus.hold = false;
            }
        }
        if !consensus.is_initialized() {
            consensus.set_founders(&founders);
        }
        if !consensus.is_initialized() && !consensus.hold && io.now_ms >= self.waiting_logged_ms {
            // Say why there is no group yet, every 10 s while it lasts.
            self.waiting_logged_ms = io.now_ms + 10_000;
            let unreached: Vec<String> = self
                .seeds
                .iter()
                .filter(|s| s.configured && !s.is_self)
                .filter(|s| s.connection.is_none_or(|c| !self.up_links.contains_key(&c)))
                .map(|s| s.address.to_string())
                .collect();
            if !unreached.is_empty() {
                info!(
                    ?unreached,
                    "not in the cores' Raft group yet: the first start of a cluster waits for every core of the seed list"
                );
            } else if self.up_links.values().any(|&(_, r)| r == Role::Core) {
                info!(
                    "not in the cores' Raft group yet: waiting for the other cores to agree on the founders, or for the leader to add this core"
                );
            }
        }
        consensus.try_found();
        if self.told.as_ref().is_none_or(|told| !consensus.tells(told)) {
            let state = consensus.group_state();
            self.told = Some(state.clone());
            for (&connection, &(_, role)) in &self.up_links {
                if role == Role::Core && self.is_seed_link(connection) {
                    io.send(connection, &group_state(state.clone()));
                }
            }
        }
        self.consensus.as_mut().expect("checked").process();
        self.mirror(io);
        // The leader's decisions iterate over every node: they run when something they
        // depend on moved (a link, a commit, a Leave) and once a heartbeat, not every batch.
        if std::mem::take(&mut self.govern_due) || io.now_ms >= self.next_govern_ms {
            self.next_govern_ms = io.now_ms + io.settings.heartbeat_ms;
            self.govern(io);
        }
        let consensus = self.consensus.as_mut().expect("checked");
        consensus.process();
        self.mirror(io);
        let outbox = self.consensus.as_mut().expect("checked").take_outbox();
        for (to, message) in outbox {
            let link = self.up_links.iter().find(|&(c, &(node, _))| {
                node == to && self.seeds.iter().any(|s| s.connection == Some(*c))
            });
            match link {
                Some((&connection, _)) => io.send(connection, &Body::Raft { message }),
                None => debug!(to, "no control link to the core: Raft message dropped"),
            }
        }
    }

    /// Mirrors what the Raft group committed into this core's route log, in commit order.
    fn mirror(&mut self, io: &mut Io) {
        let now_ms = io.now_ms;
        let committed = std::mem::take(&mut self.consensus.as_mut().expect("a core").committed);
        self.govern_due |= !committed.is_empty();
        for item in committed {
            let entries = match item {
                Committed::Entry(entry) => vec![entry],
                Committed::Snapshot => {
                    // The registry was replaced: the difference, as entries.
                    let registry = &self.consensus.as_ref().expect("a core").registry;
                    // Members linked to this core stay: the leader sees them too and has
                    // them joined again (a new group starts from an empty registry).
                    let gone = self
                        .view
                        .members
                        .keys()
                        .filter(|n| **n != self.node && !registry.members.contains_key(n))
                        .filter(|n| self.origins.get(n).is_none_or(|o| o.links == 0))
                        .map(|n| LogEntry::Removed(*n));
                    let up = self
                        .view
                        .down
                        .iter()
                        .filter(|n| !registry.down.contains(n))
                        .map(|n| LogEntry::Up(*n));
                    let entries = registry
                        .entries()
                        .into_iter()
                        .filter(|e| !matches!(e, LogEntry::Removed(_)));
                    gone.chain(up).chain(entries).collect()
                }
            };
            for entry in entries {
                match entry {
                    LogEntry::Removed(node) if node != self.node => {
                        // A node that is linked to this core again keeps its routes: they
                        // come back right after its removal.
                        let linked = self.origins.get(&node).is_some_and(|o| o.links > 0);
                        let routes = self.view.routes.get(&node).cloned().unwrap_or_default();
                        info!(
                            node,
                            "node removed from the cluster: its routes are withdrawn"
                        );
                        self.append(LogEntry::Removed(node), &io.settings, now_ms);
                        if linked {
                            // Back in the log once the leader has it joined again.
                            let origin = self.origins.get_mut(&node).expect("linked");
                            origin.held.get_or_insert(routes);
                        } else {
                            self.origins.remove(&node);
                        }
                    }
                    LogEntry::Joined(member) => {
                        let node = member.node;
                        self.append(LogEntry::Joined(member.clone()), &io.settings, now_ms);
                        if let Some(origin) = self.origins.get_mut(&node)
                            && origin.member == member
                            && let Some(routes) = origin.held.take()
                        {
                            self.append(
                                LogEntry::Replace {
                                    origin: node,
                                    routes: routes.into_iter().collect(),
                                },
                                &io.settings,
                                now_ms,
                            );
                        }
                    }
                    LogEntry::Down(node) => {
                        warn!(
                            node,
                            "node is down: its routes are kept for the grace period"
                        );
                        self.append(LogEntry::Down(node), &io.settings, now_ms);
                    }
                    entry => self.append(entry, &io.settings, now_ms),
                }
            }
        }
    }

    /// The Raft leader's decisions, from the links every node keeps to every core: who joined,
    /// who is down, who is back, who is removed (after the grace period, or at once when it
    /// said it leaves), and which cores vote. Each is proposed again only if it has not been
    /// committed within an election timeout.
    fn govern(&mut self, io: &mut Io) {
        let now_ms = io.now_ms;
        let consensus = self.consensus.as_ref().expect("a core");
        if !consensus.is_leader() {
            self.absent_since.clear();
            self.proposed.clear();
            return;
        }
        let registry = &consensus.registry;
        let mut wanted = Vec::new();
        let me = io.settings.link.member.clone();
        if registry.members.get(&self.node) != Some(&me) {
            wanted.push(LogEntry::Joined(me));
        } else if registry.down.contains(&self.node) {
            wanted.push(LogEntry::Up(self.node));
        }
        for (&node, origin) in &self.origins {
            if origin.links == 0 || self.left.contains(&node) {
                continue;
            }
            if registry.members.get(&node) != Some(&origin.member) {
                wanted.push(LogEntry::Joined(origin.member.clone()));
            } else if registry.down.contains(&node) {
                wanted.push(LogEntry::Up(node));
            }
        }
        for &node in registry.members.keys() {
            let linked = self.origins.get(&node).is_some_and(|o| o.links > 0);
            if node == self.node || (linked && !self.left.contains(&node)) {
                self.absent_since.remove(&node);
                continue;
            }
            let since = *self.absent_since.entry(node).or_insert(now_ms);
            if self.left.contains(&node) || now_ms >= since + io.settings.down_grace_ms {
                wanted.push(LogEntry::Removed(node));
            } else if !registry.down.contains(&node) {
                wanted.push(LogEntry::Down(node));
            }
        }
        self.absent_since
            .retain(|node, _| registry.members.contains_key(node));
        // One voter change at a time.
        let voter_change = consensus.voter_change();
        let retry_ms = io.settings.link_timeout_ms * 2;
        self.proposed.retain(|_, at| now_ms < *at + retry_ms);
        let consensus = self.consensus.as_mut().expect("a core");
        for entry in wanted {
            let key = format!("{entry:?}");
            if self.proposed.contains_key(&key) {
                continue;
            }
            debug!(?entry, "the Raft leader proposes");
            if let Err(error) = consensus.propose(&entry) {
                debug!(%error, "proposal not taken");
            }
            self.proposed.insert(key, now_ms);
        }
        if let Some((id, add)) = voter_change {
            let key = format!("voter {id} {add}");
            if let std::collections::btree_map::Entry::Vacant(slot) = self.proposed.entry(key) {
                info!(
                    node = id as NodeId,
                    incarnation = id >> 32,
                    add,
                    "the Raft leader changes the cores' voters"
                );
                if let Err(error) = consensus.propose_voter(id, add) {
                    debug!(%error, "voter change not taken");
                }
                slot.insert(now_ms);
            }
        }
    }

    /// Proposes a cluster-wide setting (`ctl cluster set`). A core only; a follower forwards
    /// the proposal to the leader.
    pub fn propose_setting(&mut self, key: &str, value: &str) -> Result<(), String> {
        check_setting(key, value)?;
        let consensus = self
            .consensus
            .as_mut()
            .ok_or("cluster-wide settings are set on a core node")?;
        if consensus.leader().is_none() {
            return Err("the cores' Raft group has no leader now: try again".into());
        }
        consensus.propose(&LogEntry::Setting {
            key: key.into(),
            value: value.into(),
        })
    }

    /// The next log entry this node needs from the core it follows, for heartbeats.
    pub fn applied(&self) -> u64 {
        self.following.map_or(0, |(_, _, next)| next)
    }

    /// Leaves the cluster: tells every core, closes the control links and forgets the other
    /// nodes' routes. A later `add_seed` joins again. A core that votes in a group with other
    /// voters first waits (a few link timeouts at most) for the leader to remove its voter:
    /// leaving at once could take the quorum away from the cores that stay.
    pub fn leave(&mut self, io: &mut Io) {
        if self.departing_until_ms.is_some() {
            return;
        }
        let cores: Vec<ConnectionId> = self
            .up_links
            .iter()
            .filter(|&(c, &(_, role))| role == Role::Core && self.is_seed_link(*c))
            .map(|(c, _)| *c)
            .collect();
        if let Some(consensus) = &mut self.consensus
            && consensus.is_voter()
            && consensus.has_other_voters()
        {
            info!("leaving the cluster: waiting for the Raft leader to remove this core's voter");
            consensus.transfer_leadership();
            for connection in cores {
                io.send(connection, &Body::Leave);
            }
            self.departing_until_ms = Some(io.now_ms + 4 * io.settings.link_timeout_ms);
            return;
        }
        self.finish_leave(io);
    }

    /// Whether a departing core may go now: its voter is removed, or it waited long enough.
    fn departure_due(&self, now_ms: u64) -> bool {
        self.departing_until_ms.is_some_and(|until| {
            now_ms >= until || self.consensus.as_ref().is_none_or(|c| !c.is_voter())
        })
    }

    fn finish_leave(&mut self, io: &mut Io) {
        info!("leaving the cluster");
        self.departing_until_ms = None;
        self.merging = false;
        self.leaving = true;
        let links: Vec<ConnectionId> = self.up_links.keys().copied().collect();
        for connection in links {
            if self.is_seed_link(connection) {
                io.send(connection, &Body::Leave);
            }
            io.close(connection);
            self.link_closed(connection, io);
        }
        self.seeds.clear();
        self.following = None;
        if let Some(consensus) = &mut self.consensus {
            consensus.reset();
        }
        self.told = None;
        self.absent_since.clear();
        self.proposed.clear();
        let mut alone = View::default();
        alone.members.insert(self.node, self.member_of(io));
        self.origins.clear();
        self.view.replace(alone, &mut self.changes);
    }

    pub fn status(&self, now_ms: u64) -> Status {
        let members = self
            .view
            .members
            .values()
            .map(|member| MemberStatus {
                member: member.clone(),
                state: if member.node == self.node {
                    "self"
                } else if self.view.down.contains(&member.node) {
                    "down"
                } else {
                    "up"
                },
                route_count: if member.node == self.node {
                    self.routes.len()
                } else {
                    self.view.routes.get(&member.node).map_or(0, BTreeSet::len)
                },
            })
            .collect();
        let seeds = self
            .seeds
            .iter()
            .map(|s| {
                let state = if s.is_self {
                    "self or duplicate"
                } else if s.connection.is_some_and(|c| self.up_links.contains_key(&c)) {
                    "up"
                } else if s.connection.is_some() || s.connecting {
                    "connecting"
                } else {
                    "down"
                };
                (s.address, state)
            })
            .collect();
        let following = self.following.and_then(|(c, _, next)| {
            self.up_links
                .get(&c)
                .map(|&(node, _)| (node, next.saturating_sub(1)))
        });
        let followers = match &self.log {
            None => Vec::new(),
            Some(log) => self
                .followers
                .values()
                .map(|f| {
                    // `applied` is the next entry the follower needs.
                    let needed = f.applied.max(log.base);
                    let behind = log.next().saturating_sub(needed);
                    let lag_ms = log
                        .entries
                        .get((needed - log.base) as usize)
                        .map_or(0, |(at, _)| now_ms.saturating_sub(*at));
                    FollowerStatus {
                        node: f.node,
                        applied: needed - 1,
                        behind_entries: behind,
                        lag_ms,
                    }
                })
                .collect(),
        };
        Status {
            node: self.node,
            role: self.role,
            members,
            seeds,
            following,
            log: self.log.as_ref().map(|l| (l.epoch, l.next())),
            followers,
            route_count: self.view.route_count(),
            own_route_count: self.routes.len(),
            consensus: self.consensus.as_ref().map(Consensus::status),
            settings: self
                .view
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn is_control_link(&self, connection: ConnectionId) -> bool {
        self.up_links.contains_key(&connection) || self.is_seed_link(connection)
    }
}

fn group_state(heard: Heard) -> Body {
    Body::GroupState {
        initialized: heard.initialized,
        id: heard.id,
        founders: heard.founders,
    }
}
