//! Worker processes: when one process cannot hold all clients within its open-file limit, the
//! parent re-executes this program as `--worker I K` processes and drives them over a line
//! protocol.
//!
//! Worker to parent, on its stdout: `ready READY FAILED` once connected, `progress READY SENT
//! RECEIVED` about once a second, and at the end `report JSON` (a `Report`, histograms as
//! (value, count) pairs). Parent to worker, on its stdin: `start START_NS FROM_NS UNTIL_NS`
//! (monotonic clock, shared by the processes of one host) and `stop`.
//! Owns: both ends of that protocol and the wire form of a worker's results.
//! Invariant: a worker whose parent is gone (stdin closed) stops, and the parent merges exactly
//! one report per worker.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use shardmq_bench::generator::{self, ClientPlan, Results, RunPlan};

use crate::cli::Options;
use crate::runner::{Ending, Runner, print_progress, window};
use crate::summary::merge;

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

/// Worker I of K: drive every K-th client, report over stdout, obey stdin.
pub(crate) fn worker(
    clients: Vec<ClientPlan>,
    run_plan: RunPlan,
    threads: u16,
) -> Result<bool, String> {
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
pub(crate) fn parent(
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

#[cfg(test)]
mod tests {
    use super::*;

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
