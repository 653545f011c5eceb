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
use serde::Serialize;
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
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of publishing before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 5000)]
    connect_rate: u32,
    /// Source addresses to connect from (comma-separated or repeated), e.g. 127.0.0.2,127.0.0.3.
    #[arg(long = "source", value_delimiter = ',')]
    sources: Vec<IpAddr>,
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
}

#[derive(Debug, Serialize)]
struct Summary {
    label: String,
    scenario: Scenario,
    clients: u32,
    publishers: u32,
    subscribers: u32,
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
        role: Role::Subscriber { filter },
    };
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
    let total_clients = clients.len() as u64;
    let publishers = clients
        .iter()
        .filter(|c| matches!(c.role, Role::Publisher { .. }))
        .count() as u32;
    let subscribers = clients
        .iter()
        .filter(|c| matches!(c.role, Role::Subscriber { .. }))
        .count() as u32;
    let epoch = Instant::now();
    let run_plan = RunPlan {
        hosts: options.hosts.clone(),
        sources: options.sources.clone(),
        version,
        qos,
        payload_bytes: options.size,
        rate_per_publisher: options.rate,
        connect_rate_per_second: (options.connect_rate / u32::from(threads)).max(1),
        keep_alive_seconds: options.keep_alive,
        client_prefix: format!("bench-{}-", std::process::id()),
        epoch,
    };
    let mailboxes: Arc<Mailboxes<Control>> =
        Mailboxes::new(threads, 1024).map_err(|e| e.to_string())?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut per_thread: Vec<Vec<ClientPlan>> = vec![Vec::new(); usize::from(threads)];
    for (position, client) in clients.into_iter().enumerate() {
        per_thread[position % usize::from(threads)].push(client);
    }
    let mut handles = Vec::new();
    for (index, clients) in per_thread.into_iter().enumerate() {
        let config = ReactorConfig {
            index: index as u16,
            listen: Vec::new(),
            backlog: 1,
            ring_entries: 4096,
            buffer_count: 4096,
            buffer_size: 16384,
            core: None,
            epoch,
            shutdown_grace: Duration::from_millis(500),
        };
        let (mailboxes, shared, run_plan) = (mailboxes.clone(), shared.clone(), run_plan.clone());
        handles.push(std::thread::spawn(move || -> Result<Results, String> {
            let generator = Generator::new(run_plan, clients, shared);
            let reactor = Reactor::new(config, mailboxes, generator).map_err(|e| e.to_string())?;
            Ok(reactor.run().map_err(|e| e.to_string())?.into_results())
        }));
    }

    // Connect phase: until every client is ready or failed, or a minute passes.
    let connect_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let state = shared.lock().expect("shared");
        if state.ready + state.failed >= total_clients || Instant::now() >= connect_deadline {
            eprintln!(
                "connected {} of {total_clients} ({} failed) in {:.1} s",
                state.ready,
                state.failed,
                epoch.elapsed().as_secs_f64()
            );
            break;
        }
    }
    let now_ns = epoch.elapsed().as_nanos() as u64;
    let start_ns = now_ns + 100_000_000;
    let measure_from_ns = start_ns + options.warmup * 1_000_000_000;
    let measure_until_ns = measure_from_ns + options.duration * 1_000_000_000;
    if scenario != Scenario::Conn {
        for target in 0..threads {
            mailboxes.post(
                target,
                Control::Start {
                    start_ns,
                    measure_from_ns,
                    measure_until_ns,
                },
            );
        }
    }
    // Progress, once a second, until the measured window ends; then drain until nothing more
    // arrives (at most 5 s).
    let end = Duration::from_nanos(measure_until_ns);
    let mut last = (0u64, 0u64);
    let mut quiet_since: Option<Instant> = None;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let mut state = shared.lock().expect("shared");
        let interval = state.interval.take();
        let (p50, p99) = interval
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or((0, 0), |h| {
                (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
            });
        eprintln!(
            "{:>6.1} s  connected {:>7}  out {:>9}/s  in {:>9}/s  p50 {:>7} us  p99 {:>7} us",
            epoch.elapsed().as_secs_f64(),
            state.ready,
            state.sent - last.0,
            state.received - last.1,
            p50,
            p99
        );
        let moved = state.received != last.1;
        last = (state.sent, state.received);
        drop(state);
        if epoch.elapsed() >= end {
            if moved {
                quiet_since = None;
            } else {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(1)
                    || epoch.elapsed() >= end + Duration::from_secs(5)
                {
                    break;
                }
            }
            if epoch.elapsed() >= end + Duration::from_secs(5) {
                break;
            }
        }
    }
    shared.lock().expect("shared").stopping = true;
    mailboxes.stop();
    let mut results: Option<Results> = None;
    for handle in handles {
        let part = handle
            .join()
            .map_err(|_| "a generator thread panicked".to_string())??;
        match &mut results {
            None => results = Some(part),
            Some(results) => merge(results, part),
        }
    }
    let results = results.expect("at least one thread");
    let sent: u64 = results.sent.values().sum();
    let (mut lost, mut duplicated, mut reordered, mut received) = (0, 0, 0, 0);
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
    let failures = shared.lock().expect("shared").failed;
    let summary = Summary {
        label: options.label.clone(),
        scenario,
        clients: options.clients,
        publishers,
        subscribers,
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
        offered_per_second: f64::from(publishers) * options.rate * f64::from(subscribers.max(1))
            / if scenario == Scenario::Pairs {
                f64::from(subscribers.max(1))
            } else {
                1.0
            },
        messages_per_second: results.arrived_in_window as f64 / options.duration as f64,
        latency_us: percentiles(&results.end_to_end),
        acknowledgement_us: (options.qos > 0).then(|| percentiles(&results.acknowledgement)),
        connect_us: percentiles(&results.connect),
        connect_failures: failures,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).expect("serializable")
    );
    if let Some(path) = &options.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&summary).expect("serializable"),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &options.hgrm {
        std::fs::write(path, hgrm(&results.end_to_end))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // QoS 1 may duplicate by design; QoS 2 may not; neither may lose.
    let healthy =
        failures == 0 && (options.qos == 0 || lost == 0) && !(options.qos == 2 && duplicated > 0);
    if options.qos > 0 && lost > 0 {
        eprintln!("ERROR: {lost} QoS {} messages were lost", options.qos);
    }
    if options.qos == 2 && duplicated > 0 {
        eprintln!("ERROR: {duplicated} QoS 2 messages arrived twice");
    }
    Ok(healthy)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Run { scenario, options } = cli.command;
    match run(scenario, options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("shardmq-bench: {message}");
            ExitCode::from(2)
        }
    }
}
