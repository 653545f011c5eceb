//! The admin relay's side of the node layer (shard 0): questions this node asks other nodes
//! about themselves, and the questions they ask it, carried on the control links as
//! `NodeQuery` and `NodeAnswer` frames.
//!
//! Owns: the answers this node owes its peers ([`Cluster::owed`]): at most
//! [`QUERIES_PER_LINK_MAX`] per link, each forgotten with its link or after
//! [`QUERY_ANSWER_TIMEOUT_MS`]; which link each question this node asked went on
//! (`Io::asked`, at most [`ASKED_MAX`], forgotten when answered or after
//! [`QUERY_ANSWER_TIMEOUT_MS`], answered with an error when its link closes); the checks of
//! what a question and an answer may hold ([`NODE_QUERY_LEN_MAX`], the frame budget
//! [`answer_len_max`], [`NODE_ERROR_LEN_MAX`]); and which peers may be sent the frames at all
//! (protocol version [`NODE_QUERY_VERSION`] on).
//! Never: parses a question or an answer (they are the admin API's JSON, which the glue's
//! admin thread parses strictly), waits, or keeps where a question's answer goes: the glue
//! keeps that (bounded) and matches answers to it by id and node.
//! Invariants: every question a peer asked is answered once (by the admin thread's answer, or
//! at once with an error at a limit), unless its link went or it expired first; no link owes
//! more than [`QUERIES_PER_LINK_MAX`] answers; every question this node waits for is on a link
//! that is open, and is answered once (by the peer, or with an error when the link closes),
//! unless it expired first.

use shardmq_net::frame::{
    self, Body, NODE_ERROR_LEN_MAX, NODE_QUERY_LEN_MAX, NODE_QUERY_VERSION, NodeId,
};
use tracing::{debug, warn};

use super::io::{Asked, Cluster};
use super::{NodeOutput, NodeShard};
use crate::message::ConnectionId;

/// Answers one link may owe at once; a question past it is answered at once with an error.
pub const QUERIES_PER_LINK_MAX: usize = 16;

/// How long an answer owed is kept: the asker has stopped waiting long before (the admin
/// API waits 5 s), so one the admin thread never gave back frees its place.
pub const QUERY_ANSWER_TIMEOUT_MS: u64 = 30_000;

/// Questions this node may wait for at once on all its links; one past it is answered at
/// once with an error. The glue keeps at most 256 waiting, so only questions whose asker
/// stopped waiting (and that are forgotten after [`QUERY_ANSWER_TIMEOUT_MS`]) fill the rest.
pub const ASKED_MAX: usize = 1024;

/// The most bytes of JSON an answer may hold on a link whose frames take `body_len_max`
/// bytes of body (`cluster.frame_size_max`): the frame budget (a share of the frame, see
/// [`frame::FRAME_BUDGET_DIVISOR`]) less the frame's own fields. The admin thread cuts a
/// listing to it before it answers; a longer answer is sent as an error.
pub fn answer_len_max(body_len_max: usize) -> usize {
    (body_len_max / frame::FRAME_BUDGET_DIVISOR)
        .saturating_sub(frame::node_answer_len_bound(&Ok(Vec::new())))
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The node at the other end of `connection`, if that is an up link.
fn up_peer_node(cluster: &Cluster, connection: ConnectionId) -> Option<NodeId> {
    cluster
        .io
        .links
        .get(&connection)
        .and_then(|link| link.up_peer())
        .map(|peer| peer.node)
}

/// Forgets the answers owed on `connection`: it is gone, and what it asked with it.
pub(super) fn link_gone(cluster: &mut Cluster, connection: ConnectionId) {
    cluster.owed.retain(|&(c, _), _| c != connection);
}

/// Panics if a link owes more answers than allowed, a shard other than the agent's owes or
/// waits for any, or a question waits on a link that is gone.
pub(super) fn check_invariants(cluster: &Cluster) {
    if cluster.agent.is_none() {
        assert!(cluster.owed.is_empty(), "answers owed off shard 0");
    }
    if cluster.agent.is_none() {
        assert!(cluster.io.asked.is_empty(), "questions asked off shard 0");
    }
    assert!(
        cluster.io.asked.len() <= ASKED_MAX,
        "too many questions wait"
    );
    for &(connection, id) in cluster.io.asked.keys() {
        assert!(
            cluster.io.links.contains_key(&connection),
            "question {id} waits on link {connection}, which is gone"
        );
    }
    let mut per_link = std::collections::BTreeMap::<ConnectionId, usize>::new();
    for &(connection, _) in cluster.owed.keys() {
        let count = per_link.entry(connection).or_default();
        *count += 1;
        assert!(
            *count <= QUERIES_PER_LINK_MAX,
            "link {connection} owes more than {QUERIES_PER_LINK_MAX} answers"
        );
    }
}

impl NodeShard {
    fn push_output(&mut self, output: NodeOutput) {
        match &mut self.cluster {
            Some(cluster) => cluster.io.outputs.push(output),
            None => self.scratch.push(output),
        }
    }

    /// `NodeInput::AskNode`: sends the question on an up control link to `node`, or answers
    /// at once with why it cannot go.
    pub(super) fn ask_node(&mut self, id: u64, node: NodeId, query: Vec<u8>) {
        let now_ms = self.now_ms;
        let refused = |answer: String| NodeOutput::NodeAnswer {
            id,
            node,
            answer: Err(answer),
        };
        if query.len() > NODE_QUERY_LEN_MAX {
            let len = query.len();
            return self.push_output(refused(format!(
                "a query of {len} bytes is longer than a node takes ({NODE_QUERY_LEN_MAX})"
            )));
        }
        let Some(cluster) = &mut self.cluster else {
            return self.push_output(refused(
                "this node is not in a cluster (no [cluster] configured)".into(),
            ));
        };
        let Some(agent) = &cluster.agent else {
            return self.push_output(refused("the cluster agent lives on shard 0".into()));
        };
        let Some(connection) = agent.control_link_to(node) else {
            return self.push_output(refused(format!("no control link to node {node}")));
        };
        let version = cluster
            .io
            .links
            .get(&connection)
            .and_then(|link| link.peer_version());
        match version {
            Some(version) if version >= NODE_QUERY_VERSION => {
                let io = &mut cluster.io;
                // Questions whose asker has long stopped waiting free their place.
                io.asked.retain(|_, asked| {
                    now_ms.saturating_sub(asked.at_ms) < QUERY_ANSWER_TIMEOUT_MS
                });
                if io.asked.len() >= ASKED_MAX {
                    return self.push_output(refused(format!(
                        "{ASKED_MAX} questions to nodes wait for answers already: ask again later"
                    )));
                }
                io.asked.insert(
                    (connection, id),
                    Asked {
                        node,
                        at_ms: now_ms,
                    },
                );
                io.now_ms = now_ms;
                io.send(connection, &Body::NodeQuery { id, query });
            }
            version => {
                let version = version.map_or("unknown".into(), |v| v.to_string());
                self.push_output(refused(format!(
                    "node {node} speaks an older protocol version ({version}, this one {}): it cannot answer",
                    frame::PROTOCOL_VERSION
                )));
            }
        }
    }

    /// A `NodeQuery` frame on an up control link: handed to the glue, or answered at once
    /// with an error at a limit.
    pub(super) fn node_query_frame(&mut self, connection: ConnectionId, id: u64, query: Vec<u8>) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(node) = up_peer_node(cluster, connection) else {
            return;
        };
        // Answers that were never given back in time free their place.
        cluster
            .owed
            .retain(|_, &mut at| now_ms.saturating_sub(at) < QUERY_ANSWER_TIMEOUT_MS);
        let owed = cluster
            .owed
            .range((connection, 0)..=(connection, u64::MAX))
            .count();
        let refusal = if query.len() > NODE_QUERY_LEN_MAX {
            Some(format!(
                "a query of {} bytes is longer than a node takes ({NODE_QUERY_LEN_MAX})",
                query.len()
            ))
        } else if cluster.owed.contains_key(&(connection, id)) {
            Some(format!("query {id} is already being answered on this link"))
        } else if owed >= QUERIES_PER_LINK_MAX {
            Some(format!(
                "{QUERIES_PER_LINK_MAX} queries of this link are being answered already: ask again later"
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            warn!(connection, node, id, %reason, "an admin query from a node refused");
            cluster.io.now_ms = now_ms;
            cluster.io.send(
                connection,
                &Body::NodeAnswer {
                    id,
                    answer: Err(reason),
                },
            );
            return;
        }
        cluster.owed.insert((connection, id), now_ms);
        cluster.io.outputs.push(NodeOutput::NodeQuery {
            connection,
            node,
            id,
            query,
        });
    }

    /// `NodeInput::AnswerNode`: the glue's answer to a peer's question, sent on the link it
    /// came by if that is still up and the answer still owed. An answer longer than the frame
    /// budget goes as an error.
    pub(super) fn answer_node(
        &mut self,
        connection: ConnectionId,
        id: u64,
        answer: Result<Vec<u8>, String>,
    ) {
        let now_ms = self.now_ms;
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        if cluster.owed.remove(&(connection, id)).is_none() {
            debug!(
                connection,
                id, "an admin answer no longer owed (its link went, or it came too late)"
            );
            return;
        }
        let budget = answer_len_max(cluster.io.settings.link.body_len_max);
        let answer = answer.map_err(|error| bounded(error, NODE_ERROR_LEN_MAX));
        let answer = match answer {
            Ok(bytes) if bytes.len() > budget => {
                warn!(
                    connection,
                    id,
                    len = bytes.len(),
                    budget,
                    "an admin answer does not fit one frame: sent as an error"
                );
                Err(format!(
                    "too large; ask for fewer (the answer holds {} bytes, a frame takes {budget})",
                    bytes.len()
                ))
            }
            answer => answer,
        };
        cluster.io.now_ms = now_ms;
        cluster
            .io
            .send(connection, &Body::NodeAnswer { id, answer });
    }

    /// A `NodeAnswer` frame on an up control link: the answer of the node at its other end.
    pub(super) fn node_answer_frame(
        &mut self,
        connection: ConnectionId,
        id: u64,
        answer: Result<Vec<u8>, String>,
    ) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(node) = up_peer_node(cluster, connection) else {
            return;
        };
        if cluster.io.asked.remove(&(connection, id)).is_none() {
            debug!(
                connection,
                node, id, "an admin answer to no question waiting on this link: dropped"
            );
            return;
        }
        let answer = answer.map_err(|error| bounded(error, NODE_ERROR_LEN_MAX));
        cluster
            .io
            .outputs
            .push(NodeOutput::NodeAnswer { id, node, answer });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("abc".into(), 5), "abc");
        assert_eq!(bounded("abcdef".into(), 3), "abc");
        // 'é' is two bytes: a cut inside it falls back before it.
        assert_eq!(bounded("aé".into(), 2), "a");
        assert_eq!(bounded(String::new(), 0), "");
    }
}
