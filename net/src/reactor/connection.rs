//! Connections: their ids (reactor, slot, generation and the side bit), their state, their
//! send queue, and the reactor's table of slots that holds them.
//!
//! Invariant: a slot's generation rises each time it is freed, so a completion or an id for an
//! earlier occupant of the slot is recognised (`Reactor::live`) and ignored.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::admission::{Place, Ticket};
use super::{Handler, Origin, Reactor};

/// A connection's name: reactor index, slot and generation, so that a completion for a slot's
/// earlier occupant is recognised and ignored, and whether it is a side connection
/// ([`is_side`]).
pub type ConnectionId = u64;

/// The bit of a [`ConnectionId`] that marks a side connection: accepted on the side listener,
/// dialled with [`Actions::connect`], or handed over from another reactor that held it as one.
/// Slots stay far below 2^31 (each is an open socket), so the bit never collides with one.
const SIDE_BIT: u64 = 1 << 31;

pub(super) fn connection_id(reactor: u16, slot: u32, generation: u32, side: bool) -> ConnectionId {
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

#[derive(Debug, PartialEq, Eq)]
pub(super) enum ConnectionState {
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
pub(super) struct Connection {
    pub(super) fd: RawFd,
    pub(super) generation: u32,
    pub(super) receiving: bool,
    /// A side connection ([`is_side`]): kept when it is handed over.
    pub(super) side: bool,
    pub(super) send_queue: SendQueue,
    pub(super) send_offset: usize,
    pub(super) sending: bool,
    /// Listed in `sent` for this loop's `Event::Sent`.
    pub(super) sent_listed: bool,
    /// While closing with a send in flight: when the socket last took bytes (or the close
    /// began). Cut after `CLOSE_LINGER` without progress.
    pub(super) linger_since: Option<Instant>,
    pub(super) state: ConnectionState,
    /// What admission counted for this connection (None: not subject to it); released once,
    /// when the connection closes.
    pub(super) ticket: Option<Ticket>,
    /// Where a connection on a main listener came from (None for a side connection); kept in
    /// a hand-off.
    pub(super) origin: Option<Origin>,
    /// Its place on its listener's `connections_max` (None: not counted); released once,
    /// when the connection closes.
    pub(super) place: Option<Place>,
    /// Accepted from a trusted balancer on a PROXY listener: its per-address admission waits
    /// for `Actions::admit_address` (not kept in a hand-off, which comes after it).
    pub(super) admission_deferred: bool,
}

impl Connection {
    pub(super) fn unsent_bytes(&self) -> usize {
        self.send_queue.bytes - self.send_offset
    }
}

/// Bytes waiting to be sent on one connection, in order. The usual case, one buffer, is held
/// inline, so an idle connection keeps no allocation for sending; a backlog spills into a queue
/// that is freed again once it drains.
#[derive(Debug, Default)]
pub(super) struct SendQueue {
    front: Option<Bytes>,
    rest: VecDeque<Bytes>,
    /// The length of everything held.
    bytes: usize,
}

impl SendQueue {
    pub(super) fn push_back(&mut self, bytes: Bytes) {
        self.bytes += bytes.len();
        if self.front.is_none() {
            self.front = Some(bytes);
        } else {
            self.rest.push_back(bytes);
        }
    }

    pub(super) fn front(&self) -> Option<&Bytes> {
        self.front.as_ref()
    }

    pub(super) fn pop_front(&mut self) {
        self.bytes -= self.front.as_ref().map_or(0, Bytes::len);
        self.front = self.rest.pop_front();
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
    }

    pub(super) fn len(&self) -> usize {
        usize::from(self.front.is_some()) + self.rest.len()
    }

    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Joins everything queued into one buffer, leaving out the first `offset` bytes of the
    /// front (already sent).
    pub(super) fn merge(&mut self, offset: usize) {
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

/// What an accepted connection carries from its accept to its close (and across a hand-off):
/// its admission ticket, its origin, its listener place.
#[derive(Debug, Default)]
pub(super) struct Counted {
    pub(super) ticket: Option<Ticket>,
    pub(super) origin: Option<Origin>,
    pub(super) place: Option<Place>,
}

impl<H: Handler> Reactor<H> {
    pub(super) fn add_connection(
        &mut self,
        fd: RawFd,
        side: bool,
        counted: Counted,
    ) -> ConnectionId {
        let slot = self.allocate_slot(fd, ConnectionState::Open, side, counted.ticket);
        self.arm_recv(slot);
        let connection = self.connections[slot as usize].as_mut().expect("live");
        connection.origin = counted.origin;
        connection.place = counted.place;
        let generation = connection.generation;
        connection_id(self.config.index, slot, generation, side)
    }

    pub(super) fn allocate_slot(
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
            origin: None,
            place: None,
            admission_deferred: false,
        });
        slot
    }

    pub(super) fn live(&self, slot: u32, generation: u32) -> bool {
        self.connections
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.generation & 0xFFFF == generation & 0xFFFF)
    }

    pub(super) fn lookup(&mut self, id: ConnectionId) -> Option<(u32, &mut Connection)> {
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
