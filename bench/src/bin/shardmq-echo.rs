//! Echo servers on three runtimes, and a client to measure them: the reason shardmq drives
//! io_uring itself must stay measured, not remembered (DESIGN.md §2).
//!
//!   shardmq-echo server --runtime reactor|tokio|glommio --listen 127.0.0.1:PORT
//!   shardmq-echo client --host 127.0.0.1:PORT --connections 100 --in-flight 16 --size 64
//!
//! Every server is single-threaded (one core), so the comparison is per core. The client runs on
//! shardmq's reactor; each connection keeps `in-flight` messages of `size` bytes outstanding and
//! sends one more for every one echoed. `tools/compare_runtimes.sh` runs all three in one go.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use shardmq_net::reactor::{
    Actions, ConnectionId, Event, Handler, Mailboxes, Reactor, ReactorConfig,
};

#[derive(Debug, Parser)]
#[command(
    name = "shardmq-echo",
    about = "echo servers on the reactor, tokio and glommio, and a client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Runtime {
    Reactor,
    Tokio,
    Glommio,
}

#[derive(Debug, Subcommand)]
enum Command {
    Server {
        #[arg(long)]
        runtime: Runtime,
        #[arg(long)]
        listen: SocketAddr,
    },
    Client {
        #[arg(long)]
        host: SocketAddr,
        #[arg(long, default_value_t = 100)]
        connections: u32,
        #[arg(long, default_value_t = 16)]
        in_flight: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
    },
}

fn reactor_config(listen: Vec<SocketAddr>) -> ReactorConfig {
    ReactorConfig {
        index: 0,
        listen,
        side_listen: None,
        backlog: 1024,
        ring_entries: 4096,
        buffer_count: 4096,
        buffer_size: 16384,
        core: None,
        epoch: Instant::now(),
        shutdown_grace: Duration::from_millis(200),
        tcp_keepalive: None,
    }
}

/// Echoes every received buffer back, in the same batch.
struct EchoServer {
    echoes: Vec<(ConnectionId, Bytes)>,
}

impl Handler for EchoServer {
    type Message = ();
    fn event(&mut self, _now_ms: u64, event: Event<()>) {
        if let Event::Received(connection, bytes) = event {
            self.echoes.push((connection, bytes));
        }
    }
    fn flush(&mut self, actions: &mut Actions<()>) {
        for (connection, bytes) in self.echoes.drain(..) {
            actions.send(connection, bytes);
        }
    }
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
}

fn serve_reactor(listen: SocketAddr) -> std::io::Result<()> {
    let mailboxes = Mailboxes::new(1, 16)?;
    Reactor::new(
        reactor_config(vec![listen]),
        mailboxes,
        EchoServer { echoes: Vec::new() },
    )?
    .run()
    .map(drop)
}

fn serve_tokio(listen: SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                loop {
                    let (mut stream, _) = listener.accept().await?;
                    stream.set_nodelay(true)?;
                    tokio::task::spawn_local(async move {
                        let mut buffer = vec![0u8; 16384];
                        while let Ok(read) = stream.read(&mut buffer).await {
                            if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            })
            .await
    })
}

fn serve_glommio(listen: SocketAddr) -> std::io::Result<()> {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    executor.run(async move {
        let listener = glommio::net::TcpListener::bind(listen)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        loop {
            let mut stream = listener
                .accept()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            glommio::spawn_local(async move {
                let mut buffer = vec![0u8; 16384];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            })
            .detach();
        }
    })
}

/// Keeps `in_flight` messages outstanding per connection and counts echoed messages.
struct EchoClient {
    host: SocketAddr,
    connections: u32,
    in_flight: usize,
    payload: Bytes,
    /// Bytes echoed per connection not yet making up a whole message.
    partial: std::collections::HashMap<ConnectionId, usize>,
    sends: Vec<(ConnectionId, Bytes)>,
    started: bool,
    echoed: Arc<AtomicU64>,
}

impl Handler for EchoClient {
    type Message = ();
    fn event(&mut self, _now_ms: u64, event: Event<()>) {
        match event {
            Event::Connected(connection, _) => {
                self.partial.insert(connection, 0);
                for _ in 0..self.in_flight {
                    self.sends.push((connection, self.payload.clone()));
                }
            }
            Event::Received(connection, bytes) => {
                let size = self.payload.len();
                let partial = self.partial.entry(connection).or_default();
                *partial += bytes.len();
                let messages = *partial / size;
                *partial %= size;
                self.echoed.fetch_add(messages as u64, Ordering::Relaxed);
                for _ in 0..messages {
                    self.sends.push((connection, self.payload.clone()));
                }
            }
            Event::ConnectFailed(_, error) => eprintln!("shardmq-echo: connect failed: {error}"),
            _ => {}
        }
    }
    fn flush(&mut self, actions: &mut Actions<()>) {
        if !self.started {
            self.started = true;
            for tag in 0..self.connections {
                actions.connect(self.host, None, u64::from(tag));
            }
        }
        for (connection, bytes) in self.sends.drain(..) {
            actions.send(connection, bytes);
        }
    }
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
}

fn client(
    host: SocketAddr,
    connections: u32,
    in_flight: usize,
    size: usize,
    duration: u64,
    warmup: u64,
) -> std::io::Result<()> {
    let echoed = Arc::new(AtomicU64::new(0));
    let mailboxes = Mailboxes::new(1, 16)?;
    let handler = EchoClient {
        host,
        connections,
        in_flight,
        payload: Bytes::from(vec![0x5A; size]),
        partial: Default::default(),
        sends: Vec::new(),
        started: false,
        echoed: echoed.clone(),
    };
    let stopper = mailboxes.clone();
    let thread = std::thread::spawn(move || {
        Reactor::new(reactor_config(Vec::new()), mailboxes, handler)?
            .run()
            .map(drop)
    });
    std::thread::sleep(Duration::from_secs(warmup));
    let before = echoed.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(duration));
    let after = echoed.load(Ordering::Relaxed);
    let rate = (after - before) as f64 / started.elapsed().as_secs_f64();
    stopper.stop();
    thread
        .join()
        .map_err(|_| std::io::Error::other("client thread panicked"))??;
    println!(
        "{{\"host\": \"{host}\", \"connections\": {connections}, \"in_flight\": {in_flight}, \"size\": {size}, \"messages_per_second\": {rate:.0}}}"
    );
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Server {
            runtime: Runtime::Reactor,
            listen,
        } => serve_reactor(listen),
        Command::Server {
            runtime: Runtime::Tokio,
            listen,
        } => serve_tokio(listen),
        Command::Server {
            runtime: Runtime::Glommio,
            listen,
        } => serve_glommio(listen),
        Command::Client {
            host,
            connections,
            in_flight,
            size,
            duration,
            warmup,
        } => client(host, connections, in_flight, size, duration, warmup),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shardmq-echo: {error}");
            ExitCode::FAILURE
        }
    }
}
