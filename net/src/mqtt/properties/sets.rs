//! The property set of each packet type (MQTT 5.0 §3.x.2.x): which identifiers it may carry,
//! how it describes itself to the encoder, and where each decoded value goes.
//!
//! Invariant: `write` and `set` cover exactly the identifiers of `ALLOWED`, so a set decodes
//! to what it encodes.

use bytes::Bytes;
use bytestring::ByteString;

use super::{AuthenticationFields, Properties, Value, id, mask, unexpected};
use crate::mqtt::DecodeError;
use crate::mqtt::encode::Sink;

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
        sink.four_property(id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        sink.two_property(id::RECEIVE_MAXIMUM, self.receive_maximum);
        sink.four_property(id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        sink.two_property(id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        sink.flag_property(
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        sink.flag_property(
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        sink.user_properties(&self.user_properties);
        sink.field_property(
            id::AUTHENTICATION_METHOD,
            string_bytes(&self.authentication_method),
        );
        sink.field_property(id::AUTHENTICATION_DATA, self.authentication_data.as_deref());
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(value.four()?),
            id::RECEIVE_MAXIMUM => self.receive_maximum = Some(value.two()?),
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = Some(value.four()?),
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(value.two()?),
            id::REQUEST_RESPONSE_INFORMATION => {
                self.request_response_information = Some(value.flag()?)
            }
            id::REQUEST_PROBLEM_INFORMATION => {
                self.request_problem_information = Some(value.flag()?)
            }
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(value.utf8()?),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(value.binary()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
        sink.four_property(id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        sink.byte_property(id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        sink.four_property(id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        sink.field_property(id::CONTENT_TYPE, string_bytes(&self.content_type));
        sink.field_property(id::RESPONSE_TOPIC, string_bytes(&self.response_topic));
        sink.field_property(id::CORRELATION_DATA, self.correlation_data.as_deref());
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::WILL_DELAY_INTERVAL => self.will_delay_interval = Some(value.four()?),
            id::PAYLOAD_FORMAT_INDICATOR => self.payload_format_indicator = Some(value.byte()?),
            id::MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval = Some(value.four()?),
            id::CONTENT_TYPE => self.content_type = Some(value.utf8()?),
            id::RESPONSE_TOPIC => self.response_topic = Some(value.utf8()?),
            id::CORRELATION_DATA => self.correlation_data = Some(value.binary()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
        sink.four_property(id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        sink.two_property(id::RECEIVE_MAXIMUM, self.receive_maximum);
        sink.byte_property(id::MAXIMUM_QOS, self.maximum_qos);
        sink.flag_property(id::RETAIN_AVAILABLE, self.retain_available);
        sink.four_property(id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        sink.field_property(
            id::ASSIGNED_CLIENT_IDENTIFIER,
            string_bytes(&self.assigned_client_identifier),
        );
        sink.two_property(id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        sink.reason_string(self.reason_string.as_deref());
        sink.user_properties(&self.user_properties);
        sink.flag_property(
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        sink.flag_property(
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        sink.flag_property(
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        sink.two_property(id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        sink.field_property(
            id::RESPONSE_INFORMATION,
            string_bytes(&self.response_information),
        );
        sink.field_property(id::SERVER_REFERENCE, string_bytes(&self.server_reference));
        sink.field_property(
            id::AUTHENTICATION_METHOD,
            string_bytes(&self.authentication_method),
        );
        sink.field_property(id::AUTHENTICATION_DATA, self.authentication_data.as_deref());
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(value.four()?),
            id::RECEIVE_MAXIMUM => self.receive_maximum = Some(value.two()?),
            id::MAXIMUM_QOS => self.maximum_qos = Some(value.byte()?),
            id::RETAIN_AVAILABLE => self.retain_available = Some(value.flag()?),
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = Some(value.four()?),
            id::ASSIGNED_CLIENT_IDENTIFIER => self.assigned_client_identifier = Some(value.utf8()?),
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(value.two()?),
            id::REASON_STRING => self.reason_string = Some(value.utf8()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                self.wildcard_subscription_available = Some(value.flag()?)
            }
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                self.subscription_identifiers_available = Some(value.flag()?)
            }
            id::SHARED_SUBSCRIPTION_AVAILABLE => {
                self.shared_subscription_available = Some(value.flag()?)
            }
            id::SERVER_KEEP_ALIVE => self.server_keep_alive = Some(value.two()?),
            id::RESPONSE_INFORMATION => self.response_information = Some(value.utf8()?),
            id::SERVER_REFERENCE => self.server_reference = Some(value.utf8()?),
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(value.utf8()?),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(value.binary()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
        sink.byte_property(id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        sink.four_property(id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        sink.two_property(id::TOPIC_ALIAS, self.topic_alias);
        sink.field_property(id::RESPONSE_TOPIC, string_bytes(&self.response_topic));
        sink.field_property(id::CORRELATION_DATA, self.correlation_data.as_deref());
        sink.user_properties(&self.user_properties);
        for &identifier in &self.subscription_identifiers {
            sink.varint_property(id::SUBSCRIPTION_IDENTIFIER, identifier);
        }
        sink.field_property(id::CONTENT_TYPE, string_bytes(&self.content_type));
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::PAYLOAD_FORMAT_INDICATOR => self.payload_format_indicator = Some(value.byte()?),
            id::MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval = Some(value.four()?),
            id::TOPIC_ALIAS => self.topic_alias = Some(value.two()?),
            id::RESPONSE_TOPIC => self.response_topic = Some(value.utf8()?),
            id::CORRELATION_DATA => self.correlation_data = Some(value.binary()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            id::SUBSCRIPTION_IDENTIFIER => self.subscription_identifiers.push(value.four()?),
            id::CONTENT_TYPE => self.content_type = Some(value.utf8()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
        sink.reason_string(self.reason_string.as_deref());
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::REASON_STRING => self.reason_string = Some(value.utf8()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
            sink.varint_property(id::SUBSCRIPTION_IDENTIFIER, identifier);
        }
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::SUBSCRIPTION_IDENTIFIER => self.subscription_identifier = Some(value.four()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
        sink.four_property(id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        sink.reason_string(self.reason_string.as_deref());
        sink.user_properties(&self.user_properties);
        sink.field_property(id::SERVER_REFERENCE, string_bytes(&self.server_reference));
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(value.four()?),
            id::REASON_STRING => self.reason_string = Some(value.utf8()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            id::SERVER_REFERENCE => self.server_reference = Some(value.utf8()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
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
        sink.field_property(
            id::AUTHENTICATION_METHOD,
            string_bytes(&self.authentication_method),
        );
        sink.field_property(id::AUTHENTICATION_DATA, self.authentication_data.as_deref());
        sink.reason_string(self.reason_string.as_deref());
        sink.user_properties(&self.user_properties);
    }

    fn set(&mut self, identifier: u8, value: Value) -> Result<(), DecodeError> {
        match identifier {
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(value.utf8()?),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(value.binary()?),
            id::REASON_STRING => self.reason_string = Some(value.utf8()?),
            id::USER_PROPERTY => self.user_properties.push(value.pair()?),
            other => return Err(unexpected(other)),
        }
        Ok(())
    }
}

impl AuthenticationFields for AuthProperties {
    fn authentication(&self) -> (&Option<ByteString>, &Option<Bytes>) {
        (&self.authentication_method, &self.authentication_data)
    }
}
