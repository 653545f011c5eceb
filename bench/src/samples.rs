//! Sample packets for the codec benchmarks: what a busy broker decodes and encodes most.

use bytes::Bytes;
use bytestring::ByteString;
use shardmq_net::mqtt::{
    Connect, ConnectProperties, Packet, ProtocolVersion, Publish, PublishProperties, QoS, Will,
    WillProperties,
};

/// The payload sizes the codec benchmark covers.
pub const PAYLOAD_SIZES: [usize; 3] = [16, 256, 4096];

/// A QoS 1 PUBLISH on a four-level topic; in 5.0 it carries a message expiry and one user
/// property, as telemetry often does.
pub fn publish(payload_len: usize, version: ProtocolVersion) -> Packet {
    let properties = if version.is_v5() {
        PublishProperties {
            message_expiry_interval: Some(3600),
            user_properties: vec![(
                ByteString::from_static("unit"),
                ByteString::from_static("celsius"),
            )],
            ..PublishProperties::default()
        }
    } else {
        PublishProperties::default()
    };
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: ByteString::from_static("site/7/sensor/temperature"),
        packet_id: 4242,
        properties,
        payload: Bytes::from(vec![0xA5; payload_len]),
    })
}

/// A 5.0 CONNECT with session expiry, flow control, a will and credentials.
pub fn connect_v5() -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: false,
        keep_alive_seconds: 60,
        properties: ConnectProperties {
            session_expiry_interval: Some(86_400),
            receive_maximum: Some(64),
            maximum_packet_size: Some(1 << 20),
            topic_alias_maximum: Some(16),
            request_problem_information: Some(true),
            user_properties: vec![(
                ByteString::from_static("region"),
                ByteString::from_static("eu-west-1"),
            )],
            ..ConnectProperties::default()
        },
        client_id: ByteString::from_static("sensor-000042-7f3a"),
        will: Some(Will {
            topic: ByteString::from_static("site/7/sensor/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WillProperties {
                will_delay_interval: Some(5),
                ..WillProperties::default()
            },
        }),
        username: Some(ByteString::from_static("sensor")),
        password: Some(Bytes::from_static(b"correct horse battery staple")),
    }))
}
