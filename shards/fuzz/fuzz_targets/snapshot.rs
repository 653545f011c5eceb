//! Fuzzes what a shard reads at start: snapshot files, which are outside input like anything
//! else (a disk can tear a write, a file can be replaced). `snapshot::decode` and
//! `Shard::restore` must never panic, and what they keep must stay bounded by the input: every
//! record takes at least its 8-byte header and a kind byte, so there are never more records
//! than that allows. A restored shard must also be able to write its snapshot again.
//!
//! Each input runs twice: as it is, and with every record's CRC-32 recomputed, since a
//! mutation almost never keeps a checksum right and the record reader behind it would
//! otherwise go untested.
//!
//! Seeds: `seeds.sh` writes real snapshots (made by `cargo test -p shardmq-shards`'s
//! `snapshot_seeds_for_fuzzing`, which saves them under `shards/fuzz/seeds/`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq_shards::{Limits, Shard, ShardConfig, SharedStrategy, snapshot};

/// The smallest record: length, CRC-32 and a kind byte.
const RECORD_LEN_MIN: usize = 9;

/// `data` with the CRC-32 of every whole record recomputed over its body.
fn with_checksums_repaired(data: &[u8]) -> Vec<u8> {
    let mut repaired = data.to_vec();
    let mut position = snapshot::MAGIC.len();
    while let Some(header) = repaired.get(position..position + 8) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let Some(end) = (position + 8)
            .checked_add(length)
            .filter(|&end| end <= repaired.len())
        else {
            break;
        };
        let crc = crc32fast::hash(&repaired[position + 8..end]);
        repaired[position + 4..position + 8].copy_from_slice(&crc.to_be_bytes());
        position = end;
    }
    repaired
}

fn check(data: &[u8]) {
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
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&with_checksums_repaired(data));
});
