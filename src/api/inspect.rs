//! The admin API's inspection and control of clients, subscriptions, routes and retained
//! messages: what one node answers (its shards asked at once, against one deadline, and
//! merged) and the endpoints built on it.
//!
//! Owns: `GET /api/v1/clients`, `GET|DELETE /api/v1/clients/{client_id}`,
//! `GET /api/v1/subscriptions` (asked of every node through [`gather`]), and
//! `GET /api/v1/routes`, `GET /api/v1/retained`, `GET|DELETE /api/v1/retained/{topic}`
//! (answered by this node alone: its route table is the cluster's as this node sees it, and
//! every shard of every node holds the whole retained set).
//! Never: answers more than [`LIST_LIMIT_MAX`] entries, or more than
//! `inspect::PAYLOAD_BYTES_MAX` payload bytes, so that an answer fits a relay frame.
//! Invariants: query parameters are parsed strictly (an unknown or repeated one, or a bad
//! limit, is a 400), and a node's answer is checked for shape where it is merged.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use shardmq_shards::shard::inspect::{
    ClientDetail, ClientFilter, ClientInfo, Listing, Query, Reply, RetainedInfo, SubscriptionInfo,
};
use tokio::sync::oneshot;

use super::{INSPECT_ASK_TIMEOUT, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, NodeQuery, gather};
use crate::admin::{AppState, Control, NodeMessage, error_response};

/// Asks `query` of each of `shards` at once and waits for all against one deadline; a shard
/// that does not answer in time fails the whole answer (a listing without it would be wrong).
async fn ask_shards(
    state: &AppState,
    shards: std::ops::Range<u16>,
    query: &Query,
) -> Result<Vec<Reply>, String> {
    let receivers: Vec<_> = shards
        .map(|shard| {
            let (sender, receiver) = oneshot::channel();
            state.mailboxes.post(
                shard,
                NodeMessage::Control(Control::Inspect(query.clone(), sender)),
            );
            (shard, receiver)
        })
        .collect();
    let deadline = tokio::time::Instant::now() + INSPECT_ASK_TIMEOUT;
    let mut replies = Vec::with_capacity(receivers.len());
    for (shard, receiver) in receivers {
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(Ok(reply))) => replies.push(reply),
            Ok(Ok(Err(message))) => return Err(format!("shard {shard}: {message}")),
            Ok(Err(_)) => return Err("the node is stopping".into()),
            Err(_) => {
                return Err(format!(
                    "shard {shard} did not answer within {INSPECT_ASK_TIMEOUT:?}"
                ));
            }
        }
    }
    Ok(replies)
}

fn every_shard(state: &AppState) -> std::ops::Range<u16> {
    0..state.health.progress().len() as u16
}

/// This node's identifier in its cluster (None alone).
async fn this_node(state: &AppState) -> Result<Option<u64>, String> {
    if !state.settings.clustered {
        return Ok(None);
    }
    let status = crate::admin::ask(&state.mailboxes, crate::admin::ASK_TIMEOUT, Control::Status)
        .await
        .map_err(|(_, message)| message)?;
    Ok(status["node"].as_u64())
}

fn clamp(limit: usize) -> usize {
    limit.min(LIST_LIMIT_MAX)
}

/// Answers one of the inspection queries of [`NodeQuery`] for this node; `asked_by` (the
/// node that asked, None for this node's own endpoint) goes with a kick into its log line.
pub(super) async fn answer(
    state: &AppState,
    query: &NodeQuery,
    asked_by: Option<u32>,
) -> Result<Value, String> {
    let node = this_node(state).await?;
    // The shards' clock now and the wall clock now: a shard's time + `offset` is wall time.
    let wall_at_zero_ms = wall_clock_ms().saturating_sub(state.health.shard_clock_ms());
    match query {
        NodeQuery::Clients {
            client_id_prefix,
            username,
            address,
            limit,
        } => {
            let limit = clamp(*limit);
            let query = Query::Clients {
                filter: ClientFilter {
                    client_id_prefix: client_id_prefix.clone(),
                    username: username.clone(),
                    address: address.clone(),
                },
                limit,
            };
            let replies = ask_shards(state, every_shard(state), &query).await?;
            let merged = merge_shards(
                replies,
                limit,
                |reply| match reply {
                    Reply::Clients(listing) => Some(listing),
                    _ => None,
                },
                |a, b| a.client_id.cmp(&b.client_id),
            );
            Ok(json!({
                "node": node,
                "clients": merged.entries.iter().map(|c| client_json(c, node, wall_at_zero_ms)).collect::<Vec<_>>(),
                "truncated": merged.truncated,
                "scan_limited": merged.scan_limited,
            }))
        }
        NodeQuery::Client { client_id } => {
            let query = Query::Client {
                client_id: client_id.clone(),
            };
            let found = ask_shards(state, every_shard(state), &query)
                .await?
                .into_iter()
                .find_map(|reply| match reply {
                    Reply::Client(detail) => detail,
                    _ => None,
                });
            Ok(json!({
                "node": node,
                "client": found.map(|detail| detail_json(&detail, node, wall_at_zero_ms)),
            }))
        }
        NodeQuery::Kick { client_id } => {
            let query = Query::Kick {
                client_id: client_id.clone(),
                asked_by,
            };
            let kicked = ask_shards(state, every_shard(state), &query)
                .await?
                .into_iter()
                .any(|reply| matches!(reply, Reply::Kicked(true)));
            Ok(json!({ "node": node, "kicked": kicked }))
        }
        NodeQuery::Subscriptions {
            client_id_prefix,
            filter_prefix,
            limit,
        } => {
            let limit = clamp(*limit);
            let query = Query::Subscriptions {
                client_id_prefix: client_id_prefix.clone(),
                filter_prefix: filter_prefix.clone(),
                limit,
            };
            let replies = ask_shards(state, every_shard(state), &query).await?;
            let merged = merge_shards(
                replies,
                limit,
                |reply| match reply {
                    Reply::Subscriptions(listing) => Some(listing),
                    _ => None,
                },
                |a, b| (&a.client_id, &a.filter).cmp(&(&b.client_id, &b.filter)),
            );
            Ok(json!({
                "node": node,
                "subscriptions": merged.entries.iter().map(|s| json!({
                    "client_id": s.client_id,
                    "node": node,
                    "filter": s.filter,
                    "qos": s.options.qos as u8,
                })).collect::<Vec<_>>(),
                "truncated": merged.truncated,
                "scan_limited": merged.scan_limited,
            }))
        }
        NodeQuery::Summary => Err("not an inspection".into()),
    }
}

/// The shards' lists of one listing in one: sorted by `order`, at most `limit`, truncated
/// when a shard's was or the merge is longer, scan-limited when a shard's was. Each shard
/// kept its smallest `limit`, so these are the first `limit` of what the shards examined.
fn merge_shards<T>(
    replies: Vec<Reply>,
    limit: usize,
    list: impl Fn(Reply) -> Option<Listing<T>>,
    order: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Listing<T> {
    let mut merged = Listing {
        entries: Vec::new(),
        truncated: false,
        scan_limited: false,
    };
    for listing in replies.into_iter().filter_map(list) {
        merged.entries.extend(listing.entries);
        merged.truncated |= listing.truncated;
        merged.scan_limited |= listing.scan_limited;
    }
    merged.entries.sort_by(order);
    merged.truncated |= merged.entries.len() > limit;
    merged.entries.truncate(limit);
    merged
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// `wall_at_zero_ms`: the wall clock at the shards' clock's zero.
fn client_json(client: &ClientInfo, node: Option<u64>, wall_at_zero_ms: u64) -> Value {
    json!({
        "client_id": client.client_id,
        "node": node,
        "username": client.username,
        "address": client.address.map(|a| a.to_string()),
        "listener": client.listener,
        "protocol": client.protocol,
        "connected_since_ms": wall_at_zero_ms.saturating_add(client.connected_at_ms),
        "keep_alive": client.keep_alive_seconds,
        "clean_start": client.clean_start,
        "session_expiry": client.session_expiry_seconds,
        "subscriptions": client.subscriptions,
        "queued": client.queued,
        "inflight": client.inflight,
    })
}

fn subscription_json(subscription: &SubscriptionInfo) -> Value {
    let options = &subscription.options;
    json!({
        "filter": subscription.filter,
        "qos": options.qos as u8,
        "no_local": options.no_local,
        "retain_as_published": options.retain_as_published,
        "retain_handling": options.retain_handling as u8,
    })
}

fn detail_json(detail: &ClientDetail, node: Option<u64>, wall_at_zero_ms: u64) -> Value {
    let mut value = client_json(&detail.client, node, wall_at_zero_ms);
    value["subscription_list"] = detail
        .subscriptions
        .iter()
        .map(subscription_json)
        .collect::<Vec<_>>()
        .into();
    value
}

fn bad_request(message: String) -> Response {
    error_response((StatusCode::BAD_REQUEST, message))
}

fn not_found(message: String) -> Response {
    error_response((StatusCode::NOT_FOUND, message))
}

/// The query string's parameters: each at most once, each one of `known`, with a `limit`
/// that is a number (clamped to [`LIST_LIMIT_MAX`]; [`LIST_LIMIT_DEFAULT`] when absent).
struct Params {
    values: BTreeMap<String, String>,
    limit: usize,
}

impl Params {
    fn parse(query: Option<&str>, known: &[&str]) -> Result<Self, String> {
        let mut values = BTreeMap::new();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if key != "limit" && !known.contains(&key.as_ref()) {
                return Err(format!(
                    "unknown query parameter {key:?}: this endpoint takes {}",
                    known
                        .iter()
                        .chain(&["limit"])
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if values.insert(key.to_string(), value.into_owned()).is_some() {
                return Err(format!("query parameter {key:?} given twice"));
            }
        }
        let limit = match values.remove("limit") {
            None => LIST_LIMIT_DEFAULT,
            Some(text) => match text.parse::<usize>() {
                Ok(0) | Err(_) => {
                    return Err(format!(
                        "limit {text:?}: a whole number from 1 (at most {LIST_LIMIT_MAX} are answered)"
                    ));
                }
                Ok(limit) => limit.min(LIST_LIMIT_MAX),
            },
        };
        Ok(Self { values, limit })
    }

    /// A given parameter; an empty value counts as not given.
    fn get(&self, key: &str) -> Option<String> {
        self.values.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

/// Merges the lists under `key` of every node's answer: sorted by `order`, at most `limit`,
/// truncated when any node's was or the merge is longer, scan-limited when any node's was;
/// a node that failed is listed in `errors`.
fn merge(
    answers: Vec<super::NodeAnswer>,
    key: &str,
    limit: usize,
    order: impl Fn(&Value) -> (String, String),
) -> Value {
    let mut entries = Vec::new();
    let mut truncated = false;
    let mut scan_limited = false;
    let mut errors = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(value) => match value[key].as_array() {
                Some(list) => {
                    entries.extend(list.iter().cloned());
                    truncated |= value["truncated"].as_bool().unwrap_or(false);
                    scan_limited |= value["scan_limited"].as_bool().unwrap_or(false);
                }
                None => errors
                    .push(json!({ "node": node, "error": format!("an answer without {key}") })),
            },
            Err(error) => errors.push(json!({ "node": node, "error": error })),
        }
    }
    entries.sort_by_cached_key(|entry| order(entry));
    truncated |= entries.len() > limit;
    entries.truncate(limit);
    json!({ key: entries, "truncated": truncated, "scan_limited": scan_limited, "errors": errors })
}

fn text_of(value: &Value, key: &str) -> String {
    value[key].as_str().unwrap_or_default().to_string()
}

/// `GET /api/v1/clients?client_id_prefix=&username=&address=&node=&limit=`.
pub async fn clients(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let params = match Params::parse(
        query.as_deref(),
        &["client_id_prefix", "username", "address", "node"],
    ) {
        Ok(params) => params,
        Err(message) => return bad_request(message),
    };
    let node = match params.get("node").map(|n| n.parse::<u64>()) {
        None => None,
        Some(Ok(node)) => Some(node),
        Some(Err(_)) => return bad_request("node: a node's number".into()),
    };
    let query = NodeQuery::Clients {
        client_id_prefix: params.get("client_id_prefix"),
        username: params.get("username"),
        address: params.get("address"),
        limit: params.limit,
    };
    let mut answers = gather(&state, &query).await;
    if let Some(wanted) = node {
        answers.retain(|(node, _)| *node == Some(wanted));
    }
    let merged = merge(answers, "clients", params.limit, |entry| {
        (text_of(entry, "client_id"), entry["node"].to_string())
    });
    Json(merged).into_response()
}

/// `GET /api/v1/subscriptions?client_id_prefix=&filter_prefix=&limit=`.
pub async fn subscriptions(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let params = match Params::parse(query.as_deref(), &["client_id_prefix", "filter_prefix"]) {
        Ok(params) => params,
        Err(message) => return bad_request(message),
    };
    let query = NodeQuery::Subscriptions {
        client_id_prefix: params.get("client_id_prefix"),
        filter_prefix: params.get("filter_prefix"),
        limit: params.limit,
    };
    let answers = gather(&state, &query).await;
    let merged = merge(answers, "subscriptions", params.limit, |entry| {
        (
            text_of(entry, "client_id"),
            format!("{}\u{0}{}", text_of(entry, "filter"), entry["node"]),
        )
    });
    Json(merged).into_response()
}

/// The first node's non-null `key` among the answers, or the errors of those that failed.
fn first_found(answers: Vec<super::NodeAnswer>, key: &str) -> (Option<Value>, Vec<Value>) {
    let mut errors = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(value) if !value[key].is_null() && value[key] != Value::Bool(false) => {
                return (Some(value), errors);
            }
            Ok(_) => {}
            Err(error) => errors.push(json!({ "node": node, "error": error })),
        }
    }
    (None, errors)
}

fn missing(what: String, errors: Vec<Value>) -> Response {
    if errors.is_empty() {
        return not_found(what);
    }
    let body =
        json!({ "error": format!("{what} (and some nodes did not answer)"), "errors": errors });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// `GET /api/v1/clients/{client_id}`: the client and its subscriptions, from the node it is
/// connected to; 404 when no node has it connected.
pub async fn client(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    let answers = gather(
        &state,
        &NodeQuery::Client {
            client_id: client_id.clone(),
        },
    )
    .await;
    match first_found(answers, "client") {
        (Some(value), _) => Json(value["client"].clone()).into_response(),
        (None, errors) => missing(format!("client {client_id:?} is not connected"), errors),
    }
}

/// `DELETE /api/v1/clients/{client_id}`: ends the client's connection on the node it is
/// connected to (`{"kicked": true, "node": N}`); 404 when no node has it connected.
pub async fn kick(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    let answers = gather(
        &state,
        &NodeQuery::Kick {
            client_id: client_id.clone(),
        },
    )
    .await;
    match first_found(answers, "kicked") {
        (Some(value), _) => Json(json!({ "kicked": true, "node": value["node"] })).into_response(),
        (None, errors) => missing(format!("client {client_id:?} is not connected"), errors),
    }
}

/// Asks shard 0 of this node, which holds the route tables and the retained set whole.
async fn ask_shard_zero(state: &AppState, query: Query) -> Result<Reply, Response> {
    match ask_shards(state, 0..1, &query).await {
        Ok(mut replies) => replies.pop().ok_or_else(|| {
            error_response((StatusCode::SERVICE_UNAVAILABLE, "no shard answered".into()))
        }),
        Err(message) => Err(error_response((StatusCode::SERVICE_UNAVAILABLE, message))),
    }
}

fn unexpected() -> Response {
    error_response((
        StatusCode::INTERNAL_SERVER_ERROR,
        "the shard answered another question".into(),
    ))
}

/// `GET /api/v1/routes?filter_prefix=&limit=`: this node's route table (its own shards'
/// filters and, in a cluster, the other nodes' as this node knows them).
pub async fn routes(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let params = match Params::parse(query.as_deref(), &["filter_prefix"]) {
        Ok(params) => params,
        Err(message) => return bad_request(message),
    };
    let node = match this_node(&state).await {
        Ok(node) => node,
        Err(message) => return error_response((StatusCode::SERVICE_UNAVAILABLE, message)),
    };
    let query = Query::Routes {
        filter_prefix: params.get("filter_prefix"),
        limit: params.limit,
    };
    match ask_shard_zero(&state, query).await {
        Ok(Reply::Routes { routes, truncated }) => Json(json!({
            "routes": routes.iter().map(|route| json!({
                "filter": route.filter,
                // A node alone is node 0 in its shards' tables; it has no number here.
                "nodes": match node {
                    Some(_) => json!(route.nodes),
                    None => json!([null]),
                },
            })).collect::<Vec<_>>(),
            "truncated": truncated,
        }))
        .into_response(),
        Ok(_) => unexpected(),
        Err(response) => response,
    }
}

fn retained_json(info: &RetainedInfo) -> Value {
    json!({ "topic": info.topic, "qos": info.qos as u8, "bytes": info.payload_bytes })
}

/// `GET /api/v1/retained?topic_prefix=&filter=&limit=`: retained messages by topic prefix,
/// or matching an MQTT topic filter.
pub async fn retained(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let params = match Params::parse(query.as_deref(), &["topic_prefix", "filter"]) {
        Ok(params) => params,
        Err(message) => return bad_request(message),
    };
    let filter = params.get("filter");
    if let Some(filter) = &filter
        && let Err(error) = shardmq_net::mqtt::topic::validate_filter(filter)
    {
        return bad_request(format!("filter {filter:?}: {error}"));
    }
    if filter.is_some() && params.get("topic_prefix").is_some() {
        return bad_request("give topic_prefix or filter, not both".into());
    }
    let query = Query::Retained {
        topic_prefix: params.get("topic_prefix"),
        filter,
        limit: params.limit,
    };
    match ask_shard_zero(&state, query).await {
        Ok(Reply::Retained(listing)) => Json(json!({
            "retained": listing.entries.iter().map(retained_json).collect::<Vec<_>>(),
            "truncated": listing.truncated,
            "scan_limited": listing.scan_limited,
        }))
        .into_response(),
        Ok(_) => unexpected(),
        Err(response) => response,
    }
}

/// `GET /api/v1/retained/{topic}`: one retained message with its payload (at most 64 KiB of
/// it: `payload_truncated` says when there was more), as base64 and as text when UTF-8.
pub async fn retained_get(State(state): State<AppState>, Path(topic): Path<String>) -> Response {
    match ask_shard_zero(
        &state,
        Query::RetainedGet {
            topic: topic.clone(),
        },
    )
    .await
    {
        Ok(Reply::RetainedMessage(Some(message))) => {
            let mut value = retained_json(&message.info);
            value["payload_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&message.payload)
                .into();
            value["payload_text"] = std::str::from_utf8(&message.payload)
                .ok()
                .map_or(Value::Null, Value::from);
            value["payload_truncated"] = message.payload_truncated.into();
            Json(value).into_response()
        }
        Ok(Reply::RetainedMessage(None)) => {
            not_found(format!("no retained message for topic {topic:?}"))
        }
        Ok(_) => unexpected(),
        Err(response) => response,
    }
}

/// `DELETE /api/v1/retained/{topic}`: clears the topic's retained message on every shard
/// of this node and sends the clearing to the other members, as a client's empty retained
/// PUBLISH does; 404 when this node holds none for the topic.
pub async fn retained_delete(State(state): State<AppState>, Path(topic): Path<String>) -> Response {
    match ask_shard_zero(
        &state,
        Query::RetainedDelete {
            topic: topic.clone(),
        },
    )
    .await
    {
        Ok(Reply::RetainedDeleted(true)) => Json(json!({ "deleted": true })).into_response(),
        Ok(Reply::RetainedDeleted(false)) => {
            not_found(format!("no retained message for topic {topic:?}"))
        }
        Ok(_) => unexpected(),
        Err(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_strict_and_the_limit_is_clamped() {
        let params = Params::parse(
            Some("client_id_prefix=a%2Fb&limit=5000"),
            &["client_id_prefix"],
        )
        .unwrap();
        assert_eq!(params.get("client_id_prefix").as_deref(), Some("a/b"));
        assert_eq!(params.limit, LIST_LIMIT_MAX);
        assert_eq!(Params::parse(None, &[]).unwrap().limit, LIST_LIMIT_DEFAULT);
        assert!(Params::parse(Some("x=1"), &["client_id_prefix"]).is_err());
        assert!(Params::parse(Some("limit=0"), &[]).is_err());
        assert!(Params::parse(Some("limit=-1"), &[]).is_err());
        assert!(Params::parse(Some("limit=1&limit=2"), &[]).is_err());
    }

    #[test]
    fn merged_lists_are_sorted_bounded_and_name_the_nodes_that_failed() {
        let answers = vec![
            (
                Some(1),
                Ok(
                    json!({ "clients": [{ "client_id": "b" }, { "client_id": "d" }], "truncated": false }),
                ),
            ),
            (
                Some(2),
                Ok(json!({ "clients": [{ "client_id": "a" }], "truncated": false })),
            ),
            (Some(3), Err("no answer".to_string())),
        ];
        let merged = merge(answers, "clients", 2, |entry| {
            (text_of(entry, "client_id"), String::new())
        });
        let ids: Vec<&str> = merged["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["client_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(merged["truncated"], true);
        assert_eq!(merged["errors"][0]["node"], 3);
    }

    #[test]
    fn inspection_queries_are_strict_json() {
        let query = NodeQuery::Kick {
            client_id: "c".into(),
        };
        let text = serde_json::to_string(&query).unwrap();
        assert_eq!(text, r#"{"query":"kick","client_id":"c"}"#);
        assert_eq!(serde_json::from_str::<NodeQuery>(&text).unwrap(), query);
        assert!(
            serde_json::from_str::<NodeQuery>(r#"{"query":"kick","client_id":"c","all":true}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<NodeQuery>(r#"{"query":"clients"}"#).is_err(),
            "a limit is explicit"
        );
    }
}
