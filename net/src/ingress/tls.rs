//! A rustls session driven sans-IO: ciphertext in, plaintext out; plaintext in, ciphertext out.
//!
//! Owns: one TLS session ([`TlsSession`]) and the immutable configurations it starts from
//! ([`MutualTls`], [`client_config`], [`server_config`]), built from PEM files.
//! Never: touches a socket or a clock, or holds ciphertext for the caller between calls: every
//! call moves what rustls has to send into the caller's buffer, so the caller alone decides
//! when bytes reach the wire (one writer per buffer).
//! Invariants:
//! - Before the handshake completes, a session takes at most `handshake_len_max` bytes of
//!   ciphertext in all; beyond that it fails (`TlsError::HandshakeTooLong`), so a stranger can
//!   make it hold no more than that, however rustls's own buffers are sized (its deframer
//!   allows 64 KiB for a handshake message, its received plaintext 16 KiB).
//! - rustls holds at most [`SENDABLE_TLS_LEN_MAX`] bytes of ciphertext queued for sending, and
//!   none once a call returns; plaintext written before the handshake completes waits in the
//!   session and is encrypted when it does.
//! - A configuration is shared by every session of a process as an `Arc` that nobody mutates
//!   after it is built: session resumption (whose caches rustls keeps behind a mutex) and
//!   session tickets are turned off, so no session changes state that another one reads.

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

/// Ciphertext rustls may queue for sending inside one call before the session moves it out to
/// the caller; a larger plaintext is written in steps of about this size.
pub const SENDABLE_TLS_LEN_MAX: usize = 64 * 1024;

/// Why a session cannot go on. The caller closes the connection (after sending what the
/// session queued: rustls queues an alert for the peer where TLS has one).
#[derive(Debug)]
pub enum TlsError {
    /// The peer broke TLS: a malformed record, a failed handshake, a certificate that does
    /// not chain to a trusted authority or names another server.
    Protocol(rustls::Error),
    /// The peer sent more than this many bytes before the handshake completed.
    HandshakeTooLong { limit: usize },
    /// rustls refused the bytes at one of its own buffer limits.
    Buffer(String),
    /// The peer ended the session (`close_notify`).
    Closed,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Protocol(error) => write!(f, "TLS: {error}"),
            TlsError::HandshakeTooLong { limit } => write!(
                f,
                "TLS: the peer sent more than {limit} bytes before its handshake completed"
            ),
            TlsError::Buffer(reason) => write!(f, "TLS: {reason}"),
            TlsError::Closed => write!(f, "TLS: the peer closed its session"),
        }
    }
}

impl std::error::Error for TlsError {}

/// The crypto provider every configuration here uses: ring, which builds with a C compiler
/// alone (aws-lc-rs also needs cmake).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM text, in order (a chain: the end entity first).
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable PEM: {e}"))?;
    if certificates.is_empty() {
        return Err("no CERTIFICATE block in the PEM text".into());
    }
    Ok(certificates)
}

/// The first private key of a PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no readable private key: {e}"))
}

/// The trusted authorities of a PEM text; every certificate in it must be usable as one.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates_from_pem(pem)? {
        roots
            .add(certificate)
            .map_err(|e| format!("not a usable authority certificate: {e}"))?;
    }
    Ok(roots)
}

/// The ALPN protocol name of MQTT over TLS (IANA's registry, RFC 7301). A client listener
/// offers it; a client that offers no ALPN at all is served too.
pub const ALPN_MQTT: &[u8] = b"mqtt";

/// Whether a server asks its clients for a certificate, and which authorities it must chain
/// to.
#[derive(Debug)]
pub enum ClientCertificates {
    /// No certificate is asked for.
    None,
    /// One is asked for; a client may present none, but one it presents must chain to these.
    Optional(RootCertStore),
    /// A client must present a certificate that chains to these.
    Required(RootCertStore),
}

/// A server configuration (TLS 1.3 and 1.2) presenting `chain`; with `client_roots`, clients
/// must present a certificate that chains to one of them.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<ServerConfig, String> {
    let clients = match client_roots {
        Some(roots) => ClientCertificates::Required(roots),
        None => ClientCertificates::None,
    };
    server_config_with(chain, key, clients)
}

/// The configuration of a client listener: TLS 1.3 and 1.2, ALPN `mqtt`, client certificates
/// as `clients` says. Built from PEM texts; each error names the part it concerns.
pub fn client_listener_config(
    chain_pem: &[u8],
    key_pem: &[u8],
    clients: ClientCertificates,
) -> Result<ServerConfig, String> {
    let chain = certificates_from_pem(chain_pem).map_err(|e| format!("certificate: {e}"))?;
    let key = private_key_from_pem(key_pem).map_err(|e| format!("key: {e}"))?;
    let mut config = server_config_with(chain, key, clients)?;
    config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    Ok(config)
}

/// A server configuration (TLS 1.3 and 1.2) presenting `chain`, asking clients for
/// certificates as `clients` says.
pub fn server_config_with(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: ClientCertificates,
) -> Result<ServerConfig, String> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder = match clients {
        ClientCertificates::Required(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientCertificates::Optional(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientCertificates::None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    // No resumption state shared between sessions (see the module's invariants).
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client configuration (TLS 1.3 and 1.2) trusting `roots`; with `identity`, it presents
/// that chain when the server asks for a certificate.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("certificate and key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    // No resumption cache shared between sessions (see the module's invariants).
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Both ends of mutually authenticated TLS under one authority: each side presents its own
/// certificate, and the dialling side also checks that the server's names `server_name`
/// (which it does not send: no SNI).
/// Built once at start and shared, never changed (see the module's invariants).
#[derive(Debug, Clone)]
pub struct MutualTls {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    pub server_name: ServerName<'static>,
}

impl MutualTls {
    /// From PEM texts: this side's certificate chain and key, and the authority both sides'
    /// certificates must chain to.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        authority_pem: &[u8],
        server_name: &str,
    ) -> Result<Self, String> {
        let chain = certificates_from_pem(chain_pem).map_err(|e| format!("certificate: {e}"))?;
        let key = private_key_from_pem(key_pem).map_err(|e| format!("key: {e}"))?;
        let roots = roots_from_pem(authority_pem).map_err(|e| format!("authority: {e}"))?;
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        // This side serves the same certificate: one that does not carry the name would fail
        // every peer's check, so it is refused here, at start, with a reason.
        let end_entity = chain
            .first()
            .ok_or("certificate: the chain is empty")
            .and_then(|first| {
                ParsedCertificate::try_from(first).map_err(|_| "certificate: not parseable")
            })?;
        rustls::client::verify_server_name(&end_entity, &server_name)
            .map_err(|e| format!("certificate: {e}"))?;
        let server = server_config(chain.clone(), key.clone_key(), Some(roots.clone()))?;
        let mut client = client_config(roots, Some((chain, key)))?;
        // No SNI: every server presents its one certificate anyway, and the name, sent in
        // clear in the ClientHello, would tell an observer which cluster this is. The name is
        // still checked against the server's certificate.
        client.enable_sni = false;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
        })
    }

    /// The session of a connection this side dialled.
    pub fn connecting(&self, handshake_len_max: usize) -> Result<TlsSession, TlsError> {
        TlsSession::client(
            self.client.clone(),
            self.server_name.clone(),
            handshake_len_max,
        )
    }

    /// The session of a connection a peer dialled.
    pub fn accepted(&self, handshake_len_max: usize) -> Result<TlsSession, TlsError> {
        TlsSession::server(self.server.clone(), handshake_len_max)
    }
}

/// One TLS session over a byte stream that the caller moves.
#[derive(Debug)]
pub struct TlsSession {
    /// Boxed: rustls's state is a few KiB, and the owner (a link, a connection) stays small.
    connection: Box<Connection>,
    handshake_len_max: usize,
    /// Ciphertext taken before the handshake completed.
    handshake_len: usize,
    /// Plaintext written before the handshake completed, sent when it does.
    early: BytesMut,
    /// The first bytes the peer sent, so that the caller can tell a peer that speaks its
    /// protocol without TLS from one that breaks TLS.
    prefix: [u8; 4],
    prefix_len: usize,
}

impl TlsSession {
    pub fn client(
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        handshake_len_max: usize,
    ) -> Result<Self, TlsError> {
        let connection = ClientConnection::new(config, server_name).map_err(TlsError::Protocol)?;
        Ok(Self::new(connection.into(), handshake_len_max))
    }

    pub fn server(config: Arc<ServerConfig>, handshake_len_max: usize) -> Result<Self, TlsError> {
        let connection = rustls::ServerConnection::new(config).map_err(TlsError::Protocol)?;
        Ok(Self::new(connection.into(), handshake_len_max))
    }

    fn new(mut connection: Connection, handshake_len_max: usize) -> Self {
        connection.set_buffer_limit(Some(SENDABLE_TLS_LEN_MAX));
        Self {
            connection: Box::new(connection),
            handshake_len_max,
            handshake_len: 0,
            early: BytesMut::new(),
            prefix: [0; 4],
            prefix_len: 0,
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.connection.is_handshaking()
    }

    /// The peer's certificate chain (end entity first), once the handshake has verified it;
    /// None when the peer presented none.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.connection.peer_certificates()
    }

    /// The ALPN protocol agreed in the handshake, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.connection.alpn_protocol()
    }

    /// Ends the session from this side: queues a `close_notify` alert and moves it into
    /// `ciphertext_out`. Nothing is sent after it.
    pub fn close(&mut self, ciphertext_out: &mut BytesMut) {
        self.connection.send_close_notify();
        self.drain(ciphertext_out);
    }

    /// Plaintext this session holds for the peer until its handshake completes.
    pub fn buffered_len(&self) -> usize {
        self.early.len()
    }

    /// Up to the first four bytes the peer sent.
    pub fn received_prefix(&self) -> &[u8] {
        self.prefix.get(..self.prefix_len).unwrap_or_default()
    }

    /// The negotiated protocol version, once the handshake has chosen it.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.connection.protocol_version()
    }

    /// Takes ciphertext from the peer: appends what it decrypts to `plaintext` and what TLS
    /// answers to `ciphertext_out`. After an `Err`, `ciphertext_out` may hold an alert for the
    /// peer; the session cannot be used further.
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        plaintext: &mut BytesMut,
        ciphertext_out: &mut BytesMut,
    ) -> Result<(), TlsError> {
        self.remember_prefix(ciphertext);
        let result = self.decrypt(&mut ciphertext, plaintext);
        self.drain(ciphertext_out);
        result?;
        if !self.connection.is_handshaking() && !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            self.send(&early, ciphertext_out)?;
        }
        Ok(())
    }

    fn decrypt(
        &mut self,
        ciphertext: &mut &[u8],
        plaintext: &mut BytesMut,
    ) -> Result<(), TlsError> {
        while !ciphertext.is_empty() {
            // Until the handshake completes, rustls is offered only what is left of the
            // allowance: it never holds more than that, and bytes that follow the handshake in
            // the same read (the peer's first data) are not counted against it.
            let handshaking = self.connection.is_handshaking();
            let mut piece = *ciphertext;
            if handshaking {
                let allowance = self.handshake_len_max.saturating_sub(self.handshake_len);
                if allowance == 0 {
                    return Err(TlsError::HandshakeTooLong {
                        limit: self.handshake_len_max,
                    });
                }
                piece = piece.get(..allowance).unwrap_or(piece);
            }
            // rustls takes what fits its buffer (one read of at most 4 KiB at a time); the
            // plaintext it yields is moved out before the next read, so neither grows.
            let read = self
                .connection
                .read_tls(&mut piece)
                .map_err(|e| TlsError::Buffer(e.to_string()))?;
            *ciphertext = ciphertext.get(read..).unwrap_or_default();
            if handshaking {
                self.handshake_len = self.handshake_len.saturating_add(read);
            }
            let state = self
                .connection
                .process_new_packets()
                .map_err(TlsError::Protocol)?;
            let pending = state.plaintext_bytes_to_read();
            if pending > 0 {
                let start = plaintext.len();
                plaintext.resize(start.saturating_add(pending), 0);
                let target = plaintext.get_mut(start..).unwrap_or_default();
                self.connection
                    .reader()
                    .read_exact(target)
                    .map_err(|e| TlsError::Buffer(e.to_string()))?;
            }
            if state.peer_has_closed() {
                return Err(TlsError::Closed);
            }
            if read == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Encrypts `plaintext` for the peer into `ciphertext_out` (with whatever else TLS has to
    /// send); before the handshake completes it waits in the session.
    pub fn send(
        &mut self,
        plaintext: &[u8],
        ciphertext_out: &mut BytesMut,
    ) -> Result<(), TlsError> {
        if self.connection.is_handshaking() {
            self.early.extend_from_slice(plaintext);
            self.drain(ciphertext_out);
            return Ok(());
        }
        let mut rest = plaintext;
        while !rest.is_empty() {
            let written = self
                .connection
                .writer()
                .write(rest)
                .map_err(|e| TlsError::Buffer(e.to_string()))?;
            let queued = self.drain(ciphertext_out);
            if written == 0 && queued == 0 {
                // Nothing taken and nothing to move out: the session no longer sends (it has
                // been closed); looping would never end.
                return Err(TlsError::Buffer("the session takes no more data".into()));
            }
            rest = rest.get(written..).unwrap_or_default();
        }
        self.drain(ciphertext_out);
        Ok(())
    }

    /// Moves everything rustls has queued for the peer into `ciphertext_out`; returns how much.
    pub fn drain(&mut self, ciphertext_out: &mut BytesMut) -> usize {
        let before = ciphertext_out.len();
        let mut writer = ciphertext_out.writer();
        while self.connection.wants_write() {
            // Writing into memory cannot fail or stall.
            if !matches!(self.connection.write_tls(&mut writer), Ok(n) if n > 0) {
                break;
            }
        }
        ciphertext_out.len().saturating_sub(before)
    }

    fn remember_prefix(&mut self, bytes: &[u8]) {
        for &byte in bytes
            .iter()
            .take(self.prefix.len().saturating_sub(self.prefix_len))
        {
            if let Some(slot) = self.prefix.get_mut(self.prefix_len) {
                *slot = byte;
                self.prefix_len += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &[u8] = include_bytes!("testdata/ca.pem");
    const NODE_CERT: &[u8] = include_bytes!("testdata/node.pem");
    const NODE_KEY: &[u8] = include_bytes!("testdata/node.key");
    const OTHER_CA: &[u8] = include_bytes!("testdata/other-ca.pem");
    const OTHER_CERT: &[u8] = include_bytes!("testdata/other-node.pem");
    const OTHER_KEY: &[u8] = include_bytes!("testdata/other-node.key");
    /// The name in the fixtures' certificates (subjectAltName DNS).
    const NAME: &str = "testcluster";
    const LIMIT: usize = 16 * 1024;

    fn ours() -> MutualTls {
        MutualTls::from_pem(NODE_CERT, NODE_KEY, CA, NAME).unwrap()
    }

    /// Moves bytes both ways until neither side says more; returns the plaintext each side
    /// received, or the first error with the side that hit it.
    fn pump(
        client: &mut TlsSession,
        server: &mut TlsSession,
        mut to_server: BytesMut,
    ) -> Result<(BytesMut, BytesMut), (&'static str, TlsError)> {
        let (mut plain_client, mut plain_server) = (BytesMut::new(), BytesMut::new());
        let mut to_client = BytesMut::new();
        for _ in 0..100 {
            if to_server.is_empty() && to_client.is_empty() {
                return Ok((plain_client, plain_server));
            }
            let bytes = to_server.split();
            server
                .receive(&bytes, &mut plain_server, &mut to_client)
                .map_err(|e| ("server", e))?;
            let bytes = to_client.split();
            client
                .receive(&bytes, &mut plain_client, &mut to_server)
                .map_err(|e| ("client", e))?;
        }
        panic!("the sessions never went quiet");
    }

    fn start(client_tls: &MutualTls, server_tls: &MutualTls) -> (TlsSession, TlsSession, BytesMut) {
        let mut client = client_tls.connecting(LIMIT).unwrap();
        let server = server_tls.accepted(LIMIT).unwrap();
        let mut hello = BytesMut::new();
        client.send(b"early words", &mut hello).unwrap();
        assert!(!hello.is_empty(), "a ClientHello goes out at once");
        (client, server, hello)
    }

    #[test]
    fn a_handshake_then_data_both_ways_encrypted() {
        let tls = ours();
        let (mut client, mut server, hello) = start(&tls, &tls);
        let (_, plain) = pump(&mut client, &mut server, hello).unwrap();
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(
            &plain[..],
            b"early words",
            "sent once the handshake completed"
        );
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // A large write crosses many records and comes out whole, and never in clear.
        let secret = b"topic/secret ".repeat(20_000);
        let mut wire = BytesMut::new();
        server.send(&secret, &mut wire).unwrap();
        assert!(!wire.windows(13).any(|w| w == b"topic/secret "));
        let mut plain = BytesMut::new();
        client
            .receive(&wire, &mut plain, &mut BytesMut::new())
            .unwrap();
        assert_eq!(&plain[..], &secret[..]);
    }

    #[test]
    fn bytes_trickled_one_at_a_time_still_complete_the_handshake() {
        let tls = ours();
        let (mut client, mut server, mut to_server) = start(&tls, &tls);
        let (mut to_client, mut plain) = (BytesMut::new(), BytesMut::new());
        for _ in 0..50 {
            for byte in to_server.split().iter() {
                server
                    .receive(&[*byte], &mut plain, &mut to_client)
                    .unwrap();
            }
            for byte in to_client.split().iter() {
                client
                    .receive(&[*byte], &mut BytesMut::new(), &mut to_server)
                    .unwrap();
            }
        }
        assert!(!server.is_handshaking());
        assert_eq!(&plain[..], b"early words");
    }

    #[test]
    fn a_certificate_from_another_authority_is_refused_both_ways() {
        let stranger = MutualTls::from_pem(OTHER_CERT, OTHER_KEY, OTHER_CA, NAME).unwrap();
        // The stranger dials us: it cannot trust our certificate.
        let (mut client, mut server, hello) = start(&stranger, &ours());
        let (side, error) = pump(&mut client, &mut server, hello).unwrap_err();
        assert_eq!(side, "client");
        assert!(error.to_string().contains("certificate"), "{error}");
        // Trusting our authority is not enough either: we do not trust its certificate.
        let half = MutualTls::from_pem(OTHER_CERT, OTHER_KEY, CA, NAME).unwrap();
        let (mut client, mut server, hello) = start(&half, &ours());
        let (side, error) = pump(&mut client, &mut server, hello).unwrap_err();
        assert_eq!(side, "server");
        assert!(error.to_string().contains("certificate"), "{error}");
    }

    #[test]
    fn the_server_must_carry_the_expected_name() {
        // A certificate without the name is refused when the configuration is built...
        let error = MutualTls::from_pem(NODE_CERT, NODE_KEY, CA, "othercluster").unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
        // ...and a dialling side expecting another name refuses the server's.
        let mut elsewhere = ours();
        elsewhere.server_name = ServerName::try_from("othercluster").unwrap();
        let (mut client, mut server, hello) = start(&elsewhere, &ours());
        let (side, error) = pump(&mut client, &mut server, hello).unwrap_err();
        assert_eq!(side, "client");
        assert!(error.to_string().contains("not valid for name"), "{error}");
    }

    #[test]
    fn plaintext_is_refused_and_its_prefix_kept() {
        let mut server = ours().accepted(LIMIT).unwrap();
        let mut alert = BytesMut::new();
        let error = server
            .receive(b"SMQC not tls at all", &mut BytesMut::new(), &mut alert)
            .unwrap_err();
        assert!(matches!(error, TlsError::Protocol(_)), "{error}");
        assert_eq!(server.received_prefix(), b"SMQC");
        assert_eq!(alert.first(), Some(&0x15), "an alert record for the peer");
    }

    #[test]
    fn a_long_handshake_is_cut_at_the_limit() {
        let mut server = ours().accepted(100).unwrap();
        // A record header announcing a large handshake message, then its body in pieces.
        let mut out = BytesMut::new();
        server
            .receive(
                &[0x16, 0x03, 0x01, 0x40, 0x00],
                &mut BytesMut::new(),
                &mut out,
            )
            .unwrap();
        server
            .receive(&[1; 90], &mut BytesMut::new(), &mut out)
            .unwrap();
        let error = server
            .receive(&[1; 10], &mut BytesMut::new(), &mut out)
            .unwrap_err();
        assert!(
            matches!(error, TlsError::HandshakeTooLong { limit: 100 }),
            "{error}"
        );
    }

    #[test]
    fn data_behind_the_handshake_in_one_read_is_not_counted_against_its_limit() {
        let tls = ours();
        let mut client = tls.connecting(LIMIT).unwrap();
        let mut server = tls.accepted(LIMIT).unwrap();
        let early = vec![b'x'; 2 * LIMIT];
        let mut to_server = BytesMut::new();
        client.send(&early, &mut to_server).unwrap();
        let (mut plain, mut to_client) = (BytesMut::new(), BytesMut::new());
        server
            .receive(&to_server.split(), &mut plain, &mut to_client)
            .unwrap();
        client
            .receive(&to_client.split(), &mut BytesMut::new(), &mut to_server)
            .unwrap();
        // The client's Finished and twice the limit of data, in one read.
        assert!(to_server.len() > 2 * LIMIT);
        server
            .receive(&to_server.split(), &mut plain, &mut to_client)
            .unwrap();
        assert_eq!(&plain[..], &early[..]);
    }

    #[test]
    fn unreadable_configuration_is_named() {
        let error = MutualTls::from_pem(b"junk", NODE_KEY, CA, NAME).unwrap_err();
        assert!(error.starts_with("certificate:"), "{error}");
        let error = MutualTls::from_pem(NODE_CERT, b"junk", CA, NAME).unwrap_err();
        assert!(error.starts_with("key:"), "{error}");
        let error = MutualTls::from_pem(NODE_CERT, NODE_KEY, b"", NAME).unwrap_err();
        assert!(error.starts_with("authority:"), "{error}");
        let error = MutualTls::from_pem(NODE_CERT, NODE_KEY, CA, "not a name!").unwrap_err();
        assert!(error.starts_with("server name"), "{error}");
        let error = MutualTls::from_pem(NODE_CERT, OTHER_KEY, CA, NAME).unwrap_err();
        assert!(error.contains("certificate and key"), "{error}");
    }
}
