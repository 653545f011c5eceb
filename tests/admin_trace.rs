//! Per-client traces over a real broker process: `shardmq ctl trace` and `/api/v1/traces`
//! start a trace, a real client (rumqttc) connects, subscribes and publishes at QoS 0, 1 and
//! 2, and the downloaded file holds each of its packets in order, both directions, and none
//! of another client's; a client already connected is traced from the start of the trace;
//! the limits (traces at once, minutes, hostile identifiers, the file's cap) hold.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{Event, Packet, QoS};
use support::{ADMIN_TOKEN, Broker, http_raw};

/// A call to the admin endpoint with the token: the status and the body.
fn call(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let body_part = match body {
        Some(body) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        None => "\r\n".into(),
    };
    http_raw(
        admin,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n{body_part}"
        ),
    )
}

/// `shardmq ctl trace get ID`: the file's text.
fn ctl_get(broker: &Broker, client_id: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN)
        .args(["ctl", "--admin", &broker.admin_address().to_string()])
        .args(["trace", "get", client_id])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ctl trace get: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Waits until the trace file holds `text` (records reach the file through the writer
/// thread), and returns it.
fn wait_file(broker: &Broker, client_id: &str, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let file = ctl_get(broker, client_id);
        if file.contains(text) {
            return file;
        }
        assert!(
            Instant::now() < deadline,
            "the trace never held {text:?}:\n{file}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines of `file` that hold `direction` then `packet` (e.g. "in", "PUBLISH").
fn position(lines: &[&str], from: usize, direction: &str, what: &str) -> usize {
    let needle = format!(" {direction} {what}");
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, line)| line.contains(&needle))
        .map(|(index, _)| index)
        .unwrap_or_else(|| panic!("no {needle:?} after line {from}:\n{}", lines.join("\n")))
}

/// Waits for the acknowledgement `ack` of the client's own publish and for its delivery back
/// at `qos`, in whichever order they come.
fn wait_ack_and_delivery(client: &support::V4, ack: Option<&str>, qos: QoS) {
    let (mut acknowledged, mut delivered) = (ack.is_none(), false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(acknowledged && delivered) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.events.recv_timeout(left) {
            Ok(Event::Incoming(Packet::Publish(p))) if p.qos == qos => delivered = true,
            Ok(Event::Incoming(Packet::PubAck(_))) if ack == Some("PUBACK") => acknowledged = true,
            Ok(Event::Incoming(Packet::PubComp(_))) if ack == Some("PUBCOMP") => {
                acknowledged = true
            }
            Ok(_) => {}
            Err(_) => panic!("no {ack:?} and delivery at {qos:?} in time"),
        }
    }
}

#[test]
fn a_trace_holds_every_packet_of_its_client_in_order_and_no_other() {
    let broker = Broker::start(2);
    let started = broker
        .ctl(&["trace", "start", "tracee", "--minutes", "5"])
        .expect("trace start");
    assert_eq!(started["client_id"], "tracee");
    assert_eq!(started["state"], "active");

    let other = support::v4(broker.port, "other", |_| {});
    other.subscribe("o/#", QoS::AtLeastOnce);
    let tracee = support::v4(broker.port, "tracee", |_| {});
    tracee.subscribe("t/#", QoS::ExactlyOnce);
    tracee
        .client
        .publish("t/zero", QoS::AtMostOnce, false, b"q0 payload".to_vec())
        .unwrap();
    wait_ack_and_delivery(&tracee, None, QoS::AtMostOnce);
    tracee
        .client
        .publish("t/one", QoS::AtLeastOnce, false, b"q1\n\0payload".to_vec())
        .unwrap();
    wait_ack_and_delivery(&tracee, Some("PUBACK"), QoS::AtLeastOnce);
    tracee
        .client
        .publish("t/two", QoS::ExactlyOnce, false, vec![b'x'; 100])
        .unwrap();
    wait_ack_and_delivery(&tracee, Some("PUBCOMP"), QoS::ExactlyOnce);
    // Another client's traffic, the same moment.
    other
        .client
        .publish("o/other", QoS::AtLeastOnce, false, b"not traced".to_vec())
        .unwrap();
    other.acknowledged(1, Duration::from_secs(5));
    tracee.client.disconnect().unwrap();

    let file = wait_file(&broker, "tracee", "event closing the connection");
    let lines: Vec<&str> = file.lines().collect();
    assert!(
        lines[0].starts_with("# shardmq trace of client \"tracee\""),
        "{file}"
    );
    // Causally ordered: each step waited for the one before.
    let mut at = 0;
    for (direction, what) in [
        ("in", "CONNECT"),
        ("out", "CONNACK"),
        ("in", "SUBSCRIBE"),
        ("out", "SUBACK"),
        ("in", "PUBLISH"),
        ("out", "PUBLISH"),
        ("in", "PUBLISH"),
        ("out", "PUBACK"),
        ("in", "PUBLISH"),
        ("out", "PUBREC"),
        ("in", "PUBREL"),
        ("out", "PUBCOMP"),
        ("in", "DISCONNECT"),
        ("event", "closing the connection"),
    ] {
        at = position(&lines, at, direction, what) + 1;
    }
    // The fields of the packets.
    for expected in [
        " in CONNECT size=",
        "client_id=\"tracee\"",
        " out CONNACK size=4 session_present=0 reason=0x00",
        " in SUBSCRIBE size=",
        "filters=[\"t/#\" qos=2",
        " out SUBACK size=5 id=1 reasons=[0x02]",
        " in PUBLISH size=20 id=0 topic=\"t/zero\" qos=0 dup=0 retain=0 payload=10:\"q0 payload\"",
        "topic=\"t/one\" qos=1 dup=0 retain=0 payload=11:\"q1\\x0a\\x00payload\"",
        "topic=\"t/two\" qos=2",
        "payload=100:\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"...",
        " event client connected: session_present=0",
        " in PUBACK size=4 id=",
        " in PUBREC size=4 id=",
        " out PUBREL size=4 id=",
        " in PUBCOMP size=4 id=",
        "address=127.0.0.1:",
    ] {
        assert!(
            file.contains(expected) || file.contains(expected.trim_start()),
            "no {expected:?} in:\n{file}"
        );
    }
    assert!(
        !file.contains("o/other"),
        "another client's packet:\n{file}"
    );
    assert!(
        !file.contains("\"other\""),
        "another client's packet:\n{file}"
    );
    // Each record is one line: the NUL and the newline of a payload are escaped.
    assert!(lines.iter().all(|line| !line.contains('\0')));

    let list = broker.ctl(&["trace", "list"]).expect("trace list");
    let traces = list.as_array().expect("a list");
    assert_eq!(traces.len(), 1, "{list}");
    assert_eq!(traces[0]["client_id"], "tracee");
    assert_eq!(traces[0]["bytes_written"], file.len() as u64, "{list}");
    let stopped = broker
        .ctl(&["trace", "stop", "tracee"])
        .expect("trace stop");
    assert_eq!(stopped["state"], "stopped");
    // Stopped, the file is kept and says so; a new connection of the client is not traced.
    let file = wait_file(&broker, "tracee", "trace ended: stopped by the operator");
    let again = support::v4(broker.port, "tracee", |_| {});
    again.subscribe("t/again", QoS::AtMostOnce);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl_get(&broker, "tracee"), file);
}

#[test]
fn a_client_connected_before_the_trace_is_traced_from_its_start() {
    let broker = Broker::start(2);
    let early = support::v4(broker.port, "early", |_| {});
    early.subscribe("before/#", QoS::AtMostOnce);
    let (status, body) = call(
        broker.admin_address(),
        "POST",
        "/api/v1/traces",
        Some(r#"{"client_id": "early", "minutes": 1}"#),
    );
    assert_eq!(status, 201, "{body}");
    early.subscribe("after/#", QoS::AtLeastOnce);
    let file = wait_file(&broker, "early", " out SUBACK");
    assert!(
        file.contains("event trace started on the open connection"),
        "{file}"
    );
    assert!(file.contains("\"after/#\" qos=1"), "{file}");
    assert!(!file.contains("before/#"), "{file}");
    assert!(!file.contains("CONNECT"), "{file}");
}

#[test]
fn limits_hold_and_hostile_identifiers_stay_out_of_the_file_system() {
    let (port, admin_port) = (support::free_port(), support::free_port());
    let data = std::env::temp_dir().join(format!("shardmq-trace-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = format!(
        "data_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntraces_max = 3\ntrace_bytes_max = 4096\n",
        data.display()
    );
    let broker = Broker::start_on(port, admin_port, 1, &config);
    let admin = broker.admin_address();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "no admin endpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = |body: &str| call(admin, "POST", "/api/v1/traces", Some(body));
    for bad in [
        r#"{"client_id": "a", "minutes": 0}"#,
        r#"{"client_id": "a", "minutes": 61}"#,
        r#"{"client_id": "", "minutes": 1}"#,
    ] {
        let (status, body) = start(bad);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = start(r#"{"client_id": "a", "minutes": -1}"#);
    assert_eq!(status, 422);
    for hostile in [
        r#"{"client_id": "../../etc/passwd", "minutes": 1}"#,
        r#"{"client_id": "nul\u0000and\nnewline/..", "minutes": 1}"#,
        r#"{"client_id": "capped", "minutes": 1}"#,
    ] {
        let (status, body) = start(hostile);
        assert_eq!(status, 201, "{hostile}: {body}");
    }
    let (status, body) = start(r#"{"client_id": "capped", "minutes": 1}"#);
    assert_eq!(status, 409, "{body}");
    let (status, body) = start(r#"{"client_id": "fourth", "minutes": 1}"#);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("admin.traces_max"), "{body}");

    // The files are named by hashes, in DATA_DIR/traces, and nowhere else.
    let mut names: Vec<String> = std::fs::read_dir(data.join("traces"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in &names {
        let hash = name
            .strip_prefix("trace-")
            .and_then(|rest| rest.strip_suffix(".txt"))
            .unwrap_or_else(|| panic!("{name}"));
        assert!(
            hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}"
        );
    }
    let (status, file) = call(admin, "GET", "/api/v1/traces/..%2F..%2Fetc%2Fpasswd", None);
    assert_eq!(status, 200, "{file}");
    assert!(
        file.starts_with("# shardmq trace of client \"../../etc/passwd\""),
        "{file}"
    );
    let (status, file) = call(
        admin,
        "GET",
        "/api/v1/traces/nul%00and%0Anewline%2F..",
        None,
    );
    assert_eq!(status, 200, "{file}");
    assert!(
        file.starts_with("# shardmq trace of client \"nul\\x00and\\x0anewline/..\""),
        "{file}"
    );
    assert_eq!(file.lines().count(), 1, "{file}");
    let (status, _) = call(admin, "GET", "/api/v1/traces/nobody", None);
    assert_eq!(status, 404);
    let (status, _) = call(admin, "DELETE", "/api/v1/traces/nobody", Some("{}"));
    assert_eq!(status, 404);

    // The cap: a client that publishes past it ends its trace, and the file says why.
    let capped = support::v4(port, "capped", |_| {});
    let deadline = Instant::now() + Duration::from_secs(20);
    let state = loop {
        for _ in 0..10 {
            capped
                .client
                .publish("c/x", QoS::AtLeastOnce, false, vec![b'p'; 200])
                .unwrap();
        }
        capped.acknowledged(10, Duration::from_secs(5));
        let (_, list) = call(admin, "GET", "/api/v1/traces", None);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let state = list
            .as_array()
            .unwrap()
            .iter()
            .find(|trace| trace["client_id"] == "capped")
            .map(|trace| trace["state"].clone())
            .unwrap();
        if state != "active" || Instant::now() > deadline {
            break state;
        }
    };
    assert_eq!(state, "capped");
    // The download is streamed with the file's length as it was when asked.
    let (status, headers, file) = support::http_response(
        admin,
        &format!(
            "GET /api/v1/traces/capped HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{file}");
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map(|(_, value)| value.clone());
    assert_eq!(length, Some(file.len().to_string()), "{headers:?}");
    let last = file.lines().last().unwrap_or_default();
    assert!(
        last.contains("trace ended: the file reached admin.trace_bytes_max (4096 bytes)"),
        "{last}"
    );
    assert!(file.len() <= 4096 + last.len() + 1, "{} bytes", file.len());
    // A capped trace no longer counts against the limit.
    let (status, body) = start(r#"{"client_id": "fourth", "minutes": 1}"#);
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(admin, "DELETE", "/api/v1/traces/fourth", Some("{}"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"stopped\""), "{body}");
    drop(broker);
    let _ = std::fs::remove_dir_all(&data);
}
