//! Data links: forwarding this shard's messages and session transfers to other nodes, and
//! serving the data links that other nodes' shards opened to this one.
//!
//! Owns: the forwarding peers of this shard (one per node: its queue, numbering and data
//! link), which links it dialled, and what the links it serves delivered (`Delivered`).
//! Invariants: items are numbered per (sending shard, receiving node) and every item but a
//! QoS 0 message is kept until the receiver's `ForwardAck` covers it; an inbound data link is
//! served by exactly one shard of this node (`shard % shard_count` of its sender, see
//! `accept.rs`), so the `Delivered` record of one sending shard lives in one place and every
//! number is taken once. Frames are built once per peer per batch, in node order.

use shardmq_net::frame::{Body, NodeId};
use tracing::{debug, info, warn};

use super::io::Cluster;
use super::link::Peer;
use super::{NodeShard, consensus, forward};
use crate::message::{ClusterNode, ConnectionId, Forwarded, SessionTransfer, ShardMessage};
use crate::shard::{Input, owner_shard};

impl NodeShard {
    /// A data link this shard dialled to `node` is open: it becomes the peer's link, unless
    /// the peer is gone or has one already (the connection is closed then).
    pub(super) fn data_connected(&mut self, connection: ConnectionId, node: NodeId) -> Option<u64> {
        let cluster = self.cluster.as_mut()?;
        let Some(peer) = cluster
            .peers
            .get_mut(&node)
            .filter(|p| p.connection.is_none())
        else {
            // The node left while we dialled it, or a link to it is already open.
            cluster
                .io
                .outputs
                .push(super::NodeOutput::Close { connection });
            return None;
        };
        peer.connecting = false;
        peer.connection = Some(connection);
        let epoch = peer.epoch;
        cluster.data_out.insert(connection, node);
        Some(epoch)
    }

    /// A data link to `node` could not be opened: retried after the reconnect interval.
    pub(super) fn data_connect_failed(&mut self, node: NodeId, error: &str) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        debug!(
            node,
            error, "cannot reach the node for forwarding; retrying"
        );
        if let Some(peer) = cluster.peers.get_mut(&node) {
            peer.connecting = false;
            peer.retry_at_ms = now_ms + cluster.io.settings.reconnect_ms;
        }
    }

    /// A data link this shard dialled finished its handshake with `peer`: it must have
    /// reached the node dialled. Returns false if the link was closed.
    pub(super) fn data_link_up(&mut self, connection: ConnectionId, peer: &Peer) -> bool {
        let cluster = self.cluster.as_mut().expect("a link means a cluster");
        let Some(&dialled) = cluster.data_out.get(&connection) else {
            // A link another node's shard opened to this one: nothing to set up.
            return true;
        };
        if peer.node != dialled {
            warn!(
                connection,
                dialled,
                answered = peer.node,
                "a data link reached another node than the one dialled: closed"
            );
            self.link_closed(connection, "wrong node");
            return false;
        }
        // The handshake is over, so the peer has sent frames: its version is known.
        let version = cluster
            .io
            .links
            .get(&connection)
            .and_then(|link| link.peer_version());
        if let Some(p) = cluster.peers.get_mut(&dialled) {
            let stale = p.relink(peer.remote_epoch);
            if stale > 0 {
                warn!(
                    node = dialled,
                    dropped = stale,
                    "the node restarted: forwarded messages queued for its previous run are dropped"
                );
            }
            // Items the peer's version does not know (queued while no link was up, or in
            // this one's handshake) would close the link on every reconnect: dropped, never
            // resent.
            let unsupported = version.map_or(0, |version| p.drop_unsupported(version));
            if unsupported > 0 {
                cluster.replication_dropped += unsupported as u64;
                warn!(
                    node = dialled,
                    version = version.unwrap_or(0),
                    dropped = unsupported,
                    "the node speaks an older protocol version: session replication items for it are dropped"
                );
            }
        }
        self.shard.data_link_restored(dialled);
        true
    }

    /// One frame on an up data link. `through` collects what to acknowledge once the frames
    /// of this receive are taken.
    pub(super) fn data_frame(
        &mut self,
        connection: ConnectionId,
        peer: &Peer,
        body: Body,
        through: &mut Option<u64>,
    ) -> Result<(), String> {
        let now_ms = self.now_ms;
        let cluster = self.cluster.as_mut().expect("a link means a cluster");
        let outbound = cluster.data_out.contains_key(&connection);
        match body {
            Body::Heartbeat { .. } => Ok(()),
            Body::ForwardAck { through } if outbound => {
                if let Some(p) = cluster.peers.get_mut(&peer.node)
                    && p.connection == Some(connection)
                {
                    p.acknowledged(through);
                }
                Ok(())
            }
            Body::Forward { messages } if !outbound => {
                let mut result = Ok(());
                for wire in messages {
                    let cluster = self.cluster.as_mut().expect("a cluster");
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
                            self.shard.handle(now_ms, Input::FromNode(forwarded));
                        }
                        Ok(forward::Received::Session(SessionTransfer::Replicate {
                            reset,
                            records,
                        })) => self.replicas_from_node(peer.node, peer.shard, reset, &records),
                        Ok(forward::Received::Session(transfer)) => {
                            if let Err(error) = self.session_from_node(peer.node, transfer) {
                                result = Err(error);
                                break;
                            }
                        }
                        Err(error) => {
                            result = Err(error);
                            break;
                        }
                    }
                }
                let cluster = self.cluster.as_ref().expect("a cluster");
                *through = Some(cluster.delivered.through(peer.node, peer.shard));
                result
            }
            body => Err(format!(
                "unexpected frame kind {} on a data link",
                body.kind()
            )),
        }
    }

    /// A claim goes to the shard that owns the client identifier here, an answer to the
    /// shard that claimed.
    fn session_from_node(&mut self, node: NodeId, transfer: SessionTransfer) -> Result<(), String> {
        let shard = match &transfer {
            SessionTransfer::Claim { client_id, .. }
            | SessionTransfer::Disown { client_id, .. } => owner_shard(client_id, self.shard_count),
            SessionTransfer::Handover { shard, .. }
            | SessionTransfer::ReplicaOffer { shard, .. } => *shard,
            SessionTransfer::Replicate { .. } => {
                return Err("a replication batch outside a data link's frame".into());
            }
        };
        let message = ShardMessage::Session { node, transfer };
        if shard == self.index {
            self.shard.handle(self.now_ms, Input::Shard(message));
        } else if shard < self.shard_count {
            let cluster = self.cluster.as_mut().expect("a cluster");
            cluster
                .io
                .outputs
                .push(super::NodeOutput::Post { shard, message });
        } else {
            return Err(format!(
                "a session answer for shard {shard}, which this node does not have"
            ));
        }
        Ok(())
    }

    /// Replication records from shard `home_shard` of `node`: decoded (checked like every
    /// peer byte), split by the shard that owns each client identifier here, and posted to
    /// those shards in order (a reset goes to every shard). A batch that does not decode is
    /// dropped whole, counted and logged: the link stays up (the same batch would come again
    /// on a new one), and the replicas of that shard are then incomplete until it sends them
    /// whole again.
    fn replicas_from_node(&mut self, node: NodeId, home_shard: u16, reset: bool, mut bytes: &[u8]) {
        let shard_count = self.shard_count;
        let mut per_shard: Vec<Vec<crate::storage::Record>> =
            (0..shard_count).map(|_| Vec::new()).collect();
        while !bytes.is_empty() {
            let decoded =
                crate::storage::record::read_frame(bytes).and_then(|(kind, body, len)| {
                    crate::storage::Record::decode(kind, body).map(|record| (record, len))
                });
            let (record, len) = match decoded {
                Ok(decoded) => decoded,
                Err(error) => {
                    warn!(node, shard = home_shard, %error, "a replication batch from the node does not decode: dropped");
                    let cluster = self.cluster.as_mut().expect("a cluster");
                    cluster.replication_dropped += 1;
                    return;
                }
            };
            // `read_frame` never returns an empty frame; a zero length would loop forever.
            bytes = match bytes.get(len..) {
                Some(rest) if len > 0 => rest,
                _ => &[],
            };
            let Some(client_id) = record.session_client_id() else {
                warn!(
                    node,
                    shard = home_shard,
                    "a replication batch holds a record that is not about a session: dropped"
                );
                let cluster = self.cluster.as_mut().expect("a cluster");
                cluster.replication_dropped += 1;
                return;
            };
            let owner = owner_shard(client_id, shard_count);
            if let Some(records) = per_shard.get_mut(owner as usize) {
                records.push(record);
            }
        }
        for (shard, records) in per_shard.into_iter().enumerate() {
            if records.is_empty() && !reset {
                continue;
            }
            let message = ShardMessage::Replicas {
                home: node,
                home_shard,
                reset,
                records,
            };
            let shard = shard as u16;
            if shard == self.index {
                self.shard.handle(self.now_ms, Input::Shard(message));
            } else {
                let cluster = self.cluster.as_mut().expect("a cluster");
                cluster
                    .io
                    .outputs
                    .push(super::NodeOutput::Post { shard, message });
            }
        }
    }

    /// A message of this shard for `node`: queued for its data link.
    pub(super) fn forward(&mut self, node: NodeId, forwarded: &Forwarded) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            // Alone, the route table names no other node, so nothing is forwarded.
            return;
        };
        let queue_max = cluster.io.settings.forward_queue_max;
        let peer = cluster.peer(node);
        if peer.push(forwarded, now_ms, queue_max) {
            forward::report_dropped(node, peer);
        }
    }

    /// A session claim or handover of this shard for `node`: queued for its data link.
    pub(super) fn transfer(&mut self, node: NodeId, transfer: &SessionTransfer) {
        let Some(cluster) = &mut self.cluster else {
            // Alone, no other node is up, so no claim goes out.
            return;
        };
        let queue_max = cluster.io.settings.forward_queue_max;
        if matches!(
            transfer,
            SessionTransfer::Replicate { .. } | SessionTransfer::ReplicaOffer { .. }
        ) {
            // A peer of an older protocol version would refuse the item and close the link:
            // it keeps no replicas (its link's version is known once a link is up).
            let old = cluster
                .peers
                .get(&node)
                .and_then(|peer| peer.connection)
                .and_then(|connection| cluster.io.links.get(&connection))
                .and_then(|link| link.peer_version())
                .is_some_and(|version| version < shardmq_net::frame::REPLICATION_VERSION);
            if old {
                cluster.replication_dropped += 1;
                return;
            }
        }
        if matches!(transfer, SessionTransfer::Disown { .. })
            && cluster
                .peers
                .get(&node)
                .and_then(|peer| peer.connection)
                .and_then(|connection| cluster.io.links.get(&connection))
                .and_then(|link| link.peer_version())
                .is_some_and(|version| version < shardmq_net::frame::FENCE_VERSION)
        {
            // A version 3 peer would refuse the item: it is not fenced (said in
            // ARCHITECTURE.md), and nothing else of the link is lost.
            cluster.replication_dropped += 1;
            return;
        }
        let peer = cluster.peer(node);
        if peer.push_transfer(transfer, queue_max) {
            forward::report_dropped(node, peer);
        }
    }

    /// The member list changed: forwarding follows the new addresses. A node that is no longer
    /// listed keeps its queue for the grace period (a view can lose a member for a moment,
    /// such as a snapshot of a core that has only just heard from it again) and is forgotten
    /// only if it stays away.
    pub(super) fn members_changed(&mut self, nodes: &[ClusterNode]) {
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
    pub(super) fn settings_changed(&mut self, settings: &[(String, String)]) {
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
}

/// Forgets the peers that stayed unlisted past the grace period.
pub(super) fn forget_gone_peers(cluster: &mut Cluster, now_ms: u64) {
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

/// Dials the nodes that have messages waiting and no link.
pub(super) fn dial_peers(cluster: &mut Cluster, now_ms: u64) {
    for (&node, peer) in &mut cluster.peers {
        if peer.connection.is_none()
            && !peer.connecting
            && now_ms >= peer.retry_at_ms
            && peer.has_waiting()
            && let Some(address) = peer.address
        {
            peer.connecting = true;
            debug!(node, %address, "dialling the node for forwarding");
            cluster
                .io
                .connect(address, super::TAG_DATA | u64::from(node));
        }
    }
}

/// Forwarded messages: one frame per peer node with everything of the batch.
pub(super) fn send_frames(cluster: &mut Cluster) {
    let io = &mut cluster.io;
    for peer in cluster.peers.values_mut() {
        if let Some(connection) = peer.connection
            && io.links.get(&connection).is_some_and(super::Link::is_up)
            && let Some(frame) = peer.take_frame()
        {
            io.send(connection, &frame);
        }
    }
}

/// When the peers next need a tick: a redial, or the end of a gone node's grace period.
pub(super) fn peers_deadline_ms(cluster: &Cluster) -> Option<u64> {
    let settings = &cluster.io.settings;
    let redial = cluster
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
    redial.chain(gone).min()
}
