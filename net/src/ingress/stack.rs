//! One client connection's ingress stack: the layers between the socket's bytes and MQTT's,
//! outermost first: PROXY header -> TLS -> WebSocket -> (MQTT, the shard's).
//!
//! Owns: the per-connection state of each layer a listener asks for (today the TLS slot; the
//! PROXY and WebSocket slots are marked below, where `proxy.rs` and `ws.rs` plug in), the
//! bytes waiting for the wire (`wire_out`), and the translation of the reactor's unsent count
//! (wire bytes) into the shard's (MQTT bytes).
//! Never: touches a socket, a clock or a thread; it is moved between shard threads with its
//! connection (`Send`), so it holds nothing tied to one thread.
//! Invariants:
//! - Every byte for the wire passes through [`IngressStack::take_wire`], in order: the layers
//!   write only into `wire_out` (one writer per buffer).
//! - Before [`Established`] is returned (once), no MQTT byte leaves [`IngressStack::receive`]:
//!   the shard sees the connection only when every layer's handshake has completed and the
//!   facts the layers learn (certificate name; with PROXY, the client's address) are known.
//! - An idle stack holds no buffer of its own: `wire_out` is handed out whole and left
//!   unallocated (see the TLS session's own bounds in [`super::tls`]).
//! - The MQTT unsent count handed to the shard never exceeds what the shard gave since the last
//!   report (`app_unsent_bytes`), and is at most the reactor's wire count.
//!
//! Unsent bytes: the reactor's send queue holds ciphertext, which is the plaintext plus a TLS
//! record's overhead (at most 22 bytes in TLS 1.3 and 29 in TLS 1.2, per record of up to 16 KiB)
//! and whatever TLS itself sends (handshake, alerts). The shard bounds what it hands out by the
//! unsent count it is told, so the stack tells it `min(wire unsent, MQTT bytes given and not
//! known sent)`: an overestimate of the MQTT bytes still queued by at most the records'
//! overhead, never more than it gave. The reactor therefore holds at most the shard's
//! `unsent_bytes_per_connection_max` plus the overhead of the records that carry it.
//!
//! Integration points (search for `INTEGRATION(proxy)` and `INTEGRATION(ws)`): see each.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::ServerConfig;

use super::names::{self, NameFrom};
use super::tls::{TlsError, TlsSession};

/// The most ciphertext a client's TLS handshake may take before it completes: a ClientHello
/// and a client certificate chain of a few certificates fit with room to spare.
pub const CLIENT_TLS_HANDSHAKE_LEN_MAX: usize = 32 * 1024;

/// What one listener's connections are built with; shared (read-only) by every connection
/// and shard, replaced as a whole on a reload.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// TLS, for `transport = "tls"` (and later "wss").
    pub tls: Option<TlsListener>,
    // INTEGRATION(proxy): `pub proxy: Option<ProxyListener>` here, holding the listener's
    // `ProxyAccept`, its `TrustedNetworks` and the v2 TLV length bound (`proxy::parse` args).
    // INTEGRATION(ws): `pub ws: Option<Arc<ws::WsConfig>>` here, for "ws" and "wss".
}

/// A TLS listener's settings.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub server: Arc<ServerConfig>,
    /// Which certificate field names the client (`tls_username_from`).
    pub name_from: NameFrom,
    pub handshake_len_max: usize,
}

/// What the layers learned once every handshake completed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Established {
    /// The verified client certificate's name, when the listener reads one.
    pub certificate_name: Option<String>,
    // INTEGRATION(proxy): `pub source: Option<SocketAddr>` (the header's client address,
    // which replaces the socket's peer in `Transport::peer`), and `ssl_cn` for
    // `certificate_name` when the header carries a verified CN.
}

/// Why a connection's stack cannot go on; the connection is closed (after `take_wire`, which
/// may hold an alert for the peer).
#[derive(Debug)]
pub enum StackError {
    Tls(TlsError),
    /// The client's certificate does not carry the name the listener reads.
    Certificate(String),
    // INTEGRATION(proxy): `Proxy(proxy::ProxyError)` and `Untrusted` (a header from outside
    // `proxy_trusted`). INTEGRATION(ws): `Ws(ws::WsError)`.
}

impl std::fmt::Display for StackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StackError::Tls(error) => write!(f, "{error}"),
            StackError::Certificate(reason) => write!(f, "client certificate refused: {reason}"),
        }
    }
}

impl std::error::Error for StackError {}

impl From<TlsError> for StackError {
    fn from(error: TlsError) -> Self {
        StackError::Tls(error)
    }
}

/// One connection's layers.
#[derive(Debug)]
pub struct IngressStack {
    // INTEGRATION(proxy): `proxy: Option<ProxyState>` first: while it waits for its header,
    // `receive` buffers (at most the header's bound) and calls `proxy::parse`; the bytes after
    // the header go on to the next layer in the same call. It has no output and nothing to
    // send, so `send` never sees it.
    tls: Option<TlsSession>,
    name_from: NameFrom,
    // INTEGRATION(ws): `ws: Option<ws::WsSession>` after TLS: in `receive`, TLS's plaintext
    // (or the wire bytes, for "ws") goes through `ws.read(input, app, &mut ws_out)` and
    // `ws_out` (the 101 answer, pongs, a close) through `self.wire(..)`; in `send`,
    // `ws.write(app, &mut framed)` first, then `self.wire(&framed)`. Established waits for
    // `ws.is_open()`.
    established: bool,
    /// Bytes for the wire, handed to the reactor by `take_wire`.
    wire_out: BytesMut,
    /// MQTT bytes the shard gave (`send`) that the reactor may not have sent yet.
    app_unsent_bytes: usize,
}

impl IngressStack {
    pub fn new(config: &StackConfig) -> Result<Self, StackError> {
        let (tls, name_from) = match &config.tls {
            Some(tls) => (
                Some(TlsSession::server(
                    tls.server.clone(),
                    tls.handshake_len_max,
                )?),
                tls.name_from,
            ),
            None => (None, NameFrom::None),
        };
        Ok(Self {
            tls,
            name_from,
            established: false,
            wire_out: BytesMut::new(),
            app_unsent_bytes: 0,
        })
    }

    /// Whether every layer's handshake has completed (and [`Established`] was returned).
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Takes bytes from the wire: appends the MQTT bytes they carry to `app` (only once
    /// established) and what the layers answer to the wire buffer. Returns the layers' facts
    /// once, in the call that completes the last handshake.
    pub fn receive(
        &mut self,
        wire: &[u8],
        app: &mut BytesMut,
    ) -> Result<Option<Established>, StackError> {
        // INTEGRATION(proxy): the header is parsed here, before TLS sees a byte.
        match &mut self.tls {
            Some(tls) => tls.receive(wire, app, &mut self.wire_out)?,
            None => app.extend_from_slice(wire),
        }
        // INTEGRATION(ws): WebSocket reads `app` here (swap it for the unframed bytes).
        if self.established || self.handshaking() {
            return Ok(None);
        }
        let facts = self.established_facts()?;
        self.established = true;
        Ok(Some(facts))
    }

    fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsSession::is_handshaking)
    }

    fn established_facts(&self) -> Result<Established, StackError> {
        let certificate_name = match (&self.tls, self.name_from) {
            (_, NameFrom::None) | (None, _) => None,
            (Some(tls), from) => match tls.peer_certificates().and_then(|chain| chain.first()) {
                // rustls verified the chain before the handshake completed.
                Some(end_entity) => {
                    names::certificate_name(end_entity, from).map_err(StackError::Certificate)?
                }
                // `optional` and none presented: the client is nobody in particular.
                None => None,
            },
        };
        Ok(Established { certificate_name })
    }

    /// MQTT bytes from the shard: through the layers into the wire buffer.
    pub fn send(&mut self, app: &[u8]) -> Result<(), StackError> {
        self.app_unsent_bytes = self.app_unsent_bytes.saturating_add(app.len());
        // INTEGRATION(ws): `ws.write` frames `app` here, before TLS.
        match &mut self.tls {
            Some(tls) => tls.send(app, &mut self.wire_out)?,
            None => self.wire_out.extend_from_slice(app),
        }
        Ok(())
    }

    /// Ends the layers from this side (TLS `close_notify`; a WebSocket close frame once it is
    /// here), into the wire buffer.
    pub fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.close(&mut self.wire_out);
        }
    }

    /// The bytes for the wire, if any: the whole buffer, which is left unallocated.
    pub fn take_wire(&mut self) -> Option<Bytes> {
        if self.wire_out.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.wire_out).freeze())
    }

    /// The reactor reported `wire_unsent_bytes` still queued: the MQTT bytes to report to
    /// the shard (see the module's notes on unsent bytes).
    pub fn app_unsent_bytes(&mut self, wire_unsent_bytes: usize) -> usize {
        self.app_unsent_bytes = self.app_unsent_bytes.min(wire_unsent_bytes);
        self.app_unsent_bytes
    }

    /// The connection was handed to another shard: the reactor moved it once everything
    /// queued had been sent, so nothing is unsent there.
    pub fn handed_over(&mut self) {
        self.app_unsent_bytes = 0;
    }

    /// Bytes the layers hold buffered (for memory accounting and the tests).
    pub fn buffered_len(&self) -> usize {
        self.wire_out.len() + self.tls.as_ref().map_or(0, TlsSession::buffered_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::tls::{
        ClientCertificates, TlsSession, certificates_from_pem, client_config,
        client_listener_config, private_key_from_pem, roots_from_pem,
    };
    use rustls::pki_types::ServerName;

    const CA: &[u8] = include_bytes!("testdata/ca.pem");
    const NODE_CERT: &[u8] = include_bytes!("testdata/node.pem");
    const NODE_KEY: &[u8] = include_bytes!("testdata/node.key");
    const OTHER_CA: &[u8] = include_bytes!("testdata/other-ca.pem");

    fn listener(clients: ClientCertificates, name_from: NameFrom) -> StackConfig {
        StackConfig {
            tls: Some(TlsListener {
                server: Arc::new(client_listener_config(NODE_CERT, NODE_KEY, clients).unwrap()),
                name_from,
                handshake_len_max: CLIENT_TLS_HANDSHAKE_LEN_MAX,
            }),
        }
    }

    fn client(identity: bool, alpn: &[&[u8]]) -> TlsSession {
        let identity = identity.then(|| {
            (
                certificates_from_pem(NODE_CERT).unwrap(),
                private_key_from_pem(NODE_KEY).unwrap(),
            )
        });
        let mut config = client_config(roots_from_pem(CA).unwrap(), identity).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsSession::client(
            Arc::new(config),
            ServerName::try_from("testcluster").unwrap(),
            CLIENT_TLS_HANDSHAKE_LEN_MAX,
        )
        .unwrap()
    }

    /// Runs the handshake; returns the facts the stack established with, or its error.
    fn handshake(
        stack: &mut IngressStack,
        client: &mut TlsSession,
    ) -> Result<Established, StackError> {
        let mut to_server = BytesMut::new();
        client.send(b"", &mut to_server).unwrap();
        for _ in 0..20 {
            let mut app = BytesMut::new();
            let step = stack.receive(&to_server.split(), &mut app);
            let wire = stack.take_wire().unwrap_or_default();
            if let Some(facts) = step? {
                return Ok(facts);
            }
            assert!(
                app.is_empty(),
                "no MQTT byte before the stack is established"
            );
            client
                .receive(&wire, &mut BytesMut::new(), &mut to_server)
                .map_err(StackError::Tls)?;
        }
        panic!("the handshake never completed");
    }

    #[test]
    fn a_tls_stack_establishes_then_carries_mqtt_both_ways() {
        let mut stack =
            IngressStack::new(&listener(ClientCertificates::None, NameFrom::None)).unwrap();
        let mut client = client(false, &[b"mqtt"]);
        assert_eq!(
            handshake(&mut stack, &mut client).unwrap(),
            Established::default()
        );
        assert!(stack.is_established());
        // CONNECT in, CONNACK out.
        let mut wire = BytesMut::new();
        client.send(b"\x10\x00connect", &mut wire).unwrap();
        let mut app = BytesMut::new();
        assert_eq!(stack.receive(&wire, &mut app).unwrap(), None);
        assert_eq!(&app[..], b"\x10\x00connect");
        stack.send(b"\x20\x02\x00\x00").unwrap();
        let wire = stack.take_wire().unwrap();
        assert!(wire.len() > 4, "a record, not the plaintext");
        let mut plain = BytesMut::new();
        client
            .receive(&wire, &mut plain, &mut BytesMut::new())
            .unwrap();
        assert_eq!(&plain[..], b"\x20\x02\x00\x00");
        assert_eq!(client.alpn_protocol(), Some(&b"mqtt"[..]));
        // Idle: nothing buffered, the wire buffer unallocated.
        assert_eq!(stack.buffered_len(), 0);
        assert_eq!(stack.wire_out.capacity(), 0);
    }

    #[test]
    fn a_client_without_alpn_is_served_one_with_another_protocol_is_not() {
        let config = listener(ClientCertificates::None, NameFrom::None);
        let mut stack = IngressStack::new(&config).unwrap();
        handshake(&mut stack, &mut client(false, &[])).unwrap();
        let mut stack = IngressStack::new(&config).unwrap();
        let error = handshake(&mut stack, &mut client(false, &[b"http/1.1"])).unwrap_err();
        assert!(error.to_string().contains("protocol"), "{error}");
    }

    #[test]
    fn required_client_certificates_are_checked_and_named() {
        let roots = || roots_from_pem(CA).unwrap();
        let config = listener(ClientCertificates::Required(roots()), NameFrom::CommonName);
        let mut stack = IngressStack::new(&config).unwrap();
        let facts = handshake(&mut stack, &mut client(true, &[b"mqtt"])).unwrap();
        assert_eq!(facts.certificate_name.as_deref(), Some("node"));
        // No certificate: refused.
        let mut stack = IngressStack::new(&config).unwrap();
        let error = handshake(&mut stack, &mut client(false, &[b"mqtt"])).unwrap_err();
        assert!(matches!(error, StackError::Tls(_)), "{error}");
        // Optional: none is fine and names nobody; a SAN is read when asked for.
        let config = listener(
            ClientCertificates::Optional(roots()),
            NameFrom::SubjectAltName,
        );
        let mut stack = IngressStack::new(&config).unwrap();
        let facts = handshake(&mut stack, &mut client(false, &[b"mqtt"])).unwrap();
        assert_eq!(facts.certificate_name, None);
        let mut stack = IngressStack::new(&config).unwrap();
        let facts = handshake(&mut stack, &mut client(true, &[b"mqtt"])).unwrap();
        assert_eq!(facts.certificate_name.as_deref(), Some("testcluster"));
        // A certificate of another authority: refused even though optional.
        let other = listener(
            ClientCertificates::Optional(roots_from_pem(OTHER_CA).unwrap()),
            NameFrom::CommonName,
        );
        let mut stack = IngressStack::new(&other).unwrap();
        assert!(handshake(&mut stack, &mut client(true, &[b"mqtt"])).is_err());
    }

    #[test]
    fn garbage_fails_with_an_alert_and_yields_nothing() {
        let mut stack =
            IngressStack::new(&listener(ClientCertificates::None, NameFrom::None)).unwrap();
        let mut app = BytesMut::new();
        let error = stack
            .receive(b"\x10\x0c\x00\x04MQTT", &mut app)
            .unwrap_err();
        assert!(matches!(error, StackError::Tls(_)), "{error}");
        assert!(app.is_empty());
        assert_eq!(stack.take_wire().unwrap().first(), Some(&0x15), "an alert");
    }

    #[test]
    fn the_shard_is_told_at_most_what_it_gave() {
        let mut stack =
            IngressStack::new(&listener(ClientCertificates::None, NameFrom::None)).unwrap();
        handshake(&mut stack, &mut client(false, &[b"mqtt"])).unwrap();
        stack.send(&[7; 100]).unwrap();
        let wire = stack.take_wire().unwrap();
        assert!(wire.len() > 100);
        // All ciphertext unsent: the shard hears of its 100 bytes, not the record's size.
        assert_eq!(stack.app_unsent_bytes(wire.len()), 100);
        assert_eq!(stack.app_unsent_bytes(30), 30);
        assert_eq!(stack.app_unsent_bytes(0), 0);
        stack.send(&[7; 10]).unwrap();
        stack.handed_over();
        assert_eq!(stack.app_unsent_bytes(50), 0);
    }

    #[test]
    fn a_plain_stack_passes_bytes_through() {
        let mut stack = IngressStack::new(&StackConfig { tls: None }).unwrap();
        let mut app = BytesMut::new();
        assert_eq!(
            stack.receive(b"abc", &mut app).unwrap(),
            Some(Established::default())
        );
        assert_eq!(&app[..], b"abc");
        stack.send(b"xyz").unwrap();
        assert_eq!(&stack.take_wire().unwrap()[..], b"xyz");
    }

    #[test]
    fn a_stack_is_send() {
        fn send<T: Send>() {}
        send::<IngressStack>();
    }
}
