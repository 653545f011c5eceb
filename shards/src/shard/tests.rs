//! Shard behaviour, driven in memory: a `Node` of shards routes outputs between them the way
//! the reactor does, and clients are byte streams encoded and decoded with the codec.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::{HashMap, HashSet};
use shardmq_net::mqtt::{
    self, Connect, ConnectProperties, DecodeOptions, Disconnect, Packet, ProtocolVersion, PubAck,
    Publish, PublishProperties, QoS, ReasonCode, Sender, Subscribe, SubscribeProperties,
    SubscriptionOptions, Will, WillProperties,
};

use super::*;

struct Node {
    shards: Vec<Shard>,
    /// Which shard holds each connection now.
    location: HashMap<ConnectionId, usize>,
    received: HashMap<ConnectionId, Vec<Packet>>,
    versions: HashMap<ConnectionId, ProtocolVersion>,
    closed: Vec<ConnectionId>,
    /// Session claims and answers the shards sent to other nodes, in order.
    transfers: Vec<(NodeId, SessionTransfer)>,
    /// Connections whose client does not read: the harness, standing in for the reactor,
    /// reports nothing taken from them. Every other connection's bytes are taken at once.
    stalled: HashSet<ConnectionId>,
    /// Every output of every shard, in order, as text: two runs of one script compare equal
    /// only if the outputs came in the same order.
    log: Vec<String>,
    now_ms: u64,
    /// Credentials the shards asked to check, in order: (shard, connection, ticket, them).
    verifies: Vec<(usize, ConnectionId, u64, Credentials)>,
}

impl Node {
    fn new(shard_count: u16, limits: Limits) -> Self {
        Self::with_strategy(shard_count, limits, SharedStrategy::RoundRobin)
    }

    fn with_strategy(shard_count: u16, limits: Limits, shared_strategy: SharedStrategy) -> Self {
        let shards = (0..shard_count)
            .map(|index| {
                Shard::new(ShardConfig {
                    index,
                    shard_count,
                    node: 0,
                    takeover_timeout_ms: 5_000,
                    limits: limits.clone(),
                    shared_strategy,
                })
            })
            .collect();
        Self {
            shards,
            location: HashMap::new(),
            received: HashMap::new(),
            versions: HashMap::new(),
            closed: Vec::new(),
            transfers: Vec::new(),
            stalled: HashSet::new(),
            log: Vec::new(),
            now_ms: 1_000,
            verifies: Vec::new(),
        }
    }

    fn run(&mut self, shard: usize, input: Input) {
        let mut work = VecDeque::from([(shard, input)]);
        while let Some((shard, input)) = work.pop_front() {
            self.shards[shard].handle(self.now_ms, input);
            // The invariants hold between inputs, not only between batches: the reactor hands
            // a shard several inputs before it takes the outputs.
            self.shards[shard].check_invariants();
            let mut outputs = Vec::new();
            self.shards[shard].take_outputs(&mut outputs);
            self.shards[shard].check_invariants();
            for output in outputs {
                self.log.push(format!("shard {shard}: {output:?}"));
                match output {
                    Output::Send { connection, bytes } => {
                        self.decode_sent(connection, bytes);
                        // As the reactor does after a send completion: the socket took it all.
                        if !self.stalled.contains(&connection) {
                            work.push_back((
                                shard,
                                Input::Sent {
                                    connection,
                                    unsent_bytes: 0,
                                },
                            ));
                        }
                    }
                    Output::Close { connection } => {
                        self.location.remove(&connection);
                        self.closed.push(connection);
                    }
                    Output::HandOff {
                        connection,
                        shard,
                        bytes,
                    } => {
                        self.location.insert(connection, usize::from(shard));
                        work.push_back((
                            usize::from(shard),
                            Input::Opened {
                                connection,
                                transport: Transport::default(),
                            },
                        ));
                        work.push_back((usize::from(shard), Input::Received { connection, bytes }));
                    }
                    Output::ToShard { shard, message } => {
                        work.push_back((usize::from(shard), Input::Shard(message)))
                    }
                    Output::SessionToNode { node, transfer } => {
                        self.transfers.push((node, transfer))
                    }
                    Output::Verify {
                        connection,
                        ticket,
                        credentials,
                    } => self.verifies.push((shard, connection, ticket, credentials)),
                    // A node on its own: no cluster to tell or forward to.
                    Output::ToNode { .. } | Output::NodeRoute { .. } => {}
                }
            }
        }
    }

    /// Tells shard 0 that the cluster has one other member, node `peer`, and it is up.
    fn peer_up(&mut self, peer: NodeId) {
        self.run(
            0,
            Input::Shard(ShardMessage::ClusterNodes(vec![
                crate::message::ClusterNode {
                    node: peer,
                    address: "127.0.0.1:7883".parse().unwrap(),
                    epoch: 1,
                    up: true,
                },
            ])),
        );
    }

    fn decode_sent(&mut self, connection: ConnectionId, mut bytes: Bytes) {
        let version = self.versions[&connection];
        let options = DecodeOptions {
            version,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        while !bytes.is_empty() {
            let (packet, used) = mqtt::decode(&bytes, &options)
                .expect("the shard sends valid packets")
                .expect("whole packets");
            self.received.entry(connection).or_default().push(packet);
            bytes = bytes.slice(used..);
        }
    }

    /// Opens connection `id` on `shard` and sends `connect`.
    fn connect(&mut self, id: ConnectionId, shard: usize, connect: Connect) -> ConnAck {
        self.connect_over(id, shard, connect, Transport::default())
    }

    /// [`Node::connect`] over `transport` (kept only if `shard` owns the client: a
    /// hand-off opens the connection again without one).
    fn connect_over(
        &mut self,
        id: ConnectionId,
        shard: usize,
        connect: Connect,
        transport: Transport,
    ) -> ConnAck {
        self.versions.insert(id, connect.protocol);
        self.location.insert(id, shard);
        self.run(
            shard,
            Input::Opened {
                connection: id,
                transport,
            },
        );
        self.send(id, &Packet::Connect(Box::new(connect)));
        let mut packets = self.take(id);
        assert!(!packets.is_empty(), "no answer to CONNECT");
        let Packet::ConnAck(connack) = packets.remove(0) else {
            panic!("expected CONNACK first, got {packets:?}");
        };
        // What followed CONNACK in the same batch stays for the test to take.
        if !packets.is_empty() {
            self.received.insert(id, packets);
        }
        *connack
    }

    fn send(&mut self, id: ConnectionId, packet: &Packet) {
        let mut buf = BytesMut::new();
        mqtt::encode(packet, self.versions[&id], &mut buf);
        let shard = *self.location.get(&id).expect("an open connection");
        self.run(
            shard,
            Input::Received {
                connection: id,
                bytes: buf.freeze(),
            },
        );
    }

    fn take(&mut self, id: ConnectionId) -> Vec<Packet> {
        self.received.remove(&id).unwrap_or_default()
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        for shard in 0..self.shards.len() {
            self.run(shard, Input::Tick);
        }
    }

    /// The client of `id` stops reading: what the shard hands out for it stays unsent.
    fn stall(&mut self, id: ConnectionId) {
        self.stalled.insert(id);
    }

    /// The client of `id` reads again and its socket takes everything queued.
    fn resume(&mut self, id: ConnectionId) {
        self.stalled.remove(&id);
        let shard = *self.location.get(&id).expect("an open connection");
        self.run(
            shard,
            Input::Sent {
                connection: id,
                unsent_bytes: 0,
            },
        );
    }

    fn lose(&mut self, id: ConnectionId) {
        let shard = self.location.remove(&id).expect("an open connection");
        self.run(shard, Input::Closed { connection: id });
    }
}

fn connect(version: ProtocolVersion, client_id: &'static str, clean_start: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start,
        keep_alive_seconds: 0,
        properties: ConnectProperties::default(),
        client_id: ByteString::from_static(client_id),
        will: None,
        username: None,
        password: None,
    }
}

fn subscribe(packet_id: u16, filter: &'static str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        properties: SubscribeProperties::default(),
        filters: vec![(
            ByteString::from_static(filter),
            SubscriptionOptions::new(qos),
        )],
    })
}

/// The reason codes of each SUBACK among `packets`.
fn subacks(packets: &[Packet]) -> Vec<Vec<ReasonCode>> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::SubAck(suback) => Some(suback.reasons.clone()),
            _ => None,
        })
        .collect()
}

/// SUBSCRIBE to several filters at one QoS.
fn subscribe_all(packet_id: u16, filters: &[&'static str], qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        properties: SubscribeProperties::default(),
        filters: filters
            .iter()
            .map(|&filter| {
                (
                    ByteString::from_static(filter),
                    SubscriptionOptions::new(qos),
                )
            })
            .collect(),
    })
}

fn publish(topic: &'static str, qos: QoS, packet_id: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: ByteString::from_static(topic),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::from_static(payload),
    })
}

/// The PUBLISH packets among `packets`.
fn publishes_in(packets: &[Packet]) -> Vec<&Publish> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::Publish(publish) => Some(publish),
            _ => None,
        })
        .collect()
}

fn payloads(packets: &[Packet]) -> Vec<(&[u8], QoS)> {
    publishes_in(packets)
        .into_iter()
        .map(|publish| (&publish.payload[..], publish.qos))
        .collect()
}

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
fn v5_persistent(client_id: &'static str, expiry: u32) -> Connect {
    Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..ConnectProperties::default()
        },
        ..connect(V5, client_id, false)
    }
}

mod auth;
mod delivery;
mod durable;
mod guards;
mod inspect;
mod rules;
mod sessions;
mod slow_subscriber;
mod traces;
