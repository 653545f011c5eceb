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
use super::stats::ClosedLinks;
use super::{Agent, ClusterSettings, Link, NodeOutput, forward};
use crate::message::ConnectionId;

/// The links of one shard and what they need to act.
#[derive(Debug)]
pub struct Io {
    pub links: BTreeMap<ConnectionId, Link>,
    pub outputs: Vec<NodeOutput>,
    pub settings: ClusterSettings,
    pub now_ms: u64,
    /// What the links that closed had carried, by peer node and purpose (bounded, see
    /// [`ClosedLinks`]), so that the counters of `GET /metrics` never go back when a link
    /// is replaced.
    pub closed_links: ClosedLinks,
    /// The admin questions this node sent (`query.rs`, shard 0) and still waits for, by the
    /// link they went on and the glue's id: the node asked and when. Closing a link answers
    /// each of its questions at once with an error, so the asker does not wait out its
    /// timeout for an answer that cannot come.
    pub asked: BTreeMap<(ConnectionId, u64), Asked>,
}

/// An admin question sent on a link and not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// The node at the link's other end, which was asked.
    pub node: NodeId,
    pub at_ms: u64,
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
            closed_links: ClosedLinks::default(),
            asked: BTreeMap::new(),
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
                let links = &self.links;
                let up = |key: &(NodeId, &'static str)| {
                    links
                        .values()
                        .filter_map(Link::up_peer)
                        .any(|peer| (peer.node, purpose_name(peer.purpose)) == *key)
                };
                self.closed_links
                    .add(peer.node, purpose_name(peer.purpose), link.counters, up);
            }
            self.outputs.push(NodeOutput::Close { connection });
            self.fail_asked(connection);
        }
    }

    /// Answers the questions waiting on `connection`, which closed, with that error.
    fn fail_asked(&mut self, connection: ConnectionId) {
        let waiting: Vec<(u64, Asked)> = self
            .asked
            .range((connection, 0)..=(connection, u64::MAX))
            .map(|(&(_, id), &asked)| (id, asked))
            .collect();
        for (id, Asked { node, .. }) in waiting {
            self.asked.remove(&(connection, id));
            self.outputs.push(NodeOutput::NodeAnswer {
                id,
                node,
                answer: Err(format!(
                    "the control link to node {node} closed before it answered"
                )),
            });
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

#[cfg(test)]
pub(super) mod tests {
    use shardmq_net::frame::{Member, Role};

    use super::super::LinkSettings;
    use super::*;

    /// The link settings of core `node` of a test cluster.
    pub(in crate::cluster) fn link_settings(node: NodeId) -> LinkSettings {
        LinkSettings {
            member: Member {
                node,
                role: Role::Core,
                cluster_address: format!("10.0.0.{node}:7000"),
                mqtt_address: String::new(),
                epoch: 0,
            },
            cluster_name: "test".into(),
            cluster_secret: "a long and random test secret".into(),
            body_len_max: 1 << 20,
            epoch: 0,
            tls: None,
        }
    }

    /// The cluster settings of core `node` of a test cluster, without seeds.
    pub(in crate::cluster) fn settings(node: NodeId) -> ClusterSettings {
        ClusterSettings {
            link: link_settings(node),
            seeds: Vec::new(),
            seed_names: Vec::new(),
            heartbeat_ms: 100,
            link_timeout_ms: 600,
            reconnect_ms: 100,
            down_grace_ms: 1_000,
            log_entries_max: 100,
            forward_queue_max: 100,
            session_replicas: 1,
            start_ms: 1,
        }
    }

    fn io_with_links(connections: &[ConnectionId]) -> Io {
        let mut io = Io::new(settings(1), 0);
        for &connection in connections {
            let link = Link::connecting(
                connection,
                &io.settings.link,
                Purpose::Control,
                0,
                5,
                [3; 16],
                0,
            );
            io.links.insert(connection, link);
        }
        io
    }

    #[test]
    fn closing_a_link_answers_the_questions_waiting_on_it_at_once() {
        let mut io = io_with_links(&[40, 41]);
        let asked = |node| Asked { node, at_ms: 0 };
        io.asked.insert((40, 7), asked(2));
        io.asked.insert((40, 9), asked(2));
        io.asked.insert((41, 8), asked(3));
        io.close(40);
        let answers: Vec<_> = io
            .outputs
            .iter()
            .filter_map(|output| match output {
                NodeOutput::NodeAnswer { id, node, answer } => Some((*id, *node, answer.clone())),
                _ => None,
            })
            .collect();
        let closed = Err("the control link to node 2 closed before it answered".to_string());
        assert_eq!(answers, [(7, 2, closed.clone()), (9, 2, closed)]);
        // The other link's question still waits for its answer.
        assert_eq!(io.asked.keys().copied().collect::<Vec<_>>(), [(41, 8)]);
        // A link closed twice answers nothing twice.
        io.outputs.clear();
        io.close(40);
        assert!(io.outputs.is_empty(), "{:?}", io.outputs);
    }
}
