//! shardmq-net: everything shardmq puts on the wire, and (later) the I/O that moves it.
//!
//! Owns: the MQTT codec ([`mqtt`]): pure functions from bytes to packets and back; the cluster
//! frames ([`frame`]): a checked header and an rkyv body; and, behind the `reactor` feature,
//! the per-core io_uring loop; behind the `ingress` feature, the sans-IO TLS adapter
//! ([`ingress::tls`], over rustls) that cluster links and client listeners use, and the
//! client listeners' PROXY protocol and WebSocket layers; [`networks`], CIDR matching.
//! Never: the codec and frame modules perform I/O, read a clock or spawn a thread, so that
//! `shardmq-shards` can depend on them without linking io_uring.

pub mod frame;
#[cfg(feature = "ingress")]
pub mod ingress;
/// The rustls of [`ingress::tls`], for callers that build a configuration of their own.
#[cfg(feature = "ingress")]
pub use rustls;
pub mod mqtt;
pub mod networks;
#[cfg(feature = "reactor")]
pub mod reactor;
