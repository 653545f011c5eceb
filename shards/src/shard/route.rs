//! Routes and routing: the node and cluster route tables (`routes`, `shared_routes`), the
//! messages between shards, and `route`, which sends a published message to every shard and
//! node that has a matching subscription.
//!
//! A retained message goes into every shard's store only within the store's limits
//! (`Retained`): a client's retained PUBLISH past them is refused before it is routed
//! (`retained_store_refuses`), and one that reaches a full store from elsewhere is dropped
//! there and counted. Shards can then differ at the limit (two topics racing for the last
//! place may each win on a different shard) until one of them is cleared.

use super::*;
use crate::limits::quote;

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
    /// Stores a retained message in this shard's store (a full store drops and counts it).
    pub(super) fn store_retained(&mut self, message: Message) {
        let logs = self
            .durable
            .as_ref()
            .is_some_and(|durable| durable.has_log());
        let copy = logs.then(|| message.clone());
        let stored = self.retained.store(message);
        if let Some(message) = copy {
            self.log_retained(&message, stored != crate::retained::Stored::Refused);
        }
    }

    /// Refuses a client's retained PUBLISH that the retained store has no room for: QoS 1
    /// and 2 get PUBACK / PUBREC 0x97 (Quota exceeded; 3.x cannot say why), QoS 0 is
    /// dropped, and all are counted. The message is not routed either, so that 0x97 means
    /// that nothing happened. A QoS 2 resend of a message already taken is not refused.
    pub(super) fn retained_store_refuses(
        &mut self,
        connection_id: ConnectionId,
        index: SessionIndex,
        publish: &Publish,
    ) -> bool {
        if !publish.retain
            || self
                .retained
                .admits(&publish.topic, &publish.payload, &publish.properties)
            || (publish.qos == QoS::ExactlyOnce
                && self
                    .session(index)
                    .awaiting_release
                    .contains(&publish.packet_id))
        {
            return false;
        }
        self.retained.count_refusal();
        client_log!(DEBUG, self.who(connection_id), topic = %quote(&publish.topic), "retained PUBLISH refused: the retained store is full");
        let ack = PubAck {
            packet_id: publish.packet_id,
            reason: ReasonCode::QUOTA_EXCEEDED,
            properties: AckProperties::default(),
        };
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(connection_id, &Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(connection_id, &Packet::PubRec(ack)),
        }
        true
    }

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
                let listed = &self.cluster_nodes;
                self.unreachable.retain(|node| listed.contains(node));
                self.stop_waiting_for_gone_nodes();
                self.replication_members_changed(&nodes);
            }
            ShardMessage::Replicas {
                home,
                home_shard,
                reset,
                records,
            } => self.replicas_received(home, home_shard, reset, records),
            ShardMessage::Session { node, transfer } => self.session_transfer(node, transfer),
            ShardMessage::Deliver {
                message,
                plain,
                groups,
                receipt: None,
            } => self.deliver_local(message, plain, &groups),
            ShardMessage::Deliver {
                message,
                plain,
                groups,
                receipt: Some(receipt),
            } => {
                let before = self.receipt_begin();
                self.deliver_local(message, plain, &groups);
                self.receipt_finish(before, receipt);
            }
            ShardMessage::Retain {
                message,
                receipt: None,
            } => self.store_retained(message),
            ShardMessage::Retain {
                message,
                receipt: Some(receipt),
            } => {
                let before = self.receipt_begin();
                self.store_retained(message);
                self.receipt_finish(before, receipt);
            }
            ShardMessage::Durable { receipts } => self.receipts_answered(&receipts),
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

/// The member a shared group's message goes to: a shard of this node or another node, and
/// the group and filter it is for.
struct ChosenMember {
    target: Target,
    group: ByteString,
    filter: ByteString,
}

/// What a message from another node is for here: whether it is for plain subscriptions, and
/// the (group, filter) pairs whose member that node picked to be on this node.
type FromNode<'a> = Option<(bool, &'a [(ByteString, ByteString)])>;

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
    ///
    /// The steps: store a retained message everywhere, match the route tables for plain
    /// subscriptions, pick one member per shared group, forward to the other nodes, fan out
    /// to the shards of this node.
    pub(super) fn route(&mut self, mut message: Message, from_node: FromNode<'_>) -> bool {
        if message.retain {
            self.retain_everywhere(&mut message);
        }
        // Which shards have matching plain subscriptions: a scratch vector kept between
        // messages, so routing allocates nothing unless shared subscriptions or other nodes
        // match.
        let mut plain = std::mem::take(&mut self.plain_targets);
        let plain_nodes = self.match_plain(&message.topic, from_node, &mut plain);
        let chosen = self.pick_shared_members(&message, from_node);
        let mut matched = !plain_nodes.is_empty();
        if from_node.is_none() {
            matched |= self.forward_to_nodes(&message, &plain_nodes, &chosen);
        }
        matched |= self.fan_out_to_shards(message, &plain, &chosen);
        self.plain_targets = plain;
        matched
    }

    /// A retained message is stored by every shard of every node (the other nodes get it
    /// from `forward_to_nodes`). A message from another node was sent here for that alone
    /// when it matched nothing here.
    fn retain_everywhere(&mut self, message: &mut Message) {
        // Once per node, before the shards share it: the stores keep it for long.
        crate::retained::own_buffers(message);
        let owner = owner_shard(&message.topic, self.config.shard_count);
        for target in 0..self.config.shard_count {
            if target != self.config.index {
                // The owner records the topic's change; a held acknowledgement waits for it.
                let receipt = match &mut self.durable {
                    Some(durable) if target == owner => durable.receipt(self.config.index),
                    _ => None,
                };
                self.outputs.push(Output::ToShard {
                    shard: target,
                    message: ShardMessage::Retain {
                        message: message.clone(),
                        receipt,
                    },
                });
            }
        }
        self.store_retained(message.clone());
    }

    /// Marks in `plain` the shards of this node whose plain subscriptions match `topic`, and
    /// returns the other nodes with matching plain subscriptions (for a message published
    /// here only: a forwarded message is never forwarded on).
    fn match_plain(
        &self,
        topic: &str,
        from_node: FromNode<'_>,
        plain: &mut Vec<bool>,
    ) -> Vec<NodeId> {
        let local_origin = from_node.is_none();
        plain.clear();
        plain.resize(usize::from(self.config.shard_count), false);
        let mut plain_nodes: Vec<NodeId> = Vec::new();
        if from_node.is_none_or(|(plain, _)| plain) {
            self.routes.for_each_match(topic, |targets| {
                for &target in targets {
                    match target {
                        Target::Shard(shard) => {
                            if let Some(slot) = plain.get_mut(usize::from(shard)) {
                                *slot = true;
                            }
                        }
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
        plain_nodes
    }

    /// One member per shared group and filter, cluster-wide: a shard of this node or another
    /// node, taken in turn (or by the publisher's hash). For a message from another node,
    /// the groups it names, among this node's shards only.
    fn pick_shared_members(
        &mut self,
        message: &Message,
        from_node: FromNode<'_>,
    ) -> Vec<ChosenMember> {
        let mut chosen: Vec<ChosenMember> = Vec::new();
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
            members.sort_unstable_by_key(|r| r.target);
            let picked = match members.len() {
                0 => return None,
                count => members.get(pick_member(strategy, turn, publisher, count))?,
            };
            Some(ChosenMember {
                target: picked.target,
                group: picked.group.clone(),
                filter: picked.filter.clone(),
            })
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
                        chosen.extend(choose(routes, &route.group, true));
                    }
                });
            }
            None => {}
            Some((_, groups)) => {
                for (group, filter) in groups {
                    let routes = self.shared_routes.get(filter);
                    match choose(routes, group, false) {
                        Some(member) => chosen.push(member),
                        None => {
                            debug!(group = %quote(group), filter = %quote(filter), "forwarded for a shared group that has no member here now")
                        }
                    }
                }
            }
        }
        chosen
    }

    /// Forwards a message published here to the other nodes: one forward each, for its plain
    /// subscriptions, its chosen groups and (retained messages go to every node) its
    /// retained store. Returns whether a shared group there was chosen.
    fn forward_to_nodes(
        &mut self,
        message: &Message,
        plain_nodes: &[NodeId],
        chosen: &[ChosenMember],
    ) -> bool {
        let mut nodes = plain_nodes.to_vec();
        for member in chosen {
            if let Target::Node(node) = member.target
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
        let mut matched = false;
        for node in nodes {
            let groups = groups_for(chosen, Target::Node(node));
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
        matched
    }

    /// Delivers the message to every shard of this node with plain subscriptions or a chosen
    /// group member (this one directly). Returns whether any shard got it.
    fn fan_out_to_shards(
        &mut self,
        message: Message,
        plain: &[bool],
        chosen: &[ChosenMember],
    ) -> bool {
        let has_groups = |target: usize| {
            chosen
                .iter()
                .any(|member| member.target == Target::Shard(target as ShardIndex))
        };
        // The last shard takes the message itself; the others get clones (each clone is a few
        // reference-count increments and a copy of the properties).
        let Some(last_target) = (0..plain.len())
            .rev()
            .find(|&target| plain[target] || has_groups(target))
        else {
            return false;
        };
        let mut message = Some(message);
        for (target, &has_plain) in plain.iter().enumerate().take(last_target + 1) {
            let groups = groups_for(chosen, Target::Shard(target as ShardIndex));
            if !has_plain && groups.is_empty() {
                continue;
            }
            let copy = if target == last_target {
                message.take()
            } else {
                message.clone()
            };
            let Some(copy) = copy else {
                unreachable!("the message moves to the last target only");
            };
            if target == usize::from(self.config.index) {
                self.deliver_local(copy, has_plain, &groups);
            } else {
                let shard = target as ShardIndex;
                let receipt = match &mut self.durable {
                    Some(durable) if copy.qos != QoS::AtMostOnce => {
                        durable.receipt(self.config.index)
                    }
                    _ => None,
                };
                self.outputs.push(Output::ToShard {
                    shard,
                    message: ShardMessage::Deliver {
                        message: copy,
                        plain: has_plain,
                        groups,
                        receipt,
                    },
                });
            }
        }
        true
    }
}

/// The (group, filter) pairs of the members chosen on `target`.
fn groups_for(chosen: &[ChosenMember], target: Target) -> Vec<(ByteString, ByteString)> {
    chosen
        .iter()
        .filter(|member| member.target == target)
        .map(|member| (member.group.clone(), member.filter.clone()))
        .collect()
}
