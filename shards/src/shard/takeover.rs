//! Session takeover across the nodes of a cluster.
//!
//! Owns: the CONNECTs of this shard that wait for the other nodes to hand over their client's
//! session, and the answers to other nodes' claims.
//!
//! How: a CONNECT for a client identifier (not one this node assigned) on a node with other
//! members that are up becomes a *claim*: a `Claim` to each of them, and the connection waits
//! (what the client sends meanwhile is kept and read after CONNACK). A node that receives a
//! claim takes its session over as a local CONNECT would (its connection gets DISCONNECT 0x8E
//! and is closed, the will follows the MQTT 5.0 rules), removes the session and answers with
//! `Handover`, carrying the session (subscriptions, in-flight and queued messages) unless the
//! new connection starts clean. Once every node has answered, or `takeover_timeout_ms` has
//! passed, or the nodes still awaited are down, the claimant installs the session it was
//! given and accepts the connection: the old connection is closed before the new one is
//! acknowledged.
//!
//! Concurrent CONNECTs of one identifier on two nodes: each claims from the other. The node
//! with the lower identifier wins the tie: it answers the other's claim only after its own
//! has completed (so it accepts its client, then hands the session on), while the node with
//! the higher identifier answers at once. Every claim thus completes, and the claims line up
//! one after another as if the connects had not overlapped: exactly one owner remains, the
//! last in that order, and the others' clients get 0x8E.
//! The tie rule needs the lower node to have its claim pending when the other's arrives. If
//! the other's claim came first (answered at once: nothing here yet), the lower node's own
//! claim, started within `takeover_timeout_ms`, says so (`after`): the receiver then answers
//! it only once its own claim has completed, whatever the identifiers, so the later claim is
//! also the last owner (found by the simulation's one-owner checker).
//! A claim may also complete without an answer from a node (it was seen down, or the
//! timeout passed) while the lower node holds that claim deferred; when that node's own claim
//! then reaches the higher one, it is answered at once, and the answer names the claim that
//! completed (`Handover::completed`): the lower node drops it from its deferred claims, since
//! answering it would end the session just given to its own new connection and leave the
//! client with no connection anywhere (found by the simulation, seed 958).
//!
//! Never: waits without a bound (the claim timer), or drops a session it was handed: an answer
//! that comes after its claim timed out is kept as an offline session if no session of that
//! client is here.

use super::*;
use crate::snapshot::{self, Record, SavedSession};

/// A CONNECT waiting for the other nodes to hand over (or disclaim) its client's session.
#[derive(Debug)]
pub(super) struct PendingClaim {
    claim: u64,
    connection: ConnectionId,
    connect: Box<Connect>,
    /// Nodes that have not answered yet.
    waiting: Vec<NodeId>,
    /// The session a node handed over.
    session: Option<SavedSession>,
    /// Claims of other nodes for this client that wait for this one to complete:
    /// (node, its shard, its claim number, clean start).
    deferred: Vec<(NodeId, ShardIndex, u64, bool)>,
    /// The armed timeout of the claim, until it fires.
    timer: Option<TimerKey>,
    /// Nodes that answered (a replica is taken only if its home is not among them).
    answered: Vec<NodeId>,
    /// Replicas offered by nodes that keep one: (their home node, the session).
    offers: Vec<(NodeId, SavedSession)>,
}

impl PendingClaim {
    pub(super) fn claim_number(&self) -> u64 {
        self.claim
    }

    pub(super) fn connection(&self) -> ConnectionId {
        self.connection
    }

    pub(super) fn timer(&self) -> Option<TimerKey> {
        self.timer
    }
}

impl Shard {
    /// Starts the claim of `client_id`'s session for `connection_id` from every other node.
    pub(super) fn claim(
        &mut self,
        connection_id: ConnectionId,
        connect: Box<Connect>,
        client_id: ByteString,
    ) {
        let version = connect.protocol;
        if let Some(earlier) = self.claims.get_mut(&client_id) {
            // The client connected again before its first claim completed: the newer
            // connection waits in its place, and the older one is closed (it never had a
            // CONNACK, so it was never connected).
            let older = std::mem::replace(&mut earlier.connection, connection_id);
            earlier.connect = connect;
            client_log!(
                DEBUG,
                self.who_client(&client_id),
                older,
                newer = connection_id,
                "a second CONNECT during a takeover: the first connection is closed"
            );
            self.drop_connection(older, false);
            self.mark_claiming(connection_id, version);
            return;
        }
        self.next_claim += 1;
        let claim = self.next_claim;
        let waiting = self.cluster_nodes_up.clone();
        let recent_ms = self.now_ms.saturating_sub(self.config.takeover_timeout_ms);
        let answered = self.answered.remove(&client_id).unwrap_or_default();
        for &node in &waiting {
            // The latest claim of that node this shard answered lately.
            let after = answered
                .iter()
                .filter(|&&(n, _, at)| n == node && at >= recent_ms)
                .map(|&(_, claim, _)| claim)
                .max();
            self.outputs.push(Output::SessionToNode {
                node,
                transfer: SessionTransfer::Claim {
                    client_id: client_id.clone(),
                    shard: self.config.index,
                    claim,
                    clean_start: connect.clean_start,
                    after,
                },
            });
        }
        client_log!(DEBUG, self.who_client(&client_id), claim, nodes = ?waiting, "claiming the session from the other nodes");
        let timer = self.timers.arm(
            self.now_ms + self.config.takeover_timeout_ms,
            Timer::Claim(claim),
        );
        self.claim_clients.insert(claim, client_id.clone());
        self.claims.insert(
            client_id,
            PendingClaim {
                claim,
                connection: connection_id,
                connect,
                waiting,
                session: None,
                deferred: Vec::new(),
                timer: Some(timer),
                answered: Vec::new(),
                offers: Vec::new(),
            },
        );
        self.mark_claiming(connection_id, version);
    }

    /// Bytes that arrived after CONNECT while its claim (or its credentials check, see
    /// `authorize.rs`) is pending: kept to be read after
    /// CONNACK, up to `takeover_pending_bytes_max`. Past it the connection gets CONNACK 0x97
    /// (return code 3 for 3.x) and is closed; its claim completes without it.
    pub(super) fn received_while_claiming(&mut self, connection_id: ConnectionId, bytes: &[u8]) {
        let limit = self.config.limits.takeover_pending_bytes_max;
        let Some(connection) = self.connections.get_mut(&connection_id) else {
            return;
        };
        if connection.pending.len().saturating_add(bytes.len()) <= limit {
            connection.pending.extend_from_slice(bytes);
            return;
        }
        let buffered_bytes = connection.pending.len();
        connection.pending = BytesMut::new();
        connection.claiming = false;
        let version = connection.version;
        client_log!(
            INFO,
            connection.who(self.config.node),
            buffered_bytes,
            arrived_bytes = bytes.len(),
            limit,
            "closing the connection: it sent too much while its CONNECT waited (a session takeover or a credentials check)"
        );
        self.send_connack_refusal(connection_id, version, ReasonCode::QUOTA_EXCEEDED);
        self.drop_connection(connection_id, false);
    }

    /// The connection waits for its claim; a refusal meanwhile speaks its CONNECT's version.
    fn mark_claiming(&mut self, connection_id: ConnectionId, version: ProtocolVersion) {
        if let Some(connection) = self.connections.get_mut(&connection_id) {
            connection.claiming = true;
            connection.version = version;
        }
    }

    /// A claim or an answer from node `from`.
    pub(super) fn session_transfer(&mut self, from: NodeId, transfer: SessionTransfer) {
        match transfer {
            SessionTransfer::Claim {
                client_id,
                shard,
                claim,
                clean_start,
                after,
            } => {
                if let Some(own) = self.claims.get_mut(&client_id)
                    && (self.config.node < from || after == Some(own.claim))
                {
                    // Both nodes are claiming: ours goes first (see the module comment).
                    own.deferred.push((from, shard, claim, clean_start));
                    return;
                }
                if !self.claims.contains_key(&client_id) {
                    self.remember_answered(&client_id, from, claim);
                }
                self.answer_claim(from, shard, claim, client_id, clean_start);
            }
            SessionTransfer::Handover {
                client_id,
                claim,
                session,
                completed,
                ..
            } => self.handed_over(from, client_id, claim, session, completed),
            SessionTransfer::ReplicaOffer {
                client_id,
                claim,
                home,
                session,
                ..
            } => self.replica_offered(from, client_id, claim, home, session),
            SessionTransfer::Disown { client_id, home } => self.disowned(from, client_id, home),
            SessionTransfer::Replicate { .. } => {
                // The node layer turns these into `ShardMessage::Replicas`.
                debug!(
                    node = from,
                    "a replication batch reached the shard as a transfer: ignored"
                );
            }
        }
    }

    /// A node keeps a replica of the client's session from `home`: kept with the claim, to
    /// be taken if `home` does not answer it.
    fn replica_offered(
        &mut self,
        from: NodeId,
        client_id: ByteString,
        claim: u64,
        home: NodeId,
        session: Bytes,
    ) {
        let saved = match snapshot::decode(&session, self.now_ms) {
            Ok((records, _)) => records.into_iter().find_map(|record| match record {
                Record::Session(saved) if saved.client_id == client_id => Some(saved),
                _ => None,
            }),
            Err(error) => {
                client_log!(WARN, self.who_client(&client_id), peer_node = from, %error, "an offered replica does not decode: dropped");
                None
            }
        };
        let Some(saved) = saved else {
            return;
        };
        match self
            .claims
            .get_mut(&client_id)
            .filter(|pending| pending.claim == claim)
        {
            Some(pending) if pending.offers.len() < super::replicate::OFFERS_PER_CLAIM_MAX => {
                client_log!(
                    DEBUG,
                    Who::client(self.config.node, &client_id),
                    peer_node = from,
                    home,
                    "a replica of the session offered"
                );
                pending.offers.push((home, saved));
                if self.unreachable.contains(&home) {
                    self.stop_waiting_for_unreachable(home);
                }
            }
            Some(_) => {}
            None => {
                client_log!(
                    DEBUG,
                    self.who_client(&client_id),
                    peer_node = from,
                    home,
                    "a replica offered after its claim completed: dropped"
                );
            }
        }
    }

    /// Notes a claim answered while no claim of this shard was pending for the client; old
    /// notes go when the map grows (they matter for `takeover_timeout_ms` only).
    fn remember_answered(&mut self, client_id: &ByteString, from: NodeId, claim: u64) {
        let now_ms = self.now_ms;
        let recent_ms = now_ms.saturating_sub(self.config.takeover_timeout_ms);
        // Pruned when the map has doubled since the last pruning: amortized O(1) per claim,
        // however fast other nodes' clients connect.
        if self.answered.len() >= self.answered_prune_at {
            self.answered.retain(|_, notes| {
                notes.retain(|&(_, _, at)| at >= recent_ms);
                !notes.is_empty()
            });
            self.answered_prune_at = (2 * self.answered.len()).max(1024);
        }
        let notes = self.answered.entry(client_id.clone()).or_default();
        notes.retain(|&(node, _, at)| node != from && at >= recent_ms);
        notes.push((from, claim, now_ms));
    }

    /// Gives `client_id`'s session (if here) to node `to`'s claim, closing its connection.
    fn answer_claim(
        &mut self,
        to: NodeId,
        shard: ShardIndex,
        claim: u64,
        client_id: ByteString,
        clean_start: bool,
    ) {
        let session = self.client_ids.get(&client_id).copied().map(|index| {
            client_log!(
                INFO,
                self.who_client(&client_id),
                peer_node = to,
                "session taken over by a connection on another node"
            );
            self.take_over(index, clean_start);
            let moved = (!clean_start && self.session(index).expiry_seconds > 0).then(|| {
                let saved = Self::saved_session(self.session(index));
                Bytes::from(snapshot::encode(&[Record::Session(saved)], self.now_ms))
            });
            self.end_session(index);
            moved
        });
        if session.is_none() {
            // No session here, but perhaps a replica of one whose home is down: offered
            // first, and kept here (the claimant takes it only if the home does not answer
            // and is down in its view, and then tells every node that it serves it). A clean
            // start ends the session wherever it was, the replica here too.
            if clean_start {
                self.take_replica(&client_id);
            } else if let Some((home, saved)) = self.replica_copy(&client_id)
                && home != to
            {
                client_log!(
                    INFO,
                    self.who_client(&client_id),
                    peer_node = to,
                    home,
                    "a replica of the session offered to a connection on another node"
                );
                self.note_offered(&client_id);
                self.outputs.push(Output::SessionToNode {
                    node: to,
                    transfer: SessionTransfer::ReplicaOffer {
                        client_id: client_id.clone(),
                        shard,
                        claim,
                        home,
                        session: Bytes::from(snapshot::encode(
                            &[Record::Session(saved)],
                            self.now_ms,
                        )),
                    },
                });
            }
        }
        let recent_ms = self.now_ms.saturating_sub(self.config.takeover_timeout_ms);
        let completed = self
            .completed_claims
            .get(&client_id)
            .filter(|&&(_, at)| at >= recent_ms)
            .map(|&(own, _)| own);
        self.outputs.push(Output::SessionToNode {
            node: to,
            transfer: SessionTransfer::Handover {
                client_id,
                shard,
                claim,
                session: session.flatten(),
                completed,
            },
        });
    }

    /// Notes that this shard's claim `claim` for `client_id` completed; old notes go when the
    /// map grows (they matter for `takeover_timeout_ms` only).
    fn remember_completed(&mut self, client_id: &ByteString, claim: u64) {
        let now_ms = self.now_ms;
        let recent_ms = now_ms.saturating_sub(self.config.takeover_timeout_ms);
        if self.completed_claims.len() >= self.completed_prune_at {
            self.completed_claims
                .retain(|_, &mut (_, at)| at >= recent_ms);
            self.completed_prune_at = (2 * self.completed_claims.len()).max(1024);
        }
        self.completed_claims
            .insert(client_id.clone(), (claim, now_ms));
    }

    fn handed_over(
        &mut self,
        from: NodeId,
        client_id: ByteString,
        claim: u64,
        session: Option<Bytes>,
        completed: Option<u64>,
    ) {
        let saved = session.and_then(|bytes| match snapshot::decode(&bytes, self.now_ms) {
            Ok((records, _)) => records.into_iter().find_map(|record| match record {
                Record::Session(saved) if saved.client_id == client_id => Some(saved),
                _ => None,
            }),
            Err(error) => {
                client_log!(WARN, self.who_client(&client_id), peer_node = from, %error, "a handed-over session does not decode: dropped");
                None
            }
        });
        let Some(pending) = self
            .claims
            .get_mut(&client_id)
            .filter(|pending| pending.claim == claim)
        else {
            // The claim timed out (or was answered by another route) before this answer.
            if let Some(saved) = saved {
                self.keep_late_session(from, saved);
            }
            return;
        };
        pending.waiting.retain(|&node| node != from);
        if !pending.answered.contains(&from) {
            // Once per node: a peer repeating its answer does not grow the list.
            pending.answered.push(from);
        }
        if let Some(completed) = completed {
            // The sender's own claim completed without waiting for this shard's answer (it
            // saw this node down, or timed out) and it has now given its connection up to
            // this claim: answering its claim later would end the session this claim wins.
            pending
                .deferred
                .retain(|&(node, _, deferred, _)| !(node == from && deferred == completed));
        }
        if let Some(saved) = saved {
            if pending.session.is_some() {
                client_log!(
                    WARN,
                    Who::client(self.config.node, &client_id),
                    peer_node = from,
                    "two nodes handed over a session of one client: the first is kept"
                );
            } else {
                client_log!(
                    DEBUG,
                    Who::client(self.config.node, &client_id),
                    peer_node = from,
                    "session handed over"
                );
                pending.session = Some(saved);
            }
        }
        if pending.waiting.is_empty() {
            self.complete_claim(&client_id);
        }
    }

    /// A session that arrived after its claim completed: kept, offline, unless the client
    /// has a session here by now (which is newer).
    fn keep_late_session(&mut self, from: NodeId, saved: SavedSession) {
        if self.client_ids.contains_key(&saved.client_id) {
            client_log!(
                WARN,
                self.who_client(&saved.client_id),
                peer_node = from,
                "a session handed over after its takeover timed out, while the client has a newer one here: dropped"
            );
            return;
        }
        // A handover nobody here asked for must still be one this shard would hold: its
        // client identifier's own, and within the persistent-session quota.
        if owner_shard(&saved.client_id, self.config.shard_count) != self.config.index {
            client_log!(
                WARN,
                self.who_client(&saved.client_id),
                peer_node = from,
                "a session handed over to a shard that does not own its client identifier: dropped"
            );
            return;
        }
        if self.persistent_quota_refuses(&saved.client_id, saved.expiry_seconds) {
            client_log!(
                WARN,
                self.who_client(&saved.client_id),
                peer_node = from,
                "a late handed-over session would pass the persistent-session quota: dropped"
            );
            return;
        }
        client_log!(
            WARN,
            self.who_client(&saved.client_id),
            peer_node = from,
            "a session handed over after its takeover timed out: kept offline"
        );
        self.restore_session(saved);
    }

    pub(super) fn claim_timed_out(&mut self, claim: u64) {
        // A completed claim cancels its timer, so a timer that fires names a pending claim.
        let client_id = self
            .claim_clients
            .get(&claim)
            .cloned()
            .expect("a claim timer names a pending claim");
        let pending = self
            .claims
            .get_mut(&client_id)
            .expect("a claim number names a pending claim");
        pending.timer = None;
        client_log!(WARN, Who::client(self.config.node, &client_id), silent = ?pending.waiting, timeout_ms = self.config.takeover_timeout_ms, "nodes did not answer a session claim in time: connecting without them");
        self.complete_claim(&client_id);
    }

    /// This shard's data link to `node` closed (its process died, or the network between
    /// broke): claims that hold a replica of `node`'s session (offered, or kept here) stop
    /// waiting for it and resume from the replica. A claim with no replica still waits (the
    /// link may come back and `node` answer; or the member list says it is down).
    pub fn data_link_lost(&mut self, node: NodeId) {
        if !self.unreachable.contains(&node) {
            self.unreachable.push(node);
        }
        self.stop_waiting_for_unreachable(node);
    }

    /// A data link to `node` is up again.
    pub fn data_link_restored(&mut self, node: NodeId) {
        self.unreachable.retain(|&n| n != node);
    }

    fn stop_waiting_for_unreachable(&mut self, node: NodeId) {
        let mut complete = Vec::new();
        for (client_id, pending) in &mut self.claims {
            let has_replica = !pending.answered.contains(&node)
                && (pending.offers.iter().any(|(home, _)| *home == node)
                    || self
                        .durable
                        .as_deref()
                        .and_then(|d| d.replication.as_deref())
                        .is_some_and(|r| r.holds(node, client_id)));
            if has_replica && pending.waiting.contains(&node) {
                pending.waiting.retain(|&n| n != node);
                if pending.waiting.is_empty() {
                    complete.push((pending.claim, client_id.clone()));
                }
            }
        }
        complete.sort_unstable();
        for (_, client_id) in complete {
            self.complete_claim(&client_id);
        }
    }

    /// Nodes that went down or left are not waited for.
    pub(super) fn stop_waiting_for_gone_nodes(&mut self) {
        let up = &self.cluster_nodes_up;
        let mut complete = Vec::new();
        for (client_id, pending) in &mut self.claims {
            pending.waiting.retain(|node| up.contains(node));
            if pending.waiting.is_empty() {
                complete.push((pending.claim, client_id.clone()));
            }
        }
        // In the order the claims started, not the map's (which differs per process).
        complete.sort_unstable();
        for (_, client_id) in complete {
            self.complete_claim(&client_id);
        }
    }

    /// Installs the session handed over (if any), accepts the waiting connection (if it is
    /// still there) and reads what it sent meanwhile, then answers the claims that waited.
    fn complete_claim(&mut self, client_id: &ByteString) {
        let Some(pending) = self.claims.remove(client_id) else {
            return;
        };
        self.claim_clients.remove(&pending.claim);
        self.timers.cancel(pending.timer);
        self.remember_completed(client_id, pending.claim);
        // No node handed the session over: a replica whose home did not answer (it is down)
        // stands in for it, offered by another node or held here.
        let local_replica = self
            .replica_home(client_id)
            .filter(|home| {
                pending.session.is_none()
                    && !pending.answered.contains(home)
                    && (!self.cluster_nodes_up.contains(home) || self.unreachable.contains(home))
            })
            .and_then(|_| self.take_replica(client_id));
        let clean_start = pending.connect.clean_start;
        let mut from_replica = None;
        let session = pending.session.or_else(|| {
            if clean_start {
                return None;
            }
            // Only while the home is down: a live home that did not answer in time (slow, or
            // still handing over) may hand its session over late (`keep_late_session`).
            let own = self.config.node;
            let usable = |home: &NodeId| {
                *home != own
                    && !pending.answered.contains(home)
                    && (!self.cluster_nodes_up.contains(home) || self.unreachable.contains(home))
            };
            let replica = pending
                .offers
                .into_iter()
                .chain(local_replica)
                .find(|(home, _)| usable(home))?;
            client_log!(
                INFO,
                self.who_client(client_id),
                home = replica.0,
                "the session's home node is down: resumed from its replica"
            );
            from_replica = Some(replica.0);
            Some(replica.1)
        });
        if let Some(home) = from_replica {
            self.serve_replica(home, client_id);
        }
        if session.is_some()
            && let Some(&index) = self.client_ids.get(client_id)
            && self.session(index).recovered
            && self.session(index).connection.is_none()
        {
            // The copy here was recovered from the data directory and its client has not
            // been back since: the one from elsewhere was served while this node was down.
            client_log!(
                INFO,
                self.who_client(client_id),
                "the session recovered here is older than the one handed over: replaced"
            );
            self.session_mut(index).will = None;
            self.end_session(index);
            self.sessions_fenced += 1;
        }
        if let Some(saved) = session {
            if self.client_ids.contains_key(client_id) {
                client_log!(
                    WARN,
                    self.who_client(client_id),
                    "a session was handed over while one is here too: the one here is kept"
                );
            } else if self.persistent_quota_refuses(client_id, saved.expiry_seconds) {
                // The CONNECT that claimed it is then refused by the quota (0x97), as it
                // would be for a new persistent session.
                client_log!(
                    WARN,
                    self.who_client(client_id),
                    "a handed-over session would pass the persistent-session quota: dropped"
                );
            } else {
                // Offline until accepted; its expiry timer is of no account once it is.
                self.restore_session(saved);
            }
        }
        let connection_id = pending.connection;
        let rest = match self.connections.get_mut(&connection_id) {
            Some(connection) if !connection.closing => {
                connection.claiming = false;
                Some(connection.pending.split().freeze())
            }
            _ => None,
        };
        if let Some(rest) = rest {
            self.accept(connection_id, *pending.connect, client_id.clone(), false);
            if !rest.is_empty() {
                self.receive(connection_id, rest);
            }
        }
        for (node, shard, claim, clean_start) in pending.deferred {
            self.answer_claim(node, shard, claim, client_id.clone(), clean_start);
        }
    }
}
