//! The admin HTTP endpoint and `shardmq ctl`, its client.
//!
//! Owns: one thread outside the data-plane cores running a single-threaded tokio runtime with
//! axum (DESIGN §6): `GET /health`, `GET /api/v1/cluster/status`,
//! `POST /api/v1/cluster/join?address=ADDR`, `POST /api/v1/cluster/leave` and
//! `POST /api/v1/cluster/settings?key=K&value=V`.
//! Never: touches a shard's state. It asks shard 0 through its mailbox and waits for the
//! answer, so the data plane stays lock-free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use shardmq_net::frame::Role;
use shardmq_net::reactor::Mailboxes;
use shardmq_shards::cluster::Status;
use shardmq_shards::cluster::consensus::check_setting;
use tokio::sync::oneshot;
use tracing::info;

/// A request from the admin thread to shard 0.
#[derive(Debug)]
pub enum Control {
    Status(oneshot::Sender<Result<Value, String>>),
    Join(SocketAddr, oneshot::Sender<Result<(), String>>),
    Leave(oneshot::Sender<Result<(), String>>),
    Set(String, String, oneshot::Sender<Result<(), String>>),
}

/// What travels through the shards' mailboxes: shard traffic, or an admin request.
// Shard traffic is nearly all of it and is not boxed (an allocation per message would cost
// more than the size); admin requests are rare.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum NodeMessage {
    Shard(shardmq_shards::ShardMessage),
    Control(Control),
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Core => "core",
        Role::Edge => "edge",
    }
}

/// The status as JSON, for the API and `ctl cluster status`.
pub fn status_json(status: &Status) -> Value {
    json!({
        "node": status.node,
        "role": role_name(status.role),
        "route_count": status.route_count,
        "own_route_count": status.own_route_count,
        "members": status.members.iter().map(|m| json!({
            "node": m.member.node,
            "role": role_name(m.member.role),
            "cluster_address": m.member.cluster_address,
            "mqtt_address": m.member.mqtt_address,
            "state": m.state,
            "route_count": m.route_count,
        })).collect::<Vec<_>>(),
        "seeds": status.seeds.iter().map(|(address, state)| json!({
            "address": address.to_string(),
            "state": state,
        })).collect::<Vec<_>>(),
        "following": status.following.map(|(core, applied)| json!({
            "core": core,
            "applied": applied,
        })),
        "log": status.log.map(|(epoch, next)| json!({
            "epoch": format!("{epoch:016x}"),
            "entries": next - 1,
        })),
        "followers": status.followers.iter().map(|f| json!({
            "node": f.node,
            "applied": f.applied,
            "behind_entries": f.behind_entries,
            "lag_ms": f.lag_ms,
        })).collect::<Vec<_>>(),
        "raft": status.consensus.as_ref().map(|c| json!({
            "state": c.state,
            "leader": c.leader,
            "term": c.term,
            "commit": c.commit,
            "applied": c.applied,
            "voters": c.voters,
            "founders": c.founders,
            "id": format!("{:016x}", c.id),
        })),
        "settings": status.settings.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect::<serde_json::Map<String, Value>>(),
    })
}

type Shared = Arc<Mailboxes<NodeMessage>>;

async fn ask<T>(
    mailboxes: &Shared,
    request: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Control,
) -> Result<T, (StatusCode, String)> {
    let (sender, receiver) = oneshot::channel();
    mailboxes.post(0, NodeMessage::Control(request(sender)));
    match tokio::time::timeout(Duration::from_secs(5), receiver).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(message))) => Err((StatusCode::CONFLICT, message)),
        Ok(Err(_)) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is stopping".into(),
        )),
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            "shard 0 did not answer within 5 s".into(),
        )),
    }
}

fn error_response((status, message): (StatusCode, String)) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn status(State(mailboxes): State<Shared>) -> Response {
    match ask(&mailboxes, Control::Status).await {
        Ok(value) => Json(value).into_response(),
        Err(e) => error_response(e),
    }
}

#[derive(serde::Deserialize)]
struct JoinQuery {
    address: String,
}

async fn join(State(mailboxes): State<Shared>, Query(query): Query<JoinQuery>) -> Response {
    let address: SocketAddr = match query.address.parse() {
        Ok(address) => address,
        Err(e) => {
            return error_response((
                StatusCode::BAD_REQUEST,
                format!("address {:?}: {e}", query.address),
            ));
        }
    };
    match ask(&mailboxes, |reply| Control::Join(address, reply)).await {
        Ok(()) => Json(json!({ "joining": address.to_string() })).into_response(),
        Err(e) => error_response(e),
    }
}

#[derive(serde::Deserialize)]
struct SetQuery {
    key: String,
    value: String,
}

async fn set(State(mailboxes): State<Shared>, Query(query): Query<SetQuery>) -> Response {
    if let Err(message) = check_setting(&query.key, &query.value) {
        return error_response((StatusCode::BAD_REQUEST, message));
    }
    let SetQuery { key, value } = query;
    let (k, v) = (key.clone(), value.clone());
    match ask(&mailboxes, |reply| Control::Set(k, v, reply)).await {
        Ok(()) => Json(json!({ "proposed": { key: value } })).into_response(),
        Err(e) => error_response(e),
    }
}

async fn leave(State(mailboxes): State<Shared>) -> Response {
    match ask(&mailboxes, Control::Leave).await {
        Ok(()) => Json(json!({ "left": true })).into_response(),
        Err(e) => error_response(e),
    }
}

/// Binds the endpoint now (so that an address in use fails the start) and serves it on a
/// thread of its own.
pub fn start(address: SocketAddr, mailboxes: Shared) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| format!("cannot listen on {address} (admin.listen): {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("admin listener: {e}"))?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a bound listener");
                let app = Router::new()
                    .route("/health", get(|| async { "ok\n" }))
                    .route("/api/v1/cluster/status", get(status))
                    .route("/api/v1/cluster/join", post(join))
                    .route("/api/v1/cluster/leave", post(leave))
                    .route("/api/v1/cluster/settings", post(set))
                    .with_state(mailboxes);
                info!(%address, "admin endpoint serving");
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "admin endpoint stopped");
                }
            });
        })
        .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    Ok(())
}

/// `shardmq ctl`: one request to a node's admin endpoint; prints the JSON answer.
pub fn ctl(admin: &str, method: &str, path: &str) -> Result<String, String> {
    let url = format!("http://{admin}{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let response = match method {
        "POST" => agent.post(&url).send_empty(),
        _ => agent.get(&url).call(),
    };
    let mut response =
        response.map_err(|e| format!("cannot reach the admin endpoint at {admin}: {e}"))?;
    let status = response.status();
    let body: Value = response
        .body_mut()
        .read_json()
        .map_err(|e| format!("{url}: the answer is not JSON: {e}"))?;
    if status.is_success() {
        Ok(serde_json::to_string_pretty(&body).expect("JSON prints"))
    } else {
        Err(format!(
            "{}: {}",
            status,
            body.get("error").and_then(Value::as_str).unwrap_or("error")
        ))
    }
}
