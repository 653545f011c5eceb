//! One cluster link: a TCP connection between two nodes, as a state machine over bytes.
//!
//! Owns: the handshake (Hello, Welcome, Proof; each side proves the cluster secret against the
//! other's nonce), framing both ways, and the time of the last frame each way.
//! Never: lets a frame through before the peer has proved the secret, or panics on a peer's
//! bytes: every failure is an `Err` naming why, and the caller closes the link.

use bytes::{Bytes, BytesMut};
use shardmq_net::frame::{self, Body, Decoder, Member, NodeId, Purpose, Role};

use crate::message::ConnectionId;

/// What every link of a node needs to know.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub member: Member,
    pub cluster_name: String,
    pub cluster_secret: String,
    pub body_len_max: usize,
    /// This node's start, told to nodes that dial it (new at every start).
    pub epoch: u64,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// We connected and sent Hello; the peer's Welcome is due.
    AwaitWelcome,
    /// We accepted; the peer's Hello is due.
    AwaitHello,
    /// We accepted and sent Welcome; the peer's Proof is due.
    AwaitProof,
    Up,
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

#[derive(Debug)]
pub struct Link {
    pub connection: ConnectionId,
    state: State,
    nonce: [u8; 16],
    decoder: Decoder,
    pub peer: Option<Peer>,
    outgoing: BytesMut,
    pub last_received_ms: u64,
    pub last_sent_ms: u64,
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
        let mut link = Self::new(connection, settings, State::AwaitWelcome, nonce, now_ms);
        link.send(
            settings,
            &Body::Hello {
                node: settings.node(),
                role: settings.role(),
                purpose,
                member: settings.member.clone(),
                nonce,
                shard,
                epoch,
            },
            now_ms,
        );
        link.peer = Some(Peer {
            node: 0,
            role: Role::Core,
            member: None,
            purpose,
            shard,
            epoch,
            remote_epoch: None,
        });
        link
    }

    /// A link a peer opened to us.
    pub fn accepted(
        connection: ConnectionId,
        settings: &LinkSettings,
        nonce: [u8; 16],
        now_ms: u64,
    ) -> Self {
        Self::new(connection, settings, State::AwaitHello, nonce, now_ms)
    }

    fn new(
        connection: ConnectionId,
        settings: &LinkSettings,
        state: State,
        nonce: [u8; 16],
        now_ms: u64,
    ) -> Self {
        Self {
            connection,
            state,
            nonce,
            decoder: Decoder::new(settings.cluster_id(), settings.body_len_max),
            peer: None,
            outgoing: BytesMut::new(),
            last_received_ms: now_ms,
            last_sent_ms: now_ms,
        }
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// The peer, once the handshake has finished.
    pub fn up_peer(&self) -> Option<&Peer> {
        self.peer.as_ref().filter(|_| self.is_up())
    }

    pub fn send(&mut self, settings: &LinkSettings, body: &Body, now_ms: u64) {
        frame::encode(body, settings.cluster_id(), &mut self.outgoing);
        self.last_sent_ms = now_ms;
    }

    /// Everything framed since the last call.
    pub fn take_outgoing(&mut self) -> Option<Bytes> {
        (!self.outgoing.is_empty()).then(|| self.outgoing.split().freeze())
    }

    /// Checks the peer's proof that it knows the secret, against our nonce. A wrong one is
    /// answered with `Refused`, so that both sides' logs show it.
    fn check_proof(
        &mut self,
        settings: &LinkSettings,
        node: NodeId,
        proof: &[u8; 32],
        now_ms: u64,
    ) -> Result<(), String> {
        if frame::proof_valid(
            &settings.cluster_secret,
            &settings.cluster_name,
            &self.nonce,
            node,
            proof,
        ) {
            return Ok(());
        }
        self.send(
            settings,
            &Body::Refused {
                reason: "wrong cluster secret".into(),
            },
            now_ms,
        );
        Err(format!(
            "node {node} did not prove the cluster secret (a wrong secret?)"
        ))
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
        self.decoder.extend(bytes);
        loop {
            let body = match self.decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(()),
                Err(error) => {
                    // Tell the peer why, where it can still read us (same cluster framing).
                    if !matches!(error, frame::FrameError::Cluster(_)) {
                        self.send(
                            settings,
                            &Body::Refused {
                                reason: error.to_string(),
                            },
                            now_ms,
                        );
                    }
                    return Err(error.to_string());
                }
            };
            match (self.state, body) {
                (_, Body::Refused { reason }) => {
                    return Err(format!("the peer refused the link: {reason}"));
                }
                (
                    State::AwaitHello,
                    Body::Hello {
                        node,
                        role,
                        purpose,
                        member,
                        nonce,
                        shard,
                        epoch,
                    },
                ) => {
                    if node == settings.node() {
                        return Err(format!("the peer claims our own node identifier {node}"));
                    }
                    let proof = frame::proof(
                        &settings.cluster_secret,
                        &settings.cluster_name,
                        &nonce,
                        settings.node(),
                    );
                    self.peer = Some(Peer {
                        node,
                        role,
                        member: Some(member),
                        purpose,
                        shard,
                        epoch,
                        remote_epoch: None,
                    });
                    self.send(
                        settings,
                        &Body::Welcome {
                            node: settings.node(),
                            role: settings.role(),
                            proof,
                            nonce: self.nonce,
                            epoch: settings.epoch,
                        },
                        now_ms,
                    );
                    self.state = State::AwaitProof;
                }
                (
                    State::AwaitWelcome,
                    Body::Welcome {
                        node,
                        role,
                        proof,
                        nonce,
                        epoch,
                    },
                ) => {
                    self.check_proof(settings, node, &proof, now_ms)?;
                    let answer = frame::proof(
                        &settings.cluster_secret,
                        &settings.cluster_name,
                        &nonce,
                        settings.node(),
                    );
                    self.send(settings, &Body::Proof { proof: answer }, now_ms);
                    let peer = self.peer.as_mut().expect("set when connecting");
                    peer.node = node;
                    peer.role = role;
                    peer.remote_epoch = Some(epoch);
                    self.state = State::Up;
                }
                (State::AwaitProof, Body::Proof { proof }) => {
                    let node = self.peer.as_ref().expect("set by Hello").node;
                    self.check_proof(settings, node, &proof, now_ms)?;
                    self.state = State::Up;
                }
                (State::Up, body) => bodies.push(body),
                (state, body) => {
                    return Err(format!(
                        "unexpected frame kind {} during the handshake ({state:?})",
                        body.kind()
                    ));
                }
            }
        }
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
        let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
        loop {
            let mut moved = false;
            if let Some(bytes) = a.take_outgoing() {
                b.receive(sb, &bytes, 0, &mut to_b)?;
                moved = true;
            }
            if let Some(bytes) = b.take_outgoing() {
                a.receive(sa, &bytes, 0, &mut to_a)?;
                moved = true;
            }
            if !moved {
                return Ok((to_a, to_b));
            }
        }
    }

    #[test]
    fn handshake_then_frames_flow() {
        let (sa, sb) = (settings(1, "s"), settings(2, "s"));
        let mut a = Link::connecting(1, &sa, Purpose::Data, 3, 99, [1; 16], 0);
        let mut b = Link::accepted(2, &sb, [2; 16], 0);
        exchange(&mut a, &sa, &mut b, &sb).unwrap();
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
    fn frames_before_the_handshake_ends_are_refused() {
        let sb = settings(2, "s");
        let mut b = Link::accepted(2, &sb, [2; 16], 0);
        let mut bytes = BytesMut::new();
        frame::encode(&Body::Leave, sb.cluster_id(), &mut bytes);
        let error = b.receive(&sb, &bytes, 0, &mut Vec::new()).unwrap_err();
        assert!(error.contains("during the handshake"), "{error}");
    }
}
