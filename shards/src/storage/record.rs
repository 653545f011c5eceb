//! The log's records: what a shard must not forget, one change per record, and their framing.
//!
//! Owns: the [`Record`] enum, its body encoding, and the frame around it:
//! `[u32 length][u32 crc32c][u8 kind][body]`, little-endian, where `length` counts the kind
//! byte and the body and the CRC32C (Castagnoli) covers the length field, the kind and the
//! body, so a damaged length is caught like a damaged body.
//! Never: panics on what it reads. Bytes read back from a disk are hostile (a torn write, a
//! flipped bit, a file from something else): every read is bounds-checked, a length past
//! [`RECORD_LENGTH_MAX`] is corruption, counts are never trusted for allocation, and strings
//! must be UTF-8.
//!
//! Messages are stored as MQTT 5 PUBLISH packets (the codec's encoding, which the codec fuzz
//! targets cover) without a Message Expiry Interval, followed by the absolute expiry deadline
//! and the publisher: a log record is written once and read at some later start, so a
//! deadline relative to "now" (as the snapshot keeps) would be wrong by the time it is read.
//! A message must be one the codec accepts (the shard's are: each came from a decoded PUBLISH);
//! the encoder does not decode what it wrote to check, which would double the cost of every
//! append, so a message the decoder refuses would stop recovery at its record.
//! Every time in a record (`expires_at_ms`, `publish_at_ms`) is in the caller's clock; the
//! wiring must use one that survives a restart (see ARCHITECTURE.md).

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use shardmq_net::mqtt::{
    self, DecodeOptions, EncodeError, Packet, ProtocolVersion, Publish, QoS, RetainHandling,
    Sender, SubscriptionOptions,
};

use crate::message::Message;
pub use crate::snapshot::{SavedDelivery, SavedInflight};

/// Bytes of a frame before its kind byte: the length and the checksum.
pub const FRAME_HEADER_LEN: usize = 8;

/// The longest record (kind byte and body) that may be written or read. A record holds at most
/// one message (a PUBLISH, itself at most [`mqtt::PACKET_SIZE_MAX`] bytes) plus client
/// identifiers, a filter and a publisher (each at most 64 KiB as MQTT strings) and a few
/// integers; 256 KiB covers those with room. A length field above this is corruption, so a
/// flipped bit in a length can never make recovery wait for, or copy, gigabytes.
pub const RECORD_LENGTH_MAX: usize = mqtt::PACKET_SIZE_MAX as usize + 256 * 1024;

/// A session's will as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub message: Message,
    pub delay_seconds: u32,
}

/// One change to what a shard keeps across a crash. Records name sessions by client
/// identifier; a record about a session, message or packet identifier that does not exist
/// when it is replayed is ignored (and counted) by [`super::State::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A persistent session starts empty (a new client, or a clean start that replaced one).
    SessionCreated {
        client_id: ByteString,
        version: ProtocolVersion,
        expiry_seconds: u32,
        will: Option<Will>,
    },
    /// A persistent session resumed by a new connection, which brings its own protocol
    /// version, expiry interval and will; or a 5.0 DISCONNECT that changed the expiry.
    SessionChanged {
        client_id: ByteString,
        version: ProtocolVersion,
        expiry_seconds: u32,
        will: Option<Will>,
    },
    /// The session is gone (expired, cleaned, or taken away to another node).
    SessionEnded {
        client_id: ByteString,
    },
    /// A subscription was added or replaced (same filter, new options).
    SubscriptionAdded {
        client_id: ByteString,
        filter: ByteString,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    },
    SubscriptionRemoved {
        client_id: ByteString,
        filter: ByteString,
    },
    /// A QoS 1/2 message joins the tail of the session's queue. A message sent at once is
    /// logged as queued then sent, so that every in-flight entry has one origin.
    MessageQueued {
        client_id: ByteString,
        delivery: SavedDelivery,
    },
    /// The oldest queued message was dropped (queue overflow, or expired at the head).
    QueuedDropped {
        client_id: ByteString,
    },
    /// The oldest queued message went in flight as PUBLISH `packet_id`.
    MessageSent {
        client_id: ByteString,
        packet_id: u16,
    },
    /// PUBREC came for in-flight QoS 2 `packet_id` and PUBREL went out.
    MessageReleased {
        client_id: ByteString,
        packet_id: u16,
    },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) ended in-flight `packet_id`.
    MessageAcknowledged {
        client_id: ByteString,
        packet_id: u16,
    },
    /// An inbound QoS 2 PUBLISH was delivered; its identifier is kept until PUBREL.
    InboundAwaitingRelease {
        client_id: ByteString,
        packet_id: u16,
    },
    /// PUBREL came for inbound `packet_id`.
    InboundReleased {
        client_id: ByteString,
        packet_id: u16,
    },
    /// A retained message was stored (replacing any on its topic).
    RetainedSet {
        message: Message,
    },
    RetainedCleared {
        topic: ByteString,
    },
    /// A will waits for its delay, to be published at `publish_at_ms` (caller's clock). It
    /// may outlive its session (a session expiry shorter than the will delay).
    WillPending {
        client_id: ByteString,
        will: Will,
        publish_at_ms: u64,
    },
    /// The pending will of `client_id` was published or cancelled by a reconnect.
    WillCancelled {
        client_id: ByteString,
    },
}

/// Why a record could not be encoded. The shard never produces such records from bounded
/// packets, but the log refuses them rather than writing something it could not read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordEncodeError {
    /// The record is longer than [`RECORD_LENGTH_MAX`].
    TooLarge { length: usize },
    /// A message could not be encoded as a PUBLISH.
    Message(EncodeError),
    /// A string or list is longer than its length field allows.
    FieldTooLong,
}

/// Why a frame or record read back is not a record. Any of them ends recovery at that frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Fewer bytes than the frame header or its length field promise: a torn write.
    Truncated,
    /// A length of zero or above [`RECORD_LENGTH_MAX`].
    Length,
    /// The checksum does not match.
    Checksum,
    /// The checksum matches but the body is not a record of a known kind (a format bug, or a
    /// newer format's record).
    Body(&'static str),
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("record cut short"),
            Self::Length => f.write_str("record length out of range"),
            Self::Checksum => f.write_str("record fails its checksum"),
            Self::Body(why) => write!(f, "record body malformed: {why}"),
        }
    }
}

const SESSION_CREATED: u8 = 1;
const SESSION_CHANGED: u8 = 2;
const SESSION_ENDED: u8 = 3;
const SUBSCRIPTION_ADDED: u8 = 4;
const SUBSCRIPTION_REMOVED: u8 = 5;
const MESSAGE_QUEUED: u8 = 6;
const QUEUED_DROPPED: u8 = 7;
const MESSAGE_SENT: u8 = 8;
const MESSAGE_RELEASED: u8 = 9;
const MESSAGE_ACKNOWLEDGED: u8 = 10;
const INBOUND_AWAITING_RELEASE: u8 = 11;
const INBOUND_RELEASED: u8 = 12;
const RETAINED_SET: u8 = 13;
const RETAINED_CLEARED: u8 = 14;
const WILL_PENDING: u8 = 15;
const WILL_CANCELLED: u8 = 16;
/// Not a [`Record`]: the segment layer's marker that a checkpoint is complete.
pub(super) const CHECKPOINT_END: u8 = 0xFF;
/// Not a [`Record`]: the segment layer's marker that a segment is sealed (a later one
/// follows), so that an earlier segment that lost whole frames at its end is caught.
pub(super) const SEGMENT_END: u8 = 0xFE;

/// Writes one record body field by field, remembering the first field that did not fit.
struct Writer<'a> {
    out: &'a mut BytesMut,
    error: Option<RecordEncodeError>,
}

impl Writer<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        match u32::try_from(bytes.len()) {
            Ok(length) => {
                self.out.put_u32_le(length);
                self.out.put_slice(bytes);
            }
            Err(_) => self.error = Some(RecordEncodeError::FieldTooLong),
        }
    }

    fn optional_u64(&mut self, value: Option<u64>) {
        self.out.put_u8(u8::from(value.is_some()));
        self.out.put_u64_le(value.unwrap_or(0));
    }

    fn message(&mut self, message: &Message) {
        let mut properties = message.properties.clone();
        properties.message_expiry_interval = None;
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        let publish = Publish {
            dup: false,
            qos: message.qos,
            retain: message.retain,
            topic: message.topic.clone(),
            packet_id: if message.qos == QoS::AtMostOnce { 0 } else { 1 },
            properties,
            payload: message.payload.clone(),
        };
        let mut encoded = BytesMut::new();
        if let Err(error) = mqtt::encode_limited(
            &Packet::Publish(publish),
            ProtocolVersion::V5,
            mqtt::PACKET_SIZE_MAX,
            &mut encoded,
        ) {
            self.error = Some(RecordEncodeError::Message(error));
        }
        self.bytes(&encoded);
        self.optional_u64(message.expires_at_ms);
        self.out.put_u8(u8::from(message.publisher.is_some()));
        if let Some(publisher) = &message.publisher {
            self.bytes(publisher.as_bytes());
        }
    }

    fn will(&mut self, will: Option<&Will>) {
        self.out.put_u8(u8::from(will.is_some()));
        if let Some(will) = will {
            self.message(&will.message);
            self.out.put_u32_le(will.delay_seconds);
        }
    }

    fn delivery(&mut self, delivery: &SavedDelivery) {
        self.message(&delivery.message);
        match u16::try_from(delivery.subscription_identifiers.len()) {
            Ok(count) => self.out.put_u16_le(count),
            Err(_) => self.error = Some(RecordEncodeError::FieldTooLong),
        }
        for &identifier in &delivery.subscription_identifiers {
            self.out.put_u32_le(identifier);
        }
    }

    fn session(
        &mut self,
        client_id: &ByteString,
        version: ProtocolVersion,
        expiry_seconds: u32,
        will: Option<&Will>,
    ) {
        self.bytes(client_id.as_bytes());
        self.out.put_u8(version.level());
        self.out.put_u32_le(expiry_seconds);
        self.will(will);
    }

    fn packet(&mut self, client_id: &ByteString, packet_id: u16) {
        self.bytes(client_id.as_bytes());
        self.out.put_u16_le(packet_id);
    }
}

fn options_fields(options: &SubscriptionOptions) -> [u8; 4] {
    [
        options.qos as u8,
        u8::from(options.no_local),
        u8::from(options.retain_as_published),
        options.retain_handling as u8,
    ]
}

impl Record {
    /// The client identifier of a record about a session (created, changed, ended, its
    /// subscriptions, messages and inbound identifiers); `None` for retained messages and
    /// wills pending after their session ended.
    pub fn session_client_id(&self) -> Option<&ByteString> {
        match self {
            Self::SessionCreated { client_id, .. }
            | Self::SessionChanged { client_id, .. }
            | Self::SessionEnded { client_id }
            | Self::SubscriptionAdded { client_id, .. }
            | Self::SubscriptionRemoved { client_id, .. }
            | Self::MessageQueued { client_id, .. }
            | Self::QueuedDropped { client_id }
            | Self::MessageSent { client_id, .. }
            | Self::MessageReleased { client_id, .. }
            | Self::MessageAcknowledged { client_id, .. }
            | Self::InboundAwaitingRelease { client_id, .. }
            | Self::InboundReleased { client_id, .. } => Some(client_id),
            Self::RetainedSet { .. }
            | Self::RetainedCleared { .. }
            | Self::WillPending { .. }
            | Self::WillCancelled { .. } => None,
        }
    }

    /// The kind byte that precedes this record's body in its frame.
    pub fn kind(&self) -> u8 {
        match self {
            Self::SessionCreated { .. } => SESSION_CREATED,
            Self::SessionChanged { .. } => SESSION_CHANGED,
            Self::SessionEnded { .. } => SESSION_ENDED,
            Self::SubscriptionAdded { .. } => SUBSCRIPTION_ADDED,
            Self::SubscriptionRemoved { .. } => SUBSCRIPTION_REMOVED,
            Self::MessageQueued { .. } => MESSAGE_QUEUED,
            Self::QueuedDropped { .. } => QUEUED_DROPPED,
            Self::MessageSent { .. } => MESSAGE_SENT,
            Self::MessageReleased { .. } => MESSAGE_RELEASED,
            Self::MessageAcknowledged { .. } => MESSAGE_ACKNOWLEDGED,
            Self::InboundAwaitingRelease { .. } => INBOUND_AWAITING_RELEASE,
            Self::InboundReleased { .. } => INBOUND_RELEASED,
            Self::RetainedSet { .. } => RETAINED_SET,
            Self::RetainedCleared { .. } => RETAINED_CLEARED,
            Self::WillPending { .. } => WILL_PENDING,
            Self::WillCancelled { .. } => WILL_CANCELLED,
        }
    }

    /// Appends this record's body (without kind byte or frame) to `out`.
    pub fn encode_body(&self, out: &mut BytesMut) -> Result<(), RecordEncodeError> {
        let mut writer = Writer { out, error: None };
        match self {
            Self::SessionCreated {
                client_id,
                version,
                expiry_seconds,
                will,
            }
            | Self::SessionChanged {
                client_id,
                version,
                expiry_seconds,
                will,
            } => writer.session(client_id, *version, *expiry_seconds, will.as_ref()),
            Self::SessionEnded { client_id }
            | Self::QueuedDropped { client_id }
            | Self::WillCancelled { client_id } => writer.bytes(client_id.as_bytes()),
            Self::SubscriptionAdded {
                client_id,
                filter,
                options,
                identifier,
            } => {
                writer.bytes(client_id.as_bytes());
                writer.bytes(filter.as_bytes());
                writer.out.put_slice(&options_fields(options));
                writer.out.put_u8(u8::from(identifier.is_some()));
                writer.out.put_u32_le(identifier.unwrap_or(0));
            }
            Self::SubscriptionRemoved { client_id, filter } => {
                writer.bytes(client_id.as_bytes());
                writer.bytes(filter.as_bytes());
            }
            Self::MessageQueued {
                client_id,
                delivery,
            } => {
                writer.bytes(client_id.as_bytes());
                writer.delivery(delivery);
            }
            Self::MessageSent {
                client_id,
                packet_id,
            }
            | Self::MessageReleased {
                client_id,
                packet_id,
            }
            | Self::MessageAcknowledged {
                client_id,
                packet_id,
            }
            | Self::InboundAwaitingRelease {
                client_id,
                packet_id,
            }
            | Self::InboundReleased {
                client_id,
                packet_id,
            } => writer.packet(client_id, *packet_id),
            Self::RetainedSet { message } => writer.message(message),
            Self::RetainedCleared { topic } => writer.bytes(topic.as_bytes()),
            Self::WillPending {
                client_id,
                will,
                publish_at_ms,
            } => {
                writer.bytes(client_id.as_bytes());
                writer.will(Some(will));
                writer.out.put_u64_le(*publish_at_ms);
            }
        }
        writer.error.map_or(Ok(()), Err)
    }

    /// Reads a record from its kind byte and body, as a frame held them. Never panics.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, Malformed> {
        let body = Bytes::copy_from_slice(body);
        let mut reader = Reader {
            bytes: &body,
            position: 0,
            problem: "",
        };
        let record = reader.record(kind).ok_or(Malformed::Body(reader.problem))?;
        if reader.position != body.len() {
            return Err(Malformed::Body("bytes after the record's last field"));
        }
        Ok(record)
    }
}

/// Appends `record` to `out` as a whole frame; returns the frame's length. On error nothing is
/// left in `out`.
pub fn encode_frame(record: &Record, out: &mut BytesMut) -> Result<usize, RecordEncodeError> {
    let start = out.len();
    out.put_bytes(0, FRAME_HEADER_LEN);
    out.put_u8(record.kind());
    if let Err(error) = record.encode_body(out) {
        out.truncate(start);
        return Err(error);
    }
    match seal_frame(out, start) {
        Ok(length) => Ok(length),
        Err(error) => {
            out.truncate(start);
            Err(error)
        }
    }
}

/// Appends the frame of a kind with an empty body (the segment layer's markers).
pub(super) fn encode_marker(kind: u8, out: &mut BytesMut) -> usize {
    let start = out.len();
    out.put_bytes(0, FRAME_HEADER_LEN);
    out.put_u8(kind);
    seal_frame(out, start).unwrap_or_else(|_| unreachable!("a one-byte record fits"))
}

/// Fills in the length and checksum of the frame that starts at `start` and runs to the end
/// of `out`.
fn seal_frame(out: &mut BytesMut, start: usize) -> Result<usize, RecordEncodeError> {
    let length = out.len() - start - FRAME_HEADER_LEN;
    if length > RECORD_LENGTH_MAX {
        return Err(RecordEncodeError::TooLarge { length });
    }
    let length_field = (length as u32).to_le_bytes();
    out[start..start + 4].copy_from_slice(&length_field);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&length_field),
        &out[start + FRAME_HEADER_LEN..],
    );
    out[start + 4..start + FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(out.len() - start)
}

/// One frame read from `bytes` (which starts at the frame): its kind byte, its body, and its
/// whole length. Checks the length bound and the checksum, not the body.
pub fn read_frame(bytes: &[u8]) -> Result<(u8, &[u8], usize), Malformed> {
    let header = bytes.get(..FRAME_HEADER_LEN).ok_or(Malformed::Truncated)?;
    let length_field = [header[0], header[1], header[2], header[3]];
    let length = u32::from_le_bytes(length_field) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if length == 0 || length > RECORD_LENGTH_MAX {
        return Err(Malformed::Length);
    }
    let end = FRAME_HEADER_LEN + length;
    let record = bytes
        .get(FRAME_HEADER_LEN..end)
        .ok_or(Malformed::Truncated)?;
    if crc32c::crc32c_append(crc32c::crc32c(&length_field), record) != crc {
        return Err(Malformed::Checksum);
    }
    Ok((record[0], &record[1..], end))
}

/// A bounds-checked reader: `None` means the body is malformed, and `problem` says where.
struct Reader<'a> {
    bytes: &'a Bytes,
    position: usize,
    problem: &'static str,
}

impl Reader<'_> {
    fn fail<T>(&mut self, problem: &'static str) -> Option<T> {
        self.problem = problem;
        None
    }

    fn take(&mut self, count: usize) -> Option<Bytes> {
        let Some(end) = self
            .position
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len())
        else {
            return self.fail("a field runs past the record");
        };
        let slice = self.bytes.slice(self.position..end);
        self.position = end;
        Some(slice)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let bytes = self.take(N)?;
        let mut array = [0; N];
        array.copy_from_slice(&bytes);
        Some(array)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => self.fail("a flag is neither 0 nor 1"),
        }
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    fn string(&mut self) -> Option<ByteString> {
        let bytes = self.bytes()?;
        match ByteString::try_from(bytes) {
            Ok(string) => Some(string),
            Err(_) => self.fail("a string is not UTF-8"),
        }
    }

    fn version(&mut self) -> Option<ProtocolVersion> {
        match self.u8()? {
            3 => Some(ProtocolVersion::V3_1),
            4 => Some(ProtocolVersion::V3_1_1),
            5 => Some(ProtocolVersion::V5),
            _ => self.fail("an unknown protocol version"),
        }
    }

    fn optional_u64(&mut self) -> Option<Option<u64>> {
        let present = self.flag()?;
        let value = self.u64()?;
        if !present && value != 0 {
            return self.fail("an absent value is not zero");
        }
        Some(present.then_some(value))
    }

    fn message(&mut self) -> Option<Message> {
        let encoded = self.bytes()?;
        let options = DecodeOptions {
            version: ProtocolVersion::V5,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        let publish = match mqtt::decode(&encoded, &options) {
            Ok(Some((Packet::Publish(publish), used))) if used == encoded.len() => publish,
            _ => return self.fail("a message is not one whole PUBLISH"),
        };
        if publish.properties.message_expiry_interval.is_some() {
            return self.fail("a message carries a relative expiry");
        }
        let expires_at_ms = self.optional_u64()?;
        let publisher = if self.flag()? {
            Some(self.string()?)
        } else {
            None
        };
        let mut message = Message::from_publish(publish, 0, publisher);
        message.expires_at_ms = expires_at_ms;
        Some(message)
    }

    fn will(&mut self) -> Option<Option<Will>> {
        if !self.flag()? {
            return Some(None);
        }
        let message = self.message()?;
        let delay_seconds = self.u32()?;
        Some(Some(Will {
            message,
            delay_seconds,
        }))
    }

    fn delivery(&mut self) -> Option<SavedDelivery> {
        let message = self.message()?;
        let count = self.u16()?;
        // Grown one checked read at a time: a hostile count cannot allocate ahead of the bytes.
        let mut subscription_identifiers = Vec::new();
        for _ in 0..count {
            subscription_identifiers.push(self.u32()?);
        }
        Some(SavedDelivery {
            message,
            subscription_identifiers,
        })
    }

    fn options(&mut self) -> Option<SubscriptionOptions> {
        let [qos, no_local, retain_as_published, retain_handling] = self.array()?;
        let Some(qos) = QoS::from_bits(qos) else {
            return self.fail("an unknown QoS");
        };
        let flag = |byte| match byte {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        let (Some(no_local), Some(retain_as_published)) =
            (flag(no_local), flag(retain_as_published))
        else {
            return self.fail("a subscription flag is neither 0 nor 1");
        };
        let retain_handling = match retain_handling {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return self.fail("an unknown retain handling"),
        };
        Some(SubscriptionOptions {
            qos,
            no_local,
            retain_as_published,
            retain_handling,
        })
    }

    fn record(&mut self, kind: u8) -> Option<Record> {
        Some(match kind {
            SESSION_CREATED | SESSION_CHANGED => {
                let client_id = self.string()?;
                let version = self.version()?;
                let expiry_seconds = self.u32()?;
                let will = self.will()?;
                if kind == SESSION_CREATED {
                    Record::SessionCreated {
                        client_id,
                        version,
                        expiry_seconds,
                        will,
                    }
                } else {
                    Record::SessionChanged {
                        client_id,
                        version,
                        expiry_seconds,
                        will,
                    }
                }
            }
            SESSION_ENDED => Record::SessionEnded {
                client_id: self.string()?,
            },
            QUEUED_DROPPED => Record::QueuedDropped {
                client_id: self.string()?,
            },
            WILL_CANCELLED => Record::WillCancelled {
                client_id: self.string()?,
            },
            SUBSCRIPTION_ADDED => {
                let client_id = self.string()?;
                let filter = self.string()?;
                let options = self.options()?;
                let identifier = self.flag()?;
                let value = self.u32()?;
                if !identifier && value != 0 {
                    return self.fail("an absent identifier is not zero");
                }
                Record::SubscriptionAdded {
                    client_id,
                    filter,
                    options,
                    identifier: identifier.then_some(value),
                }
            }
            SUBSCRIPTION_REMOVED => Record::SubscriptionRemoved {
                client_id: self.string()?,
                filter: self.string()?,
            },
            MESSAGE_QUEUED => Record::MessageQueued {
                client_id: self.string()?,
                delivery: self.delivery()?,
            },
            MESSAGE_SENT
            | MESSAGE_RELEASED
            | MESSAGE_ACKNOWLEDGED
            | INBOUND_AWAITING_RELEASE
            | INBOUND_RELEASED => {
                let client_id = self.string()?;
                let packet_id = self.u16()?;
                match kind {
                    MESSAGE_SENT => Record::MessageSent {
                        client_id,
                        packet_id,
                    },
                    MESSAGE_RELEASED => Record::MessageReleased {
                        client_id,
                        packet_id,
                    },
                    MESSAGE_ACKNOWLEDGED => Record::MessageAcknowledged {
                        client_id,
                        packet_id,
                    },
                    INBOUND_AWAITING_RELEASE => Record::InboundAwaitingRelease {
                        client_id,
                        packet_id,
                    },
                    _ => Record::InboundReleased {
                        client_id,
                        packet_id,
                    },
                }
            }
            RETAINED_SET => Record::RetainedSet {
                message: self.message()?,
            },
            RETAINED_CLEARED => Record::RetainedCleared {
                topic: self.string()?,
            },
            WILL_PENDING => {
                let client_id = self.string()?;
                let Some(will) = self.will()? else {
                    return self.fail("a pending will without a will");
                };
                let publish_at_ms = self.u64()?;
                Record::WillPending {
                    client_id,
                    will,
                    publish_at_ms,
                }
            }
            _ => return self.fail("an unknown record kind"),
        })
    }
}
