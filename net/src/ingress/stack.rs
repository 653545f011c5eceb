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

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::ServerConfig;

use super::names::{self, NameFrom};
use super::proxy::{self, Parsed, ProxyError, ProxyHeader, ProxyListener};
use super::tls::{TlsError, TlsSession};
use super::ws::{WsError, WsListener, WsSession};

/// The most ciphertext a client's TLS handshake may take before it completes: a ClientHello
/// and a client certificate chain of a few certificates fit with room to spare.
pub const CLIENT_TLS_HANDSHAKE_LEN_MAX: usize = 32 * 1024;

/// What one listener's connections are built with; shared (read-only) by every connection
/// and shard, replaced as a whole on a reload.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// The PROXY protocol header every connection must start with (`proxy_protocol`).
    pub proxy: Option<ProxyListener>,
    /// TLS, for `transport = "tls"` and "wss".
    pub tls: Option<TlsListener>,
    /// WebSocket, for "ws" and "wss".
    pub ws: Option<WsListener>,
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
    /// With TLS, the verified client certificate's; without, on a PROXY listener that reads
    /// `tls_username_from = "cn"`, the CN of the balancer's SSL TLV when it verified it.
    pub certificate_name: Option<String>,
    /// The client's address from the PROXY header, which replaces the socket's peer in
    /// `Transport::peer`; None without a header or when it names no address (LOCAL).
    pub source: Option<SocketAddr>,
    /// The AWS VPC endpoint the header names, if any.
    pub vpc_endpoint: Option<String>,
}

/// Why a connection's stack cannot go on; the connection is closed (after `take_wire`, which
/// may hold an alert for the peer).
#[derive(Debug)]
pub enum StackError {
    Tls(TlsError),
    /// The client's certificate does not carry the name the listener reads.
    Certificate(String),
    /// No acceptable PROXY header, or one from a peer outside `proxy_trusted`.
    Proxy(ProxyError),
    /// The WebSocket handshake was refused, a frame broke the rules, or the client closed.
    Ws(WsError),
}

impl std::fmt::Display for StackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StackError::Tls(error) => write!(f, "{error}"),
            StackError::Certificate(reason) => write!(f, "client certificate refused: {reason}"),
            StackError::Proxy(error) => write!(f, "{error}"),
            StackError::Ws(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for StackError {}

impl From<ProxyError> for StackError {
    fn from(error: ProxyError) -> Self {
        StackError::Proxy(error)
    }
}

impl From<TlsError> for StackError {
    fn from(error: TlsError) -> Self {
        StackError::Tls(error)
    }
}

/// One connection's layers.
#[derive(Debug)]
pub struct IngressStack {
    /// The PROXY header's layer, first: it has no output and nothing to send, so `send`
    /// never sees it.
    proxy: Option<ProxyState>,
    tls: Option<TlsSession>,
    name_from: NameFrom,
    /// WebSocket, after TLS: it reads TLS's plaintext (or the wire's bytes, for "ws") and
    /// its answers (the 101, pongs, a close) go out through TLS.
    ws: Option<WsSession>,
    established: bool,
    /// Bytes for the wire, handed to the reactor by `take_wire`.
    wire_out: BytesMut,
    /// MQTT bytes the shard gave (`send`) that the reactor may not have sent yet.
    app_unsent_bytes: usize,
}

/// A connection's PROXY layer.
#[derive(Debug)]
enum ProxyState {
    /// Waiting for the header: the bytes so far (at most the header's bound), empty and
    /// unallocated unless a header came in pieces.
    Waiting {
        listener: ProxyListener,
        peer: Option<SocketAddr>,
        buffer: Vec<u8>,
    },
    /// The header was read.
    Read {
        header: ProxyHeader,
        name_from_ssl_cn: bool,
        /// A LOCAL header with nothing after it yet: a balancer's health check, which the
        /// shard is told about only once the balancer sends something.
        local_quiet: bool,
    },
}

impl IngressStack {
    /// A stack for a connection whose socket peer is `peer` (the PROXY layer checks it
    /// against `proxy_trusted`).
    pub fn new(config: &StackConfig, peer: Option<SocketAddr>) -> Result<Self, StackError> {
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
        let proxy = config.proxy.clone().map(|listener| ProxyState::Waiting {
            listener,
            peer,
            buffer: Vec::new(),
        });
        Ok(Self {
            proxy,
            tls,
            name_from,
            ws: config.ws.as_ref().map(WsSession::new),
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
        let mut scratch = Vec::new();
        let Some(wire) = self.after_proxy_header(wire, &mut scratch)? else {
            return Ok(None);
        };
        match (&mut self.ws, &mut self.tls) {
            (None, Some(tls)) => tls.receive(wire, app, &mut self.wire_out)?,
            (None, None) => app.extend_from_slice(wire),
            (Some(ws), tls) => {
                let mut plain = BytesMut::new();
                let input: &[u8] = match tls {
                    Some(tls) => {
                        tls.receive(wire, &mut plain, &mut self.wire_out)?;
                        &plain
                    }
                    None => wire,
                };
                let mut answers = BytesMut::new();
                let read = ws.read(input, app, &mut answers);
                to_wire(tls, &mut self.wire_out, &answers)?;
                read.map_err(StackError::Ws)?;
            }
        }
        if self.established || self.handshaking() {
            return Ok(None);
        }
        let facts = self.established_facts()?;
        self.established = true;
        Ok(Some(facts))
    }

    /// The PROXY layer's part of `receive`: the bytes after the header once it is read
    /// (`wire` itself without a PROXY layer), None while it is still coming. `scratch` holds
    /// the rest when the header came in pieces.
    fn after_proxy_header<'a>(
        &mut self,
        wire: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<Option<&'a [u8]>, StackError> {
        let Some(ProxyState::Waiting {
            listener,
            peer,
            buffer,
        }) = &mut self.proxy
        else {
            if let Some(ProxyState::Read { local_quiet, .. }) = &mut self.proxy
                && !wire.is_empty()
            {
                *local_quiet = false;
            }
            return Ok(Some(wire));
        };
        if wire.is_empty() {
            return Ok(None);
        }
        // The peer is checked before a byte of the header is believed.
        match peer.map(|peer| peer.ip()) {
            Some(ip) if listener.trusted.contains(ip) => {}
            ip => return Err(ProxyError::Untrusted(ip).into()),
        }
        let (accept, len_max) = (listener.accept, listener.header_len_max);
        let name_from_ssl_cn = listener.name_from_ssl_cn;
        let (header, rest): (ProxyHeader, &'a [u8]) = if buffer.is_empty() {
            match proxy::parse(wire, accept, len_max)? {
                Parsed::NeedMore => {
                    buffer.extend_from_slice(wire);
                    return Ok(None);
                }
                Parsed::Header(header, len) => (header, wire.get(len..).unwrap_or_default()),
            }
        } else {
            buffer.extend_from_slice(wire);
            match proxy::parse(buffer, accept, len_max)? {
                Parsed::NeedMore => return Ok(None),
                Parsed::Header(header, len) => {
                    *scratch = buffer.split_off(len.min(buffer.len()));
                    (header, &scratch[..])
                }
            }
        };
        let local_quiet = header.local && rest.is_empty();
        self.proxy = Some(ProxyState::Read {
            header,
            name_from_ssl_cn,
            local_quiet,
        });
        Ok(Some(rest))
    }

    fn handshaking(&self) -> bool {
        let proxy_pending = match &self.proxy {
            None => false,
            Some(ProxyState::Waiting { .. }) => true,
            Some(ProxyState::Read { local_quiet, .. }) => *local_quiet,
        };
        proxy_pending
            || self.tls.as_ref().is_some_and(TlsSession::is_handshaking)
            || self.ws.as_ref().is_some_and(WsSession::is_handshaking)
    }

    fn established_facts(&self) -> Result<Established, StackError> {
        let header = match &self.proxy {
            Some(ProxyState::Read {
                header,
                name_from_ssl_cn,
                ..
            }) => Some((header, *name_from_ssl_cn)),
            _ => None,
        };
        let mut facts = Established {
            certificate_name: self.tls_certificate_name()?,
            source: header.and_then(|(header, _)| header.source),
            vpc_endpoint: header.and_then(|(header, _)| header.vpc_endpoint.clone()),
        };
        // Without its own TLS, the listener may take the name the balancer verified.
        if self.tls.is_none()
            && let Some((header, true)) = header
            && let Some(ssl) = &header.ssl
            && ssl.tls
            && ssl.certificate
            && ssl.verified
        {
            let name = ssl.verified_common_name().ok_or_else(|| {
                StackError::Certificate(
                    "the balancer verified a client certificate but sent no CN (PP2_SUBTYPE_SSL_CN)"
                        .into(),
                )
            })?;
            facts.certificate_name =
                Some(super::names::checked(name.to_string()).map_err(StackError::Certificate)?);
        }
        Ok(facts)
    }

    fn tls_certificate_name(&self) -> Result<Option<String>, StackError> {
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
        Ok(certificate_name)
    }

    /// MQTT bytes from the shard: through the layers into the wire buffer.
    pub fn send(&mut self, app: &[u8]) -> Result<(), StackError> {
        self.app_unsent_bytes = self.app_unsent_bytes.saturating_add(app.len());
        match &mut self.ws {
            Some(ws) => {
                let mut framed = BytesMut::new();
                ws.write(app, &mut framed);
                to_wire(&mut self.tls, &mut self.wire_out, &framed)?;
            }
            None => to_wire(&mut self.tls, &mut self.wire_out, app)?,
        }
        Ok(())
    }

    /// Ends the layers from this side (a WebSocket close frame, then TLS `close_notify`),
    /// into the wire buffer.
    pub fn close(&mut self) {
        if let Some(ws) = &mut self.ws {
            let mut framed = BytesMut::new();
            ws.close(&mut framed);
            // A TLS layer that cannot take the close frame is ended below anyway.
            let _ = to_wire(&mut self.tls, &mut self.wire_out, &framed);
        }
        if let Some(tls) = &mut self.tls {
            tls.close(&mut self.wire_out);
        }
    }

    /// The bytes for the wire, if any: the whole buffer, which is left unallocated.
    /// Wire bytes made and not yet taken by [`take_wire`](Self::take_wire).
    pub fn wire_pending_len(&self) -> usize {
        self.wire_out.len()
    }

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
        let proxy = match &self.proxy {
            Some(ProxyState::Waiting { buffer, .. }) => buffer.len(),
            _ => 0,
        };
        proxy
            + self.wire_out.len()
            + self.tls.as_ref().map_or(0, TlsSession::buffered_len)
            + self.ws.as_ref().map_or(0, WsSession::buffered_len)
    }
}

/// Bytes from an inner layer (MQTT, or WebSocket frames) to the wire: through TLS when the
/// stack has it.
fn to_wire(
    tls: &mut Option<TlsSession>,
    wire_out: &mut BytesMut,
    bytes: &[u8],
) -> Result<(), StackError> {
    if bytes.is_empty() {
        return Ok(());
    }
    match tls {
        Some(tls) => tls.send(bytes, wire_out)?,
        None => wire_out.extend_from_slice(bytes),
    }
    Ok(())
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
            proxy: None,
            ws: None,
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
        handshake_from(stack, client, to_server)
    }

    /// Runs the rest of a handshake whose client sends `to_server` next.
    fn handshake_from(
        stack: &mut IngressStack,
        client: &mut TlsSession,
        mut to_server: BytesMut,
    ) -> Result<Established, StackError> {
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
            IngressStack::new(&listener(ClientCertificates::None, NameFrom::None), None).unwrap();
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
        let mut stack = IngressStack::new(&config, None).unwrap();
        handshake(&mut stack, &mut client(false, &[])).unwrap();
        let mut stack = IngressStack::new(&config, None).unwrap();
        let error = handshake(&mut stack, &mut client(false, &[b"http/1.1"])).unwrap_err();
        assert!(error.to_string().contains("protocol"), "{error}");
    }

    #[test]
    fn required_client_certificates_are_checked_and_named() {
        let roots = || roots_from_pem(CA).unwrap();
        let config = listener(ClientCertificates::Required(roots()), NameFrom::CommonName);
        let mut stack = IngressStack::new(&config, None).unwrap();
        let facts = handshake(&mut stack, &mut client(true, &[b"mqtt"])).unwrap();
        assert_eq!(facts.certificate_name.as_deref(), Some("node"));
        // No certificate: refused.
        let mut stack = IngressStack::new(&config, None).unwrap();
        let error = handshake(&mut stack, &mut client(false, &[b"mqtt"])).unwrap_err();
        assert!(matches!(error, StackError::Tls(_)), "{error}");
        // Optional: none is fine and names nobody; a SAN is read when asked for.
        let config = listener(
            ClientCertificates::Optional(roots()),
            NameFrom::SubjectAltName,
        );
        let mut stack = IngressStack::new(&config, None).unwrap();
        let facts = handshake(&mut stack, &mut client(false, &[b"mqtt"])).unwrap();
        assert_eq!(facts.certificate_name, None);
        let mut stack = IngressStack::new(&config, None).unwrap();
        let facts = handshake(&mut stack, &mut client(true, &[b"mqtt"])).unwrap();
        assert_eq!(facts.certificate_name.as_deref(), Some("testcluster"));
        // A certificate of another authority: refused even though optional.
        let other = listener(
            ClientCertificates::Optional(roots_from_pem(OTHER_CA).unwrap()),
            NameFrom::CommonName,
        );
        let mut stack = IngressStack::new(&other, None).unwrap();
        assert!(handshake(&mut stack, &mut client(true, &[b"mqtt"])).is_err());
    }

    #[test]
    fn garbage_fails_with_an_alert_and_yields_nothing() {
        let mut stack =
            IngressStack::new(&listener(ClientCertificates::None, NameFrom::None), None).unwrap();
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
            IngressStack::new(&listener(ClientCertificates::None, NameFrom::None), None).unwrap();
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
        let mut stack = IngressStack::new(
            &StackConfig {
                proxy: None,
                tls: None,
                ws: None,
            },
            None,
        )
        .unwrap();
        let mut app = BytesMut::new();
        assert_eq!(
            stack.receive(b"abc", &mut app).unwrap(),
            Some(Established::default())
        );
        assert_eq!(&app[..], b"abc");
        stack.send(b"xyz").unwrap();
        assert_eq!(&stack.take_wire().unwrap()[..], b"xyz");
    }

    fn proxy_listener(accept: proxy::ProxyAccept, name_from_ssl_cn: bool) -> ProxyListener {
        ProxyListener {
            accept,
            trusted: proxy::TrustedNetworks::parse(&["127.0.0.0/8".into()]).unwrap(),
            header_len_max: proxy::PROXY_HEADER_LEN_MAX,
            name_from_ssl_cn,
        }
    }

    fn balancer() -> Option<SocketAddr> {
        Some("127.0.0.1:40000".parse().unwrap())
    }

    /// A v2 PROXY header from 192.0.2.7:51000 with these TLVs.
    fn v2_header(command: u8, tlvs: &[u8]) -> Vec<u8> {
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend([0x20 | command, 0x11]);
        header.extend(u16::try_from(12 + tlvs.len()).unwrap().to_be_bytes());
        header.extend([192, 0, 2, 7, 127, 0, 0, 1]);
        header.extend(51000u16.to_be_bytes());
        header.extend(1883u16.to_be_bytes());
        header.extend(tlvs);
        header
    }

    fn ssl_cn_tlv(verify: u32, cn: &[u8]) -> Vec<u8> {
        let mut value = vec![0x07];
        value.extend(verify.to_be_bytes());
        value.push(0x22);
        value.extend(u16::try_from(cn.len()).unwrap().to_be_bytes());
        value.extend(cn);
        let mut tlv = vec![0x20];
        tlv.extend(u16::try_from(value.len()).unwrap().to_be_bytes());
        tlv.extend(value);
        tlv
    }

    #[test]
    fn a_proxy_header_names_the_client_then_mqtt_flows() {
        let config = StackConfig {
            proxy: Some(proxy_listener(proxy::ProxyAccept::Any, false)),
            tls: None,
            ws: None,
        };
        // Whole header and CONNECT in one read.
        let mut stack = IngressStack::new(&config, balancer()).unwrap();
        let mut input = v2_header(1, &[]);
        input.extend(b"\x10\x00");
        let mut app = BytesMut::new();
        let facts = stack.receive(&input, &mut app).unwrap().unwrap();
        assert_eq!(facts.source, Some("192.0.2.7:51000".parse().unwrap()));
        assert_eq!(&app[..], b"\x10\x00");
        // A v1 header a byte at a time: buffered (bounded), then nothing is left over.
        let mut stack = IngressStack::new(&config, balancer()).unwrap();
        let line = b"PROXY TCP4 192.0.2.9 127.0.0.1 4000 1883\r\nMQ";
        let mut app = BytesMut::new();
        for (index, byte) in line.iter().enumerate() {
            let step = stack.receive(&[*byte], &mut app).unwrap();
            if index == line.len() - 3 {
                assert_eq!(
                    step.unwrap().source,
                    Some("192.0.2.9:4000".parse().unwrap())
                );
            } else {
                assert_eq!(step, None, "at {index}");
            }
            assert!(stack.buffered_len() <= index + 1);
        }
        assert_eq!(&app[..], b"MQ");
        assert_eq!(stack.buffered_len(), 0);
    }

    #[test]
    fn a_proxy_header_from_an_untrusted_peer_or_none_at_all_is_refused() {
        let config = StackConfig {
            proxy: Some(proxy_listener(proxy::ProxyAccept::V2, false)),
            tls: None,
            ws: None,
        };
        let mut stack = IngressStack::new(&config, Some("10.9.9.9:5000".parse().unwrap())).unwrap();
        let error = stack
            .receive(&v2_header(1, &[]), &mut BytesMut::new())
            .unwrap_err();
        assert!(
            matches!(error, StackError::Proxy(proxy::ProxyError::Untrusted(_))),
            "{error}"
        );
        let mut stack = IngressStack::new(&config, balancer()).unwrap();
        let error = stack
            .receive(b"\x10\x0c\x00\x04MQTT", &mut BytesMut::new())
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("does not start with a v2 header"),
            "{error}"
        );
        assert_eq!(stack.take_wire(), None, "nothing answered");
    }

    #[test]
    fn a_local_header_alone_is_never_established() {
        let config = StackConfig {
            proxy: Some(proxy_listener(proxy::ProxyAccept::V2, false)),
            tls: None,
            ws: None,
        };
        let mut stack = IngressStack::new(&config, balancer()).unwrap();
        let mut app = BytesMut::new();
        assert_eq!(stack.receive(&v2_header(0, &[]), &mut app).unwrap(), None);
        assert!(!stack.is_established());
        // Then bytes: established with the socket's peer (no source).
        let facts = stack.receive(b"\x10", &mut app).unwrap().unwrap();
        assert_eq!(facts.source, None);
        assert_eq!(&app[..], b"\x10");
    }

    #[test]
    fn the_balancers_verified_cn_is_the_certificate_name_when_asked_for() {
        let named = StackConfig {
            proxy: Some(proxy_listener(proxy::ProxyAccept::V2, true)),
            tls: None,
            ws: None,
        };
        let establish = |config: &StackConfig, tlvs: &[u8]| {
            let mut stack = IngressStack::new(config, balancer()).unwrap();
            stack.receive(&v2_header(1, tlvs), &mut BytesMut::new())
        };
        let facts = establish(&named, &ssl_cn_tlv(0, b"device-1"))
            .unwrap()
            .unwrap();
        assert_eq!(facts.certificate_name.as_deref(), Some("device-1"));
        // Not verified by the balancer: nobody in particular.
        let facts = establish(&named, &ssl_cn_tlv(9, b"device-1"))
            .unwrap()
            .unwrap();
        assert_eq!(facts.certificate_name, None);
        // The listener does not read it.
        let unnamed = StackConfig {
            proxy: Some(proxy_listener(proxy::ProxyAccept::V2, false)),
            tls: None,
            ws: None,
        };
        let facts = establish(&unnamed, &ssl_cn_tlv(0, b"device-1"))
            .unwrap()
            .unwrap();
        assert_eq!(facts.certificate_name, None);
        // AWS's VPC endpoint id is kept.
        let vpce = [0xEA, 0, 6, 1, b'v', b'p', b'c', b'e', b'1'];
        let facts = establish(&unnamed, &vpce).unwrap().unwrap();
        assert_eq!(facts.vpc_endpoint.as_deref(), Some("vpce1"));
    }

    #[test]
    fn a_proxy_header_goes_before_tls() {
        let mut config = listener(ClientCertificates::None, NameFrom::None);
        config.proxy = Some(proxy_listener(proxy::ProxyAccept::V1, false));
        let mut stack = IngressStack::new(&config, balancer()).unwrap();
        let mut client = client(false, &[b"mqtt"]);
        let mut first = BytesMut::from(&b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 8883\r\n"[..]);
        client.send(b"", &mut first).unwrap();
        let mut app = BytesMut::new();
        assert_eq!(stack.receive(&first, &mut app).unwrap(), None);
        let wire = stack.take_wire().unwrap();
        let mut to_server = BytesMut::new();
        client
            .receive(&wire, &mut BytesMut::new(), &mut to_server)
            .unwrap();
        let facts = handshake_from(&mut stack, &mut client, to_server).unwrap();
        assert_eq!(facts.source, Some("192.0.2.7:51000".parse().unwrap()));
    }

    #[test]
    fn a_stack_is_send() {
        fn send<T: Send>() {}
        send::<IngressStack>();
    }
}
