//! The accept path: the listening sockets, the hooks a socket accepted on a main listener
//! must pass before any of its bytes is read (a place under its listener's `connections_max`,
//! then admission), the origin (listener index, peer address) the handler is told, the
//! rate-limited log of refusals, and the accept completion (with its pause when the process
//! runs out of descriptors).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types};
use tracing::warn;

use super::admission::{self, Admission, Ticket};
use super::connection::Counted;
use super::{Event, Handler, KIND_ACCEPT, Origin, Reactor, TcpKeepalive, user_data};

pub(super) fn listener(
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

/// The admission hook of the accept path: checks the peer's address against `admission`. A
/// refused socket (or one whose peer is already gone) is closed here, before any of its bytes
/// is read, and None returned; the refusal is counted in `admission` and logged by
/// [`log_refusals`].
fn admit_accepted(
    admission: &Admission,
    fd: RawFd,
    peer: Option<SocketAddr>,
    now_ms: u64,
) -> Option<Ticket> {
    let Some(peer) = peer else {
        admission.peer_unknown();
        admission::close_refused(fd);
        return None;
    };
    match admission.admit(peer.ip(), now_ms) {
        Ok(ticket) => Some(ticket),
        Err(_) => {
            admission::close_refused(fd);
            None
        }
    }
}

/// Logs the admission refusals not reported yet: at most one line a second per reason for
/// the whole process, with the counts, so that a connect storm does not flood the log.
pub(super) fn log_refusals(admission: &Admission, reactor: u16, now_ms: u64) {
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

impl<H: Handler> Reactor<H> {
    pub(super) fn arm_accept(&mut self, listener: usize) {
        let fd = self.listeners[listener].as_raw_fd();
        self.push(
            opcode::AcceptMulti::new(types::Fd(fd))
                .build()
                .user_data(user_data(KIND_ACCEPT, listener as u32, 0)),
        );
    }

    /// An accept completion on listener `listener`: a new socket, or an error that pauses
    /// accepts for a while when the process is out of descriptors or memory.
    pub(super) fn complete_accept(&mut self, now_ms: u64, listener: u32, result: i32, flags: u32) {
        if result >= 0 {
            self.accepted(now_ms, listener, result);
        } else if matches!(
            -result,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        ) {
            if self.accept_paused_until.is_none() {
                warn!(reactor = self.config.index, error = %io::Error::from_raw_os_error(-result), "accept failed: pausing accepts for 100 ms (raise the open-file limit for more connections)");
            }
            self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
            return;
        }
        if !cqueue::more(flags)
            && (listener as usize) < self.listeners.len()
            && self.accept_paused_until.is_none()
        {
            self.arm_accept(listener as usize);
        }
    }

    /// A socket accepted on listener `listener`: one on a main listener must find a place
    /// under its listener's `connections_max` and pass admission first (a refused one is
    /// closed before any of its bytes is read); then the handler hears of it, with the
    /// listener and the peer's address.
    pub(super) fn accepted(&mut self, now_ms: u64, listener: u32, fd: RawFd) {
        let main = (listener as usize) < self.config.listen.len();
        if !main {
            let ticket = match &self.side_admission {
                Some(admission) => {
                    let peer = admission::peer_address(fd).ok();
                    match admit_accepted(admission, fd, peer, now_ms) {
                        Some(ticket) => Some(ticket),
                        None => return,
                    }
                }
                None => None,
            };
            let counted = Counted {
                ticket,
                ..Counted::default()
            };
            let id = self.add_connection(fd, true, counted);
            self.handler.event(now_ms, Event::OpenedSide(id));
            return;
        }
        // Main listeners are far fewer than 2^16 (each is a bound socket).
        let listener = listener as u16;
        let place = match &self.listener_limits {
            Some(limits) => match limits.take(listener) {
                Ok(place) => Some(place),
                Err(refused) => {
                    if refused.is_power_of_two() {
                        warn!(
                            reactor = self.config.index,
                            listener,
                            address = %self.config.listen[usize::from(listener)],
                            refused_total = refused,
                            "connection refused at accept: the listener is at its connections_max"
                        );
                    }
                    admission::close_refused(fd);
                    return;
                }
            },
            None => None,
        };
        let peer = admission::peer_address(fd).ok();
        // From a balancer trusted to send a PROXY header: the per-address limits wait for
        // the address the header names.
        let deferred = self.admission.is_some()
            && peer.is_some_and(|peer| {
                self.deferred_admission
                    .get(usize::from(listener))
                    .and_then(Option::as_ref)
                    .is_some_and(|trusted| trusted.contains(peer.ip()))
            });
        let ticket = match &self.admission {
            Some(admission) if deferred => match admission.admit_deferred(now_ms) {
                Ok(()) => None,
                Err(_) => {
                    admission::close_refused(fd);
                    if let (Some(limits), Some(place)) = (&self.listener_limits, place) {
                        limits.release(place);
                    }
                    return;
                }
            },
            Some(admission) => match admit_accepted(admission, fd, peer, now_ms) {
                Some(ticket) => Some(ticket),
                None => {
                    if let (Some(limits), Some(place)) = (&self.listener_limits, place) {
                        limits.release(place);
                    }
                    return;
                }
            },
            None => None,
        };
        let origin = Origin { listener, peer };
        let counted = Counted {
            ticket,
            origin: Some(origin),
            place,
        };
        let id = self.add_connection(fd, false, counted);
        if deferred && let Some((_, connection)) = self.lookup(id) {
            connection.admission_deferred = true;
        }
        self.handler.event(now_ms, Event::Opened(id, origin));
    }
}
