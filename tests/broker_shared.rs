//! Shared subscriptions through a real broker: each message goes to exactly one member of the
//! group, members on different shards share the load, and a plain subscriber of the same
//! filter still gets everything.

mod support;

use std::time::Duration;

use rumqttc::QoS;
use support::{Broker, v4};

#[test]
fn each_message_reaches_one_member_of_the_group() {
    let broker = Broker::start(2);
    let members: Vec<_> = ["worker-a", "worker-b", "worker-c"]
        .iter()
        .map(|id| {
            let member = v4(broker.port, id, |_| {});
            member.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce);
            member
        })
        .collect();
    let plain = v4(broker.port, "auditor", |_| {});
    plain.subscribe("jobs/#", QoS::AtLeastOnce);
    let publisher = v4(broker.port, "job-source", |_| {});
    const JOBS: usize = 60;
    for index in 0..JOBS {
        publisher
            .client
            .publish("jobs/x", QoS::AtLeastOnce, false, format!("{index}"))
            .unwrap();
    }
    let mut seen: Vec<usize> = Vec::new();
    let mut per_member = Vec::new();
    for member in &members {
        let got = member.publishes(JOBS, Duration::from_millis(1500));
        per_member.push(got.len());
        seen.extend(got.iter().map(|p| {
            String::from_utf8_lossy(&p.payload)
                .parse::<usize>()
                .unwrap()
        }));
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..JOBS).collect::<Vec<_>>(),
        "every job exactly once across the group: {per_member:?}"
    );
    assert!(
        per_member.iter().filter(|&&n| n > 0).count() >= 2,
        "load shared: {per_member:?}"
    );
    assert_eq!(
        plain.publishes(JOBS, Duration::from_secs(3)).len(),
        JOBS,
        "the plain subscriber gets all"
    );
}
