//! The agent's control links: dialling seeds, links coming up and going, and leaving.
//!
//! Owns: the steps that change `Shared::seeds` and `Shared::up_links`, and what each role does
//! when a link comes up or goes (a core counts its origins' links, an edge follows a core).
//! Invariants: a node keeps one control link per core (a second address of one core, this
//! node itself and a seed that is no core are never used again); only the links an origin
//! dialled count towards it being up; an edge refuses inbound control links.

use std::net::SocketAddr;

use shardmq_net::frame::{Body, NodeId, Role};
use tracing::{info, warn};

use super::super::Io;
use super::super::view::View;
use super::{Agent, RoleState, Shared, frame_budget, group_state, route_sync_frames};
use crate::message::ConnectionId;

impl Agent {
    /// An outbound connection to seed `index` is open (its handshake starts) or failed.
    pub fn seed_connected(
        &mut self,
        index: usize,
        connection: Option<ConnectionId>,
        now_ms: u64,
        reconnect_ms: u64,
    ) {
        let Some(seed) = self.shared.seeds.get_mut(index) else {
            return;
        };
        seed.connecting = false;
        seed.connection = connection;
        if connection.is_none() {
            seed.retry_at_ms = now_ms + reconnect_ms;
            seed.awaiting_name = seed.name.is_some();
        }
    }

    /// Whether `connection` is a control link of ours (dialled to a seed).
    pub fn is_seed_link(&self, connection: ConnectionId) -> bool {
        self.shared.is_seed_link(connection)
    }

    /// A control link finished its handshake.
    pub fn link_up(&mut self, connection: ConnectionId, io: &mut Io) {
        if let RoleState::Core(core) = &mut self.role {
            core.govern_due = true;
        }
        let Some(peer) = io.links.get(&connection).and_then(|l| l.up_peer()).cloned() else {
            warn!(
                connection,
                "a control link said to be up has no finished handshake: ignored"
            );
            return;
        };
        if self.shared.is_seed_link(connection) {
            self.seed_link_up(connection, peer.node, peer.role, io);
            return;
        }
        let RoleState::Core(core) = &mut self.role else {
            io.refuse(connection, "this node is an edge: dial a core");
            return;
        };
        let Some(member) = peer.member else {
            // The connector's Hello carries its member record; one without it is not a node.
            io.refuse(connection, "a control link's Hello must name its member");
            return;
        };
        info!(node = peer.node, role = ?peer.role, address = %member.cluster_address, "node joined through a control link");
        self.shared
            .up_links
            .insert(connection, (peer.node, peer.role));
        core.origin_linked(peer.node, &member);
        // Cores link both ways: a core that dials us is dialled back, so that our routes
        // reach it too.
        if peer.role == Role::Core
            && let Ok(address) = member.cluster_address.parse::<SocketAddr>()
            && !self.shared.seeds.iter().any(|s| s.node == Some(peer.node))
        {
            self.shared.add_seed(address, false);
        }
    }

    /// A link this node dialled to a seed finished its handshake with `node`.
    fn seed_link_up(&mut self, connection: ConnectionId, node: NodeId, role: Role, io: &mut Io) {
        let shared = &mut self.shared;
        // Two seed addresses lead to one core: one link is enough.
        let duplicate = shared.up_links.values().any(|&(n, _)| n == node)
            && shared.seeds.iter().any(|s| {
                s.node == Some(node) && s.connection != Some(connection) && s.connection.is_some()
            });
        let Some(seed) = shared
            .seeds
            .iter_mut()
            .find(|s| s.connection == Some(connection))
        else {
            return;
        };
        seed.node = Some(node);
        if node == shared.node || role != Role::Core || duplicate {
            if role != Role::Core && node != shared.node {
                warn!(address = %seed.address, node, "seed is not a core node: not used");
            }
            seed.is_self = true;
            io.close(connection);
            return;
        }
        info!(node, "control link to core up");
        shared.up_links.insert(connection, (node, role));
        match &mut self.role {
            RoleState::Core(core) => {
                io.send(connection, &group_state(core.consensus.group_state()));
            }
            RoleState::Edge(_) => {}
        }
        for body in route_sync_frames(shared.sequence, &shared.routes, frame_budget(&io.settings)) {
            io.send(connection, &body);
        }
        if let RoleState::Edge(edge) = &mut self.role
            && !edge.is_following()
        {
            edge.follow(connection, io);
        }
    }

    /// A control link closed (or failed its handshake).
    pub fn link_closed(&mut self, connection: ConnectionId, io: &mut Io) {
        let now_ms = io.now_ms;
        let shared = &mut self.shared;
        // Only links the origin dialled count towards it being up: our own link to a core
        // says nothing of whether that core reaches us.
        let inbound = !shared.is_seed_link(connection);
        for seed in &mut shared.seeds {
            if seed.connection == Some(connection) {
                seed.connection = None;
                seed.retry_at_ms = now_ms + io.settings.reconnect_ms;
                seed.awaiting_name = seed.name.is_some();
            }
        }
        let node = shared.up_links.remove(&connection).map(|(node, _)| node);
        match &mut self.role {
            RoleState::Core(core) => {
                // Raft messages travel on the links this core dialled: what was in flight on
                // this one may be lost.
                if let Some(node) = node.filter(|_| !inbound) {
                    core.consensus.unreachable(node);
                }
                core.link_lost(connection, node.filter(|_| inbound))
            }
            RoleState::Edge(edge) => {
                if let Some(node) = node {
                    edge.link_lost(shared, connection, node, io);
                }
            }
        }
    }

    /// Leaves the cluster: tells every core, closes the control links and forgets the other
    /// nodes' routes. A later `add_seed` joins again. A core that votes in a group with other
    /// voters first waits (a few link timeouts at most) for the leader to remove its voter:
    /// leaving at once could take the quorum away from the cores that stay.
    pub fn leave(&mut self, io: &mut Io) {
        if let RoleState::Core(core) = &mut self.role {
            if core.departing_until_ms.is_some() {
                return;
            }
            let consensus = &mut core.consensus;
            if consensus.is_voter() && consensus.has_other_voters() {
                info!(
                    "leaving the cluster: waiting for the Raft leader to remove this core's voter"
                );
                consensus.transfer_leadership();
                for connection in self.shared.core_links() {
                    io.send(connection, &Body::Leave);
                }
                core.departing_until_ms = Some(io.now_ms + 4 * io.settings.link_timeout_ms);
                return;
            }
        }
        self.finish_leave(io);
    }

    /// Whether a departing core may go now: its voter is removed, or it waited long enough.
    pub(super) fn departure_due(&self, now_ms: u64) -> bool {
        self.core().is_some_and(|core| {
            core.departing_until_ms
                .is_some_and(|until| now_ms >= until || !core.consensus.is_voter())
        })
    }

    pub(super) fn finish_leave(&mut self, io: &mut Io) {
        info!("leaving the cluster");
        if let RoleState::Core(core) = &mut self.role {
            core.departing_until_ms = None;
            core.merging = false;
        }
        self.shared.leaving = true;
        let links: Vec<ConnectionId> = self.shared.up_links.keys().copied().collect();
        for connection in links {
            if self.shared.is_seed_link(connection) {
                io.send(connection, &Body::Leave);
            }
            io.close(connection);
            self.link_closed(connection, io);
        }
        self.shared.seeds.clear();
        self.shared.names.clear();
        match &mut self.role {
            RoleState::Core(core) => core.leave(),
            RoleState::Edge(edge) => edge.stop(),
        }
        let mut alone = View::default();
        alone
            .members
            .insert(self.shared.node, Shared::member_of(io));
        let shared = &mut self.shared;
        shared.view.replace(alone, &mut shared.changes);
    }
}

impl Shared {
    /// Every node keeps a control link to every core of the member list, not only to its
    /// seeds: the Raft leader sees every node directly, and an edge can follow any core.
    /// Cores in the member list's order (by node).
    pub(super) fn learn_cores(&mut self) {
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
    /// configured seeds, once every one of those has answered; none before. Sorted.
    pub(super) fn founders(&self) -> Vec<NodeId> {
        // A name that has not answered may stand for cores not known yet.
        if self.names.iter().any(|n| !n.answered) {
            return Vec::new();
        }
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
}
