//! An edge's part of the agent: which core's route log it follows, and how far.
//!
//! Owns: the link it follows and the log position (epoch and next entry) it has applied.
//! Invariants: at most one followed link at a time, and only an up link to a core; an entry
//! is applied only if it is exactly the next one of the epoch followed (a gap asks for a
//! snapshot again); this node's own routes are its own to tell and never taken from a core.

use shardmq_net::frame::{Body, LogEntry, NodeId, Role, Route};
use tracing::{debug, info, warn};

use super::super::Io;
use super::super::view::{Parts, View};
use super::Shared;
use crate::message::ConnectionId;

/// The core log an edge follows: on which link, and where it is in it.
#[derive(Debug, Clone, Copy)]
struct Following {
    connection: ConnectionId,
    epoch: u64,
    /// The next entry this edge needs.
    next: u64,
}

#[derive(Debug, Default)]
pub(super) struct Edge {
    following: Option<Following>,
}

impl Edge {
    pub(super) fn is_following(&self) -> bool {
        self.following.is_some()
    }

    /// Asks the core on `connection` for its log from the start (a snapshot, then the tail).
    pub(super) fn follow(&mut self, connection: ConnectionId, io: &mut Io) {
        self.following = Some(Following {
            connection,
            epoch: 0,
            next: 0,
        });
        io.send(connection, &Body::Follow { epoch: 0, next: 0 });
    }

    /// The link is gone: if it was the one followed, follow another core that is up.
    pub(super) fn link_lost(
        &mut self,
        shared: &Shared,
        connection: ConnectionId,
        node: NodeId,
        io: &mut Io,
    ) {
        if self.following.is_none_or(|f| f.connection != connection) {
            return;
        }
        self.following = None;
        warn!(core = node, "lost the core this edge follows");
        let other = shared
            .up_links
            .iter()
            .find(|(_, (_, role))| *role == Role::Core)
            .map(|(c, _)| *c);
        if let Some(other) = other {
            self.follow(other, io);
        }
    }

    /// Stops following (the node leaves the cluster).
    pub(super) fn stop(&mut self) {
        self.following = None;
    }

    /// Whether `connection` is the link followed, and where this edge is in its log.
    fn followed(&self, connection: ConnectionId) -> Option<Following> {
        self.following.filter(|f| f.connection == connection)
    }

    /// The core's whole view replaces this edge's (but for its own routes and member record).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn snapshot(
        &mut self,
        shared: &mut Shared,
        connection: ConnectionId,
        node: NodeId,
        epoch: u64,
        next: u64,
        parts: Parts,
        io: &mut Io,
    ) {
        if self.followed(connection).is_none() {
            return;
        }
        info!(
            core = node,
            entries = next.saturating_sub(1),
            "route table replaced by a snapshot of the core's log"
        );
        let mut view = View::from_parts(parts);
        // This node's own routes are its own to tell; the core's copy may lag.
        view.routes.remove(&shared.node);
        view.members.insert(shared.node, Shared::member_of(io));
        shared.view.replace(view, &mut shared.changes);
        self.following = Some(Following {
            connection,
            epoch,
            next,
        });
        // Tell the core at once how far we are: its replication lag stays exact.
        io.send(connection, &Body::Heartbeat { applied: next });
    }

    /// More routes of the snapshot just applied (one whose routes did not fit its frame),
    /// added to the view. They follow the snapshot on its link before any entry after it, so
    /// they are taken only while this edge is still at that snapshot's point of that log;
    /// anything else is left from a snapshot since replaced, and ignored.
    pub(super) fn snapshot_routes(
        &mut self,
        shared: &mut Shared,
        connection: ConnectionId,
        epoch: u64,
        next: u64,
        routes: Vec<(NodeId, Route)>,
    ) {
        let Some(followed) = self.followed(connection) else {
            return;
        };
        if followed.epoch != epoch || followed.next != next {
            debug!(epoch, next, "routes of an earlier snapshot: ignored");
            return;
        }
        for (origin, route) in routes {
            // This node's own routes are its own to tell, as in the snapshot itself.
            if origin != shared.node {
                let entry = LogEntry::Route {
                    origin,
                    route,
                    added: true,
                };
                shared.view.apply(&entry, &mut shared.changes);
            }
        }
    }

    /// The next entries of the followed log, applied to the view if they are the next ones.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn entries(
        &mut self,
        shared: &mut Shared,
        connection: ConnectionId,
        node: NodeId,
        epoch: u64,
        first: u64,
        entries: Vec<LogEntry>,
        io: &mut Io,
    ) {
        let Some(followed) = self.followed(connection) else {
            return;
        };
        if epoch != followed.epoch || first != followed.next {
            warn!(
                core = node,
                first,
                expected = followed.next,
                "gap in the route log: asking for a snapshot"
            );
            self.follow(connection, io);
            return;
        }
        // The count of a decoded frame's entries fits; a core claiming a log end past
        // `u64::MAX` is a gap at its next frame.
        let next = first.saturating_add(entries.len() as u64);
        for entry in entries {
            let own = match &entry {
                LogEntry::Route { origin, .. } | LogEntry::Replace { origin, .. } => {
                    *origin == shared.node
                }
                LogEntry::Removed(n) => *n == shared.node,
                _ => false,
            };
            if !own {
                shared.view.apply(&entry, &mut shared.changes);
            }
        }
        self.following = Some(Following {
            connection,
            epoch,
            next,
        });
        io.send(connection, &Body::Heartbeat { applied: next });
    }

    /// The next log entry this edge needs, for heartbeats (0 while it follows no one).
    pub(super) fn applied(&self) -> u64 {
        self.following.map_or(0, |f| f.next)
    }

    /// The core followed and how far this edge has applied its log, for status.
    pub(super) fn status(&self, shared: &Shared) -> Option<(NodeId, u64)> {
        self.following.and_then(|f| {
            shared
                .up_links
                .get(&f.connection)
                .map(|&(node, _)| (node, f.next.saturating_sub(1)))
        })
    }
}
