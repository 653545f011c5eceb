//! The shardmq node binary: command line, configuration and start-up wiring.
//!
//! At this stage it only parses its command line: `--help` and `--version`. Serving MQTT is the
//! single-node broker's work (see ARCHITECTURE.md, "Status").

use clap::Parser;

/// shardmq: a clustered, thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker.
#[derive(Debug, Parser)]
#[command(name = "shardmq", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "shardmq {}: the broker cannot serve yet; this build provides the MQTT codec only. \
         Run `shardmq --help` for the command line.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
