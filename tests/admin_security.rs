//! The admin endpoint over a real broker process: everything but the health probes needs the
//! bearer token; state changes are JSON bodies only; a foreign Host header is refused; a
//! header trickle is cut at the header-read timeout; `shardmq ctl` finds the token in a
//! flag, the environment or the configuration.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{ADMIN_TOKEN, Broker, TestCluster, http_get, http_raw};

/// A POST to the admin endpoint with the given extra header lines and body.
fn post(address: SocketAddr, path: &str, headers: &str, body: &str) -> (u16, String) {
    http_raw(
        address,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// `shardmq ctl` with the given flags and environment changes.
fn ctl(args: &[&str], env: &[(&str, Option<&str>)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardmq"));
    command
        .arg("ctl")
        .args(args)
        .env_remove("SHARDMQ_ADMIN_TOKEN");
    for (name, value) in env {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.output().unwrap()
}

fn start_with_env(config: &str, env: &[(&str, Option<&str>)]) -> Broker {
    Broker::start_env(
        std::net::IpAddr::from([127, 0, 0, 1]),
        None,
        support::free_port(),
        support::free_port(),
        1,
        config,
        env,
    )
}

#[test]
fn health_probes_need_no_token() {
    let broker = Broker::start(2);
    let admin = broker.admin_address();
    let (status, body) = http_get(admin, "/health", None);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(admin, "/api/v1/health/live", None);
    assert_eq!(status, 200, "{body}");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(live["live"], true);
    assert_eq!(live["shards"].as_array().unwrap().len(), 2, "{live:#}");
    let (status, body) = http_get(admin, "/api/v1/health/ready", None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn calls_without_or_with_a_wrong_token_are_refused() {
    let broker = Broker::start(1);
    let admin = broker.admin_address();
    let (status, body) = http_get(admin, "/api/v1/cluster/status", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http_get(
        admin,
        "/api/v1/cluster/status",
        Some("wrong-token-0123456789"),
    );
    assert_eq!(status, 401, "{body}");
    // One character short: the comparison does not stop at a common prefix.
    let (status, _) = http_get(
        admin,
        "/api/v1/cluster/status",
        Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
    );
    assert_eq!(status, 401);
    // The scheme's name is case-insensitive; another scheme is not a bearer token.
    let (status, body) = http_raw(
        admin,
        &format!(
            "GET /api/v1/cluster/status HTTP/1.1\r\nHost: {admin}\r\nAuthorization: bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 409, "{body}");
    let (status, _) = http_raw(
        admin,
        &format!(
            "GET /api/v1/cluster/status HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Basic {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 401);
    // An unknown path is behind the token too.
    let (status, _) = http_get(admin, "/api/v1/nothing", None);
    assert_eq!(status, 401);
    // With the token, the call reaches shard 0 (which says this node is not clustered).
    let (status, body) = http_get(admin, "/api/v1/cluster/status", Some(ADMIN_TOKEN));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not in a cluster"), "{body}");
    let (status, _) = post(
        admin,
        "/api/v1/cluster/leave",
        "Content-Type: application/json\r\n",
        "{}",
    );
    assert_eq!(status, 401);
}

#[test]
fn state_changes_are_json_bodies_only() {
    let broker = Broker::start(1);
    let admin = broker.admin_address();
    let auth = bearer(ADMIN_TOKEN);
    // The old query-string form, which a browser can send across sites without a preflight.
    let (status, body) = post(
        admin,
        "/api/v1/cluster/settings?key=down_grace_seconds&value=10",
        &auth,
        "",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("JSON body"), "{body}");
    let (status, body) = post(
        admin,
        "/api/v1/cluster/settings?key=down_grace_seconds&value=10",
        &format!("{auth}Content-Type: application/json\r\n"),
        "{}",
    );
    assert_eq!(status, 400, "{body}");
    for content_type in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let (status, body) = post(
            admin,
            "/api/v1/cluster/settings",
            &format!("{auth}Content-Type: {content_type}\r\n"),
            "key=down_grace_seconds&value=10",
        );
        assert_eq!(status, 415, "{content_type}: {body}");
    }
    let (status, _) = post(admin, "/api/v1/cluster/leave", &auth, "");
    assert_eq!(status, 415);
    let json = format!("{auth}Content-Type: application/json\r\n");
    // Malformed JSON, an unknown field, a body over admin.body_size_max.
    let (status, body) = post(admin, "/api/v1/cluster/settings", &json, "{\"key\": ");
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(admin, "/api/v1/cluster/leave", &json, "{\"now\": true}");
    assert_eq!(status, 422, "{body}");
    let big = format!("{{\"key\": \"{}\", \"value\": \"1\"}}", "k".repeat(70_000));
    let (status, body) = post(admin, "/api/v1/cluster/settings", &json, &big);
    assert_eq!(status, 413, "{body}");
    // A well-formed change reaches the node.
    let (status, body) = post(
        admin,
        "/api/v1/cluster/settings",
        &json,
        "{\"key\": \"down_grace_seconds\", \"value\": \"10\"}",
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not in a cluster"), "{body}");
}

#[test]
fn a_foreign_host_header_is_refused() {
    let broker = Broker::start(1);
    let admin = broker.admin_address();
    let port = admin.port();
    let request = |host: &str| {
        http_raw(
            admin,
            &format!(
                "GET /api/v1/cluster/status HTTP/1.1\r\nHost: {host}\r\n{}Connection: close\r\n\r\n",
                bearer(ADMIN_TOKEN)
            ),
        )
    };
    for host in [
        format!("attacker.example:{port}"),
        "attacker.example".to_string(),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
    ] {
        let (status, body) = request(&host);
        assert_eq!(status, 421, "{host}: {body}");
    }
    let (status, _) = http_raw(
        admin,
        &format!(
            "GET /api/v1/cluster/status HTTP/1.1\r\n{}Connection: close\r\n\r\n",
            bearer(ADMIN_TOKEN)
        ),
    );
    assert!(status == 400 || status == 421, "no Host header: {status}");
    let (status, body) = request(&format!("localhost:{port}"));
    assert_eq!(status, 409, "{body}");
}

#[test]
fn an_allowed_host_name_is_accepted() {
    let port = support::free_port();
    let broker = Broker::start_with(
        1,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\nallowed_hosts = [\"admin.test:{port}\"]\n"
        ),
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(admin);
    let (status, body) = http_raw(
        admin,
        &format!(
            "GET /api/v1/cluster/status HTTP/1.1\r\nHost: admin.test:{port}\r\n{}Connection: close\r\n\r\n",
            bearer(ADMIN_TOKEN)
        ),
    );
    assert_eq!(status, 409, "{body}");
    drop(broker);
}

fn wait_listening(address: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{address} does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_header_trickle_is_closed_at_the_header_read_timeout() {
    let port = support::free_port();
    let broker = Broker::start_with(
        1,
        &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\nheader_read_timeout_ms = 1000\n"),
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(admin);
    let mut stream = TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    // One byte every 100 ms of a header that would take 30 s to send.
    let trickle = format!(
        "GET /health HTTP/1.1\r\nHost: {admin}\r\nX-Slow: {}",
        "a".repeat(300)
    );
    let mut closed = false;
    for byte in trickle.bytes() {
        if stream.write_all(&[byte]).is_err() {
            closed = true;
            break;
        }
        let mut buffer = [0u8; 512];
        match stream.read(&mut buffer) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still open after 5 s"
        );
    }
    let elapsed = started.elapsed();
    assert!(closed, "the trickle was never cut");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "cut after {elapsed:?}, expected about 1 s"
    );
    // An idle connection is closed after the same time, and the endpoint still serves.
    let mut idle = TcpStream::connect(admin).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 64];
    let read = idle.read(&mut buffer).unwrap_or(0);
    assert_eq!(read, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(http_get(admin, "/health", None).0, 200);
    drop(broker);
}

#[test]
fn without_a_token_configured_the_api_refuses_and_says_how() {
    let broker = start_with_env("", &[("SHARDMQ_ADMIN_TOKEN", None)]);
    let admin = broker.admin_address();
    let (status, body) = http_get(
        admin,
        "/api/v1/cluster/status",
        Some("anything-at-all-0123"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("token_file") && body.contains("SHARDMQ_ADMIN_TOKEN"),
        "{body}"
    );
    assert_eq!(http_get(admin, "/health", None).0, 200);
    assert!(
        broker.log_text().contains("no admin token is configured"),
        "{}",
        broker.log_text()
    );
}

#[test]
fn ctl_finds_the_token_in_a_flag_the_environment_or_the_configuration() {
    use std::os::unix::fs::PermissionsExt;
    let directory =
        std::env::temp_dir().join(format!("shardmq-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let token_file = directory.join("token");
    std::fs::write(&token_file, "file-token-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong_file = directory.join("wrong");
    std::fs::write(&wrong_file, "wrong-token-0123456789abcdef").unwrap();
    std::fs::set_permissions(&wrong_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = support::free_port();
    let node_config = directory.join("node.toml");
    std::fs::write(
        &node_config,
        format!("[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = {token_file:?}\n"),
    )
    .unwrap();
    // A single core, so that a state change succeeds end to end.
    let cluster_address = SocketAddr::from(([127, 0, 0, 41], support::free_port()));
    let broker = start_with_env(
        &format!(
            "[cluster]\nenabled = true\nsecret = \"{}\"\nnode_id = 1\nlisten = \"{cluster_address}\"\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = {token_file:?}\n",
            support::CLUSTER_SECRET
        ),
        &[("SHARDMQ_ADMIN_TOKEN", None)],
    );
    let admin = format!("127.0.0.1:{port}");
    let admin_address: SocketAddr = admin.parse().unwrap();
    wait_listening(admin_address);
    // Ready once the core has founded its Raft group (it knows a leader).
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(admin_address, "/api/v1/health/ready", None).0 != 200 {
        assert!(Instant::now() < deadline, "the core never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = |output: std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let flag = token_file.to_str().unwrap();
    let status = ok(ctl(
        &["--admin", &admin, "--token-file", flag, "cluster", "status"],
        &[],
    ));
    assert_eq!(status["node"], 1, "{status:#}");
    // From --config: the address and the token file.
    let config = node_config.to_str().unwrap();
    let answer = ok(ctl(
        &[
            "--config",
            config,
            "cluster",
            "set",
            "down_grace_seconds",
            "7",
        ],
        &[],
    ));
    assert_eq!(answer["proposed"]["down_grace_seconds"], "7", "{answer:#}");
    // From the environment.
    let status = ok(ctl(
        &["--admin", &admin, "cluster", "status"],
        &[("SHARDMQ_ADMIN_TOKEN", Some("file-token-0123456789abcdef"))],
    ));
    assert_eq!(status["role"], "core");
    // A wrong token, and none.
    let output = ctl(
        &[
            "--admin",
            &admin,
            "--token-file",
            wrong_file.to_str().unwrap(),
            "cluster",
            "status",
        ],
        &[],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
    let output = ctl(&["--admin", &admin, "cluster", "leave"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
    drop(broker);
}

#[test]
fn a_bad_token_file_is_an_error_and_a_world_readable_one_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let directory = std::env::temp_dir().join(format!("shardmq-admin-bad-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let serve = |token_file: &std::path::Path| {
        let config = directory.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\npin_cores = false\n[admin]\nlisten = \"127.0.0.1:{}\"\ntoken_file = {token_file:?}\n",
                support::free_port()
            ),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .env_remove("SHARDMQ_ADMIN_TOKEN")
            .args(["serve", "--shards", "1", "--listen"])
            .arg(format!("127.0.0.1:{}", support::free_port()))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let empty = directory.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let output = serve(&empty);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is empty"));
    let short = directory.join("short");
    std::fs::write(&short, "abc").unwrap();
    let output = serve(&short);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("fewer than 16"));
    let missing = directory.join("missing");
    let output = serve(&missing);
    assert_eq!(output.status.code(), Some(1));
    // World-readable: the broker starts, with a warning.
    let open = directory.join("open");
    std::fs::write(&open, "open-token-0123456789abcdef").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = support::free_port();
    let broker = start_with_env(
        &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = {open:?}\n"),
        &[("SHARDMQ_ADMIN_TOKEN", None)],
    );
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(
        broker.log_text().contains("readable by every user"),
        "{}",
        broker.log_text()
    );
}

#[test]
fn ctl_with_the_token_changes_a_cluster_setting() {
    let cluster = TestCluster::start(1, 0);
    cluster.wait_leader(&[1]);
    let answer = cluster
        .node(1)
        .broker
        .ctl(&["cluster", "set", "forward_queue_max", "4242"])
        .unwrap();
    assert_eq!(
        answer["proposed"]["forward_queue_max"], "4242",
        "{answer:#}"
    );
    assert_eq!(answer["committed"], true, "{answer:#}");
    cluster.wait_status(
        1,
        Duration::from_secs(10),
        "the setting is committed",
        |s| s["settings"]["forward_queue_max"] == "4242",
    );
}
