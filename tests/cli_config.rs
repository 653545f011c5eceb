//! The command line and configuration: bad input is a clear error that names the key, before
//! anything listens; SIGTERM stops a serving broker cleanly.

mod support;

use std::process::Command;

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
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
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
        connected["fields"]["peer"]
            .as_str()
            .is_some_and(|peer| peer.contains("127.0.0.1")),
        "{connected}"
    );
    assert_eq!(connected["threadName"], "shard-0");
}
