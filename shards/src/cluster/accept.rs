//! A connection on the cluster port before a link holds it: which shard serves it.
//!
//! Only reactor 0 listens on the cluster port, but a data link's traffic belongs on the shard
//! that does its work: the data link from sending shard `k` of a node is served by shard
//! `k % shard_count` here, so that the matching and delivery of inbound forwarded messages is
//! spread over the shards as it is over the senders, instead of funnelling through shard 0.
//! So a new connection first waits for its first frame; a `Hello` of a data link for another
//! shard is handed, socket and every byte received, to that shard's reactor, which runs the
//! handshake itself (as a client's CONNECT is handed to the shard owning its identifier).
//! Anything else (a control link, a data link for this shard, a frame that is not a `Hello`,
//! bytes that do not frame) becomes a [`Link`] here at once, whose handshake answers or
//! refuses it.
//!
//! Owns: the connections waiting for their first frame, each with at most one handshake-sized
//! frame of bytes ([`HANDSHAKE_BODY_LEN_MAX`] plus its header, and what came in the same
//! read), and the time it was accepted.
//! Never: answers a peer before a `Link` holds the connection, trusts the `Hello` beyond
//! choosing a shard (any shard number maps to one of ours, and that shard's handshake
//! authenticates the peer), or keeps a connection past [`HANDSHAKE_TIMEOUT_MS`].

use bytes::{Bytes, BytesMut};
use shardmq_net::frame::handshake::HANDSHAKE_BODY_LEN_MAX;
use shardmq_net::frame::{Body, Decoder, Purpose};
use tracing::{debug, warn};

use super::link::{self, HANDSHAKE_TIMEOUT_MS};
use super::{Link, NodeOutput, NodeShard};
use crate::message::{ConnectionId, ShardIndex};

/// An accepted connection waiting for its first frame.
#[derive(Debug)]
pub(super) struct Accepting {
    decoder: Decoder,
    /// Every byte received, for the link or the shard that takes the connection.
    received: BytesMut,
    opened_ms: u64,
    last_received_ms: u64,
}

/// What the first frame says about a connection.
enum Verdict {
    /// More bytes are needed.
    Wait,
    /// A link on this shard takes it (and its bytes).
    Here,
    /// Hand it to this shard.
    To(ShardIndex),
}

impl Accepting {
    /// When it must close unless its first frame comes first: silent past the link timeout,
    /// or the handshake time over (as a link in its handshake, `Link::deadline_ms`).
    pub(super) fn deadline_ms(&self, link_timeout_ms: u64) -> u64 {
        self.last_received_ms
            .saturating_add(link_timeout_ms)
            .min(self.opened_ms.saturating_add(HANDSHAKE_TIMEOUT_MS))
    }

    fn verdict(&mut self, index: ShardIndex, shard_count: u16) -> Verdict {
        match self.decoder.next_versioned() {
            Ok(None) => Verdict::Wait,
            Ok(Some((_, Body::Hello(hello)))) if hello.purpose == Purpose::Data => {
                let target = hello.shard % shard_count.max(1);
                if target == index {
                    Verdict::Here
                } else {
                    Verdict::To(target)
                }
            }
            // A control link, another frame or an error: the link's handshake answers it.
            Ok(Some(_)) | Err(_) => Verdict::Here,
        }
    }
}

impl NodeShard {
    /// The cluster listener accepted a connection, or another shard handed one to this one.
    pub(super) fn link_opened(&mut self, connection: ConnectionId) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            self.scratch.push(NodeOutput::Close { connection });
            return;
        };
        if cluster.pending_links() >= link::PENDING_LINKS_MAX {
            cluster.refused_pending += 1;
            if cluster.refused_pending.is_power_of_two() {
                let refused = cluster.refused_pending;
                warn!(
                    refused,
                    "cluster links in handshake at their limit: new ones closed"
                );
            }
            cluster.io.outputs.push(NodeOutput::Close { connection });
            return;
        }
        let decoder = Decoder::new(
            cluster.io.settings.link.cluster_id(),
            HANDSHAKE_BODY_LEN_MAX,
        );
        cluster.accepting.insert(
            connection,
            Accepting {
                decoder,
                received: BytesMut::new(),
                opened_ms: now_ms,
                last_received_ms: now_ms,
            },
        );
    }

    /// Bytes for a connection that waits for its first frame.
    pub(super) fn accepting_received(&mut self, connection: ConnectionId, bytes: &[u8]) {
        let now_ms = self.now_ms;
        let (index, shard_count) = (self.index, self.shard_count);
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(accepting) = cluster.accepting.get_mut(&connection) else {
            return;
        };
        accepting.last_received_ms = now_ms;
        accepting.decoder.extend(bytes);
        accepting.received.extend_from_slice(bytes);
        let verdict = accepting.verdict(index, shard_count);
        if matches!(verdict, Verdict::Wait) {
            return;
        }
        let accepting = cluster
            .accepting
            .remove(&connection)
            .expect("looked up above");
        let received: Bytes = accepting.received.freeze();
        match verdict {
            Verdict::Wait => {}
            Verdict::To(shard) => {
                debug!(
                    connection,
                    shard, "data link handed to the shard that serves it"
                );
                cluster.io.outputs.push(NodeOutput::HandOff {
                    connection,
                    shard,
                    bytes: received,
                });
            }
            Verdict::Here => {
                let nonce = cluster.nonce();
                let link = Link::accepted(
                    connection,
                    &cluster.io.settings.link,
                    nonce,
                    accepting.opened_ms.min(now_ms),
                );
                cluster.io.links.insert(connection, link);
                self.link_received(connection, &received);
            }
        }
    }

    /// Closes the accepted connections that went silent, or sent no whole frame within the
    /// handshake time.
    pub(super) fn expire_accepting(&mut self) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let timeout_ms = cluster.io.settings.link_timeout_ms;
        let late: Vec<(ConnectionId, bool)> = cluster
            .accepting
            .iter()
            .filter(|(_, a)| now_ms >= a.deadline_ms(timeout_ms))
            .map(|(connection, a)| {
                let handshake_over = now_ms >= a.opened_ms.saturating_add(HANDSHAKE_TIMEOUT_MS);
                (*connection, handshake_over)
            })
            .collect();
        for (connection, handshake_over) in late {
            if handshake_over {
                warn!(
                    connection,
                    "cluster link closed: the link did not finish its handshake within {HANDSHAKE_TIMEOUT_MS} ms"
                );
            } else {
                warn!(
                    connection,
                    "cluster link closed: the link was silent past the timeout of {timeout_ms} ms"
                );
            }
            cluster.accepting.remove(&connection);
            cluster.io.outputs.push(NodeOutput::Close { connection });
        }
    }
}

#[cfg(test)]
mod tests {
    use shardmq_net::frame::{Member, NodeId, Role};

    use super::super::{ClusterSettings, LinkSettings, NodeInput};
    use super::*;
    use crate::limits::Limits;
    use crate::shard::{Shard, ShardConfig, SharedStrategy};

    fn link_settings(node: NodeId) -> LinkSettings {
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

    /// Shard `index` of a node with two shards.
    fn node_shard(index: ShardIndex) -> NodeShard {
        let shard = Shard::new(ShardConfig {
            index,
            shard_count: 2,
            node: 1,
            takeover_timeout_ms: 1_000,
            limits: Limits::default(),
            shared_strategy: SharedStrategy::RoundRobin,
        });
        let settings = ClusterSettings {
            link: link_settings(1),
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
        };
        NodeShard::clustered(shard, index, 2, settings, 7, 0)
    }

    /// The Hello a link from shard `shard` of node 2 opens with.
    fn hello(purpose: Purpose, shard: u16) -> Bytes {
        let mut link = Link::connecting(9, &link_settings(2), purpose, shard, 5, [3; 16], 0);
        link.take_outgoing().expect("a Hello")
    }

    fn outputs(node: &mut NodeShard) -> Vec<NodeOutput> {
        let mut outputs = Vec::new();
        node.take_outputs(&mut outputs);
        node.check_invariants();
        outputs
    }

    #[test]
    fn a_data_link_from_another_sending_shard_is_handed_to_the_shard_that_serves_it() {
        let mut node = node_shard(0);
        let bytes = hello(Purpose::Data, 3);
        node.handle(1, NodeInput::LinkOpened { connection: 40 });
        // Half a Hello: nothing is decided, nothing answered.
        let half = bytes.slice(..bytes.len() / 2);
        node.handle(
            2,
            NodeInput::LinkReceived {
                connection: 40,
                bytes: half,
            },
        );
        assert_eq!(outputs(&mut node), []);
        let rest = bytes.slice(bytes.len() / 2..);
        node.handle(
            3,
            NodeInput::LinkReceived {
                connection: 40,
                bytes: rest,
            },
        );
        // Sending shard 3 is served by shard 3 % 2 = 1, with every byte received.
        assert_eq!(
            outputs(&mut node),
            [NodeOutput::HandOff {
                connection: 40,
                shard: 1,
                bytes
            }]
        );
    }

    #[test]
    fn a_control_link_or_a_data_link_for_this_shard_is_answered_here() {
        for (purpose, shard) in [(Purpose::Control, 1), (Purpose::Data, 2)] {
            let mut node = node_shard(0);
            node.handle(1, NodeInput::LinkOpened { connection: 40 });
            let bytes = hello(purpose, shard);
            node.handle(
                2,
                NodeInput::LinkReceived {
                    connection: 40,
                    bytes,
                },
            );
            let outputs = outputs(&mut node);
            assert!(
                matches!(
                    outputs.as_slice(),
                    [NodeOutput::Send { connection: 40, .. }]
                ),
                "{purpose:?} from shard {shard}: the Welcome goes out here, got {outputs:?}"
            );
        }
    }

    #[test]
    fn a_connection_that_sends_no_whole_frame_is_closed_at_its_deadline() {
        let mut node = node_shard(1);
        node.handle(0, NodeInput::LinkOpened { connection: 41 });
        let partial = hello(Purpose::Data, 1).slice(..10);
        node.handle(
            0,
            NodeInput::LinkReceived {
                connection: 41,
                bytes: partial,
            },
        );
        assert_eq!(outputs(&mut node), []);
        // Silent past the link timeout (600 ms here).
        let deadline = node.next_deadline_ms().expect("a deadline");
        assert_eq!(deadline, 600);
        node.handle(deadline, NodeInput::Tick);
        assert_eq!(outputs(&mut node), [NodeOutput::Close { connection: 41 }]);
    }
}
