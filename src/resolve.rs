//! The seed resolver: one thread that turns `cluster.seeds` names into addresses.
//!
//! Owns: the DNS lookups of seed names, which block (getaddrinfo) or wait on the network,
//! and so never run on a shard thread. Shard 0's agent asks with `NodeOutput::Resolve`; the
//! answer comes back through shard 0's mailbox (`NodeMessage::Resolved`).
//! How: `host:port` goes to the system resolver (getaddrinfo, so /etc/hosts works), `srv:NAME`
//! to hickory-resolver (SRV records, then each target's A/AAAA records), with the system's
//! resolv.conf. With `cluster.dns_server` set, every name is asked of that server through
//! hickory instead.
//! Invariants: the queue of requests is bounded (a full queue is answered at once with an
//! error, which the agent retries at the reconnect interval); an answer holds at most
//! [`SEED_ADDRESSES_PER_NAME_MAX`] addresses; a lookup through hickory gives up after
//! [`LOOKUP_DEADLINE`] (targets included; SRV records for port 0 are skipped); a
//! getaddrinfo lookup is bounded only by the system resolver's own timeouts (resolv.conf's
//! `timeout` and `attempts`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use shardmq_net::reactor::Mailboxes;
use shardmq_shards::cluster::{SEED_ADDRESSES_PER_NAME_MAX, SeedName};
use tracing::warn;

use crate::admin::NodeMessage;

/// Requests waiting for the resolver thread (one per seed name at most is out at a time, so
/// this is reached only with very many names).
const QUEUE_MAX: usize = 64;

/// How long one DNS query waits for its server, and how often it is sent.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;

/// The longest one seed name's lookup takes through hickory (an SRV answer and all its
/// targets): past it the name fails for this round, so a slow or hostile DNS server cannot
/// hold the thread (and the other names behind it) for long.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(8);

/// SRV targets looked up per answer (each is one more query).
const SRV_TARGETS_MAX: usize = SEED_ADDRESSES_PER_NAME_MAX;

/// The handle shard 0 asks through.
#[derive(Debug)]
pub struct Resolver {
    queue: SyncSender<(usize, SeedName)>,
}

impl Resolver {
    /// Starts the resolver thread; its answers go to shard 0 of `mailboxes`.
    pub fn start(
        dns_server: Option<SocketAddr>,
        mailboxes: Arc<Mailboxes<NodeMessage>>,
    ) -> Result<Self, String> {
        let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE_MAX);
        std::thread::Builder::new()
            .name("seed-resolver".into())
            .spawn(move || resolver_thread(dns_server, &jobs, &mailboxes))
            .map_err(|e| format!("cannot start the seed resolver thread: {e}"))?;
        Ok(Self { queue })
    }

    /// Queues a lookup of seed name `index`; an error (a full queue, a stopped thread) is the
    /// answer to give at once.
    pub fn submit(&self, index: usize, name: SeedName) -> Result<(), String> {
        self.queue.try_send((index, name)).map_err(|e| match e {
            TrySendError::Full(_) => "the seed resolver's queue is full".to_string(),
            TrySendError::Disconnected(_) => "the seed resolver thread has stopped".to_string(),
        })
    }
}

fn resolver_thread(
    dns_server: Option<SocketAddr>,
    jobs: &Receiver<(usize, SeedName)>,
    mailboxes: &Mailboxes<NodeMessage>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let dns = match runtime {
        Ok(runtime) => match hickory(dns_server) {
            Ok(resolver) => Ok((runtime, resolver)),
            Err(error) => Err(error),
        },
        Err(e) => Err(format!("cannot start the resolver's runtime: {e}")),
    };
    if let Err(error) = &dns {
        warn!(%error, "no DNS resolver for srv: seed names; they fail until restarted");
    }
    while let Ok((index, name)) = jobs.recv() {
        let result = match (&name, dns_server, &dns) {
            (SeedName::Host { host, port }, None, _) => system_lookup(host, *port),
            (_, _, Err(error)) => Err(error.clone()),
            (name, _, Ok((runtime, resolver))) => runtime.block_on(async {
                tokio::time::timeout(LOOKUP_DEADLINE, dns_lookup(resolver, name))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("{name:?}: no answer within {LOOKUP_DEADLINE:?}"))
                    })
            }),
        };
        let result = result.map(|mut addresses| {
            addresses.dedup();
            addresses.truncate(SEED_ADDRESSES_PER_NAME_MAX);
            addresses
        });
        mailboxes.post(0, NodeMessage::Resolved { index, result });
    }
}

/// A hickory resolver asking `dns_server`, or the servers of the system's resolv.conf.
fn hickory(dns_server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match dns_server {
        Some(server) => {
            let mut config = ResolverConfig::new();
            config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
    };
    let options: &mut ResolverOpts = builder.options_mut();
    options.timeout = QUERY_TIMEOUT;
    options.attempts = QUERY_ATTEMPTS;
    Ok(builder.build())
}

/// getaddrinfo, as every program on the host resolves (so /etc/hosts works).
fn system_lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    (host, port)
        .to_socket_addrs()
        .map(|addresses| addresses.take(SEED_ADDRESSES_PER_NAME_MAX).collect())
        .map_err(|e| format!("cannot resolve {host}: {e}"))
}

async fn dns_lookup(resolver: &TokioResolver, name: &SeedName) -> Result<Vec<SocketAddr>, String> {
    match name {
        SeedName::Host { host, port } => addresses_of(resolver, host, *port).await,
        SeedName::Srv(service) => {
            let records = resolver
                .srv_lookup(service.as_str())
                .await
                .map_err(|e| format!("SRV lookup of {service}: {e}"))?;
            // As many records as one DNS message holds at most.
            let mut targets: Vec<(u16, String, u16)> = records
                .iter()
                // Port 0 is no service (RFC 2782 gives it no meaning; nothing listens there).
                .filter(|srv| srv.port() != 0)
                .map(|srv| (srv.priority(), srv.target().to_utf8(), srv.port()))
                .collect();
            // Lowest priority first: when the cap cuts, the preferred targets stay.
            targets.sort();
            targets.truncate(SRV_TARGETS_MAX);
            let mut addresses = Vec::new();
            let mut failures = Vec::new();
            for (_, target, port) in targets {
                match addresses_of(resolver, &target, port).await {
                    Ok(found) => addresses.extend(found),
                    Err(error) => failures.push(error),
                }
            }
            if addresses.is_empty()
                && let Some(first) = failures.into_iter().next()
            {
                return Err(format!("no SRV target of {service} resolved: {first}"));
            }
            Ok(addresses)
        }
    }
}

/// The A and AAAA records of `host`, at `port`.
async fn addresses_of(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    let found = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    Ok(found
        .iter()
        .take(SEED_ADDRESSES_PER_NAME_MAX)
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}
