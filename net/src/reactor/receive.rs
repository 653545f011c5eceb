//! The receive path: the multishot receive armed on every open connection, drawing from the
//! provided buffer ring, and its completions (bytes for the handler or for a hand-off, end of
//! stream, buffers exhausted).

use std::time::Instant;

use bytes::Bytes;
use io_uring::{cqueue, opcode, types};
use tracing::debug;

use super::buffers::BUFFER_GROUP;
use super::connection::{ConnectionState, connection_id};
use super::{Event, Handler, KIND_RECV, Reactor, user_data};

impl<H: Handler> Reactor<H> {
    pub(super) fn arm_recv(&mut self, slot: u32) {
        let connection = self.connections[slot as usize]
            .as_mut()
            .expect("a live slot");
        connection.receiving = true;
        let entry = opcode::RecvMulti::new(types::Fd(connection.fd), BUFFER_GROUP)
            .build()
            .user_data(user_data(KIND_RECV, slot, connection.generation));
        self.push(entry);
    }

    pub(super) fn complete_recv(
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
}
