//! Partitions cut for real: every node runs in a network namespace of its own, joined to the
//! test's namespace by a veth pair on a bridge, and a test takes a node's link down and up
//! again. Needs root (CI runs as root); `tools/test.sh` installs iproute2.

mod support;

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use support::{Namespaces, TestCluster, member_ids, payloads, round_trip, v5_at};

#[test]
fn a_cut_off_leader_is_replaced_removed_and_welcomed_back() {
    let namespaces = Namespaces::create(4);
    let cluster = TestCluster::start_isolated(3, 1, &namespaces);
    let leader = cluster.wait_leader(&[1, 2, 3]);
    let other = [1, 2, 3].into_iter().find(|&c| c != leader).unwrap();
    let host = |id: u32| cluster.node(id).broker.host.to_string();

    let edge_sub = v5_at(&host(4), 1883, "edge-sub", |_| {});
    edge_sub.subscribe("part/edge", QoS::AtLeastOnce);
    let leader_sub = v5_at(&host(leader), 1883, "leader-sub", |_| {});
    leader_sub.subscribe("part/leader", QoS::AtLeastOnce);
    cluster.wait_routes(other, 4, 1);
    cluster.wait_routes(other, leader, 1);
    let publisher = v5_at(&host(other), 1883, "publisher", |_| {});
    round_trip(&publisher, &edge_sub, "part/edge", "before", 3);
    round_trip(&publisher, &leader_sub, "part/leader", "before", 3);

    // The leader's link goes down: it reaches no one, and no one reaches it.
    namespaces.cut(leader as usize);
    cluster.wait_new_leader(3, leader);
    // Shown down, then removed after the grace period (2 s here), on the cores and the edge.
    for at in [other, 4] {
        cluster.wait_status(at, Duration::from_secs(20), "the old leader removed", |s| {
            !member_ids(s).contains(&u64::from(leader))
        });
    }
    // The majority side keeps working.
    round_trip(&publisher, &edge_sub, "part/edge", "during", 3);

    // The link comes back: the old leader rejoins as a follower of the new one, its routes
    // return, and messages reach its subscriber again.
    namespaces.heal(leader as usize);
    cluster.wait_all_members(Duration::from_secs(20));
    let new_leader = cluster.wait_leader(&[1, 2, 3]);
    assert_ne!(new_leader, leader, "the healed core follows the new leader");
    cluster.wait_routes(other, leader, 1);
    let mut got = Vec::new();
    for i in 0..3 {
        publisher
            .client
            .publish("part/leader", QoS::AtLeastOnce, false, format!("after-{i}"))
            .unwrap();
    }
    got.extend(payloads(&leader_sub.publishes(3, Duration::from_secs(10))));
    // Messages for the leader's subscriber published while it was cut off were not
    // acknowledged to anyone as delivered there; what comes after the heal arrives in order.
    let after: Vec<&String> = got.iter().filter(|p| p.starts_with("after-")).collect();
    assert_eq!(after, ["after-0", "after-1", "after-2"], "{got:?}");
    round_trip(&publisher, &edge_sub, "part/edge", "healed", 3);
}
