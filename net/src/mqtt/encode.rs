//! Encoding: every packet describes its body once, through a [`Sink`], and that description
//! runs twice: into a [`Counter`], which measures the body and checks it, then into a
//! [`Writer`], which writes the bytes. One description means the length prefix and the bytes
//! cannot disagree, and no scratch buffer is needed.
//!
//! Owns: [`encode`], [`encode_limited`] and [`EncodeError`]; the rule that the encoder never
//! panics on any packet value.
//! Invariants:
//! - Nothing is written unless the [`Counter`] accepted the whole packet, so a refused packet
//!   leaves the buffer as it was.
//! - Reason Strings and User Properties are cut on a character boundary to fit their 65,535-byte
//!   field: the server builds them from peer input (a topic, a client identifier), and a cut
//!   explanation is better than none. Every other field is the peer's or the application's
//!   data, so one that does not fit its field makes the packet [`EncodeError::Invalid`].
//! - [`encode_limited`] leaves out the Reason String and User Properties of the packets whose
//!   specification says so ([MQTT-3.2.2-19], [MQTT-3.2.2-20] and the same rules of PUBACK,
//!   PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT and AUTH) when they would make the
//!   packet larger than the peer's Maximum Packet Size; a PUBLISH is never changed, only refused
//!   ([MQTT-3.1.2-24]: the server drops it for that client).

use std::fmt;

use bytes::{BufMut, BytesMut};

use super::properties::{Properties, id};
use super::wire::{FIELD_LENGTH_MAX, put_varint, varint_len};
use super::{PACKET_SIZE_MAX, Packet, ProtocolVersion};

/// Why a packet was not encoded. Nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The packet is larger than the peer accepts, even without the Reason String and User
    /// Properties that its type lets the sender leave out. `size` is the smallest size it has.
    TooLarge { size: usize, max_packet_size: u32 },
    /// The packet breaks a rule that no encoding can keep: a field other than a Reason String or
    /// User Property longer than 65,535 bytes, a Variable Byte Integer above 268,435,455, a
    /// Packet Identifier of 0, or a list the packet must not send empty.
    Invalid(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge {
                size,
                max_packet_size,
            } => write!(
                f,
                "packet of {size} bytes is larger than the Maximum Packet Size {max_packet_size}"
            ),
            Self::Invalid(why) => write!(f, "packet cannot be encoded: {why}"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// The longest prefix of `text` that fits a UTF-8 string field, cut on a character boundary.
pub fn cut_to_field(text: &str) -> &str {
    if text.len() <= FIELD_LENGTH_MAX {
        return text;
    }
    let mut end = FIELD_LENGTH_MAX;
    // Index 0 is always a boundary, so the loop ends.
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Where a packet body describes itself: a [`Counter`] for the measuring pass, a [`Writer`]
/// for the bytes.
pub(crate) trait Sink {
    /// Whether Reason Strings and User Properties are written in this pass.
    fn diagnostics(&self) -> bool;
    fn u8(&mut self, value: u8);
    fn u16(&mut self, value: u16);
    fn u32(&mut self, value: u32);
    fn varint(&mut self, value: u32);
    /// A two-byte length and the bytes: a UTF-8 string or binary data that must fit as it is.
    fn field(&mut self, value: &[u8]);
    /// Bytes without a length: a PUBLISH payload.
    fn raw(&mut self, value: &[u8]);
    /// A property length and the properties it covers.
    fn properties<P: Properties>(&mut self, properties: &P);
    /// The packet cannot be encoded: the measuring pass refuses it.
    fn invalid(&mut self, why: &'static str);

    /// A UTF-8 string that the server may shorten: cut to fit its field.
    fn text(&mut self, value: &str) {
        self.field(cut_to_field(value).as_bytes());
    }

    /// A Packet Identifier, which must not be 0 [MQTT-2.2.1-3].
    fn packet_id(&mut self, packet_id: u16) {
        if packet_id == 0 {
            self.invalid("[MQTT-2.2.1-3] Packet Identifier of 0");
        }
        self.u16(packet_id);
    }

    fn byte_property(&mut self, identifier: u8, value: Option<u8>) {
        if let Some(value) = value {
            self.u8(identifier);
            self.u8(value);
        }
    }
    fn flag_property(&mut self, identifier: u8, value: Option<bool>) {
        self.byte_property(identifier, value.map(u8::from));
    }
    fn two_property(&mut self, identifier: u8, value: Option<u16>) {
        if let Some(value) = value {
            self.u8(identifier);
            self.u16(value);
        }
    }
    fn four_property(&mut self, identifier: u8, value: Option<u32>) {
        if let Some(value) = value {
            self.u8(identifier);
            self.u32(value);
        }
    }
    fn varint_property(&mut self, identifier: u8, value: u32) {
        self.u8(identifier);
        self.varint(value);
    }
    fn field_property(&mut self, identifier: u8, value: Option<&[u8]>) {
        if let Some(value) = value {
            self.u8(identifier);
            self.field(value);
        }
    }
    /// The Reason String, left out when this pass drops diagnostics.
    fn reason_string(&mut self, value: Option<&str>) {
        if let Some(value) = value.filter(|_| self.diagnostics()) {
            self.u8(id::REASON_STRING);
            self.text(value);
        }
    }
    /// User Properties, left out when this pass drops diagnostics.
    fn user_properties(&mut self, pairs: &[(bytestring::ByteString, bytestring::ByteString)]) {
        if !self.diagnostics() {
            return;
        }
        for (key, value) in pairs {
            self.u8(id::USER_PROPERTY);
            self.text(key);
            self.text(value);
        }
    }
}

/// Measures a packet body and records the first rule it breaks.
#[derive(Debug)]
pub(crate) struct Counter {
    length: usize,
    diagnostics: bool,
    invalid: Option<&'static str>,
}

impl Counter {
    pub(crate) fn new(diagnostics: bool) -> Self {
        Self {
            length: 0,
            diagnostics,
            invalid: None,
        }
    }

    /// Whether nothing was counted.
    pub(crate) fn is_empty(&self) -> bool {
        self.length == 0
    }

    fn add(&mut self, count: usize) {
        self.length = self.length.saturating_add(count);
    }

    /// The length of `properties` alone, without their length prefix, in a pass that keeps or
    /// drops diagnostics as `diagnostics` says.
    pub(crate) fn properties_len<P: Properties>(properties: &P, diagnostics: bool) -> Self {
        let mut counter = Self::new(diagnostics);
        properties.write(&mut counter);
        counter
    }
}

impl Sink for Counter {
    fn diagnostics(&self) -> bool {
        self.diagnostics
    }
    fn u8(&mut self, _: u8) {
        self.add(1);
    }
    fn u16(&mut self, _: u16) {
        self.add(2);
    }
    fn u32(&mut self, _: u32) {
        self.add(4);
    }
    fn varint(&mut self, value: u32) {
        match varint_len(value) {
            Some(length) => self.add(length),
            None => self.invalid("Variable Byte Integer above 268,435,455"),
        }
    }
    fn field(&mut self, value: &[u8]) {
        if value.len() > FIELD_LENGTH_MAX {
            self.invalid("a UTF-8 string or binary field longer than 65,535 bytes");
        }
        self.add(2);
        self.add(value.len());
    }
    fn raw(&mut self, value: &[u8]) {
        self.add(value.len());
    }
    fn properties<P: Properties>(&mut self, properties: &P) {
        let inner = Self::properties_len(properties, self.diagnostics);
        if let Some(why) = inner.invalid {
            self.invalid(why);
        }
        match u32::try_from(inner.length).ok().and_then(varint_len) {
            Some(prefix) => self.add(prefix),
            None => self.invalid("properties longer than a Variable Byte Integer can count"),
        }
        self.add(inner.length);
    }
    fn invalid(&mut self, why: &'static str) {
        self.invalid.get_or_insert(why);
    }
}

/// Writes a packet body the [`Counter`] has accepted.
struct Writer<'a> {
    buf: &'a mut BytesMut,
    diagnostics: bool,
}

impl Sink for Writer<'_> {
    fn diagnostics(&self) -> bool {
        self.diagnostics
    }
    fn u8(&mut self, value: u8) {
        self.buf.put_u8(value);
    }
    fn u16(&mut self, value: u16) {
        self.buf.put_u16(value);
    }
    fn u32(&mut self, value: u32) {
        self.buf.put_u32(value);
    }
    fn varint(&mut self, value: u32) {
        put_varint(self.buf, value);
    }
    fn field(&mut self, value: &[u8]) {
        // The counter has checked the length, so the cast keeps it.
        self.buf.put_u16(value.len() as u16);
        self.buf.put_slice(value);
    }
    fn raw(&mut self, value: &[u8]) {
        self.buf.put_slice(value);
    }
    fn properties<P: Properties>(&mut self, properties: &P) {
        let length = Counter::properties_len(properties, self.diagnostics).length;
        put_varint(self.buf, length as u32);
        properties.write(self);
    }
    fn invalid(&mut self, _: &'static str) {}
}

/// The whole encoded size of `packet`, fixed header included, in a pass that keeps or drops
/// diagnostics; a body too long for the Remaining Length gives a size above
/// [`PACKET_SIZE_MAX`].
pub(crate) fn measure(
    packet: &Packet,
    version: ProtocolVersion,
    diagnostics: bool,
) -> Result<(usize, usize), EncodeError> {
    let mut counter = Counter::new(diagnostics);
    packet.write_body(version, &mut counter);
    if let Some(why) = counter.invalid {
        return Err(EncodeError::Invalid(why));
    }
    let body = counter.length;
    let prefix = u32::try_from(body).ok().and_then(varint_len).unwrap_or(4);
    Ok((body, body.saturating_add(1 + prefix)))
}

/// Whether the packet's type lets the sender leave out its Reason String and User Properties
/// to fit the receiver's Maximum Packet Size.
fn may_drop_diagnostics(packet: &Packet) -> bool {
    matches!(
        packet,
        Packet::ConnAck(_)
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::Disconnect(_)
            | Packet::Auth(_)
    )
}

/// Appends `packet`, encoded for `version`, to `buf`, if it fits `max_packet_size` (the peer's
/// Maximum Packet Size, fixed header included); returns the bytes written.
///
/// When the packet is too large and its type allows it, the Reason String and User Properties
/// are left out. When even that is too large, or the packet cannot be encoded at all, nothing
/// is written and the error says why: for a PUBLISH the caller then drops the message for that
/// peer [MQTT-3.1.2-24]. Never panics.
pub fn encode_limited(
    packet: &Packet,
    version: ProtocolVersion,
    max_packet_size: u32,
    buf: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let max = max_packet_size.min(PACKET_SIZE_MAX) as usize;
    let mut diagnostics = true;
    let (mut body, mut size) = measure(packet, version, diagnostics)?;
    if size > max && may_drop_diagnostics(packet) {
        diagnostics = false;
        (body, size) = measure(packet, version, diagnostics)?;
    }
    if size > max {
        return Err(EncodeError::TooLarge {
            size,
            max_packet_size,
        });
    }
    buf.reserve(size);
    let start = buf.len();
    buf.put_u8(packet.packet_type() << 4 | packet.flags());
    put_varint(buf, body as u32);
    packet.write_body(version, &mut Writer { buf, diagnostics });
    debug_assert_eq!(buf.len() - start, size, "{} length", packet.name());
    Ok(size)
}

/// Appends `packet`, encoded for `version`, to `buf`, limited only by the largest packet MQTT
/// can describe (Reason String and User Properties are left out past it).
///
/// Never panics. A packet that [`encode_limited`] refuses is not written at all; callers that
/// must know (a PUBLISH for a client with a Maximum Packet Size) use [`encode_limited`].
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) {
    // Ignoring the error is the documented contract: nothing was written.
    let _ = encode_limited(packet, version, PACKET_SIZE_MAX, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_keeps_whole_characters() {
        assert_eq!(cut_to_field("short"), "short");
        let exact = "x".repeat(FIELD_LENGTH_MAX);
        assert_eq!(cut_to_field(&exact).len(), FIELD_LENGTH_MAX);
        // 'é' is two bytes: 32,768 of them end on an odd byte past the field.
        let accents = "é".repeat(32_768);
        let cut = cut_to_field(&accents);
        assert_eq!(cut.len(), FIELD_LENGTH_MAX - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        // A four-byte character across the limit is left out whole.
        let clef = "x".repeat(FIELD_LENGTH_MAX - 2) + "𝄞";
        assert_eq!(cut_to_field(&clef).len(), FIELD_LENGTH_MAX - 2);
    }
}
