//! Fuzzes the durable log's replay at start (`storage::recover_state`): segment files are
//! outside input like anything else (a disk tears a write, a file is replaced or damaged).
//! Replay must never panic, and what it builds must stay bounded by the input: every record
//! takes at least its 8-byte frame header and a kind byte, so there are never more records
//! (nor sessions, retained messages and wills) than the bytes allow. The recovered state must
//! then open a new log (its first checkpoint encodes it again) without a panic.
//!
//! Input: the first byte picks a mode. Even: the rest is split into up to four raw segments.
//! Odd: a real log (built once, several segments of sessions, subscriptions and their ends)
//! is damaged by the input: byte patches at input-chosen positions, optionally a segment
//! dropped and the last one truncated, and optionally every whole frame's CRC32C recomputed,
//! since a mutation almost never keeps a checksum right and the record decoder behind it
//! would otherwise go untested.

#![no_main]

use std::sync::OnceLock;

use bytestring::ByteString;
use libfuzzer_sys::fuzz_target;
use shardmq_net::mqtt::{ProtocolVersion, QoS, SubscriptionOptions};
use shardmq_shards::Limits;
use shardmq_shards::storage::{
    CompactionPolicy, Log, LogConfig, Record, Request, Segment, State, StateLimits,
    recover_state, segment::HEADER_LEN,
};

/// The smallest record: the frame header (length, CRC32C) and a kind byte.
const RECORD_LEN_MIN: usize = 9;

fn limits() -> StateLimits {
    StateLimits::from(&Limits::default())
}

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 512,
        compaction: CompactionPolicy::default(),
    }
}

/// Carries out `log`'s requests in memory until it has none; the segments' bytes.
fn run(log: &mut Log, files: &mut Vec<(u64, Vec<u8>)>) {
    let mut requests = Vec::new();
    loop {
        let ticket = log.flush();
        log.take_requests(&mut requests);
        if ticket.is_none() && requests.is_empty() {
            return;
        }
        for request in requests.drain(..) {
            match request {
                Request::Create { segment } => files.push((segment, Vec::new())),
                Request::Write {
                    segment,
                    offset,
                    bytes,
                } => {
                    if let Some((_, file)) = files.iter_mut().find(|(s, _)| *s == segment) {
                        let end = offset as usize + bytes.len();
                        if file.len() < end {
                            file.resize(end, 0);
                        }
                        file[offset as usize..end].copy_from_slice(&bytes);
                    }
                }
                Request::Remove { segment } => files.retain(|(s, _)| *s != segment),
                Request::Sync { .. } => {}
            }
        }
        if let Some(ticket) = ticket {
            log.on_synced(ticket);
        }
    }
}

/// A real log of several segments, built once.
fn base() -> &'static Vec<(u64, Vec<u8>)> {
    static BASE: OnceLock<Vec<(u64, Vec<u8>)>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut files = Vec::new();
        let mut log = Log::open(config(), State::new(limits()), &[]);
        run(&mut log, &mut files);
        for i in 0..24u32 {
            let client_id = ByteString::from(format!("client-{i}"));
            let records = [
                Record::SessionCreated {
                    client_id: client_id.clone(),
                    version: ProtocolVersion::V5,
                    expiry_seconds: 3600,
                    will: None,
                },
                Record::SubscriptionAdded {
                    client_id: client_id.clone(),
                    filter: ByteString::from(format!("topic/{i}/#")),
                    options: SubscriptionOptions::new(QoS::AtLeastOnce),
                    identifier: (i % 2 == 0).then_some(i + 1),
                },
                Record::InboundAwaitingRelease {
                    client_id: client_id.clone(),
                    packet_id: i as u16 + 1,
                },
            ];
            for record in &records {
                let _ = log.append(record);
            }
            if i % 3 == 0 {
                let _ = log.append(&Record::SessionEnded { client_id });
            }
            run(&mut log, &mut files);
        }
        files.sort();
        files
    })
}

/// Recomputes the CRC32C of every whole frame after the segment header.
fn repair_checksums(segment: &mut [u8]) {
    let mut position = HEADER_LEN;
    while let Some(header) = segment.get(position..position + 8) {
        let length_field = [header[0], header[1], header[2], header[3]];
        let length = u32::from_le_bytes(length_field) as usize;
        let Some(end) = (position + 8)
            .checked_add(length)
            .filter(|&end| length > 0 && end <= segment.len())
        else {
            break;
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&length_field), &segment[position + 8..end]);
        segment[position + 4..position + 8].copy_from_slice(&crc.to_le_bytes());
        position = end;
    }
}

fn segments_from(data: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 0 {
        let count = usize::from(mode >> 1) % 4 + 1;
        let size = rest.len().div_ceil(count).max(1);
        return rest
            .chunks(size)
            .enumerate()
            .map(|(i, chunk)| (i as u64 + 1, chunk.to_vec()))
            .collect();
    }
    let mut files = base().clone();
    let total: usize = files.iter().map(|(_, f)| f.len()).sum();
    for patch in rest.chunks_exact(3) {
        let mut at = usize::from(u16::from_le_bytes([patch[0], patch[1]])) % total.max(1);
        for (_, file) in files.iter_mut() {
            if at < file.len() {
                file[at] = patch[2];
                break;
            }
            at -= file.len();
        }
    }
    if mode & 2 != 0 && files.len() > 2 {
        let drop = usize::from(rest.first().copied().unwrap_or(0)) % files.len();
        files.remove(drop);
    }
    if mode & 4 != 0
        && let Some((_, last)) = files.last_mut()
    {
        let cut = usize::from(rest.get(1).copied().unwrap_or(0));
        last.truncate(last.len().saturating_sub(cut));
    }
    if mode & 8 != 0 {
        for (_, file) in files.iter_mut() {
            repair_checksums(file);
        }
    }
    files
}

fuzz_target!(|data: &[u8]| {
    let files = segments_from(data);
    let segments: Vec<Segment<'_>> = files
        .iter()
        .map(|(sequence, bytes)| Segment {
            sequence: *sequence,
            bytes,
        })
        .collect();
    let bytes: usize = files.iter().map(|(_, f)| f.len()).sum();
    let (state, recovery, ignored) = recover_state(&segments, limits());
    let records_max = (bytes / RECORD_LEN_MIN) as u64;
    assert!(
        recovery.records <= records_max,
        "{} records from {bytes} bytes",
        recovery.records
    );
    assert!(ignored <= recovery.records);
    let held = (state.sessions.len() + state.retained.len() + state.pending_wills.len()) as u64;
    assert!(held <= recovery.records, "{held} held from {} records", recovery.records);
    // The recovered state opens a new log: its first checkpoint writes it again.
    let existing: Vec<u64> = files.iter().map(|(s, _)| *s).collect();
    let mut log = Log::open(config(), state, &existing);
    let mut written = Vec::new();
    run(&mut log, &mut written);
    let rewritten: Vec<Segment<'_>> = written
        .iter()
        .map(|(sequence, bytes)| Segment {
            sequence: *sequence,
            bytes,
        })
        .collect();
    let (again, recovery, _) = recover_state(&rewritten, limits());
    assert!(recovery.stop.is_none(), "a fresh checkpoint replays whole: {recovery:?}");
    assert_eq!(again.sessions.len(), log.state().sessions.len());
    assert_eq!(again.retained.len(), log.state().retained.len());
});
