//! What the admin API asks of one shard about its clients, subscriptions, routes and
//! retained messages, and the two changes it may make: kick a client, delete a retained
//! message.
//!
//! Owns: [`Query`] and [`Reply`], the shard's side of `cluster::Request::Inspect`: plain
//! values read off the shard's state when an operator asks (no counters, no atomics).
//! Never: walks more than it answers: a listing stops once it found one more entry than its
//! limit (that one only says the answer is truncated), and a walk that must sort (routes)
//! sorts the trie's edges, never the sessions. Nothing here runs on the message path.
//! Invariants: a reply holds at most `limit` entries (the caller clamps the limit), and a
//! payload at most [`PAYLOAD_BYTES_MAX`] bytes; a kick ends a connection the way any
//! server-side close does (the will is published, the session kept or ended by its expiry),
//! and a deletion travels as a client's empty retained PUBLISH does (`route`).

use std::net::SocketAddr;

use bytes::Bytes;
use bytestring::ByteString;
use shardmq_net::mqtt::{ProtocolVersion, QoS, ReasonCode, SubscriptionOptions};
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
    Clients {
        clients: Vec<ClientInfo>,
        truncated: bool,
    },
    Client(Option<Box<ClientDetail>>),
    /// Whether the client was connected here.
    Kicked(bool),
    Subscriptions {
        subscriptions: Vec<SubscriptionInfo>,
        truncated: bool,
    },
    Routes {
        routes: Vec<RouteInfo>,
        truncated: bool,
    },
    Retained {
        retained: Vec<RetainedInfo>,
        truncated: bool,
    },
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

/// Keeps at most `limit` of what `entries` yields, and says whether there was more: it takes
/// one past the limit, never the rest.
fn bounded<T>(entries: impl Iterator<Item = T>, limit: usize) -> (Vec<T>, bool) {
    let mut kept: Vec<T> = entries.take(limit.saturating_add(1)).collect();
    let truncated = kept.len() > limit;
    kept.truncate(limit);
    (kept, truncated)
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
    pub fn inspect(&mut self, query: Query) -> Reply {
        match query {
            Query::Clients { filter, limit } => {
                let (clients, truncated) = bounded(
                    self.client_slots()
                        .filter(|&index| self.client_matches(index, &filter))
                        .filter_map(|index| self.client_info(index)),
                    limit,
                );
                Reply::Clients { clients, truncated }
            }
            Query::Client { client_id } => Reply::Client(
                self.connected_session(&client_id)
                    .and_then(|index| self.client_detail(index))
                    .map(Box::new),
            ),
            Query::Kick { client_id } => Reply::Kicked(self.kick(&client_id)),
            Query::Subscriptions {
                client_id_prefix,
                filter_prefix,
                limit,
            } => {
                let client_id_prefix = client_id_prefix.unwrap_or_default();
                let filter_prefix = filter_prefix.unwrap_or_default();
                let (subscriptions, truncated) = bounded(
                    self.sessions
                        .iter()
                        .flatten()
                        .filter(|session| session.client_id.starts_with(&client_id_prefix))
                        .flat_map(|session| {
                            session
                                .subscriptions
                                .iter()
                                .filter(|(filter, _)| filter.starts_with(&filter_prefix))
                                .map(|(filter, (options, _))| SubscriptionInfo {
                                    client_id: session.client_id.to_string(),
                                    filter: filter.to_string(),
                                    options: *options,
                                })
                        }),
                    limit,
                );
                Reply::Subscriptions {
                    subscriptions,
                    truncated,
                }
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
                let info = |message: &Message| RetainedInfo {
                    topic: message.topic.to_string(),
                    qos: message.qos,
                    payload_bytes: message.payload.len(),
                };
                let (retained, truncated) = match &filter {
                    Some(filter) => {
                        bounded(self.retained.matching(filter, now_ms).map(info), limit)
                    }
                    None => {
                        let prefix = topic_prefix.as_deref().unwrap_or("");
                        // `$` topics (the broker's `$SYS`) only when the prefix asks for
                        // them, as a wildcard matches them only when its first level does.
                        let dollar = prefix.starts_with('$');
                        bounded(
                            self.retained
                                .with_prefix(prefix)
                                .filter(|message| dollar || !message.topic.starts_with('$'))
                                .filter(|message| !message.is_expired(now_ms))
                                .map(info),
                            limit,
                        )
                    }
                };
                Reply::Retained {
                    retained,
                    truncated,
                }
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

    /// The slots of sessions with a connection, in slot order.
    fn client_slots(&self) -> impl Iterator<Item = super::SessionIndex> + '_ {
        self.sessions
            .iter()
            .enumerate()
            .filter(|(_, session)| session.as_ref().is_some_and(|s| s.connection.is_some()))
            .map(|(index, _)| index as super::SessionIndex)
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
    fn kick(&mut self, client_id: &str) -> bool {
        let Some(index) = self.connected_session(client_id) else {
            return false;
        };
        let Some(connection) = self.session(index).connection else {
            return false;
        };
        client_log!(INFO, self.who(connection), "client kicked by the admin API");
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
