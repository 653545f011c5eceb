//! The admin API's view of the cluster: what one node answers about itself (a [`NodeQuery`]),
//! and the endpoints that put the answers of every node together.
//!
//! Owns: [`NodeQuery`], the questions one node answers about itself (the same JSON whether
//! asked by this node's endpoint or by another node's, relayed over a cluster link);
//! [`answer`], which answers one for this node; [`gather`], which asks every node of the
//! cluster; and the endpoints built on them (`GET /api/v1/nodes`).
//! Never: touches a shard's state. The shards are asked through their mailboxes, as for
//! `GET /metrics`.
//! Invariants: a query is hostile (it may come from another node): it is parsed strictly
//! (unknown queries and fields are refused).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::admin::{ASK_TIMEOUT, AppState, Control, ask, error_response, shard_metrics};

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

/// Answers `query` for this node.
pub async fn answer(state: &AppState, query: &NodeQuery) -> Result<Value, String> {
    match query {
        NodeQuery::Summary => summary(state).await,
        NodeQuery::Clients { .. }
        | NodeQuery::Client { .. }
        | NodeQuery::Kick { .. }
        | NodeQuery::Subscriptions { .. } => inspect::answer(state, query).await,
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

/// Asks `query` of every node of the cluster. Today only this node answers: the relay to
/// the other nodes over the cluster links is not built yet.
pub async fn gather(state: &AppState, query: &NodeQuery) -> Vec<NodeAnswer> {
    let answer = match tokio::time::timeout(GATHER_TIMEOUT, answer(state, query)).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {GATHER_TIMEOUT:?}")),
    };
    let node = answer
        .as_ref()
        .ok()
        .and_then(|value| value["node"].as_u64());
    vec![(node, answer)]
}

/// `GET /api/v1/nodes`: every node's summary; a node that did not answer is listed with its
/// error.
pub async fn nodes(State(state): State<AppState>) -> Response {
    let answers = gather(&state, &NodeQuery::Summary).await;
    if let [(_, Err(message))] = answers.as_slice()
        && !state.settings.clustered
    {
        return error_response((axum::http::StatusCode::SERVICE_UNAVAILABLE, message.clone()));
    }
    let nodes: Vec<Value> = answers
        .into_iter()
        .map(|(node, answer)| match answer {
            Ok(summary) => summary,
            Err(error) => json!({ "node": node, "error": error }),
        })
        .collect();
    Json(json!({ "nodes": nodes })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_tagged_json_and_unknown_fields_are_refused() {
        let text = serde_json::to_string(&NodeQuery::Summary).unwrap();
        assert_eq!(text, r#"{"query":"summary"}"#);
        assert_eq!(
            serde_json::from_str::<NodeQuery>(&text).unwrap(),
            NodeQuery::Summary
        );
        assert!(serde_json::from_str::<NodeQuery>(r#"{"query":"summary","x":1}"#).is_err());
        assert!(serde_json::from_str::<NodeQuery>(r#"{"query":"drop_tables"}"#).is_err());
    }
}
