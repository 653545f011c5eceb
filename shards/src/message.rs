//! What moves between shards and into sessions.

use bytes::Bytes;
use bytestring::ByteString;
use shardmq_net::mqtt::{PublishProperties, QoS};

/// The index of a shard within its node.
pub type ShardIndex = u16;

/// A node of the cluster (the frame module's identifier).
pub use shardmq_net::frame::NodeId;

/// A connection, named by the reactor; opaque to the shard.
pub type ConnectionId = u64;

/// An application message as the broker holds it: one per publish, cloned cheaply (its
/// buffers are reference-counted) for every shard and session it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The 5.0 properties passed through to subscribers unchanged: payload format indicator,
    /// content type, response topic, correlation data and user properties (in order). Topic
    /// alias, subscription identifiers and message expiry are per delivery and not kept here.
    pub properties: PublishProperties,
    /// When the message expires (MQTT 5.0 §3.3.2.3.3), in the shard clock's milliseconds.
    pub expires_at_ms: Option<u64>,
    /// The client identifier of the publisher, for No Local subscriptions.
    pub publisher: Option<ByteString>,
}

impl Message {
    /// The message a decoded PUBLISH carries. Its Message Expiry Interval becomes an absolute
    /// deadline counted from `now_ms`; topic alias and subscription identifiers are per
    /// delivery and are dropped.
    pub fn from_publish(
        publish: shardmq_net::mqtt::Publish,
        now_ms: u64,
        publisher: Option<ByteString>,
    ) -> Self {
        let mut properties = publish.properties;
        let expires_at_ms = properties
            .message_expiry_interval
            .take()
            .map(|seconds| now_ms + u64::from(seconds) * 1000);
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        Self {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            expires_at_ms,
            publisher,
        }
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// The Message Expiry Interval to send: the time left, rounded up to whole seconds.
    pub fn remaining_expiry_seconds(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms
            .map(|at| (at.saturating_sub(now_ms).div_ceil(1000)).min(u64::from(u32::MAX)) as u32)
    }
}

/// A message between shards of one node. Sent in batches through the reactor's queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardMessage {
    /// Shard `shard` gained its first (`added`) or lost its last subscriber of `filter`; for a
    /// shared subscription, of that group's `filter`.
    Route {
        shard: ShardIndex,
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    },
    /// Deliver `message` to this shard's matching plain subscriptions (`plain`) and to one
    /// member of each listed shared group `(group, filter)`, chosen by the publishing shard.
    Deliver {
        message: Message,
        plain: bool,
        groups: Vec<(ByteString, ByteString)>,
        /// With held acknowledgements: answer with `Durable` once this shard's records of
        /// the message are synced.
        receipt: Option<crate::shard::Receipt>,
    },
    /// Node `node` of the cluster gained its first (`added`) or lost its last subscriber of
    /// `filter` (with `group`, of that shared group's `filter`). From the cluster agent.
    RemoteRoute {
        node: NodeId,
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    },
    /// The other members of the cluster now. From the cluster agent.
    ClusterNodes(Vec<ClusterNode>),
    /// The cluster-wide settings the cores' Raft group committed (name, value). From the
    /// cluster agent; the cluster side of each shard takes them.
    ClusterSettings(Vec<(String, String)>),
    /// A session moving between nodes, from node `node` (see [`SessionTransfer`]).
    Session {
        node: NodeId,
        transfer: SessionTransfer,
    },
    /// Store (or, with an empty payload, clear) a retained message. Every shard keeps the whole
    /// retained set, so a subscribe never waits on another shard.
    Retain {
        message: Message,
        /// As for `Deliver`: the shard that owns the topic records it and answers.
        receipt: Option<crate::shard::Receipt>,
    },
    /// Answers to receipts: (id, whether the records were written) for the shard that holds
    /// those publishes' acknowledgements.
    Durable { receipts: Vec<(u64, bool)> },
    /// Replication records from shard `home_shard` of node `home` about sessions whose
    /// client identifiers this shard owns (`reset`: forget that shard's replicas first).
    /// From the node layer, which split a `SessionTransfer::Replicate` by owner shard.
    Replicas {
        home: NodeId,
        home_shard: ShardIndex,
        reset: bool,
        records: Vec<crate::storage::Record>,
    },
}

/// A session moving from one node to another (takeover across nodes). Both travel on the data
/// links, numbered and acknowledged like QoS 1 messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionTransfer {
    /// Shard `shard` of the sending node is accepting a connection for `client_id`: close
    /// yours (0x8E) and hand the session over. Claim numbers are per claiming shard.
    Claim {
        client_id: ByteString,
        shard: ShardIndex,
        claim: u64,
        clean_start: bool,
        /// The receiver's claim (for this client) the sender answered before it claimed.
        after: Option<u64>,
    },
    /// The answer to claim `claim` of shard `shard`: the session as a snapshot record, if
    /// this node had one.
    Handover {
        client_id: ByteString,
        shard: ShardIndex,
        claim: u64,
        session: Option<Bytes>,
        /// The sender's own claim for this client that had completed when it answered (see
        /// `frame::Item::Handover`).
        completed: Option<u64>,
    },
    /// Records of the sending shard about the sessions it is home to and the receiver keeps
    /// replicas of, framed as in the durable log (see `frame::Item::Replicate`).
    Replicate { reset: bool, records: Bytes },
    /// Before a `Handover` without a session: the sender keeps a replica of the client's
    /// session from node `home` (a snapshot record), for the claim to take if `home` does
    /// not answer it.
    ReplicaOffer {
        client_id: ByteString,
        shard: ShardIndex,
        claim: u64,
        home: NodeId,
        session: Bytes,
    },
    /// The sender serves the client's session whose home was `home` (it installed a replica
    /// of it, or gave one to a claim, while `home` was down): see `frame::Item::Disown`.
    Disown { client_id: ByteString, home: NodeId },
}

/// Another member of the cluster, as the agent's view has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub node: NodeId,
    /// Its cluster port.
    pub address: std::net::SocketAddr,
    /// Its start (a restart makes a new one).
    pub epoch: u64,
    /// False while the cores see it down (within its grace period).
    pub up: bool,
}

/// A message forwarded to another node, and whom it is for there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub message: Message,
    /// Deliver to every matching plain subscription on that node.
    pub plain: bool,
    /// Deliver to one member on that node of each shared group: `(group, filter)`. The
    /// publishing node picked that node for the group.
    pub groups: Vec<(ByteString, ByteString)>,
}
