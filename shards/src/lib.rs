//! shardmq-shards: the broker core of one shard, sans-IO.
//!
//! Owns (as it is built): sessions, QoS flows, the shard's topic trie, the node route table
//! copy, the retained store, wills, limits and storage records.
//! Never: opens a socket, spawns or blocks a thread, or reads a clock; time comes in as an
//! argument, and everything a shard wants done (send bytes, close a connection, message another
//! shard or node, persist a record, set a timer) comes back as an output for the reactor to
//! carry out. Nothing in a shard is shared or locked: no `Arc`, `Mutex` or atomics.
//!
//! This crate is the layout's placeholder until the single-node broker lands; it holds no
//! broker logic yet.
