//! The interface between a reactor and the code it drives: the [`Handler`] trait, the
//! [`Event`]s the reactor tells it, and the [`Actions`] it asks for at the end of a batch.
//!
//! Never: holds a socket or a ring entry. Actions are only collected here; the reactor carries
//! them out (`apply` in `mod.rs`, file operations in `files.rs`) after the handler's flush.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;

use super::ConnectionId;

/// Where a connection on a main listener came from: which listener accepted it (its index in
/// [`ReactorConfig::listen`](super::ReactorConfig::listen)) and the peer's address as the
/// socket saw it. Kept across hand-offs between reactors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub listener: u16,
    /// None when the peer was gone before its address could be read (possible only where no
    /// admission table asked for it).
    pub peer: Option<SocketAddr>,
}

/// What happened, told to the handler.
#[derive(Debug)]
pub enum Event<M> {
    /// A connection accepted on a main listener, or handed over by another reactor (which
    /// keeps the [`Origin`] it was accepted with).
    Opened(ConnectionId, Origin),
    /// A connection handed over by another reactor with [`Actions::hand_off_carrying`]:
    /// instead of `Opened`, with what the other reactor's handler attached (the connection's
    /// state above the socket, say a TLS session). `Received` follows with the bytes that
    /// arrived while it moved, as they came from the socket.
    Adopted(ConnectionId, Origin, M),
    /// A connection accepted on the side listener
    /// ([`ReactorConfig::side_listen`](super::ReactorConfig::side_listen); for the broker, its
    /// cluster port), or a side connection handed over by another reactor. Its id is a side
    /// one ([`is_side`](super::is_side)).
    OpenedSide(ConnectionId),
    /// An outbound connection asked for with [`Actions::connect`] is established; its id is
    /// a side one ([`is_side`](super::is_side)).
    Connected(ConnectionId, u64),
    /// An outbound connection failed; the tag says which.
    ConnectFailed(u64, io::Error),
    Received(ConnectionId, Bytes),
    /// The socket took some of the connection's bytes: this many of those given with
    /// [`Actions::send`] are not sent yet. Told once per loop for each open connection that
    /// had send completions, after them all.
    Sent(ConnectionId, usize),
    Closed(ConnectionId),
    Message(M),
    /// The handler's deadline has passed.
    Tick,
    /// The process is stopping: say goodbye to every connection and close it. File
    /// operations queued before or after this still run before the reactor's thread ends.
    Shutdown,
}

/// One file operation a handler asks its reactor to carry out on the reactor's io_uring ring.
///
/// `file` is one of the reactor's file slots (`0..file_slots`, see
/// [`Reactor::with_file_slots`](super::Reactor::with_file_slots)): a registered (direct)
/// descriptor of this reactor, shared by all its file queues.
#[derive(Debug)]
pub enum FileOp {
    /// Opens `path` for writing (O_WRONLY, plus O_CREAT with mode 0o600 when `create`; never
    /// truncates) into slot `file`. A slot already in use, or out of range, is an error of the
    /// op. (A direct descriptor is not in the process's descriptor table, so it cannot leak
    /// into a child: the kernel refuses O_CLOEXEC for it, and it needs none.)
    Open {
        file: u32,
        path: PathBuf,
        create: bool,
    },
    /// Writes all of `bytes` at `offset` (short writes are continued by the reactor).
    Write {
        file: u32,
        offset: u64,
        bytes: Bytes,
    },
    /// fdatasync.
    Datasync { file: u32 },
    /// Opens the directory, fsyncs it, closes it (makes created and removed names durable).
    SyncDirectory { path: PathBuf },
    /// Closes the slot, which is free again once this completes.
    Close { file: u32 },
    /// unlink.
    Remove { path: PathBuf },
}

/// What the handler asks for at the end of a batch.
#[derive(Debug)]
pub struct Actions<M> {
    pub(super) sends: Vec<(ConnectionId, Bytes)>,
    pub(super) closes: Vec<ConnectionId>,
    pub(super) hand_offs: Vec<(ConnectionId, u16, Bytes, Option<M>)>,
    pub(super) posts: Vec<(u16, M)>,
    pub(super) connects: Vec<(SocketAddr, Option<std::net::IpAddr>, u64)>,
    pub(super) files: Vec<(u16, u64, Vec<FileOp>)>,
    pub(super) admits: Vec<(ConnectionId, std::net::IpAddr)>,
}

impl<M> Actions<M> {
    pub(super) fn new() -> Self {
        Self {
            sends: Vec::new(),
            closes: Vec::new(),
            hand_offs: Vec::new(),
            posts: Vec::new(),
            connects: Vec::new(),
            files: Vec::new(),
            admits: Vec::new(),
        }
    }

    /// Finishes the deferred admission of a connection accepted on a listener of
    /// [`crate::reactor::Reactor::with_deferred_admission`] from a trusted balancer: the
    /// per-address limits are checked for `client` (the address its PROXY header named, or
    /// the socket's peer when it named none); a refused connection is closed (the handler
    /// hears `Closed`). Applied before the batch's hand-offs, so it reaches the connection
    /// on this reactor; ignored for a connection not waiting for it.
    pub fn admit_address(&mut self, connection: ConnectionId, client: std::net::IpAddr) {
        self.admits.push((connection, client));
    }

    pub fn send(&mut self, connection: ConnectionId, bytes: Bytes) {
        self.sends.push((connection, bytes));
    }

    /// Closes the connection after the bytes queued for it are sent.
    pub fn close(&mut self, connection: ConnectionId) {
        self.closes.push(connection);
    }

    /// Moves the connection to reactor `target`, whose handler sees it open and receive `bytes`
    /// (followed by anything that arrives meanwhile).
    pub fn hand_off(&mut self, connection: ConnectionId, target: u16, bytes: Bytes) {
        self.hand_offs.push((connection, target, bytes, None));
    }

    /// Moves a main listener's connection to reactor `target` with `carried` attached: that
    /// reactor's handler sees `Adopted(id, origin, carried)`, then `Received` with `bytes`
    /// and whatever arrived meanwhile, raw. The socket moves once the bytes queued for it
    /// are sent, so a stream state carried along (a TLS session's record numbers) stays
    /// consistent with what the peer got.
    pub fn hand_off_carrying(
        &mut self,
        connection: ConnectionId,
        target: u16,
        bytes: Bytes,
        carried: M,
    ) {
        self.hand_offs
            .push((connection, target, bytes, Some(carried)));
    }

    pub fn post(&mut self, target: u16, message: M) {
        self.posts.push((target, message));
    }

    /// Opens a TCP connection to `address`, from `source` if given (bound with
    /// IP_BIND_ADDRESS_NO_PORT, so that the port is chosen per destination and many source
    /// addresses multiply the connections one host can open). The handler then sees
    /// `Connected(id, tag)` or `ConnectFailed(tag, error)`.
    pub fn connect(&mut self, address: SocketAddr, source: Option<std::net::IpAddr>, tag: u64) {
        self.connects.push((address, source, tag));
    }

    /// Queues `ops` on file queue `queue`: the ops of one queue run one after another in the
    /// order given, across calls (FIFO), each only after the one before completed; different
    /// queues are independent. When the last op of this call completes the handler gets
    /// `Event::FilesDone { queue, tag, result: Ok(()) }`; at the first failing op the rest of
    /// this call's ops are skipped and `result` is that error (later calls still run). An
    /// empty call completes at once, after the calls queued before it. The handler hears of it
    /// through [`Handler::files_done`] (files-api.md's `Event::FilesDone`).
    pub fn files(&mut self, queue: u16, tag: u64, ops: Vec<FileOp>) {
        self.files.push((queue, tag, ops));
    }
}

/// The code a reactor drives.
pub trait Handler {
    type Message: Send + 'static;
    fn event(&mut self, now_ms: u64, event: Event<Self::Message>);
    /// Moves everything the handled events produced into `actions`.
    fn flush(&mut self, actions: &mut Actions<Self::Message>);
    /// When the handler next wants `Event::Tick`, in microseconds since the epoch.
    fn next_deadline_us(&self) -> Option<u64>;
    /// The last operation of one [`Actions::files`] call on `queue` completed (`Ok`), or one
    /// of them failed and the rest of that call was skipped (the error). Called like `event`,
    /// before the next `flush`.
    ///
    /// A method rather than an [`Event`] variant so that the handlers that do no file I/O
    /// need no new match arm; a handler that calls [`Actions::files`] must implement it (the
    /// default treats a completion nobody asked to hear of as the programmer error it is).
    fn files_done(&mut self, now_ms: u64, queue: u16, tag: u64, result: io::Result<()>) {
        let _ = (now_ms, result);
        panic!(
            "file call {tag} on queue {queue} completed, but the handler does not implement Handler::files_done"
        );
    }
}
