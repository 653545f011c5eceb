//! The cluster link handshake against a hostile peer, over real sockets to real broker
//! processes: a man in the middle who relays one node's proofs to another cannot log in as
//! either; before it has authenticated a stranger can make a node buffer only a handshake-sized
//! frame, and a link that does not finish its handshake in time is closed. The test speaks the
//! frame format through `shardmq_net::frame`, as a node would.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use shardmq_net::frame::{
    self, Body, Decoder, Forwarded, Hello, Item, Member, NodeId, PROTOCOL_VERSION, Purpose, Role,
    WireMessage,
};
use shardmq_shards::cluster::link::{HANDSHAKE_TIMEOUT_MS, PENDING_LINKS_MAX};
use support::{TestCluster, v5};

const CLUSTER_NAME: &str = "shardmq";

/// One raw link to a node's cluster port, framed as a node frames it.
struct Wire {
    stream: TcpStream,
    decoder: Decoder,
}

impl Wire {
    fn open(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            decoder: Decoder::new(frame::cluster_id(CLUSTER_NAME), 1 << 20),
        }
    }

    fn send(&mut self, body: &Body) {
        let mut bytes = bytes::BytesMut::new();
        frame::encode(
            body,
            frame::cluster_id(CLUSTER_NAME),
            usize::MAX,
            &mut bytes,
        )
        .expect("test frames fit");
        // The node may already have closed the link; what it said before is what counts.
        let _ = self.stream.write_all(&bytes);
    }

    /// The next frame within `timeout`; `None` if the link closed or stayed silent.
    fn receive(&mut self, timeout: Duration) -> Option<Body> {
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(body) = self
                .decoder
                .next_frame()
                .expect("the node frames correctly")
            {
                return Some(body);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buffer) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.extend(&buffer[..n]),
            }
        }
    }

    /// Every frame until the node closes the link or `timeout` passes, and whether it closed.
    fn drain(&mut self, timeout: Duration) -> (Vec<Body>, bool) {
        let deadline = Instant::now() + timeout;
        let mut bodies = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            while let Ok(Some(body)) = self.decoder.next_frame() {
                bodies.push(body);
            }
            let left = match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return (bodies, false),
            };
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buffer) {
                Ok(0) => return (bodies, true),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return (bodies, true);
                }
                Err(_) => return (bodies, false),
                Ok(n) => self.decoder.extend(&buffer[..n]),
            }
        }
    }
}

/// What the man in the middle claims to be: node `node`, with the addresses of the test
/// cluster's node of that identifier if there is one.
fn hello_as(cluster: &TestCluster, node: NodeId, nonce: [u8; 16]) -> Body {
    let known = cluster.nodes.iter().find(|n| n.id == node);
    let member = Member {
        node,
        role: Role::Core,
        cluster_address: known.map_or("127.0.0.99:7000".into(), |n| n.cluster_address.to_string()),
        mqtt_address: known.map_or("127.0.0.99:1883".into(), |n| n.broker.address().to_string()),
        epoch: 77,
    };
    Body::Hello(Hello {
        node,
        role: member.role,
        purpose: Purpose::Data,
        member,
        nonce,
        shard: 0,
        epoch: 77,
    })
}

fn welcome(wire: &mut Wire) -> ([u8; 32], [u8; 16]) {
    match wire.receive(Duration::from_secs(3)) {
        Some(Body::Welcome(welcome)) => (welcome.proof, welcome.nonce),
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

/// How the man in the middle tries to get a proof it cannot make.
#[derive(Debug, Clone, Copy)]
enum Relay {
    /// The other node is asked a `Hello` carrying the victim's nonce; its answer is passed on
    /// as the proof of the impersonated node.
    CrossNodes,
    /// The victim's own proof is sent back to it.
    Reflect,
    /// The victim's `Welcome` is shown to the impersonated node as if the victim had answered
    /// a `Hello` of the impersonated node, and whatever comes back is relayed.
    ShuttleWelcome,
}

/// Tries to log in to `victim` as `impersonated` by `relay`, then forwards a message to the
/// victim's subscriber. Returns the frames the victim sent after the proof, and whether it
/// closed the link.
fn attack(
    cluster: &TestCluster,
    victim: NodeId,
    impersonated: NodeId,
    relay: Relay,
) -> (Vec<Body>, bool) {
    let mut to_victim = Wire::open(cluster.node(victim).cluster_address);
    to_victim.send(&hello_as(cluster, impersonated, [0xA5; 16]));
    let (victim_proof, victim_nonce) = welcome(&mut to_victim);
    let proof = match relay {
        Relay::CrossNodes => {
            let mut to_other = Wire::open(cluster.node(impersonated).cluster_address);
            to_other.send(&hello_as(cluster, victim, victim_nonce));
            welcome(&mut to_other).0
        }
        Relay::Reflect => victim_proof,
        Relay::ShuttleWelcome => {
            // Dial the impersonated node as the victim, with our first nonce, and show it the
            // victim's Welcome: if it proves, that proof goes to the victim.
            let mut to_other = Wire::open(cluster.node(impersonated).cluster_address);
            to_other.send(&hello_as(cluster, victim, [0xA5; 16]));
            let _ = welcome(&mut to_other);
            to_other.send(&Body::Proof {
                proof: victim_proof,
            });
            match to_other.receive(Duration::from_secs(1)) {
                Some(Body::Proof { proof }) => proof,
                _ => victim_proof,
            }
        }
    };
    to_victim.send(&Body::Proof { proof });
    to_victim.send(&Body::Forward {
        messages: vec![Forwarded {
            sequence: 1,
            item: Item::Publish {
                message: WireMessage {
                    topic: format!("relay/{victim}"),
                    payload: format!("forged by a relay {relay:?}").into_bytes(),
                    qos: 1,
                    retain: false,
                    expiry_ms: None,
                    publisher: None,
                    payload_format_indicator: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                    content_type: None,
                },
                plain: true,
                groups: Vec::new(),
            },
        }],
    });
    to_victim.drain(Duration::from_secs(2))
}

#[test]
fn a_relay_of_the_handshake_logs_in_as_neither_node() {
    let cluster = TestCluster::start(1, 1);
    let subscribers: Vec<_> = [1, 2]
        .into_iter()
        .map(|id| {
            let client = v5(
                cluster.node(id).broker.port,
                &format!("relay-sub-{id}"),
                |_| {},
            );
            client.subscribe(&format!("relay/{id}"), QoS::AtLeastOnce);
            client
        })
        .collect();
    for relay in [Relay::CrossNodes, Relay::Reflect, Relay::ShuttleWelcome] {
        for (victim, impersonated) in [(2, 1), (1, 2)] {
            let (bodies, closed) = attack(&cluster, victim, impersonated, relay);
            assert!(
                !bodies.iter().any(|b| matches!(b, Body::ForwardAck { .. })),
                "{relay:?}: node {victim} took the relay for node {impersonated}: {bodies:?}"
            );
            assert!(
                closed && bodies.iter().any(|b| matches!(b, Body::Refused { .. })),
                "{relay:?}: node {victim} refuses the proof and closes: {bodies:?}"
            );
        }
    }
    for (index, subscriber) in subscribers.iter().enumerate() {
        assert!(
            subscriber
                .publishes(1, Duration::from_millis(500))
                .is_empty(),
            "a forged message reached the subscriber on node {}",
            index + 1
        );
    }
    // The nodes themselves still form their cluster.
    cluster.wait_all_members(Duration::from_secs(5));
}

/// A header that a node's decoder accepts, announcing a Hello of `body_len` bytes.
fn header(body_len: u32) -> [u8; frame::HEADER_LEN] {
    let mut header = [0u8; frame::HEADER_LEN];
    header[0..4].copy_from_slice(&frame::MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6] = 1;
    header[8..16].copy_from_slice(&frame::cluster_id(CLUSTER_NAME).to_le_bytes());
    header[16..20].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32(&header[0..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    header
}

/// CRC-32 (IEEE), as the frame header uses; bitwise, since the test has no crate for it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_huge_frame_before_authentication_is_refused_at_its_header() {
    let cluster = TestCluster::start(1, 0);
    let mut wire = Wire::open(cluster.node(1).cluster_address);
    // Below the 16 MiB frame limit of an authenticated link, far above a handshake.
    wire.stream.write_all(&header(15 << 20)).unwrap();
    let started = Instant::now();
    let (bodies, closed) = wire.drain(Duration::from_secs(3));
    assert!(closed, "the node closes the link");
    assert!(
        bodies
            .iter()
            .any(|b| matches!(b, Body::Refused { reason } if reason.contains("above"))),
        "the node refuses the frame for its size at once, without waiting for its body: {bodies:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(
        cluster
            .node(1)
            .broker
            .log_text()
            .contains("above the limit"),
        "the refusal is logged"
    );
}

#[test]
fn a_link_that_trickles_or_stays_silent_is_closed_within_the_handshake_deadline() {
    let cluster = TestCluster::start(1, 0);
    let deadline = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let mut silent = Wire::open(cluster.node(1).cluster_address);
    let mut trickle = Wire::open(cluster.node(1).cluster_address);
    let started = Instant::now();
    // A well-formed Hello, one byte every 200 ms: never silent for the 600 ms link timeout of
    // the test clusters, never done within the handshake deadline.
    let mut hello = bytes::BytesMut::new();
    frame::encode(
        &hello_as(&cluster, 9, [1; 16]),
        frame::cluster_id(CLUSTER_NAME),
        usize::MAX,
        &mut hello,
    )
    .expect("a Hello fits");
    let mut closed_after = None;
    for byte in hello.iter() {
        if trickle.stream.write_all(&[*byte]).is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        trickle
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buffer = [0u8; 256];
        match trickle.stream.read(&mut buffer) {
            Ok(0) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed_after = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
        assert!(
            started.elapsed() < deadline + Duration::from_secs(3),
            "the trickling link is still open past the handshake deadline"
        );
    }
    let closed_after = closed_after.expect("the trickling link is closed");
    // Closed by the handshake deadline: not before it (it never went silent), soon after it.
    assert!(
        closed_after + Duration::from_millis(300) >= deadline
            && closed_after < deadline + Duration::from_secs(2),
        "closed after {closed_after:?}"
    );
    let (_, closed) = silent.drain(Duration::from_secs(1));
    assert!(closed, "the silent link is closed too");
    assert!(
        cluster
            .node(1)
            .broker
            .log_text()
            .contains("did not finish its handshake"),
        "the deadline is logged"
    );
}

/// A TCP connection to `address` from the loopback address `source`.
fn connect_from(source: [u8; 4], address: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&address.into()).unwrap();
    TcpStream::from(socket)
}

#[test]
fn the_cluster_port_takes_at_most_64_connections_from_one_address() {
    let cluster = TestCluster::start(1, 0);
    let address = cluster.node(1).cluster_address;
    let source = [127, 0, 2, 1];
    let held: Vec<TcpStream> = (0..64).map(|_| connect_from(source, address)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut one_more = connect_from(source, address);
    one_more
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    let refused = match one_more.read(&mut byte) {
        Ok(0) => true,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(
        refused,
        "the 65th connection from one address is closed at once"
    );
    // Another address is still admitted (it waits for its handshake, not refused).
    let mut other = connect_from([127, 0, 2, 2], address);
    other
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        matches!(other.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut),
        "another address's connection is held for its handshake"
    );
    drop(held);
}

#[test]
fn links_in_handshake_are_capped_and_the_cluster_still_forms_after() {
    let mut cluster = TestCluster::start(2, 0);
    let address = cluster.node(1).cluster_address;
    // Node 2 stops dialling node 1 while strangers hold every handshake place there.
    cluster.node_mut(2).broker.kill();
    // From 32 source addresses, within the per-address limit of the cluster port (64), so
    // that the cap on links in their handshake is what stops the next one.
    let strangers: Vec<TcpStream> = (0..PENDING_LINKS_MAX)
        .map(|i| connect_from([127, 0, 1, 1 + (i % 32) as u8], address))
        .collect();
    // Give node 1 a moment to take them all (well within the 600 ms link timeout).
    std::thread::sleep(Duration::from_millis(150));
    let mut one_more = Wire::open(address);
    let started = Instant::now();
    let (bodies, closed) = one_more.drain(Duration::from_millis(400));
    assert!(
        closed && bodies.is_empty() && started.elapsed() < Duration::from_millis(400),
        "the link beyond the limit is closed at once: {bodies:?}, closed {closed}"
    );
    assert!(
        cluster
            .node(1)
            .broker
            .log_text()
            .contains("links in handshake at their limit"),
        "the limit is logged"
    );
    drop(strangers);
    // The places free up as the strangers go; a node then joins as usual.
    cluster.restart(2);
    cluster.wait_all_members(Duration::from_secs(10));
}
