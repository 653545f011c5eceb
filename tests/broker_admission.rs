//! Overload protection through a real broker: a connection beyond a per-address count, a
//! per-address rate or the node-wide rate is closed at accept, before any byte of it is read
//! (so without a CONNACK), while admitted connections carry on and other addresses are
//! admitted; the limits hold across shards, a closed connection makes room again, and a rate
//! window that has passed admits again.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{Broker, connect_packet};

/// A TCP connection to the broker on 127.0.0.1 from the loopback address `source`.
fn raw_from(source: Ipv4Addr, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket
        .connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .unwrap();
    let stream = TcpStream::from(socket);
    stream.set_nodelay(true).unwrap();
    stream
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// CONNACK 0x00 came back.
    Admitted,
    /// Closed (or reset) without a byte sent back.
    Refused,
}

/// Sends CONNECT on `stream` and tells whether the broker answered it or closed the
/// connection unanswered. A refused connection may already be reset when CONNECT is written,
/// so a failed write is followed by the read that tells.
fn try_connect(stream: &mut TcpStream, id: &str) -> Outcome {
    let _ = stream.write_all(&connect_packet(id));
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut answer = [0u8; 4];
    match stream.read(&mut answer) {
        Ok(0) => Outcome::Refused,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ) =>
        {
            Outcome::Refused
        }
        Ok(n) => {
            stream.read_exact(&mut answer[n..]).unwrap();
            assert_eq!(answer, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
            Outcome::Admitted
        }
        Err(error) => panic!("neither a CONNACK nor a close within 3 s: {error}"),
    }
}

fn ping(stream: &mut TcpStream) {
    stream.write_all(&[0xC0, 0x00]).unwrap();
    let mut pong = [0u8; 2];
    stream.read_exact(&mut pong).unwrap();
    assert_eq!(pong, [0xD0, 0x00], "PINGRESP on an admitted connection");
}

/// Opens `count` connections, taking their source addresses from `sources` in turn, as fast
/// as possible, then sends each its CONNECT; returns the admitted connections and the number
/// refused.
fn burst(port: u16, sources: &[Ipv4Addr], count: usize, prefix: &str) -> (Vec<TcpStream>, usize) {
    let streams: Vec<TcpStream> = (0..count)
        .map(|n| raw_from(sources[n % sources.len()], port))
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for (index, mut stream) in streams.into_iter().enumerate() {
        match try_connect(&mut stream, &format!("{prefix}-{index}")) {
            Outcome::Admitted => admitted.push(stream),
            Outcome::Refused => refused += 1,
        }
    }
    (admitted, refused)
}

/// Waits up to 3 s for a connection from `source` to be admitted; how many tries it took.
fn admitted_within_3_s(port: u16, source: Ipv4Addr, id: &str) -> (TcpStream, u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tries = 0;
    loop {
        tries += 1;
        let mut stream = raw_from(source, port);
        if try_connect(&mut stream, id) == Outcome::Admitted {
            return (stream, tries);
        }
        assert!(
            Instant::now() < deadline,
            "no connection admitted within 3 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A burst of three times `rate` connections: a one-second window admits `rate` of them; a
/// burst that straddles two windows gets up to two windows' worth; the rest are refused.
fn assert_one_or_two_windows_admitted(admitted: usize, refused: usize, rate: usize) {
    assert!(
        (rate..=2 * rate).contains(&admitted),
        "{admitted} admitted of {}",
        3 * rate
    );
    assert_eq!(admitted + refused, 3 * rate);
}

/// The refusals the broker logged for the limit `key`: the sum of the `refused=` counts of
/// its lines, once it reaches `at_least` (any reactor may write the line, so it is waited for
/// up to 3 s); fails if it does not.
fn refusals_logged(broker: &Broker, key: &str, at_least: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = broker.log_text();
        let logged: usize = log
            .lines()
            .filter(|line| line.contains(key))
            .filter_map(|line| line.split(" refused=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
            .sum();
        if logged >= at_least {
            return logged;
        }
        assert!(
            Instant::now() < deadline,
            "log lines name {key} and count {at_least} refusals:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A broker for the rate tests, with `limits`, once its start-up probe is out of the way:
/// the admin endpoint is off, so that the probe is one connection (while it waits for the
/// admin port too it connects again and again), and the probe's one-second window is over,
/// so that a burst's window is its own. (The probe's connection is taken in only when the
/// reactors run, which may be after a burst that follows at once.)
fn rate_broker(limits: &str) -> Broker {
    let config = format!("[limits]\n{limits}\n[admin]\nlisten = \"\"\n");
    let broker = Broker::start_with(2, &config);
    std::thread::sleep(Duration::from_millis(1100));
    broker
}

const HOME: Ipv4Addr = Ipv4Addr::LOCALHOST;
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[test]
fn the_connection_beyond_an_address_count_is_closed_unanswered_and_a_close_makes_room() {
    let broker = Broker::start_with(2, "[limits]\nconnections_per_address_max = 5\n");
    // The start-up probe's connection was counted until the broker saw it close.
    std::thread::sleep(Duration::from_millis(200));
    let mut five: Vec<TcpStream> = (0..5)
        .map(|n| {
            let mut stream = raw_from(HOME, broker.port);
            assert_eq!(
                try_connect(&mut stream, &format!("held-{n}")),
                Outcome::Admitted
            );
            stream
        })
        .collect();
    let mut sixth = raw_from(HOME, broker.port);
    assert_eq!(try_connect(&mut sixth, "sixth"), Outcome::Refused);
    for stream in &mut five {
        ping(stream);
    }
    let mut other = raw_from(OTHER, broker.port);
    assert_eq!(
        try_connect(&mut other, "other-address"),
        Outcome::Admitted,
        "another address has its own count"
    );
    ping(&mut other);
    drop(five.pop());
    let (mut again, _) = admitted_within_3_s(broker.port, HOME, "again");
    ping(&mut again);
    let mut seventh = raw_from(HOME, broker.port);
    assert_eq!(
        try_connect(&mut seventh, "seventh"),
        Outcome::Refused,
        "the room the close made is taken again"
    );
    // Closing all makes room for five again, also for connections handed from the shard that
    // accepted them to the shard that owns their client identifier (the count travels with
    // the connection and is given back where it closes).
    drop(five);
    drop(again);
    let renewed: Vec<TcpStream> = (0..5)
        .map(|n| admitted_within_3_s(broker.port, HOME, &format!("renewed-{n}")).0)
        .collect();
    assert_eq!(renewed.len(), 5);
    refusals_logged(&broker, "limits.connections_per_address_max", 1);
}

#[test]
fn the_node_wide_rate_admits_about_its_rate_of_a_burst_and_admits_again_a_second_later() {
    const RATE: usize = 20;
    let broker = rate_broker(&format!("connect_rate_per_second_max = {RATE}"));
    // Half of the burst comes from another address: the rate is the node's, not an
    // address's (each address alone stays below the rate).
    let (mut admitted, refused) = burst(broker.port, &[HOME, OTHER], 3 * RATE, "burst");
    assert_one_or_two_windows_admitted(admitted.len(), refused, RATE);
    for stream in &mut admitted {
        ping(stream);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let (mut later, tries) = admitted_within_3_s(broker.port, HOME, "later");
    assert_eq!(tries, 1, "a new second admits at once");
    ping(&mut later);
    // The first refusal is logged at once, the rest in one line in the next second.
    assert_eq!(
        refusals_logged(&broker, "limits.connect_rate_per_second_max", refused),
        refused
    );
}

#[test]
fn the_per_address_rate_holds_one_address_back_and_not_another() {
    const RATE: usize = 10;
    let broker = rate_broker(&format!("connect_rate_per_address_per_second_max = {RATE}"));
    let (mut admitted, refused) = burst(broker.port, &[HOME], 3 * RATE, "burst");
    assert_one_or_two_windows_admitted(admitted.len(), refused, RATE);
    let (mut other, _) = burst(broker.port, &[OTHER], RATE, "other");
    assert_eq!(other.len(), RATE, "another address has its own window");
    for stream in admitted.iter_mut().chain(other.iter_mut()) {
        ping(stream);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let (again, _) = burst(broker.port, &[HOME], RATE, "again");
    assert_eq!(again.len(), RATE, "a new second, a full window");
    assert_eq!(
        refusals_logged(
            &broker,
            "limits.connect_rate_per_address_per_second_max",
            refused
        ),
        refused
    );
}
