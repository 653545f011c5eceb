//! State kept across a restart with a data directory: a persistent session's subscriptions and
//! the QoS 1 messages queued for it while offline, and retained messages, survive SIGTERM and a
//! start with a different shard count (crashes: `broker_durability.rs`).

mod support;

use std::time::Duration;

use rumqttc::QoS;
use support::{Broker, v4};

#[test]
fn sessions_queues_and_retained_messages_survive_a_restart() {
    let data_dir = std::env::temp_dir().join(format!("shardmq-persistence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let config = format!("data_dir = {:?}\n", data_dir.to_str().unwrap());

    let mut first = Broker::start_with(2, &config);
    let keeper = v4(first.port, "persistent-keeper", |o| {
        o.set_clean_session(false);
    });
    keeper.subscribe("saved/#", QoS::AtLeastOnce);
    keeper.client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let writer = v4(first.port, "saved-writer", |_| {});
    writer
        .client
        .publish("saved/state", QoS::AtLeastOnce, true, "retained-value")
        .unwrap();
    for index in 0..3 {
        writer
            .client
            .publish(
                "saved/queue",
                QoS::AtLeastOnce,
                false,
                format!("queued-{index}"),
            )
            .unwrap();
    }
    writer.acknowledged(4, Duration::from_secs(5));
    let status = first.stop().expect("the broker stops");
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        first.log_text()
    );
    assert!(data_dir.join("shard-0").is_dir() && data_dir.join("shard-1").is_dir());

    // Three shards now: the session may live on another shard than before.
    let second = Broker::start_with(3, &config);
    assert!(
        second.log_text().contains("restored from the durable log"),
        "{}",
        second.log_text()
    );
    let resumed = v4(second.port, "persistent-keeper", |o| {
        o.set_clean_session(false);
    });
    let got: Vec<String> = resumed
        .publishes(5, Duration::from_secs(3))
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(
        got,
        ["retained-value", "queued-0", "queued-1", "queued-2"],
        "the offline queue, in order"
    );
    // The restored subscription still routes new messages.
    let writer = v4(second.port, "saved-writer-2", |_| {});
    writer
        .client
        .publish("saved/after", QoS::AtLeastOnce, false, "after-restart")
        .unwrap();
    assert_eq!(resumed.publishes(1, Duration::from_secs(3)).len(), 1);
    // And the retained message is there for a new subscriber.
    let late = v4(second.port, "late-reader", |_| {});
    late.subscribe("saved/state", QoS::AtMostOnce);
    let retained = late.publishes(1, Duration::from_secs(3));
    assert_eq!(retained.len(), 1);
    assert!(retained[0].retain);
    assert_eq!(&retained[0].payload[..], b"retained-value");
    drop(second);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn an_unwritable_data_directory_fails_at_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args([
            "serve",
            "--shards",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/proc/shardmq-cannot-be-here",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("data directory"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
