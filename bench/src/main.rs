//! shardmq-bench: an MQTT load generator with HDR latency histograms, on shardmq's io_uring
//! reactor.
//!
//! `shardmq-bench run SCENARIO` connects the scenario's clients, lets them warm up, publishes
//! on an open-loop schedule for the measured duration, drains, and reports: messages per
//! second, end-to-end and acknowledgement latency percentiles in microseconds, connect
//! latency, and lost / duplicated / reordered messages per QoS. A lost QoS 1 or 2 message makes
//! the exit status 1.

mod cli;
mod plan;
mod runner;
mod summary;
mod workers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use shardmq_bench::generator::{self, Role, RunPlan};
use shardmq_net::mqtt::{ProtocolVersion, QoS};
use shardmq_net::reactor;

use cli::{Cli, Command, Options, Scenario};
use summary::Population;

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
    let (clients, streams) = plan::plan(scenario, &options);
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
    let processes = plan::processes_needed(
        options.processes,
        clients.len() as u64,
        plan::open_file_limit(),
    );
    let run_plan = RunPlan {
        hosts: options.hosts.clone(),
        sources: options.sources.iter().flatten().copied().collect(),
        version,
        qos,
        payload_bytes: options.size,
        rate_per_publisher: options.rate,
        connect_rate_per_second: (options.connect_rate / (u32::from(threads) * processes)).max(1),
        keep_alive_seconds: options.keep_alive,
        client_prefix: plan::client_prefix(),
        username: options.username.clone(),
        password: options.password.clone(),
        tls: tls_config(&options)?,
        ws_path: options.ws.clone(),
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
        return workers::worker(mine, run_plan, threads);
    }
    let (results, failures) = if processes > 1 {
        workers::parent(processes, &options, &format!("{scenario:?}"))?
    } else {
        runner::run_here(scenario, &options, clients, run_plan, threads)?
    };
    let population = Population {
        publishers,
        subscribers,
        processes,
    };
    summary::conclude(scenario, &options, &streams, population, &results, failures)
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

/// The TLS client configuration of `--tls` (`--ca-file`, `--cert-file`, `--key-file`).
fn tls_config(
    options: &crate::cli::Options,
) -> Result<Option<std::sync::Arc<shardmq_net::rustls::ClientConfig>>, String> {
    if !options.tls {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let ca_file = options
        .ca_file
        .as_deref()
        .ok_or("--tls needs --ca-file (the authority of the broker's certificate)")?;
    let roots = shardmq_net::ingress::tls::roots_from_pem(&read(ca_file)?)?;
    let identity = match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => Some((
            shardmq_net::ingress::tls::certificates_from_pem(&read(cert)?)?,
            shardmq_net::ingress::tls::private_key_from_pem(&read(key)?)?,
        )),
        _ => None,
    };
    let mut config = shardmq_net::ingress::tls::client_config(roots, identity)?;
    // WebSocket over TLS speaks HTTP first: a wss listener offers http/1.1, not mqtt.
    config.alpn_protocols = if options.ws.is_some() {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![shardmq_net::ingress::tls::ALPN_MQTT.to_vec()]
    };
    Ok(Some(std::sync::Arc::new(config)))
}
