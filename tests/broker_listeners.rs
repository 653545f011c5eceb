//! Several listeners through a real broker: a `[[listener]]` table beside the `--listen`
//! shorthand, its `connections_max` holding across shards (a connection past it is closed at
//! accept without a CONNACK, one on another listener is not), a place given back exactly once
//! when a connection closes, also after a hand-off to the shard that owns the session, and the
//! shard told which listener accepted a connection and from which address.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{Broker, connect_packet, free_port};

/// Connects to `port` and sends CONNECT: Some(stream) when CONNACK 0x00 came back, None when
/// the broker closed the connection without a byte.
fn try_connect(port: u16, id: &str) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let _ = stream.write_all(&connect_packet(id));
    let mut answer = [0u8; 4];
    match stream.read(&mut answer) {
        Ok(0) => None,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ) =>
        {
            None
        }
        Ok(n) => {
            stream.read_exact(&mut answer[n..]).unwrap();
            assert_eq!(answer, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
            Some(stream)
        }
        Err(error) => panic!("neither a CONNACK nor a close within 3 s: {error}"),
    }
}

/// Connects until the broker admits, for up to 3 s (a closed connection's place comes back
/// once the broker has seen the close).
fn connect_eventually(port: u16, id: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(stream) = try_connect(port, id) {
            return stream;
        }
        assert!(Instant::now() < deadline, "{id} never admitted on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_listener_keeps_its_own_connection_limit_across_shards_and_hand_offs() {
    let port = free_port();
    let limited = free_port();
    let mut broker = Broker::start_env(
        std::net::IpAddr::from([127, 0, 0, 1]),
        None,
        port,
        free_port(),
        2,
        &format!("[[listener]]\nbind = \"127.0.0.1:{limited}\"\nconnections_max = 2\n"),
        &[("RUST_LOG", Some("info,shardmq_shards=debug"))],
    );
    // Open and close connections one by one; with two shards about half the sessions live on
    // the shard that did not accept the socket, so those connections are handed off. Each
    // place must come back exactly once: a lost one would refuse below the limit, one given
    // back twice would admit past it.
    for n in 0..12 {
        let stream = connect_eventually(limited, &format!("cycle-{n}"));
        drop(stream);
    }
    let first = connect_eventually(limited, "first");
    let second = connect_eventually(limited, "second");
    for n in 0..3 {
        assert!(
            try_connect(limited, &format!("third-{n}")).is_none(),
            "a third connection on a listener with connections_max = 2 is refused"
        );
    }
    // Other listeners have no such limit.
    let others: Vec<_> = (0..4)
        .map(|n| try_connect(port, &format!("other-{n}")).expect("the --listen address admits"))
        .collect();
    drop(first);
    let again = connect_eventually(limited, "again");
    assert!(try_connect(limited, "one-more").is_none());
    drop((second, again, others));
    broker.stop();
    let log = broker.log_text();
    assert!(
        log.contains("the listener is at its connections_max"),
        "the refusal is logged:\n{log}"
    );
    // The --listen address is listener 0, the table listener 1; the shard hears of both,
    // with the client's address.
    let opened = |listener: u16| {
        log.lines()
            .filter(|line| {
                line.contains("connection opened")
                    && line
                        .split_whitespace()
                        .any(|field| field == format!("listener={listener}"))
                    && line.contains("address=127.0.0.1:")
            })
            .count()
    };
    assert!(
        opened(0) >= 4,
        "connections on listener 0 are told so:\n{log}"
    );
    assert!(
        opened(1) >= 16,
        "connections on listener 1 are told so:\n{log}"
    );
}

/// Starts the broker on `config`; asserts it stopped with the configuration's exit code and
/// returns what it wrote on stderr.
fn refused_at_start(config: &str) -> String {
    let path = std::env::temp_dir().join(format!("shardmq-listeners-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn a_listener_table_missing_a_key_is_refused_at_start() {
    let stderr = refused_at_start("[[listener]]\nbind = \"127.0.0.1:1\"\ntransport = \"wss\"\n");
    assert!(
        stderr.contains("`listener[0].tls_cert_file` must be set for a \"wss\" listener"),
        "{stderr}"
    );
    // An allowed origin with a line break in it (a header injection) stops the start too.
    let stderr = refused_at_start(
        "[[listener]]\nbind = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_allowed_origins = [\"http://a\\nX: 1\"]\n",
    );
    assert!(
        stderr.contains(
            "`listener[0].ws_allowed_origins[0]` is \"http://a\\nX: 1\": it holds a control character"
        ),
        "{stderr}"
    );
}
