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
        }
    }
}
