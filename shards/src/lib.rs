//! shardmq-shards: the broker core of one shard, sans-IO.
//!
//! Owns: sessions, QoS flows, the shard's topic trie, the node route table copy, the retained
//! store, wills, limits.
//! Never: opens a socket, spawns or blocks a thread, or reads a clock; time comes in as an
//! argument, and everything a shard wants done (send bytes, close a connection, message another
//! shard, set a timer) comes back as an output for the reactor to carry out. Nothing in a shard
//! is shared or locked: no `Arc`, `Mutex` or atomics (the `Bytes` buffers it passes on are
//! reference-counted by the `bytes` crate, which is how one payload serves every subscriber).

pub mod auth;
pub mod cluster;
pub mod limits;
pub mod message;
pub mod retained;
pub mod shard;
pub mod snapshot;
pub mod storage;
pub mod trie;

pub use limits::Limits;
pub use message::{ConnectionId, Forwarded, Message, NodeId, ShardIndex, ShardMessage};
pub use shard::{Input, Output, Shard, ShardConfig, SharedStrategy, Transport, owner_shard};
