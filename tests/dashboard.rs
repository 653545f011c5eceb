//! The web dashboard: its static files are served without the token but behind the Host
//! check, with a strict Content-Security-Policy and the other security headers, while the API
//! still needs the token; and the page itself in a real headless Chromium (Debian's
//! `chromium` and `chromium-driver`, driven by Selenium from `tests/dashboard/drive.py`)
//! against a 3-node cluster: the login refuses a wrong token, the three nodes are listed with
//! the Raft leader, the rate chart moves, a client of node 3 is kicked from node 1's clients
//! table, a subscription and its route are listed, a retained message is viewed and deleted,
//! a cluster-wide setting is set; and a standalone node shows no cluster section.
//!
//! `SHARDMQ_DASHBOARD_SCREENSHOTS=DIR cargo test --test dashboard` saves the screenshots the
//! README shows.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{ADMIN_TOKEN, Broker, TestCluster, http_get, http_response};

/// The Content-Security-Policy every dashboard file carries.
const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'";

/// The dashboard's files and the content type each is served with.
const FILES: &[(&str, &str)] = &[
    ("/", "text/html; charset=utf-8"),
    ("/assets/app.js", "text/javascript; charset=utf-8"),
    ("/assets/chart.js", "text/javascript; charset=utf-8"),
    ("/assets/app.css", "text/css; charset=utf-8"),
    ("/assets/favicon.svg", "image/svg+xml"),
];

fn get(
    address: SocketAddr,
    host: &str,
    path: &str,
    extra: &str,
) -> (u16, Vec<(String, String)>, String) {
    http_response(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"),
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn the_static_files_need_no_token_but_the_host_check_and_carry_the_security_headers() {
    let broker = Broker::start(1);
    let admin = broker.admin_address();
    let host = admin.to_string();
    for &(path, content_type) in FILES {
        let (status, headers, body) = get(admin, &host, path, "");
        assert_eq!(status, 200, "{path} without a token: {body}");
        assert!(!body.is_empty(), "{path}");
        assert_eq!(
            header(&headers, "content-type"),
            Some(content_type),
            "{path}"
        );
        assert_eq!(
            header(&headers, "content-security-policy"),
            Some(CSP),
            "{path}"
        );
        assert_eq!(header(&headers, "x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            header(&headers, "x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(
            header(&headers, "referrer-policy"),
            Some("no-referrer"),
            "{path}"
        );
        assert_eq!(
            header(&headers, "cache-control"),
            Some("no-cache"),
            "{path}"
        );
        // The browser's copy is revalidated with the ETag: 304 without a body.
        let etag = header(&headers, "etag").expect("an ETag").to_string();
        let (status, headers, body) =
            get(admin, &host, path, &format!("If-None-Match: {etag}\r\n"));
        assert_eq!((status, body.as_str()), (304, ""), "{path}");
        assert_eq!(
            header(&headers, "content-security-policy"),
            Some(CSP),
            "{path}"
        );
        // DNS rebinding: a page of another name reaching this address is still refused.
        let (status, _, body) = get(admin, &format!("evil.example:{}", admin.port()), path, "");
        assert_eq!(status, 421, "{path} with a foreign Host: {body}");
        let (status, _, _) = get(admin, "", path, "");
        assert_eq!(status, 421, "{path} without a Host");
    }
    // Every file the page and its scripts load is one of them.
    let (_, _, page) = get(admin, &host, "/", "");
    for reference in page
        .split(['"', '\''])
        .filter(|s| s.starts_with("/assets/"))
    {
        assert!(
            FILES.iter().any(|(path, _)| *path == reference),
            "the page loads {reference}, which is not served"
        );
    }
    let (_, _, app) = get(admin, &host, "/assets/app.js", "");
    assert!(app.contains("from './chart.js'"));

    // Only those exact paths are open: the API and anything else still need the token.
    for path in [
        "/api/v1/nodes",
        "/api/v1/cluster/status",
        "/metrics",
        "/index.html",
        "/assets/",
        "/assets/secret.js",
        "/assets/app.js/x",
    ] {
        let (status, body) = http_get(admin, path, None);
        assert_eq!(status, 401, "{path} without a token: {body}");
    }
    let (status, body) = http_get(admin, "/api/v1/nodes", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    // A state change is no static file: POST / is not served.
    let (status, _, _) = http_response(
        admin,
        &format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 405);
}

/// Runs the Selenium driver with `args` (saving screenshots if asked and `screenshots`); its
/// output, or a panic with it when it fails or runs past `timeout` (then its whole process
/// group, Chromium included, is killed).
fn drive(args: &[String], timeout: Duration, screenshots: bool) -> String {
    use std::os::unix::process::CommandExt;
    // One file per run: the tests of this file run at once.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let output = std::env::temp_dir().join(format!(
        "shardmq-dashboard-{}-{}.log",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::File::create(&output).unwrap();
    let mut command = Command::new("python3");
    if !screenshots {
        command.env_remove("SHARDMQ_DASHBOARD_SCREENSHOTS");
    }
    let mut child = command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/dashboard/drive.py"
        ))
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        // Its own process group, so that chromedriver and Chromium go with it.
        .process_group(0)
        .spawn()
        .expect("python3 with selenium (tools/test.sh installs it)");
    let group = child.id();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever the driver left running (it quits Chromium itself when it can).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    match status {
        Some(status) if status.success() => text,
        Some(status) => panic!("the dashboard driver failed ({status}):\n{text}"),
        None => panic!("the dashboard driver ran past {timeout:?}:\n{text}"),
    }
}

#[test]
fn the_dashboard_in_a_browser_lists_the_nodes_and_kicks_a_client() {
    let cluster = TestCluster::start(3, 0);
    let leader = cluster.wait_leader(&[1, 2, 3]);
    let admin = cluster.node(1).broker.admin_address();

    // Traffic for the rate chart: a publisher on node 1, and a subscriber there.
    let subscriber = support::v5(cluster.node(1).broker.port, "dash-subscriber", |_| {});
    subscriber.subscribe("dash/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce);
    let rate_subscriber = support::v5(cluster.node(1).broker.port, "dash-rates", |_| {});
    rate_subscriber.subscribe("dash/rate/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce);
    let publisher = support::v5(cluster.node(1).broker.port, "dash-publisher", |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let stop = stop.clone();
        let client = publisher.client.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(300);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = client.try_publish(
                    format!("dash/rate/{}", n % 8),
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    n.to_string(),
                );
                n += 1;
                // 25 to 100 messages a second, in a 40 s cycle, so that the chart moves.
                let phase = (started.elapsed().as_secs() % 40) as f64 / 40.0;
                let pause = 25.0 - 15.0 * (phase * std::f64::consts::TAU).sin();
                std::thread::sleep(Duration::from_millis(pause as u64));
            }
        })
    };

    // A retained message whose topic and payload are markup.
    let retained_topic = "dash/retained/<img src=x>&\"1\"";
    let retained_payload = "hello <script>alert(1)</script>";
    publisher
        .client
        .publish(
            retained_topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            retained_payload,
        )
        .unwrap();

    // A client of node 3 with an id that is markup: the page must show it as text.
    let kicked_id = "dash <b>kick</b> & 'x'";
    let kicked = support::v5(cluster.node(3).broker.port, kicked_id, |_| {});

    let args: Vec<String> = [
        "--url",
        &format!("http://{admin}/"),
        "--token",
        ADMIN_TOKEN,
        "--nodes",
        "1,2,3",
        "--leader",
        &leader.to_string(),
        "--members",
        "1,2,3",
        "--traffic",
        "--kick",
        kicked_id,
        "--kick-node",
        "3",
        "--subscription",
        "dash-subscriber dash/#",
        "--retained",
        retained_topic,
        "--retained-payload",
        retained_payload,
        "--setting",
        "down_grace_seconds=7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        !kicked.ended_within(Duration::from_millis(10)),
        "the client is connected before the kick"
    );
    let output = drive(&args, Duration::from_secs(240), true);
    eprintln!("{output}");
    assert!(output.contains("step: done"), "{output}");
    assert!(
        kicked.ended_within(Duration::from_secs(10)),
        "the client of node 3 kicked from node 1's page is disconnected"
    );
    // The retained message deleted from the page is gone.
    let (status, body) = http_get(
        admin,
        "/api/v1/retained?topic_prefix=dash/retained/",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["retained"], serde_json::json!([]), "{answer:#}");
    // The setting made from the page is the cluster's, on every node.
    for id in 1..=3 {
        cluster.wait_status(id, Duration::from_secs(10), "the page's setting", |s| {
            s["settings"]["down_grace_seconds"] == "7"
        });
    }
    stop.store(true, Ordering::Relaxed);
    publishing.join().unwrap();
}

#[test]
fn a_standalone_node_shows_itself_and_no_cluster_section() {
    let broker = Broker::start(2);
    let admin = broker.admin_address();
    // A standalone node's summary has no node id: its row is named "—".
    let args: Vec<String> = [
        "--url",
        &format!("http://{admin}/"),
        "--token",
        ADMIN_TOKEN,
        "--nodes",
        "—",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let output = drive(&args, Duration::from_secs(120), false);
    eprintln!("{output}");
    assert!(output.contains("step: done"), "{output}");
}
