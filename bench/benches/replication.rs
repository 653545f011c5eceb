//! Session replication on the message path: what a shard spends on QoS 1 deliveries to
//! persistent sessions when their records also go to replicas (issue 16, finding 9).
//!
//! One batch: a publisher's 50 QoS 1 PUBLISHes reach 20 online persistent subscribers (1,000
//! deliveries: a `MessageQueued` and a `MessageSent` record each), the shard's outputs are
//! taken (`flush_replication`), then the subscribers' 1,000 PUBACKs (a `MessageAcknowledged`
//! record each) and the outputs again: about 3,000 records. The `Replicate` items of both
//! flushes go the way the node layer sends them: queued on a forwarding `Peer`, taken as a
//! `Forward` body and framed (`forward::encode_cut`), then acknowledged. Three other nodes are
//! up, so with 1 replica each session's records go to one of them (interleaved) and with 2 to
//! two; `replicas_0` is the same work with replication off, the peer to compare against.
//! Only the shard's handling, its flushes and the node layer's framing are timed: decoding
//! the subscribers' PUBLISHes to build their PUBACKs is not.
//!
//! Run: `cargo bench -p shardmq-bench --bench replication`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shardmq_net::mqtt::{
    self, AckProperties, Connect, ConnectProperties, DecodeOptions, Packet, ProtocolVersion,
    PubAck, Publish, PublishProperties, QoS, ReasonCode, Sender, Subscribe, SubscribeProperties,
    SubscriptionOptions,
};
use shardmq_shards::cluster::forward;
use shardmq_shards::message::ClusterNode;
use shardmq_shards::shard::Transport;
use shardmq_shards::{
    ConnectionId, Input, Limits, Output, Shard, ShardConfig, ShardMessage, SharedStrategy,
};

const SUBSCRIBERS: u64 = 20;
const PUBLISHES: u16 = 50;
const PUBLISHER: ConnectionId = 1;
const PAYLOAD_BYTES: usize = 64;
/// Other nodes up besides this one (node 1).
const OTHER_NODES: u32 = 3;

fn encoded(packet: &Packet, out: &mut BytesMut) {
    mqtt::encode(packet, ProtocolVersion::V5, out);
}

fn connect(client_id: String, persistent: bool) -> Bytes {
    let mut out = BytesMut::new();
    encoded(
        &Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: !persistent,
            keep_alive_seconds: 0,
            properties: ConnectProperties {
                session_expiry_interval: persistent.then_some(3_600),
                ..ConnectProperties::default()
            },
            client_id: ByteString::from(client_id),
            will: None,
            username: None,
            password: None,
        })),
        &mut out,
    );
    out.freeze()
}

struct Rig {
    shard: Shard,
    now_ms: u64,
    outputs: Vec<Output>,
    /// What the node layer keeps for each other node, as `data.rs` does.
    peers: Vec<forward::Peer>,
    /// The publisher's batch of PUBLISHes, sent again each time.
    publishes: Bytes,
    /// Bytes of frames written, read so that the framing is not optimized away.
    framed_bytes: u64,
    replicate_items: u64,
}

impl Rig {
    fn new(replicas: usize) -> Self {
        let mut shard = Shard::new(ShardConfig {
            index: 0,
            shard_count: 1,
            node: 1,
            takeover_timeout_ms: 1_000,
            limits: Limits::default(),
            shared_strategy: SharedStrategy::RoundRobin,
        });
        shard.attach_replication(replicas, 0);
        let mut rig = Self {
            shard,
            now_ms: 1,
            outputs: Vec::new(),
            peers: (0..OTHER_NODES)
                .map(|n| forward::Peer::new(u64::from(n)))
                .collect(),
            publishes: Bytes::new(),
            framed_bytes: 0,
            replicate_items: 0,
        };
        // Clients connect before the other nodes are up, so no CONNECT waits for a claim.
        rig.input(Input::Opened {
            connection: PUBLISHER,
            transport: Transport::default(),
        });
        rig.input(Input::Received {
            connection: PUBLISHER,
            bytes: connect("publisher".into(), false),
        });
        for subscriber in subscribers() {
            rig.input(Input::Opened {
                connection: subscriber,
                transport: Transport::default(),
            });
            let mut bytes = BytesMut::from(&connect(format!("subscriber-{subscriber}"), true)[..]);
            encoded(
                &Packet::Subscribe(Subscribe {
                    packet_id: 1,
                    properties: SubscribeProperties::default(),
                    filters: vec![(
                        ByteString::from_static("site/7/sensor/temperature"),
                        SubscriptionOptions::new(QoS::AtLeastOnce),
                    )],
                }),
                &mut bytes,
            );
            rig.input(Input::Received {
                connection: subscriber,
                bytes: bytes.freeze(),
            });
        }
        let nodes = (1..=1 + OTHER_NODES)
            .map(|node| ClusterNode {
                node,
                address: ([127, 0, 0, node as u8], 7000).into(),
                epoch: 1,
                up: true,
            })
            .collect();
        rig.input(Input::Shard(ShardMessage::ClusterNodes(nodes)));
        rig.take_outputs();
        let mut publishes = BytesMut::new();
        for packet_id in 1..=PUBLISHES {
            encoded(
                &Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: ByteString::from_static("site/7/sensor/temperature"),
                    packet_id,
                    properties: PublishProperties::default(),
                    payload: Bytes::from(vec![0xA5; PAYLOAD_BYTES]),
                }),
                &mut publishes,
            );
        }
        rig.publishes = publishes.freeze();
        rig
    }

    fn input(&mut self, input: Input) {
        self.shard.handle(self.now_ms, input);
    }

    /// The shard's outputs, and the node layer's part for its `Replicate` items; returns
    /// the subscribers' bytes (their PUBLISHes) for the PUBACKs.
    fn take_outputs(&mut self) -> Vec<(ConnectionId, Bytes)> {
        self.shard.take_outputs(&mut self.outputs);
        let mut sent = Vec::new();
        for output in self.outputs.drain(..) {
            match output {
                Output::Send { connection, bytes } => sent.push((connection, bytes)),
                Output::SessionToNode { node, transfer } => {
                    self.replicate_items += 1;
                    let index = node.saturating_sub(2) as usize;
                    if let Some(peer) = self.peers.get_mut(index) {
                        peer.push_transfer(&transfer, 10_000);
                    }
                }
                _ => {}
            }
        }
        for peer in &mut self.peers {
            if let Some(body) = peer.take_frame() {
                let mut frames = BytesMut::new();
                let cut = forward::encode_cut(&body, 9, 64 << 20, &mut frames);
                assert!(cut.is_ok_and(|cut| cut.dropped == 0), "every item framed");
                self.framed_bytes += frames.len() as u64;
                peer.acknowledged(u64::MAX);
            }
        }
        // Every byte handed out is taken at once, as by a socket that keeps up.
        for (connection, _) in &sent {
            self.shard.handle(
                self.now_ms,
                Input::Sent {
                    connection: *connection,
                    unsent_bytes: 0,
                },
            );
        }
        sent
    }

    /// One batch, timed without the building of the PUBACKs.
    fn batch(&mut self) -> Duration {
        self.now_ms += 1;
        let started = Instant::now();
        self.input(Input::Received {
            connection: PUBLISHER,
            bytes: self.publishes.clone(),
        });
        let sent = self.take_outputs();
        let mut elapsed = started.elapsed();
        let acks = pubacks(sent);
        let started = Instant::now();
        for (connection, bytes) in acks {
            self.input(Input::Received { connection, bytes });
        }
        self.take_outputs();
        elapsed += started.elapsed();
        elapsed
    }
}

fn subscribers() -> impl Iterator<Item = ConnectionId> {
    (0..SUBSCRIBERS).map(|n| 100 + n)
}

/// A PUBACK for every PUBLISH each subscriber received.
fn pubacks(sent: Vec<(ConnectionId, Bytes)>) -> Vec<(ConnectionId, Bytes)> {
    let options = DecodeOptions {
        version: ProtocolVersion::V5,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: Sender::Server,
    };
    let mut acks = Vec::new();
    for (connection, mut bytes) in sent {
        if connection == PUBLISHER {
            continue;
        }
        let mut out = BytesMut::new();
        let mut delivered = 0;
        while let Ok(Some((packet, len))) = mqtt::decode(&bytes, &options) {
            if let Packet::Publish(publish) = packet {
                delivered += 1;
                encoded(
                    &Packet::PubAck(PubAck {
                        packet_id: publish.packet_id,
                        reason: ReasonCode::SUCCESS,
                        properties: AckProperties::default(),
                    }),
                    &mut out,
                );
            }
            bytes = bytes.slice(len..);
        }
        assert_eq!(
            delivered, PUBLISHES,
            "every PUBLISH reached subscriber {connection}"
        );
        acks.push((connection, out.freeze()));
    }
    acks
}

fn replication(c: &mut Criterion) {
    let mut group = c.benchmark_group("replication_qos1_1000_deliveries");
    group.throughput(Throughput::Elements(SUBSCRIBERS * u64::from(PUBLISHES)));
    for replicas in [0, 1, 2] {
        let mut rig = Rig::new(replicas);
        // Warm the rig once: the first batch after the setup also carries the sessions'
        // whole copies for their replicas.
        rig.batch();
        let items_before = rig.replicate_items;
        rig.batch();
        let items_per_batch = rig.replicate_items - items_before;
        if replicas == 0 {
            assert_eq!(items_per_batch, 0, "no replication without replicas");
        } else {
            assert!(items_per_batch > 0, "replication items per batch");
        }
        group.bench_function(format!("replicas_{replicas}"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    total += rig.batch();
                }
                total
            })
        });
        black_box(rig.framed_bytes);
    }
    group.finish();
}

criterion_group!(benches, replication);
criterion_main!(benches);
