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

use shardmq_net::frame::{self, Body, LogEntry, Member, NodeId, Route, RouteDelta};
use tracing::warn;

use super::super::consensus::{Consensus, Heard};
use super::super::view::View;
use super::super::{ClusterSettings, Io};
use super::{Shared, frame_budget};
use crate::message::ConnectionId;

/// The longest route an origin may send, in bytes of filter and group: an MQTT topic filter
/// (with a shared subscription's `$share/{group}/` before it) is at most 65,535 bytes. A
/// longer one is a peer's error and ends its link; the bound keeps every log entry well
/// inside one frame.
const ROUTE_LEN_MAX: usize = 65_535;

/// Why `route` cannot be taken from an origin, if it cannot.
fn route_refused(route: &Route) -> Option<String> {
    let len = route.filter.len() + route.group.as_ref().map_or(0, String::len);
    (len > ROUTE_LEN_MAX).then(|| format!("a route of {len} bytes (at most {ROUTE_LEN_MAX})"))
}

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

    /// Appends that `routes` replace what the log held for `origin`, in entries that each fit
    /// a frame: a `Replace` with the first run of routes, then one `Route` addition for each
    /// of the rest. Applied in order they build the same set as one `Replace` would, and
    /// `LogEntries` can always be cut between them.
    pub(super) fn append_replace(
        &mut self,
        shared: &mut Shared,
        origin: NodeId,
        routes: impl IntoIterator<Item = Route>,
        settings: &ClusterSettings,
        now_ms: u64,
    ) {
        let mut runs =
            frame::cut_by_len(routes, Route::len_bound, frame_budget(settings)).into_iter();
        let first = runs.next().unwrap_or_default();
        self.append(
            shared,
            LogEntry::Replace {
                origin,
                routes: first,
            },
            settings,
            now_ms,
        );
        for route in runs.flatten() {
            let entry = LogEntry::Route {
                origin,
                route,
                added: true,
            };
            self.append(shared, entry, settings, now_ms);
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
        if let Some(refused) = routes.iter().find_map(route_refused) {
            return Err(format!("RouteSync with {refused}"));
        }
        origin.sequence = sequence;
        if !admitted {
            origin.held = Some(routes.into_iter().collect());
            return Ok(());
        }
        origin.held = None;
        self.append_replace(shared, node, routes, &io.settings, io.now_ms);
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
            if let Some(refused) = route_refused(&delta.route) {
                return Err(format!("route delta {} with {refused}", delta.sequence));
            }
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
        let budget = frame_budget(&io.settings);
        for (&connection, follower) in &mut self.followers {
            if follower.snapshot_due {
                if !warm {
                    continue;
                }
                let (members, down, routes, settings) = view.parts();
                let mut runs =
                    frame::cut_by_len(routes, |(_, route)| route.len_bound() + 16, budget)
                        .into_iter();
                io.send(
                    connection,
                    &Body::LogSnapshot {
                        epoch: log.epoch,
                        next,
                        members,
                        down,
                        routes: runs.next().unwrap_or_default(),
                        settings,
                    },
                );
                for routes in runs {
                    let more = Body::SnapshotRoutes {
                        epoch: log.epoch,
                        next,
                        routes,
                    };
                    io.send(connection, &more);
                }
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
            let entries = log.entries.iter().skip(skip).map(|(_, e)| e.clone());
            // Every entry fits a frame alone (routes are bounded, a `Replace` is cut when it
            // is appended), so the tail goes in runs that each fit, numbered on.
            for entries in frame::cut_by_len(entries, LogEntry::len_bound, budget) {
                let count = entries.len() as u64;
                io.send(
                    connection,
                    &Body::LogEntries {
                        epoch: log.epoch,
                        first: follower.next,
                        entries,
                    },
                );
                follower.next += count;
            }
            debug_assert_eq!(follower.next, next);
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

#[cfg(test)]
pub(super) mod tests {
    use bytes::BytesMut;
    use shardmq_net::frame::{Decoder, Role};

    use super::super::super::LinkSettings;
    use super::super::{Agent, RoleState, route_delta_frames, route_sync_frames};
    use super::*;

    const BODY_LEN_MAX: usize = 64 * 1024;

    fn member(node: NodeId, role: Role) -> Member {
        Member {
            node,
            role,
            cluster_address: format!("127.0.0.{node}:7000"),
            mqtt_address: String::new(),
            epoch: 1,
        }
    }

    pub(in super::super) fn settings(node: NodeId, role: Role) -> ClusterSettings {
        ClusterSettings {
            link: LinkSettings {
                member: member(node, role),
                cluster_name: "test".into(),
                cluster_secret: "a-secret-long-enough-0123".into(),
                body_len_max: BODY_LEN_MAX,
                epoch: 1,
                tls: None,
            },
            seeds: Vec::new(),
            seed_names: Vec::new(),
            heartbeat_ms: 100,
            link_timeout_ms: 500,
            reconnect_ms: 100,
            down_grace_ms: 4_000,
            log_entries_max: 10_000,
            forward_queue_max: 1_000,
            session_replicas: 1,
            start_ms: 0,
        }
    }

    /// Frames through an encoder and a decoder that both hold the limit.
    fn over_the_wire(bodies: &[Body]) -> Vec<Body> {
        let cluster = frame::cluster_id("test");
        let mut bytes = BytesMut::new();
        for body in bodies {
            frame::encode(body, cluster, BODY_LEN_MAX, &mut bytes).expect("within the limit");
        }
        let mut decoder = Decoder::new(cluster, BODY_LEN_MAX);
        decoder.extend(&bytes);
        std::iter::from_fn(|| decoder.next_frame().expect("a frame within the limit")).collect()
    }

    /// A route set three times the frame limit reaches a core as a `RouteSync` and numbered
    /// `RouteDeltas` in frames that each fit; the core's view ends up with the whole set, the
    /// next real change follows on, and every log entry the core keeps fits a frame.
    #[test]
    fn a_route_set_larger_than_a_frame_converges() {
        let budget = BODY_LEN_MAX / frame::FRAME_BUDGET_DIVISOR;
        let routes: BTreeSet<Route> = (0..300)
            .map(|n| Route {
                filter: format!("{n:04}/{}", "f".repeat(600)),
                group: (n % 3 == 0).then(|| format!("g{n}")),
            })
            .collect();
        // The origin made 310 changes to reach this set (some routes came and went).
        let sequence = 310;
        let frames = route_sync_frames(sequence, &routes, budget);
        assert!(frames.len() > 3, "{} frames", frames.len());

        let settings = settings(1, Role::Core);
        let mut agent = Agent::new(&settings, 1, 0);
        let mut io = Io::new(settings.clone(), 0);
        let RoleState::Core(core) = &mut agent.role else {
            panic!("a core")
        };
        let origin = member(2, Role::Edge);
        core.origin_linked(2, &origin);
        core.consensus.registry.members.insert(2, origin);
        for body in over_the_wire(&frames) {
            match body {
                Body::RouteSync { sequence, routes } => core
                    .route_sync(&mut agent.shared, 2, sequence, routes, &io)
                    .unwrap(),
                Body::RouteDeltas { deltas } => core
                    .route_deltas(&mut agent.shared, 2, deltas, &io)
                    .unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
        let gone = routes.first().unwrap().clone();
        let next = route_delta_frames(
            [RouteDelta {
                sequence: sequence + 1,
                route: gone.clone(),
                added: false,
            }],
            budget,
        );
        for body in over_the_wire(&next) {
            let Body::RouteDeltas { deltas } = body else {
                panic!("deltas")
            };
            core.route_deltas(&mut agent.shared, 2, deltas, &io)
                .unwrap();
        }
        let mut expected = routes.clone();
        expected.remove(&gone);
        assert_eq!(agent.shared.view.routes.get(&2), Some(&expected));
        assert!(
            core.log
                .entries
                .iter()
                .all(|(_, e)| e.len_bound() <= budget),
            "every log entry fits a frame"
        );
        // A follower from the start of the log builds the same set from its entries.
        let mut view = View::default();
        for (_, entry) in &core.log.entries {
            view.apply(entry, &mut Vec::new());
        }
        assert_eq!(view.routes.get(&2), Some(&expected));
        // A peer's route longer than an MQTT filter can be ends its link.
        let long = RouteDelta {
            sequence: sequence + 2,
            route: Route {
                filter: "x".repeat(ROUTE_LEN_MAX + 1),
                group: None,
            },
            added: true,
        };
        io.now_ms = 1;
        assert!(
            core.route_deltas(&mut agent.shared, 2, vec![long], &io)
                .is_err()
        );
    }
}
