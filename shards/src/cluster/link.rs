//! One cluster link: a TCP connection between two nodes, as a state machine over bytes.
//!
//! Owns: the link's side of the handshake ([`shardmq_net::frame::handshake`]: each end proves
//! the cluster secret over a transcript of this one connection), framing both ways, the
//! handshake deadline, the time of the last frame each way, and, where the cluster requires
//! it, the TLS session under the framing ([`shardmq_net::ingress::tls`]: mutual certificates
//! from the cluster's authority; the secret's handshake then runs inside it).
//! Never: lets a frame through before the peer has proved the secret, takes a frame larger
//! than [`HANDSHAKE_BODY_LEN_MAX`] or more than [`TLS_HANDSHAKE_LEN_MAX`] bytes of TLS
//! handshake before then, talks plain to a node that requires TLS or TLS to one that does not,
//! or panics on a peer's bytes: every failure is an `Err` naming why, and the caller closes the
//! link.
//! Invariants: a link has a peer exactly when it is up (the `Up` state holds it); with TLS,
//! every byte that reaches `take_outgoing` has passed through the session.

use bytes::{Bytes, BytesMut};
use shardmq_net::frame::MAGIC;
use shardmq_net::frame::handshake::{
    HANDSHAKE_BODY_LEN_MAX, Handshake, HandshakeError, LinkKey, Local, Step,
};
use shardmq_net::frame::{self, Body, Decoder, Hello, Member, NodeId, Purpose, Role, Welcome};
use shardmq_net::ingress::tls::{MutualTls, TlsError, TlsSession};

use crate::message::ConnectionId;

/// How long a new link may take to finish its handshake: one that has not authenticated by
/// then is closed (and logged), however it keeps trickling bytes. Three frames of a few
/// hundred bytes need a round trip and a half; this leaves room for a loaded node on a slow
/// network.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 3_000;

/// Links a node holds in their handshake at once; one accepted beyond it is closed at once.
/// With [`HANDSHAKE_BODY_LEN_MAX`] this bounds what strangers can make a node hold (a few
/// KiB each, for at most [`HANDSHAKE_TIMEOUT_MS`]), far above what a cluster's own nodes
/// open at one time.
pub const PENDING_LINKS_MAX: usize = 1024;

/// Bytes of TLS a link takes before its TLS handshake completes: a ClientHello is a few
/// hundred bytes and a node's certificate flight (chain, signature, Finished) a few KiB, so
/// this leaves room for chains with intermediates while bounding what a stranger makes a
/// pending link hold (rustls alone would buffer up to 64 KiB of one handshake message).
pub const TLS_HANDSHAKE_LEN_MAX: usize = 16 * 1024;

/// A framing buffer larger than this is released once its bytes are encrypted, so that an
/// idle TLS link does not keep the capacity of its largest burst.
const IDLE_BUFFER_LEN_MAX: usize = 4 * 1024;

/// The first byte of a TLS record that a node which does not speak TLS may receive: a
/// handshake (a ClientHello, or a server's answer) or an alert.
const TLS_RECORD_FIRST_BYTES: [u8; 2] = [0x16, 0x15];

/// What every link of a node needs to know.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub member: Member,
    pub cluster_name: String,
    pub cluster_secret: String,
    pub body_len_max: usize,
    /// This node's start, told to nodes that dial it (new at every start).
    pub epoch: u64,
    /// `Some` when the cluster requires TLS on its links (`cluster.tls = "required"`): this
    /// node's certificate and the cluster's authority, and the name every node's certificate
    /// carries (the cluster name, which the dialling side checks). The configurations are
    /// `Arc`s shared by the links of every shard: that is the one exception to the no-`Arc`
    /// rule of `shards/`, allowed because they are built once at start and never changed
    /// (resumption caches are off; see `ingress::tls`). Certificates are read at start only:
    /// new ones take a restart.
    pub tls: Option<MutualTls>,
}

impl LinkSettings {
    pub fn node(&self) -> NodeId {
        self.member.node
    }

    pub fn role(&self) -> Role {
        self.member.role
    }

    pub fn cluster_id(&self) -> u64 {
        frame::cluster_id(&self.cluster_name)
    }

    /// This node as its side of a handshake needs it; the key is derived here, once a link.
    fn local(&self) -> Local {
        Local {
            key: LinkKey::derive(&self.cluster_secret, &self.cluster_name),
            cluster_name: self.cluster_name.clone(),
            node: self.node(),
            role: self.role(),
            epoch: self.epoch,
        }
    }
}

#[derive(Debug)]
enum State {
    /// The handshake is under way, with this node's side of it.
    Handshake {
        handshake: Handshake,
        local: Box<Local>,
    },
    /// Authenticated: frames pass to the layer above.
    Up(Peer),
}

/// Who is at the other end, once the handshake said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: NodeId,
    pub role: Role,
    /// From the connector's Hello only (the acceptor is known by the address dialled).
    pub member: Option<Member>,
    pub purpose: Purpose,
    pub shard: u16,
    pub epoch: u64,
    /// On a link we dialled: the acceptor's start, from its Welcome.
    pub remote_epoch: Option<u64>,
}

impl Peer {
    /// The other end of an authenticated handshake, as seen by the side that `dialled` or not.
    fn new(dialled: bool, hello: Hello, welcome: &Welcome) -> Self {
        if dialled {
            Peer {
                node: welcome.node,
                role: welcome.role,
                member: None,
                purpose: hello.purpose,
                shard: hello.shard,
                epoch: hello.epoch,
                remote_epoch: Some(welcome.epoch),
            }
        } else {
            Peer {
                node: hello.node,
                role: hello.role,
                purpose: hello.purpose,
                shard: hello.shard,
                epoch: hello.epoch,
                member: Some(hello.member),
                remote_epoch: None,
            }
        }
    }
}

/// What a link has carried: plain increments where frames and bytes pass, read only when an
/// operator scrapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Bytes on the wire (TLS records included, under TLS).
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl std::ops::AddAssign for LinkCounters {
    fn add_assign(&mut self, other: Self) {
        self.frames_sent += other.frames_sent;
        self.frames_received += other.frames_received;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
    }
}

#[derive(Debug)]
pub struct Link {
    pub connection: ConnectionId,
    state: State,
    /// Whether we dialled this link (and so are the handshake's initiator).
    dialled: bool,
    decoder: Decoder,
    /// Frames not yet taken (plaintext, encrypted by `take_outgoing` under TLS).
    outgoing: BytesMut,
    /// Under TLS: the session, and its ciphertext not yet taken.
    tls: Option<(TlsSession, BytesMut)>,
    /// Whether the peer has sent anything yet (a plain node tells TLS from its first byte).
    received_any: bool,
    /// Why the link can no longer work, found where no `Err` could be returned (starting a
    /// TLS session, encrypting): the next `receive` or `expired` reports it.
    failure: Option<String>,
    /// When the link was opened: its handshake is due within [`HANDSHAKE_TIMEOUT_MS`].
    opened_ms: u64,
    pub last_received_ms: u64,
    pub last_sent_ms: u64,
    /// Forwarded items dropped because one alone is longer than a frame may be.
    pub forward_items_dropped: u64,
    pub counters: LinkCounters,
}

impl Link {
    /// A link we opened: Hello goes out at once.
    pub fn connecting(
        connection: ConnectionId,
        settings: &LinkSettings,
        purpose: Purpose,
        shard: u16,
        epoch: u64,
        nonce: [u8; 16],
        now_ms: u64,
    ) -> Self {
        let (handshake, hello) = Handshake::initiate(Hello {
            node: settings.node(),
            role: settings.role(),
            purpose,
            member: settings.member.clone(),
            nonce,
            shard,
            epoch,
        });
        let mut link = Self::new(connection, settings, handshake, true, now_ms);
        link.send(settings, &hello, now_ms);
        link
    }

    /// A link a peer opened to us.
    pub fn accepted(
        connection: ConnectionId,
        settings: &LinkSettings,
        nonce: [u8; 16],
        now_ms: u64,
    ) -> Self {
        Self::new(
            connection,
            settings,
            Handshake::accept(nonce),
            false,
            now_ms,
        )
    }

    fn new(
        connection: ConnectionId,
        settings: &LinkSettings,
        handshake: Handshake,
        dialled: bool,
        now_ms: u64,
    ) -> Self {
        let (tls, failure) = match settings.tls.as_ref().map(|tls| {
            if dialled {
                tls.connecting(TLS_HANDSHAKE_LEN_MAX)
            } else {
                tls.accepted(TLS_HANDSHAKE_LEN_MAX)
            }
        }) {
            None => (None, None),
            Some(Ok(session)) => (Some((session, BytesMut::new())), None),
            Some(Err(error)) => (None, Some(format!("cannot start a TLS session: {error}"))),
        };
        Self {
            connection,
            state: State::Handshake {
                handshake,
                local: Box::new(settings.local()),
            },
            dialled,
            decoder: Decoder::new(settings.cluster_id(), HANDSHAKE_BODY_LEN_MAX),
            outgoing: BytesMut::new(),
            tls,
            received_any: false,
            forward_items_dropped: 0,
            counters: LinkCounters::default(),
            failure,
            opened_ms: now_ms,
            last_received_ms: now_ms,
            last_sent_ms: now_ms,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// The peer, once the handshake has finished.
    pub fn up_peer(&self) -> Option<&Peer> {
        match &self.state {
            State::Up(peer) => Some(peer),
            State::Handshake { .. } => None,
        }
    }

    /// The protocol version of the peer's frames (authenticated by the handshake, whose
    /// transcript covers both sides' versions), once it has sent one.
    pub fn peer_version(&self) -> Option<u16> {
        self.decoder.peer_version
    }

    /// When this link must close unless something happens first: `link_timeout_ms` after the
    /// last frame received, and, until it is up, the end of its handshake time.
    pub fn deadline_ms(&self, link_timeout_ms: u64) -> u64 {
        if self.failure.is_some() {
            return 0;
        }
        let silence = self.last_received_ms.saturating_add(link_timeout_ms);
        if self.is_up() {
            silence
        } else {
            silence.min(self.opened_ms.saturating_add(HANDSHAKE_TIMEOUT_MS))
        }
    }

    /// Why this link must close at `now_ms`, if it must.
    pub fn expired(&self, now_ms: u64, link_timeout_ms: u64) -> Option<String> {
        if let Some(failure) = &self.failure {
            return Some(failure.clone());
        }
        if now_ms < self.deadline_ms(link_timeout_ms) {
            return None;
        }
        Some(
            if !self.is_up() && now_ms >= self.opened_ms.saturating_add(HANDSHAKE_TIMEOUT_MS) {
                format!("the link did not finish its handshake within {HANDSHAKE_TIMEOUT_MS} ms")
            } else {
                format!("the link was silent past the timeout of {link_timeout_ms} ms")
            },
        )
    }

    /// Frames `body` for the peer. Forwarded messages are cut into as many frames as the
    /// limit needs ([`super::forward::encode_cut`]); any other body must already fit
    /// (the agent cuts its own): one that does not is a bug of this node, so the link fails
    /// with the reason rather than send a frame the peer would refuse.
    pub fn send(&mut self, settings: &LinkSettings, body: &Body, now_ms: u64) {
        let result = super::forward::encode_cut(
            body,
            settings.cluster_id(),
            settings.body_len_max,
            &mut self.outgoing,
        );
        match result {
            Ok(cut) => {
                self.forward_items_dropped += cut.dropped as u64;
                self.counters.frames_sent += cut.frames as u64;
            }
            Err(error) => {
                tracing::error!(
                    kind = body.kind(),
                    %error,
                    "a cluster frame this node built does not fit the frame size limit"
                );
                self.failure.get_or_insert_with(|| {
                    format!("a frame of kind {} to send: {error}", body.kind())
                });
            }
        }
        self.last_sent_ms = now_ms;
    }

    /// Everything framed since the last call, encrypted under TLS (with what the TLS session
    /// itself has to say).
    pub fn take_outgoing(&mut self) -> Option<Bytes> {
        // The buffer itself is handed over (`take`, not `split`): a view left behind would
        // keep the whole allocation of a burst alive on an idle link.
        let Some((session, wire)) = &mut self.tls else {
            self.counters.bytes_sent += self.outgoing.len() as u64;
            return (!self.outgoing.is_empty())
                .then(|| std::mem::take(&mut self.outgoing).freeze());
        };
        if let Err(error) = session.send(&self.outgoing, wire) {
            self.failure
                .get_or_insert_with(|| format!("cluster link {error}"));
        }
        if self.outgoing.capacity() > IDLE_BUFFER_LEN_MAX {
            self.outgoing = BytesMut::new();
        } else {
            self.outgoing.clear();
        }
        self.counters.bytes_sent += wire.len() as u64;
        (!wire.is_empty()).then(|| std::mem::take(wire).freeze())
    }

    /// Takes bytes from the socket into the decoder: through the TLS session where there is
    /// one; else straight, once the first byte shows that the peer does not speak TLS.
    fn take_in(
        &mut self,
        settings: &LinkSettings,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), String> {
        let first = !self.received_any;
        self.received_any |= !bytes.is_empty();
        let Some((session, wire)) = &mut self.tls else {
            if first
                && !self.is_up()
                && bytes
                    .first()
                    .is_some_and(|b| TLS_RECORD_FIRST_BYTES.contains(b))
            {
                let reason = "the peer speaks TLS on the cluster link, and this node has TLS off \
                              (cluster.tls = \"off\"): set the same `cluster.tls` on every node";
                self.refuse(settings, reason.into(), now_ms);
                return Err(reason.into());
            }
            self.decoder.extend(bytes);
            return Ok(());
        };
        let mut plaintext = BytesMut::new();
        if let Err(error) = session.receive(bytes, &mut plaintext, wire) {
            let prefix = session.received_prefix();
            let plain_peer = !prefix.is_empty() && MAGIC.starts_with(prefix);
            return Err(if plain_peer && matches!(error, TlsError::Protocol(_)) {
                "the peer sends plain cluster frames, and this node requires TLS \
                 (cluster.tls = \"required\"): set the same `cluster.tls` on every node"
                    .into()
            } else {
                format!("cluster link {error}")
            });
        }
        self.decoder.extend(&plaintext);
        Ok(())
    }

    /// Takes received bytes; returns the frames for the layer above, which begin once the
    /// handshake is over. `Err` says why the link must close (a `Refused` frame may already be
    /// queued for the peer).
    pub fn receive(
        &mut self,
        settings: &LinkSettings,
        bytes: &[u8],
        now_ms: u64,
        bodies: &mut Vec<Body>,
    ) -> Result<(), String> {
        self.last_received_ms = now_ms;
        self.counters.bytes_received += bytes.len() as u64;
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        self.take_in(settings, bytes, now_ms)?;
        loop {
            let (version, body) = match self.decoder.next_versioned() {
                Ok(Some(frame)) => {
                    self.counters.frames_received += 1;
                    frame
                }
                Ok(None) => return Ok(()),
                Err(error) => {
                    // Tell the peer why, where it can still read us (same cluster framing).
                    if !matches!(error, frame::FrameError::Cluster(_)) {
                        self.refuse(settings, error.to_string(), now_ms);
                    }
                    return Err(error.to_string());
                }
            };
            let State::Handshake { handshake, local } = &mut self.state else {
                if let Body::Refused { reason } = body {
                    // The layer above never sees a refusal: the link ends here, as in the
                    // handshake.
                    return Err(HandshakeError::Refused(reason).to_string());
                }
                bodies.push(body);
                continue;
            };
            match handshake.step(local, version, body) {
                Ok(Step::Continue(reply)) => self.send(settings, &reply, now_ms),
                Ok(Step::Done {
                    hello,
                    welcome,
                    reply,
                }) => {
                    if let Some(reply) = reply {
                        self.send(settings, &reply, now_ms);
                    }
                    self.state = State::Up(Peer::new(self.dialled, hello, &welcome));
                    // The peer is authenticated: from its next frame on, the configured limit.
                    self.decoder.set_body_len_max(settings.body_len_max);
                }
                Err(error) => {
                    // A wrong proof is answered, so that both sides' logs show it; a peer's
                    // refusal is not answered.
                    if !matches!(error, HandshakeError::Refused(_)) {
                        self.refuse(settings, error.reason_for_peer(), now_ms);
                    }
                    return Err(error.to_string());
                }
            }
        }
    }

    fn refuse(&mut self, settings: &LinkSettings, reason: String, now_ms: u64) {
        self.send(settings, &Body::Refused { reason }, now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(node: NodeId, secret: &str) -> LinkSettings {
        LinkSettings {
            member: Member {
                node,
                role: Role::Core,
                cluster_address: format!("127.0.0.{node}:7000"),
                mqtt_address: format!("127.0.0.{node}:1883"),
                epoch: u64::from(node),
            },
            cluster_name: "c".into(),
            cluster_secret: secret.into(),
            body_len_max: 1 << 20,
            epoch: u64::from(node),
            tls: None,
        }
    }

    /// Moves bytes both ways until neither side has anything to say; returns what each side
    /// received above the handshake, or the first error.
    fn exchange(
        a: &mut Link,
        sa: &LinkSettings,
        b: &mut Link,
        sb: &LinkSettings,
    ) -> Result<(Vec<Body>, Vec<Body>), String> {
        exchange_seen(a, sa, b, sb, &mut Vec::new())
    }

    /// [`exchange`], keeping in `wire` every byte that passed either way.
    fn exchange_seen(
        a: &mut Link,
        sa: &LinkSettings,
        b: &mut Link,
        sb: &LinkSettings,
        wire: &mut Vec<u8>,
    ) -> Result<(Vec<Body>, Vec<Body>), String> {
        let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
        loop {
            let mut moved = false;
            if let Some(bytes) = a.take_outgoing() {
                wire.extend_from_slice(&bytes);
                b.receive(sb, &bytes, 0, &mut to_b)?;
                moved = true;
            }
            if let Some(bytes) = b.take_outgoing() {
                wire.extend_from_slice(&bytes);
                a.receive(sa, &bytes, 0, &mut to_a)?;
                moved = true;
            }
            if !moved {
                return Ok((to_a, to_b));
            }
        }
    }

    /// Node 1 dials node 2 (one secret) for `purpose` from shard 3, epoch 99; the handshake
    /// is run to its end.
    fn linked(purpose: Purpose) -> (Link, LinkSettings, Link, LinkSettings) {
        let (sa, sb) = (settings(1, "s"), settings(2, "s"));
        let mut a = Link::connecting(1, &sa, purpose, 3, 99, [1; 16], 0);
        let mut b = Link::accepted(2, &sb, [2; 16], 0);
        assert!(a.up_peer().is_none() && b.up_peer().is_none());
        exchange(&mut a, &sa, &mut b, &sb).unwrap();
        (a, sa, b, sb)
    }

    #[test]
    fn handshake_then_frames_flow() {
        let (mut a, sa, mut b, sb) = linked(Purpose::Data);
        assert!(a.is_up() && b.is_up());
        a.send(&sa, &Body::Heartbeat { applied: 5 }, 0);
        let (_, to_b) = exchange(&mut a, &sa, &mut b, &sb).unwrap();
        assert_eq!(to_b, vec![Body::Heartbeat { applied: 5 }]);
        let peer = b.up_peer().unwrap();
        assert_eq!(
            (peer.node, peer.purpose, peer.shard, peer.epoch),
            (1, Purpose::Data, 3, 99)
        );
        assert_eq!(a.up_peer().unwrap().node, 2);
    }

    #[test]
    fn a_wrong_secret_is_refused_both_ways() {
        let (sa, sb) = (settings(1, "right"), settings(2, "wrong"));
        let mut a = Link::connecting(1, &sa, Purpose::Control, 0, 1, [1; 16], 0);
        let mut b = Link::accepted(2, &sb, [2; 16], 0);
        let error = exchange(&mut a, &sa, &mut b, &sb).unwrap_err();
        assert!(
            error.contains("did not prove the cluster secret"),
            "{error}"
        );
        assert!(!a.is_up() && !b.is_up());
    }

    #[test]
    fn only_handshake_sized_frames_are_taken_before_authentication() {
        let sb = settings(2, "s");
        let big = Body::Raft {
            message: vec![7; HANDSHAKE_BODY_LEN_MAX + 1],
        };
        let mut frame_bytes = BytesMut::new();
        frame::encode(&big, sb.cluster_id(), usize::MAX, &mut frame_bytes).unwrap();
        // Before the handshake: refused from the header alone, with a reason for the peer.
        let mut stranger = Link::accepted(2, &sb, [2; 16], 0);
        let error = stranger
            .receive(&sb, &frame_bytes[..frame::HEADER_LEN], 0, &mut Vec::new())
            .unwrap_err();
        assert!(error.contains("above the limit"), "{error}");
        assert!(stranger.take_outgoing().is_some(), "a Refused is queued");
        // After it: up to the configured limit.
        let (mut a, sa, mut b, sb) = linked(Purpose::Control);
        a.send(&sa, &big, 0);
        let (_, to_b) = exchange(&mut a, &sa, &mut b, &sb).unwrap();
        assert_eq!(to_b, vec![big]);
    }

    #[test]
    fn a_link_that_does_not_authenticate_in_time_expires_however_it_trickles() {
        let sb = settings(2, "s");
        let mut b = Link::accepted(2, &sb, [2; 16], 1_000);
        let timeout_ms = 60_000;
        let mut hello = BytesMut::new();
        frame::encode(
            &Body::Hello(Hello {
                node: 1,
                role: Role::Core,
                purpose: Purpose::Control,
                member: settings(1, "s").member,
                nonce: [1; 16],
                shard: 0,
                epoch: 1,
            }),
            sb.cluster_id(),
            usize::MAX,
            &mut hello,
        )
        .unwrap();
        let mut now_ms = 1_000;
        for byte in hello.iter().take(20) {
            now_ms += 200;
            b.receive(&sb, &[*byte], now_ms, &mut Vec::new()).unwrap();
            if now_ms < 1_000 + HANDSHAKE_TIMEOUT_MS {
                assert_eq!(b.expired(now_ms, timeout_ms), None);
            }
        }
        assert_eq!(b.deadline_ms(timeout_ms), 1_000 + HANDSHAKE_TIMEOUT_MS);
        let reason = b.expired(1_000 + HANDSHAKE_TIMEOUT_MS, timeout_ms).unwrap();
        assert!(reason.contains("did not finish its handshake"), "{reason}");
        // Silence ends a link sooner if the link timeout is shorter.
        let fresh = Link::accepted(3, &sb, [3; 16], 1_000);
        assert_eq!(fresh.deadline_ms(100), 1_100);
        // Once up, only silence counts.
        let (_, _, b, _) = linked(Purpose::Control);
        assert_eq!(b.expired(HANDSHAKE_TIMEOUT_MS * 10, timeout_ms), None);
        let reason = b.expired(timeout_ms, timeout_ms).unwrap();
        assert!(reason.contains("silent"), "{reason}");
    }

    #[test]
    fn both_ends_learn_who_the_other_is() {
        let (a, sa, b, _) = linked(Purpose::Data);
        assert_eq!(
            a.up_peer(),
            Some(&Peer {
                node: 2,
                role: Role::Core,
                member: None,
                purpose: Purpose::Data,
                shard: 3,
                epoch: 99,
                remote_epoch: Some(2),
            })
        );
        assert_eq!(b.up_peer().unwrap().member, Some(sa.member.clone()));
    }

    #[test]
    fn a_refusal_on_an_up_link_ends_it_and_is_not_passed_up() {
        let (mut a, sa, mut b, sb) = linked(Purpose::Control);
        b.send(
            &sb,
            &Body::Refused {
                reason: "going".into(),
            },
            0,
        );
        let error = exchange(&mut a, &sa, &mut b, &sb).unwrap_err();
        assert!(error.contains("refused the link: \"going\""), "{error}");
    }

    #[test]
    fn frames_before_the_handshake_ends_are_refused() {
        let sb = settings(2, "s");
        let mut b = Link::accepted(2, &sb, [2; 16], 0);
        let mut bytes = BytesMut::new();
        frame::encode(&Body::Leave, sb.cluster_id(), usize::MAX, &mut bytes).unwrap();
        let error = b.receive(&sb, &bytes, 0, &mut Vec::new()).unwrap_err();
        assert!(error.contains("during the handshake"), "{error}");
    }

    /// The fixtures of `ingress::tls`'s tests: one authority, a node certificate for the name
    /// "testcluster", and a certificate from another authority.
    fn tls_settings(node: NodeId, secret: &str) -> LinkSettings {
        let tls = MutualTls::from_pem(
            include_bytes!("../../../net/src/ingress/testdata/node.pem"),
            include_bytes!("../../../net/src/ingress/testdata/node.key"),
            include_bytes!("../../../net/src/ingress/testdata/ca.pem"),
            "testcluster",
        )
        .unwrap();
        LinkSettings {
            cluster_name: "testcluster".into(),
            tls: Some(tls),
            ..settings(node, secret)
        }
    }

    #[test]
    fn under_tls_the_handshake_runs_inside_and_nothing_is_in_clear() {
        let (sa, sb) = (tls_settings(1, "s"), tls_settings(2, "s"));
        let mut a = Link::connecting(1, &sa, Purpose::Data, 3, 99, [1; 16], 0);
        let mut b = Link::accepted(2, &sb, [2; 16], 0);
        let mut wire = Vec::new();
        exchange_seen(&mut a, &sa, &mut b, &sb, &mut wire).unwrap();
        assert!(a.is_up() && b.is_up());
        assert_eq!(b.up_peer().unwrap().node, 1);
        let message = Body::Raft {
            message: b"topic/in/clear".to_vec(),
        };
        a.send(&sa, &message, 0);
        let (_, to_b) = exchange_seen(&mut a, &sa, &mut b, &sb, &mut wire).unwrap();
        assert_eq!(to_b, vec![message]);
        for clear in [&b"SMQC"[..], b"testcluster", b"topic/in/clear"] {
            assert!(
                !wire.windows(clear.len()).any(|w| w == clear),
                "{:?} on the wire",
                String::from_utf8_lossy(clear)
            );
        }
        // The secret is still proved inside TLS: the right certificate is not enough.
        let sc = tls_settings(3, "wrong");
        let mut c = Link::connecting(3, &sc, Purpose::Control, 0, 1, [3; 16], 0);
        let mut b = Link::accepted(4, &sb, [4; 16], 0);
        let error = exchange(&mut c, &sc, &mut b, &sb).unwrap_err();
        assert!(
            error.contains("did not prove the cluster secret"),
            "{error}"
        );
    }

    #[test]
    fn plain_and_tls_nodes_refuse_each_other_and_say_why() {
        let (plain, tls) = (settings(1, "s"), tls_settings(2, "s"));
        let plain = LinkSettings {
            cluster_name: "testcluster".into(),
            ..plain
        };
        // A plain node dials a TLS node: the TLS node sees frames in clear; the plain node
        // then sees the TLS alert.
        let mut a = Link::connecting(1, &plain, Purpose::Control, 0, 1, [1; 16], 0);
        let mut b = Link::accepted(2, &tls, [2; 16], 0);
        let hello = a.take_outgoing().unwrap();
        let error = b.receive(&tls, &hello, 0, &mut Vec::new()).unwrap_err();
        assert!(error.contains("plain cluster frames"), "{error}");
        let alert = b.take_outgoing().unwrap();
        let error = a.receive(&plain, &alert, 0, &mut Vec::new()).unwrap_err();
        assert!(error.contains("speaks TLS"), "{error}");
        // A TLS node dials a plain node: the other way round.
        let mut a = Link::connecting(2, &tls, Purpose::Control, 0, 1, [1; 16], 0);
        let mut b = Link::accepted(1, &plain, [2; 16], 0);
        let client_hello = a.take_outgoing().unwrap();
        let error = b
            .receive(&plain, &client_hello, 0, &mut Vec::new())
            .unwrap_err();
        assert!(error.contains("speaks TLS"), "{error}");
        let refused = b.take_outgoing().unwrap();
        let error = a.receive(&tls, &refused, 0, &mut Vec::new()).unwrap_err();
        assert!(error.contains("plain cluster frames"), "{error}");
    }

    #[test]
    fn a_tls_handshake_is_bounded_in_bytes_and_in_time() {
        let sb = tls_settings(2, "s");
        let mut b = Link::accepted(2, &sb, [2; 16], 1_000);
        // A record announcing a huge handshake message, fed in pieces below its own size.
        b.receive(&sb, &[0x16, 0x03, 0x01, 0x40, 0x00], 1_000, &mut Vec::new())
            .unwrap();
        let mut error = None;
        for _ in 0..TLS_HANDSHAKE_LEN_MAX / 1024 + 1 {
            if let Err(e) = b.receive(&sb, &[7; 1024], 1_100, &mut Vec::new()) {
                error = Some(e);
                break;
            }
        }
        let error = error.expect("cut at the limit");
        assert!(error.contains("before its handshake completed"), "{error}");
        // A TLS handshake that does not finish counts against the link's handshake time.
        let mut c = Link::accepted(3, &sb, [3; 16], 1_000);
        let client = tls_settings(1, "s");
        let mut a = Link::connecting(1, &client, Purpose::Control, 0, 1, [1; 16], 1_000);
        let client_hello = a.take_outgoing().unwrap();
        c.receive(&sb, &client_hello, 1_500, &mut Vec::new())
            .unwrap();
        assert_eq!(c.expired(1_000 + HANDSHAKE_TIMEOUT_MS - 1, 60_000), None);
        let reason = c.expired(1_000 + HANDSHAKE_TIMEOUT_MS, 60_000).unwrap();
        assert!(reason.contains("did not finish its handshake"), "{reason}");
    }
}
