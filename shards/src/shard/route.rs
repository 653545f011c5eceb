//! Routes and routing: the node and cluster route tables (`routes`, `shared_routes`), the
//! messages between shards, and `route`, which sends a published message to every shard and
//! node that has a matching subscription.

use super::*;

/// The member of `count` that gets a message: the next in turn, or by the publisher's hash.
pub(super) fn pick_member(
    strategy: SharedStrategy,
    turn: &mut u64,
    publisher: Option<&ByteString>,
    count: usize,
) -> usize {
    match strategy {
        SharedStrategy::RoundRobin => {
            *turn += 1;
            (*turn % count as u64) as usize
        }
        SharedStrategy::ClientIdHash => {
            let hash = owner_shard(publisher.map_or("", |p| &p[..]), u16::MAX);
            usize::from(hash) % count
        }
    }
}

impl Shard {
    /// Tells every shard (this one directly) that this shard gained or lost `filter`.
    pub(super) fn broadcast_route(
        &mut self,
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    ) {
        let shard = self.config.index;
        for target in 0..self.config.shard_count {
            let message = ShardMessage::Route {
                shard,
                filter: filter.clone(),
                group: group.clone(),
                added,
            };
            if target == shard {
                self.shard_message(message);
            } else {
                self.outputs.push(Output::ToShard {
                    shard: target,
                    message,
                });
            }
        }
    }

    pub(super) fn shard_message(&mut self, message: ShardMessage) {
        match message {
            ShardMessage::Route {
                shard,
                filter,
                group,
                added,
            } => {
                self.change_route(Target::Shard(shard), filter, group, added);
            }
            ShardMessage::RemoteRoute {
                node,
                filter,
                group,
                added,
            } => {
                self.change_route(Target::Node(node), filter, group, added);
            }
            // Taken by the cluster side (`NodeShard`); a shard on its own has none.
            ShardMessage::ClusterSettings(_) => {}
            ShardMessage::ClusterNodes(nodes) => {
                self.cluster_nodes = nodes.iter().map(|n| n.node).collect();
                self.cluster_nodes_up = nodes.iter().filter(|n| n.up).map(|n| n.node).collect();
                debug!(nodes = ?self.cluster_nodes, up = ?self.cluster_nodes_up, "cluster member list");
                self.stop_waiting_for_gone_nodes();
            }
            ShardMessage::Session { node, transfer } => self.session_transfer(node, transfer),
            ShardMessage::Deliver {
                message,
                plain,
                groups,
            } => self.deliver_local(message, plain, &groups),
            ShardMessage::Retain { message } => {
                self.retained.store(message);
            }
        }
    }

    /// Adds or removes one route of the node or cluster table. Shard 0 tells the cluster when
    /// the node's count of shards for the route goes 0 -> 1 or 1 -> 0.
    pub(super) fn change_route(
        &mut self,
        target: Target,
        filter: ByteString,
        group: Option<ByteString>,
        added: bool,
    ) {
        let shard_count = match &group {
            None => {
                if added {
                    if !self.routes.get(&filter).contains(&target) {
                        self.routes.insert(&filter, target);
                    }
                } else {
                    self.routes.remove(&filter, |t| *t == target);
                }
                self.routes
                    .get(&filter)
                    .iter()
                    .filter(|t| matches!(t, Target::Shard(_)))
                    .count()
            }
            Some(group) => {
                let present = self
                    .shared_routes
                    .get(&filter)
                    .iter()
                    .any(|r| r.target == target && r.group == *group);
                if added && !present {
                    self.shared_routes.insert(
                        &filter.clone(),
                        SharedRoute {
                            group: group.clone(),
                            filter: filter.clone(),
                            target,
                        },
                    );
                } else if !added {
                    self.shared_routes
                        .remove(&filter, |r| r.target == target && r.group == *group);
                }
                self.shared_routes
                    .get(&filter)
                    .iter()
                    .filter(|r| r.group == *group && matches!(r.target, Target::Shard(_)))
                    .count()
            }
        };
        let node_level_change = if added {
            shard_count == 1
        } else {
            shard_count == 0
        };
        if self.config.index == 0 && matches!(target, Target::Shard(_)) && node_level_change {
            self.outputs.push(Output::NodeRoute {
                filter,
                group,
                added,
            });
        }
    }
}

impl Shard {
    /// Routes a message published by a client of this node; returns whether any subscription
    /// (here or on another node) matched.
    pub(super) fn publish(&mut self, message: Message) -> bool {
        self.route(message, None)
    }

    /// Routes a message to every shard of this node with a matching subscription and, for a
    /// message published here (`from_node` is None), to every other node with one. A message
    /// from another node carries what it is for here: plain subscriptions, and the shared
    /// groups whose member that node picked to be on this node.
    pub(super) fn route(
        &mut self,
        message: Message,
        from_node: Option<(bool, &[(ByteString, ByteString)])>,
    ) -> bool {
        let local_origin = from_node.is_none();
        // A retained message is stored by every shard of every node. A message from another
        // node was sent here for that alone when it matched nothing here.
        if message.retain {
            for target in 0..self.config.shard_count {
                if target != self.config.index {
                    self.outputs.push(Output::ToShard {
                        shard: target,
                        message: ShardMessage::Retain {
                            message: message.clone(),
                        },
                    });
                }
            }
            self.retained.store(message.clone());
        }
        // Which shards have matching plain subscriptions: a scratch vector kept between
        // messages, so routing allocates nothing unless shared subscriptions or other nodes
        // match.
        let shard_count = usize::from(self.config.shard_count);
        let mut plain = std::mem::take(&mut self.plain_targets);
        plain.clear();
        plain.resize(shard_count, false);
        let mut plain_nodes: Vec<NodeId> = Vec::new();
        if from_node.is_none_or(|(plain, _)| plain) {
            self.routes.for_each_match(&message.topic, |targets| {
                for &target in targets {
                    match target {
                        Target::Shard(shard) => plain[usize::from(shard)] = true,
                        Target::Node(node) if local_origin => {
                            if !plain_nodes.contains(&node) {
                                plain_nodes.push(node);
                            }
                        }
                        Target::Node(_) => {}
                    }
                }
            });
        }
        // One member per shared group and filter, cluster-wide: a shard of this node or
        // another node, taken in turn.
        let mut chosen_groups: Vec<(Target, ByteString, ByteString)> = Vec::new();
        let turn = &mut self.shared_shard_turn;
        let strategy = self.config.shared_strategy;
        let publisher = message.publisher.as_ref();
        let mut choose = |routes: &[SharedRoute], group: &ByteString, remote_allowed: bool| {
            // Members in target order, so a hash picks the same one every time.
            let mut members: Vec<&SharedRoute> = routes
                .iter()
                .filter(|r| {
                    r.group == *group && (remote_allowed || matches!(r.target, Target::Shard(_)))
                })
                .collect();
            if members.is_empty() {
                return None;
            }
            members.sort_unstable_by_key(|r| r.target);
            let chosen = members[pick_member(strategy, turn, publisher, members.len())];
            Some((chosen.target, chosen.group.clone(), chosen.filter.clone()))
        };
        match from_node {
            None if self.shared_routes.filter_count() > 0 => {
                self.shared_routes.for_each_match(&message.topic, |routes| {
                    for (position, route) in routes.iter().enumerate() {
                        // Each group once per filter: at its first route.
                        if routes[..position]
                            .iter()
                            .any(|earlier| earlier.group == route.group)
                        {
                            continue;
                        }
                        chosen_groups.extend(choose(routes, &route.group, true));
                    }
                });
            }
            None => {}
            Some((_, groups)) => {
                for (group, filter) in groups {
                    let routes = self.shared_routes.get(filter);
                    match choose(routes, group, false) {
                        Some(chosen) => chosen_groups.push(chosen),
                        None => {
                            debug!(%group, %filter, "forwarded for a shared group that has no member here now")
                        }
                    }
                }
            }
        }
        let groups_for = |target: Target| -> Vec<(ByteString, ByteString)> {
            chosen_groups
                .iter()
                .filter(|(t, _, _)| *t == target)
                .map(|(_, group, filter)| (group.clone(), filter.clone()))
                .collect()
        };
        // Other nodes: one forward each, for its plain subscriptions, its chosen groups and
        // (retained messages go to every node) its retained store.
        let mut matched = !plain_nodes.is_empty();
        if local_origin {
            let mut nodes = plain_nodes.clone();
            for (target, _, _) in &chosen_groups {
                if let Target::Node(node) = *target
                    && !nodes.contains(&node)
                {
                    nodes.push(node);
                }
            }
            if message.retain {
                for &node in &self.cluster_nodes {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
            }
            for node in nodes {
                let groups = groups_for(Target::Node(node));
                matched |= !groups.is_empty();
                self.outputs.push(Output::ToNode {
                    node,
                    forwarded: Forwarded {
                        message: message.clone(),
                        plain: plain_nodes.contains(&node),
                        groups,
                    },
                });
            }
        }
        // The last shard takes the message itself; the others get clones (each clone is a few
        // reference-count increments and a copy of the properties).
        let has_groups = |target: usize| {
            chosen_groups
                .iter()
                .any(|(t, _, _)| *t == Target::Shard(target as ShardIndex))
        };
        let last_target = (0..shard_count)
            .rev()
            .find(|&target| plain[target] || has_groups(target));
        let mut message = Some(message);
        for (target, &has_plain) in plain.iter().enumerate() {
            let groups = groups_for(Target::Shard(target as ShardIndex));
            if !has_plain && groups.is_empty() {
                continue;
            }
            let copy = if Some(target) == last_target {
                message
                    .take()
                    .expect("the message moves to the last target only")
            } else {
                message
                    .clone()
                    .expect("the message is still here before the last target")
            };
            if target == usize::from(self.config.index) {
                self.deliver_local(copy, has_plain, &groups);
            } else {
                self.outputs.push(Output::ToShard {
                    shard: target as ShardIndex,
                    message: ShardMessage::Deliver {
                        message: copy,
                        plain: has_plain,
                        groups,
                    },
                });
            }
        }
        matched |= last_target.is_some();
        self.plain_targets = plain;
        matched
    }
}
