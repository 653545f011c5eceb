//! The admin API of per-client traces (`/api/v1/traces`, behind the admin guard) and
//! `shardmq ctl trace ...`, its client. The traces themselves live in `trace.rs`.
//!
//! A trace is per node: these endpoints answer for the node that serves them.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio_util::io::ReaderStream;
use tracing::warn;

use crate::admin::{ASK_TIMEOUT, AppState, error_response, rejection_response};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TraceBody {
    client_id: String,
    minutes: u64,
}

/// `POST /api/v1/traces` (`{"client_id": ID, "minutes": N}`): 201 with the trace's state once
/// every shard traces the client; 400 for bad minutes or identifier, 409 when that client is
/// traced already, 429 at `admin.traces_max`.
pub(crate) async fn start(
    State(state): State<AppState>,
    body: Result<Json<TraceBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return rejection_response(rejection),
    };
    // The file is created and the shards are posted to off the runtime.
    let traces = state.traces.clone();
    let begun =
        tokio::task::spawn_blocking(move || traces.begin(&body.client_id, body.minutes)).await;
    let (trace, answers) = match begun {
        Ok(Ok(started)) => started,
        Ok(Err(refusal)) => return error_response(refusal),
        Err(_) => return unfinished(),
    };
    let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
    for answer in answers {
        if !matches!(
            tokio::time::timeout_at(deadline, answer).await,
            Ok(Ok(Ok(())))
        ) {
            warn!(
                "a shard did not confirm a trace in time: it may miss the client's first packets"
            );
        }
    }
    (StatusCode::CREATED, Json(trace)).into_response()
}

/// `GET /api/v1/traces`: every trace of this node.
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    Json(state.traces.list()).into_response()
}

/// `GET /api/v1/traces/{client_id}`: the trace file, as a text download, streamed (never
/// whole in memory): the bytes it holds when asked (`Content-Length`), read in chunks.
pub(crate) async fn get(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    use tokio::io::AsyncReadExt as _;
    let Some(path) = state.traces.path(&client_id) else {
        return error_response((StatusCode::NOT_FOUND, "no trace of this client".into()));
    };
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let opened = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .await;
    let file = match opened {
        Ok(file) => file,
        Err(error) => {
            return error_response((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the trace file: {error}"),
            ));
        }
    };
    let length = match file.metadata().await {
        Ok(metadata) => metadata.len(),
        Err(error) => {
            return error_response((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the trace file: {error}"),
            ));
        }
    };
    // The file only grows while it is read (records are appended): the length asked for is
    // exactly what is sent.
    let body = Body::from_stream(ReaderStream::new(file.take(length)));
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response()
}

/// `DELETE /api/v1/traces/{client_id}`: stops the trace (its file is kept).
pub(crate) async fn stop(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    let traces = state.traces.clone();
    match tokio::task::spawn_blocking(move || traces.stop(&client_id)).await {
        Ok(Some(trace)) => Json(trace).into_response(),
        Ok(None) => error_response((StatusCode::NOT_FOUND, "no trace of this client".into())),
        Err(_) => unfinished(),
    }
}

/// A blocking task of a handler that did not finish (it panicked).
fn unfinished() -> Response {
    error_response((
        StatusCode::INTERNAL_SERVER_ERROR,
        "the trace operation did not finish".into(),
    ))
}

/// `shardmq ctl trace ...`: the JSON answer pretty-printed, or the trace file as it is.
pub fn ctl(
    admin: &str,
    token: Option<&str>,
    command: &crate::TraceCommand,
) -> Result<String, String> {
    use crate::TraceCommand;
    use crate::admin::{CtlRequest, ctl, ctl_text};
    let answer = match command {
        TraceCommand::Start { client_id, minutes } => ctl(
            admin,
            token,
            "/api/v1/traces",
            CtlRequest::Post(json!({ "client_id": client_id, "minutes": minutes })),
        ),
        TraceCommand::List => ctl(admin, token, "/api/v1/traces", CtlRequest::Get),
        TraceCommand::Get { client_id } => {
            let path = format!("/api/v1/traces/{}", crate::ctl::segment(client_id));
            return ctl_text(admin, token, &path);
        }
        TraceCommand::Stop { client_id } => {
            let path = format!("/api/v1/traces/{}", crate::ctl::segment(client_id));
            ctl(admin, token, &path, CtlRequest::Delete)
        }
    }?;
    serde_json::to_string_pretty(&answer).map_err(|e| e.to_string())
}
