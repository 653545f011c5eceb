//! Wills through a real broker: published when the connection is lost, not after a normal
//! DISCONNECT, and (5.0) only after the will delay.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use support::{Broker, raw, v4};

/// CONNECT 3.1.1 with a QoS 1 will on `wills/{id}` saying "gone".
fn connect_with_will(id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x0E, 0x00, 0x3c];
    for field in [id.as_bytes(), format!("wills/{id}").as_bytes(), b"gone"] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

#[test]
fn will_is_sent_on_connection_loss_and_not_on_disconnect() {
    let broker = Broker::start(2);
    let watcher = v4(broker.port, "will-watcher", |_| {});
    watcher.subscribe("wills/#", QoS::AtLeastOnce);
    {
        let mut normal = raw(broker.port);
        normal.write_all(&connect_with_will("polite")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        normal.write_all(&[0xE0, 0x00]).unwrap();
    }
    {
        let mut lost = raw(broker.port);
        lost.write_all(&connect_with_will("crashed")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Dropped without DISCONNECT.
    }
    let got = watcher.publishes(2, Duration::from_secs(2));
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, ["wills/crashed"]);
    assert_eq!(&got[0].payload[..], b"gone");
}

#[test]
fn v5_will_waits_for_its_delay() {
    let broker = Broker::start(1);
    let watcher = v4(broker.port, "delay-watcher", |_| {});
    watcher.subscribe("late/#", QoS::AtLeastOnce);
    let mut client = raw(broker.port);
    // CONNECT 5.0: clean start, will flag QoS 0, keep alive 60, session expiry 10 s, client
    // id "delayer", will properties: will delay 1 s; will topic "late/w", payload "bye".
    let mut packet = vec![
        0x10, 0x00, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x06, 0x00, 0x3c, 0x05, 0x11, 0, 0,
        0, 10,
    ];
    packet.extend_from_slice(&[0x00, 0x07]);
    packet.extend_from_slice(b"delayer");
    packet.extend_from_slice(&[0x05, 0x18, 0, 0, 0, 1]);
    packet.extend_from_slice(&[0x00, 0x06]);
    packet.extend_from_slice(b"late/w");
    packet.extend_from_slice(&[0x00, 0x03]);
    packet.extend_from_slice(b"bye");
    packet[1] = (packet.len() - 2) as u8;
    client.write_all(&packet).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let lost_at = Instant::now();
    drop(client);
    let got = watcher.publishes(1, Duration::from_secs(4));
    assert_eq!(got.len(), 1, "the will arrives");
    let after = lost_at.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "not before the 1 s delay: {after:?}"
    );
}
