//! The admin HTTP endpoint and `shardmq ctl`, its client.
//!
//! Owns: one thread outside the data-plane cores running a single-threaded tokio runtime with
//! axum on hyper (DESIGN §6). Health probes, open to anyone: `GET /health` (as live),
//! `GET /api/v1/health/live`, `GET /api/v1/health/ready`. Behind the bearer token:
//! `GET /api/v1/cluster/status`, `GET /api/v1/nodes` and `GET /api/v1/nodes/{node}`
//! (`api.rs`), the clients, subscriptions, routes and retained endpoints (`api/inspect.rs`,
//! with the state changes `DELETE /api/v1/clients/{id}` and `DELETE /api/v1/retained/{topic}`),
//! and the state changes `POST /api/v1/cluster/join`
//! (`{"address": ADDR}`), `POST /api/v1/cluster/leave` (`{}`),
//! `POST /api/v1/cluster/settings` (`{"key": K, "value": V}`), `POST /api/v1/tls/reload`
//! (`{}`: the TLS listeners' certificates and keys are read again; 422 with the reason, and
//! nothing changed, when one is bad) and `POST /api/v1/auth/reload` (`{}`: the `[auth]`
//! files likewise); the per-client traces `/api/v1/traces` (`trace_api.rs`).
//! Never: touches a shard's state. It asks shard 0 through its mailbox and waits for the
//! answer, so the data plane stays lock-free.
//! Invariants (every request is hostile until checked, in this order): a request other than
//! a health probe names this endpoint in its Host header (an IP address or `localhost` with
//! the admin port, or `admin.allowed_hosts`), else 421, so that a web page cannot reach it by
//! DNS rebinding; it carries the configured token (compared in constant time), else 401, and
//! with no token configured it is refused (403); a state change is a JSON body with
//! `Content-Type: application/json` and no query string (a form a browser can send across
//! sites without a preflight is refused: 415 or 400). Headers must arrive within
//! `admin.header_read_timeout_ms` (which also closes idle connections), a request is done
//! within `admin.request_timeout_ms`, a body is at most `admin.body_size_max` bytes, and at
//! most `admin.connections_max` connections are served at once.
//! The web dashboard's static files (`dashboard.rs`: `/` and its `/assets/...`, exactly those
//! paths) get the Host check but not the token: they hold nothing secret, and the page sends
//! the token with its API calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use shardmq_net::frame::Role;
use shardmq_net::reactor::Mailboxes;
use shardmq_shards::cluster::Status;
use shardmq_shards::cluster::consensus::check_setting;
use tokio::sync::oneshot;
use tracing::{info, warn};

use shardmq_net::reactor::admission::Admission;
use shardmq_shards::shard::ShardMetrics;

use crate::config::ADMIN_TOKEN_VARIABLE;
use crate::metrics;
use crate::supervise::Health;

/// A request from the admin thread to shard 0.
#[derive(Debug)]
pub enum Control {
    Status(oneshot::Sender<Result<Value, String>>),
    /// One shard's counters and gauges (posted to every shard for `GET /metrics`).
    Metrics(oneshot::Sender<Result<Box<ShardMetrics>, String>>),
    /// The node's `$SYS` values for shard 0 to publish (`sys.rs`); nobody waits for it.
    Sys(Vec<(String, String)>),
    Join(SocketAddr, oneshot::Sender<Result<(), String>>),
    Leave(oneshot::Sender<Result<(), String>>),
    Set(String, String, oneshot::Sender<Result<(), String>>),
    /// A question about one shard's clients, subscriptions, routes or retained messages, or a
    /// kick or retained deletion (`api.rs`; posted to the shards it concerns).
    Inspect(
        shardmq_shards::shard::inspect::Query,
        oneshot::Sender<Result<shardmq_shards::shard::inspect::Reply, String>>,
    ),
    /// Ask node `node` a `NodeQuery` (its JSON) over the cluster's control links (shard 0
    /// relays it, `api::ask_node`); the reply is the node's answer as JSON, or why there is
    /// none.
    AskNode {
        node: u32,
        query: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// The admin thread's answer to a peer's question (`api::PeerQuery`), for shard 0 to send
    /// back on the link it came by; nobody waits for it.
    AnswerNode {
        connection: u64,
        id: u64,
        answer: Result<Vec<u8>, String>,
    },
    /// The client identifiers to trace from now on, replacing the set before (posted to every
    /// shard by `trace.rs`).
    Trace(
        Vec<bytestring::ByteString>,
        oneshot::Sender<Result<(), String>>,
    ),
}

/// What travels through the shards' mailboxes: shard traffic, or an admin request.
// Shard traffic is nearly all of it and is not boxed (an allocation per message would cost
// more than the size); admin requests are rare.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum NodeMessage {
    Shard(shardmq_shards::ShardMessage),
    Control(Control),
    /// Reloaded listener configurations (TLS certificates and keys): new connections use
    /// them (`ingress::Reloader`).
    Stacks(Arc<crate::ingress::ListenerStacks>),
    /// A reloaded `[auth]` policy (`auth::Auth::reload`): new CONNECTs and every later check
    /// use it.
    Auth(Arc<shardmq_shards::auth::Policy>),
    /// The verifier pool's answer to a shard's `NodeOutput::Verify`.
    Verified {
        connection: u64,
        ticket: u64,
        verdict: shardmq_shards::auth::Verdict,
    },
    /// A client connection's ingress stack, handed over with the connection
    /// (`Actions::hand_off_carrying`, told as `Event::Adopted`); never posted on its own.
    Carried(Box<crate::ingress::Carried>),
    /// The seed resolver's answer to shard 0's `NodeOutput::Resolve` (`resolve::Resolver`).
    Resolved {
        index: usize,
        result: Result<Vec<std::net::SocketAddr>, String>,
    },
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
        "seed_names": status.seed_names.iter().map(|n| json!({
            "name": n.name,
            "addresses": n.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "error": n.error,
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
            "voter_ids": c.voter_ids.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(),
            "store_error": c.store_error,
        })),
        "settings": status.settings.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect::<serde_json::Map<String, Value>>(),
    })
}

pub(crate) type Shared = Arc<Mailboxes<NodeMessage>>;

/// How the endpoint is served and guarded (from `[admin]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: SocketAddr,
    /// The bearer token; None refuses every call but the health probes.
    pub token: Option<String>,
    pub allowed_hosts: Vec<String>,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub body_size_max: usize,
    pub connections_max: usize,
    /// The node is in a cluster: ready also asks that it be a member.
    pub clustered: bool,
    /// The most bytes of JSON this node's answer to another node's question may hold: what a
    /// relay frame takes (`cluster::answer_len_max` of `cluster.frame_size_max`). A listing
    /// is cut to it (`truncated`); a longer answer of another kind goes as an error.
    pub relay_answer_len_max: usize,
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) mailboxes: Shared,
    /// Reloads the TLS listeners' certificates and keys (`POST /api/v1/tls/reload`).
    pub(crate) reloader: Arc<crate::ingress::Reloader>,
    /// Reloads the `[auth]` files (`POST /api/v1/auth/reload`).
    pub(crate) auth: Arc<crate::auth::Auth>,
    pub(crate) health: Arc<Health>,
    /// The client listeners' admission table, for its counts in `GET /metrics`.
    pub(crate) admission: Arc<Admission>,
    /// When the admin endpoint started (the process's uptime, near enough).
    pub(crate) started: tokio::time::Instant,
    pub(crate) settings: Arc<Settings>,
    /// The last answer to "is the node a member?", and when it was had: readiness probes
    /// need no token, so a flood of them must not reach shard 0 more than once per
    /// [`MEMBERSHIP_ANSWER_TTL`] (the lock also makes concurrent probes share one question).
    pub(crate) membership: Arc<tokio::sync::Mutex<Option<MembershipAnswer>>>,
    /// The last message counters sampled for the rates in `GET /api/v1/nodes`.
    pub(crate) rates: Arc<tokio::sync::Mutex<Option<crate::api::RateSample>>>,
    /// This node's per-client traces (`trace.rs`).
    pub(crate) traces: Arc<crate::trace::Traces>,
}

/// When shard 0 said whether the node is a member, and what it said.
type MembershipAnswer = (tokio::time::Instant, Result<bool, String>);

/// How long a readiness probe's membership answer is reused.
const MEMBERSHIP_ANSWER_TTL: Duration = Duration::from_millis(500);

/// The longest request header section read, in bytes: admin requests are small.
const HEADER_SIZE_MAX: usize = 16 * 1024;

/// How long a readiness probe waits for shard 0 to say whether the node is a member.
const READY_ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an admin call waits for shard 0.
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn ask<T>(
    mailboxes: &Shared,
    timeout: Duration,
    request: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Control,
) -> Result<T, (StatusCode, String)> {
    let (sender, receiver) = oneshot::channel();
    mailboxes.post(0, NodeMessage::Control(request(sender)));
    match tokio::time::timeout(timeout, receiver).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(message))) => Err((StatusCode::CONFLICT, message)),
        Ok(Err(_)) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is stopping".into(),
        )),
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!("shard 0 did not answer within {timeout:?}"),
        )),
    }
}

pub(crate) fn error_response((status, message): (StatusCode, String)) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A JSON body that did not parse (or had another content type), as a JSON error.
pub(crate) fn rejection_response(rejection: JsonRejection) -> Response {
    error_response((rejection.status(), rejection.body_text()))
}

fn is_health_probe(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/api/v1/health/live" | "/api/v1/health/ready"
    )
}

/// Whether the Host header names this endpoint: an IP address or `localhost` with the admin
/// port (no web page can make a browser send those for its own origin), or a value of
/// `admin.allowed_hosts`. A name without a port stands for port 80.
fn host_allowed(host: &str, port: u16, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return true;
    }
    let (name, host_port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        (inside, port)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let port_matches = match host_port {
        None => port == 80,
        Some(text) => text.parse::<u16>() == Ok(port),
    };
    port_matches
        && (name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost"))
}

/// Compares a given token with the configured one in time that depends on the lengths only,
/// never on where they first differ.
fn token_matches(expected: &str, given: &str) -> bool {
    let (expected, given) = (expected.as_bytes(), given.as_bytes());
    let mut difference = u8::from(expected.len() != given.len());
    for (position, byte) in expected.iter().enumerate() {
        difference |= byte ^ given.get(position).copied().unwrap_or(!byte);
    }
    std::hint::black_box(difference) == 0
}

/// Why a request is refused for its Host header (421), if it is: the one check the
/// dashboard's static files get.
fn host_refusal(settings: &Settings, headers: &HeaderMap) -> Option<(StatusCode, String)> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, settings.address.port(), &settings.allowed_hosts) {
        return Some((
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "the Host header {host:?} does not name this endpoint: use its IP address or localhost with port {}, or list the name in admin.allowed_hosts",
                settings.address.port()
            ),
        ));
    }
    None
}

/// Why a request is refused before it reaches its handler, if it is.
fn refusal(
    settings: &Settings,
    method: &Method,
    query: bool,
    headers: &HeaderMap,
) -> Option<(StatusCode, String)> {
    if let Some(refused) = host_refusal(settings, headers) {
        return Some(refused);
    }
    let Some(token) = &settings.token else {
        return Some((
            StatusCode::FORBIDDEN,
            format!(
                "the admin API is off until a token is configured: set [admin] token_file (a file holding at least 16 characters) or the {ADMIN_TOKEN_VARIABLE} environment variable, then send it as `Authorization: Bearer TOKEN` (shardmq ctl reads the same places, or --token-file)"
            ),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.trim().split_once(' '))
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    if !token_matches(token, given.trim()) {
        return Some((
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: send `Authorization: Bearer TOKEN`".into(),
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        if query {
            return Some((
                StatusCode::BAD_REQUEST,
                "a state change takes its parameters in a JSON body, not in the query string"
                    .into(),
            ));
        }
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Some((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a state change must be a JSON body with `Content-Type: application/json`".into(),
            ));
        }
    }
    None
}

/// Runs every request but a health probe through [`refusal`] (the dashboard's static files
/// through the Host check only: they hold nothing secret, and the page sends the token with
/// its API calls), and every request within the request timeout.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let refused = if is_health_probe(path) {
        None
    } else if crate::dashboard::is_static(path) {
        host_refusal(&state.settings, request.headers())
    } else {
        refusal(
            &state.settings,
            request.method(),
            request.uri().query().is_some(),
            request.headers(),
        )
    };
    if let Some(refused) = refused {
        let unauthorized = refused.0 == StatusCode::UNAUTHORIZED;
        let mut response = error_response(refused);
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        return response;
    }
    match tokio::time::timeout(state.settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error_response((
            StatusCode::REQUEST_TIMEOUT,
            "the request was not done within admin.request_timeout_ms".into(),
        )),
    }
}

/// Live: every shard's loop has come round within `admin.stall_timeout_ms`.
fn live_answer(health: &Health) -> (bool, Value) {
    let progress = health.progress();
    let live = progress
        .iter()
        .all(|p| p.since_ms <= health.stall_timeout_ms);
    let body = json!({
        "live": live,
        "stall_timeout_ms": health.stall_timeout_ms,
        "shards": progress.iter().map(|p| json!({
            "shard": p.shard,
            "since_progress_ms": p.since_ms,
        })).collect::<Vec<_>>(),
    });
    (live, body)
}

fn health_status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn live(State(state): State<AppState>) -> Response {
    let (live, body) = live_answer(&state.health);
    (health_status(live), Json(body)).into_response()
}

/// `/health`, the first probe: plain text, as live.
async fn health_text(State(state): State<AppState>) -> Response {
    let (live, _) = live_answer(&state.health);
    (health_status(live), if live { "ok\n" } else { "stalled\n" }).into_response()
}

/// Ready: the listeners accept (every shard started, the node not stopping), every shard is
/// live, and a clustered node is a member: a core knows its Raft group's leader, an edge
/// follows a core.
async fn ready(State(state): State<AppState>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response()
    };
    if !state.health.serving() {
        return not_ready("the listeners are not accepting (starting or stopping)".into());
    }
    let stalled = state.health.stalled();
    if !stalled.is_empty() {
        return not_ready(format!("shards {stalled:?} are stalled"));
    }
    if state.settings.clustered {
        match membership(&state).await {
            Ok(true) => {}
            Ok(false) => return not_ready("not a member of the cluster yet".into()),
            Err(message) => return not_ready(message),
        }
    }
    Json(json!({ "ready": true })).into_response()
}

/// How long a scrape waits for each shard (they are asked at once).
pub(crate) const METRICS_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Every shard's counters and gauges, asked of all shards at once and awaited against one
/// deadline, and how many shards did not answer in time (left out, and logged).
pub(crate) async fn shard_metrics(state: &AppState) -> (Vec<(u16, ShardMetrics)>, u64) {
    let shard_count = state.health.progress().len() as u16;
    let receivers: Vec<_> = (0..shard_count)
        .map(|shard| {
            let (sender, receiver) = oneshot::channel();
            state
                .mailboxes
                .post(shard, NodeMessage::Control(Control::Metrics(sender)));
            (shard, receiver)
        })
        .collect();
    let deadline = tokio::time::Instant::now() + METRICS_ASK_TIMEOUT;
    let mut shards = Vec::with_capacity(receivers.len());
    let mut missing = 0;
    for (shard, receiver) in receivers {
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(Ok(metrics))) => shards.push((shard, *metrics)),
            Ok(Ok(Err(message))) => {
                warn!(shard, %message, "a shard's metrics are missing from this answer");
                missing += 1;
            }
            Ok(Err(_)) | Err(_) => {
                warn!(shard, "a shard did not answer its metrics in time");
                missing += 1;
            }
        }
    }
    (shards, missing)
}

/// `GET /metrics`: every shard's counters, the admission table's, shard 0's cluster status
/// when clustered, and the process's figures, in the Prometheus text format. A shard that
/// does not answer in time is left out and counted (`shardmq_scrape_shards_missing`).
async fn metrics_text(State(state): State<AppState>) -> Response {
    let (shards, missing) = shard_metrics(&state).await;
    let cluster = if state.settings.clustered {
        ask(&state.mailboxes, METRICS_ASK_TIMEOUT, Control::Status)
            .await
            .ok()
    } else {
        None
    };
    let scrape = metrics::Scrape {
        shards: &shards,
        shards_missing: missing,
        admission: state.admission.counters().snapshot(),
        cluster: cluster.as_ref(),
        process: metrics::Process::read(state.started.elapsed().as_secs()),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&scrape),
    )
        .into_response()
}

/// Whether the node is a member of its cluster (a core knows its Raft leader, an edge
/// follows a core), asked of shard 0 at most once per [`MEMBERSHIP_ANSWER_TTL`].
async fn membership(state: &AppState) -> Result<bool, String> {
    let mut last = state.membership.lock().await;
    if let Some((at, answer)) = last.as_ref()
        && at.elapsed() < MEMBERSHIP_ANSWER_TTL
    {
        return answer.clone();
    }
    let answer = match ask(&state.mailboxes, READY_ASK_TIMEOUT, Control::Status).await {
        Ok(status) => Ok(match status["role"].as_str() {
            Some("core") => status["raft"]["leader"].is_u64(),
            _ => status["following"].is_object(),
        }),
        Err((_, message)) => Err(message),
    };
    *last = Some((tokio::time::Instant::now(), answer.clone()));
    answer
}

/// `GET /api/v1/cluster/status`: shard 0's status, with every shard's cluster links and
/// forward queues (asked of all shards, as a scrape does).
async fn status(State(state): State<AppState>) -> Response {
    match ask(&state.mailboxes, ASK_TIMEOUT, Control::Status).await {
        Ok(mut value) => {
            let (shards, _) = shard_metrics(&state).await;
            if let Some(object) = value.as_object_mut() {
                let (links, queues) = links_json(&shards);
                object.insert("links".into(), links);
                object.insert("forward_queues".into(), queues);
                object.insert("sessions".into(), sessions_json(&shards));
            }
            Json(value).into_response()
        }
        Err(e) => error_response(e),
    }
}

/// The node's persistent sessions and session replicas, summed over its shards: `home`
/// (persistent sessions held here), `replica` (replicas of other nodes' sessions),
/// `replication_unacknowledged` (replication items the replicas have not acknowledged: 0
/// when they are up to date), and the refusals and installs since the start.
fn sessions_json(shards: &[(u16, ShardMetrics)]) -> Value {
    let sum = |f: &dyn Fn(&ShardMetrics) -> u64| shards.iter().map(|(_, m)| f(m)).sum::<u64>();
    json!({
        "home": sum(&|m| m.persistent_sessions),
        "replica": sum(&|m| m.replica_sessions),
        "replication_unacknowledged": sum(&|m| m.replication_unacknowledged),
        "replicas_refused": sum(&|m| m.replicas_refused),
        "replicas_promoted": sum(&|m| m.replicas_promoted),
        "sessions_fenced": sum(&|m| m.sessions_fenced),
        "replication_dropped": sum(&|m| m.replication_dropped),
    })
}

/// Every shard's cluster links and forward queues as JSON, in shard order.
fn links_json(shards: &[(u16, ShardMetrics)]) -> (Value, Value) {
    let links = shards
        .iter()
        .flat_map(|(shard, m)| {
            m.links.iter().map(move |l| {
                json!({
                    "shard": shard,
                    "peer": l.peer,
                    "purpose": l.purpose,
                    "up": l.up,
                    "frames_sent": l.frames_sent,
                    "frames_received": l.frames_received,
                    "bytes_sent": l.bytes_sent,
                    "bytes_received": l.bytes_received,
                })
            })
        })
        .collect();
    let queues = shards
        .iter()
        .flat_map(|(shard, m)| {
            m.forward_queues.iter().map(move |q| {
                json!({
                    "shard": shard,
                    "peer": q.peer,
                    "messages": q.messages,
                    "bytes": q.bytes,
                    "dropped": q.dropped,
                })
            })
        })
        .collect();
    (Value::Array(links), Value::Array(queues))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    address: String,
}

async fn join(
    State(state): State<AppState>,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return rejection_response(rejection),
    };
    let address: SocketAddr = match body.address.parse() {
        Ok(address) => address,
        Err(e) => {
            return error_response((
                StatusCode::BAD_REQUEST,
                format!("address {:?}: {e}", body.address),
            ));
        }
    };
    match ask(&state.mailboxes, ASK_TIMEOUT, |reply| {
        Control::Join(address, reply)
    })
    .await
    {
        Ok(()) => Json(json!({ "joining": address.to_string() })).into_response(),
        Err(e) => error_response(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    key: String,
    value: String,
}

async fn set(
    State(state): State<AppState>,
    body: Result<Json<SetBody>, JsonRejection>,
) -> Response {
    let Json(SetBody { key, value }) = match body {
        Ok(body) => body,
        Err(rejection) => return rejection_response(rejection),
    };
    if let Err(message) = check_setting(&key, &value) {
        return error_response((StatusCode::BAD_REQUEST, message));
    }
    let (k, v) = (key.clone(), value.clone());
    match ask(&state.mailboxes, ASK_TIMEOUT, |reply| {
        Control::Set(k, v, reply)
    })
    .await
    {
        Ok(()) => {}
        Err(e) => return error_response(e),
    }
    // The proposal is in the leader's log; the answer waits until this node has applied it
    // (its status shows the value), so a script that sets and then reads sees its change.
    let deadline = tokio::time::Instant::now() + SET_COMMIT_TIMEOUT;
    loop {
        if let Ok(status) = ask(&state.mailboxes, ASK_TIMEOUT, Control::Status).await
            && status["settings"][&key] == value.as_str()
        {
            return Json(json!({ "proposed": { &key: &value }, "committed": true }))
                .into_response();
        }
        if tokio::time::Instant::now() >= deadline {
            return (
                StatusCode::ACCEPTED,
                Json(json!({
                    "proposed": { key: value },
                    "committed": false,
                    "error": format!("proposed, but not applied on this node within {SET_COMMIT_TIMEOUT:?} (is a majority of the cores up?)"),
                })),
            )
                .into_response();
        }
        tokio::time::sleep(SET_COMMIT_POLL).await;
    }
}

/// How long `POST /api/v1/cluster/settings` waits for its proposal to be applied here.
const SET_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often it looks.
const SET_COMMIT_POLL: Duration = Duration::from_millis(50);

/// Leave takes no parameters, but still a JSON body (`{}`), like every state change.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaveBody {}

async fn leave(
    State(state): State<AppState>,
    body: Result<Json<LeaveBody>, JsonRejection>,
) -> Response {
    if let Err(rejection) = body {
        return rejection_response(rejection);
    }
    match ask(&state.mailboxes, ASK_TIMEOUT, Control::Leave).await {
        Ok(()) => Json(json!({ "left": true })).into_response(),
        Err(e) => error_response(e),
    }
}

/// Reload takes no parameters, but still a JSON body (`{}`), like every state change.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {}

/// A reload behind `POST`: `reload` runs off the runtime's thread (it reads files); 200 with
/// what `render` makes of its outcome, else 422 with the reason (nothing changed).
async fn reload_response<T: Send + 'static>(
    body: Result<Json<ReloadBody>, JsonRejection>,
    reload: impl FnOnce() -> Result<T, String> + Send + 'static,
    render: impl FnOnce(T) -> Value,
) -> Response {
    if let Err(rejection) = body {
        return rejection_response(rejection);
    }
    match tokio::task::spawn_blocking(reload).await {
        Ok(Ok(outcome)) => Json(render(outcome)).into_response(),
        Ok(Err(message)) => error_response((StatusCode::UNPROCESSABLE_ENTITY, message)),
        Err(_) => error_response((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the reload did not finish".into(),
        )),
    }
}

/// Reads the TLS listeners' certificate, key and CA files again: 200 with the number of TLS
/// listeners when every one was good (new connections use them, open ones keep theirs), else
/// 422 with the reason and nothing changed.
async fn tls_reload(
    State(state): State<AppState>,
    body: Result<Json<ReloadBody>, JsonRejection>,
) -> Response {
    let reloader = state.reloader.clone();
    reload_response(
        body,
        move || reloader.reload("admin API"),
        |count| json!({ "reloaded_listeners": count }),
    )
    .await
}

/// `POST /api/v1/auth/reload` (`{}`): the `[auth]` files are read again; 422 with the reason,
/// and the rules in force kept, when one is bad.
async fn auth_reload(
    State(state): State<AppState>,
    body: Result<Json<ReloadBody>, JsonRejection>,
) -> Response {
    let auth = state.auth.clone();
    reload_response(
        body,
        move || auth.reload("admin API"),
        |summary| {
            json!({
                "users": summary.users,
                "acl_rules": summary.acl_rules,
                "jwt": summary.jwt,
                "allow_anonymous": summary.allow_anonymous,
            })
        },
    )
    .await
}

fn router(state: AppState) -> Router {
    Router::new()
        .merge(crate::dashboard::routes())
        .route("/health", get(health_text))
        .route("/api/v1/health/live", get(live))
        .route("/api/v1/health/ready", get(ready))
        .route("/api/v1/cluster/status", get(status))
        .route("/api/v1/cluster/join", post(join))
        .route("/api/v1/cluster/leave", post(leave))
        .route("/api/v1/cluster/settings", post(set))
        .route("/api/v1/tls/reload", post(tls_reload))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/auth/reload", post(auth_reload))
        .route("/api/v1/nodes", get(crate::api::nodes))
        .route("/api/v1/clients", get(crate::api::clients))
        .route(
            "/api/v1/clients/{client_id}",
            get(crate::api::client).delete(crate::api::kick),
        )
        .route("/api/v1/subscriptions", get(crate::api::subscriptions))
        .route("/api/v1/routes", get(crate::api::routes))
        .route("/api/v1/retained", get(crate::api::retained))
        .route(
            "/api/v1/retained/{*topic}",
            get(crate::api::retained_get).delete(crate::api::retained_delete),
        )
        .route("/api/v1/nodes/{node}", get(crate::api::node))
        .route(
            "/api/v1/traces",
            get(crate::trace_api::list).post(crate::trace_api::start),
        )
        .route(
            "/api/v1/traces/{client_id}",
            get(crate::trace_api::get).delete(crate::trace_api::stop),
        )
        .layer(DefaultBodyLimit::max(state.settings.body_size_max))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Accepts connections, at most `connections_max` at once, each served by hyper with the
/// header-read timeout (which also ends idle keep-alive connections).
async fn serve(listener: tokio::net::TcpListener, app: Router, settings: Arc<Settings>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(settings.connections_max));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, say: wait rather than spin.
                warn!(%error, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let header_read_timeout = settings.header_read_timeout;
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_header_size(HEADER_SIZE_MAX);
            // A connection that ends badly (a timeout, garbage) concerns that client only.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// The node's parts the endpoint reloads or reads, besides the shards' mailboxes.
pub struct Services {
    pub reloader: Arc<crate::ingress::Reloader>,
    pub admission: Arc<Admission>,
    pub auth: Arc<crate::auth::Auth>,
    pub traces: Arc<crate::trace::Traces>,
}

/// Binds the endpoint now (so that an address in use fails the start) and serves it on a
/// thread of its own; with `peer_queries`, it also answers the other nodes' questions that
/// shard 0 hands it (`api::answer_peers`).
pub fn start(
    settings: Settings,
    mailboxes: Shared,
    health: Arc<Health>,
    services: Services,
    peer_queries: Option<tokio::sync::mpsc::Receiver<crate::api::PeerQuery>>,
) -> Result<(), String> {
    let Services {
        reloader,
        admission,
        auth,
        traces,
    } = services;
    let address = settings.address;
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| format!("cannot listen on {address} (admin.listen): {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("admin listener: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the admin runtime: {e}"))?;
    if settings.token.is_none() {
        warn!(
            "no admin token is configured ([admin] token_file or {ADMIN_TOKEN_VARIABLE}): the admin endpoint answers only the health probes"
        );
    }
    let settings = Arc::new(settings);
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%error, "admin endpoint: cannot use its listener");
                        return;
                    }
                };
                let state = AppState {
                    mailboxes,
                    reloader,
                    auth,
                    health,
                    admission,
                    started: tokio::time::Instant::now(),
                    settings: settings.clone(),
                    membership: Arc::default(),
                    rates: Arc::default(),
                    traces,
                };
                if let Some(queries) = peer_queries {
                    tokio::spawn(crate::api::answer_peers(state.clone(), queries));
                }
                let app = router(state);
                info!(%address, "admin endpoint serving");
                serve(listener, app, settings).await;
            });
        })
        .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    Ok(())
}

/// What `shardmq ctl` sends: a GET, a POST with its JSON body, or a DELETE (which carries
/// `Content-Type: application/json`, as the guard asks of every state change).
#[derive(Debug, Clone)]
pub enum CtlRequest {
    Get,
    Post(Value),
    Delete,
}

/// `shardmq ctl`: one request to a node's admin endpoint, with the token if there is one;
/// returns the JSON answer, or the endpoint's error.
pub fn ctl(
    admin: &str,
    token: Option<&str>,
    path: &str,
    request: CtlRequest,
) -> Result<Value, String> {
    let (url, status, text) = ctl_call(admin, token, path, request)?;
    let body: Value =
        serde_json::from_str(&text).map_err(|_| format!("{url}: {status}: {}", text.trim()))?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!(
            "{}: {}",
            status,
            body.get("error").and_then(Value::as_str).unwrap_or("error")
        ))
    }
}

/// `shardmq ctl` for an answer that is text, not JSON (a trace file): the text on success,
/// the endpoint's error otherwise.
pub fn ctl_text(admin: &str, token: Option<&str>, path: &str) -> Result<String, String> {
    let (url, status, text) = ctl_call(admin, token, path, CtlRequest::Get)?;
    if status.is_success() {
        return Ok(text);
    }
    let error = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|body| {
            body.get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{url}: {}", text.trim()));
    Err(format!("{status}: {error}"))
}

/// One request of `shardmq ctl`: the URL asked, the answer's status and its text.
fn ctl_call(
    admin: &str,
    token: Option<&str>,
    path: &str,
    request: CtlRequest,
) -> Result<(String, axum::http::StatusCode, String), String> {
    let url = format!("http://{admin}{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let authorization = token.map(|token| format!("Bearer {token}"));
    let response = match request {
        CtlRequest::Post(body) => {
            let mut request = agent.post(&url);
            if let Some(authorization) = &authorization {
                request = request.header("Authorization", authorization);
            }
            request.send_json(body)
        }
        CtlRequest::Get => {
            let mut request = agent.get(&url);
            if let Some(authorization) = &authorization {
                request = request.header("Authorization", authorization);
            }
            request.call()
        }
        CtlRequest::Delete => {
            let mut request = agent
                .delete(&url)
                .header("Content-Type", "application/json");
            if let Some(authorization) = &authorization {
                request = request.header("Authorization", authorization);
            }
            request.call()
        }
    };
    let mut response =
        response.map_err(|e| format!("cannot reach the admin endpoint at {admin}: {e}"))?;
    let status = response.status();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{url}: cannot read the answer: {e}"))?;
    let status =
        axum::http::StatusCode::from_u16(status.as_u16()).map_err(|e| format!("{url}: {e}"))?;
    Ok((url, status, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_the_endpoint_are_allowed_and_others_not() {
        let allowed = vec!["admin.example.net:8883".to_string()];
        for host in [
            "127.0.0.1:8883",
            "10.1.2.3:8883",
            "[::1]:8883",
            "localhost:8883",
            "LOCALHOST:8883",
            "admin.example.net:8883",
        ] {
            assert!(host_allowed(host, 8883, &allowed), "{host}");
        }
        for host in [
            "",
            "evil.example:8883",
            "127.0.0.1:8884",
            "127.0.0.1",
            "localhost",
            "[::1]",
            "[::1]x",
            "[::1:8883",
            "127.0.0.1:notaport",
            "admin.example.net:9999",
        ] {
            assert!(!host_allowed(host, 8883, &allowed), "{host}");
        }
        assert!(host_allowed("127.0.0.1", 80, &[]));
    }

    #[test]
    fn tokens_match_only_when_equal() {
        let token = "0123456789abcdef";
        assert!(token_matches(token, token));
        assert!(!token_matches(token, "0123456789abcdeF"));
        assert!(!token_matches(token, "0123456789abcde"));
        assert!(!token_matches(token, "0123456789abcdef0"));
        assert!(!token_matches(token, ""));
    }
}
