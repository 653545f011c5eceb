//! The command line and configuration: bad input is a clear error that names the key, before
//! anything listens; SIGTERM stops a serving broker cleanly.

mod support;

use std::process::Command;

use std::time::Duration;

use support::Broker;

fn shardmq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn unknown_configuration_key_is_named() {
    let path = std::env::temp_dir().join(format!("shardmq-bad-{}.toml", std::process::id()));
    std::fs::write(&path, "[limits]\npacket_size_maximum = 10\n").unwrap();
    let output = shardmq(&[
        "serve",
        "--listen",
        "127.0.0.1:1",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.packet_size_maximum"), "{stderr}");
}

#[test]
fn out_of_range_value_is_named() {
    let path = std::env::temp_dir().join(format!("shardmq-range-{}.toml", std::process::id()));
    std::fs::write(&path, "[reactor]\nbuffer_count = 1000\n").unwrap();
    let output = shardmq(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("reactor.buffer_count"));
}

#[test]
fn bad_flag_and_bad_address_are_refused() {
    let output = shardmq(&["serve", "--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--no-such-flag"));
    let output = shardmq(&["serve", "--listen", "localhost"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn address_in_use_fails_at_start_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = shardmq(&[
        "serve",
        "--shards",
        "1",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn default_config_prints_the_embedded_defaults() {
    let output = shardmq(&["default-config"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("listen = [\"0.0.0.0:1883\"]"));
    for key in [
        "token_file = \"\"",
        "allowed_hosts = []",
        "header_read_timeout_ms",
        "stall_timeout_ms",
        "tcp_keepalive_idle_seconds = 60",
        "connections_per_address_max = 20000",
        "connect_rate_per_second_max = 100000",
        "ipv6_prefix_bits = 64",
        "SHARDMQ_ADMIN_TOKEN",
    ] {
        assert!(
            text.contains(key),
            "{key} missing from the default configuration"
        );
    }
}

#[test]
fn bad_keepalive_and_admin_values_are_named() {
    for (text, key) in [
        (
            "[server]\ntcp_keepalive_count = 0\n",
            "server.tcp_keepalive_count",
        ),
        (
            "[server]\ntcp_keepalive_interval_seconds = 0\n",
            "server.tcp_keepalive_interval_seconds",
        ),
        (
            "[admin]\nstall_timeout_ms = 500\n",
            "admin.stall_timeout_ms",
        ),
        (
            "[admin]\nheader_read_timeout_ms = 0\n",
            "admin.header_read_timeout_ms",
        ),
        (
            "[limits]\naddress_bucket_count = 1000\n",
            "limits.address_bucket_count",
        ),
        (
            "[limits]\nipv6_prefix_bits = 0\n",
            "limits.ipv6_prefix_bits",
        ),
        (
            "[limits]\nconnections_per_address_max = -5\n",
            "connections_per_address_max",
        ),
        (
            "[limits]\nconnect_rate_per_second_max = \"fast\"\n",
            "connect_rate_per_second_max",
        ),
    ] {
        let path = std::env::temp_dir().join(format!("shardmq-keys-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let output = shardmq(&["serve", "--config", path.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{text}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(key),
            "{text}"
        );
    }
}

#[test]
fn a_bad_fault_injection_switch_is_refused_at_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .env("SHARDMQ_FAULT_INJECT", "explode-shard:0:1s")
        .args(["serve", "--shards", "1", "--listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("SHARDMQ_FAULT_INJECT"));
}

#[test]
fn sigterm_disconnects_v5_clients_with_0x8b_and_exits_cleanly() {
    use std::io::{Read, Write};
    let mut broker = Broker::start(2);
    let mut client = support::raw(broker.port);
    client
        .write_all(&[
            0x10, 0x0f, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00,
            0x02, b's', b'd',
        ])
        .unwrap();
    let mut connack = [0u8; 64];
    let read = client.read(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20, "{:02x?}", &connack[..read]);
    let status = broker.stop().expect("the broker stops within 10 s");
    assert!(status.success(), "exit status {status:?}");
    let (bytes, closed) =
        support::read_until_closed(&mut client, std::time::Duration::from_secs(2));
    assert_eq!(bytes, [0xE0, 0x01, 0x8B], "DISCONNECT Server shutting down");
    assert!(closed);
}

/// Each line of a JSON log, parsed (a line that is not JSON fails the test).
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line_with_the_client_and_its_address() {
    let port = support::free_port();
    let admin_port = support::free_port();
    let mut broker = Broker::start_env(
        std::net::Ipv4Addr::LOCALHOST.into(),
        None,
        port,
        admin_port,
        1,
        "log_format = \"json\"\n",
        &[("RUST_LOG", Some("shardmq_shards=debug,info"))],
    );
    let client = support::v5(port, "json-log-client", |_| {});
    drop(client);
    broker.stop();
    let log = broker.log_text();
    let lines = json_lines(&log);
    assert!(
        lines
            .iter()
            .all(|line| line["level"].is_string() && line["timestamp"].is_string())
    );
    let connected = lines
        .iter()
        .find(|line| line["fields"]["message"] == "client connected")
        .unwrap_or_else(|| panic!("no \"client connected\" line:\n{log}"));
    assert_eq!(connected["fields"]["client_id"], "json-log-client");
    assert!(
        connected["fields"]["address"]
            .as_str()
            .is_some_and(|address| address.contains("127.0.0.1")),
        "{connected}"
    );
    assert_eq!(connected["threadName"], "shard-0");
}

/// Every JSON line about a client carries `node`, `client_id` (once known) and `address`:
/// a CONNECT refused for its identifier, a malformed packet after CONNECT, and a client that
/// connects, subscribes and leaves.
#[test]
fn every_json_log_line_about_a_client_carries_its_id_address_and_node() {
    use std::io::Read;
    let port = support::free_port();
    let mut broker = Broker::start_env(
        std::net::Ipv4Addr::LOCALHOST.into(),
        None,
        port,
        support::free_port(),
        2,
        "log_format = \"json\"\n[limits]\nclient_id_length_max = 23\n",
        &[("RUST_LOG", Some("shardmq_shards=debug,info"))],
    );
    // Refused: the identifier is longer than the limit.
    let refused_id = "refused-for-its-long-identifier";
    let mut refused = support::raw(port);
    support::write_all(&mut refused, &support::connect_packet(refused_id));
    let (bytes, closed) = support::read_until_closed(&mut refused, Duration::from_secs(3));
    assert_eq!(
        bytes,
        [0x20, 0x02, 0x00, 0x02],
        "CONNACK 2: identifier rejected"
    );
    assert!(closed);
    // Malformed after CONNECT: packet type 0 is reserved.
    let malformed_id = "log-fields-malformed";
    let mut malformed = support::raw(port);
    support::write_all(&mut malformed, &support::connect_packet(malformed_id));
    let mut connack = [0u8; 4];
    malformed.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    support::write_all(&mut malformed, &[0x00, 0x00]);
    let (_, closed) = support::read_until_closed(&mut malformed, Duration::from_secs(3));
    assert!(closed);
    // A plain client.
    let plain_id = "log-fields-plain";
    let plain = support::v5(port, plain_id, |_| {});
    plain.subscribe("log/fields", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    drop(plain);
    broker.stop();

    let log = broker.log_text();
    let lines = json_lines(&log);
    let has_who = |line: &serde_json::Value| {
        let fields = &line["fields"];
        fields["node"] == 0
            && fields["address"]
                .as_str()
                .is_some_and(|address| address.starts_with("127.0.0.1:"))
    };
    let mut connections = Vec::new();
    for id in [refused_id, malformed_id, plain_id] {
        let about: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|line| line["fields"].to_string().contains(id))
            .collect();
        assert!(!about.is_empty(), "no line about {id}:\n{log}");
        for line in about {
            assert_eq!(line["fields"]["client_id"], id, "{line}");
            assert_eq!(line["fields"]["node"], 0, "{line}");
            // A line about a connection has its address; one about a session with no
            // connection any more (\"session ended\") has none to give.
            match line["fields"]["connection"].as_u64() {
                Some(connection) => {
                    assert!(has_who(line), "{line}");
                    connections.push(connection);
                }
                None => assert!(line["fields"]["address"].is_null(), "{line}"),
            }
        }
    }
    // Lines about those clients' connections before their identifier is known (the
    // connection opened) carry the rest.
    for line in lines.iter().filter(|line| {
        line["fields"]["connection"]
            .as_u64()
            .is_some_and(|connection| connections.contains(&connection))
    }) {
        assert!(has_who(line), "{line}");
    }
    let message = |text: &str, id: &str| {
        lines.iter().any(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(text))
                && line["fields"]["client_id"] == id
        })
    };
    assert!(message("CONNECT refused", refused_id), "{log}");
    assert!(
        message(
            "closing the connection: the client broke the protocol",
            malformed_id
        ),
        "{log}"
    );
    assert!(message("client connected", plain_id), "{log}");
    assert!(message("closing the connection", plain_id), "{log}");
}
