//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK (MQTT 5.0 §3.8 to §3.11).

use bytestring::ByteString;

use super::encode::Sink;
use super::properties::{AckProperties, Properties, SubscribeProperties, UnsubscribeProperties};
use super::wire::Reader;
use super::{
    DecodeError, ProtocolVersion, QoS, ReasonCode, check_reason, read_packet_id, reason, topic,
};

/// When retained messages are sent for a new subscription (MQTT 5.0 §3.8.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    SendOnSubscribe = 0,
    /// Send them only if the subscription did not already exist.
    SendIfNew = 1,
    /// Do not send them.
    DoNotSend = 2,
}

/// The options byte of one subscription. Before 5.0 only `qos` exists; the others keep their
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn new(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendOnSubscribe,
        }
    }

    fn decode(byte: u8, version: ProtocolVersion, filter: &str) -> Result<Self, DecodeError> {
        if !version.is_v5() {
            if byte & 0xFC != 0 {
                return Err(DecodeError::malformed(
                    "MQTT-3.8.3-4",
                    "reserved bits of the requested QoS byte are not 0 (3.1.1)",
                ));
            }
        } else if byte & 0xC0 != 0 {
            return Err(DecodeError::malformed(
                "MQTT-3.8.3-5",
                "reserved bits of the Subscription Options are not 0",
            ));
        }
        let Some(qos) = QoS::from_bits(byte & 0b11) else {
            return Err(DecodeError::malformed(
                "§3.8.3.1",
                "subscription with QoS 3",
            ));
        };
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => {
                return Err(DecodeError::protocol("§3.8.3.1", "Retain Handling of 3"));
            }
        };
        let options = Self {
            qos,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        };
        if options.no_local && topic::split_shared(filter).is_some() {
            return Err(DecodeError::protocol(
                "MQTT-3.8.3-4",
                "No Local set on a shared subscription",
            ));
        }
        Ok(options)
    }

    fn encode(&self, version: ProtocolVersion) -> u8 {
        if !version.is_v5() {
            return self.qos as u8;
        }
        self.qos as u8
            | u8::from(self.no_local) << 2
            | u8::from(self.retain_as_published) << 3
            | (self.retain_handling as u8) << 4
    }
}

/// The payload of SUBACK and UNSUBACK: one valid reason code per filter, at least one.
fn read_reasons(
    reader: &mut Reader<'_>,
    valid: &[u8],
    rule: &'static str,
) -> Result<Vec<ReasonCode>, DecodeError> {
    let mut reasons = Vec::with_capacity(reader.remaining());
    while !reader.is_empty() {
        reasons.push(check_reason(reader.u8()?, valid, rule)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::protocol(
            rule,
            "acknowledgement without a reason code",
        ));
    }
    Ok(reasons)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// Always empty before 5.0.
    pub properties: SubscribeProperties,
    /// At least one.
    pub filters: Vec<(ByteString, SubscriptionOptions)>,
}

impl Subscribe {
    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(reader)?;
        let properties = if version.is_v5() {
            SubscribeProperties::decode(reader)?
        } else {
            SubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !reader.is_empty() {
            let filter = reader.string()?;
            topic::validate_filter(&filter)?;
            let options = SubscriptionOptions::decode(reader.u8()?, version, &filter)?;
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(DecodeError::protocol(
                "MQTT-3.8.3-2",
                "SUBSCRIBE without a Topic Filter",
            ));
        }
        Ok(Self {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.packet_id(self.packet_id);
        if version.is_v5() {
            sink.properties(&self.properties);
        }
        if self.filters.is_empty() {
            sink.invalid("[MQTT-3.8.3-2] SUBSCRIBE without a Topic Filter");
        }
        for (filter, options) in &self.filters {
            sink.field(filter.as_bytes());
            sink.u8(options.encode(version));
        }
    }
}

/// The answer to SUBSCRIBE: one reason code per filter, in order. Before 5.0 these are the
/// return codes 0x00, 0x01, 0x02 and 0x80, which 5.0 keeps with the same meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    /// Always empty before 5.0.
    pub properties: AckProperties,
    pub reasons: Vec<ReasonCode>,
}

impl SubAck {
    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(reader)?;
        let (properties, valid) = if version.is_v5() {
            (AckProperties::decode(reader)?, reason::valid::SUBACK)
        } else {
            (AckProperties::default(), reason::valid::SUBACK_V3)
        };
        let reasons = read_reasons(reader, valid, "§3.9.3")?;
        Ok(Self {
            packet_id,
            properties,
            reasons,
        })
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.packet_id(self.packet_id);
        if version.is_v5() {
            sink.properties(&self.properties);
        }
        if self.reasons.is_empty() {
            sink.invalid("§3.9.3 SUBACK without a reason code");
        }
        for reason in &self.reasons {
            sink.u8(reason.0);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    /// Always empty before 5.0.
    pub properties: UnsubscribeProperties,
    /// At least one.
    pub filters: Vec<ByteString>,
}

impl Unsubscribe {
    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(reader)?;
        let properties = if version.is_v5() {
            UnsubscribeProperties::decode(reader)?
        } else {
            UnsubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !reader.is_empty() {
            let filter = reader.string()?;
            topic::validate_filter(&filter)?;
            filters.push(filter);
        }
        if filters.is_empty() {
            return Err(DecodeError::protocol(
                "MQTT-3.10.3-2",
                "UNSUBSCRIBE without a Topic Filter",
            ));
        }
        Ok(Self {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.packet_id(self.packet_id);
        if version.is_v5() {
            sink.properties(&self.properties);
        }
        if self.filters.is_empty() {
            sink.invalid("[MQTT-3.10.3-2] UNSUBSCRIBE without a Topic Filter");
        }
        for filter in &self.filters {
            sink.field(filter.as_bytes());
        }
    }
}

/// The answer to UNSUBSCRIBE. Before 5.0 it carries only the packet identifier, and `reasons`
/// is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: AckProperties,
    pub reasons: Vec<ReasonCode>,
}

impl UnsubAck {
    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(reader)?;
        if !version.is_v5() {
            reader.finish("bytes after the Packet Identifier of UNSUBACK")?;
            return Ok(Self {
                packet_id,
                properties: AckProperties::default(),
                reasons: Vec::new(),
            });
        }
        let properties = AckProperties::decode(reader)?;
        let reasons = read_reasons(reader, reason::valid::UNSUBACK, "§3.11.3")?;
        Ok(Self {
            packet_id,
            properties,
            reasons,
        })
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.packet_id(self.packet_id);
        if version.is_v5() {
            sink.properties(&self.properties);
            if self.reasons.is_empty() {
                sink.invalid("§3.11.3 UNSUBACK without a reason code");
            }
            for reason in &self.reasons {
                sink.u8(reason.0);
            }
        }
    }
}
