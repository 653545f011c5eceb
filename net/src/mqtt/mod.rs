//! The MQTT 3.1, 3.1.1 and 5.0 codec: pure functions over bytes, no I/O.
//!
//! Owns: the packet types, their decoding and encoding in each protocol version, the validation
//! rules of the specifications, and topic name and filter rules.
//! Never: touches a socket, a clock or a thread; copies a payload (payloads and strings are
//! `Bytes` slices of the input); panics on anything a peer sends.
//!
//! Decoding is incremental: [`decode`] returns `Ok(None)` until the buffer holds a whole packet,
//! then the packet and the number of bytes it used. The maximum packet size is enforced from the
//! fixed header alone ([`parse_fixed_header`]), so an oversized packet is refused before its
//! body is buffered. Every failure is a [`DecodeError`] naming the normative statement it
//! breaks and the reason code the peer gets.
//!
//! The protocol version decides the encoding: the same [`Packet`] is written differently for
//! 3.1.1 and 5.0 (5.0 adds reason codes and properties; 3.1.1 has none, and [`encode`] leaves
//! them out). MQTT 3.1 is encoded as 3.1.1 except for CONNECT's protocol name and level.
//! Encoding never panics: [`encode_limited`] fits a packet to the peer's Maximum Packet Size or
//! says why it cannot ([`EncodeError`]); see `encode.rs`.

mod connect;
mod control;
mod encode;
mod error;
pub mod properties;
mod publish;
mod reason;
mod subscribe;
pub mod topic;
pub mod wire;

use bytes::Bytes;

pub use connect::{ConnAck, Connect, Will};
pub use control::{Auth, Disconnect};
pub use encode::{EncodeError, cut_to_field, encode, encode_limited};
pub use error::{DecodeError, ErrorResponse};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
pub use publish::{PubAck, Publish};
pub use reason::ReasonCode;
pub use subscribe::{
    RetainHandling, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};

/// The MQTT protocol versions, by the Protocol Level byte of CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (protocol name "MQIsdp", level 3).
    V3_1,
    /// MQTT 3.1.1 (protocol name "MQTT", level 4).
    V3_1_1,
    /// MQTT 5.0 (protocol name "MQTT", level 5).
    V5,
}

impl ProtocolVersion {
    pub fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    pub fn protocol_name(self) -> &'static str {
        match self {
            Self::V3_1 => "MQIsdp",
            _ => "MQTT",
        }
    }

    pub fn is_v5(self) -> bool {
        self == Self::V5
    }
}

/// Quality of service (MQTT 5.0 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a two-bit value; `None` for 3, which no version allows.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// Which side sent the bytes being decoded: a server decodes what clients send, a client (the
/// load generator) decodes what servers send. Packets that may only flow the other way are a
/// protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
}

/// What the decoder needs to know about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// The version of the accepted CONNECT. CONNECT itself carries its version and ignores this.
    pub version: ProtocolVersion,
    /// The largest whole packet accepted, fixed header included (MQTT 5.0 §3.1.2.11.4).
    pub max_packet_size: u32,
    pub sender: Sender,
}

/// The largest packet the Remaining Length can describe, plus a five-byte fixed header.
pub const PACKET_SIZE_MAX: u32 = wire::VARINT_MAX + 5;

/// Control packet types (MQTT 5.0 §2.1.2).
pub mod packet_type {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// One MQTT control packet. CONNECT and CONNACK are boxed: they are large, rare, and would
/// otherwise make every `Packet` as big as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubAck),
    PubRel(PubAck),
    PubComp(PubAck),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn packet_type(&self) -> u8 {
        use packet_type::*;
        match self {
            Packet::Connect(_) => CONNECT,
            Packet::ConnAck(_) => CONNACK,
            Packet::Publish(_) => PUBLISH,
            Packet::PubAck(_) => PUBACK,
            Packet::PubRec(_) => PUBREC,
            Packet::PubRel(_) => PUBREL,
            Packet::PubComp(_) => PUBCOMP,
            Packet::Subscribe(_) => SUBSCRIBE,
            Packet::SubAck(_) => SUBACK,
            Packet::Unsubscribe(_) => UNSUBSCRIBE,
            Packet::UnsubAck(_) => UNSUBACK,
            Packet::PingReq => PINGREQ,
            Packet::PingResp => PINGRESP,
            Packet::Disconnect(_) => DISCONNECT,
            Packet::Auth(_) => AUTH,
        }
    }

    /// The packet's name as the specification writes it.
    pub fn name(&self) -> &'static str {
        packet_name(self.packet_type())
    }

    /// The flags in the low four bits of the fixed header.
    fn flags(&self) -> u8 {
        match self {
            Packet::Publish(publish) => publish.flags(),
            Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
            _ => 0,
        }
    }

    /// Describes the body (everything after the fixed header) to `sink`.
    fn write_body<S: encode::Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        match self {
            Packet::Connect(connect) => connect.write(sink),
            Packet::ConnAck(connack) => connack.write(version, sink),
            Packet::Publish(publish) => publish.write(version, sink),
            Packet::PubAck(ack)
            | Packet::PubRec(ack)
            | Packet::PubRel(ack)
            | Packet::PubComp(ack) => ack.write(version, sink),
            Packet::Subscribe(subscribe) => subscribe.write(version, sink),
            Packet::SubAck(suback) => suback.write(version, sink),
            Packet::Unsubscribe(unsubscribe) => unsubscribe.write(version, sink),
            Packet::UnsubAck(unsuback) => unsuback.write(version, sink),
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(disconnect) => disconnect.write(version, sink),
            Packet::Auth(auth) => auth.write(version, sink),
        }
    }

    /// The whole encoded size in `version`, fixed header included, as [`encode`] writes it
    /// (Reason Strings and User Properties cut to their fields): what a peer's Maximum Packet
    /// Size is compared with. `usize::MAX` for a packet that cannot be encoded at all, so that
    /// it fits no limit.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        encode::measure(self, version, true).map_or(usize::MAX, |(_, size)| size)
    }
}

pub(crate) fn packet_name(packet_type: u8) -> &'static str {
    use packet_type::*;
    match packet_type {
        CONNECT => "CONNECT",
        CONNACK => "CONNACK",
        PUBLISH => "PUBLISH",
        PUBACK => "PUBACK",
        PUBREC => "PUBREC",
        PUBREL => "PUBREL",
        PUBCOMP => "PUBCOMP",
        SUBSCRIBE => "SUBSCRIBE",
        SUBACK => "SUBACK",
        UNSUBSCRIBE => "UNSUBSCRIBE",
        UNSUBACK => "UNSUBACK",
        PINGREQ => "PINGREQ",
        PINGRESP => "PINGRESP",
        DISCONNECT => "DISCONNECT",
        AUTH => "AUTH",
        _ => "reserved",
    }
}

/// The fixed header of a packet (MQTT 5.0 §2.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// The packet type in the high four bits, its flags in the low four.
    pub first_byte: u8,
    pub remaining_length: u32,
    /// The bytes the fixed header itself takes: 2 to 5.
    pub header_len: usize,
}

impl FixedHeader {
    pub fn packet_type(&self) -> u8 {
        self.first_byte >> 4
    }

    pub fn flags(&self) -> u8 {
        self.first_byte & 0x0F
    }

    /// The whole packet's length: fixed header plus Remaining Length.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_length as usize
    }
}

/// Reads and checks a fixed header: the packet type exists, its reserved flags hold the values
/// the specification lists [MQTT-2.1.3-1], and the whole packet fits `max_packet_size`.
/// `Ok(None)` means the header is not complete yet.
pub fn parse_fixed_header(
    buf: &[u8],
    max_packet_size: u32,
) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    check_type_and_flags(first_byte)?;
    let Some((remaining_length, length_len)) = wire::decode_varint(&buf[1..])? else {
        return Ok(None);
    };
    let header = FixedHeader {
        first_byte,
        remaining_length,
        header_len: 1 + length_len,
    };
    if header.packet_len() as u64 > u64::from(max_packet_size) {
        return Err(DecodeError::new(
            "§3.1.2.11.4",
            "packet larger than the Maximum Packet Size",
            ReasonCode::PACKET_TOO_LARGE,
        ));
    }
    Ok(Some(header))
}

fn check_type_and_flags(first_byte: u8) -> Result<(), DecodeError> {
    use packet_type::*;
    let flags = first_byte & 0x0F;
    match first_byte >> 4 {
        0 => Err(DecodeError::malformed("§2.1.2", "reserved packet type 0")),
        PUBLISH => Ok(()),
        PUBREL if flags != 0b0010 => Err(DecodeError::malformed(
            "MQTT-3.6.1-1",
            "PUBREL fixed header flags are not 0010",
        )),
        SUBSCRIBE if flags != 0b0010 => Err(DecodeError::malformed(
            "MQTT-3.8.1-1",
            "SUBSCRIBE fixed header flags are not 0010",
        )),
        UNSUBSCRIBE if flags != 0b0010 => Err(DecodeError::malformed(
            "MQTT-3.10.1-1",
            "UNSUBSCRIBE fixed header flags are not 0010",
        )),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => Ok(()),
        _ if flags != 0 => Err(DecodeError::malformed(
            "MQTT-2.1.3-1",
            "reserved fixed header flags are not 0",
        )),
        _ => Ok(()),
    }
}

/// Whether `sender` may send packets of this type (MQTT 5.0 Table 2-1, "Direction of flow").
fn check_direction(packet_type: u8, sender: Sender) -> Result<(), DecodeError> {
    use packet_type::*;
    let allowed = match packet_type {
        CONNECT | SUBSCRIBE | UNSUBSCRIBE | PINGREQ => sender == Sender::Client,
        CONNACK | SUBACK | UNSUBACK | PINGRESP => sender == Sender::Server,
        _ => true,
    };
    if allowed {
        Ok(())
    } else if sender == Sender::Client {
        Err(DecodeError::protocol(
            "§2.1.2",
            "a client sent a packet only a server may send",
        ))
    } else {
        Err(DecodeError::protocol(
            "§2.1.2",
            "a server sent a packet only a client may send",
        ))
    }
}

/// Decodes one packet from the start of `buf`: `Ok(None)` until `buf` holds the whole packet,
/// then the packet and the number of bytes it used. Strings and payloads are slices of `buf`.
pub fn decode(
    buf: &Bytes,
    options: &DecodeOptions,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(header) = parse_fixed_header(buf, options.max_packet_size)? else {
        return Ok(None);
    };
    let length = header.packet_len();
    if buf.len() < length {
        return Ok(None);
    }
    let packet = decode_body(&header, buf, options)?;
    Ok(Some((packet, length)))
}

/// Decodes the packet whose checked fixed header is `header` and whose bytes start `buf`.
/// A `buf` shorter than `header.packet_len()` is a truncated packet.
pub fn decode_body(
    header: &FixedHeader,
    buf: &Bytes,
    options: &DecodeOptions,
) -> Result<Packet, DecodeError> {
    use packet_type::*;
    if buf.len() < header.packet_len() {
        return Err(DecodeError::malformed(
            "§2.1.4",
            "the packet is shorter than its Remaining Length",
        ));
    }
    let packet_type = header.packet_type();
    check_direction(packet_type, options.sender)?;
    let mut reader = wire::Reader::new(buf, header.header_len, header.packet_len());
    let version = options.version;
    let packet = match packet_type {
        CONNECT => Packet::Connect(Box::new(Connect::decode(&mut reader)?)),
        CONNACK => Packet::ConnAck(Box::new(ConnAck::decode(&mut reader, version)?)),
        PUBLISH => Packet::Publish(Publish::decode(
            header.flags(),
            &mut reader,
            version,
            options.sender,
        )?),
        PUBACK => Packet::PubAck(PubAck::decode(
            &mut reader,
            version,
            &publish::PUBACK_RULES,
        )?),
        PUBREC => Packet::PubRec(PubAck::decode(
            &mut reader,
            version,
            &publish::PUBREC_RULES,
        )?),
        PUBREL => Packet::PubRel(PubAck::decode(
            &mut reader,
            version,
            &publish::PUBREL_RULES,
        )?),
        PUBCOMP => Packet::PubComp(PubAck::decode(
            &mut reader,
            version,
            &publish::PUBCOMP_RULES,
        )?),
        SUBSCRIBE => Packet::Subscribe(Subscribe::decode(&mut reader, version)?),
        SUBACK => Packet::SubAck(SubAck::decode(&mut reader, version)?),
        UNSUBSCRIBE => Packet::Unsubscribe(Unsubscribe::decode(&mut reader, version)?),
        UNSUBACK => Packet::UnsubAck(UnsubAck::decode(&mut reader, version)?),
        PINGREQ => {
            reader.finish("PINGREQ has a body")?;
            Packet::PingReq
        }
        PINGRESP => {
            reader.finish("PINGRESP has a body")?;
            Packet::PingResp
        }
        DISCONNECT => Packet::Disconnect(Disconnect::decode(&mut reader, version)?),
        AUTH if version.is_v5() => Packet::Auth(Auth::decode(&mut reader)?),
        _ => {
            return Err(DecodeError::malformed(
                "§2.1.2",
                "reserved packet type 15 before MQTT 5",
            ));
        }
    };
    Ok(packet)
}

/// A packet identifier that must not be zero [MQTT-2.2.1-3].
pub(crate) fn read_packet_id(reader: &mut wire::Reader<'_>) -> Result<u16, DecodeError> {
    match reader.u16()? {
        0 => Err(DecodeError::protocol(
            "MQTT-2.2.1-3",
            "Packet Identifier of 0",
        )),
        packet_id => Ok(packet_id),
    }
}

/// Checks a received reason code against the packet's list.
pub(crate) fn check_reason(
    code: u8,
    valid: &[u8],
    rule: &'static str,
) -> Result<ReasonCode, DecodeError> {
    if valid.contains(&code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::protocol(
            rule,
            "reason code not valid for this packet",
        ))
    }
}
