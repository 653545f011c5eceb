//! Byte-exact vectors: each packet type in 3.1.1 and 5.0 (and CONNECT in 3.1), including the
//! examples the specifications give. Each vector is decoded to the expected packet and the
//! packet is encoded back to the same bytes.

mod support;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use shardmq_net::mqtt::{
    self, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, DecodeOptions, Disconnect, DisconnectProperties, Packet, ProtocolVersion,
    PubAck, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Sender, SubAck, Subscribe,
    SubscribeProperties, SubscriptionOptions, UnsubAck, Unsubscribe, UnsubscribeProperties, Will,
    WillProperties,
};
use support::sender_of;

use ProtocolVersion::{V3_1, V3_1_1, V5};

fn hex(text: &str) -> Bytes {
    let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits in {text}");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>()
        .into()
}

fn s(text: &'static str) -> ByteString {
    ByteString::from_static(text)
}

/// Decodes `bytes` to exactly `packet`, using every byte, and encodes `packet` to `bytes`.
fn check(version: ProtocolVersion, bytes: &str, packet: Packet) {
    let bytes = hex(bytes);
    let options = DecodeOptions {
        version,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: sender_of(&packet),
    };
    let (decoded, used) = mqtt::decode(&bytes, &options)
        .unwrap_or_else(|error| panic!("{} {version:?}: {error}", packet.name()))
        .expect("a whole packet");
    assert_eq!(
        used,
        bytes.len(),
        "{} {version:?}: bytes used",
        packet.name()
    );
    assert_eq!(decoded, packet, "{} {version:?}: decoded", packet.name());
    let mut encoded = BytesMut::new();
    mqtt::encode(&packet, version, &mut encoded);
    assert_eq!(
        &encoded[..],
        &bytes[..],
        "{} {version:?}: encoded",
        packet.name()
    );
    assert_eq!(packet.encoded_len(version), bytes.len());
}

/// Decodes only: for the encodings the specification allows but the encoder does not choose.
fn check_decode(version: ProtocolVersion, bytes: &str, packet: Packet) {
    let bytes = hex(bytes);
    let options = DecodeOptions {
        version,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: sender_of(&packet),
    };
    let (decoded, used) = mqtt::decode(&bytes, &options).unwrap().unwrap();
    assert_eq!((decoded, used), (packet, bytes.len()));
}

fn plain_connect(protocol: ProtocolVersion) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive_seconds: 60,
        properties: ConnectProperties::default(),
        client_id: s("c1"),
        will: None,
        username: None,
        password: None,
    }
}

#[test]
fn connect_3_1_1_specification_example() {
    // MQTT 3.1.1 §3.1.2.10, Figure 3.6: name "MQTT", level 4, flags 0xCE (user name, password,
    // will QoS 1, will flag, clean session), keep alive 10; with a payload added.
    check(
        V3_1_1,
        "10 1c 0004 4d515454 04 ce 000a 0001 63 0001 77 0002 6869 0001 75 0003 707773",
        Packet::Connect(Box::new(Connect {
            keep_alive_seconds: 10,
            client_id: s("c"),
            will: Some(Will {
                topic: s("w"),
                payload: Bytes::from_static(b"hi"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties::default(),
            }),
            username: Some(s("u")),
            password: Some(Bytes::from_static(b"pws")),
            ..plain_connect(V3_1_1)
        })),
    );
}

#[test]
fn connect_3_1_and_3_1_1_minimal() {
    check(
        V3_1,
        "10 10 0006 4d5149736470 03 02 003c 0002 6331",
        Packet::Connect(Box::new(plain_connect(V3_1))),
    );
    // A 3.1.1 CONNECT with an empty client identifier and clean session 0.
    check(
        V3_1_1,
        "10 0c 0004 4d515454 04 00 0000 0000",
        Packet::Connect(Box::new(Connect {
            clean_start: false,
            keep_alive_seconds: 0,
            client_id: s(""),
            ..plain_connect(V3_1_1)
        })),
    );
}

#[test]
fn connect_5_specification_example() {
    // MQTT 5.0 §3.1.2.12, Figure 3-5: flags 0xCE, keep alive 10, properties: Session Expiry
    // Interval 10; with a payload (will properties: Will Delay Interval 5) added.
    check(
        V5,
        "10 28 0004 4d515454 05 ce 000a 05 11 0000000a 0001 63 05 18 00000005 0001 77 0002 6869 \
         0001 75 0003 707773",
        Packet::Connect(Box::new(Connect {
            keep_alive_seconds: 10,
            properties: ConnectProperties {
                session_expiry_interval: Some(10),
                ..ConnectProperties::default()
            },
            client_id: s("c"),
            will: Some(Will {
                topic: s("w"),
                payload: Bytes::from_static(b"hi"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties {
                    will_delay_interval: Some(5),
                    ..WillProperties::default()
                },
            }),
            username: Some(s("u")),
            password: Some(Bytes::from_static(b"pws")),
            ..plain_connect(V5)
        })),
    );
}

#[test]
fn connect_5_every_property() {
    check(
        V5,
        "10 5b 0004 4d515454 05 36 001e \
         26 11 00000e10 21 0014 27 00100000 22 0008 19 01 17 00 26 0001 6b 0001 76 \
            15 0003 736372 16 0002 0102 \
         0002 6331 \
         1e 01 01 02 0000003c 03 0004 6a736f6e 08 0001 72 09 0002 aabb 26 0001 61 0001 62 \
         0003 612f62 0000",
        Packet::Connect(Box::new(Connect {
            keep_alive_seconds: 30,
            properties: ConnectProperties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(8),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                user_properties: vec![(s("k"), s("v"))],
                authentication_method: Some(s("scr")),
                authentication_data: Some(Bytes::from_static(&[1, 2])),
            },
            will: Some(Will {
                topic: s("a/b"),
                payload: Bytes::new(),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: WillProperties {
                    will_delay_interval: None,
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    content_type: Some(s("json")),
                    response_topic: Some(s("r")),
                    correlation_data: Some(Bytes::from_static(&[0xAA, 0xBB])),
                    user_properties: vec![(s("a"), s("b"))],
                },
            }),
            ..plain_connect(V5)
        })),
    );
}

#[test]
fn connack_both_versions() {
    check(V3_1_1, "20 02 00 00", Packet::ConnAck(Box::default()));
    check(
        V3_1_1,
        "20 02 01 00",
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            ..ConnAck::default()
        })),
    );
    // 3.1.1 return code 5, "not authorized".
    check(
        V3_1_1,
        "20 02 00 05",
        Packet::ConnAck(Box::new(ConnAck {
            reason: ReasonCode::NOT_AUTHORIZED,
            ..ConnAck::default()
        })),
    );
    check(V5, "20 03 00 00 00", Packet::ConnAck(Box::default()));
    check(
        V5,
        "20 3c 01 00 39 11 0000001e 21 0010 24 01 25 00 27 00010000 12 0003 616263 22 000a \
         1f 0002 6f6b 28 01 29 00 2a 01 13 0014 1a 0002 722f 1c 0001 78 15 0001 6d 16 0001 ff",
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            reason: ReasonCode::SUCCESS,
            properties: ConnAckProperties {
                session_expiry_interval: Some(30),
                receive_maximum: Some(16),
                maximum_qos: Some(1),
                retain_available: Some(false),
                maximum_packet_size: Some(65_536),
                assigned_client_identifier: Some(s("abc")),
                topic_alias_maximum: Some(10),
                reason_string: Some(s("ok")),
                user_properties: vec![],
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(false),
                shared_subscription_available: Some(true),
                server_keep_alive: Some(20),
                response_information: Some(s("r/")),
                server_reference: Some(s("x")),
                authentication_method: Some(s("m")),
                authentication_data: Some(Bytes::from_static(&[0xFF])),
            },
        })),
    );
    check(
        V5,
        "20 03 00 84 00",
        Packet::ConnAck(Box::new(ConnAck {
            reason: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ..ConnAck::default()
        })),
    );
}

fn publish(topic: &'static str, qos: QoS, packet_id: u16, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: s(topic),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::from_static(payload),
    }
}

#[test]
fn publish_specification_examples() {
    // MQTT 3.1.1 §3.3.2.3, Figure 3.11: topic "a/b", packet identifier 10.
    check(
        V3_1_1,
        "32 07 0003 612f62 000a",
        Packet::Publish(publish("a/b", QoS::AtLeastOnce, 10, b"")),
    );
    // MQTT 5.0 §3.3.2.3, Figure 3-9: the same, with a property length of 0.
    check(
        V5,
        "32 08 0003 612f62 000a 00",
        Packet::Publish(publish("a/b", QoS::AtLeastOnce, 10, b"")),
    );
}

#[test]
fn publish_flags_payload_and_properties() {
    check(
        V3_1_1,
        "31 07 0003 612f62 6869",
        Packet::Publish(Publish {
            retain: true,
            ..publish("a/b", QoS::AtMostOnce, 0, b"hi")
        }),
    );
    check(
        V3_1_1,
        "3c 07 0001 74 ffff 7879",
        Packet::Publish(Publish {
            dup: true,
            ..publish("t", QoS::ExactlyOnce, 0xFFFF, b"xy")
        }),
    );
    // A 5.0 PUBLISH that uses a topic alias in place of the topic name.
    check(
        V5,
        "30 07 0000 03 23 0005 7a",
        Packet::Publish(Publish {
            topic: s(""),
            properties: PublishProperties {
                topic_alias: Some(5),
                ..PublishProperties::default()
            },
            ..publish("", QoS::AtMostOnce, 0, b"z")
        }),
    );
    // Server to client, with two subscription identifiers (the second in two bytes) and every
    // other property; user properties keep their order, duplicates included.
    check(
        V5,
        "34 39 0003 612f62 0007 \
         2f 01 01 02 0000000a 08 0001 72 09 0001 01 26 0001 6b 0001 32 26 0001 6b 0001 31 \
            0b 01 0b 8001 03 000a 746578742f706c61696e \
         6869",
        Packet::Publish(Publish {
            properties: PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(10),
                topic_alias: None,
                response_topic: Some(s("r")),
                correlation_data: Some(Bytes::from_static(&[1])),
                user_properties: vec![(s("k"), s("2")), (s("k"), s("1"))],
                subscription_identifiers: vec![1, 128],
                content_type: Some(s("text/plain")),
            },
            ..publish("a/b", QoS::ExactlyOnce, 7, b"hi")
        }),
    );
}

#[test]
fn publish_acknowledgements() {
    for (first_byte, make) in [
        (0x40u8, Packet::PubAck as fn(PubAck) -> Packet),
        (0x50, Packet::PubRec),
        (0x62, Packet::PubRel),
        (0x70, Packet::PubComp),
    ] {
        let short = format!("{first_byte:02x} 02 1234");
        check(V3_1_1, &short, make(PubAck::new(0x1234)));
        // In 5.0, success without properties takes the 3.1.1 short form.
        check(V5, &short, make(PubAck::new(0x1234)));
        // The reason code alone, property length omitted, is allowed too (§3.4.2.1).
        check_decode(
            V5,
            &format!("{first_byte:02x} 03 1234 00"),
            make(PubAck::new(0x1234)),
        );
    }
    check(
        V5,
        "40 03 0001 10",
        Packet::PubAck(PubAck {
            reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            ..PubAck::new(1)
        }),
    );
    check(
        V5,
        "50 0a 0001 87 06 1f 0003 6e6f21",
        Packet::PubRec(PubAck {
            reason: ReasonCode::NOT_AUTHORIZED,
            properties: AckProperties {
                reason_string: Some(s("no!")),
                user_properties: vec![],
            },
            ..PubAck::new(1)
        }),
    );
    check(
        V5,
        "62 03 0002 92",
        Packet::PubRel(PubAck {
            reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            ..PubAck::new(2)
        }),
    );
    check(
        V5,
        "70 0b 0002 00 07 26 0001 61 0001 62",
        Packet::PubComp(PubAck {
            properties: AckProperties {
                reason_string: None,
                user_properties: vec![(s("a"), s("b"))],
            },
            ..PubAck::new(2)
        }),
    );
}

#[test]
fn subscribe_specification_examples() {
    // MQTT 3.1.1 §3.8.3, Figure 3.22: packet identifier 10, "a/b" QoS 1, "c/d" QoS 2.
    check(
        V3_1_1,
        "82 0e 000a 0003 612f62 01 0003 632f64 02",
        Packet::Subscribe(Subscribe {
            packet_id: 10,
            properties: SubscribeProperties::default(),
            filters: vec![
                (s("a/b"), SubscriptionOptions::new(QoS::AtLeastOnce)),
                (s("c/d"), SubscriptionOptions::new(QoS::ExactlyOnce)),
            ],
        }),
    );
    // MQTT 3.1.1 §3.9.3, Figure 3.26: return codes 0, 1, 2 and 128 (failure).
    check(
        V3_1_1,
        "90 06 000a 00 01 02 80",
        Packet::SubAck(SubAck {
            packet_id: 10,
            properties: AckProperties::default(),
            reasons: vec![
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::GRANTED_QOS_2,
                ReasonCode::UNSPECIFIED_ERROR,
            ],
        }),
    );
}

#[test]
fn subscribe_5_options_and_properties() {
    check(
        V5,
        "82 1f 0001 09 0b 05 26 0001 6b 0001 76 0003 612f23 2e 000a 2473686172652f672f78 01",
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: SubscribeProperties {
                subscription_identifier: Some(5),
                user_properties: vec![(s("k"), s("v"))],
            },
            filters: vec![
                (
                    s("a/#"),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                ),
                (s("$share/g/x"), SubscriptionOptions::new(QoS::AtLeastOnce)),
            ],
        }),
    );
    check(
        V5,
        "90 0a 0001 04 1f 0001 78 01 a2 9e",
        Packet::SubAck(SubAck {
            packet_id: 1,
            properties: AckProperties {
                reason_string: Some(s("x")),
                user_properties: vec![],
            },
            reasons: vec![
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
                ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
            ],
        }),
    );
}

#[test]
fn unsubscribe_both_versions() {
    // MQTT 3.1.1 §3.10.3, Figure 3.30: "a/b" and "c/d".
    check(
        V3_1_1,
        "a2 0c 000a 0003 612f62 0003 632f64",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 10,
            properties: UnsubscribeProperties::default(),
            filters: vec![s("a/b"), s("c/d")],
        }),
    );
    check(
        V5,
        "a2 07 0003 00 0002 2b2f",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            properties: UnsubscribeProperties::default(),
            filters: vec![s("+/")],
        }),
    );
    check(
        V3_1_1,
        "b0 02 000a",
        Packet::UnsubAck(UnsubAck {
            packet_id: 10,
            properties: AckProperties::default(),
            reasons: vec![],
        }),
    );
    check(
        V5,
        "b0 05 0003 00 00 11",
        Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            properties: AckProperties::default(),
            reasons: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
        }),
    );
}

#[test]
fn ping_disconnect_and_auth() {
    for version in [V3_1_1, V5] {
        check(version, "c0 00", Packet::PingReq);
        check(version, "d0 00", Packet::PingResp);
        check(version, "e0 00", Packet::Disconnect(Disconnect::default()));
    }
    check(
        V5,
        "e0 01 04",
        Packet::Disconnect(Disconnect::new(ReasonCode::DISCONNECT_WITH_WILL_MESSAGE)),
    );
    // The reason code 0x00 written out decodes to the same packet as the empty form.
    check_decode(V5, "e0 01 00", Packet::Disconnect(Disconnect::default()));
    check(
        V5,
        "e0 0f 8e 0d 11 00000000 1f 0001 79 1c 0001 7a",
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::SESSION_TAKEN_OVER,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some(s("y")),
                user_properties: vec![],
                server_reference: Some(s("z")),
            },
        }),
    );
    check(V5, "f0 00", Packet::Auth(Auth::default()));
    check(
        V5,
        "f0 0b 18 09 15 0002 6d31 16 0001 aa",
        Packet::Auth(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: AuthProperties {
                authentication_method: Some(s("m1")),
                authentication_data: Some(Bytes::from_static(&[0xAA])),
                reason_string: None,
                user_properties: vec![],
            },
        }),
    );
}

#[test]
fn version_decides_the_encoding_of_the_same_packet() {
    let ack = Packet::SubAck(SubAck {
        packet_id: 1,
        properties: AckProperties::default(),
        reasons: vec![ReasonCode::GRANTED_QOS_1],
    });
    let mut v311 = BytesMut::new();
    let mut v5 = BytesMut::new();
    mqtt::encode(&ack, V3_1_1, &mut v311);
    mqtt::encode(&ack, V5, &mut v5);
    assert_eq!(&v311[..], &hex("90 03 0001 01")[..]);
    assert_eq!(&v5[..], &hex("90 04 0001 00 01")[..]);
    // A 5.0 refusal becomes the closest 3.1.1 return code.
    let refusal = Packet::ConnAck(Box::new(ConnAck {
        reason: ReasonCode::BANNED,
        ..ConnAck::default()
    }));
    let mut buf = BytesMut::new();
    mqtt::encode(&refusal, V3_1_1, &mut buf);
    assert_eq!(&buf[..], &hex("20 02 00 05")[..]);
}

#[test]
fn incremental_decoding_waits_for_the_whole_packet() {
    let bytes = hex("32 07 0003 612f62 000a c0 00");
    let options = DecodeOptions {
        version: V3_1_1,
        max_packet_size: 1024,
        sender: Sender::Client,
    };
    for end in 0..9 {
        assert_eq!(
            mqtt::decode(&bytes.slice(..end), &options),
            Ok(None),
            "{end} bytes"
        );
    }
    let (first, used) = mqtt::decode(&bytes, &options).unwrap().unwrap();
    assert_eq!(
        first,
        Packet::Publish(publish("a/b", QoS::AtLeastOnce, 10, b""))
    );
    assert_eq!(used, 9);
    let (second, used) = mqtt::decode(&bytes.slice(9..), &options).unwrap().unwrap();
    assert_eq!((second, used), (Packet::PingReq, 2));
}

#[test]
fn payloads_are_slices_of_the_input_not_copies() {
    let bytes = hex("30 0a 0003 612f62 0102030405");
    let options = DecodeOptions {
        version: V3_1_1,
        max_packet_size: 1024,
        sender: Sender::Client,
    };
    let Some((Packet::Publish(publish), _)) = mqtt::decode(&bytes, &options).unwrap() else {
        panic!("expected a PUBLISH");
    };
    assert_eq!(publish.payload.as_ptr(), bytes[7..].as_ptr());
    assert_eq!(publish.topic.as_bytes().as_ptr(), bytes[4..].as_ptr());
}

#[test]
fn maximum_packet_size_is_enforced_from_the_fixed_header() {
    // Only the first two bytes of a 200-byte packet have arrived.
    let options = DecodeOptions {
        version: V5,
        max_packet_size: 100,
        sender: Sender::Client,
    };
    let error = mqtt::decode(&hex("30 c6 01"), &options).unwrap_err();
    assert_eq!(error.reason, ReasonCode::PACKET_TOO_LARGE);
    // Exactly at the limit is accepted: 2 header bytes + 98.
    let header = mqtt::parse_fixed_header(&hex("30 62"), 100)
        .unwrap()
        .unwrap();
    assert_eq!(header.packet_len(), 100);
}
