//! Session replication (issue 16): the persistent sessions this shard is home to are kept on
//! `session_replicas` other nodes, and this shard keeps replicas of other nodes' sessions
//! whose client identifiers it owns, to serve them when their home node is down.
//!
//! Owns: [`Replication`]: the records of this batch for the replicas, the up members the
//! replicas were chosen from and each one's run (epoch), and the replicas held here (a
//! `storage::State` per home node and shard).
//!
//! How, at the home: every record the shard makes about a persistent session (the durable
//! log's own records, `durable.rs`; made whether or not a data directory is configured) is
//! also queued here, and once per batch (`take_outputs`) goes as a `Replicate` item on the
//! data link to each of the session's replica nodes, in order. The replicas of a client
//! identifier are the first `session_replicas` of the up members (this node excluded) by a
//! rendezvous hash of the identifier and the node, so every node computes the same ones
//! from the same membership, and a membership change moves only the sessions whose ranking
//! changed: those are sent whole to their new replicas and ended on the ones they left; a
//! replica that restarted (a new epoch) gets its sessions whole again.
//!
//! How, at a replica: the records are applied to the home's `State` (the same code that
//! replays the durable log), held to this node's limits: at most
//! `persistent_sessions_per_shard_max` replica sessions per shard (more are refused, counted
//! and logged), each within the queue and subscription limits. A home that restarted, or
//! sends a reset, has its replicas dropped here (it sends them whole again).
//!
//! Failover: when the member list shows a home down or gone, the replica that ranks first
//! among the up nodes for a client identifier (this node included, the home excluded)
//! installs the session as its own offline session, which subscribes (so messages published
//! from then on are queued for it) and is recorded and replicated from here on. A claim for
//! a client identifier whose replica is held here (not yet installed) is answered with a
//! `ReplicaOffer` before the `Handover`; the claimant takes the offer only if the home did
//! not answer (`takeover.rs`), so a live home's session always wins.
//!
//! Never: replicates clean sessions or QoS 0 messages (they are not recorded), or holds
//! replicas beyond the limits; the replica side changes nothing for a record it cannot apply
//! (counted).
//!
//! Known limits, said in ARCHITECTURE.md: acknowledgements do not wait for the replicas (the
//! `local` policy only); messages already queued toward a dead home on other nodes are not
//! redirected to the replica; a home that comes back with the same run after a partition
//! while a replica installed its sessions leaves two owners until one is taken over.

use std::collections::{BTreeMap, BTreeSet};

use bytes::BytesMut;

use super::*;
use crate::message::ClusterNode;
use crate::storage::{self, Record, SessionState, State, StateLimits};

/// A `Replicate` item holds records up to about this many bytes (one record of any size
/// still goes alone): far below a frame's budget, so items pack into frames.
const ITEM_BYTES: usize = 256 * 1024;

/// Offers of replicas one claim keeps (one per node answering is the most there can be).
pub(super) const OFFERS_PER_CLAIM_MAX: usize = 8;

/// A shard's side of session replication.
#[derive(Debug)]
pub(super) struct Replication {
    /// How many other nodes keep each session.
    replicas: usize,
    /// Records of this batch, for the replicas of their sessions.
    pending: Vec<Record>,
    /// Records for one node only (a session sent whole to a new replica, or ended on one it
    /// left), in order, before `pending` (the change flushed what came before it).
    direct: Vec<(NodeId, Record)>,
    /// The up members (this node excluded) the replicas were last chosen from, sorted.
    up: Vec<NodeId>,
    /// The run of each member this shard has seen.
    epochs: BTreeMap<NodeId, u64>,
    /// Replicas held here: the sessions of each home node's shard.
    held: BTreeMap<(NodeId, ShardIndex), State>,
    held_sessions: usize,
    limits: StateLimits,
    /// Replica sessions refused at the limit, and records that did not apply.
    pub(super) refused: u64,
    pub(super) unapplied: u64,
    /// Replicas installed as sessions of this node after their home went down.
    pub(super) promoted: u64,
    /// Sessions of each home that this shard took over from their replica while the home
    /// was down (installed here, or given to a claim): the home is told when it is back up
    /// (`Disown`), so that it ends the copy it may have recovered. At most
    /// [`Replication::surrendered_max`] in all.
    surrendered: BTreeMap<NodeId, BTreeSet<ByteString>>,
    surrendered_count: usize,
    /// Replicas offered to a claim lately, and when: not installed here while the claimant
    /// may take them (it says so with `Disown`), or two nodes would serve the session.
    offered: BTreeMap<ByteString, u64>,
    offered_prune_at: usize,
}

/// The score of `node` for `client_id` in the rendezvous ranking: FNV-1a of the identifier
/// and the node, finished with splitmix64 so that nearby node numbers spread.
fn score(client_id: &[u8], node: NodeId) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in client_id.iter().chain(&node.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = hash.wrapping_add(0x9E37_79B9_7F4A_7C15);
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    hash ^ (hash >> 31)
}

/// The first `count` of `nodes` for `client_id`, best first (ties by node number).
pub(super) fn ranked(client_id: &[u8], nodes: &[NodeId], count: usize) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = nodes.iter().map(|&n| (score(client_id, n), n)).collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(count).map(|(_, n)| n).collect()
}

impl Replication {
    /// Queues a record the shard made (only session records are replicated).
    /// Taken over from the caller, which no longer needs it: no copy of its message.
    pub(super) fn record(&mut self, record: Record) {
        if self.replicas > 0 && record.session_client_id().is_some() {
            self.pending.push(record);
        }
    }

    /// Whether a replica of `client_id` from `home` is held here.
    pub(super) fn holds(&self, home: NodeId, client_id: &ByteString) -> bool {
        self.held
            .iter()
            .any(|((h, _), state)| *h == home && state.sessions.contains_key(client_id))
    }

    /// Replica sessions held on this shard.
    pub(super) fn held_count(&self) -> usize {
        self.held_sessions
    }

    fn targets(&self, client_id: &[u8], up: &[NodeId]) -> Vec<NodeId> {
        ranked(client_id, up, self.replicas)
    }

    fn recount(&mut self) {
        self.held_sessions = self.held.values().map(|s| s.sessions.len()).sum();
    }

    /// Tombstones kept for homes that are down: one per replica session this shard may
    /// hold, so the replica limit bounds them.
    fn surrendered_max(&self, persistent_sessions_max: usize) -> usize {
        persistent_sessions_max.max(1)
    }

    /// Notes that `client_id`'s session of `home` (down) is served from here now; false if
    /// the tombstones are full (counted by the caller).
    fn surrender(&mut self, home: NodeId, client_id: &ByteString, max: usize) -> bool {
        if self.surrendered_count >= self.surrendered_max(max) {
            return false;
        }
        if self
            .surrendered
            .entry(home)
            .or_default()
            .insert(client_id.clone())
        {
            self.surrendered_count += 1;
        }
        true
    }

    /// Drops the replica of `client_id` kept from any home but `except`.
    fn forget_other_copies(&mut self, client_id: &ByteString, except: NodeId) {
        let mut changed = false;
        for ((home, _), state) in self.held.iter_mut() {
            if *home != except && state.sessions.remove(client_id).is_some() {
                changed = true;
            }
        }
        if changed {
            self.held.retain(|_, state| !state.sessions.is_empty());
            self.recount();
        }
    }
}

/// A recorded message (wall-clock deadlines) in shard time, with buffers of its own: a
/// deadline already past (or before this run's zero) expires at once.
pub(super) fn shard_time(message: &Message, wall_clock_at_zero_ms: u64) -> Message {
    let mut message = message.clone();
    message.expires_at_ms = message
        .expires_at_ms
        .map(|at| at.saturating_sub(wall_clock_at_zero_ms));
    crate::retained::own_buffers(&mut message);
    message
}

/// A session of a `storage::State` (a held replica, or the recovered log) as a saved session
/// in shard time, for `restore_session` or a handover.
pub(super) fn saved_from_state(
    client_id: &ByteString,
    saved: &SessionState,
    wall_clock_at_zero_ms: u64,
) -> crate::snapshot::SavedSession {
    let shard_time = |message: &Message| shard_time(message, wall_clock_at_zero_ms);
    let delivery = |d: &storage::record::SavedDelivery| crate::snapshot::SavedDelivery {
        message: shard_time(&d.message),
        subscription_identifiers: d.subscription_identifiers.clone(),
    };
    crate::snapshot::SavedSession {
        client_id: client_id.clone(),
        version: saved.version,
        expiry_seconds: saved.expiry_seconds,
        subscriptions: saved
            .subscriptions
            .iter()
            .map(|(filter, &(options, identifier))| (filter.clone(), options, identifier))
            .collect(),
        inflight: saved
            .inflight
            .iter()
            .map(|entry| crate::snapshot::SavedInflight {
                packet_id: entry.packet_id,
                released: entry.released,
                delivery: delivery(&entry.delivery),
            })
            .collect(),
        queue: saved.queue.iter().map(delivery).collect(),
    }
}

impl Shard {
    /// Turns session replication on (a cluster member with `session_replicas` above 0):
    /// every persistent session's records go to its replicas from now on. Without a log the
    /// records go to the replicas only (the durable layer then holds no acknowledgements).
    pub fn attach_replication(&mut self, replicas: usize, wall_clock_at_zero_ms: u64) {
        if replicas == 0 {
            return;
        }
        let replication = Replication {
            replicas,
            pending: Vec::new(),
            direct: Vec::new(),
            up: Vec::new(),
            epochs: BTreeMap::new(),
            held: BTreeMap::new(),
            held_sessions: 0,
            limits: StateLimits::from(&self.config.limits),
            refused: 0,
            unapplied: 0,
            promoted: 0,
            surrendered: BTreeMap::new(),
            surrendered_count: 0,
            offered: BTreeMap::new(),
            offered_prune_at: 1024,
        };
        match &mut self.durable {
            Some(durable) => durable.replication = Some(Box::new(replication)),
            None => {
                for session in self.sessions.iter_mut().flatten() {
                    session.logged = session.expiry_seconds > 0;
                }
                self.durable = Some(Box::new(Durable::without_log(
                    wall_clock_at_zero_ms,
                    self.config.limits.persistent_sessions_per_shard_max,
                    replication,
                )));
            }
        }
    }

    pub(super) fn replication_mut(&mut self) -> Option<&mut Replication> {
        self.durable.as_mut()?.replication.as_deref_mut()
    }

    pub(super) fn replication(&self) -> Option<&Replication> {
        self.durable.as_ref()?.replication.as_deref()
    }

    /// Replica sessions this shard holds for other nodes.
    pub fn replica_session_count(&self) -> usize {
        self.replication().map_or(0, Replication::held_count)
    }

    /// Sends this batch's records to the replicas: one `Replicate` item (or more, past
    /// [`ITEM_BYTES`]) per node, in node order, each holding its records in the order made.
    /// Each record is encoded once, into one buffer for the batch: a node's item is a slice
    /// of it where the node's records follow one another there (every record of the batch
    /// is for it), else a copy of its records' frames (a copy, not another encoding).
    pub(super) fn flush_replication(&mut self) {
        use bytes::Bytes;

        /// A node's item being built: a run of the batch while its frames follow one another
        /// there, else its own copy of them.
        enum Part {
            Shared(std::ops::Range<usize>),
            Owned(BytesMut),
        }
        impl Part {
            fn len(&self) -> usize {
                match self {
                    Part::Shared(run) => run.len(),
                    Part::Owned(bytes) => bytes.len(),
                }
            }
            fn add(&mut self, frame: std::ops::Range<usize>, batch: &Bytes) {
                match self {
                    Part::Shared(run) if run.start == run.end => *run = frame,
                    Part::Shared(run) if run.end == frame.start => run.end = frame.end,
                    Part::Shared(run) => {
                        let mut owned = BytesMut::with_capacity(run.len() + frame.len());
                        owned.extend_from_slice(&batch[run.clone()]);
                        owned.extend_from_slice(&batch[frame]);
                        *self = Part::Owned(owned);
                    }
                    Part::Owned(bytes) => bytes.extend_from_slice(&batch[frame]),
                }
            }
            /// The item's bytes. A run shorter than half the batch is copied, so that a small
            /// item does not keep the whole batch alive in a forward queue.
            fn finish(self, batch: &Bytes) -> Bytes {
                match self {
                    Part::Shared(run) if run.len() * 2 >= batch.len() => batch.slice(run),
                    Part::Shared(run) => Bytes::copy_from_slice(&batch[run]),
                    Part::Owned(bytes) => bytes.freeze(),
                }
            }
        }

        let Some(replication) = self.replication_mut() else {
            return;
        };
        if replication.pending.is_empty() && replication.direct.is_empty() {
            return;
        }
        let mut batch = BytesMut::new();
        // Where each record's frame ends in `batch`, and the nodes it is for.
        let mut framed: Vec<(usize, Vec<NodeId>)> = Vec::new();
        let mut encode = |record: &Record, nodes: Vec<NodeId>| {
            match storage::record::encode_frame(record, &mut batch) {
                Ok(_) => framed.push((batch.len(), nodes)),
                // The shard's records come from bounded packets, as for the log.
                Err(error) => warn!(
                    ?error,
                    ?nodes,
                    "a replication record could not be encoded: the replicas miss it"
                ),
            }
        };
        // A session sent whole to a new replica (at a membership change) goes before what
        // was recorded after the change: those records build on the whole copy, and would
        // not apply without it.
        for (node, record) in std::mem::take(&mut replication.direct) {
            encode(&record, vec![node]);
        }
        let pending = std::mem::take(&mut replication.pending);
        // A delivery makes several records of one session in a row: ranked once.
        let mut last: Option<(&ByteString, Vec<NodeId>)> = None;
        for record in &pending {
            let Some(client_id) = record.session_client_id() else {
                continue;
            };
            let nodes = match &last {
                Some((id, nodes)) if *id == client_id => nodes.clone(),
                _ => {
                    let nodes = replication.targets(client_id.as_bytes(), &replication.up);
                    last = Some((client_id, nodes.clone()));
                    nodes
                }
            };
            encode(record, nodes);
        }
        let batch = batch.freeze();
        let mut nodes: Vec<NodeId> = framed
            .iter()
            .flat_map(|(_, nodes)| nodes.iter().copied())
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut items: Vec<(NodeId, Bytes)> = Vec::new();
        for node in nodes {
            let mut part = Part::Shared(0..0);
            let mut start = 0;
            for (end, targets) in &framed {
                let frame = start..*end;
                start = *end;
                if !targets.contains(&node) {
                    continue;
                }
                if part.len() >= ITEM_BYTES {
                    let full = std::mem::replace(&mut part, Part::Shared(0..0));
                    items.push((node, full.finish(&batch)));
                }
                part.add(frame, &batch);
            }
            if part.len() > 0 {
                items.push((node, part.finish(&batch)));
            }
        }
        for (node, records) in items {
            self.outputs.push(Output::SessionToNode {
                node,
                transfer: SessionTransfer::Replicate {
                    reset: false,
                    records,
                },
            });
        }
    }

    /// The member list changed: sessions whose replicas changed are sent whole to the new
    /// ones and ended on the ones they left; replicas of homes that restarted are dropped;
    /// replicas of homes that are down or gone are installed here where this node ranks
    /// first for them.
    pub(super) fn replication_members_changed(&mut self, nodes: &[ClusterNode]) {
        if self.replication().is_none() {
            return;
        }
        // What is queued was chosen under the old membership: it goes first.
        self.flush_replication();
        let own = self.config.node;
        let mut up: Vec<NodeId> = nodes
            .iter()
            .filter(|n| n.up && n.node != own)
            .map(|n| n.node)
            .collect();
        up.sort_unstable();
        up.dedup();
        let Some(replication) = self.replication_mut() else {
            return;
        };
        let mut restarted = BTreeSet::new();
        for node in nodes {
            if let Some(known) = replication.epochs.insert(node.node, node.epoch)
                && known < node.epoch
            {
                restarted.insert(node.node);
            }
        }
        let old_up = std::mem::replace(&mut replication.up, up.clone());
        // Homes back up (after a restart, or a partition): told which of their sessions are
        // served elsewhere now, before anything else of this batch reaches them.
        let mut disowned = Vec::new();
        for node in up
            .iter()
            .filter(|n| !old_up.contains(n) || restarted.contains(n))
        {
            if let Some(client_ids) = replication.surrendered.remove(node) {
                replication.surrendered_count = replication
                    .surrendered_count
                    .saturating_sub(client_ids.len());
                disowned.extend(client_ids.into_iter().map(|id| (*node, id)));
            }
        }
        // Replicas of a home that restarted: it lost or reloaded its sessions and sends them
        // whole again; what is here is of its previous run.
        let before = replication.held.len();
        replication
            .held
            .retain(|(home, _), _| !restarted.contains(home));
        if replication.held.len() != before {
            replication.recount();
        }
        for (home, client_id) in disowned {
            client_log!(
                INFO,
                self.who_client(&client_id),
                home,
                "the session's old home is back: told that the session is served elsewhere now"
            );
            self.outputs.push(Output::SessionToNode {
                node: home,
                transfer: SessionTransfer::Disown { client_id, home },
            });
        }
        if old_up != up || !restarted.is_empty() {
            self.resend_moved_sessions(&old_up, &up, &restarted);
        }
        let listed_up: BTreeSet<NodeId> = up.iter().copied().collect();
        self.promote_replicas_of_gone_homes(&listed_up);
    }

    /// Sessions of this shard whose replicas differ between `old_up` and `up` (or went to a
    /// node that restarted): written whole to each new replica, ended on each old one that
    /// is still up.
    fn resend_moved_sessions(
        &mut self,
        old_up: &[NodeId],
        up: &[NodeId],
        restarted: &BTreeSet<NodeId>,
    ) {
        let mut direct = Vec::new();
        for index in 0..self.sessions.len() as SessionIndex {
            let Some(session) = self.sessions[index as usize].as_ref() else {
                continue;
            };
            if !session.logged {
                continue;
            }
            let Some(replication) = self.replication() else {
                return;
            };
            let id = session.client_id.as_bytes();
            let old = replication.targets(id, old_up);
            let new = replication.targets(id, up);
            let gained: Vec<NodeId> = new
                .iter()
                .copied()
                .filter(|n| !old.contains(n) || restarted.contains(n))
                .collect();
            let left: Vec<NodeId> = old
                .iter()
                .copied()
                .filter(|n| !new.contains(n) && up.contains(n))
                .collect();
            if gained.is_empty() && left.is_empty() {
                continue;
            }
            let whole = self
                .durable
                .as_deref()
                .map(|durable| durable.session_records(session))
                .unwrap_or_default();
            for node in gained {
                // A pending will is not a session record: it stays with the home.
                direct.extend(
                    whole
                        .iter()
                        .filter(|record| record.session_client_id().is_some())
                        .map(|record| (node, record.clone())),
                );
            }
            for node in left {
                direct.push((
                    node,
                    Record::SessionEnded {
                        client_id: session.client_id.clone(),
                    },
                ));
            }
        }
        if let Some(replication) = self.replication_mut() {
            replication.direct.extend(direct);
        }
    }

    /// Replicas whose home was a member and is not up now: installed here where this node
    /// ranks first among the up nodes (the home excluded) for the client identifier, and
    /// kept where it does not (a claim can still take the copy, which matters when the
    /// first-ranked node holds none: refused at its limit, or of another view) until the
    /// installed session's owner says so (`Disown`) or the home comes back. A replica whose
    /// client is connecting here (a claim waits) is left for that claim to take.
    fn promote_replicas_of_gone_homes(&mut self, up: &BTreeSet<NodeId>) {
        let own = self.config.node;
        let Some(replication) = self.replication() else {
            return;
        };
        // A home never listed (a node joining, whose records came first) is not gone.
        let gone: Vec<(NodeId, ShardIndex)> = replication
            .held
            .keys()
            .filter(|(home, _)| !up.contains(home) && replication.epochs.contains_key(home))
            .copied()
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut candidates: Vec<NodeId> = up.iter().copied().collect();
        candidates.push(own);
        let recent_ms = self
            .now_ms
            .saturating_sub(2 * self.config.takeover_timeout_ms);
        let offered_lately = |client_id: &ByteString| {
            replication
                .offered
                .get(client_id)
                .is_some_and(|&at| at >= recent_ms)
        };
        let mut install = Vec::new();
        for key in &gone {
            let Some(state) = replication.held.get(key) else {
                continue;
            };
            for client_id in state.sessions.keys() {
                if ranked(client_id.as_bytes(), &candidates, 1) == [own]
                    && !self.client_ids.contains_key(client_id)
                    && !self.claims.contains_key(client_id)
                    && !offered_lately(client_id)
                {
                    install.push((*key, client_id.clone()));
                }
            }
        }
        let wall = self
            .durable
            .as_deref()
            .map_or(0, |durable| durable.wall_offset_ms());
        for (key, client_id) in install {
            let home = key.0;
            let Some(saved) = self.replication_mut().and_then(|replication| {
                let saved = replication
                    .held
                    .get_mut(&key)?
                    .sessions
                    .remove(&client_id)?;
                if replication
                    .held
                    .get(&key)
                    .is_some_and(|s| s.sessions.is_empty())
                {
                    replication.held.remove(&key);
                }
                replication.recount();
                Some(saved)
            }) else {
                continue;
            };
            if self.persistent_quota_refuses(&client_id, saved.expiry_seconds) {
                client_log!(
                    WARN,
                    self.who_client(&client_id),
                    home,
                    "a replica is not installed: the shard holds its maximum of persistent sessions"
                );
                continue;
            }
            client_log!(
                INFO,
                self.who_client(&client_id),
                home,
                "the session's home node is down: its replica here is now the session"
            );
            self.restore_session(saved_from_state(&client_id, &saved, wall));
            self.serve_replica(home, &client_id);
            if let Some(replication) = self.replication_mut() {
                replication.promoted += 1;
            }
        }
    }

    /// Notes that the replica of `client_id` from `home` is served from here now (installed
    /// or given to a claim) while `home` is down, so that `home` hears of it when it is back.
    pub(super) fn surrender_replica(&mut self, home: NodeId, client_id: &ByteString, max: usize) {
        let home_up = self.cluster_nodes_up.contains(&home) && !self.unreachable.contains(&home);
        if home_up || home == self.config.node {
            // Its home is up (and answered a claim, or will): nothing to fence.
            return;
        }
        let Some(replication) = self.replication_mut() else {
            return;
        };
        if !replication.surrender(home, client_id, max) {
            client_log!(
                WARN,
                self.who_client(client_id),
                home,
                "too many sessions taken over from down nodes to remember: this one's old home will not be told"
            );
        }
    }

    /// Node `from` serves `client_id`'s session whose home was `home`: a replica of it from
    /// `home` is dropped here, and if this node is `home`, the copy it recovered at its start
    /// ends (unless its client connected here since, which made this copy the newest).
    pub(super) fn disowned(&mut self, from: NodeId, client_id: ByteString, home: NodeId) {
        if home == self.config.node {
            let recovered = self.client_ids.get(&client_id).copied().filter(|&index| {
                let session = self.session(index);
                session.recovered && session.connection.is_none()
            });
            if let Some(index) = recovered {
                client_log!(
                    INFO,
                    self.who_client(&client_id),
                    peer_node = from,
                    "another node took this session over while this node was down: the copy recovered here ends"
                );
                // Its will is not due: the session goes on elsewhere.
                self.session_mut(index).will = None;
                self.end_session(index);
                self.sessions_fenced += 1;
            }
            return;
        }
        if let Some(replication) = self.replication_mut() {
            replication.forget_other_copies(&client_id, from);
        }
    }

    /// Replication records from shard `home_shard` of `home`, applied to its replicas here.
    pub(super) fn replicas_received(
        &mut self,
        home: NodeId,
        home_shard: ShardIndex,
        reset: bool,
        records: Vec<Record>,
    ) {
        let limit = self.config.limits.persistent_sessions_per_shard_max;
        let node = self.config.node;
        if !self.cluster_nodes.contains(&home) {
            // Only members replicate here: a node not listed (yet, or any more) could
            // otherwise plant sessions that a membership change would install.
            debug!(
                node,
                home,
                records = records.len(),
                "replication records from a node that is not a member: dropped"
            );
            if let Some(replication) = self.replication_mut() {
                replication.unapplied += records.len() as u64;
            }
            return;
        }
        let Some(replication) = self.replication_mut() else {
            // This node keeps no replicas (`session_replicas = 0` here): the home's choice
            // does not bind it.
            return;
        };
        let key = (home, home_shard);
        if reset && replication.held.remove(&key).is_some() {
            replication.recount();
        }
        let limits = replication.limits;
        let mut held = replication.held_sessions;
        let state = replication
            .held
            .entry(key)
            .or_insert_with(|| State::new(limits));
        let (mut refused, mut unapplied) = (0u64, 0u64);
        let mut created = Vec::new();
        for record in &records {
            if let Record::SessionCreated { client_id, .. } = record
                && !state.sessions.contains_key(client_id)
                && held >= limit
            {
                refused += 1;
                if refused == 1 {
                    client_log!(
                        WARN,
                        Who::client(node, client_id),
                        home,
                        limit,
                        "a replica is refused: this shard holds its maximum of replica sessions"
                    );
                }
                continue;
            }
            if let Record::SessionCreated { client_id, .. } = record {
                created.push(client_id.clone());
            }
            let had = state.sessions.len();
            if !state.apply(record) {
                // A record for a replica refused at the limit, or ended meanwhile.
                unapplied += 1;
            }
            held = (held + state.sessions.len()).saturating_sub(had);
        }
        if state.sessions.is_empty() {
            replication.held.remove(&key);
        }
        replication.held_sessions = held;
        replication.refused += refused;
        replication.unapplied += unapplied;
        // A session this home (re)created is its own: a copy kept from another home (one
        // that was down when this node took it over) is older.
        for client_id in &created {
            replication.forget_other_copies(client_id, home);
        }
    }

    /// The home of the replica of `client_id` held here, if one is.
    pub(super) fn replica_home(&self, client_id: &ByteString) -> Option<NodeId> {
        let replication = self.replication()?;
        replication
            .held
            .iter()
            .find(|(_, state)| state.sessions.contains_key(client_id))
            .map(|((home, _), _)| *home)
    }

    /// Notes that the replica of `client_id` was offered to a claim now; old notes go when
    /// the map has doubled since the last pruning (amortized O(1) per offer).
    pub(super) fn note_offered(&mut self, client_id: &ByteString) {
        let now_ms = self.now_ms;
        let recent_ms = now_ms.saturating_sub(2 * self.config.takeover_timeout_ms);
        let Some(replication) = self.replication_mut() else {
            return;
        };
        if replication.offered.len() >= replication.offered_prune_at {
            replication.offered.retain(|_, &mut at| at >= recent_ms);
            replication.offered_prune_at = (2 * replication.offered.len()).max(1024);
        }
        replication.offered.insert(client_id.clone(), now_ms);
    }

    /// A copy of the replica of `client_id` held here (the first home's that has one).
    pub(super) fn replica_copy(
        &self,
        client_id: &ByteString,
    ) -> Option<(NodeId, crate::snapshot::SavedSession)> {
        let wall = self
            .durable
            .as_deref()
            .map_or(0, |durable| durable.wall_offset_ms());
        let replication = self.replication()?;
        replication.held.iter().find_map(|((home, _), state)| {
            let saved = state.sessions.get(client_id)?;
            Some((*home, saved_from_state(client_id, saved, wall)))
        })
    }

    /// Takes the replica of `client_id` held here (the first home's that has one; copies
    /// from other homes go too), for a claim.
    pub(super) fn take_replica(
        &mut self,
        client_id: &ByteString,
    ) -> Option<(NodeId, crate::snapshot::SavedSession)> {
        let found = self.replica_copy(client_id);
        let replication = self.replication_mut()?;
        let mut changed = false;
        for state in replication.held.values_mut() {
            changed |= state.sessions.remove(client_id).is_some();
        }
        if changed {
            replication
                .held
                .retain(|_, state| !state.sessions.is_empty());
            replication.recount();
        }
        found
    }

    /// This shard serves `client_id`'s session from a replica of `home` (down): `home` will
    /// hear of it when it is back, and every up node drops the copy it keeps.
    pub(super) fn serve_replica(&mut self, home: NodeId, client_id: &ByteString) {
        let max = self.config.limits.persistent_sessions_per_shard_max;
        self.surrender_replica(home, client_id, max);
        let own = self.config.node;
        for node in self.cluster_nodes_up.clone() {
            if node == own {
                continue;
            }
            self.outputs.push(Output::SessionToNode {
                node,
                transfer: SessionTransfer::Disown {
                    client_id: client_id.clone(),
                    home,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ranked;

    /// Every node computes the same replicas from the same members, whatever their order,
    /// and a node that leaves moves only the identifiers it held.
    #[test]
    fn the_ranking_is_the_same_everywhere_and_moves_little() {
        let members = [2, 3, 4, 5];
        let mut moved = 0;
        for i in 0..1000 {
            let id = format!("client-{i}");
            let first = ranked(id.as_bytes(), &members, 1);
            assert_eq!(first, ranked(id.as_bytes(), &[5, 4, 3, 2], 1));
            assert_eq!(ranked(id.as_bytes(), &members, 4).len(), 4);
            let without_3 = ranked(id.as_bytes(), &[2, 4, 5], 1);
            if first != [3] {
                assert_eq!(first, without_3, "{id} moved though its node stayed");
            } else {
                moved += 1;
            }
        }
        // About a quarter of the identifiers were on node 3.
        assert!((150..350).contains(&moved), "{moved}");
    }
}
