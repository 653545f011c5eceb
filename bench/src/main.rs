//! shardmq-bench: an MQTT load generator with HDR latency histograms, on shardmq's io_uring
//! reactor.
//!
//! `shardmq-bench run SCENARIO` connects the scenario's clients, lets them warm up, publishes
//! on an open-loop schedule for the measured duration, drains, and reports: messages per
//! second, end-to-end and acknowledgement latency percentiles in microseconds, connect
//! latency, and lost / duplicated / reordered messages per QoS. A lost QoS 1 or 2 message makes
//! the exit status 1.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use shardmq_bench::generator::{
    self, ClientPlan, Control, Generator, Results, Role, RunPlan, Shared,
};
use shardmq_net::mqtt::{ProtocolVersion, QoS};
use shardmq_net::reactor::{self, Mailboxes, Reactor, ReactorConfig};

#[derive(Debug, Parser)]
#[command(
    name = "shardmq-bench",
    version,
    about = "MQTT load generator with HDR latency histograms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario against one or more brokers.
    Run {
        scenario: Scenario,
        #[command(flatten)]
        options: Options,
    },
    /// Connect N clients and hold them (the `conn` scenario).
    Conn {
        #[command(flatten)]
        options: Options,
    },
    /// N publishers on `--topic` (default `bench/pub/%i`), at `--rate` each.
    Pub {
        #[command(flatten)]
        options: Options,
    },
    /// N subscribers of `--topic` (default `bench/#`), measuring what shardmq-bench publishers
    /// send (latency works across processes on one host).
    Sub {
        #[command(flatten)]
        options: Options,
    },
    /// Compare runs: a Markdown table with ratios against the first, and a latency-by-
    /// percentile chart (SVG, and PNG when a TrueType font is found).
    Compare {
        /// JSON summaries written with --json; a .hgrm beside each (same name) gives the
        /// full percentile curve.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write the chart: PREFIX.svg and PREFIX.png.
        #[arg(long, default_value = "comparison")]
        output: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// N publisher/subscriber pairs, each pair on its own topic.
    Pairs,
    /// N publishers, each on its own topic, into subscribers of one wildcard filter.
    FanIn,
    /// A few publishers on one topic, N subscribers of it.
    FanOut,
    /// N clients that connect and hold their connections.
    Conn,
    /// `--peers` publishers into a shared subscription group of N members: each message to
    /// exactly one member.
    Shared,
    /// `--peers` publishers on `bench/wild/{i}/data`, N subscribers of `bench/wild/+/data`.
    Wildcard,
    /// Publishers only (the `pub` subcommand).
    Pub,
    /// Subscribers only (the `sub` subcommand).
    Sub,
}

#[derive(Debug, Clone, clap::Args)]
struct Options {
    /// Broker address (repeatable: clients are spread round-robin).
    #[arg(long = "host", default_value = "127.0.0.1:1883")]
    hosts: Vec<SocketAddr>,
    /// Clients: pairs for `pairs`, publishers for `fan-in`, subscribers for `fan-out`,
    /// connections for `conn`.
    #[arg(long, short = 'c', default_value_t = 10)]
    clients: u32,
    /// Publishers for `fan-out`, subscribers for `fan-in`.
    #[arg(long, default_value_t = 1)]
    peers: u32,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    mqtt: String,
    /// Payload bytes (at least 20: the timing header).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per second per publisher.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Messages per second of all publishers together; replaces --rate (divided evenly).
    #[arg(long)]
    total_rate: Option<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of publishing before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 5000)]
    connect_rate: u32,
    /// Source addresses to connect from: a list (127.0.0.2,127.0.0.3) or an IPv4 range
    /// (127.0.0.2-127.0.0.9), comma-separated or repeated.
    #[arg(long = "source", value_delimiter = ',', value_parser = parse_sources)]
    sources: Vec<Vec<IpAddr>>,
    /// Topic for `pub` and `sub`; `%i` is the client's index, `%c` its client identifier.
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// Clean start (5.0) / clean session (3.1.1).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    clean_start: bool,
    /// MQTT 5 Session Expiry Interval in seconds.
    #[arg(long)]
    session_expiry: Option<u32>,
    /// Reactor threads.
    #[arg(long, default_value_t = 1)]
    threads: u16,
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// A label for the broker under test, written into the JSON summary.
    #[arg(long, default_value = "broker")]
    label: String,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the end-to-end latency percentile distribution (.hgrm) to this file.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Worker processes; 0 = as many as the open-file limit requires (one process holds at
    /// most that limit's worth of sockets).
    #[arg(long, default_value_t = 0)]
    processes: u32,
    /// Internal: run as worker I of K, driven over stdin/stdout by the parent process.
    #[arg(long, hide = true, num_args = 2, value_names = ["I", "K"])]
    worker: Option<Vec<u32>>,
}

#[derive(Debug, Serialize)]
struct Summary {
    label: String,
    scenario: Scenario,
    clients: u32,
    publishers: u32,
    subscribers: u32,
    processes: u32,
    qos: u8,
    mqtt: String,
    payload_bytes: usize,
    rate_per_publisher: f64,
    duration_seconds: u64,
    sent: u64,
    received: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    /// Deliveries per second the schedule asked for (publish rate times fan-out).
    offered_per_second: f64,
    /// Deliveries that arrived per second during the measured window.
    messages_per_second: f64,
    latency_us: Percentiles,
    acknowledgement_us: Option<Percentiles>,
    connect_us: Percentiles,
    connect_failures: u64,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    count: u64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    Percentiles {
        count: histogram.len(),
        p50: histogram.value_at_quantile(0.5),
        p90: histogram.value_at_quantile(0.9),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
    }
}

/// One source address, or an IPv4 range `A-B` (inclusive, at most 65,536 addresses).
fn parse_sources(text: &str) -> Result<Vec<IpAddr>, String> {
    match text.split_once('-') {
        None => text
            .parse::<IpAddr>()
            .map(|a| vec![a])
            .map_err(|e| format!("{text}: {e}")),
        Some((first, last)) => {
            let first: std::net::Ipv4Addr = first.parse().map_err(|e| format!("{first}: {e}"))?;
            let last: std::net::Ipv4Addr = last.parse().map_err(|e| format!("{last}: {e}"))?;
            let (first, last) = (u32::from(first), u32::from(last));
            if last < first || last - first >= 65_536 {
                return Err(format!(
                    "{text}: expected a range of 1 to 65,536 addresses, low to high"
                ));
            }
            Ok((first..=last)
                .map(|a| IpAddr::from(std::net::Ipv4Addr::from(a)))
                .collect())
        }
    }
}

/// The tally under which all members of the shared group count what they receive.
const SHARED_GROUP_TALLY: u32 = u32::MAX;

/// The clients of a scenario, and the (subscriber, publisher) streams that must arrive.
fn plan(scenario: Scenario, options: &Options) -> (Vec<ClientPlan>, Vec<(u32, u32)>) {
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    let publisher = |index: u32, topic: String| ClientPlan {
        index,
        role: Role::Publisher { index, topic },
    };
    let subscriber = |index: u32, filter: String| ClientPlan {
        index,
        role: Role::Subscriber {
            filter,
            tally: index,
        },
    };
    let prefix = client_prefix();
    match scenario {
        Scenario::Pairs => {
            for pair in 0..options.clients {
                clients.push(publisher(pair, format!("bench/pairs/{pair}")));
                clients.push(subscriber(
                    options.clients + pair,
                    format!("bench/pairs/{pair}"),
                ));
                streams.push((options.clients + pair, pair));
            }
        }
        Scenario::FanIn => {
            for index in 0..options.clients {
                clients.push(publisher(index, format!("bench/fanin/{index}")));
            }
            for index in 0..options.peers {
                let subscriber_index = options.clients + index;
                clients.push(subscriber(subscriber_index, "bench/fanin/#".into()));
                streams.extend((0..options.clients).map(|p| (subscriber_index, p)));
            }
        }
        Scenario::FanOut => {
            for index in 0..options.peers {
                clients.push(publisher(index, "bench/fanout".into()));
            }
            for index in 0..options.clients {
                let subscriber_index = options.peers + index;
                clients.push(subscriber(subscriber_index, "bench/fanout".into()));
                streams.extend((0..options.peers).map(|p| (subscriber_index, p)));
            }
        }
        Scenario::Conn => {
            clients.extend((0..options.clients).map(|index| ClientPlan {
                index,
                role: Role::Idle,
            }));
        }
        Scenario::Shared => {
            for index in 0..options.peers {
                clients.push(publisher(index, format!("bench/shared/{index}")));
                streams.push((SHARED_GROUP_TALLY, index));
            }
            for index in 0..options.clients {
                let role = Role::Subscriber {
                    filter: "$share/bench/bench/shared/#".into(),
                    tally: SHARED_GROUP_TALLY,
                };
                clients.push(ClientPlan {
                    index: options.peers + index,
                    role,
                });
            }
        }
        Scenario::Wildcard => {
            for index in 0..options.peers {
                clients.push(publisher(index, format!("bench/wild/{index}/data")));
            }
            for index in 0..options.clients {
                let subscriber_index = options.peers + index;
                clients.push(subscriber(subscriber_index, "bench/wild/+/data".into()));
                streams.extend((0..options.peers).map(|p| (subscriber_index, p)));
            }
        }
        Scenario::Pub => {
            let pattern = options
                .topic
                .clone()
                .unwrap_or_else(|| "bench/pub/%i".into());
            for index in 0..options.clients {
                clients.push(publisher(
                    index,
                    generator::expand_topic(&pattern, &prefix, index),
                ));
            }
        }
        Scenario::Sub => {
            let pattern = options.topic.clone().unwrap_or_else(|| "bench/#".into());
            for index in 0..options.clients {
                clients.push(subscriber(
                    index,
                    generator::expand_topic(&pattern, &prefix, index),
                ));
            }
        }
    }
    // Subscribers first, so that they are subscribed before publishing starts.
    clients.sort_by_key(|client| !matches!(client.role, Role::Subscriber { .. }));
    (clients, streams)
}

fn merge(into: &mut Results, from: Results) {
    let _ = into.end_to_end.add(&from.end_to_end);
    let _ = into.acknowledgement.add(&from.acknowledgement);
    let _ = into.connect.add(&from.connect);
    for (publisher, sent) in from.sent {
        *into.sent.entry(publisher).or_default() += sent;
    }
    for (key, stream) in from.streams {
        let entry = into.streams.entry(key).or_default();
        entry.unique += stream.unique;
        entry.duplicated += stream.duplicated;
        entry.reordered += stream.reordered;
    }
    into.received_in_window += from.received_in_window;
    into.arrived_in_window += from.arrived_in_window;
}

/// The percentile distribution in HdrHistogram's text format (.hgrm), values in microseconds.
fn hgrm(histogram: &Histogram<u64>) -> String {
    let mut text = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for value in histogram.iter_quantiles(5) {
        let quantile = value.quantile_iterated_to();
        let inverse = if quantile < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - quantile))
        } else {
            "inf".into()
        };
        text.push_str(&format!(
            "{:>12.3} {:>14.12} {:>10} {:>14}\n",
            value.value_iterated_to() as f64,
            quantile,
            value.count_since_last_iteration(),
            inverse
        ));
    }
    text.push_str(&format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n#[Buckets = {:>12}, SubBuckets     = {:>12}]\n",
        histogram.mean(), histogram.stdev(), histogram.max() as f64, histogram.len(), histogram.buckets(), histogram.distinct_values()
    ));
    text
}

/// A worker's results, sent to the parent as one JSON line: histograms as (value, count).
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    end_to_end: Vec<(u64, u64)>,
    acknowledgement: Vec<(u64, u64)>,
    connect: Vec<(u64, u64)>,
    sent: Vec<(u32, u64)>,
    streams: Vec<(u32, u32, u64, u64, u64)>,
    received_in_window: u64,
    arrived_in_window: u64,
    failed: u64,
}

fn histogram_counts(histogram: &Histogram<u64>) -> Vec<(u64, u64)> {
    histogram
        .iter_recorded()
        .map(|value| (value.value_iterated_to(), value.count_at_value()))
        .collect()
}

fn histogram_from(counts: &[(u64, u64)]) -> Histogram<u64> {
    let mut histogram = generator::histogram();
    for &(value, count) in counts {
        let _ = histogram.record_n(value, count);
    }
    histogram
}

impl Report {
    fn new(results: &Results, failed: u64) -> Self {
        Self {
            end_to_end: histogram_counts(&results.end_to_end),
            acknowledgement: histogram_counts(&results.acknowledgement),
            connect: histogram_counts(&results.connect),
            sent: results.sent.iter().map(|(&k, &v)| (k, v)).collect(),
            streams: results
                .streams
                .iter()
                .map(|(&(s, p), st)| (s, p, st.unique, st.duplicated, st.reordered))
                .collect(),
            received_in_window: results.received_in_window,
            arrived_in_window: results.arrived_in_window,
            failed,
        }
    }

    fn into_results(self) -> (Results, u64) {
        let mut streams = std::collections::HashMap::new();
        for (subscriber, publisher, unique, duplicated, reordered) in self.streams {
            let stream: &mut generator::Stream =
                streams.entry((subscriber, publisher)).or_default();
            stream.unique = unique;
            stream.duplicated = duplicated;
            stream.reordered = reordered;
        }
        let results = Results {
            end_to_end: histogram_from(&self.end_to_end),
            acknowledgement: histogram_from(&self.acknowledgement),
            connect: histogram_from(&self.connect),
            sent: self.sent.into_iter().collect(),
            streams,
            received_in_window: self.received_in_window,
            arrived_in_window: self.arrived_in_window,
        };
        (results, self.failed)
    }
}

/// The generator reactors of one process.
struct Runner {
    mailboxes: Arc<Mailboxes<Control>>,
    shared: Arc<Mutex<Shared>>,
    handles: Vec<std::thread::JoinHandle<Result<Results, String>>>,
    threads: u16,
    clients: u64,
}

impl Runner {
    fn start(clients: Vec<ClientPlan>, run_plan: RunPlan, threads: u16) -> Result<Self, String> {
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
    fn wait_connected(&self) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let state = self.shared.lock().expect("shared");
            if state.ready + state.failed >= self.clients || Instant::now() >= deadline {
                return (state.ready, state.failed);
            }
        }
    }

    fn begin(&self, start_ns: u64, measure_from_ns: u64, measure_until_ns: u64) {
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
    fn progress(&self) -> (u64, u64, u64, Option<Histogram<u64>>) {
        let mut state = self.shared.lock().expect("shared");
        (
            state.ready,
            state.sent,
            state.received,
            state.interval.take(),
        )
    }

    fn finish(self) -> Result<(Results, u64), String> {
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
struct Ending {
    end_ns: u64,
    quiet_since: Option<Instant>,
}

impl Ending {
    fn done(&mut self, moved: bool) -> bool {
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

fn print_progress(
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

fn window(options: &Options) -> (u64, u64, u64) {
    let start_ns = generator::monotonic_ns() + 200_000_000;
    let measure_from_ns = start_ns + options.warmup * 1_000_000_000;
    (
        start_ns,
        measure_from_ns,
        measure_from_ns + options.duration * 1_000_000_000,
    )
}

/// Deliveries per second the schedule asks for: each publish reaches one subscriber in `pairs`
/// and `shared` (a group takes each message once), every subscriber in `fan-in`, `fan-out` and
/// `wildcard`, and none that this run measures in `pub`, `sub` and `conn`.
fn offered_per_second(scenario: Scenario, publishers: u32, subscribers: u32, rate: f64) -> f64 {
    let publishes = f64::from(publishers) * rate;
    match scenario {
        Scenario::Pairs | Scenario::Shared => publishes,
        Scenario::FanIn | Scenario::FanOut | Scenario::Wildcard => {
            publishes * f64::from(subscribers)
        }
        Scenario::Pub | Scenario::Sub | Scenario::Conn => 0.0,
    }
}

/// Client identifiers are `bench-{parent pid}-{index}`: unique per run, the same in workers.
fn client_prefix() -> String {
    let pid = std::env::var("SHARDMQ_BENCH_PARENT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(std::process::id);
    format!("bench-{pid}-")
}

/// `compare`: prints the table and writes the chart.
fn compare(paths: &[PathBuf], output: &std::path::Path) -> Result<bool, String> {
    let runs = paths
        .iter()
        .map(|path| shardmq_bench::compare::load(path))
        .collect::<Result<Vec<_>, _>>()?;
    print!("{}", shardmq_bench::compare::table(&runs));
    for file in shardmq_bench::compare::chart(&runs, output)? {
        eprintln!("wrote {}", file.display());
    }
    Ok(true)
}

/// The soft open-file limit of this process.
fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// How many processes the run needs: what was asked, or enough that each holds its clients
/// within the open-file limit (less a margin for the process's own descriptors).
fn processes_needed(requested: u32, clients: u64, open_files: u64) -> u32 {
    if requested > 0 {
        return requested;
    }
    let per_process = open_files.saturating_sub(128).max(1);
    clients.div_ceil(per_process).max(1) as u32
}

/// Worker I of K: drive every K-th client, report over stdout, obey stdin.
fn worker(clients: Vec<ClientPlan>, run_plan: RunPlan, threads: u16) -> Result<bool, String> {
    use std::io::{BufRead, Write};
    let runner = Runner::start(clients, run_plan, threads)?;
    let (ready, failed) = runner.wait_connected();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready {ready} {failed}").map_err(|e| e.to_string())?;
    stdout.flush().map_err(|e| e.to_string())?;
    let (sender, commands) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        match commands.recv_timeout(Duration::from_secs(1)) {
            Ok(line) if line.starts_with("start ") => {
                let numbers: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                if let [start, from, until] = numbers[..] {
                    runner.begin(start, from, until);
                }
            }
            Ok(line) if line == "stop" => break,
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The parent is gone: stop.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let (ready, sent, received, _) = runner.progress();
        writeln!(stdout, "progress {ready} {sent} {received}").map_err(|e| e.to_string())?;
        stdout.flush().map_err(|e| e.to_string())?;
    }
    let (results, failed) = runner.finish()?;
    let report = serde_json::to_string(&Report::new(&results, failed)).expect("serializable");
    writeln!(stdout, "report {report}").map_err(|e| e.to_string())?;
    Ok(true)
}

/// Runs `processes` workers of this same program and merges what they report.
fn parent(
    processes: u32,
    options: &Options,
    scenario_name: &str,
) -> Result<(Results, u64), String> {
    use std::io::{BufRead, Write};
    let executable = std::env::current_exe().map_err(|e| e.to_string())?;
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let (sender, lines) = std::sync::mpsc::channel::<(u32, String)>();
    let mut stdins = Vec::new();
    let mut children = Vec::new();
    for index in 0..processes {
        let mut child = std::process::Command::new(&executable)
            .args(&arguments)
            .args(["--worker", &index.to_string(), &processes.to_string()])
            .env("SHARDMQ_BENCH_PARENT", std::process::id().to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start worker {index}: {e}"))?;
        stdins.push(child.stdin.take().expect("piped stdin"));
        let stdout = child.stdout.take().expect("piped stdout");
        let sender = sender.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if sender.send((index, line)).is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    drop(sender);
    eprintln!("{scenario_name}: {processes} worker processes");
    let started = Instant::now();
    let receive = |timeout: Duration| {
        lines
            .recv_timeout(timeout)
            .map_err(|_| "a worker stopped answering".to_string())
    };
    let (mut ready, mut failed) = (0, 0);
    for _ in 0..processes {
        loop {
            let (_, line) = receive(Duration::from_secs(120))?;
            if let Some(rest) = line.strip_prefix("ready ") {
                let numbers: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect();
                ready += numbers.first().copied().unwrap_or(0);
                failed += numbers.get(1).copied().unwrap_or(0);
                break;
            }
        }
    }
    eprintln!(
        "connected {ready} ({failed} failed) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (start_ns, measure_from_ns, measure_until_ns) = window(options);
    for stdin in &mut stdins {
        writeln!(
            stdin,
            "start {start_ns} {measure_from_ns} {measure_until_ns}"
        )
        .map_err(|e| e.to_string())?;
    }
    let mut latest = vec![(0u64, 0u64, 0u64); processes as usize];
    let mut shown = (0u64, 0u64);
    let mut ending = Ending {
        end_ns: measure_until_ns,
        quiet_since: None,
    };
    let mut last_print = Instant::now();
    loop {
        let (index, line) = receive(Duration::from_secs(10))?;
        if let Some(rest) = line.strip_prefix("progress ") {
            let numbers: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect();
            if let [r, s, c] = numbers[..] {
                latest[index as usize] = (r, s, c);
            }
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let total = latest
                .iter()
                .fold((0, 0, 0), |acc, l| (acc.0 + l.0, acc.1 + l.1, acc.2 + l.2));
            print_progress(started, total.0, total.1 - shown.0, total.2 - shown.1, None);
            let moved = total.2 != shown.1;
            shown = (total.1, total.2);
            if ending.done(moved) {
                break;
            }
        }
    }
    for stdin in &mut stdins {
        let _ = writeln!(stdin, "stop");
    }
    let mut merged: Option<Results> = None;
    let mut failures = 0;
    let mut reports = 0;
    while reports < processes {
        let (_, line) = receive(Duration::from_secs(30))?;
        if let Some(json) = line.strip_prefix("report ") {
            let report: Report =
                serde_json::from_str(json).map_err(|e| format!("a worker's report: {e}"))?;
            let (results, failed) = report.into_results();
            failures += failed;
            reports += 1;
            match &mut merged {
                None => merged = Some(results),
                Some(merged) => merge(merged, results),
            }
        }
    }
    for mut child in children {
        let _ = child.wait();
    }
    Ok((merged.expect("at least one worker"), failures))
}

fn run(scenario: Scenario, options: Options) -> Result<bool, String> {
    reactor::check_kernel()?;
    let version = match options.mqtt.as_str() {
        "3.1.1" | "4" => ProtocolVersion::V3_1_1,
        "5" | "5.0" => ProtocolVersion::V5,
        other => return Err(format!("--mqtt {other}: expected 3.1.1 or 5")),
    };
    let qos = QoS::from_bits(options.qos).expect("clap checked the range");
    if options.size < generator::HEADER_LEN {
        return Err(format!(
            "--size must be at least {} bytes (the timing header)",
            generator::HEADER_LEN
        ));
    }
    let threads = options.threads.max(1);
    let (clients, streams) = plan(scenario, &options);
    let publishers = clients
        .iter()
        .filter(|c| matches!(c.role, Role::Publisher { .. }))
        .count() as u32;
    let mut options = options;
    if let Some(total) = options.total_rate {
        options.rate = total / f64::from(publishers.max(1));
    }
    let subscribers = clients
        .iter()
        .filter(|c| matches!(c.role, Role::Subscriber { .. }))
        .count() as u32;
    let processes = processes_needed(options.processes, clients.len() as u64, open_file_limit());
    let run_plan = RunPlan {
        hosts: options.hosts.clone(),
        sources: options.sources.iter().flatten().copied().collect(),
        version,
        qos,
        payload_bytes: options.size,
        rate_per_publisher: options.rate,
        connect_rate_per_second: (options.connect_rate / (u32::from(threads) * processes)).max(1),
        keep_alive_seconds: options.keep_alive,
        client_prefix: client_prefix(),
        username: options.username.clone(),
        password: options.password.clone(),
        clean_start: options.clean_start,
        session_expiry_seconds: options.session_expiry,
        epoch: Instant::now(),
    };
    if let Some(worker_of) = &options.worker {
        let (index, count) = (worker_of[0], worker_of[1].max(1));
        let mine = clients
            .into_iter()
            .filter(|client| client.index % count == index)
            .collect();
        return worker(mine, run_plan, threads);
    }
    let (results, failures) = if processes > 1 {
        parent(processes, &options, &format!("{scenario:?}"))?
    } else {
        let started = Instant::now();
        let runner = Runner::start(clients, run_plan, threads)?;
        let (ready, failed) = runner.wait_connected();
        eprintln!(
            "connected {ready} ({failed} failed) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let (start_ns, measure_from_ns, measure_until_ns) = window(&options);
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
        runner.finish()?
    };
    let sent: u64 = results.sent.values().sum();
    let (mut lost, mut duplicated, mut reordered, mut received) = (0, 0, 0, 0);
    if streams.is_empty() {
        // `sub` (and `conn`): nothing is expected, so count whatever arrived.
        for stream in results.streams.values() {
            duplicated += stream.duplicated;
            reordered += stream.reordered;
            received += stream.unique + stream.duplicated;
        }
    }
    for (subscriber, publisher) in &streams {
        let published = results.sent.get(publisher).copied().unwrap_or(0);
        let stream = results
            .streams
            .get(&(*subscriber, *publisher))
            .cloned()
            .unwrap_or_default();
        lost += published.saturating_sub(stream.unique);
        duplicated += stream.duplicated;
        reordered += stream.reordered;
        received += stream.unique + stream.duplicated;
    }
    let summary = Summary {
        label: options.label.clone(),
        scenario,
        clients: options.clients,
        publishers,
        subscribers,
        processes,
        qos: options.qos,
        mqtt: options.mqtt.clone(),
        payload_bytes: options.size,
        rate_per_publisher: options.rate,
        duration_seconds: options.duration,
        sent,
        received,
        lost,
        duplicated,
        reordered,
        offered_per_second: offered_per_second(scenario, publishers, subscribers, options.rate),
        messages_per_second: results.arrived_in_window as f64 / options.duration as f64,
        latency_us: percentiles(&results.end_to_end),
        acknowledgement_us: (options.qos > 0).then(|| percentiles(&results.acknowledgement)),
        connect_us: percentiles(&results.connect),
        connect_failures: failures,
    };
    let json = serde_json::to_string_pretty(&summary).expect("serializable");
    println!("{json}");
    if let Some(path) = &options.json {
        std::fs::write(path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &options.hgrm {
        std::fs::write(path, hgrm(&results.end_to_end))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if options.qos > 0 && lost > 0 {
        eprintln!("ERROR: {lost} QoS {} messages were lost", options.qos);
    }
    if options.qos == 2 && duplicated > 0 {
        eprintln!("ERROR: {duplicated} QoS 2 messages arrived twice");
    }
    if failures > 0 {
        eprintln!("ERROR: {failures} clients failed to connect or were disconnected");
    }
    // QoS 1 may duplicate by design; QoS 2 may not; neither may lose.
    Ok(failures == 0 && (options.qos == 0 || lost == 0) && !(options.qos == 2 && duplicated > 0))
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Run { scenario, options } => run(scenario, options),
        Command::Conn { options } => run(Scenario::Conn, options),
        Command::Pub { options } => run(Scenario::Pub, options),
        Command::Sub { options } => run(Scenario::Sub, options),
        Command::Compare { runs, output } => compare(&runs, &output),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("shardmq-bench: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_rate_per_scenario() {
        assert_eq!(offered_per_second(Scenario::Pairs, 50, 50, 200.0), 10_000.0);
        assert_eq!(
            offered_per_second(Scenario::Shared, 10, 10, 1000.0),
            10_000.0
        );
        assert_eq!(offered_per_second(Scenario::FanIn, 100, 1, 200.0), 20_000.0);
        assert_eq!(
            offered_per_second(Scenario::Wildcard, 10, 20, 1000.0),
            200_000.0
        );
    }

    #[test]
    fn source_ranges() {
        assert_eq!(parse_sources("127.0.0.9").unwrap().len(), 1);
        let range = parse_sources("127.0.0.2-127.0.1.1").unwrap();
        assert_eq!(range.len(), 256);
        assert_eq!(range[0].to_string(), "127.0.0.2");
        assert_eq!(range[255].to_string(), "127.0.1.1");
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
        assert!(
            parse_sources("10.0.0.0-10.2.0.0").is_err(),
            "more than 65,536"
        );
    }

    #[test]
    fn processes_follow_the_open_file_limit() {
        assert_eq!(processes_needed(0, 10, 20_000), 1);
        assert_eq!(processes_needed(0, 19_872, 20_000), 1);
        assert_eq!(processes_needed(0, 19_873, 20_000), 2);
        assert_eq!(processes_needed(0, 100_000, 20_000), 6);
        assert_eq!(processes_needed(3, 10, 20_000), 3, "an explicit count wins");
    }

    #[test]
    fn reports_round_trip_histograms_and_streams() {
        let mut results = Results {
            end_to_end: generator::histogram(),
            acknowledgement: generator::histogram(),
            connect: generator::histogram(),
            sent: [(1, 10)].into_iter().collect(),
            streams: Default::default(),
            received_in_window: 7,
            arrived_in_window: 8,
        };
        for value in [5, 5, 900, 12_345] {
            results.end_to_end.record(value).unwrap();
        }
        let mut stream = generator::Stream::default();
        for sequence in [0, 1, 1, 3] {
            stream.record(sequence);
        }
        results.streams.insert((2, 1), stream);
        let json = serde_json::to_string(&Report::new(&results, 4)).unwrap();
        let (back, failed) = serde_json::from_str::<Report>(&json)
            .unwrap()
            .into_results();
        assert_eq!(failed, 4);
        assert_eq!(back.end_to_end.len(), 4);
        assert_eq!(
            back.end_to_end.value_at_quantile(0.5),
            results.end_to_end.value_at_quantile(0.5)
        );
        assert_eq!(back.end_to_end.max(), results.end_to_end.max());
        let stream = &back.streams[&(2, 1)];
        assert_eq!((stream.unique, stream.duplicated), (3, 1));
        // Merging two workers adds their counts.
        let mut merged = back;
        let (other, _) = serde_json::from_str::<Report>(&json)
            .unwrap()
            .into_results();
        merge(&mut merged, other);
        assert_eq!(merged.end_to_end.len(), 8);
        assert_eq!(merged.sent[&1], 20);
        assert_eq!(merged.streams[&(2, 1)].unique, 6);
    }
}
