//! Decoding: the [`Decoder`] that splits a link's byte stream into checked frames, and the
//! validation of one body against its header.
//!
//! The body is validated by rkyv's bytecheck once, where it enters ([`Decoder::next_frame`]),
//! and deserialized into the owned types of `body.rs`. A receive buffer is not aligned for
//! rkyv, so the body is first copied into an aligned buffer; bodies are small next to the work
//! they cause.

use bytes::{Buf, BytesMut};
use rkyv::rancor;
use rkyv::util::AlignedVec;

use super::{Body, FrameError, HEADER_LEN, Header, MAGIC};

/// Splits a link's byte stream into checked frames.
///
/// Memory: the buffer holds at most one frame whose header has been checked (at most
/// `body_len_max` of body) plus the bytes of the last [`Decoder::extend`]; a header announcing a
/// longer body is refused before any of that body is kept.
#[derive(Debug)]
pub struct Decoder {
    cluster: u64,
    body_len_max: usize,
    buffer: BytesMut,
    /// The peer's protocol version, from its last frame.
    pub peer_version: Option<u16>,
}

impl Decoder {
    pub fn new(cluster: u64, body_len_max: usize) -> Self {
        Self {
            cluster,
            body_len_max,
            buffer: BytesMut::new(),
            peer_version: None,
        }
    }

    /// Changes the largest body accepted from the next frame on: a link takes only
    /// handshake-sized frames until its peer is authenticated
    /// ([`HANDSHAKE_BODY_LEN_MAX`](super::handshake::HANDSHAKE_BODY_LEN_MAX)), then up to the
    /// configured limit.
    pub fn set_body_len_max(&mut self, body_len_max: usize) {
        self.body_len_max = body_len_max;
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. After an error the link
    /// must be closed: the stream has lost its framing.
    pub fn next_frame(&mut self) -> Result<Option<Body>, FrameError> {
        Ok(self.next_versioned()?.map(|(_, body)| body))
    }

    /// [`Decoder::next_frame`], with the protocol version of the frame's header.
    pub fn next_versioned(&mut self) -> Result<Option<(u16, Body)>, FrameError> {
        let Some(header) = self.buffer.get(..HEADER_LEN) else {
            // A wrong magic is refused as soon as it can be seen, so that a stranger (an MQTT
            // client on the wrong port) is told at once.
            let seen = self.buffer.len().min(MAGIC.len());
            if self.buffer.get(..seen) != MAGIC.get(..seen) {
                return Err(FrameError::BadMagic);
            }
            return Ok(None);
        };
        let header: &[u8; HEADER_LEN] = header.try_into().expect("HEADER_LEN bytes");
        let header = Header::check(header, self.cluster, self.body_len_max)?;
        let Some(frame_len) = HEADER_LEN.checked_add(header.body_len) else {
            return Err(FrameError::TooLong(header.body_len));
        };
        if self.buffer.len() < frame_len {
            return Ok(None);
        }
        self.peer_version = Some(header.version);
        self.buffer.advance(HEADER_LEN);
        let raw = self.buffer.split_to(header.body_len);
        let body = decode_body(&raw, header.kind, header.body_crc)?;
        Ok(Some((header.version, body)))
    }
}

/// Checks a frame body against its header's checksum and kind, and validates it.
pub fn decode_body(raw: &[u8], kind: u8, body_crc: u32) -> Result<Body, FrameError> {
    if crc32fast::hash(raw) != body_crc {
        return Err(FrameError::BodyChecksum);
    }
    let mut aligned = AlignedVec::<16>::with_capacity(raw.len());
    aligned.extend_from_slice(raw);
    let body = rkyv::from_bytes::<Body, rancor::Error>(&aligned)
        .map_err(|e| FrameError::Body(e.to_string()))?;
    if body.kind() != kind {
        return Err(FrameError::Body(format!(
            "header says kind {kind}, body is kind {}",
            body.kind()
        )));
    }
    Ok(body)
}
