//! Admission control: the node-wide and per-source-address limits that a connection accepted
//! on a client listener must pass before any of its bytes is read, so that a connect storm is
//! refused cheaply (an accept, a `getpeername` and a close) instead of costing a CONNECT each.
//!
//! Owns: one fixed-size table shared by every reactor of the process ([`Admission`]), sized
//! by configuration and never by what peers send. A source address is grouped (IPv4 by /32,
//! IPv6 by a configured prefix, /64 by default, since one host owns a whole /64) and hashed
//! with a key drawn at random per process into one bucket; a bucket holds the count of open
//! connections and a one-second rate window for every group that hashes to it. Two groups
//! that collide share a bucket and so are only over-counted (refused earlier), never
//! under-counted; the random key keeps an attacker from aiming collisions at a victim.
//! The node-wide rate is one more window. Refusals are counted per reason
//! ([`AdmissionCounters`]) and reported for logging at most once a second per reason.
//!
//! Never: blocks, allocates after construction, or reads a clock (the caller passes `now_ms`,
//! counted from the epoch all reactors share, so the windows agree across reactors).
//!
//! Invariants: a bucket's connection count is the number of live [`Ticket`]s that name it
//! (plus, for an instant, an admission that is being undone); [`Admission::release`] undoes
//! exactly what [`Admission::admit`] counted, so a ticket is moved with its connection (a
//! hand-off to another reactor carries it) and released once, when the connection closes.
//! Beside it, [`ListenerLimits`] bounds the open connections of each listener, with a place
//! ([`Place`]) that moves and is released the same way.
//! A later PROXY protocol layer re-checks a connection with the client's real address by
//! releasing the proxy's ticket and admitting the real address.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The limits, as configured; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Open connections per source address group.
    pub connections_per_address_max: u32,
    /// Connections admitted per second from one source address group.
    pub connect_rate_per_address_per_second_max: u32,
    /// Connections admitted per second by the whole node.
    pub connect_rate_per_second_max: u32,
    /// Buckets of the address table (a power of two).
    pub address_bucket_count: u32,
    /// The leading bits of an IPv6 address that name its group (1 to 128).
    pub ipv6_prefix_bits: u8,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source address group already holds `connections_per_address_max` connections.
    AddressConnections,
    /// The source address group used up `connect_rate_per_address_per_second_max` this second.
    AddressRate,
    /// The node used up `connect_rate_per_second_max` this second.
    NodeRate,
}

impl Refusal {
    const ALL: [Refusal; 3] = [
        Refusal::AddressConnections,
        Refusal::AddressRate,
        Refusal::NodeRate,
    ];

    fn index(self) -> usize {
        match self {
            Refusal::AddressConnections => 0,
            Refusal::AddressRate => 1,
            Refusal::NodeRate => 2,
        }
    }

    /// The configuration key whose limit was reached, for the log line.
    pub fn key(self) -> &'static str {
        match self {
            Refusal::AddressConnections => "limits.connections_per_address_max",
            Refusal::AddressRate => "limits.connect_rate_per_address_per_second_max",
            Refusal::NodeRate => "limits.connect_rate_per_second_max",
        }
    }
}

/// What [`Admission::admit`] counted for one connection; give it back to
/// [`Admission::release`] when the connection closes. Deliberately neither `Copy` nor `Clone`,
/// so that one admission cannot be released twice.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket must be released when its connection closes"]
pub struct Ticket {
    /// The bucket whose connection count this admission raised; None when the count limit is
    /// off (nothing to undo).
    bucket: Option<u32>,
}

/// Counts of admissions and refusals since start, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct AdmissionCounters {
    admitted: AtomicU64,
    refused: [AtomicU64; 3],
    /// Accepted connections whose peer was gone before its address could be read.
    peer_unknown: AtomicU64,
}

/// A copy of [`AdmissionCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionSnapshot {
    pub admitted: u64,
    pub refused_address_connections: u64,
    pub refused_address_rate: u64,
    pub refused_node_rate: u64,
    pub peer_unknown: u64,
}

impl AdmissionCounters {
    pub fn snapshot(&self) -> AdmissionSnapshot {
        let refused = |refusal: Refusal| self.refused[refusal.index()].load(Ordering::Relaxed);
        AdmissionSnapshot {
            admitted: self.admitted.load(Ordering::Relaxed),
            refused_address_connections: refused(Refusal::AddressConnections),
            refused_address_rate: refused(Refusal::AddressRate),
            refused_node_rate: refused(Refusal::NodeRate),
            peer_unknown: self.peer_unknown.load(Ordering::Relaxed),
        }
    }
}

/// What to log about one reason of refusal: how many since the last report and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalReport {
    pub refusal: Refusal,
    pub since_last_report: u64,
    pub total: u64,
}

/// One bucket of the address table.
#[derive(Debug, Default)]
struct Bucket {
    connections: AtomicU32,
    rate: RateWindow,
}

/// A fixed one-second window: the window's number (seconds since the epoch) in the high 32
/// bits and the admissions counted in it in the low 32, updated together with one
/// compare-and-swap so that reactors racing at a window's turn neither lose nor double a count.
#[derive(Debug, Default)]
struct RateWindow(AtomicU64);

fn pack(window: u32, count: u32) -> u64 {
    (u64::from(window) << 32) | u64::from(count)
}

fn unpack(value: u64) -> (u32, u32) {
    ((value >> 32) as u32, value as u32)
}

impl RateWindow {
    /// Counts one admission in window `window` unless `max` were already counted there.
    /// A reactor whose clock reading is a little older than another's counts in the newer
    /// window instead of turning the window back.
    fn take(&self, window: u32, max: u32) -> bool {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let (stored, count) = unpack(current);
            let next = if stored >= window {
                if count >= max {
                    return false;
                }
                pack(stored, count + 1)
            } else {
                pack(window, 1)
            };
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back one admission counted by [`RateWindow::take`] in window `window`, unless
    /// that window is over (a new one starts from zero anyway).
    fn refund(&self, window: u32) {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let (stored, count) = unpack(current);
            if stored != window || count == 0 {
                return;
            }
            match self.0.compare_exchange_weak(
                current,
                pack(stored, count - 1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

/// The second a report for one reason was last made (plus one: 0 means never) and the total
/// of refusals it reported, so that the next report says how many came since.
#[derive(Debug, Default)]
struct ReportState {
    second_plus_one: AtomicU64,
    total_reported: AtomicU64,
}

/// The admission table shared by the reactors of one process.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    /// SipHash with keys drawn from the OS at construction.
    hasher: RandomState,
    buckets: Box<[Bucket]>,
    node_rate: RateWindow,
    counters: AdmissionCounters,
    reports: [ReportState; 3],
}

impl Admission {
    /// An empty table. Panics if `limits.address_bucket_count` is not a power of two or the
    /// IPv6 prefix is out of range: the configuration checks both first, so either is a
    /// programmer error.
    pub fn new(limits: AdmissionLimits) -> Self {
        assert!(
            limits.address_bucket_count.is_power_of_two(),
            "the address bucket count is a power of two"
        );
        assert!(
            (1..=128).contains(&limits.ipv6_prefix_bits),
            "the IPv6 prefix is 1 to 128 bits"
        );
        Self {
            limits,
            hasher: RandomState::new(),
            buckets: (0..limits.address_bucket_count)
                .map(|_| Bucket::default())
                .collect(),
            node_rate: RateWindow::default(),
            counters: AdmissionCounters::default(),
            reports: Default::default(),
        }
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    pub fn counters(&self) -> &AdmissionCounters {
        &self.counters
    }

    /// The bucket of `ip`'s group: IPv4 (and IPv4-mapped IPv6) by the whole address, IPv6 by
    /// its first `ipv6_prefix_bits` bits.
    fn bucket_of(&self, ip: IpAddr) -> u32 {
        let group: (u8, u128) = match ip.to_canonical() {
            IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => {
                let mask = u128::MAX << (128 - u32::from(self.limits.ipv6_prefix_bits));
                (6, u128::from(v6) & mask)
            }
        };
        (self.hasher.hash_one(group) as u32) & (self.limits.address_bucket_count - 1)
    }

    /// Checks a new connection from `ip` at `now_ms` against every limit; counts it if it
    /// passes. The cheapest limit to undo goes first, and what an earlier check counted is
    /// given back when a later one refuses, so a refused connection leaves nothing counted.
    pub fn admit(&self, ip: IpAddr, now_ms: u64) -> Result<Ticket, Refusal> {
        self.admit_checked(ip, now_ms, true)
    }

    /// The first half of a deferred admission, for a connection whose real address comes
    /// later (a PROXY protocol header from a trusted balancer): only the node-wide rate is
    /// checked now; nothing is counted that a close must undo.
    pub fn admit_deferred(&self, now_ms: u64) -> Result<(), Refusal> {
        let node_rate = self.limits.connect_rate_per_second_max;
        if node_rate > 0 && !self.node_rate.take((now_ms / 1000) as u32, node_rate) {
            return Err(self.refuse(Refusal::NodeRate));
        }
        Ok(())
    }

    /// The second half: the per-address limits for the connection's real address `ip`
    /// (its node-wide rate was taken by [`Admission::admit_deferred`]).
    pub fn admit_address(&self, ip: IpAddr, now_ms: u64) -> Result<Ticket, Refusal> {
        self.admit_checked(ip, now_ms, false)
    }

    fn admit_checked(&self, ip: IpAddr, now_ms: u64, node: bool) -> Result<Ticket, Refusal> {
        let limits = &self.limits;
        let window = (now_ms / 1000) as u32;
        let index = self.bucket_of(ip);
        let bucket = &self.buckets[index as usize];
        let counted = if limits.connections_per_address_max > 0 {
            // fetch_add hands every racer a distinct previous value, so at most `max`
            // connections pass; a refused one is undone at once.
            let before = bucket.connections.fetch_add(1, Ordering::Relaxed);
            if before >= limits.connections_per_address_max {
                bucket.connections.fetch_sub(1, Ordering::Relaxed);
                return Err(self.refuse(Refusal::AddressConnections));
            }
            Some(index)
        } else {
            None
        };
        let ticket = Ticket { bucket: counted };
        let address_rate = limits.connect_rate_per_address_per_second_max;
        if address_rate > 0 && !bucket.rate.take(window, address_rate) {
            self.release(ticket);
            return Err(self.refuse(Refusal::AddressRate));
        }
        let node_rate = limits.connect_rate_per_second_max;
        if node && node_rate > 0 && !self.node_rate.take(window, node_rate) {
            if address_rate > 0 {
                bucket.rate.refund(window);
            }
            self.release(ticket);
            return Err(self.refuse(Refusal::NodeRate));
        }
        self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(ticket)
    }

    /// Undoes what [`Admission::admit`] counted for a connection that has closed.
    pub fn release(&self, ticket: Ticket) {
        if let Some(index) = ticket.bucket {
            let previous = self.buckets[index as usize]
                .connections
                .fetch_sub(1, Ordering::Relaxed);
            // Only a ticket raises a count, and a ticket is released once.
            debug_assert!(previous > 0, "a bucket's count went below zero");
        }
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.counters.refused[refusal.index()].fetch_add(1, Ordering::Relaxed);
        refusal
    }

    /// The log lines due at `now_ms`: one for each reason with refusals not reported yet,
    /// unless that reason was reported in this second already (by any reactor). A reactor
    /// asks after every batch, so the first refusal of a storm is logged at once and the rest
    /// as one line a second, and the tally of a storm that has ended within a second or two.
    pub fn reports_due(&self, now_ms: u64) -> impl Iterator<Item = RefusalReport> + '_ {
        Refusal::ALL.into_iter().filter_map(move |refusal| {
            let refused = self.counters.refused[refusal.index()].load(Ordering::Relaxed);
            let reported = self.reports[refusal.index()]
                .total_reported
                .load(Ordering::Relaxed);
            (refused > reported)
                .then(|| self.report_due(refusal, now_ms))
                .flatten()
        })
    }

    /// Whether a log line about refusals for `refusal` is due at `now_ms`: at most one per
    /// second per reason for the whole process, whichever reactor asks first.
    fn report_due(&self, refusal: Refusal, now_ms: u64) -> Option<RefusalReport> {
        let state = &self.reports[refusal.index()];
        let second_plus_one = now_ms / 1000 + 1;
        let last = state.second_plus_one.load(Ordering::Relaxed);
        if last >= second_plus_one
            || state
                .second_plus_one
                .compare_exchange(last, second_plus_one, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let total = self.counters.refused[refusal.index()].load(Ordering::Relaxed);
        // fetch_max, not a swap: a reactor that read an older total must not turn the
        // reported total back, or the next line would count some refusals twice.
        let before = state.total_reported.fetch_max(total, Ordering::Relaxed);
        Some(RefusalReport {
            refusal,
            since_last_report: total.saturating_sub(before),
            total,
        })
    }

    /// Counts an accepted connection whose peer address could not be read.
    pub fn peer_unknown(&self) {
        self.counters.peer_unknown.fetch_add(1, Ordering::Relaxed);
    }
}

/// The peer address of an accepted socket (multishot accept does not return it): one
/// `getpeername`, which does not block. Fails when the peer has already gone.
pub fn peer_address(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: `fd` is an open socket the caller owns for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

/// The peer's IP address of an accepted socket; see [`peer_address`].
pub fn peer_ip(fd: RawFd) -> io::Result<IpAddr> {
    peer_address(fd).map(|address| address.ip())
}

/// The open connections of each main listener against its own maximum
/// (`[[listener]] connections_max`), shared by the reactors of one process like
/// [`Admission`] (SO_REUSEPORT spreads one listener's accepts over them all). A connection
/// past the maximum is closed before any of its bytes is read and counted; the refusals are
/// logged at powers of two of their count.
#[derive(Debug)]
pub struct ListenerLimits {
    /// Per listener: the maximum (0: none), the open count, the refusals since start.
    listeners: Vec<(u32, AtomicU32, AtomicU64)>,
}

/// One connection's place on its listener, taken by [`ListenerLimits::take`]; give it back to
/// [`ListenerLimits::release`] when the connection closes. Neither `Copy` nor `Clone`, so that
/// one place cannot be given back twice.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a place must be released when its connection closes"]
pub struct Place {
    listener: u16,
}

impl ListenerLimits {
    /// Limits for listeners `0..maxima.len()`; a maximum of 0 is no limit.
    pub fn new(maxima: &[u32]) -> Self {
        Self {
            listeners: maxima
                .iter()
                .map(|&max| (max, AtomicU32::new(0), AtomicU64::new(0)))
                .collect(),
        }
    }

    /// A place on `listener`, or Err with the refusals so far (this one counted) when it is
    /// full. A listener this table does not know has no limit.
    pub fn take(&self, listener: u16) -> Result<Place, u64> {
        let Some((max, open, refused)) = self.listeners.get(usize::from(listener)) else {
            return Ok(Place { listener });
        };
        let taken = open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
            (*max == 0 || count < *max).then(|| count.saturating_add(1))
        });
        match taken {
            Ok(_) => Ok(Place { listener }),
            Err(_) => Err(refused.fetch_add(1, Ordering::Relaxed).saturating_add(1)),
        }
    }

    pub fn release(&self, place: Place) {
        if let Some((_, open, _)) = self.listeners.get(usize::from(place.listener)) {
            // Never below zero: a place is only made by `take`, which counted it.
            let _ = open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                count.checked_sub(1)
            });
        }
    }

    /// Connections open on `listener` now.
    pub fn open(&self, listener: u16) -> u32 {
        self.listeners
            .get(usize::from(listener))
            .map_or(0, |(_, open, _)| open.load(Ordering::Acquire))
    }

    /// Connections refused on `listener` since start.
    pub fn refused(&self, listener: u16) -> u64 {
        self.listeners
            .get(usize::from(listener))
            .map_or(0, |(_, _, refused)| refused.load(Ordering::Relaxed))
    }
}

/// Closes a refused socket at once with a reset (SO_LINGER 0): nothing of it was read, so
/// there is nothing to answer, and a reset leaves no TIME_WAIT entry on the broker's side
/// for each refusal of a storm.
pub fn close_refused(fd: RawFd) {
    // SAFETY: the caller owns `fd` and gives it up here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
    drop(fd);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_place_is_refused_at_its_maximum_and_given_back_once() {
        let limits = ListenerLimits::new(&[2, 0]);
        let first = limits.take(0).unwrap();
        let second = limits.take(0).unwrap();
        assert_eq!(limits.take(0), Err(1), "the third is refused and counted");
        assert_eq!(limits.take(0), Err(2));
        assert_eq!(limits.open(0), 2);
        limits.release(first);
        assert_eq!(limits.open(0), 1);
        let third = limits.take(0).unwrap();
        assert_eq!(limits.refused(0), 2);
        // A maximum of 0 is no limit, and a listener the table does not know has none.
        let unbounded: Vec<_> = (0..100).map(|_| limits.take(1).unwrap()).collect();
        assert_eq!(limits.open(1), 100);
        let unknown = limits.take(9).unwrap();
        limits.release(unknown);
        for place in unbounded {
            limits.release(place);
        }
        limits.release(second);
        limits.release(third);
        assert_eq!((limits.open(0), limits.open(1)), (0, 0));
    }

    fn limits(
        connections: u32,
        address_rate: u32,
        node_rate: u32,
        buckets: u32,
    ) -> AdmissionLimits {
        AdmissionLimits {
            connections_per_address_max: connections,
            connect_rate_per_address_per_second_max: address_rate,
            connect_rate_per_second_max: node_rate,
            address_bucket_count: buckets,
            ipv6_prefix_bits: 64,
        }
    }

    /// The connections counted over the whole table.
    fn counted_connections(table: &Admission) -> u32 {
        table
            .buckets
            .iter()
            .map(|bucket| bucket.connections.load(Ordering::Relaxed))
            .sum()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn release_undoes_admit_and_the_count_limit_holds() {
        let table = Admission::new(limits(3, 0, 0, 1024));
        let a = ip("192.0.2.1");
        let tickets: Vec<Ticket> = (0..3).map(|_| table.admit(a, 0).unwrap()).collect();
        assert_eq!(table.admit(a, 0), Err(Refusal::AddressConnections));
        // The refused attempt left nothing counted: one release makes room for exactly one.
        let mut tickets = tickets.into_iter();
        table.release(tickets.next().unwrap());
        let again = table.admit(a, 0).unwrap();
        assert_eq!(table.admit(a, 0), Err(Refusal::AddressConnections));
        table.release(again);
        for ticket in tickets {
            table.release(ticket);
        }
        assert_eq!(counted_connections(&table), 0);
        let counts = table.counters().snapshot();
        assert_eq!(counts.admitted, 4);
        assert_eq!(counts.refused_address_connections, 2);
    }

    #[test]
    fn a_deferred_admission_takes_the_node_rate_once_and_counts_the_real_address() {
        let table = Admission::new(limits(1, 0, 2, 1024));
        // The node rate (2 a second) is taken at accept only.
        table.admit_deferred(0).unwrap();
        let first = table.admit_address(ip("198.51.100.1"), 0).unwrap();
        table.admit_deferred(0).unwrap();
        // The second client address is over its own count of 1 only if it is the same.
        assert_eq!(
            table.admit_address(ip("198.51.100.1"), 0),
            Err(Refusal::AddressConnections)
        );
        let second = table.admit_address(ip("198.51.100.2"), 0).unwrap();
        assert_eq!(table.admit_deferred(0), Err(Refusal::NodeRate));
        table.release(first);
        table.release(second);
        assert_eq!(counted_connections(&table), 0);
    }

    #[test]
    fn collisions_only_over_count() {
        // One bucket: every address collides with every other.
        let table = Admission::new(limits(2, 0, 0, 1));
        let first = table.admit(ip("192.0.2.1"), 0).unwrap();
        let second = table.admit(ip("198.51.100.7"), 0).unwrap();
        assert_eq!(
            table.admit(ip("203.0.113.9"), 0),
            Err(Refusal::AddressConnections),
            "a third address is refused although it holds nothing itself"
        );
        table.release(first);
        assert!(table.admit(ip("203.0.113.9"), 0).is_ok());
        table.release(second);
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_prefix_and_ipv4_by_address() {
        let table = Admission::new(limits(1, 0, 0, 1 << 16));
        let held = table.admit(ip("2001:db8:1:2::1"), 0).unwrap();
        assert_eq!(
            table.admit(ip("2001:db8:1:2:ffff::9"), 0),
            Err(Refusal::AddressConnections),
            "the same /64"
        );
        let mapped = table.admit(ip("192.0.2.1"), 0).unwrap();
        assert_eq!(
            table.admit(ip("::ffff:192.0.2.1"), 0),
            Err(Refusal::AddressConnections),
            "an IPv4-mapped address is its IPv4 address"
        );
        table.release(held);
        table.release(mapped);
        // With 65536 buckets, 64 other /64s and 64 other IPv4 addresses all land somewhere
        // the one held connection does not block, bar a collision; at most a few may collide.
        let held = table.admit(ip("2001:db8:1:2::1"), 0).unwrap();
        let refused = (0..64u16)
            .map(|n| format!("2001:db8:1:{:x}::1", 0x100 + n))
            .chain((0..64).map(|n| format!("198.51.100.{n}")))
            .filter(|text| match table.admit(ip(text), 0) {
                Ok(ticket) => {
                    table.release(ticket);
                    false
                }
                Err(_) => true,
            })
            .count();
        assert!(refused <= 2, "{refused} of 128 distinct groups collided");
        table.release(held);
    }

    #[test]
    fn rate_windows_roll_over_with_the_clock_passed_in() {
        let table = Admission::new(limits(0, 2, 0, 1024));
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        for _ in 0..2 {
            let _ = table.admit(a, 1_000).unwrap();
        }
        assert_eq!(table.admit(a, 1_999), Err(Refusal::AddressRate));
        let _ = table
            .admit(b, 1_999)
            .expect("another address has its own window");
        let _ = table.admit(a, 2_000).expect("a new second, a new window");
        // A reactor whose clock read a little earlier counts in the newer window.
        let _ = table.admit(a, 1_500).unwrap();
        assert_eq!(table.admit(a, 2_100), Err(Refusal::AddressRate));
        assert_eq!(table.counters().snapshot().refused_address_rate, 2);
    }

    #[test]
    fn the_node_rate_holds_across_addresses_and_a_refusal_gives_back_what_it_took() {
        let table = Admission::new(limits(10, 5, 3, 1024));
        let tickets: Vec<Ticket> = (1..=3)
            .map(|n| table.admit(ip(&format!("192.0.2.{n}")), 0).unwrap())
            .collect();
        let other = ip("198.51.100.1");
        assert_eq!(table.admit(other, 10), Err(Refusal::NodeRate));
        assert_eq!(table.admit(other, 20), Err(Refusal::NodeRate));
        // The refusals gave back the connection count and the rate token they had taken.
        let bucket = &table.buckets[table.bucket_of(other) as usize];
        assert_eq!(bucket.connections.load(Ordering::Relaxed), 0);
        assert_eq!(unpack(bucket.rate.0.load(Ordering::Relaxed)).1, 0);
        let next_second: Vec<Ticket> = (0..3).map(|_| table.admit(other, 1_000).unwrap()).collect();
        assert_eq!(table.admit(other, 1_000), Err(Refusal::NodeRate));
        let counts = table.counters().snapshot();
        assert_eq!(counts.refused_node_rate, 3);
        assert_eq!(counts.admitted, 6);
        for ticket in tickets.into_iter().chain(next_second) {
            table.release(ticket);
        }
        assert_eq!(counted_connections(&table), 0);
    }

    #[test]
    fn refusals_are_reported_at_most_once_a_second_per_reason() {
        let table = Admission::new(limits(1, 0, 0, 1024));
        let a = ip("192.0.2.1");
        let held = table.admit(a, 0).unwrap();
        for _ in 0..5 {
            assert!(table.admit(a, 100).is_err());
        }
        let report = |at_ms: u64| table.reports_due(at_ms).collect::<Vec<_>>();
        let line = |since_last_report: u64, total: u64| RefusalReport {
            refusal: Refusal::AddressConnections,
            since_last_report,
            total,
        };
        assert_eq!(report(100), [line(5, 5)]);
        assert_eq!(report(150), [], "nothing new");
        assert!(table.admit(a, 200).is_err());
        assert_eq!(report(999), [], "reported in this second already");
        assert_eq!(report(1_000), [line(1, 6)]);
        assert_eq!(report(5_000), [], "nothing new");
        // Each reason has its own second.
        let rated = Admission::new(limits(1, 1, 0, 1024));
        let held_too = rated.admit(a, 0).unwrap();
        assert_eq!(rated.admit(a, 0), Err(Refusal::AddressConnections));
        rated.release(held_too);
        assert_eq!(rated.admit(a, 0), Err(Refusal::AddressRate));
        let reasons: Vec<Refusal> = rated.reports_due(0).map(|r| r.refusal).collect();
        assert_eq!(reasons, [Refusal::AddressConnections, Refusal::AddressRate]);
        table.release(held);
    }

    #[test]
    fn concurrent_admissions_never_pass_the_count_limit() {
        let table = std::sync::Arc::new(Admission::new(limits(50, 0, 0, 1024)));
        let a = ip("192.0.2.1");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter_map(|_| table.admit(a, 0).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let tickets: Vec<Ticket> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        assert_eq!(tickets.len(), 50);
        for ticket in tickets {
            table.release(ticket);
        }
        assert!(table.admit(a, 0).is_ok());
    }
}
