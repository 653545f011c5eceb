//! The shardmq node binary: command line, configuration and start-up wiring.
//!
//! `shardmq serve` starts one reactor thread per shard; each drives a `Shard` (the sans-IO
//! broker core) through the `ShardHandler` glue below. SIGINT and SIGTERM stop the reactors,
//! which send every client DISCONNECT 0x8B (5.0) and flush before exiting.

mod admin;
mod config;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin::{Control, NodeMessage};
use clap::{Parser, Subcommand};
use shardmq_net::reactor::{self, Actions, Event, Handler, Mailboxes, Reactor, ReactorConfig};
use shardmq_shards::cluster::NodeShard;
use shardmq_shards::{Input, Output, Shard, ShardConfig};
use tracing::{error, info, warn};

use config::Config;

/// shardmq: a clustered, thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker.
#[derive(Debug, Parser)]
#[command(name = "shardmq", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker. Without --config it uses the embedded defaults (listen on 0.0.0.0:1883).
    Serve {
        /// Address to accept MQTT on (repeatable); replaces `server.listen`.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Vec<std::net::SocketAddr>,
        /// Data-plane shards; default: one per available core.
        #[arg(long, value_name = "N")]
        shards: Option<u16>,
        /// A TOML file overriding any key of the embedded defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Keep persistent sessions and retained messages here across restarts; replaces
        /// `server.data_dir`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Manage a running node through its admin endpoint.
    Ctl {
        /// The node's admin endpoint (`admin.listen`).
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8883")]
        admin: String,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Members, their state and routes, the core followed and the replication lag.
    Status,
    /// Join the cluster through the core whose cluster port is ADDR.
    Join {
        #[arg(value_name = "ADDR:PORT")]
        address: std::net::SocketAddr,
    },
    /// Leave the cluster: the cores withdraw this node's routes at once.
    Leave,
    /// Set a cluster-wide setting through the cores' Raft group (ask a core): one of
    /// down_grace_seconds, forward_queue_max, takeover_timeout_ms.
    Set { key: String, value: String },
}

/// Drives one shard (and its cluster links) from a reactor.
struct ShardHandler {
    node: NodeShard,
    outputs: Vec<Output>,
}

impl ShardHandler {
    fn control(&mut self, now_ms: u64, control: Control) {
        match control {
            Control::Status(reply) => {
                let _ = reply.send(
                    self.node
                        .status(now_ms)
                        .map(|status| admin::status_json(&status)),
                );
            }
            Control::Join(address, reply) => {
                let _ = reply.send(self.node.join(now_ms, address));
            }
            Control::Leave(reply) => {
                let _ = reply.send(self.node.leave(now_ms));
            }
            Control::Set(key, value, reply) => {
                let _ = reply.send(self.node.set_setting(now_ms, &key, &value));
            }
        }
    }
}

impl Handler for ShardHandler {
    type Message = NodeMessage;

    fn event(&mut self, now_ms: u64, event: Event<NodeMessage>) {
        let input = match event {
            Event::Opened(connection) => Input::Opened { connection },
            Event::OpenedSide(connection) => {
                return self.node.cluster_accepted(now_ms, connection);
            }
            Event::Connected(connection, tag) => {
                return self.node.connected(now_ms, connection, tag);
            }
            Event::ConnectFailed(tag, error) => {
                return self.node.connect_failed(now_ms, tag, &error.to_string());
            }
            Event::Received(connection, bytes) => Input::Received { connection, bytes },
            Event::Closed(connection) => Input::Closed { connection },
            Event::Message(NodeMessage::Shard(message)) => Input::Shard(message),
            Event::Message(NodeMessage::Control(control)) => {
                return self.control(now_ms, control);
            }
            Event::Tick => Input::Tick,
            Event::Shutdown => Input::Shutdown,
        };
        self.node.handle(now_ms, input);
    }

    fn flush(&mut self, actions: &mut Actions<NodeMessage>) {
        self.node.take_outputs(&mut self.outputs);
        for output in self.outputs.drain(..) {
            match output {
                Output::Send { connection, bytes } => actions.send(connection, bytes),
                Output::Close { connection } => actions.close(connection),
                Output::HandOff {
                    connection,
                    shard,
                    bytes,
                } => actions.hand_off(connection, shard, bytes),
                Output::ToShard { shard, message } => {
                    actions.post(shard, NodeMessage::Shard(message))
                }
                Output::Connect { address, tag } => actions.connect(address, None, tag),
                Output::ToNode { .. } | Output::SessionToNode { .. } | Output::NodeRoute { .. } => {
                    unreachable!("the node shard carries out cluster outputs itself")
                }
            }
        }
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.node.next_deadline_ms().map(|ms| ms * 1000)
    }
}

/// The snapshot files of a data directory, created if missing: `shard-N.snapshot`.
fn read_snapshots(directory: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    std::fs::create_dir_all(directory)
        .map_err(|e| format!("data directory {}: {e}", directory.display()))?;
    // Fail now, not at shutdown, if the directory cannot be written.
    let probe = directory.join(".write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            format!(
                "data directory {} is not writable: {e}",
                directory.display()
            )
        })?;
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(directory).map_err(|e| format!("{}: {e}", directory.display()))?
    {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("shard-") && name.ends_with(".snapshot") {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            files.push((path, bytes));
        }
    }
    files.sort();
    Ok(files)
}

/// Writes shard `index`'s snapshot atomically: a temporary file, fsync, rename, fsync of the
/// directory.
fn write_snapshot(directory: &Path, index: u16, bytes: &[u8]) -> std::io::Result<()> {
    write_file(directory, &format!("shard-{index}.snapshot"), bytes)
}

/// The Raft state a core saves at a clean shutdown (see `Consensus::save`).
const RAFT_STATE: &str = "raft.state";

/// Reads and removes the Raft state of the last clean shutdown: it is good for one start
/// only, since a run that crashes writes none and must not find the old one.
fn take_raft_state(directory: &Path) -> Option<Vec<u8>> {
    let path = directory.join(RAFT_STATE);
    let bytes = std::fs::read(&path).ok()?;
    if let Err(error) = std::fs::remove_file(&path) {
        warn!(path = %path.display(), %error, "cannot remove the Raft state: not taken up");
        return None;
    }
    Some(bytes)
}

/// Writes `name` in `directory` atomically (a temporary file, fsync, rename, fsync).
fn write_file(directory: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = directory.join(name);
    let temporary = directory.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    std::fs::File::open(directory)?.sync_all()
}

fn serve(config: Config) -> Result<(), String> {
    reactor::check_kernel()?;
    let shard_count = match config.server.shards {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(usize::from(u16::MAX)) as u16,
        n => n,
    };
    let cluster = if config.cluster.enabled {
        Some(config.cluster_settings()?)
    } else {
        None
    };
    let admin_listen = config.admin_listen()?;
    let mailboxes: Arc<Mailboxes<NodeMessage>> =
        Mailboxes::new(shard_count, config.reactor.mailbox_capacity)
            .map_err(|e| format!("cannot create the shard mailboxes: {e}"))?;
    let cores = core_ids(config.server.pin_cores);
    let data_dir =
        (!config.server.data_dir.is_empty()).then(|| PathBuf::from(&config.server.data_dir));
    let snapshots = Arc::new(match &data_dir {
        Some(directory) => read_snapshots(directory)?,
        None => Vec::new(),
    });
    let mut raft_state = match (&data_dir, &cluster) {
        (Some(directory), Some(_)) => take_raft_state(directory),
        _ => None,
    };
    let epoch = Instant::now();
    // Each reactor is built on its own thread: its ring accepts submissions only from the
    // thread that created it (IORING_SETUP_SINGLE_ISSUER). Start-up errors (an address in use,
    // an old kernel) come back before the node reports that it serves.
    let (ready_sender, ready) = std::sync::mpsc::channel::<(u16, Result<(), String>)>();
    let mut threads = Vec::new();
    for index in 0..shard_count {
        let reactor_config = ReactorConfig {
            index,
            listen: config.server.listen.clone(),
            // Shard 0 serves the cluster port: it holds the agent, and inbound links land
            // where the route log and the per-sender delivery numbers live.
            side_listen: match (&cluster, index) {
                (Some(_), 0) => Some(config.cluster.listen),
                _ => None,
            },
            backlog: config.server.backlog,
            ring_entries: config.reactor.ring_entries,
            buffer_count: config.reactor.buffer_count,
            buffer_size: config.reactor.buffer_size,
            core: cores.get(usize::from(index) % cores.len().max(1)).copied(),
            epoch,
            shutdown_grace: Duration::from_secs(config.server.shutdown_grace_seconds),
        };
        let mut shard = Shard::new(ShardConfig {
            index,
            shard_count,
            node: config.cluster.node_id_if_enabled(),
            takeover_timeout_ms: config.cluster.takeover_timeout_ms,
            limits: config.limits(),
            shared_strategy: config.shared_strategy()?,
        });
        for (path, bytes) in snapshots.iter() {
            match shard.restore(bytes) {
                Ok((sessions, retained, warning)) => {
                    if sessions > 0 || (index == 0 && retained > 0) {
                        info!(shard = index, file = %path.display(), sessions, retained, "restored from the snapshot");
                    }
                    if let Some(warning) = warning {
                        warn!(shard = index, file = %path.display(), "{warning}");
                    }
                }
                Err(error) => {
                    warn!(shard = index, file = %path.display(), %error, "snapshot skipped")
                }
            }
        }
        let mut node = match &cluster {
            None => NodeShard::standalone(shard, index, shard_count),
            Some(settings) => NodeShard::clustered(
                shard,
                index,
                shard_count,
                settings.clone(),
                random_seed(index),
                epoch.elapsed().as_millis() as u64,
            ),
        };
        if index == 0
            && let Some(bytes) = raft_state.take()
            && let Err(error) = node.restore_raft(&bytes)
        {
            warn!(%error, "the Raft state of the last shutdown is not taken up: joining as a new voter");
        }
        let handler = ShardHandler {
            node,
            outputs: Vec::new(),
        };
        let mailboxes = mailboxes.clone();
        let ready_sender = ready_sender.clone();
        let data_dir = data_dir.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(
                move || match Reactor::new(reactor_config, mailboxes, handler) {
                    Ok(reactor) => {
                        let _ = ready_sender.send((index, Ok(())));
                        let handler = reactor.run()?;
                        if let Some(directory) = data_dir {
                            let bytes = handler.node.shard.snapshot();
                            write_snapshot(&directory, index, &bytes)?;
                            info!(shard = index, bytes = bytes.len(), "snapshot written");
                            if let Some(state) = handler.node.raft_state() {
                                write_file(&directory, RAFT_STATE, &state)?;
                                info!(bytes = state.len(), "Raft state written");
                            }
                        }
                        Ok::<(), std::io::Error>(())
                    }
                    Err(e) => {
                        let _ = ready_sender.send((index, Err(e.to_string())));
                        Ok(())
                    }
                },
            )
            .map_err(|e| format!("cannot start shard thread {index}: {e}"))?;
        threads.push(thread);
    }
    drop(ready_sender);
    let mut startup_error = None;
    for _ in 0..shard_count {
        match ready.recv() {
            Ok((_, Ok(()))) => {}
            Ok((index, Err(e))) => startup_error = Some(format!("shard {index}: {e}")),
            Err(_) => startup_error = Some("a shard thread ended during start-up".into()),
        }
    }
    if startup_error.is_none()
        && let Some(address) = admin_listen
        && let Err(message) = admin::start(address, mailboxes.clone())
    {
        startup_error = Some(message);
    }
    if let Some(message) = startup_error {
        mailboxes.stop();
        for thread in threads {
            let _ = thread.join();
        }
        return Err(message);
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let stopper = mailboxes.clone();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            info!(signal, "stopping: disconnecting clients");
            stopper.stop();
        }
    });
    let listen: Vec<String> = config
        .server
        .listen
        .iter()
        .map(ToString::to_string)
        .collect();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        shards = shard_count,
        listen = listen.join(","),
        "shardmq serving MQTT"
    );
    if let Some(settings) = &cluster {
        info!(
            cluster = config.cluster.name,
            node = settings.link.member.node,
            role = config.cluster.role,
            cluster_listen = %config.cluster.listen,
            advertise = settings.link.member.cluster_address,
            seeds = ?settings.seeds,
            "cluster member"
        );
    }
    let mut failed = false;
    for (index, thread) in threads.into_iter().enumerate() {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(shard = index, error = %e, "shard stopped with an error");
                failed = true;
                mailboxes.stop();
            }
            Err(_) => {
                error!(shard = index, "shard thread panicked");
                failed = true;
                mailboxes.stop();
            }
        }
    }
    if let (Some(directory), false) = (&data_dir, failed) {
        // Snapshots of shards that no longer exist (a larger shard count before) were read at
        // start and their sessions now live in the current files.
        for (path, _) in snapshots.iter() {
            let index: Option<u16> = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
                n.strip_prefix("shard-")?
                    .strip_suffix(".snapshot")?
                    .parse()
                    .ok()
            });
            if index.is_some_and(|index| index >= shard_count) {
                let _ = std::fs::remove_file(path);
            }
        }
        info!(directory = %directory.display(), "state saved");
    }
    info!("shardmq stopped");
    if failed {
        Err("a shard failed; see the log above".into())
    } else {
        Ok(())
    }
}

/// A seed for a shard's cluster epoch and link nonces: the standard library's randomly keyed
/// hasher (seeded from the OS), so nonces differ across starts and nodes.
fn random_seed(index: u16) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((index, Instant::now()))
}

fn core_ids(pin: bool) -> Vec<usize> {
    if !pin {
        return Vec::new();
    }
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|core| core.id)
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Ctl { admin, command } => {
            let (method, path) = match &command {
                CtlCommand::Cluster(ClusterCommand::Status) => {
                    ("GET", "/api/v1/cluster/status".to_string())
                }
                CtlCommand::Cluster(ClusterCommand::Join { address }) => {
                    ("POST", format!("/api/v1/cluster/join?address={address}"))
                }
                CtlCommand::Cluster(ClusterCommand::Leave) => {
                    ("POST", "/api/v1/cluster/leave".to_string())
                }
                CtlCommand::Cluster(ClusterCommand::Set { key, value }) => (
                    "POST",
                    format!("/api/v1/cluster/settings?key={key}&value={value}"),
                ),
            };
            match admin::ctl(&admin, method, &path) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("shardmq ctl: {message}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Serve {
            listen,
            shards,
            config,
            data_dir,
        } => {
            let mut loaded = match Config::load(config.as_deref()) {
                Ok(loaded) => loaded,
                Err(message) => {
                    eprintln!("shardmq: {message}");
                    return ExitCode::from(2);
                }
            };
            if !listen.is_empty() {
                loaded.server.listen = listen;
            }
            if let Some(shards) = shards {
                loaded.server.shards = shards;
            }
            if let Some(data_dir) = data_dir {
                loaded.server.data_dir = data_dir.to_string_lossy().into_owned();
            }
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(&loaded.server.log));
            let filter = match filter {
                Ok(filter) => filter,
                Err(error) => {
                    eprintln!("shardmq: `server.log` is not a valid log filter: {error}");
                    return ExitCode::from(2);
                }
            };
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            match serve(loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    error!("{message}");
                    eprintln!("shardmq: {message}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
