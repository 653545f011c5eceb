//! Persistent sessions, clean sessions, takeover and keep alive through a real broker.

mod support;

use std::io::Write;
use std::time::Duration;

use rumqttc::QoS;
use support::{Broker, raw, raw_v5_subscribed, read_until_closed, v4, v5};

#[test]
fn v311_persistent_session_gets_what_was_published_while_offline() {
    let broker = Broker::start(2);
    let subscriber = v4(broker.port, "persistent-1", |o| {
        o.set_clean_session(false);
    });
    subscriber.subscribe("offline/#", QoS::AtLeastOnce);
    subscriber.client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let publisher = v4(broker.port, "offline-publisher", |_| {});
    for index in 0..5 {
        publisher
            .client
            .publish("offline/t", QoS::AtLeastOnce, false, format!("m{index}"))
            .unwrap();
    }
    publisher
        .client
        .publish("offline/t", QoS::AtMostOnce, false, "qos0-not-queued")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let resumed = v4(broker.port, "persistent-1", |o| {
        o.set_clean_session(false);
    });
    let got: Vec<String> = resumed
        .publishes(6, Duration::from_secs(3))
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(
        got,
        ["m0", "m1", "m2", "m3", "m4"],
        "queued QoS 1 messages in order; QoS 0 not queued"
    );
}

#[test]
fn v311_clean_session_forgets_subscriptions() {
    let broker = Broker::start(1);
    let first = v4(broker.port, "forgetful", |o| {
        o.set_clean_session(false);
    });
    first.subscribe("forget/t", QoS::AtLeastOnce);
    first.client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let again = v4(broker.port, "forgetful", |o| {
        o.set_clean_session(true);
    });
    let publisher = v4(broker.port, "forget-publisher", |_| {});
    publisher
        .client
        .publish("forget/t", QoS::AtLeastOnce, false, "x")
        .unwrap();
    assert!(again.publishes(1, Duration::from_millis(500)).is_empty());
}

#[test]
fn v5_takeover_disconnects_the_old_connection_with_0x8e_and_keeps_the_session() {
    let broker = Broker::start(2);
    // The old connection is raw so that its DISCONNECT can be read byte by byte.
    let mut old = raw_v5_subscribed(broker.port, "taken", 60, "take/t");
    let new = v5(broker.port, "taken", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    });
    let (bytes, closed) = read_until_closed(&mut old, Duration::from_secs(3));
    assert!(closed, "the old connection is closed");
    assert_eq!(
        bytes,
        [0xE0, 0x01, 0x8E],
        "DISCONNECT with Session taken over"
    );
    // The subscription made on the old connection serves the new one.
    let publisher = v4(broker.port, "take-publisher", |_| {});
    publisher
        .client
        .publish("take/t", QoS::AtLeastOnce, false, "after")
        .unwrap();
    assert_eq!(new.publishes(1, Duration::from_secs(3)).len(), 1);
}

#[test]
fn keep_alive_timeout_closes_a_silent_client() {
    let broker = Broker::start(1);
    let mut silent = raw(broker.port);
    // CONNECT 3.1.1 with keep alive 1 s, then silence.
    silent
        .write_all(&[
            0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x01, 0x00, 0x02,
            b'k', b'a',
        ])
        .unwrap();
    let started = std::time::Instant::now();
    let (bytes, closed) = read_until_closed(&mut silent, Duration::from_secs(5));
    assert_eq!(&bytes[..4], &[0x20, 0x02, 0x00, 0x00], "CONNACK first");
    assert!(closed, "closed after 1.5 x keep alive");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_millis(4000),
        "closed after {elapsed:?}"
    );
}
