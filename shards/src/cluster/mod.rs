//! A shard as a member of a cluster: the [`Shard`] plus the cluster links of its reactor.
//!
//! Owns: every cluster link of this reactor (outbound data links to other nodes on every
//! shard; on shard 0 also the control links, the inbound links (only reactor 0 listens on the
//! cluster port) and the [`Agent`]), and the wiring between them and the shard: the shard's
//! `ToNode` outputs become forwarded frames, its `NodeRoute` outputs route deltas, and the
//! agent's view changes the shards' cluster route tables.
//! Never: does I/O, or iterates in an order that is not a function of its inputs (maps here
//! are B-trees, so a seeded simulation replays exactly). Like the shard, a `NodeShard` takes `(now, input)` and returns outputs, so
//! the same code runs under the reactor and in the cluster simulation (`tests/sim/`).

pub mod agent;
pub mod consensus;
pub mod forward;
pub mod link;
pub mod view;

use std::net::SocketAddr;

use bytestring::ByteString;
use shardmq_net::frame::{Body, NodeId, Purpose, Route};
use std::collections::BTreeMap;
use tracing::{debug, info, warn};

pub use agent::{Agent, Status};
pub use link::{Link, LinkSettings};
use view::Change;

use crate::message::{ClusterNode, ConnectionId, SessionTransfer, ShardIndex, ShardMessage};
use crate::shard::{Input, Output, Shard, owner_shard};

/// Outbound connection tags: the kind in the high bits, the seed index or node below.
pub const TAG_SEED: u64 = 1 << 40;
pub const TAG_DATA: u64 = 2 << 40;
const TAG_KIND: u64 = 0xFF << 40;

/// The cluster settings of a node.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub link: LinkSettings,
    /// Cluster addresses of core nodes to dial.
    pub seeds: Vec<SocketAddr>,
    /// A control or data link sends a heartbeat when it has been quiet this long.
    pub heartbeat_ms: u64,
    /// A link silent this long is closed (and redialled, if it is ours).
    pub link_timeout_ms: u64,
    pub reconnect_ms: u64,
    /// How long a core keeps the routes of a node that is down before withdrawing them.
    pub down_grace_ms: u64,
    /// Entries a core's route log keeps for followers that fall behind; older ones are
    /// served as a snapshot.
    pub log_entries_max: usize,
    /// Messages per shard and peer node waiting to be sent or acknowledged.
    pub forward_queue_max: usize,
    /// When this run started (wall clock, ms): the high bits of its epoch, so that a later
    /// run's epoch is larger and a peer can tell news of a restart from stale news.
    pub start_ms: u64,
}

/// The links of one shard and what they need to act: the settings, the clock of the current
/// call, and the outputs for the reactor.
#[derive(Debug)]
pub struct Io {
    pub links: BTreeMap<ConnectionId, Link>,
    pub outputs: Vec<Output>,
    pub settings: ClusterSettings,
    pub now_ms: u64,
}

impl Io {
    pub fn send(&mut self, connection: ConnectionId, body: &Body) {
        if let Some(link) = self.links.get_mut(&connection) {
            link.send(&self.settings.link, body, self.now_ms);
        }
    }

    pub fn connect(&mut self, address: SocketAddr, tag: u64) {
        self.outputs.push(Output::Connect { address, tag });
    }

    /// Closes the link once what is queued for it is sent.
    pub fn close(&mut self, connection: ConnectionId) {
        if let Some(mut link) = self.links.remove(&connection) {
            if let Some(bytes) = link.take_outgoing() {
                self.outputs.push(Output::Send { connection, bytes });
            }
            self.outputs.push(Output::Close { connection });
        }
    }

    pub fn refuse(&mut self, connection: ConnectionId, reason: &str) {
        warn!(connection, reason, "cluster link refused");
        self.send(
            connection,
            &Body::Refused {
                reason: reason.into(),
            },
        );
        self.close(connection);
    }
}

/// The cluster side of one shard.
#[derive(Debug)]
struct Cluster {
    io: Io,
    /// Identifies this start in control-link Hellos (data links carry their peer's epoch).
    epoch: u64,
    random: u64,
    agent: Option<Agent>,
    peers: BTreeMap<NodeId, forward::Peer>,
    /// Data links this shard dialled, by connection.
    data_out: BTreeMap<ConnectionId, NodeId>,
    delivered: forward::Delivered,
    /// Accepted links closed at once because [`link::PENDING_LINKS_MAX`] were in handshake.
    refused_pending: u64,
}

impl Cluster {
    /// What this shard sends to `node`, created with a numbering epoch of its own: a peer
    /// forgotten and made again (the node left and came back) numbers from 1 in a new epoch,
    /// so the receiver never takes its messages for ones it has already delivered.
    fn peer(&mut self, node: NodeId) -> &mut forward::Peer {
        let random = &mut self.random;
        self.peers
            .entry(node)
            .or_insert_with(|| forward::Peer::new(splitmix(random)))
    }

    fn nonce(&mut self) -> [u8; 16] {
        let mut nonce = [0u8; 16];
        for half in nonce.chunks_mut(8) {
            half.copy_from_slice(&splitmix(&mut self.random).to_le_bytes());
        }
        nonce
    }
}

/// splitmix64: nonces and epochs from one seed, so that a simulation replays exactly.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A shard and, in a cluster, its links.
#[derive(Debug)]
pub struct NodeShard {
    pub shard: Shard,
    index: ShardIndex,
    shard_count: u16,
    cluster: Option<Cluster>,
    now_ms: u64,
    scratch: Vec<Output>,
}

impl NodeShard {
    /// A shard of a node on its own (no cluster configured).
    pub fn standalone(shard: Shard, index: ShardIndex, shard_count: u16) -> Self {
        Self {
            shard,
            index,
            shard_count,
            cluster: None,
            now_ms: 0,
            scratch: Vec::new(),
        }
    }

    /// A shard of a cluster member. `seed` makes this start's epoch and nonces (the glue
    /// passes real randomness, the simulation its seeded generator).
    pub fn clustered(
        shard: Shard,
        index: ShardIndex,
        shard_count: u16,
        mut settings: ClusterSettings,
        seed: u64,
        now_ms: u64,
    ) -> Self {
        let mut random = seed;
        let epoch = (settings.start_ms << 16) | (splitmix(&mut random) & 0xFFFF);
        settings.link.epoch = epoch;
        settings.link.member.epoch = epoch;
        let agent = (index == 0).then(|| Agent::new(&settings, epoch, now_ms));
        Self {
            shard,
            index,
            shard_count,
            cluster: Some(Cluster {
                io: Io {
                    links: BTreeMap::new(),
                    outputs: Vec::new(),
                    settings,
                    now_ms,
                },
                epoch,
                random,
                agent,
                peers: BTreeMap::new(),
                data_out: BTreeMap::new(),
                delivered: forward::Delivered::default(),
                refused_pending: 0,
            }),
            now_ms,
            scratch: Vec::new(),
        }
    }

    /// The cluster agent (shard 0 of a cluster member only), for status and for checkers.
    pub fn agent(&self) -> Option<&Agent> {
        self.cluster.as_ref()?.agent.as_ref()
    }

    pub fn is_clustered(&self) -> bool {
        self.cluster.is_some()
    }

    fn is_link(&self, connection: ConnectionId) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.io.links.contains_key(&connection))
    }

    pub fn handle(&mut self, now_ms: u64, input: Input) {
        self.now_ms = now_ms;
        match input {
            Input::Received { connection, bytes } if self.is_link(connection) => {
                self.link_received(connection, &bytes);
            }
            Input::Closed { connection } if self.is_link(connection) => {
                self.link_closed(connection, "closed by the peer");
            }
            Input::Shard(ShardMessage::ClusterNodes(nodes)) if self.cluster.is_some() => {
                self.members_changed(&nodes);
                self.shard
                    .handle(now_ms, Input::Shard(ShardMessage::ClusterNodes(nodes)));
            }
            Input::Shard(ShardMessage::ClusterSettings(settings)) if self.cluster.is_some() => {
                self.settings_changed(&settings);
            }
            Input::Tick => {
                self.shard.handle(now_ms, Input::Tick);
                self.cluster_tick();
            }
            Input::Shutdown => {
                self.shard.handle(now_ms, Input::Shutdown);
                if let Some(cluster) = &mut self.cluster {
                    let links: Vec<ConnectionId> = cluster.io.links.keys().copied().collect();
                    cluster.io.now_ms = now_ms;
                    let io = &mut cluster.io;
                    for connection in links {
                        io.close(connection);
                    }
                }
            }
            input => self.shard.handle(now_ms, input),
        }
    }

    /// The cluster listener (reactor 0) accepted a connection.
    pub fn cluster_accepted(&mut self, now_ms: u64, connection: ConnectionId) {
        self.now_ms = now_ms;
        let Some(cluster) = &mut self.cluster else {
            self.scratch.push(Output::Close { connection });
            return;
        };
        if cluster.io.links.values().filter(|l| !l.is_up()).count() >= link::PENDING_LINKS_MAX {
            cluster.refused_pending += 1;
            if cluster.refused_pending.is_power_of_two() {
                let refused = cluster.refused_pending;
                warn!(
                    refused,
                    "cluster links in handshake at their limit: new ones closed"
                );
            }
            cluster.io.outputs.push(Output::Close { connection });
            return;
        }
        let nonce = cluster.nonce();
        cluster.io.links.insert(
            connection,
            Link::accepted(connection, &cluster.io.settings.link, nonce, now_ms),
        );
    }

    /// An outbound connection asked for with `Output::Connect` is open.
    pub fn connected(&mut self, now_ms: u64, connection: ConnectionId, tag: u64) {
        self.now_ms = now_ms;
        let index = self.index;
        let Some(cluster) = &mut self.cluster else {
            self.scratch.push(Output::Close { connection });
            return;
        };
        let nonce = cluster.nonce();
        let (purpose, epoch) = if tag & TAG_KIND == TAG_SEED {
            (Purpose::Control, cluster.epoch)
        } else {
            let node = (tag & !TAG_KIND) as NodeId;
            let Some(peer) = cluster
                .peers
                .get_mut(&node)
                .filter(|p| p.connection.is_none())
            else {
                // The node left while we dialled it, or a link to it is already open.
                cluster.io.outputs.push(Output::Close { connection });
                return;
            };
            peer.connecting = false;
            peer.connection = Some(connection);
            cluster.data_out.insert(connection, node);
            (Purpose::Data, peer.epoch)
        };
        let link = Link::connecting(
            connection,
            &cluster.io.settings.link,
            purpose,
            index,
            epoch,
            nonce,
            now_ms,
        );
        cluster.io.links.insert(connection, link);
        if purpose == Purpose::Control {
            let reconnect_ms = cluster.io.settings.reconnect_ms;
            if let Some(agent) = &mut cluster.agent {
                agent.seed_connected(
                    (tag & !TAG_KIND) as usize,
                    Some(connection),
                    now_ms,
                    reconnect_ms,
                );
            }
        }
    }

    /// An outbound connection failed.
    pub fn connect_failed(&mut self, now_ms: u64, tag: u64, error: &str) {
        self.now_ms = now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let reconnect_ms = cluster.io.settings.reconnect_ms;
        match tag & TAG_KIND {
            TAG_SEED => {
                debug!(error, "cannot reach a seed core; retrying");
                if let Some(agent) = &mut cluster.agent {
                    agent.seed_connected((tag & !TAG_KIND) as usize, None, now_ms, reconnect_ms);
                }
            }
            _ => {
                let node = (tag & !TAG_KIND) as NodeId;
                debug!(
                    node,
                    error, "cannot reach the node for forwarding; retrying"
                );
                if let Some(peer) = cluster.peers.get_mut(&node) {
                    peer.connecting = false;
                    peer.retry_at_ms = now_ms + reconnect_ms;
                }
            }
        }
    }

    fn link_received(&mut self, connection: ConnectionId, bytes: &[u8]) {
        let now_ms = self.now_ms;
        let cluster = self.cluster.as_mut().expect("a link means a cluster");
        let link = cluster.io.links.get_mut(&connection).expect("a known link");
        let was_up = link.is_up();
        let mut bodies = Vec::new();
        let result = link.receive(&cluster.io.settings.link, bytes, now_ms, &mut bodies);
        if let Err(reason) = result {
            let node = link.up_peer().map_or(0, |p| p.node);
            warn!(connection, node, %reason, "cluster link closed");
            self.link_closed(connection, "refused");
            return;
        }
        let peer = link.up_peer().cloned();
        let Some(peer) = peer else {
            return;
        };
        let outbound_data = cluster.data_out.contains_key(&connection);
        if !was_up {
            debug!(connection, node = peer.node, purpose = ?peer.purpose, "cluster link up");
            match peer.purpose {
                Purpose::Control => {
                    let Some(agent) = &mut cluster.agent else {
                        cluster.io.now_ms = now_ms;
                        let io = &mut cluster.io;
                        io.refuse(connection, "control links go to shard 0");
                        return;
                    };
                    cluster.io.now_ms = now_ms;
                    let io = &mut cluster.io;
                    agent.link_up(connection, io);
                }
                Purpose::Data if outbound_data => {
                    let dialled = cluster.data_out[&connection];
                    if peer.node != dialled {
                        warn!(
                            connection,
                            dialled,
                            answered = peer.node,
                            "a data link reached another node than the one dialled: closed"
                        );
                        self.link_closed(connection, "wrong node");
                        return;
                    }
                    if let Some(p) = cluster.peers.get_mut(&dialled) {
                        let stale = p.relink(peer.remote_epoch);
                        if stale > 0 {
                            warn!(
                                node = dialled,
                                dropped = stale,
                                "the node restarted: forwarded messages queued for its previous run are dropped"
                            );
                        }
                    }
                }
                Purpose::Data => {}
            }
        }
        let mut through = None;
        for body in bodies {
            let result = match (peer.purpose, body) {
                (Purpose::Control, body) => match &mut cluster.agent {
                    Some(agent) => {
                        cluster.io.now_ms = now_ms;
                        let io = &mut cluster.io;
                        agent.receive(connection, body, io)
                    }
                    None => Err("a control frame on a shard without the agent".into()),
                },
                (Purpose::Data, Body::Heartbeat { .. }) => Ok(()),
                (Purpose::Data, Body::ForwardAck { through }) if outbound_data => {
                    if let Some(p) = cluster.peers.get_mut(&peer.node)
                        && p.connection == Some(connection)
                    {
                        p.acknowledged(through);
                    }
                    Ok(())
                }
                (Purpose::Data, Body::Forward { messages }) if !outbound_data => {
                    let mut result = Ok(());
                    for wire in messages {
                        let sequence = wire.sequence;
                        if !cluster
                            .delivered
                            .first_time(peer.node, peer.shard, peer.epoch, sequence)
                        {
                            debug!(
                                node = peer.node,
                                shard = peer.shard,
                                sequence,
                                "forwarded message already delivered: skipped"
                            );
                            continue;
                        }
                        match forward::from_wire(wire, now_ms) {
                            Ok(forward::Received::Publish(forwarded)) => {
                                self.shard.handle(now_ms, Input::FromNode(forwarded))
                            }
                            Ok(forward::Received::Session(transfer)) => {
                                // A claim goes to the shard that owns the client identifier
                                // here, an answer to the shard that claimed.
                                let shard = match &transfer {
                                    SessionTransfer::Claim { client_id, .. } => {
                                        owner_shard(client_id, self.shard_count)
                                    }
                                    SessionTransfer::Handover { shard, .. } => *shard,
                                };
                                let message = ShardMessage::Session {
                                    node: peer.node,
                                    transfer,
                                };
                                if shard == self.index {
                                    self.shard.handle(now_ms, Input::Shard(message));
                                } else if shard < self.shard_count {
                                    cluster.io.outputs.push(Output::ToShard { shard, message });
                                } else {
                                    result = Err(format!(
                                        "a session answer for shard {shard}, which this node does not have"
                                    ));
                                    break;
                                }
                            }
                            Err(error) => {
                                result = Err(error);
                                break;
                            }
                        }
                    }
                    through = Some(cluster.delivered.through(peer.node, peer.shard));
                    result
                }
                (_, body) => Err(format!(
                    "unexpected frame kind {} on a data link",
                    body.kind()
                )),
            };
            if let Err(reason) = result {
                warn!(connection, node = peer.node, %reason, "cluster link closed");
                self.link_closed(connection, "protocol error");
                return;
            }
            if !cluster.io.links.contains_key(&connection) {
                return;
            }
        }
        if let Some(through) = through {
            let cluster = self.cluster.as_mut().expect("a cluster");
            cluster.io.now_ms = now_ms;
            let io = &mut cluster.io;
            io.send(connection, &Body::ForwardAck { through });
        }
    }

    fn link_closed(&mut self, connection: ConnectionId, why: &str) {
        let now_ms = self.now_ms;
        let cluster = self.cluster.as_mut().expect("a link means a cluster");
        debug!(connection, why, "cluster link gone");
        cluster.io.now_ms = now_ms;
        let io = &mut cluster.io;
        io.close(connection);
        if let Some(agent) = &mut cluster.agent {
            agent.link_closed(connection, io);
        }
        if let Some(node) = cluster.data_out.remove(&connection)
            && let Some(peer) = cluster.peers.get_mut(&node)
        {
            peer.connection = None;
            peer.retry_at_ms = now_ms + cluster.io.settings.reconnect_ms;
        }
    }

    /// The member list changed: forwarding follows the new addresses. A node that is no longer
    /// listed keeps its queue for the grace period (a view can lose a member for a moment,
    /// such as a snapshot of a core that has only just heard from it again) and is forgotten
    /// only if it stays away.
    fn members_changed(&mut self, nodes: &[ClusterNode]) {
        let now_ms = self.now_ms;
        let cluster = self.cluster.as_mut().expect("checked by the caller");
        for (node, peer) in cluster.peers.iter_mut() {
            let listed = nodes.iter().any(|n| n.node == *node);
            if !listed && peer.gone_since_ms.is_none() {
                peer.gone_since_ms = Some(now_ms);
            } else if listed {
                peer.gone_since_ms = None;
            }
        }
        for listed in nodes {
            let peer = cluster.peer(listed.node);
            peer.address = Some(listed.address);
            let stale = peer.node_started(listed.epoch);
            if stale > 0 {
                warn!(
                    node = listed.node,
                    dropped = stale,
                    "the node restarted: forwarded messages queued for its previous run are dropped"
                );
            }
        }
    }

    /// Cluster-wide settings from the Raft group replace this node's configured values.
    fn settings_changed(&mut self, settings: &[(String, String)]) {
        let cluster = self.cluster.as_mut().expect("checked by the caller");
        for (key, value) in settings {
            let Ok(number) = consensus::check_setting(key, value) else {
                warn!(
                    key,
                    value, "cluster-wide setting not understood by this node: ignored"
                );
                continue;
            };
            match key.as_str() {
                "down_grace_seconds" => cluster.io.settings.down_grace_ms = number * 1000,
                "forward_queue_max" => cluster.io.settings.forward_queue_max = number as usize,
                "takeover_timeout_ms" => self.shard.set_takeover_timeout_ms(number),
                _ => continue,
            }
            if self.index == 0 {
                info!(key, value, "cluster-wide setting applied");
            }
        }
    }

    /// Forgets the peers that stayed unlisted past the grace period.
    fn forget_gone_peers(cluster: &mut Cluster, now_ms: u64) {
        let grace_ms = cluster.io.settings.down_grace_ms;
        let gone: Vec<NodeId> = cluster
            .peers
            .iter()
            .filter(|(_, p)| {
                p.gone_since_ms
                    .is_some_and(|since| now_ms >= since + grace_ms)
            })
            .map(|(node, _)| *node)
            .collect();
        for node in gone {
            let peer = cluster.peers.remove(&node).expect("listed above");
            if peer.unacked_count() > 0 {
                warn!(
                    node,
                    unacked = peer.unacked_count(),
                    "node left the cluster with forwarded messages unacknowledged: dropped"
                );
            }
            if let Some(connection) = peer.connection {
                cluster.data_out.remove(&connection);
                cluster.io.close(connection);
            }
            cluster.delivered.forget(node);
        }
    }

    fn cluster_tick(&mut self) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        // Links silent past the timeout, or not authenticated in time, are dead.
        let timeout_ms = cluster.io.settings.link_timeout_ms;
        let dead: Vec<(ConnectionId, String)> = cluster
            .io
            .links
            .values()
            .filter_map(|l| Some((l.connection, l.expired(now_ms, timeout_ms)?)))
            .collect();
        for (connection, reason) in dead {
            warn!(connection, %reason, "cluster link closed");
            self.link_closed(connection, "timeout");
        }
        let cluster = self.cluster.as_mut().expect("a cluster");
        if let Some(agent) = &mut cluster.agent {
            cluster.io.now_ms = now_ms;
            let io = &mut cluster.io;
            agent.tick(io);
        }
        Self::dial_peers(cluster, now_ms);
        Self::forget_gone_peers(cluster, now_ms);
    }

    /// Dials the nodes that have messages waiting and no link.
    fn dial_peers(cluster: &mut Cluster, now_ms: u64) {
        for (&node, peer) in &mut cluster.peers {
            if peer.connection.is_none()
                && !peer.connecting
                && now_ms >= peer.retry_at_ms
                && peer.has_waiting()
                && let Some(address) = peer.address
            {
                peer.connecting = true;
                debug!(node, %address, "dialling the node for forwarding");
                cluster.io.connect(address, TAG_DATA | u64::from(node));
            }
        }
    }

    /// When the cluster side next needs a tick.
    fn cluster_deadline_ms(&self) -> Option<u64> {
        let cluster = self.cluster.as_ref()?;
        let settings = &cluster.io.settings;
        // A link due a heartbeat (up links only send them) or due to time out.
        let links = cluster.io.links.values().map(|l| {
            let timeout = l.deadline_ms(settings.link_timeout_ms);
            if l.is_up() {
                timeout.min(l.last_sent_ms + settings.heartbeat_ms)
            } else {
                timeout
            }
        });
        let agent = cluster
            .agent
            .as_ref()
            .and_then(|a| a.next_deadline_ms(settings));
        let peers = cluster
            .peers
            .values()
            .filter(|p| {
                p.connection.is_none() && !p.connecting && p.has_waiting() && p.address.is_some()
            })
            .map(|p| p.retry_at_ms);
        let gone = cluster
            .peers
            .values()
            .filter_map(|p| p.gone_since_ms.map(|since| since + settings.down_grace_ms));
        links.chain(agent).chain(peers).chain(gone).min()
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        match (self.shard.next_deadline_ms(), self.cluster_deadline_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Everything the batch produced: the shard's outputs with cluster work taken out of them
    /// and carried out, then the links' bytes.
    pub fn take_outputs(&mut self, outputs: &mut Vec<Output>) {
        let now_ms = self.now_ms;
        outputs.append(&mut self.scratch);
        if self.cluster.is_none() {
            // Alone, shard 0's node route changes have no one to go to (and with no other
            // node in the route table, nothing is forwarded).
            self.shard.take_outputs(outputs);
            if self.index == 0 {
                outputs.retain(|output| !matches!(output, Output::NodeRoute { .. }));
            }
            return;
        }
        let mut shard_outputs = Vec::new();
        loop {
            self.shard.take_outputs(&mut shard_outputs);
            let cluster = self.cluster.as_mut().expect("checked above");
            for output in shard_outputs.drain(..) {
                match output {
                    Output::ToNode { node, forwarded } => {
                        let queue_max = cluster.io.settings.forward_queue_max;
                        let peer = cluster.peer(node);
                        if peer.push(&forwarded, now_ms, queue_max) {
                            forward::report_dropped(node, peer);
                        }
                    }
                    Output::SessionToNode { node, transfer } => {
                        let queue_max = cluster.io.settings.forward_queue_max;
                        let peer = cluster.peer(node);
                        if peer.push_transfer(&transfer, queue_max) {
                            forward::report_dropped(node, peer);
                        }
                    }
                    Output::NodeRoute {
                        filter,
                        group,
                        added,
                    } => {
                        let agent = cluster
                            .agent
                            .as_mut()
                            .expect("only shard 0 emits node routes, and it has the agent");
                        let route = Route {
                            filter: filter.to_string(),
                            group: group.map(|g| g.to_string()),
                        };
                        agent.node_route(route, added, &cluster.io.settings, now_ms);
                    }
                    other => outputs.push(other),
                }
            }
            let to_self = self.agent_changes(outputs);
            if to_self.is_empty() {
                break;
            }
            for message in to_self {
                self.handle(now_ms, Input::Shard(message));
            }
        }
        let cluster = self.cluster.as_mut().expect("checked above");
        cluster.io.now_ms = now_ms;
        let io = &mut cluster.io;
        let applied = match &mut cluster.agent {
            Some(agent) => {
                agent.flush(io);
                agent.applied()
            }
            None => 0,
        };
        // Forwarded messages: one frame per peer node with everything of the batch.
        for peer in cluster.peers.values_mut() {
            if let Some(connection) = peer.connection
                && io.links.get(&connection).is_some_and(Link::is_up)
                && let Some(frame) = peer.take_frame()
            {
                io.send(connection, &frame);
            }
        }
        // Heartbeats on quiet links that are up.
        let quiet: Vec<ConnectionId> = io
            .links
            .values()
            .filter(|l| l.is_up() && now_ms >= l.last_sent_ms + io.settings.heartbeat_ms)
            .map(|l| l.connection)
            .collect();
        for connection in quiet {
            io.send(connection, &Body::Heartbeat { applied });
        }
        Self::dial_peers(cluster, now_ms);
        outputs.append(&mut cluster.io.outputs);
        for link in cluster.io.links.values_mut() {
            if let Some(bytes) = link.take_outgoing() {
                outputs.push(Output::Send {
                    connection: link.connection,
                    bytes,
                });
            }
        }
    }

    /// Turns the agent's view changes into messages for every shard; returns this shard's.
    fn agent_changes(&mut self, outputs: &mut Vec<Output>) -> Vec<ShardMessage> {
        let mut to_self = Vec::new();
        let Some(cluster) = &mut self.cluster else {
            return to_self;
        };
        let Some(agent) = &mut cluster.agent else {
            return to_self;
        };
        let node = cluster.io.settings.link.node();
        for change in agent.take_changes() {
            let message = match change {
                // A core's log holds its own routes too; its shards know them already.
                Change::Route { node: origin, .. } if origin == node => continue,
                Change::Route { node, route, added } => ShardMessage::RemoteRoute {
                    node,
                    filter: ByteString::from(route.filter),
                    group: route.group.map(ByteString::from),
                    added,
                },
                Change::Settings => ShardMessage::ClusterSettings(
                    agent
                        .view()
                        .settings
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                Change::Members => ShardMessage::ClusterNodes(
                    agent
                        .view()
                        .members
                        .values()
                        .filter(|m| m.node != node)
                        .filter_map(|m| match m.cluster_address.parse() {
                            Ok(address) => Some(ClusterNode {
                                node: m.node,
                                address,
                                epoch: m.epoch,
                                up: !agent.view().down.contains(&m.node),
                            }),
                            Err(_) => {
                                warn!(node = m.node, address = %m.cluster_address, "member's cluster address does not parse");
                                None
                            }
                        })
                        .collect(),
                ),
            };
            for target in 0..self.shard_count {
                if target == self.index {
                    to_self.push(message.clone());
                } else {
                    outputs.push(Output::ToShard {
                        shard: target,
                        message: message.clone(),
                    });
                }
            }
        }
        to_self
    }

    /// Dials `address` as a core (`ctl cluster join`). Shard 0 only.
    pub fn join(&mut self, now_ms: u64, address: SocketAddr) -> Result<(), String> {
        self.now_ms = now_ms;
        let agent = self.agent_mut()?;
        info!(%address, "joining the cluster through a core");
        agent.join(address);
        self.cluster_tick();
        Ok(())
    }

    /// Leaves the cluster (`ctl cluster leave`). Shard 0 only.
    pub fn leave(&mut self, now_ms: u64) -> Result<(), String> {
        self.now_ms = now_ms;
        self.agent_mut()?;
        let cluster = self.cluster.as_mut().expect("checked");
        let agent = cluster.agent.as_mut().expect("checked");
        cluster.io.now_ms = now_ms;
        let io = &mut cluster.io;
        agent.leave(io);
        Ok(())
    }

    /// Proposes a cluster-wide setting to the cores' Raft group (`ctl cluster set`). Shard 0
    /// of a core only.
    pub fn set_setting(&mut self, now_ms: u64, key: &str, value: &str) -> Result<(), String> {
        self.now_ms = now_ms;
        self.agent_mut()?.propose_setting(key, value)?;
        self.cluster_tick();
        Ok(())
    }

    /// The Raft state to save at a clean shutdown (shard 0 of a core in a group).
    pub fn raft_state(&self) -> Option<Vec<u8>> {
        self.agent()?.consensus_state()
    }

    /// Takes up the Raft state saved at the last clean shutdown (shard 0, before it runs).
    pub fn restore_raft(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.agent_mut()?.restore_consensus(bytes)
    }

    /// The cluster as this node sees it. Shard 0 only.
    pub fn status(&self, now_ms: u64) -> Result<Status, String> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or("this node is not in a cluster (no [cluster] configured)")?;
        let agent = cluster
            .agent
            .as_ref()
            .ok_or("cluster status lives on shard 0")?;
        Ok(agent.status(now_ms))
    }

    fn agent_mut(&mut self) -> Result<&mut Agent, String> {
        self.cluster
            .as_mut()
            .ok_or("this node is not in a cluster (no [cluster] configured)")?
            .agent
            .as_mut()
            .ok_or_else(|| "the cluster agent lives on shard 0".to_string())
    }
}
