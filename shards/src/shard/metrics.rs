//! What a shard counts for the metrics endpoint (`GET /metrics`): counters kept as plain
//! fields (one thread owns them, so no atomics), and gauges read off the shard's state when
//! an operator asks.
//!
//! Owns: [`Stats`], the counters since the shard started, and [`ShardMetrics`], the copy the
//! shard hands to the control plane through its mailbox (`Request::Metrics`).
//! Never: takes time on the message path beyond an increment; the gauges that need a walk
//! over the sessions are computed only when asked.

use std::collections::BTreeMap;

use shardmq_net::mqtt::QoS;

use super::Shard;

/// Counters since the shard started. They live in the shard's `Outbox`, which every write
/// path already holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections the shard took (opened here, or handed to it by another shard).
    pub connections_opened: u64,
    /// Connections closed at once because the shard was at `connections_per_shard_max`.
    pub connections_refused_shard_limit: u64,
    /// CONNECTs refused, by the CONNACK reason code (MQTT 5.0 numbering; a 3.1.1 return code
    /// is counted under the 5.0 reason it was mapped from).
    pub connects_refused: BTreeMap<u8, u64>,
    /// MQTT packets of every type decoded from clients and written to them.
    pub packets_received: u64,
    pub packets_sent: u64,
    /// PUBLISH packets from clients, by QoS, and their payload bytes.
    pub publishes_received: [u64; 3],
    pub publish_bytes_received: u64,
    /// PUBLISH packets written to subscribers' connections, by QoS, and their payload bytes.
    pub publishes_sent: [u64; 3],
    pub publish_bytes_sent: u64,
    /// Messages dropped: past their expiry interval, the oldest of a full session queue.
    pub dropped_expired: u64,
    pub dropped_queue_full: u64,
    /// Deliveries the reader's ACL does not allow (a reload narrowed it, or a session
    /// restored from the log was queued messages before its client proved who it is).
    pub dropped_not_authorized: u64,
}

impl Stats {
    pub(super) fn received(&mut self, qos: QoS, payload_bytes: usize) {
        self.publishes_received[qos_index(qos)] += 1;
        self.publish_bytes_received += payload_bytes as u64;
    }

    pub(super) fn sent(&mut self, qos: QoS, payload_bytes: usize) {
        self.publishes_sent[qos_index(qos)] += 1;
        self.publish_bytes_sent += payload_bytes as u64;
    }
}

fn qos_index(qos: QoS) -> usize {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// One shard's counters and gauges at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMetrics {
    pub stats: Stats,
    /// QoS 0 messages dropped at a connection's unsent bound, and PUBLISH packets over a
    /// client's Maximum Packet Size.
    pub dropped_over_bound: u64,
    pub dropped_too_large: u64,
    pub connections: u64,
    pub sessions_online: u64,
    pub sessions_offline: u64,
    pub persistent_sessions: u64,
    pub subscriptions: u64,
    pub shared_subscriptions: u64,
    /// Filters in the node and cluster route table (this shard's copy).
    pub routes: u64,
    pub queued_messages: u64,
    pub inflight_messages: u64,
    pub retained_messages: u64,
    pub retained_bytes: u64,
    /// Records appended to the durable log and not yet covered by a finished log call.
    pub durable_held_acknowledgements: u64,
    /// Whether this shard's durable log failed (durable work refused until a restart).
    pub durable_failed: bool,
    /// The cluster links this shard carries, by peer node and purpose (filled in by the
    /// node layer; empty on a node on its own).
    pub links: Vec<LinkMetrics>,
    /// This shard's forward queue to each peer node.
    pub forward_queues: Vec<ForwardQueueMetrics>,
    /// Session replication: replica sessions held here for other nodes, replica sessions
    /// refused at the limit, replicas installed after their home went down, replication
    /// items sent and not yet acknowledged (filled in by the node layer), and items not
    /// sent or received batches dropped (likewise).
    pub replica_sessions: u64,
    pub replicas_refused: u64,
    pub replicas_promoted: u64,
    /// Sessions recovered here that ended because another node served them while this node
    /// was down (fencing).
    pub sessions_fenced: u64,
    pub replication_unacknowledged: u64,
    pub replication_dropped: u64,
}

/// What the cluster links of one shard to one peer node, of one purpose, have carried
/// since the shard started (links that closed included), and how many are up now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkMetrics {
    /// The peer node; None for the closed links of the peers folded together past
    /// `cluster::CLOSED_LINK_PEERS_MAX` (labelled `others`).
    pub peer: Option<u32>,
    /// "control" or "data".
    pub purpose: &'static str,
    pub up: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Bytes on the wire (TLS records included, under TLS).
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// One shard's forward queue to one peer node: messages waiting to be sent or acknowledged,
/// their estimated encoded bytes, and the oldest dropped for room since it was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardQueueMetrics {
    pub peer: u32,
    pub messages: u64,
    pub bytes: u64,
    pub dropped: u64,
}

impl Shard {
    /// The shard's counters and gauges. Walks the sessions once (O(sessions)): called when
    /// an operator scrapes, never on the message path.
    pub fn metrics(&self) -> ShardMetrics {
        let mut metrics = ShardMetrics {
            stats: self.outbox.stats.clone(),
            dropped_over_bound: self.outbox.dropped_over_bound_count,
            dropped_too_large: self.outbox.dropped_too_large_count,
            connections: self.connections.len() as u64,
            persistent_sessions: self.persistent_sessions as u64,
            shared_subscriptions: self.shared.filter_count() as u64,
            routes: self.routes.filter_count() as u64,
            retained_messages: self.retained.len() as u64,
            retained_bytes: self.retained.bytes() as u64,
            durable_held_acknowledgements: self
                .durable
                .as_ref()
                .map_or(0, |durable| durable.held_count() as u64),
            durable_failed: self
                .durable
                .as_ref()
                .is_some_and(|durable| durable.has_failed()),
            replica_sessions: self.replica_session_count() as u64,
            replicas_refused: self.replication().map_or(0, |r| r.refused),
            replicas_promoted: self.replication().map_or(0, |r| r.promoted),
            sessions_fenced: self.sessions_fenced,
            ..ShardMetrics::default()
        };
        for session in self.sessions.iter().flatten() {
            if session.connection.is_some() {
                metrics.sessions_online += 1;
            } else {
                metrics.sessions_offline += 1;
            }
            metrics.subscriptions += session.subscriptions.len() as u64;
            metrics.queued_messages += session.queue.len() as u64;
            metrics.inflight_messages += session.inflight.len() as u64;
        }
        metrics
    }
}
