//! Retained messages through a real broker: stored, replaced, sent on subscribe with the retain
//! flag at the subscription's QoS, and cleared by an empty payload.

mod support;

use std::time::Duration;

use rumqttc::QoS;
use support::{Broker, v4};

/// Waits until the broker has acknowledged `count` QoS 1 publishes: they are stored by then.
fn wait_for_acks(client: &support::V4, count: usize) {
    for _ in 0..count {
        client
            .wait_for(Duration::from_secs(5), |event| {
                matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
            })
            .expect("PUBACK");
    }
}

#[test]
fn retained_messages_are_stored_replaced_and_cleared() {
    let broker = Broker::start(2);
    let publisher = v4(broker.port, "retain-publisher", |_| {});
    publisher
        .client
        .publish("status/a", QoS::AtLeastOnce, true, "old")
        .unwrap();
    publisher
        .client
        .publish("status/a", QoS::AtLeastOnce, true, "new")
        .unwrap();
    publisher
        .client
        .publish("status/b", QoS::AtLeastOnce, true, "b")
        .unwrap();
    publisher
        .client
        .publish("status/c", QoS::AtLeastOnce, false, "not retained")
        .unwrap();
    wait_for_acks(&publisher, 4);
    for (index, id) in ["late-1", "late-2-other-shard"].iter().enumerate() {
        let late = v4(broker.port, id, |_| {});
        late.subscribe("status/+", QoS::AtMostOnce);
        let mut got: Vec<(String, bool, QoS)> = late
            .publishes(3, Duration::from_secs(2))
            .iter()
            .map(|p| {
                (
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.retain,
                    p.qos,
                )
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("b".to_string(), true, QoS::AtMostOnce),
                ("new".to_string(), true, QoS::AtMostOnce)
            ],
            "subscriber {index}"
        );
    }
    publisher
        .client
        .publish("status/a", QoS::AtLeastOnce, true, "")
        .unwrap();
    wait_for_acks(&publisher, 1);
    let after = v4(broker.port, "after-clear", |_| {});
    after.subscribe("status/#", QoS::AtLeastOnce);
    let got: Vec<String> = after
        .publishes(2, Duration::from_secs(1))
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(got, ["b"]);
}

#[test]
fn a_live_subscriber_gets_retained_publishes_without_the_retain_flag() {
    let broker = Broker::start(1);
    let live = v4(broker.port, "live", |_| {});
    live.subscribe("live/t", QoS::AtMostOnce);
    let publisher = v4(broker.port, "live-publisher", |_| {});
    publisher
        .client
        .publish("live/t", QoS::AtMostOnce, true, "x")
        .unwrap();
    let got = live.publishes(1, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    assert!(
        !got[0].retain,
        "retain is cleared for live delivery to a 3.1.1 subscriber [MQTT-3.3.1-9]"
    );
}
