//! DISCONNECT (MQTT 5.0 §3.14) and AUTH (§3.15). PINGREQ and PINGRESP have no body and live in
//! the packet enum alone.

use super::encode::Sink;
use super::properties::{
    AuthProperties, DisconnectProperties, Properties, decode_with_auth, is_empty, write_short_form,
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

    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        if version.is_v5() {
            write_short_form(
                self.reason,
                ReasonCode::NORMAL_DISCONNECTION,
                &self.properties,
                sink,
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

    /// Unlike the short forms of the acknowledgements, AUTH has no form with a reason code but
    /// no property length (§3.15.2.1): both go, or neither.
    pub(crate) fn write<S: Sink>(&self, version: ProtocolVersion, sink: &mut S) {
        if !version.is_v5() {
            sink.invalid("AUTH exists only in MQTT 5");
            return;
        }
        if self.reason == ReasonCode::SUCCESS && is_empty(&self.properties, sink.diagnostics()) {
            return;
        }
        sink.u8(self.reason.0);
        sink.properties(&self.properties);
    }
}
