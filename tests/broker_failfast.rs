//! A shard that dies or stalls never leaves a half-working node: a panic stops the whole
//! process with the panic in its log, and a stalled loop turns the liveness probe to 503.
//! Both faults are caused with the fault-injection switch `SHARDMQ_FAULT_INJECT`.

mod support;

use std::time::{Duration, Instant};

use support::{Broker, http_get};

fn start_with_fault(fault: &str) -> Broker {
    Broker::start_env(
        std::net::IpAddr::from([127, 0, 0, 1]),
        None,
        support::free_port(),
        support::free_port(),
        2,
        "",
        &[("SHARDMQ_FAULT_INJECT", Some(fault))],
    )
}

#[test]
fn a_panicking_shard_stops_the_process_with_the_panic_logged() {
    let mut broker = start_with_fault("panic-shard:1:1500ms");
    assert!(broker.log_text().contains("FAULT INJECTION IS ON"));
    // Healthy until the fault fires.
    assert_eq!(
        http_get(broker.admin_address(), "/api/v1/health/live", None).0,
        200
    );
    let client = support::v5(broker.port, "watcher", |_| {});
    let status = broker
        .wait_exit(Duration::from_secs(8))
        .unwrap_or_else(|| panic!("still running:\n{}", broker.log_text()));
    assert!(!status.success(), "exit status {status:?}");
    let log = broker.log_text();
    assert!(
        log.contains("panic: fault injection") && log.contains("shard-1"),
        "{log}"
    );
    assert!(log.contains("shard failed: stopping the node"), "{log}");
    // The other shard's clients were disconnected, not left on a dying node.
    assert!(client.ended_within(Duration::from_secs(2)));
}

#[test]
fn a_stalled_shard_makes_live_and_ready_answer_503() {
    let admin_port = support::free_port();
    let mut broker = Broker::start_env(
        std::net::IpAddr::from([127, 0, 0, 1]),
        None,
        support::free_port(),
        admin_port,
        2,
        &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nstall_timeout_ms = 2000\n"),
        &[("SHARDMQ_FAULT_INJECT", Some("stall-shard:1:1500ms"))],
    );
    let admin = broker.admin_address();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "{}", broker.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http_get(admin, "/api/v1/health/live", None).0, 200);
    assert_eq!(http_get(admin, "/api/v1/health/ready", None).0, 200);
    // The stall begins 1.5 s after the start and counts after 2 s more.
    let started = Instant::now();
    let (status, body) = loop {
        let (status, body) = http_get(admin, "/api/v1/health/live", None);
        if status != 200 {
            break (status, body);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "live still 200: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "{body}");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(live["live"], false);
    assert!(
        live["shards"][1]["since_progress_ms"].as_u64().unwrap() > 2000,
        "{live:#}"
    );
    assert!(
        live["shards"][0]["since_progress_ms"].as_u64().unwrap() < 2000,
        "{live:#}"
    );
    assert_eq!(http_get(admin, "/health", None).0, 503);
    let (status, body) = http_get(admin, "/api/v1/health/ready", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stalled"), "{body}");
    // A stop cannot finish with a stalled shard: the process gives up on it after the
    // shutdown grace (2 s here) and a margin, and says so in its exit status.
    let status = broker.stop().expect("the broker exits within 10 s");
    assert!(!status.success(), "exit status {status:?}");
    let log = broker.log_text();
    assert!(log.contains("the shard's loop has stalled"), "{log}");
    assert!(log.contains("did not stop"), "{log}");
}
