//! `$SYS` topics on a real broker: with `sys_interval_seconds = 1` a subscriber to
//! `$SYS/broker/#` gets Mosquitto's topics (version, uptime, clients/connected, publish
//! counts) that follow what clients did, retained for a late subscriber (mosquitto_sub); a
//! subscription to `#` does not see them (MQTT 5.0 §4.7.2); a client's PUBLISH to `$SYS/` is
//! refused (PUBACK 0x87 in 5.0) and changes nothing; with 0 there is no `$SYS` at all.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use support::{Broker, v5};

/// The last value of each `$SYS` topic received within `within`, waiting until `done`
/// holds of them and then one more interval (1 s here), so that every topic's value comes
/// from a round after the one that satisfied `done` (a round's topics arrive one by one).
fn sys_values(
    client: &support::V5,
    within: Duration,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + within;
    let mut values = BTreeMap::new();
    let mut settle: Option<Instant> = None;
    while Instant::now() < deadline && settle.is_none_or(|until| Instant::now() < until) {
        if settle.is_none() && done(&values) {
            settle = Some(Instant::now() + Duration::from_millis(1500));
        }
        if let Some(rumqttc::v5::Event::Incoming(Packet::Publish(publish))) = client
            .wait_for(Duration::from_millis(200), |event| {
                matches!(event, rumqttc::v5::Event::Incoming(Packet::Publish(_)))
            })
        {
            values.insert(
                String::from_utf8_lossy(&publish.topic).into_owned(),
                String::from_utf8_lossy(&publish.payload).into_owned(),
            );
        }
    }
    values
}

fn number(values: &BTreeMap<String, String>, topic: &str) -> u64 {
    values
        .get(&format!("$SYS/broker/{topic}"))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sys_topics_follow_the_clients_and_clients_cannot_write_them() {
    let broker = Broker::start_with(2, "sys_interval_seconds = 1\n");
    let watcher = v5(broker.port, "sys-watcher", |_| {});
    watcher.subscribe("$SYS/broker/#", QoS::AtMostOnce);
    let everything = v5(broker.port, "sys-everything", |_| {});
    everything.subscribe("#", QoS::AtMostOnce);
    let publisher = v5(broker.port, "sys-publisher", |_| {});
    for i in 0..7 {
        publisher
            .client
            .publish(
                format!("plain/{i}"),
                QoS::AtLeastOnce,
                false,
                vec![b'p'; 10],
            )
            .unwrap();
    }
    let values = sys_values(&watcher, Duration::from_secs(10), |values| {
        number(values, "clients/connected") == 3 && number(values, "publish/messages/received") >= 7
    });
    assert_eq!(number(&values, "clients/connected"), 3, "{values:?}");
    assert_eq!(
        number(&values, "publish/messages/received"),
        7,
        "{values:?}"
    );
    assert!(
        number(&values, "publish/bytes/received") >= 70,
        "{values:?}"
    );
    assert!(number(&values, "subscriptions/count") >= 2, "{values:?}");
    assert!(
        values
            .get("$SYS/broker/version")
            .is_some_and(|v| v.starts_with("shardmq ")),
        "{values:?}"
    );
    assert!(
        values
            .get("$SYS/broker/uptime")
            .is_some_and(|v| v.ends_with(" seconds")),
        "{values:?}"
    );

    // A client may not write under $SYS/: 0x87, and the value stays the broker's.
    publisher
        .client
        .publish("$SYS/broker/version", QoS::AtLeastOnce, true, "forged")
        .unwrap();
    match publisher.wait_for(
        Duration::from_secs(5),
        |event| matches!(event, rumqttc::v5::Event::Incoming(Packet::PubAck(ack)) if ack.pkid > 7),
    ) {
        Some(rumqttc::v5::Event::Incoming(Packet::PubAck(ack))) => {
            assert_eq!(ack.reason, PubAckReason::NotAuthorized)
        }
        other => panic!("no PUBACK for the $SYS publish: {other:?}"),
    }
    let later = sys_values(&watcher, Duration::from_secs(3), |_| false);
    assert!(
        later
            .get("$SYS/broker/version")
            .is_some_and(|v| v.starts_with("shardmq ")),
        "{later:?}"
    );

    // `#` matches no topic that starts with `$`: the plain messages only.
    let seen = everything.publishes(7, Duration::from_secs(5));
    assert!(
        seen.iter().all(|p| !p.topic.starts_with(b"$")),
        "a # subscriber got a $SYS message"
    );
    assert_eq!(seen.len(), 7);

    // Retained: a late mosquitto_sub gets the current value at once.
    let (ok, printed) = support::mosquitto(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "$SYS/broker/clients/total",
            "-C",
            "1",
            "-W",
            "5",
        ],
    );
    assert!(ok, "mosquitto_sub got no retained $SYS value: {printed}");
    assert!(
        printed.trim().parse::<u64>().is_ok_and(|n| n >= 3),
        "{printed}"
    );
}

#[test]
fn an_interval_of_zero_publishes_no_sys_topics() {
    let broker = Broker::start_with(1, "sys_interval_seconds = 0\n");
    let watcher = v5(broker.port, "sys-off", |_| {});
    watcher.subscribe("$SYS/#", QoS::AtMostOnce);
    let values = sys_values(&watcher, Duration::from_secs(3), |_| false);
    assert!(values.is_empty(), "{values:?}");
}
