//! The durable Raft store against an in-memory disk that carries out its file calls and can
//! crash (keeping what was synced and any part of the rest).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use shardmq_net::frame::LogEntry;

use super::super::Consensus;
use super::*;

const TICK_MS: u64 = 10;
const ELECTION_TICK: usize = 5;

#[derive(Debug, Default, Clone)]
struct File {
    data: Vec<u8>,
    synced: usize,
}

/// Files by path (relative to the data directory), which of them the directory holds durably,
/// and the store's two file slots.
#[derive(Debug, Default, Clone)]
struct MemDisk {
    files: BTreeMap<PathBuf, File>,
    /// Names a crash keeps: created and directory-synced, or removed and not synced since.
    durable_names: BTreeSet<PathBuf>,
    /// Removed since the last directory sync (a crash brings them back).
    removed: BTreeMap<PathBuf, File>,
    slots: [Option<PathBuf>; 2],
    /// Calls carried out so far.
    done: Vec<u64>,
    fail_next: bool,
}

impl MemDisk {
    fn run(&mut self, call: &RaftFileCall) -> Result<(), String> {
        if std::mem::take(&mut self.fail_next) {
            return Err("injected: no space left on device".into());
        }
        for op in &call.ops {
            match op {
                RaftFileOp::Open { file, path, create } => {
                    let slot = &mut self.slots[usize::from(*file)];
                    if slot.is_some() {
                        return Err(format!("slot {file} in use"));
                    }
                    if !self.files.contains_key(path) {
                        if !create {
                            return Err(format!("{} is missing", path.display()));
                        }
                        self.files.insert(path.clone(), File::default());
                    }
                    *slot = Some(path.clone());
                }
                RaftFileOp::Write {
                    file,
                    offset,
                    bytes,
                } => {
                    let path = self.slots[usize::from(*file)].clone().ok_or("not open")?;
                    let f = self.files.get_mut(&path).ok_or("gone")?;
                    let offset = *offset as usize;
                    if f.data.len() < offset {
                        f.data.resize(offset, 0);
                    }
                    f.data.truncate(offset);
                    f.data.extend_from_slice(bytes);
                }
                RaftFileOp::Datasync { file } => {
                    let path = self.slots[usize::from(*file)].clone().ok_or("not open")?;
                    let f = self.files.get_mut(&path).ok_or("gone")?;
                    f.synced = f.data.len();
                }
                RaftFileOp::SyncDirectory { path } => {
                    let names: Vec<PathBuf> = self
                        .files
                        .keys()
                        .filter(|p| p.parent() == Some(path.as_path()))
                        .cloned()
                        .collect();
                    self.durable_names.extend(names);
                    self.removed
                        .retain(|p, _| p.parent() != Some(path.as_path()));
                }
                RaftFileOp::Close { file } => {
                    self.slots[usize::from(*file)].take().ok_or("not open")?;
                }
                RaftFileOp::Remove { path } => {
                    let f = self.files.remove(path).ok_or("no such file")?;
                    if self.durable_names.remove(path) {
                        self.removed.insert(path.clone(), f);
                    }
                }
            }
        }
        self.done.push(call.tag);
        Ok(())
    }

    /// What a crash leaves: durable names with their synced bytes and `unsynced` more of what
    /// was written after them.
    fn crash(&self, unsynced: usize) -> RaftStoreFiles {
        let mut files = RaftStoreFiles::default();
        let survivors = self
            .files
            .iter()
            .filter(|(p, _)| self.durable_names.contains(*p))
            .chain(self.removed.iter());
        for (path, file) in survivors {
            let keep = (file.synced + unsynced).min(file.data.len());
            let bytes = file.data[..keep].to_vec();
            if path == Path::new(LEGACY_STATE_FILE) {
                files.legacy = Some(bytes);
            } else if let Some(sequence) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_segment_name)
            {
                files.segments.push((sequence, bytes));
            }
        }
        files
    }

    fn segments(&self) -> Vec<&PathBuf> {
        self.files
            .keys()
            .filter(|p| p.starts_with(RAFT_DIRECTORY))
            .collect()
    }
}

/// Carries out every file call of `core` and reports them done.
fn sync(core: &mut Consensus, disk: &mut MemDisk) {
    for _ in 0..10 {
        let calls = core.take_file_calls();
        if calls.is_empty() {
            return;
        }
        for call in calls {
            let result = disk.run(&call);
            core.files_done(call.tag, result);
        }
        core.process();
    }
}

fn durable_core(node: u32, seed: u64, files: RaftStoreFiles) -> Consensus {
    let mut core = Consensus::new(node, seed, TICK_MS, ELECTION_TICK, 0);
    core.open_store(files).expect("the store opens");
    core
}

/// A group of one founded by core 1 and led by it; its store's calls run on `disk`.
fn elect_alone(mut core: Consensus, mut disk: Option<&mut MemDisk>) -> (Consensus, u64) {
    core.set_founders(&[1]);
    assert!(core.try_found());
    let mut now_ms = 0;
    while !core.is_leader() {
        now_ms += TICK_MS;
        core.tick(now_ms);
        core.process();
        if let Some(disk) = disk.as_deref_mut() {
            sync(&mut core, disk);
        }
        assert!(now_ms < 10_000, "a group of one elects its core");
    }
    (core, now_ms)
}

/// A group of one founded by a core with a durable store, led by it.
fn lone_leader(disk: &mut MemDisk) -> (Consensus, u64) {
    elect_alone(durable_core(1, 7, RaftStoreFiles::default()), Some(disk))
}

fn setting_of<'a>(core: &'a Consensus, key: &str) -> Option<&'a str> {
    core.registry.settings.get(key).map(String::as_str)
}

/// A lone leader on a fresh disk that has committed `key = value`.
fn lone_leader_with(key: &str, value: &str) -> (Consensus, MemDisk) {
    let mut disk = MemDisk::default();
    let (mut core, _) = lone_leader(&mut disk);
    set(&mut core, &mut disk, key, value);
    (core, disk)
}

fn set(core: &mut Consensus, disk: &mut MemDisk, key: &str, value: &str) {
    core.propose(&LogEntry::Setting {
        key: key.into(),
        value: value.into(),
    })
    .expect("the leader takes it");
    core.process();
    sync(core, disk);
}

#[test]
fn a_lone_core_recovers_its_identifier_term_and_settings_after_a_crash() {
    let (core, disk) = lone_leader_with("forward_queue_max", "77");
    assert_eq!(setting_of(&core, "forward_queue_max"), Some("77"));
    let status = core.status();
    // Crash: only what was synced, nothing of any unsynced tail.
    let mut restarted = durable_core(1, 99, disk.crash(0));
    restarted.process();
    let after = restarted.status();
    assert_eq!(after.id, status.id, "the same Raft identifier");
    assert_eq!(after.term, status.term);
    assert_eq!(after.voter_ids, status.voter_ids);
    assert_eq!(
        setting_of(&restarted, "forward_queue_max"),
        Some("77"),
        "the committed setting is replayed"
    );
}

#[test]
fn an_entry_is_committed_only_once_synced() {
    let mut disk = MemDisk::default();
    let (mut core, _) = lone_leader(&mut disk);
    core.propose(&LogEntry::Setting {
        key: "down_grace_seconds".into(),
        value: "5".into(),
    })
    .expect("taken");
    core.process();
    let calls = core.take_file_calls();
    assert!(!calls.is_empty(), "the entry is to be written");
    assert!(
        !core.registry.settings.contains_key("down_grace_seconds"),
        "a group of one commits only what its own disk holds"
    );
    for call in calls {
        let result = disk.run(&call);
        core.files_done(call.tag, result);
    }
    core.process();
    assert!(core.registry.settings.contains_key("down_grace_seconds"));
}

/// What the synced part of `disk` holds: its last entry and hard state.
fn synced_state(disk: &MemDisk) -> Option<Recovered> {
    recover(&disk.crash(0).segments).ok()?.state
}

/// A follower with a durable store and a leader in memory: every message the follower sends
/// that depends on its log or vote is covered by what its disk has synced when it leaves,
/// however late the disk completes.
#[test]
fn a_follower_sends_nothing_that_depends_on_unsynced_state() {
    let (mut leader, mut now_ms) =
        elect_alone(Consensus::new(1, 7, TICK_MS, ELECTION_TICK, 0), None);
    let mut disk = MemDisk::default();
    let mut follower = durable_core(2, 8, RaftStoreFiles::default());
    leader.propose_voter(follower.id, true).expect("taken");
    leader.process();
    let mut queued: Vec<RaftFileCall> = Vec::new();
    let mut checked = 0;
    for round in 0..400u64 {
        if round % 7 == 0 && round < 300 {
            let _ = leader.propose(&LogEntry::Setting {
                key: "takeover_timeout_ms".into(),
                value: (round + 1).to_string(),
            });
        }
        if round % 3 == 0 {
            now_ms += TICK_MS;
            leader.tick(now_ms);
            follower.tick(now_ms);
        }
        leader.process();
        for (to, bytes) in leader.take_outbox() {
            assert_eq!(to, 2);
            follower.step(1, &bytes, now_ms).expect("from the leader");
        }
        follower.process();
        queued.extend(follower.take_file_calls());
        // The disk completes late: one call every other round.
        if round % 2 == 0 && !queued.is_empty() {
            let call = queued.remove(0);
            let result = disk.run(&call);
            follower.files_done(call.tag, result);
            follower.process();
        }
        let synced = synced_state(&disk);
        for (to, bytes) in follower.take_outbox() {
            assert_eq!(to, 1);
            let message = Message::parse_from_bytes(&bytes).expect("a message");
            match message.get_msg_type() {
                MessageType::MsgAppendResponse if !message.reject => {
                    let last = synced.as_ref().map_or(0, Recovered::last_index);
                    assert!(
                        message.index <= last,
                        "acknowledged entry {} with only {last} synced",
                        message.index
                    );
                    checked += 1;
                }
                MessageType::MsgRequestVoteResponse if !message.reject => {
                    let hard = synced.as_ref().map(|s| s.hard.clone()).unwrap_or_default();
                    assert_eq!((hard.term, hard.vote), (message.term, message.to));
                }
                _ => {}
            }
            leader.step(2, &bytes, now_ms).expect("from the follower");
        }
    }
    assert!(
        checked > 10,
        "the follower acknowledged entries ({checked})"
    );
    assert!(follower.is_voter());
    assert_eq!(
        follower.registry.settings.get("takeover_timeout_ms"),
        leader.registry.settings.get("takeover_timeout_ms")
    );
}

#[test]
fn a_torn_tail_is_cut_and_damage_before_the_tail_refused() {
    let (mut core, mut disk) = lone_leader_with("forward_queue_max", "1");
    set(&mut core, &mut disk, "forward_queue_max", "2");
    let files = disk.crash(0);
    let [(sequence, bytes)] = files.segments.as_slice() else {
        panic!("one segment: {:?}", disk.segments());
    };
    let whole = recover(&files.segments).unwrap().state.unwrap();
    // The last frame: find where it starts by cutting from the end until the state changes.
    let mut last_start = bytes.len();
    for cut in (0..bytes.len()).rev() {
        let state = recover(&[(*sequence, bytes[..cut].to_vec())])
            .unwrap()
            .state
            .unwrap();
        if state.torn_bytes == 0 {
            last_start = cut;
            break;
        }
        assert!(state.last_index() <= whole.last_index());
    }
    assert!(last_start < bytes.len());
    // Every cut inside the last frame is a torn tail: the state before that frame.
    for cut in last_start + 1..bytes.len() {
        let state = recover(&[(*sequence, bytes[..cut].to_vec())])
            .unwrap()
            .state
            .unwrap();
        assert_eq!(state.torn_bytes, cut - last_start);
    }
    // A bit flipped in the last frame's body is a torn tail too (a crash can leave that);
    // in its length or in any frame before it, refused.
    for position in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[position] ^= 0x10;
        let result = recover(&[(*sequence, damaged)]);
        if position >= last_start + 8 {
            let state = result.expect("a damaged last frame is cut").state.unwrap();
            assert_eq!(state.torn_bytes, bytes.len() - last_start);
        } else {
            let error = result.expect_err("damage before the last frame is refused");
            assert!(
                error.contains("damaged")
                    || error.contains("decode")
                    || error.contains("follow")
                    || error.contains("segment"),
                "{error}"
            );
        }
    }
}

#[test]
fn a_renamed_segment_and_a_commit_beyond_the_log_are_refused() {
    let (core, disk) = lone_leader_with("forward_queue_max", "3");
    let files = disk.crash(0);
    let (sequence, bytes) = files.segments[0].clone();
    let error = recover(&[(sequence + 1, bytes.clone())]).unwrap_err();
    assert!(error.contains("missing or was renamed"), "{error}");

    // A checkpoint whose hard state commits past its log.
    let mut out = BytesMut::new();
    encode_frame(KIND_CHECKPOINT, &mut out, |out| {
        out.put_u64_le(5);
        out.put_u64_le(core.id);
        let hard = HardState {
            term: 2,
            commit: 9,
            ..Default::default()
        };
        Batch {
            snapshot: None,
            entries: Vec::new(),
            hard: Some(hard),
        }
        .encode(out)
        .unwrap();
    });
    let error = recover(&[(5, out.to_vec())]).unwrap_err();
    assert!(error.contains("synced entries are missing"), "{error}");
    // And one from another node.
    let mut other = Consensus::new(3, 1, TICK_MS, ELECTION_TICK, 0);
    let error = other.open_store(disk.crash(0)).unwrap_err();
    assert!(error.contains("of node"), "{error}");
}

#[test]
fn a_cut_checkpoint_falls_back_to_the_segment_before_it() {
    let (_, disk) = lone_leader_with("forward_queue_max", "4");
    let files = disk.crash(0);
    let (sequence, bytes) = files.segments[0].clone();
    // The next segment's checkpoint was being written when the node crashed.
    for next in [Vec::new(), vec![0; 3], vec![0; 40], bytes[..30].to_vec()] {
        let segments = vec![(sequence, bytes.clone()), (sequence + 1, next)];
        let recovery = recover(&segments).unwrap();
        assert_eq!(recovery.skipped, vec![sequence + 1]);
        assert_eq!(recovery.state.unwrap().sequence, sequence);
    }
    // Damage that no crash leaves is refused there too.
    let mut damaged = bytes.clone();
    damaged[1] ^= 0x40;
    let segments = vec![(sequence, bytes.clone()), (sequence + 1, damaged)];
    assert!(recover(&segments).is_err());
}

#[test]
fn the_log_stays_bounded_and_a_restart_replaces_the_segments() {
    let mut disk = MemDisk::default();
    let (mut core, _) = lone_leader(&mut disk);
    let mut largest = 0;
    for n in 0..3_000u32 {
        set(
            &mut core,
            &mut disk,
            "forward_queue_max",
            &(n + 1).to_string(),
        );
        let segments = disk.segments();
        assert!(segments.len() <= 1, "{segments:?}");
        largest = largest.max(disk.files.values().map(|f| f.data.len()).max().unwrap_or(0));
    }
    assert!(largest < 2 * CHECKPOINT_MIN_BYTES as usize, "{largest}");
    let before: Vec<PathBuf> = disk.segments().into_iter().cloned().collect();
    let mut restarted = durable_core(1, 5, disk.crash(0));
    restarted.process();
    sync(&mut restarted, &mut disk);
    assert_eq!(setting_of(&restarted, "forward_queue_max"), Some("3000"));
    let after: Vec<PathBuf> = disk.segments().into_iter().cloned().collect();
    assert_eq!(after.len(), 1);
    assert_ne!(
        after, before,
        "a new checkpoint segment replaced the old one"
    );
}

#[test]
fn the_old_shutdown_file_is_taken_up_once_and_removed() {
    // An earlier version's `raft.state`, made with its format.
    let (core, _) = lone_leader_with("down_grace_seconds", "9");
    let legacy = legacy_state(&core);
    let mut disk = MemDisk::default();
    disk.files.insert(
        PathBuf::from(LEGACY_STATE_FILE),
        File {
            synced: legacy.len(),
            data: legacy.clone(),
        },
    );
    disk.durable_names.insert(PathBuf::from(LEGACY_STATE_FILE));
    let mut upgraded = durable_core(
        1,
        5,
        RaftStoreFiles {
            segments: Vec::new(),
            legacy: Some(legacy),
        },
    );
    upgraded.process();
    assert_eq!(upgraded.id, core.id);
    sync(&mut upgraded, &mut disk);
    assert!(!disk.files.contains_key(Path::new(LEGACY_STATE_FILE)));
    let files = disk.crash(0);
    assert!(files.legacy.is_none(), "the removal is durable");
    let mut again = durable_core(1, 6, files);
    again.process();
    assert_eq!(again.id, core.id);
    assert_eq!(setting_of(&again, "down_grace_seconds"), Some("9"));
}

/// The old `raft.state` format (magic, identifier, length-prefixed hard state, snapshot and
/// entries, CRC-32).
fn legacy_state(core: &Consensus) -> Vec<u8> {
    let raw = core.raw.as_ref().unwrap();
    let store = raw.store();
    let snapshot = store.snapshot(store.applied, 0).unwrap();
    let hard = store.mem.rl().hard_state().clone();
    let mut out = b"SMQRAFT1".to_vec();
    out.extend_from_slice(&core.id.to_le_bytes());
    for part in [
        hard.write_to_bytes().unwrap(),
        snapshot.write_to_bytes().unwrap(),
    ] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(&part);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn leaving_the_group_removes_its_segments() {
    let mut disk = MemDisk::default();
    let (mut core, _) = lone_leader(&mut disk);
    assert_eq!(disk.segments().len(), 1);
    core.reset();
    sync(&mut core, &mut disk);
    assert!(disk.segments().is_empty());
    let files = disk.crash(0);
    assert!(files.segments.is_empty(), "the removal is durable");
}

#[test]
fn an_io_error_stops_the_store_and_what_waits_for_it() {
    let mut disk = MemDisk::default();
    let (mut core, _) = lone_leader(&mut disk);
    disk.fail_next = true;
    core.propose(&LogEntry::Setting {
        key: "down_grace_seconds".into(),
        value: "5".into(),
    })
    .expect("taken");
    core.process();
    sync(&mut core, &mut disk);
    assert!(core.store_failure().is_some());
    assert!(
        !core.registry.settings.contains_key("down_grace_seconds"),
        "nothing is committed on a disk that failed"
    );
    assert!(core.take_file_calls().is_empty(), "nothing more is written");
}

#[test]
fn hostile_bytes_never_panic() {
    let (_, disk) = lone_leader_with("forward_queue_max", "5");
    let (sequence, bytes) = disk.crash(0).segments[0].clone();
    let mut random = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..3_000 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + super::super::splitmix(&mut random) % 4 {
            let at = (super::super::splitmix(&mut random) as usize) % damaged.len();
            damaged[at] = super::super::splitmix(&mut random) as u8;
        }
        if let Ok(recovery) = recover(&[(sequence, damaged.clone())]) {
            let mut other = Consensus::new(1, 2, TICK_MS, ELECTION_TICK, 0);
            if other
                .open_store(RaftStoreFiles {
                    segments: vec![(sequence, damaged)],
                    legacy: None,
                })
                .is_ok()
            {
                other.process();
            }
            drop(recovery);
        }
    }
}

/// Frames whose checksums hold but whose bodies are random, or whose items are protobuf
/// messages with random fields: refused or taken, never a panic (in recovery or in raft-rs).
#[test]
fn well_framed_garbage_never_panics() {
    let (core, disk) = lone_leader_with("forward_queue_max", "6");
    let (sequence, bytes) = disk.crash(0).segments[0].clone();
    let mut random = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || super::super::splitmix(&mut random);
    for round in 0..2_000u64 {
        let mut segment = if round % 2 == 0 {
            bytes.clone()
        } else {
            let mut out = BytesMut::new();
            encode_frame(KIND_CHECKPOINT, &mut out, |out| {
                out.put_u64_le(sequence);
                out.put_u64_le(core.id);
            });
            out.to_vec()
        };
        let mut out = BytesMut::new();
        let kind = [KIND_BATCH, KIND_CHECKPOINT, 9][(next() % 3) as usize];
        encode_frame(kind, &mut out, |out| {
            for _ in 0..next() % 4 {
                let item = (next() % 4) as u8;
                let mut field = Vec::new();
                for _ in 0..next() % 24 {
                    field.push(next() as u8);
                }
                if next() % 2 == 0 {
                    // Mostly well-formed protobuf: small varint fields.
                    let index = next() % 8;
                    let term = next() % 4;
                    let entry = Entry {
                        index,
                        term,
                        ..Default::default()
                    };
                    let commit = next() % 8;
                    let term = next() % 4;
                    let vote = next() % 3;
                    let hard = HardState {
                        commit,
                        term,
                        vote,
                        ..Default::default()
                    };
                    field = match item {
                        ITEM_ENTRY => entry.write_to_bytes().unwrap(),
                        ITEM_HARD_STATE => hard.write_to_bytes().unwrap(),
                        _ => field,
                    };
                }
                put_item(out, item, &field);
            }
        });
        segment.extend_from_slice(&out);
        let files = RaftStoreFiles {
            segments: vec![(sequence, segment)],
            legacy: None,
        };
        let mut other = Consensus::new(1, 2, TICK_MS, ELECTION_TICK, 0);
        if other.open_store(files).is_ok() {
            for tick in 1..5 {
                other.tick(tick * TICK_MS * 10);
                other.process();
                let _ = other.take_file_calls();
            }
        }
    }
}

#[test]
fn an_unreadable_checkpoint_with_no_segment_before_it_is_refused_unless_it_is_the_first() {
    // Empty, cut inside the header, a header never written: a crash explains these only
    // while the store's first segment was created (there was no state yet).
    for bytes in [Vec::new(), vec![0; 3], vec![0; 40]] {
        let refused = recover(&[(7, bytes.clone())]);
        assert!(
            refused
                .as_ref()
                .is_err_and(|why| why.contains("no earlier segment")),
            "{:?}",
            refused.map(|_| ())
        );
        assert!(
            recover(&[(1, bytes)]).is_ok(),
            "the first segment, cut: a new store"
        );
    }
}

#[test]
fn a_frame_of_more_entries_than_the_bound_is_refused_without_keeping_them() {
    // Empty entries cost five bytes each on disk: the bound, not the frame length, stops them.
    let mut body = BytesMut::new();
    for _ in 0..=ENTRIES_MAX {
        put_item(&mut body, ITEM_ENTRY, &[]);
    }
    let error = Batch::decode(&body).unwrap_err();
    assert!(error.contains("more than"), "{error}");
    // Up to the bound is read.
    let exact = &body[..ENTRIES_MAX * 5];
    assert_eq!(Batch::decode(exact).unwrap().entries.len(), ENTRIES_MAX);
}
