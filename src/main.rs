//! The shardmq node binary: command line, configuration and start-up wiring.
//!
//! `shardmq serve` starts one reactor thread per shard; each drives a `Shard` (the sans-IO
//! broker core) through the `ShardHandler` glue below. SIGINT and SIGTERM stop the reactors,
//! which send every client DISCONNECT 0x8B (5.0) and flush before exiting.

mod admin;
mod api;
mod auth;
mod config;
mod ctl;
mod dashboard;
mod durable;
mod ingress;
mod layout;
mod log_io;
mod metrics;
mod passwd;
mod resolve;
mod supervise;
mod sys;
mod trace;
mod trace_api;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin::{Control, NodeMessage};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use shardmq_net::reactor::admission::{Admission, ListenerLimits};
use shardmq_net::reactor::{
    self, Actions, Event, FileOp, Handler, Mailboxes, Reactor, ReactorConfig,
};
use shardmq_shards::cluster::consensus;
use shardmq_shards::cluster::{
    Answer, NodeInput, NodeOutput, NodeShard, RaftFileCall, RaftFileOp, RaftStoreFiles, Request,
};
use shardmq_shards::{Shard, ShardConfig};
use tracing::{error, info, warn};

use config::Config;
use supervise::Watched;

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
        /// Start even if the durable log is damaged in a way a crash does not explain,
        /// with what replayed before the damage; sets `storage.recover_damaged`.
        #[arg(long)]
        recover_damaged: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Add, change or delete a user of a password file (like mosquitto_passwd). Writes
    /// argon2id (Mosquitto 2.1's parameters), or `$7$` PBKDF2-SHA512 with --pbkdf2.
    Passwd {
        /// Create the file, replacing one that exists.
        #[arg(short = 'c')]
        create: bool,
        /// Delete USER.
        #[arg(short = 'D', conflicts_with_all = ["batch", "create"])]
        delete: bool,
        /// Batch mode: take the password from the command line.
        #[arg(short = 'b', requires = "password")]
        batch: bool,
        /// Write `$7$` PBKDF2-SHA512 (readable by Mosquitto 2.0) instead of argon2id.
        #[arg(long)]
        pbkdf2: bool,
        file: PathBuf,
        user: String,
        /// With -b only.
        password: Option<String>,
    },
    /// Manage a running node through its admin endpoint.
    Ctl {
        /// The node's admin endpoint; default: `admin.listen` of --config, else
        /// 127.0.0.1:8883.
        #[arg(long, value_name = "ADDR:PORT")]
        admin: Option<String>,
        /// A file holding the admin token; default: SHARDMQ_ADMIN_TOKEN, else
        /// `admin.token_file` of --config.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The node's configuration file, for its admin address and token file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: CtlCommand,
        /// Print the endpoint's JSON answer instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Nodes, clients, subscriptions, routes, retained messages.
    #[command(flatten)]
    Inspect(ctl::Inspect),
    /// Per-client traces of this node (every packet of one client, to a file).
    #[command(subcommand)]
    Trace(TraceCommand),
}

#[derive(Debug, Subcommand)]
enum TraceCommand {
    /// Trace CLIENT_ID's packets for N minutes (1 to 60).
    Start {
        client_id: String,
        #[arg(long, value_name = "N")]
        minutes: u64,
    },
    /// The node's traces: client, start, end, bytes written, state.
    List,
    /// Print CLIENT_ID's trace file.
    Get { client_id: String },
    /// Stop CLIENT_ID's trace (its file is kept).
    Stop { client_id: String },
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

/// Drives one shard (and its cluster links) from a reactor: reactor events become the node
/// layer's inputs, its outputs the reactor's actions, one for one. Operator requests wait
/// here, by ticket, for the node layer's answer.
struct ShardHandler {
    node: NodeShard,
    outputs: Vec<NodeOutput>,
    requests: BTreeMap<u64, Control>,
    next_ticket: u64,
    /// The data directory the Raft store's file calls go to (shard 0 of a core with one).
    raft_directory: Option<PathBuf>,
    /// The shard's durable log I/O, with a data directory.
    log: Option<ShardLog>,
    /// The time of the last event, for the log's interval syncs.
    now_ms: u64,
    /// The stacks (TLS) of the client connections on layered listeners.
    ingress: ingress::Ingress,
    /// The node inputs one reactor event became (reused).
    inputs: Vec<NodeInput>,
    /// The verifier pool, and this handler's shard (where the pool answers).
    auth: Option<(Arc<auth::Auth>, u16)>,
    /// The admin thread's questions to other nodes (shard 0) waiting for their answers, by
    /// the id sent with them: the node asked and where its answer goes. At most
    /// [`ASKS_MAX`]; one whose asker stopped waiting is dropped at the next question.
    asks: BTreeMap<u64, (u32, AnswerReply)>,
    next_ask: u64,
    /// Where other nodes' questions to this node go (shard 0, with an admin endpoint).
    peer_queries: Option<tokio::sync::mpsc::Sender<api::PeerQuery>>,
    /// Other nodes' questions answered with an error because the admin thread's queue was
    /// full or gone.
    peer_queries_refused: u64,
    /// The seed resolver (shard 0 of a member with seed names).
    resolver: Option<Arc<resolve::Resolver>>,
}

/// Where a node's answer to the admin thread's question goes.
type AnswerReply = tokio::sync::oneshot::Sender<Result<Vec<u8>, String>>;

/// Questions to other nodes that shard 0 keeps waiting at once; one past it is refused.
const ASKS_MAX: usize = 256;

/// A shard's log I/O: the calls it makes on the reactor's file queue 0.
struct ShardLog {
    files: log_io::LogFiles,
}

/// The reactor's file queue of the cores' Raft store (0 is the shard log's).
const RAFT_FILE_QUEUE: u16 = 1;

/// The reactor file slot of the Raft store's slot 0; its slot 1 is the next (slots 0 and 1 of
/// each reactor are the shard log's).
const RAFT_FILE_SLOT_FIRST: u32 = 2;

impl ShardHandler {
    fn new(node: NodeShard, log: Option<ShardLog>, ingress: ingress::Ingress) -> Self {
        Self {
            node,
            outputs: Vec::new(),
            requests: BTreeMap::new(),
            next_ticket: 0,
            log,
            now_ms: 0,
            raft_directory: None,
            ingress,
            inputs: Vec::new(),
            auth: None,
            asks: BTreeMap::new(),
            next_ask: 0,
            peer_queries: None,
            peer_queries_refused: 0,
            resolver: None,
        }
    }

    /// Seed names shard 0 asks about go to `resolver`.
    fn with_resolver(mut self, resolver: Option<Arc<resolve::Resolver>>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Shard 0's request to resolve a seed name: queued for the resolver thread, or failed
    /// now (an input of this batch) if it cannot be.
    fn resolve(&mut self, index: usize, name: shardmq_shards::cluster::SeedName) {
        let queued = match &self.resolver {
            Some(resolver) => resolver.submit(index, name),
            None => Err("no seed resolver on this shard".to_string()),
        };
        if let Err(error) = queued {
            self.inputs.push(NodeInput::Resolved {
                index,
                result: Err(error),
            });
        }
    }

    /// Other nodes' questions to this one go to the admin thread through `queries`.
    fn with_peer_queries(
        mut self,
        queries: Option<tokio::sync::mpsc::Sender<api::PeerQuery>>,
    ) -> Self {
        self.peer_queries = queries;
        self
    }

    /// The admin thread asks another node: filed under a new id for the node layer to send,
    /// or refused at once when [`ASKS_MAX`] wait already.
    fn ask_node(&mut self, node: u32, query: Vec<u8>, reply: AnswerReply) -> Option<NodeInput> {
        self.asks.retain(|_, (_, reply)| !reply.is_closed());
        if self.asks.len() >= ASKS_MAX {
            warn!(
                node,
                waiting = ASKS_MAX,
                "a query to a node refused: too many wait for answers"
            );
            let _ = reply.send(Err(format!(
                "{ASKS_MAX} queries to nodes are waiting for answers already: try again later"
            )));
            return None;
        }
        let id = self.next_ask;
        self.next_ask += 1;
        self.asks.insert(id, (node, reply));
        Some(NodeInput::AskNode { id, node, query })
    }

    /// Node `node`'s answer to question `id`, for the admin thread if it still waits; an
    /// answer from another node than the one asked is dropped.
    fn node_answered(&mut self, id: u64, node: u32, answer: Result<Vec<u8>, String>) {
        match self.asks.get(&id) {
            Some(&(asked, _)) if asked == node => {
                if let Some((_, reply)) = self.asks.remove(&id) {
                    let _ = reply.send(answer);
                }
            }
            Some(&(asked, _)) => {
                warn!(
                    id,
                    asked, node, "an answer to a query from another node than asked: dropped"
                );
            }
            None => {}
        }
    }

    /// Another node's question: to the admin thread, or answered at once with why not.
    fn node_asked(&mut self, connection: u64, node: u32, id: u64, query: Vec<u8>) {
        use tokio::sync::mpsc::error::TrySendError;
        let refusal = match &self.peer_queries {
            None => {
                "this node's admin endpoint is off (admin.listen = \"\"): it answers no queries"
            }
            Some(queries) => match queries.try_send(api::PeerQuery {
                connection,
                node,
                id,
                query,
            }) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => "this node's admin thread is busy: ask again later",
                Err(TrySendError::Closed(_)) => "this node's admin endpoint is not running",
            },
        };
        self.peer_queries_refused += 1;
        warn!(
            node,
            id,
            refused = self.peer_queries_refused,
            reason = refusal,
            "a query from a node answered with an error"
        );
        self.inputs.push(NodeInput::AnswerNode {
            connection,
            id,
            answer: Err(refusal.to_string()),
        });
    }

    /// Credentials the shard asks about go to `auth`'s pool, answers to shard `index`.
    fn with_auth(mut self, auth: Arc<auth::Auth>, index: u16) -> Self {
        self.auth = Some((auth, index));
        self
    }

    /// A shard's request to check credentials: answered now (the cache, a full queue) as
    /// an input of this batch, or later through the mailbox (`NodeMessage::Verified`).
    fn verify(
        &mut self,
        connection: u64,
        ticket: u64,
        credentials: shardmq_shards::auth::Credentials,
    ) {
        let verdict = match &self.auth {
            Some((auth, index)) => match auth.submit(*index, connection, ticket, credentials) {
                auth::Submitted::Queued => return,
                auth::Submitted::Answered(verdict) => verdict,
            },
            None => {
                error!(
                    connection,
                    "credentials to check, but no verifier pool: refused"
                );
                shardmq_shards::auth::Verdict::Unavailable
            }
        };
        self.inputs.push(NodeInput::Verified {
            connection,
            ticket,
            verdict,
        });
    }

    /// Carries out the node's outputs: client bytes through their connection's stack (if it
    /// has one), everything else as the reactor's actions.
    fn apply_outputs(&mut self, outputs: &mut Vec<NodeOutput>, actions: &mut Actions<NodeMessage>) {
        for output in outputs.drain(..) {
            match output {
                NodeOutput::Send { connection, bytes } => {
                    if let Some(bytes) = self.ingress.outgoing(connection, bytes, &mut self.inputs)
                    {
                        actions.send(connection, bytes);
                    }
                }
                NodeOutput::Close { connection } => {
                    self.ingress.close(connection, actions);
                    actions.close(connection);
                }
                NodeOutput::HandOff {
                    connection,
                    shard,
                    bytes,
                } => match self.ingress.hand_off(connection, bytes, actions) {
                    ingress::HandOff::Plain(bytes) => actions.hand_off(connection, shard, bytes),
                    ingress::HandOff::Carrying(carried) => actions.hand_off_carrying(
                        connection,
                        shard,
                        Bytes::new(),
                        NodeMessage::Carried(carried),
                    ),
                },
                NodeOutput::Post { shard, message } => {
                    actions.post(shard, NodeMessage::Shard(message))
                }
                NodeOutput::Connect { address, tag } => actions.connect(address, None, tag),
                NodeOutput::Reply { ticket, answer } => self.reply(ticket, answer),
                NodeOutput::RaftFiles(call) => self.raft_files(actions, call),
                NodeOutput::Verify {
                    connection,
                    ticket,
                    credentials,
                } => self.verify(connection, ticket, credentials),
                NodeOutput::NodeQuery {
                    connection,
                    node,
                    id,
                    query,
                } => self.node_asked(connection, node, id, query),
                NodeOutput::NodeAnswer { id, node, answer } => self.node_answered(id, node, answer),
                NodeOutput::Resolve { index, name } => self.resolve(index, name),
            }
        }
    }

    /// Gives the node the inputs that the ingress layer made of an event.
    fn handle_inputs(&mut self, now_ms: u64) {
        let mut inputs = std::mem::take(&mut self.inputs);
        for input in inputs.drain(..) {
            self.node.handle(now_ms, input);
        }
        self.inputs = inputs;
    }

    /// After the reactor stopped (it waits for its file queues to drain, up to
    /// `FILES_SHUTDOWN_MAX`): what the shard recorded since its last call (disconnecting its
    /// clients), written and synced with blocking calls. Not when a call was abandoned: its
    /// writes may still land, and later ones must not overtake them.
    fn finish_log(&mut self, directory: &Path, index: u16) -> Result<(), String> {
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        if log.files.has_pending() {
            return Err(
                "the reactor stopped with durable log writes still in flight: the records \
                 of the last moments were not all written (none of them was acknowledged)"
                    .into(),
            );
        }
        if log.files.failed() {
            return Err("the durable log failed during this run: see the log above".into());
        }
        let (records, syncs) = (self.node.shard.log_record_count(), log.files.sync_count());
        info!(
            shard = index,
            records,
            syncs,
            records_per_sync = records / syncs.max(1),
            "durable log: this run's records and fdatasyncs"
        );
        durable::run_synchronously(directory, index, &mut self.node.shard)
            .map_err(|e| format!("cannot write the last records of shard {index}'s log: {e}"))
    }

    fn with_raft_directory(mut self, directory: Option<PathBuf>) -> Self {
        self.raft_directory = directory;
        self
    }

    /// Hands the Raft store's file call to the reactor's file queue 1, after every earlier
    /// one: paths under the data directory, the store's two slots at `RAFT_FILE_SLOT_FIRST`.
    fn raft_files(&mut self, actions: &mut Actions<NodeMessage>, call: RaftFileCall) {
        let Some(directory) = &self.raft_directory else {
            // Only a core with a data directory opens the store.
            error!("a Raft file call without a data directory: dropped");
            return;
        };
        let slot = |file: u8| RAFT_FILE_SLOT_FIRST + u32::from(file);
        let ops = call
            .ops
            .into_iter()
            .map(|op| match op {
                RaftFileOp::Open { file, path, create } => FileOp::Open {
                    file: slot(file),
                    path: directory.join(path),
                    create,
                },
                RaftFileOp::Write {
                    file,
                    offset,
                    bytes,
                } => FileOp::Write {
                    file: slot(file),
                    offset,
                    bytes,
                },
                RaftFileOp::Datasync { file } => FileOp::Datasync { file: slot(file) },
                RaftFileOp::SyncDirectory { path } => FileOp::SyncDirectory {
                    path: directory.join(path),
                },
                RaftFileOp::Close { file } => FileOp::Close { file: slot(file) },
                RaftFileOp::Remove { path } => FileOp::Remove {
                    path: directory.join(path),
                },
            })
            .collect();
        actions.files(RAFT_FILE_QUEUE, call.tag, ops);
    }

    /// Files an operator's request under a new ticket; returns the node layer's input for it.
    fn request(&mut self, mut control: Control) -> NodeInput {
        let request = match &mut control {
            Control::Status(_) => Request::Status,
            Control::Metrics(_) => Request::Metrics,
            Control::Sys(values) => Request::Sys(std::mem::take(values)),
            Control::Join(address, _) => Request::Join(*address),
            Control::Leave(_) => Request::Leave,
            Control::Set(key, value, _) => Request::Set {
                key: key.clone(),
                value: value.clone(),
            },
            Control::Inspect(query, _) => Request::Inspect(query.clone()),
            Control::AskNode { .. } | Control::AnswerNode { .. } => {
                unreachable!("the relay's controls are taken in `event`")
            }
            Control::Trace(client_ids, _) => Request::Trace(std::mem::take(client_ids)),
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.requests.insert(ticket, control);
        NodeInput::Control { ticket, request }
    }

    /// Answers the request filed under `ticket`. The admin endpoint may have stopped waiting;
    /// then the answer has no one to go to.
    fn reply(&mut self, ticket: u64, answer: Result<Answer, String>) {
        let Some(control) = self.requests.remove(&ticket) else {
            return;
        };
        match control {
            Control::Status(reply) => {
                let _ = reply.send(answer.and_then(|answer| match answer {
                    Answer::Status(status) => Ok(admin::status_json(&status)),
                    Answer::Done | Answer::Metrics(_) | Answer::Inspect(_) => {
                        Err("the node answered a status request without one".into())
                    }
                }));
            }
            Control::Metrics(reply) => {
                let _ = reply.send(answer.and_then(|answer| match answer {
                    Answer::Metrics(metrics) => Ok(metrics),
                    Answer::Done | Answer::Status(_) | Answer::Inspect(_) => {
                        Err("the shard answered a metrics request without them".into())
                    }
                }));
            }
            Control::Inspect(_, reply) => {
                let _ = reply.send(answer.and_then(|answer| match answer {
                    Answer::Inspect(reply) => Ok(reply),
                    Answer::Done | Answer::Status(_) | Answer::Metrics(_) => {
                        Err("the shard answered an inspection without its reply".into())
                    }
                }));
            }
            Control::Sys(_) => {
                if let Err(message) = answer {
                    warn!(%message, "the $SYS values were not published");
                }
            }
            Control::Join(_, reply)
            | Control::Leave(reply)
            | Control::Set(_, _, reply)
            | Control::Trace(_, reply) => {
                let _ = reply.send(answer.map(|_| ()));
            }
            Control::AskNode { .. } | Control::AnswerNode { .. } => {
                unreachable!("the relay's controls are never filed under a ticket")
            }
        }
    }
}

impl Handler for ShardHandler {
    type Message = NodeMessage;

    fn event(&mut self, now_ms: u64, event: Event<NodeMessage>) {
        self.now_ms = now_ms;
        // The reactor marks cluster links in their connection ids (`reactor::is_side`).
        let input = match event {
            Event::Opened(connection, origin) => {
                self.ingress
                    .opened(now_ms, connection, origin, &mut self.inputs);
                return self.handle_inputs(now_ms);
            }
            Event::Adopted(connection, _, NodeMessage::Carried(carried)) => {
                self.ingress.adopted(connection, *carried, &mut self.inputs);
                return self.handle_inputs(now_ms);
            }
            Event::Adopted(connection, _, message) => {
                error!(
                    connection,
                    ?message,
                    "a connection handed over with something other than its stack: closing it"
                );
                self.ingress.refuse(connection);
                return;
            }
            Event::Message(NodeMessage::Stacks(stacks)) => {
                self.ingress.replace(stacks);
                return;
            }
            Event::Message(NodeMessage::Auth(policy)) => {
                self.node.shard.set_auth_policy(policy);
                return;
            }
            Event::Message(NodeMessage::Verified {
                connection,
                ticket,
                verdict,
            }) => NodeInput::Verified {
                connection,
                ticket,
                verdict,
            },
            Event::Message(NodeMessage::Resolved { index, result }) => {
                NodeInput::Resolved { index, result }
            }
            Event::Message(NodeMessage::Carried(_)) => {
                error!("a connection's stack posted without its connection: dropped");
                return;
            }
            Event::OpenedSide(connection) => NodeInput::LinkOpened { connection },
            Event::Connected(connection, tag) => NodeInput::Connected { connection, tag },
            Event::ConnectFailed(tag, error) => NodeInput::ConnectFailed {
                tag,
                error: error.to_string(),
            },
            Event::Received(connection, bytes) if reactor::is_side(connection) => {
                NodeInput::LinkReceived { connection, bytes }
            }
            Event::Received(connection, bytes) => {
                self.ingress.received(connection, bytes, &mut self.inputs);
                return self.handle_inputs(now_ms);
            }
            Event::Closed(connection) if reactor::is_side(connection) => {
                NodeInput::LinkClosed { connection }
            }
            Event::Sent(connection, _) if reactor::is_side(connection) => return,
            Event::Sent(connection, unsent_bytes) => {
                self.ingress
                    .sent(connection, unsent_bytes, &mut self.inputs);
                return self.handle_inputs(now_ms);
            }
            Event::Closed(connection) => {
                self.ingress.closed(connection, &mut self.inputs);
                return self.handle_inputs(now_ms);
            }
            Event::Message(NodeMessage::Shard(message)) => NodeInput::Shard(message),
            Event::Message(NodeMessage::Control(Control::AskNode { node, query, reply })) => {
                match self.ask_node(node, query, reply) {
                    Some(input) => input,
                    None => return,
                }
            }
            Event::Message(NodeMessage::Control(Control::AnswerNode {
                connection,
                id,
                answer,
            })) => NodeInput::AnswerNode {
                connection,
                id,
                answer,
            },
            Event::Message(NodeMessage::Control(control)) => self.request(control),
            Event::Tick => {
                self.ingress.tick(now_ms);
                NodeInput::Tick
            }
            Event::Shutdown => {
                self.ingress.shutdown();
                NodeInput::Shutdown
            }
        };
        self.node.handle(now_ms, input);
    }

    fn flush(&mut self, actions: &mut Actions<NodeMessage>) {
        let mut outputs = std::mem::take(&mut self.outputs);
        self.node.take_outputs(&mut outputs);
        self.apply_outputs(&mut outputs, actions);
        // A stack that failed while sending told the shard its connection closed: what the
        // shard makes of that goes out in this batch too (a second round at most, as a
        // close sends nothing through a stack).
        for _ in 0..2 {
            if self.inputs.is_empty() {
                break;
            }
            self.handle_inputs(self.now_ms);
            self.node.take_outputs(&mut outputs);
            self.apply_outputs(&mut outputs, actions);
        }
        self.ingress.flush(actions);
        self.outputs = outputs;
        // What this batch recorded: one call, one fdatasync (group commit).
        if let Some(log) = &mut self.log {
            log.files.submit(&mut self.node.shard, self.now_ms, actions);
        }
    }

    fn next_deadline_us(&self) -> Option<u64> {
        let log = self
            .log
            .as_ref()
            .and_then(|log| log.files.next_deadline_ms());
        [
            self.node.next_deadline_ms(),
            log,
            self.ingress.next_deadline_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|ms| ms * 1000)
    }

    fn files_done(&mut self, now_ms: u64, queue: u16, tag: u64, result: std::io::Result<()>) {
        self.now_ms = now_ms;
        if queue == log_io::LOG_QUEUE {
            if let Some(log) = &mut self.log {
                if let Err(error) = &result {
                    error!(%error, "a durable log file operation failed");
                }
                log.files.done(&mut self.node.shard, tag, result);
            }
            return;
        }
        if queue != RAFT_FILE_QUEUE {
            warn!(
                queue,
                tag, "a file completion of a queue this node does not use"
            );
            return;
        }
        let result = result.map_err(|e| e.to_string());
        self.node
            .handle(now_ms, NodeInput::RaftFilesDone { tag, result });
    }
}

/// Loads the old shutdown snapshots (`shard-N.snapshot`, from before the durable log) into
/// `shard`, once: they are removed after the first checkpoints are synced.
fn restore_snapshots(shard: &mut Shard, index: u16, snapshots: &[(PathBuf, Vec<u8>)]) {
    for (path, bytes) in snapshots {
        match shard.restore(bytes) {
            Ok((sessions, retained, warning)) => {
                if sessions > 0 || (index == 0 && retained > 0) {
                    info!(shard = index, file = %path.display(), sessions, retained, "restored from an old snapshot");
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
}

/// Reads the cores' Raft store of a data directory at start (before any shard runs, so a
/// blocking read is fine here): the segment files of `DIR/raft/` and an earlier version's
/// `DIR/raft.state`. Before any is read, the number of segments (`SEGMENTS_MAX`), each
/// file's size (`SEGMENT_BYTES_MAX`) and their sum (`STORE_BYTES_MAX`) are checked.
fn read_raft_store(directory: &Path) -> Result<RaftStoreFiles, String> {
    let folder = directory.join(consensus::RAFT_DIRECTORY);
    let mut paths = Vec::new();
    match std::fs::read_dir(&folder) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list {}: {e}", folder.display()))?;
                match entry
                    .file_name()
                    .to_str()
                    .and_then(consensus::parse_segment_name)
                {
                    Some(_) if paths.len() >= consensus::SEGMENTS_MAX => {
                        return Err(format!(
                            "{} holds more than {} Raft segments: not what this store writes",
                            folder.display(),
                            consensus::SEGMENTS_MAX
                        ));
                    }
                    Some(sequence) => paths.push((Some(sequence), entry.path())),
                    None => warn!(file = %entry.path().display(), "not a Raft segment: ignored"),
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&folder)
                .map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        }
        Err(e) => return Err(format!("cannot list {}: {e}", folder.display())),
    }
    let legacy = directory.join(consensus::LEGACY_STATE_FILE);
    if legacy.exists() {
        paths.push((None, legacy));
    }
    let mut total = 0u64;
    for (_, path) in &paths {
        // Not followed: a link (to /dev/zero, say) or a FIFO is not a file this store wrote.
        let metadata = std::fs::symlink_metadata(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !metadata.file_type().is_file() {
            return Err(format!(
                "{} is not a regular file: not a segment of this store",
                path.display()
            ));
        }
        let size = metadata.len();
        if size > consensus::SEGMENT_BYTES_MAX {
            return Err(format!(
                "{} holds {size} bytes, more than a Raft segment may ({}): not a segment of this store",
                path.display(),
                consensus::SEGMENT_BYTES_MAX
            ));
        }
        total = total.saturating_add(size);
    }
    if total > consensus::STORE_BYTES_MAX {
        return Err(format!(
            "the Raft store's files in {} hold {total} bytes together, more than {}: not what this store writes",
            folder.display(),
            consensus::STORE_BYTES_MAX
        ));
    }
    let mut files = RaftStoreFiles::default();
    let mut budget = consensus::STORE_BYTES_MAX;
    for (sequence, path) in paths {
        use std::io::Read;
        let mut bytes = Vec::new();
        // Bounded even if the file grew since its size was taken: by a segment's limit and
        // by what the store's total has left.
        std::fs::File::open(&path)
            .and_then(|file| {
                file.take(consensus::SEGMENT_BYTES_MAX.min(budget))
                    .read_to_end(&mut bytes)
            })
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        budget = budget.saturating_sub(bytes.len() as u64);
        match sequence {
            Some(sequence) => files.segments.push((sequence, bytes)),
            None => files.legacy = Some(bytes),
        }
    }
    Ok(files)
}

/// What the main thread hears about while the node starts and serves.
enum Notice {
    /// A shard's reactor is built (its listeners accept), or could not be.
    Ready(u16, Result<(), String>),
    /// A shard thread ended: cleanly after a stop, or with the error or panic that ended it.
    Exited(u16, Result<(), String>),
    /// SIGINT or SIGTERM.
    Signal(i32),
}

/// How long the other shards may take to stop after a shard failed or a stop was asked,
/// beyond the shutdown grace, before the process exits without them (a stalled shard never
/// stops).
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// The tables shared by all shards that a connection must pass at accept.
#[derive(Debug)]
struct AcceptLimits {
    admission: Arc<Admission>,
    /// The cluster port's own admission table.
    links: Option<Arc<Admission>>,
    listeners: Arc<ListenerLimits>,
    /// Per listener, the balancers (`proxy_trusted`) whose connections are admitted by the
    /// address of their PROXY header instead of the socket's peer.
    deferred: Vec<Option<shardmq_net::networks::TrustedNetworks>>,
}

/// One shard's thread: builds its reactor, runs it until the node stops, then saves its
/// state. Runs under `catch_unwind`, so that a panic reaches the main thread as a notice.
fn run_shard(
    reactor_config: ReactorConfig,
    mailboxes: Arc<Mailboxes<NodeMessage>>,
    handler: Watched<ShardHandler>,
    limits: AcceptLimits,
    data_dir: Option<PathBuf>,
    notices: &std::sync::mpsc::Sender<Notice>,
) -> Result<(), String> {
    let index = reactor_config.index;
    let reactor = match Reactor::new(reactor_config, mailboxes, handler) {
        Ok(reactor) => {
            let reactor = reactor
                .with_admission(limits.admission)
                .with_listener_limits(limits.listeners)
                .with_deferred_admission(limits.deferred);
            match limits.links {
                Some(table) => reactor.with_side_admission(table),
                None => reactor,
            }
        }
        Err(e) => {
            let _ = notices.send(Notice::Ready(index, Err(e.to_string())));
            return Ok(());
        }
    };
    let _ = notices.send(Notice::Ready(index, Ok(())));
    let mut handler = reactor.run().map_err(|e| e.to_string())?.inner;
    if let Some(directory) = data_dir {
        handler.finish_log(&directory, index)?;
    }
    Ok(())
}

/// The admin endpoint's settings from `[admin]`, with its token read and checked.
fn admin_settings(config: &Config, clustered: bool) -> Result<Option<admin::Settings>, String> {
    let Some(address) = config.admin_listen()? else {
        return Ok(None);
    };
    let token = config.admin_token()?;
    if let Some(warning) = token.warning {
        warn!("{warning}");
    }
    let a = &config.admin;
    Ok(Some(admin::Settings {
        address,
        token: token.token,
        allowed_hosts: a.allowed_hosts.clone(),
        header_read_timeout: Duration::from_millis(a.header_read_timeout_ms),
        request_timeout: Duration::from_millis(a.request_timeout_ms),
        body_size_max: a.body_size_max,
        connections_max: a.connections_max,
        clustered,
        relay_answer_len_max: shardmq_shards::cluster::answer_len_max(
            config.cluster.frame_size_max,
        ),
    }))
}

/// The node's logs: lines to stderr (text or JSON, as `server.log_format` says) through the
/// `server.log` filter, and the shards' trace records to the trace files only.
fn init_logs(config: &Config, filter: tracing_subscriber::EnvFilter, traces: &Arc<trace::Traces>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = match format!("{}=off", shardmq_shards::shard::TRACE_TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);
    let logs = if config.server.log_format == "json" {
        logs.json()
            .with_thread_names(true)
            .with_current_span(false)
            .with_filter(filter)
            .boxed()
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed()
    };
    let records = traces
        .layer()
        .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
            metadata.target() == shardmq_shards::shard::TRACE_TARGET
        }));
    tracing_subscriber::registry()
        .with(logs)
        .with(records)
        .init();
}

fn serve(config: Config, traces: Arc<trace::Traces>) -> Result<(), String> {
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
    let admin_settings = admin_settings(&config, cluster.is_some())?;
    // Checked again here: --listen replaces `server.listen` after the file was read.
    let listeners = config.listeners()?;
    // The TLS listeners' certificates and keys, read and checked before anything serves.
    let stacks = Arc::new(ingress::load(&listeners)?);
    let listener_limits = Arc::new(ListenerLimits::new(
        &listeners
            .iter()
            .map(|listener| listener.connections_max)
            .collect::<Vec<_>>(),
    ));
    let fault = supervise::Fault::from_environment(shard_count)?;
    let tcp_keepalive =
        config
            .tcp_keepalive()?
            .map(|(idle, interval, count)| reactor::TcpKeepalive {
                idle,
                interval,
                count,
            });
    let mailboxes: Arc<Mailboxes<NodeMessage>> =
        Mailboxes::new(shard_count, config.reactor.mailbox_capacity)
            .map_err(|e| format!("cannot create the shard mailboxes: {e}"))?;
    traces.attach(mailboxes.clone(), shard_count);
    // The `[auth]` files, read and checked before anything serves, and the verifier pool.
    let (auth, summary) = auth::Auth::start(&config.auth, mailboxes.clone(), shard_count)?;
    // Seed names are resolved on a thread of their own, never on a shard's.
    let resolver = match &cluster {
        Some(settings) if !settings.seed_names.is_empty() => Some(Arc::new(
            resolve::Resolver::start(config.dns_server()?, mailboxes.clone())?,
        )),
        _ => None,
    };
    info!(
        users = summary.users,
        acl_rules = summary.acl_rules,
        jwt = summary.jwt,
        allow_anonymous = summary.allow_anonymous,
        "auth"
    );
    if summary.allow_anonymous {
        for listener in listeners.iter().filter(|l| !l.bind.ip().is_loopback()) {
            warn!(
                listen = %listener.bind,
                "anonymous clients may connect on a listener that is not on loopback (auth.allow_anonymous)"
            );
        }
    }
    let cores = core_ids(config.server.pin_cores);
    let data_dir =
        (!config.server.data_dir.is_empty()).then(|| PathBuf::from(&config.server.data_dir));
    let sync_policy = config.sync_policy()?;
    let log_config = config.log_config()?;
    let crash_step = layout::CrashStep::from_environment()?;
    let found = match &data_dir {
        Some(directory) => {
            // A switch of the shard layout that a crash interrupted is finished or undone
            // before anything is read (`layout.rs`).
            if directory.join(layout::STAGING).exists() {
                layout::resume(directory, crash_step)?;
            }
            Some(durable::recover(
                directory,
                (&config.limits()).into(),
                config.storage.recover_damaged,
                config.storage.recovery_file_bytes_max,
            )?)
        }
        None => None,
    };
    // The cores' Raft state (an edge holds none).
    let mut raft_store = match (&data_dir, &cluster) {
        (Some(directory), Some(_)) if config.cluster.role == "core" => {
            Some(read_raft_store(directory)?)
        }
        _ => None,
    };
    // One admission table for all shards, so that the limits hold whichever shard's
    // listener the kernel hands a connection to.
    let admission = Arc::new(Admission::new(config.admission_limits()));
    // The cluster port's connections per source address, with a table of their own.
    let link_admission = (config.cluster.enabled && config.cluster.links_per_address_max > 0)
        .then(|| Arc::new(Admission::new(config.link_admission_limits())));
    let epoch = Instant::now();
    // Records carry wall-clock times; the shards' clock counts from `epoch`.
    let wall_clock_at_zero_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
        .saturating_sub(epoch.elapsed().as_millis() as u64);
    // Every shard, restored and with its log's first checkpoint synced, before any serves:
    // only then may the old logs be replaced (`layout.rs`).
    let switch = match &data_dir {
        Some(directory) => Some(layout::Switch::begin(directory, shard_count, crash_step)?),
        None => None,
    };
    let mut shards = Vec::new();
    for index in 0..shard_count {
        let mut shard = Shard::new(ShardConfig {
            index,
            shard_count,
            node: config.cluster.node_id_if_enabled(),
            takeover_timeout_ms: config.cluster.takeover_timeout_ms,
            limits: config.limits(),
            shared_strategy: config.shared_strategy()?,
        });
        shard.set_auth_policy(auth.policy());
        if let (Some(switch), Some(found)) = (&switch, &found) {
            let (sessions, retained) = shard.restore_state(&found.state, wall_clock_at_zero_ms);
            if sessions > 0 || (index == 0 && retained > 0) {
                info!(
                    shard = index,
                    sessions, retained, "restored from the durable log"
                );
            }
            restore_snapshots(&mut shard, index, &found.snapshots);
            let state = shard.durable_state(wall_clock_at_zero_ms);
            let mut log = shardmq_shards::storage::Log::open(log_config, state, &[]);
            durable::run_synchronously(switch.staging(), index, &mut log).map_err(|e| {
                switch.fail(format!(
                    "cannot write the first checkpoint of shard {index}'s log: {e}"
                ))
            })?;
            switch.staged(index);
            shard.attach_log(
                log,
                shardmq_shards::shard::LogSettings {
                    hold_acks: true,
                    wall_clock_at_zero_ms,
                    held_acks_max: config.storage.held_acks_per_shard_max,
                },
            );
        }
        shards.push(shard);
    }
    if let Some(switch) = switch {
        switch.commit()?;
    }
    let mut shards = shards.into_iter();
    let health = supervise::Health::new(shard_count, epoch, config.admin.stall_timeout_ms);
    // Each reactor is built on its own thread: its ring accepts submissions only from the
    // thread that created it (IORING_SETUP_SINGLE_ISSUER). Start-up errors (an address in use,
    // an old kernel) come back before the node reports that it serves.
    let (notice_sender, notices) = std::sync::mpsc::channel::<Notice>();
    // Other nodes' admin questions, from shard 0 to the admin thread (clustered, with an
    // admin endpoint).
    let (mut peer_query_sender, peer_query_receiver) = match (&cluster, &admin_settings) {
        (Some(_), Some(_)) => {
            let (sender, receiver) = tokio::sync::mpsc::channel(api::PEER_QUERIES_QUEUED_MAX);
            (Some(sender), Some(receiver))
        }
        _ => (None, None),
    };
    let mut threads = Vec::new();
    for index in 0..shard_count {
        let reactor_config = ReactorConfig {
            index,
            listen: listeners.iter().map(|listener| listener.bind).collect(),
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
            tcp_keepalive,
        };
        let Some(shard) = shards.next() else {
            unreachable!("one shard was built per index");
        };
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
        let mut raft_directory = None;
        if index == 0
            && let Some(files) = raft_store.take()
        {
            raft_directory = data_dir.clone();
            node.open_raft_store(files).map_err(|e| {
                format!(
                    "the cores' Raft store is damaged or incomplete, so this core cannot rejoin as the voter it was: {e}. \
                     To start it as a new voter (the group must still have a majority), move {} away",
                    data_dir
                        .as_ref()
                        .map(|d| d.join(consensus::RAFT_DIRECTORY).display().to_string())
                        .unwrap_or_default()
                )
            })?;
        }
        let log = data_dir.as_ref().map(|directory| ShardLog {
            files: log_io::LogFiles::new(durable::shard_directory(directory, index), sync_policy),
        });
        let handler = Watched::new(
            ShardHandler::new(
                node,
                log,
                ingress::Ingress::new(
                    stacks.clone(),
                    config.limits().connect_timeout_ms,
                    config.limits().unsent_bytes_per_connection_max,
                )
                .with_node(config.cluster.node_id_if_enabled()),
            )
            .with_raft_directory(raft_directory)
            .with_auth(auth.clone(), index)
            .with_peer_queries(if index == 0 {
                peer_query_sender.take()
            } else {
                None
            })
            .with_resolver(resolver.clone().filter(|_| index == 0)),
            index,
            health.clone(),
            fault,
        );
        let mailboxes = mailboxes.clone();
        let limits = AcceptLimits {
            admission: admission.clone(),
            links: link_admission.clone(),
            listeners: listener_limits.clone(),
            deferred: listeners
                .iter()
                .map(|listener| listener.proxy.as_ref().map(|proxy| proxy.trusted.clone()))
                .collect(),
        };
        let notices = notice_sender.clone();
        let data_dir = data_dir.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_shard(
                        reactor_config,
                        mailboxes,
                        handler,
                        limits,
                        data_dir,
                        &notices,
                    )
                }))
                .unwrap_or_else(|payload| {
                    Err(format!("panicked: {}", supervise::panic_text(&*payload)))
                });
                let _ = notices.send(Notice::Exited(index, outcome));
            })
            .map_err(|e| format!("cannot start shard thread {index}: {e}"))?;
        threads.push(thread);
    }
    let reloader = Arc::new(ingress::Reloader::new(
        listeners.clone(),
        mailboxes.clone(),
        shard_count,
    ));
    let mut startup_error = None;
    let mut ready = 0;
    while ready < shard_count && startup_error.is_none() {
        match notices.recv() {
            Ok(Notice::Ready(_, Ok(()))) => ready += 1,
            Ok(Notice::Ready(index, Err(e))) => startup_error = Some(format!("shard {index}: {e}")),
            Ok(Notice::Exited(index, outcome)) => {
                startup_error = Some(format!(
                    "shard {index} ended during start-up: {}",
                    outcome.err().unwrap_or_default()
                ))
            }
            Ok(Notice::Signal(_)) | Err(_) => startup_error = Some("start-up interrupted".into()),
        }
    }
    if startup_error.is_none()
        && let Some(settings) = admin_settings
        && let Err(message) = admin::start(
            settings,
            mailboxes.clone(),
            health.clone(),
            admin::Services {
                reloader: reloader.clone(),
                admission: admission.clone(),
                auth: auth.clone(),
                traces: traces.clone(),
            },
            peer_query_receiver,
        )
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
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let signal_notices = notice_sender.clone();
    let hangup_reloader = reloader.clone();
    let hangup_auth = auth.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == signal_hook::consts::SIGHUP {
                // Reloads read files: on this thread, never a shard's. The outcome is logged.
                let _ = hangup_reloader.reload("SIGHUP");
                let _ = hangup_auth.reload("SIGHUP");
                continue;
            }
            if signal_notices.send(Notice::Signal(signal)).is_err() {
                break;
            }
        }
    });
    drop(notice_sender);
    health.set_serving(true);
    if config.server.sys_interval_seconds > 0
        && let Err(message) = sys::start(
            config.server.sys_interval_seconds,
            shard_count,
            mailboxes.clone(),
            health.clone(),
        )
    {
        warn!(%message, "no $SYS topics");
    }
    let listen: Vec<String> = listeners
        .iter()
        .map(|listener| listener.bind.to_string())
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
            seeds = ?config.cluster.seeds,
            "cluster member"
        );
    }
    let stop_after = Duration::from_secs(config.server.shutdown_grace_seconds) + STOP_MARGIN;
    let failures = supervise_shards(&notices, shard_count, &mailboxes, &health, stop_after);
    if failures.is_empty() {
        for thread in threads {
            let _ = thread.join();
        }
    }
    if let (Some(directory), true) = (&data_dir, failures.is_empty()) {
        info!(directory = %directory.display(), "state saved");
    }
    info!("shardmq stopped");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "stopped because a shard failed ({}); see the log above",
            failures.join("; ")
        ))
    }
}

/// Watches the shard threads until every one has ended, and returns what failed. A shard that
/// ends on its own (a panic, an error) stops the whole node at once, so that a supervisor
/// restarts it and a load balancer drops it, rather than leave a node with a dead shard
/// whose clients, sessions and sockets nobody serves. A stop (a signal or a failure) that
/// the shards do not finish within `stop_after` ends the watch without them. A shard whose
/// loop stalls is logged once per stall (and `/api/v1/health/live` answers 503 meanwhile).
fn supervise_shards(
    notices: &std::sync::mpsc::Receiver<Notice>,
    shard_count: u16,
    mailboxes: &Mailboxes<NodeMessage>,
    health: &supervise::Health,
    stop_after: Duration,
) -> Vec<String> {
    let mut running = shard_count;
    let mut failures = Vec::new();
    let mut stop_deadline: Option<Instant> = None;
    let mut stalled_logged: Vec<u16> = Vec::new();
    let stop = |deadline: &mut Option<Instant>| {
        if deadline.is_none() {
            health.set_serving(false);
            mailboxes.stop();
            *deadline = Some(Instant::now() + stop_after);
        }
    };
    while running > 0 {
        if stop_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            error!(
                running,
                "shards did not stop within {stop_after:?}: exiting without them"
            );
            failures.push(format!("{running} shard(s) did not stop"));
            break;
        }
        match notices.recv_timeout(Duration::from_secs(1)) {
            Ok(Notice::Exited(index, outcome)) => {
                running -= 1;
                let outcome = match outcome {
                    Ok(()) if stop_deadline.is_none() => Err("stopped unasked".to_string()),
                    outcome => outcome,
                };
                if let Err(e) = outcome {
                    error!(
                        shard = index,
                        error = %e,
                        "shard failed: stopping the node (fail fast: a node with a dead shard must be restarted)"
                    );
                    failures.push(format!("shard {index}: {e}"));
                }
                stop(&mut stop_deadline);
            }
            Ok(Notice::Signal(signal)) => {
                info!(signal, "stopping: disconnecting clients");
                stop(&mut stop_deadline);
            }
            Ok(Notice::Ready(..)) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let stalled = health.stalled();
                for &shard in &stalled {
                    if !stalled_logged.contains(&shard) {
                        error!(
                            shard,
                            stall_timeout_ms = health.stall_timeout_ms,
                            "the shard's loop has stalled: /api/v1/health/live answers 503"
                        );
                    }
                }
                stalled_logged = stalled;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    failures
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

/// `shardmq ctl`: finds the endpoint and the token (--token-file, else SHARDMQ_ADMIN_TOKEN,
/// else the configuration's `admin.token_file`), then makes the request; a state change
/// carries its parameters as a JSON body.
fn ctl(
    admin: Option<String>,
    token_file: Option<PathBuf>,
    config: Option<PathBuf>,
    command: &CtlCommand,
    json: bool,
) -> Result<String, String> {
    let config = config.map(|path| Config::load(Some(&path))).transpose()?;
    let admin = match (admin, &config) {
        (Some(admin), _) => admin,
        (None, Some(config)) => match config.admin_listen()? {
            // An endpoint on every address is reached on this host's loopback.
            Some(address) if address.ip().is_unspecified() => {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
                    .to_string()
            }
            Some(address) => address.to_string(),
            None => {
                return Err(
                    "the configuration turns the admin endpoint off (admin.listen = \"\")".into(),
                );
            }
        },
        (None, None) => "127.0.0.1:8883".into(),
    };
    let token = match token_file {
        Some(path) => config::read_token_file(&path)?,
        None => config::admin_token(config.as_ref().map_or("", |c| c.admin.token_file.as_str()))?,
    };
    if let Some(warning) = &token.warning {
        eprintln!("shardmq ctl: warning: {warning}");
    }
    let post = |path: &str, body| (path.to_string(), admin::CtlRequest::Post(body));
    let (path, request) = match command {
        CtlCommand::Cluster(ClusterCommand::Status) => {
            ("/api/v1/cluster/status".to_string(), admin::CtlRequest::Get)
        }
        CtlCommand::Cluster(ClusterCommand::Join { address }) => post(
            "/api/v1/cluster/join",
            serde_json::json!({ "address": address.to_string() }),
        ),
        CtlCommand::Cluster(ClusterCommand::Leave) => {
            post("/api/v1/cluster/leave", serde_json::json!({}))
        }
        CtlCommand::Cluster(ClusterCommand::Set { key, value }) => post(
            "/api/v1/cluster/settings",
            serde_json::json!({ "key": key, "value": value }),
        ),
        CtlCommand::Inspect(inspect) => ctl::request(inspect),
        CtlCommand::Trace(command) => {
            return trace_api::ctl(&admin, token.token.as_deref(), command);
        }
    };
    let answer = admin::ctl(&admin, token.token.as_deref(), &path, request)?;
    match command {
        CtlCommand::Inspect(inspect) if !json => Ok(ctl::render(inspect, &answer)),
        _ => serde_json::to_string_pretty(&answer).map_err(|e| e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Passwd {
            create,
            delete,
            batch,
            pbkdf2,
            file,
            user,
            password,
        } => {
            if password.is_some() && !batch {
                eprintln!("shardmq passwd: a password on the command line needs -b");
                return ExitCode::from(2);
            }
            let command = passwd::PasswdCommand {
                file: &file,
                user: &user,
                password: password.as_deref(),
                create,
                delete,
                pbkdf2,
            };
            match passwd::run(&command) {
                Ok(message) => {
                    eprintln!("shardmq passwd: {message}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("shardmq passwd: {message}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Ctl {
            admin,
            token_file,
            config,
            command,
            json,
        } => match ctl(admin, token_file, config, &command, json) {
            Ok(text) => {
                // A trace file ends with its own newline; JSON answers do not.
                if text.ends_with('\n') {
                    print!("{text}");
                } else {
                    println!("{text}");
                }
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("shardmq ctl: {message}");
                ExitCode::from(1)
            }
        },
        Command::Serve {
            listen,
            shards,
            config,
            data_dir,
            recover_damaged,
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
            loaded.storage.recover_damaged |= recover_damaged;
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(&loaded.server.log));
            let filter = match filter {
                Ok(filter) => filter,
                Err(error) => {
                    eprintln!("shardmq: `server.log` is not a valid log filter: {error}");
                    return ExitCode::from(2);
                }
            };
            let traces = match trace::Traces::start(trace::Settings {
                traces_max: loaded.admin.traces_max,
                bytes_max: loaded.admin.trace_bytes_max,
                directory: (!loaded.server.data_dir.is_empty())
                    .then(|| PathBuf::from(&loaded.server.data_dir).join("traces")),
            }) {
                Ok(traces) => traces,
                Err(message) => {
                    eprintln!("shardmq: {message}");
                    return ExitCode::from(1);
                }
            };
            init_logs(&loaded, filter, &traces);
            supervise::log_panics();
            let traces_at_exit = traces.clone();
            let code = match serve(loaded, traces) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    error!("{message}");
                    eprintln!("shardmq: {message}");
                    ExitCode::from(1)
                }
            };
            traces_at_exit.remove_private_directory();
            code
        }
    }
}
