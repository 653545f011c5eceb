//! Per-client traces: which client identifiers an operator traces, and the records a shard
//! emits for them (every packet in and out, connects and closes).
//!
//! Owns: the shard's set of traced client identifiers (replaced whole by
//! [`Shard::set_traced`], from the admin API through the shard's mailbox) and each traced
//! connection's mark (`Connection::trace`, the client identifier it is traced under).
//! Records are `tracing` events of the target [`TRACE_TARGET`] at info level, one line of
//! text each in the field `record`; the node's trace layer (`src/trace.rs`) writes them to
//! the trace's file off the shard thread.
//! Never: does I/O, reads a clock, or costs anything but one `Option` check per packet when
//! the connection is not traced; never quotes more than [`PAYLOAD_QUOTE_BYTES_MAX`] bytes of
//! a payload or [`crate::limits::QUOTE_BYTES_MAX`] of a topic or identifier, and escapes
//! everything but printable ASCII so that a record is one line whatever the client sends.
//! Invariants: a connection is marked exactly while it is bound (or being bound, from its
//! CONNECT) to a client identifier in the traced set; the set holds at most what the admin
//! API allows (`admin.traces_max`).

use std::fmt::Write as _;

use super::*;

/// The `tracing` target of trace records: the node routes it to the trace files only.
pub const TRACE_TARGET: &str = "shardmq::trace";

/// The most payload bytes a record quotes (escaped); the length is always given.
pub const PAYLOAD_QUOTE_BYTES_MAX: usize = 32;

/// The most filters or reason codes a record lists; the rest are counted (`… N more`).
pub const LIST_ITEMS_MAX: usize = 16;

/// The longest record text, in bytes (plus a closing ` …` when cut), whatever the packet.
pub const RECORD_BYTES_MAX: usize = 4096;

/// The direction or kind of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// A packet from the client.
    In,
    /// A packet to the client.
    Out,
    /// Something that happened to the connection (connected, closed, trace started).
    Event,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Event => "event",
        }
    }
}

/// Emits one trace record for `client_id`.
pub(super) fn record(
    client_id: &str,
    node: NodeId,
    address: Option<std::net::SocketAddr>,
    direction: Direction,
    text: &str,
) {
    let text = capped_str(text);
    tracing::info!(
        target: TRACE_TARGET,
        client_id,
        node,
        address = ?address,
        direction = direction.name(),
        record = &*text,
    );
}

/// A packet as one line: its type, then its identifier, topic, QoS, flags, reason codes and
/// size as it has them; a payload as its length and its first bytes, escaped.
pub(super) fn describe(packet: &Packet, size_bytes: usize) -> String {
    let mut line = String::with_capacity(96);
    line.push_str(packet.name());
    let _ = write!(line, " size={size_bytes}");
    match packet {
        Packet::Connect(connect) => return describe_connect(connect, size_bytes),
        Packet::ConnAck(connack) => {
            let _ = write!(
                line,
                " session_present={} reason={}",
                u8::from(connack.session_present),
                reason(connack.reason),
            );
        }
        Packet::Publish(publish) => {
            let _ = write!(
                line,
                " id={} topic={} qos={} dup={} retain={}",
                publish.packet_id,
                escaped(&publish.topic),
                publish.qos as u8,
                u8::from(publish.dup),
                u8::from(publish.retain),
            );
            if let Some(alias) = publish.properties.topic_alias {
                let _ = write!(line, " topic_alias={alias}");
            }
            let _ = write!(line, " payload={}", payload(&publish.payload));
        }
        Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubRel(ack) | Packet::PubComp(ack) => {
            let _ = write!(line, " id={} reason={}", ack.packet_id, reason(ack.reason));
        }
        Packet::Subscribe(subscribe) => {
            let _ = write!(line, " id={} filters=", subscribe.packet_id);
            listed(&mut line, &subscribe.filters, |line, (filter, options)| {
                let _ = write!(
                    line,
                    "{} qos={} no_local={} retain_as_published={} retain_handling={:?}",
                    escaped(filter),
                    options.qos as u8,
                    u8::from(options.no_local),
                    u8::from(options.retain_as_published),
                    options.retain_handling,
                );
            });
        }
        Packet::SubAck(ack) => {
            let _ = write!(line, " id={} reasons=", ack.packet_id);
            listed(&mut line, &ack.reasons, |line, code| {
                line.push_str(&reason(*code))
            });
        }
        Packet::Unsubscribe(unsubscribe) => {
            let _ = write!(line, " id={} filters=", unsubscribe.packet_id);
            listed(&mut line, &unsubscribe.filters, |line, filter| {
                line.push_str(&escaped(filter));
            });
        }
        Packet::UnsubAck(ack) => {
            let _ = write!(line, " id={} reasons=", ack.packet_id);
            listed(&mut line, &ack.reasons, |line, code| {
                line.push_str(&reason(*code))
            });
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(disconnect) => {
            let _ = write!(line, " reason={}", reason(disconnect.reason));
            if let Some(why) = &disconnect.properties.reason_string {
                let _ = write!(line, " reason_string={}", escaped(why));
            }
        }
        Packet::Auth(auth) => {
            let _ = write!(line, " reason={}", reason(auth.reason));
        }
    }
    capped(line)
}

/// A CONNECT as one line (the password only as present or not).
pub(super) fn describe_connect(connect: &Connect, size_bytes: usize) -> String {
    let mut line = format!("CONNECT size={size_bytes}");
    let _ = write!(
        line,
        " protocol={:?} client_id={} clean_start={} keep_alive={} username={} password={} will={}",
        connect.protocol,
        escaped(&connect.client_id),
        u8::from(connect.clean_start),
        connect.keep_alive_seconds,
        u8::from(connect.username.is_some()),
        u8::from(connect.password.is_some()),
        u8::from(connect.will.is_some()),
    );
    if let Some(will) = &connect.will {
        let _ = write!(
            line,
            " will_topic={} will_qos={} will_retain={} will_payload={}",
            escaped(&will.topic),
            will.qos as u8,
            u8::from(will.retain),
            payload(&will.payload),
        );
    }
    capped(line)
}

fn reason(code: ReasonCode) -> String {
    format!("0x{:02x}", code.0)
}

/// `[a, b, ...]` of at most [`LIST_ITEMS_MAX`] items, then how many more there were:
/// a SUBSCRIBE of 260 000 filters is 16 of them and `… 259984 more`.
fn listed<T>(line: &mut String, items: &[T], mut item: impl FnMut(&mut String, &T)) {
    line.push('[');
    for (position, one) in items.iter().take(LIST_ITEMS_MAX).enumerate() {
        if position > 0 {
            line.push_str(", ");
        }
        item(line, one);
    }
    if let Some(more) = items
        .len()
        .checked_sub(LIST_ITEMS_MAX)
        .filter(|&more| more > 0)
    {
        let _ = write!(line, ", \u{2026} {more} more");
    }
    line.push(']');
}

/// Where a record longer than [`RECORD_BYTES_MAX`] is cut: the last character boundary at
/// or before it (None when the text fits).
fn cut_at(text: &str) -> Option<usize> {
    if text.len() <= RECORD_BYTES_MAX {
        return None;
    }
    (0..=RECORD_BYTES_MAX)
        .rev()
        .find(|&end| text.is_char_boundary(end))
}

/// A record cut to at most [`RECORD_BYTES_MAX`] bytes, on a character boundary, marked ` …`.
fn capped(mut line: String) -> String {
    if let Some(end) = cut_at(&line) {
        line.truncate(end);
        line.push_str(CUT_MARK);
    }
    line
}

/// [`capped`] for text the record does not own (an event's words).
fn capped_str(text: &str) -> std::borrow::Cow<'_, str> {
    match cut_at(text).and_then(|end| text.get(..end)) {
        Some(kept) => std::borrow::Cow::Owned(format!("{kept}{CUT_MARK}")),
        None => std::borrow::Cow::Borrowed(text),
    }
}

/// The end of a record that was cut.
const CUT_MARK: &str = " \u{2026}";

/// Peer text in quotes, at most `QUOTE_BYTES_MAX` bytes of it, everything but printable
/// ASCII escaped (a newline or a NUL in a topic stays on the record's line).
pub(super) fn escaped(text: &str) -> String {
    // Cut here rather than by `limits::quote`, which escapes control characters its own way
    // (they would be escaped twice).
    let mut end = text.len().min(crate::limits::QUOTE_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let (shown, cut) = text.split_at(end);
    let mut out = String::with_capacity(shown.len() + 5);
    out.push('"');
    escape_bytes(shown.as_bytes(), &mut out);
    if !cut.is_empty() {
        out.push_str("...");
    }
    out.push('"');
    out
}

/// A payload's length and its first bytes, escaped: `5:"hello"`, `40:"0123..."...`.
fn payload(bytes: &[u8]) -> String {
    let shown = bytes.get(..PAYLOAD_QUOTE_BYTES_MAX).unwrap_or(bytes);
    let mut out = format!("{}:\"", bytes.len());
    escape_bytes(shown, &mut out);
    out.push('"');
    if shown.len() < bytes.len() {
        out.push_str("...");
    }
    out
}

fn escape_bytes(bytes: &[u8], out: &mut String) {
    for &byte in bytes {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(byte));
            }
            0x20..=0x7e => out.push(char::from(byte)),
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
        }
    }
}

impl Shard {
    /// The client identifiers to trace, replacing the set before: open connections of those
    /// clients are marked (and traced from now on), connections of clients no longer in it
    /// are unmarked.
    pub fn set_traced(&mut self, client_ids: Vec<ByteString>) {
        self.traced = client_ids.into_iter().collect();
        let node = self.config.node;
        for connection in self.connections.values_mut() {
            let session = connection
                .session
                .and_then(|index| self.sessions.get(index as usize))
                .and_then(Option::as_ref);
            let Some(session) = session else {
                // Its CONNECT is being checked: unmarked if its client is no longer traced;
                // `accept` marks it (or not) again when its session is bound.
                if connection
                    .trace
                    .as_ref()
                    .is_some_and(|client_id| !self.traced.contains(client_id))
                {
                    connection.trace = None;
                }
                continue;
            };
            let wanted = self.traced.contains(&session.client_id);
            match (&connection.trace, wanted) {
                (None, true) => {
                    connection.trace = Some(session.client_id.clone());
                    record(
                        &session.client_id,
                        node,
                        connection.transport.peer,
                        Direction::Event,
                        "trace started on the open connection",
                    );
                }
                (Some(_), false) => connection.trace = None,
                _ => {}
            }
        }
    }

    /// A session is bound to the connection: it is marked exactly when its client is traced
    /// (the set may have changed while its CONNECT was checked).
    pub(super) fn mark_traced(&mut self, connection_id: ConnectionId, client_id: &ByteString) {
        let wanted = self.is_traced(client_id);
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            connection.trace = wanted.then(|| client_id.clone());
        }
    }

    /// The trace invariant: an open connection with a session is marked exactly when its
    /// client is in the traced set, under its client identifier.
    pub(super) fn check_traces(&self) {
        for (id, connection) in &self.connections {
            let Some(index) = connection.session else {
                continue;
            };
            let client_id = &self.session(index).client_id;
            let expected = self.traced.contains(client_id).then_some(client_id);
            assert_eq!(
                connection.trace.as_ref(),
                expected,
                "connection {id} is marked for tracing wrongly"
            );
        }
    }

    /// Whether CONNECTs of `client_id` are traced: one check of an empty set when no trace
    /// runs.
    pub(super) fn is_traced(&self, client_id: &str) -> bool {
        !self.traced.is_empty() && self.traced.contains(client_id)
    }

    /// Marks the connection as traced under `client_id` and records its CONNECT.
    pub(super) fn trace_connect(
        &mut self,
        connection_id: ConnectionId,
        client_id: &ByteString,
        connect: &Connect,
        size_bytes: usize,
    ) {
        let node = self.config.node;
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            connection.trace = Some(client_id.clone());
            record(
                client_id,
                node,
                connection.transport.peer,
                Direction::In,
                &describe_connect(connect, size_bytes),
            );
        }
    }

    /// Records an event of a traced connection (nothing for one that is not traced).
    pub(super) fn trace_event(&self, connection_id: ConnectionId, what: std::fmt::Arguments<'_>) {
        if let Some(connection) = self.connections.get(&connection_id)
            && let Some(client_id) = &connection.trace
        {
            record(
                client_id,
                self.config.node,
                connection.transport.peer,
                Direction::Event,
                &what.to_string(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_stays_on_one_line_and_is_capped() {
        assert_eq!(escaped("a/b"), "\"a/b\"");
        assert_eq!(escaped("a\nb\0\"\\"), "\"a\\x0ab\\x00\\\"\\\\\"");
        assert_eq!(payload(b"hi\xff"), "3:\"hi\\xff\"");
        let long_topic = "t".repeat(100);
        assert_eq!(
            escaped(&long_topic),
            format!("\"{}...\"", "t".repeat(crate::limits::QUOTE_BYTES_MAX))
        );
        let long = vec![b'x'; 100];
        assert_eq!(
            payload(&long),
            format!("100:\"{}\"...", "x".repeat(PAYLOAD_QUOTE_BYTES_MAX))
        );
    }

    #[test]
    fn a_huge_subscribe_or_suback_is_listed_in_part_and_capped() {
        let options = SubscriptionOptions::new(QoS::AtMostOnce);
        let filters: Vec<(ByteString, SubscriptionOptions)> = (0..260_000)
            .map(|n| (ByteString::from(format!("f/{n}")), options))
            .collect();
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: 3,
            filters,
            properties: Default::default(),
        });
        let line = describe(&subscribe, 1 << 20);
        assert!(
            line.len() <= RECORD_BYTES_MAX + CUT_MARK.len(),
            "{}",
            line.len()
        );
        assert!(line.contains("\"f/15\""), "{line}");
        assert!(!line.contains("\"f/16\""), "{line}");
        assert!(line.ends_with(", \u{2026} 259984 more]"), "{line}");
        let suback = Packet::SubAck(SubAck {
            packet_id: 3,
            reasons: vec![ReasonCode(0); 20],
            properties: Default::default(),
        });
        let line = describe(&suback, 30);
        assert_eq!(line.matches("0x00").count(), LIST_ITEMS_MAX, "{line}");
        assert!(line.ends_with(", \u{2026} 4 more]"), "{line}");
        // Sixteen filters of escaped bytes pass 4 KiB: cut on a character boundary.
        let wide = ByteString::from("\u{e9}\n".repeat(40));
        let unsubscribe = Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec![wide; 40],
            properties: Default::default(),
        });
        let line = describe(&unsubscribe, 1 << 16);
        assert!(
            line.len() <= RECORD_BYTES_MAX + CUT_MARK.len(),
            "{}",
            line.len()
        );
        assert!(line.ends_with(CUT_MARK), "{line}");
        let event = "\u{e9}".repeat(RECORD_BYTES_MAX);
        let cut = capped_str(&event);
        assert!(cut.len() <= RECORD_BYTES_MAX + CUT_MARK.len());
        assert!(cut.starts_with('\u{e9}') && cut.ends_with(CUT_MARK));
        assert_eq!(capped_str("short"), "short");
    }

    #[test]
    fn a_publish_is_described_with_its_fields() {
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: ByteString::from_static("t/1"),
            packet_id: 7,
            properties: PublishProperties::default(),
            payload: Bytes::from_static(b"hello"),
        });
        assert_eq!(
            describe(&publish, 17),
            "PUBLISH size=17 id=7 topic=\"t/1\" qos=1 dup=0 retain=1 payload=5:\"hello\""
        );
    }
}
