//! The PROXY protocol on client listeners through a real broker: a real HAProxy (Debian's
//! package) in front with `send-proxy-v2` (the broker logs the client's own address, not
//! HAProxy's; HAProxy's health checks, v2 LOCAL headers, are accepted quietly) and with
//! `send-proxy-v2-ssl-cn` (HAProxy terminates TLS with a client certificate made by
//! tests/support/pki.rs, and the broker takes the verified CN as the client's certificate
//! name); a header from a source outside `proxy_trusted` refused; a v1 header written by hand;
//! garbage where a header belongs closes only that connection.
//!
//! The HAProxy configuration is `tests/haproxy/broker.cfg`, the one `tuning/haproxy.md`
//! explains; the test fills in its ports and files.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::pki::Pki;
use support::{Broker, connect_packet, free_port, mosquitto, read_until_closed};

/// A broker whose listener on `port` takes PROXY headers (`proxy_protocol`) from 127.0.0.1
/// only, with the ingress layer's debug lines in its log.
fn broker(port: u16, proxy_protocol: &str, extra: &str) -> Broker {
    let config = format!(
        "[limits]\nconnect_timeout_ms = 1500\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\nproxy_protocol = \"{proxy_protocol}\"\n\
         proxy_trusted = [\"127.0.0.1/32\"]\n{extra}\n"
    );
    Broker::start_ingress_logged(1, &config)
}

/// A TCP connection to `to` from the loopback address `from` (any free port).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .expect("bind a loopback address");
    socket
        .connect_timeout(&to.into(), Duration::from_secs(3))
        .unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends a 3.1.1 CONNECT (after `prefix`) and checks the CONNACK.
fn mqtt_connect(stream: &mut TcpStream, prefix: &[u8], id: &str) {
    let mut bytes = prefix.to_vec();
    bytes.extend(connect_packet(id));
    stream.write_all(&bytes).unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("a CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
}

/// PINGREQ answered: the connection is alive.
fn ping(stream: &mut TcpStream) {
    stream.write_all(&[0xc0, 0x00]).unwrap();
    let mut pong = [0u8; 2];
    stream.read_exact(&mut pong).expect("a PINGRESP");
    assert_eq!(pong, [0xd0, 0x00]);
}

/// Waits for `needle` in the broker's log.
fn wait_log(broker: &Broker, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(8);
    while !broker.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in the broker's log:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// HAProxy running `tests/haproxy/broker.cfg`, killed when dropped.
struct Haproxy {
    child: Child,
    mqtt_port: u16,
    mqtts_port: u16,
}

impl Haproxy {
    fn start(pki: &Pki, broker_port: u16) -> Self {
        let (mqtt_port, mqtts_port) = (free_port(), free_port());
        // HAProxy reads the certificate and its key from one file.
        let bundle = pki.path("server-haproxy.pem");
        let mut pem = std::fs::read(pki.path("server.pem")).unwrap();
        pem.extend(std::fs::read(pki.path("server.key")).unwrap());
        std::fs::write(&bundle, pem).unwrap();
        let template = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/haproxy/broker.cfg"),
        )
        .unwrap();
        let config = template
            .replace("@MQTT_PORT@", &mqtt_port.to_string())
            .replace("@MQTTS_PORT@", &mqtts_port.to_string())
            .replace("@BROKER_PORT@", &broker_port.to_string())
            .replace("@SERVER_PEM@", &bundle)
            .replace("@CA_FILE@", &pki.path("ca.pem"));
        let path = pki.path("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f", &path])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is installed (Debian: apt-get install haproxy)");
        let haproxy = Self {
            child,
            mqtt_port,
            mqtts_port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", mqtts_port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn behind_haproxy_the_broker_sees_the_clients_address_and_verified_cn() {
    let pki = Pki::with_server("proxy", "haproxy");
    pki.certificate(
        "client",
        "device-1",
        "DNS:device-1.example",
        "clientAuth",
        "ca",
    );
    let port = free_port();
    let mut broker = broker(port, "v2", "tls_username_from = \"cn\"");
    let haproxy = Haproxy::start(&pki, port);
    let front = SocketAddr::from(([127, 0, 0, 1], haproxy.mqtt_port));

    // send-proxy-v2: a client from 127.0.0.3 is logged as itself, HAProxy (127.0.0.1) as
    // the balancer.
    let mut client = connect_from(Ipv4Addr::new(127, 0, 0, 3), front);
    let local = client.local_addr().unwrap();
    mqtt_connect(&mut client, b"", "through-haproxy");
    ping(&mut client);
    wait_log(&broker, &format!("address={local}"));
    let log = broker.log_text();
    let line = log
        .lines()
        .find(|line| line.contains(&format!("address={local}")))
        .unwrap();
    assert!(line.contains("balancer=Some(127.0.0.1:"), "{line}");

    // send-proxy-v2-ssl-cn: HAProxy checks the client's certificate; the broker names the
    // client by its CN. Delivery through both fronts.
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let sub = Command::new("timeout")
        .args(["20", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
        .arg(haproxy.mqtt_port.to_string())
        .args([
            "-t",
            "proxy/cn",
            "-C",
            "1",
            "-W",
            "15",
            "-q",
            "1",
            "-i",
            "sub-proxy",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = haproxy.mqtts_port.to_string();
    let output = support::publish_until_received(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-q",
            "1",
            "-t",
            "proxy/cn",
            "-m",
            "hello-proxy",
        ],
        sub,
        Duration::from_secs(15),
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "hello-proxy"
    );
    wait_log(&broker, "certificate_name=device-1");

    // Without a client certificate HAProxy refuses the TLS handshake itself.
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &haproxy.mqtts_port.to_string(),
            "--cafile",
            &ca,
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(!ok, "HAProxy requires a client certificate");

    // HAProxy's health checks (v2 LOCAL, then a close) were accepted: none was refused,
    // and the server stayed up (the connections above went through).
    let log = broker.log_text();
    assert!(!log.contains("client connection refused"), "{log}");
    drop(haproxy);
    assert!(broker.is_running());
}

#[test]
fn untrusted_sources_hand_made_v1_headers_and_garbage() {
    let port = free_port();
    let mut broker = broker(port, "any", "");
    let listener = SocketAddr::from(([127, 0, 0, 1], port));

    // A v1 header by hand from a trusted source names the client.
    let mut good = connect_from(Ipv4Addr::new(127, 0, 0, 1), listener);
    mqtt_connect(
        &mut good,
        b"PROXY TCP4 198.51.100.20 127.0.0.1 40123 1883\r\n",
        "v1-by-hand",
    );
    wait_log(&broker, "address=198.51.100.20:40123");

    // A v2 header from 127.0.0.2, outside `proxy_trusted`: refused and closed, with the
    // reason in the log.
    let mut untrusted = connect_from(Ipv4Addr::new(127, 0, 0, 2), listener);
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend([203, 0, 113, 5, 127, 0, 0, 1, 0x9c, 0x40, 0x07, 0x5b]);
    header.extend(connect_packet("spoofer"));
    untrusted.write_all(&header).unwrap();
    let (answer, closed) = read_until_closed(&mut untrusted, Duration::from_secs(5));
    assert!(closed && answer.is_empty(), "{answer:?}");
    wait_log(&broker, "127.0.0.2 is not in `proxy_trusted`");
    assert!(!broker.log_text().contains("203.0.113.5"));

    // Plain MQTT without a header, and garbage: each closed, the good connection unharmed.
    for bytes in [
        connect_packet("no-header"),
        b"PROXY TCP4 garbage\r\n".to_vec(),
    ] {
        let mut bad = connect_from(Ipv4Addr::new(127, 0, 0, 1), listener);
        bad.write_all(&bytes).unwrap();
        let (answer, closed) = read_until_closed(&mut bad, Duration::from_secs(5));
        assert!(closed && answer.is_empty(), "{answer:?}");
    }
    wait_log(&broker, "does not start with a v1 or v2 header");
    wait_log(&broker, "malformed header");
    // A header that never ends is cut at the connect timeout.
    let mut stalled = connect_from(Ipv4Addr::new(127, 0, 0, 1), listener);
    stalled.write_all(b"PROXY TCP4 198.51.").unwrap();
    let (_, closed) = read_until_closed(&mut stalled, Duration::from_secs(5));
    assert!(
        closed,
        "a stalled header is closed within the connect timeout"
    );
    ping(&mut good);
    assert!(broker.is_running());
}

#[test]
fn per_address_limits_count_the_clients_address_not_the_balancers() {
    let port = free_port();
    let config = format!(
        "[limits]\nconnect_timeout_ms = 1500\nconnections_per_address_max = 2\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\nproxy_protocol = \"v1\"\n\
         proxy_trusted = [\"127.0.0.1/32\"]\n"
    );
    let mut broker = Broker::start_ingress_logged(1, &config);
    let listener = SocketAddr::from(([127, 0, 0, 1], port));
    let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 1883\r\n");
    // Four clients through one balancer address: none is refused by the balancer's count.
    let mut held = Vec::new();
    for (index, client) in [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
        "198.51.100.4",
    ]
    .iter()
    .enumerate()
    {
        let mut stream = connect_from(Ipv4Addr::LOCALHOST, listener);
        mqtt_connect(
            &mut stream,
            header(client).as_bytes(),
            &format!("many-{index}"),
        );
        held.push(stream);
    }
    // One client address: its third connection is over the limit, closed before a CONNACK.
    for index in 0..2 {
        let mut stream = connect_from(Ipv4Addr::LOCALHOST, listener);
        mqtt_connect(
            &mut stream,
            header("198.51.100.9").as_bytes(),
            &format!("same-{index}"),
        );
        held.push(stream);
    }
    let mut third = connect_from(Ipv4Addr::LOCALHOST, listener);
    let mut bytes = header("198.51.100.9").into_bytes();
    bytes.extend(connect_packet("same-2"));
    third.write_all(&bytes).unwrap();
    let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(5));
    assert!(
        closed && answer.is_empty(),
        "refused without a CONNACK: {answer:?}"
    );
    // The others are unharmed; a closed one gives its count back.
    for stream in &mut held {
        ping(stream);
    }
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(300));
    let mut again = connect_from(Ipv4Addr::LOCALHOST, listener);
    mqtt_connect(&mut again, header("198.51.100.9").as_bytes(), "same-3");
    assert!(broker.is_running());
}
