//! What the admin API asks of one shard about its clients, subscriptions, routes and
//! retained messages, and the two changes it may make: kick a client, delete a retained
//! message.
//!
//! Owns: [`Query`] and [`Reply`], the shard's side of `cluster::Request::Inspect`: plain
//! values read off the shard's state when an operator asks (no counters, no atomics).
//! Never: examines more than [`SCAN_BUDGET`] entries for a listing of clients, subscriptions
//! or retained messages (the reply then says `scan_limited`), or keeps more than `limit` of
//! them: each listing keeps the smallest `limit` by key of those it examined. A walk in key
//! order (retained) stops one past the limit; routes sort the trie's edges, never the
//! sessions. Nothing here runs on the message path.
//! Invariants: a reply holds at most `limit` entries (the caller clamps the limit), and a
//! payload at most [`PAYLOAD_BYTES_MAX`] bytes; a kick ends a connection the way any
//! server-side close does (the will is published, the session kept or ended by its expiry),
//! and a deletion travels as a client's empty retained PUBLISH does (`route`).

use std::net::SocketAddr;

use bytes::Bytes;
use bytestring::ByteString;
use shardmq_net::mqtt::{ProtocolVersion, QoS, ReasonCode, SubscriptionOptions, topic};
use tracing::info;

use super::{Shard, Target};
use crate::message::{Message, NodeId};

/// The most payload bytes a retained message's answer carries; the rest is cut off (and the
/// answer says so), so that an answer fits a cluster relay frame.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// Which connected clients a listing is about; every given part must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFilter {
    pub client_id_prefix: Option<String>,
    /// The username, exactly.
    pub username: Option<String>,
    /// The peer's IP address (`10.0.0.7`, `::1`), or a prefix of its `ip:port` text.
    pub address: Option<String>,
}

/// A question to one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Connected clients matching the filter, at most `limit`.
    Clients {
        filter: ClientFilter,
        limit: usize,
    },
    /// One connected client and its subscriptions.
    Client {
        client_id: String,
    },
    /// End the client's connection (DISCONNECT 0x98 for 5.0, a close for 3.x).
    Kick {
        client_id: String,
        /// The node whose operator asked, through its API; None for this node's own.
        asked_by: Option<NodeId>,
    },
    /// Subscriptions of every session here (connected or not), at most `limit`.
    Subscriptions {
        client_id_prefix: Option<String>,
        filter_prefix: Option<String>,
        limit: usize,
    },
    /// The node and cluster route table (this shard's copy), at most `limit` filters.
    Routes {
        filter_prefix: Option<String>,
        limit: usize,
    },
    /// Retained messages by topic prefix, or matching an MQTT topic filter, at most `limit`.
    /// Topics starting with `$` only for a prefix (or a filter's first level) that does.
    Retained {
        topic_prefix: Option<String>,
        filter: Option<String>,
        limit: usize,
    },
    RetainedGet {
        topic: String,
    },
    /// Clear the topic's retained message everywhere (as an empty retained PUBLISH does).
    RetainedDelete {
        topic: String,
    },
}

/// One connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub address: Option<SocketAddr>,
    /// The index of the listener that accepted it.
    pub listener: u16,
    pub protocol: &'static str,
    /// When its CONNECT was accepted, on the shard's clock (the caller makes wall time of
    /// it: the shard's own `now` lags while it is idle).
    pub connected_at_ms: u64,
    pub keep_alive_seconds: u64,
    pub clean_start: bool,
    /// `u32::MAX`: the session never expires.
    pub session_expiry_seconds: u32,
    pub subscriptions: usize,
    pub queued: usize,
    pub inflight: usize,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub client_id: String,
    /// With its `$share/{group}/` prefix for a shared subscription.
    pub filter: String,
    pub options: SubscriptionOptions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDetail {
    pub client: ClientInfo,
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// A filter of the route tables and the nodes that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// With its `$share/{group}/` prefix for a shared subscription's route.
    pub filter: String,
    pub nodes: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedInfo {
    pub topic: String,
    pub qos: QoS,
    pub payload_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    pub info: RetainedInfo,
    /// At most [`PAYLOAD_BYTES_MAX`] bytes of the payload.
    pub payload: Bytes,
    pub payload_truncated: bool,
}

/// A shard's answer to a [`Query`], variant for variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// By client identifier.
    Clients(Listing<ClientInfo>),
    Client(Option<Box<ClientDetail>>),
    /// Whether the client was connected here.
    Kicked(bool),
    /// By client identifier, then filter.
    Subscriptions(Listing<SubscriptionInfo>),
    Routes {
        routes: Vec<RouteInfo>,
        truncated: bool,
    },
    /// By topic.
    Retained(Listing<RetainedInfo>),
    RetainedMessage(Option<Box<RetainedMessage>>),
    /// Whether the topic had a retained message here.
    RetainedDeleted(bool),
}

/// The protocol's name as operators know it.
pub fn protocol_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

/// The most entries (session slots, subscriptions, retained messages) one listing examines
/// on one shard: a filter that matches nothing stops here rather than walking everything the
/// shard holds, and the reply says `scan_limited`.
pub const SCAN_BUDGET: usize = 100_000;

/// A listing's answer from one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing<T> {
    /// At most `limit`, sorted by key: the smallest of those examined.
    pub entries: Vec<T>,
    /// More matched than `limit`, or the scan stopped at its budget.
    pub truncated: bool,
    /// The scan stopped at its budget: entries past it were not examined.
    pub scan_limited: bool,
}

/// An entry with the key it is ordered by.
struct Keyed<K, T>(K, T);

impl<K: Ord, T> PartialEq for Keyed<K, T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<K: Ord, T> Eq for Keyed<K, T> {}
impl<K: Ord, T> PartialOrd for Keyed<K, T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord, T> Ord for Keyed<K, T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// Keeps the `limit` smallest entries by key of a scan of at most `budget` entries: a
/// max-heap of `limit`, so memory is bounded by the limit and the kept entries are the first
/// in key order of those examined, whatever order the scan runs in.
struct Scan<K, T> {
    kept: std::collections::BinaryHeap<Keyed<K, T>>,
    limit: usize,
    budget: usize,
    matched: usize,
    scan_limited: bool,
}

impl<K: Ord, T> Scan<K, T> {
    fn new(limit: usize, budget: usize) -> Self {
        Self {
            kept: std::collections::BinaryHeap::with_capacity(limit.min(1024)),
            limit,
            budget,
            matched: 0,
            scan_limited: false,
        }
    }

    /// Counts one examined entry; false (and `scan_limited`) once the budget is spent.
    fn examine(&mut self) -> bool {
        match self.budget.checked_sub(1) {
            Some(left) => {
                self.budget = left;
                true
            }
            None => {
                self.scan_limited = true;
                false
            }
        }
    }

    /// Whether an entry of `key` would be kept (so that only those are built).
    fn wants(&self, key: &K) -> bool {
        self.kept.len() < self.limit || self.kept.peek().is_some_and(|largest| *key < largest.0)
    }

    /// Counts a match, keeping it (built by `make`) if it is among the smallest so far.
    fn offer(&mut self, key: K, make: impl FnOnce() -> Option<T>) {
        self.matched = self.matched.saturating_add(1);
        if !self.wants(&key) {
            return;
        }
        let Some(value) = make() else {
            return;
        };
        self.kept.push(Keyed(key, value));
        if self.kept.len() > self.limit {
            self.kept.pop();
        }
    }

    /// Whether a scan in key order can stop: one past the limit matched.
    fn full(&self) -> bool {
        self.matched > self.limit
    }

    fn finish(self) -> Listing<T> {
        Listing {
            entries: self
                .kept
                .into_sorted_vec()
                .into_iter()
                .map(|keyed| keyed.1)
                .collect(),
            truncated: self.matched > self.limit || self.scan_limited,
            scan_limited: self.scan_limited,
        }
    }
}

fn address_matches(peer: Option<SocketAddr>, wanted: &str) -> bool {
    let Some(peer) = peer else {
        return false;
    };
    match wanted.parse::<std::net::IpAddr>() {
        Ok(ip) => peer.ip() == ip,
        Err(_) => peer.to_string().starts_with(wanted),
    }
}

impl Shard {
    /// Answers an operator's question; a kick or a deletion changes the state as it says.
    /// A listing examines at most [`SCAN_BUDGET`] entries.
    pub fn inspect(&mut self, query: Query) -> Reply {
        self.inspect_within(query, SCAN_BUDGET)
    }

    /// [`Shard::inspect`] with a listing's scan budget of `budget` (at most [`SCAN_BUDGET`]):
    /// tests use a small one.
    pub(crate) fn inspect_within(&mut self, query: Query, budget: usize) -> Reply {
        let budget = budget.min(SCAN_BUDGET);
        match query {
            Query::Clients { filter, limit } => {
                let mut scan = Scan::new(limit, budget);
                for (index, session) in self.sessions.iter().enumerate() {
                    if !scan.examine() {
                        break;
                    }
                    let Some(session) = session else { continue };
                    let index = index as super::SessionIndex;
                    if session.connection.is_some() && self.client_matches(index, &filter) {
                        scan.offer(session.client_id.to_string(), || self.client_info(index));
                    }
                }
                Reply::Clients(scan.finish())
            }
            Query::Client { client_id } => Reply::Client(
                self.connected_session(&client_id)
                    .and_then(|index| self.client_detail(index))
                    .map(Box::new),
            ),
            Query::Kick {
                client_id,
                asked_by,
            } => Reply::Kicked(self.kick(&client_id, asked_by)),
            Query::Subscriptions {
                client_id_prefix,
                filter_prefix,
                limit,
            } => {
                let client_id_prefix = client_id_prefix.unwrap_or_default();
                let filter_prefix = filter_prefix.unwrap_or_default();
                let mut scan = Scan::new(limit, budget);
                'sessions: for session in &self.sessions {
                    if !scan.examine() {
                        break;
                    }
                    let Some(session) = session else { continue };
                    if !session.client_id.starts_with(&client_id_prefix) {
                        continue;
                    }
                    for (filter, (options, _)) in &session.subscriptions {
                        if !scan.examine() {
                            break 'sessions;
                        }
                        if !filter.starts_with(&filter_prefix) {
                            continue;
                        }
                        let key = (session.client_id.to_string(), filter.to_string());
                        scan.offer(key, || {
                            Some(SubscriptionInfo {
                                client_id: session.client_id.to_string(),
                                filter: filter.to_string(),
                                options: *options,
                            })
                        });
                    }
                }
                Reply::Subscriptions(scan.finish())
            }
            Query::Routes {
                filter_prefix,
                limit,
            } => {
                let (routes, truncated) =
                    self.route_list(&filter_prefix.unwrap_or_default(), limit);
                Reply::Routes { routes, truncated }
            }
            Query::Retained {
                topic_prefix,
                filter,
                limit,
            } => {
                let now_ms = self.now_ms;
                // A filter's messages lie in the range of its levels before the first
                // wildcard; a prefix's in its own. Both walks run in topic order, so one
                // past the limit ends them, and every message walked counts to the budget.
                // (Without its last `/`: `a/#` matches `a` too.)
                let range = match &filter {
                    Some(filter) => filter.find(['+', '#']).map(|wildcard| {
                        let before = filter.get(..wildcard).unwrap_or("");
                        before.strip_suffix('/').unwrap_or(before)
                    }),
                    None => Some(topic_prefix.as_deref().unwrap_or("")),
                };
                let walked: Box<dyn Iterator<Item = &Message>> = match (range, &filter) {
                    (Some(range), _) => Box::new(self.retained.with_prefix(range)),
                    // A filter without wildcards is one topic.
                    (None, Some(filter)) => Box::new(self.retained.get(filter).into_iter()),
                    (None, None) => Box::new(std::iter::empty()),
                };
                let wanted = |message: &Message| {
                    !message.is_expired(now_ms)
                        && match &filter {
                            Some(filter) => topic::matches(filter, &message.topic),
                            // `$` topics (the broker's `$SYS`) only when the prefix asks for
                            // them, as a wildcard matches them only when its first level does.
                            None => {
                                range.is_some_and(|range| range.starts_with('$'))
                                    || !message.topic.starts_with('$')
                            }
                        }
                };
                let mut scan = Scan::new(limit, budget);
                for message in walked {
                    if scan.full() || !scan.examine() {
                        break;
                    }
                    if !wanted(message) {
                        continue;
                    }
                    scan.offer(message.topic.to_string(), || {
                        Some(RetainedInfo {
                            topic: message.topic.to_string(),
                            qos: message.qos,
                            payload_bytes: message.payload.len(),
                        })
                    });
                }
                Reply::Retained(scan.finish())
            }
            Query::RetainedGet { topic } => {
                let now_ms = self.now_ms;
                Reply::RetainedMessage(
                    self.retained
                        .get(&topic)
                        .filter(|message| !message.is_expired(now_ms))
                        .map(|message| {
                            let kept = message.payload.len().min(PAYLOAD_BYTES_MAX);
                            Box::new(RetainedMessage {
                                info: RetainedInfo {
                                    topic: message.topic.to_string(),
                                    qos: message.qos,
                                    payload_bytes: message.payload.len(),
                                },
                                payload: message.payload.slice(..kept),
                                payload_truncated: kept < message.payload.len(),
                            })
                        }),
                )
            }
            Query::RetainedDelete { topic } => Reply::RetainedDeleted(self.delete_retained(&topic)),
        }
    }

    fn connected_session(&self, client_id: &str) -> Option<super::SessionIndex> {
        let index = *self.client_ids.get(client_id)?;
        self.session(index).connection.is_some().then_some(index)
    }

    fn client_matches(&self, index: super::SessionIndex, filter: &ClientFilter) -> bool {
        let session = self.session(index);
        let Some(connection) = session
            .connection
            .and_then(|connection| self.connections.get(&connection))
        else {
            return false;
        };
        let username = connection
            .principal
            .as_deref()
            .and_then(|principal| principal.username.as_deref());
        filter
            .client_id_prefix
            .as_deref()
            .is_none_or(|prefix| session.client_id.starts_with(prefix))
            && filter
                .username
                .as_deref()
                .is_none_or(|wanted| username == Some(wanted))
            && filter
                .address
                .as_deref()
                .is_none_or(|wanted| address_matches(connection.transport.peer, wanted))
    }

    fn client_info(&self, index: super::SessionIndex) -> Option<ClientInfo> {
        let session = self.session(index);
        let connection = self.connections.get(&session.connection?)?;
        Some(ClientInfo {
            client_id: session.client_id.to_string(),
            username: connection
                .principal
                .as_deref()
                .and_then(|principal| principal.username.as_deref())
                .map(str::to_string),
            address: connection.transport.peer,
            listener: connection.transport.listener,
            protocol: protocol_name(session.version),
            connected_at_ms: connection.connected_at_ms,
            keep_alive_seconds: connection.keep_alive_ms / 1000,
            clean_start: connection.clean_start,
            session_expiry_seconds: session.expiry_seconds,
            subscriptions: session.subscriptions.len(),
            queued: session.queue.len(),
            inflight: session.inflight.len(),
        })
    }

    fn client_detail(&self, index: super::SessionIndex) -> Option<ClientDetail> {
        let client = self.client_info(index)?;
        let session = self.session(index);
        let subscriptions = session
            .subscriptions
            .iter()
            .map(|(filter, (options, _))| SubscriptionInfo {
                client_id: session.client_id.to_string(),
                filter: filter.to_string(),
                options: *options,
            })
            .collect();
        Some(ClientDetail {
            client,
            subscriptions,
        })
    }

    /// Ends the client's connection as any server-side close does: 5.0 clients get
    /// DISCONNECT 0x98 (Administrative action), the will is published (the client did not
    /// send DISCONNECT), and the session stays or ends by its expiry. Whether it was here.
    /// Logged with the node that asked (`asked_by`: its number, or `this node`).
    fn kick(&mut self, client_id: &str, asked_by: Option<NodeId>) -> bool {
        let Some(index) = self.connected_session(client_id) else {
            return false;
        };
        let Some(connection) = self.session(index).connection else {
            return false;
        };
        match asked_by {
            Some(node) => client_log!(
                INFO,
                self.who(connection),
                asked_by = node,
                "client kicked by the admin API"
            ),
            None => client_log!(
                INFO,
                self.who(connection),
                asked_by = "this node",
                "client kicked by the admin API"
            ),
        }
        self.disconnect(
            connection,
            ReasonCode::ADMINISTRATIVE_ACTION,
            "kicked by the admin API",
            true,
        );
        true
    }

    /// Clears the topic's retained message the way a client's empty retained PUBLISH does:
    /// through `route`, which clears it on every shard of this node and forwards it to every
    /// other member (and delivers the empty message to current subscribers, as for a
    /// client's). Whether this shard held one.
    fn delete_retained(&mut self, topic: &str) -> bool {
        if self.retained.get(topic).is_none() {
            return false;
        }
        let message = Message {
            topic: ByteString::from(topic),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at_ms: None,
            publisher: None,
        };
        info!(topic = %crate::limits::quote(topic), "retained message deleted by the admin API");
        self.publish(message);
        true
    }

    /// The plain routes (node table: a shard of this node; cluster table: another node) and
    /// the shared ones, each filter with the nodes that hold it, sorted by filter. Past the
    /// limit, which plain filters are kept follows the trie's level order.
    fn route_list(&self, prefix: &str, limit: usize) -> (Vec<RouteInfo>, bool) {
        let node = self.config.node;
        let node_of = |target: &Target| match *target {
            Target::Shard(_) => node,
            Target::Node(other) => other,
        };
        let mut routes: Vec<RouteInfo> = Vec::new();
        let wanted = limit.saturating_add(1);
        self.routes.for_each_filter(prefix, |filter, targets| {
            let mut nodes: Vec<NodeId> = targets.iter().map(node_of).collect();
            nodes.sort_unstable();
            nodes.dedup();
            routes.push(RouteInfo {
                filter: filter.to_string(),
                nodes,
            });
            routes.len() < wanted
        });
        // Shared routes carry their group and filter: no walk needed, but they are merged
        // by `$share/{group}/{filter}` before the limit applies.
        let mut shared: std::collections::BTreeMap<String, Vec<NodeId>> = Default::default();
        for route in self.shared_routes.values() {
            let filter = format!("$share/{}/{}", route.group, route.filter);
            if !filter.starts_with(prefix) {
                continue;
            }
            let nodes = shared.entry(filter).or_default();
            let at = node_of(&route.target);
            if !nodes.contains(&at) {
                nodes.push(at);
            }
            if shared.len() > wanted {
                shared.pop_last();
            }
        }
        routes.extend(shared.into_iter().map(|(filter, mut nodes)| {
            nodes.sort_unstable();
            RouteInfo { filter, nodes }
        }));
        routes.sort_by(|a, b| a.filter.cmp(&b.filter));
        let truncated = routes.len() > limit;
        routes.truncate(limit);
        (routes, truncated)
    }
}
