//! The command line of `shardmq-bench`: subcommands, scenarios and their options (clap).
//!
//! Owns: what the user may type and how it parses, including `--source` address ranges and the
//! hidden `--worker I K` that the parent passes to the processes it starts.
//! Never: acts on the options; planning, running and reporting read them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "shardmq-bench",
    version,
    about = "MQTT load generator with HDR latency histograms"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum Scenario {
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
pub(crate) struct Options {
    /// Broker address (repeatable: clients are spread round-robin).
    #[arg(long = "host", default_value = "127.0.0.1:1883")]
    pub(crate) hosts: Vec<SocketAddr>,
    /// Clients: pairs for `pairs`, publishers for `fan-in`, subscribers for `fan-out`,
    /// connections for `conn`.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub(crate) clients: u32,
    /// Publishers for `fan-out`, subscribers for `fan-in`.
    #[arg(long, default_value_t = 1)]
    pub(crate) peers: u32,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub(crate) qos: u8,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    pub(crate) mqtt: String,
    /// Payload bytes (at least 20: the timing header).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Messages per second per publisher.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) rate: f64,
    /// Messages per second of all publishers together; replaces --rate (divided evenly).
    #[arg(long)]
    pub(crate) total_rate: Option<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Seconds of publishing before measuring.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 5000)]
    pub(crate) connect_rate: u32,
    /// Source addresses to connect from: a list (127.0.0.2,127.0.0.3) or an IPv4 range
    /// (127.0.0.2-127.0.0.9), comma-separated or repeated.
    #[arg(long = "source", value_delimiter = ',', value_parser = parse_sources)]
    pub(crate) sources: Vec<Vec<IpAddr>>,
    /// Topic for `pub` and `sub`; `%i` is the client's index, `%c` its client identifier.
    #[arg(long)]
    pub(crate) topic: Option<String>,
    /// Connect over TLS (rustls, ALPN mqtt); the broker's certificate must name the host's
    /// IP address.
    #[arg(long)]
    pub(crate) tls: bool,
    /// Speak MQTT over WebSocket at this path (e.g. /mqtt; WebSocket over TLS with --tls).
    #[arg(long, value_name = "PATH", value_parser = parse_ws_path)]
    pub(crate) ws: Option<String>,
    /// The authority the broker's certificate must chain to (PEM), with --tls.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub(crate) ca_file: Option<std::path::PathBuf>,
    /// A client certificate chain (PEM) to present, with --tls and --key-file.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "key_file"])]
    pub(crate) cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub(crate) key_file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub(crate) username: Option<String>,
    #[arg(long)]
    pub(crate) password: Option<String>,
    /// Clean start (5.0) / clean session (3.1.1).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) clean_start: bool,
    /// MQTT 5 Session Expiry Interval in seconds.
    #[arg(long)]
    pub(crate) session_expiry: Option<u32>,
    /// Reactor threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: u16,
    #[arg(long, default_value_t = 60)]
    pub(crate) keep_alive: u16,
    /// A label for the broker under test, written into the JSON summary.
    #[arg(long, default_value = "broker")]
    pub(crate) label: String,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write the end-to-end latency percentile distribution (.hgrm) to this file.
    #[arg(long)]
    pub(crate) hgrm: Option<PathBuf>,
    /// Worker processes; 0 = as many as the open-file limit requires (one process holds at
    /// most that limit's worth of sockets).
    #[arg(long, default_value_t = 0)]
    pub(crate) processes: u32,
    /// Internal: run as worker I of K, driven over stdin/stdout by the parent process.
    #[arg(long, hide = true, num_args = 2, value_names = ["I", "K"])]
    pub(crate) worker: Option<Vec<u32>>,
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

/// A WebSocket request path: starts with '/', no spaces or control characters (it goes into
/// the request line as it is).
fn parse_ws_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(path.to_string())
    } else {
        Err(format!(
            "{path:?}: a path starts with '/' and has no spaces"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
