//! What a run amounts to: merging the results of threads and workers, counting lost,
//! duplicated and reordered messages per expected stream, and the output: the JSON summary on
//! stdout (and `--json`), the `.hgrm` percentile file (`--hgrm`), and errors on stderr.
//!
//! Owns: the summary's fields and formats (the `compare` subcommand reads them back).
//! Invariant: a lost QoS 1 or 2 message, a duplicated QoS 2 message or a failed client makes
//! the run fail.

use hdrhistogram::Histogram;
use serde::Serialize;
use shardmq_bench::generator::Results;

use crate::cli::{Options, Scenario};
use crate::plan::offered_per_second;

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

pub(crate) fn merge(into: &mut Results, from: Results) {
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

/// How many clients of each kind a run had, and over how many processes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Population {
    pub(crate) publishers: u32,
    pub(crate) subscribers: u32,
    pub(crate) processes: u32,
}

/// Counts what arrived against the expected `streams`, prints the summary, writes `--json` and
/// `--hgrm`, and reports errors. Returns whether the run passed.
pub(crate) fn conclude(
    scenario: Scenario,
    options: &Options,
    streams: &[(u32, u32)],
    population: Population,
    results: &Results,
    failures: u64,
) -> Result<bool, String> {
    let Population {
        publishers,
        subscribers,
        processes,
    } = population;
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
    for (subscriber, publisher) in streams {
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
