//! Cluster links under TLS (`[cluster] tls = "required"`), with real processes on 127.0.0.x and
//! certificates that the test makes with `openssl`: a TLS cluster forms and forwards QoS 1
//! messages, and the bytes between its nodes (seen by the test's own relay) carry neither the
//! cluster name nor a topic nor a payload; a node whose certificate comes from another
//! authority, and a node with TLS off, are refused and the reason is logged.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use support::pki::Pki;
use support::{Broker, CLUSTER_SECRET, free_port_on, member_ids, payloads, v5};

/// The cluster name, which every node certificate carries as its DNS subjectAltName.
const NAME: &str = "tls-cluster";

impl Pki {
    /// A folder with the cluster's authority `ca`.
    fn new(test: &str) -> Self {
        let pki = Pki::new_in("cluster-tls", test);
        pki.authority("ca");
        pki
    }

    /// A node certificate `name` for the cluster name, signed by `authority`.
    fn node(&self, name: &str, authority: &str) {
        self.certificate(
            name,
            name,
            &format!("DNS:{NAME}"),
            "serverAuth,clientAuth",
            authority,
        );
    }

    /// The `[cluster]` TLS keys of a node presenting certificate `name` and trusting `ca`.
    fn keys(&self, name: &str) -> String {
        format!(
            "tls = \"required\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\ntls_ca_file = {:?}\n",
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
            self.path("ca.pem"),
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// A node's configuration: `listen` is where its cluster port binds, `advertise` where the
/// other nodes dial it (a relay, or the same address).
fn node_config(
    id: u32,
    role: &str,
    listen: SocketAddr,
    advertise: SocketAddr,
    seeds: &[SocketAddr],
    tls: &str,
) -> String {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[cluster]\nenabled = true\nname = \"{NAME}\"\nsecret = \"{CLUSTER_SECRET}\"\n\
         node_id = {id}\nrole = \"{role}\"\nlisten = \"{listen}\"\nadvertise = \"{advertise}\"\n\
         seeds = [{}]\nheartbeat_ms = 100\nlink_timeout_ms = 600\nreconnect_ms = 100\n{tls}",
        seeds.join(", ")
    )
}

fn cluster_address(host: u8) -> SocketAddr {
    let ip = Ipv4Addr::new(127, 0, 0, host);
    SocketAddr::from((ip, free_port_on(ip)))
}

/// The node ids in `broker`'s member list.
fn members(broker: &Broker) -> Vec<u64> {
    member_ids(&broker.ctl(&["cluster", "status"]).unwrap())
}

fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `broker`'s log contains `text`.
fn wait_log(broker: &Broker, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "{text:?} not logged within 10 s:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP relay on `listen` to `target` that keeps a copy of every byte it carries, both ways.
/// Its threads end with the test process.
fn relay(listen: SocketAddr, target: SocketAddr, seen: Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            let Ok(outbound) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buffer) {
                        if n == 0 || to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                        seen.lock().unwrap().extend_from_slice(&buffer[..n]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_tls_cluster_forms_forwards_qos1_and_nothing_crosses_in_clear() {
    let pki = Pki::new("forms");
    pki.node("node1", "ca");
    pki.node("node2", "ca");
    // Every link passes a relay: each node advertises its relay, and the edge's seed is the
    // core's relay.
    let (listen1, relay1) = (cluster_address(31), cluster_address(41));
    let (listen2, relay2) = (cluster_address(32), cluster_address(42));
    let seen = Arc::new(Mutex::new(Vec::new()));
    relay(relay1, listen1, seen.clone());
    relay(relay2, listen2, seen.clone());
    let core = Broker::start_with(
        2,
        &node_config(1, "core", listen1, relay1, &[], &pki.keys("node1")),
    );
    let edge = Broker::start_with(
        2,
        &node_config(2, "edge", listen2, relay2, &[relay1], &pki.keys("node2")),
    );
    for broker in [&core, &edge] {
        wait_until(Duration::from_secs(10), "both nodes are members", || {
            members(broker).len() == 2
        });
    }

    let subscriber = v5(edge.port, "tls-subscriber", |_| {});
    subscriber.subscribe("secret-topic/+/readings", QoS::AtLeastOnce);
    wait_until(
        Duration::from_secs(10),
        "the core knows the edge's route",
        || {
            let status = core.ctl(&["cluster", "status"]).unwrap();
            status["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["node"] == 2 && m["route_count"].as_u64() >= Some(1))
        },
    );
    let publisher = v5(core.port, "tls-publisher", |_| {});
    let expected: Vec<String> = (0..10).map(|i| format!("clear-payload-{i}")).collect();
    for payload in &expected {
        publisher
            .client
            .publish(
                "secret-topic/7/readings",
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .unwrap();
    }
    let got = subscriber.publishes(expected.len(), Duration::from_secs(10));
    assert_eq!(payloads(&got), expected, "all, in order, once");
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));

    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() > 4096,
        "the relays carried the links ({} bytes)",
        seen.len()
    );
    assert_eq!(seen.first(), Some(&0x16), "a TLS handshake record first");
    for clear in [
        NAME,
        "secret-topic",
        "clear-payload",
        "SMQC",
        CLUSTER_SECRET,
    ] {
        assert!(
            !contains(&seen, clear.as_bytes()),
            "{clear:?} crossed in clear"
        );
    }
}

#[test]
fn a_certificate_from_another_authority_is_refused() {
    let pki = Pki::new("authority");
    pki.node("node1", "ca");
    pki.authority("other-ca");
    pki.node("stranger", "other-ca");
    let listen1 = cluster_address(33);
    let core = Broker::start_with(
        2,
        &node_config(1, "core", listen1, listen1, &[], &pki.keys("node1")),
    );
    // The stranger trusts the cluster's authority, but its own certificate is not from it.
    let listen2 = cluster_address(34);
    let stranger = Broker::start_with(
        2,
        &node_config(
            2,
            "edge",
            listen2,
            listen2,
            &[listen1],
            &pki.keys("stranger"),
        ),
    );
    wait_log(&core, "invalid peer certificate");
    wait_log(&stranger, "cluster link closed");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(members(&core), [1], "the stranger never joined");
}

#[test]
fn a_plain_node_cannot_join_a_tls_cluster_and_both_say_why() {
    let pki = Pki::new("plain");
    pki.node("node1", "ca");
    let listen1 = cluster_address(35);
    let core = Broker::start_with(
        2,
        &node_config(1, "core", listen1, listen1, &[], &pki.keys("node1")),
    );
    let listen2 = cluster_address(36);
    let plain = Broker::start_with(
        2,
        &node_config(2, "edge", listen2, listen2, &[listen1], "tls = \"off\"\n"),
    );
    wait_log(
        &core,
        "the peer sends plain cluster frames, and this node requires TLS",
    );
    wait_log(
        &plain,
        "the peer speaks TLS on the cluster link, and this node has TLS off",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(members(&core), [1], "the plain node never joined");
    assert_eq!(members(&plain), [2], "nor did the plain node see the core");
}
