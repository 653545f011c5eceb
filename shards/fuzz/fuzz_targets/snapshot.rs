//! Fuzzes what a shard reads at start: snapshot files, which are outside input like anything
//! else (a disk can tear a write, a file can be replaced). `snapshot::decode` and
//! `Shard::restore` must never panic, and what they keep must stay bounded by the input: every
//! record takes at least its 8-byte header and a kind byte, so there are never more records
//! than that allows. A restored shard must also be able to write its snapshot again.
//!
//! Seeds: `seeds.sh` writes real snapshots (made by `cargo test -p shardmq-shards`'s
//! `snapshot_seeds_for_fuzzing`, which saves them under `shards/fuzz/seeds/`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq_shards::{Limits, Shard, ShardConfig, SharedStrategy, snapshot};

/// The smallest record: length, CRC-32 and a kind byte.
const RECORD_LEN_MIN: usize = 9;

fuzz_target!(|data: &[u8]| {
    let now_ms = 1_000_000;
    let records_max = data.len().saturating_sub(snapshot::MAGIC.len()) / RECORD_LEN_MIN;
    if let Ok((records, _warning)) = snapshot::decode(data, now_ms) {
        assert!(
            records.len() <= records_max,
            "{} records from {} bytes",
            records.len(),
            data.len()
        );
    }
    // Two shards, so that restore both keeps and skips sessions by owner.
    for index in 0..2 {
        let mut shard = Shard::new(ShardConfig {
            index,
            shard_count: 2,
            node: 0,
            takeover_timeout_ms: 5_000,
            limits: Limits::default(),
            shared_strategy: SharedStrategy::RoundRobin,
        });
        if let Ok((sessions, retained, _warning)) = shard.restore(data) {
            assert!(sessions + retained <= records_max);
            let again = shard.snapshot();
            assert!(again.starts_with(snapshot::MAGIC));
        }
    }
});
