//! A subscriber that never reads, over real sockets: the broker's memory stays near the
//! configured unsent bound while a publisher floods it with QoS 0, other clients on the same
//! shard keep getting their messages promptly, the stuck subscriber is disconnected after the
//! configured stuck time, and the memory is back once it has left.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Broker, raw, raw_v5_subscribed, read_until_closed, variable_byte_integer};

const MIB: u64 = 1024 * 1024;
/// The flood: 3200 QoS 0 messages of 64 KiB, 200 MiB in all.
const FLOOD_PAYLOAD_BYTES: usize = 64 * 1024;
const FLOOD_MESSAGES: usize = 3200;
const STUCK_TIMEOUT_MS: u64 = 4_000;
/// What the broker may hold beyond its resting size during the flood: the unsent bound
/// (1 MiB) of the stuck subscriber, the receive buffer ring as it fills (512 x 16 KiB =
/// 8 MiB), and a fixed allowance for the publisher's partial packets, the allocator and the
/// other connections.
const RSS_GROWTH_MAX_BYTES: u64 = MIB + 8 * MIB + 24 * MIB;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// A connected 3.1.1 client with a clean session.
fn connected_v311(port: u16, client_id: &str) -> TcpStream {
    let mut stream = raw(port);
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    stream.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
    stream
}

/// A 3.1.1 QoS 0 PUBLISH.
fn publish_v311(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x30];
    variable_byte_integer(2 + topic.len() + payload.len(), &mut packet);
    packet.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    packet.extend_from_slice(topic.as_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// Reads 3.1.1 QoS 0 PUBLISH packets whose payload is the send time in microseconds since
/// `epoch`, and keeps the worst delay and the count until `stop`.
fn measure_latency(
    mut stream: TcpStream,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    count: Arc<AtomicU64>,
) {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(_) => continue,
        }
        // Small packets: one length byte. Topic "ping/t", payload 8 bytes.
        while buffer.len() >= 2 && buffer.len() >= 2 + usize::from(buffer[1]) {
            let length = 2 + usize::from(buffer[1]);
            assert_eq!(
                buffer[0] & 0xF0,
                0x30,
                "a PUBLISH: {:02x?}",
                &buffer[..length]
            );
            let payload = &buffer[length - 8..length];
            let sent_us = u64::from_be_bytes(payload.try_into().unwrap());
            let now_us = epoch.elapsed().as_micros() as u64;
            worst_us.fetch_max(now_us.saturating_sub(sent_us), Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
            buffer.drain(..length);
        }
    }
}

#[test]
fn a_subscriber_that_never_reads_costs_its_bound_not_the_flood_and_is_disconnected() {
    let broker = Broker::start_with(
        1,
        &format!(
            "[reactor]\nbuffer_count = 512\n[limits]\nunsent_bytes_per_connection_max = {MIB}\nsend_stuck_timeout_ms = {STUCK_TIMEOUT_MS}\n"
        ),
    );
    let pid = broker.pid();
    // The stuck subscriber: subscribes and never reads again.
    let mut stuck = raw_v5_subscribed(broker.port, "stuck", 0, "flood/t");
    // Another subscriber on the same shard, which reads, and its publisher.
    let mut fast = connected_v311(broker.port, "fast");
    fast.write_all(&[0x82, 0x0b, 0x00, 0x01, 0x00, 0x06])
        .unwrap();
    fast.write_all(b"ping/t\x00").unwrap();
    let mut suback = [0u8; 5];
    fast.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x00], "SUBACK");
    let mut pinger = connected_v311(broker.port, "pinger");
    let mut flooder = connected_v311(broker.port, "flooder");
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_bytes(pid);

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let worst_us = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, worst_us, received) = (stop.clone(), worst_us.clone(), received.clone());
        std::thread::spawn(move || measure_latency(fast, epoch, stop, worst_us, received))
    };
    let pings_sent = Arc::new(AtomicU64::new(0));
    let ping_thread = {
        let (stop, pings_sent) = (stop.clone(), pings_sent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now_us = epoch.elapsed().as_micros() as u64;
                pinger
                    .write_all(&publish_v311("ping/t", &now_us.to_be_bytes()))
                    .unwrap();
                pings_sent.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let peak = Arc::new(Mutex::new(rss_before));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let rss = rss_bytes(pid);
                let mut peak = peak.lock().unwrap();
                *peak = (*peak).max(rss);
                drop(peak);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let flood = publish_v311("flood/t", &vec![0x5a; FLOOD_PAYLOAD_BYTES]);
    for _ in 0..FLOOD_MESSAGES {
        flooder.write_all(&flood).unwrap();
    }
    // A PINGREQ answered means the broker has read the whole flood.
    flooder.write_all(&[0xC0, 0x00]).unwrap();
    let mut pong = [0u8; 2];
    flooder
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    flooder.read_exact(&mut pong).unwrap();
    assert_eq!(pong, [0xD0, 0x00]);
    let flood_ms = epoch.elapsed().as_millis();
    let peak_during = *peak.lock().unwrap();

    // The stuck subscriber is disconnected after the stuck time (the log says why), not
    // before; its socket is cut after the reactor's close linger.
    let disconnected_ms = loop {
        if broker
            .log_text()
            .contains("the client has not read its messages")
        {
            break epoch.elapsed().as_millis() as u64;
        }
        assert!(
            epoch.elapsed() < Duration::from_millis(STUCK_TIMEOUT_MS + 20_000),
            "the stuck subscriber was not disconnected; peak RSS growth {} MiB\n{}",
            peak_during.saturating_sub(rss_before) / MIB,
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        disconnected_ms >= STUCK_TIMEOUT_MS,
        "disconnected after {disconnected_ms} ms, before the stuck time"
    );
    let (_, closed) = read_until_closed(&mut stuck, Duration::from_secs(15));
    assert!(closed, "the stuck subscriber's socket was not closed");
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_bytes(pid);
    stop.store(true, Ordering::Relaxed);
    for thread in [reader, ping_thread, sampler] {
        thread.join().unwrap();
    }
    let peak_rss = *peak.lock().unwrap();
    let worst_ms = worst_us.load(Ordering::Relaxed) / 1000;
    eprintln!(
        "RSS before {} KiB, peak during the flood {} KiB (+{} KiB), after the subscriber left {} KiB; flood read in {flood_ms} ms; disconnected at {disconnected_ms} ms; pings {} sent, {} received, worst delay {worst_ms} ms",
        rss_before / 1024,
        peak_during / 1024,
        peak_during.saturating_sub(rss_before) / 1024,
        rss_after / 1024,
        pings_sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    assert!(
        peak_rss.saturating_sub(rss_before) <= RSS_GROWTH_MAX_BYTES,
        "the broker grew by {} MiB for a subscriber that does not read",
        peak_rss.saturating_sub(rss_before) / MIB
    );
    assert!(
        rss_after <= rss_before + RSS_GROWTH_MAX_BYTES,
        "memory not returned after the subscriber left: {} MiB above the start",
        rss_after.saturating_sub(rss_before) / MIB
    );
    // The reading subscriber got every ping (the last may be in flight at the stop), promptly.
    let (sent, got) = (
        pings_sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    assert!(
        got + 2 >= sent && got > 0,
        "pings: {sent} sent, {got} received"
    );
    assert!(worst_ms < 2_000, "a ping took {worst_ms} ms");
}
