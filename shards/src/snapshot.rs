//! Snapshots of a shard's durable state: persistent sessions (subscriptions, in-flight and
//! queued messages) and retained messages. The broker no longer writes them (the durable log,
//! `storage`, replaced them); it reads old snapshot files once at start, as the upgrade path,
//! and a takeover across nodes moves a session as a `SavedSession`.
//!
//! Owns: the file format, as pure functions over bytes (the file I/O is the binary's).
//! Never: touches a file, or trusts what it reads: every record carries its length and a
//! CRC32, and reading stops at the first record that is cut short or fails its check.
//!
//! Format: the magic `SHARDMQ-SNAPSHOT-1\n`, then records `[u32 length][u32 crc32][body]`,
//! big-endian. Messages are stored as MQTT 5 PUBLISH packets (the codec's encoding), with the
//! remaining Message Expiry Interval at the time of the snapshot.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use shardmq_net::mqtt::{
    self, DecodeOptions, Packet, ProtocolVersion, Publish, QoS, RetainHandling, Sender,
    SubscriptionOptions,
};

use crate::message::Message;

pub const MAGIC: &[u8] = b"SHARDMQ-SNAPSHOT-1\n";

/// One message a session holds, with the subscription identifiers it is delivered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedDelivery {
    pub message: Message,
    pub subscription_identifiers: Vec<u32>,
}

/// An unacknowledged delivery: PUBLISH sent (or, `released`, PUBREL sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedInflight {
    pub packet_id: u16,
    pub released: bool,
    pub delivery: SavedDelivery,
}

/// A persistent session without a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSession {
    pub client_id: ByteString,
    pub version: ProtocolVersion,
    pub expiry_seconds: u32,
    pub subscriptions: Vec<(ByteString, SubscriptionOptions, Option<u32>)>,
    pub inflight: Vec<SavedInflight>,
    pub queue: Vec<SavedDelivery>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Session(SavedSession),
    Retained(Message),
}

const KIND_SESSION: u8 = 1;
const KIND_RETAINED: u8 = 2;

/// A value that the format cannot hold (a field or count past its width, or a message the
/// codec refuses): the record it belongs to is left out of the snapshot, with a warning,
/// rather than written so that it, and every record after it, reads back as corrupt.
#[derive(Debug)]
struct Unrepresentable(&'static str);

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) -> Result<(), Unrepresentable> {
    let length = u32::try_from(bytes.len()).map_err(|_| Unrepresentable("a field over 4 GiB"))?;
    out.put_u32(length);
    out.put_slice(bytes);
    Ok(())
}

fn put_count_u32(out: &mut BytesMut, count: usize) -> Result<(), Unrepresentable> {
    out.put_u32(u32::try_from(count).map_err(|_| Unrepresentable("a count over 2^32"))?);
    Ok(())
}

fn options_byte(options: &SubscriptionOptions) -> u8 {
    options.qos as u8
        | u8::from(options.no_local) << 2
        | u8::from(options.retain_as_published) << 3
        | (options.retain_handling as u8) << 4
}

fn options_from(byte: u8) -> Option<SubscriptionOptions> {
    Some(SubscriptionOptions {
        qos: QoS::from_bits(byte & 0b11)?,
        no_local: byte & 0b100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling: match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return None,
        },
    })
}

fn put_message(out: &mut BytesMut, message: &Message, now_ms: u64) -> Result<(), Unrepresentable> {
    let mut properties = message.properties.clone();
    properties.message_expiry_interval = message.remaining_expiry_seconds(now_ms);
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
    mqtt::encode_limited(
        &Packet::Publish(publish),
        ProtocolVersion::V5,
        mqtt::PACKET_SIZE_MAX,
        &mut encoded,
    )
    .map_err(|_| Unrepresentable("a message the codec cannot encode"))?;
    put_bytes(out, &encoded)
}

fn put_delivery(
    out: &mut BytesMut,
    delivery: &SavedDelivery,
    now_ms: u64,
) -> Result<(), Unrepresentable> {
    put_message(out, &delivery.message, now_ms)?;
    let count = u16::try_from(delivery.subscription_identifiers.len())
        .map_err(|_| Unrepresentable("over 65,535 subscription identifiers"))?;
    out.put_u16(count);
    for &identifier in &delivery.subscription_identifiers {
        out.put_u32(identifier);
    }
    Ok(())
}

/// Writes one record's body; its length (a u32 in the format) on success.
fn put_record(body: &mut BytesMut, record: &Record, now_ms: u64) -> Result<u32, Unrepresentable> {
    match record {
        Record::Session(session) => {
            body.put_u8(KIND_SESSION);
            put_bytes(body, session.client_id.as_bytes())?;
            body.put_u8(session.version.level());
            body.put_u32(session.expiry_seconds);
            put_count_u32(body, session.subscriptions.len())?;
            for (filter, options, identifier) in &session.subscriptions {
                put_bytes(body, filter.as_bytes())?;
                body.put_u8(options_byte(options));
                body.put_u32(identifier.unwrap_or(0));
            }
            put_count_u32(body, session.inflight.len())?;
            for inflight in &session.inflight {
                body.put_u16(inflight.packet_id);
                body.put_u8(u8::from(inflight.released));
                put_delivery(body, &inflight.delivery, now_ms)?;
            }
            put_count_u32(body, session.queue.len())?;
            for delivery in &session.queue {
                put_delivery(body, delivery, now_ms)?;
            }
        }
        Record::Retained(message) => {
            body.put_u8(KIND_RETAINED);
            put_message(body, message, now_ms)?;
        }
    }
    u32::try_from(body.len()).map_err(|_| Unrepresentable("a record over 4 GiB"))
}

/// Encodes records into a snapshot; message expiry is counted from `now_ms`.
pub fn encode(records: &[Record], now_ms: u64) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_slice(MAGIC);
    let mut body = BytesMut::new();
    for record in records {
        body.clear();
        let length = match put_record(&mut body, record, now_ms) {
            Ok(length) => length,
            Err(Unrepresentable(why)) => {
                tracing::warn!(why, "a snapshot record cannot be written: left out");
                continue;
            }
        };
        out.put_u32(length);
        out.put_u32(crc32fast::hash(&body));
        out.put_slice(&body);
    }
    out.to_vec()
}

/// A bounds-checked reader: `None` means the record is malformed.
struct Reader<'a> {
    bytes: &'a Bytes,
    position: usize,
}

impl Reader<'_> {
    fn take(&mut self, count: usize) -> Option<Bytes> {
        let end = self
            .position
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len())?;
        let slice = self.bytes.slice(self.position..end);
        self.position = end;
        Some(slice)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let length = self.u32()? as usize;
        self.take(length)
    }
    fn string(&mut self) -> Option<ByteString> {
        ByteString::try_from(self.bytes()?).ok()
    }
    fn message(&mut self, now_ms: u64) -> Option<Message> {
        let encoded = self.bytes()?;
        let options = DecodeOptions {
            version: ProtocolVersion::V5,
            max_packet_size: mqtt::PACKET_SIZE_MAX,
            sender: Sender::Server,
        };
        let (Packet::Publish(publish), _) = mqtt::decode(&encoded, &options).ok()?? else {
            return None;
        };
        Some(Message::from_publish(publish, now_ms, None))
    }

    fn delivery(&mut self, now_ms: u64) -> Option<SavedDelivery> {
        let message = self.message(now_ms)?;
        let count = self.u16()?;
        let subscription_identifiers =
            (0..count).map(|_| self.u32()).collect::<Option<Vec<_>>>()?;
        Some(SavedDelivery {
            message,
            subscription_identifiers,
        })
    }
}

fn decode_body(body: Bytes, now_ms: u64) -> Option<Record> {
    let mut reader = Reader {
        bytes: &body,
        position: 0,
    };
    let record = match reader.u8()? {
        KIND_SESSION => {
            let client_id = reader.string()?;
            let version = match reader.u8()? {
                3 => ProtocolVersion::V3_1,
                4 => ProtocolVersion::V3_1_1,
                5 => ProtocolVersion::V5,
                _ => return None,
            };
            let expiry_seconds = reader.u32()?;
            let subscriptions = (0..reader.u32()?)
                .map(|_| {
                    let filter = reader.string()?;
                    let options = options_from(reader.u8()?)?;
                    let identifier = Some(reader.u32()?).filter(|&id| id != 0);
                    Some((filter, options, identifier))
                })
                .collect::<Option<Vec<_>>>()?;
            let inflight = (0..reader.u32()?)
                .map(|_| {
                    let packet_id = reader.u16()?;
                    let released = reader.u8()? == 1;
                    Some(SavedInflight {
                        packet_id,
                        released,
                        delivery: reader.delivery(now_ms)?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            let queue = (0..reader.u32()?)
                .map(|_| reader.delivery(now_ms))
                .collect::<Option<Vec<_>>>()?;
            Record::Session(SavedSession {
                client_id,
                version,
                expiry_seconds,
                subscriptions,
                inflight,
                queue,
            })
        }
        KIND_RETAINED => Record::Retained(reader.message(now_ms)?),
        _ => return None,
    };
    (reader.position == body.len()).then_some(record)
}

/// Reads a snapshot: the records, and a warning if the file was not whole (a torn or corrupt
/// tail is cut at the last good record).
pub fn decode(bytes: &[u8], now_ms: u64) -> Result<(Vec<Record>, Option<String>), String> {
    if !bytes.starts_with(MAGIC) {
        return Err("not a shardmq snapshot (bad magic)".into());
    }
    let bytes = Bytes::copy_from_slice(bytes);
    let mut position = MAGIC.len();
    let mut records = Vec::new();
    while position < bytes.len() {
        let problem = (|| {
            let header = bytes
                .get(position..position + 8)
                .ok_or("a record header is cut short")?;
            let length = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
            let end = (position + 8)
                .checked_add(length)
                .filter(|&end| end <= bytes.len())
                .ok_or("a record is cut short")?;
            let body = bytes.slice(position + 8..end);
            if crc32fast::hash(&body) != crc {
                return Err("a record fails its checksum");
            }
            let record = decode_body(body, now_ms).ok_or("a record is malformed")?;
            records.push(record);
            position = end;
            Ok(())
        })();
        if let Err(problem) = problem {
            return Ok((
                records,
                Some(format!(
                    "{problem} at byte {position}; the rest of the snapshot is ignored"
                )),
            ));
        }
    }
    Ok((records, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_net::mqtt::PublishProperties;

    fn message(
        topic: &'static str,
        payload: &'static [u8],
        qos: QoS,
        expires_at_ms: Option<u64>,
    ) -> Message {
        Message {
            topic: ByteString::from_static(topic),
            payload: Bytes::from_static(payload),
            qos,
            retain: false,
            properties: PublishProperties {
                content_type: Some(ByteString::from_static("text/plain")),
                user_properties: vec![(ByteString::from_static("k"), ByteString::from_static("v"))],
                ..PublishProperties::default()
            },
            expires_at_ms,
            publisher: None,
        }
    }

    fn sample() -> Vec<Record> {
        let delivery = |payload| SavedDelivery {
            message: message("q/t", payload, QoS::AtLeastOnce, None),
            subscription_identifiers: vec![7],
        };
        vec![
            Record::Session(SavedSession {
                client_id: ByteString::from_static("keeper"),
                version: ProtocolVersion::V5,
                expiry_seconds: 3600,
                subscriptions: vec![(
                    ByteString::from_static("q/#"),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                    Some(7),
                )],
                inflight: vec![SavedInflight {
                    packet_id: 9,
                    released: true,
                    delivery: delivery(b"in flight"),
                }],
                queue: vec![delivery(b"queued 1"), delivery(b"queued 2")],
            }),
            Record::Retained(Message {
                retain: true,
                ..message("r/t", b"kept", QoS::AtMostOnce, Some(61_000))
            }),
        ]
    }

    #[test]
    fn a_record_the_format_cannot_hold_is_left_out_and_the_rest_survive() {
        let mut records = sample();
        if let Record::Session(session) = &mut records[0] {
            session.queue[0].subscription_identifiers = vec![1; 70_000];
        }
        let bytes = encode(&records, 0);
        let (read, warning) = decode(&bytes, 0).unwrap();
        assert_eq!(warning, None);
        assert_eq!(read.len(), 1, "only the retained record is written");
        assert!(matches!(read[0], Record::Retained(_)));
    }

    #[test]
    fn records_round_trip_with_expiry_counted_from_the_snapshot() {
        let bytes = encode(&sample(), 1_000);
        // Read back 10 s later on a new clock starting at 0: 60 s were left, 60 s remain.
        let (records, warning) = decode(&bytes, 0).unwrap();
        assert_eq!(warning, None);
        let mut expected = sample();
        if let Record::Retained(message) = &mut expected[1] {
            message.expires_at_ms = Some(60_000);
        }
        assert_eq!(records, expected);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_at_the_last_good_record() {
        let bytes = encode(&sample(), 0);
        for cut in [bytes.len() - 1, bytes.len() - 20, MAGIC.len() + 3] {
            let (records, warning) = decode(&bytes[..cut], 0).unwrap();
            assert!(warning.is_some(), "cut at {cut}");
            assert!(records.len() < 2);
        }
        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 2;
        corrupt[last] ^= 0xFF;
        let (records, warning) = decode(&corrupt, 0).unwrap();
        assert_eq!(
            records.len(),
            1,
            "the session survives; the retained record fails its CRC"
        );
        assert!(warning.unwrap().contains("checksum"));
        assert!(decode(b"something else", 0).is_err());
    }
}
