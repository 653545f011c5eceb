//! The client listeners' ingress stacks inside one shard's handler: where the reactor's bytes
//! become MQTT bytes for the shard, and the shard's MQTT bytes become the socket's.
//!
//! Owns: each listener's stack configuration ([`ListenerStacks`], built from its files at start
//! and at each reload by [`load`]; the [`Reloader`] posts a new one to every shard), and, per
//! shard, the stacks of its connections on layered listeners ([`Ingress`]) with their
//! handshake deadlines.
//! Never: lets the shard see a layered connection before its handshakes completed (the shard
//! gets `Opened` with the facts they established, e.g. the certificate name), lets one
//! connection's error touch another, or reads a file on a shard thread (a reload builds the
//! configuration on the thread that asked for it, then posts it).
//! Invariants:
//! - A connection on a plain listener has no entry here and its events pass through as they
//!   are; one on a layered listener has an entry from `Opened` (or `Adopted`) until it closes
//!   or is handed off, and the shard knows it exactly while the entry is established.
//! - A connection handed to another shard takes its stack along (`Actions::hand_off_carrying`):
//!   the reactor moves the socket only after the bytes queued for it are sent, and hands the
//!   bytes that arrived meanwhile, raw, to the new shard's stack. The TLS session's record
//!   numbers thus stay in step with the peer's.
//! - A handshake not done within the connect timeout ends the connection: a client that opens
//!   TLS and stalls holds a stack (at most the TLS handshake bound) for no longer than that.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use shardmq_net::ingress::proxy::{PROXY_HEADER_LEN_MAX, ProxyListener};
use shardmq_net::ingress::stack::{
    CLIENT_TLS_HANDSHAKE_LEN_MAX, IngressStack, StackConfig, StackError, TlsListener,
};
use shardmq_net::ingress::tls::{self, ClientCertificates};
use shardmq_net::ingress::ws::{WsError, WsListener};
use shardmq_net::reactor::{Actions, ConnectionId, Mailboxes, Origin};
use shardmq_shards::Transport;
use shardmq_shards::cluster::NodeInput;
use tracing::{debug, info, warn};

use crate::admin::NodeMessage;
use crate::config::{ClientCertMode, Listener, TlsFiles, TransportKind};

/// Each listener's stack configuration, by listener index; None for a plain TCP listener.
#[derive(Debug, Default)]
pub struct ListenerStacks {
    listeners: Vec<Option<StackConfig>>,
}

impl ListenerStacks {
    fn get(&self, listener: u16) -> Option<&StackConfig> {
        self.listeners
            .get(usize::from(listener))
            .and_then(Option::as_ref)
    }

    /// How many listeners have a stack.
    pub fn layered_count(&self) -> usize {
        self.listeners.iter().flatten().count()
    }
}

/// Reads the files of every layered listener and builds their configurations; the first
/// problem, named with its listener and key, is the error.
pub fn load(listeners: &[Listener]) -> Result<ListenerStacks, String> {
    let listeners = listeners
        .iter()
        .map(|listener| {
            let tls = match &listener.transport {
                TransportKind::Tcp | TransportKind::Ws { .. } => None,
                TransportKind::Tls(files) => Some(tls_listener(files, false)?),
                TransportKind::Wss { tls: files, .. } => Some(tls_listener(files, true)?),
            };
            let proxy = listener.proxy.as_ref().map(|proxy| ProxyListener {
                accept: proxy.accept,
                trusted: proxy.trusted.clone(),
                header_len_max: PROXY_HEADER_LEN_MAX,
                name_from_ssl_cn: proxy.name_from_ssl_cn,
            });
            let ws = match &listener.transport {
                TransportKind::Ws {
                    path,
                    allowed_origins,
                }
                | TransportKind::Wss {
                    path,
                    allowed_origins,
                    ..
                } => Some(WsListener {
                    path: path.clone(),
                    allowed_origins: allowed_origins.as_slice().into(),
                }),
                TransportKind::Tcp | TransportKind::Tls(_) => None,
            };
            if tls.is_none() && proxy.is_none() && ws.is_none() {
                return Ok(None);
            }
            Ok(Some(StackConfig { proxy, tls, ws }))
        })
        .collect::<Result<_, String>>()?;
    Ok(ListenerStacks { listeners })
}

/// A TLS listener's configuration; `websocket`: its clients speak HTTP first, so ALPN offers
/// `http/1.1` (what browsers and WebSocket libraries ask for) instead of `mqtt`.
fn tls_listener(files: &TlsFiles, websocket: bool) -> Result<TlsListener, String> {
    let name = &files.name;
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| format!("`{name}.{key}` {path:?}: {e}"))
    };
    let cert = read("tls_cert_file", &files.cert_file)?;
    let key = read("tls_key_file", &files.key_file)?;
    let roots = || {
        let pem = read("tls_client_ca_file", &files.client_ca_file)?;
        tls::roots_from_pem(&pem).map_err(|e| {
            format!(
                "`{name}.tls_client_ca_file` {:?}: {e}",
                files.client_ca_file
            )
        })
    };
    let clients = match files.client_cert {
        ClientCertMode::None => ClientCertificates::None,
        ClientCertMode::Optional => ClientCertificates::Optional(roots()?),
        ClientCertMode::Required => ClientCertificates::Required(roots()?),
    };
    let mut server = tls::client_listener_config(&cert, &key, clients).map_err(|e| {
        format!(
            "`{name}` ({:?}, {:?}): {e}",
            files.cert_file, files.key_file
        )
    })?;
    if websocket {
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(TlsListener {
        server: Arc::new(server),
        name_from: files.username_from,
        handshake_len_max: CLIENT_TLS_HANDSHAKE_LEN_MAX,
    })
}

/// Reloads the listeners' certificates and keys: on SIGHUP and `POST /api/v1/tls/reload`.
#[derive(Debug)]
pub struct Reloader {
    listeners: Vec<Listener>,
    mailboxes: Arc<Mailboxes<NodeMessage>>,
    shard_count: u16,
    /// One reload at a time, so that two posted in a race arrive in the order they were built.
    running: Mutex<()>,
}

impl Reloader {
    pub fn new(
        listeners: Vec<Listener>,
        mailboxes: Arc<Mailboxes<NodeMessage>>,
        shard_count: u16,
    ) -> Self {
        Self {
            listeners,
            mailboxes,
            shard_count,
            running: Mutex::new(()),
        }
    }

    /// Builds every layered listener's configuration from its files again and, if all are
    /// good, gives them to every shard: new connections use them, open ones keep theirs. On
    /// an error nothing changes, and the error says why. Returns how many listeners changed.
    pub fn reload(&self, asked_by: &str) -> Result<usize, String> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match load(&self.listeners) {
            Ok(stacks) => {
                let count = stacks.layered_count();
                let stacks = Arc::new(stacks);
                for shard in 0..self.shard_count {
                    self.mailboxes
                        .post(shard, NodeMessage::Stacks(stacks.clone()));
                }
                info!(
                    listeners = count,
                    asked_by, "TLS certificates and keys reloaded: new connections use them"
                );
                Ok(count)
            }
            Err(error) => {
                warn!(%error, asked_by, "TLS reload failed: the listeners keep their configuration");
                Err(error)
            }
        }
    }
}

/// A connection's stack with what it established, handed to another shard with it.
#[derive(Debug)]
pub struct Carried {
    stack: IngressStack,
    transport: Transport,
    /// MQTT bytes the shard handed back for the new shard (its `HandOff` bytes).
    app_bytes: Bytes,
}

/// One connection on a layered listener.
#[derive(Debug)]
struct Layered {
    stack: IngressStack,
    /// The listener and peer from the reactor; the certificate name once established.
    transport: Transport,
    /// Wire bytes handed to the reactor and not yet sent, as far as this layer knows: the
    /// reactor's last count (`sent`) plus what was handed over since.
    wire_unsent: usize,
}

impl Layered {
    fn new(stack: IngressStack, transport: Transport) -> Self {
        Self {
            stack,
            transport,
            wire_unsent: 0,
        }
    }
}

/// What became of a shard's `HandOff` of a connection.
#[derive(Debug)]
pub enum HandOff {
    /// A plain connection: hand it off with these bytes.
    Plain(Bytes),
    /// A layered one: hand it off carrying this (its wire bytes are already queued).
    Carrying(Box<Carried>),
}

/// Framing the layers add on top of the MQTT bytes the shard bounds (TLS records, WebSocket
/// headers), allowed in a connection's wire backlog.
const WIRE_UNSENT_MARGIN: usize = 256 * 1024;

/// The stacks of one shard's connections on layered listeners.
#[derive(Debug)]
pub struct Ingress {
    stacks: Arc<ListenerStacks>,
    connections: BTreeMap<ConnectionId, Layered>,
    /// (deadline, connection) in arrival order, which is deadline order: every handshake has
    /// the same timeout. Entries of connections established or gone since are skipped.
    handshakes: VecDeque<(u64, ConnectionId)>,
    handshake_timeout_ms: u64,
    /// The most wire bytes a layered connection may leave unread: the shard bounds the MQTT
    /// bytes (twice `unsent_bytes_per_connection_max` ends a connection), so a wire backlog
    /// past that and a margin for framing is the layers' own bytes (WebSocket pongs, TLS
    /// records) piling up at a client that sends but never reads.
    wire_unsent_max: usize,
    /// Connections whose stack got wire bytes in this batch.
    to_send: Vec<ConnectionId>,
    /// This node's identifier, a field of every log line about a client connection.
    node: u32,
    /// Wire bytes of connections that failed in this batch (their last: an alert).
    last_words: Vec<(ConnectionId, Bytes)>,
    /// Connections this layer ends in this batch; the reactor's events for them until the
    /// flush are dropped.
    to_close: Vec<ConnectionId>,
    /// Connections on PROXY listeners that read their header in this batch, with the
    /// client's address: the reactor checks the per-address limits for it.
    to_admit: Vec<(ConnectionId, std::net::IpAddr)>,
}

impl Ingress {
    /// The node's identifier for the log lines (0, a standalone node's, until set).
    pub fn with_node(mut self, node: u32) -> Self {
        self.node = node;
        self
    }

    pub fn new(
        stacks: Arc<ListenerStacks>,
        handshake_timeout_ms: u64,
        unsent_bytes_per_connection_max: usize,
    ) -> Self {
        Self {
            stacks,
            connections: BTreeMap::new(),
            handshakes: VecDeque::new(),
            handshake_timeout_ms,
            wire_unsent_max: unsent_bytes_per_connection_max
                .saturating_mul(2)
                .saturating_add(WIRE_UNSENT_MARGIN),
            to_send: Vec::new(),
            node: 0,
            last_words: Vec::new(),
            to_close: Vec::new(),
            to_admit: Vec::new(),
        }
    }

    /// A reload: new connections use `stacks`.
    pub fn replace(&mut self, stacks: Arc<ListenerStacks>) {
        self.stacks = stacks;
    }

    fn closing(&self, connection: ConnectionId) -> bool {
        self.to_close.contains(&connection)
    }

    /// The reactor accepted a connection.
    pub fn opened(
        &mut self,
        now_ms: u64,
        connection: ConnectionId,
        origin: Origin,
        inputs: &mut Vec<NodeInput>,
    ) {
        let transport = Transport {
            listener: origin.listener,
            peer: origin.peer,
            certificate_name: None,
        };
        let Some(config) = self.stacks.get(origin.listener) else {
            inputs.push(NodeInput::Opened {
                connection,
                transport,
            });
            return;
        };
        match IngressStack::new(config, origin.peer) {
            Ok(stack) => {
                self.connections
                    .insert(connection, Layered::new(stack, transport));
                self.handshakes
                    .push_back((now_ms.saturating_add(self.handshake_timeout_ms), connection));
            }
            Err(error) => {
                warn!(node = self.node, connection, address = origin.peer.map(tracing::field::display), %error, listener = origin.listener, "cannot start a connection's TLS session: closed");
                self.to_close.push(connection);
            }
        }
    }

    /// A connection handed over by another shard with its stack.
    pub fn adopted(
        &mut self,
        connection: ConnectionId,
        carried: Carried,
        inputs: &mut Vec<NodeInput>,
    ) {
        let Carried {
            mut stack,
            transport,
            app_bytes,
        } = carried;
        stack.handed_over();
        inputs.push(NodeInput::Opened {
            connection,
            transport: transport.clone(),
        });
        if !app_bytes.is_empty() {
            inputs.push(NodeInput::Received {
                connection,
                bytes: app_bytes,
            });
        }
        self.connections
            .insert(connection, Layered::new(stack, transport));
    }

    /// A connection this shard cannot serve (handed over without its stack, a programmer
    /// error logged by the caller): closed at the flush, its events until then dropped.
    pub fn refuse(&mut self, connection: ConnectionId) {
        self.connections.remove(&connection);
        self.to_close.push(connection);
    }

    /// Bytes from the socket.
    pub fn received(
        &mut self,
        connection: ConnectionId,
        bytes: Bytes,
        inputs: &mut Vec<NodeInput>,
    ) {
        let Some(layered) = self.connections.get_mut(&connection) else {
            if !self.closing(connection) {
                inputs.push(NodeInput::Received { connection, bytes });
            }
            return;
        };
        let mut app = BytesMut::new();
        let was_established = layered.stack.is_established();
        let step = layered.stack.receive(&bytes, &mut app);
        self.to_send.push(connection);
        match step {
            Ok(Some(established)) => {
                let proxied = self
                    .stacks
                    .get(layered.transport.listener)
                    .is_some_and(|config| config.proxy.is_some());
                if let Some(client) = established.source.or(layered.transport.peer)
                    && proxied
                {
                    self.to_admit.push((connection, client.ip()));
                }
                if let Some(source) = established.source {
                    debug!(
                        node = self.node,
                        connection,
                        balancer = ?layered.transport.peer,
                        address = %source,
                        vpc_endpoint = established.vpc_endpoint.as_deref().unwrap_or(""),
                        "PROXY header read: the client's address replaces the balancer's"
                    );
                    layered.transport.peer = Some(source);
                } else if let Some(endpoint) = &established.vpc_endpoint {
                    debug!(node = self.node, connection, address = layered.transport.peer.map(tracing::field::display), vpc_endpoint = %endpoint, "PROXY header read");
                }
                layered.transport.certificate_name =
                    established.certificate_name.map(ByteString::from);
                if let Some(name) = &layered.transport.certificate_name {
                    debug!(node = self.node, connection, address = layered.transport.peer.map(tracing::field::display), certificate_name = %name, "client certificate verified (by the listener's TLS, or by the balancer in its PROXY header)");
                }
                inputs.push(NodeInput::Opened {
                    connection,
                    transport: layered.transport.clone(),
                });
            }
            Ok(None) => {}
            Err(error @ (StackError::Proxy(_) | StackError::Ws(WsError::ForeignOrigin { .. }))) => {
                // A balancer misconfigured, or someone pretending to be one; or a web page of
                // an origin that `ws_allowed_origins` does not list (cross-site WebSocket
                // hijacking, or a page the operator forgot to list): say so plainly.
                info!(node = self.node, connection, address = layered.transport.peer.map(tracing::field::display), %error, "client connection refused: closed");
                self.fail(connection, was_established, inputs);
                return;
            }
            Err(error) => {
                debug!(node = self.node, connection, address = layered.transport.peer.map(tracing::field::display), %error, "client connection's transport failed: closed");
                self.fail(connection, was_established, inputs);
                return;
            }
        }
        if !app.is_empty() {
            inputs.push(NodeInput::Received {
                connection,
                bytes: app.freeze(),
            });
        }
        self.check_wire_backlog(connection, inputs);
    }

    /// Ends a connection whose wire backlog (what the reactor has not sent, and what the
    /// stack has made since) is past `wire_unsent_max`: the client does not read what its
    /// layers answer (WebSocket pongs, TLS records), which the shard cannot see.
    fn check_wire_backlog(&mut self, connection: ConnectionId, inputs: &mut Vec<NodeInput>) {
        let Some(layered) = self.connections.get(&connection) else {
            return;
        };
        let backlog = layered
            .wire_unsent
            .saturating_add(layered.stack.wire_pending_len());
        if backlog <= self.wire_unsent_max {
            return;
        }
        info!(
            node = self.node,
            connection,
            address = layered.transport.peer.map(tracing::field::display),
            unsent_bytes = backlog,
            limit = self.wire_unsent_max,
            "client connection closed: it does not read what its transport sends (WebSocket pongs or TLS records piling up)"
        );
        let shard_knows = layered.stack.is_established();
        self.fail(connection, shard_knows, inputs);
    }

    /// Ends a connection from this layer: its last wire bytes go out, then it closes; the
    /// shard, if it knew the connection, is told it closed.
    fn fail(&mut self, connection: ConnectionId, shard_knows: bool, inputs: &mut Vec<NodeInput>) {
        if let Some(mut layered) = self.connections.remove(&connection)
            && let Some(wire) = layered.stack.take_wire()
        {
            self.last_words.push((connection, wire));
        }
        if shard_knows {
            inputs.push(NodeInput::Closed { connection });
        }
        self.to_close.push(connection);
    }

    /// The reactor's report of the wire bytes still unsent.
    pub fn sent(
        &mut self,
        connection: ConnectionId,
        unsent_bytes: usize,
        inputs: &mut Vec<NodeInput>,
    ) {
        let closing = self.closing(connection);
        if let Some(layered) = self.connections.get_mut(&connection) {
            layered.wire_unsent = unsent_bytes;
        }
        match self.connections.get_mut(&connection) {
            Some(layered) if layered.stack.is_established() => inputs.push(NodeInput::Sent {
                connection,
                unsent_bytes: layered.stack.app_unsent_bytes(unsent_bytes),
            }),
            Some(_) => {}
            None if closing => {}
            None => inputs.push(NodeInput::Sent {
                connection,
                unsent_bytes,
            }),
        }
    }

    /// The socket closed.
    pub fn closed(&mut self, connection: ConnectionId, inputs: &mut Vec<NodeInput>) {
        match self.connections.remove(&connection) {
            Some(layered) if layered.stack.is_established() => {
                inputs.push(NodeInput::Closed { connection })
            }
            Some(_) => {}
            None if self.closing(connection) => {}
            None => inputs.push(NodeInput::Closed { connection }),
        }
    }

    /// Ends the handshakes that are overdue.
    pub fn tick(&mut self, now_ms: u64) {
        while let Some(&(deadline_ms, connection)) = self.handshakes.front() {
            let pending = self
                .connections
                .get(&connection)
                .is_some_and(|layered| !layered.stack.is_established());
            if pending && deadline_ms > now_ms {
                break;
            }
            self.handshakes.pop_front();
            if pending {
                debug!(
                    node = self.node,
                    connection,
                    address = self
                        .connections
                        .get(&connection)
                        .and_then(|layered| layered.transport.peer)
                        .map(tracing::field::display),
                    timeout_ms = self.handshake_timeout_ms,
                    "client connection's handshake not done in time: closed"
                );
                self.fail(connection, false, &mut Vec::new());
            }
        }
    }

    /// When the next handshake is due, if one is pending.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.handshakes.front().map(|&(deadline_ms, _)| deadline_ms)
    }

    /// The node stops: connections still in their handshake are closed (the shard closes
    /// the others, saying goodbye through their stacks).
    pub fn shutdown(&mut self) {
        let pending: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, layered)| !layered.stack.is_established())
            .map(|(&connection, _)| connection)
            .collect();
        for connection in pending {
            self.fail(connection, false, &mut Vec::new());
        }
    }

    /// MQTT bytes from the shard; given back when the connection has no stack. A stack that
    /// fails ends its connection (the shard is told at once; it is in its flush, so the
    /// `Closed` input waits in `inputs` for the handler to give it).
    pub fn outgoing(
        &mut self,
        connection: ConnectionId,
        bytes: Bytes,
        inputs: &mut Vec<NodeInput>,
    ) -> Option<Bytes> {
        let Some(layered) = self.connections.get_mut(&connection) else {
            // A layered connection this layer ended in this batch is not in the table any
            // more: its bytes are dropped, never sent in clear on a TLS or WebSocket socket.
            return (!self.closing(connection)).then_some(bytes);
        };
        match layered.stack.send(&bytes) {
            Ok(()) => self.to_send.push(connection),
            Err(error) => {
                debug!(node = self.node, connection, address = layered.transport.peer.map(tracing::field::display), %error, "client connection's transport failed while sending: closed");
                self.fail(connection, true, inputs);
            }
        }
        None
    }

    /// The shard closes the connection: the stack says goodbye (TLS `close_notify`) after
    /// everything queued, and is dropped; the caller then asks the reactor to close.
    pub fn close(&mut self, connection: ConnectionId, actions: &mut Actions<NodeMessage>) {
        if let Some(mut layered) = self.connections.remove(&connection) {
            layered.stack.close();
            if let Some(wire) = layered.stack.take_wire() {
                actions.send(connection, wire);
            }
        }
    }

    /// The shard hands the connection to another shard with `bytes` (MQTT bytes).
    pub fn hand_off(
        &mut self,
        connection: ConnectionId,
        bytes: Bytes,
        actions: &mut Actions<NodeMessage>,
    ) -> HandOff {
        let Some(mut layered) = self.connections.remove(&connection) else {
            return HandOff::Plain(bytes);
        };
        if let Some(wire) = layered.stack.take_wire() {
            actions.send(connection, wire);
        }
        HandOff::Carrying(Box::new(Carried {
            stack: layered.stack,
            transport: layered.transport,
            app_bytes: bytes,
        }))
    }

    /// The batch's wire bytes and closes, to the reactor.
    pub fn flush(&mut self, actions: &mut Actions<NodeMessage>) {
        for (connection, client) in self.to_admit.drain(..) {
            actions.admit_address(connection, client);
        }
        for (connection, wire) in self.last_words.drain(..) {
            actions.send(connection, wire);
        }
        for connection in self.to_send.drain(..) {
            if let Some(layered) = self.connections.get_mut(&connection)
                && let Some(wire) = layered.stack.take_wire()
            {
                layered.wire_unsent = layered.wire_unsent.saturating_add(wire.len());
                actions.send(connection, wire);
            }
        }
        for connection in self.to_close.drain(..) {
            actions.close(connection);
        }
    }
}
