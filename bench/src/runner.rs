//! Running the generator in one process: one reactor per `--threads` thread, the measured
//! window's timing, progress lines on stderr, and when a run ends.
//!
//! Owns: the generator threads of this process (`Runner`), from start to joined results.
//! Invariant: clients are spread round-robin over the threads; every thread's results are
//! merged before `finish` returns.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use shardmq_bench::generator::{self, ClientPlan, Control, Generator, Results, RunPlan, Shared};
use shardmq_net::reactor::{Mailboxes, Reactor, ReactorConfig};

use crate::cli::{Options, Scenario};
use crate::summary::merge;

/// The generator reactors of one process.
pub(crate) struct Runner {
    mailboxes: Arc<Mailboxes<Control>>,
    shared: Arc<Mutex<Shared>>,
    handles: Vec<std::thread::JoinHandle<Result<Results, String>>>,
    threads: u16,
    clients: u64,
}

impl Runner {
    pub(crate) fn start(
        clients: Vec<ClientPlan>,
        run_plan: RunPlan,
        threads: u16,
    ) -> Result<Self, String> {
        let mailboxes: Arc<Mailboxes<Control>> =
            Mailboxes::new(threads, 1024).map_err(|e| e.to_string())?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let count = clients.len() as u64;
        let mut per_thread: Vec<Vec<ClientPlan>> = vec![Vec::new(); usize::from(threads)];
        for (position, client) in clients.into_iter().enumerate() {
            per_thread[position % usize::from(threads)].push(client);
        }
        let mut handles = Vec::new();
        for (index, clients) in per_thread.into_iter().enumerate() {
            let config = ReactorConfig {
                index: index as u16,
                listen: Vec::new(),
                side_listen: None,
                backlog: 1,
                ring_entries: 4096,
                buffer_count: 4096,
                buffer_size: 16384,
                core: None,
                epoch: run_plan.epoch,
                shutdown_grace: Duration::from_millis(500),
                tcp_keepalive: None,
            };
            let (mailboxes, shared, run_plan) =
                (mailboxes.clone(), shared.clone(), run_plan.clone());
            handles.push(std::thread::spawn(move || -> Result<Results, String> {
                let generator = Generator::new(run_plan, clients, shared);
                let reactor =
                    Reactor::new(config, mailboxes, generator).map_err(|e| e.to_string())?;
                Ok(reactor.run().map_err(|e| e.to_string())?.into_results())
            }));
        }
        Ok(Self {
            mailboxes,
            shared,
            handles,
            threads,
            clients: count,
        })
    }

    /// Waits until every client is ready or failed, or a minute passes; returns (ready, failed).
    pub(crate) fn wait_connected(&self) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let state = self.shared.lock().expect("shared");
            if state.ready + state.failed >= self.clients || Instant::now() >= deadline {
                return (state.ready, state.failed);
            }
        }
    }

    pub(crate) fn begin(&self, start_ns: u64, measure_from_ns: u64, measure_until_ns: u64) {
        for target in 0..self.threads {
            self.mailboxes.post(
                target,
                Control::Start {
                    start_ns,
                    measure_from_ns,
                    measure_until_ns,
                },
            );
        }
    }

    /// (ready, sent, received) so far, and the latencies since the last call.
    pub(crate) fn progress(&self) -> (u64, u64, u64, Option<Histogram<u64>>) {
        let mut state = self.shared.lock().expect("shared");
        (
            state.ready,
            state.sent,
            state.received,
            state.interval.take(),
        )
    }

    pub(crate) fn finish(self) -> Result<(Results, u64), String> {
        self.shared.lock().expect("shared").stopping = true;
        self.mailboxes.stop();
        let mut results: Option<Results> = None;
        for handle in self.handles {
            let part = handle
                .join()
                .map_err(|_| "a generator thread panicked".to_string())??;
            match &mut results {
                None => results = Some(part),
                Some(results) => merge(results, part),
            }
        }
        let failed = self.shared.lock().expect("shared").failed;
        Ok((results.expect("at least one thread"), failed))
    }
}

/// When a run ends: the measured window is over and nothing arrived for a second, or five
/// seconds after the window.
pub(crate) struct Ending {
    pub(crate) end_ns: u64,
    pub(crate) quiet_since: Option<Instant>,
}

impl Ending {
    pub(crate) fn done(&mut self, moved: bool) -> bool {
        let now = generator::monotonic_ns();
        if now < self.end_ns {
            return false;
        }
        if moved {
            self.quiet_since = None;
        }
        let quiet =
            self.quiet_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(1);
        quiet || now >= self.end_ns + 5_000_000_000
    }
}

pub(crate) fn print_progress(
    started: Instant,
    ready: u64,
    sent: u64,
    received: u64,
    interval: Option<&Histogram<u64>>,
) {
    let (p50, p99) = interval.filter(|h| !h.is_empty()).map_or((0, 0), |h| {
        (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
    });
    eprintln!(
        "{:>6.1} s  connected {:>7}  out {:>9}/s  in {:>9}/s  p50 {:>7} us  p99 {:>7} us",
        started.elapsed().as_secs_f64(),
        ready,
        sent,
        received,
        p50,
        p99
    );
}

pub(crate) fn window(options: &Options) -> (u64, u64, u64) {
    let start_ns = generator::monotonic_ns() + 200_000_000;
    let measure_from_ns = start_ns + options.warmup * 1_000_000_000;
    (
        start_ns,
        measure_from_ns,
        measure_from_ns + options.duration * 1_000_000_000,
    )
}

/// Runs the whole scenario in this process: connect, publish through the window, drain.
/// Returns the merged results and how many clients failed.
pub(crate) fn run_here(
    scenario: Scenario,
    options: &Options,
    clients: Vec<ClientPlan>,
    run_plan: RunPlan,
    threads: u16,
) -> Result<(Results, u64), String> {
    let started = Instant::now();
    let runner = Runner::start(clients, run_plan, threads)?;
    let (ready, failed) = runner.wait_connected();
    eprintln!(
        "connected {ready} ({failed} failed) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (start_ns, measure_from_ns, measure_until_ns) = window(options);
    if scenario != Scenario::Conn {
        runner.begin(start_ns, measure_from_ns, measure_until_ns);
    }
    let mut ending = Ending {
        end_ns: measure_until_ns,
        quiet_since: None,
    };
    let mut shown = (0u64, 0u64);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (ready, sent, received, interval) = runner.progress();
        print_progress(
            started,
            ready,
            sent - shown.0,
            received - shown.1,
            interval.as_ref(),
        );
        let moved = received != shown.1;
        shown = (sent, received);
        if ending.done(moved) {
            break;
        }
    }
    runner.finish()
}
