//! MQTT over WebSocket (RFC 6455; MQTT 5.0 §6), server side, sans-IO: the opening handshake
//! read with `httparse` and answered with tungstenite's `derive_accept_key`, then frames read
//! with tungstenite's `FrameHeader::parse` and written with `FrameHeader::format`.
//!
//! Owns: one connection's WebSocket state: the handshake's request bytes until it completes,
//! then the frame being read (header bytes so far, what is left of its payload, its mask),
//! whether a fragmented binary message is open, and a control frame's payload (at most 125
//! bytes).
//! Never: holds a data frame's payload. MQTT over WebSocket is one byte stream carried in
//! binary frames, whatever the frames' and messages' boundaries (MQTT 5.0 §6.0.0), so each
//! payload byte is unmasked straight into the MQTT bytes for the shard, which bounds packets
//! by its maximum packet size; a frame or message of any length costs this layer nothing.
//! Invariants:
//! - The handshake buffer holds at most [`WS_HANDSHAKE_LEN_MAX`] bytes and is freed when the
//!   handshake completes; an open, idle session holds no heap buffer (`control` is empty and
//!   unallocated between control frames).
//! - Once a close frame has been sent (ours or the echo of the client's), nothing more is
//!   written but the transport's end, and nothing more is read.
//! - Every refusal writes its answer (an HTTP status before the upgrade, a close frame with
//!   the RFC's code after it) before the error is returned.

use std::io::Cursor;
use std::sync::Arc;

use bytes::BytesMut;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

/// The most bytes a client's opening handshake (request line and headers) may take. Browsers
/// and MQTT libraries send a few hundred; cookies can add some, 8 KiB is what common HTTP
/// servers allow.
pub const WS_HANDSHAKE_LEN_MAX: usize = 8 * 1024;

/// The most header fields the handshake request may have.
const HANDSHAKE_HEADERS_MAX: usize = 32;

/// The subprotocol MQTT over WebSocket uses (MQTT 5.0 §6, [MQTT-6.0.0-3]; 3.1.1 §6 too).
const SUBPROTOCOL: &str = "mqtt";

/// Control frames carry at most 125 bytes (RFC 6455 §5.5).
const CONTROL_PAYLOAD_LEN_MAX: u64 = 125;

/// The most bytes of a refused `Origin` kept for the log line.
const ORIGIN_LOGGED_LEN_MAX: usize = 128;

/// The `ws_allowed_origins` entry that allows every origin.
pub const ANY_ORIGIN: &str = "*";

/// A WebSocket listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsListener {
    /// The request path MQTT is served at (`path`, default `/mqtt`); a query string is
    /// ignored.
    pub path: String,
    /// The browser origins (`ws_allowed_origins`: `scheme://host[:port]`, compared ASCII
    /// case-insensitively; [`ANY_ORIGIN`] allows any) whose pages may open the WebSocket.
    /// Empty (the default) checks nothing, as Mosquitto and EMQX do by default: Eclipse
    /// Paho's Python client sends an `Origin` of its own, so a check on by default would
    /// refuse it. A request without an `Origin` header (not from a browser) is served
    /// whatever this holds.
    pub allowed_origins: Arc<[String]>,
}

impl WsListener {
    /// Whether a request's `Origin` value may open the WebSocket.
    fn allows_origin(&self, origin: &[u8]) -> bool {
        let origin = origin.trim_ascii();
        self.allowed_origins.is_empty()
            || self.allowed_origins.iter().any(|allowed| {
                allowed == ANY_ORIGIN || allowed.as_bytes().eq_ignore_ascii_case(origin)
            })
    }
}

/// Why a WebSocket connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// The opening handshake was refused with this HTTP status.
    Handshake { status: u16, reason: String },
    /// The request came from a web page whose origin `ws_allowed_origins` does not list; it
    /// was answered 403. `origin` is the header's value, escaped and cut to
    /// [`ORIGIN_LOGGED_LEN_MAX`] bytes.
    ForeignOrigin { origin: String },
    /// A frame broke the protocol, or was not MQTT's; a close frame with this code was sent.
    Protocol { code: u16, reason: String },
    /// The client closed the WebSocket (the close was answered).
    Closed { code: Option<u16> },
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::Handshake { status, reason } => {
                write!(f, "WebSocket handshake refused ({status}): {reason}")
            }
            WsError::ForeignOrigin { origin } => write!(
                f,
                "WebSocket handshake refused (403): Origin {origin} is not in the listener's ws_allowed_origins"
            ),
            WsError::Protocol { code, reason } => {
                write!(f, "WebSocket closed with {code}: {reason}")
            }
            WsError::Closed { code: Some(code) } => {
                write!(f, "WebSocket closed by the client ({code})")
            }
            WsError::Closed { code: None } => write!(f, "WebSocket closed by the client"),
        }
    }
}

impl std::error::Error for WsError {}

/// One connection's WebSocket layer.
#[derive(Debug)]
pub struct WsSession {
    state: State,
    /// The client side's mask generator seed (0 on the server side).
    client_seed: u64,
}

#[derive(Debug)]
enum State {
    /// Reading the opening handshake: the request's bytes so far.
    Handshake {
        listener: WsListener,
        request: Vec<u8>,
    },
    /// A client (the load generator's) waiting for the server's answer: the answer's bytes so
    /// far, the `Sec-WebSocket-Accept` it must carry, and the MQTT bytes written meanwhile
    /// (sent once the server has answered, RFC 6455 §4.1).
    ClientHandshake {
        response: Vec<u8>,
        accept: String,
        pending: BytesMut,
    },
    Open(Framing),
    /// A close frame was sent: nothing more in or out.
    Closed,
}

/// The frame reader's state between reads.
#[derive(Debug, Default)]
struct Framing {
    /// A frame header's bytes received so far (a header takes at most 14).
    header: [u8; 14],
    header_len: usize,
    /// The frame whose payload is being read.
    frame: Option<Frame>,
    /// A binary message's final frame has not come yet: the next data frame must be a
    /// continuation.
    in_message: bool,
    /// The payload of the control frame being read (unmasked); empty and unallocated
    /// otherwise.
    control: BytesMut,
    /// None on the server side (frames in are masked, frames out are not); on the client
    /// side, the state of the generator of the masks its frames go out with.
    client_masks: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    remaining: u64,
    mask: [u8; 4],
    /// How many payload bytes were unmasked so far, modulo 4.
    mask_offset: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Ping,
    Pong,
    Close,
}

impl WsSession {
    pub fn new(listener: &WsListener) -> Self {
        Self {
            state: State::Handshake {
                listener: listener.clone(),
                request: Vec::new(),
            },
            client_seed: 0,
        }
    }

    /// The client side, for the load generator: writes the opening handshake for `path` on
    /// `host` into `out`. Its frames are masked with a generator seeded from the random key
    /// (unpredictable enough for a load generator; a browser-facing client would draw every
    /// mask from a cryptographic generator).
    pub fn client(path: &str, host: &str, out: &mut BytesMut) -> Self {
        let key = tungstenite::handshake::client::generate_key();
        out.extend_from_slice(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            )
            .as_bytes(),
        );
        let seed = key.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self {
            state: State::ClientHandshake {
                response: Vec::new(),
                accept: derive_accept_key(key.as_bytes()),
                pending: BytesMut::new(),
            },
            client_seed: seed | 1,
        }
    }

    /// Whether the opening handshake has completed and the session is not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Whether the handshake is still being read.
    pub fn is_handshaking(&self) -> bool {
        matches!(
            self.state,
            State::Handshake { .. } | State::ClientHandshake { .. }
        )
    }

    /// Bytes held (for memory accounting and the tests).
    pub fn buffered_len(&self) -> usize {
        match &self.state {
            State::Handshake { request, .. } => request.len(),
            State::ClientHandshake {
                response, pending, ..
            } => response.len() + pending.len(),
            State::Open(framing) => framing.header_len + framing.control.len(),
            State::Closed => 0,
        }
    }

    /// Bytes from the peer: MQTT bytes to `app`, answers (the 101, pongs, a close) to
    /// `out`. An error has written its answer to `out` already.
    pub fn read(
        &mut self,
        input: &[u8],
        app: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), WsError> {
        let result = match &mut self.state {
            State::Handshake { listener, request } => {
                match handshake(listener, request, input, out) {
                    Ok(Some(rest)) => {
                        let mut framing = Framing::default();
                        let result = framing.read(&rest, app, out);
                        self.state = State::Open(framing);
                        result
                    }
                    Ok(None) => Ok(()),
                    Err(error) => Err(error),
                }
            }
            State::ClientHandshake {
                response,
                accept,
                pending,
            } => match client_handshake(response, accept, input) {
                Ok(Some(rest)) => {
                    let mut framing = Framing {
                        client_masks: Some(self.client_seed),
                        ..Framing::default()
                    };
                    let pending = std::mem::take(pending);
                    framing.write(OpCode::Data(Data::Binary), &pending, out);
                    let result = framing.read(&rest, app, out);
                    self.state = State::Open(framing);
                    result
                }
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            },
            State::Open(framing) => framing.read(input, app, out),
            State::Closed => Ok(()),
        };
        if result.is_err() {
            self.state = State::Closed;
        }
        result
    }

    /// MQTT bytes for the peer, as one binary frame, into `out`; nothing once closed. On the
    /// client side, bytes written before the server answered wait for its answer.
    pub fn write(&mut self, app: &[u8], out: &mut BytesMut) {
        match &mut self.state {
            State::Open(framing) => framing.write(OpCode::Data(Data::Binary), app, out),
            State::ClientHandshake { pending, .. } => pending.extend_from_slice(app),
            State::Handshake { .. } | State::Closed => {}
        }
    }

    /// Ends the session from this side: a close frame (1000) into `out`, once.
    pub fn close(&mut self, out: &mut BytesMut) {
        if let State::Open(framing) = &mut self.state {
            framing.write_close(CloseCode::Normal, out);
        }
        self.state = State::Closed;
    }
}

/// Reads the server's answer to a client's handshake; on a 101 with the right accept key,
/// the bytes after it.
fn client_handshake(
    response: &mut Vec<u8>,
    accept: &str,
    input: &[u8],
) -> Result<Option<Vec<u8>>, WsError> {
    let refused = |reason: String| WsError::Handshake { status: 0, reason };
    let room = WS_HANDSHAKE_LEN_MAX.saturating_sub(response.len());
    if input.len() > room {
        return Err(refused("the server's handshake answer is too long".into()));
    }
    response.extend_from_slice(input);
    let mut headers = [httparse::EMPTY_HEADER; HANDSHAKE_HEADERS_MAX];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(refused(format!("not an HTTP answer: {error}"))),
    };
    if parsed.code != Some(101) {
        return Err(refused(format!(
            "the server answered {} instead of 101",
            parsed.code.unwrap_or_default()
        )));
    }
    let accepted = parsed.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("sec-websocket-accept")
            && h.value.trim_ascii() == accept.as_bytes()
    });
    if !accepted {
        return Err(refused("the server's Sec-WebSocket-Accept is wrong".into()));
    }
    let rest = response.get(len..).unwrap_or_default().to_vec();
    *response = Vec::new();
    Ok(Some(rest))
}

/// A final frame into `out`, masked with `mask` (a client's) or not (a server's, RFC 6455
/// §5.1).
fn write_frame(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>, out: &mut BytesMut) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask,
    };
    let length = payload.len() as u64;
    let mut head = Vec::with_capacity(header.len(length));
    // Writing into a Vec cannot fail.
    if header.format(length, &mut head).is_ok() {
        out.extend_from_slice(&head);
        let start = out.len();
        out.extend_from_slice(payload);
        if let (Some(mask), Some(body)) = (mask, out.get_mut(start..)) {
            for (index, byte) in body.iter_mut().enumerate() {
                *byte ^= mask[index % 4];
            }
        }
    }
}

/// Refuses the handshake with `status` (the answer written to `out`).
fn refuse(status: u16, reason: &str, out: &mut BytesMut, extra: &str) -> WsError {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {text}\r\n{extra}Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    );
    WsError::Handshake {
        status,
        reason: reason.to_string(),
    }
}

/// Whether a comma-separated header value lists `token` (ASCII case-insensitive).
fn lists_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Reads the opening handshake; on success the 101 answer is in `out` and the bytes after
/// the request are returned.
fn handshake(
    listener: &WsListener,
    request: &mut Vec<u8>,
    input: &[u8],
    out: &mut BytesMut,
) -> Result<Option<Vec<u8>>, WsError> {
    let room = WS_HANDSHAKE_LEN_MAX.saturating_sub(request.len());
    request.extend_from_slice(&input[..input.len().min(room)]);
    let mut headers = [httparse::EMPTY_HEADER; HANDSHAKE_HEADERS_MAX];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(request) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial)
            if input.len() <= room && request.len() < WS_HANDSHAKE_LEN_MAX =>
        {
            return Ok(None);
        }
        Ok(httparse::Status::Partial) => {
            return Err(refuse(431, "the handshake request is too long", out, ""));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "too many header fields", out, ""));
        }
        Err(error) => {
            return Err(refuse(
                400,
                &format!("not an HTTP request: {error}"),
                out,
                "",
            ));
        }
    };
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return Err(refuse(
            405,
            "the handshake must be an HTTP/1.1 GET",
            out,
            "Allow: GET\r\n",
        ));
    }
    let target = parsed.path.unwrap_or_default();
    let asked = target.split_once('?').map_or(target, |(path, _)| path);
    if asked != listener.path {
        return Err(refuse(404, &format!("no WebSocket at {asked:?}"), out, ""));
    }
    let header = |name: &'static str| {
        parsed
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if !header("upgrade").any(|v| lists_token(v, "websocket"))
        || !header("connection").any(|v| lists_token(v, "upgrade"))
    {
        return Err(refuse(
            400,
            "not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)",
            out,
            "",
        ));
    }
    // A browser names the page's origin (RFC 6455 §4.1, RFC 6454 §7); any web page can ask a
    // visitor's browser to connect, with the visitor's client certificate on "wss", so only
    // listed origins are served. Clients that are not browsers send no Origin.
    if let Some(value) = header("origin").find(|origin| !listener.allows_origin(origin)) {
        let shown = value.get(..ORIGIN_LOGGED_LEN_MAX).unwrap_or(value);
        let mut origin = format!("{:?}", String::from_utf8_lossy(shown));
        if shown.len() < value.len() {
            origin.push_str("...");
        }
        refuse(403, "", out, "");
        return Err(WsError::ForeignOrigin { origin });
    }
    if !header("sec-websocket-version").any(|v| v.trim_ascii() == b"13") {
        return Err(refuse(
            426,
            "only WebSocket version 13 is spoken",
            out,
            "Sec-WebSocket-Version: 13\r\n",
        ));
    }
    let Some(key) = header("sec-websocket-key")
        .map(|key| key.trim_ascii())
        .find(|key| key.len() == 24)
    else {
        return Err(refuse(400, "no valid Sec-WebSocket-Key", out, ""));
    };
    let accept = derive_accept_key(key);
    // A client that offers subprotocols must offer MQTT's (MQTT 5.0 §6); one that offers
    // none is served without naming one.
    let mut offered = header("sec-websocket-protocol").peekable();
    let answer_protocol = if offered.peek().is_some() {
        if !offered.any(|v| {
            v.split(|&b| b == b',')
                .any(|p| p.trim_ascii() == SUBPROTOCOL.as_bytes())
        }) {
            return Err(refuse(
                400,
                "the client offers WebSocket subprotocols but not \"mqtt\"",
                out,
                "",
            ));
        }
        true
    } else {
        false
    };
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    if answer_protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: mqtt");
    }
    out.extend_from_slice(b"\r\n\r\n");
    // What came after the request: the request buffer's tail, then whatever of `input`
    // did not fit the buffer.
    let mut rest = request.get(len..).unwrap_or_default().to_vec();
    let taken = input.len().min(room);
    rest.extend_from_slice(input.get(taken..).unwrap_or_default());
    *request = Vec::new();
    Ok(Some(rest))
}

impl Framing {
    /// The next frame's mask: None on the server side, from the xorshift generator on the
    /// client side.
    fn next_mask(&mut self) -> Option<[u8; 4]> {
        let state = self.client_masks.as_mut()?;
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        Some((*state as u32).to_be_bytes())
    }

    fn write(&mut self, opcode: OpCode, payload: &[u8], out: &mut BytesMut) {
        if opcode == OpCode::Data(Data::Binary) && payload.is_empty() {
            return;
        }
        let mask = self.next_mask();
        write_frame(opcode, payload, mask, out);
    }

    fn write_close(&mut self, code: CloseCode, out: &mut BytesMut) {
        self.write(
            OpCode::Control(Control::Close),
            &u16::from(code).to_be_bytes(),
            out,
        );
    }

    /// Refuses a frame: a close frame with `code` to `out`.
    fn protocol_error(&mut self, code: CloseCode, reason: &str, out: &mut BytesMut) -> WsError {
        self.write_close(code, out);
        WsError::Protocol {
            code: code.into(),
            reason: reason.to_string(),
        }
    }

    fn read(
        &mut self,
        mut input: &[u8],
        app: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), WsError> {
        loop {
            let Some(mut frame) = self.frame else {
                if input.is_empty() {
                    return Ok(());
                }
                input = self.read_header(input, out)?;
                continue;
            };
            let take = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(input.len());
            let (payload, rest) = input.split_at(take);
            input = rest;
            // A control frame's length was checked at its header (at most 125 bytes).
            let target = if frame.kind == Kind::Data {
                &mut *app
            } else {
                &mut self.control
            };
            let start = target.len();
            target.extend_from_slice(payload);
            if let Some(unmasked) = target.get_mut(start..) {
                for (index, byte) in unmasked.iter_mut().enumerate() {
                    *byte ^= frame.mask[(frame.mask_offset + index) % 4];
                }
            }
            frame.mask_offset = (frame.mask_offset + take) % 4;
            frame.remaining = frame.remaining.saturating_sub(take as u64);
            if frame.remaining > 0 {
                self.frame = Some(frame);
                return Ok(());
            }
            self.frame = None;
            self.finish(frame.kind, out)?;
        }
    }

    /// Reads (part of) a frame header from `input`; returns what follows it.
    fn read_header<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut BytesMut,
    ) -> Result<&'a [u8], WsError> {
        let before = self.header_len;
        let take = (self.header.len() - before).min(input.len());
        self.header[before..before + take].copy_from_slice(&input[..take]);
        let mut cursor = Cursor::new(&self.header[..before + take]);
        let parsed = match FrameHeader::parse(&mut cursor) {
            Ok(parsed) => parsed,
            Err(error) => {
                let reason = error.to_string();
                return Err(self.protocol_error(CloseCode::Protocol, &reason, out));
            }
        };
        let Some((header, length)) = parsed else {
            // A header is at most 14 bytes, so this waits only while fewer have come; were
            // 14 ever not enough, the reader would stop here rather than spin.
            if before + take == self.header.len() {
                return Err(self.protocol_error(
                    CloseCode::Protocol,
                    "a frame header past 14 bytes",
                    out,
                ));
            }
            self.header_len = before + take;
            return Ok(&input[take..]);
        };
        let used = usize::try_from(cursor.position())
            .unwrap_or(usize::MAX)
            .saturating_sub(before)
            .min(input.len());
        self.header_len = 0;
        self.start_frame(&header, length, out)?;
        Ok(&input[used..])
    }

    /// Checks a frame's header against RFC 6455 and MQTT's use of it, and starts reading it.
    fn start_frame(
        &mut self,
        header: &FrameHeader,
        length: u64,
        out: &mut BytesMut,
    ) -> Result<(), WsError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(self.protocol_error(
                CloseCode::Protocol,
                "reserved bits set (no extension was agreed)",
                out,
            ));
        }
        let mask = match (header.mask, self.client_masks.is_some()) {
            (Some(mask), false) => mask,
            // A server's frames are not masked: XOR with zeros leaves them as they are.
            (None, true) => [0; 4],
            (None, false) => {
                return Err(self.protocol_error(
                    CloseCode::Protocol,
                    "a client's frame must be masked (RFC 6455 §5.1)",
                    out,
                ));
            }
            (Some(_), true) => {
                return Err(self.protocol_error(
                    CloseCode::Protocol,
                    "a server's frame must not be masked (RFC 6455 §5.1)",
                    out,
                ));
            }
        };
        let kind = match header.opcode {
            OpCode::Data(Data::Text) => {
                return Err(self.protocol_error(
                    CloseCode::Unsupported,
                    "text frames carry no MQTT (MQTT 5.0 §6: binary frames only)",
                    out,
                ));
            }
            OpCode::Data(Data::Binary) if self.in_message => {
                return Err(self.protocol_error(
                    CloseCode::Protocol,
                    "a new message began before the fragmented one ended",
                    out,
                ));
            }
            OpCode::Data(Data::Continue) if !self.in_message => {
                return Err(self.protocol_error(
                    CloseCode::Protocol,
                    "a continuation frame without a message to continue",
                    out,
                ));
            }
            OpCode::Data(Data::Binary | Data::Continue) => {
                self.in_message = !header.is_final;
                Kind::Data
            }
            OpCode::Control(control) => {
                if !header.is_final || length > CONTROL_PAYLOAD_LEN_MAX {
                    return Err(self.protocol_error(
                        CloseCode::Protocol,
                        "a control frame must be final and at most 125 bytes",
                        out,
                    ));
                }
                match control {
                    Control::Ping => Kind::Ping,
                    Control::Pong => Kind::Pong,
                    Control::Close => Kind::Close,
                    Control::Reserved(_) => {
                        return Err(self.protocol_error(
                            CloseCode::Protocol,
                            "reserved control opcode",
                            out,
                        ));
                    }
                }
            }
            OpCode::Data(Data::Reserved(_)) => {
                return Err(self.protocol_error(CloseCode::Protocol, "reserved data opcode", out));
            }
        };
        let frame = Frame {
            kind,
            remaining: length,
            mask,
            mask_offset: 0,
        };
        if length == 0 {
            return self.finish(kind, out);
        }
        self.frame = Some(frame);
        Ok(())
    }

    /// A whole frame was read: answers a ping, ends on a close.
    fn finish(&mut self, kind: Kind, out: &mut BytesMut) -> Result<(), WsError> {
        let payload = std::mem::take(&mut self.control);
        match kind {
            Kind::Data | Kind::Pong => Ok(()),
            Kind::Ping => {
                self.write(OpCode::Control(Control::Pong), &payload, out);
                Ok(())
            }
            Kind::Close => {
                let Some((code, reason)) = payload.split_first_chunk::<2>() else {
                    if payload.is_empty() {
                        self.write(OpCode::Control(Control::Close), &[], out);
                        return Err(WsError::Closed { code: None });
                    }
                    return Err(self.protocol_error(
                        CloseCode::Protocol,
                        "a close frame's code must be 2 bytes",
                        out,
                    ));
                };
                let code = u16::from_be_bytes(*code);
                if !CloseCode::from(code).is_allowed() || std::str::from_utf8(reason).is_err() {
                    return Err(self.protocol_error(
                        CloseCode::Protocol,
                        "invalid close code or reason",
                        out,
                    ));
                }
                // Echo the client's code (RFC 6455 §5.5.1).
                self.write(OpCode::Control(Control::Close), &code.to_be_bytes(), out);
                Err(WsError::Closed { code: Some(code) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(path: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: broker\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![first];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=65535 => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        frame.extend(mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn listener(origins: &[&str]) -> WsListener {
        WsListener {
            path: "/mqtt".into(),
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
        }
    }

    /// Reads a whole handshake request with `extra` header lines on a listener allowing
    /// `origins`: the session, what it answered, and the error if it refused.
    fn handshake_with(origins: &[&str], extra: &str) -> (WsSession, String, Option<WsError>) {
        let mut ws = WsSession::new(&listener(origins));
        let mut out = BytesMut::new();
        let error = ws
            .read(&request("/mqtt", extra), &mut BytesMut::new(), &mut out)
            .err();
        (ws, String::from_utf8(out.to_vec()).unwrap(), error)
    }

    #[test]
    fn a_request_without_an_origin_is_served_whatever_the_list() {
        for origins in [&[][..], &["https://app.example"][..]] {
            let (ws, answer, error) = handshake_with(origins, "");
            assert!(error.is_none() && ws.is_open(), "{error:?}");
            assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
        }
    }

    #[test]
    fn a_listed_origin_is_served_ascii_case_insensitively() {
        let origins = ["https://app.example", "http://localhost:8080"];
        for origin in [
            "https://app.example",
            "HTTPS://App.Example",
            "http://LOCALHOST:8080",
        ] {
            let (ws, answer, error) = handshake_with(&origins, &format!("Origin: {origin}\r\n"));
            assert!(error.is_none() && ws.is_open(), "{origin}: {error:?}");
            assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
        }
    }

    #[test]
    fn another_origin_is_refused_with_403() {
        let origins = ["https://app.example"];
        for origin in [
            "https://evil.example",
            "http://app.example",
            "https://app.example:444",
            "https://app.example.evil.example",
            "https://app.example/",
            "null",
            "",
        ] {
            let (ws, answer, error) = handshake_with(&origins, &format!("Origin: {origin}\r\n"));
            assert!(
                matches!(&error, Some(WsError::ForeignOrigin { origin: o }) if *o == format!("{origin:?}")),
                "{origin}: {error:?}"
            );
            assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
            assert!(answer.contains("Connection: close\r\n"), "{answer}");
            assert!(!ws.is_open() && ws.buffered_len() == 0);
        }
        // With no list at all (the default), nothing is checked.
        let (ws, answer, error) = handshake_with(&[], "Origin: https://app.example\r\n");
        assert!(error.is_none() && ws.is_open(), "{error:?}");
        assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
        // A second Origin header cannot smuggle a foreign one past a listed one.
        let (_, _, error) = handshake_with(
            &origins,
            "Origin: https://app.example\r\nOrigin: https://evil.example\r\n",
        );
        assert!(
            matches!(error, Some(WsError::ForeignOrigin { .. })),
            "{error:?}"
        );
        // What is logged is escaped and cut.
        let long = format!("https://\"é{}", "a".repeat(300));
        let (_, _, error) = handshake_with(&origins, &format!("Origin: {long}\r\n"));
        let Some(WsError::ForeignOrigin { origin }) = error else {
            panic!("{error:?}");
        };
        assert!(
            origin.starts_with("\"https://\\\"é")
                && origin.len() < ORIGIN_LOGGED_LEN_MAX + 8
                && origin.ends_with("aa\"..."),
            "{origin}"
        );
    }

    #[test]
    fn a_star_allows_any_origin() {
        for origin in ["https://evil.example", "null"] {
            let (ws, answer, error) = handshake_with(
                &["https://app.example", ANY_ORIGIN],
                &format!("Origin: {origin}\r\n"),
            );
            assert!(error.is_none() && ws.is_open(), "{origin}: {error:?}");
            assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
        }
    }

    fn open(extra: &str) -> (WsSession, BytesMut) {
        let mut ws = WsSession::new(&listener(&[]));
        let mut out = BytesMut::new();
        ws.read(&request("/mqtt?x=1", extra), &mut BytesMut::new(), &mut out)
            .unwrap();
        assert!(ws.is_open());
        (ws, out)
    }

    #[test]
    fn the_handshake_answers_101_with_mqtt_when_offered() {
        let (_, out) = open("Sec-WebSocket-Protocol: wamp, mqtt\r\n");
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        // RFC 6455 §1.3's example key and answer.
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        let (_, out) = open("");
        assert!(!String::from_utf8_lossy(&out).contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn bad_handshakes_are_refused_with_a_status() {
        let cases: [(Vec<u8>, u16); 6] = [
            (request("/other", ""), 404),
            (
                request("/mqtt", "Sec-WebSocket-Protocol: mqttv3.1\r\n"),
                400,
            ),
            (b"POST /mqtt HTTP/1.1\r\n\r\n".to_vec(), 405),
            (
                String::from_utf8(request("/mqtt", ""))
                    .unwrap()
                    .replace("Version: 13", "Version: 8")
                    .into_bytes(),
                426,
            ),
            (
                b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00".to_vec(),
                400,
            ),
            (
                [b"GET /mqtt HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat(),
                431,
            ),
        ];
        for (input, status) in cases {
            let mut ws = WsSession::new(&listener(&[]));
            let mut out = BytesMut::new();
            let error = ws.read(&input, &mut BytesMut::new(), &mut out).unwrap_err();
            assert!(
                matches!(error, WsError::Handshake { status: s, .. } if s == status),
                "{error}"
            );
            assert!(out.starts_with(format!("HTTP/1.1 {status} ").as_bytes()));
            assert!(ws.buffered_len() == 0);
        }
    }

    #[test]
    fn a_request_in_pieces_then_frames_in_the_same_read() {
        let mut ws = WsSession::new(&listener(&[]));
        let mut input = request("/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n");
        input.extend(frame(0x82, b"\x10\x00"));
        let (mut app, mut out) = (BytesMut::new(), BytesMut::new());
        for byte in &input {
            ws.read(&[*byte], &mut app, &mut out).unwrap();
            assert!(ws.buffered_len() <= WS_HANDSHAKE_LEN_MAX);
        }
        assert_eq!(&app[..], b"\x10\x00");
        assert!(out.starts_with(b"HTTP/1.1 101"));
    }

    #[test]
    fn fragmented_binary_with_a_ping_between_and_frames_cut_anywhere() {
        let (mut ws, _) = open("");
        let mut input = frame(0x02, b"\x30\x0b\x00\x03a/b"); // binary, not final
        input.extend(frame(0x89, b"hi")); // ping in the middle
        input.extend(frame(0x00, b"hel")); // continuation
        input.extend(frame(0x80, b"lo!!")); // final continuation
        let big = vec![0x55; 70_000];
        input.extend(frame(0x82, &big)); // 64-bit length
        let (mut app, mut out) = (BytesMut::new(), BytesMut::new());
        for chunk in input.chunks(3) {
            ws.read(chunk, &mut app, &mut out).unwrap();
        }
        assert_eq!(&app[..14], b"\x30\x0b\x00\x03a/bhello!!");
        assert_eq!(app.len(), 14 + big.len());
        assert!(app[14..].iter().all(|&b| b == 0x55));
        assert_eq!(&out[..], b"\x8a\x02hi", "the pong echoes the ping");
        assert_eq!(ws.buffered_len(), 0, "idle: nothing held");
        // Server frames are binary, final, unmasked.
        let mut framed = BytesMut::new();
        ws.write(b"\x20\x02\x00\x00", &mut framed);
        assert_eq!(&framed[..], b"\x82\x04\x20\x02\x00\x00");
    }

    #[test]
    fn text_unmasked_and_misordered_frames_close_with_their_code() {
        let cases: [(Vec<u8>, u16); 5] = [
            (frame(0x81, b"{}"), 1003),
            (b"\x82\x02\x10\x00".to_vec(), 1002),
            (frame(0x80, b"x"), 1002),
            ([frame(0x02, b"a"), frame(0x82, b"b")].concat(), 1002),
            (frame(0x09, b"x"), 1002),
        ];
        for (input, code) in cases {
            let (mut ws, _) = open("");
            let mut out = BytesMut::new();
            let error = ws.read(&input, &mut BytesMut::new(), &mut out).unwrap_err();
            assert!(
                matches!(error, WsError::Protocol { code: c, .. } if c == code),
                "{error}"
            );
            let mut close = vec![0x88, 0x02];
            close.extend(code.to_be_bytes());
            assert_eq!(&out[..], &close[..]);
            // Closed: nothing more in or out.
            let mut after = BytesMut::new();
            ws.read(&frame(0x82, b"z"), &mut after, &mut out).unwrap();
            ws.write(b"z", &mut out);
            assert!(after.is_empty() && out.len() == 4);
        }
    }

    #[test]
    fn the_client_side_talks_to_the_server_side() {
        let mut to_server = BytesMut::new();
        let mut client = WsSession::client("/mqtt", "127.0.0.1:1883", &mut to_server);
        // The CONNECT written before the answer waits for it.
        client.write(b"\x10\x00connect", &mut to_server);
        assert!(client.is_handshaking());
        let mut server = WsSession::new(&listener(&[]));
        let (mut server_app, mut to_client) = (BytesMut::new(), BytesMut::new());
        server
            .read(&to_server.split(), &mut server_app, &mut to_client)
            .unwrap();
        assert!(server.is_open() && server_app.is_empty());
        let mut client_app = BytesMut::new();
        client
            .read(&to_client.split(), &mut client_app, &mut to_server)
            .unwrap();
        assert!(client.is_open());
        // The held CONNECT leaves masked; the server unmasks it.
        assert_eq!(to_server[1] & 0x80, 0x80);
        server
            .read(&to_server.split(), &mut server_app, &mut to_client)
            .unwrap();
        assert_eq!(&server_app[..], b"\x10\x00connect");
        server.write(b"\x20\x02\x00\x00", &mut to_client);
        client
            .read(&to_client.split(), &mut client_app, &mut to_server)
            .unwrap();
        assert_eq!(&client_app[..], b"\x20\x02\x00\x00");
        // A wrong accept key is refused.
        let mut request = BytesMut::new();
        let mut other = WsSession::client("/mqtt", "h", &mut request);
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(
            other
                .read(answer, &mut BytesMut::new(), &mut BytesMut::new())
                .is_err()
        );
    }

    #[test]
    fn a_client_close_is_echoed() {
        let (mut ws, _) = open("");
        let mut out = BytesMut::new();
        let error = ws
            .read(&frame(0x88, b"\x03\xe8bye"), &mut BytesMut::new(), &mut out)
            .unwrap_err();
        assert_eq!(error, WsError::Closed { code: Some(1000) });
        assert_eq!(&out[..], b"\x88\x02\x03\xe8");
        let (mut ws, _) = open("");
        let mut out = BytesMut::new();
        ws.close(&mut out);
        assert_eq!(&out[..], b"\x88\x02\x03\xe8");
    }
}
