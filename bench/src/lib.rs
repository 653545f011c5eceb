//! shardmq-bench: benchmarks of shardmq's parts (`benches/`), and later the load generator.
//!
//! Owns: sample packets shared by the microbenchmarks, so that every benchmark measures the
//! same inputs.
//! Never: depends on the broker binary (`src/`); it measures through `shardmq-net` and, later,
//! over sockets.

pub mod samples;
