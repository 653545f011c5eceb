//! PUBLISH (MQTT 5.0 §3.3) and its acknowledgements PUBACK, PUBREC, PUBREL and PUBCOMP
//! (§3.4 to §3.7), which share one layout.

use bytes::Bytes;
use bytestring::ByteString;

use super::encode::Sink;
use super::properties::{AckProperties, Properties, PublishProperties, write_short_form};
use super::wire::Reader;
use super::{
    DecodeError, ProtocolVersion, QoS, ReasonCode, Sender, check_reason, read_packet_id, reason,
    topic,
};

/// An application message on its way to or from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in 5.0 when a Topic Alias stands for it.
    pub topic: ByteString,
    /// Zero for QoS 0, which carries no identifier; never zero otherwise.
    pub packet_id: u16,
    /// Always empty before 5.0.
    pub properties: PublishProperties,
    pub payload: Bytes,
}

impl Publish {
    pub(crate) fn decode(
        flags: u8,
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
        sender: Sender,
    ) -> Result<Self, DecodeError> {
        let Some(qos) = QoS::from_bits((flags >> 1) & 0b11) else {
            return Err(DecodeError::malformed("MQTT-3.3.1-4", "PUBLISH with QoS 3"));
        };
        let dup = flags & 0b1000 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::malformed(
                "MQTT-3.3.1-2",
                "DUP set on a QoS 0 PUBLISH",
            ));
        }
        let topic = reader.string()?;
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            read_packet_id(reader)?
        };
        let properties = if version.is_v5() {
            let properties = PublishProperties::decode(reader)?;
            if sender == Sender::Client && !properties.subscription_identifiers.is_empty() {
                return Err(DecodeError::protocol(
                    "MQTT-3.3.4-6",
                    "a client's PUBLISH contains a Subscription Identifier",
                ));
            }
            properties
        } else {
            PublishProperties::default()
        };
        // An empty Topic Name is a 5.0 client's way to use an established Topic Alias.
        if !(topic.is_empty() && properties.topic_alias.is_some()) {
            topic::validate_name(&topic)?;
        }
        Ok(Self {
            dup,
            qos,
            retain: flags & 1 != 0,
            topic,
            packet_id,
            properties,
            payload: reader.rest(),
        })
    }

    pub(crate) fn flags(&self) -> u8 {
        u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain)
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.field(self.topic.as_bytes());
        if self.qos != QoS::AtMostOnce {
            sink.packet_id(self.packet_id);
        } else if self.packet_id != 0 {
            sink.invalid("[MQTT-2.2.1-2] a QoS 0 PUBLISH with a Packet Identifier");
        }
        if version.is_v5() {
            sink.properties(&self.properties);
        }
        sink.raw(&self.payload);
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: a packet identifier and, in 5.0, a reason code and
/// properties. Success with no properties is written in the short form of 3.1.1 (MQTT 5.0
/// §3.4.2.1: the reason code and properties may be left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PubAck {
    pub packet_id: u16,
    pub reason: ReasonCode,
    pub properties: AckProperties,
}

/// What distinguishes the four acknowledgements when decoding them.
#[derive(Debug)]
pub(crate) struct AckRules {
    valid: &'static [u8],
    rule: &'static str,
}

pub(crate) const PUBACK_RULES: AckRules = AckRules {
    valid: reason::valid::PUBACK,
    rule: "§3.4.2.1",
};
pub(crate) const PUBREC_RULES: AckRules = AckRules {
    valid: reason::valid::PUBACK,
    rule: "§3.5.2.1",
};
pub(crate) const PUBREL_RULES: AckRules = AckRules {
    valid: reason::valid::PUBREL,
    rule: "§3.6.2.1",
};
pub(crate) const PUBCOMP_RULES: AckRules = AckRules {
    valid: reason::valid::PUBREL,
    rule: "§3.7.2.1",
};

impl PubAck {
    /// A successful acknowledgement of `packet_id`.
    pub fn new(packet_id: u16) -> Self {
        Self {
            packet_id,
            ..Self::default()
        }
    }

    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
        rules: &AckRules,
    ) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(reader)?;
        let mut ack = Self::new(packet_id);
        if version.is_v5() && !reader.is_empty() {
            ack.reason = check_reason(reader.u8()?, rules.valid, rules.rule)?;
            if !reader.is_empty() {
                ack.properties = AckProperties::decode(reader)?;
            }
        }
        reader.finish("bytes after the last field of an acknowledgement")?;
        Ok(ack)
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.packet_id(self.packet_id);
        if version.is_v5() {
            write_short_form(self.reason, ReasonCode::SUCCESS, &self.properties, sink);
        }
    }
}
