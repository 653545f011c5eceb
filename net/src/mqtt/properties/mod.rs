//! MQTT 5 properties (MQTT 5.0 §2.2.2): one reader that enforces the rules every property
//! obeys, and (in `sets`) one struct per packet type that holds the properties that packet may
//! carry.
//!
//! The reader rejects an identifier the packet may not carry (a malformed packet), a property
//! given twice where the specification allows it once (a protocol error), and values out of
//! their range. Each struct describes itself once through the encoder's [`Sink`], which
//! measures and then writes it. Nothing here panics on what a peer sends: a value of the wrong
//! kind for its identifier, which the reader cannot produce, is a malformed packet too.

mod sets;

use bytes::Bytes;
use bytestring::ByteString;

use super::encode::{Counter, Sink};
use super::wire::Reader;
use super::{DecodeError, ReasonCode};

pub use sets::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};

/// Property identifiers (MQTT 5.0 Table 2-4).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The largest Subscription Identifier (a Variable Byte Integer of at most four bytes).
pub const SUBSCRIPTION_IDENTIFIER_MAX: u32 = super::wire::VARINT_MAX;

/// The data type of each property (MQTT 5.0 §2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Byte,
    Two,
    Four,
    VarInt,
    Utf8,
    Binary,
    Pair,
}

fn kind_of(identifier: u8) -> Option<Kind> {
    use id::*;
    Some(match identifier {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Kind::Byte,
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => Kind::Two,
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Kind::Four,
        SUBSCRIPTION_IDENTIFIER => Kind::VarInt,
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Kind::Utf8,
        CORRELATION_DATA | AUTHENTICATION_DATA => Kind::Binary,
        USER_PROPERTY => Kind::Pair,
        _ => return None,
    })
}

/// A set of property identifiers as a bit mask (every identifier is below 64).
const fn mask(identifiers: &[u8]) -> u64 {
    let mut bits = 0u64;
    let mut index = 0;
    while index < identifiers.len() {
        bits |= 1 << identifiers[index];
        index += 1;
    }
    bits
}

/// One decoded property value.
#[derive(Debug)]
pub(crate) enum Value {
    Byte(u8),
    Two(u16),
    Four(u32),
    Utf8(ByteString),
    Binary(Bytes),
    Pair(ByteString, ByteString),
}

/// A value of another kind than its identifier has: the reader never yields one (it reads each
/// identifier as `kind_of` says), so this is only reachable through a bug, and it is answered as
/// the malformed packet it would be rather than with a panic.
const WRONG_KIND: DecodeError =
    DecodeError::malformed("§2.2.2.2", "property value of the wrong data type");

impl Value {
    fn byte(self) -> Result<u8, DecodeError> {
        match self {
            Value::Byte(value) => Ok(value),
            _ => Err(WRONG_KIND),
        }
    }
    fn flag(self) -> Result<bool, DecodeError> {
        Ok(self.byte()? == 1)
    }
    fn two(self) -> Result<u16, DecodeError> {
        match self {
            Value::Two(value) => Ok(value),
            _ => Err(WRONG_KIND),
        }
    }
    fn four(self) -> Result<u32, DecodeError> {
        match self {
            Value::Four(value) => Ok(value),
            _ => Err(WRONG_KIND),
        }
    }
    fn utf8(self) -> Result<ByteString, DecodeError> {
        match self {
            Value::Utf8(value) => Ok(value),
            _ => Err(WRONG_KIND),
        }
    }
    fn binary(self) -> Result<Bytes, DecodeError> {
        match self {
            Value::Binary(value) => Ok(value),
            _ => Err(WRONG_KIND),
        }
    }
    fn pair(self) -> Result<(ByteString, ByteString), DecodeError> {
        match self {
            Value::Pair(key, value) => Ok((key, value)),
            _ => Err(WRONG_KIND),
        }
    }
}

/// Reads the property length and then one property at a time, checking each against the
/// packet's allowed set.
struct PropertyReader<'a> {
    reader: Reader<'a>,
    allowed: u64,
    repeatable: u64,
    seen: u64,
}

impl<'a> PropertyReader<'a> {
    fn new(outer: &mut Reader<'a>, allowed: u64, repeatable: u64) -> Result<Self, DecodeError> {
        let length = outer.varint()? as usize;
        Ok(Self {
            reader: outer.sub_reader(length)?,
            allowed,
            repeatable,
            seen: 0,
        })
    }

    fn next(&mut self) -> Result<Option<(u8, Value)>, DecodeError> {
        if self.reader.is_empty() {
            return Ok(None);
        }
        let identifier = self.reader.varint()?;
        let known = u8::try_from(identifier)
            .ok()
            .filter(|&identifier| identifier < 64 && self.allowed & (1 << identifier) != 0);
        let Some(identifier) = known else {
            return Err(DecodeError::malformed(
                "§2.2.2.2",
                "property identifier not valid for this packet",
            ));
        };
        let bit = 1u64 << identifier;
        if self.seen & bit != 0 && self.repeatable & bit == 0 {
            return Err(DecodeError::protocol(
                "§2.2.2.2",
                "property included more than once",
            ));
        }
        self.seen |= bit;
        // The allowed sets hold only known identifiers; an unknown one is refused all the same.
        let Some(kind) = kind_of(identifier) else {
            return Err(DecodeError::malformed(
                "§2.2.2.2",
                "property identifier not valid for this packet",
            ));
        };
        let value = match kind {
            Kind::Byte => Value::Byte(self.reader.u8()?),
            Kind::Two => Value::Two(self.reader.u16()?),
            Kind::Four => Value::Four(self.reader.u32()?),
            Kind::VarInt => Value::Four(self.reader.varint()?),
            Kind::Utf8 => Value::Utf8(self.reader.string()?),
            Kind::Binary => Value::Binary(self.reader.binary()?),
            Kind::Pair => Value::Pair(self.reader.string()?, self.reader.string()?),
        };
        check_value(identifier, &value)?;
        Ok(Some((identifier, value)))
    }
}

/// The range rules of single properties.
fn check_value(identifier: u8, value: &Value) -> Result<(), DecodeError> {
    use id::*;
    match (identifier, value) {
        (
            PAYLOAD_FORMAT_INDICATOR
            | REQUEST_PROBLEM_INFORMATION
            | REQUEST_RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE,
            Value::Byte(byte),
        ) if *byte > 1 => Err(DecodeError::protocol(
            "§2.2.2.2",
            "a property that must be 0 or 1 has another value",
        )),
        (RECEIVE_MAXIMUM, Value::Two(0)) => {
            Err(DecodeError::protocol("§3.1.2.11.3", "Receive Maximum of 0"))
        }
        (MAXIMUM_PACKET_SIZE, Value::Four(0)) => Err(DecodeError::protocol(
            "§3.1.2.11.4",
            "Maximum Packet Size of 0",
        )),
        (SUBSCRIPTION_IDENTIFIER, Value::Four(0)) => Err(DecodeError::protocol(
            "§3.3.2.3.8",
            "Subscription Identifier of 0",
        )),
        (TOPIC_ALIAS, Value::Two(0)) => Err(DecodeError::new(
            "MQTT-3.3.2-8",
            "Topic Alias of 0",
            ReasonCode::TOPIC_ALIAS_INVALID,
        )),
        (RESPONSE_TOPIC, Value::Utf8(topic)) if topic.is_empty() || topic.contains(['+', '#']) => {
            Err(DecodeError::protocol(
                "MQTT-3.3.2-14",
                "Response Topic is not a valid Topic Name",
            ))
        }
        _ => Ok(()),
    }
}

/// A packet's property set.
pub(crate) trait Properties: Default {
    /// The identifiers this packet may carry.
    const ALLOWED: u64;
    /// The identifiers that may appear more than once.
    const REPEATABLE: u64 = mask(&[id::USER_PROPERTY]);

    /// Describes the properties, without their length prefix, to `sink`.
    fn write<S: Sink>(&self, sink: &mut S);
    /// Stores one decoded property; an identifier outside `ALLOWED` or a value of the wrong
    /// kind is a malformed packet.
    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError>;

    /// Reads a property length and the properties it covers.
    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut properties = Self::default();
        let mut properties_reader = PropertyReader::new(reader, Self::ALLOWED, Self::REPEATABLE)?;
        while let Some((identifier, value)) = properties_reader.next()? {
            properties.set(identifier, value)?;
        }
        Ok(properties)
    }
}

/// Describes a reason code and properties that MQTT 5.0 lets the sender shorten (PUBACK family
/// §3.4.2.1, DISCONNECT §3.14.2.1): nothing for `default_reason` without properties, the reason
/// code alone without properties, both otherwise. Whether there are properties depends on the
/// pass: one that drops diagnostics may leave none.
pub(crate) fn write_short_form<P: Properties, S: Sink>(
    reason: ReasonCode,
    default_reason: ReasonCode,
    properties: &P,
    sink: &mut S,
) {
    let properties_empty = Counter::properties_len(properties, sink.diagnostics()).is_empty();
    if reason == default_reason && properties_empty {
        return;
    }
    sink.u8(reason.0);
    if !properties_empty {
        sink.properties(properties);
    }
}

/// Whether `properties` write nothing in a pass that keeps or drops diagnostics.
pub(crate) fn is_empty<P: Properties>(properties: &P, diagnostics: bool) -> bool {
    Counter::properties_len(properties, diagnostics).is_empty()
}

fn unexpected(_identifier: u8) -> DecodeError {
    DecodeError::malformed("§2.2.2.2", "property identifier not valid for this packet")
}

/// A property that needs another one: authentication data without a method.
fn check_authentication(
    method: &Option<ByteString>,
    data: &Option<Bytes>,
) -> Result<(), DecodeError> {
    if data.is_some() && method.is_none() {
        return Err(DecodeError::protocol(
            "§3.1.2.11.10",
            "Authentication Data without Authentication Method",
        ));
    }
    Ok(())
}

pub(crate) fn decode_with_auth<P: Properties + AuthenticationFields>(
    reader: &mut Reader<'_>,
) -> Result<P, DecodeError> {
    let properties = P::decode(reader)?;
    let (method, data) = properties.authentication();
    check_authentication(method, data)?;
    Ok(properties)
}

pub(crate) trait AuthenticationFields {
    fn authentication(&self) -> (&Option<ByteString>, &Option<Bytes>);
}
