//! shardmq-bench: the load generator (`src/main.rs`, on shardmq's io_uring reactor) and the
//! microbenchmarks (`benches/`).
//!
//! Owns: the generator's per-reactor client state machines and statistics (`generator`), and
//! sample packets shared by the microbenchmarks (`samples`).
//! Never: depends on the broker binary (`src/`); it measures through `shardmq-net` and over
//! sockets.

pub mod compare;
pub mod generator;
pub mod samples;
