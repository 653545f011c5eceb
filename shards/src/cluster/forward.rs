//! Forwarding: published messages crossing from one shard of this node to other nodes, and
//! arriving from them.
//!
//! Owns: one outbound data link per other node from this shard (the pool is one link per
//! shard and peer node, so a shard never hops to another core to forward), the messages sent
//! and not yet acknowledged, and (on the shard that accepts cluster links) the highest message
//! number delivered from each sending shard of each node.
//! Invariants: messages to one node leave in the order the shard routed them; a QoS 1 or 2
//! message stays queued until the receiver acknowledges it, and is resent over a new link
//! with its number unchanged; the receiver delivers each number once per sender epoch. QoS 0
//! messages are sent once and never resent. Every frame written fits the frame size limit:
//! a batch longer than a frame's budget goes as several `Forward` frames ([`encode_cut`]).

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use shardmq_net::frame::{self, Body, NodeId};
use shardmq_net::mqtt::wire::FIELD_LENGTH_MAX;
use shardmq_net::mqtt::{PublishProperties, QoS, topic};
use std::collections::{BTreeMap, BTreeSet};
use tracing::{debug, warn};

use crate::message::{ConnectionId, Forwarded, Message, SessionTransfer};

/// A message as it crosses the wire. Expiry travels as time left, since two nodes' clocks are
/// not comparable.
pub fn to_wire(forwarded: &Forwarded, sequence: u64, now_ms: u64) -> frame::Forwarded {
    let message = &forwarded.message;
    let properties = &message.properties;
    frame::Forwarded {
        sequence,
        item: frame::Item::Publish {
            message: frame::WireMessage {
                topic: message.topic.to_string(),
                payload: message.payload.to_vec(),
                qos: message.qos as u8,
                retain: message.retain,
                expiry_ms: message.expires_at_ms.map(|at| at.saturating_sub(now_ms)),
                publisher: message.publisher.as_ref().map(|p| p.to_string()),
                payload_format_indicator: properties.payload_format_indicator,
                response_topic: properties.response_topic.as_ref().map(|t| t.to_string()),
                correlation_data: properties.correlation_data.as_ref().map(|d| d.to_vec()),
                user_properties: properties
                    .user_properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                content_type: properties.content_type.as_ref().map(|t| t.to_string()),
            },
            plain: forwarded.plain,
            groups: forwarded
                .groups
                .iter()
                .map(|(g, f)| (g.to_string(), f.to_string()))
                .collect(),
        },
    }
}

/// A session transfer as it crosses the wire.
pub fn transfer_to_wire(transfer: &SessionTransfer, sequence: u64) -> frame::Forwarded {
    let item = match transfer {
        SessionTransfer::Claim {
            client_id,
            shard,
            claim,
            clean_start,
            after,
        } => frame::Item::Claim {
            client_id: client_id.to_string(),
            shard: *shard,
            claim: *claim,
            clean_start: *clean_start,
            after: *after,
        },
        SessionTransfer::Handover {
            client_id,
            shard,
            claim,
            session,
            completed,
        } => frame::Item::Handover {
            client_id: client_id.to_string(),
            shard: *shard,
            claim: *claim,
            session: session.as_ref().map(|s| s.to_vec()),
            completed: *completed,
        },
        // The records' bytes are shared, not copied: the queues clone the item.
        SessionTransfer::Replicate { reset, records } => frame::Item::Replicate {
            reset: *reset,
            records: records.clone(),
        },
        SessionTransfer::ReplicaOffer {
            client_id,
            shard,
            claim,
            home,
            session,
        } => frame::Item::ReplicaOffer {
            client_id: client_id.to_string(),
            shard: *shard,
            claim: *claim,
            home: *home,
            session: session.to_vec(),
        },
        SessionTransfer::Disown { client_id, home } => frame::Item::Disown {
            client_id: client_id.to_string(),
            home: *home,
        },
    };
    frame::Forwarded { sequence, item }
}

/// Appends the frames of `body` to `out`, each within `body_len_max`. A `Forward` body
/// whose items add up to more than a frame's budget (half the limit,
/// [`frame::FRAME_BUDGET_DIVISOR`]) goes as several `Forward` frames, in order: the receiver
/// delivers and acknowledges each as it would one, so numbering, acknowledgement and resending
/// are unchanged. An item that fits no frame even alone (a message longer than half the
/// limit whose true encoding is also above it: `packet_size_max` set near
/// `cluster.frame_size_max`) is dropped, logged and counted in the return value, rather than
/// sent in a frame the peer must refuse, which would close the link and, resent on every new
/// link, keep it from ever recovering. Any other body goes as one frame, or is refused
/// ([`frame::encode`]).
pub fn encode_cut(
    body: &Body,
    cluster: u64,
    body_len_max: usize,
    out: &mut BytesMut,
) -> Result<Cut, frame::FrameError> {
    let budget = body_len_max / frame::FRAME_BUDGET_DIVISOR;
    let one = Cut {
        frames: 1,
        dropped: 0,
    };
    let Body::Forward { messages } = body else {
        return frame::encode(body, cluster, body_len_max, out).map(|()| one);
    };
    let total = messages
        .iter()
        .map(frame::Forwarded::len_bound)
        .sum::<usize>();
    if total <= budget {
        return frame::encode(body, cluster, body_len_max, out).map(|()| one);
    }
    let (mut frames, mut dropped) = (0, 0);
    for run in frame::cut_by_len(messages, |m| m.len_bound(), budget) {
        let count = run.len();
        let first_sequence = run.first().map(|m| m.sequence);
        let part = Body::Forward {
            messages: run.into_iter().cloned().collect(),
        };
        // A run of several items is within the budget, so only a lone item can fail here.
        match frame::encode(&part, cluster, body_len_max, out) {
            Ok(()) => frames += 1,
            Err(error) => {
                warn!(
                    sequence = first_sequence,
                    count,
                    %error,
                    "forwarded item longer than a cluster frame: dropped"
                );
                dropped += count;
            }
        }
    }
    Ok(Cut { frames, dropped })
}

/// What [`encode_cut`] wrote: how many frames, and how many forwarded items it dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub frames: usize,
    pub dropped: usize,
}

/// What one received item is for this node. Lives for one item: the message inline costs
/// less than boxing it (an allocation per forwarded message).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Received {
    Publish(Forwarded),
    Session(SessionTransfer),
}

/// The item a wire item carries, or why it is not one (a peer's bytes are checked like a
/// client's: a bad QoS ends the link, not the node).
pub fn from_wire(wire: frame::Forwarded, now_ms: u64) -> Result<Received, String> {
    if let frame::Item::Claim { client_id, .. }
    | frame::Item::Handover { client_id, .. }
    | frame::Item::ReplicaOffer { client_id, .. }
    | frame::Item::Disown { client_id, .. } = &wire.item
        && (client_id.len() > FIELD_LENGTH_MAX || client_id.contains('\0'))
    {
        return Err("a forwarded client identifier is not a valid MQTT string".into());
    }
    match wire.item {
        frame::Item::Publish {
            message,
            plain,
            groups,
        } => publish_from_wire(message, plain, groups, now_ms).map(Received::Publish),
        frame::Item::Claim {
            client_id,
            shard,
            claim,
            clean_start,
            after,
        } => Ok(Received::Session(SessionTransfer::Claim {
            client_id: ByteString::from(client_id),
            shard,
            claim,
            clean_start,
            after,
        })),
        frame::Item::Handover {
            client_id,
            shard,
            claim,
            session,
            completed,
        } => Ok(Received::Session(SessionTransfer::Handover {
            client_id: ByteString::from(client_id),
            shard,
            claim,
            session: session.map(Bytes::from),
            completed,
        })),
        frame::Item::Replicate { reset, records } => {
            Ok(Received::Session(SessionTransfer::Replicate {
                reset,
                records,
            }))
        }
        frame::Item::ReplicaOffer {
            client_id,
            shard,
            claim,
            home,
            session,
        } => Ok(Received::Session(SessionTransfer::ReplicaOffer {
            client_id: ByteString::from(client_id),
            shard,
            claim,
            home,
            session: Bytes::from(session),
        })),
        frame::Item::Disown { client_id, home } => Ok(Received::Session(SessionTransfer::Disown {
            client_id: ByteString::from(client_id),
            home,
        })),
    }
}

fn publish_from_wire(
    m: frame::WireMessage,
    plain: bool,
    groups: Vec<(String, String)>,
    now_ms: u64,
) -> Result<Forwarded, String> {
    let qos = QoS::from_bits(m.qos).ok_or_else(|| format!("forwarded QoS {} is invalid", m.qos))?;
    // A peer's message is checked as a client's PUBLISH would be: it is stored retained and
    // delivered here, and quoted to clients.
    let string_ok = |text: &str| text.len() <= FIELD_LENGTH_MAX && !text.contains('\0');
    if !string_ok(&m.topic) {
        return Err("a forwarded topic is not a valid MQTT string".into());
    }
    topic::validate_name(&m.topic).map_err(|error| format!("a forwarded topic: {error}"))?;
    if let Some(response_topic) = &m.response_topic {
        if !string_ok(response_topic) {
            return Err("a forwarded response topic is not a valid MQTT string".into());
        }
        topic::validate_name(response_topic)
            .map_err(|error| format!("a forwarded response topic: {error}"))?;
    }
    let strings_ok = m
        .user_properties
        .iter()
        .all(|(key, value)| string_ok(key) && string_ok(value))
        && m.content_type.as_deref().is_none_or(string_ok)
        && m.publisher.as_deref().is_none_or(string_ok)
        && m.correlation_data
            .as_ref()
            .is_none_or(|d| d.len() <= FIELD_LENGTH_MAX);
    if !strings_ok {
        return Err("a forwarded message's property is not a valid MQTT field".into());
    }
    for (group, filter) in &groups {
        if !string_ok(group) || !string_ok(filter) || topic::validate_filter(filter).is_err() {
            return Err("a forwarded shared-group filter is invalid".into());
        }
    }
    Ok(Forwarded {
        message: Message {
            topic: ByteString::from(m.topic),
            payload: Bytes::from(m.payload),
            qos,
            retain: m.retain,
            properties: PublishProperties {
                payload_format_indicator: m.payload_format_indicator,
                response_topic: m.response_topic.map(ByteString::from),
                correlation_data: m.correlation_data.map(Bytes::from),
                user_properties: m
                    .user_properties
                    .into_iter()
                    .map(|(k, v)| (ByteString::from(k), ByteString::from(v)))
                    .collect(),
                content_type: m.content_type.map(ByteString::from),
                ..PublishProperties::default()
            },
            expires_at_ms: m.expiry_ms.map(|left| now_ms.saturating_add(left)),
            publisher: m.publisher.map(ByteString::from),
        },
        plain,
        groups: groups
            .into_iter()
            .map(|(g, f)| (ByteString::from(g), ByteString::from(f)))
            .collect(),
    })
}

/// What this shard sends to one other node.
#[derive(Debug, Default)]
pub struct Peer {
    pub address: Option<SocketAddr>,
    /// The data link, once connected (it may still be in its handshake).
    pub connection: Option<ConnectionId>,
    pub connecting: bool,
    pub retry_at_ms: u64,
    /// The numbering's epoch, sent in the data link's Hello.
    pub epoch: u64,
    /// Since when the node is missing from the member list.
    pub gone_since_ms: Option<u64>,
    /// The run of the node the last link reached (its Welcome's epoch).
    remote_epoch: Option<u64>,
    next_sequence: u64,
    /// QoS 1 and 2 messages sent or to send, not acknowledged yet.
    unacked: VecDeque<frame::Forwarded>,
    /// Messages not written to the link yet (QoS 0 ones live only here).
    unsent: Vec<frame::Forwarded>,
    pub dropped: u64,
}

impl Peer {
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            ..Self::default()
        }
    }

    /// Queues a message for the node; returns whether an old one had to make room.
    pub fn push(&mut self, forwarded: &Forwarded, now_ms: u64, queue_max: usize) -> bool {
        self.next_sequence += 1;
        let wire = to_wire(forwarded, self.next_sequence, now_ms);
        self.enqueue(wire, forwarded.message.qos != QoS::AtMostOnce, queue_max)
    }

    /// Queues a session transfer for the node, kept until acknowledged like a QoS 1 message.
    pub fn push_transfer(&mut self, transfer: &SessionTransfer, queue_max: usize) -> bool {
        self.next_sequence += 1;
        let wire = transfer_to_wire(transfer, self.next_sequence);
        self.enqueue(wire, true, queue_max)
    }

    /// A full queue drops its oldest published message, never a session claim or handover
    /// (a dropped handover would lose a session; there are few of them, so they may go past
    /// the limit).
    fn enqueue(&mut self, wire: frame::Forwarded, reliable: bool, queue_max: usize) -> bool {
        let is_publish = |w: &frame::Forwarded| matches!(w.item, frame::Item::Publish { .. });
        let mut dropped = false;
        if reliable {
            if self.unacked.len() >= queue_max
                && let Some(oldest) = self.unacked.iter().position(is_publish)
            {
                self.unacked.remove(oldest);
                self.dropped += 1;
                dropped = true;
            }
            self.unacked.push_back(wire.clone());
        }
        if self.unsent.len() >= queue_max
            && let Some(oldest) = self.unsent.iter().position(is_publish)
        {
            self.unsent.remove(oldest);
            if !dropped {
                self.dropped += 1;
                dropped = true;
            }
        }
        self.unsent.push(wire);
        dropped
    }

    /// Replication items sent or to send that the node has not acknowledged (0: its
    /// replicas of this shard's sessions are up to date).
    pub fn replication_unacknowledged(&self) -> u64 {
        // Every item but a QoS 0 message is in `unacked` from the moment it is queued.
        self.unacked
            .iter()
            .filter(|f| matches!(f.item, frame::Item::Replicate { .. }))
            .count() as u64
    }

    /// The body of everything not yet written, if any: the link cuts it into frames that
    /// fit ([`encode_cut`]).
    pub fn take_frame(&mut self) -> Option<Body> {
        (!self.unsent.is_empty()).then(|| Body::Forward {
            messages: std::mem::take(&mut self.unsent),
        })
    }

    /// The node's run is `epoch` (from the member list, or a new link's Welcome). If it
    /// restarted since the run this peer last knew, what waits was matched against the
    /// subscriptions of the previous run, which are gone: it is dropped, so that a new
    /// subscriber there never receives messages published before it subscribed. Returns how
    /// many were dropped.
    pub fn node_started(&mut self, epoch: u64) -> usize {
        // Epochs grow with the start time: an older one is stale news (a member list from a
        // core that has not caught up), not a restart.
        if self.remote_epoch.is_some_and(|known| epoch < known) {
            return 0;
        }
        let restarted = self.remote_epoch.is_some_and(|known| known != epoch);
        self.remote_epoch = Some(epoch);
        if !restarted {
            return 0;
        }
        // Session claims and handovers are about a client identifier, not a subscription of
        // the previous run: they go to the new run (which answers a claim, and keeps a
        // handed-over session whose claim it no longer has). Dropping a claim would leave the
        // claimant waiting out its timeout and then connecting beside another owner.
        let is_transfer = |f: &&frame::Forwarded| !matches!(f.item, frame::Item::Publish { .. });
        let mut kept: Vec<frame::Forwarded> =
            self.unacked.iter().filter(is_transfer).cloned().collect();
        for item in self.unsent.iter().filter(is_transfer) {
            if !kept.iter().any(|k| k.sequence == item.sequence) {
                kept.push(item.clone());
            }
        }
        kept.sort_by_key(|f| f.sequence);
        let stale: BTreeSet<u64> = self
            .unacked
            .iter()
            .chain(&self.unsent)
            .map(|f| f.sequence)
            .filter(|sequence| !kept.iter().any(|k| k.sequence == *sequence))
            .collect();
        self.unacked = kept.iter().cloned().collect();
        self.unsent = kept;
        stale.len()
    }

    /// A new link to the node's run `remote_epoch`: everything unacknowledged goes again, in
    /// order; QoS 0 messages that were written to the old link are gone with it (and
    /// everything, if the node restarted: [`Peer::node_started`]). Returns how many messages
    /// were dropped for a restart.
    pub fn relink(&mut self, remote_epoch: Option<u64>) -> usize {
        if let Some(epoch) = remote_epoch {
            let stale = self.node_started(epoch);
            if stale > 0 {
                return stale;
            }
        }
        let written_first = self.unsent.first().map(|f| f.sequence);
        let mut again: Vec<frame::Forwarded> = self
            .unacked
            .iter()
            .filter(|f| written_first.is_none_or(|first| f.sequence < first))
            .cloned()
            .collect();
        again.append(&mut self.unsent);
        self.unsent = again;
        0
    }

    /// The link now up speaks protocol `version`: items newer than that (session
    /// replication to a version 2 peer) are dropped from the queue, sent or not, and never
    /// resent; the peer would refuse the frame holding one and close the link, on every new
    /// link. They may have been queued while no link was up, or while this one was in its
    /// handshake (the version is known only once the peer has sent a frame). Returns how
    /// many were dropped.
    pub fn drop_unsupported(&mut self, version: u16) -> usize {
        let unknown = |f: &frame::Forwarded| f.item.version_min() > version;
        // A reliable item not yet written is in both queues: each is counted once.
        let dropped: BTreeSet<u64> = self
            .unacked
            .iter()
            .chain(&self.unsent)
            .filter(|f| unknown(f))
            .map(|f| f.sequence)
            .collect();
        if !dropped.is_empty() {
            self.unacked.retain(|f| !unknown(f));
            self.unsent.retain(|f| !unknown(f));
        }
        dropped.len()
    }

    pub fn acknowledged(&mut self, through: u64) {
        while self.unacked.front().is_some_and(|f| f.sequence <= through) {
            self.unacked.pop_front();
        }
    }

    /// Whether anything waits for a link.
    pub fn has_waiting(&self) -> bool {
        !self.unsent.is_empty() || !self.unacked.is_empty()
    }

    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// Messages waiting (to be sent, or sent and not acknowledged), each counted once, and
    /// their estimated encoded bytes. Walks the queue: for scrapes, not the message path.
    pub fn depth(&self) -> (u64, u64) {
        // A reliable message not yet sent is in both `unacked` and `unsent`.
        let unsent_only = self.unsent.iter().filter(|f| {
            self.unacked
                .binary_search_by_key(&f.sequence, |u| u.sequence)
                .is_err()
        });
        self.unacked
            .iter()
            .chain(unsent_only)
            .fold((0, 0), |(count, bytes), f| {
                (count + 1, bytes + f.len_bound() as u64)
            })
    }
}

/// The receiving side: the highest message number delivered per sending shard, and the
/// sender's epoch it counts in.
#[derive(Debug, Default)]
pub struct Delivered {
    through: BTreeMap<(NodeId, u16), (u64, u64)>,
}

impl Delivered {
    /// Whether message `sequence` from `(node, shard)` in `epoch` is new; records it if so.
    pub fn first_time(&mut self, node: NodeId, shard: u16, epoch: u64, sequence: u64) -> bool {
        let entry = self.through.entry((node, shard)).or_insert((epoch, 0));
        if entry.0 != epoch {
            debug!(
                node,
                shard, "the sending shard restarted: its numbering starts over"
            );
            *entry = (epoch, 0);
        }
        if sequence <= entry.1 {
            return false;
        }
        entry.1 = sequence;
        true
    }

    pub fn through(&self, node: NodeId, shard: u16) -> u64 {
        self.through.get(&(node, shard)).map_or(0, |&(_, t)| t)
    }

    /// Forgets a node that left the cluster.
    pub fn forget(&mut self, node: NodeId) {
        self.through.retain(|&(n, _), _| n != node);
    }
}

/// Logs a queue overflow once per many, so that a dead peer does not flood the log.
pub fn report_dropped(node: NodeId, peer: &Peer) {
    if peer.dropped.is_power_of_two() {
        warn!(
            node,
            dropped = peer.dropped,
            "forward queue to the node is full: oldest messages dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(qos: QoS, n: u8) -> Forwarded {
        Forwarded {
            message: Message {
                topic: ByteString::from("t"),
                payload: Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: PublishProperties {
                    user_properties: vec![(ByteString::from("k"), ByteString::from("v"))],
                    ..Default::default()
                },
                expires_at_ms: Some(10_000),
                publisher: Some(ByteString::from("p")),
            },
            plain: true,
            groups: vec![(ByteString::from("g"), ByteString::from("t"))],
        }
    }

    #[test]
    fn wire_round_trip_keeps_the_message_and_the_time_left() {
        let original = forwarded(QoS::ExactlyOnce, 1);
        let wire = to_wire(&original, 5, 4_000);
        let frame::Item::Publish { message, .. } = &wire.item else {
            panic!("a publish")
        };
        assert_eq!(message.expiry_ms, Some(6_000));
        let Received::Publish(back) = from_wire(wire, 100).unwrap() else {
            panic!("a publish")
        };
        assert_eq!(back.message.expires_at_ms, Some(6_100));
        assert_eq!(back.message.payload, original.message.payload);
        assert_eq!(back.message.properties, original.message.properties);
        assert_eq!(back.groups, original.groups);
        let mut bad = to_wire(&original, 1, 0);
        if let frame::Item::Publish { message, .. } = &mut bad.item {
            message.qos = 3;
        }
        assert!(from_wire(bad, 0).is_err());
        // Checked like a client's PUBLISH: no wildcard, no empty topic, valid strings.
        for topic in ["a/+/b", "#", "", "nul\0"] {
            let mut bad = to_wire(&original, 1, 0);
            if let frame::Item::Publish { message, .. } = &mut bad.item {
                message.topic = topic.into();
            }
            assert!(from_wire(bad, 0).is_err(), "{topic:?} refused");
        }
        let mut bad = to_wire(&original, 1, 0);
        if let frame::Item::Publish { message, .. } = &mut bad.item {
            message.user_properties = vec![("k".into(), "v".repeat(70_000))];
        }
        assert!(
            from_wire(bad, 0).is_err(),
            "a user property past 65,535 bytes"
        );
        // A peer's time left cannot overflow the clock: the message just never expires.
        let mut forever = to_wire(&original, 1, 0);
        if let frame::Item::Publish { message, .. } = &mut forever.item {
            message.expiry_ms = Some(u64::MAX);
        }
        let Ok(Received::Publish(back)) = from_wire(forever, 100) else {
            panic!("a publish")
        };
        assert_eq!(back.message.expires_at_ms, Some(u64::MAX));
        let handover = SessionTransfer::Handover {
            client_id: ByteString::from("c"),
            shard: 1,
            claim: 4,
            session: Some(Bytes::from_static(b"record")),
            completed: Some(3),
        };
        let Received::Session(back) = from_wire(transfer_to_wire(&handover, 2), 0).unwrap() else {
            panic!("a session transfer")
        };
        assert_eq!(back, handover);
    }

    #[test]
    fn unacknowledged_qos1_is_resent_on_a_new_link_and_qos0_is_not() {
        let mut peer = Peer::default();
        peer.push(&forwarded(QoS::AtLeastOnce, 1), 0, 100);
        peer.push(&forwarded(QoS::AtMostOnce, 2), 0, 100);
        peer.push(&forwarded(QoS::AtLeastOnce, 3), 0, 100);
        let Some(Body::Forward { messages }) = peer.take_frame() else {
            panic!("a frame")
        };
        assert_eq!(
            messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        peer.acknowledged(1);
        peer.push(&forwarded(QoS::AtLeastOnce, 4), 0, 100);
        assert_eq!(peer.relink(Some(7)), 0);
        let Some(Body::Forward { messages }) = peer.take_frame() else {
            panic!("a frame")
        };
        assert_eq!(
            messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
            [3, 4]
        );
        assert!(peer.take_frame().is_none());
        // The same run again: the unacknowledged messages go once more.
        assert_eq!(peer.relink(Some(7)), 0);
        assert!(peer.take_frame().is_some());
        // The node restarted: what was queued for its previous run is dropped.
        peer.push(&forwarded(QoS::AtLeastOnce, 5), 0, 100);
        assert_eq!(peer.relink(Some(8)), 3);
        assert!(peer.take_frame().is_none());
        assert!(!peer.has_waiting());
    }

    #[test]
    fn the_receiver_delivers_each_number_once_per_epoch() {
        let mut delivered = Delivered::default();
        assert!(delivered.first_time(1, 0, 7, 1));
        assert!(!delivered.first_time(1, 0, 7, 1));
        assert!(delivered.first_time(1, 0, 7, 2));
        assert!(delivered.first_time(1, 1, 7, 1));
        // The sender restarted: a new epoch counts from the start.
        assert!(delivered.first_time(1, 0, 8, 1));
        assert_eq!(delivered.through(1, 0), 1);
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let mut peer = Peer::default();
        for n in 0..5 {
            peer.push(&forwarded(QoS::AtLeastOnce, n), 0, 3);
        }
        assert_eq!(peer.unacked_count(), 3);
        assert_eq!(peer.dropped, 2);
    }

    /// A replication item queued while no link was up: a version 2 peer never gets it (it
    /// would refuse the frame and close the link, on every reconnect), a version 3 peer does.
    #[test]
    fn replication_items_queued_without_a_link_never_reach_an_older_peer() {
        let replicate = SessionTransfer::Replicate {
            reset: false,
            records: Bytes::from_static(b"records"),
        };
        let kinds = |body: Option<Body>| -> Vec<(u64, bool)> {
            let Some(Body::Forward { messages }) = body else {
                return Vec::new();
            };
            messages
                .iter()
                .map(|m| (m.sequence, matches!(m.item, frame::Item::Replicate { .. })))
                .collect()
        };
        for version in [2, 3] {
            let mut peer = Peer::default();
            peer.push(&forwarded(QoS::AtLeastOnce, 1), 0, 100);
            peer.push_transfer(&replicate, 100);
            // Written to a link that closed before the acknowledgement: both wait in
            // `unacked` for the next link.
            assert_eq!(kinds(peer.take_frame()), [(1, false), (2, true)]);
            peer.push_transfer(&replicate, 100);
            assert_eq!(peer.replication_unacknowledged(), 2);
            // The next link is up.
            assert_eq!(peer.relink(None), 0);
            let dropped = peer.drop_unsupported(version);
            let sent = kinds(peer.take_frame());
            if version == 2 {
                assert_eq!(dropped, 2, "each replication item counted once");
                assert_eq!(sent, [(1, false)], "only the message goes");
                assert_eq!(peer.replication_unacknowledged(), 0);
                // And never again, on any later link.
                assert_eq!(peer.relink(None), 0);
                assert_eq!(peer.drop_unsupported(version), 0);
                assert_eq!(kinds(peer.take_frame()), [(1, false)]);
            } else {
                assert_eq!(dropped, 0);
                assert_eq!(sent, [(1, false), (2, true), (3, true)]);
                assert_eq!(peer.replication_unacknowledged(), 2);
            }
        }
    }

    #[test]
    fn a_full_queue_keeps_session_transfers() {
        let mut peer = Peer::default();
        let claim = SessionTransfer::Claim {
            client_id: ByteString::from("c"),
            shard: 0,
            claim: 1,
            clean_start: false,
            after: None,
        };
        peer.push_transfer(&claim, 2);
        for n in 0..4 {
            peer.push(&forwarded(QoS::AtLeastOnce, n), 0, 2);
        }
        let Some(Body::Forward { messages }) = peer.take_frame() else {
            panic!("a frame");
        };
        assert!(
            matches!(messages[0].item, frame::Item::Claim { .. }),
            "the claim survives: {messages:?}"
        );
        assert_eq!(messages.len(), 2);
        assert_eq!(peer.unacked_count(), 2);
        assert_eq!(peer.dropped, 3);
    }

    fn large(n: u8, payload_len: usize) -> Forwarded {
        let mut message = forwarded(QoS::AtLeastOnce, n);
        message.message.payload = Bytes::from(vec![n; payload_len]);
        message
    }

    /// Decodes a link's bytes with the peer's limit: every frame must be within it.
    fn frames_within(bytes: &[u8], body_len_max: usize) -> Vec<Vec<frame::Forwarded>> {
        let mut decoder = frame::Decoder::new(9, body_len_max);
        decoder.extend(bytes);
        let mut frames = Vec::new();
        while let Some(body) = decoder
            .next_frame()
            .expect("every frame is within the limit")
        {
            let Body::Forward { messages } = body else {
                panic!("a Forward frame")
            };
            frames.push(messages);
        }
        frames
    }

    #[test]
    fn a_backlog_longer_than_a_frame_goes_as_several_frames_each_within_the_limit() {
        let body_len_max = 64 * 1024;
        let mut peer = Peer::default();
        // 40 messages of 5 KiB: about 200 KiB, three times the limit.
        for n in 0..40 {
            peer.push(&large(n, 5 * 1024), 0, 1_000);
        }
        let body = peer.take_frame().expect("a backlog");
        let mut bytes = BytesMut::new();
        let cut = encode_cut(&body, 9, body_len_max, &mut bytes).unwrap();
        let frames = frames_within(&bytes, body_len_max);
        assert!(frames.len() >= 4, "{} frames", frames.len());
        assert_eq!(
            cut,
            Cut {
                frames: frames.len(),
                dropped: 0
            },
            "the cut counts the frames it wrote"
        );
        // The receiver takes each, in order, and acknowledges how far it got.
        let mut delivered = Delivered::default();
        let mut taken = Vec::new();
        for messages in frames {
            for item in messages {
                if delivered.first_time(2, 0, 1, item.sequence) {
                    taken.push(item.sequence);
                }
            }
            peer.acknowledged(delivered.through(2, 0));
        }
        assert_eq!(taken, (1..=40).collect::<Vec<u64>>(), "none lost or twice");
        assert!(!peer.has_waiting(), "all acknowledged");

        // A new link before the acknowledgement: the whole backlog goes again, cut the same
        // way, and the receiver takes none of it twice.
        for n in 40..80 {
            peer.push(&large(n, 5 * 1024), 0, 1_000);
        }
        let _lost_with_the_link = peer.take_frame();
        assert_eq!(peer.relink(None), 0);
        let mut bytes = BytesMut::new();
        encode_cut(&peer.take_frame().unwrap(), 9, body_len_max, &mut bytes).unwrap();
        let resent: Vec<u64> = frames_within(&bytes, body_len_max)
            .into_iter()
            .flatten()
            .map(|item| item.sequence)
            .collect();
        assert_eq!(resent, (41..=80).collect::<Vec<u64>>());
        for &sequence in &resent {
            assert!(delivered.first_time(2, 0, 1, sequence));
        }
        peer.acknowledged(delivered.through(2, 0));
        assert!(!peer.has_waiting());
    }

    #[test]
    fn an_item_longer_than_any_frame_is_dropped_and_the_rest_goes() {
        let body_len_max = 8 * 1024;
        let mut peer = Peer::default();
        peer.push(&large(1, 100), 0, 100);
        peer.push(&large(2, 20 * 1024), 0, 100);
        peer.push(&large(3, 100), 0, 100);
        let mut bytes = BytesMut::new();
        let body = peer.take_frame().unwrap();
        assert_eq!(
            encode_cut(&body, 9, body_len_max, &mut bytes).map(|c| c.dropped),
            Ok(1)
        );
        let sent: Vec<u64> = frames_within(&bytes, body_len_max)
            .into_iter()
            .flatten()
            .map(|item| item.sequence)
            .collect();
        assert_eq!(sent, [1, 3]);
        // Other bodies are never cut: one above the limit is refused, nothing written.
        let mut out = BytesMut::new();
        let long = Body::Raft {
            message: vec![0; body_len_max + 1],
        };
        assert!(encode_cut(&long, 9, body_len_max, &mut out).is_err());
        assert!(out.is_empty());
    }
}
