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

/// A 5.0 CONNECT (keep alive 60 s) with a Session Expiry Interval.
fn v5_connect_bytes(client_id: &str, clean_start: bool, expiry_seconds: u32) -> Vec<u8> {
    let flags = if clean_start { 0x02 } else { 0x00 };
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, flags, 0x00, 0x3c, 0x05, 0x11,
    ];
    body.extend_from_slice(&expiry_seconds.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    connect
}

/// Sends a 5.0 CONNECT and returns the CONNACK's session present flag (after checking success).
fn v5_connect_raw(
    port: u16,
    client_id: &str,
    clean_start: bool,
    expiry: u32,
) -> (std::net::TcpStream, bool) {
    use std::io::Read;
    let mut stream = raw(port);
    stream
        .write_all(&v5_connect_bytes(client_id, clean_start, expiry))
        .unwrap();
    let mut buffer = [0u8; 64];
    let read = stream.read(&mut buffer).unwrap();
    assert!(
        read >= 4 && buffer[0] == 0x20 && buffer[3] == 0x00,
        "CONNACK success: {:02x?}",
        &buffer[..read]
    );
    (stream, buffer[2] & 0x01 == 1)
}

#[test]
fn a_clean_start_session_survives_the_expiry_of_the_session_it_replaced() {
    use std::io::Read;
    let broker = Broker::start(1);
    // A persistent session (expiry 5 s), left with a normal DISCONNECT at t0.
    let (mut first, _) = v5_connect_raw(broker.port, "item12", false, 5);
    first.write_all(&[0xe0, 0x00]).unwrap();
    read_until_closed(&mut first, Duration::from_secs(2));
    // Within those 5 s: clean start, expiry 1, a subscription, and a DISCONNECT that sets
    // the expiry to 5 s. Started 2 s after t0, so that the old session's expiry (t0 + 5 s)
    // falls before the reconnect below and the new one's (t0 + 2 s + 5 s) after it.
    std::thread::sleep(Duration::from_secs(2));
    let (mut second, present) = v5_connect_raw(broker.port, "item12", true, 1);
    assert!(!present, "clean start");
    let filter = b"item12/t";
    let mut subscribe = vec![0x82, (6 + filter.len()) as u8, 0x00, 0x01, 0x00, 0x00];
    subscribe.push(filter.len() as u8);
    subscribe.extend_from_slice(filter);
    subscribe.push(0x01);
    second.write_all(&subscribe).unwrap();
    let mut buffer = [0u8; 64];
    let read = second.read(&mut buffer).unwrap();
    assert_eq!(
        &buffer[..read],
        [0x90, 0x04, 0x00, 0x01, 0x00, 0x01],
        "SUBACK QoS 1"
    );
    // DISCONNECT, reason 0, properties: Session Expiry Interval 5.
    second
        .write_all(&[0xe0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x05])
        .unwrap();
    read_until_closed(&mut second, Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(3));
    let (mut third, present) = v5_connect_raw(broker.port, "item12", false, 5);
    assert!(
        present,
        "the session is still there after the old one's expiry"
    );
    let publisher = v5(broker.port, "item12-publisher", |_| {});
    publisher
        .client
        .publish(
            "item12/t",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "still subscribed",
        )
        .unwrap();
    let (received, _) = read_until_closed(&mut third, Duration::from_secs(2));
    assert!(
        received.first().is_some_and(|&byte| byte & 0xf0 == 0x30)
            && received
                .windows(16)
                .any(|window| window == b"still subscribed"),
        "the subscription delivers: {received:02x?}"
    );
}
