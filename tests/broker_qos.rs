//! QoS 0, 1 and 2 through a real broker with rumqttc clients, 3.1.1 and 5.0, across two shards:
//! every message arrives, in publish order, exactly once, at the subscription's QoS.

mod support;

use std::time::Duration;

use rumqttc::QoS;
use support::{Broker, v4, v5};

const COUNT: usize = 100;

fn payload(qos: u8, index: usize) -> Vec<u8> {
    format!("{qos}:{index}").into_bytes()
}

#[test]
fn v311_every_qos_arrives_in_order_exactly_once() {
    let broker = Broker::start(2);
    // Identifiers that hash to different shards, so delivery crosses shards.
    let subscriber = v4(broker.port, "qos-subscriber-a", |o| {
        o.set_clean_session(true);
    });
    subscriber.subscribe("qos/#", QoS::ExactlyOnce);
    let publisher = v4(broker.port, "qos-publisher-b", |_| {});
    for (qos_number, qos) in [
        (0u8, QoS::AtMostOnce),
        (1, QoS::AtLeastOnce),
        (2, QoS::ExactlyOnce),
    ] {
        for index in 0..COUNT {
            publisher
                .client
                .publish(
                    format!("qos/{qos_number}"),
                    qos,
                    false,
                    payload(qos_number, index),
                )
                .unwrap();
        }
        let received = subscriber.publishes(COUNT, Duration::from_secs(10));
        let expected: Vec<Vec<u8>> = (0..COUNT).map(|index| payload(qos_number, index)).collect();
        let got: Vec<Vec<u8>> = received.iter().map(|p| p.payload.to_vec()).collect();
        assert_eq!(
            got, expected,
            "QoS {qos_number}: all {COUNT} messages, in order, once"
        );
        assert!(
            received.iter().all(|p| p.qos == qos),
            "delivered at the publish QoS {qos_number}"
        );
        // Nothing more arrives: no duplicates.
        assert!(
            subscriber
                .publishes(1, Duration::from_millis(300))
                .is_empty(),
            "QoS {qos_number}: a duplicate arrived"
        );
    }
    assert!(broker.log_text().contains("serving MQTT"));
}

#[test]
fn v311_qos_is_downgraded_to_the_subscription() {
    let broker = Broker::start(2);
    let subscriber = v4(broker.port, "downgrade-sub", |_| {});
    subscriber.subscribe("d/t", QoS::AtLeastOnce);
    let publisher = v4(broker.port, "downgrade-pub", |_| {});
    publisher
        .client
        .publish("d/t", QoS::ExactlyOnce, false, "x")
        .unwrap();
    let received = subscriber.publishes(1, Duration::from_secs(5));
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].qos, QoS::AtLeastOnce);
}

#[test]
fn v5_every_qos_arrives_in_order_exactly_once_with_properties() {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = Broker::start(2);
    let subscriber = v5(broker.port, "v5-subscriber-1", |_| {});
    subscriber.subscribe("v5/#", Q5::ExactlyOnce);
    let publisher = v5(broker.port, "v5-publisher-9", |_| {});
    for (qos_number, qos) in [
        (0u8, Q5::AtMostOnce),
        (1, Q5::AtLeastOnce),
        (2, Q5::ExactlyOnce),
    ] {
        for index in 0..COUNT {
            let properties = PublishProperties {
                content_type: Some("text/plain".into()),
                response_topic: Some("v5/replies".into()),
                correlation_data: Some(bytes::Bytes::from(vec![qos_number, index as u8])),
                user_properties: vec![
                    ("first".into(), "1".into()),
                    ("second".into(), "2".into()),
                    ("first".into(), "3".into()),
                ],
                ..PublishProperties::default()
            };
            publisher
                .client
                .publish_with_properties(
                    format!("v5/{qos_number}"),
                    qos,
                    false,
                    payload(qos_number, index),
                    properties,
                )
                .unwrap();
        }
        let received = subscriber.publishes(COUNT, Duration::from_secs(10));
        let got: Vec<Vec<u8>> = received.iter().map(|p| p.payload.to_vec()).collect();
        let expected: Vec<Vec<u8>> = (0..COUNT).map(|index| payload(qos_number, index)).collect();
        assert_eq!(
            got, expected,
            "QoS {qos_number}: all messages, in order, once"
        );
        for (index, publish) in received.iter().enumerate() {
            let properties = publish
                .properties
                .as_ref()
                .expect("properties passed through");
            assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
            assert_eq!(properties.response_topic.as_deref(), Some("v5/replies"));
            assert_eq!(
                properties.correlation_data.as_deref(),
                Some(&[qos_number, index as u8][..])
            );
            let users: Vec<(&str, &str)> = properties
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                users,
                [("first", "1"), ("second", "2"), ("first", "3")],
                "user properties unchanged and in order"
            );
        }
        assert!(
            subscriber
                .publishes(1, Duration::from_millis(300))
                .is_empty()
        );
    }
}
