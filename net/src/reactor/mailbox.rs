//! The cross-reactor mailboxes: one bounded queue and one eventfd wakeup per reactor, what
//! travels in them ([`Envelope`]: a handler's message or a handed-over connection), and the
//! reactor's side of them: posting with an overflow queue, one wakeup per target per batch,
//! the bounded drain of its own queue, and the backpressure that pauses receiving while the
//! overflow is at its bound.
//!
//! Invariant: nothing posted is dropped or reordered; the overflow never holds more than the
//! mailbox capacity plus one loop's output, because receiving pauses at that bound; a message
//! waits for no wakeup but its own: the loop drains [`MAILBOX_BATCH`] at a time and does not
//! sleep while some are left (one wakeup read may stand for many more messages than that).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use tracing::{info, warn};

use super::connection::Counted;
use super::{Event, Handler, Reactor};

/// The most mailbox messages one loop iteration handles.
pub(super) const MAILBOX_BATCH: usize = 4096;

pub(super) enum Envelope<M> {
    Message(M),
    /// A handed-over socket, the bytes received so far, whether it is a side connection, and
    /// what its accept counted and where it came from (released where it closes).
    Connection {
        fd: OwnedFd,
        bytes: Bytes,
        side: bool,
        counted: Counted,
        /// What the sending handler attached (`Actions::hand_off_carrying`).
        carried: Option<M>,
    },
}

/// The queues and wakeups between the reactors of one process.
pub struct Mailboxes<M> {
    pub(super) queues: Vec<ArrayQueue<Envelope<M>>>,
    pub(super) wakers: Vec<OwnedFd>,
    pub(super) stop: AtomicBool,
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

    pub(super) fn wake(&self, target: u16) {
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

impl<H: Handler> Reactor<H> {
    /// Pauses receiving while the overflow is at its bound; once it has drained to half,
    /// handles the held receive completions in order and receives again.
    pub(super) fn resume_receiving(&mut self, now_ms: u64) {
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

    pub(super) fn post(&mut self, target: u16, envelope: Envelope<H::Message>) {
        if !self.overflow.is_empty() {
            self.overflow.push_back((target, envelope));
            return;
        }
        match self.mailboxes.queues[usize::from(target)].push(envelope) {
            Ok(()) => self.mark_for_wake(target),
            Err(envelope) => self.overflow.push_back((target, envelope)),
        }
    }

    pub(super) fn mark_for_wake(&mut self, target: u16) {
        if !self.to_wake.contains(&target) {
            self.to_wake.push(target);
        }
    }

    pub(super) fn drain_mailbox(&mut self, now_ms: u64) {
        // A bounded batch per iteration, so completions are not starved; the loop does not
        // sleep while messages are left (`wait_timeout`).
        for _ in 0..MAILBOX_BATCH {
            let Some(envelope) = self.mailboxes.queues[usize::from(self.config.index)].pop() else {
                break;
            };
            match envelope {
                Envelope::Message(message) => self.handler.event(now_ms, Event::Message(message)),
                Envelope::Connection {
                    fd,
                    bytes,
                    side,
                    counted,
                    carried,
                } => {
                    let origin = counted.origin;
                    let id = self.add_connection(fd.into_raw_fd(), side, counted);
                    if side {
                        self.handler.event(now_ms, Event::OpenedSide(id));
                    } else {
                        let origin = origin.expect("a main connection keeps its origin");
                        match carried {
                            Some(carried) => self
                                .handler
                                .event(now_ms, Event::Adopted(id, origin, carried)),
                            None => self.handler.event(now_ms, Event::Opened(id, origin)),
                        }
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
}

#[cfg(test)]
mod tests;
