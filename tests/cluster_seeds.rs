//! Seeds given by name (`cluster.seeds` = `host:port` or `srv:NAME`) on real broker
//! processes: cores that find each other through `localhost:PORT` (the system resolver), a
//! cluster of cores and an edge found through an SRV name that a tiny DNS server of the test
//! serves on 127.0.0.1 (`cluster.dns_server`), and an edge that finds its core again at a new
//! address once the name's record changes (a Kubernetes pod restarted elsewhere).

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use support::{Naming, TestCluster, free_port_on};

/// What the test's DNS server answers: A records and SRV records (port, target) by name.
#[derive(Default)]
struct Zone {
    a: BTreeMap<String, Vec<Ipv4Addr>>,
    srv: BTreeMap<String, Vec<(u16, String)>>,
}

/// A DNS server on 127.0.0.1 (UDP) answering from a zone the test may change; TTL 0, so a
/// resolver asks again each time. It stops with the test process.
struct DnsServer {
    address: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

impl DnsServer {
    fn start(zone: Zone) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(zone));
        let served = zone.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 512];
            while let Ok((length, from)) = socket.recv_from(&mut buffer) {
                if let Some(reply) = answer(&served.lock().unwrap(), &buffer[..length]) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Self { address, zone }
    }

    fn set_a(&self, name: &str, ips: Vec<Ipv4Addr>) {
        self.zone.lock().unwrap().a.insert(fqdn(name), ips);
    }
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.')).to_ascii_lowercase()
}

/// The reply to one query, or None for what is not a query.
fn answer(zone: &Zone, request: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    let query = request.queries().first()?.clone();
    let name = query.name().to_ascii().to_ascii_lowercase();
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .add_query(query.clone());
    let records: Vec<Record> = match query.query_type() {
        RecordType::A => zone
            .a
            .get(&name)
            .into_iter()
            .flatten()
            .map(|&ip| Record::from_rdata(query.name().clone(), 0, RData::A(A(ip))))
            .collect(),
        RecordType::SRV => zone
            .srv
            .get(&name)
            .into_iter()
            .flatten()
            .map(|(port, target)| {
                let target = Name::from_ascii(fqdn(target)).unwrap();
                let srv = SRV::new(10, 10, *port, target);
                Record::from_rdata(query.name().clone(), 0, RData::SRV(srv))
            })
            .collect(),
        _ => Vec::new(),
    };
    let known = zone.a.contains_key(&name) || zone.srv.contains_key(&name);
    if !known {
        reply.set_response_code(ResponseCode::NXDomain);
    }
    reply.add_answers(records);
    reply.to_vec().ok()
}

/// The seed names node `id` shows in its status, with their addresses.
fn seed_names(cluster: &TestCluster, id: u32) -> Vec<(String, Vec<String>)> {
    cluster.status(id)["seed_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let addresses = n["addresses"].as_array().unwrap();
            (
                n["name"].as_str().unwrap().to_string(),
                addresses
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn cores_find_each_other_through_localhost_names() {
    let naming = Naming {
        address: Some(Box::new(|_| {
            SocketAddr::from((Ipv4Addr::LOCALHOST, free_port_on(Ipv4Addr::LOCALHOST)))
        })),
        seeds: Some(Box::new(|cores| {
            cores
                .iter()
                .map(|a| format!("localhost:{}", a.port()))
                .collect()
        })),
    };
    let cluster = TestCluster::start_named(2, 0, &naming, |_| String::new());
    cluster.wait_leader(&[1, 2]);
    let ports: Vec<u16> = cluster
        .nodes
        .iter()
        .map(|n| n.cluster_address.port())
        .collect();
    let expected: Vec<(String, Vec<String>)> = ports
        .iter()
        .map(|port| {
            (
                format!("localhost:{port}"),
                vec![format!("127.0.0.1:{port}")],
            )
        })
        .collect();
    assert_eq!(seed_names(&cluster, 1), expected);
    assert_eq!(seed_names(&cluster, 2), expected);
}

/// Two cores and an edge list only `srv:_cluster._tcp.shardmq.test`, whose targets are the
/// cores' names: they find each other, and the cores found one Raft group.
#[test]
fn a_cluster_forms_through_an_srv_name() {
    let ips = [Ipv4Addr::new(127, 0, 0, 41), Ipv4Addr::new(127, 0, 0, 42)];
    let edge_ip = Ipv4Addr::new(127, 0, 0, 43);
    let ports = [free_port_on(ips[0]), free_port_on(ips[1])];
    let edge_port = free_port_on(edge_ip);
    let mut zone = Zone::default();
    zone.srv.insert(
        fqdn("_cluster._tcp.shardmq.test"),
        vec![
            (ports[0], "core-1.shardmq.test".into()),
            (ports[1], "core-2.shardmq.test".into()),
        ],
    );
    zone.a.insert(fqdn("core-1.shardmq.test"), vec![ips[0]]);
    zone.a.insert(fqdn("core-2.shardmq.test"), vec![ips[1]]);
    let dns = DnsServer::start(zone);
    let naming = Naming {
        address: Some(Box::new(move |i| match i {
            1 | 2 => SocketAddr::from((ips[i - 1], ports[i - 1])),
            _ => SocketAddr::from((edge_ip, edge_port)),
        })),
        seeds: Some(Box::new(|_| vec!["srv:_cluster._tcp.shardmq.test".into()])),
    };
    let server = dns.address;
    let cluster = TestCluster::start_named(2, 1, &naming, move |_| {
        format!("dns_server = \"{server}\"\n")
    });
    cluster.wait_leader(&[1, 2]);
    let expected = vec![(
        "srv:_cluster._tcp.shardmq.test".to_string(),
        vec![
            format!("{}:{}", ips[0], ports[0]),
            format!("{}:{}", ips[1], ports[1]),
        ],
    )];
    for id in 1..=3 {
        assert_eq!(seed_names(&cluster, id), expected, "node {id}");
    }
    assert_eq!(cluster.member_state(3, 1).as_deref(), Some("up"));
    assert_eq!(cluster.member_state(3, 2).as_deref(), Some("up"));
}

/// An edge whose only seed is `core.shardmq.test:PORT`: its core dies, comes back at another
/// address (a pod restarted elsewhere), and the name's record is changed; the edge's redial
/// asks the name again and finds the core there.
#[test]
fn a_redial_follows_the_name_to_a_new_address() {
    let old_ip = Ipv4Addr::new(127, 0, 0, 51);
    let new_ip = Ipv4Addr::new(127, 0, 0, 52);
    let edge_ip = Ipv4Addr::new(127, 0, 0, 53);
    // One port free on both addresses: the name's port stays when its address changes.
    let port = (0..50)
        .map(|_| free_port_on(old_ip))
        .find(|&p| std::net::TcpListener::bind((new_ip, p)).is_ok())
        .expect("a port free on both addresses");
    let edge_port = free_port_on(edge_ip);
    let dns = DnsServer::start(Zone::default());
    dns.set_a("core.shardmq.test", vec![old_ip]);
    let naming = Naming {
        address: Some(Box::new(move |i| match i {
            1 => SocketAddr::from((old_ip, port)),
            _ => SocketAddr::from((edge_ip, edge_port)),
        })),
        seeds: Some(Box::new(move |_| vec![format!("core.shardmq.test:{port}")])),
    };
    let server = dns.address;
    let mut cluster = TestCluster::start_named(1, 1, &naming, move |_| {
        format!("dns_server = \"{server}\"\n")
    });
    assert_eq!(
        seed_names(&cluster, 2),
        vec![(
            format!("core.shardmq.test:{port}"),
            vec![format!("{old_ip}:{port}")]
        )]
    );
    // The core goes; the same core (node 1) starts again at the new address.
    cluster.node_mut(1).broker.kill();
    let config = cluster
        .node(1)
        .config()
        .replace(&format!("{old_ip}:{port}"), &format!("{new_ip}:{port}"));
    assert!(
        config.contains(&format!("listen = \"{new_ip}:{port}\"")),
        "{config}"
    );
    dns.set_a("core.shardmq.test", vec![new_ip]);
    let restarted = support::Broker::start_with(2, &config);
    cluster.nodes[0].broker = restarted;
    cluster.wait_status(
        2,
        Duration::from_secs(15),
        "the core found at its new address",
        |s| {
            s["members"].as_array().unwrap().iter().any(|m| {
                m["node"] == 1
                    && m["state"] == "up"
                    && m["cluster_address"] == format!("{new_ip}:{port}").as_str()
            }) && s["seeds"].as_array().unwrap().iter().any(|seed| {
                seed["address"] == format!("{new_ip}:{port}").as_str() && seed["state"] == "up"
            })
        },
    );
    assert_eq!(
        seed_names(&cluster, 2),
        vec![(
            format!("core.shardmq.test:{port}"),
            vec![format!("{new_ip}:{port}")]
        )]
    );
}
