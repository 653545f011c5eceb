//! The encoder at its limits: fields longer than their length prefix, packets larger than the
//! peer's Maximum Packet Size, and values no encoding can carry. The encoder must never panic,
//! must write nothing when it refuses, and what it writes must decode again.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use shardmq_net::mqtt::{
    self, AckProperties, Auth, ConnAck, DecodeOptions, Disconnect, EncodeError, Packet,
    ProtocolVersion, PubAck, Publish, PublishProperties, QoS, ReasonCode, Sender, SubAck,
};

use ProtocolVersion::{V3_1_1, V5};

fn decode(bytes: &[u8], version: ProtocolVersion, sender: Sender) -> Packet {
    let options = DecodeOptions {
        version,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender,
    };
    let (packet, used) = mqtt::decode(&Bytes::copy_from_slice(bytes), &options)
        .expect("what the encoder wrote decodes")
        .expect("what the encoder wrote is whole");
    assert_eq!(used, bytes.len());
    packet
}

fn publish(topic: &str, payload_len: usize) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: ByteString::from(topic.to_owned()),
        packet_id: 7,
        properties: PublishProperties::default(),
        payload: Bytes::from(vec![b'p'; payload_len]),
    }
}

#[test]
fn a_reason_string_longer_than_its_field_is_cut_on_a_character_boundary() {
    // What the shard writes for a refused 65,535-byte topic, in two-byte characters so that the
    // cut falls inside one.
    let why = format!("PUBLISH to {} refused", "é".repeat(40_000));
    let mut disconnect = Disconnect::new(ReasonCode::TOPIC_NAME_INVALID);
    disconnect.properties.reason_string = Some(ByteString::from(why.clone()));
    disconnect.properties.user_properties = vec![(
        ByteString::from("k".repeat(70_000)),
        ByteString::from("v".to_owned()),
    )];
    let packet = Packet::Disconnect(disconnect);
    let mut buf = BytesMut::new();
    mqtt::encode(&packet, V5, &mut buf);
    assert_eq!(buf.len(), packet.encoded_len(V5));
    let Packet::Disconnect(again) = decode(&buf, V5, Sender::Server) else {
        panic!("not a DISCONNECT");
    };
    assert_eq!(again.reason, ReasonCode::TOPIC_NAME_INVALID);
    let cut = again
        .properties
        .reason_string
        .expect("the reason string is kept, cut");
    assert!(
        cut.len() <= 65_535 && cut.len() > 65_000,
        "{} bytes",
        cut.len()
    );
    assert!(why.starts_with(&*cut));
    let (key, value) = &again.properties.user_properties[0];
    assert_eq!((key.len(), &value[..]), (65_535, "v"));
}

#[test]
fn diagnostics_are_left_out_to_fit_the_peers_maximum_packet_size() {
    let ack = PubAck {
        packet_id: 9,
        reason: ReasonCode::QUOTA_EXCEEDED,
        properties: AckProperties {
            reason_string: Some(ByteString::from("x".repeat(100))),
            user_properties: vec![(ByteString::from("a"), ByteString::from("b"))],
        },
    };
    for packet in [Packet::PubAck(ack.clone()), Packet::PubRec(ack.clone())] {
        let mut buf = BytesMut::from(&b"kept"[..]);
        // Fixed header, packet identifier and reason code: five bytes.
        let written = mqtt::encode_limited(&packet, V5, 10, &mut buf).unwrap();
        assert_eq!(written, 5);
        assert_eq!(&buf[..4], b"kept", "what the buffer held stays");
        let again = decode(&buf[4..], V5, Sender::Client);
        let (Packet::PubAck(again) | Packet::PubRec(again)) = again else {
            panic!("not an acknowledgement: {again:?}");
        };
        assert_eq!(again.reason, ReasonCode::QUOTA_EXCEEDED);
        assert_eq!(again.properties, AckProperties::default());
    }
    // With room for everything, everything goes.
    let packet = Packet::PubAck(ack);
    let mut buf = BytesMut::new();
    let written = mqtt::encode_limited(&packet, V5, 1000, &mut buf).unwrap();
    assert_eq!(written, packet.encoded_len(V5));
    assert_eq!(decode(&buf, V5, Sender::Client), packet);

    // A success with only diagnostics shrinks to the short form.
    let mut connack = ConnAck::default();
    connack.properties.reason_string = Some(ByteString::from("welcome".to_owned()));
    connack.properties.receive_maximum = Some(10);
    let packet = Packet::ConnAck(Box::new(connack));
    let mut buf = BytesMut::new();
    mqtt::encode_limited(&packet, V5, 8, &mut buf).unwrap();
    let Packet::ConnAck(again) = decode(&buf, V5, Sender::Server) else {
        panic!("not a CONNACK");
    };
    assert_eq!(again.properties.reason_string, None);
    assert_eq!(again.properties.receive_maximum, Some(10));
}

#[test]
fn a_packet_too_large_even_without_diagnostics_is_refused_and_nothing_is_written() {
    let packet = Packet::SubAck(SubAck {
        packet_id: 1,
        properties: AckProperties::default(),
        reasons: vec![ReasonCode::GRANTED_QOS_1; 20],
    });
    let mut buf = BytesMut::new();
    assert_eq!(
        mqtt::encode_limited(&packet, V5, 10, &mut buf),
        Err(EncodeError::TooLarge {
            size: 25,
            max_packet_size: 10
        })
    );
    assert!(buf.is_empty());

    // A PUBLISH keeps its user properties [MQTT-3.3.2-17]: it is refused whole, for the caller
    // to drop [MQTT-3.1.2-24].
    let mut message = publish("t", 10);
    message.properties.user_properties = vec![(ByteString::from("a"), ByteString::from("b"))];
    let packet = Packet::Publish(message);
    let size = packet.encoded_len(V5);
    assert!(matches!(
        mqtt::encode_limited(&packet, V5, size as u32 - 1, &mut buf),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(buf.is_empty());
    assert_eq!(
        mqtt::encode_limited(&packet, V5, size as u32, &mut buf),
        Ok(size)
    );
}

#[test]
fn a_body_longer_than_the_remaining_length_can_count_is_refused() {
    // 268,435,456 bytes of payload: one more than a Variable Byte Integer holds.
    let packet = Packet::Publish(publish("t", 268_435_456));
    let mut buf = BytesMut::new();
    for limit in [u32::MAX, mqtt::PACKET_SIZE_MAX] {
        assert!(matches!(
            mqtt::encode_limited(&packet, V3_1_1, limit, &mut buf),
            Err(EncodeError::TooLarge { .. })
        ));
    }
    mqtt::encode(&packet, V3_1_1, &mut buf);
    assert!(buf.is_empty());
    assert!(packet.encoded_len(V3_1_1) > mqtt::PACKET_SIZE_MAX as usize);
}

#[test]
fn values_no_encoding_can_carry_are_invalid_and_never_panic() {
    let long_topic = "t".repeat(65_536);
    let mut huge_identifier = publish("t", 0);
    huge_identifier.properties.subscription_identifiers = vec![268_435_456];
    let mut qos0_with_identifier = publish("t", 0);
    qos0_with_identifier.qos = QoS::AtMostOnce;
    let cases = [
        (Packet::Publish(publish(&long_topic, 0)), V5),
        (Packet::Publish(huge_identifier), V5),
        (Packet::Publish(qos0_with_identifier), V5),
        (Packet::PubAck(PubAck::new(0)), V3_1_1),
        (
            Packet::SubAck(SubAck {
                packet_id: 1,
                properties: AckProperties::default(),
                reasons: Vec::new(),
            }),
            V5,
        ),
        (Packet::Auth(Auth::default()), V3_1_1),
    ];
    for (packet, version) in cases {
        let mut buf = BytesMut::new();
        let result = mqtt::encode_limited(&packet, version, u32::MAX, &mut buf);
        assert!(
            matches!(result, Err(EncodeError::Invalid(_))),
            "{packet:?}: {result:?}"
        );
        mqtt::encode(&packet, version, &mut buf);
        assert!(buf.is_empty(), "{}: bytes written", packet.name());
        assert_eq!(packet.encoded_len(version), usize::MAX);
    }
}
