//! MQTT 5 properties (MQTT 5.0 §2.2.2): one reader that enforces the rules every property
//! obeys, and one struct per packet type that holds the properties that packet may carry.
//!
//! The reader rejects an identifier the packet may not carry (a malformed packet), a property
//! given twice where the specification allows it once (a protocol error), and values out of
//! their range. Each struct writes itself through a [`Sink`] twice, once counting and once
//! writing, so encoding needs no scratch buffer.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::wire::{Reader, field_len, put_field, put_varint, varint_len};
use super::{DecodeError, ReasonCode};

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

// The reader only yields values of the kind `kind_of` gives for the identifier, and each
// packet's decoder matches identifiers of that kind only, so a mismatch is a bug here.
impl Value {
    fn byte(self) -> u8 {
        match self {
            Value::Byte(value) => value,
            other => unreachable!("expected a byte property, got {other:?}"),
        }
    }
    fn flag(self) -> bool {
        self.byte() == 1
    }
    fn two(self) -> u16 {
        match self {
            Value::Two(value) => value,
            other => unreachable!("expected a two-byte property, got {other:?}"),
        }
    }
    fn four(self) -> u32 {
        match self {
            Value::Four(value) => value,
            other => unreachable!("expected a four-byte property, got {other:?}"),
        }
    }
    fn utf8(self) -> ByteString {
        match self {
            Value::Utf8(value) => value,
            other => unreachable!("expected a string property, got {other:?}"),
        }
    }
    fn binary(self) -> Bytes {
        match self {
            Value::Binary(value) => value,
            other => unreachable!("expected a binary property, got {other:?}"),
        }
    }
    fn pair(self) -> (ByteString, ByteString) {
        match self {
            Value::Pair(key, value) => (key, value),
            other => unreachable!("expected a string pair property, got {other:?}"),
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
        let kind = kind_of(identifier).expect("allowed sets hold only known identifiers");
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

/// Where a property set writes itself: a [`Counter`] for the length pass, a [`Writer`] for the
/// bytes.
pub(crate) trait Sink {
    fn byte(&mut self, identifier: u8, value: u8);
    fn two(&mut self, identifier: u8, value: u16);
    fn four(&mut self, identifier: u8, value: u32);
    fn varint(&mut self, identifier: u8, value: u32);
    fn field(&mut self, identifier: u8, value: &[u8]);
    fn pair(&mut self, identifier: u8, key: &[u8], value: &[u8]);

    fn byte_opt(&mut self, identifier: u8, value: Option<u8>) {
        if let Some(value) = value {
            self.byte(identifier, value);
        }
    }
    fn flag_opt(&mut self, identifier: u8, value: Option<bool>) {
        self.byte_opt(identifier, value.map(u8::from));
    }
    fn two_opt(&mut self, identifier: u8, value: Option<u16>) {
        if let Some(value) = value {
            self.two(identifier, value);
        }
    }
    fn four_opt(&mut self, identifier: u8, value: Option<u32>) {
        if let Some(value) = value {
            self.four(identifier, value);
        }
    }
    fn field_opt(&mut self, identifier: u8, value: Option<&[u8]>) {
        if let Some(value) = value {
            self.field(identifier, value);
        }
    }
    fn user_properties(&mut self, pairs: &[(ByteString, ByteString)]) {
        for (key, value) in pairs {
            self.pair(id::USER_PROPERTY, key.as_bytes(), value.as_bytes());
        }
    }
}

struct Counter(usize);

impl Sink for Counter {
    fn byte(&mut self, _: u8, _: u8) {
        self.0 += 2;
    }
    fn two(&mut self, _: u8, _: u16) {
        self.0 += 3;
    }
    fn four(&mut self, _: u8, _: u32) {
        self.0 += 5;
    }
    fn varint(&mut self, _: u8, value: u32) {
        self.0 += 1 + varint_len(value);
    }
    fn field(&mut self, _: u8, value: &[u8]) {
        self.0 += 1 + field_len(value);
    }
    fn pair(&mut self, _: u8, key: &[u8], value: &[u8]) {
        self.0 += 1 + field_len(key) + field_len(value);
    }
}

struct Writer<'a>(&'a mut BytesMut);

impl Sink for Writer<'_> {
    fn byte(&mut self, identifier: u8, value: u8) {
        self.0.put_u8(identifier);
        self.0.put_u8(value);
    }
    fn two(&mut self, identifier: u8, value: u16) {
        self.0.put_u8(identifier);
        self.0.put_u16(value);
    }
    fn four(&mut self, identifier: u8, value: u32) {
        self.0.put_u8(identifier);
        self.0.put_u32(value);
    }
    fn varint(&mut self, identifier: u8, value: u32) {
        self.0.put_u8(identifier);
        put_varint(self.0, value);
    }
    fn field(&mut self, identifier: u8, value: &[u8]) {
        self.0.put_u8(identifier);
        put_field(self.0, value);
    }
    fn pair(&mut self, identifier: u8, key: &[u8], value: &[u8]) {
        self.0.put_u8(identifier);
        put_field(self.0, key);
        put_field(self.0, value);
    }
}

/// A packet's property set.
pub(crate) trait Properties: Default {
    /// The identifiers this packet may carry.
    const ALLOWED: u64;
    /// The identifiers that may appear more than once.
    const REPEATABLE: u64 = mask(&[id::USER_PROPERTY]);

    fn write<S: Sink>(&self, sink: &mut S);
    fn set(&mut self, identifier: u8, value: Value);

    /// Reads a property length and the properties it covers.
    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut properties = Self::default();
        let mut properties_reader = PropertyReader::new(reader, Self::ALLOWED, Self::REPEATABLE)?;
        while let Some((identifier, value)) = properties_reader.next()? {
            properties.set(identifier, value);
        }
        Ok(properties)
    }

    /// The length of the properties alone, without the length prefix.
    fn body_len(&self) -> usize {
        let mut counter = Counter(0);
        self.write(&mut counter);
        counter.0
    }

    /// The encoded length with the length prefix.
    fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body as u32) + body
    }

    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.body_len() as u32);
        self.write(&mut Writer(buf));
    }

    /// True when nothing would be written.
    fn is_empty(&self) -> bool {
        self.body_len() == 0
    }
}

/// The length of a reason code and properties that MQTT 5.0 lets the sender shorten (PUBACK
/// family §3.4.2.1, DISCONNECT §3.14.2.1): nothing for `default_reason` without properties, the
/// reason code alone without properties, both otherwise.
pub(crate) fn short_form_len<P: Properties>(
    reason: ReasonCode,
    default_reason: ReasonCode,
    properties: &P,
) -> usize {
    let body = properties.body_len();
    match (reason == default_reason, body) {
        (true, 0) => 0,
        (false, 0) => 1,
        _ => 1 + varint_len(body as u32) + body,
    }
}

/// Writes what [`short_form_len`] counts.
pub(crate) fn encode_short_form<P: Properties>(
    reason: ReasonCode,
    default_reason: ReasonCode,
    properties: &P,
    buf: &mut BytesMut,
) {
    let properties_empty = properties.is_empty();
    if reason == default_reason && properties_empty {
        return;
    }
    buf.put_u8(reason.0);
    if !properties_empty {
        properties.encode(buf);
    }
}

fn unexpected(identifier: u8) -> ! {
    unreachable!("property 0x{identifier:02X} passed the allowed mask but has no field")
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

/// Properties of CONNECT (MQTT 5.0 §3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<bool>,
    pub request_problem_information: Option<bool>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
}

impl Properties for ConnectProperties {
    const ALLOWED: u64 = mask(&[
        id::SESSION_EXPIRY_INTERVAL,
        id::RECEIVE_MAXIMUM,
        id::MAXIMUM_PACKET_SIZE,
        id::TOPIC_ALIAS_MAXIMUM,
        id::REQUEST_RESPONSE_INFORMATION,
        id::REQUEST_PROBLEM_INFORMATION,
        id::USER_PROPERTY,
        id::AUTHENTICATION_METHOD,
        id::AUTHENTICATION_DATA,
    ]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.four_opt(id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        sink.two_opt(id::RECEIVE_MAXIMUM, self.receive_maximum);
        sink.four_opt(id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        sink.two_opt(id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        sink.flag_opt(
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        sink.flag_opt(
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        sink.user_properties(&self.user_properties);
        sink.field_opt(
            id::AUTHENTICATION_METHOD,
            string_bytes(&self.authentication_method),
        );
        sink.field_opt(id::AUTHENTICATION_DATA, self.authentication_data.as_deref());
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(value.four()),
            id::RECEIVE_MAXIMUM => self.receive_maximum = Some(value.two()),
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = Some(value.four()),
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(value.two()),
            id::REQUEST_RESPONSE_INFORMATION => {
                self.request_response_information = Some(value.flag())
            }
            id::REQUEST_PROBLEM_INFORMATION => {
                self.request_problem_information = Some(value.flag())
            }
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(value.utf8()),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(value.binary()),
            other => unexpected(other),
        }
    }
}

impl AuthenticationFields for ConnectProperties {
    fn authentication(&self) -> (&Option<ByteString>, &Option<Bytes>) {
        (&self.authentication_method, &self.authentication_data)
    }
}

/// Properties of the will message in CONNECT (MQTT 5.0 §3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl Properties for WillProperties {
    const ALLOWED: u64 = mask(&[
        id::WILL_DELAY_INTERVAL,
        id::PAYLOAD_FORMAT_INDICATOR,
        id::MESSAGE_EXPIRY_INTERVAL,
        id::CONTENT_TYPE,
        id::RESPONSE_TOPIC,
        id::CORRELATION_DATA,
        id::USER_PROPERTY,
    ]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.four_opt(id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        sink.byte_opt(id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        sink.four_opt(id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        sink.field_opt(id::CONTENT_TYPE, string_bytes(&self.content_type));
        sink.field_opt(id::RESPONSE_TOPIC, string_bytes(&self.response_topic));
        sink.field_opt(id::CORRELATION_DATA, self.correlation_data.as_deref());
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::WILL_DELAY_INTERVAL => self.will_delay_interval = Some(value.four()),
            id::PAYLOAD_FORMAT_INDICATOR => self.payload_format_indicator = Some(value.byte()),
            id::MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval = Some(value.four()),
            id::CONTENT_TYPE => self.content_type = Some(value.utf8()),
            id::RESPONSE_TOPIC => self.response_topic = Some(value.utf8()),
            id::CORRELATION_DATA => self.correlation_data = Some(value.binary()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            other => unexpected(other),
        }
    }
}

fn string_bytes(value: &Option<ByteString>) -> Option<&[u8]> {
    value.as_ref().map(|string| string.as_bytes().as_ref())
}

/// Properties of CONNACK (MQTT 5.0 §3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<ByteString>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<ByteString>,
    pub server_reference: Option<ByteString>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
}

impl Properties for ConnAckProperties {
    const ALLOWED: u64 = mask(&[
        id::SESSION_EXPIRY_INTERVAL,
        id::RECEIVE_MAXIMUM,
        id::MAXIMUM_QOS,
        id::RETAIN_AVAILABLE,
        id::MAXIMUM_PACKET_SIZE,
        id::ASSIGNED_CLIENT_IDENTIFIER,
        id::TOPIC_ALIAS_MAXIMUM,
        id::REASON_STRING,
        id::USER_PROPERTY,
        id::WILDCARD_SUBSCRIPTION_AVAILABLE,
        id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        id::SHARED_SUBSCRIPTION_AVAILABLE,
        id::SERVER_KEEP_ALIVE,
        id::RESPONSE_INFORMATION,
        id::SERVER_REFERENCE,
        id::AUTHENTICATION_METHOD,
        id::AUTHENTICATION_DATA,
    ]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.four_opt(id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        sink.two_opt(id::RECEIVE_MAXIMUM, self.receive_maximum);
        sink.byte_opt(id::MAXIMUM_QOS, self.maximum_qos);
        sink.flag_opt(id::RETAIN_AVAILABLE, self.retain_available);
        sink.four_opt(id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        sink.field_opt(
            id::ASSIGNED_CLIENT_IDENTIFIER,
            string_bytes(&self.assigned_client_identifier),
        );
        sink.two_opt(id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        sink.field_opt(id::REASON_STRING, string_bytes(&self.reason_string));
        sink.user_properties(&self.user_properties);
        sink.flag_opt(
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        sink.flag_opt(
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        sink.flag_opt(
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        sink.two_opt(id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        sink.field_opt(
            id::RESPONSE_INFORMATION,
            string_bytes(&self.response_information),
        );
        sink.field_opt(id::SERVER_REFERENCE, string_bytes(&self.server_reference));
        sink.field_opt(
            id::AUTHENTICATION_METHOD,
            string_bytes(&self.authentication_method),
        );
        sink.field_opt(id::AUTHENTICATION_DATA, self.authentication_data.as_deref());
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(value.four()),
            id::RECEIVE_MAXIMUM => self.receive_maximum = Some(value.two()),
            id::MAXIMUM_QOS => self.maximum_qos = Some(value.byte()),
            id::RETAIN_AVAILABLE => self.retain_available = Some(value.flag()),
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = Some(value.four()),
            id::ASSIGNED_CLIENT_IDENTIFIER => self.assigned_client_identifier = Some(value.utf8()),
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(value.two()),
            id::REASON_STRING => self.reason_string = Some(value.utf8()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                self.wildcard_subscription_available = Some(value.flag())
            }
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                self.subscription_identifiers_available = Some(value.flag())
            }
            id::SHARED_SUBSCRIPTION_AVAILABLE => {
                self.shared_subscription_available = Some(value.flag())
            }
            id::SERVER_KEEP_ALIVE => self.server_keep_alive = Some(value.two()),
            id::RESPONSE_INFORMATION => self.response_information = Some(value.utf8()),
            id::SERVER_REFERENCE => self.server_reference = Some(value.utf8()),
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(value.utf8()),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(value.binary()),
            other => unexpected(other),
        }
    }
}

impl AuthenticationFields for ConnAckProperties {
    fn authentication(&self) -> (&Option<ByteString>, &Option<Bytes>) {
        (&self.authentication_method, &self.authentication_data)
    }
}

/// Properties of PUBLISH (MQTT 5.0 §3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    /// Only from server to client: one per matching subscription that had an identifier.
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<ByteString>,
}

impl Properties for PublishProperties {
    const ALLOWED: u64 = mask(&[
        id::PAYLOAD_FORMAT_INDICATOR,
        id::MESSAGE_EXPIRY_INTERVAL,
        id::TOPIC_ALIAS,
        id::RESPONSE_TOPIC,
        id::CORRELATION_DATA,
        id::USER_PROPERTY,
        id::SUBSCRIPTION_IDENTIFIER,
        id::CONTENT_TYPE,
    ]);
    const REPEATABLE: u64 = mask(&[id::USER_PROPERTY, id::SUBSCRIPTION_IDENTIFIER]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.byte_opt(id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        sink.four_opt(id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        sink.two_opt(id::TOPIC_ALIAS, self.topic_alias);
        sink.field_opt(id::RESPONSE_TOPIC, string_bytes(&self.response_topic));
        sink.field_opt(id::CORRELATION_DATA, self.correlation_data.as_deref());
        sink.user_properties(&self.user_properties);
        for &identifier in &self.subscription_identifiers {
            sink.varint(id::SUBSCRIPTION_IDENTIFIER, identifier);
        }
        sink.field_opt(id::CONTENT_TYPE, string_bytes(&self.content_type));
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::PAYLOAD_FORMAT_INDICATOR => self.payload_format_indicator = Some(value.byte()),
            id::MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval = Some(value.four()),
            id::TOPIC_ALIAS => self.topic_alias = Some(value.two()),
            id::RESPONSE_TOPIC => self.response_topic = Some(value.utf8()),
            id::CORRELATION_DATA => self.correlation_data = Some(value.binary()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            id::SUBSCRIPTION_IDENTIFIER => self.subscription_identifiers.push(value.four()),
            id::CONTENT_TYPE => self.content_type = Some(value.utf8()),
            other => unexpected(other),
        }
    }
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK: a reason string and
/// user properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl Properties for AckProperties {
    const ALLOWED: u64 = mask(&[id::REASON_STRING, id::USER_PROPERTY]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.field_opt(id::REASON_STRING, string_bytes(&self.reason_string));
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::REASON_STRING => self.reason_string = Some(value.utf8()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            other => unexpected(other),
        }
    }
}

/// Properties of SUBSCRIBE (MQTT 5.0 §3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl Properties for SubscribeProperties {
    const ALLOWED: u64 = mask(&[id::SUBSCRIPTION_IDENTIFIER, id::USER_PROPERTY]);

    fn write<S: Sink>(&self, sink: &mut S) {
        if let Some(identifier) = self.subscription_identifier {
            sink.varint(id::SUBSCRIPTION_IDENTIFIER, identifier);
        }
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::SUBSCRIPTION_IDENTIFIER => self.subscription_identifier = Some(value.four()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            other => unexpected(other),
        }
    }
}

/// Properties of UNSUBSCRIBE (MQTT 5.0 §3.10.2.1): user properties only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsubscribeProperties {
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl Properties for UnsubscribeProperties {
    const ALLOWED: u64 = mask(&[id::USER_PROPERTY]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            other => unexpected(other),
        }
    }
}

/// Properties of DISCONNECT (MQTT 5.0 §3.14.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    pub server_reference: Option<ByteString>,
}

impl Properties for DisconnectProperties {
    const ALLOWED: u64 = mask(&[
        id::SESSION_EXPIRY_INTERVAL,
        id::REASON_STRING,
        id::USER_PROPERTY,
        id::SERVER_REFERENCE,
    ]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.four_opt(id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        sink.field_opt(id::REASON_STRING, string_bytes(&self.reason_string));
        sink.user_properties(&self.user_properties);
        sink.field_opt(id::SERVER_REFERENCE, string_bytes(&self.server_reference));
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(value.four()),
            id::REASON_STRING => self.reason_string = Some(value.utf8()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            id::SERVER_REFERENCE => self.server_reference = Some(value.utf8()),
            other => unexpected(other),
        }
    }
}

/// Properties of AUTH (MQTT 5.0 §3.15.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl Properties for AuthProperties {
    const ALLOWED: u64 = mask(&[
        id::AUTHENTICATION_METHOD,
        id::AUTHENTICATION_DATA,
        id::REASON_STRING,
        id::USER_PROPERTY,
    ]);

    fn write<S: Sink>(&self, sink: &mut S) {
        sink.field_opt(
            id::AUTHENTICATION_METHOD,
            string_bytes(&self.authentication_method),
        );
        sink.field_opt(id::AUTHENTICATION_DATA, self.authentication_data.as_deref());
        sink.field_opt(id::REASON_STRING, string_bytes(&self.reason_string));
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) {
        match identifier {
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(value.utf8()),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(value.binary()),
            id::REASON_STRING => self.reason_string = Some(value.utf8()),
            id::USER_PROPERTY => self.user_properties.push(value.pair()),
            other => unexpected(other),
        }
    }
}

impl AuthenticationFields for AuthProperties {
    fn authentication(&self) -> (&Option<ByteString>, &Option<Bytes>) {
        (&self.authentication_method, &self.authentication_data)
    }
}
