//! A shard's cluster links and forward queues as figures for `GET /metrics` and the cluster
//! status (asked of every shard with `Request::Metrics`).
//!
//! Owns: turning the links' plain counters ([`LinkCounters`], incremented where frames and
//! bytes pass) and the forward queues into [`LinkMetrics`] and [`ForwardQueueMetrics`].
//! Never: runs on the message path: it walks the links and the queues when an operator asks.
//! Invariant: the counters of a peer and purpose never go back while the peer is kept (what
//! closed links carried is kept in [`ClosedLinks`]), and their sum over every peer, `others`
//! included, never goes back: memory stays bounded (at most [`CLOSED_LINK_PEERS_MAX`] peers
//! kept) however many node identifiers peers claim.

use std::collections::BTreeMap;

use shardmq_net::frame::NodeId;

use super::io::purpose_name;
use super::link::LinkCounters;
use super::{NodeShard, forward};
use crate::shard::{ForwardQueueMetrics, LinkMetrics, ShardMetrics};

impl NodeShard {
    /// The shard's metrics with its cluster links' and forward queues' (for scrapes only:
    /// walks the links and the queues).
    pub fn metrics(&self) -> ShardMetrics {
        let mut metrics = self.shard.metrics();
        let Some(cluster) = &self.cluster else {
            return metrics;
        };
        let mut links: BTreeMap<(Option<NodeId>, &'static str), (u64, LinkCounters)> = cluster
            .io
            .closed_links
            .iter()
            .map(|(peer, purpose, counters)| ((peer, purpose), (0, counters)))
            .collect();
        for link in cluster.io.links.values() {
            if let Some(peer) = link.up_peer() {
                let entry = links
                    .entry((Some(peer.node), purpose_name(peer.purpose)))
                    .or_default();
                entry.0 += 1;
                entry.1 += link.counters;
            }
        }
        metrics.links = links
            .into_iter()
            .map(|((peer, purpose), (up, counters))| LinkMetrics {
                peer,
                purpose,
                up,
                frames_sent: counters.frames_sent,
                frames_received: counters.frames_received,
                bytes_sent: counters.bytes_sent,
                bytes_received: counters.bytes_received,
            })
            .collect();
        metrics.forward_queues = cluster
            .peers
            .iter()
            .map(|(&peer, queue)| {
                let (messages, bytes) = queue.depth();
                ForwardQueueMetrics {
                    peer,
                    messages,
                    bytes,
                    dropped: queue.dropped,
                }
            })
            .collect();
        metrics.replication_unacknowledged = cluster
            .peers
            .values()
            .map(forward::Peer::replication_unacknowledged)
            .sum();
        metrics.replication_dropped = cluster.replication_dropped;
        metrics
    }
}

/// Peers (by node and purpose) whose closed links a shard counts one by one; past it, the
/// peer whose links closed longest ago (preferring one with no link up) is folded into the
/// `others` total of its purpose. A cluster has far fewer nodes; only a peer that claims a
/// new node identifier at each reconnection reaches it.
pub const CLOSED_LINK_PEERS_MAX: usize = 1024;

/// What the links that closed had carried, by peer node and purpose, so that the counters of
/// `GET /metrics` never go back when a link is replaced; bounded by [`CLOSED_LINK_PEERS_MAX`].
#[derive(Debug, Default)]
pub struct ClosedLinks {
    /// By peer and purpose: the counters, and the number of the last close counted there.
    peers: BTreeMap<(NodeId, &'static str), (LinkCounters, u64)>,
    /// By purpose: what the links of the peers folded out of `peers` had carried.
    others: BTreeMap<&'static str, LinkCounters>,
    /// Closes counted so far (orders the peers by their last close).
    closes: u64,
}

impl ClosedLinks {
    /// Counts a closed link of `peer` and `purpose`; `up` tells the peers with a link up
    /// now, kept in preference when one must be folded.
    pub fn add(
        &mut self,
        peer: NodeId,
        purpose: &'static str,
        counters: LinkCounters,
        up: impl Fn(&(NodeId, &'static str)) -> bool,
    ) {
        self.closes += 1;
        let key = (peer, purpose);
        if !self.peers.contains_key(&key) && self.peers.len() >= CLOSED_LINK_PEERS_MAX {
            let oldest = |keep_up: bool| {
                self.peers
                    .iter()
                    .filter(|(key, _)| !keep_up || !up(key))
                    .min_by_key(|(_, (_, closed))| *closed)
                    .map(|(&key, _)| key)
            };
            if let Some(folded) = oldest(true).or_else(|| oldest(false))
                && let Some((counters, _)) = self.peers.remove(&folded)
            {
                *self.others.entry(folded.1).or_default() += counters;
            }
        }
        let entry = self.peers.entry(key).or_default();
        entry.0 += counters;
        entry.1 = self.closes;
    }

    /// Every peer's counters (None: the peers folded together), by peer and purpose.
    pub fn iter(&self) -> impl Iterator<Item = (Option<NodeId>, &'static str, LinkCounters)> {
        let peers = self
            .peers
            .iter()
            .map(|(&(peer, purpose), &(counters, _))| (Some(peer), purpose, counters));
        let others = self
            .others
            .iter()
            .map(|(&purpose, &counters)| (None, purpose, counters));
        others.chain(peers)
    }

    /// The peers counted one by one.
    pub fn peers_kept(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried(frames: u64) -> LinkCounters {
        LinkCounters {
            frames_sent: frames,
            frames_received: frames,
            bytes_sent: frames * 10,
            bytes_received: frames * 10,
        }
    }

    fn total(closed: &ClosedLinks) -> LinkCounters {
        let mut sum = LinkCounters::default();
        for (_, _, counters) in closed.iter() {
            sum += counters;
        }
        sum
    }

    #[test]
    fn a_peer_that_claims_a_new_node_at_each_reconnection_is_folded_and_counted_exactly() {
        let mut closed = ClosedLinks::default();
        // Node 1 has a link up again, and its links closed first of all.
        let up = |key: &(NodeId, &'static str)| *key == (1, "control");
        closed.add(1, "control", carried(5), up);
        closed.add(2, "control", carried(7), up);
        let mut expected = carried(12);
        for node in 100..100 + 3 * CLOSED_LINK_PEERS_MAX as NodeId {
            closed.add(node, "control", carried(1), up);
            expected += carried(1);
            assert!(closed.peers_kept() <= CLOSED_LINK_PEERS_MAX);
            assert_eq!(total(&closed), expected, "every frame still counted");
        }
        let by_peer: BTreeMap<Option<NodeId>, LinkCounters> =
            closed.iter().map(|(peer, _, c)| (peer, c)).collect();
        // The peer with a link up keeps its own counters; node 2 was folded first.
        assert_eq!(by_peer.get(&Some(1)), Some(&carried(5)));
        assert_eq!(by_peer.get(&Some(2)), None);
        assert_eq!(
            by_peer.get(&None),
            Some(&carried(7 + 2 * CLOSED_LINK_PEERS_MAX as u64 + 1))
        );
        // A kept peer that closes again adds to its own counters.
        let last = 99 + 3 * CLOSED_LINK_PEERS_MAX as NodeId;
        closed.add(last, "control", carried(4), up);
        let by_peer: BTreeMap<Option<NodeId>, LinkCounters> =
            closed.iter().map(|(peer, _, c)| (peer, c)).collect();
        assert_eq!(by_peer.get(&Some(last)), Some(&carried(5)));
    }
}
