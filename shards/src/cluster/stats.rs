//! A shard's cluster links and forward queues as figures for `GET /metrics` and the cluster
//! status (asked of every shard with `Request::Metrics`).
//!
//! Owns: turning the links' plain counters ([`LinkCounters`], incremented where frames and
//! bytes pass) and the forward queues into [`LinkMetrics`] and [`ForwardQueueMetrics`].
//! Never: runs on the message path: it walks the links and the queues when an operator asks.
//! Invariant: the counters of a peer and purpose never go back (what closed links carried is
//! kept in `Io::closed_links`).

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
        let mut links: BTreeMap<(NodeId, &'static str), (u64, LinkCounters)> = cluster
            .io
            .closed_links
            .iter()
            .map(|(&key, &counters)| (key, (0, counters)))
            .collect();
        for link in cluster.io.links.values() {
            if let Some(peer) = link.up_peer() {
                let entry = links
                    .entry((peer.node, purpose_name(peer.purpose)))
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
