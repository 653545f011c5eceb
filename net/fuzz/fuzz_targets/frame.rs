//! Fuzzes what a stranger on a cluster port reaches before it is authenticated: the frame
//! header check, body validation, and the handshake state machine of both sides.
//!
//! The first byte chooses how the rest is read:
//! - a raw byte stream, fed to a decoder in chunks (the header check and body validation);
//! - records of `kind, length, body` that the target wraps in frames with correct checksums,
//!   so that the fuzzer reaches body validation and the handshake without forging CRCs;
//! - the same, after a genuine `Hello` has moved the responder on to await a `Proof`;
//! - a `Hello` whose fields are taken from the bytes (a responder's first step with any
//!   identities, nonce and addresses), then records as above.
//!
//! Nothing may panic; every body the decoder accepts must encode to a frame that decodes to
//! the same body; and no handshake may finish, since finishing needs a proof made with the
//! cluster key, which the fuzzer does not have.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq_net::frame::handshake::{HANDSHAKE_BODY_LEN_MAX, Handshake, LinkKey, Local, Step};
use shardmq_net::frame::{
    self, Body, Decoder, HEADER_LEN, Hello, MAGIC, Member, NodeId, PROTOCOL_VERSION, Purpose, Role,
};

const CLUSTER: &str = "fuzz";

fn local(node: NodeId) -> Local {
    Local {
        key: LinkKey::derive("fuzz-secret-0123456789", CLUSTER),
        cluster_name: CLUSTER.into(),
        node,
        role: Role::Core,
        epoch: 1,
    }
}

fn hello(node: NodeId) -> Hello {
    Hello {
        node,
        role: Role::Core,
        purpose: Purpose::Control,
        member: Member {
            node,
            role: Role::Core,
            cluster_address: "127.0.0.1:7883".into(),
            mqtt_address: "127.0.0.1:1883".into(),
            epoch: 1,
        },
        nonce: [7; 16],
        shard: 0,
        epoch: 1,
    }
}

/// Both sides of a handshake, stepped with every frame a stranger sends.
struct Sides {
    responder: Option<Handshake>,
    initiator: Option<Handshake>,
    local: Local,
}

impl Sides {
    /// Both sides; the responder has first taken `first`, if given.
    fn new(first: Option<Hello>) -> Self {
        let local = local(1);
        let mut responder = Handshake::accept([3; 16]);
        if let Some(first) = first {
            let genuine = first.node != local.node
                && first.member.node == first.node
                && first.member.role == first.role;
            match responder.step(&local, PROTOCOL_VERSION, Body::Hello(first)) {
                Ok(Step::Continue(welcome @ Body::Welcome(_))) => round_trip(&welcome),
                Ok(step) => panic!("a Hello is answered with a Welcome, not {step:?}"),
                Err(error) => assert!(!genuine, "a well-formed Hello refused: {error}"),
            }
        }
        let (initiator, _) = Handshake::initiate(hello(1));
        Self {
            responder: Some(responder),
            initiator: Some(initiator),
            local,
        }
    }

    fn step(&mut self, version: u16, body: &Body) {
        for side in [&mut self.responder, &mut self.initiator] {
            let Some(handshake) = side else {
                continue;
            };
            match handshake.step(&self.local, version, body.clone()) {
                Ok(Step::Continue(reply)) => {
                    // What a node answers must be a frame it can encode and its peer decode.
                    round_trip(&reply);
                }
                Ok(Step::Done { .. }) => panic!("a stranger finished a handshake: {body:?}"),
                Err(error) => {
                    let _ = (error.to_string(), error.reason_for_peer());
                    *side = None;
                }
            }
        }
    }
}

fn round_trip(body: &Body) {
    let cluster = frame::cluster_id(CLUSTER);
    let mut bytes = BytesMut::new();
    frame::encode(body, cluster, usize::MAX, &mut bytes).expect("seed frames fit");
    let mut decoder = Decoder::new(cluster, bytes.len());
    decoder.extend(&bytes);
    let again = decoder.next_frame().expect("an encoded frame decodes");
    assert_eq!(again.as_ref(), Some(body));
}

/// Feeds `stream` to a decoder with the handshake limit, `chunk` bytes at a time, as a link
/// does before authentication; every frame steps both handshakes.
fn decode_stream(stream: &[u8], chunk: usize, sides: &mut Sides) {
    let mut decoder = Decoder::new(frame::cluster_id(CLUSTER), HANDSHAKE_BODY_LEN_MAX);
    for piece in stream.chunks(chunk.max(1)) {
        decoder.extend(piece);
        loop {
            match decoder.next_versioned() {
                Ok(Some((version, body))) => {
                    assert!(frame::version_compatible(version));
                    round_trip(&body);
                    sides.step(version, &body);
                }
                Ok(None) => break,
                Err(error) => {
                    let _ = error.to_string();
                    return;
                }
            }
        }
    }
}

/// A `Hello` made of the first bytes of `data` (missing bytes are zero), and the rest.
fn hello_from(data: &[u8]) -> (Hello, &[u8]) {
    let mut fixed = [0u8; 40];
    let used = data.len().min(fixed.len());
    fixed[..used].copy_from_slice(&data[..used]);
    let rest = &data[used..];
    let address_len = usize::from(fixed[39]).min(rest.len());
    let (address, rest) = rest.split_at(address_len);
    let word =
        |at: usize| u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]]);
    let role = |bit: u8| {
        if fixed[38] & bit == 0 {
            Role::Core
        } else {
            Role::Edge
        }
    };
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&fixed[8..24]);
    let hello = Hello {
        node: word(0),
        role: role(1),
        purpose: if fixed[38] & 2 == 0 {
            Purpose::Control
        } else {
            Purpose::Data
        },
        member: Member {
            node: word(4),
            role: role(4),
            cluster_address: String::from_utf8_lossy(address).into_owned(),
            mqtt_address: String::new(),
            epoch: u64::from(word(28)),
        },
        nonce,
        shard: u16::from_le_bytes([fixed[24], fixed[25]]),
        epoch: u64::from(word(32)),
    };
    (hello, rest)
}

/// Wraps `kind, length (u16), body` records in frames with correct checksums.
fn frames_of(mut records: &[u8]) -> Vec<u8> {
    let cluster = frame::cluster_id(CLUSTER);
    let mut stream = Vec::new();
    while let [kind, l0, l1, rest @ ..] = records {
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(rest.len());
        let (body, next) = rest.split_at(len);
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header[6] = *kind;
        header[8..16].copy_from_slice(&cluster.to_le_bytes());
        header[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        header[20..24].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
        let crc = crc32fast::hash(&header[0..24]);
        header[24..28].copy_from_slice(&crc.to_le_bytes());
        stream.extend_from_slice(&header);
        stream.extend_from_slice(body);
        records = next;
    }
    stream
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(selector >> 2) + 1;
    match selector % 4 {
        0 => decode_stream(rest, chunk, &mut Sides::new(None)),
        1 => decode_stream(&frames_of(rest), chunk, &mut Sides::new(None)),
        2 => decode_stream(&frames_of(rest), chunk, &mut Sides::new(Some(hello(2)))),
        _ => {
            let (first, rest) = hello_from(rest);
            decode_stream(&frames_of(rest), chunk, &mut Sides::new(Some(first)));
        }
    }
});
