//! Outbound connections ([`Actions::connect`](super::Actions::connect)): the socket, its
//! optional source address, the connect submission and its completion.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};

use io_uring::{opcode, types};

use super::connection::{ConnectionState, connection_id};
use super::{Event, Handler, KIND_CONNECT, Reactor, user_data};

impl<H: Handler> Reactor<H> {
    pub(super) fn start_connect(
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

    pub(super) fn complete_connect(
        &mut self,
        now_ms: u64,
        slot: u32,
        generation: u32,
        result: i32,
    ) {
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
}
