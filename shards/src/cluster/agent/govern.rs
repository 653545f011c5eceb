//! A core's share of the Raft group, as the agent drives it: founding, the leader's
//! decisions, and what the group committed mirrored into the route log.
//!
//! Owns: one round of the group per batch ([`Core::consensus_round`]), the leader's proposals
//! ([`Core::govern`]) and the mirror of committed entries ([`Core::mirror`]).
//! Invariants: the route log takes committed entries in commit order; the leader proposes a
//! decision again only when it has not been committed within an election timeout, and one
//! voter change at a time; the leader's decisions iterate B-trees (origins, registry), so two
//! runs of one input propose the same entries in the same order.

use shardmq_net::frame::{Body, LogEntry, NodeId, Role};
use tracing::{debug, info, warn};

use super::super::Io;
use super::super::consensus::{Committed, check_setting};
use super::core::Core;
use super::{Shared, group_state};

impl Core {
    /// One round of the Raft group: founding, the leader's decisions, raft-rs's ready cycle,
    /// the committed entries into the route log, and the messages out.
    pub(super) fn consensus_round(&mut self, shared: &mut Shared, io: &mut Io) {
        // Runs after every batch: allocates only while the core is not in a group, or when
        // what it tells the other cores changed.
        let founders = if self.consensus.is_initialized() {
            Vec::new()
        } else {
            shared.founders()
        };
        let consensus = &mut self.consensus;
        if self.merging && consensus.other_group_runs() {
            self.merging = false;
            if consensus.is_initialized() {
                info!(
                    "joining another cluster's Raft group: this core's own group of one is dropped"
                );
                consensus.reset();
                consensus.hold = false;
            }
        }
        if !consensus.is_initialized() {
            consensus.set_founders(&founders);
        }
        if !consensus.is_initialized() && !consensus.hold && io.now_ms >= self.waiting_logged_ms {
            // Say why there is no group yet, every 10 s while it lasts.
            self.waiting_logged_ms = io.now_ms + 10_000;
            let unreached: Vec<String> = shared
                .seeds
                .iter()
                .filter(|s| s.configured && !s.is_self)
                .filter(|s| {
                    s.connection
                        .is_none_or(|c| !shared.up_links.contains_key(&c))
                })
                .map(|s| s.address.to_string())
                .collect();
            if !unreached.is_empty() {
                info!(
                    ?unreached,
                    "not in the cores' Raft group yet: the first start of a cluster waits for every core of the seed list"
                );
            } else if shared.up_links.values().any(|&(_, r)| r == Role::Core) {
                info!(
                    "not in the cores' Raft group yet: waiting for the other cores to agree on the founders, or for the leader to add this core"
                );
            }
        }
        consensus.try_found();
        if self.told.as_ref().is_none_or(|told| !consensus.tells(told)) {
            let state = consensus.group_state();
            self.told = Some(state.clone());
            for connection in shared.core_links() {
                io.send(connection, &group_state(state.clone()));
            }
        }
        self.consensus.process();
        self.mirror(shared, io);
        // The leader's decisions iterate over every node: they run when something they
        // depend on moved (a link, a commit, a Leave) and once a heartbeat, not every batch.
        if std::mem::take(&mut self.govern_due) || io.now_ms >= self.next_govern_ms {
            self.next_govern_ms = io.now_ms + io.settings.heartbeat_ms;
            self.govern(shared, io);
        }
        self.consensus.process();
        self.mirror(shared, io);
        // Raft messages go on the link this core dialled to their core, in the order raft-rs
        // gave them. One that has no link is lost, which raft-rs is told (once per core and
        // round), so that it sends again what it waits to hear back about.
        let mut unreached = Vec::new();
        for (to, message) in self.consensus.take_outbox() {
            let link = shared
                .up_links
                .iter()
                .find(|&(c, &(node, _))| node == to && shared.is_seed_link(*c));
            match link {
                Some((&connection, _)) => io.send(connection, &Body::Raft { message }),
                None => {
                    debug!(to, "no control link to the core: Raft message dropped");
                    if !unreached.contains(&to) {
                        unreached.push(to);
                    }
                }
            }
        }
        for node in unreached {
            self.consensus.unreachable(node);
        }
    }

    /// Mirrors what the Raft group committed into this core's route log, in commit order.
    fn mirror(&mut self, shared: &mut Shared, io: &mut Io) {
        let now_ms = io.now_ms;
        let committed = std::mem::take(&mut self.consensus.committed);
        self.govern_due |= !committed.is_empty();
        for item in committed {
            let entries: Vec<LogEntry> = match item {
                Committed::Entry(entry) => vec![entry],
                Committed::Snapshot => self.registry_difference(shared),
            };
            for entry in entries {
                match entry {
                    LogEntry::Removed(node) if node != shared.node => {
                        // A node that is linked to this core again keeps its routes: they
                        // come back right after its removal.
                        let routes = shared.view.routes.get(&node).cloned().unwrap_or_default();
                        info!(
                            node,
                            "node removed from the cluster: its routes are withdrawn"
                        );
                        self.append(shared, LogEntry::Removed(node), &io.settings, now_ms);
                        match self.origins.get_mut(&node) {
                            // Back in the log once the leader has it joined again.
                            Some(origin) if origin.links > 0 => {
                                origin.held.get_or_insert(routes);
                            }
                            _ => {
                                self.origins.remove(&node);
                            }
                        }
                    }
                    LogEntry::Joined(member) => {
                        let node = member.node;
                        self.append(
                            shared,
                            LogEntry::Joined(member.clone()),
                            &io.settings,
                            now_ms,
                        );
                        if let Some(origin) = self.origins.get_mut(&node)
                            && origin.member == member
                            && let Some(routes) = origin.held.take()
                        {
                            self.append_replace(shared, node, routes, &io.settings, now_ms);
                        }
                    }
                    LogEntry::Down(node) => {
                        warn!(
                            node,
                            "node is down: its routes are kept for the grace period"
                        );
                        self.append(shared, LogEntry::Down(node), &io.settings, now_ms);
                    }
                    entry => self.append(shared, entry, &io.settings, now_ms),
                }
            }
        }
    }

    /// The registry was replaced (a snapshot, or the group dropped): the difference from the
    /// view, as entries. Members linked to this core stay: the leader sees them too and has
    /// them joined again (a new group starts from an empty registry).
    fn registry_difference(&self, shared: &Shared) -> Vec<LogEntry> {
        let registry = &self.consensus.registry;
        let gone = shared
            .view
            .members
            .keys()
            .filter(|n| **n != shared.node && !registry.members.contains_key(n))
            .filter(|n| self.origins.get(n).is_none_or(|o| o.links == 0))
            .map(|n| LogEntry::Removed(*n));
        let up = shared
            .view
            .down
            .iter()
            .filter(|n| !registry.down.contains(n))
            .map(|n| LogEntry::Up(*n));
        let entries = registry
            .entries()
            .into_iter()
            .filter(|e| !matches!(e, LogEntry::Removed(_)));
        gone.chain(up).chain(entries).collect()
    }

    /// The Raft leader's decisions, from the links every node keeps to every core: who joined,
    /// who is down, who is back, who is removed (after the grace period, or at once when it
    /// said it leaves), and which cores vote. Each is proposed again only if it has not been
    /// committed within an election timeout.
    fn govern(&mut self, shared: &Shared, io: &mut Io) {
        let now_ms = io.now_ms;
        if !self.consensus.is_leader() {
            self.absent_since.clear();
            self.proposed.clear();
            return;
        }
        let registry = &self.consensus.registry;
        let mut wanted = Vec::new();
        let me = io.settings.link.member.clone();
        if registry.members.get(&shared.node) != Some(&me) {
            wanted.push(LogEntry::Joined(me));
        } else if registry.down.contains(&shared.node) {
            wanted.push(LogEntry::Up(shared.node));
        }
        for (&node, origin) in &self.origins {
            if origin.links == 0 || self.left.contains(&node) {
                continue;
            }
            if registry.members.get(&node) != Some(&origin.member) {
                wanted.push(LogEntry::Joined(origin.member.clone()));
            } else if registry.down.contains(&node) {
                wanted.push(LogEntry::Up(node));
            }
        }
        for &node in registry.members.keys() {
            let linked = self.origins.get(&node).is_some_and(|o| o.links > 0);
            if node == shared.node || (linked && !self.left.contains(&node)) {
                self.absent_since.remove(&node);
                continue;
            }
            let since = *self.absent_since.entry(node).or_insert(now_ms);
            if self.left.contains(&node) || now_ms >= since + io.settings.down_grace_ms {
                wanted.push(LogEntry::Removed(node));
            } else if !registry.down.contains(&node) {
                wanted.push(LogEntry::Down(node));
            }
        }
        self.absent_since
            .retain(|node, _| registry.members.contains_key(node));
        // One voter change at a time.
        let voter_change = self.consensus.voter_change();
        let retry_ms = io.settings.link_timeout_ms * 2;
        self.proposed.retain(|_, at| now_ms < *at + retry_ms);
        let consensus = &mut self.consensus;
        for entry in wanted {
            let key = format!("{entry:?}");
            if self.proposed.contains_key(&key) {
                continue;
            }
            debug!(?entry, "the Raft leader proposes");
            if let Err(error) = consensus.propose(&entry) {
                debug!(%error, "proposal not taken");
            }
            self.proposed.insert(key, now_ms);
        }
        if let Some((id, add)) = voter_change {
            let key = format!("voter {id} {add}");
            if let std::collections::btree_map::Entry::Vacant(slot) = self.proposed.entry(key) {
                info!(
                    node = id as NodeId,
                    incarnation = id >> 32,
                    add,
                    "the Raft leader changes the cores' voters"
                );
                if let Err(error) = consensus.propose_voter(id, add) {
                    debug!(%error, "voter change not taken");
                }
                slot.insert(now_ms);
            }
        }
    }

    /// Proposes a cluster-wide setting (`ctl cluster set`); a follower forwards the proposal
    /// to the leader.
    pub(super) fn propose_setting(&mut self, key: &str, value: &str) -> Result<(), String> {
        check_setting(key, value)?;
        if self.consensus.leader().is_none() {
            return Err("the cores' Raft group has no leader now: try again".into());
        }
        self.consensus.propose(&LogEntry::Setting {
            key: key.into(),
            value: value.into(),
        })
    }
}
