//! Property tests: every valid packet of every version survives encode-then-decode unchanged,
//! `encoded_len` is exact, and arbitrary bytes never panic the decoder (what decodes
//! re-encodes to a packet that decodes to itself).

mod support;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use shardmq_net::mqtt::{
    self, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, DecodeOptions, Disconnect, DisconnectProperties, Packet, ProtocolVersion,
    PubAck, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Sender, SubAck, Subscribe,
    SubscribeProperties, SubscriptionOptions, UnsubAck, Unsubscribe, UnsubscribeProperties, Will,
    WillProperties,
};
use support::sender_of;

fn text() -> impl Strategy<Value = ByteString> {
    // Any characters but U+0000, including multi-byte ones and U+FEFF.
    "[^\u{0}]{0,12}".prop_map(ByteString::from)
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = ByteString> {
    "[a-zé€$ /]{0,6}(/[a-z0-9é]{0,4}){0,3}"
        .prop_filter("non-empty", |name| !name.is_empty())
        .prop_map(ByteString::from)
}

fn topic_filter() -> impl Strategy<Value = ByteString> {
    let level = prop_oneof!["[a-z0-9é]{0,3}", Just("+".to_string())];
    (vec(level, 1..5), any::<bool>(), option::of("[a-z]{1,3}")).prop_map(
        |(levels, multi, share)| {
            let mut filter = levels.join("/");
            if multi {
                filter.push_str("/#");
            }
            if filter.is_empty() {
                filter.push('+');
            }
            match share {
                Some(group) => ByteString::from(format!("$share/{group}/{filter}")),
                None => ByteString::from(filter),
            }
        },
    )
}

fn user_properties() -> impl Strategy<Value = Vec<(ByteString, ByteString)>> {
    vec((text(), text()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn reason(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(codes).prop_map(ReasonCode)
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn ack_properties(v5: bool) -> BoxedStrategy<AckProperties> {
    if !v5 {
        return Just(AckProperties::default()).boxed();
    }
    (option::of(text()), user_properties())
        .prop_map(|(reason_string, user_properties)| AckProperties {
            reason_string,
            user_properties,
        })
        .boxed()
}

fn authentication() -> impl Strategy<Value = (Option<ByteString>, Option<Bytes>)> {
    option::of((text(), option::of(binary()))).prop_map(|pair| match pair {
        Some((method, data)) => (Some(method), data),
        None => (None, None),
    })
}

fn connect(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let properties = (
        (
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
            option::of(1..=u32::MAX),
        ),
        (
            option::of(any::<u16>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
        ),
        user_properties(),
        authentication(),
    )
        .prop_map(
            |((session, receive, packet_size), (alias, response, problem), user, auth)| {
                ConnectProperties {
                    session_expiry_interval: session,
                    receive_maximum: receive,
                    maximum_packet_size: packet_size,
                    topic_alias_maximum: alias,
                    request_response_information: response,
                    request_problem_information: problem,
                    user_properties: user,
                    authentication_method: auth.0,
                    authentication_data: auth.1,
                }
            },
        );
    let will_properties = (
        (
            option::of(any::<u32>()),
            option::of(0..=1u8),
            option::of(any::<u32>()),
        ),
        (
            option::of(text()),
            option::of(topic_name()),
            option::of(binary()),
        ),
        user_properties(),
    )
        .prop_map(
            |((delay, format, expiry), (content, response, correlation), user)| WillProperties {
                will_delay_interval: delay,
                payload_format_indicator: format,
                message_expiry_interval: expiry,
                content_type: content,
                response_topic: response,
                correlation_data: correlation,
                user_properties: user,
            },
        );
    let will = (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        will_properties,
    )
        .prop_map(move |(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties: if v5 {
                properties
            } else {
                WillProperties::default()
            },
        });
    (
        any::<bool>(),
        any::<u16>(),
        properties,
        text(),
        option::of(will),
        option::of(text()),
        option::of(binary()),
    )
        .prop_map(
            move |(clean_start, keep_alive, properties, client_id, will, username, password)| {
                // Before 5.0 a password needs a user name.
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive_seconds: keep_alive,
                    properties: if v5 {
                        properties
                    } else {
                        ConnectProperties::default()
                    },
                    client_id,
                    will,
                    username,
                    password,
                }))
            },
        )
        .boxed()
}

const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
/// The codes that survive the trip through a 3.1.1 return code.
const CONNACK_CODES_V3: &[u8] = &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87];

fn connack(v5: bool) -> BoxedStrategy<Packet> {
    let properties = (
        (
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
            option::of(0..=1u8),
        ),
        (
            option::of(any::<bool>()),
            option::of(1..=u32::MAX),
            option::of(text()),
        ),
        (
            option::of(any::<u16>()),
            option::of(text()),
            user_properties(),
        ),
        (
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
        ),
        (
            option::of(any::<u16>()),
            option::of(text()),
            option::of(text()),
        ),
        authentication(),
    )
        .prop_map(
            |(
                (session, receive, maximum_qos),
                (retain, packet_size, assigned),
                (alias, reason_string, user),
                (wildcard, identifiers, shared),
                (keep_alive, response, reference),
                auth,
            )| ConnAckProperties {
                session_expiry_interval: session,
                receive_maximum: receive,
                maximum_qos,
                retain_available: retain,
                maximum_packet_size: packet_size,
                assigned_client_identifier: assigned,
                topic_alias_maximum: alias,
                reason_string,
                user_properties: user,
                wildcard_subscription_available: wildcard,
                subscription_identifiers_available: identifiers,
                shared_subscription_available: shared,
                server_keep_alive: keep_alive,
                response_information: response,
                server_reference: reference,
                authentication_method: auth.0,
                authentication_data: auth.1,
            },
        );
    let codes = if v5 { CONNACK_CODES } else { CONNACK_CODES_V3 };
    (any::<bool>(), reason(codes), properties)
        .prop_map(move |(session_present, reason, properties)| {
            Packet::ConnAck(Box::new(ConnAck {
                session_present: session_present && reason == ReasonCode::SUCCESS,
                reason,
                properties: if v5 {
                    properties
                } else {
                    ConnAckProperties::default()
                },
            }))
        })
        .boxed()
}

fn publish(v5: bool) -> BoxedStrategy<Packet> {
    let properties = (
        (
            option::of(0..=1u8),
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
        ),
        (
            option::of(topic_name()),
            option::of(binary()),
            user_properties(),
        ),
        vec(1..=268_435_455u32, 0..3),
        option::of(text()),
    )
        .prop_map(
            |((format, expiry, alias), (response, correlation, user), ids, content)| {
                PublishProperties {
                    payload_format_indicator: format,
                    message_expiry_interval: expiry,
                    topic_alias: alias,
                    response_topic: response,
                    correlation_data: correlation,
                    user_properties: user,
                    subscription_identifiers: ids,
                    content_type: content,
                }
            },
        );
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        properties,
        binary(),
        any::<bool>(),
    )
        .prop_map(
            move |(qos, dup, retain, topic, id, properties, payload, use_alias)| {
                let properties = if v5 {
                    properties
                } else {
                    PublishProperties::default()
                };
                // A 5.0 PUBLISH may leave the topic empty when it carries a topic alias.
                let topic = if use_alias && properties.topic_alias.is_some() {
                    ByteString::new()
                } else {
                    topic
                };
                let at_most_once = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !at_most_once,
                    qos,
                    retain,
                    topic,
                    packet_id: if at_most_once { 0 } else { id },
                    properties,
                    payload,
                })
            },
        )
        .boxed()
}

fn pub_ack(v5: bool) -> BoxedStrategy<Packet> {
    let acks = (0..4usize, packet_id(), ack_properties(v5), any::<u8>());
    acks.prop_map(move |(kind, packet_id, properties, pick)| {
        let valid: &[u8] = if kind < 2 {
            &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
        } else {
            &[0x00, 0x92]
        };
        let ack = PubAck {
            packet_id,
            reason: if v5 {
                ReasonCode(valid[pick as usize % valid.len()])
            } else {
                ReasonCode::SUCCESS
            },
            properties,
        };
        match kind {
            0 => Packet::PubAck(ack),
            1 => Packet::PubRec(ack),
            2 => Packet::PubRel(ack),
            _ => Packet::PubComp(ack),
        }
    })
    .boxed()
}

fn subscribe(v5: bool) -> BoxedStrategy<Packet> {
    let options = (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(
        move |(qos, no_local, retain_as_published, handling)| {
            if !v5 {
                return SubscriptionOptions::new(qos);
            }
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling: match handling {
                    0 => RetainHandling::SendOnSubscribe,
                    1 => RetainHandling::SendIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        },
    );
    let properties = (option::of(1..=268_435_455u32), user_properties()).prop_map(
        |(subscription_identifier, user_properties)| SubscribeProperties {
            subscription_identifier,
            user_properties,
        },
    );
    (
        packet_id(),
        properties,
        vec((topic_filter(), options), 1..4),
    )
        .prop_map(move |(packet_id, properties, filters)| {
            // No Local is a protocol error on a shared subscription.
            let filters = filters
                .into_iter()
                .map(|(filter, mut options)| {
                    if filter.starts_with("$share/") {
                        options.no_local = false;
                    }
                    (filter, options)
                })
                .collect();
            Packet::Subscribe(Subscribe {
                packet_id,
                properties: if v5 {
                    properties
                } else {
                    SubscribeProperties::default()
                },
                filters,
            })
        })
        .boxed()
}

fn suback(v5: bool) -> BoxedStrategy<Packet> {
    let codes: &'static [u8] = if v5 {
        &[
            0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
        ]
    } else {
        &[0x00, 0x01, 0x02, 0x80]
    };
    (packet_id(), ack_properties(v5), vec(reason(codes), 1..5))
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        })
        .boxed()
}

fn unsubscribe(v5: bool) -> BoxedStrategy<Packet> {
    (packet_id(), user_properties(), vec(topic_filter(), 1..4))
        .prop_map(move |(packet_id, user_properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties: UnsubscribeProperties {
                    user_properties: if v5 { user_properties } else { Vec::new() },
                },
                filters,
            })
        })
        .boxed()
}

fn unsuback(v5: bool) -> BoxedStrategy<Packet> {
    let codes: &'static [u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    (packet_id(), ack_properties(v5), vec(reason(codes), 1..5))
        .prop_map(move |(packet_id, properties, reasons)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reasons: if v5 { reasons } else { Vec::new() },
            })
        })
        .boxed()
}

fn disconnect(v5: bool) -> BoxedStrategy<Packet> {
    if !v5 {
        return Just(Packet::Disconnect(Disconnect::default())).boxed();
    }
    let codes: &'static [u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
        0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    (
        reason(codes),
        option::of(any::<u32>()),
        option::of(text()),
        user_properties(),
        option::of(text()),
    )
        .prop_map(|(reason, session, reason_string, user, reference)| {
            Packet::Disconnect(Disconnect {
                reason,
                properties: DisconnectProperties {
                    session_expiry_interval: session,
                    reason_string,
                    user_properties: user,
                    server_reference: reference,
                },
            })
        })
        .boxed()
}

fn auth() -> BoxedStrategy<Packet> {
    (
        reason(&[0x00, 0x18, 0x19]),
        authentication(),
        option::of(text()),
        user_properties(),
    )
        .prop_map(|(reason, auth, reason_string, user)| {
            Packet::Auth(Auth {
                reason,
                properties: AuthProperties {
                    authentication_method: auth.0,
                    authentication_data: auth.1,
                    reason_string,
                    user_properties: user,
                },
            })
        })
        .boxed()
}

fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let mut choices = vec![
        connect(version),
        connack(v5),
        publish(v5),
        pub_ack(v5),
        subscribe(v5),
        suback(v5),
        unsubscribe(v5),
        unsuback(v5),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v5),
    ];
    if v5 {
        choices.push(auth());
    }
    proptest::strategy::Union::new(choices).boxed()
}

fn round_trip(packet: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    mqtt::encode(packet, version, &mut buf);
    prop_assert_eq!(buf.len(), packet.encoded_len(version));
    let bytes = buf.freeze();
    let options = DecodeOptions {
        version,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: sender_of(packet),
    };
    let decoded = mqtt::decode(&bytes, &options);
    prop_assert_eq!(decoded, Ok(Some((packet.clone(), bytes.len()))));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_v3_1_1_packet_round_trips(packet in packet(ProtocolVersion::V3_1_1)) {
        round_trip(&packet, ProtocolVersion::V3_1_1)?;
    }

    #[test]
    fn every_v3_1_packet_round_trips(packet in packet(ProtocolVersion::V3_1)) {
        round_trip(&packet, ProtocolVersion::V3_1)?;
    }

    #[test]
    fn every_v5_packet_round_trips(packet in packet(ProtocolVersion::V5)) {
        round_trip(&packet, ProtocolVersion::V5)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_what_decodes_re_encodes(
        bytes in vec(any::<u8>(), 0..64),
        version in prop_oneof![Just(ProtocolVersion::V3_1_1), Just(ProtocolVersion::V5)],
        from_server in any::<bool>(),
    ) {
        let options = DecodeOptions {
            version,
            max_packet_size: 1024,
            sender: if from_server { Sender::Server } else { Sender::Client },
        };
        if let Ok(Some((packet, _))) = mqtt::decode(&Bytes::from(bytes), &options) {
            // A decoded CONNECT carries its own version.
            let version = match &packet {
                Packet::Connect(connect) => connect.protocol,
                _ => version,
            };
            let mut buf = BytesMut::new();
            mqtt::encode(&packet, version, &mut buf);
            let options = DecodeOptions { version, ..options };
            let again = mqtt::decode(&buf.freeze(), &options).map(|decoded| decoded.map(|(packet, _)| packet));
            prop_assert_eq!(again, Ok(Some(packet)));
        }
    }
}
