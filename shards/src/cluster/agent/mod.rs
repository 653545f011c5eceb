//! The cluster agent: route replication and membership, on shard 0 of every node.
//!
//! Owns, on every node (`Shared`): this node's route set and its route sequence (each change
//! numbered from 1), a control link to every core it knows (the seeds and the cores that
//! dialled it), and the [`View`] the shards' cluster route tables are kept equal to.
//! Owns, by role (`RoleState`): on a core (`Core`), the ordered route log (entries
//! numbered within an epoch that is new at every start), what each origin has told it, the
//! edges that follow the log, and its share of the cores' Raft group; on an edge
//! (`Edge`), which core's log it follows and how far. A role is a type: what exists
//! only on a core cannot be reached on an edge.
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
//!
//! Never: iterates a hash map into what it sends or reports. Every map here is a B-tree or a
//! vector in insertion order, so a seeded simulation replays output for output.
//! Never: panics on what a peer sent; a frame that makes no sense ends its link (an `Err`
//! from [`Agent::receive`]) or is skipped with a log line.

mod core;
mod edge;
mod govern;
mod links;
mod names;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use shardmq_net::frame::{self, Body, LogEntry, Member, NodeId, Role, Route, RouteDelta};
use tracing::info;

use self::core::Core;
use self::edge::Edge;
use super::consensus::{ConsensusStatus, Heard, RaftFileCall, RaftStoreFiles};
use super::view::{Change, View};
use super::{ClusterSettings, Io, SeedName, TAG_SEED};
use crate::message::ConnectionId;

/// The estimated length one frame of the agent may fill: half the frame size limit
/// ([`frame::FRAME_BUDGET_DIVISOR`]), so that what the estimate leaves out always fits.
fn frame_budget(settings: &ClusterSettings) -> usize {
    settings.link.body_len_max / frame::FRAME_BUDGET_DIVISOR
}

/// A route set as frames within `budget`: `RouteSync` with the first run of routes, then
/// `RouteDeltas` adding the rest. The sync carries `sequence` less the number of routes
/// that follow it, and the deltas after it count up to `sequence`: the core sees an unbroken
/// sequence, and the next real change (`sequence + 1`) follows on. A set never holds more
/// routes than `sequence` (each was added by a change), so the subtraction cannot go below 0.
fn route_sync_frames(sequence: u64, routes: &BTreeSet<Route>, budget: usize) -> Vec<Body> {
    let mut runs = frame::cut_by_len(routes.iter().cloned(), Route::len_bound, budget).into_iter();
    let first = runs.next().unwrap_or_default();
    let rest: Vec<Route> = runs.flatten().collect();
    let start = sequence.checked_sub(rest.len() as u64);
    debug_assert!(start.is_some(), "a route set larger than its sequence");
    let start = start.unwrap_or(0);
    let mut frames = vec![Body::RouteSync {
        sequence: start,
        routes: first,
    }];
    let deltas = rest
        .into_iter()
        .zip(start + 1..)
        .map(|(route, sequence)| RouteDelta {
            sequence,
            route,
            added: true,
        });
    frames.extend(route_delta_frames(deltas, budget));
    frames
}

/// Route deltas as `RouteDeltas` frames within `budget`, in order.
fn route_delta_frames(deltas: impl IntoIterator<Item = RouteDelta>, budget: usize) -> Vec<Body> {
    let delta_bound = |d: &RouteDelta| d.route.len_bound() + 16;
    frame::cut_by_len(deltas, delta_bound, budget)
        .into_iter()
        .map(|deltas| Body::RouteDeltas { deltas })
        .collect()
}

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
    /// The seed name (index into `Shared::names`) whose answer gave this address, if any.
    name: Option<usize>,
    /// A seed of a name waits for a fresh answer of that name before each dial, so that a
    /// core that came back at a new address is found there.
    awaiting_name: bool,
}

/// A seed given by name, and what its resolution last said.
#[derive(Debug)]
struct NamedSeed {
    name: SeedName,
    /// A `NodeOutput::Resolve` is out and not answered yet.
    resolving: bool,
    /// Not asked again before this time (the reconnect interval after each answer).
    retry_at_ms: u64,
    /// The last answer's addresses, at most [`super::SEED_ADDRESSES_PER_NAME_MAX`].
    addresses: Vec<SocketAddr>,
    /// Whether any answer came (a core founds no Raft group before every name answered).
    answered: bool,
    /// Failures in a row, and when one was last logged (a warning at most once a minute).
    failures: u64,
    failure_logged_ms: Option<u64>,
    /// The last failure, for status.
    error: Option<String>,
}

/// Status of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node: NodeId,
    pub role: Role,
    pub members: Vec<MemberStatus>,
    pub seeds: Vec<(SocketAddr, &'static str)>,
    /// The seed names: the name, its last addresses, and its last failure if the last answer
    /// was one.
    pub seed_names: Vec<SeedNameStatus>,
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
pub struct SeedNameStatus {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub error: Option<String>,
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

/// What every node keeps, whatever its role.
#[derive(Debug)]
struct Shared {
    node: NodeId,
    /// This node's routes and the number of their last change.
    routes: BTreeSet<Route>,
    sequence: u64,
    /// Changes since the last flush, numbered.
    pending: Vec<RouteDelta>,
    /// In the order they were added (the configuration's first): a seed's index is its dial
    /// tag.
    seeds: Vec<Seed>,
    /// The configuration's seed names, in its order: an index is its resolve tag.
    names: Vec<NamedSeed>,
    /// Control links that finished their handshake: to cores we dialled, and (on a core) from
    /// nodes that dialled us.
    up_links: BTreeMap<ConnectionId, (NodeId, Role)>,
    /// The follower's side: the cluster as the log says, with this node's own routes.
    view: View,
    /// Shard-facing changes not yet told to the shards.
    changes: Vec<Change>,
    leaving: bool,
    /// The member list changed since the cores were last learnt from it.
    members_dirty: bool,
}

/// What only one role keeps. A core is boxed: it is many times an edge's size.
#[derive(Debug)]
enum RoleState {
    Core(Box<Core>),
    Edge(Edge),
}

#[derive(Debug)]
pub struct Agent {
    shared: Shared,
    role: RoleState,
}

impl Agent {
    pub fn new(settings: &ClusterSettings, epoch: u64, now_ms: u64) -> Self {
        let member = settings.link.member.clone();
        let role = match member.role {
            Role::Core => RoleState::Core(Box::new(Core::new(settings, epoch, now_ms))),
            Role::Edge => RoleState::Edge(Edge::default()),
        };
        let mut agent = Self {
            shared: Shared {
                node: member.node,
                routes: BTreeSet::new(),
                sequence: 0,
                pending: Vec::new(),
                seeds: Vec::new(),
                names: settings
                    .seed_names
                    .iter()
                    .map(|name| NamedSeed {
                        name: name.clone(),
                        resolving: false,
                        retry_at_ms: 0,
                        addresses: Vec::new(),
                        answered: false,
                        failures: 0,
                        failure_logged_ms: None,
                        error: None,
                    })
                    .collect(),
                up_links: BTreeMap::new(),
                view: View::default(),
                changes: Vec::new(),
                leaving: false,
                members_dirty: true,
            },
            role,
        };
        for &address in &settings.seeds {
            agent.add_seed(address, true);
        }
        // A core listing every core lists itself: never dial it.
        for seed in &mut agent.shared.seeds {
            seed.is_self = seed.address.to_string() == member.cluster_address;
        }
        agent.shared.view.members.insert(member.node, member);
        agent
    }

    pub fn view(&self) -> &View {
        &self.shared.view
    }

    /// The view changes not yet told to the shards, oldest first. A change of the member list
    /// also has the cores learnt from it again at the next flush.
    pub fn take_changes(&mut self) -> Vec<Change> {
        let changes = std::mem::take(&mut self.shared.changes);
        if changes.contains(&Change::Members) {
            self.shared.members_dirty = true;
        }
        changes
    }

    fn core(&self) -> Option<&Core> {
        match &self.role {
            RoleState::Core(core) => Some(core),
            RoleState::Edge(_) => None,
        }
    }

    fn core_mut(&mut self) -> Option<&mut Core> {
        match &mut self.role {
            RoleState::Core(core) => Some(core),
            RoleState::Edge(_) => None,
        }
    }

    /// Takes up the durable Raft state of the data directory (a core; an edge has none and
    /// ignores it), and persists there from now on.
    pub fn open_raft_store(&mut self, files: RaftStoreFiles) -> Result<(), String> {
        match self.core_mut() {
            Some(core) => core.consensus.open_store(files),
            None => Ok(()),
        }
    }

    /// The Raft store's file calls of this batch, in order.
    pub fn take_raft_file_calls(&mut self) -> Vec<RaftFileCall> {
        self.core_mut()
            .map(|core| core.consensus.take_file_calls())
            .unwrap_or_default()
    }

    /// The reactor completed Raft file call `tag`.
    pub fn raft_files_done(&mut self, tag: u64, result: Result<(), String>) {
        if let Some(core) = self.core_mut() {
            core.consensus.files_done(tag, result);
        }
    }

    /// A core's view of the Raft group (none on an edge), for status and checkers.
    pub fn consensus(&self) -> Option<ConsensusStatus> {
        self.core().map(|core| core.consensus.status())
    }

    /// This node's own routes, as it tells the cores.
    pub fn routes(&self) -> &BTreeSet<Route> {
        &self.shared.routes
    }

    /// Dial `address` as a core from now on: `configured` for the configuration's seeds and
    /// `ctl cluster join`, not for cores learnt from the member list or that dialled us.
    pub fn add_seed(&mut self, address: SocketAddr, configured: bool) {
        self.shared.add_seed(address, configured);
        if configured && let Some(core) = self.core_mut() {
            core.consensus.hold = false;
        }
    }

    /// `ctl cluster join`: dial `address` as a core from now on. A core that founded a group
    /// alone (a cluster of one) drops it for the group it finds there; a core whose group
    /// has other voters keeps its own (two multi-core clusters are not merged).
    pub fn join(&mut self, address: SocketAddr) {
        self.add_seed(address, true);
        if let Some(core) = self.core_mut() {
            core.merging = core.consensus.is_initialized() && !core.consensus.has_other_voters();
        }
    }

    /// This node's route set changed (from shard 0's node route table).
    pub fn node_route(
        &mut self,
        route: Route,
        added: bool,
        settings: &ClusterSettings,
        now_ms: u64,
    ) {
        let shared = &mut self.shared;
        let changed = if added {
            shared.routes.insert(route.clone())
        } else {
            shared.routes.remove(&route)
        };
        if !changed {
            return;
        }
        shared.sequence += 1;
        if let RoleState::Core(core) = &mut self.role {
            let entry = LogEntry::Route {
                origin: shared.node,
                route: route.clone(),
                added,
            };
            core.append(shared, entry, settings, now_ms);
        }
        shared.pending.push(RouteDelta {
            sequence: shared.sequence,
            route,
            added,
        });
    }

    /// Dials the seeds that are due.
    pub fn tick(&mut self, io: &mut Io) {
        let now_ms = io.now_ms;
        if self.departure_due(now_ms) {
            self.finish_leave(io);
        }
        if !self.shared.leaving {
            self.shared.resolve_due_names(io);
            for (index, seed) in self.shared.seeds.iter_mut().enumerate() {
                if seed.connection.is_none()
                    && !seed.connecting
                    && !seed.is_self
                    && !seed.awaiting_name
                    && now_ms >= seed.retry_at_ms
                {
                    seed.connecting = true;
                    io.connect(seed.address, TAG_SEED | index as u64);
                }
            }
        }
        if let Some(core) = self.core_mut() {
            core.consensus.tick(now_ms);
        }
    }

    /// The earliest time `tick` has work.
    pub fn next_deadline_ms(&self, settings: &ClusterSettings) -> Option<u64> {
        let leaving = self.shared.leaving;
        let seeds = self
            .shared
            .seeds
            .iter()
            .filter(|s| s.connection.is_none() && !s.connecting && !s.is_self && !s.awaiting_name)
            .map(|s| s.retry_at_ms);
        let names = self.shared.names_deadline_ms();
        let core = self.core().and_then(|core| core.next_deadline_ms(settings));
        let dials = seeds.chain(names).filter(|_| !leaving);
        dials.chain(core).min()
    }

    /// A frame on an up control link.
    pub fn receive(
        &mut self,
        connection: ConnectionId,
        body: Body,
        io: &mut Io,
    ) -> Result<(), String> {
        let &(node, _) = self
            .shared
            .up_links
            .get(&connection)
            .ok_or("not an up control link")?;
        let shared = &mut self.shared;
        match (&mut self.role, body) {
            (RoleState::Core(core), Body::Heartbeat { applied }) => {
                core.heartbeat(connection, applied);
            }
            (RoleState::Edge(_), Body::Heartbeat { .. }) => {}
            (RoleState::Core(core), Body::RouteSync { sequence, routes }) => {
                core.route_sync(shared, node, sequence, routes, io)?;
            }
            (RoleState::Core(core), Body::RouteDeltas { deltas }) => {
                core.route_deltas(shared, node, deltas, io)?;
            }
            (RoleState::Edge(_), Body::RouteSync { .. }) => {
                return Err("RouteSync to a node that is not a core".into());
            }
            (RoleState::Edge(_), Body::RouteDeltas { deltas }) if !deltas.is_empty() => {
                return Err("RouteDeltas to a node that is not a core".into());
            }
            // An empty batch of deltas asks nothing of a core, so an edge lets it pass.
            (RoleState::Edge(_), Body::RouteDeltas { .. }) => {}
            (RoleState::Core(core), Body::Follow { epoch, next }) => {
                core.follow(connection, node, epoch, next);
            }
            (RoleState::Edge(_), Body::Follow { .. }) => {
                return Err("Follow sent to an edge".into());
            }
            (
                RoleState::Edge(edge),
                Body::LogSnapshot {
                    epoch,
                    next,
                    members,
                    down,
                    routes,
                    settings,
                },
            ) => {
                let parts = (members, down, routes, settings);
                edge.snapshot(shared, connection, node, epoch, next, parts, io);
            }
            (
                RoleState::Edge(edge),
                Body::LogEntries {
                    epoch,
                    first,
                    entries,
                },
            ) => edge.entries(shared, connection, node, epoch, first, entries, io),
            (
                RoleState::Edge(edge),
                Body::SnapshotRoutes {
                    epoch,
                    next,
                    routes,
                },
            ) => edge.snapshot_routes(shared, connection, epoch, next, routes),
            // A core follows no one: what a follower is sent is not for it.
            (
                RoleState::Core(_),
                Body::LogSnapshot { .. } | Body::SnapshotRoutes { .. } | Body::LogEntries { .. },
            ) => {}
            (role, Body::Leave) => {
                info!(node, "node left the cluster");
                if let RoleState::Core(core) = role {
                    core.govern_due = true;
                    core.left.insert(node);
                }
                // A core that leaves keeps its links until the leader has removed its voter
                // (it closes them itself); an edge goes at once.
                let from_core = shared
                    .up_links
                    .get(&connection)
                    .is_some_and(|&(_, r)| r == Role::Core);
                if !from_core {
                    io.close(connection);
                    self.link_closed(connection, io);
                }
            }
            (RoleState::Core(core), Body::Raft { message }) => {
                core.consensus.step(node, &message, io.now_ms)?;
            }
            (RoleState::Edge(_), Body::Raft { .. }) => {
                return Err("a Raft message to an edge".into());
            }
            (
                RoleState::Core(core),
                Body::GroupState {
                    initialized,
                    id,
                    founders,
                },
            ) => core.consensus.heard(
                node,
                Heard {
                    initialized,
                    id,
                    founders,
                },
            )?,
            (RoleState::Edge(_), Body::GroupState { .. }) => {
                return Err("a Raft group state to an edge".into());
            }
            (_, other) => {
                return Err(format!(
                    "unexpected frame kind {} on a control link",
                    other.kind()
                ));
            }
        }
        Ok(())
    }

    /// Sends what the batch produced: route deltas to every core, new log entries to
    /// followers, and heartbeats where a link has been quiet.
    pub fn flush(&mut self, io: &mut Io) {
        self.shared.learn_cores();
        if self.departure_due(io.now_ms) {
            self.finish_leave(io);
        } else if let RoleState::Core(core) = &mut self.role {
            core.consensus_round(&mut self.shared, io);
        }
        let shared = &mut self.shared;
        if !shared.pending.is_empty() {
            let deltas = std::mem::take(&mut shared.pending);
            let frames = route_delta_frames(deltas, frame_budget(&io.settings));
            for connection in shared.core_links() {
                for body in &frames {
                    io.send(connection, body);
                }
            }
        }
        if let RoleState::Core(core) = &mut self.role {
            core.replicate(&shared.view, io);
        }
    }

    /// Proposes a cluster-wide setting (`ctl cluster set`). A core only; a follower forwards
    /// the proposal to the leader.
    pub fn propose_setting(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.core_mut()
            .ok_or("cluster-wide settings are set on a core node")?
            .propose_setting(key, value)
    }

    /// The next log entry this node needs from the core it follows, for heartbeats.
    pub fn applied(&self) -> u64 {
        match &self.role {
            RoleState::Edge(edge) => edge.applied(),
            RoleState::Core(_) => 0,
        }
    }

    pub fn status(&self, now_ms: u64) -> Status {
        let shared = &self.shared;
        let members = shared
            .view
            .members
            .values()
            .map(|member| MemberStatus {
                member: member.clone(),
                state: if member.node == shared.node {
                    "self"
                } else if shared.view.down.contains(&member.node) {
                    "down"
                } else {
                    "up"
                },
                route_count: if member.node == shared.node {
                    shared.routes.len()
                } else {
                    shared
                        .view
                        .routes
                        .get(&member.node)
                        .map_or(0, BTreeSet::len)
                },
            })
            .collect();
        let seeds = shared
            .seeds
            .iter()
            .map(|s| {
                let state = if s.is_self {
                    "self or duplicate"
                } else if s
                    .connection
                    .is_some_and(|c| shared.up_links.contains_key(&c))
                {
                    "up"
                } else if s.connection.is_some() || s.connecting {
                    "connecting"
                } else {
                    "down"
                };
                (s.address, state)
            })
            .collect();
        let (role, following, log, followers, consensus) = match &self.role {
            RoleState::Core(core) => (
                Role::Core,
                None,
                Some(core.log_position()),
                core.follower_status(now_ms),
                Some(core.consensus.status()),
            ),
            RoleState::Edge(edge) => (Role::Edge, edge.status(shared), None, Vec::new(), None),
        };
        Status {
            node: shared.node,
            role,
            members,
            seeds,
            seed_names: shared.names_status(),
            following,
            log,
            followers,
            route_count: shared.view.route_count(),
            own_route_count: shared.routes.len(),
            consensus,
            settings: shared
                .view
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// An up control link to `node`: the one this node dialled if there is one, else the
    /// one `node` dialled (an edge is reached only on the link it dialled to this core).
    pub fn control_link_to(&self, node: NodeId) -> Option<ConnectionId> {
        let links = || {
            self.shared
                .up_links
                .iter()
                .filter(move |&(_, &(n, _))| n == node)
                .map(|(&c, _)| c)
        };
        links()
            .find(|&c| self.shared.is_seed_link(c))
            .or_else(|| links().next())
    }

    pub fn is_control_link(&self, connection: ConnectionId) -> bool {
        self.shared.up_links.contains_key(&connection) || self.shared.is_seed_link(connection)
    }
}

impl Shared {
    /// See [`Agent::add_seed`]; the core's part of a configured seed is the agent's.
    fn add_seed(&mut self, address: SocketAddr, configured: bool) {
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
                name: None,
                awaiting_name: false,
            });
        }
        if configured {
            self.leaving = false;
        }
    }

    /// Whether `connection` is a control link of ours (dialled to a seed).
    fn is_seed_link(&self, connection: ConnectionId) -> bool {
        self.seeds.iter().any(|s| s.connection == Some(connection))
    }

    /// The up control links this node dialled to cores, in connection order.
    fn core_links(&self) -> Vec<ConnectionId> {
        self.up_links
            .iter()
            .filter(|&(c, &(_, role))| role == Role::Core && self.is_seed_link(*c))
            .map(|(c, _)| *c)
            .collect()
    }

    fn member_of(io: &Io) -> Member {
        io.settings.link.member.clone()
    }
}

fn group_state(heard: Heard) -> Body {
    Body::GroupState {
        initialized: heard.initialized,
        id: heard.id,
        founders: heard.founders,
    }
}
