//! The per-core io_uring reactor: one thread, one ring, one handler (a shard, an echo server,
//! a load generator).
//!
//! Owns: the sockets of its connections, its listening sockets (one per address, bound with
//! SO_REUSEPORT so the kernel spreads accepts over reactors), its provided buffer ring, and its
//! end of the cross-reactor mailboxes. Shares with the other reactors the [`admission`] table
//! that a connection accepted on a main listener must pass before any of its bytes is read.
//! Never: interprets the bytes it moves (the handler does), blocks anywhere but in the ring's
//! wait, or lets one connection's error touch another.
//!
//! One loop iteration: reap every completion (accepts, receives, sends), drain a bounded batch
//! of mailbox messages, fire the handler's timer if due, let the handler flush the outputs of
//! the whole batch (sends become one `send` per connection, cross-reactor messages one queue
//! push each and one wakeup per target reactor), then submit and wait for the next completion
//! or deadline.
//!
//! Memory bounds: a connection's send queue holds what the handler gave it; the handler learns
//! after each loop's send completions how much is still unsent (`Event::Sent`), so that it can
//! stop giving more to a peer that does not read. A closing connection whose peer takes
//! nothing for [`CLOSE_LINGER`] is cut, so its queue is freed rather than kept forever. The
//! cross-reactor overflow queue is bounded by the mailbox capacity: past it the reactor stops
//! taking client bytes (see `receive_paused`), so nothing is dropped and nothing grows
//! without limit.

pub mod admission;
mod buffers;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tracing::{debug, info, warn};

use admission::{Admission, Ticket};
use buffers::{BUFFER_GROUP, BufferRing};

/// A connection's name: reactor index, slot and generation, so that a completion for a slot's
/// earlier occupant is recognised and ignored, and whether it is a side connection
/// ([`is_side`]).
pub type ConnectionId = u64;

/// The bit of a [`ConnectionId`] that marks a side connection: accepted on the side listener,
/// dialled with [`Actions::connect`], or handed over from another reactor that held it as one.
/// Slots stay far below 2^31 (each is an open socket), so the bit never collides with one.
const SIDE_BIT: u64 = 1 << 31;

fn connection_id(reactor: u16, slot: u32, generation: u32, side: bool) -> ConnectionId {
    debug_assert!(u64::from(slot) < SIDE_BIT, "connection slot out of range");
    let side = if side { SIDE_BIT } else { 0 };
    (u64::from(reactor) << 48) | (u64::from(generation & 0xFFFF) << 32) | side | u64::from(slot)
}

fn slot_of(id: ConnectionId) -> u32 {
    (id & (SIDE_BIT - 1)) as u32
}

/// Whether `id` names a side connection (for the broker, a cluster link) rather than one
/// accepted on a main listener, so that a handler tells the two apart on every event without
/// a lookup.
pub fn is_side(id: ConnectionId) -> bool {
    id & SIDE_BIT != 0
}

/// What happened, told to the handler.
#[derive(Debug)]
pub enum Event<M> {
    /// A connection accepted on a main listener, or handed over by another reactor.
    Opened(ConnectionId),
    /// A connection accepted on the side listener ([`ReactorConfig::side_listen`]; for the
    /// broker, its cluster port), or a side connection handed over by another reactor. Its
    /// id is a side one ([`is_side`]).
    OpenedSide(ConnectionId),
    /// An outbound connection asked for with [`Actions::connect`] is established; its id is
    /// a side one ([`is_side`]).
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
    /// The process is stopping: say goodbye to every connection and close it.
    Shutdown,
}

/// What the handler asks for at the end of a batch.
#[derive(Debug)]
pub struct Actions<M> {
    sends: Vec<(ConnectionId, Bytes)>,
    closes: Vec<ConnectionId>,
    hand_offs: Vec<(ConnectionId, u16, Bytes)>,
    posts: Vec<(u16, M)>,
    connects: Vec<(SocketAddr, Option<std::net::IpAddr>, u64)>,
}

impl<M> Actions<M> {
    fn new() -> Self {
        Self {
            sends: Vec::new(),
            closes: Vec::new(),
            hand_offs: Vec::new(),
            posts: Vec::new(),
            connects: Vec::new(),
        }
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
        self.hand_offs.push((connection, target, bytes));
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
}

/// The code a reactor drives.
pub trait Handler {
    type Message: Send + 'static;
    fn event(&mut self, now_ms: u64, event: Event<Self::Message>);
    /// Moves everything the handled events produced into `actions`.
    fn flush(&mut self, actions: &mut Actions<Self::Message>);
    /// When the handler next wants `Event::Tick`, in microseconds since the epoch.
    fn next_deadline_us(&self) -> Option<u64>;
}

enum Envelope<M> {
    Message(M),
    /// A handed-over socket, the bytes received so far, whether it is a side connection, and
    /// what its admission counted (released where it closes).
    Connection {
        fd: OwnedFd,
        bytes: Bytes,
        side: bool,
        ticket: Option<Ticket>,
    },
}

/// The queues and wakeups between the reactors of one process.
pub struct Mailboxes<M> {
    queues: Vec<ArrayQueue<Envelope<M>>>,
    wakers: Vec<OwnedFd>,
    stop: AtomicBool,
}

impl<M> std::fmt::Debug for Mailboxes<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailboxes")
            .field("reactors", &self.queues.len())
            .finish()
    }
}

impl<M> Mailboxes<M> {
    /// Mailboxes for `count` reactors, each holding up to `capacity` messages.
    pub fn new(count: u16, capacity: usize) -> io::Result<Arc<Self>> {
        let mut wakers = Vec::new();
        for _ in 0..count {
            // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor we own.
            wakers.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(Arc::new(Self {
            queues: (0..count).map(|_| ArrayQueue::new(capacity)).collect(),
            wakers,
            stop: AtomicBool::new(false),
        }))
    }

    fn wake(&self, target: u16) {
        let one: u64 = 1;
        // SAFETY: writes eight bytes from a valid u64 to an eventfd we own; failure (EAGAIN at
        // counter overflow) still leaves the reactor awake.
        unsafe {
            libc::write(
                self.wakers[usize::from(target)].as_raw_fd(),
                (&one as *const u64).cast(),
                8,
            )
        };
    }

    /// Sends `message` to reactor `target` from outside any reactor (a control thread). Waits
    /// while the target's queue is full.
    pub fn post(&self, target: u16, message: M) {
        let mut envelope = Envelope::Message(message);
        while let Err(back) = self.queues[usize::from(target)].push(envelope) {
            envelope = back;
            std::thread::yield_now();
        }
        self.wake(target);
    }

    /// Asks every reactor to shut down.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        for target in 0..self.wakers.len() {
            self.wake(target as u16);
        }
    }
}

/// Settings of one reactor.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    pub index: u16,
    pub listen: Vec<SocketAddr>,
    /// One more listener whose connections the handler tells apart (`Event::OpenedSide`).
    /// Bound without SO_REUSEPORT sharing in mind: give it to one reactor.
    pub side_listen: Option<SocketAddr>,
    pub backlog: i32,
    pub ring_entries: u32,
    /// Receive buffers shared by all connections of the reactor (a power of two).
    pub buffer_count: u16,
    pub buffer_size: usize,
    /// The core to pin the thread to, if any.
    pub core: Option<usize>,
    /// The instant all reactors of the process count milliseconds from.
    pub epoch: Instant,
    /// How long a shutdown may take to flush before connections are cut.
    pub shutdown_grace: Duration,
    /// TCP keepalive for connections accepted on `listen` (not the side listener): set on
    /// the listening sockets, which accepted sockets inherit (Linux copies the options).
    pub tcp_keepalive: Option<TcpKeepalive>,
}

/// TCP keepalive: probe after `idle` without traffic, then every `interval`, and drop the
/// connection after `count` unanswered probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// The oldest kernel with everything the reactor uses (multishot receive).
pub const KERNEL_MINIMUM: (u32, u32) = (6, 0);

/// Fails with a clear message on a kernel older than [`KERNEL_MINIMUM`] or without io_uring.
pub fn check_kernel() -> Result<(), String> {
    // SAFETY: uname writes into the zeroed struct we pass.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return Err("uname failed: cannot tell the kernel version".into());
    }
    // SAFETY: uname NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < KERNEL_MINIMUM {
        return Err(format!(
            "Linux {release} is too old: shardmq needs Linux {}.{} or later (io_uring multishot receive and provided buffer rings)",
            KERNEL_MINIMUM.0, KERNEL_MINIMUM.1
        ));
    }
    let ring = IoUring::new(8).map_err(|error| format!("io_uring is not available ({error}); is it disabled by sysctl kernel.io_uring_disabled?"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("probing io_uring failed: {error}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Read::CODE, "read"),
        (opcode::AsyncCancel::CODE, "cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "the kernel's io_uring lacks the {name} operation: shardmq needs Linux {}.{} or later",
                KERNEL_MINIMUM.0, KERNEL_MINIMUM.1
            ));
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum ConnectionState {
    /// An outbound connect is in flight; the address must live until it completes.
    Connecting {
        tag: u64,
        address: Box<socket2::SockAddr>,
    },
    Open,
    /// Close once sends are done and the receive has ended; tell the handler `Closed` if the
    /// handler did not ask for it.
    Closing {
        tell_handler: bool,
    },
    HandingOff {
        target: u16,
        bytes: BytesMut,
    },
}

#[derive(Debug)]
struct Connection {
    fd: RawFd,
    generation: u32,
    receiving: bool,
    /// A side connection ([`is_side`]): kept when it is handed over.
    side: bool,
    send_queue: SendQueue,
    send_offset: usize,
    sending: bool,
    /// Listed in `sent` for this loop's `Event::Sent`.
    sent_listed: bool,
    /// While closing with a send in flight: when the socket last took bytes (or the close
    /// began). Cut after `CLOSE_LINGER` without progress.
    linger_since: Option<Instant>,
    state: ConnectionState,
    /// What admission counted for this connection (None: not subject to it); released once,
    /// when the connection closes.
    ticket: Option<Ticket>,
}

impl Connection {
    fn unsent_bytes(&self) -> usize {
        self.send_queue.bytes - self.send_offset
    }
}

/// How long a closing connection may keep bytes queued while its peer takes none of them.
/// Then the socket is shut and the queue freed: a peer that stopped reading would otherwise
/// hold its connection slot and send queue for as long as TCP keeps the connection.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Bytes waiting to be sent on one connection, in order. The usual case, one buffer, is held
/// inline, so an idle connection keeps no allocation for sending; a backlog spills into a queue
/// that is freed again once it drains.
#[derive(Debug, Default)]
struct SendQueue {
    front: Option<Bytes>,
    rest: VecDeque<Bytes>,
    /// The length of everything held.
    bytes: usize,
}

impl SendQueue {
    fn push_back(&mut self, bytes: Bytes) {
        self.bytes += bytes.len();
        if self.front.is_none() {
            self.front = Some(bytes);
        } else {
            self.rest.push_back(bytes);
        }
    }

    fn front(&self) -> Option<&Bytes> {
        self.front.as_ref()
    }

    fn pop_front(&mut self) {
        self.bytes -= self.front.as_ref().map_or(0, Bytes::len);
        self.front = self.rest.pop_front();
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
    }

    fn len(&self) -> usize {
        usize::from(self.front.is_some()) + self.rest.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }

    /// Joins everything queued into one buffer, leaving out the first `offset` bytes of the
    /// front (already sent).
    fn merge(&mut self, offset: usize) {
        let total = self
            .front
            .iter()
            .chain(self.rest.iter())
            .map(Bytes::len)
            .sum::<usize>()
            - offset;
        let mut merged = BytesMut::with_capacity(total);
        if let Some(front) = self.front.take() {
            merged.extend_from_slice(&front[offset..]);
        }
        for bytes in std::mem::take(&mut self.rest) {
            merged.extend_from_slice(&bytes);
        }
        self.bytes = total;
        self.front = Some(merged.freeze());
    }
}

// user_data: kind in the top byte, then generation (16 bits) and slot (32 bits).
const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_WAKE: u64 = 4;
const KIND_CANCEL: u64 = 5;
const KIND_CONNECT: u64 = 6;

fn user_data(kind: u64, slot: u32, generation: u32) -> u64 {
    (kind << 56) | (u64::from(generation & 0xFFFF) << 32) | u64::from(slot)
}

/// The admission hook of the accept path: reads the peer's address and checks it against
/// `admission`. A refused socket (or one whose peer is already gone) is closed here, before
/// any of its bytes is read, and None returned; the refusal is counted in `admission` and
/// logged by [`log_refusals`].
fn admit_accepted(admission: &Admission, fd: RawFd, now_ms: u64) -> Option<Ticket> {
    let ip = match admission::peer_ip(fd) {
        Ok(ip) => ip,
        Err(_) => {
            admission.peer_unknown();
            admission::close_refused(fd);
            return None;
        }
    };
    match admission.admit(ip, now_ms) {
        Ok(ticket) => Some(ticket),
        Err(_) => {
            admission::close_refused(fd);
            None
        }
    }
}

/// Logs the admission refusals not reported yet: at most one line a second per reason for
/// the whole process, with the counts, so that a connect storm does not flood the log.
fn log_refusals(admission: &Admission, reactor: u16, now_ms: u64) {
    for report in admission.reports_due(now_ms) {
        warn!(
            reactor,
            limit = report.refusal.key(),
            refused = report.since_last_report,
            refused_total = report.total,
            "connections refused at accept: a connection limit was reached"
        );
    }
}

/// One reactor. Field order matters: the ring is dropped before the buffers it uses.
pub struct Reactor<H: Handler> {
    ring: IoUring,
    buffers: BufferRing,
    config: ReactorConfig,
    mailboxes: Arc<Mailboxes<H::Message>>,
    handler: H,
    listeners: Vec<OwnedFd>,
    connections: Vec<Option<Connection>>,
    free_slots: Vec<u32>,
    generations: Vec<u32>,
    wake_buffer: Box<u64>,
    /// Messages for reactors whose queue was full, retried each iteration: never dropped.
    /// Bounded by backpressure: at `overflow_max` entries the reactor pauses receiving.
    overflow: VecDeque<(u16, Envelope<H::Message>)>,
    /// The overflow length at which receiving pauses: the mailbox capacity, so that the
    /// overflow never holds more than one more mailbox's worth (plus one loop's output).
    overflow_max: usize,
    /// While set, receive completions are held in `held_receives`, unprocessed, with their
    /// buffers kept out of the buffer ring: once the ring runs dry the kernel stops reading
    /// the sockets and TCP flow control slows the clients. Nothing is lost or reordered, and
    /// the reactor keeps draining its own mailbox, so reactors waiting on each other's
    /// mailboxes cannot deadlock. Set at `overflow_max`, cleared at half of it.
    receive_paused: bool,
    /// Receive completions (user data, result, flags) held while paused, in arrival order:
    /// at most one per receive buffer plus one ending completion per connection.
    held_receives: VecDeque<(u64, i32, u32)>,
    /// Open connections (slot, generation) with send completions in this loop, for
    /// `Event::Sent`.
    sent: Vec<(u32, u32)>,
    /// Closing connections waiting for a send (slot, generation), checked against
    /// `CLOSE_LINGER`.
    lingering: Vec<(u32, u32)>,
    accept_paused_until: Option<Instant>,
    /// Reactors this batch put something in the mailbox of; each is woken once, at the end of
    /// the batch.
    to_wake: Vec<u16>,
    /// Connections this batch queued bytes for (reused between batches).
    to_send: Vec<u32>,
    /// The limits connections accepted on `config.listen` must pass, shared by the reactors
    /// of the process; None admits every connection.
    admission: Option<Arc<Admission>>,
    /// The same for the side listener (the cluster port), with limits of its own.
    side_admission: Option<Arc<Admission>>,
}

impl<H: Handler> std::fmt::Debug for Reactor<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("index", &self.config.index)
            .finish()
    }
}

fn listener(
    address: SocketAddr,
    backlog: i32,
    keepalive: Option<TcpKeepalive>,
) -> io::Result<OwnedFd> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if let Some(keepalive) = keepalive {
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(keepalive.idle)
                .with_interval(keepalive.interval)
                .with_retries(keepalive.count),
        )?;
    }
    socket.bind(&address.into()).map_err(|error| {
        io::Error::new(error.kind(), format!("cannot listen on {address}: {error}"))
    })?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

impl<H: Handler> Reactor<H> {
    pub fn new(
        config: ReactorConfig,
        mailboxes: Arc<Mailboxes<H::Message>>,
        handler: H,
    ) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(config.ring_entries)?;
        let buffers = BufferRing::new(&ring.submitter(), config.buffer_count, config.buffer_size)?;
        let listeners = config
            .listen
            .iter()
            .map(|&address| listener(address, config.backlog, config.tcp_keepalive))
            .chain(
                config
                    .side_listen
                    .iter()
                    .map(|&address| listener(address, config.backlog, None)),
            )
            .collect::<io::Result<Vec<_>>>()?;
        let overflow_max = mailboxes.queues.first().map_or(1, ArrayQueue::capacity);
        Ok(Self {
            ring,
            buffers,
            config,
            mailboxes,
            handler,
            listeners,
            connections: Vec::new(),
            free_slots: Vec::new(),
            generations: Vec::new(),
            wake_buffer: Box::new(0),
            overflow: VecDeque::new(),
            overflow_max,
            receive_paused: false,
            held_receives: VecDeque::new(),
            sent: Vec::new(),
            lingering: Vec::new(),
            accept_paused_until: None,
            to_wake: Vec::new(),
            to_send: Vec::new(),
            admission: None,
            side_admission: None,
        })
    }

    /// Subjects connections accepted on the main listeners (not the side listener) to
    /// `admission`'s limits; the reactors of one process share one table.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Checks connections accepted on the side listener against `admission`'s limits.
    pub fn with_side_admission(mut self, admission: Arc<Admission>) -> Self {
        self.side_admission = Some(admission);
        self
    }

    fn now_ms(&self) -> u64 {
        self.config.epoch.elapsed().as_millis() as u64
    }

    fn now_us(&self) -> u64 {
        self.config.epoch.elapsed().as_micros() as u64
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every entry's buffers live in `self` (the wake buffer, the buffer ring, the
        // front of a connection's send queue) until its completion is reaped.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring
                .submit()
                .expect("submitting to a full submission queue");
        }
    }

    fn arm_accept(&mut self, listener: usize) {
        let fd = self.listeners[listener].as_raw_fd();
        self.push(
            opcode::AcceptMulti::new(types::Fd(fd))
                .build()
                .user_data(user_data(KIND_ACCEPT, listener as u32, 0)),
        );
    }

    fn arm_wake(&mut self) {
        let fd = self.mailboxes.wakers[usize::from(self.config.index)].as_raw_fd();
        let buffer = (&mut *self.wake_buffer as *mut u64).cast::<u8>();
        self.push(
            opcode::Read::new(types::Fd(fd), buffer, 8)
                .build()
                .user_data(user_data(KIND_WAKE, 0, 0)),
        );
    }

    fn arm_recv(&mut self, slot: u32) {
        let connection = self.connections[slot as usize]
            .as_mut()
            .expect("a live slot");
        connection.receiving = true;
        let entry = opcode::RecvMulti::new(types::Fd(connection.fd), BUFFER_GROUP)
            .build()
            .user_data(user_data(KIND_RECV, slot, connection.generation));
        self.push(entry);
    }

    fn add_connection(&mut self, fd: RawFd, side: bool, ticket: Option<Ticket>) -> ConnectionId {
        let slot = self.allocate_slot(fd, ConnectionState::Open, side, ticket);
        self.arm_recv(slot);
        let generation = self.connections[slot as usize]
            .as_ref()
            .expect("live")
            .generation;
        connection_id(self.config.index, slot, generation, side)
    }

    fn allocate_slot(
        &mut self,
        fd: RawFd,
        state: ConnectionState,
        side: bool,
        ticket: Option<Ticket>,
    ) -> u32 {
        // SAFETY: `fd` is an open socket owned by the reactor for the duration of this call.
        let _ = socket2::SockRef::from(&unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            .set_tcp_nodelay(true);
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                self.connections.push(None);
                self.generations.push(0);
                (self.connections.len() - 1) as u32
            }
        };
        let generation = self.generations[slot as usize];
        self.connections[slot as usize] = Some(Connection {
            fd,
            generation,
            receiving: false,
            side,
            send_queue: SendQueue::default(),
            send_offset: 0,
            sending: false,
            sent_listed: false,
            linger_since: None,
            state,
            ticket,
        });
        slot
    }

    fn start_connect(
        &mut self,
        address: SocketAddr,
        source: Option<std::net::IpAddr>,
        tag: u64,
    ) -> io::Result<()> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if let Some(source) = source {
            if source.is_ipv4() {
                let one: libc::c_int = 1;
                // SAFETY: setsockopt with a valid int option value on our socket.
                let result = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if result != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            socket.bind(&SocketAddr::new(source, 0).into())?;
        }
        let fd = socket.into_raw_fd();
        let address = Box::new(socket2::SockAddr::from(address));
        let (pointer, length) = (address.as_ptr(), address.len());
        let slot = self.allocate_slot(fd, ConnectionState::Connecting { tag, address }, true, None);
        let generation = self.connections[slot as usize]
            .as_ref()
            .expect("live")
            .generation;
        // The connection's `sending` flag stands for the connect in flight.
        self.connections[slot as usize]
            .as_mut()
            .expect("live")
            .sending = true;
        self.push(
            opcode::Connect::new(types::Fd(fd), pointer.cast(), length)
                .build()
                .user_data(user_data(KIND_CONNECT, slot, generation)),
        );
        Ok(())
    }

    fn complete_connect(&mut self, now_ms: u64, slot: u32, generation: u32, result: i32) {
        if !self.live(slot, generation) {
            return;
        }
        let connection = self.connections[slot as usize].as_mut().expect("live");
        connection.sending = false;
        let ConnectionState::Connecting { tag, .. } = connection.state else {
            return;
        };
        if result < 0 {
            connection.state = ConnectionState::Closing {
                tell_handler: false,
            };
            self.finish(now_ms, slot);
            self.handler.event(
                now_ms,
                Event::ConnectFailed(tag, io::Error::from_raw_os_error(-result)),
            );
            return;
        }
        connection.state = ConnectionState::Open;
        let id = connection_id(self.config.index, slot, connection.generation, true);
        self.arm_recv(slot);
        self.handler.event(now_ms, Event::Connected(id, tag));
    }

    fn live(&self, slot: u32, generation: u32) -> bool {
        self.connections
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.generation & 0xFFFF == generation & 0xFFFF)
    }

    fn lookup(&mut self, id: ConnectionId) -> Option<(u32, &mut Connection)> {
        let slot = slot_of(id);
        let generation = ((id >> 32) & 0xFFFF) as u32;
        if (id >> 48) as u16 != self.config.index || !self.live(slot, generation) {
            return None;
        }
        Some((
            slot,
            self.connections[slot as usize].as_mut().expect("live"),
        ))
    }

    /// Runs until the mailboxes say stop and the connections are flushed; returns the handler.
    pub fn run(mut self) -> io::Result<H> {
        if let Some(core) = self.config.core
            && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
        {
            warn!(
                reactor = self.config.index,
                core, "could not pin the reactor thread to its core"
            );
        }
        for listener in 0..self.listeners.len() {
            self.arm_accept(listener);
        }
        self.arm_wake();
        let mut actions = Actions::new();
        let mut completions = Vec::with_capacity(1024);
        let mut stopping_since: Option<Instant> = None;
        loop {
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            let now_ms = self.now_ms();
            let mut returned_buffers = false;
            for &(data, result, flags) in &completions {
                returned_buffers |= self.complete(now_ms, data, result, flags);
            }
            if returned_buffers {
                self.buffers.commit();
            }
            self.report_sent(now_ms);
            self.drain_mailbox(now_ms);
            for admission in [&self.admission, &self.side_admission]
                .into_iter()
                .flatten()
            {
                log_refusals(admission, self.config.index, now_ms);
            }
            self.resume_receiving(now_ms);
            if self
                .accept_paused_until
                .is_some_and(|until| Instant::now() >= until)
            {
                self.accept_paused_until = None;
                for listener in 0..self.listeners.len() {
                    self.arm_accept(listener);
                }
            }
            if stopping_since.is_none() && self.mailboxes.stop.load(Ordering::Acquire) {
                stopping_since = Some(Instant::now());
                info!(reactor = self.config.index, "shutting down");
                self.listeners.clear();
                self.handler.event(now_ms, Event::Shutdown);
            }
            if self
                .handler
                .next_deadline_us()
                .is_some_and(|deadline| deadline <= self.now_us())
            {
                self.handler.event(now_ms, Event::Tick);
            }
            self.handler.flush(&mut actions);
            self.apply(&mut actions);
            self.cut_lingering();
            if let Some(since) = stopping_since {
                let open = self.connections.iter().flatten().count();
                if open == 0 || since.elapsed() >= self.config.shutdown_grace {
                    if open > 0 {
                        warn!(
                            reactor = self.config.index,
                            open, "shutdown grace period over: cutting the remaining connections"
                        );
                    }
                    return Ok(self.handler);
                }
            }
            let timeout = self.wait_timeout(stopping_since.is_some());
            let timespec = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&timespec);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(error) => return Err(error),
            }
        }
    }

    fn wait_timeout(&self, stopping: bool) -> Duration {
        if !self.overflow.is_empty() || stopping {
            return Duration::from_millis(1);
        }
        let now_us = self.now_us();
        let mut timeout = Duration::from_secs(1);
        for &(slot, _) in &self.lingering {
            if let Some(since) = self.connections[slot as usize]
                .as_ref()
                .and_then(|c| c.linger_since)
            {
                timeout = timeout.min(
                    (since + CLOSE_LINGER)
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                );
            }
        }
        if let Some(deadline) = self.handler.next_deadline_us() {
            timeout = timeout.min(Duration::from_micros(
                deadline.saturating_sub(now_us).max(1),
            ));
        }
        if let Some(until) = self.accept_paused_until {
            timeout = timeout.min(
                until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            );
        }
        timeout
    }

    /// Handles one completion; returns whether a receive buffer went back to the ring.
    fn complete(&mut self, now_ms: u64, data: u64, result: i32, flags: u32) -> bool {
        let kind = data >> 56;
        let slot = data as u32;
        let generation = ((data >> 32) & 0xFFFF) as u32;
        match kind {
            KIND_ACCEPT => {
                if result >= 0 {
                    self.accepted(now_ms, slot, result);
                } else if matches!(
                    -result,
                    libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
                ) {
                    if self.accept_paused_until.is_none() {
                        warn!(reactor = self.config.index, error = %io::Error::from_raw_os_error(-result), "accept failed: pausing accepts for 100 ms (raise the open-file limit for more connections)");
                    }
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return false;
                }
                if !cqueue::more(flags)
                    && (slot as usize) < self.listeners.len()
                    && self.accept_paused_until.is_none()
                {
                    self.arm_accept(slot as usize);
                }
                false
            }
            KIND_RECV if self.receive_paused || !self.held_receives.is_empty() => {
                self.held_receives.push_back((data, result, flags));
                false
            }
            KIND_RECV => self.complete_recv(now_ms, slot, generation, result, flags),
            KIND_SEND => {
                self.complete_send(now_ms, slot, generation, result);
                false
            }
            KIND_WAKE => {
                self.arm_wake();
                false
            }
            KIND_CONNECT => {
                self.complete_connect(now_ms, slot, generation, result);
                false
            }
            _ => false,
        }
    }

    /// A socket accepted on listener `listener`: one on a main listener must pass admission
    /// first (a refused one is closed before any of its bytes is read); then the handler
    /// hears of it.
    fn accepted(&mut self, now_ms: u64, listener: u32, fd: RawFd) {
        let main = (listener as usize) < self.config.listen.len();
        let table = if main {
            &self.admission
        } else {
            &self.side_admission
        };
        let ticket = match table {
            Some(admission) => match admit_accepted(admission, fd, now_ms) {
                Some(ticket) => Some(ticket),
                None => return,
            },
            None => None,
        };
        let id = self.add_connection(fd, !main, ticket);
        let event = if main {
            Event::Opened(id)
        } else {
            Event::OpenedSide(id)
        };
        self.handler.event(now_ms, event);
    }

    fn complete_recv(
        &mut self,
        now_ms: u64,
        slot: u32,
        generation: u32,
        result: i32,
        flags: u32,
    ) -> bool {
        let mut returned = false;
        let data = match cqueue::buffer_select(flags) {
            Some(id) => {
                let bytes = (result > 0)
                    .then(|| Bytes::copy_from_slice(self.buffers.get(id, result as usize)));
                self.buffers.push(id);
                returned = true;
                bytes
            }
            None => None,
        };
        if !self.live(slot, generation) {
            return returned;
        }
        let more = cqueue::more(flags);
        let connection = self.connections[slot as usize].as_mut().expect("live");
        let id = connection_id(self.config.index, slot, generation, connection.side);
        if !more {
            connection.receiving = false;
        }
        match (&mut connection.state, data) {
            (ConnectionState::HandingOff { bytes, .. }, Some(data)) => {
                bytes.extend_from_slice(&data)
            }
            (ConnectionState::Open, Some(data)) => {
                self.handler.event(now_ms, Event::Received(id, data))
            }
            (_, Some(_)) => {}
            (_, None) => {
                if result == -libc::ENOBUFS && connection.state == ConnectionState::Open {
                    // Every buffer was in use: receive again now that some are back.
                    debug!(
                        reactor = self.config.index,
                        "receive buffers exhausted; re-arming"
                    );
                } else if connection.state == ConnectionState::Open {
                    // End of stream or an error: the connection is over.
                    connection.state = ConnectionState::Closing { tell_handler: true };
                    if connection.sending {
                        connection.linger_since = Some(Instant::now());
                        self.lingering.push((slot, generation));
                    }
                }
            }
        }
        let connection = self.connections[slot as usize].as_mut().expect("live");
        if !connection.receiving && connection.state == ConnectionState::Open {
            self.arm_recv(slot);
        } else if !connection.receiving {
            self.finish(now_ms, slot);
        }
        returned
    }

    fn complete_send(&mut self, now_ms: u64, slot: u32, generation: u32, result: i32) {
        if !self.live(slot, generation) {
            return;
        }
        let connection = self.connections[slot as usize].as_mut().expect("live");
        connection.sending = false;
        if result < 0 {
            // The peer is gone; what was queued cannot be delivered.
            connection.send_queue.clear();
            if connection.state == ConnectionState::Open {
                connection.state = ConnectionState::Closing { tell_handler: true };
            }
            self.shut(slot);
            self.finish(now_ms, slot);
            return;
        }
        connection.send_offset += result as usize;
        if connection
            .send_queue
            .front()
            .is_some_and(|front| connection.send_offset >= front.len())
        {
            connection.send_queue.pop_front();
            connection.send_offset = 0;
        }
        if connection.linger_since.is_some() {
            connection.linger_since = Some(Instant::now());
        }
        if connection.state == ConnectionState::Open && !connection.sent_listed {
            connection.sent_listed = true;
            self.sent.push((slot, generation));
        }
        self.start_send(slot);
        let connection = self.connections[slot as usize].as_ref().expect("live");
        if !connection.sending && matches!(connection.state, ConnectionState::Closing { .. }) {
            self.shut(slot);
            self.finish(now_ms, slot);
        }
    }

    fn start_send(&mut self, slot: u32) {
        let connection = self.connections[slot as usize].as_mut().expect("live");
        if connection.sending {
            return;
        }
        // Merge small queued buffers into one send.
        if connection.send_queue.len() > 1 {
            connection.send_queue.merge(connection.send_offset);
            connection.send_offset = 0;
        }
        let Some(front) = connection.send_queue.front() else {
            return;
        };
        let pointer = front[connection.send_offset..].as_ptr();
        let length = (front.len() - connection.send_offset) as u32;
        connection.sending = true;
        let entry = opcode::Send::new(types::Fd(connection.fd), pointer, length)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(KIND_SEND, slot, connection.generation));
        self.push(entry);
    }

    /// Shuts the socket down so that its pending receive ends.
    fn shut(&mut self, slot: u32) {
        let connection = self.connections[slot as usize].as_ref().expect("live");
        // SAFETY: shutdown on a descriptor we own; errors (already shut) are harmless.
        unsafe { libc::shutdown(connection.fd, libc::SHUT_RDWR) };
    }

    /// Frees the slot once nothing is in flight: closes the socket, or passes it on.
    fn finish(&mut self, now_ms: u64, slot: u32) {
        let connection = self.connections[slot as usize].as_ref().expect("live");
        if connection.receiving || connection.sending {
            return;
        }
        let connection = self.connections[slot as usize].take().expect("live");
        let id = connection_id(
            self.config.index,
            slot,
            connection.generation,
            connection.side,
        );
        self.generations[slot as usize] = connection.generation.wrapping_add(1);
        self.free_slots.push(slot);
        // SAFETY: the descriptor is ours and nothing in the ring refers to it any more.
        let fd = unsafe { OwnedFd::from_raw_fd(connection.fd) };
        match connection.state {
            ConnectionState::HandingOff { target, bytes } => {
                self.post(
                    target,
                    Envelope::Connection {
                        fd,
                        bytes: bytes.freeze(),
                        side: connection.side,
                        ticket: connection.ticket,
                    },
                );
            }
            ConnectionState::Closing { tell_handler } => {
                drop(fd);
                // A ticket goes back to the table that issued it: side connections (the
                // cluster port) have their own.
                let table = if connection.side {
                    &self.side_admission
                } else {
                    &self.admission
                };
                if let (Some(admission), Some(ticket)) = (table, connection.ticket) {
                    admission.release(ticket);
                }
                if tell_handler {
                    self.handler.event(now_ms, Event::Closed(id));
                }
            }
            ConnectionState::Open | ConnectionState::Connecting { .. } => {
                unreachable!("finish is called on closing connections only")
            }
        }
    }

    /// Tells the handler, once per connection, how much is unsent after this loop's send
    /// completions.
    fn report_sent(&mut self, now_ms: u64) {
        let mut sent = std::mem::take(&mut self.sent);
        for (slot, generation) in sent.drain(..) {
            if !self.live(slot, generation) {
                continue;
            }
            let connection = self.connections[slot as usize].as_mut().expect("live");
            connection.sent_listed = false;
            if connection.state == ConnectionState::Open {
                let unsent_bytes = connection.unsent_bytes();
                let id = connection_id(self.config.index, slot, generation, connection.side);
                self.handler.event(now_ms, Event::Sent(id, unsent_bytes));
            }
        }
        self.sent = sent;
    }

    /// Shuts closing connections whose peer has taken nothing for `CLOSE_LINGER`: the send in
    /// flight then fails and the connection, with its queue, is freed.
    fn cut_lingering(&mut self) {
        if self.lingering.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut lingering = std::mem::take(&mut self.lingering);
        lingering.retain(|&(slot, generation)| {
            if !self.live(slot, generation) {
                return false;
            }
            let connection = self.connections[slot as usize].as_mut().expect("live");
            let Some(since) = connection.linger_since.filter(|_| connection.sending) else {
                return false;
            };
            if now.duration_since(since) < CLOSE_LINGER {
                return true;
            }
            connection.linger_since = None;
            debug!(
                reactor = self.config.index,
                unsent = connection.unsent_bytes(),
                "closing connection cut: its peer took nothing for the linger time"
            );
            // SAFETY: shutdown on a descriptor we own; errors (already shut) are harmless.
            unsafe { libc::shutdown(connection.fd, libc::SHUT_RDWR) };
            false
        });
        self.lingering = lingering;
    }

    /// Pauses receiving while the overflow is at its bound; once it has drained to half,
    /// handles the held receive completions in order and receives again.
    fn resume_receiving(&mut self, now_ms: u64) {
        if !self.receive_paused && self.overflow.len() >= self.overflow_max {
            self.receive_paused = true;
            warn!(
                reactor = self.config.index,
                queued = self.overflow.len(),
                "other shards' mailboxes are full: pausing reads from clients"
            );
        } else if self.receive_paused && self.overflow.len() <= self.overflow_max / 2 {
            self.receive_paused = false;
            info!(
                reactor = self.config.index,
                held = self.held_receives.len(),
                "reading from clients again"
            );
        }
        if self.receive_paused || self.held_receives.is_empty() {
            return;
        }
        let mut returned = false;
        while let Some((data, result, flags)) = self.held_receives.pop_front() {
            let slot = data as u32;
            let generation = ((data >> 32) & 0xFFFF) as u32;
            returned |= self.complete_recv(now_ms, slot, generation, result, flags);
        }
        if returned {
            self.buffers.commit();
        }
    }

    fn post(&mut self, target: u16, envelope: Envelope<H::Message>) {
        if !self.overflow.is_empty() {
            self.overflow.push_back((target, envelope));
            return;
        }
        match self.mailboxes.queues[usize::from(target)].push(envelope) {
            Ok(()) => self.mark_for_wake(target),
            Err(envelope) => self.overflow.push_back((target, envelope)),
        }
    }

    fn mark_for_wake(&mut self, target: u16) {
        if !self.to_wake.contains(&target) {
            self.to_wake.push(target);
        }
    }

    fn drain_mailbox(&mut self, now_ms: u64) {
        // A bounded batch per iteration, so completions are not starved.
        for _ in 0..4096 {
            let Some(envelope) = self.mailboxes.queues[usize::from(self.config.index)].pop() else {
                break;
            };
            match envelope {
                Envelope::Message(message) => self.handler.event(now_ms, Event::Message(message)),
                Envelope::Connection {
                    fd,
                    bytes,
                    side,
                    ticket,
                } => {
                    let id = self.add_connection(fd.into_raw_fd(), side, ticket);
                    if side {
                        self.handler.event(now_ms, Event::OpenedSide(id));
                    } else {
                        self.handler.event(now_ms, Event::Opened(id));
                    }
                    if !bytes.is_empty() {
                        self.handler.event(now_ms, Event::Received(id, bytes));
                    }
                }
            }
        }
        // Retry what did not fit before, in order.
        while let Some((target, envelope)) = self.overflow.pop_front() {
            match self.mailboxes.queues[usize::from(target)].push(envelope) {
                Ok(()) => self.mark_for_wake(target),
                Err(envelope) => {
                    self.overflow.push_front((target, envelope));
                    break;
                }
            }
        }
    }

    fn apply(&mut self, actions: &mut Actions<H::Message>) {
        let mut to_send = std::mem::take(&mut self.to_send);
        for (id, bytes) in actions.sends.drain(..) {
            if let Some((slot, connection)) = self.lookup(id)
                && !matches!(connection.state, ConnectionState::HandingOff { .. })
            {
                // A connection's first buffer of the batch lists it; later ones join its queue.
                if connection.send_queue.len() == 0 {
                    to_send.push(slot);
                }
                connection.send_queue.push_back(bytes);
            }
        }
        for slot in to_send.drain(..) {
            self.start_send(slot);
        }
        self.to_send = to_send;
        let now_ms = self.now_ms();
        for id in actions.closes.drain(..) {
            if let Some((slot, connection)) = self.lookup(id)
                && connection.state == ConnectionState::Open
            {
                connection.state = ConnectionState::Closing {
                    tell_handler: false,
                };
                if connection.sending {
                    connection.linger_since = Some(Instant::now());
                    let generation = connection.generation;
                    self.lingering.push((slot, generation));
                } else {
                    self.shut(slot);
                    self.finish(now_ms, slot);
                }
            }
        }
        for (id, target, bytes) in actions.hand_offs.drain(..) {
            if let Some((slot, connection)) = self.lookup(id) {
                connection.state = ConnectionState::HandingOff {
                    target,
                    bytes: BytesMut::from(&bytes[..]),
                };
                let receive = user_data(KIND_RECV, slot, connection.generation);
                if connection.receiving {
                    self.push(
                        opcode::AsyncCancel::new(receive)
                            .build()
                            .user_data(user_data(KIND_CANCEL, slot, 0)),
                    );
                }
                self.finish(now_ms, slot);
            }
        }
        for (address, source, tag) in actions.connects.drain(..) {
            if let Err(error) = self.start_connect(address, source, tag) {
                self.handler.event(now_ms, Event::ConnectFailed(tag, error));
            }
        }
        for (target, message) in actions.posts.drain(..) {
            self.post(target, Envelope::Message(message));
        }
        // One wakeup per reactor that got messages or connections in this batch.
        for target in self.to_wake.drain(..) {
            self.mailboxes.wake(target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_id_keeps_its_kind_apart_from_its_slot_and_generation() {
        for side in [false, true] {
            let id = connection_id(3, 0x7FFF_FFFF, 0x1_2345, side);
            assert_eq!(is_side(id), side);
            assert_eq!(slot_of(id), 0x7FFF_FFFF);
            assert_eq!(
                (id >> 32) & 0xFFFF,
                0x2345,
                "the generation keeps its 16 bits"
            );
            assert_eq!((id >> 48) as u16, 3);
        }
        assert_ne!(connection_id(0, 5, 1, false), connection_id(0, 5, 1, true));
    }

    #[test]
    fn send_queue_keeps_order_merges_after_a_partial_send_and_frees_its_spill() {
        let mut queue = SendQueue::default();
        assert_eq!(queue.len(), 0);
        queue.push_back(Bytes::from_static(b"hello "));
        queue.push_back(Bytes::from_static(b"brave "));
        queue.push_back(Bytes::from_static(b"world"));
        assert_eq!(queue.len(), 3);
        // Three bytes of the front were already sent.
        queue.merge(3);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.front().map(|b| &b[..]), Some(&b"lo brave world"[..]));
        assert_eq!(
            queue.rest.capacity(),
            0,
            "the spill queue is freed by the merge"
        );
        queue.push_back(Bytes::from_static(b"a"));
        queue.push_back(Bytes::from_static(b"b"));
        queue.pop_front();
        assert_eq!(queue.front().map(|b| &b[..]), Some(&b"a"[..]));
        queue.pop_front();
        assert_eq!(queue.front().map(|b| &b[..]), Some(&b"b"[..]));
        assert_eq!(queue.rest.capacity(), 0, "drained: no allocation kept");
        queue.pop_front();
        assert!(queue.front().is_none());
    }
}
