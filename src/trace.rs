//! Per-client traces (`/api/v1/traces`, `shardmq ctl trace`): the node's list of traces, the
//! `tracing` layer that takes the shards' trace records, and the thread that writes them to
//! the trace files.
//!
//! Owns: every trace of this node (client identifier, start, end, bytes written, state, file),
//! the directory of the files (`DATA_DIR/traces/`, checked to be a real directory of the
//! node's user; or, without a data directory, a private directory of random name under the
//! temp directory, removed when the node ends), and the set of traced client identifiers that
//! every shard is told (`Control::Trace`, read and posted under one lock of its own, so the
//! last set posted is the one in force).
//! Never: writes a file on a shard thread. A shard emits a record as a `tracing` event of
//! `TRACE_TARGET`; the layer formats it into one line and hands it to the writer thread over a
//! bounded channel (a full channel drops the record and counts it; the file says how many).
//! Never names a file after the client identifier: a file is named by a hash of it, so no
//! identifier (`../../etc/passwd`, NUL, newlines) reaches the file system; never opens a file
//! through a symbolic link or one it did not create. Never holds the list's lock across a
//! file write or a post to a mailbox.
//! Invariants: at most `admin.traces_max` traces are active; a file holds at most
//! `admin.trace_bytes_max` bytes of records (the closing note may pass it by its own length);
//! an active trace ends at its end time, at its cap, or when stopped, and its file is kept
//! until a new trace of the same client identifier, the next start of the node, or until
//! more than `ENDED_PER_ACTIVE * admin.traces_max` ended traces are kept: then the oldest
//! ended one is forgotten and its file removed.

use std::collections::{BTreeMap, BTreeSet};
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

/// Ended traces kept (listed, their files downloadable) per `admin.traces_max`: past
/// `ENDED_PER_ACTIVE * traces_max` the oldest ended trace is forgotten and its file removed.
pub const ENDED_PER_ACTIVE: usize = 4;

/// What an operator set in `[admin]`, and where the files go.
#[derive(Debug, Clone)]
pub struct Settings {
    pub traces_max: usize,
    pub bytes_max: u64,
    /// `DATA_DIR/traces`, or None for a private directory of random name under the temp
    /// directory.
    pub directory: Option<PathBuf>,
}

/// A trace's state.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Active,
    /// Ended, and why (`stopped`, `expired`, `capped`, or an I/O error).
    Ended(String),
}

/// A trace's open file: written by the writer thread only, without the list's lock.
type SharedFile = Arc<File>;

#[derive(Debug)]
struct Trace {
    path: PathBuf,
    started_ms: u64,
    ends_ms: u64,
    /// When it ended (0 while active): the oldest ended trace is forgotten first.
    ended_ms: u64,
    minutes: u64,
    bytes_written: u64,
    /// Open while the trace is active.
    file: Option<SharedFile>,
    state: State,
    /// Records the channel dropped while it was full, not yet noted in the file.
    dropped: u64,
}

/// Every trace, and the client identifiers of the active ones (what the writer walks per
/// record, at most `admin.traces_max` of them).
#[derive(Debug, Default)]
struct Book {
    traces: BTreeMap<String, Trace>,
    active: BTreeSet<String>,
    /// Closing notes of traces stopped by the operator, for the writer thread to write (after
    /// every record it took before the stop).
    closings: Vec<Closing>,
}

/// A trace that has just ended: its closing note, for the writer thread to write once the
/// list's lock is released.
#[derive(Debug)]
struct Closing {
    file: SharedFile,
    note: String,
    path: PathBuf,
}

impl Closing {
    fn write(self) {
        if let Err(error) = (&*self.file).write_all(self.note.as_bytes()) {
            warn!(%error, path = %self.path.display(), "cannot write a trace file's closing note");
        }
    }
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
    /// Where the files are: `settings.directory`, or the private temporary directory.
    directory: PathBuf,
    /// The private temporary directory without a data directory, removed (with its files)
    /// by [`Traces::remove_private_directory`] when the node ends.
    private: Mutex<Option<tempfile::TempDir>>,
    /// The list. Held only to read or change it: never across a file write or a post.
    book: Mutex<Book>,
    /// Serialises `begin` and `stop`, whose file work runs without the list's lock.
    changes: Mutex<()>,
    /// Serialises the posts of the traced set, so that the last set posted is the newest.
    publishing: Mutex<()>,
    /// The shards' mailboxes and their count, once the shards run.
    mailboxes: OnceLock<(Shared, u16)>,
    sender: SyncSender<Line>,
    /// Records dropped because the channel was full, since the last count the writer took.
    dropped: AtomicU64,
}

/// A panic while a lock was held leaves plain data behind: keep using it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    /// The node's traces, with their writer thread running. Under a data directory, its
    /// `traces/` must be a real directory of the node's user (not a symbolic link); without
    /// one, a private directory of random name is made under the temp directory.
    pub fn start(settings: Settings) -> Result<Arc<Self>, String> {
        let (directory, private) = match &settings.directory {
            Some(directory) => {
                own_directory(directory).map_err(|e| {
                    format!(
                        "data directory: cannot make or use its trace directory {}: {e}",
                        directory.display()
                    )
                })?;
                remove_old_files(directory);
                (directory.clone(), None)
            }
            None => {
                use std::os::unix::fs::PermissionsExt;
                let private = tempfile::Builder::new()
                    .prefix("shardmq-traces-")
                    .permissions(std::fs::Permissions::from_mode(0o700))
                    .tempdir()
                    .map_err(|e| {
                        format!(
                            "cannot make a private trace directory under the temp directory: {e}"
                        )
                    })?;
                (private.path().to_path_buf(), Some(private))
            }
        };
        let (sender, receiver) = std::sync::mpsc::sync_channel(CHANNEL_RECORDS_MAX);
        let traces = Arc::new(Self {
            settings,
            directory,
            private: Mutex::new(private),
            book: Mutex::new(Book::default()),
            changes: Mutex::new(()),
            publishing: Mutex::new(()),
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

    /// Where the trace files are.
    #[cfg(test)]
    fn directory(&self) -> &Path {
        &self.directory
    }

    /// The node ends: its private temporary directory (none under a data directory) is
    /// removed with its files.
    pub fn remove_private_directory(&self) {
        if let Some(private) = lock(&self.private).take()
            && let Err(error) = private.close()
        {
            warn!(%error, "cannot remove the private trace directory");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    /// The most ended traces kept.
    fn ended_max(&self) -> usize {
        self.settings
            .traces_max
            .saturating_mul(ENDED_PER_ACTIVE)
            .max(1)
    }

    /// Tells every shard the active traces' client identifiers; returns the shards' answers
    /// (none before the shards run). The set is read under `publishing`, and posted without
    /// the list's lock: the last post always carries the newest set.
    fn publish(&self) -> Vec<Confirmation> {
        let Some((mailboxes, shard_count)) = self.mailboxes.get() else {
            return Vec::new();
        };
        let _publishing = lock(&self.publishing);
        let client_ids: Vec<ByteString> = self
            .lock()
            .active
            .iter()
            .map(|client_id| ByteString::from(client_id.as_str()))
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
    /// traces the client. Blocking (file-system calls): call it off the async runtime.
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
        // Only `begin` makes a trace active, and `changes` lets one run at a time: what is
        // checked here still holds when the trace is inserted below.
        let _changes = lock(&self.changes);
        {
            let book = self.lock();
            if book.active.contains(client_id) {
                return Err((
                    StatusCode::CONFLICT,
                    "a trace of this client is already running: stop it first".into(),
                ));
            }
            let active = book.active.len();
            if active >= self.settings.traces_max {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{active} traces are running, the most admin.traces_max allows ({}): stop one first",
                        self.settings.traces_max
                    ),
                ));
            }
        }
        let path = self.directory.join(file_name(client_id));
        let started_ms = now_ms();
        let ends_ms = started_ms.saturating_add(minutes * 60_000);
        let header = format!(
            "# shardmq trace of client {} on this node, from {} to {}; one line per packet (in: from the client, out: to it) or event\n",
            quoted(client_id),
            rfc3339(started_ms),
            rfc3339(ends_ms)
        );
        let file = create_file(&path, header.as_bytes()).map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot create the trace file {}: {e}", path.display()),
            )
        })?;
        let trace = Trace {
            path,
            started_ms,
            ends_ms,
            ended_ms: 0,
            minutes,
            bytes_written: header.len() as u64,
            file: Some(Arc::new(file)),
            state: State::Active,
            dropped: 0,
        };
        let body = trace_json(client_id, &trace);
        let forgotten = {
            let mut book = self.lock();
            book.active.insert(client_id.to_owned());
            book.traces.insert(client_id.to_owned(), trace);
            forget_oldest_ended(&mut book, self.ended_max())
        };
        for path in forgotten {
            if let Err(error) = std::fs::remove_file(&path) {
                warn!(%error, path = %path.display(), "cannot remove a forgotten trace's file");
            }
        }
        info!(client_id = %quoted(client_id), minutes, "trace started");
        Ok((body, self.publish()))
    }

    /// Every trace of this node, in client identifier order.
    pub fn list(&self) -> Value {
        let book = self.lock();
        Value::Array(
            book.traces
                .iter()
                .map(|(client_id, trace)| trace_json(client_id, trace))
                .collect(),
        )
    }

    /// The path of `client_id`'s trace file, if it has one.
    pub fn path(&self, client_id: &str) -> Option<PathBuf> {
        self.lock()
            .traces
            .get(client_id)
            .map(|trace| trace.path.clone())
    }

    /// Stops `client_id`'s trace (its file stays; the writer thread writes its closing note):
    /// its state, or None when there is none. Blocking (the posts): call it off the async
    /// runtime.
    pub fn stop(&self, client_id: &str) -> Option<Value> {
        let _changes = lock(&self.changes);
        let (body, stopped) = {
            let mut book = self.lock();
            let closing = end(&mut book, client_id, "stopped", "stopped by the operator");
            let stopped = closing.is_some();
            book.closings.extend(closing);
            let body = book
                .traces
                .get(client_id)
                .map(|trace| trace_json(client_id, trace))?;
            (body, stopped)
        };
        if stopped {
            info!(client_id = %quoted(client_id), "trace stopped");
            // Nobody waits for the shards: they stop tracing at their next loop.
            drop(self.publish());
        }
        Some(body)
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
    /// `now` ended, and the shards told when the set changed. The list's lock is held only
    /// to decide; the writes and the posts come after it is released.
    fn step(&self, line: Option<Line>, now: u64) {
        let mut changed = false;
        let mut closings = std::mem::take(&mut self.lock().closings);
        {
            let mut book = self.lock();
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                let Book { traces, active, .. } = &mut *book;
                for client_id in active.iter() {
                    if let Some(trace) = traces.get_mut(client_id) {
                        trace.dropped += dropped;
                    }
                }
            }
            let expired: Vec<String> = {
                let Book { traces, active, .. } = &*book;
                active
                    .iter()
                    .filter(|client_id| traces.get(*client_id).is_some_and(|t| now >= t.ends_ms))
                    .cloned()
                    .collect()
            };
            for client_id in expired {
                let minutes = book.traces.get(&client_id).map_or(0, |t| t.minutes);
                let note = format!("the trace's {minutes} minutes are over");
                closings.extend(end(&mut book, &client_id, "expired", &note));
                changed = true;
            }
            if let Some(line) = line {
                match self.reserve(&mut book, &line.client_id, &line.text) {
                    Reserved::Nothing => {}
                    Reserved::Capped(closing) => {
                        closings.push(closing);
                        changed = true;
                    }
                    Reserved::Write(file, text) => {
                        drop(book);
                        if let Err(error) = (&*file).write_all(text.as_bytes()) {
                            changed |= self.write_failed(&line.client_id, &file, &error);
                        }
                    }
                }
            }
        }
        for closing in closings {
            closing.write();
        }
        if changed {
            drop(self.publish());
        }
    }

    /// Decides what to do with one record of `client_id`: nothing (no active trace), end its
    /// trace at its cap, or write it (the bytes counted now).
    fn reserve(&self, book: &mut Book, client_id: &str, text: &str) -> Reserved {
        let Some(trace) = book.traces.get_mut(client_id) else {
            return Reserved::Nothing;
        };
        let Some(file) = trace.file.clone().filter(|_| trace.state == State::Active) else {
            return Reserved::Nothing;
        };
        let mut text = text.to_owned();
        if trace.dropped > 0 {
            text = format!(
                "# {} records dropped: the trace writer fell behind\n{text}",
                trace.dropped
            );
            trace.dropped = 0;
        }
        let size = text.len() as u64;
        if trace.bytes_written.saturating_add(size) > self.settings.bytes_max {
            let note = format!(
                "the file reached admin.trace_bytes_max ({} bytes)",
                self.settings.bytes_max
            );
            return match end(book, client_id, "capped", &note) {
                Some(closing) => Reserved::Capped(closing),
                None => Reserved::Nothing,
            };
        }
        trace.bytes_written += size;
        Reserved::Write(file, text)
    }

    /// A record could not be written: the trace ends (if `file` is still its file). True
    /// when it did.
    fn write_failed(&self, client_id: &str, file: &SharedFile, error: &std::io::Error) -> bool {
        let mut book = self.lock();
        let Some(trace) = book.traces.get_mut(client_id) else {
            return false;
        };
        if !trace
            .file
            .as_ref()
            .is_some_and(|own| Arc::ptr_eq(own, file))
        {
            return false;
        }
        warn!(%error, path = %trace.path.display(), "cannot write a trace file: the trace ends");
        trace.file = None;
        trace.state = State::Ended(format!("write error: {error}"));
        trace.ended_ms = now_ms();
        book.active.remove(client_id);
        true
    }
}

/// What the writer does with a record.
#[derive(Debug)]
enum Reserved {
    Nothing,
    Capped(Closing),
    Write(SharedFile, String),
}

/// Forgets the oldest ended traces past `ended_max`: their paths, for the caller to remove
/// without the list's lock.
fn forget_oldest_ended(book: &mut Book, ended_max: usize) -> Vec<PathBuf> {
    let mut forgotten = Vec::new();
    while book.traces.len().saturating_sub(book.active.len()) > ended_max {
        let oldest = book
            .traces
            .iter()
            .filter(|(_, trace)| trace.state != State::Active)
            .min_by_key(|(_, trace)| trace.ended_ms)
            .map(|(client_id, _)| client_id.clone());
        let Some(trace) = oldest.and_then(|client_id| book.traces.remove(&client_id)) else {
            break;
        };
        forgotten.push(trace.path);
    }
    forgotten
}

/// Makes `directory` (0700) if it is not there, and checks it is a real directory (not a
/// symbolic link) owned by the node's user and closed to others.
fn own_directory(directory: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(directory) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {
            // The data directory itself is not there yet.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(directory)?;
        }
        Err(error) => return Err(error),
    }
    let metadata = std::fs::symlink_metadata(directory)?;
    if !metadata.file_type().is_dir() {
        return Err(Error::other(
            "it is not a directory (a symbolic link?): remove it",
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    if metadata.uid() != user {
        return Err(Error::other(format!(
            "it belongs to user {}, not to the node's user {user}",
            metadata.uid()
        )));
    }
    if metadata.mode() & 0o077 != 0 {
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

/// Ends `client_id`'s trace if it is active: its state, its end, and its closing note (to
/// be written by the caller once the list's lock is released; its bytes counted now).
fn end(book: &mut Book, client_id: &str, state: &str, why: &str) -> Option<Closing> {
    let trace = book.traces.get_mut(client_id)?;
    if trace.state != State::Active {
        return None;
    }
    book.active.remove(client_id);
    let now = now_ms();
    trace.state = State::Ended(state.to_owned());
    trace.ended_ms = now;
    let file = trace.file.take()?;
    let note = format!("# {} trace ended: {why}\n", rfc3339(now));
    trace.bytes_written += note.len() as u64;
    Some(Closing {
        file,
        note,
        path: trace.path.clone(),
    })
}

/// Creates a trace file, readable by the node's user only, and writes its header. A file
/// left at the path (an older trace of the client, or anything planted there) is removed
/// first, and the new one is made with `O_CREAT | O_EXCL | O_NOFOLLOW`: never through a
/// symbolic link, never someone else's file.
fn create_file(path: &Path, header: &[u8]) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
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

    #[test]
    fn files_go_to_a_private_directory_and_never_through_a_link() {
        use std::os::unix::fs::{MetadataExt, symlink};
        let traces = Traces::start(Settings {
            traces_max: 2,
            bytes_max: 4096,
            directory: None,
        })
        .unwrap();
        let private = traces.directory().to_path_buf();
        let predictable =
            std::env::temp_dir().join(format!("shardmq-traces-{}", std::process::id()));
        assert_ne!(private, predictable);
        let metadata = std::fs::symlink_metadata(&private).unwrap();
        assert!(metadata.file_type().is_dir());
        assert_eq!(metadata.mode() & 0o777, 0o700);
        // A link planted where a trace's file goes is replaced; its target is untouched.
        let victim = private.with_extension("victim");
        std::fs::write(&victim, "precious").unwrap();
        symlink(&victim, private.join(file_name("a"))).unwrap();
        traces.begin("a", 1).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let path = traces.path("a").unwrap();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_file());
        assert_eq!(metadata.mode() & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .starts_with("# shardmq trace of client \"a\"")
        );
        traces.remove_private_directory();
        assert!(!private.exists());
        let _ = std::fs::remove_file(&victim);

        // Under a data directory, a `traces` that is a symbolic link is refused.
        let data = std::env::temp_dir().join(format!("shardmq-trace-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(data.join("elsewhere")).unwrap();
        std::fs::write(data.join("elsewhere").join(file_name("b")), "kept").unwrap();
        symlink(data.join("elsewhere"), data.join("traces")).unwrap();
        let refused = Traces::start(Settings {
            traces_max: 2,
            bytes_max: 4096,
            directory: Some(data.join("traces")),
        })
        .unwrap_err();
        assert!(refused.contains("not a directory"), "{refused}");
        // Nothing behind the link was removed as an old file.
        assert!(data.join("elsewhere").join(file_name("b")).exists());
        let _ = std::fs::remove_dir_all(&data);
    }

    #[test]
    fn ended_traces_are_forgotten_past_their_bound_with_their_files() {
        let directory =
            std::env::temp_dir().join(format!("shardmq-trace-forget-{}", std::process::id()));
        let traces = traces_in(&directory, 4096);
        let kept = 2 * ENDED_PER_ACTIVE;
        for n in 0..kept + 5 {
            let client_id = format!("c{n}");
            traces.begin(&client_id, 1).unwrap();
            traces.stop(&client_id).unwrap();
            // Distinct end times: the oldest is forgotten first.
            std::thread::sleep(Duration::from_millis(3));
        }
        traces.begin("live", 1).unwrap();
        assert_eq!(traces.list().as_array().unwrap().len(), kept + 1);
        for n in 0..5 {
            assert!(traces.path(&format!("c{n}")).is_none(), "c{n} kept");
            assert!(!directory.join(file_name(&format!("c{n}"))).exists());
        }
        for n in 5..kept + 5 {
            assert!(traces.path(&format!("c{n}")).unwrap().exists(), "c{n}");
        }
        assert_eq!(std::fs::read_dir(&directory).unwrap().count(), kept + 1);
        assert_eq!(traces.lock().active.len(), 1);
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn the_list_and_the_writer_go_on_while_a_post_to_a_full_mailbox_waits() {
        use std::sync::mpsc::channel;
        let directory =
            std::env::temp_dir().join(format!("shardmq-trace-post-{}", std::process::id()));
        let traces = traces_in(&directory, 1 << 20);
        traces.begin("a", 1).unwrap();
        // One shard whose mailbox (one message) is full and never drained: a post waits.
        let mailboxes = shardmq_net::reactor::Mailboxes::new(1, 1).unwrap();
        let (sender, _receiver) = oneshot::channel();
        mailboxes.post(0, NodeMessage::Control(Control::Trace(Vec::new(), sender)));
        traces.attach(mailboxes, 1);
        let posting = traces.clone();
        // This thread stays in `post` (yielding) until the test binary ends.
        std::thread::spawn(move || drop(posting.begin("b", 1)));
        std::thread::sleep(Duration::from_millis(200));
        let (done, answers) = channel();
        let asking = traces.clone();
        std::thread::spawn(move || {
            let list = asking.list();
            asking.step(line("a", "written while a post waits\n"), now_ms());
            let _ = done.send(list);
        });
        let list = answers
            .recv_timeout(Duration::from_secs(5))
            .expect("the list's lock was held across a post to a full mailbox");
        assert_eq!(list[1]["client_id"], "b");
        assert_eq!(list[1]["state"], "active");
        let a = std::fs::read_to_string(traces.path("a").unwrap()).unwrap();
        assert!(a.contains("written while a post waits"), "{a}");
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
