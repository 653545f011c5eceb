//! The cores' Raft group with real node processes on 127.0.0.x: one leader, every core a
//! voter, cluster-wide settings that reach every node and survive the loss of the leader, and
//! bad settings refused with a clear error.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{TestCluster, raft};

fn setting(status: &Value, key: &str) -> Option<String> {
    status["settings"][key].as_str().map(str::to_string)
}

#[test]
fn three_cores_elect_one_leader_and_settings_survive_its_loss() {
    let mut cluster = TestCluster::start(3, 1);
    let leader = cluster.wait_leader(&[1, 2, 3]);
    // An edge takes no part in the vote.
    assert!(raft(&cluster.status(4)).is_null());

    // A setting proposed on a follower core reaches every node, the edge included.
    let follower = [1, 2, 3].into_iter().find(|&c| c != leader).unwrap();
    cluster
        .node(follower)
        .broker
        .ctl(&["cluster", "set", "takeover_timeout_ms", "1500"])
        .expect("a core takes a setting");
    for node in 1..=4 {
        cluster.wait_status(node, Duration::from_secs(10), "the setting", |s| {
            setting(s, "takeover_timeout_ms").as_deref() == Some("1500")
        });
    }

    // Bad input: an unknown key and a value out of range are refused, and nothing changes.
    let refused = |node: u32, key: &str, value: &str| {
        cluster
            .node(node)
            .broker
            .ctl(&["cluster", "set", key, value])
            .unwrap_err()
    };
    let unknown = refused(leader, "no_such_setting", "1");
    assert!(unknown.contains("not a cluster-wide setting"), "{unknown}");
    let out_of_range = refused(leader, "forward_queue_max", "0");
    assert!(out_of_range.contains("from 1 to"), "{out_of_range}");
    let on_edge = refused(4, "forward_queue_max", "500");
    assert!(on_edge.contains("core"), "{on_edge}");
    assert_eq!(setting(&cluster.status(leader), "forward_queue_max"), None);

    // The leader dies: the two other cores elect a new one, which still holds the setting,
    // marks the old leader down and, after the grace period, removes it and its voter.
    cluster.node_mut(leader).broker.kill();
    let rest = cluster.wait_new_leader(3, leader);
    for &core in &rest {
        assert_eq!(
            setting(&cluster.status(core), "takeover_timeout_ms").as_deref(),
            Some("1500")
        );
    }
    let new_leader = cluster.wait_leader(&rest);
    assert_ne!(new_leader, leader);
    cluster
        .node(new_leader)
        .broker
        .ctl(&["cluster", "set", "forward_queue_max", "5000"])
        .expect("the new leader takes a setting");
    cluster.wait_status(4, Duration::from_secs(10), "the new setting", |s| {
        setting(s, "forward_queue_max").as_deref() == Some("5000")
    });

    // It comes back as a new voter (a new incarnation) and the group is whole again.
    cluster.restart(leader);
    cluster.wait_leader(&[1, 2, 3]);
    cluster.wait_status(leader, Duration::from_secs(10), "the settings", |s| {
        setting(s, "forward_queue_max").as_deref() == Some("5000")
            && setting(s, "takeover_timeout_ms").as_deref() == Some("1500")
    });
}

#[test]
fn a_single_core_founds_its_group_alone() {
    let cluster = TestCluster::start(1, 1);
    assert_eq!(cluster.wait_leader(&[1]), 1);
    let status = cluster.status(1);
    assert!(raft(&status)["term"].as_u64().unwrap() >= 1);
    assert!(raft(&status)["commit"].as_u64().unwrap() >= 2);
}

fn raft_id(cluster: &TestCluster, node: u32) -> String {
    raft(&cluster.status(node))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sets `key` through core `through` and waits until every core holds it.
fn set_everywhere(cluster: &TestCluster, through: u32, key: &str, value: &str) {
    cluster
        .node(through)
        .broker
        .ctl(&["cluster", "set", key, value])
        .expect("a core takes a setting");
    for node in 1..=3 {
        cluster.wait_status(node, Duration::from_secs(10), "the setting", |s| {
            setting(s, key).as_deref() == Some(value)
        });
    }
}

/// Every core's Raft identifier and voter list, as its status tells them.
fn identities(cluster: &TestCluster) -> Vec<(String, Value)> {
    (1..=3)
        .map(|node| {
            let status = cluster.status(node);
            (raft_id(cluster, node), raft(&status)["voter_ids"].clone())
        })
        .collect()
}

#[test]
fn killed_cores_come_back_as_the_voters_they_were_with_the_settings() {
    let root = std::env::temp_dir().join(format!("shardmq-raft-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut cluster = TestCluster::start_persistent(3, 0, &root);
    cluster.wait_leader(&[1, 2, 3]);
    // A core down longer than the grace period is removed, voter and all (and would come
    // back as a new one): the grace is set long enough for the stops and starts below.
    set_everywhere(&cluster, 1, "down_grace_seconds", "120");
    set_everywhere(&cluster, 1, "forward_queue_max", "777");
    let before = identities(&cluster);
    assert_eq!(before[0].1.as_array().map(Vec::len), Some(3), "{before:?}");
    for node in 1..=3 {
        let store = root.join(format!("node-{node}")).join("raft");
        let segments = std::fs::read_dir(&store)
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0);
        assert!(
            segments >= 1,
            "node {node} keeps its Raft state in {store:?}"
        );
    }

    // A clean stop and start keeps the voter.
    let status = cluster.node_mut(3).broker.stop().expect("it stops");
    assert!(status.success(), "{status:?}");
    assert!(!root.join("node-3").join("raft.state").exists());
    cluster.restart(3);
    cluster.wait_leader(&[1, 2, 3]);
    assert_eq!(
        identities(&cluster),
        before,
        "the same voters after a clean restart"
    );

    // Two of the three killed (the group has no majority), then started again: they take up
    // their votes and logs, the group re-forms with the same voters and the setting, and no
    // core joins as a new voter.
    cluster.node_mut(1).broker.kill();
    cluster.node_mut(2).broker.kill();
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_leader(&[1, 2, 3]);
    assert_eq!(
        identities(&cluster),
        before,
        "the same voters after two crashes"
    );
    for node in 1..=3 {
        assert_eq!(
            setting(&cluster.status(node), "forward_queue_max").as_deref(),
            Some("777"),
            "node {node}"
        );
    }

    // A setting changed now survives all three killed at once.
    set_everywhere(&cluster, 2, "takeover_timeout_ms", "4321");
    for node in 1..=3 {
        cluster.node_mut(node).broker.kill();
    }
    for node in 1..=3 {
        cluster.restart(node);
    }
    cluster.wait_leader(&[1, 2, 3]);
    assert_eq!(
        identities(&cluster),
        before,
        "the same voters after a crash of all"
    );
    for node in 1..=3 {
        let status = cluster.status(node);
        assert_eq!(
            setting(&status, "forward_queue_max").as_deref(),
            Some("777")
        );
        assert_eq!(
            setting(&status, "takeover_timeout_ms").as_deref(),
            Some("4321")
        );
    }

    // A majority down for longer than the surviving core waits for a leader: that core drops
    // its group, but the two come back with theirs, and the group (settings and all) takes
    // the third back as a new voter.
    cluster.node_mut(1).broker.kill();
    cluster.node_mut(2).broker.kill();
    cluster.wait_status(3, Duration::from_secs(40), "the group dropped", |s| {
        raft(s)["state"] == "waiting"
    });
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_leader(&[1, 2, 3]);
    let after = identities(&cluster);
    assert_eq!(
        (&after[0].0, &after[1].0),
        (&before[0].0, &before[1].0),
        "the two keep their identities"
    );
    assert_ne!(after[2].0, before[2].0, "the third joins anew");
    for node in 1..=3 {
        cluster.wait_status(node, Duration::from_secs(10), "the settings", |s| {
            setting(s, "forward_queue_max").as_deref() == Some("777")
                && setting(s, "takeover_timeout_ms").as_deref() == Some("4321")
        });
    }

    // Synced state damaged (a length of the first frame, with its complement unchanged):
    // the core refuses to start, and says what to do, rather than rejoin with a lost log.
    cluster.node_mut(3).broker.kill();
    let store = root.join("node-3").join("raft");
    let segment = std::fs::read_dir(&store)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "raft"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[1] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    let config = root.join("node-3.toml");
    // Keys before `[cluster]` are `[server]`'s (the test broker opens that table).
    std::fs::write(&config, format!("[server]\n{}", cluster.node(3).config())).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args([
            "serve",
            "--shards",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("damaged") && stderr.contains("move"),
        "{stderr}"
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&root);
}
