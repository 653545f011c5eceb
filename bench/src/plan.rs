//! Scenario planning: which clients a scenario has, what each publishes or subscribes to, which
//! (subscriber, publisher) streams must arrive, the rate the schedule offers, and how many
//! processes the clients need.
//!
//! Owns: the mapping from a `Scenario` and its `Options` to `ClientPlan`s and expected streams,
//! and the client identifier prefix (the same in the parent and every worker, so a run's
//! identifiers are unique and its workers' clients do not collide).
//! Invariant: subscribers come first in a plan, so that they subscribe before publishing starts.

use shardmq_bench::generator::{self, ClientPlan, Role};

use crate::cli::{Options, Scenario};

/// The tally under which all members of the shared group count what they receive.
const SHARED_GROUP_TALLY: u32 = u32::MAX;

/// The clients of a scenario, and the (subscriber, publisher) streams that must arrive.
pub(crate) fn plan(scenario: Scenario, options: &Options) -> (Vec<ClientPlan>, Vec<(u32, u32)>) {
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    let publisher = |index: u32, topic: String| ClientPlan {
        index,
        role: Role::Publisher { index, topic },
    };
    let subscriber = |index: u32, filter: String| ClientPlan {
        index,
        role: Role::Subscriber {
            filter,
            tally: index,
        },
    };
    let prefix = client_prefix();
    match scenario {
        Scenario::Pairs => {
            for pair in 0..options.clients {
                clients.push(publisher(pair, format!("bench/pairs/{pair}")));
                clients.push(subscriber(
                    options.clients + pair,
                    format!("bench/pairs/{pair}"),
                ));
                streams.push((options.clients + pair, pair));
            }
        }
        Scenario::FanIn => {
            for index in 0..options.clients {
                clients.push(publisher(index, format!("bench/fanin/{index}")));
            }
            for index in 0..options.peers {
                let subscriber_index = options.clients + index;
                clients.push(subscriber(subscriber_index, "bench/fanin/#".into()));
                streams.extend((0..options.clients).map(|p| (subscriber_index, p)));
            }
        }
        Scenario::FanOut => {
            for index in 0..options.peers {
                clients.push(publisher(index, "bench/fanout".into()));
            }
            for index in 0..options.clients {
                let subscriber_index = options.peers + index;
                clients.push(subscriber(subscriber_index, "bench/fanout".into()));
                streams.extend((0..options.peers).map(|p| (subscriber_index, p)));
            }
        }
        Scenario::Conn => {
            clients.extend((0..options.clients).map(|index| ClientPlan {
                index,
                role: Role::Idle,
            }));
        }
        Scenario::Shared => {
            for index in 0..options.peers {
                clients.push(publisher(index, format!("bench/shared/{index}")));
                streams.push((SHARED_GROUP_TALLY, index));
            }
            for index in 0..options.clients {
                let role = Role::Subscriber {
                    filter: "$share/bench/bench/shared/#".into(),
                    tally: SHARED_GROUP_TALLY,
                };
                clients.push(ClientPlan {
                    index: options.peers + index,
                    role,
                });
            }
        }
        Scenario::Wildcard => {
            for index in 0..options.peers {
                clients.push(publisher(index, format!("bench/wild/{index}/data")));
            }
            for index in 0..options.clients {
                let subscriber_index = options.peers + index;
                clients.push(subscriber(subscriber_index, "bench/wild/+/data".into()));
                streams.extend((0..options.peers).map(|p| (subscriber_index, p)));
            }
        }
        Scenario::Pub => {
            let pattern = options
                .topic
                .clone()
                .unwrap_or_else(|| "bench/pub/%i".into());
            for index in 0..options.clients {
                clients.push(publisher(
                    index,
                    generator::expand_topic(&pattern, &prefix, index),
                ));
            }
        }
        Scenario::Sub => {
            let pattern = options.topic.clone().unwrap_or_else(|| "bench/#".into());
            for index in 0..options.clients {
                clients.push(subscriber(
                    index,
                    generator::expand_topic(&pattern, &prefix, index),
                ));
            }
        }
    }
    // Subscribers first, so that they are subscribed before publishing starts.
    clients.sort_by_key(|client| !matches!(client.role, Role::Subscriber { .. }));
    (clients, streams)
}

/// Deliveries per second the schedule asks for: each publish reaches one subscriber in `pairs`
/// and `shared` (a group takes each message once), every subscriber in `fan-in`, `fan-out` and
/// `wildcard`, and none that this run measures in `pub`, `sub` and `conn`.
pub(crate) fn offered_per_second(
    scenario: Scenario,
    publishers: u32,
    subscribers: u32,
    rate: f64,
) -> f64 {
    let publishes = f64::from(publishers) * rate;
    match scenario {
        Scenario::Pairs | Scenario::Shared => publishes,
        Scenario::FanIn | Scenario::FanOut | Scenario::Wildcard => {
            publishes * f64::from(subscribers)
        }
        Scenario::Pub | Scenario::Sub | Scenario::Conn => 0.0,
    }
}

/// Client identifiers are `bench-{parent pid}-{index}`: unique per run, the same in workers.
pub(crate) fn client_prefix() -> String {
    let pid = std::env::var("SHARDMQ_BENCH_PARENT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(std::process::id);
    format!("bench-{pid}-")
}

/// The soft open-file limit of this process.
pub(crate) fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// How many processes the run needs: what was asked, or enough that each holds its clients
/// within the open-file limit (less a margin for the process's own descriptors).
pub(crate) fn processes_needed(requested: u32, clients: u64, open_files: u64) -> u32 {
    if requested > 0 {
        return requested;
    }
    let per_process = open_files.saturating_sub(128).max(1);
    clients.div_ceil(per_process).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_rate_per_scenario() {
        assert_eq!(offered_per_second(Scenario::Pairs, 50, 50, 200.0), 10_000.0);
        assert_eq!(
            offered_per_second(Scenario::Shared, 10, 10, 1000.0),
            10_000.0
        );
        assert_eq!(offered_per_second(Scenario::FanIn, 100, 1, 200.0), 20_000.0);
        assert_eq!(
            offered_per_second(Scenario::Wildcard, 10, 20, 1000.0),
            200_000.0
        );
    }

    #[test]
    fn processes_follow_the_open_file_limit() {
        assert_eq!(processes_needed(0, 10, 20_000), 1);
        assert_eq!(processes_needed(0, 19_872, 20_000), 1);
        assert_eq!(processes_needed(0, 19_873, 20_000), 2);
        assert_eq!(processes_needed(0, 100_000, 20_000), 6);
        assert_eq!(processes_needed(3, 10, 20_000), 3, "an explicit count wins");
    }
}
