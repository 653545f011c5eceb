//! The send path: one send in flight per connection, from the front of its send queue (small
//! queued buffers merged first), its completions, and the `Event::Sent` report of what is
//! still unsent, told once per loop for each connection that had send completions.

use std::time::Instant;

use io_uring::{opcode, types};

use super::connection::{ConnectionState, connection_id};
use super::{Event, Handler, KIND_SEND, Reactor, user_data};

impl<H: Handler> Reactor<H> {
    pub(super) fn complete_send(&mut self, now_ms: u64, slot: u32, generation: u32, result: i32) {
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
        } else if !connection.sending
            && matches!(connection.state, ConnectionState::HandingOff { .. })
        {
            // Everything queued before the hand-off is sent: the socket may move (once its
            // receive has ended too).
            self.finish(now_ms, slot);
        }
    }

    pub(super) fn start_send(&mut self, slot: u32) {
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

    /// Tells the handler, once per connection, how much is unsent after this loop's send
    /// completions.
    pub(super) fn report_sent(&mut self, now_ms: u64) {
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
}
