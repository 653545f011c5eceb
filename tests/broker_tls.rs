//! TLS client listeners (`transport = "tls"`) through a real broker, with certificates that the
//! test makes with `openssl`: mosquitto_pub/sub with `--cafile`, and with `--cert`/`--key`
//! against `tls_client_cert = "required"` (the certificate's CN read as the client's name); a
//! client without a certificate, one whose certificate comes from another authority, and one
//! that trusts another authority, refused; rumqttc over TLS on two shards (connections handed
//! between shards keep their TLS session); a reload on SIGHUP and through the admin API (new
//! connections see the new certificate, an open one goes on, a bad file changes nothing); and
//! hostile bytes on the TLS port (garbage, a handshake that stops half-way) that end only
//! their own connection, the stalled one within the connect timeout.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::pki::Pki;
use support::{ADMIN_TOKEN, Broker, free_port, mosquitto};

impl Pki {
    fn new(test: &str) -> Self {
        Pki::new_in("tls", test)
    }

    /// The usual set: authority `ca` with a server certificate `server` (127.0.0.1 and
    /// localhost) and a client certificate `client` (CN device-1, SAN DNS:device-1.example);
    /// authority `other-ca` with a client certificate `stranger`.
    fn standard(test: &str) -> Self {
        let pki = Self::new(test);
        pki.authority("ca");
        pki.certificate(
            "server",
            "server-a",
            "IP:127.0.0.1,DNS:localhost",
            "serverAuth",
            "ca",
        );
        pki.certificate(
            "client",
            "device-1",
            "DNS:device-1.example",
            "clientAuth",
            "ca",
        );
        pki.authority("other-ca");
        pki.certificate(
            "stranger",
            "device-1",
            "DNS:device-1.example",
            "clientAuth",
            "other-ca",
        );
        pki
    }

    /// A `[[listener]]` table for TLS on `port` with extra keys.
    fn listener(&self, port: u16, extra: &str) -> String {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\ntransport = \"tls\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{extra}\n",
            self.path("server.pem"),
            self.path("server.key")
        )
    }
}

/// A broker with a plain listener (the support's) and `listener` tables, `shards` shards, a
/// short connect timeout and the ingress layer's debug lines in its log.
fn broker(shards: u16, tables: &str) -> Broker {
    let config = format!("[limits]\nconnect_timeout_ms = 1500\n{tables}");
    Broker::start_env(
        std::net::IpAddr::from([127, 0, 0, 1]),
        None,
        free_port(),
        free_port(),
        shards,
        &config,
        &[("RUST_LOG", Some("info,shardmq::ingress=debug"))],
    )
}

/// A mosquitto_sub waiting for one message on `topic` with `tls` arguments.
fn subscriber(port: u16, topic: &str, tls: &[&str]) -> std::process::Child {
    let mut command = Command::new("mosquitto_sub");
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args([
            "-C",
            "1",
            "-W",
            "10",
            "-q",
            "1",
            "-i",
            &format!("sub-{topic}"),
        ])
        .args(tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().unwrap()
}

/// Publishes until the subscriber got one message (it may not have subscribed yet); what it
/// printed.
fn deliver(port: u16, topic: &str, tls: &[&str], sub: std::process::Child) -> String {
    let port = port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-q", "1", "-t", topic, "-m", "hello-tls"];
    args.extend(["-p", &port]);
    args.extend(tls);
    let output = support::publish_until_received(&args, sub, Duration::from_secs(10));
    assert!(
        output.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn mosquitto_clients_over_tls_with_a_ca_file() {
    let pki = Pki::standard("cafile");
    let port = free_port();
    let mut broker = broker(2, &pki.listener(port, ""));
    let ca = pki.path("ca.pem");
    let tls = ["--cafile", ca.as_str()];
    let sub = subscriber(port, "tls/plain", &tls);
    assert_eq!(deliver(port, "tls/plain", &tls, sub).trim(), "hello-tls");
    // TLS 1.2 too.
    let (ok, output) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cafile",
            &ca,
            "--tls-version",
            "tlsv1.2",
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(ok, "TLS 1.2: {output}");
    // A client that trusts another authority refuses the broker.
    let other = pki.path("other-ca.pem");
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cafile",
            &other,
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(!ok, "a client trusting another authority must fail");
    // Plain MQTT on the TLS port is refused; the plain port still serves plain MQTT.
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(!ok, "plain MQTT on the TLS port must fail");
    let (ok, output) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(ok, "plain listener: {output}");
    assert!(broker.is_running());
}

#[test]
fn client_certificates_required_and_the_name_read_from_the_cn() {
    let pki = Pki::standard("mutual");
    let port = free_port();
    let ca = pki.path("ca.pem");
    let extra = format!(
        "tls_client_ca_file = \"{ca}\"\ntls_client_cert = \"required\"\ntls_username_from = \"cn\""
    );
    let mut broker = broker(2, &pki.listener(port, &extra));
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let tls = [
        "--cafile",
        ca.as_str(),
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
    ];
    let sub = subscriber(port, "tls/mutual", &tls);
    assert_eq!(deliver(port, "tls/mutual", &tls, sub).trim(), "hello-tls");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !broker.log_text().contains("certificate_name=device-1") {
        assert!(
            Instant::now() < deadline,
            "the CN is not logged as the client's name:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // No certificate: refused.
    let p = port.to_string();
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &p,
            "--cafile",
            &ca,
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(!ok, "a client without a certificate must be refused");
    // A certificate of another authority: refused.
    let (cert, key) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &p,
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(!ok, "a certificate of another authority must be refused");
    assert!(broker.is_running());
}

#[test]
fn start_up_refuses_unreadable_files_with_their_names() {
    let pki = Pki::standard("files");
    let port = free_port();
    let config = pki.listener(port, "").replace("server.key", "missing.key");
    let path = pki.path("config.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["serve", "--shards", "1", "--config", &path])
        .env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("`listener[0].tls_key_file`") && stderr.contains("missing.key"),
        "{stderr}"
    );
    // A key that does not match the certificate.
    let config = pki.listener(port, "").replace("server.key", "client.key");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["serve", "--shards", "1", "--config", &path])
        .env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("certificate and key"), "{stderr}");
}

/// A rustls client configuration trusting `ca` (ALPN mqtt), for rumqttc.
fn rustls_client(ca: &str) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for certificate in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Arc::new(config)
}

#[test]
fn rumqttc_over_tls_across_shards() {
    let pki = Pki::standard("rumqttc");
    let port = free_port();
    let _broker = broker(2, &pki.listener(port, ""));
    let config = rustls_client(&pki.path("ca.pem"));
    let tls = |options: &mut rumqttc::MqttOptions| {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config.clone()),
        ));
    };
    // Enough client identifiers that some are owned by the shard that did not accept them:
    // those connections are handed over with their TLS sessions.
    let subscribers: Vec<_> = (0..6)
        .map(|i| {
            let client = support::v4(port, &format!("tls-sub-{i}"), tls);
            client.subscribe(&format!("rumq/{i}"), rumqttc::QoS::AtLeastOnce);
            client
        })
        .collect();
    let publisher = support::v4(port, "tls-pub", tls);
    for i in 0..6 {
        publisher
            .client
            .publish(
                format!("rumq/{i}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                vec![b'x'; 3000],
            )
            .unwrap();
    }
    for (i, subscriber) in subscribers.iter().enumerate() {
        let got = subscriber.publishes(1, Duration::from_secs(10));
        assert_eq!(got.len(), 1, "subscriber {i}");
        assert_eq!(got[0].payload.len(), 3000);
    }
}

/// The subject of the certificate the broker presents to a new connection on `port`.
fn presented_subject(port: u16, ca: &str) -> String {
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-CAfile",
            ca,
            "-verify_return_error",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines()
        .find(|line| line.starts_with("subject="))
        .unwrap_or_default()
        .to_string()
}

/// `POST /api/v1/tls/reload`: the status code and body.
fn admin_reload(admin: SocketAddr) -> (u16, String) {
    support::admin_post(admin, "/api/v1/tls/reload")
}

#[test]
fn certificates_reload_on_sighup_and_through_the_admin_api() {
    let pki = Pki::standard("reload");
    let port = free_port();
    let broker = broker(1, &pki.listener(port, ""));
    let ca = pki.path("ca.pem");
    assert!(presented_subject(port, &ca).contains("server-a"));
    // A connection open across the reloads.
    let config = rustls_client(&ca);
    let open = support::v4(port, "before-reload", |options| {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config.clone()),
        ));
    });
    open.subscribe("reload/t", rumqttc::QoS::AtLeastOnce);
    // New files in place, then SIGHUP.
    pki.certificate(
        "server",
        "server-b",
        "IP:127.0.0.1,DNS:localhost",
        "serverAuth",
        "ca",
    );
    let status = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !presented_subject(port, &ca).contains("server-b") {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken key: the admin call says why, and the listener keeps serving server-b.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], broker.admin_port));
    let (status, body) = admin_reload(admin);
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("tls_key_file") || body.contains("key"),
        "{body}"
    );
    assert!(presented_subject(port, &ca).contains("server-b"));
    assert!(broker.log_text().contains("TLS reload failed"));
    // Good files again, through the admin API.
    pki.certificate(
        "server",
        "server-c",
        "IP:127.0.0.1,DNS:localhost",
        "serverAuth",
        "ca",
    );
    let (status, body) = admin_reload(admin);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"reloaded_listeners\":1"), "{body}");
    assert!(presented_subject(port, &ca).contains("server-c"));
    // The connection from before still works.
    let publisher = support::v4(port, "after-reload", |options| {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config.clone()),
        ));
    });
    publisher
        .client
        .publish("reload/t", rumqttc::QoS::AtLeastOnce, false, "still here")
        .unwrap();
    let got = open.publishes(1, Duration::from_secs(10));
    assert_eq!(&got[0].payload[..], b"still here");
}

/// Reads until the peer closes or `timeout`; whether it closed.
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn hostile_bytes_end_only_their_own_connection_and_a_stalled_handshake_times_out() {
    let pki = Pki::standard("hostile");
    let port = free_port();
    let mut broker = broker(1, &pki.listener(port, ""));
    let ca = pki.path("ca.pem");
    let config = rustls_client(&ca);
    let tls = |options: &mut rumqttc::MqttOptions| {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config.clone()),
        ));
    };
    let watcher = support::v4(port, "watcher", tls);
    watcher.subscribe("hostile/t", rumqttc::QoS::AtLeastOnce);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    // Garbage: answered with an alert and closed at once.
    let mut garbage = TcpStream::connect(address).unwrap();
    garbage.write_all(&[0xff; 600]).unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(3)));
    // A record header promising a long handshake, then a few bytes, then nothing.
    let mut stalled = TcpStream::connect(address).unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    let started = Instant::now();
    // A huge announced handshake beyond the bound: cut.
    let mut long = TcpStream::connect(address).unwrap();
    let mut hello = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
    hello.extend(std::iter::repeat_n(0u8, 16_000));
    let _ = long.write_all(&hello);
    let _ = long.write_all(&hello);
    let _ = long.write_all(&hello);
    assert!(closed_within(&mut long, Duration::from_secs(3)));
    // Meanwhile the open connection carries on.
    let publisher = support::v4(port, "publisher", tls);
    publisher
        .client
        .publish("hostile/t", rumqttc::QoS::AtLeastOnce, false, "fine")
        .unwrap();
    assert_eq!(watcher.publishes(1, Duration::from_secs(10)).len(), 1);
    // The stalled handshake ends within the connect timeout (1.5 s), with some slack.
    assert!(closed_within(&mut stalled, Duration::from_secs(5)));
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "closed before its timeout: {:?}",
        started.elapsed()
    );
    assert!(broker.is_running());
}
