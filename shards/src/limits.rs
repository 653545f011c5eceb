//! Every limit a shard enforces, in one place. Each is configurable (the `[limits]` table of
//! the configuration file); the defaults suit a general-purpose broker. A client that breaks a
//! limit loses its own connection (or the one request) with the reason code named here; nobody
//! else notices.

use shardmq_net::mqtt::QoS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per shard. Connection attempts beyond it are closed at once (before
    /// CONNECT) and logged.
    pub connections_per_shard_max: usize,
    /// QoS 1 and 2 messages in flight to one client at a time; the client's own Receive
    /// Maximum lowers it further. Further messages wait in the session's queue.
    pub inflight_per_session_max: u16,
    /// The Receive Maximum the server announces: QoS 2 messages from one client that may await
    /// PUBREL at once. More is DISCONNECT 0x93 (Receive Maximum exceeded).
    pub receive_maximum: u16,
    /// Messages queued for one session (offline, or beyond its in-flight window). When full,
    /// the oldest queued message is dropped to make room (and counted in the log): a slow or
    /// absent client cannot grow the broker's memory without bound, and it keeps the freshest
    /// data.
    pub queued_messages_per_session_max: usize,
    /// The largest packet accepted from a client, fixed header included. Larger is DISCONNECT
    /// 0x95 (Packet too large) for 5.0, a close for 3.x, decided from the fixed header alone.
    pub packet_size_max: u32,
    /// Levels in a topic name or filter. More is 0x90 / 0x8F (or a close for 3.x).
    pub topic_levels_max: usize,
    /// Subscriptions one session may hold. A SUBSCRIBE beyond it gets 0x97 (Quota exceeded)
    /// for the filters over the limit (0x80 for 3.1.1).
    pub subscriptions_per_session_max: usize,
    /// The Topic Alias Maximum announced to 5.0 clients: aliases they may set.
    pub topic_alias_max: u16,
    /// The longest client identifier accepted (bytes). Longer is CONNACK 0x85 / return code 2.
    pub client_id_length_max: usize,
    /// The highest keep alive a client may ask for, in seconds; a 5.0 client asking for more
    /// (or for 0) is told this value as Server Keep Alive. 0 means no cap.
    pub keep_alive_seconds_max: u16,
    /// The longest session expiry interval granted, in seconds. 3.1.1 persistent sessions
    /// (clean session 0) get this value.
    pub session_expiry_seconds_max: u32,
    /// The highest QoS the server accepts and grants.
    pub qos_max: QoS,
    /// Whether retained messages are stored.
    pub retain_available: bool,
    /// Bytes encoded for one connection that its socket has not taken yet (what the shard
    /// holds for the batch plus what the reactor still has queued). At or past it, the
    /// connection gets no more PUBLISH packets: QoS 0 messages for it are dropped (counted),
    /// QoS 1 and 2 wait in its session's queue and go once the backlog falls below it.
    /// Acknowledgements and other replies still go. A subscriber that stops reading thus
    /// costs about this much memory, not what its publishers send.
    pub unsent_bytes_per_connection_max: usize,
    /// How long a connection may stay at or past `unsent_bytes_per_connection_max` without
    /// its socket taking enough to fall below it, in milliseconds. Then it is ended with
    /// DISCONNECT 0x97 (Quota exceeded) for 5.0, a close for 3.x, and its will is published.
    pub send_stuck_timeout_ms: u64,
    /// How long a connection may take to complete CONNECT (milliseconds from its opening to
    /// a decoded CONNECT). A socket that stays silent, or trickles a partial CONNECT, is
    /// closed then: unauthenticated peers cannot hold sockets and buffers for ever.
    pub connect_timeout_ms: u64,
    /// The largest CONNECT accepted, fixed header included, and so the most a connection
    /// buffers before it completes CONNECT. Decided from the fixed header alone: a larger
    /// remaining length closes the connection at once (the protocol version is in the body,
    /// not yet read, so no CONNACK can be chosen for it). A
    /// CONNECT holds a client identifier (at most `client_id_length_max`), credentials, a will
    /// and properties; 64 KiB fits a will of some 60 KiB and any token a client presents,
    /// while 2,000 idle sockets can then pin at most 128 MiB instead of 2 GiB at
    /// `packet_size_max`. Capped by `packet_size_max`.
    pub connect_packet_size_max: u32,
    /// Topic filters in one SUBSCRIBE. The filters past it get 0x97 (Quota exceeded; 0x80 for
    /// 3.1.1) in the SUBACK and cause no other work: one packet cannot make the shard match
    /// the retained store, or change routes, without bound.
    pub subscribe_filters_max: usize,
    /// Retained messages sent for one SUBSCRIBE (all its filters together). The rest are not
    /// sent (and counted in the log): one small packet cannot queue the whole retained store
    /// for its connection many times over.
    pub retained_per_subscribe_max: usize,
    /// Topics in the retained store (which every shard holds). A retained PUBLISH for a new
    /// topic past it is refused: PUBACK / PUBREC 0x97 (Quota exceeded) for 5.0 QoS 1 and 2,
    /// a counted drop otherwise. Clearing a held topic is always allowed; replacing it is,
    /// while the store stays within `retained_bytes_max`.
    pub retained_messages_max: usize,
    /// Bytes in the retained store (topic, payload and variable-length properties of each
    /// message); past it, as `retained_messages_max`.
    pub retained_bytes_max: usize,
    /// Persistent sessions (session expiry above 0, with or without a connection) one shard
    /// keeps; every offline session is one, so this bounds them. A CONNECT that would create
    /// a new persistent session past it is refused with CONNACK 0x97 (Quota exceeded; return
    /// code 3, Server unavailable, for 3.x). Refusing the newcomer was chosen over expiring
    /// the oldest offline session: expiring would let anyone who cycles client identifiers
    /// erase other clients' sessions and their queued messages, while a refusal costs only
    /// the newcomer, who is told why and can connect with a clean, non-persistent session.
    pub persistent_sessions_per_shard_max: usize,
    /// Bytes a client may send after its CONNECT while the takeover of its session from other
    /// nodes is pending (they are read after CONNACK). Past it the connection gets CONNACK
    /// 0x97 (Quota exceeded; return code 3 for 3.x) and is closed.
    pub takeover_pending_bytes_max: usize,
}

impl Limits {
    /// The largest packet accepted from a connection: any packet once it has completed
    /// CONNECT, else a CONNECT.
    pub fn packet_size_max_for(&self, connected: bool) -> u32 {
        if connected {
            self.packet_size_max
        } else {
            self.connect_packet_size_max.min(self.packet_size_max)
        }
    }
}

/// The most of a peer's input (a topic, a filter, a client identifier) quoted in a reason
/// string or a log line, in bytes: the input can be 64 KiB or more, and a reason string or a
/// log line need only name it.
pub const QUOTE_BYTES_MAX: usize = 64;

/// `text` for a reason string or a log line: whole if it is at most [`QUOTE_BYTES_MAX`]
/// bytes, else its first bytes up to that limit (cut on a character boundary) and `...`;
/// control characters escaped (`\n`, `\u{1b}`), so that a client identifier or a topic
/// cannot start a forged log line or drive the operator's terminal.
pub fn quote(text: &str) -> std::borrow::Cow<'_, str> {
    let mut end = text.len().min(QUOTE_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let (shown, cut) = text.split_at(end);
    if cut.is_empty() && !shown.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(shown.len() + 3);
    for c in shown.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if !cut.is_empty() {
        out.push_str("...");
    }
    std::borrow::Cow::Owned(out)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_per_shard_max: 1_000_000,
            inflight_per_session_max: 64,
            receive_maximum: 1024,
            queued_messages_per_session_max: 1000,
            packet_size_max: 1024 * 1024,
            topic_levels_max: 32,
            subscriptions_per_session_max: 1000,
            topic_alias_max: 64,
            client_id_length_max: 256,
            keep_alive_seconds_max: 0,
            session_expiry_seconds_max: 7 * 24 * 3600,
            qos_max: QoS::ExactlyOnce,
            retain_available: true,
            unsent_bytes_per_connection_max: 1024 * 1024,
            send_stuck_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            connect_packet_size_max: 64 * 1024,
            subscribe_filters_max: 128,
            retained_per_subscribe_max: 1000,
            retained_messages_max: 100_000,
            retained_bytes_max: 256 * 1024 * 1024,
            persistent_sessions_per_shard_max: 100_000,
            takeover_pending_bytes_max: 64 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_control_characters() {
        assert_eq!(
            quote("x\n2026-12-03T00:00:00Z INFO forged"),
            "x\\n2026-12-03T00:00:00Z INFO forged"
        );
        assert_eq!(quote("\u{1b}[2Jz\r"), "\\u{1b}[2Jz\\r");
        assert_eq!(
            quote("caf\u{e9}/+"),
            "caf\u{e9}/+",
            "printable text is kept"
        );
    }

    #[test]
    fn quote_keeps_short_text_and_cuts_long_text_on_a_character_boundary() {
        assert_eq!(quote("a/b"), "a/b");
        let exact = "x".repeat(QUOTE_BYTES_MAX);
        assert_eq!(quote(&exact), exact);
        // 63 ASCII bytes then a 3-byte character straddling the limit.
        let long = format!(
            "{}\u{20ac}{}",
            "y".repeat(QUOTE_BYTES_MAX - 1),
            "z".repeat(1000)
        );
        let quoted = quote(&long);
        assert_eq!(quoted, format!("{}...", "y".repeat(QUOTE_BYTES_MAX - 1)));
    }
}
