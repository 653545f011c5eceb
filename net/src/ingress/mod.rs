//! Adapters that sit between a socket's bytes and a protocol's bytes, sans-IO.
//!
//! Owns: [`tls`], a rustls session driven as ciphertext in / plaintext out and plaintext in /
//! ciphertext out, and the building of its configurations from PEM files (cluster links and
//! TLS client listeners use it); [`stack`], one client connection's layers (PROXY header ->
//! TLS -> WebSocket -> MQTT) with the TLS layer built and the other two's places marked;
//! [`names`], the name a verified client certificate gives its holder.
//! Never: touches a socket, a clock or a thread; the caller moves the bytes. Nothing here
//! holds mutable state shared between connections: a configuration is built once and only
//! read afterwards (see [`tls`]).

pub mod names;
pub mod proxy;
pub mod stack;
pub mod tls;
pub mod ws;
