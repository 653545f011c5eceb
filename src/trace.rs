//! Per-client traces (`/api/v1/traces`, `shardmq ctl trace`): the node's list of traces, the
//! `tracing` layer that takes the shards' trace records, and the thread that writes them to
//! the trace files.
//!
//! Owns: every trace of this node (client identifier, start, end, bytes written, state, file),
//! the directory of the files (`DATA_DIR/traces/`, or a directory of its own under the temp
//! directory without a data directory), and the set of traced client identifiers that every
//! shard is told (`Control::Trace`, posted under the list's lock, so the last set posted is
//! the one in force).
//! Never: writes a file on a shard thread. A shard emits a record as a `tracing` event of
//! `TRACE_TARGET`; the layer formats it into one line and hands it to the writer thread over a
//! bounded channel (a full channel drops the record and counts it; the file says how many).
//! Never names a file after the client identifier: a file is named by a hash of it, so no
//! identifier (`../../etc/passwd`, NUL, newlines) reaches the file system.
//! Invariants: at most `admin.traces_max` traces are active; a file holds at most
//! `admin.trace_bytes_max` bytes of records (the closing note may pass it by its own length);
//! an active trace ends at its end time, at its cap, or when stopped, and its file is kept
//! until a new trace of the same client identifier or the next start of the node.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytestring::ByteString;
use serde_json::{Value, json};
use shardmq_shards::shard::TRACE_TARGET;
use tokio::sync::oneshot;
use tracing::field::{Field, Visit};
use tracing::{info, warn};
use tracing_subscriber::layer::{Context, Layer};

use crate::admin::{Control, NodeMessage, Shared};

/// The longest trace, in minutes.
pub const MINUTES_MAX: u64 = 60;

/// The longest client identifier a trace accepts, in bytes (MQTT's own maximum).
const CLIENT_ID_BYTES_MAX: usize = 65_535;

/// Records waiting for the writer thread; past it records are dropped and counted.
const CHANNEL_RECORDS_MAX: usize = 8192;

/// How often the writer thread looks for traces past their end when no record comes.
const EXPIRY_CHECK: Duration = Duration::from_millis(200);

/// What an operator set in `[admin]`, and where the files go.
#[derive(Debug, Clone)]
pub struct Settings {
    pub traces_max: usize,
    pub bytes_max: u64,
    /// `DATA_DIR/traces`, or None for a directory of this process under the temp directory.
    pub directory: Option<PathBuf>,
}

/// A trace's state.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Active,
    /// Ended, and why (`stopped`, `expired`, `capped`, or an I/O error).
    Ended(String),
}

#[derive(Debug)]
struct Trace {
    path: PathBuf,
    started_ms: u64,
    ends_ms: u64,
    minutes: u64,
    bytes_written: u64,
    /// Open while the trace is active.
    file: Option<File>,
    state: State,
    /// Records the channel dropped while it was full, not yet noted in the file.
    dropped: u64,
}

/// One record for the writer: the client identifier it belongs to and its line.
#[derive(Debug)]
struct Line {
    client_id: String,
    text: String,
}

/// A shard's confirmation that it has the new set of traced clients.
pub type Confirmation = oneshot::Receiver<Result<(), String>>;

/// Why a trace operation was refused: the HTTP status and the reason.
pub type Refusal = (axum::http::StatusCode, String);

/// The node's traces.
#[derive(Debug)]
pub struct Traces {
    settings: Settings,
    traces: Mutex<BTreeMap<String, Trace>>,
    /// The shards' mailboxes and their count, once the shards run.
    mailboxes: OnceLock<(Shared, u16)>,
    sender: SyncSender<Line>,
    /// Records dropped because the channel was full, since the last count the writer took.
    dropped: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds (civil date from days, after
/// Howard Hinnant's algorithm).
pub fn rfc3339(ms: u64) -> String {
    let seconds = ms / 1000;
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let in_day = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60,
        ms % 1000
    )
}

/// The file name of a client identifier's trace: a hash of it, so that nothing the client
/// chose reaches the file system.
pub fn file_name(client_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(client_id.as_bytes());
    let hex: String = digest
        .iter()
        .take(16)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("trace-{hex}.txt")
}

/// A client identifier quoted for a file's header: printable ASCII as is, the rest escaped.
fn quoted(client_id: &str) -> String {
    let mut out = String::from("\"");
    for byte in client_id.bytes().take(256) {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(byte));
            }
            0x20..=0x7e => out.push(char::from(byte)),
            _ => out.push_str(&format!("\\x{byte:02x}")),
        }
    }
    out.push('"');
    if client_id.len() > 256 {
        out.push_str("...");
    }
    out
}

impl Traces {
    /// The node's traces, with their writer thread running.
    pub fn start(settings: Settings) -> Result<Arc<Self>, String> {
        if let Some(directory) = &settings.directory {
            remove_old_files(directory);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(CHANNEL_RECORDS_MAX);
        let traces = Arc::new(Self {
            settings,
            traces: Mutex::new(BTreeMap::new()),
            mailboxes: OnceLock::new(),
            sender,
            dropped: AtomicU64::new(0),
        });
        let writer = traces.clone();
        std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || writer.write_loop(&receiver))
            .map_err(|e| format!("cannot start the trace writer thread: {e}"))?;
        Ok(traces)
    }

    /// The shards run: from now on trace changes reach them.
    pub fn attach(&self, mailboxes: Shared, shard_count: u16) {
        let _ = self.mailboxes.set((mailboxes, shard_count));
    }

    /// The layer that takes the shards' trace records.
    pub fn layer(self: &Arc<Self>) -> TraceLayer {
        TraceLayer {
            traces: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Trace>> {
        // A panic while the lock was held leaves plain data behind: keep using it.
        self.traces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn directory(&self) -> PathBuf {
        match &self.settings.directory {
            Some(directory) => directory.clone(),
            None => std::env::temp_dir().join(format!("shardmq-traces-{}", std::process::id())),
        }
    }

    /// Tells every shard the active traces' client identifiers; returns the shards' answers
    /// (None before the shards run). Called with the lock held, so that sets reach each
    /// mailbox in the order they were made.
    fn publish(&self, traces: &BTreeMap<String, Trace>) -> Vec<Confirmation> {
        let Some((mailboxes, shard_count)) = self.mailboxes.get() else {
            return Vec::new();
        };
        let client_ids: Vec<ByteString> = traces
            .iter()
            .filter(|(_, trace)| trace.state == State::Active)
            .map(|(client_id, _)| ByteString::from(client_id.as_str()))
            .collect();
        (0..*shard_count)
            .map(|shard| {
                let (sender, receiver) = oneshot::channel();
                mailboxes.post(
                    shard,
                    NodeMessage::Control(Control::Trace(client_ids.clone(), sender)),
                );
                receiver
            })
            .collect()
    }

    /// Starts a trace of `client_id` for `minutes`: 201's body, or why not. The answers of
    /// the shards are returned to be awaited, so that the caller answers once every shard
    /// traces the client.
    pub fn begin(
        &self,
        client_id: &str,
        minutes: u64,
    ) -> Result<(Value, Vec<Confirmation>), Refusal> {
        use axum::http::StatusCode;
        if !(1..=MINUTES_MAX).contains(&minutes) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("minutes must be from 1 to {MINUTES_MAX}, not {minutes}"),
            ));
        }
        if client_id.is_empty() || client_id.len() > CLIENT_ID_BYTES_MAX {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("client_id must be 1 to {CLIENT_ID_BYTES_MAX} bytes"),
            ));
        }
        let mut traces = self.lock();
        if traces
            .get(client_id)
            .is_some_and(|trace| trace.state == State::Active)
        {
            return Err((
                StatusCode::CONFLICT,
                "a trace of this client is already running: stop it first".into(),
            ));
        }
        let active = traces
            .values()
            .filter(|trace| trace.state == State::Active)
            .count();
        if active >= self.settings.traces_max {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{active} traces are running, the most admin.traces_max allows ({}): stop one first",
                    self.settings.traces_max
                ),
            ));
        }
        let directory = self.directory();
        let path = directory.join(file_name(client_id));
        let started_ms = now_ms();
        let ends_ms = started_ms.saturating_add(minutes * 60_000);
        let header = format!(
            "# shardmq trace of client {} on this node, from {} to {}; one line per packet (in: from the client, out: to it) or event\n",
            quoted(client_id),
            rfc3339(started_ms),
            rfc3339(ends_ms)
        );
        let file = create_file(&directory, &path, header.as_bytes()).map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot create the trace file {}: {e}", path.display()),
            )
        })?;
        traces.insert(
            client_id.to_owned(),
            Trace {
                path,
                started_ms,
                ends_ms,
                minutes,
                bytes_written: header.len() as u64,
                file: Some(file),
                state: State::Active,
                dropped: 0,
            },
        );
        info!(client_id = %quoted(client_id), minutes, "trace started");
        let answers = self.publish(&traces);
        let body = traces
            .get(client_id)
            .map(|trace| trace_json(client_id, trace))
            .unwrap_or(Value::Null);
        Ok((body, answers))
    }

    /// Every trace of this node, in client identifier order.
    pub fn list(&self) -> Value {
        let traces = self.lock();
        Value::Array(
            traces
                .iter()
                .map(|(client_id, trace)| trace_json(client_id, trace))
                .collect(),
        )
    }

    /// The path of `client_id`'s trace file, if it has one.
    pub fn path(&self, client_id: &str) -> Option<PathBuf> {
        self.lock().get(client_id).map(|trace| trace.path.clone())
    }

    /// Stops `client_id`'s trace (its file stays): its state, or None when there is none.
    pub fn stop(&self, client_id: &str) -> Option<Value> {
        let mut traces = self.lock();
        let trace = traces.get_mut(client_id)?;
        if trace.state == State::Active {
            end(trace, "stopped", "stopped by the operator");
            info!(client_id = %quoted(client_id), "trace stopped");
            // Nobody waits for the shards: they stop tracing at their next loop.
            drop(self.publish(&traces));
        }
        traces
            .get(client_id)
            .map(|trace| trace_json(client_id, trace))
    }

    /// The writer thread: appends each record to its trace's file, and ends traces at their
    /// cap and at their end time.
    fn write_loop(&self, receiver: &Receiver<Line>) {
        loop {
            let line = match receiver.recv_timeout(EXPIRY_CHECK) {
                Ok(line) => Some(line),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.step(line, now_ms());
        }
    }

    /// One step of the writer: `line` (if one came) appended, the traces past their end at
    /// `now` ended, and the shards told when the set changed.
    fn step(&self, line: Option<Line>, now: u64) {
        let mut traces = self.lock();
        let mut changed = false;
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            for trace in traces.values_mut() {
                trace.dropped += dropped;
            }
        }
        if let Some(line) = line
            && let Some(trace) = traces.get_mut(&line.client_id)
        {
            changed |= self.append(trace, &line.text);
        }
        for trace in traces.values_mut() {
            if trace.state == State::Active && now >= trace.ends_ms {
                let note = format!("the trace's {} minutes are over", trace.minutes);
                end(trace, "expired", &note);
                changed = true;
            }
        }
        if changed {
            drop(self.publish(&traces));
        }
    }

    /// Appends one record to an active trace; true when that ended it (its cap, an error).
    fn append(&self, trace: &mut Trace, text: &str) -> bool {
        if trace.state != State::Active {
            return false;
        }
        let mut text = std::borrow::Cow::Borrowed(text);
        if trace.dropped > 0 {
            text = format!(
                "# {} records dropped: the trace writer fell behind\n{text}",
                trace.dropped
            )
            .into();
            trace.dropped = 0;
        }
        let size = text.len() as u64;
        if trace.bytes_written.saturating_add(size) > self.settings.bytes_max {
            let note = format!(
                "the file reached admin.trace_bytes_max ({} bytes)",
                self.settings.bytes_max
            );
            end(trace, "capped", &note);
            return true;
        }
        let Some(file) = trace.file.as_mut() else {
            return false;
        };
        match file.write_all(text.as_bytes()) {
            Ok(()) => {
                trace.bytes_written += size;
                false
            }
            Err(error) => {
                warn!(%error, path = %trace.path.display(), "cannot write a trace file: the trace ends");
                trace.file = None;
                trace.state = State::Ended(format!("write error: {error}"));
                true
            }
        }
    }
}

/// The files of the traces of the node's last run: kept until this start, removed now.
fn remove_old_files(directory: &Path) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("trace-") && name.ends_with(".txt") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Ends an active trace: a last line says why, and the file is closed.
fn end(trace: &mut Trace, state: &str, why: &str) {
    if let Some(mut file) = trace.file.take() {
        let note = format!("# {} trace ended: {why}\n", rfc3339(now_ms()));
        if file.write_all(note.as_bytes()).is_ok() {
            trace.bytes_written += note.len() as u64;
        }
    }
    trace.state = State::Ended(state.to_owned());
}

/// Creates (or truncates) a trace file, readable by the node's user only, in a directory
/// likewise, and writes its header.
fn create_file(directory: &Path, path: &Path, header: &[u8]) -> std::io::Result<File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(header)?;
    Ok(file)
}

fn trace_json(client_id: &str, trace: &Trace) -> Value {
    let state = match &trace.state {
        State::Active => "active",
        State::Ended(why) => why.as_str(),
    };
    json!({
        "client_id": client_id,
        "started": rfc3339(trace.started_ms),
        "ends": rfc3339(trace.ends_ms),
        "minutes": trace.minutes,
        "bytes_written": trace.bytes_written,
        "state": state,
    })
}

/// The `tracing` layer of trace records: formats each into one line and hands it to the
/// writer thread, never waiting (a full channel drops it, counted).
#[derive(Debug)]
pub struct TraceLayer {
    traces: Arc<Traces>,
}

impl<S: tracing::Subscriber> Layer<S> for TraceLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != TRACE_TARGET {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(client_id) = fields.client_id else {
            return;
        };
        let text = format!(
            "{} node={} address={} {} {}\n",
            rfc3339(now_ms()),
            fields.node.unwrap_or_default(),
            fields.address.as_deref().unwrap_or("-"),
            fields.direction.as_deref().unwrap_or("?"),
            fields.record.unwrap_or_default(),
        );
        match self.traces.sender.try_send(Line { client_id, text }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.traces.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The fields of a trace record.
#[derive(Debug, Default)]
struct Fields {
    client_id: Option<String>,
    node: Option<u64>,
    address: Option<String>,
    direction: Option<String>,
    record: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "client_id" => self.client_id = Some(value.to_owned()),
            "direction" => self.direction = Some(value.to_owned()),
            "record" => self.record = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "node" {
            self.node = Some(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "address" {
            // `Some(127.0.0.1:1234)` or `None`, from the shard's `Option<SocketAddr>`.
            let text = format!("{value:?}");
            let inner = text
                .strip_prefix("Some(")
                .and_then(|rest| rest.strip_suffix(')'))
                .map(str::to_owned);
            self.address = inner;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_774_000_123), "2025-12-03T15:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn file_names_never_carry_the_client_identifier() {
        for hostile in ["../../etc/passwd", "a\0b", "a\nb", "/", "..", "x"] {
            let name = file_name(hostile);
            assert!(
                name.starts_with("trace-") && name.ends_with(".txt"),
                "{name}"
            );
            assert_eq!(name.len(), "trace-.txt".len() + 32);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            );
        }
        assert_ne!(file_name("a"), file_name("b"));
        assert_eq!(quoted("a\n\"b"), "\"a\\x0a\\\"b\"");
    }

    fn traces_in(directory: &Path, bytes_max: u64) -> Arc<Traces> {
        let _ = std::fs::remove_dir_all(directory);
        Traces::start(Settings {
            traces_max: 2,
            bytes_max,
            directory: Some(directory.to_path_buf()),
        })
        .unwrap()
    }

    fn line(client_id: &str, text: &str) -> Option<Line> {
        Some(Line {
            client_id: client_id.into(),
            text: text.into(),
        })
    }

    #[test]
    fn a_trace_ends_at_its_end_time_and_at_its_cap_and_says_why() {
        let directory =
            std::env::temp_dir().join(format!("shardmq-trace-unit-{}", std::process::id()));
        let traces = traces_in(&directory, 4096);
        let (started, _) = traces.begin("a", 1).unwrap();
        assert_eq!(started["state"], "active");
        traces.begin("b", 1).unwrap();
        assert_eq!(
            traces.begin("c", 1).unwrap_err().0,
            axum::http::StatusCode::TOO_MANY_REQUESTS
        );
        traces.step(line("a", "record one\n"), now_ms());
        traces.step(line("nobody", "dropped: no such trace\n"), now_ms());
        // One minute later "a" is over; "b" fills its file first.
        traces.step(line("b", &"x".repeat(5000)), now_ms());
        traces.step(None, now_ms() + 61_000);
        let list = traces.list();
        assert_eq!(list[0]["client_id"], "a");
        assert_eq!(list[0]["state"], "expired");
        assert_eq!(list[1]["state"], "capped");
        let a = std::fs::read_to_string(traces.path("a").unwrap()).unwrap();
        let lines: Vec<&str> = a.lines().collect();
        assert_eq!(lines.len(), 3, "{a}");
        assert_eq!(lines[1], "record one");
        assert!(
            lines[2].ends_with("trace ended: the trace's 1 minutes are over"),
            "{a}"
        );
        assert_eq!(list[0]["bytes_written"], a.len() as u64);
        let b = std::fs::read_to_string(traces.path("b").unwrap()).unwrap();
        assert!(!b.contains("xxx"), "{b}");
        assert!(b.ends_with("trace ended: the file reached admin.trace_bytes_max (4096 bytes)\n"));
        // Ended traces leave room; a record for an ended trace is not written.
        traces.step(line("a", "late\n"), now_ms());
        assert!(
            !std::fs::read_to_string(traces.path("a").unwrap())
                .unwrap()
                .contains("late")
        );
        traces.begin("c", 1).unwrap();
        // A new start of the node removes the files of the last run.
        let again = traces_in_keep(&directory);
        assert!(again.list().as_array().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&directory).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&directory);
    }

    fn traces_in_keep(directory: &Path) -> Arc<Traces> {
        Traces::start(Settings {
            traces_max: 2,
            bytes_max: 4096,
            directory: Some(directory.to_path_buf()),
        })
        .unwrap()
    }
}
