//! The admin API's view of the cluster: what one node answers about itself (a [`NodeQuery`]),
//! and the endpoints that put the answers of every node together.
//!
//! Owns: [`NodeQuery`], the questions one node answers about itself (the same JSON whether
//! asked by this node's endpoint or by another node's, relayed over a cluster link);
//! [`answer`], which answers one for this node; [`ask_node`] and [`gather`], which ask one
//! node or every node of the cluster (shard 0 relays the JSON of a query over the control
//! link to a node, and its answer back); [`answer_peers`], which answers the other nodes'
//! questions; and the endpoints built on them (`GET /api/v1/nodes`, `GET /api/v1/nodes/{node}`).
//! Never: touches a shard's state. The shards are asked through their mailboxes, as for
//! `GET /metrics`.
//! Invariants: a query is hostile (it may come from another node): it is parsed strictly
//! (unknown queries and fields are refused).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::admin::{
    ASK_TIMEOUT, AppState, Control, NodeMessage, ask, error_response, shard_metrics,
};

mod inspect;
pub use inspect::{
    client, clients, kick, retained, retained_delete, retained_get, routes, subscriptions,
};

/// How long [`gather`] waits for the nodes' answers.
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(5);

/// A question one node answers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeQuery {
    /// The node's role, version, uptime, connection and session counts, message counters
    /// and rates.
    // Strict like the struct variants: serde lets a unit variant of an internally tagged
    // enum ignore extra fields once the enum has struct variants.
    #[serde(deserialize_with = "no_fields")]
    Summary,
    /// The node's connected clients matching every given filter, at most `limit`
    /// (clamped to [`LIST_LIMIT_MAX`]).
    Clients {
        client_id_prefix: Option<String>,
        username: Option<String>,
        address: Option<String>,
        limit: usize,
    },
    /// One connected client and its subscriptions (`null` when it is not connected here).
    Client { client_id: String },
    /// End the client's connection if it is connected here.
    Kick { client_id: String },
    /// The subscriptions of the node's sessions, at most `limit`.
    Subscriptions {
        client_id_prefix: Option<String>,
        filter_prefix: Option<String>,
        limit: usize,
    },
}

impl NodeQuery {
    /// The key of the list in this query's answer, for the queries that answer a listing
    /// (cut to fit a relay frame rather than refused).
    fn list_key(&self) -> Option<&'static str> {
        match self {
            Self::Clients { .. } => Some("clients"),
            Self::Subscriptions { .. } => Some("subscriptions"),
            Self::Summary | Self::Client { .. } | Self::Kick { .. } => None,
        }
    }
}

/// A query that takes no fields has none.
fn no_fields<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    Empty::deserialize(deserializer).map(|_| ())
}

/// The most entries one listing answers (per node, and after merging).
pub const LIST_LIMIT_MAX: usize = 1000;

/// The entries a listing answers when it does not say.
pub const LIST_LIMIT_DEFAULT: usize = 100;

/// How long an inspection waits for the shards it asks (all at once).
const INSPECT_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The message counters of this node at one moment, to compute rates from.
#[derive(Debug, Clone, Copy)]
pub struct RateSample {
    at: tokio::time::Instant,
    received: u64,
    sent: u64,
    received_per_second: f64,
    sent_per_second: f64,
}

/// The shortest interval a rate is computed over; a sooner question gets the last rate.
const RATE_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// Answers `query` for this node; `asked_by` is the node that asked over a control link
/// (None for this node's own endpoint), for the audit log of what the query changes.
pub async fn answer(
    state: &AppState,
    query: &NodeQuery,
    asked_by: Option<u32>,
) -> Result<Value, String> {
    match query {
        NodeQuery::Summary => summary(state).await,
        NodeQuery::Clients { .. }
        | NodeQuery::Client { .. }
        | NodeQuery::Kick { .. }
        | NodeQuery::Subscriptions { .. } => inspect::answer(state, query, asked_by).await,
    }
}

async fn summary(state: &AppState) -> Result<Value, String> {
    let (shards, missing) = shard_metrics(state).await;
    if missing > 0 {
        return Err(format!("{missing} shards did not answer in time"));
    }
    let sum = |f: &dyn Fn(&shardmq_shards::shard::ShardMetrics) -> u64| {
        shards.iter().map(|(_, m)| f(m)).sum::<u64>()
    };
    let received = sum(&|m| m.stats.publishes_received.iter().sum());
    let sent = sum(&|m| m.stats.publishes_sent.iter().sum());
    let (received_per_second, sent_per_second) = rates(state, received, sent).await;
    let status = if state.settings.clustered {
        Some(
            ask(&state.mailboxes, ASK_TIMEOUT, Control::Status)
                .await
                .map_err(|(_, message)| message)?,
        )
    } else {
        None
    };
    let (node, role) = match &status {
        Some(status) => (status["node"].clone(), status["role"].clone()),
        None => (Value::Null, Value::from("standalone")),
    };
    Ok(json!({
        "node": node,
        "role": role,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "shards": shards.len(),
        "connections": sum(&|m| m.connections),
        "sessions_online": sum(&|m| m.sessions_online),
        "sessions_offline": sum(&|m| m.sessions_offline),
        "subscriptions": sum(&|m| m.subscriptions),
        "retained_messages": shards.first().map_or(0, |(_, m)| m.retained_messages),
        "messages_received": received,
        "messages_sent": sent,
        "bytes_received": sum(&|m| m.stats.publish_bytes_received),
        "bytes_sent": sum(&|m| m.stats.publish_bytes_sent),
        "messages_received_per_second": received_per_second,
        "messages_sent_per_second": sent_per_second,
    }))
}

/// Messages received and sent per second over the interval since the last sample at least
/// [`RATE_INTERVAL_MIN`] old (0 at the first question).
async fn rates(state: &AppState, received: u64, sent: u64) -> (f64, f64) {
    let now = tokio::time::Instant::now();
    let mut last = state.rates.lock().await;
    let sample = match *last {
        Some(last) if now.duration_since(last.at) < RATE_INTERVAL_MIN => return rates_of(&last),
        Some(last) => {
            let seconds = now.duration_since(last.at).as_secs_f64();
            RateSample {
                at: now,
                received,
                sent,
                received_per_second: received.saturating_sub(last.received) as f64 / seconds,
                sent_per_second: sent.saturating_sub(last.sent) as f64 / seconds,
            }
        }
        None => RateSample {
            at: now,
            received,
            sent,
            received_per_second: 0.0,
            sent_per_second: 0.0,
        },
    };
    *last = Some(sample);
    rates_of(&sample)
}

fn rates_of(sample: &RateSample) -> (f64, f64) {
    (sample.received_per_second, sample.sent_per_second)
}

/// One node's answer to a gathered query: the node (None when not clustered) and its answer
/// or why there is none.
pub type NodeAnswer = (Option<u64>, Result<Value, String>);

/// One member's answer to a gathered query, with its state in the cluster status as this
/// node sees it ("self", "up" or "down"; None when not clustered).
#[derive(Debug)]
pub struct MemberAnswer {
    pub node: Option<u64>,
    pub state: Option<String>,
    pub answer: Result<Value, String>,
}

/// How long this node takes to answer another node's question: less than the asker waits
/// ([`GATHER_TIMEOUT`]), so that a slow answer arrives as an error rather than not at all.
const PEER_ANSWER_TIMEOUT: Duration = Duration::from_secs(4);

/// A question another node asked this one over a control link, handed over by shard 0
/// (unparsed: it is parsed here, strictly).
#[derive(Debug)]
pub struct PeerQuery {
    /// The link it came by (shard 0's connection), where its answer goes.
    pub connection: u64,
    /// The node that asked.
    pub node: u32,
    /// The asker's id of the question, returned with the answer.
    pub id: u64,
    pub query: Vec<u8>,
}

/// Questions that shard 0 may hand the admin thread before it answers a new one with an error
/// at once (the per-link cap, `QUERIES_PER_LINK_MAX`, bounds what one peer asks).
pub const PEER_QUERIES_QUEUED_MAX: usize = 64;

/// Answers the other nodes' questions as shard 0 hands them over, each in a task of its own
/// (at most `PEER_QUERIES_QUEUED_MAX` waiting, and what the per-link caps let in), posting
/// every answer back to shard 0.
pub async fn answer_peers(state: AppState, mut queries: tokio::sync::mpsc::Receiver<PeerQuery>) {
    while let Some(query) = queries.recv().await {
        let state = state.clone();
        tokio::spawn(async move {
            let answer = answer_peer(&state, query.node, &query.query).await;
            if let Err(error) = &answer {
                tracing::debug!(node = query.node, id = query.id, %error, "an admin query from a node answered with an error");
            }
            state.mailboxes.post(
                0,
                NodeMessage::Control(Control::AnswerNode {
                    connection: query.connection,
                    id: query.id,
                    answer,
                }),
            );
        });
    }
}

/// This node's answer to a question another node sent as JSON: parsed strictly (what does
/// not parse as a [`NodeQuery`] is answered with an error), answered within
/// [`PEER_ANSWER_TIMEOUT`]. `node` is the node that asked.
pub async fn answer_peer(state: &AppState, node: u32, query: &[u8]) -> Result<Vec<u8>, String> {
    let query = parse_query(query)?;
    let answered = answer(state, &query, Some(node));
    let value = match tokio::time::timeout(PEER_ANSWER_TIMEOUT, answered).await {
        Ok(answer) => answer?,
        Err(_) => return Err(format!("no answer within {PEER_ANSWER_TIMEOUT:?}")),
    };
    let bytes = to_json(&value)?;
    let len_max = state.settings.relay_answer_len_max;
    match query.list_key() {
        Some(key) if bytes.len() > len_max => cut_to_fit(value, key, len_max),
        // Too long an answer of another kind goes as "too large; ask for fewer".
        _ => Ok(bytes),
    }
}

fn to_json(value: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("the answer does not serialize: {e}"))
}

/// A listing's answer cut to its first entries that fit `len_max` bytes of JSON, with
/// `truncated` set, so that the asker still sees this node's first entries. Exact: the
/// length of each entry and comma is added to that of the answer with no entries.
fn cut_to_fit(mut value: Value, key: &str, len_max: usize) -> Result<Vec<u8>, String> {
    let Some(object) = value.as_object_mut() else {
        return Err("a listing's answer that is not an object".into());
    };
    let entries = match object.get_mut(key).map(Value::take) {
        Some(Value::Array(entries)) => entries,
        _ => return Err(format!("a listing's answer without {key}")),
    };
    object.insert(key.into(), Value::Array(Vec::new()));
    object.insert("truncated".into(), Value::Bool(true));
    let mut len = to_json(&value)?.len();
    if len > len_max {
        return Err(format!(
            "too large: this node's listing does not fit a relay frame ({len_max} bytes) even empty"
        ));
    }
    let total = entries.len();
    let mut kept = Vec::new();
    for entry in entries {
        let entry_len = to_json(&entry)?.len() + usize::from(!kept.is_empty());
        if len.saturating_add(entry_len) > len_max {
            break;
        }
        len += entry_len;
        kept.push(entry);
    }
    if kept.len() == total {
        // All fit only because `true` is shorter than the `false` the answer had: one entry
        // goes, so that `truncated` is true.
        kept.pop();
    }
    let kept_count = kept.len();
    if let Some(object) = value.as_object_mut() {
        object.insert(key.into(), Value::Array(kept));
    }
    let bytes = to_json(&value)?;
    tracing::debug!(
        key,
        kept = kept_count,
        len = bytes.len(),
        len_max,
        "a listing cut to fit a relay frame"
    );
    Ok(bytes)
}

/// Parses a query another node sent: what is not a [`NodeQuery`] (an unknown query, an
/// unknown or missing field, bytes that are not JSON) is refused with the reason.
pub fn parse_query(bytes: &[u8]) -> Result<NodeQuery, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("not a query this node answers: {e}"))
}

/// This node's answer to its own endpoint's `query` by `deadline`.
async fn answer_by(
    state: &AppState,
    query: &NodeQuery,
    deadline: tokio::time::Instant,
) -> Result<Value, String> {
    match tokio::time::timeout_at(deadline, answer(state, query, None)).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {GATHER_TIMEOUT:?}")),
    }
}

/// Asks `query` of node `node` through shard 0, over the control link to it, by `deadline`.
async fn relay(
    state: &AppState,
    node: u32,
    query: &NodeQuery,
    deadline: tokio::time::Instant,
) -> Result<Value, String> {
    let query =
        serde_json::to_vec(query).map_err(|e| format!("the query does not serialize: {e}"))?;
    let (reply, receiver) = tokio::sync::oneshot::channel();
    state.mailboxes.post(
        0,
        NodeMessage::Control(Control::AskNode { node, query, reply }),
    );
    match tokio::time::timeout_at(deadline, receiver).await {
        Ok(Ok(Ok(bytes))) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("node {node} answered with what is not JSON: {e}")),
        Ok(Ok(Err(message))) => Err(message),
        Ok(Err(_)) => Err("the node is stopping".into()),
        Err(_) => Err(format!("no answer within {GATHER_TIMEOUT:?}")),
    }
}

/// Asks `query` of one node of the cluster: this node answers itself, another is asked over
/// the control link to it (see [`gather`] for which nodes a node reaches), within
/// [`GATHER_TIMEOUT`].
pub async fn ask_node(state: &AppState, node: u32, query: &NodeQuery) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + GATHER_TIMEOUT;
    if !state.settings.clustered {
        return Err("this node is not in a cluster (no [cluster] configured)".into());
    }
    let status = ask(&state.mailboxes, GATHER_TIMEOUT, Control::Status)
        .await
        .map_err(|(_, message)| message)?;
    if status["node"].as_u64() == Some(u64::from(node)) {
        answer_by(state, query, deadline).await
    } else {
        relay(state, node, query, deadline).await
    }
}

/// Asks `query` of every node of the cluster (each member of this node's cluster status)
/// concurrently, against one deadline ([`GATHER_TIMEOUT`]): this node answers itself, a
/// member shown down is answered "down" without being asked, every other one is asked over
/// the control link to it. A core has a control link to every node; an edge only to the
/// cores, so the other edges are listed with "no control link to node N".
pub async fn gather(state: &AppState, query: &NodeQuery) -> Vec<NodeAnswer> {
    gather_members(state, query)
        .await
        .into_iter()
        .map(|member| (member.node, member.answer))
        .collect()
}

/// [`gather`], with each member's state.
pub async fn gather_members(state: &AppState, query: &NodeQuery) -> Vec<MemberAnswer> {
    let deadline = tokio::time::Instant::now() + GATHER_TIMEOUT;
    if !state.settings.clustered {
        let answer = answer_by(state, query, deadline).await;
        let node = answer
            .as_ref()
            .ok()
            .and_then(|value| value["node"].as_u64());
        return vec![MemberAnswer {
            node,
            state: None,
            answer,
        }];
    }
    let status = match ask(&state.mailboxes, GATHER_TIMEOUT, Control::Status).await {
        Ok(status) => status,
        Err((_, message)) => {
            return vec![MemberAnswer {
                node: None,
                state: None,
                answer: Err(message),
            }];
        }
    };
    let members: Vec<(u64, String)> = status["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| Some((m["node"].as_u64()?, m["state"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut asks = tokio::task::JoinSet::new();
    for (index, (node, member_state)) in members.iter().cloned().enumerate() {
        let state = state.clone();
        let query = query.clone();
        asks.spawn(async move {
            let answer = match (member_state.as_str(), u32::try_from(node)) {
                ("self", _) => answer_by(&state, &query, deadline).await,
                ("down", _) => Err("down".to_string()),
                (_, Ok(node)) => relay(&state, node, &query, deadline).await,
                (_, Err(_)) => Err(format!("node {node} is not a node identifier")),
            };
            (index, answer)
        });
    }
    let mut answers: Vec<Option<Result<Value, String>>> = members.iter().map(|_| None).collect();
    while let Some(joined) = asks.join_next().await {
        if let Ok((index, answer)) = joined
            && let Some(slot) = answers.get_mut(index)
        {
            *slot = Some(answer);
        }
    }
    members
        .into_iter()
        .zip(answers)
        .map(|((node, member_state), answer)| MemberAnswer {
            node: Some(node),
            state: Some(member_state),
            answer: answer.unwrap_or_else(|| Err("the question was lost".into())),
        })
        .collect()
}

/// `GET /api/v1/nodes`: every node's summary, each with its state in the cluster status; a
/// node that did not answer is listed with its error.
pub async fn nodes(State(state): State<AppState>) -> Response {
    let answers = gather_members(&state, &NodeQuery::Summary).await;
    if let [
        MemberAnswer {
            answer: Err(message),
            ..
        },
    ] = answers.as_slice()
        && !state.settings.clustered
    {
        return error_response((axum::http::StatusCode::SERVICE_UNAVAILABLE, message.clone()));
    }
    let nodes: Vec<Value> = answers
        .into_iter()
        .map(|member| match member.answer {
            Ok(mut summary) => {
                if let (Some(object), Some(member_state)) = (summary.as_object_mut(), member.state)
                {
                    object.insert("state".into(), Value::from(member_state));
                }
                summary
            }
            Err(error) => json!({ "node": member.node, "state": member.state, "error": error }),
        })
        .collect();
    Json(json!({ "nodes": nodes })).into_response()
}

/// `GET /api/v1/nodes/{node}`: one node's summary, asked of it wherever it is
/// ([`ask_node`]); 502 with the reason when it does not answer.
pub async fn node(
    State(state): State<AppState>,
    node: Result<Path<u32>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(node)) = node else {
        return error_response((
            axum::http::StatusCode::BAD_REQUEST,
            "a node identifier is a number (cluster.node_id)".into(),
        ));
    };
    match ask_node(&state, node, &NodeQuery::Summary).await {
        Ok(summary) => Json(summary).into_response(),
        Err(error) => error_response((axum::http::StatusCode::BAD_GATEWAY, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_tagged_json_and_unknown_fields_are_refused() {
        let text = serde_json::to_string(&NodeQuery::Summary).unwrap();
        assert_eq!(text, r#"{"query":"summary"}"#);
        assert_eq!(parse_query(text.as_bytes()).unwrap(), NodeQuery::Summary);
        assert!(parse_query(br#"{"query":"summary","x":1}"#).is_err());
        assert!(parse_query(br#"{"query":"drop_tables"}"#).is_err());
        assert!(parse_query(br#"{"x":1}"#).is_err());
        assert!(parse_query(b"[]").is_err());
        assert!(parse_query(&[0xFF; 9]).is_err());
        assert!(
            parse_query(&[b'['; 10_000]).is_err(),
            "deep nesting is refused"
        );
    }

    #[test]
    fn a_listing_too_long_for_a_frame_is_cut_to_its_first_entries_and_truncated() {
        let clients: Vec<Value> = (0..100)
            .map(|i| json!({ "client_id": format!("client-{i:03}"), "node": 2 }))
            .collect();
        let value =
            json!({ "node": 2, "clients": clients, "truncated": false, "scan_limited": false });
        let whole = to_json(&value).unwrap().len();
        for len_max in [whole - 1, whole - 2, whole / 2, 200, 61] {
            let bytes = cut_to_fit(value.clone(), "clients", len_max).unwrap();
            assert!(bytes.len() <= len_max, "{} > {len_max}", bytes.len());
            let cut: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(cut["truncated"], true);
            assert_eq!(cut["scan_limited"], false);
            assert_eq!(cut["node"], 2);
            let kept = cut["clients"].as_array().unwrap();
            assert_eq!(kept.as_slice(), &clients[..kept.len()], "the first entries");
            if kept.len() == clients.len() - 1 {
                // One short of all: the `truncated` that the cut sets costs what it saves.
                continue;
            }
            // One more would not have fitted.
            let mut more = cut.clone();
            more["clients"] = clients[..kept.len() + 1].to_vec().into();
            assert!(to_json(&more).unwrap().len() > len_max, "{len_max}");
        }
        assert!(cut_to_fit(value, "clients", 60).is_err(), "not even empty");
        assert!(cut_to_fit(json!([1]), "clients", 100).is_err());
        assert!(cut_to_fit(json!({ "clients": 1 }), "clients", 100).is_err());
        assert_eq!(NodeQuery::Summary.list_key(), None);
    }
}
