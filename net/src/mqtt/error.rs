//! Decoding errors, each naming the normative statement it breaks, and what the peer receives.
//!
//! Rules are cited by their MQTT 5.0 statement number where 5.0 has one (`MQTT-3.1.2-3`), by
//! their MQTT 3.1.1 number where only 3.1.1 has the rule, and by section (`§2.1.4`) where the
//! specification states the rule without numbering it. The reason code is what an MQTT 5 peer
//! is told; [`DecodeError::response`] turns it into what a peer of each version receives.

use std::fmt;

use super::{ProtocolVersion, ReasonCode};

/// A packet that could not be decoded. The connection that sent it is closed; nothing else is
/// affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The normative statement or section broken, e.g. `MQTT-3.1.2-3`.
    pub rule: &'static str,
    /// What was wrong, in a few words.
    pub message: &'static str,
    /// The MQTT 5 reason code the peer gets.
    pub reason: ReasonCode,
    /// The protocol version the failing CONNECT announced, when the decoder got that far.
    /// Always `None` for other packets (their version is the connection's).
    pub connect_version: Option<ProtocolVersion>,
}

impl DecodeError {
    pub(crate) const fn new(rule: &'static str, message: &'static str, reason: ReasonCode) -> Self {
        Self {
            rule,
            message,
            reason,
            connect_version: None,
        }
    }

    pub(crate) const fn malformed(rule: &'static str, message: &'static str) -> Self {
        Self::new(rule, message, ReasonCode::MALFORMED_PACKET)
    }

    pub(crate) const fn protocol(rule: &'static str, message: &'static str) -> Self {
        Self::new(rule, message, ReasonCode::PROTOCOL_ERROR)
    }

    /// What the server sends before it closes the connection, given the connection's state:
    /// `connected` is the version of an accepted CONNECT, or `None` while the error is in the
    /// CONNECT packet itself.
    pub fn response(&self, connected: Option<ProtocolVersion>) -> ErrorResponse {
        match connected {
            Some(ProtocolVersion::V5) => ErrorResponse::Disconnect(self.reason),
            // 3.x has no DISCONNECT from the server: the connection is just closed.
            Some(_) => ErrorResponse::Close,
            None => match self.connect_version {
                // [MQTT-3.1.4-1]: a v5 server may tell a bad CONNECT why in CONNACK.
                Some(ProtocolVersion::V5) => ErrorResponse::ConnackV5(self.reason),
                // 3.1.1 (and a CONNECT whose version is unknown) only has CONNACK return codes
                // for an unacceptable version and a rejected identifier; every other bad
                // CONNECT is closed without a CONNACK [MQTT-3.1.4-1 in 3.1.1].
                _ => match self.reason {
                    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => ErrorResponse::ConnackV3(0x01),
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => ErrorResponse::ConnackV3(0x02),
                    _ => ErrorResponse::Close,
                },
            },
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {} ({})", self.rule, self.message, self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// What the server sends a peer whose packet failed to decode, before closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorResponse {
    /// An MQTT 5 CONNACK with this reason code.
    ConnackV5(ReasonCode),
    /// An MQTT 3.1 / 3.1.1 CONNACK with this return code.
    ConnackV3(u8),
    /// An MQTT 5 DISCONNECT with this reason code.
    Disconnect(ReasonCode),
    /// Nothing: the connection is closed.
    Close,
}
