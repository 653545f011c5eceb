//! CONNECT (MQTT 5.0 §3.1, 3.1.1 §3.1) and CONNACK (§3.2).

use bytes::Bytes;
use bytestring::ByteString;

use super::encode::Sink;
use super::properties::{
    ConnAckProperties, ConnectProperties, Properties, WillProperties, decode_with_auth,
};
use super::wire::Reader;
use super::{DecodeError, ProtocolVersion, QoS, ReasonCode, check_reason, reason, topic};

/// A connection request. Its protocol version is its own: CONNECT is decoded before the
/// connection has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// Clean Start in 5.0, Clean Session in 3.1.1.
    pub clean_start: bool,
    pub keep_alive_seconds: u16,
    /// Always empty before 5.0.
    pub properties: ConnectProperties,
    /// May be empty: the server then assigns one (5.0) or applies the 3.1.1 rules.
    pub client_id: ByteString,
    pub will: Option<Will>,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Always empty before 5.0.
    pub properties: WillProperties,
}

mod flag {
    pub const RESERVED: u8 = 0x01;
    pub const CLEAN_START: u8 = 0x02;
    pub const WILL: u8 = 0x04;
    pub const WILL_QOS_SHIFT: u8 = 3;
    pub const WILL_RETAIN: u8 = 0x20;
    pub const PASSWORD: u8 = 0x40;
    pub const USERNAME: u8 = 0x80;
}

impl Connect {
    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = reader.binary()?;
        let level = reader.u8()?;
        let protocol = match (&name[..], level) {
            (b"MQTT", 4) => ProtocolVersion::V3_1_1,
            (b"MQTT", 5) => ProtocolVersion::V5,
            (b"MQIsdp", 3) => ProtocolVersion::V3_1,
            (b"MQTT" | b"MQIsdp", _) => {
                return Err(DecodeError::new(
                    "MQTT-3.1.2-2",
                    "unsupported Protocol Level",
                    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                ));
            }
            _ => {
                return Err(DecodeError::protocol(
                    "MQTT-3.1.2-1",
                    "unknown Protocol Name",
                ));
            }
        };
        // From here on the peer's version is known, so the error can be answered in kind.
        Self::decode_after_level(reader, protocol).map_err(|mut error| {
            error.connect_version = Some(protocol);
            error
        })
    }

    fn decode_after_level(
        reader: &mut Reader<'_>,
        protocol: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let flags = reader.u8()?;
        if flags & flag::RESERVED != 0 {
            return Err(DecodeError::malformed(
                "MQTT-3.1.2-3",
                "reserved flag set in CONNECT",
            ));
        }
        let will_flag = flags & flag::WILL != 0;
        let will_qos_bits = (flags >> flag::WILL_QOS_SHIFT) & 0b11;
        let will_retain = flags & flag::WILL_RETAIN != 0;
        if !will_flag && will_qos_bits != 0 {
            return Err(DecodeError::malformed(
                "MQTT-3.1.2-11",
                "Will QoS set without the Will Flag",
            ));
        }
        if !will_flag && will_retain {
            return Err(DecodeError::malformed(
                "MQTT-3.1.2-13",
                "Will Retain set without the Will Flag",
            ));
        }
        let Some(will_qos) = QoS::from_bits(will_qos_bits) else {
            return Err(DecodeError::malformed("MQTT-3.1.2-12", "Will QoS of 3"));
        };
        let has_username = flags & flag::USERNAME != 0;
        let has_password = flags & flag::PASSWORD != 0;
        if !protocol.is_v5() && has_password && !has_username {
            return Err(DecodeError::malformed(
                "MQTT-3.1.2-22",
                "Password Flag set without the User Name Flag (3.1.1)",
            ));
        }
        let keep_alive_seconds = reader.u16()?;
        let properties = if protocol.is_v5() {
            decode_with_auth::<ConnectProperties>(reader)?
        } else {
            ConnectProperties::default()
        };
        let client_id = reader.string()?;
        let will = if will_flag {
            let properties = if protocol.is_v5() {
                WillProperties::decode(reader)?
            } else {
                WillProperties::default()
            };
            let topic = reader.string()?;
            topic::validate_name(&topic)?;
            let payload = reader.binary()?;
            Some(Will {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = has_username.then(|| reader.string()).transpose()?;
        let password = has_password.then(|| reader.binary()).transpose()?;
        reader.finish("bytes after the last field of CONNECT")?;
        Ok(Self {
            protocol,
            clean_start: flags & flag::CLEAN_START != 0,
            keep_alive_seconds,
            properties,
            client_id,
            will,
            username,
            password,
        })
    }

    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean_start {
            flags |= flag::CLEAN_START;
        }
        if let Some(will) = &self.will {
            flags |= flag::WILL | (will.qos as u8) << flag::WILL_QOS_SHIFT;
            if will.retain {
                flags |= flag::WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= flag::USERNAME;
        }
        if self.password.is_some() {
            flags |= flag::PASSWORD;
        }
        flags
    }

    pub(crate) fn write<S: Sink>(&self, sink: &mut S) {
        let v5 = self.protocol.is_v5();
        sink.field(self.protocol.protocol_name().as_bytes());
        sink.u8(self.protocol.level());
        sink.u8(self.flags());
        sink.u16(self.keep_alive_seconds);
        if v5 {
            sink.properties(&self.properties);
        }
        sink.field(self.client_id.as_bytes());
        if let Some(will) = &self.will {
            if v5 {
                sink.properties(&will.properties);
            }
            sink.field(will.topic.as_bytes());
            sink.field(&will.payload);
        }
        if let Some(username) = &self.username {
            sink.field(username.as_bytes());
        }
        if let Some(password) = &self.password {
            sink.field(password);
        }
    }
}

/// The answer to CONNECT. Before 5.0 the reason code travels as a CONNACK return code
/// ([`ReasonCode::to_connack_return_code`]) and the properties are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason: ReasonCode,
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let flags = reader.u8()?;
        if flags & 0xFE != 0 {
            return Err(DecodeError::malformed(
                "MQTT-3.2.2-1",
                "reserved CONNACK acknowledge flags are not 0",
            ));
        }
        let code = reader.u8()?;
        let reason = if version.is_v5() {
            check_reason(code, reason::valid::CONNACK, "§3.2.2.2")?
        } else {
            ReasonCode::from_connack_return_code(code).ok_or(DecodeError::malformed(
                "§3.2.2.3",
                "reserved CONNACK return code",
            ))?
        };
        let session_present = flags & 1 == 1;
        if session_present && reason != ReasonCode::SUCCESS {
            return Err(DecodeError::protocol(
                "MQTT-3.2.2-6",
                "Session Present set in a refusing CONNACK",
            ));
        }
        let properties = if version.is_v5() {
            decode_with_auth::<ConnAckProperties>(reader)?
        } else {
            ConnAckProperties::default()
        };
        reader.finish("bytes after the last field of CONNACK")?;
        Ok(Self {
            session_present,
            reason,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        sink.u8(u8::from(self.session_present));
        if version.is_v5() {
            sink.u8(self.reason.0);
            sink.properties(&self.properties);
        } else {
            sink.u8(self.reason.to_connack_return_code());
        }
    }
}
