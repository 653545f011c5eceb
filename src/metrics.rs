//! `GET /metrics`: the node's counters and gauges in the Prometheus text exposition format
//! (OpenMetrics text, as `prometheus-client` writes it).
//!
//! Owns: the metric names and labels, and turning one scrape's answers (every shard's
//! [`ShardMetrics`], the admission table's counts, shard 0's cluster status, the process's
//! own figures) into the text.
//! Never: keeps state between scrapes, or asks a shard for anything but a copy of its
//! counters (the shards count in plain fields, `shards/src/shard/metrics.rs`).
//!
//! Why a registry per scrape: the shards own their counters and hand over copies, so the
//! registry only formats; `prometheus-client`'s families give the escaping, the `# TYPE`
//! and `# HELP` lines and the `_total` suffix of counters.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use shardmq_net::reactor::admission::AdmissionSnapshot;
use shardmq_shards::shard::ShardMetrics;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter<u64>>;
type Gauges = Family<Labels, Gauge<u64, AtomicU64>>;

/// What one scrape gathered.
pub struct Scrape<'a> {
    /// Every shard's answer, by shard index (a shard that did not answer in time is absent
    /// and counted in `shardmq_scrape_shards_missing`).
    pub shards: &'a [(u16, ShardMetrics)],
    pub shards_missing: u64,
    pub admission: AdmissionSnapshot,
    /// Shard 0's cluster status (`admin::status_json`), when the node is clustered and it
    /// answered.
    pub cluster: Option<&'a Value>,
    pub process: Process,
}

/// The process's own figures, read from `/proc/self`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Process {
    pub resident_bytes: u64,
    pub open_files: u64,
    pub uptime_seconds: u64,
}

impl Process {
    /// Reads `/proc/self/status` (VmRSS) and counts `/proc/self/fd`; a figure that cannot be
    /// read is 0.
    pub fn read(uptime_seconds: u64) -> Self {
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status.lines().find_map(|line| {
                    let kib = line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?;
                    kib.trim().parse::<u64>().ok()
                })
            })
            .map_or(0, |kib| kib.saturating_mul(1024));
        let open_files = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
        Self {
            resident_bytes,
            open_files,
            uptime_seconds,
        }
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|&(key, value)| (key, value.to_string()))
        .collect()
}

/// A gauge family registered under `name`.
fn gauges(registry: &mut Registry, name: &str, help: &str) -> Gauges {
    let family = Gauges::default();
    registry.register(name, help, family.clone());
    family
}

/// A counter family registered under `name` (the text gets `name_total`).
fn counters(registry: &mut Registry, name: &str, help: &str) -> Counters {
    let family = Counters::default();
    registry.register(name, help, family.clone());
    family
}

fn set(family: &Gauges, pairs: &[(&'static str, &str)], value: u64) {
    family.get_or_create(&labels(pairs)).set(value);
}

fn add(family: &Counters, pairs: &[(&'static str, &str)], value: u64) {
    family.get_or_create(&labels(pairs)).inc_by(value);
}

const QOS: [&str; 3] = ["0", "1", "2"];

/// The scrape as exposition text.
pub fn render(scrape: &Scrape) -> String {
    let mut registry = Registry::with_prefix("shardmq");
    shard_metrics(&mut registry, scrape.shards);
    link_metrics(&mut registry, scrape.shards);
    replication_metrics(&mut registry, scrape.shards);
    let missing = gauges(
        &mut registry,
        "scrape_shards_missing",
        "Shards that did not answer this scrape in time (their figures are absent)",
    );
    set(&missing, &[], scrape.shards_missing);
    admission_metrics(&mut registry, &scrape.admission, scrape.shards);
    if let Some(status) = scrape.cluster {
        cluster_metrics(&mut registry, status);
    }
    let process = scrape.process;
    let resident = gauges(
        &mut registry,
        "process_resident_memory_bytes",
        "Resident set size of the broker process",
    );
    set(&resident, &[], process.resident_bytes);
    let files = gauges(
        &mut registry,
        "process_open_files",
        "Open file descriptors of the broker process (sockets included)",
    );
    set(&files, &[], process.open_files);
    let uptime = gauges(
        &mut registry,
        "uptime_seconds",
        "Seconds since the broker process started",
    );
    set(&uptime, &[], process.uptime_seconds);
    let mut text = String::new();
    // Writing into a String cannot fail.
    encode(&mut text, &registry).expect("encoding into a String");
    text
}

fn shard_metrics(registry: &mut Registry, shards: &[(u16, ShardMetrics)]) {
    let connections = gauges(
        registry,
        "connections",
        "Client connections open, per shard",
    );
    let opened = counters(
        registry,
        "connections_opened",
        "Client connections a shard took (accepted there or handed to it by another shard)",
    );
    let connects_refused = counters(
        registry,
        "connects_refused",
        "CONNECT packets refused, by the CONNACK reason code (MQTT 5.0 numbering)",
    );
    let sessions = gauges(
        registry,
        "sessions",
        "Sessions, online or offline, per shard",
    );
    let persistent = gauges(
        registry,
        "persistent_sessions",
        "Sessions with a session expiry above 0, per shard",
    );
    let subscriptions = gauges(
        registry,
        "subscriptions",
        "Subscriptions of the sessions, per shard",
    );
    let shared = gauges(
        registry,
        "shared_subscription_filters",
        "Filters with shared-subscription members, per shard",
    );
    let packets_received = counters(
        registry,
        "packets_received",
        "MQTT packets of every type decoded from clients",
    );
    let packets_sent = counters(
        registry,
        "packets_sent",
        "MQTT packets of every type written to clients",
    );
    let received = counters(
        registry,
        "messages_received",
        "PUBLISH packets received from clients, by QoS",
    );
    let received_bytes = counters(
        registry,
        "message_payload_bytes_received",
        "Payload bytes of the PUBLISH packets received from clients",
    );
    let sent = counters(
        registry,
        "messages_sent",
        "PUBLISH packets written to subscribers, by QoS",
    );
    let sent_bytes = counters(
        registry,
        "message_payload_bytes_sent",
        "Payload bytes of the PUBLISH packets written to subscribers",
    );
    let dropped = counters(
        registry,
        "messages_dropped",
        "Messages dropped, by reason: expired, queue_full (a session queue's oldest), \
         unsent_bound (QoS 0 to a connection at its unsent limit), too_large (over the \
         client's Maximum Packet Size), not_authorized (the reader's ACL refuses the topic)",
    );
    let queued = gauges(
        registry,
        "queued_messages",
        "Messages waiting in session queues, per shard",
    );
    let inflight = gauges(
        registry,
        "inflight_messages",
        "QoS 1 and 2 messages sent and not yet acknowledged, per shard",
    );
    let held = gauges(
        registry,
        "durable_held_acknowledgements",
        "Acknowledgements waiting for the durable log's write or sync, per shard",
    );
    let failed = gauges(
        registry,
        "durable_log_failed",
        "1 when the shard's durable log failed (durable work refused until a restart)",
    );
    for (index, metrics) in shards {
        let shard = index.to_string();
        let shard = shard.as_str();
        let stats = &metrics.stats;
        set(&connections, &[("shard", shard)], metrics.connections);
        add(&opened, &[("shard", shard)], stats.connections_opened);
        add(
            &packets_received,
            &[("shard", shard)],
            stats.packets_received,
        );
        add(&packets_sent, &[("shard", shard)], stats.packets_sent);
        for (&reason, &count) in &stats.connects_refused {
            let reason = format!("0x{reason:02x}");
            add(
                &connects_refused,
                &[("shard", shard), ("reason_code", &reason)],
                count,
            );
        }
        set(
            &sessions,
            &[("shard", shard), ("state", "online")],
            metrics.sessions_online,
        );
        set(
            &sessions,
            &[("shard", shard), ("state", "offline")],
            metrics.sessions_offline,
        );
        set(
            &persistent,
            &[("shard", shard)],
            metrics.persistent_sessions,
        );
        set(&subscriptions, &[("shard", shard)], metrics.subscriptions);
        set(&shared, &[("shard", shard)], metrics.shared_subscriptions);
        for (qos, name) in QOS.iter().enumerate() {
            let pairs = [("shard", shard), ("qos", *name)];
            add(&received, &pairs, stats.publishes_received[qos]);
            add(&sent, &pairs, stats.publishes_sent[qos]);
        }
        add(
            &received_bytes,
            &[("shard", shard)],
            stats.publish_bytes_received,
        );
        add(&sent_bytes, &[("shard", shard)], stats.publish_bytes_sent);
        for (reason, count) in [
            ("expired", stats.dropped_expired),
            ("queue_full", stats.dropped_queue_full),
            ("not_authorized", stats.dropped_not_authorized),
            ("unsent_bound", metrics.dropped_over_bound),
            ("too_large", metrics.dropped_too_large),
        ] {
            add(&dropped, &[("shard", shard), ("reason", reason)], count);
        }
        set(&queued, &[("shard", shard)], metrics.queued_messages);
        set(&inflight, &[("shard", shard)], metrics.inflight_messages);
        set(
            &held,
            &[("shard", shard)],
            metrics.durable_held_acknowledgements,
        );
        set(
            &failed,
            &[("shard", shard)],
            u64::from(metrics.durable_failed),
        );
    }
    // Every shard holds the same route table and retained store (copies): shard 0's.
    if let Some((_, first)) = shards.iter().find(|(index, _)| *index == 0) {
        let routes = gauges(
            registry,
            "routes",
            "Filters in the node's route table (which shards and nodes hold subscribers)",
        );
        set(&routes, &[], first.routes);
        let retained = gauges(registry, "retained_messages", "Retained messages held");
        set(&retained, &[], first.retained_messages);
        let retained_bytes = gauges(
            registry,
            "retained_bytes",
            "Bytes the retained messages hold (one shard's copy)",
        );
        set(&retained_bytes, &[], first.retained_bytes);
    }
}

/// The cluster links and forward queues of every shard (none on a node on its own).
fn link_metrics(registry: &mut Registry, shards: &[(u16, ShardMetrics)]) {
    if shards
        .iter()
        .all(|(_, m)| m.links.is_empty() && m.forward_queues.is_empty())
    {
        return;
    }
    let up = gauges(
        registry,
        "cluster_links_up",
        "Cluster links up (handshake done) to a peer node, by purpose (control, data) and shard",
    );
    let frames_sent = counters(
        registry,
        "cluster_link_frames_sent",
        "Cluster frames written to a peer node's links, by purpose and shard",
    );
    let frames_received = counters(
        registry,
        "cluster_link_frames_received",
        "Cluster frames decoded from a peer node's links, by purpose and shard",
    );
    let bytes_sent = counters(
        registry,
        "cluster_link_bytes_sent",
        "Bytes handed to a peer node's link sockets (TLS records included), by purpose and shard",
    );
    let bytes_received = counters(
        registry,
        "cluster_link_bytes_received",
        "Bytes received on a peer node's link sockets (TLS records included), by purpose and shard",
    );
    let queue_messages = gauges(
        registry,
        "cluster_forward_queue_messages",
        "Messages a shard holds for a peer node: not yet sent, or sent and not acknowledged",
    );
    let queue_bytes = gauges(
        registry,
        "cluster_forward_queue_bytes",
        "Estimated encoded bytes of the messages in a shard's forward queue to a peer node",
    );
    let queue_dropped = counters(
        registry,
        "cluster_forward_queue_dropped",
        "Oldest messages a full forward queue (cluster.forward_queue_max) dropped to make room",
    );
    for (index, metrics) in shards {
        let shard = index.to_string();
        for link in &metrics.links {
            let peer = link.peer.map_or("others".into(), |peer| peer.to_string());
            let pairs = [
                ("peer", peer.as_str()),
                ("purpose", link.purpose),
                ("shard", shard.as_str()),
            ];
            set(&up, &pairs, link.up);
            add(&frames_sent, &pairs, link.frames_sent);
            add(&frames_received, &pairs, link.frames_received);
            add(&bytes_sent, &pairs, link.bytes_sent);
            add(&bytes_received, &pairs, link.bytes_received);
        }
        for queue in &metrics.forward_queues {
            let peer = queue.peer.to_string();
            let pairs = [("peer", peer.as_str()), ("shard", shard.as_str())];
            set(&queue_messages, &pairs, queue.messages);
            set(&queue_bytes, &pairs, queue.bytes);
            add(&queue_dropped, &pairs, queue.dropped);
        }
    }
}

/// Session replication, per shard (all zero on a node on its own or with
/// `cluster.session_replicas = 0`).
fn replication_metrics(registry: &mut Registry, shards: &[(u16, ShardMetrics)]) {
    let held = gauges(
        registry,
        "replica_sessions",
        "Replicas of other nodes' persistent sessions held here, per shard",
    );
    let unacknowledged = gauges(
        registry,
        "replication_unacknowledged",
        "Session replication items sent to replicas and not acknowledged yet, per shard",
    );
    let refused = counters(
        registry,
        "replicas_refused",
        "Replica sessions refused at limits.persistent_sessions_per_shard_max",
    );
    let promoted = counters(
        registry,
        "replicas_promoted",
        "Replicas installed as sessions of this node after their home node went down",
    );
    let fenced = counters(
        registry,
        "sessions_fenced",
        "Sessions recovered here that ended because another node served them while this node was down",
    );
    let dropped = counters(
        registry,
        "replication_dropped",
        "Replication items not sent (a peer of an older protocol) or received batches that did not decode",
    );
    for (index, metrics) in shards {
        let shard = index.to_string();
        let pairs = [("shard", shard.as_str())];
        set(&held, &pairs, metrics.replica_sessions);
        set(&unacknowledged, &pairs, metrics.replication_unacknowledged);
        add(&refused, &pairs, metrics.replicas_refused);
        add(&promoted, &pairs, metrics.replicas_promoted);
        add(&fenced, &pairs, metrics.sessions_fenced);
        add(&dropped, &pairs, metrics.replication_dropped);
    }
}

fn admission_metrics(
    registry: &mut Registry,
    admission: &AdmissionSnapshot,
    shards: &[(u16, ShardMetrics)],
) {
    let accepted = counters(
        registry,
        "connections_accepted",
        "Client connections the listeners admitted",
    );
    add(&accepted, &[], admission.admitted);
    let refused = counters(
        registry,
        "connections_refused",
        "Client connections closed at once, by reason: address_connections and \
         address_rate (per source address limits), node_rate (the node's accept rate), \
         shard_limit (a shard at connections_per_shard_max)",
    );
    let shard_limit: u64 = shards
        .iter()
        .map(|(_, metrics)| metrics.stats.connections_refused_shard_limit)
        .sum();
    for (reason, count) in [
        ("address_connections", admission.refused_address_connections),
        ("address_rate", admission.refused_address_rate),
        ("node_rate", admission.refused_node_rate),
        ("shard_limit", shard_limit),
    ] {
        add(&refused, &[("reason", reason)], count);
    }
}

fn cluster_metrics(registry: &mut Registry, status: &Value) {
    let number = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
    let members = gauges(
        registry,
        "cluster_members",
        "Cluster members as this node sees them, by state (self, up, down)",
    );
    let mut by_state: std::collections::BTreeMap<String, u64> = ["self", "up", "down"]
        .iter()
        .map(|state| (state.to_string(), 0))
        .collect();
    for member in status
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(state) = member.get("state").and_then(Value::as_str) {
            *by_state.entry(state.to_string()).or_default() += 1;
        }
    }
    for (state, count) in &by_state {
        set(&members, &[("state", state)], *count);
    }
    if let Some(count) = number(status, "route_count") {
        let routes = gauges(
            registry,
            "cluster_routes",
            "Routes of the whole cluster this node knows",
        );
        set(&routes, &[], count);
    }
    let followers: Vec<&Value> = status
        .get("followers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if !followers.is_empty() {
        let entries = gauges(
            registry,
            "route_replication_lag_entries",
            "Route log entries a follower (an edge of this core) has not applied",
        );
        let lag_ms = gauges(
            registry,
            "route_replication_lag_milliseconds",
            "Age of the oldest route log entry a follower has not applied",
        );
        for follower in followers {
            let Some(node) = number(follower, "node") else {
                continue;
            };
            let node = node.to_string();
            let pairs = [("follower", node.as_str())];
            set(
                &entries,
                &pairs,
                number(follower, "behind_entries").unwrap_or(0),
            );
            set(&lag_ms, &pairs, number(follower, "lag_ms").unwrap_or(0));
        }
    }
    if let Some(raft) = status.get("raft").filter(|raft| !raft.is_null()) {
        for (name, key, help) in [
            (
                "raft_term",
                "term",
                "The cores' Raft term as this core sees it",
            ),
            (
                "raft_commit_index",
                "commit",
                "The last Raft log index this core knows committed",
            ),
            (
                "raft_applied_index",
                "applied",
                "The last Raft log index this core applied",
            ),
            (
                "raft_leader",
                "leader",
                "Node id of the Raft leader this core knows (absent when none)",
            ),
        ] {
            if let Some(value) = number(raft, key) {
                let gauge = gauges(registry, name, help);
                set(&gauge, &[], value);
            }
        }
        let is_leader = gauges(registry, "raft_is_leader", "1 when this core leads");
        let leads = raft.get("state").and_then(Value::as_str) == Some("leader");
        set(&is_leader, &[], u64::from(leads));
    }
}
