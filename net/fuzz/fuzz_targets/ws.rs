//! Fuzzes the WebSocket layer of a client listener: the opening handshake and the frame
//! reader, through a stack with only that layer.
//!
//! The first byte chooses the chunk size and whether a genuine handshake request goes first
//! (so that most inputs reach the frame reader). Nothing may panic; the layer holds at most
//! the handshake bound before the upgrade and at most a frame header and a control frame's
//! 125 bytes after it; the MQTT bytes out never outnumber the bytes in; every byte the
//! server writes after the upgrade is a well-formed unmasked frame.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq_net::ingress::stack::{IngressStack, StackConfig};
use shardmq_net::ingress::ws::{WS_HANDSHAKE_LEN_MAX, WsListener};

const REQUEST: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

/// Checks that `out` is a sequence of whole unmasked frames (server to client).
fn frames_well_formed(mut out: &[u8]) {
    while !out.is_empty() {
        assert!(out.len() >= 2);
        assert_eq!(out[1] & 0x80, 0, "server frames are unmasked");
        let (len, head) = match out[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([out[2], out[3]])), 4),
            127 => (usize::try_from(u64::from_be_bytes(out[2..10].try_into().unwrap())).unwrap(), 10),
            n => (usize::from(n), 2),
        };
        assert!(out.len() >= head + len, "a whole frame");
        out = &out[head + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let config = StackConfig {
        proxy: None,
        tls: None,
        ws: Some(WsListener {
            path: "/mqtt".into(),
            // One listed origin, so that both the served and the refused Origin are reached.
            allowed_origins: vec!["https://app.example".to_string()].into(),
        }),
    };
    let mut stack = IngressStack::new(&config, None).unwrap();
    let mut stream = Vec::new();
    if selector & 0x80 != 0 {
        stream.extend_from_slice(REQUEST);
    }
    stream.extend_from_slice(input);
    let chunk = usize::from(selector & 0x3f) + 1;
    let mut app = BytesMut::new();
    let mut upgraded = false;
    for piece in stream.chunks(chunk) {
        let result = stack.receive(piece, &mut app);
        let out = stack.take_wire().unwrap_or_default();
        if upgraded {
            frames_well_formed(&out);
        } else if stack.is_established() {
            upgraded = true;
            let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a 101 answer") + 4;
            assert!(out.starts_with(b"HTTP/1.1 101 "));
            frames_well_formed(&out[end..]);
        }
        assert!(app.len() <= stream.len());
        if result.is_err() {
            return;
        }
        let held = stack.buffered_len();
        assert!(if upgraded { held <= 14 + 125 } else { held <= WS_HANDSHAKE_LEN_MAX });
    }
    if upgraded {
        let mut framed = BytesMut::new();
        stack.send(&app).unwrap();
        framed.extend_from_slice(&stack.take_wire().unwrap_or_default());
        frames_well_formed(&framed);
    }
});
