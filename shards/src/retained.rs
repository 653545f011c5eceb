//! The retained messages of the node: topic -> last retained message. Every shard keeps the
//! whole set (the payloads are shared buffers), so a subscribe reads it without asking another
//! shard.
//!
//! Matching a wildcard filter scans every retained topic; an exact filter is one lookup.
//!
//! The messages are kept in topic order (a B-tree), so that what reaches a client or a snapshot
//! comes in the same order in every process, and no hash that chosen topics could flood.

use bytestring::ByteString;
use std::collections::BTreeMap;

use shardmq_net::mqtt::topic;

use crate::message::Message;

#[derive(Debug, Default)]
pub struct Retained {
    messages: BTreeMap<ByteString, Message>,
}

impl Retained {
    /// Stores the message, or with an empty payload removes the topic's retained message
    /// [MQTT-3.3.1-6].
    pub fn store(&mut self, message: Message) {
        if message.payload.is_empty() {
            self.messages.remove(&message.topic);
        } else {
            self.messages.insert(message.topic.clone(), message);
        }
    }

    /// Every retained message, by topic.
    pub fn iter(&self) -> impl Iterator<Item = &Message> {
        self.messages.values()
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
