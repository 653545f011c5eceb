//! Seeds given by name (`cluster.seeds` entries `host:port` and `srv:NAME`).
//!
//! Owns: `Shared::names` and the seeds their answers made. The agent never resolves: it
//! asks (`NodeOutput::Resolve`, carried out by a resolver thread of the node) and takes the
//! answer (`NodeInput::Resolved`), keeping each name and its last addresses.
//! How: every address of an answer becomes a configured seed tagged with its name. A seed of
//! a name is dialled only after a fresh answer (`awaiting_name` is set when its link closes
//! or its dial fails), so a core that came back at a new address (a Kubernetes pod) is
//! found there, and the old address is dialled no more. A name is asked again at most once
//! per reconnect interval, and only while it has not answered, one of its seeds waits for
//! it, or it gave no address but this node's own.
//! Invariants: a name stands for at most [`SEED_ADDRESSES_PER_NAME_MAX`] seeds at once, so
//! a name that changes its answers often cannot grow the seed list (slots of addresses that
//! left the answer are reused); a failed answer is logged (once a minute at most) and asked
//! again, never fatal; after a failure the last addresses are dialled as they were.

use std::net::SocketAddr;

use tracing::{debug, info, warn};

use super::super::{Io, SEED_ADDRESSES_PER_NAME_MAX};
use super::{Agent, Seed, SeedNameStatus, Shared};

/// A failing name is logged at most this often (it is retried every reconnect interval).
const FAILURE_LOG_INTERVAL_MS: u64 = 60_000;

impl Agent {
    /// The resolver's answer for seed name `index`.
    pub fn seed_resolved(
        &mut self,
        index: usize,
        result: Result<Vec<SocketAddr>, String>,
        io: &Io,
    ) {
        let now_ms = io.now_ms;
        let own_address = &io.settings.link.member.cluster_address;
        let shared = &mut self.shared;
        let Some(named) = shared.names.get_mut(index) else {
            // The node left the cluster while the name was out: nothing to do.
            return;
        };
        named.resolving = false;
        named.retry_at_ms = now_ms + io.settings.reconnect_ms;
        let mut addresses = match result {
            Ok(addresses) => addresses,
            Err(error) => {
                named.failures += 1;
                if named
                    .failure_logged_ms
                    .is_none_or(|at| now_ms >= at + FAILURE_LOG_INTERVAL_MS)
                {
                    named.failure_logged_ms = Some(now_ms);
                    warn!(
                        name = %named.name,
                        %error,
                        failures = named.failures,
                        last_addresses = ?named.addresses,
                        "cannot resolve a seed name; its last addresses are dialled, and it is asked again"
                    );
                }
                named.error = Some(error);
                // The last addresses are dialled as they were.
                for seed in shared.seeds.iter_mut().filter(|s| s.name == Some(index)) {
                    seed.awaiting_name = false;
                }
                return;
            }
        };
        addresses.truncate(SEED_ADDRESSES_PER_NAME_MAX);
        if named.failures > 0 || !named.answered || named.addresses != addresses {
            info!(name = %named.name, ?addresses, "seed name resolved");
        }
        named.failures = 0;
        named.error = None;
        named.answered = true;
        named.addresses.clone_from(&addresses);
        shared.take_addresses(index, &addresses, own_address);
    }
}

impl Shared {
    /// Asks for the names that are due (see the module comment).
    pub(super) fn resolve_due_names(&mut self, io: &mut Io) {
        for index in 0..self.names.len() {
            if self.name_wanted(index)
                && let Some(named) = self.names.get_mut(index)
                && io.now_ms >= named.retry_at_ms
            {
                named.resolving = true;
                io.resolve(index, &named.name);
            }
        }
    }

    /// The earliest time a name is due, if one is wanted.
    pub(super) fn names_deadline_ms(&self) -> Option<u64> {
        (0..self.names.len())
            .filter(|&index| self.name_wanted(index))
            .filter_map(|index| self.names.get(index).map(|n| n.retry_at_ms))
            .min()
    }

    /// Whether name `index` should be asked (when its interval has passed).
    fn name_wanted(&self, index: usize) -> bool {
        let Some(named) = self.names.get(index) else {
            return false;
        };
        if named.resolving {
            return false;
        }
        // The seeds of the last answer (seeds whose address left it wait for a new address,
        // not for the name).
        let mut seeds = self
            .seeds
            .iter()
            .filter(|s| named.addresses.contains(&s.address));
        !named.answered || seeds.clone().any(|s| s.awaiting_name) || seeds.all(|s| s.is_self)
    }

    /// Makes the addresses of name `index`'s answer its seeds: each is dialled now (if not
    /// up already); a seed of the name whose address left the answer and that has no link
    /// is reused for a new address, or waits (dialled no more) until one comes.
    fn take_addresses(&mut self, index: usize, addresses: &[SocketAddr], own_address: &str) {
        for &address in addresses {
            if let Some(seed) = self.seeds.iter_mut().find(|s| s.address == address) {
                // Known already (from this name, another, or the member list): dial it
                // now if it waits. One learnt from the member list or from a core that
                // dialled us follows this name from now on.
                seed.awaiting_name = false;
                seed.configured = true;
                seed.name.get_or_insert(index);
                continue;
            }
            let fresh = Seed {
                address,
                connection: None,
                connecting: false,
                retry_at_ms: 0,
                node: None,
                is_self: address.to_string() == own_address,
                configured: true,
                name: Some(index),
                awaiting_name: false,
            };
            let of_name = self.seeds.iter().filter(|s| s.name == Some(index)).count();
            let reusable = self.seeds.iter_mut().find(|s| {
                s.name == Some(index)
                    && s.connection.is_none()
                    && !s.connecting
                    && !addresses.contains(&s.address)
            });
            match reusable {
                Some(slot) => *slot = fresh,
                None if of_name < SEED_ADDRESSES_PER_NAME_MAX => self.seeds.push(fresh),
                None => {
                    // At most once per answer, so at most once per reconnect interval.
                    debug!(%address, "a seed name's new address is not used yet: its older addresses still have links");
                }
            }
        }
        // An address that left the answer no longer holds back the founding of the group.
        for seed in &mut self.seeds {
            if seed.name == Some(index) && !addresses.contains(&seed.address) {
                seed.configured = false;
            }
        }
    }

    pub(super) fn names_status(&self) -> Vec<SeedNameStatus> {
        self.names
            .iter()
            .map(|n| SeedNameStatus {
                name: n.name.to_string(),
                addresses: n.addresses.clone(),
                error: n.error.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use shardmq_net::frame::Role;

    use super::super::super::{Io, NodeOutput, SeedName, TAG_SEED};
    use super::super::core::tests::settings;
    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().expect("an address")
    }

    /// Each redial of a named seed follows a fresh answer, so a core that came back at a new
    /// address is dialled there; a failed answer dials the last addresses; an answer that
    /// lists this node is not dialled; a long answer is cut.
    #[test]
    fn a_seed_name_is_resolved_again_before_each_redial() {
        let mut settings = settings(1, Role::Edge);
        let name = SeedName::Host {
            host: "cores".into(),
            port: 7000,
        };
        settings.seed_names = vec![name.clone()];
        let mut agent = Agent::new(&settings, 1, 0);
        let mut io = Io::new(settings.clone(), 0);
        let resolve = || NodeOutput::Resolve {
            index: 0,
            name: name.clone(),
        };
        let tick = |agent: &mut Agent, io: &mut Io, now_ms: u64| {
            io.now_ms = now_ms;
            agent.tick(io);
            std::mem::take(&mut io.outputs)
        };
        assert_eq!(tick(&mut agent, &mut io, 0), vec![resolve()]);
        // One question out at a time.
        assert_eq!(tick(&mut agent, &mut io, 50), vec![]);
        let (a, b) = (address("127.0.0.2:7000"), address("127.0.0.3:7000"));
        agent.seed_resolved(0, Ok(vec![a]), &io);
        let dial = |address| NodeOutput::Connect {
            address,
            tag: TAG_SEED,
        };
        assert_eq!(tick(&mut agent, &mut io, 50), vec![dial(a)]);
        // The dial failed: the name is asked again (after the reconnect interval), not the
        // address dialled.
        agent.seed_connected(0, None, 50, 100);
        assert_eq!(agent.next_deadline_ms(&settings), Some(150));
        assert_eq!(tick(&mut agent, &mut io, 149), vec![]);
        assert_eq!(tick(&mut agent, &mut io, 150), vec![resolve()]);
        // The core came back at another address: the seed's slot is reused for it.
        agent.seed_resolved(0, Ok(vec![b]), &io);
        assert_eq!(tick(&mut agent, &mut io, 150), vec![dial(b)]);
        assert_eq!(agent.status(150).seeds, vec![(b, "connecting")]);
        // A failed answer: the last address is dialled as it was, and status says why.
        agent.seed_connected(0, None, 150, 100);
        assert_eq!(tick(&mut agent, &mut io, 250), vec![resolve()]);
        agent.seed_resolved(0, Err("no such name".into()), &io);
        assert_eq!(tick(&mut agent, &mut io, 250), vec![dial(b)]);
        let status = agent.status(250);
        assert_eq!(status.seed_names.len(), 1);
        assert_eq!(status.seed_names[0].name, "cores:7000");
        assert_eq!(status.seed_names[0].addresses, vec![b]);
        assert_eq!(status.seed_names[0].error.as_deref(), Some("no such name"));
        // This node's own address is never dialled, and a long answer is cut to the cap.
        agent.seed_connected(0, None, 250, 100);
        assert_eq!(tick(&mut agent, &mut io, 350), vec![resolve()]);
        let mut many: Vec<SocketAddr> = (10..60)
            .map(|n| address(&format!("127.0.1.{n}:7000")))
            .collect();
        many.insert(0, address("127.0.0.1:7000"));
        agent.seed_resolved(0, Ok(many.clone()), &io);
        let dials = tick(&mut agent, &mut io, 350);
        assert_eq!(dials.len(), SEED_ADDRESSES_PER_NAME_MAX - 1, "{dials:?}");
        assert!(!dials.contains(&dial(many[0])));
        assert_eq!(agent.status(350).seeds.len(), SEED_ADDRESSES_PER_NAME_MAX);
    }

    /// An address the node knew already (a core learnt from the member list) that a name
    /// then gives is not dialled twice, follows the name from then on, and the name, having
    /// its address, is not asked again while the seed is up or connecting.
    #[test]
    fn a_known_address_that_a_name_gives_is_one_seed() {
        let mut settings = settings(1, Role::Edge);
        settings.seed_names = vec![SeedName::Srv("_cluster._tcp.cores".into())];
        let mut agent = Agent::new(&settings, 1, 0);
        let mut io = Io::new(settings.clone(), 0);
        let known = address("127.0.0.2:7000");
        agent.add_seed(known, false);
        agent.tick(&mut io);
        let outputs = std::mem::take(&mut io.outputs);
        assert_eq!(outputs.len(), 2, "{outputs:?}");
        agent.seed_resolved(0, Ok(vec![known]), &io);
        io.now_ms = 1_000;
        agent.tick(&mut io);
        assert_eq!(
            io.outputs,
            vec![],
            "the seed is dialling and the name answered"
        );
        assert_eq!(agent.status(1_000).seeds, vec![(known, "connecting")]);
        // Its dial fails: it waits for the name, which is asked again.
        agent.seed_connected(0, None, 1_000, 100);
        io.now_ms = 1_100;
        agent.tick(&mut io);
        assert_eq!(
            io.outputs,
            vec![NodeOutput::Resolve {
                index: 0,
                name: SeedName::Srv("_cluster._tcp.cores".into())
            }]
        );
    }
}
