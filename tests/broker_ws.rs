//! WebSocket listeners (`transport = "ws"` and `"wss"`) through a real broker: Eclipse Paho's
//! Python client over WebSocket and over WebSocket with TLS (`tests/paho/websocket.py`),
//! MQTT.js over WebSocket (`tools/js/websocket.js`, npm packages installed by tools/test.sh
//! into tools/js), and a hand-made WebSocket client for what libraries do not send on
//! purpose: CONNECT split over fragmented frames with a ping between, a text frame (closed
//! with 1003), a refused subprotocol, a wrong path, and a close that is echoed; and a
//! WebSocket listener behind a PROXY v1 header (the header's address is the client's); and
//! `ws_allowed_origins`: a page of another origin is answered 403, a listed one is served.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::pki::Pki;
use support::{Broker, connect_packet, free_port, read_until_closed};

/// A broker with a WebSocket listener on `ws_port` (path /mqtt) and, when given, a WSS one on
/// `wss` (port, certificate directory) at path /secure. Each lists the origin paho-mqtt
/// (Python) sends, `http(s)://` and the address it dialed; MQTT.js under Node sends none.
fn broker(ws_port: u16, wss: Option<(u16, &Pki)>) -> Broker {
    let mut config = format!(
        "[limits]\nconnect_timeout_ms = 1500\n\
         [[listener]]\nbind = \"127.0.0.1:{ws_port}\"\ntransport = \"ws\"\n\
         ws_allowed_origins = [\"http://127.0.0.1:{ws_port}\"]\n"
    );
    if let Some((port, pki)) = wss {
        config.push_str(&format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\ntransport = \"wss\"\npath = \"/secure\"\n\
             ws_allowed_origins = [\"https://127.0.0.1:{port}\"]\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            pki.path("server.pem"),
            pki.path("server.key")
        ));
    }
    Broker::start_ingress_logged(2, &config)
}

fn repository(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a client program with a time bound; asserts it succeeded and printed `passed`.
fn run_client(program: &str, args: &[String], passed: &str, broker: &Broker) {
    let output = Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(passed),
        "{program} {args:?} failed:\n{stdout}\n{}\nbroker log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        broker.log_text()
    );
}

#[test]
fn paho_over_ws_and_wss_and_mqtt_js_over_ws() {
    let pki = Pki::with_server("ws", "clients");
    let (ws_port, wss_port) = (free_port(), free_port());
    let mut broker = broker(ws_port, Some((wss_port, &pki)));
    let script = repository("tests/paho/websocket.py").display().to_string();
    run_client(
        "python3",
        &[script.clone(), ws_port.to_string(), "/mqtt".into()],
        "paho websocket passed",
        &broker,
    );
    run_client(
        "python3",
        &[
            script,
            wss_port.to_string(),
            "/secure".into(),
            pki.path("ca.pem"),
        ],
        "paho websocket passed",
        &broker,
    );
    run_client(
        "node",
        &[
            repository("tools/js/websocket.js").display().to_string(),
            format!("ws://127.0.0.1:{ws_port}/mqtt"),
        ],
        "mqtt.js websocket passed",
        &broker,
    );
    assert!(broker.is_running());
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x01, 0xc3, 0x7e];
    let mut frame = vec![first];
    assert!(payload.len() < 126);
    frame.push(0x80 | payload.len() as u8);
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Opens a WebSocket on `port` at `path` offering `protocols`; returns the stream and the
/// server's answer to the upgrade (up to the blank line).
fn upgrade(port: u16, path: &str, protocols: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocols}\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => answer.push(byte[0]),
            _ => break,
        }
    }
    (stream, String::from_utf8_lossy(&answer).into_owned())
}

/// Reads one unmasked server frame: (first byte, payload).
fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).expect("a frame");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            stream.read_exact(&mut n).unwrap();
            usize::from(u16::from_be_bytes(n))
        }
        127 => panic!("no frame this large expected"),
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (head[0], payload)
}

/// Waits up to 5 s for the broker's log to satisfy `logged`.
fn wait_logged(broker: &Broker, logged: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !logged(&broker.log_text()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_raw_client_fragments_pings_and_is_closed_for_text() {
    let port = free_port();
    let mut broker = broker(port, None);

    // CONNECT split over three fragments of one binary message, a ping between them.
    let (mut stream, answer) = upgrade(port, "/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(answer.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
    let connect = connect_packet("raw-ws");
    let mut bytes = frame(0x02, &connect[..3]);
    bytes.extend(frame(0x89, b"are you there"));
    bytes.extend(frame(0x00, &connect[3..9]));
    bytes.extend(frame(0x80, &connect[9..]));
    // One write per frame byte group, so the server sees frames cut anywhere.
    for chunk in bytes.chunks(5) {
        stream.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_frame(&mut stream), (0x8a, b"are you there".to_vec()));
    assert_eq!(
        read_frame(&mut stream),
        (0x82, vec![0x20, 0x02, 0x00, 0x00]),
        "CONNACK in a binary frame"
    );
    // PINGREQ in a binary frame: PINGRESP back.
    stream.write_all(&frame(0x82, &[0xc0, 0x00])).unwrap();
    assert_eq!(read_frame(&mut stream), (0x82, vec![0xd0, 0x00]));

    // A text frame: closed with 1003, the other connection unharmed.
    let (mut text, answer) = upgrade(port, "/mqtt", "");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    assert!(!answer.contains("Sec-WebSocket-Protocol"));
    text.write_all(&frame(0x81, b"hello")).unwrap();
    assert_eq!(
        read_frame(&mut text),
        (0x88, 1003u16.to_be_bytes().to_vec())
    );
    let (_, closed) = read_until_closed(&mut text, Duration::from_secs(5));
    assert!(closed);

    // Subprotocols offered without mqtt, and a wrong path: refused before the upgrade.
    let (mut refused, answer) = upgrade(port, "/mqtt", "Sec-WebSocket-Protocol: wamp.2.json\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(read_until_closed(&mut refused, Duration::from_secs(5)).1);
    let (mut refused, answer) = upgrade(port, "/elsewhere", "");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    assert!(read_until_closed(&mut refused, Duration::from_secs(5)).1);

    // The first connection still works, and a close from it is echoed.
    stream.write_all(&frame(0x82, &[0xc0, 0x00])).unwrap();
    assert_eq!(read_frame(&mut stream), (0x82, vec![0xd0, 0x00]));
    stream
        .write_all(&frame(0x88, &1000u16.to_be_bytes()))
        .unwrap();
    assert_eq!(
        read_frame(&mut stream),
        (0x88, 1000u16.to_be_bytes().to_vec())
    );
    assert!(read_until_closed(&mut stream, Duration::from_secs(5)).1);
    assert!(broker.is_running());
}

#[test]
fn a_websocket_listener_behind_a_proxy_header() {
    let port = free_port();
    let config = format!(
        "[limits]\nconnect_timeout_ms = 1500\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\ntransport = \"ws\"\nproxy_protocol = \"v1\"\n\
         proxy_trusted = [\"127.0.0.1\"]\n"
    );
    let mut broker = Broker::start_ingress_logged(1, &config);
    // The PROXY header first, then the upgrade, in one write.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut bytes = b"PROXY TCP4 198.51.100.77 127.0.0.1 41000 8080\r\n".to_vec();
    bytes.extend_from_slice(
        b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    );
    bytes.extend(frame(0x82, &connect_packet("proxied-ws")));
    stream.write_all(&bytes).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 101 "));
    assert_eq!(
        read_frame(&mut stream),
        (0x82, vec![0x20, 0x02, 0x00, 0x00])
    );
    wait_logged(&broker, |log| log.contains("address=198.51.100.77:41000"));
    // Without the header: refused before any HTTP answer.
    let (mut bare, answer) = upgrade(port, "/mqtt", "");
    assert!(answer.is_empty(), "{answer}");
    assert!(read_until_closed(&mut bare, Duration::from_secs(5)).1);
    assert!(broker.is_running());
}

#[test]
fn a_foreign_origin_is_refused_with_403_and_a_listed_one_is_served() {
    let port = free_port();
    let mut broker = Broker::start_ingress_logged(
        1,
        &format!(
            "[limits]\nconnect_timeout_ms = 1500\n\
             [[listener]]\nbind = \"127.0.0.1:{port}\"\ntransport = \"ws\"\n\
             ws_allowed_origins = [\"https://app.example\", \"http://localhost:3000\"]\n"
        ),
    );
    // A page elsewhere: refused before the upgrade, closed, and the log says who and why.
    let (mut foreign, answer) = upgrade(
        port,
        "/mqtt",
        "Sec-WebSocket-Protocol: mqtt\r\nOrigin: https://evil.example\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(read_until_closed(&mut foreign, Duration::from_secs(5)).1);
    wait_logged(&broker, |log| {
        log.lines().any(|line| {
            line.contains("INFO")
                && line.contains("address=127.0.0.1:")
                && line.contains(
                    "Origin \"https://evil.example\" is not in the listener's ws_allowed_origins",
                )
        })
    });
    // A listed page (the host's case does not matter), and a client that sends no Origin.
    for origin in ["Origin: https://APP.example\r\n", ""] {
        let (mut stream, answer) = upgrade(
            port,
            "/mqtt",
            &format!("Sec-WebSocket-Protocol: mqtt\r\n{origin}"),
        );
        assert!(answer.starts_with("HTTP/1.1 101 "), "{origin}: {answer}");
        stream
            .write_all(&frame(0x82, &connect_packet("from-a-listed-page")))
            .unwrap();
        assert_eq!(
            read_frame(&mut stream),
            (0x82, vec![0x20, 0x02, 0x00, 0x00])
        );
    }
    assert!(broker.is_running());
}

#[test]
fn a_client_that_pings_and_never_reads_is_closed_and_nobody_else_is() {
    let port = free_port();
    let broker = Broker::start_ingress_logged(
        1,
        &format!(
            "[limits]\nunsent_bytes_per_connection_max = 65536\n\
             [[listener]]\nbind = \"127.0.0.1:{port}\"\ntransport = \"ws\"\n"
        ),
    );
    let (mut flood, answer) = upgrade(port, "/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    flood
        .write_all(&frame(0x82, &connect_packet("ping-flood")))
        .unwrap();
    // 125-byte pings, each answered by a 127-byte pong this client never reads: at most
    // 64 MiB of them, far past what the kernel's buffers and the broker's bound hold.
    let mut burst = Vec::new();
    for _ in 0..1000 {
        burst.extend(frame(0x89, &[b'p'; 125]));
    }
    let said_why = || {
        broker
            .log_text()
            .contains("it does not read what its transport sends")
    };
    // Writes go on succeeding for a while after the broker closed (it reads and drops what
    // comes during its close linger), so its log says when.
    let mut written = 0usize;
    while written < 64 << 20 && !said_why() {
        if flood.write_all(&burst).is_err() {
            break;
        }
        written += burst.len();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !said_why() {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker kept a client that never read the pongs of {written} bytes of pings:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection ends: what the kernel already holds, then the end of the stream.
    let (_, closed) = read_until_closed(&mut flood, Duration::from_secs(10));
    assert!(closed, "the flooding connection was not closed");
    // Everyone else is served.
    let (mut other, answer) = upgrade(port, "/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    other
        .write_all(&frame(0x82, &connect_packet("after-flood")))
        .unwrap();
    assert_eq!(read_frame(&mut other), (0x82, vec![0x20, 0x02, 0x00, 0x00]));
}
