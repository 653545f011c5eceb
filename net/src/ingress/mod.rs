//! Adapters that sit between a socket's bytes and a protocol's bytes, sans-IO.
//!
//! Owns: [`tls`], a rustls session driven as ciphertext in / plaintext out and plaintext in /
//! ciphertext out, and the building of its configurations from PEM files. Cluster links use
//! it today; the client listeners (TLS, and later WebSocket and the PROXY protocol) are meant
//! to reuse it unchanged.
//! Never: touches a socket, a clock or a thread; the caller moves the bytes. Nothing here
//! holds mutable state shared between connections: a configuration is built once and only
//! read afterwards (see [`tls`]).

pub mod tls;
