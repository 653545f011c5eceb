//! Fuzzes the paths that build responses, not only the decoder. The input is:
//!
//! - byte 0: the connection's version (as in the `decode` target; the high bit makes the
//!   server the sender),
//! - byte 1: how many times (1 to 256) a response quotes the peer's strings, so that short
//!   inputs reach the 65,535-byte limit of a UTF-8 string field,
//! - bytes 2..6: the peer's Maximum Packet Size, big-endian,
//! - the rest: a byte stream decoded packet after packet.
//!
//! For every decoded packet (and for every decoding error) the target builds the responses a
//! server builds from it (acknowledgements with reason strings and user properties copied
//! from the input, a DISCONNECT whose reason string quotes the topic, a CONNACK with
//! properties, the PUBLISH forwarded to a subscriber) and encodes each with the given maximum.
//! The encoder must never panic; when it writes, the bytes fit the maximum, are exactly what it
//! reported, and decode again to a packet of the same type, identifier and reason code; when it
//! refuses, it writes nothing.

#![no_main]

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use libfuzzer_sys::fuzz_target;
use shardmq_net::mqtt::{
    self, AckProperties, Auth, ConnAck, DecodeError, DecodeOptions, Disconnect, EncodeError,
    Packet, ProtocolVersion, PubAck, ReasonCode, Sender, SubAck, UnsubAck,
};

/// Builds strings that quote the peer's input `repeat` times.
struct Quoter {
    repeat: usize,
}

impl Quoter {
    fn quote(&self, what: &str, text: &str) -> ByteString {
        ByteString::from(format!("{what} {} refused", text.repeat(self.repeat)))
    }

    fn properties(
        &self,
        what: &str,
        text: &str,
        pairs: &[(ByteString, ByteString)],
    ) -> AckProperties {
        let mut user_properties = pairs.to_vec();
        user_properties.push((
            ByteString::from(text.repeat(self.repeat)),
            self.quote(what, text),
        ));
        AckProperties {
            reason_string: Some(self.quote(what, text)),
            user_properties,
        }
    }
}

fn responses(packet: &Packet, quoter: &Quoter, version: ProtocolVersion) -> Vec<Packet> {
    let disconnect = |why: ByteString, reason: ReasonCode| {
        let mut disconnect = Disconnect::new(reason);
        disconnect.properties.reason_string = Some(why);
        Packet::Disconnect(disconnect)
    };
    match packet {
        Packet::Connect(connect) => {
            let mut connack = ConnAck::default();
            let properties = &mut connack.properties;
            properties.assigned_client_identifier = Some(connect.client_id.clone());
            properties.response_information =
                Some(ByteString::from(format!("reply/{}", connect.client_id)));
            properties.reason_string = Some(quoter.quote("CONNECT of", &connect.client_id));
            properties.user_properties = connect.properties.user_properties.clone();
            properties.maximum_packet_size = connect.properties.maximum_packet_size;
            properties.receive_maximum = connect.properties.receive_maximum;
            properties.authentication_method = connect.properties.authentication_method.clone();
            properties.authentication_data = connect.properties.authentication_data.clone();
            let mut refusal = ConnAck {
                reason: ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                ..ConnAck::default()
            };
            refusal.properties.reason_string = properties.reason_string.clone();
            vec![
                Packet::ConnAck(Box::new(connack)),
                Packet::ConnAck(Box::new(refusal)),
            ]
        }
        Packet::Publish(publish) => {
            let properties = quoter.properties(
                "PUBLISH to",
                &publish.topic,
                &publish.properties.user_properties,
            );
            let mut out = vec![
                disconnect(
                    quoter.quote("PUBLISH to", &publish.topic),
                    ReasonCode::TOPIC_NAME_INVALID,
                ),
                // The message as a subscriber gets it.
                Packet::Publish(publish.clone()),
            ];
            if publish.packet_id != 0 {
                let ack = PubAck {
                    packet_id: publish.packet_id,
                    reason: ReasonCode::QUOTA_EXCEEDED,
                    properties,
                };
                out.push(Packet::PubAck(ack.clone()));
                out.push(Packet::PubRec(ack));
            }
            out
        }
        Packet::PubRec(ack) | Packet::PubRel(ack) => {
            let properties = quoter.properties(
                "acknowledgement",
                ack.properties.reason_string.as_deref().unwrap_or(""),
                &ack.properties.user_properties,
            );
            vec![
                Packet::PubRel(PubAck {
                    packet_id: ack.packet_id,
                    reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                    properties: properties.clone(),
                }),
                Packet::PubComp(PubAck {
                    packet_id: ack.packet_id,
                    reason: ReasonCode::SUCCESS,
                    properties,
                }),
            ]
        }
        Packet::Subscribe(subscribe) => {
            let filters: Vec<&str> = subscribe
                .filters
                .iter()
                .map(|(filter, _)| &**filter)
                .collect();
            vec![Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                properties: quoter.properties(
                    "SUBSCRIBE to",
                    &filters.join(","),
                    &subscribe.properties.user_properties,
                ),
                reasons: subscribe
                    .filters
                    .iter()
                    .map(|(_, options)| ReasonCode(options.qos as u8))
                    .collect(),
            })]
        }
        Packet::Unsubscribe(unsubscribe) => {
            let filters: Vec<&str> = unsubscribe.filters.iter().map(|filter| &**filter).collect();
            vec![Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                properties: quoter.properties(
                    "UNSUBSCRIBE from",
                    &filters.join(","),
                    &unsubscribe.properties.user_properties,
                ),
                reasons: if version.is_v5() {
                    vec![ReasonCode::NO_SUBSCRIPTION_EXISTED; filters.len()]
                } else {
                    Vec::new()
                },
            })]
        }
        Packet::Auth(auth) => {
            let mut reply = Auth {
                reason: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: auth.properties.clone(),
            };
            let method = auth
                .properties
                .authentication_method
                .as_deref()
                .unwrap_or("");
            reply.properties.reason_string = Some(quoter.quote("method", method));
            vec![Packet::Auth(reply)]
        }
        Packet::Disconnect(received) => {
            let mut reply = received.clone();
            let why = received.properties.reason_string.as_deref().unwrap_or("");
            reply.properties.reason_string = Some(quoter.quote("DISCONNECT", why));
            vec![Packet::Disconnect(reply)]
        }
        _ => Vec::new(),
    }
}

/// The DISCONNECT a server sends for a packet that failed to decode.
fn error_response(error: &DecodeError, quoter: &Quoter) -> Packet {
    let mut disconnect = Disconnect::new(error.reason);
    disconnect.properties.reason_string =
        Some(quoter.quote(&format!("[{}]", error.rule), error.message));
    Packet::Disconnect(disconnect)
}

/// What identifies a response apart from its diagnostics, which the encoder may drop or cut.
fn identity(packet: &Packet) -> (u8, Option<u16>, Option<ReasonCode>) {
    match packet {
        Packet::ConnAck(connack) => (2, None, Some(connack.reason)),
        Packet::Publish(publish) => (3, Some(publish.packet_id), None),
        Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubRel(ack) | Packet::PubComp(ack) => {
            (packet.packet_type(), Some(ack.packet_id), Some(ack.reason))
        }
        Packet::SubAck(suback) => (9, Some(suback.packet_id), suback.reasons.first().copied()),
        Packet::UnsubAck(unsuback) => (
            11,
            Some(unsuback.packet_id),
            unsuback.reasons.first().copied(),
        ),
        Packet::Disconnect(disconnect) => (14, None, Some(disconnect.reason)),
        Packet::Auth(auth) => (15, None, Some(auth.reason)),
        other => (other.packet_type(), None, None),
    }
}

fn check(response: &Packet, version: ProtocolVersion, max_packet_size: u32) {
    let prefix = b"earlier bytes";
    let mut buf = BytesMut::from(&prefix[..]);
    match mqtt::encode_limited(response, version, max_packet_size, &mut buf) {
        Ok(written) => {
            assert_eq!(&buf[..prefix.len()], prefix, "earlier bytes changed");
            assert_eq!(buf.len() - prefix.len(), written, "reported size");
            assert!(
                written <= max_packet_size as usize,
                "{written} > {max_packet_size}"
            );
            let options = DecodeOptions {
                version,
                max_packet_size: mqtt::PACKET_SIZE_MAX,
                sender: Sender::Server,
            };
            let bytes = buf.freeze().slice(prefix.len()..);
            let (again, used) = mqtt::decode(&bytes, &options)
                .unwrap_or_else(|error| panic!("{} does not decode: {error}", response.name()))
                .expect("a whole packet");
            assert_eq!(used, written);
            if version.is_v5() {
                assert_eq!(identity(&again), identity(response));
            } else {
                assert_eq!(again.packet_type(), response.packet_type());
            }
            // Encoding what was decoded gives the same bytes: the cut and the dropped
            // diagnostics are a fixed point.
            let mut twice = BytesMut::new();
            assert_eq!(
                mqtt::encode_limited(&again, version, max_packet_size, &mut twice),
                Ok(used)
            );
            assert_eq!(&twice[..], &bytes[..]);
        }
        Err(EncodeError::TooLarge { size, .. }) => {
            assert!(size > max_packet_size as usize);
            assert_eq!(&buf[..], prefix, "a refused packet wrote bytes");
        }
        Err(EncodeError::Invalid(_)) => {
            assert_eq!(&buf[..], prefix, "a refused packet wrote bytes");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let selector = data[0];
    let quoter = Quoter {
        repeat: usize::from(data[1]) + 1,
    };
    let max_packet_size = u32::from_be_bytes([data[2], data[3], data[4], data[5]]);
    let version = match selector % 3 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let sender = if selector & 0x80 == 0 {
        Sender::Client
    } else {
        Sender::Server
    };
    let options = DecodeOptions {
        version,
        max_packet_size: 1 << 17,
        sender,
    };
    let mut stream = Bytes::copy_from_slice(&data[6..]);
    loop {
        match mqtt::decode(&stream, &options) {
            Ok(Some((packet, used))) => {
                let version = match &packet {
                    Packet::Connect(connect) => connect.protocol,
                    _ => version,
                };
                for response in responses(&packet, &quoter, version) {
                    check(&response, version, max_packet_size);
                }
                stream = stream.slice(used..);
            }
            Ok(None) => return,
            Err(error) => {
                check(
                    &error_response(&error, &quoter),
                    ProtocolVersion::V5,
                    max_packet_size,
                );
                return;
            }
        }
    }
});
