//! `$SYS` topics: the node's own figures, published by shard 0 every `sys_interval_seconds`
//! in Mosquitto's layout (`$SYS/broker/clients/connected`, `$SYS/broker/uptime`, ...).
//!
//! Owns: how a `$SYS` value becomes a message: retained, QoS 0, delivered to this node's
//! subscribers only (each node has its own `$SYS`), never written to the durable log nor
//! to a checkpoint (the next interval publishes it again), and not publishable by clients.
//! Never: computes the figures (the binary gathers every shard's metrics, `src/sys.rs`).

use bytes::Bytes;
use bytestring::ByteString;

use super::Shard;
use crate::message::Message;

/// The prefix of the topics the broker alone publishes.
pub const SYS_PREFIX: &str = "$SYS/";

/// Whether `topic` is one of the broker's own (`$SYS/...`): not written by clients, not
/// logged.
pub fn is_sys_topic(topic: &str) -> bool {
    topic.starts_with(SYS_PREFIX)
}

impl Shard {
    /// Publishes each `(topic, value)` as a retained QoS 0 message to this node's
    /// subscribers (the other nodes are not told: their `$SYS` is their own). Topics outside
    /// `$SYS/` are a programmer error and are skipped.
    pub fn publish_sys(&mut self, values: Vec<(String, String)>) {
        for (topic, value) in values {
            if !is_sys_topic(&topic) {
                debug_assert!(false, "a $SYS value under {topic:?}");
                continue;
            }
            let message = Message {
                topic: ByteString::from(topic),
                payload: Bytes::from(value),
                qos: shardmq_net::mqtt::QoS::AtMostOnce,
                retain: true,
                properties: Default::default(),
                expires_at_ms: None,
                publisher: None,
            };
            // As if from another node: stored on this node's shards and delivered to their
            // plain subscribers, never forwarded on.
            self.route(message, Some((true, &[])));
        }
    }
}
