//! The end of a connection: shutting its socket, freeing its slot once nothing is in flight
//! (closing the socket and releasing its admission ticket and listener place, or passing it on to another
//! reactor for a hand-off), and the close linger that cuts a closing connection whose peer
//! takes nothing.
//!
//! Invariant: a slot is freed only when neither a receive nor a send is in flight on it, so no
//! ring entry refers to a closed descriptor or a freed send queue.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tracing::debug;

use super::connection::{ConnectionState, Counted, connection_id};
use super::{Envelope, Event, Handler, Reactor};

/// How long a closing connection may keep bytes queued while its peer takes none of them.
/// Then the socket is shut and the queue freed: a peer that stopped reading would otherwise
/// hold its connection slot and send queue for as long as TCP keeps the connection.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

impl<H: Handler> Reactor<H> {
    /// Shuts the socket down so that its pending receive ends.
    pub(super) fn shut(&mut self, slot: u32) {
        let connection = self.connections[slot as usize].as_ref().expect("live");
        // SAFETY: shutdown on a descriptor we own; errors (already shut) are harmless.
        unsafe { libc::shutdown(connection.fd, libc::SHUT_RDWR) };
    }

    /// Frees the slot once nothing is in flight: closes the socket, or passes it on.
    pub(super) fn finish(&mut self, now_ms: u64, slot: u32) {
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
                let carried = self
                    .carried
                    .iter()
                    .position(|(carried_slot, _)| *carried_slot == slot)
                    .map(|index| self.carried.swap_remove(index).1);
                self.post(
                    target,
                    Envelope::Connection {
                        fd,
                        bytes: bytes.freeze(),
                        side: connection.side,
                        counted: Counted {
                            ticket: connection.ticket,
                            origin: connection.origin,
                            place: connection.place,
                        },
                        carried,
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
                if let (Some(limits), Some(place)) = (&self.listener_limits, connection.place) {
                    limits.release(place);
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

    /// Shuts closing connections whose peer has taken nothing for `CLOSE_LINGER`: the send in
    /// flight then fails and the connection, with its queue, is freed.
    pub(super) fn cut_lingering(&mut self) {
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
}
