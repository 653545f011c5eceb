//! DISCONNECT (MQTT 5.0 §3.14) and AUTH (§3.15). PINGREQ and PINGRESP have no body and live in
//! the packet enum alone.

use bytes::{BufMut, BytesMut};

use super::properties::{
    AuthProperties, DisconnectProperties, Properties, decode_with_auth, encode_short_form,
    short_form_len,
};
use super::wire::Reader;
use super::{DecodeError, ProtocolVersion, ReasonCode, check_reason, reason};

/// The end of a connection. Before 5.0 it has no body and only clients send it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: DisconnectProperties,
}

impl Disconnect {
    pub fn new(reason: ReasonCode) -> Self {
        Self {
            reason,
            properties: DisconnectProperties::default(),
        }
    }

    pub(crate) fn decode(
        reader: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let mut disconnect = Self::default();
        // A 5.0 DISCONNECT of length 0 means Normal disconnection (§3.14.2.1).
        if version.is_v5() && !reader.is_empty() {
            disconnect.reason = check_reason(reader.u8()?, reason::valid::DISCONNECT, "§3.14.2.1")?;
            if !reader.is_empty() {
                disconnect.properties = DisconnectProperties::decode(reader)?;
            }
        }
        reader.finish("bytes after the last field of DISCONNECT")?;
        Ok(disconnect)
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5() {
            return 0;
        }
        short_form_len(
            self.reason,
            ReasonCode::NORMAL_DISCONNECTION,
            &self.properties,
        )
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        if version.is_v5() {
            encode_short_form(
                self.reason,
                ReasonCode::NORMAL_DISCONNECTION,
                &self.properties,
                buf,
            );
        }
    }
}

/// Extended authentication, 5.0 only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut auth = Self::default();
        // An AUTH of length 0 means Success with no properties (§3.15.2.1).
        if !reader.is_empty() {
            auth.reason = check_reason(reader.u8()?, reason::valid::AUTH, "§3.15.2.1")?;
            auth.properties = decode_with_auth::<AuthProperties>(reader)?;
        }
        reader.finish("bytes after the last field of AUTH")?;
        Ok(auth)
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        assert!(version.is_v5(), "AUTH exists only in MQTT 5");
        if self.reason == ReasonCode::SUCCESS && self.properties.is_empty() {
            0
        } else {
            1 + self.properties.encoded_len()
        }
    }

    pub(crate) fn encode_body(&self, buf: &mut BytesMut) {
        if self.reason == ReasonCode::SUCCESS && self.properties.is_empty() {
            return;
        }
        buf.put_u8(self.reason.0);
        self.properties.encode(buf);
    }
}
