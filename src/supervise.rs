//! Supervision of the shard threads: their liveness, their deaths, and the fault-injection
//! switch that tests use to cause both.
//!
//! Owns: one progress stamp per shard (the time its reactor loop last came round), bumped by
//! [`Watched`], a wrapper around a shard's reactor handler; the node's serving flag; the panic
//! hook that puts a panic into the log; and the parsing of `SHARDMQ_FAULT_INJECT`.
//! Never: touches a shard's state. The stamps are atomics written by their own shard only and
//! read by the admin thread and the main thread (atomics are fine here, outside `shards/`).
//! Invariants: a reactor loop comes round at least once a second even when idle (its timed
//! wait is at most one second), so a stamp older than `admin.stall_timeout_ms` (two seconds
//! at least) means that shard's loop is stuck; a shard thread that ends other than by a
//! requested stop is reported on the exit channel, and the main thread then stops the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shardmq_net::reactor::{Actions, Event, Handler};
use tracing::{error, warn};

/// The environment variable of the fault-injection switch (a testing aid; see
/// ARCHITECTURE.md, "Supervision and health").
pub const FAULT_INJECT_VARIABLE: &str = "SHARDMQ_FAULT_INJECT";

/// The node's health as the admin endpoint reports it.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    /// Per shard: milliseconds since `epoch` when its loop last came round.
    last_loop_ms: Box<[AtomicU64]>,
    /// Every shard has started and the node is not stopping: the listeners accept.
    serving: AtomicBool,
    pub stall_timeout_ms: u64,
}

/// One shard's progress, for the health endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardProgress {
    pub shard: u16,
    /// How long ago its loop last came round.
    pub since_ms: u64,
}

impl Health {
    pub fn new(shard_count: u16, epoch: Instant, stall_timeout_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            epoch,
            // A shard counts from the start: one that never reaches its loop is stalled.
            last_loop_ms: (0..shard_count).map(|_| AtomicU64::new(0)).collect(),
            serving: AtomicBool::new(false),
            stall_timeout_ms,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The shards' clock now (milliseconds since the epoch they count from), to turn a time
    /// a shard tells into wall time.
    pub fn shard_clock_ms(&self) -> u64 {
        self.now_ms()
    }

    fn bump(&self, shard: u16) {
        if let Some(stamp) = self.last_loop_ms.get(usize::from(shard)) {
            stamp.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Every shard's progress, in shard order.
    pub fn progress(&self) -> Vec<ShardProgress> {
        let now_ms = self.now_ms();
        self.last_loop_ms
            .iter()
            .enumerate()
            .map(|(shard, stamp)| ShardProgress {
                shard: shard as u16,
                since_ms: now_ms.saturating_sub(stamp.load(Ordering::Relaxed)),
            })
            .collect()
    }

    /// The shards whose loop has not come round within the stall timeout.
    pub fn stalled(&self) -> Vec<u16> {
        self.progress()
            .into_iter()
            .filter(|p| p.since_ms > self.stall_timeout_ms)
            .map(|p| p.shard)
            .collect()
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
}

/// A fault to inject into one shard, for tests of supervision and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The shard's thread panics.
    Panic,
    /// The shard's loop stops coming round (its thread sleeps for good).
    Stall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub shard: u16,
    /// How long after its loop starts the shard fails.
    pub after: Duration,
}

impl Fault {
    /// Parses `panic-shard:N:DELAY` or `stall-shard:N:DELAY`, DELAY as `500ms`, `2s` or a
    /// number of milliseconds.
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "{FAULT_INJECT_VARIABLE}={text:?}: expected panic-shard:N:DELAY or stall-shard:N:DELAY (DELAY as 500ms or 2s)"
            )
        };
        let mut parts = text.trim().split(':');
        let kind = match parts.next() {
            Some("panic-shard") => FaultKind::Panic,
            Some("stall-shard") => FaultKind::Stall,
            _ => return Err(usage()),
        };
        let shard = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(usage)?;
        let delay = parts.next().ok_or_else(usage)?;
        let after_ms: u64 = if let Some(ms) = delay.strip_suffix("ms") {
            ms.parse().map_err(|_| usage())?
        } else if let Some(s) = delay.strip_suffix('s') {
            s.parse::<u64>()
                .map_err(|_| usage())?
                .checked_mul(1000)
                .ok_or_else(usage)?
        } else {
            delay.parse().map_err(|_| usage())?
        };
        if parts.next().is_some() {
            return Err(usage());
        }
        Ok(Self {
            kind,
            shard,
            after: Duration::from_millis(after_ms),
        })
    }

    /// The fault asked for in the environment, read once at start and logged at warn.
    pub fn from_environment(shard_count: u16) -> Result<Option<Self>, String> {
        let Ok(text) = std::env::var(FAULT_INJECT_VARIABLE) else {
            return Ok(None);
        };
        if text.trim().starts_with(crate::layout::CRASH_START_PREFIX) {
            // A fault of the start, not of a shard: `layout.rs` reads it.
            return Ok(None);
        }
        let fault = Self::parse(&text)?;
        if fault.shard >= shard_count {
            return Err(format!(
                "{FAULT_INJECT_VARIABLE}={text:?}: there is no shard {} (the node has {shard_count})",
                fault.shard
            ));
        }
        warn!(
            fault = %text,
            "FAULT INJECTION IS ON ({FAULT_INJECT_VARIABLE}): shard {} will {} {:?} after it starts; this is a testing aid, never set it in production",
            fault.shard,
            match fault.kind {
                FaultKind::Panic => "panic",
                FaultKind::Stall => "stall",
            },
            fault.after,
        );
        Ok(Some(fault))
    }
}

/// A shard's reactor handler, watched: each loop iteration (each flush) stamps the shard's
/// progress, and an injected fault fires here.
#[derive(Debug)]
pub struct Watched<H> {
    pub inner: H,
    index: u16,
    health: Arc<Health>,
    /// The fault for this shard, with the instant it fires (set at the first flush).
    fault: Option<(Fault, Option<Instant>)>,
}

impl<H> Watched<H> {
    pub fn new(inner: H, index: u16, health: Arc<Health>, fault: Option<Fault>) -> Self {
        Self {
            inner,
            index,
            health,
            fault: fault
                .filter(|fault| fault.shard == index)
                .map(|fault| (fault, None)),
        }
    }

    fn inject(&mut self) {
        let Some((fault, due)) = &mut self.fault else {
            return;
        };
        let due = *due.get_or_insert_with(|| Instant::now() + fault.after);
        if Instant::now() < due {
            return;
        }
        match fault.kind {
            FaultKind::Panic => panic!(
                "fault injection ({FAULT_INJECT_VARIABLE}): shard {} panics as asked",
                self.index
            ),
            FaultKind::Stall => {
                error!(
                    shard = self.index,
                    "fault injection ({FAULT_INJECT_VARIABLE}): the shard's loop stalls for good"
                );
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }
}

impl<H: Handler> Handler for Watched<H> {
    type Message = H::Message;

    fn event(&mut self, now_ms: u64, event: Event<H::Message>) {
        self.inner.event(now_ms, event);
    }

    fn flush(&mut self, actions: &mut Actions<H::Message>) {
        self.health.bump(self.index);
        self.inject();
        self.inner.flush(actions);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.inner.next_deadline_us()
    }

    fn files_done(&mut self, now_ms: u64, queue: u16, tag: u64, result: std::io::Result<()>) {
        self.inner.files_done(now_ms, queue, tag, result);
    }
}

/// Sends every panic to the log, with the thread's name and where it happened, before the
/// thread unwinds (the default hook would print it to stderr outside the log's format).
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = panic_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        error!(
            thread = thread.name().unwrap_or("unnamed"),
            %location,
            "panic: {message}\n{backtrace}"
        );
    }));
}

/// The text of a panic caught with `catch_unwind`.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_are_refused() {
        assert_eq!(
            Fault::parse("panic-shard:1:500ms").unwrap(),
            Fault {
                kind: FaultKind::Panic,
                shard: 1,
                after: Duration::from_millis(500)
            }
        );
        assert_eq!(
            Fault::parse("stall-shard:0:2s").unwrap().after,
            Duration::from_secs(2)
        );
        assert_eq!(
            Fault::parse("stall-shard:3:250").unwrap().after,
            Duration::from_millis(250)
        );
        for bad in [
            "",
            "panic",
            "panic-shard:x:1s",
            "panic-shard:1",
            "panic-shard:1:1s:extra",
            "explode-shard:1:1s",
            "panic-shard:1:99999999999999999999s",
        ] {
            assert!(Fault::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_shard_without_progress_is_stalled_and_a_bump_revives_it() {
        let health = Health::new(2, Instant::now() - Duration::from_secs(10), 2000);
        assert_eq!(health.stalled(), vec![0, 1]);
        health.bump(1);
        assert_eq!(health.stalled(), vec![0]);
        assert!(health.progress()[1].since_ms < 2000);
        // An index beyond the shard count is ignored, not a panic.
        health.bump(7);
    }
}
