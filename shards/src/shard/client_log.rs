//! Log lines about a client: every one carries `node` (this node's identifier), `client_id`
//! (when known, quoted: at most `limits::QUOTE_BYTES_MAX` bytes), `address` (the client's
//! address as the shard knows it: after a PROXY protocol header, the address the header
//! names) and `connection` (when the client has one here), as fields of their own, so that a
//! JSON log line can be selected by any of them.
//!
//! Owns: [`Who`] (those fields for one client) and the `client_log!` macro, the one way the
//! shard's rooms write such a line: `client_log!(INFO, self.who(connection), "...")`,
//! `client_log!(WARN, self.who_session(index), limit, "...")`.
//! Never: looks anything up for a line whose level is off: the macro asks `tracing` first.

use std::net::SocketAddr;

use super::*;

/// A log line about a client, with its [`Who`] fields first: `client_log!(LEVEL, who,
/// fields..., "message")`, LEVEL one of `tracing::Level`'s constants. `who` is evaluated only
/// when the line is enabled.
macro_rules! client_log {
    ($level:ident, $who:expr, $($rest:tt)+) => {
        if tracing::enabled!(tracing::Level::$level) {
            let who: $crate::shard::client_log::Who<'_> = $who;
            tracing::event!(
                tracing::Level::$level,
                node = who.node,
                client_id = who.client_id.map(|id| tracing::field::display($crate::limits::quote(id))),
                address = who.address.map(tracing::field::display),
                connection = who.connection,
                $($rest)+
            );
        }
    };
}

/// Who a log line is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who<'a> {
    pub(crate) node: NodeId,
    pub(crate) client_id: Option<&'a str>,
    pub(crate) address: Option<SocketAddr>,
    pub(crate) connection: Option<ConnectionId>,
}

impl<'a> Who<'a> {
    /// A client known by its identifier alone (no connection here).
    pub(crate) fn client(node: NodeId, client_id: &'a str) -> Self {
        Who {
            node,
            client_id: Some(client_id),
            address: None,
            connection: None,
        }
    }
}

impl Session {
    /// This session's client, where the connections are out of reach: no address.
    pub(super) fn who(&self, node: NodeId) -> Who<'_> {
        Who {
            node,
            client_id: Some(&self.client_id),
            address: None,
            connection: self.connection,
        }
    }
}

impl Shard {
    /// A connection's client: its session's identifier once it has one.
    pub(super) fn who(&self, connection_id: ConnectionId) -> Who<'_> {
        let connection = self.connections.get(&connection_id);
        let client_id = connection
            .and_then(|connection| connection.session)
            .and_then(|index| self.sessions.get(index as usize))
            .and_then(Option::as_ref)
            .map(|session| session.client_id.as_ref());
        Who {
            node: self.config.node,
            client_id,
            address: connection.and_then(|connection| connection.transport.peer),
            connection: Some(connection_id),
        }
    }

    /// A connection whose client identifier is known before a session is bound to it (its
    /// CONNECT is being checked).
    pub(super) fn who_connecting<'a>(
        &'a self,
        connection_id: ConnectionId,
        client_id: &'a str,
    ) -> Who<'a> {
        Who {
            client_id: Some(client_id),
            ..self.who(connection_id)
        }
    }

    /// A session's client, with its connection's address while it has one.
    pub(super) fn who_session(&self, index: SessionIndex) -> Who<'_> {
        let session = self.sessions.get(index as usize).and_then(Option::as_ref);
        let connection = session.and_then(|session| session.connection);
        Who {
            node: self.config.node,
            client_id: session.map(|session| session.client_id.as_ref()),
            address: connection.and_then(|connection| self.peer(connection)),
            connection,
        }
    }

    /// A client known by its identifier only (a session moving between nodes), with the
    /// address of its session's connection here, if any.
    pub(super) fn who_client<'a>(&'a self, client_id: &'a str) -> Who<'a> {
        match self.client_ids.get(client_id) {
            Some(&index) => Who {
                client_id: Some(client_id),
                ..self.who_session(index)
            },
            None => Who::client(self.config.node, client_id),
        }
    }
}
