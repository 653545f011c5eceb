//! Shared by the integration tests: a real `shardmq` process on a loopback port, and real
//! clients (rumqttc here; mosquitto and paho from their own tests) to drive it.
#![allow(dead_code)] // each test binary uses a part of this module

pub mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A broker process, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Broker {
    /// Where its MQTT and admin ports listen (127.0.0.1, or an address in a network
    /// namespace).
    pub host: std::net::IpAddr,
    pub port: u16,
    /// The admin endpoint's port, unless the test's configuration set its own `[admin]`.
    pub admin_port: u16,
    child: Child,
    log: std::path::PathBuf,
}

/// A free loopback port below the kernel's ephemeral range (32768 and up by default), so that
/// an outbound connection (a cluster link dialling a node) cannot take it between this check
/// and the broker's bind. Ports are handed out from a per-process counter, offset by the
/// process id, and checked by binding.
pub fn free_port() -> u16 {
    free_port_on(std::net::Ipv4Addr::LOCALHOST)
}

/// [`free_port`] for another loopback address.
pub fn free_port_on(ip: std::net::Ipv4Addr) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let offset = std::process::id().wrapping_mul(977) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (offset + n) % SPAN) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A 3.1.1 CONNECT with client identifier `id` (under 116 bytes), clean session, keep alive
/// 60 s.
pub fn connect_packet(id: &str) -> Vec<u8> {
    let mut packet = vec![0x10, (12 + id.len()) as u8];
    packet.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c]);
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id.as_bytes());
    packet
}

/// The admin token every test broker is started with (`SHARDMQ_ADMIN_TOKEN`), and that
/// [`Broker::ctl`] sends.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl Broker {
    /// Starts `shardmq serve` with `shards` shards and extra TOML configuration.
    pub fn start_with(shards: u16, config: &str) -> Self {
        Self::start_on(free_port(), free_port(), shards, config)
    }

    /// Starts a broker on the given MQTT and admin ports (a restart keeps its ports).
    pub fn start_on(port: u16, admin_port: u16, shards: u16, config: &str) -> Self {
        Self::start_at(
            std::net::IpAddr::from([127, 0, 0, 1]),
            None,
            port,
            admin_port,
            shards,
            config,
        )
    }

    /// Starts a broker listening on `host`, inside network namespace `netns` if given.
    pub fn start_at(
        host: std::net::IpAddr,
        netns: Option<&str>,
        port: u16,
        admin_port: u16,
        shards: u16,
        config: &str,
    ) -> Self {
        Self::start_env(host, netns, port, admin_port, shards, config, &[])
    }

    /// [`Broker::start_at`] with changes to the broker's environment: `(name, Some(value))`
    /// sets a variable, `(name, None)` removes it. Brokers get `SHARDMQ_ADMIN_TOKEN` =
    /// [`ADMIN_TOKEN`] unless `env` says otherwise.
    pub fn start_env(
        host: std::net::IpAddr,
        netns: Option<&str>,
        port: u16,
        admin_port: u16,
        shards: u16,
        config: &str,
        env: &[(&str, Option<&str>)],
    ) -> Self {
        let directory =
            std::env::temp_dir().join(format!("shardmq-test-{}-{host}-{port}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let config_path = directory.join("config.toml");
        // Each broker of a test run gets its own admin port (the default one is shared).
        let admin = if config.contains("[admin]") {
            String::new()
        } else {
            format!("\n[admin]\nlisten = \"{host}:{admin_port}\"\n")
        };
        std::fs::write(
            &config_path,
            format!(
                "[server]\npin_cores = false\nshutdown_grace_seconds = 2\nlog = \"info\"\n{config}{admin}"
            ),
        )
        .unwrap();
        let log = directory.join("broker.log");
        // `ip netns exec` enters the namespace and then execs the broker: the child is the
        // broker itself, so kill and wait work as without it.
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns])
                    .arg(env!("CARGO_BIN_EXE_shardmq"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_shardmq")),
        };
        command.env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN);
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let child = command
            .args([
                "serve",
                "--listen",
                &SocketAddr::new(host, port).to_string(),
                "--shards",
                &shards.to_string(),
                "--config",
            ])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting shardmq");
        let broker = Self {
            host,
            port,
            admin_port,
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The admin endpoint comes up just after the MQTT listeners: wait for both.
        let admin = (!config.contains("[admin]")).then(|| SocketAddr::new(host, admin_port));
        while TcpStream::connect(broker.address()).is_err()
            || admin.is_some_and(|a| TcpStream::connect(a).is_err())
        {
            assert!(
                Instant::now() < deadline,
                "shardmq did not start listening:\n{}",
                broker.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    /// A broker on 127.0.0.1 with `config`, `shards` shards and the ingress layer's (TLS,
    /// WebSocket, PROXY) debug lines in its log.
    pub fn start_ingress_logged(shards: u16, config: &str) -> Self {
        Self::start_env(
            std::net::IpAddr::from([127, 0, 0, 1]),
            None,
            free_port(),
            free_port(),
            shards,
            config,
            &[("RUST_LOG", Some("info,shardmq::ingress=debug"))],
        )
    }

    pub fn start(shards: u16) -> Self {
        Self::start_with(shards, "")
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The broker's process identifier (for /proc/PID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running (it must survive anything a client sends).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `timeout` for the process to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The admin endpoint's address.
    pub fn admin_address(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.admin_port)
    }

    /// Kills the broker with SIGKILL: no goodbye to anyone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `shardmq ctl --admin ... <args>` with [`ADMIN_TOKEN`]: the JSON answer, or the error
    /// text.
    pub fn ctl(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let output = Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN)
            .args([
                "ctl",
                "--admin",
                &SocketAddr::new(self.host, self.admin_port).to_string(),
            ])
            .args(args)
            .output()
            .unwrap();
        if output.status.success() {
            Ok(serde_json::from_slice(&output.stdout).expect("ctl prints JSON"))
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Stops the broker with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        None
    }
}

/// Runs `shardmq serve --shards SHARDS` on data directory `directory` with extra TOML
/// `config` (sections after `[server]`) and `env` set, expected to end by itself at start (a
/// refused start, an injected abort): its exit status and stderr. Killed and reported as
/// `None` if it still runs after `timeout` (it started serving).
pub fn serve_to_exit(
    directory: &std::path::Path,
    shards: u16,
    config: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    // Beside the test's files, not in `directory` (which may be on a full file system).
    let scratch = std::env::temp_dir().join(format!(
        "shardmq-serve-{}-{}",
        std::process::id(),
        free_port()
    ));
    let stderr = scratch.with_extension("stderr");
    let config_path = scratch.with_extension("toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\npin_cores = false\nlisten = [\"127.0.0.1:{}\"]\ndata_dir = {:?}\n{config}\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_port(),
            directory.to_str().unwrap(),
            free_port()
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardmq"));
    command.env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .args(["serve", "--shards", &shards.to_string(), "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting shardmq");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr);
    let _ = std::fs::remove_file(&config_path);
    (status, text)
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
    }
}

/// The first event on `events` within `timeout` for which `pick` holds.
fn wait_for_event<E>(
    events: &mpsc::Receiver<E>,
    timeout: Duration,
    mut pick: impl FnMut(&E) -> bool,
) -> Option<E> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match events.recv_timeout(left) {
            Ok(event) if pick(&event) => return Some(event),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Up to `count` items that `extract` finds among the events of the next `timeout`.
fn collect_events<E, T>(
    events: &mpsc::Receiver<E>,
    count: usize,
    timeout: Duration,
    mut extract: impl FnMut(E) -> Option<T>,
) -> Vec<T> {
    let mut found = Vec::new();
    let deadline = Instant::now() + timeout;
    while found.len() < count {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match events.recv_timeout(left) {
            Ok(event) => found.extend(extract(event)),
            Err(_) => break,
        }
    }
    found
}

/// A rumqttc 3.1.1 client whose event loop runs on its own thread; incoming events arrive on
/// `events`. The loop ends at the first connection error (no automatic reconnect).
pub struct V4 {
    pub client: rumqttc::Client,
    pub events: mpsc::Receiver<rumqttc::Event>,
    pub ended: mpsc::Receiver<String>,
}

pub fn v4(port: u16, id: &str, configure: impl FnOnce(&mut rumqttc::MqttOptions)) -> V4 {
    v4_connected(port, id, configure, Duration::from_secs(5)).0
}

/// [`v4`] that waits up to `timeout` for the CONNACK and returns it too (its session present
/// flag, say).
pub fn v4_connected(
    port: u16,
    id: &str,
    configure: impl FnOnce(&mut rumqttc::MqttOptions),
    timeout: Duration,
) -> (V4, rumqttc::ConnAck) {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    configure(&mut options);
    let (client, mut connection) = rumqttc::Client::new(options, 1000);
    let (sender, events) = mpsc::channel();
    let (end_sender, ended) = mpsc::channel();
    std::thread::spawn(move || {
        for notification in connection.iter() {
            match notification {
                Ok(event) => {
                    if sender.send(event).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = end_sender.send(error.to_string());
                    return;
                }
            }
        }
    });
    let client = V4 {
        client,
        events,
        ended,
    };
    let Some(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(connack))) = client
        .wait_for(timeout, |event| {
            matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))
        })
    else {
        panic!("no CONNACK for {id} within {timeout:?}");
    };
    (client, connack)
}

impl V4 {
    /// The first event within `timeout` for which `pick` holds.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pick: impl FnMut(&rumqttc::Event) -> bool,
    ) -> Option<rumqttc::Event> {
        wait_for_event(&self.events, timeout, pick)
    }

    /// The PUBLISH packets received within `timeout`, stopping early at `count`.
    pub fn publishes(&self, count: usize, timeout: Duration) -> Vec<rumqttc::Publish> {
        collect_events(&self.events, count, timeout, |event| match event {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) => Some(publish),
            _ => None,
        })
    }

    /// Waits for `count` PUBACKs, `timeout` for each.
    pub fn acknowledged(&self, count: usize, timeout: Duration) {
        for _ in 0..count {
            self.wait_for(timeout, |event| {
                matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
            })
            .expect("PUBACK");
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub fn subscribe(&self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).unwrap();
        self.wait_for(Duration::from_secs(5), |event| {
            matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))
        })
        .expect("SUBACK");
    }
}

/// A rumqttc 5.0 client, as [`V4`].
pub struct V5 {
    pub client: rumqttc::v5::Client,
    pub events: mpsc::Receiver<rumqttc::v5::Event>,
    /// The broker's CONNACK.
    pub connack: rumqttc::v5::mqttbytes::v5::ConnAck,
    /// The error that ended the event loop (rumqttc reports a server DISCONNECT as one).
    pub ended: mpsc::Receiver<rumqttc::v5::ConnectionError>,
}

pub fn v5(port: u16, id: &str, configure: impl FnOnce(&mut rumqttc::v5::MqttOptions)) -> V5 {
    v5_at("127.0.0.1", port, id, configure)
}

/// A 5.0 client of the broker at `host:port`.
pub fn v5_at(
    host: &str,
    port: u16,
    id: &str,
    configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> V5 {
    let mut options = rumqttc::v5::MqttOptions::new(id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    configure(&mut options);
    let (client, mut connection) = rumqttc::v5::Client::new(options, 1000);
    let (sender, events) = mpsc::channel();
    let (end_sender, ended) = mpsc::channel();
    std::thread::spawn(move || {
        for notification in connection.iter() {
            match notification {
                Ok(event) => {
                    if sender.send(event).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = end_sender.send(error);
                    return;
                }
            }
        }
    });
    let Some(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(connack))) =
        wait_for_event(&events, Duration::from_secs(10), |event| {
            matches!(
                event,
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))
            )
        })
    else {
        panic!("no CONNACK for {id}");
    };
    V5 {
        client,
        events,
        connack,
        ended,
    }
}

impl V5 {
    pub fn wait_for(
        &self,
        timeout: Duration,
        pick: impl FnMut(&rumqttc::v5::Event) -> bool,
    ) -> Option<rumqttc::v5::Event> {
        wait_for_event(&self.events, timeout, pick)
    }

    pub fn publishes(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Vec<rumqttc::v5::mqttbytes::v5::Publish> {
        collect_events(&self.events, count, timeout, |event| match event {
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(publish)) => {
                Some(publish)
            }
            _ => None,
        })
    }

    /// Whether the connection ended (the broker closed it) within `timeout`.
    pub fn ended_within(&self, timeout: Duration) -> bool {
        self.ended.recv_timeout(timeout).is_ok()
    }

    pub fn subscribe(&self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        self.client.subscribe(filter, qos).unwrap();
        self.wait_for(Duration::from_secs(5), |event| {
            matches!(
                event,
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::SubAck(_))
            )
        })
        .expect("SUBACK");
    }
}

/// `POST path` with `{}` and [`ADMIN_TOKEN`] to the admin endpoint at `admin`: the status
/// code and the whole answer.
pub fn admin_post(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// Runs a mosquitto client program (mosquitto_pub, mosquitto_sub) for at most 20 seconds;
/// whether it succeeded, and what it printed.
pub fn mosquitto(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new("timeout")
        .arg("20")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mosquitto-clients is installed (Debian: apt-get install mosquitto-clients)");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Runs `mosquitto_pub ARGS` until `subscriber` (a mosquitto_sub waiting for one message,
/// which may not have subscribed yet) has exited or `timeout` passed; each publish must
/// succeed. Returns the subscriber's output.
pub fn publish_until_received(
    args: &[&str],
    subscriber: Child,
    timeout: Duration,
) -> std::process::Output {
    let mut subscriber = subscriber;
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, output) = mosquitto("mosquitto_pub", args);
        assert!(ok, "mosquitto_pub {args:?}: {output}");
        if subscriber.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    subscriber.wait_with_output().unwrap()
}

/// A raw TCP client for byte-level tests.
pub fn raw(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until the peer closes the connection or `timeout` passes; returns the bytes and
/// whether the connection was closed.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => left,
            _ => return (received, false),
        };
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return (received, true);
            }
            Err(_) => return (received, false),
        }
    }
}

/// A raw 5.0 client with a persistent session: CONNECT (clean start 0, session expiry
/// `expiry_seconds`, keep alive 60 s) and SUBSCRIBE `filter` at QoS 1, each checked for
/// success; the stream is then free for byte-level reads (a DISCONNECT, say).
pub fn raw_v5_subscribed(
    port: u16,
    client_id: &str,
    expiry_seconds: u32,
    filter: &str,
) -> TcpStream {
    let mut stream = raw(port);
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x00, 0x00, 0x3c, 0x05, 0x11,
    ];
    body.extend_from_slice(&expiry_seconds.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    stream.write_all(&connect).unwrap();
    let mut buffer = [0u8; 64];
    let read = stream.read(&mut buffer).unwrap();
    assert!(
        read >= 5 && buffer[0] == 0x20 && buffer[3] == 0x00,
        "CONNACK success: {:02x?}",
        &buffer[..read]
    );
    // SUBSCRIBE, packet identifier 1, no properties, QoS 1.
    let mut subscribe = vec![0x82, (6 + filter.len()) as u8, 0x00, 0x01, 0x00];
    subscribe.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(filter.as_bytes());
    subscribe.push(0x01);
    stream.write_all(&subscribe).unwrap();
    let read = stream.read(&mut buffer).unwrap();
    assert_eq!(buffer[0], 0x90, "SUBACK: {:02x?}", &buffer[..read]);
    stream
}

/// Appends `value` to `out` as an MQTT Variable Byte Integer (a remaining length, a
/// property length), for raw packets.
pub fn variable_byte_integer(value: usize, out: &mut Vec<u8>) {
    let mut value = value;
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

pub fn write_all(stream: &mut TcpStream, bytes: &[u8]) {
    // The broker may close first; a failed write is then expected.
    let _ = stream.write_all(bytes);
}

/// The node identifiers of a cluster status's member list.
pub fn member_ids(status: &serde_json::Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["node"].as_u64())
        .collect()
}

/// The secret of the test clusters.
pub const CLUSTER_SECRET: &str = "test-cluster-secret-0123";

/// A cluster node started by a test: its broker process and where its cluster port listens.
pub struct ClusterNode {
    pub broker: Broker,
    pub id: u32,
    pub cluster_address: SocketAddr,
    config: String,
    /// The network namespace it runs in, if any.
    netns: Option<String>,
}

impl ClusterNode {
    /// The configuration file's text the node runs with (its first keys are `[server]`'s).
    pub fn config(&self) -> &str {
        &self.config
    }
}

/// Where a test cluster's nodes listen and what seeds they list ([`TestCluster::start_named`]):
/// by default node i on 127.0.0.(10 + i), the cores' addresses as seeds.
#[derive(Default)]
pub struct Naming {
    /// Node i's (from 1) cluster address.
    pub address: Option<Box<dyn Fn(usize) -> SocketAddr>>,
    /// The seed entries, from the cores' cluster addresses.
    pub seeds: Option<Box<SeedsOf>>,
}

/// The seed entries a test cluster lists, from its cores' cluster addresses.
pub type SeedsOf = dyn Fn(&[SocketAddr]) -> Vec<String>;

/// A local cluster: nodes 1..=cores are cores, the rest edges. Node i's cluster port listens on
/// 127.0.0.(10 + i), its MQTT and admin ports on 127.0.0.1. Links time out fast (heartbeat
/// 100 ms, timeout 600 ms) and a node that is down loses its routes after 2 s.
pub struct TestCluster {
    pub nodes: Vec<ClusterNode>,
}

impl TestCluster {
    pub fn start(cores: usize, edges: usize) -> Self {
        Self::start_with(cores, edges, |_| String::new())
    }

    /// `extra(id)` adds TOML keys to node `id`'s `[cluster]` table.
    pub fn start_with(cores: usize, edges: usize, extra: impl Fn(u32) -> String) -> Self {
        Self::start_on(cores, edges, None, None, &Naming::default(), extra)
    }

    /// A cluster whose node i runs in namespace i of `namespaces`, on its address there
    /// (MQTT on port 1883, admin on 8883, cluster on 7883), so that a test can cut it off.
    pub fn start_isolated(cores: usize, edges: usize, namespaces: &Namespaces) -> Self {
        Self::start_on(
            cores,
            edges,
            Some(namespaces),
            None,
            &Naming::default(),
            |_| String::new(),
        )
    }

    /// A cluster whose node i keeps its state in `root/node-i` (`server.data_dir`).
    pub fn start_persistent(cores: usize, edges: usize, root: &std::path::Path) -> Self {
        Self::start_on(cores, edges, None, Some(root), &Naming::default(), |_| {
            String::new()
        })
    }

    /// A cluster whose nodes listen where `naming` says and list the seeds it makes (names
    /// rather than addresses, say).
    pub fn start_named(
        cores: usize,
        edges: usize,
        naming: &Naming,
        extra: impl Fn(u32) -> String,
    ) -> Self {
        Self::start_on(cores, edges, None, None, naming, extra)
    }

    fn start_on(
        cores: usize,
        edges: usize,
        namespaces: Option<&Namespaces>,
        data_root: Option<&std::path::Path>,
        naming: &Naming,
        extra: impl Fn(u32) -> String,
    ) -> Self {
        let addresses: Vec<SocketAddr> = (1..=cores + edges)
            .map(|i| {
                if let Some(namespaces) = namespaces {
                    return SocketAddr::new(namespaces.address(i), 7883);
                }
                if let Some(address) = &naming.address {
                    return address(i);
                }
                let ip = std::net::Ipv4Addr::new(127, 0, 0, 10 + i as u8);
                SocketAddr::from((ip, free_port_on(ip)))
            })
            .collect();
        let seeds: Vec<String> = match &naming.seeds {
            Some(seeds) => seeds(&addresses[..cores]),
            None => addresses[..cores].iter().map(ToString::to_string).collect(),
        };
        let seeds: Vec<String> = seeds.iter().map(|a| format!("\"{a}\"")).collect();
        let nodes = addresses
            .iter()
            .enumerate()
            .map(|(position, &address)| {
                let id = position as u32 + 1;
                let role = if position < cores { "core" } else { "edge" };
                // Keys before `[cluster]` belong to `[server]`, which the broker opens.
                let server = data_root.map_or(String::new(), |root| {
                    format!("data_dir = {:?}\n", root.join(format!("node-{id}")))
                });
                let extra = extra(id);
                let config = format!(
                    "{server}[cluster]\nenabled = true\nsecret = \"{CLUSTER_SECRET}\"\nnode_id = {id}\nrole = \"{role}\"\nlisten = \"{address}\"\nseeds = [{}]\nheartbeat_ms = 100\nlink_timeout_ms = 600\nreconnect_ms = 100\ndown_grace_seconds = 2\n{extra}\n",
                    seeds.join(", "),
                );
                let netns = namespaces.map(|n| n.name(position + 1));
                let broker = match &netns {
                    Some(netns) => {
                        Broker::start_at(address.ip(), Some(netns), 1883, 8883, 2, &config)
                    }
                    None => Broker::start_with(2, &config),
                };
                ClusterNode {
                    broker,
                    id,
                    cluster_address: address,
                    config,
                    netns,
                }
            })
            .collect();
        let cluster = Self { nodes };
        cluster.wait_all_members(Duration::from_secs(10));
        cluster
    }

    pub fn node(&self, id: u32) -> &ClusterNode {
        &self.nodes[id as usize - 1]
    }

    pub fn node_mut(&mut self, id: u32) -> &mut ClusterNode {
        &mut self.nodes[id as usize - 1]
    }

    /// Node `id`'s cluster status.
    pub fn status(&self, id: u32) -> serde_json::Value {
        self.node(id)
            .broker
            .ctl(&["cluster", "status"])
            .unwrap_or_else(|e| panic!("status of node {id}: {e}"))
    }

    /// Waits until `check` holds for node `id`'s status; panics with the last status if not.
    pub fn wait_status(
        &self,
        id: u32,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(id);
            if check(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id}: {what} within {timeout:?}; status:\n{status:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running node sees every node of the cluster as a member.
    pub fn wait_all_members(&self, timeout: Duration) {
        let count = self.nodes.len();
        for node in &self.nodes {
            self.wait_status(node.id, timeout, "all nodes are members", |s| {
                s["members"].as_array().unwrap().len() == count
            });
        }
    }

    /// Waits until node `at` knows at least `routes` routes of node `of`.
    pub fn wait_routes(&self, at: u32, of: u32, routes: u64) {
        self.wait_status(
            at,
            Duration::from_secs(10),
            &format!("{routes} routes of node {of} known"),
            |s| {
                s["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["node"] == of && m["route_count"].as_u64() >= Some(routes))
            },
        );
    }

    /// Node `of`'s state ("up", "down", "self") as node `at` sees it, or None if not a member.
    pub fn member_state(&self, at: u32, of: u32) -> Option<String> {
        self.status(at)["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node"] == of)
            .map(|m| m["state"].as_str().unwrap().to_string())
    }

    /// Waits until every core in `cores` names, in one round of status reads, the same leader
    /// among them (which says it leads) and all of them as voters. Elections can leave a core
    /// without a leader for a moment, so one round must agree, not each core at some time.
    pub fn wait_leader(&self, cores: &[u32]) -> u32 {
        let expected: Vec<u64> = cores.iter().map(|&c| u64::from(c)).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses: Vec<serde_json::Value> = cores.iter().map(|&c| self.status(c)).collect();
            let leaders: Vec<Option<u64>> = statuses
                .iter()
                .map(|s| raft(s)["leader"].as_u64())
                .collect();
            if let Some(Some(leader)) = leaders.first().copied()
                && leaders.iter().all(|&l| l == Some(leader))
                && statuses.iter().all(|s| voters(s) == expected)
                && let Some(position) = cores.iter().position(|&c| u64::from(c) == leader)
                && raft(&statuses[position])["state"] == "leader"
            {
                return leader as u32;
            }
            assert!(
                Instant::now() < deadline,
                "no one leader and all voters among cores {cores:?}: leaders {leaders:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the cores of 1..=`cores` other than `old` name a leader other than `old`;
    /// returns those cores.
    pub fn wait_new_leader(&self, cores: u32, old: u32) -> Vec<u32> {
        let rest: Vec<u32> = (1..=cores).filter(|&c| c != old).collect();
        for &core in &rest {
            self.wait_status(core, Duration::from_secs(20), "a new leader", |s| {
                raft(s)["leader"]
                    .as_u64()
                    .is_some_and(|l| l != u64::from(old))
            });
        }
        rest
    }

    /// Restarts node `id` (after a kill) with its ports and configuration.
    pub fn restart(&mut self, id: u32) {
        let node = self.node_mut(id);
        let (host, port, admin_port) = (node.broker.host, node.broker.port, node.broker.admin_port);
        let config = node.config.clone();
        node.broker = Broker::start_at(host, node.netns.as_deref(), port, admin_port, 2, &config);
    }
}

/// Network namespaces for partition tests: a bridge in the test's namespace and, per node, a
/// namespace joined to it by a veth pair, with address 10.213.K.i (K from the process id, so
/// that concurrent runs do not collide). `cut(i)` takes node i's link down (it can reach no
/// one, and no one it); `heal(i)` brings it back. Everything is deleted on drop.
pub struct Namespaces {
    prefix: String,
    subnet: u8,
    count: usize,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2; tools/test.sh installs it)");
    assert!(
        output.status.success(),
        "ip {}: {} (partition tests need root and network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Namespaces {
    pub fn create(count: usize) -> Self {
        let pid = std::process::id();
        let namespaces = Self {
            prefix: format!("smq{}", pid % 100_000),
            subnet: (pid % 200) as u8 + 20,
            count: 0,
        };
        let bridge = format!("{}br", namespaces.prefix);
        let mut namespaces = namespaces;
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.213.{}.254/24", namespaces.subnet),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 1..=count {
            let name = namespaces.name(i);
            let (host, inner) = (
                format!("{}h{i}", namespaces.prefix),
                format!("{}c{i}", namespaces.prefix),
            );
            ip(&["netns", "add", &name]);
            namespaces.count = i;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &name]);
            ip(&["link", "set", &host, "master", &bridge, "up"]);
            let address = format!("{}/24", namespaces.address(i));
            ip(&["-n", &name, "addr", "add", &address, "dev", &inner]);
            ip(&["-n", &name, "link", "set", &inner, "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        namespaces
    }

    pub fn name(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    pub fn address(&self, i: usize) -> std::net::IpAddr {
        std::net::IpAddr::from([10, 213, self.subnet, i as u8])
    }

    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &format!("{}h{i}", self.prefix), "down"]);
    }

    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &format!("{}h{i}", self.prefix), "up"]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for i in 1..=self.count {
            // Deleting one end of a veth pair deletes both, even while a process still
            // holds the namespace.
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{}h{i}", self.prefix)])
                .output();
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}br", self.prefix)])
            .output();
    }
}

/// The payloads of `publishes`, as text.
pub fn payloads(publishes: &[rumqttc::v5::mqttbytes::v5::Publish]) -> Vec<String> {
    publishes
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// Publishes `count` QoS 1 messages tagged `tag` and checks `subscriber` gets them all, once.
pub fn round_trip(publisher: &V5, subscriber: &V5, topic: &str, tag: &str, count: usize) {
    let expected: Vec<String> = (0..count).map(|i| format!("{tag}-{i}")).collect();
    for payload in &expected {
        publisher
            .client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .unwrap();
    }
    let got = subscriber.publishes(count, Duration::from_secs(5));
    assert_eq!(payloads(&got), expected, "{tag}");
}

/// The Raft part of a core's status.
pub fn raft(status: &serde_json::Value) -> &serde_json::Value {
    &status["raft"]
}

/// The nodes of the voters a core's status lists, sorted.
pub fn voters(status: &serde_json::Value) -> Vec<u64> {
    let mut voters: Vec<u64> = raft(status)["voters"]
        .as_array()
        .map(|v| v.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    voters.sort_unstable();
    voters
}

/// Sends one raw HTTP/1.1 request to `address` and reads until the server closes (send
/// `Connection: close`); returns the status code (0 if there was no answer) and the body.
pub fn http_raw(address: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = http_response(address, request);
    (status, body)
}

/// [`http_raw`] with the response's header lines too (names lower-cased).
pub fn http_response(address: SocketAddr, request: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// `GET path` on the admin endpoint at `address`, with the bearer token if given.
pub fn http_get(address: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let authorization = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_raw(
        address,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n"
        ),
    )
}
