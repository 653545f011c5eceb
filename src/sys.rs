//! The `$SYS` publisher: every `server.sys_interval_seconds` a thread of its own asks every
//! shard for its metrics (the same `Control::Metrics` as `GET /metrics`), adds them up and
//! hands the values to shard 0, which publishes them retained to this node's subscribers
//! (`Shard::publish_sys`), in Mosquitto's layout.
//!
//! Owns: the topic names and how each value is computed.
//! Never: blocks a shard (it waits on its own thread, each answer at most
//! [`ANSWER_TIMEOUT`]), or publishes anything outside `$SYS/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_net::reactor::Mailboxes;
use shardmq_shards::shard::ShardMetrics;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::admin::{Control, NodeMessage};
use crate::supervise::Health;

/// How long one round waits for each shard's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the thread looks whether the node still serves while it waits.
const POLL: Duration = Duration::from_millis(100);

/// Starts the publisher thread (`interval_seconds` above 0). It ends by itself once the node
/// stops serving.
pub fn start(
    interval_seconds: u64,
    shard_count: u16,
    mailboxes: Arc<Mailboxes<NodeMessage>>,
    health: Arc<Health>,
) -> Result<(), String> {
    let interval = Duration::from_secs(interval_seconds);
    let started = Instant::now();
    std::thread::Builder::new()
        .name("sys".into())
        .spawn(move || {
            info!(interval_seconds, "publishing $SYS topics");
            let mut next = Instant::now();
            loop {
                while Instant::now() < next {
                    if !health.serving() {
                        return;
                    }
                    std::thread::sleep(POLL.min(next.saturating_duration_since(Instant::now())));
                }
                next += interval;
                if !health.serving() {
                    return;
                }
                let Some(shards) = gather(shard_count, &mailboxes, &health) else {
                    continue;
                };
                let values = values(&shards, started.elapsed().as_secs());
                debug!(topics = values.len(), "$SYS values published");
                mailboxes.post(0, NodeMessage::Control(Control::Sys(values)));
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the $SYS thread: {e}"))
}

/// Every shard's metrics, or None when one did not answer in time (that round is skipped:
/// a sum without a shard would be wrong).
fn gather(
    shard_count: u16,
    mailboxes: &Mailboxes<NodeMessage>,
    health: &Health,
) -> Option<Vec<ShardMetrics>> {
    let receivers: Vec<_> = (0..shard_count)
        .map(|shard| {
            let (sender, receiver) = oneshot::channel();
            mailboxes.post(shard, NodeMessage::Control(Control::Metrics(sender)));
            (shard, receiver)
        })
        .collect();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut shards = Vec::with_capacity(receivers.len());
    for (shard, mut receiver) in receivers {
        loop {
            match receiver.try_recv() {
                Ok(Ok(metrics)) => {
                    shards.push(*metrics);
                    break;
                }
                Ok(Err(message)) => {
                    warn!(shard, %message, "$SYS skipped this round: a shard refused its metrics");
                    return None;
                }
                Err(oneshot::error::TryRecvError::Closed) => return None,
                Err(oneshot::error::TryRecvError::Empty) => {
                    if Instant::now() >= deadline || !health.serving() {
                        if health.serving() {
                            warn!(
                                shard,
                                "$SYS skipped this round: a shard did not answer in time"
                            );
                        }
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
    Some(shards)
}

/// The `$SYS` topics and their values (Mosquitto's names where it has one).
pub fn values(shards: &[ShardMetrics], uptime_seconds: u64) -> Vec<(String, String)> {
    let sum = |f: &dyn Fn(&ShardMetrics) -> u64| shards.iter().map(f).sum::<u64>();
    let online = sum(&|m| m.sessions_online);
    let offline = sum(&|m| m.sessions_offline);
    let received: u64 = sum(&|m| m.stats.publishes_received.iter().sum());
    let sent: u64 = sum(&|m| m.stats.publishes_sent.iter().sum());
    let dropped = sum(&|m| {
        m.stats.dropped_expired
            + m.stats.dropped_queue_full
            + m.stats.dropped_not_authorized
            + m.dropped_over_bound
            + m.dropped_too_large
    });
    // Every shard holds the same retained store: shard 0's count.
    let retained = shards.first().map_or(0, |m| m.retained_messages);
    let pairs: Vec<(&str, String)> = vec![
        ("version", format!("shardmq {}", env!("CARGO_PKG_VERSION"))),
        ("uptime", format!("{uptime_seconds} seconds")),
        ("clients/connected", online.to_string()),
        ("clients/disconnected", offline.to_string()),
        ("clients/total", (online + offline).to_string()),
        (
            "messages/received",
            sum(&|m| m.stats.packets_received).to_string(),
        ),
        ("messages/sent", sum(&|m| m.stats.packets_sent).to_string()),
        ("publish/messages/received", received.to_string()),
        ("publish/messages/sent", sent.to_string()),
        ("publish/messages/dropped", dropped.to_string()),
        (
            "publish/bytes/received",
            sum(&|m| m.stats.publish_bytes_received).to_string(),
        ),
        (
            "publish/bytes/sent",
            sum(&|m| m.stats.publish_bytes_sent).to_string(),
        ),
        ("subscriptions/count", sum(&|m| m.subscriptions).to_string()),
        ("retained messages/count", retained.to_string()),
        (
            "store/messages/count",
            sum(&|m| m.queued_messages + m.inflight_messages).to_string(),
        ),
    ];
    pairs
        .into_iter()
        .map(|(topic, value)| (format!("$SYS/broker/{topic}"), value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_add_up_the_shards_and_keep_one_retained_count() {
        let mut first = ShardMetrics {
            sessions_online: 2,
            sessions_offline: 1,
            retained_messages: 5,
            ..ShardMetrics::default()
        };
        first.stats.publishes_received = [1, 2, 3];
        first.stats.packets_received = 10;
        let mut second = ShardMetrics {
            sessions_online: 3,
            retained_messages: 5,
            dropped_over_bound: 2,
            ..ShardMetrics::default()
        };
        second.stats.publishes_received = [4, 0, 0];
        second.stats.packets_received = 7;
        let values: std::collections::BTreeMap<String, String> =
            values(&[first, second], 42).into_iter().collect();
        let get = |topic: &str| values[&format!("$SYS/broker/{topic}")].as_str();
        assert_eq!(get("clients/connected"), "5");
        assert_eq!(get("clients/disconnected"), "1");
        assert_eq!(get("clients/total"), "6");
        assert_eq!(get("publish/messages/received"), "10");
        assert_eq!(get("messages/received"), "17");
        assert_eq!(get("publish/messages/dropped"), "2");
        assert_eq!(get("retained messages/count"), "5");
        assert_eq!(get("uptime"), "42 seconds");
        assert!(values.keys().all(|topic| topic.starts_with("$SYS/broker/")));
    }
}
