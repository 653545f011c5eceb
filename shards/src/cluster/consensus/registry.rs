//! What the cores' Raft group agrees on: the registry its committed entries build, and the
//! cluster-wide settings it holds.
//!
//! Owns: [`Registry`] (members with their roles, which are down, which were removed, the
//! settings) and the check of a setting's value.
//! Invariants: every map is a B-tree, so the registry's entries (a Raft snapshot's data) come
//! out in one order on every core; applying an entry is a pure function of the registry and
//! the entry, so every core that applies the same committed entries holds the same registry.

use std::collections::{BTreeMap, BTreeSet};

use shardmq_net::frame::{LogEntry, Member, NodeId};

/// The settings the cluster holds one value of, with what each accepts.
pub const SETTINGS: &[(&str, &str)] = &[
    ("down_grace_seconds", "0 to 86400"),
    ("forward_queue_max", "1 to 100000000"),
    ("takeover_timeout_ms", "1 to 600000"),
];

/// Checks a cluster-wide setting; the error says what is accepted.
pub fn check_setting(key: &str, value: &str) -> Result<u64, String> {
    let Some((_, accepted)) = SETTINGS.iter().find(|(k, _)| *k == key) else {
        let known: Vec<&str> = SETTINGS.iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "{key:?} is not a cluster-wide setting (known: {})",
            known.join(", ")
        ));
    };
    let range = match key {
        "down_grace_seconds" => 0..=86_400,
        "forward_queue_max" => 1..=100_000_000,
        _ => 1..=600_000,
    };
    value
        .parse::<u64>()
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| format!("{key} must be a whole number from {accepted}, not {value:?}"))
}

/// What the committed entries of the group have built.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registry {
    pub members: BTreeMap<NodeId, Member>,
    pub down: BTreeSet<NodeId>,
    pub settings: BTreeMap<String, String>,
    /// Nodes removed and not back since: their Raft voters are retired.
    pub removed: BTreeSet<NodeId>,
}

impl Registry {
    pub(super) fn apply(&mut self, entry: &LogEntry) {
        match entry {
            LogEntry::Joined(member) => {
                self.down.remove(&member.node);
                self.removed.remove(&member.node);
                self.members.insert(member.node, member.clone());
            }
            LogEntry::Down(node) => {
                if self.members.contains_key(node) {
                    self.down.insert(*node);
                }
            }
            LogEntry::Up(node) => {
                self.down.remove(node);
            }
            LogEntry::Removed(node) => {
                self.members.remove(node);
                self.down.remove(node);
                self.removed.insert(*node);
            }
            LogEntry::Setting { key, value } => {
                self.settings.insert(key.clone(), value.clone());
            }
            LogEntry::Route { .. } | LogEntry::Replace { .. } => {}
        }
    }

    /// The registry as entries that build it from nothing (a snapshot's data).
    pub fn entries(&self) -> Vec<LogEntry> {
        let members = self.members.values().cloned().map(LogEntry::Joined);
        let down = self.down.iter().copied().map(LogEntry::Down);
        let removed = self.removed.iter().copied().map(LogEntry::Removed);
        let settings = self.settings.iter().map(|(key, value)| LogEntry::Setting {
            key: key.clone(),
            value: value.clone(),
        });
        removed.chain(members).chain(down).chain(settings).collect()
    }

    pub(super) fn from_entries(entries: &[LogEntry]) -> Self {
        let mut registry = Self::default();
        for entry in entries {
            registry.apply(entry);
        }
        registry
    }
}
