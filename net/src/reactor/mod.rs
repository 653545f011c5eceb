//! The per-core io_uring reactor: one thread, one ring, one handler (a shard, an echo server,
//! a load generator).
//!
//! Owns: the sockets of its connections, its listening sockets (one per address, bound with
//! SO_REUSEPORT so the kernel spreads accepts over reactors), its provided buffer ring, and its
//! end of the cross-reactor mailboxes. Shares with the other reactors the [`admission`] table
//! and the per-listener connection counts ([`admission::ListenerLimits`]) that a connection
//! accepted on a main listener must pass before any of its bytes is read.
//! Never: interprets the bytes it moves (the handler does), blocks anywhere but in the ring's
//! wait, or lets one connection's error touch another.
//!
//! One loop iteration: reap every completion (accepts, receives, sends), drain a bounded batch
//! of mailbox messages, fire the handler's timer if due, let the handler flush the outputs of
//! the whole batch (sends become one `send` per connection, cross-reactor messages one queue
//! push each and one wakeup per target reactor), then submit and wait for the next completion
//! or deadline (not at all while the mailbox still holds messages the bounded drain left: their
//! wakeup was read already).
//!
//! Memory bounds: a connection's send queue holds what the handler gave it; the handler learns
//! after each loop's send completions how much is still unsent (`Event::Sent`), so that it can
//! stop giving more to a peer that does not read. A closing connection whose peer takes
//! nothing for [`CLOSE_LINGER`] is cut, so its queue is freed rather than kept forever. The
//! cross-reactor overflow queue is bounded by the mailbox capacity: past it the reactor stops
//! taking client bytes (see `receive_paused`), so nothing is dropped and nothing grows
//! without limit.
//!
//! The files follow the loop's seams: this one holds the [`Reactor`] itself, its settings, the
//! run loop, completion dispatch and the carrying out of [`Actions`]; `handler.rs` the
//! interface to the handler ([`Handler`], [`Event`], [`Actions`]); `mailbox.rs` the
//! cross-reactor [`Mailboxes`], their drain and the overflow backpressure; `connection.rs` the
//! connection table, ids and send queues; `accept.rs`, `connect.rs`, `receive.rs`, `send.rs`
//! and `close.rs` one completion path each; `files.rs` the file table and the file queues
//! ([`Actions::files`]); `kernel.rs` the kernel check; `admission.rs` the admission limits;
//! `buffers.rs` the provided buffer ring.

mod accept;
pub mod admission;
mod buffers;
mod close;
mod connect;
mod connection;
mod files;
mod handler;
mod kernel;
mod mailbox;
mod receive;
mod send;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use io_uring::{IoUring, opcode, squeue, types};
use tracing::{info, warn};

use accept::{listener, log_refusals};
use admission::{Admission, ListenerLimits};
use buffers::BufferRing;
use connection::{Connection, ConnectionState};
use files::Files;
use mailbox::Envelope;

pub use close::CLOSE_LINGER;
pub use connection::{ConnectionId, is_side};
pub use files::{DIRECTORY_SLOTS, FILE_SLOTS_DEFAULT, FILES_SHUTDOWN_MAX};
pub use handler::{Actions, Event, FileOp, Handler, Origin};
pub use kernel::{KERNEL_MINIMUM, check_kernel};
pub use mailbox::Mailboxes;

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

// user_data: kind in the top byte, then generation (16 bits) and slot (32 bits); for
// `KIND_FILE`, the queue's operation number (16 bits) and the queue (in the low 16 bits).
const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_WAKE: u64 = 4;
const KIND_CANCEL: u64 = 5;
const KIND_CONNECT: u64 = 6;
const KIND_FILE: u64 = 7;

fn user_data(kind: u64, slot: u32, generation: u32) -> u64 {
    (kind << 56) | (u64::from(generation & 0xFFFF) << 32) | u64::from(slot)
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
    /// Per main listener, the balancers whose connections' per-address admission waits for
    /// the handler's `Actions::admit_address` (a PROXY listener's `proxy_trusted`).
    deferred_admission: Vec<Option<crate::networks::TrustedNetworks>>,
    /// Each main listener's `connections_max`, shared by the reactors of the process; None
    /// leaves the listeners unbounded.
    listener_limits: Option<Arc<ListenerLimits>>,
    /// The registered file table and the handler's file queues.
    files: Files,
    /// What handlers attached to connections being handed off (`Actions::hand_off_carrying`),
    /// by slot, until the slot is freed and the connection posted: at most one per
    /// connection in `HandingOff`.
    carried: Vec<(u32, H::Message)>,
}

impl<H: Handler> std::fmt::Debug for Reactor<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("index", &self.config.index)
            .finish()
    }
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
        let files = Files::register(&ring.submitter(), FILE_SLOTS_DEFAULT)?;
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
            deferred_admission: Vec::new(),
            side_admission: None,
            listener_limits: None,
            files,
            carried: Vec::new(),
        })
    }

    /// Gives the handler `count` file slots (`0..count`) instead of [`FILE_SLOTS_DEFAULT`].
    /// Call it before `run`, with no file open.
    pub fn with_file_slots(mut self, count: u32) -> io::Result<Self> {
        debug_assert!(
            self.files.idle(),
            "file slots changed while files are in use"
        );
        let submitter = self.ring.submitter();
        submitter.unregister_files()?;
        self.files = Files::register(&submitter, count)?;
        Ok(self)
    }

    /// Subjects connections accepted on the main listeners (not the side listener) to
    /// `admission`'s limits; the reactors of one process share one table.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// On the main listener of index `i`, a connection from a peer inside `trusted[i]` passes
    /// only the node-wide rate at accept; its per-address limits are checked when the handler
    /// names its real address (`Actions::admit_address`, after its PROXY header). Without it
    /// every connection is admitted by its socket's peer at accept.
    pub fn with_deferred_admission(
        mut self,
        trusted: Vec<Option<crate::networks::TrustedNetworks>>,
    ) -> Self {
        self.deferred_admission = trusted;
        self
    }

    /// The handler named a deferred connection's real address: its per-address admission.
    fn admit_address(&mut self, now_ms: u64, id: ConnectionId, client: std::net::IpAddr) {
        let Some(admission) = self.admission.clone() else {
            return;
        };
        let Some((slot, connection)) = self.lookup(id) else {
            return;
        };
        if !connection.admission_deferred || connection.state != ConnectionState::Open {
            return;
        }
        connection.admission_deferred = false;
        match admission.admit_address(client, now_ms) {
            Ok(ticket) => connection.ticket = Some(ticket),
            Err(_) => {
                // Counted and logged by the table's reports; the handler hears `Closed`.
                // Cut at once, before this batch's sends (a CONNACK, say) can reach the
                // client: shut both ways, freed once nothing is in flight; the handler is
                // told it closed.
                connection.state = ConnectionState::Closing { tell_handler: true };
                self.shut(slot);
                self.finish(now_ms, slot);
            }
        }
    }

    /// Bounds the open connections of each main listener (by its index in `config.listen`);
    /// the reactors of one process share one table.
    pub fn with_listener_limits(mut self, limits: Arc<ListenerLimits>) -> Self {
        self.listener_limits = Some(limits);
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

    fn arm_wake(&mut self) {
        let fd = self.mailboxes.wakers[usize::from(self.config.index)].as_raw_fd();
        let buffer = (&mut *self.wake_buffer as *mut u64).cast::<u8>();
        self.push(
            opcode::Read::new(types::Fd(fd), buffer, 8)
                .build()
                .user_data(user_data(KIND_WAKE, 0, 0)),
        );
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
            self.files.told = false;
            self.handler.flush(&mut actions);
            self.apply(&mut actions);
            self.cut_lingering();
            if let Some(since) = stopping_since {
                let open = self.connections.iter().flatten().count();
                let elapsed = since.elapsed();
                let sockets_done = open == 0 || elapsed >= self.config.shutdown_grace;
                // Queued file work (a log's last records) outlives the sockets' grace, up to
                // its own bound.
                let files_done =
                    self.files.idle() || elapsed >= self.config.shutdown_grace + FILES_SHUTDOWN_MAX;
                if sockets_done && files_done {
                    if open > 0 {
                        warn!(
                            reactor = self.config.index,
                            open, "shutdown grace period over: cutting the remaining connections"
                        );
                    }
                    if !self.files.idle() {
                        self.files.abandon(self.config.index);
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
        // The handler heard of file calls ending after its flush: flush again without sleeping.
        if self.files.told {
            return Duration::ZERO;
        }
        // The drain is bounded (`MAILBOX_BATCH`), and the wakeup of what it left was read
        // already: nothing else would end the wait for it.
        if !self.mailboxes.queues[usize::from(self.config.index)].is_empty() {
            return Duration::ZERO;
        }
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
                self.complete_accept(now_ms, slot, result, flags);
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
            KIND_FILE => {
                self.complete_file(now_ms, data, result);
                false
            }
            _ => false,
        }
    }

    fn apply(&mut self, actions: &mut Actions<H::Message>) {
        // Admissions first: a refused connection gets none of this batch's bytes, and one
        // handed off in this batch is still here.
        let now_ms = self.now_ms();
        for (id, client) in actions.admits.drain(..) {
            self.admit_address(now_ms, id, client);
        }
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
        for (id, target, bytes, carried) in actions.hand_offs.drain(..) {
            if let Some((slot, connection)) = self.lookup(id) {
                // A connection this batch already closed (an admission refusal, say) is
                // not handed on: its CONNECT must not run anywhere.
                if connection.state != ConnectionState::Open {
                    continue;
                }
                connection.state = ConnectionState::HandingOff {
                    target,
                    bytes: BytesMut::from(&bytes[..]),
                };
                let receive = user_data(KIND_RECV, slot, connection.generation);
                let receiving = connection.receiving;
                if let Some(carried) = carried {
                    self.carried.push((slot, carried));
                }
                if receiving {
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
        self.queue_files(now_ms, actions.files.drain(..));
        for (target, message) in actions.posts.drain(..) {
            self.post(target, Envelope::Message(message));
        }
        // One wakeup per reactor that got messages or connections in this batch.
        for target in self.to_wake.drain(..) {
            self.mailboxes.wake(target);
        }
    }
}

/// A reactor without listeners, small, for the reactor's tests on a real ring.
#[cfg(test)]
fn test_config() -> ReactorConfig {
    ReactorConfig {
        index: 0,
        listen: Vec::new(),
        side_listen: None,
        backlog: 16,
        ring_entries: 64,
        buffer_count: 16,
        buffer_size: 4096,
        core: None,
        epoch: Instant::now(),
        shutdown_grace: Duration::from_millis(100),
        tcp_keepalive: None,
    }
}
