//! The retained messages of the node: topic -> last retained message. Every shard keeps the
//! whole set (the payloads are shared buffers), so a subscribe reads it without asking another
//! shard.
//!
//! Matching a wildcard filter scans every retained topic; an exact filter is one lookup.
//!
//! The messages are kept in topic order (a B-tree), so that what reaches a client or a snapshot
//! comes in the same order in every process, and no hash that chosen topics could flood.
//!
//! Invariants: at most `count_max` topics and `bytes_max` bytes (topic, payload and
//! variable-length properties of each message, [`stored_size`]) are held; `bytes` is the sum of the stored sizes. A message for a
//! topic already held replaces it if the store stays within `bytes_max`; a new topic past
//! either limit is refused (the caller counts the drop).
//!
//! Whoever brings a message from outside into the store (the shard that routes it, a snapshot
//! load) first gives it buffers of its own with [`own_buffers`], once per node (the shards then
//! share them): a small retained message must not pin the large receive buffer or snapshot
//! file it arrived in.

use bytes::Bytes;
use bytestring::ByteString;
use std::collections::BTreeMap;

use shardmq_net::mqtt::{PublishProperties, topic};

use crate::message::Message;

#[derive(Debug)]
pub struct Retained {
    messages: BTreeMap<ByteString, Message>,
    /// The sum of `stored_size` over `messages`.
    bytes: usize,
    /// How many of `messages`, and of `bytes`, are the broker's own `$SYS/` topics: a fixed
    /// set the broker publishes, outside the clients' limits (so that `$SYS` never takes a
    /// client's room, nor is refused for lack of it).
    sys_count: usize,
    sys_bytes: usize,
    count_max: usize,
    bytes_max: usize,
    /// Retained messages refused at the limits since the start (logged at powers of two).
    refused_count: u64,
}

impl Default for Retained {
    fn default() -> Self {
        let limits = crate::limits::Limits::default();
        Self::new(limits.retained_messages_max, limits.retained_bytes_max)
    }
}

/// What `store` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The message is now the topic's retained message.
    Kept,
    /// The topic's retained message (if any) is gone: an empty payload [MQTT-3.3.1-6].
    Removed,
    /// The store is at its limit of topics or bytes: nothing changed.
    Refused,
}

/// The bytes a retained message counts against `bytes_max`: its topic, its payload and every
/// variable-length property (user properties, correlation data, response topic, content
/// type, with a few bytes of overhead each), so that a message of one payload byte and a
/// megabyte of user properties counts as the megabyte it holds.
pub fn stored_size(topic: &str, payload: &[u8], properties: &PublishProperties) -> usize {
    const FIELD_OVERHEAD: usize = 4;
    let field = |length: usize| length.saturating_add(FIELD_OVERHEAD);
    let optional = |value: Option<usize>| value.map_or(0, field);
    let user: usize = properties
        .user_properties
        .iter()
        .map(|(key, value)| field(key.len()).saturating_add(field(value.len())))
        .fold(0, usize::saturating_add);
    topic
        .len()
        .saturating_add(payload.len())
        .saturating_add(optional(
            properties.response_topic.as_ref().map(|t| t.len()),
        ))
        .saturating_add(optional(
            properties.correlation_data.as_ref().map(|d| d.len()),
        ))
        .saturating_add(optional(properties.content_type.as_ref().map(|t| t.len())))
        .saturating_add(user)
}

fn message_size(message: &Message) -> usize {
    stored_size(&message.topic, &message.payload, &message.properties)
}

impl Retained {
    /// An empty store holding at most `count_max` topics and `bytes_max` bytes.
    pub fn new(count_max: usize, bytes_max: usize) -> Self {
        Self {
            messages: BTreeMap::new(),
            bytes: 0,
            sys_count: 0,
            sys_bytes: 0,
            count_max,
            bytes_max,
            refused_count: 0,
        }
    }

    /// Whether `store` would keep (or remove) a message of this topic and payload now.
    pub fn admits(&self, topic: &str, payload: &[u8], properties: &PublishProperties) -> bool {
        if payload.is_empty() || crate::shard::is_sys_topic(topic) {
            return true;
        }
        let held = self.messages.get(topic).map(message_size);
        if held.is_none() && self.messages.len() - self.sys_count >= self.count_max {
            return false;
        }
        let after = (self.bytes - self.sys_bytes - held.unwrap_or(0))
            .saturating_add(stored_size(topic, payload, properties));
        after <= self.bytes_max
    }

    /// Stores the message, or with an empty payload removes the topic's retained message
    /// [MQTT-3.3.1-6]; refuses a message past the limits.
    pub fn store(&mut self, message: Message) -> Stored {
        if message.payload.is_empty() {
            if let Some(old) = self.messages.remove(&message.topic) {
                self.forget(&old);
            }
            return Stored::Removed;
        }
        if !self.admits(&message.topic, &message.payload, &message.properties) {
            self.count_refusal();
            return Stored::Refused;
        }
        let size = message_size(&message);
        self.bytes += size;
        if crate::shard::is_sys_topic(&message.topic) {
            self.sys_count += 1;
            self.sys_bytes += size;
        }
        if let Some(old) = self.messages.insert(message.topic.clone(), message) {
            self.forget(&old);
        }
        Stored::Kept
    }

    /// Takes a message that left the store out of the counts.
    fn forget(&mut self, old: &Message) {
        let size = message_size(old);
        self.bytes -= size;
        if crate::shard::is_sys_topic(&old.topic) {
            self.sys_count -= 1;
            self.sys_bytes -= size;
        }
    }

    /// Counts a retained message refused at the limits (by `store`, or by a caller that
    /// asked `admits` first), logged at powers of two of the count.
    pub fn count_refusal(&mut self) {
        self.refused_count += 1;
        if self.refused_count.is_power_of_two() {
            tracing::warn!(
                refused = self.refused_count,
                count_max = self.count_max,
                bytes_max = self.bytes_max,
                "retained store full: retained messages for new topics refused"
            );
        }
    }

    pub fn refused_count(&self) -> u64 {
        self.refused_count
    }

    /// Every retained message, by topic.
    pub fn iter(&self) -> impl Iterator<Item = &Message> {
        self.messages.values()
    }

    /// The retained message of exactly `topic`, expired or not.
    pub fn get(&self, topic: &str) -> Option<&Message> {
        self.messages.get(topic)
    }

    /// The retained messages whose topic starts with `prefix`, by topic: one range of the
    /// B-tree, however many topics there are.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Message> + 'a {
        self.messages
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, message)| message)
            .take_while(move |message| message.topic.starts_with(prefix))
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The bytes held ([`stored_size`] of every message).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Checks the byte count against the messages and the limits; panics naming the rule.
    pub fn check_invariants(&self) {
        let bytes: usize = self.messages.values().map(message_size).sum();
        assert_eq!(
            bytes, self.bytes,
            "the retained byte count is the sum of the messages"
        );
        let sys: Vec<&Message> = self
            .messages
            .values()
            .filter(|message| crate::shard::is_sys_topic(&message.topic))
            .collect();
        assert_eq!(
            sys.len(),
            self.sys_count,
            "the $SYS count is the $SYS messages"
        );
        assert_eq!(
            sys.iter()
                .map(|message| message_size(message))
                .sum::<usize>(),
            self.sys_bytes,
            "the $SYS bytes are the $SYS messages' sizes"
        );
        assert!(
            self.messages.len() - self.sys_count <= self.count_max
                && self.bytes - self.sys_bytes <= self.bytes_max,
            "the clients' retained messages stay within the limits"
        );
        assert!(
            self.messages
                .iter()
                .all(|(topic, message)| *topic == message.topic),
            "each retained message is stored under its topic"
        );
    }

    /// The unexpired retained messages whose topic `filter` matches, by topic; for a shared
    /// filter, none.
    pub fn matching<'a>(
        &'a self,
        filter: &'a str,
        now_ms: u64,
    ) -> impl Iterator<Item = &'a Message> + 'a {
        let exact = (!topic::has_wildcard(filter))
            .then(|| self.messages.get(filter))
            .flatten();
        let scan = topic::has_wildcard(filter)
            .then(|| self.messages.values())
            .into_iter()
            .flatten();
        exact
            .into_iter()
            .chain(scan.filter(move |message| topic::matches(filter, &message.topic)))
            .filter(move |message| !message.is_expired(now_ms))
    }
}

/// Copies the message's topic, payload and properties into buffers of their own. A decoded
/// message's buffers are slices of the buffer its packet arrived in; a message kept long (a
/// retained message, a will) would keep that whole buffer alive.
pub fn own_buffers(message: &mut Message) {
    let copy = |text: &ByteString| ByteString::from(&**text);
    message.topic = copy(&message.topic);
    message.payload = Bytes::copy_from_slice(&message.payload);
    message.publisher = message.publisher.as_ref().map(copy);
    let properties = &mut message.properties;
    properties.response_topic = properties.response_topic.as_ref().map(copy);
    properties.content_type = properties.content_type.as_ref().map(copy);
    properties.correlation_data = properties
        .correlation_data
        .as_ref()
        .map(|data| Bytes::copy_from_slice(data));
    for (key, value) in &mut properties.user_properties {
        *key = copy(key);
        *value = copy(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_net::mqtt::{PublishProperties, QoS};

    fn message(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: ByteString::from(topic),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            expires_at_ms: None,
            publisher: None,
        }
    }

    #[test]
    fn sys_topics_take_no_room_of_the_clients() {
        let mut store = Retained::new(1, 64);
        assert_eq!(
            store.store(message("$SYS/broker/uptime", b"1 seconds")),
            Stored::Kept
        );
        assert_eq!(
            store.store(message("$SYS/broker/version", &[b'v'; 100])),
            Stored::Kept
        );
        assert_eq!(store.store(message("client/a", b"v")), Stored::Kept);
        assert_eq!(store.store(message("client/b", b"v")), Stored::Refused);
        assert_eq!(
            store.store(message("$SYS/broker/uptime", b"2 seconds")),
            Stored::Kept
        );
        assert_eq!(
            store.store(message("$SYS/broker/version", b"")),
            Stored::Removed
        );
        store.check_invariants();
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn a_new_topic_past_the_count_limit_is_refused_and_a_held_one_replaced() {
        let mut retained = Retained::new(2, 1000);
        assert_eq!(retained.store(message("a", b"1")), Stored::Kept);
        assert_eq!(retained.store(message("b", b"1")), Stored::Kept);
        assert_eq!(retained.store(message("c", b"1")), Stored::Refused);
        assert_eq!(retained.store(message("a", b"22")), Stored::Kept);
        assert_eq!(retained.bytes(), 2 + 3);
        assert_eq!(retained.store(message("a", b"")), Stored::Removed);
        assert_eq!(retained.store(message("c", b"1")), Stored::Kept);
        retained.check_invariants();
    }

    #[test]
    fn the_byte_limit_counts_topic_and_payload_and_allows_a_smaller_replacement() {
        let mut retained = Retained::new(100, 10);
        assert_eq!(retained.store(message("t", &[1; 9])), Stored::Kept);
        assert_eq!(retained.store(message("u", b"1")), Stored::Refused);
        assert_eq!(retained.store(message("t", &[1; 10])), Stored::Refused);
        assert_eq!(retained.store(message("t", b"1")), Stored::Kept);
        assert_eq!(retained.store(message("u", b"1")), Stored::Kept);
        assert_eq!(retained.bytes(), 4);
        retained.check_invariants();
    }

    #[test]
    fn the_byte_limit_counts_user_properties_and_other_variable_properties() {
        let mut retained = Retained::new(100, 1_000);
        let mut heavy = message("t", b"1");
        heavy.properties.user_properties =
            vec![(ByteString::from("k"), ByteString::from("v".repeat(2_000)))];
        assert_eq!(retained.store(heavy), Stored::Refused, "2 KB of properties");
        let mut light = message("t", b"1");
        light.properties.correlation_data = Some(Bytes::from_static(&[0; 100]));
        assert_eq!(retained.store(light), Stored::Kept);
        assert_eq!(retained.bytes(), 1 + 1 + 100 + 4);
        retained.check_invariants();
    }

    #[test]
    fn own_buffers_copies_out_of_the_receive_buffer() {
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut small = message("t", b"");
        small.payload = big.slice(0..4);
        small.properties.correlation_data = Some(big.slice(4..8));
        own_buffers(&mut small);
        // A slice of `big` would point into its allocation.
        let inside = |at: *const u8| {
            let start = big.as_ptr() as usize;
            (start..start + big.len()).contains(&(at as usize))
        };
        assert!(!inside(small.payload.as_ptr()), "the payload is a copy");
        let data = small.properties.correlation_data.as_ref().unwrap();
        assert!(!inside(data.as_ptr()), "the correlation data is a copy");
        assert_eq!(&small.payload[..], b"xxxx");
    }
}
