//! The links of one shard and what carrying them out needs: the settings, the clock of the
//! current call, and the outputs for the reactor ([`NodeOutput`]), plus the cluster state of
//! one shard ([`Cluster`]).
//!
//! Owns: the map of this shard's links by connection, and the order in which their bytes and
//! closes reach the outputs.
//! Never: holds a link in two states at once: a connection is either in `links` or in
//! `accepting` (waiting for its first frame, see `accept.rs`), never both.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use shardmq_net::frame::{Body, NodeId, Purpose};
use tracing::warn;

use super::accept::Accepting;
use super::link::LinkCounters;
use super::{Agent, ClusterSettings, Link, NodeOutput, forward};
use crate::message::ConnectionId;

/// The links of one shard and what they need to act.
#[derive(Debug)]
pub struct Io {
    pub links: BTreeMap<ConnectionId, Link>,
    pub outputs: Vec<NodeOutput>,
    pub settings: ClusterSettings,
    pub now_ms: u64,
    /// What the links that closed had carried, by peer node and purpose, so that the
    /// counters of `GET /metrics` never go back when a link is replaced.
    pub closed_links: BTreeMap<(NodeId, &'static str), LinkCounters>,
}

/// A link's purpose as the metrics label it.
pub fn purpose_name(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Control => "control",
        Purpose::Data => "data",
    }
}

impl Io {
    /// No links yet, at `now_ms`.
    pub fn new(settings: ClusterSettings, now_ms: u64) -> Self {
        Self {
            links: BTreeMap::new(),
            outputs: Vec::new(),
            settings,
            now_ms,
            closed_links: BTreeMap::new(),
        }
    }

    pub fn send(&mut self, connection: ConnectionId, body: &Body) {
        if let Some(link) = self.links.get_mut(&connection) {
            link.send(&self.settings.link, body, self.now_ms);
        }
    }

    pub fn connect(&mut self, address: SocketAddr, tag: u64) {
        self.outputs.push(NodeOutput::Connect { address, tag });
    }

    /// Asks for seed name `index` to be resolved (`NodeInput::Resolved` answers).
    pub fn resolve(&mut self, index: usize, name: &super::SeedName) {
        self.outputs.push(NodeOutput::Resolve {
            index,
            name: name.clone(),
        });
    }

    /// Closes the link once what is queued for it is sent.
    pub fn close(&mut self, connection: ConnectionId) {
        if let Some(mut link) = self.links.remove(&connection) {
            if let Some(bytes) = link.take_outgoing() {
                self.outputs.push(NodeOutput::Send { connection, bytes });
            }
            // A link that never finished its handshake has no peer to count under.
            if let Some(peer) = link.up_peer() {
                *self
                    .closed_links
                    .entry((peer.node, purpose_name(peer.purpose)))
                    .or_default() += link.counters;
            }
            self.outputs.push(NodeOutput::Close { connection });
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

    /// Every link's bytes framed since the last call, in connection order.
    pub fn take_link_bytes(&mut self) {
        for link in self.links.values_mut() {
            if let Some(bytes) = link.take_outgoing() {
                self.outputs.push(NodeOutput::Send {
                    connection: link.connection,
                    bytes,
                });
            }
        }
    }
}

/// The cluster side of one shard.
#[derive(Debug)]
pub(super) struct Cluster {
    pub(super) io: Io,
    /// Connections on the cluster port waiting for their first frame (see `accept.rs`).
    pub(super) accepting: BTreeMap<ConnectionId, Accepting>,
    /// Identifies this start in control-link Hellos (data links carry their peer's epoch).
    pub(super) epoch: u64,
    pub(super) random: u64,
    pub(super) agent: Option<Agent>,
    pub(super) peers: BTreeMap<NodeId, forward::Peer>,
    /// Data links this shard dialled, by connection.
    pub(super) data_out: BTreeMap<ConnectionId, NodeId>,
    /// What the data links this shard serves have delivered, per sending node and shard.
    pub(super) delivered: forward::Delivered,
    /// Accepted links closed at once because [`super::link::PENDING_LINKS_MAX`] were in
    /// their handshake.
    pub(super) refused_pending: u64,
    /// Answers this node owes its peers' admin questions (`query.rs`), by link and the
    /// peer's id: when each question came.
    pub(super) owed: BTreeMap<(ConnectionId, u64), u64>,
    /// Session replication items not sent (the peer speaks an older protocol version) or
    /// received batches that did not decode.
    pub(super) replication_dropped: u64,
}

impl Cluster {
    /// What this shard sends to `node`, created with a numbering epoch of its own: a peer
    /// forgotten and made again (the node left and came back) numbers from 1 in a new epoch,
    /// so the receiver never takes its messages for ones it has already delivered.
    pub(super) fn peer(&mut self, node: NodeId) -> &mut forward::Peer {
        let random = &mut self.random;
        self.peers
            .entry(node)
            .or_insert_with(|| forward::Peer::new(splitmix(random)))
    }

    pub(super) fn nonce(&mut self) -> [u8; 16] {
        let mut nonce = [0u8; 16];
        for half in nonce.chunks_mut(8) {
            half.copy_from_slice(&splitmix(&mut self.random).to_le_bytes());
        }
        nonce
    }

    /// Links and accepted connections still in their handshake.
    pub(super) fn pending_links(&self) -> usize {
        self.accepting.len() + self.io.links.values().filter(|l| !l.is_up()).count()
    }
}

/// splitmix64: nonces and epochs from one seed, so that a simulation replays exactly.
pub(super) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
