//! The cluster as one node sees it: members, which are down, and every member's routes.
//!
//! Owns: applying route-log entries and snapshots, and telling what each one changed, so that
//! the shards hear of a route exactly when it appears or goes.
//! Invariant: a node's routes are known exactly while it is a member; a member that is down
//! keeps its routes until it is removed.

use std::collections::{BTreeMap, BTreeSet};

use shardmq_net::frame::{LogEntry, Member, NodeId, Route};

/// What one change did, for the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Route {
        node: NodeId,
        route: Route,
        added: bool,
    },
    /// The member list changed.
    Members,
    /// A cluster-wide setting changed.
    Settings,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct View {
    pub members: BTreeMap<NodeId, Member>,
    pub down: BTreeSet<NodeId>,
    pub routes: BTreeMap<NodeId, BTreeSet<Route>>,
    /// Cluster-wide settings the cores' Raft group committed.
    pub settings: BTreeMap<String, String>,
}

/// A view as the parts of a snapshot body.
pub type Parts = (
    Vec<Member>,
    Vec<NodeId>,
    Vec<(NodeId, Route)>,
    Vec<(String, String)>,
);

impl View {
    pub fn route_count(&self) -> usize {
        self.routes.values().map(BTreeSet::len).sum()
    }

    /// Applies one log entry; pushes what changed.
    pub fn apply(&mut self, entry: &LogEntry, changes: &mut Vec<Change>) {
        match entry {
            LogEntry::Joined(member) => {
                // A member that was down and joins again unchanged is a change too (it is up).
                let was_down = self.down.remove(&member.node);
                if self.members.get(&member.node) != Some(member) {
                    self.members.insert(member.node, member.clone());
                    changes.push(Change::Members);
                } else if was_down {
                    changes.push(Change::Members);
                }
            }
            LogEntry::Down(node) => {
                if self.down.insert(*node) {
                    changes.push(Change::Members);
                }
            }
            LogEntry::Up(node) => {
                if self.down.remove(node) {
                    changes.push(Change::Members);
                }
            }
            LogEntry::Removed(node) => {
                self.replace_routes(*node, BTreeSet::new(), changes);
                self.down.remove(node);
                if self.members.remove(node).is_some() {
                    changes.push(Change::Members);
                }
            }
            LogEntry::Route {
                origin,
                route,
                added,
            } => {
                let routes = self.routes.entry(*origin).or_default();
                let changed = if *added {
                    routes.insert(route.clone())
                } else {
                    routes.remove(route)
                };
                if routes.is_empty() {
                    self.routes.remove(origin);
                }
                if changed {
                    changes.push(Change::Route {
                        node: *origin,
                        route: route.clone(),
                        added: *added,
                    });
                }
            }
            LogEntry::Replace { origin, routes } => {
                self.replace_routes(*origin, routes.iter().cloned().collect(), changes);
            }
            LogEntry::Setting { key, value } => {
                if self.settings.get(key) != Some(value) {
                    self.settings.insert(key.clone(), value.clone());
                    changes.push(Change::Settings);
                }
            }
        }
    }

    /// Becomes `other` (a snapshot); pushes the difference.
    pub fn replace(&mut self, other: View, changes: &mut Vec<Change>) {
        let origins: BTreeSet<NodeId> = self
            .routes
            .keys()
            .chain(other.routes.keys())
            .copied()
            .collect();
        for origin in origins {
            let routes = other.routes.get(&origin).cloned().unwrap_or_default();
            self.replace_routes(origin, routes, changes);
        }
        if self.members != other.members || self.down != other.down {
            changes.push(Change::Members);
        }
        if self.settings != other.settings {
            changes.push(Change::Settings);
        }
        self.members = other.members;
        self.down = other.down;
        self.settings = other.settings;
    }

    fn replace_routes(&mut self, origin: NodeId, new: BTreeSet<Route>, changes: &mut Vec<Change>) {
        let old = self.routes.remove(&origin).unwrap_or_default();
        for route in old.difference(&new) {
            changes.push(Change::Route {
                node: origin,
                route: route.clone(),
                added: false,
            });
        }
        for route in new.difference(&old) {
            changes.push(Change::Route {
                node: origin,
                route: route.clone(),
                added: true,
            });
        }
        if !new.is_empty() {
            self.routes.insert(origin, new);
        }
    }

    /// The view as a snapshot body's parts.
    pub fn parts(&self) -> Parts {
        (
            self.members.values().cloned().collect(),
            self.down.iter().copied().collect(),
            self.routes
                .iter()
                .flat_map(|(node, routes)| routes.iter().map(|r| (*node, r.clone())))
                .collect(),
            self.settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    pub fn from_parts((members, down, routes, settings): Parts) -> Self {
        let mut view = View {
            members: members.into_iter().map(|m| (m.node, m)).collect(),
            down: down.into_iter().collect(),
            routes: BTreeMap::new(),
            settings: settings.into_iter().collect(),
        };
        for (node, route) in routes {
            view.routes.entry(node).or_default().insert(route);
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_net::frame::Role;

    fn member(node: NodeId) -> Member {
        Member {
            node,
            role: Role::Edge,
            cluster_address: format!("127.0.0.1:{}", 7000 + node),
            mqtt_address: String::new(),
            epoch: 0,
        }
    }

    fn route(filter: &str) -> Route {
        Route {
            filter: filter.into(),
            group: None,
        }
    }

    #[test]
    fn entries_and_snapshots_report_exactly_what_changed() {
        let mut view = View::default();
        let mut changes = Vec::new();
        view.apply(&LogEntry::Joined(member(2)), &mut changes);
        view.apply(
            &LogEntry::Replace {
                origin: 2,
                routes: vec![route("a"), route("b")],
            },
            &mut changes,
        );
        view.apply(
            &LogEntry::Route {
                origin: 2,
                route: route("a"),
                added: true,
            },
            &mut changes,
        );
        assert_eq!(changes.len(), 3, "{changes:?}");
        changes.clear();
        view.apply(&LogEntry::Down(2), &mut changes);
        // Down keeps the routes; the member list (which is up) changed.
        assert_eq!(changes, [Change::Members]);
        assert!(view.down.contains(&2) && view.route_count() == 2);
        changes.clear();
        // Joined again unchanged: it is up, and the shards must hear so.
        view.apply(&LogEntry::Joined(member(2)), &mut changes);
        assert_eq!(changes, [Change::Members]);
        assert!(view.down.is_empty());
        view.apply(&LogEntry::Down(2), &mut changes);
        changes.clear();
        view.apply(
            &LogEntry::Setting {
                key: "forward_queue_max".into(),
                value: "5".into(),
            },
            &mut changes,
        );
        assert_eq!(changes, [Change::Settings]);
        changes.clear();
        let mut copy = View::from_parts(view.parts());
        assert_eq!(copy, view);

        let mut target = view.clone();
        target.apply(&LogEntry::Removed(2), &mut Vec::new());
        copy.replace(target.clone(), &mut changes);
        assert_eq!(copy, target);
        assert_eq!(
            changes
                .iter()
                .filter(|c| matches!(c, Change::Route { added: false, .. }))
                .count(),
            2
        );
        assert!(changes.contains(&Change::Members));
    }
}
