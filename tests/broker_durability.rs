//! Crash durability with a data directory (issue 13's report): what the broker acknowledged
//! before a SIGKILL is there after a restart on the same directory, with the default sync
//! policy ("always"): a persistent session's subscription and its queued QoS 1 messages,
//! retained messages set, and retained messages cleared stay cleared.

mod support;

use std::time::Duration;

use rumqttc::QoS;
use support::{Broker, v4};

fn data_dir(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("shardmq-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}

#[test]
fn acknowledged_messages_for_an_offline_session_survive_sigkill() {
    queue_survives_sigkill("durability-queue", "");
}

/// With these policies an acknowledgement waits for the write only: a process crash (the
/// kernel keeps the page cache) still loses nothing acknowledged.
#[test]
fn acknowledged_messages_survive_sigkill_with_the_interval_and_none_policies() {
    queue_survives_sigkill(
        "durability-interval",
        "[storage]\nsync = \"interval\"\nsync_interval_ms = 60000\n",
    );
    queue_survives_sigkill("durability-none", "[storage]\nsync = \"none\"\n");
}

fn queue_survives_sigkill(name: &str, storage: &str) {
    let directory = data_dir(name);
    let config = format!("data_dir = {:?}\n{storage}", directory.to_str().unwrap());
    let mut first = Broker::start_with(2, &config);
    let keeper = v4(first.port, "durable-keeper", |o| {
        o.set_clean_session(false);
    });
    keeper.subscribe("durable/#", QoS::AtLeastOnce);
    keeper.client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let writer = v4(first.port, "durable-writer", |_| {});
    let count = 30;
    for index in 0..count {
        writer
            .client
            .publish(
                "durable/queue",
                QoS::AtLeastOnce,
                false,
                format!("queued-{index}"),
            )
            .unwrap();
    }
    writer.acknowledged(count, Duration::from_secs(10));
    // No goodbye: every PUBACK above promised the message was on disk.
    first.kill();
    assert!(directory.join("shard-0").is_dir(), "{}", first.log_text());

    // Three shards now: the session may live on another shard than before.
    let second = Broker::start_with(3, &config);
    let resumed = v4(second.port, "durable-keeper", |o| {
        o.set_clean_session(false);
    });
    let got: Vec<String> = resumed
        .publishes(count + 1, Duration::from_secs(5))
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..count).map(|i| format!("queued-{i}")).collect();
    assert_eq!(
        got,
        expected,
        "every acknowledged message, in order, once\n{}",
        second.log_text()
    );
    // The recovered subscription still routes new messages.
    let writer = v4(second.port, "durable-writer-2", |_| {});
    writer
        .client
        .publish("durable/after", QoS::AtLeastOnce, false, "after-restart")
        .unwrap();
    assert_eq!(resumed.publishes(1, Duration::from_secs(3)).len(), 1);
    drop(second);
    let _ = std::fs::remove_dir_all(&directory);
}

#[test]
fn retained_messages_set_survive_and_cleared_stay_cleared_after_sigkill() {
    let directory = data_dir("durability-retained");
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let mut first = Broker::start_with(2, &config);
    let writer = v4(first.port, "retained-writer", |_| {});
    for (topic, payload) in [
        ("kept/a", "value-a"),
        ("kept/b", "value-b"),
        ("cleared/c", "soon-gone"),
        ("cleared/d", "soon-gone"),
    ] {
        writer
            .client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .unwrap();
    }
    writer.acknowledged(4, Duration::from_secs(10));
    // A clean restart in between: the retained set goes through a checkpoint too.
    let status = first.stop().expect("the broker stops");
    assert!(status.success(), "{}", first.log_text());
    let mut second = Broker::start_with(2, &config);
    let writer = v4(second.port, "retained-writer", |_| {});
    for topic in ["cleared/c", "cleared/d"] {
        writer
            .client
            .publish(topic, QoS::AtLeastOnce, true, "")
            .unwrap();
    }
    writer
        .client
        .publish("kept/b", QoS::AtLeastOnce, true, "value-b2")
        .unwrap();
    writer.acknowledged(3, Duration::from_secs(10));
    second.kill();

    let third = Broker::start_with(1, &config);
    let reader = v4(third.port, "retained-reader", |_| {});
    reader.subscribe("#", QoS::AtMostOnce);
    let mut got: Vec<(String, String)> = reader
        .publishes(3, Duration::from_secs(3))
        .iter()
        .map(|p| {
            assert!(p.retain);
            (
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("kept/a".to_string(), "value-a".to_string()),
            ("kept/b".to_string(), "value-b2".to_string())
        ],
        "the cleared topics stay cleared\n{}",
        third.log_text()
    );
    drop(third);
    let _ = std::fs::remove_dir_all(&directory);
}

#[test]
fn a_damaged_log_stops_the_start_unless_the_operator_says_so() {
    let directory = data_dir("durability-damaged");
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let mut first = Broker::start_with(1, &config);
    let keeper = v4(first.port, "damaged-keeper", |o| {
        o.set_clean_session(false);
    });
    keeper.subscribe("damaged/#", QoS::AtLeastOnce);
    keeper.client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    first.kill();
    // A missing segment before the newest one is not something a crash does: put a later
    // segment beside the one there, so that a gap separates them.
    let shard = directory.join("shard-0");
    let mut segments: Vec<_> = std::fs::read_dir(&shard)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let newest = segments.last().expect("a segment").clone();
    let name = newest.file_stem().unwrap().to_str().unwrap();
    let later = shard.join(format!("{:020}.log", name.parse::<u64>().unwrap() + 2));
    std::fs::copy(&newest, &later).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args([
            "serve",
            "--shards",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            directory.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--recover-damaged"), "{stderr}");
    let mut forced =
        Broker::start_with(1, &format!("{config}\n[storage]\nrecover_damaged = true\n"));
    let resumed = v4(forced.port, "damaged-keeper", |o| {
        o.set_clean_session(false);
    });
    drop(resumed);
    assert!(forced.is_running(), "{}", forced.log_text());
    assert!(
        forced.log_text().contains("started anyway"),
        "{}",
        forced.log_text()
    );
    drop(forced);
    let _ = std::fs::remove_dir_all(&directory);
}

/// A snapshot file of the kind a shutdown before the durable log wrote, made by a shard in
/// memory: a persistent 3.1.1 session subscribed to `upgraded/#`, and a retained message.
fn old_snapshot() -> Vec<u8> {
    use bytes::{Bytes, BytesMut};
    use bytestring::ByteString;
    use shardmq_net::mqtt::{
        self, Connect, ConnectProperties, Packet, ProtocolVersion, Publish, PublishProperties,
        Subscribe, SubscribeProperties, SubscriptionOptions,
    };
    use shardmq_shards::{Input, Limits, Shard, ShardConfig, SharedStrategy, Transport};
    let mut shard = Shard::new(ShardConfig {
        index: 0,
        shard_count: 1,
        node: 0,
        takeover_timeout_ms: 5_000,
        limits: Limits::default(),
        shared_strategy: SharedStrategy::RoundRobin,
    });
    let version = ProtocolVersion::V3_1_1;
    let connect = |client_id: &'static str, clean_start: bool| {
        Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start,
            keep_alive_seconds: 0,
            properties: ConnectProperties::default(),
            client_id: ByteString::from_static(client_id),
            will: None,
            username: None,
            password: None,
        }))
    };
    shard.handle(
        0,
        Input::Opened {
            connection: 1,
            transport: Transport::default(),
        },
    );
    shard.handle(
        0,
        Input::Opened {
            connection: 2,
            transport: Transport::default(),
        },
    );
    let mut send = |connection: u64, packet: Packet| {
        let mut bytes = BytesMut::new();
        mqtt::encode(&packet, version, &mut bytes);
        shard.handle(
            0,
            Input::Received {
                connection,
                bytes: bytes.freeze(),
            },
        );
    };
    send(1, connect("upgraded-keeper", false));
    send(
        1,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: SubscribeProperties::default(),
            filters: vec![(
                ByteString::from_static("upgraded/#"),
                SubscriptionOptions::new(mqtt::QoS::AtLeastOnce),
            )],
        }),
    );
    send(2, connect("upgraded-writer", true));
    send(
        2,
        Packet::Publish(Publish {
            dup: false,
            qos: mqtt::QoS::AtLeastOnce,
            retain: true,
            topic: ByteString::from_static("upgraded/state"),
            packet_id: 1,
            properties: PublishProperties::default(),
            payload: Bytes::from_static(b"from-the-snapshot"),
        }),
    );
    shard.handle(0, Input::Shutdown);
    let mut outputs = Vec::new();
    shard.take_outputs(&mut outputs);
    shard.snapshot()
}

#[test]
fn an_old_snapshot_is_read_once_into_the_log_and_removed() {
    let directory = data_dir("durability-upgrade");
    std::fs::create_dir_all(&directory).unwrap();
    std::fs::write(directory.join("shard-0.snapshot"), old_snapshot()).unwrap();
    let config = format!("data_dir = {:?}\n", directory.to_str().unwrap());
    let mut first = Broker::start_with(2, &config);
    assert!(
        first.log_text().contains("restored from an old snapshot"),
        "{}",
        first.log_text()
    );
    assert!(
        !directory.join("shard-0.snapshot").exists(),
        "removed once the logs hold it"
    );
    first.kill();
    // The snapshot is gone, and the log has what it held.
    let second = Broker::start_with(2, &config);
    let keeper = v4(second.port, "upgraded-keeper", |o| {
        o.set_clean_session(false);
    });
    let writer = v4(second.port, "upgraded-writer-2", |_| {});
    writer
        .client
        .publish("upgraded/new", QoS::AtLeastOnce, false, "routed")
        .unwrap();
    let got: Vec<String> = keeper
        .publishes(3, Duration::from_secs(3))
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    // The retained message was in flight to the keeper when the snapshot was taken.
    assert_eq!(
        got,
        ["from-the-snapshot", "routed"],
        "{}",
        second.log_text()
    );
    let reader = v4(second.port, "upgraded-reader", |_| {});
    reader.subscribe("upgraded/state", QoS::AtMostOnce);
    let retained = reader.publishes(1, Duration::from_secs(3));
    assert_eq!(retained.len(), 1);
    assert_eq!(&retained[0].payload[..], b"from-the-snapshot");
    drop(second);
    let _ = std::fs::remove_dir_all(&directory);
}

/// A start on `directory` that must be refused: its stderr.
fn refused_start(directory: &std::path::Path, config: &str) -> String {
    let (status, stderr) =
        support::serve_to_exit(directory, 1, config, &[], Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "refused:\n{stderr}");
    stderr
}

#[test]
fn a_damaged_or_oversized_old_snapshot_stops_the_start_and_is_kept() {
    let directory = data_dir("durability-hostile-snapshot");
    std::fs::create_dir_all(&directory).unwrap();
    let snapshot = directory.join("shard-0.snapshot");

    // Not a snapshot at all.
    std::fs::write(&snapshot, b"not a snapshot of any kind").unwrap();
    let stderr = refused_start(&directory, "");
    assert!(
        stderr.contains("shard-0.snapshot") && stderr.contains("it is kept"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        b"not a snapshot of any kind"
    );

    // A real one with a torn tail: refused, kept, and loaded with --recover-damaged.
    let mut torn = old_snapshot();
    torn.truncate(torn.len() - 3);
    std::fs::write(&snapshot, &torn).unwrap();
    let stderr = refused_start(&directory, "");
    assert!(
        stderr.contains("shard-0.snapshot")
            && stderr.contains("is damaged")
            && stderr.contains("--recover-damaged"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&snapshot).unwrap(), torn);
    let config = format!(
        "data_dir = {:?}\n[storage]\nrecover_damaged = true\n",
        directory.to_str().unwrap()
    );
    let mut forced = Broker::start_with(1, &config);
    assert!(forced.is_running(), "{}", forced.log_text());
    drop(forced);
    assert!(!snapshot.exists(), "loaded into the logs, then removed");

    // Larger than storage.recovery_file_bytes_max: a snapshot, then a segment.
    let small = "[storage]\nsegment_size_bytes = 4096\nrecovery_file_bytes_max = 4096\n";
    std::fs::write(&snapshot, vec![0u8; 5000]).unwrap();
    let stderr = refused_start(&directory, small);
    assert!(
        stderr.contains("shard-0.snapshot") && stderr.contains("recovery_file_bytes_max"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&snapshot).unwrap().len(), 5000, "kept");
    std::fs::remove_file(&snapshot).unwrap();
    let segment = directory.join("shard-0").join(format!("{:020}.log", 999));
    std::fs::write(&segment, vec![0u8; 5000]).unwrap();
    let stderr = refused_start(&directory, small);
    assert!(
        stderr.contains(&format!("{:020}.log", 999)) && stderr.contains("recovery_file_bytes_max"),
        "{stderr}"
    );
    assert!(segment.exists(), "kept");
    let _ = std::fs::remove_dir_all(&directory);
}

#[test]
fn a_raft_store_past_its_bounds_stops_a_cores_start_before_reading_it() {
    let directory = data_dir("durability-raft-bounds");
    let raft = directory.join("raft");
    let core = format!(
        "[cluster]\nenabled = true\nsecret = \"{}\"\nnode_id = 1\nrole = \"core\"\nlisten = \"127.0.0.1:{}\"\n",
        support::CLUSTER_SECRET,
        support::free_port()
    );
    let segment = |sequence: u64| raft.join(format!("{sequence:020}.raft"));
    // Sparse files: their sizes are checked before a byte is read, so none is.
    let sized = |sequence: u64, bytes: u64| {
        std::fs::File::create(segment(sequence))
            .unwrap()
            .set_len(bytes)
            .unwrap();
    };
    let mib = 1024 * 1024;
    for (case, files, expected) in [
        (
            "too many segments",
            vec![16; 5],
            "more than 4 Raft segments",
        ),
        (
            "one segment too large",
            vec![300 * mib],
            "more than a Raft segment may",
        ),
        (
            "too many bytes",
            vec![200 * mib; 3],
            "bytes together, more than",
        ),
    ] {
        let _ = std::fs::remove_dir_all(&raft);
        std::fs::create_dir_all(&raft).unwrap();
        for (i, bytes) in files.iter().enumerate() {
            sized(i as u64 + 1, *bytes);
        }
        let stderr = refused_start(&directory, &core);
        assert!(stderr.contains(expected), "{case}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&directory);
}
