//! The agent's side of a shard (shard 0 only): control links, the agent's view changes told
//! to every shard, and the operator's requests (`ctl cluster ...`).
//!
//! Owns: the one place where the agent's view becomes shard messages: `ClusterNodes`,
//! `ClusterSettings` and `RemoteRoute`, in the order the view changed, for every shard.
//! Never: lets the shard call back into the agent in the same step: what the shard makes of
//! a view change (its outputs) is carried out by the caller's one pass (`take_outputs`).

use std::net::SocketAddr;

use bytestring::ByteString;
use tracing::{info, warn};

use super::view::Change;
use super::{Agent, Answer, NodeOutput, NodeShard, Request};
use crate::message::{ClusterNode, ConnectionId, ShardMessage};
use crate::shard::Input;

impl NodeShard {
    /// An operator's request, answered with `NodeOutput::Reply`.
    pub(super) fn request(&mut self, ticket: u64, request: Request) {
        let now_ms = self.now_ms;
        let answer = match request {
            Request::Status => self.status(now_ms).map(|s| Answer::Status(Box::new(s))),
            Request::Metrics => Ok(Answer::Metrics(Box::new(self.metrics()))),
            Request::Sys(values) => {
                self.shard.publish_sys(values);
                Ok(Answer::Done)
            }
            Request::Join(address) => self.join(address).map(|()| Answer::Done),
            Request::Leave => self.leave().map(|()| Answer::Done),
            Request::Set { key, value } => self.set_setting(&key, &value).map(|()| Answer::Done),
            Request::Inspect(query) => Ok(Answer::Inspect(self.shard.inspect(query))),
            Request::Trace(client_ids) => {
                self.shard.set_traced(client_ids);
                Ok(Answer::Done)
            }
        };
        let reply = NodeOutput::Reply { ticket, answer };
        match &mut self.cluster {
            Some(cluster) => cluster.io.outputs.push(reply),
            None => self.scratch.push(reply),
        }
    }

    /// A control link is up: the agent takes it (shard 0), or it is refused.
    pub(super) fn control_link_up(&mut self, connection: ConnectionId) {
        let now_ms = self.now_ms;
        let cluster = self.cluster.as_mut().expect("a link means a cluster");
        cluster.io.now_ms = now_ms;
        match &mut cluster.agent {
            Some(agent) => agent.link_up(connection, &mut cluster.io),
            None => cluster.io.refuse(connection, "control links go to shard 0"),
        }
    }

    /// One frame on an up control link.
    pub(super) fn control_frame(
        &mut self,
        connection: ConnectionId,
        body: shardmq_net::frame::Body,
    ) -> Result<(), String> {
        let now_ms = self.now_ms;
        let body = match body {
            shardmq_net::frame::Body::NodeQuery { id, query } => {
                self.node_query_frame(connection, id, query);
                return Ok(());
            }
            shardmq_net::frame::Body::NodeAnswer { id, answer } => {
                self.node_answer_frame(connection, id, answer);
                return Ok(());
            }
            body => body,
        };
        let cluster = self.cluster.as_mut().expect("a link means a cluster");
        match &mut cluster.agent {
            Some(agent) => {
                cluster.io.now_ms = now_ms;
                agent.receive(connection, body, &mut cluster.io)
            }
            None => Err("a control frame on a shard without the agent".into()),
        }
    }

    /// Turns the agent's view changes into messages for every shard: posted to the others,
    /// handed to this shard at once. Returns whether this shard got any.
    pub(super) fn agent_changes(&mut self) -> bool {
        let Some(cluster) = &mut self.cluster else {
            return false;
        };
        let Some(agent) = &mut cluster.agent else {
            return false;
        };
        let node = cluster.io.settings.link.node();
        let mut to_self = Vec::new();
        for change in agent.take_changes() {
            let Some(message) = change_message(agent, node, change) else {
                continue;
            };
            for target in 0..self.shard_count {
                if target == self.index {
                    to_self.push(message.clone());
                } else {
                    cluster.io.outputs.push(NodeOutput::Post {
                        shard: target,
                        message: message.clone(),
                    });
                }
            }
        }
        let changed = !to_self.is_empty();
        for message in to_self {
            self.shard_message(message);
        }
        changed
    }

    /// A message for this shard: the cluster side takes what is its own, the shard the rest.
    pub(super) fn shard_message(&mut self, message: ShardMessage) {
        let now_ms = self.now_ms;
        match message {
            ShardMessage::ClusterNodes(nodes) if self.cluster.is_some() => {
                self.members_changed(&nodes);
                self.shard
                    .handle(now_ms, Input::Shard(ShardMessage::ClusterNodes(nodes)));
            }
            ShardMessage::ClusterSettings(settings) if self.cluster.is_some() => {
                self.settings_changed(&settings);
            }
            message => self.shard.handle(now_ms, Input::Shard(message)),
        }
    }

    /// Dials `address` as a core (`ctl cluster join`). Shard 0 only.
    fn join(&mut self, address: SocketAddr) -> Result<(), String> {
        let agent = self.agent_mut()?;
        info!(%address, "joining the cluster through a core");
        agent.join(address);
        self.cluster_tick();
        Ok(())
    }

    /// Leaves the cluster (`ctl cluster leave`). Shard 0 only.
    fn leave(&mut self) -> Result<(), String> {
        let now_ms = self.now_ms;
        self.agent_mut()?;
        let cluster = self.cluster.as_mut().expect("checked");
        let agent = cluster.agent.as_mut().expect("checked");
        cluster.io.now_ms = now_ms;
        agent.leave(&mut cluster.io);
        Ok(())
    }

    /// Proposes a cluster-wide setting to the cores' Raft group (`ctl cluster set`). Shard 0
    /// of a core only.
    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.agent_mut()?.propose_setting(key, value)?;
        self.cluster_tick();
        Ok(())
    }

    /// The cluster as this node sees it. Shard 0 only.
    pub fn status(&self, now_ms: u64) -> Result<super::Status, String> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or("this node is not in a cluster (no [cluster] configured)")?;
        let agent = cluster
            .agent
            .as_ref()
            .ok_or("cluster status lives on shard 0")?;
        Ok(agent.status(now_ms))
    }

    pub(super) fn agent_mut(&mut self) -> Result<&mut Agent, String> {
        self.cluster
            .as_mut()
            .ok_or("this node is not in a cluster (no [cluster] configured)")?
            .agent
            .as_mut()
            .ok_or_else(|| "the cluster agent lives on shard 0".to_string())
    }
}

/// The shard message of one view change, if the shards need to hear of it.
fn change_message(
    agent: &Agent,
    node: shardmq_net::frame::NodeId,
    change: Change,
) -> Option<ShardMessage> {
    Some(match change {
        // A core's log holds its own routes too; its shards know them already.
        Change::Route { node: origin, .. } if origin == node => return None,
        Change::Route { node, route, added } => ShardMessage::RemoteRoute {
            node,
            filter: ByteString::from(route.filter),
            group: route.group.map(ByteString::from),
            added,
        },
        Change::Settings => ShardMessage::ClusterSettings(
            agent
                .view()
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        Change::Members => ShardMessage::ClusterNodes(
            agent
                .view()
                .members
                .values()
                .filter(|m| m.node != node)
                .filter_map(|m| match m.cluster_address.parse() {
                    Ok(address) => Some(ClusterNode {
                        node: m.node,
                        address,
                        epoch: m.epoch,
                        up: !agent.view().down.contains(&m.node),
                    }),
                    Err(_) => {
                        warn!(node = m.node, address = %m.cluster_address, "member's cluster address does not parse");
                        None
                    }
                })
                .collect(),
        ),
    })
}
