//! File queues on a real reactor: a reactor thread whose handler queues the calls the test
//! posts to it and sends back every `files_done`; the files are checked with std afterwards.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::{Actions, Event, FileOp, Handler, Mailboxes, Reactor, test_config};

type Call = (u16, u64, Vec<FileOp>);
type Done = (u16, u64, io::Result<()>);

/// Queues what the test posts; at shutdown also the calls given for it.
struct FileHandler {
    calls: Vec<Call>,
    at_shutdown: Vec<Call>,
    done: Sender<Done>,
}

impl Handler for FileHandler {
    type Message = Call;
    fn event(&mut self, _now_ms: u64, event: Event<Call>) {
        match event {
            Event::Message(call) => self.calls.push(call),
            Event::Shutdown => self.calls.append(&mut self.at_shutdown),
            _ => {}
        }
    }
    fn files_done(&mut self, _now_ms: u64, queue: u16, tag: u64, result: io::Result<()>) {
        let _ = self.done.send((queue, tag, result));
    }
    fn flush(&mut self, actions: &mut Actions<Call>) {
        for (queue, tag, ops) in self.calls.drain(..) {
            actions.files(queue, tag, ops);
        }
    }
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
}

struct Running {
    mailboxes: Arc<Mailboxes<Call>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<io::Result<()>>>,
    directory: PathBuf,
}

impl Running {
    fn start(name: &str, at_shutdown: Vec<Call>) -> Self {
        let directory =
            std::env::temp_dir().join(format!("shardmq-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).expect("test directory");
        let mailboxes = Mailboxes::new(1, 64).expect("mailboxes");
        let (sender, done) = channel();
        let config = test_config();
        let reactor_mailboxes = mailboxes.clone();
        let thread = std::thread::spawn(move || {
            let handler = FileHandler {
                calls: Vec::new(),
                at_shutdown,
                done: sender,
            };
            Reactor::new(config, reactor_mailboxes, handler)?
                .run()
                .map(drop)
        });
        Self {
            mailboxes,
            done,
            thread: Some(thread),
            directory,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.join(name)
    }

    fn call(&self, queue: u16, tag: u64, ops: Vec<FileOp>) {
        self.mailboxes.post(0, (queue, tag, ops));
    }

    fn next(&self) -> Done {
        self.done
            .recv_timeout(Duration::from_secs(20))
            .expect("a FilesDone within 20 s")
    }

    /// Calls and waits for that call's result (no other call outstanding).
    fn run(&self, queue: u16, tag: u64, ops: Vec<FileOp>) -> io::Result<()> {
        self.call(queue, tag, ops);
        let (done_queue, done_tag, result) = self.next();
        assert_eq!((done_queue, done_tag), (queue, tag));
        result
    }

    fn stop(&mut self) {
        self.mailboxes.stop();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("reactor thread").expect("reactor ran");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.mailboxes.stop();
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn open(file: u32, path: &Path, create: bool) -> FileOp {
    FileOp::Open {
        file,
        path: path.to_path_buf(),
        create,
    }
}

fn write(file: u32, offset: u64, bytes: &'static [u8]) -> FileOp {
    FileOp::Write {
        file,
        offset,
        bytes: Bytes::from_static(bytes),
    }
}

#[test]
fn a_write_and_its_datasync_reach_the_file() {
    let mut running = Running::start("write", Vec::new());
    let path = running.path("segment");
    running
        .run(
            0,
            1,
            vec![
                open(0, &path, true),
                write(0, 0, b"hello "),
                write(0, 6, b"world"),
                FileOp::Datasync { file: 0 },
                FileOp::SyncDirectory {
                    path: running.directory.clone(),
                },
                FileOp::Close { file: 0 },
            ],
        )
        .expect("the call succeeds");
    assert_eq!(std::fs::read(&path).expect("read back"), b"hello world");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Opening again never truncates.
    running
        .run(
            0,
            2,
            vec![
                open(0, &path, false),
                write(0, 0, b"J"),
                FileOp::Close { file: 0 },
            ],
        )
        .expect("reopen and write");
    assert_eq!(std::fs::read(&path).expect("read back"), b"Jello world");
    running.stop();
}

#[test]
fn calls_of_one_queue_run_in_order() {
    let mut running = Running::start("order", Vec::new());
    let path = running.path("segment");
    // Posted without waiting: each call depends on the one before (the open, the offsets),
    // so running them out of order or at once would fail or leave other bytes.
    running.call(0, 10, vec![open(1, &path, true), write(1, 0, b"a")]);
    for (tag, offset) in (11..40).zip(1u64..) {
        running.call(0, tag, vec![write(1, offset, b"b")]);
    }
    running.call(
        0,
        40,
        vec![
            write(1, 30, b"c"),
            FileOp::Datasync { file: 1 },
            FileOp::Close { file: 1 },
        ],
    );
    for tag in 10..=40 {
        let (queue, done_tag, result) = running.next();
        assert_eq!((queue, done_tag), (0, tag), "completions in call order");
        result.expect("every call succeeds");
    }
    let mut expected = b"a".to_vec();
    expected.extend_from_slice(&[b'b'; 29]);
    expected.push(b'c');
    assert_eq!(std::fs::read(&path).expect("read back"), expected);
    running.stop();
}

#[test]
fn queues_are_independent_and_a_failure_skips_only_the_rest_of_its_call() {
    let mut running = Running::start("failure", Vec::new());
    let first = running.path("first");
    let second = running.path("second");
    // Queue 0: the second op fails (slot 9 was never opened), so the third is skipped.
    running.call(
        0,
        1,
        vec![
            open(3, &first, true),
            write(9, 0, b"nowhere"),
            write(3, 0, b"skipped"),
        ],
    );
    // Queue 1 meanwhile runs on its own.
    running.call(
        1,
        1,
        vec![
            open(4, &second, true),
            write(4, 0, b"other queue"),
            FileOp::Datasync { file: 4 },
        ],
    );
    // Queue 0's next call still runs, on the slot the failed call opened.
    running.call(
        0,
        2,
        vec![write(3, 0, b"later"), FileOp::Datasync { file: 3 }],
    );
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(running.next());
    }
    let of = |queue: u16, tag: u64| {
        results
            .iter()
            .position(|(q, t, _)| (*q, *t) == (queue, tag))
            .expect("reported")
    };
    assert!(of(0, 1) < of(0, 2), "queue 0 keeps its order");
    let error = results[of(0, 1)]
        .2
        .as_ref()
        .expect_err("the bad write fails");
    assert_eq!(error.raw_os_error(), Some(libc::EBADF), "{error}");
    results[of(0, 2)].2.as_ref().expect("the next call runs");
    results[of(1, 1)].2.as_ref().expect("the other queue runs");
    assert_eq!(std::fs::read(&first).expect("read"), b"later");
    assert_eq!(std::fs::read(&second).expect("read"), b"other queue");
    running.stop();
}

#[test]
fn bad_paths_and_slots_are_errors_of_the_op() {
    let mut running = Running::start("errors", Vec::new());
    let missing = running.path("missing").join("segment");
    let error = running
        .run(0, 1, vec![open(0, &missing, true)])
        .expect_err("no such directory");
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "{error}");
    let error = running
        .run(0, 2, vec![open(0, Path::new("/tmp/a\0b"), true)])
        .expect_err("a NUL byte");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    let error = running
        .run(0, 3, vec![FileOp::Datasync { file: 64 }])
        .expect_err("a slot past the table");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    let error = running
        .run(
            0,
            4,
            vec![FileOp::SyncDirectory {
                path: running.path("missing"),
            }],
        )
        .expect_err("no such directory to sync");
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "{error}");
    // The failed open left the slot free, and the internal slots were given back.
    for tag in 5..20 {
        running
            .run(
                0,
                tag,
                vec![
                    open(0, &running.path("segment"), true),
                    FileOp::SyncDirectory {
                        path: running.directory.clone(),
                    },
                    FileOp::Close { file: 0 },
                ],
            )
            .expect("the slot is usable");
    }
    assert_eq!(
        running.run(0, 20, Vec::new()).ok(),
        Some(()),
        "an empty call"
    );
    running.stop();
}

#[test]
fn a_slot_in_use_refuses_an_open_and_is_reused_after_close() {
    let mut running = Running::start("reuse", Vec::new());
    let a = running.path("a");
    let b = running.path("b");
    running
        .run(0, 1, vec![open(5, &a, true), write(5, 0, b"a")])
        .expect("first open");
    let error = running
        .run(0, 2, vec![open(5, &b, true)])
        .expect_err("the slot is in use");
    assert_eq!(error.kind(), io::ErrorKind::AlreadyExists, "{error}");
    running
        .run(
            0,
            3,
            vec![
                FileOp::Close { file: 5 },
                open(5, &b, true),
                write(5, 0, b"b"),
                FileOp::Close { file: 5 },
            ],
        )
        .expect("reused after close");
    assert_eq!(std::fs::read(&a).expect("read"), b"a");
    assert_eq!(std::fs::read(&b).expect("read"), b"b");
    running.stop();
}

#[test]
fn remove_and_directory_sync() {
    let mut running = Running::start("remove", Vec::new());
    let path = running.path("old");
    std::fs::write(&path, b"old segment").expect("write");
    running
        .run(
            1,
            7,
            vec![
                FileOp::Remove { path: path.clone() },
                FileOp::SyncDirectory {
                    path: running.directory.clone(),
                },
            ],
        )
        .expect("removed");
    assert!(!path.exists());
    let error = running
        .run(1, 8, vec![FileOp::Remove { path }])
        .expect_err("already gone");
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "{error}");
    running.stop();
}

#[test]
fn a_large_write_arrives_whole() {
    let mut running = Running::start("large", Vec::new());
    let path = running.path("large");
    let bytes: Vec<u8> = (0..(9 << 20) + 7).map(|i: u32| (i % 251) as u8).collect();
    running
        .run(
            0,
            1,
            vec![
                open(0, &path, true),
                FileOp::Write {
                    file: 0,
                    offset: 3,
                    bytes: Bytes::from(bytes.clone()),
                },
                FileOp::Datasync { file: 0 },
                FileOp::Close { file: 0 },
            ],
        )
        .expect("written");
    let read = std::fs::read(&path).expect("read back");
    assert_eq!(read.len(), bytes.len() + 3);
    assert!(
        read[3..] == bytes[..],
        "the bytes arrived whole and in place"
    );
    running.stop();
}

#[test]
fn file_calls_given_at_shutdown_finish_before_the_thread_ends() {
    let directory =
        std::env::temp_dir().join(format!("shardmq-files-{}-shutdown", std::process::id()));
    let path = directory.join("last");
    let large = Bytes::from(vec![7u8; 4 << 20]);
    let mut running = Running::start(
        "shutdown",
        vec![(
            0,
            99,
            vec![
                open(2, &path, true),
                FileOp::Write {
                    file: 2,
                    offset: 0,
                    bytes: large.clone(),
                },
                FileOp::Datasync { file: 2 },
                FileOp::Close { file: 2 },
            ],
        )],
    );
    running.stop();
    let (queue, tag, result) = running.next();
    assert_eq!((queue, tag), (0, 99));
    result.expect("the last call succeeded");
    assert_eq!(std::fs::read(&path).expect("read back"), large);
}

/// Drives write + fdatasync rounds itself, each call queued from the completion of the one
/// before, so that the rate measured is the ring's and not a cross-thread hop's.
struct SyncLoop {
    path: PathBuf,
    rounds: u64,
    round: u64,
    next: Option<Call>,
    done: Sender<io::Result<Duration>>,
    started: Option<Instant>,
}

impl Handler for SyncLoop {
    type Message = ();
    fn event(&mut self, _now_ms: u64, event: Event<()>) {
        if let Event::Message(()) = event {
            self.started = Some(Instant::now());
            self.next = Some((0, 0, vec![open(0, &self.path, true)]));
        }
    }
    fn flush(&mut self, actions: &mut Actions<()>) {
        if let Some((queue, tag, ops)) = self.next.take() {
            actions.files(queue, tag, ops);
        }
    }
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
    fn files_done(&mut self, _now_ms: u64, _queue: u16, _tag: u64, result: io::Result<()>) {
        if let Err(error) = result {
            let _ = self.done.send(Err(error));
            return;
        }
        if self.round == self.rounds {
            let elapsed = self.started.map(|started| started.elapsed());
            let _ = self.done.send(Ok(elapsed.unwrap_or_default()));
            return;
        }
        let offset = self.round * 64;
        self.round += 1;
        self.next = Some((
            0,
            self.round,
            vec![write(0, offset, &[1; 64]), FileOp::Datasync { file: 0 }],
        ));
    }
}

/// Not a check: fdatasyncs per second through the ring (the handler queues each round from
/// the completion of the one before) and with std on the same disk, alternated three times.
/// `cargo test -p shardmq-net --features reactor --release datasync_rate -- --ignored --nocapture`
#[test]
#[ignore]
fn datasync_rate() {
    let rounds = 2000u64;
    let directory = std::env::temp_dir().join(format!("shardmq-files-{}-rate", std::process::id()));
    std::fs::create_dir_all(&directory).expect("directory");
    for run in 0..3 {
        let ring_path = directory.join(format!("ring-{run}"));
        let mailboxes = Mailboxes::new(1, 4).expect("mailboxes");
        let (sender, done) = channel();
        let handler = SyncLoop {
            path: ring_path,
            rounds,
            round: 0,
            next: None,
            done: sender,
            started: None,
        };
        let config = test_config();
        let reactor_mailboxes = mailboxes.clone();
        let thread = std::thread::spawn(move || {
            Reactor::new(config, reactor_mailboxes, handler)?
                .run()
                .map(drop)
        });
        mailboxes.post(0, ());
        let elapsed = done
            .recv_timeout(Duration::from_secs(300))
            .expect("finished")
            .expect("write and sync");
        mailboxes.stop();
        thread.join().expect("thread").expect("reactor");
        let ring_rate = rounds as f64 / elapsed.as_secs_f64();

        let file = std::fs::File::create(directory.join(format!("std-{run}"))).expect("create");
        use std::os::unix::fs::FileExt;
        let started = Instant::now();
        for round in 0..rounds {
            file.write_all_at(&[1; 64], round * 64).expect("write");
            file.sync_data().expect("sync");
        }
        let std_rate = rounds as f64 / started.elapsed().as_secs_f64();
        println!(
            "64-byte write + fdatasync, {rounds} rounds, {}: ring {ring_rate:.0}/s, std {std_rate:.0}/s, ratio {:.2}",
            directory.display(),
            ring_rate / std_rate
        );
    }
    let _ = std::fs::remove_dir_all(&directory);
}

#[test]
fn file_user_data_keeps_queue_and_operation_apart_from_connection_kinds() {
    use super::super::{KIND_ACCEPT, KIND_CONNECT, KIND_RECV, KIND_SEND, user_data};
    use super::file_user_data;
    let data = file_user_data(0xFFFF, 0xABCD);
    assert_eq!(data >> 56, super::KIND_FILE);
    assert_eq!(data as u16, 0xFFFF, "the queue");
    assert_eq!((data >> 32) as u16, 0xABCD, "the operation number");
    for kind in [KIND_ACCEPT, KIND_RECV, KIND_SEND, KIND_CONNECT] {
        assert_ne!(user_data(kind, 0xFFFF, 0xABCD) >> 56, data >> 56);
    }
}

/// Writes every received chunk to one file and echoes it once it is synced (as the log
/// releases an acknowledgement), so connection and file completions share the ring.
struct SyncedEcho {
    path: PathBuf,
    offset: u64,
    opened: bool,
    next_tag: u64,
    waiting: std::collections::BTreeMap<u64, (super::super::ConnectionId, Bytes)>,
    calls: Vec<Call>,
    sends: Vec<(super::super::ConnectionId, Bytes)>,
}

impl Handler for SyncedEcho {
    type Message = ();
    fn event(&mut self, _now_ms: u64, event: Event<()>) {
        if let Event::Received(connection, bytes) = event {
            let mut ops = Vec::new();
            if !self.opened {
                self.opened = true;
                ops.push(open(0, &self.path, true));
            }
            ops.push(FileOp::Write {
                file: 0,
                offset: self.offset,
                bytes: bytes.clone(),
            });
            ops.push(FileOp::Datasync { file: 0 });
            self.offset += bytes.len() as u64;
            self.next_tag += 1;
            self.waiting.insert(self.next_tag, (connection, bytes));
            self.calls.push((0, self.next_tag, ops));
        }
    }
    fn flush(&mut self, actions: &mut Actions<()>) {
        for (queue, tag, ops) in self.calls.drain(..) {
            actions.files(queue, tag, ops);
        }
        for (connection, bytes) in self.sends.drain(..) {
            actions.send(connection, bytes);
        }
    }
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
    fn files_done(&mut self, _now_ms: u64, _queue: u16, tag: u64, result: io::Result<()>) {
        result.expect("the journal write succeeds");
        if let Some(echo) = self.waiting.remove(&tag) {
            self.sends.push(echo);
        }
    }
}

#[test]
fn connections_and_file_queues_share_the_ring() {
    use std::io::{Read, Write};
    let directory = std::env::temp_dir().join(format!("shardmq-files-{}-echo", std::process::id()));
    std::fs::create_dir_all(&directory).expect("directory");
    let path = directory.join("journal");
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let mut config = test_config();
    config.listen = vec![address];
    let mailboxes = Mailboxes::new(1, 4).expect("mailboxes");
    let handler = SyncedEcho {
        path: path.clone(),
        offset: 0,
        opened: false,
        next_tag: 0,
        waiting: Default::default(),
        calls: Vec::new(),
        sends: Vec::new(),
    };
    let (ready, started) = channel();
    let reactor_mailboxes = mailboxes.clone();
    let thread = std::thread::spawn(move || {
        let reactor = Reactor::new(config, reactor_mailboxes, handler);
        let _ = ready.send(());
        reactor?.run().map(drop)
    });
    started
        .recv_timeout(Duration::from_secs(10))
        .expect("reactor built");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut expected = Vec::new();
    for round in 0..50u8 {
        let message = [round; 10];
        stream.write_all(&message).expect("send");
        let mut echo = [0u8; 10];
        stream
            .read_exact(&mut echo)
            .expect("the echo after the sync");
        assert_eq!(echo, message);
        expected.extend_from_slice(&message);
    }
    assert_eq!(std::fs::read(&path).expect("read back"), expected);
    drop(stream);
    mailboxes.stop();
    thread.join().expect("thread").expect("reactor");
    let _ = std::fs::remove_dir_all(&directory);
}
