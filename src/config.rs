//! The configuration: TOML with every key defaulted from the embedded `default.toml`. Unknown
//! keys and out-of-range values are errors that name the key, reported before anything starts.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use shardmq_net::frame::{Member, Role};
use shardmq_net::ingress::names::NameFrom;
use shardmq_net::ingress::proxy::{ProxyAccept, TrustedNetworks};
use shardmq_net::ingress::tls::MutualTls;
use shardmq_net::mqtt::QoS;
use shardmq_net::reactor::admission::AdmissionLimits;
use shardmq_shards::cluster::{ClusterSettings, LinkSettings, SeedName};
use shardmq_shards::{Limits, SharedStrategy};

/// The environment variable that holds the admin token (it wins over `admin.token_file`).
pub const ADMIN_TOKEN_VARIABLE: &str = "SHARDMQ_ADMIN_TOKEN";

/// The shortest admin token accepted, in characters, as for the cluster secret.
pub const ADMIN_TOKEN_LENGTH_MIN: usize = 16;

/// The admin token as found, with a warning about the file it came from, if any.
#[derive(Debug, Default)]
pub struct AdminToken {
    pub token: Option<String>,
    pub warning: Option<String>,
}

/// Checks a token read from `source`: surrounding white space (a file's final newline) is
/// not part of it, and it must not be empty or short.
fn checked_token(text: &str, source: &str) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "{source} is empty: the admin token must be set in it"
        ));
    }
    if token.chars().count() < ADMIN_TOKEN_LENGTH_MIN {
        return Err(format!(
            "{source} holds a token of fewer than {ADMIN_TOKEN_LENGTH_MIN} characters"
        ));
    }
    Ok(token.to_string())
}

/// Reads the admin token from a file; see [`Config::admin_token`].
pub fn read_token_file(path: &Path) -> Result<AdminToken, String> {
    use std::os::unix::fs::PermissionsExt;
    let source = format!("the admin token file {}", path.display());
    let metadata = std::fs::metadata(path).map_err(|e| format!("{source}: {e}"))?;
    let warning = (metadata.permissions().mode() & 0o007 != 0)
        .then(|| format!("{source} is readable by every user: chmod 600 it (or 640 for a group)"));
    let text = std::fs::read_to_string(path).map_err(|e| format!("{source}: {e}"))?;
    Ok(AdminToken {
        token: Some(checked_token(&text, &source)?),
        warning,
    })
}

/// The admin token from `SHARDMQ_ADMIN_TOKEN`, else from `token_file` (if not empty).
pub fn admin_token(token_file: &str) -> Result<AdminToken, String> {
    if let Ok(text) = std::env::var(ADMIN_TOKEN_VARIABLE) {
        return Ok(AdminToken {
            token: Some(checked_token(&text, ADMIN_TOKEN_VARIABLE)?),
            warning: None,
        });
    }
    if token_file.is_empty() {
        return Ok(AdminToken::default());
    }
    read_token_file(Path::new(token_file))
}

/// The embedded defaults.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub reactor: Reactor,
    pub limits: LimitsConfig,
    pub cluster: ClusterConfig,
    pub admin: Admin,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    /// The `[[listener]]` tables, in file order (after the `server.listen` shorthand).
    #[serde(default)]
    pub listener: Vec<ListenerConfig>,
}

/// `[auth]`: authentication and authorization (`auth.rs` reads the files it names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// true, false or "auto"; see [`AuthConfig::anonymous_allowed`].
    pub allow_anonymous: toml::Value,
    pub password_file: String,
    pub acl_file: String,
    pub jwt_algorithm: String,
    pub jwt_key_file: String,
    pub jwt_username_claim: String,
    pub jwt_acl_claim: String,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub verifier_threads: usize,
    pub verifier_queue_max: usize,
    pub credential_cache_max: usize,
    pub pbkdf2_iterations_max: u32,
    pub argon2_memory_kib_max: u32,
}

impl AuthConfig {
    /// `allow_anonymous`, with "auto" settled: allowed unless a verifier is configured.
    pub fn anonymous_allowed(&self) -> Result<bool, String> {
        match &self.allow_anonymous {
            toml::Value::Boolean(allowed) => Ok(*allowed),
            toml::Value::String(auto) if auto == "auto" => {
                Ok(self.password_file.is_empty() && self.jwt_key_file.is_empty())
            }
            other => Err(format!(
                "`auth.allow_anonymous` must be true, false or \"auto\", not {other}"
            )),
        }
    }

    fn validate(&self) -> Result<(), String> {
        self.anonymous_allowed()?;
        if !["HS256", "RS256", "ES256"].contains(&self.jwt_algorithm.as_str()) {
            return Err(format!(
                "`auth.jwt_algorithm` must be \"HS256\", \"RS256\" or \"ES256\", not {:?}",
                self.jwt_algorithm
            ));
        }
        if self.jwt_username_claim.is_empty() {
            return Err("`auth.jwt_username_claim` must name a claim".into());
        }
        if !(1..=64).contains(&self.verifier_threads) {
            return Err("`auth.verifier_threads` must be from 1 to 64".into());
        }
        if self.verifier_queue_max == 0 {
            return Err("`auth.verifier_queue_max` must be positive".into());
        }
        let iterations_max = crate::passwd::PBKDF2_ITERATIONS_MAX;
        if !(1..=iterations_max).contains(&self.pbkdf2_iterations_max) {
            return Err(format!(
                "`auth.pbkdf2_iterations_max` must be from 1 to {iterations_max}"
            ));
        }
        let memory_max = crate::passwd::ARGON2_MEMORY_KIB_MAX;
        if !(8..=memory_max).contains(&self.argon2_memory_kib_max) {
            return Err(format!(
                "`auth.argon2_memory_kib_max` must be from 8 to {memory_max}"
            ));
        }
        Ok(())
    }
}

/// `[storage]`: the durable log kept in `server.data_dir` (see `durable.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub sync: String,
    pub sync_interval_ms: u64,
    pub segment_size_bytes: u64,
    pub compaction_ratio: u64,
    pub compaction_min_bytes: u64,
    pub held_acks_per_shard_max: usize,
    pub recover_damaged: bool,
    pub recovery_file_bytes_max: u64,
}

/// One `[[listener]]` table as written; [`Config::listeners`] checks it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub bind: String,
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub ws_allowed_origins: Vec<String>,
    #[serde(default = "default_off")]
    pub proxy_protocol: String,
    #[serde(default)]
    pub proxy_trusted: Vec<String>,
    #[serde(default)]
    pub tls_cert_file: String,
    #[serde(default)]
    pub tls_key_file: String,
    #[serde(default)]
    pub tls_client_ca_file: String,
    #[serde(default = "default_none")]
    pub tls_client_cert: String,
    #[serde(default = "default_none")]
    pub tls_username_from: String,
    #[serde(default)]
    pub connections_max: u32,
}

fn default_transport() -> String {
    "tcp".into()
}

fn default_path() -> String {
    "/mqtt".into()
}

fn default_off() -> String {
    "off".into()
}

fn default_none() -> String {
    "none".into()
}

/// How a listener carries MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    /// MQTT over TLS, with these files and client-certificate rules.
    Tls(TlsFiles),
    /// MQTT over WebSocket at this path, for pages of these browser origins (and for
    /// clients that send no `Origin`).
    Ws {
        path: String,
        allowed_origins: Vec<String>,
    },
    /// MQTT over WebSocket over TLS.
    Wss {
        path: String,
        allowed_origins: Vec<String>,
        tls: TlsFiles,
    },
}

/// A listener's PROXY protocol settings (`proxy_protocol` other than "off").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub accept: ProxyAccept,
    /// Who may send a header (`proxy_trusted`, never empty).
    pub trusted: TrustedNetworks,
    /// `tls_username_from = "cn"` on a listener without its own TLS: the CN of the
    /// balancer's SSL TLV names the client.
    pub name_from_ssl_cn: bool,
}

/// Whether a TLS listener asks clients for certificates (`tls_client_cert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertMode {
    None,
    Optional,
    Required,
}

/// A TLS listener's settings as checked at load; the files are read when the listener's
/// configuration is built (at start and at each reload, `ingress::load`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The listener's name in errors: `listener[N]`.
    pub name: String,
    pub cert_file: String,
    pub key_file: String,
    /// The authorities client certificates must chain to; set exactly when `client_cert`
    /// is not `None`.
    pub client_ca_file: String,
    pub client_cert: ClientCertMode,
    pub username_from: NameFrom,
}

/// A listener, checked: where it binds, what it carries, and its own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub bind: SocketAddr,
    pub transport: TransportKind,
    /// The PROXY header its connections start with, if any.
    pub proxy: Option<ProxySettings>,
    /// The most connections open on it at once, over all shards; 0: no limit of its own.
    pub connections_max: u32,
}

/// Checks the TLS keys of a `transport = "tls"` table: the certificate and key are needed,
/// a client CA exactly when client certificates are asked for, and a username from the
/// certificate only when one is.
fn checked_tls(table: &ListenerConfig, name: &str) -> Result<TlsFiles, String> {
    for (key, value) in [
        ("tls_cert_file", &table.tls_cert_file),
        ("tls_key_file", &table.tls_key_file),
    ] {
        if value.is_empty() {
            return Err(format!(
                "`{name}.{key}` must be set for a {:?} listener",
                table.transport
            ));
        }
    }
    let client_cert = match table.tls_client_cert.as_str() {
        "optional" => ClientCertMode::Optional,
        "required" => ClientCertMode::Required,
        _ => ClientCertMode::None,
    };
    let username_from = NameFrom::parse(&table.tls_username_from).unwrap_or(NameFrom::None);
    match (client_cert, table.tls_client_ca_file.is_empty()) {
        (ClientCertMode::None, false) => {
            return Err(format!(
                "`{name}.tls_client_ca_file` is set but `{name}.tls_client_cert` is \"none\": set it to \"optional\" or \"required\" to check client certificates"
            ));
        }
        (ClientCertMode::Optional | ClientCertMode::Required, true) => {
            return Err(format!(
                "`{name}.tls_client_cert` is {:?} but `{name}.tls_client_ca_file` is not set: client certificates are checked against that authority",
                table.tls_client_cert
            ));
        }
        _ => {}
    }
    if client_cert == ClientCertMode::None && username_from != NameFrom::None {
        return Err(format!(
            "`{name}.tls_username_from` is {:?} but `{name}.tls_client_cert` is \"none\": a username comes from a client certificate",
            table.tls_username_from
        ));
    }
    Ok(TlsFiles {
        name: name.to_string(),
        cert_file: table.tls_cert_file.clone(),
        key_file: table.tls_key_file.clone(),
        client_ca_file: table.tls_client_ca_file.clone(),
        client_cert,
        username_from,
    })
}

/// Checks one `[[listener]]` table; `name` says which, for the errors. The transports and
/// options that issue 14 plans and that are not built yet are refused by name, so that a
/// configuration never seems to ask for something the broker does not do.
fn checked_listener(table: &ListenerConfig, name: &str) -> Result<Listener, String> {
    let bind: SocketAddr = table.bind.parse().map_err(|e| {
        format!(
            "`{name}.bind` is {:?}: {e} (expected ADDRESS:PORT)",
            table.bind
        )
    })?;
    let one_of = |key: &str, value: &str, allowed: &[&str]| {
        if allowed.contains(&value) {
            Ok(())
        } else {
            Err(format!(
                "`{name}.{key}` is {value:?}: expected one of {}",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    one_of("transport", &table.transport, &["tcp", "tls", "ws", "wss"])?;
    one_of(
        "proxy_protocol",
        &table.proxy_protocol,
        &["off", "v1", "v2", "any"],
    )?;
    one_of(
        "tls_client_cert",
        &table.tls_client_cert,
        &["none", "optional", "required"],
    )?;
    one_of(
        "tls_username_from",
        &table.tls_username_from,
        &["none", "cn", "san"],
    )?;
    let proxy = checked_proxy(table, name)?;
    let websocket = matches!(table.transport.as_str(), "ws" | "wss");
    if websocket && !table.path.starts_with('/') {
        return Err(format!(
            "`{name}.path` is {:?}: a WebSocket path starts with '/'",
            table.path
        ));
    }
    if !websocket && table.path != default_path() {
        return Err(format!(
            "`{name}.path` is set but `{name}.transport` is {:?}: a path belongs to a WebSocket listener",
            table.transport
        ));
    }
    if !websocket && !table.ws_allowed_origins.is_empty() {
        return Err(format!(
            "`{name}.ws_allowed_origins` is set but `{name}.transport` is {:?}: allowed origins belong to a \"ws\" or \"wss\" listener",
            table.transport
        ));
    }
    let allowed_origins = checked_origins(&table.ws_allowed_origins, name)?;
    let transport = match table.transport.as_str() {
        "tls" => TransportKind::Tls(checked_tls(table, name)?),
        "wss" => TransportKind::Wss {
            path: table.path.clone(),
            allowed_origins,
            tls: checked_tls(table, name)?,
        },
        plain => {
            for (key, value) in [
                ("tls_cert_file", &table.tls_cert_file),
                ("tls_key_file", &table.tls_key_file),
                ("tls_client_ca_file", &table.tls_client_ca_file),
            ] {
                if !value.is_empty() {
                    return Err(format!(
                        "`{name}.{key}` is set but `{name}.transport` is {:?}: TLS settings belong to a \"tls\" or \"wss\" listener",
                        table.transport
                    ));
                }
            }
            // The one certificate setting a listener without TLS may have: the CN that a
            // balancer in front verified, from its PROXY v2 SSL TLV.
            let cn_from_balancer = table.tls_username_from == "cn"
                && proxy.as_ref().is_some_and(|p| p.accept != ProxyAccept::V1);
            for (key, value) in [
                ("tls_client_cert", &table.tls_client_cert),
                ("tls_username_from", &table.tls_username_from),
            ] {
                if value != "none" && !(key == "tls_username_from" && cn_from_balancer) {
                    return Err(format!(
                        "`{name}.{key}` is {value:?} but `{name}.transport` is {:?}: client certificates need a \"tls\" or \"wss\" listener (or, for `tls_username_from = \"cn\"`, `proxy_protocol = \"v2\"` or \"any\" behind a balancer that sends the certificate's CN)",
                        table.transport
                    ));
                }
            }
            if plain == "ws" {
                TransportKind::Ws {
                    path: table.path.clone(),
                    allowed_origins,
                }
            } else {
                TransportKind::Tcp
            }
        }
    };
    let proxy = proxy.map(|mut proxy| {
        proxy.name_from_ssl_cn = matches!(transport, TransportKind::Tcp | TransportKind::Ws { .. })
            && table.tls_username_from == "cn";
        proxy
    });
    Ok(Listener {
        bind,
        transport,
        proxy,
        connections_max: table.connections_max,
    })
}

/// The longest `ws_allowed_origins` entry: an origin is a scheme, a host name (at most 253
/// bytes) and a port.
const ORIGIN_LEN_MAX: usize = 256;

/// Checks `ws_allowed_origins`: each entry is `"*"` or an origin as browsers send it,
/// `scheme://host[:port]` with no path, printable ASCII, at most [`ORIGIN_LEN_MAX`] bytes.
fn checked_origins(origins: &[String], name: &str) -> Result<Vec<String>, String> {
    for (index, origin) in origins.iter().enumerate() {
        let problem = if origin.is_empty() {
            Some("it is empty")
        } else if origin.len() > ORIGIN_LEN_MAX {
            Some("it is longer than 256 bytes")
        } else if !origin.bytes().all(|b| b.is_ascii_graphic()) {
            Some(
                "it holds a control character, a space or a non-ASCII byte (a browser sends an internationalised host in its xn-- form)",
            )
        } else if origin == shardmq_net::ingress::ws::ANY_ORIGIN {
            None
        } else {
            match origin.split_once("://") {
                Some((scheme, host)) if !scheme.is_empty() && !host.is_empty() => {
                    host.contains(['/', '?', '#']).then_some(
                        "an origin has no path: scheme://host[:port], as a browser sends it",
                    )
                }
                _ => {
                    Some("expected scheme://host[:port] (as a browser sends it in Origin) or \"*\"")
                }
            }
        };
        if let Some(problem) = problem {
            let shown: String = origin.chars().take(64).collect();
            return Err(format!(
                "`{name}.ws_allowed_origins[{index}]` is {shown:?}: {problem}"
            ));
        }
    }
    Ok(origins.to_vec())
}

/// Checks `proxy_protocol` and `proxy_trusted`: a PROXY listener must say whom it trusts.
fn checked_proxy(table: &ListenerConfig, name: &str) -> Result<Option<ProxySettings>, String> {
    let Some(accept) = ProxyAccept::parse(&table.proxy_protocol) else {
        if !table.proxy_trusted.is_empty() {
            return Err(format!(
                "`{name}.proxy_trusted` is set but `{name}.proxy_protocol` is \"off\""
            ));
        }
        return Ok(None);
    };
    if table.proxy_trusted.is_empty() {
        return Err(format!(
            "`{name}.proxy_protocol` is {:?} but `{name}.proxy_trusted` is empty: list the balancers' networks (CIDR) allowed to send a PROXY header",
            table.proxy_protocol
        ));
    }
    let trusted = TrustedNetworks::parse(&table.proxy_trusted)
        .map_err(|e| format!("`{name}.proxy_trusted`: {e}"))?;
    Ok(Some(ProxySettings {
        accept,
        trusted,
        name_from_ssl_cn: false,
    }))
}

/// `cluster.seeds`: addresses (`10.0.0.1:7883`, `[fd00::1]:7883`) are dialled as they are;
/// `host:port` and `srv:NAME` entries are names, resolved before each redial.
fn parse_seeds(entries: &[String]) -> Result<(Vec<SocketAddr>, Vec<SeedName>), String> {
    let mut addresses = Vec::new();
    let mut names = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let shown: String = entry.chars().take(64).collect();
        let problem = |why: &str| format!("`cluster.seeds[{index}]` is {shown:?}: {why}");
        if let Some(name) = entry.strip_prefix("srv:") {
            if !is_dns_name(name) {
                return Err(problem(
                    "expected srv:NAME with a DNS name (such as srv:_cluster._tcp.shardmq.default.svc.cluster.local)",
                ));
            }
            names.push(SeedName::Srv(name.trim_end_matches('.').to_string()));
        } else if let Ok(address) = entry.parse::<SocketAddr>() {
            addresses.push(address);
        } else {
            let expected = "expected ADDRESS:PORT, HOST:PORT or srv:NAME";
            let (host, port) = entry.rsplit_once(':').ok_or_else(|| problem(expected))?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| problem("the port must be a number from 1 to 65535"))?;
            if !is_dns_name(host) {
                return Err(problem(expected));
            }
            names.push(SeedName::Host {
                host: host.to_string(),
                port,
            });
        }
    }
    if names.len() > SEED_NAMES_MAX {
        return Err(format!(
            "`cluster.seeds` has {} names: at most {SEED_NAMES_MAX}",
            names.len()
        ));
    }
    Ok((addresses, names))
}

/// Replicas of each persistent session a node may ask for: each costs a copy of the
/// session's records on another node and a send of every record.
const SESSION_REPLICAS_MAX: usize = 4;

/// Seed names one node may list (each may stand for several addresses).
const SEED_NAMES_MAX: usize = 64;

/// A DNS name as RFC 1035 allows it (with `_` for SRV labels): labels of 1 to 63 letters,
/// digits, `-` or `_`, 253 characters at most, an optional final dot.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub enabled: bool,
    pub name: String,
    pub secret: String,
    pub node_id: u32,
    pub role: String,
    pub listen: SocketAddr,
    pub advertise: String,
    pub seeds: Vec<String>,
    pub dns_server: String,
    pub heartbeat_ms: u64,
    pub link_timeout_ms: u64,
    pub reconnect_ms: u64,
    pub down_grace_seconds: u64,
    pub log_entries_max: usize,
    pub forward_queue_max: usize,
    pub frame_size_max: usize,
    pub takeover_timeout_ms: u64,
    pub session_replicas: usize,
    pub tls: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub tls_ca_file: String,
    pub links_per_address_max: u32,
}

impl ClusterConfig {
    /// This node's identifier in the cluster, or 0 on a node on its own.
    pub fn node_id_if_enabled(&self) -> u32 {
        if self.enabled { self.node_id } else { 0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: String,
    pub token_file: String,
    pub allowed_hosts: Vec<String>,
    pub header_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub body_size_max: usize,
    pub connections_max: usize,
    pub stall_timeout_ms: u64,
    /// Per-client traces running at once on this node (`trace.rs`); 0 turns traces off.
    pub traces_max: usize,
    /// The largest trace file, in bytes: past it the trace stops.
    pub trace_bytes_max: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    pub shards: u16,
    pub pin_cores: bool,
    pub backlog: i32,
    pub shutdown_grace_seconds: u64,
    pub data_dir: String,
    pub shared_subscription_strategy: String,
    pub log: String,
    pub log_format: String,
    pub sys_interval_seconds: u64,
    pub tcp_keepalive_idle_seconds: u64,
    pub tcp_keepalive_interval_seconds: u64,
    pub tcp_keepalive_count: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reactor {
    pub ring_entries: u32,
    pub buffer_count: u16,
    pub buffer_size: usize,
    pub mailbox_capacity: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub connections_per_shard_max: usize,
    pub inflight_per_session_max: u16,
    pub receive_maximum: u16,
    pub queued_messages_per_session_max: usize,
    pub packet_size_max: u32,
    pub topic_levels_max: usize,
    pub subscriptions_per_session_max: usize,
    pub topic_alias_max: u16,
    pub client_id_length_max: usize,
    pub keep_alive_seconds_max: u16,
    pub session_expiry_seconds_max: u32,
    pub qos_max: u8,
    pub retain_available: bool,
    pub connections_per_address_max: u32,
    pub connect_rate_per_address_per_second_max: u32,
    pub connect_rate_per_second_max: u32,
    pub address_bucket_count: u32,
    pub ipv6_prefix_bits: u8,
    pub unsent_bytes_per_connection_max: usize,
    pub send_stuck_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub connect_packet_size_max: u32,
    pub subscribe_filters_max: usize,
    pub retained_per_subscribe_max: usize,
    pub retained_messages_max: usize,
    pub retained_bytes_max: usize,
    pub persistent_sessions_per_shard_max: usize,
    pub takeover_pending_bytes_max: usize,
}

/// Merges `overrides` into `base`, table by table, refusing keys `base` does not have.
fn merge(base: &mut toml::Table, overrides: toml::Table, path: &str) -> Result<(), String> {
    for (key, value) in overrides {
        let name = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match (base.get_mut(&key), value) {
            (None, _) => return Err(format!("unknown configuration key `{name}`")),
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => {
                merge(inner, value, &name)?
            }
            (Some(toml::Value::Table(_)), _) => {
                return Err(format!("configuration key `{name}` must be a table"));
            }
            (Some(slot), value) => *slot = value,
        }
    }
    Ok(())
}

impl Config {
    /// The defaults, overridden by the TOML text `overrides` (a file's contents).
    pub fn from_overrides(overrides: &str, source: &str) -> Result<Self, String> {
        let mut table: toml::Table = DEFAULT_TOML
            .parse()
            .expect("the embedded default configuration parses");
        let mut overrides: toml::Table = overrides
            .parse()
            .map_err(|error| format!("{source}: {error}"))?;
        // `[[listener]]` tables have no defaults to merge into: each key is defaulted on its
        // own. A file that has them and does not set `server.listen` listens on them alone.
        if let Some(listeners) = overrides.remove("listener") {
            if !matches!(&listeners, toml::Value::Array(tables) if tables.iter().all(toml::Value::is_table))
            {
                return Err(format!(
                    "{source}: `listener` must be an array of tables (`[[listener]]`)"
                ));
            }
            let sets_listen = overrides
                .get("server")
                .and_then(toml::Value::as_table)
                .is_some_and(|server| server.contains_key("listen"));
            if !sets_listen && let Some(toml::Value::Table(server)) = table.get_mut("server") {
                server.insert("listen".into(), toml::Value::Array(Vec::new()));
            }
            table.insert("listener".into(), listeners);
        }
        merge(&mut table, overrides, "")?;
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|error| format!("{source}: {error}"))?;
        if let Ok(secret) = std::env::var("SHARDMQ_CLUSTER_SECRET") {
            config.cluster.secret = secret;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        match path {
            None => Self::from_overrides("", "default configuration"),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                Self::from_overrides(&text, &path.display().to_string())
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(message.to_string()) };
        self.listeners()?;
        check(
            matches!(self.server.log_format.as_str(), "text" | "json"),
            "`server.log_format` must be \"text\" or \"json\"",
        )?;
        self.auth.validate()?;
        check(self.server.backlog > 0, "`server.backlog` must be positive")?;
        // Servers must accept identifiers of 1 to 23 characters [MQTT-3.1.3-5]; an MQTT string
        // holds at most 65,535 bytes, so a larger limit would mean nothing.
        check(
            (23..=65_535).contains(&self.limits.client_id_length_max),
            "`limits.client_id_length_max` must be from 23 to 65535",
        )?;
        check(
            self.reactor.buffer_count.is_power_of_two() && self.reactor.buffer_count <= 32768,
            "`reactor.buffer_count` must be a power of two between 1 and 32768",
        )?;
        check(
            self.reactor.buffer_size >= 512,
            "`reactor.buffer_size` must be at least 512 bytes",
        )?;
        check(
            self.reactor.ring_entries >= 64,
            "`reactor.ring_entries` must be at least 64",
        )?;
        check(
            self.reactor.mailbox_capacity > 0,
            "`reactor.mailbox_capacity` must be positive",
        )?;
        check(
            self.limits.qos_max <= 2,
            "`limits.qos_max` must be 0, 1 or 2",
        )?;
        check(
            self.limits.inflight_per_session_max > 0,
            "`limits.inflight_per_session_max` must be positive",
        )?;
        check(
            self.limits.receive_maximum > 0,
            "`limits.receive_maximum` must be positive",
        )?;
        check(
            self.limits.packet_size_max >= 64,
            "`limits.packet_size_max` must be at least 64 bytes",
        )?;
        check(
            self.limits.topic_levels_max > 0,
            "`limits.topic_levels_max` must be positive",
        )?;
        check(
            self.limits.connect_timeout_ms > 0,
            "`limits.connect_timeout_ms` must be positive",
        )?;
        check(
            self.limits.connect_packet_size_max >= 64
                && self.limits.connect_packet_size_max <= self.limits.packet_size_max,
            "`limits.connect_packet_size_max` must be at least 64 bytes and at most `limits.packet_size_max`",
        )?;
        check(
            self.limits.subscribe_filters_max > 0,
            "`limits.subscribe_filters_max` must be positive",
        )?;
        check(
            self.limits.queued_messages_per_session_max > 0,
            "`limits.queued_messages_per_session_max` must be positive",
        )?;
        check(
            (256..=1 << 24).contains(&self.limits.address_bucket_count)
                && self.limits.address_bucket_count.is_power_of_two(),
            "`limits.address_bucket_count` must be a power of two from 256 to 16777216",
        )?;
        check(
            (1..=128).contains(&self.limits.ipv6_prefix_bits),
            "`limits.ipv6_prefix_bits` must be from 1 to 128",
        )?;
        check(
            self.limits.unsent_bytes_per_connection_max >= 1024,
            "`limits.unsent_bytes_per_connection_max` must be at least 1024 bytes",
        )?;
        check(
            self.limits.send_stuck_timeout_ms >= 100,
            "`limits.send_stuck_timeout_ms` must be at least 100",
        )?;
        self.shared_strategy()?;
        self.tcp_keepalive()?;
        self.admin_listen()?;
        let a = &self.admin;
        check(
            (100..=600_000).contains(&a.header_read_timeout_ms),
            "`admin.header_read_timeout_ms` must be from 100 to 600000",
        )?;
        check(
            (100..=600_000).contains(&a.request_timeout_ms),
            "`admin.request_timeout_ms` must be from 100 to 600000",
        )?;
        check(
            (64..=16 << 20).contains(&a.body_size_max),
            "`admin.body_size_max` must be from 64 to 16777216 bytes",
        )?;
        check(
            (1..=10_000).contains(&a.connections_max),
            "`admin.connections_max` must be from 1 to 10000",
        )?;
        // A loop waits at most a second when idle; below two seconds an idle shard would
        // look stalled.
        check(
            (2000..=3_600_000).contains(&a.stall_timeout_ms),
            "`admin.stall_timeout_ms` must be from 2000 to 3600000",
        )?;
        check(
            a.traces_max <= 1024,
            "`admin.traces_max` must be from 0 to 1024",
        )?;
        check(
            (4096..=1 << 30).contains(&a.trace_bytes_max),
            "`admin.trace_bytes_max` must be from 4096 to 1073741824 bytes",
        )?;
        if self.cluster.enabled {
            self.cluster_settings()?;
        }
        Ok(())
    }

    /// Every listener, checked: a plain TCP one for each `server.listen` address, then the
    /// `[[listener]]` tables in order. The index of a listener in this list is the one the
    /// reactor reports for its connections. At least one is needed, and no address twice.
    pub fn listeners(&self) -> Result<Vec<Listener>, String> {
        let mut listeners: Vec<Listener> = self
            .server
            .listen
            .iter()
            .map(|&bind| Listener {
                bind,
                transport: TransportKind::Tcp,
                proxy: None,
                connections_max: 0,
            })
            .collect();
        for (index, table) in self.listener.iter().enumerate() {
            listeners.push(checked_listener(table, &format!("listener[{index}]"))?);
        }
        if listeners.is_empty() {
            return Err(
                "no listener: `server.listen` (or --listen) or a `[[listener]]` table must name an address"
                    .into(),
            );
        }
        for (index, listener) in listeners.iter().enumerate() {
            if listeners[..index].iter().any(|l| l.bind == listener.bind) {
                return Err(format!(
                    "the address {} is listened on twice (`server.listen` and `[[listener]]` tables must not repeat an address)",
                    listener.bind
                ));
            }
        }
        if listeners.len() > usize::from(u16::MAX) {
            return Err("too many listeners (at most 65535)".into());
        }
        Ok(listeners)
    }

    /// The admin endpoint's address, if it is on.
    pub fn admin_listen(&self) -> Result<Option<SocketAddr>, String> {
        if self.admin.listen.is_empty() {
            return Ok(None);
        }
        self.admin
            .listen
            .parse()
            .map(Some)
            .map_err(|e| format!("`admin.listen` is {:?}: {e}", self.admin.listen))
    }

    /// TCP keepalive for client connections (idle time, probe interval, probe count), or None
    /// when `server.tcp_keepalive_idle_seconds` is 0.
    pub fn tcp_keepalive(&self) -> Result<Option<(Duration, Duration, u32)>, String> {
        let s = &self.server;
        if s.tcp_keepalive_idle_seconds == 0 {
            return Ok(None);
        }
        // The kernel's own bounds (TCP_KEEPIDLE, TCP_KEEPINTVL: 32767 s; TCP_KEEPCNT: 127).
        let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(message.to_string()) };
        check(
            s.tcp_keepalive_idle_seconds <= 32767,
            "`server.tcp_keepalive_idle_seconds` must be from 0 (off) to 32767",
        )?;
        check(
            (1..=32767).contains(&s.tcp_keepalive_interval_seconds),
            "`server.tcp_keepalive_interval_seconds` must be from 1 to 32767",
        )?;
        check(
            (1..=127).contains(&s.tcp_keepalive_count),
            "`server.tcp_keepalive_count` must be from 1 to 127",
        )?;
        Ok(Some((
            Duration::from_secs(s.tcp_keepalive_idle_seconds),
            Duration::from_secs(s.tcp_keepalive_interval_seconds),
            s.tcp_keepalive_count,
        )))
    }

    /// The admin token: `SHARDMQ_ADMIN_TOKEN` if set, else the content of `admin.token_file`,
    /// else None (the endpoint then refuses every call but the health probes). A token file
    /// that others may read is accepted with `warning` set; an empty or short token is an
    /// error.
    pub fn admin_token(&self) -> Result<AdminToken, String> {
        admin_token(&self.admin.token_file)
    }

    /// The DNS server seed names are asked of (`cluster.dns_server`), or None for the
    /// system's: getaddrinfo for `host:port` (so /etc/hosts works) and resolv.conf for SRV.
    pub fn dns_server(&self) -> Result<Option<SocketAddr>, String> {
        let server = &self.cluster.dns_server;
        if server.is_empty() {
            return Ok(None);
        }
        server.parse().map(Some).map_err(|_| {
            format!("`cluster.dns_server` is {server:?}: expected ADDRESS:PORT (such as \"10.96.0.10:53\") or \"\" for the system's resolver")
        })
    }

    /// The cluster settings for the shards, checked; `server.listen` gives the MQTT address
    /// other nodes show in their status.
    pub fn cluster_settings(&self) -> Result<ClusterSettings, String> {
        let c = &self.cluster;
        let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(message.to_string()) };
        check(
            c.node_id > 0,
            "`cluster.node_id` must be set (1 or more) when the cluster is enabled",
        )?;
        check(!c.name.is_empty(), "`cluster.name` must not be empty")?;
        check(
            c.secret.len() >= 16,
            "`cluster.secret` (or SHARDMQ_CLUSTER_SECRET) must be at least 16 characters when the cluster is enabled",
        )?;
        let role = match c.role.as_str() {
            "core" => Role::Core,
            "edge" => Role::Edge,
            other => {
                return Err(format!(
                    "`cluster.role` is {other:?}: expected \"core\" or \"edge\""
                ));
            }
        };
        check(
            role == Role::Core || !c.seeds.is_empty(),
            "`cluster.seeds` must name at least one core when `cluster.role` is \"edge\"",
        )?;
        let (seeds, seed_names) = parse_seeds(&c.seeds)?;
        self.dns_server()?;
        let advertise: SocketAddr = if c.advertise.is_empty() {
            c.listen
        } else {
            c.advertise
                .parse()
                .map_err(|e| format!("`cluster.advertise` is {:?}: {e}", c.advertise))?
        };
        check(
            !advertise.ip().is_unspecified(),
            "`cluster.advertise` must be set when `cluster.listen` is an unspecified address (0.0.0.0): other nodes dial it",
        )?;
        check(
            c.heartbeat_ms > 0,
            "`cluster.heartbeat_ms` must be positive",
        )?;
        check(
            c.link_timeout_ms > c.heartbeat_ms,
            "`cluster.link_timeout_ms` must be longer than `cluster.heartbeat_ms`",
        )?;
        check(
            c.reconnect_ms > 0,
            "`cluster.reconnect_ms` must be positive",
        )?;
        check(
            c.log_entries_max > 0,
            "`cluster.log_entries_max` must be positive",
        )?;
        check(
            c.forward_queue_max > 0,
            "`cluster.forward_queue_max` must be positive",
        )?;
        // Senders fill a frame to half the limit, and one forwarded message (a packet of up
        // to `packet_size_max`, with its routing) must fit that half.
        let frame_size_min = (self.limits.packet_size_max as usize)
            .saturating_add(64 * 1024)
            .saturating_mul(2);
        if c.frame_size_max < frame_size_min {
            return Err(format!(
                "`cluster.frame_size_max` must be at least twice `limits.packet_size_max` plus 64 KiB ({frame_size_min} bytes): a forwarded message must fit half a frame"
            ));
        }
        check(
            (1..=600_000).contains(&c.takeover_timeout_ms),
            "`cluster.takeover_timeout_ms` must be from 1 to 600000",
        )?;
        check(
            c.session_replicas <= SESSION_REPLICAS_MAX,
            "`cluster.session_replicas` must be from 0 to 4",
        )?;
        let tls = self.cluster_tls()?;
        let mqtt_address = self
            .listeners()?
            .first()
            .map(|listener| listener.bind.to_string())
            .unwrap_or_default();
        Ok(ClusterSettings {
            link: LinkSettings {
                member: Member {
                    node: c.node_id,
                    role,
                    cluster_address: advertise.to_string(),
                    mqtt_address,
                    // Set per start by NodeShard::clustered.
                    epoch: 0,
                },
                cluster_name: c.name.clone(),
                cluster_secret: c.secret.clone(),
                body_len_max: c.frame_size_max,
                // Set per start by NodeShard::clustered.
                epoch: 0,
                tls,
            },
            seeds,
            seed_names,
            heartbeat_ms: c.heartbeat_ms,
            link_timeout_ms: c.link_timeout_ms,
            reconnect_ms: c.reconnect_ms,
            down_grace_ms: c.down_grace_seconds * 1000,
            log_entries_max: c.log_entries_max,
            forward_queue_max: c.forward_queue_max,
            session_replicas: c.session_replicas,
            start_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as u64),
        })
    }

    /// The cluster links' TLS, read once at start from `cluster.tls_*_file` when `cluster.tls`
    /// is "required". Every node's certificate must carry the cluster name as a DNS
    /// subjectAltName: a node dialling another checks it, so a certificate of the same
    /// authority made for another cluster (or another service) is refused.
    fn cluster_tls(&self) -> Result<Option<MutualTls>, String> {
        let c = &self.cluster;
        match c.tls.as_str() {
            "off" => return Ok(None),
            "required" => {}
            other => {
                return Err(format!(
                    "`cluster.tls` is {other:?}: expected \"off\" or \"required\""
                ));
            }
        }
        let read = |key: &str, path: &str| {
            if path.is_empty() {
                return Err(format!(
                    "`cluster.{key}` must be set when `cluster.tls` is \"required\""
                ));
            }
            std::fs::read(path).map_err(|e| format!("`cluster.{key}` {path:?}: {e}"))
        };
        let cert = read("tls_cert_file", &c.tls_cert_file)?;
        let key = read("tls_key_file", &c.tls_key_file)?;
        let authority = read("tls_ca_file", &c.tls_ca_file)?;
        MutualTls::from_pem(&cert, &key, &authority, &c.name)
            .map(Some)
            .map_err(|e| {
                // A name error is a configuration the operator may not know is tied to TLS.
                let hint = if e.contains("name") {
                    " (`cluster.name` must be a DNS name that every node's certificate carries)"
                } else {
                    ""
                };
                format!("`cluster.tls` is \"required\" but its files are not usable: {e}{hint}")
            })
    }

    /// `storage.sync` and `storage.sync_interval_ms`.
    pub fn sync_policy(&self) -> Result<crate::durable::SyncPolicy, String> {
        use crate::durable::SyncPolicy;
        match self.storage.sync.as_str() {
            "always" => Ok(SyncPolicy::Always),
            "interval" if self.storage.sync_interval_ms == 0 => {
                Err("`storage.sync_interval_ms` must be above 0 with sync = \"interval\"".into())
            }
            "interval" => Ok(SyncPolicy::Interval {
                interval_ms: self.storage.sync_interval_ms,
            }),
            "none" => Ok(SyncPolicy::None),
            other => Err(format!(
                "`storage.sync` is {other:?}: expected \"always\", \"interval\" or \"none\""
            )),
        }
    }

    /// The log's settings from `[storage]`.
    pub fn log_config(&self) -> Result<shardmq_shards::storage::LogConfig, String> {
        let storage = &self.storage;
        if storage.segment_size_bytes < 4096 {
            return Err("`storage.segment_size_bytes` must be at least 4096".into());
        }
        if storage.recovery_file_bytes_max < storage.segment_size_bytes {
            return Err(
                "`storage.recovery_file_bytes_max` must be at least `storage.segment_size_bytes`"
                    .into(),
            );
        }
        if storage.held_acks_per_shard_max == 0 {
            return Err("`storage.held_acks_per_shard_max` must be above 0".into());
        }
        Ok(shardmq_shards::storage::LogConfig {
            segment_size_bytes: storage.segment_size_bytes,
            compaction: shardmq_shards::storage::CompactionPolicy {
                ratio: storage.compaction_ratio.max(1),
                min_bytes: storage.compaction_min_bytes,
            },
        })
    }

    pub fn shared_strategy(&self) -> Result<SharedStrategy, String> {
        match self.server.shared_subscription_strategy.as_str() {
            "round-robin" => Ok(SharedStrategy::RoundRobin),
            "client-id-hash" => Ok(SharedStrategy::ClientIdHash),
            other => Err(format!(
                "`server.shared_subscription_strategy` is {other:?}: expected \"round-robin\" or \"client-id-hash\""
            )),
        }
    }

    /// The limits a client connection must pass at accept, before any of its bytes is read.
    /// The limits on connections to the cluster port: a node opens a few links per shard,
    /// so many more from one address are a stranger holding the places of links in their
    /// handshake (`PENDING_LINKS_MAX`) to keep the node's peers out.
    pub fn link_admission_limits(&self) -> AdmissionLimits {
        let l = &self.limits;
        AdmissionLimits {
            connections_per_address_max: self.cluster.links_per_address_max,
            connect_rate_per_address_per_second_max: self.cluster.links_per_address_max,
            connect_rate_per_second_max: 0,
            address_bucket_count: 4096,
            ipv6_prefix_bits: l.ipv6_prefix_bits,
        }
    }

    pub fn admission_limits(&self) -> AdmissionLimits {
        let l = &self.limits;
        AdmissionLimits {
            connections_per_address_max: l.connections_per_address_max,
            connect_rate_per_address_per_second_max: l.connect_rate_per_address_per_second_max,
            connect_rate_per_second_max: l.connect_rate_per_second_max,
            address_bucket_count: l.address_bucket_count,
            ipv6_prefix_bits: l.ipv6_prefix_bits,
        }
    }

    pub fn limits(&self) -> Limits {
        let l = &self.limits;
        Limits {
            connections_per_shard_max: l.connections_per_shard_max,
            inflight_per_session_max: l.inflight_per_session_max,
            receive_maximum: l.receive_maximum,
            queued_messages_per_session_max: l.queued_messages_per_session_max,
            packet_size_max: l.packet_size_max,
            topic_levels_max: l.topic_levels_max,
            subscriptions_per_session_max: l.subscriptions_per_session_max,
            topic_alias_max: l.topic_alias_max,
            client_id_length_max: l.client_id_length_max,
            keep_alive_seconds_max: l.keep_alive_seconds_max,
            session_expiry_seconds_max: l.session_expiry_seconds_max,
            qos_max: QoS::from_bits(l.qos_max).expect("validated"),
            retain_available: l.retain_available,
            unsent_bytes_per_connection_max: l.unsent_bytes_per_connection_max,
            send_stuck_timeout_ms: l.send_stuck_timeout_ms,
            connect_timeout_ms: l.connect_timeout_ms,
            connect_packet_size_max: l.connect_packet_size_max,
            subscribe_filters_max: l.subscribe_filters_max,
            retained_per_subscribe_max: l.retained_per_subscribe_max,
            retained_messages_max: l.retained_messages_max,
            retained_bytes_max: l.retained_bytes_max,
            persistent_sessions_per_shard_max: l.persistent_sessions_per_shard_max,
            takeover_pending_bytes_max: l.takeover_pending_bytes_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_match_the_limits_defaults() {
        let config = Config::from_overrides("", "test").unwrap();
        assert_eq!(config.limits(), Limits::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let error = Config::from_overrides("[limits]\nbogus = 1\n", "f.toml").unwrap_err();
        assert!(error.contains("limits.bogus"), "{error}");
        let error = Config::from_overrides("[nope]\n", "f.toml").unwrap_err();
        assert!(error.contains("`nope`"), "{error}");
        let error = Config::from_overrides("[limits]\nqos_max = 3\n", "f.toml").unwrap_err();
        assert!(error.contains("limits.qos_max"), "{error}");
        let error = Config::from_overrides("[server]\nlisten = [\"not an address\"]\n", "f.toml")
            .unwrap_err();
        assert!(error.contains("listen"), "{error}");
        let error = Config::from_overrides(
            "[server]\nshared_subscription_strategy = \"random\"\n",
            "f.toml",
        )
        .unwrap_err();
        assert!(
            error.contains("server.shared_subscription_strategy"),
            "{error}"
        );
        for (text, key) in [
            ("address_bucket_count = 1000", "limits.address_bucket_count"),
            ("address_bucket_count = 128", "limits.address_bucket_count"),
            ("ipv6_prefix_bits = 0", "limits.ipv6_prefix_bits"),
            ("ipv6_prefix_bits = 129", "limits.ipv6_prefix_bits"),
            (
                "connections_per_address_max = -1",
                "connections_per_address_max",
            ),
        ] {
            let error =
                Config::from_overrides(&format!("[limits]\n{text}\n"), "f.toml").unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
        let config = Config::from_overrides("[server]\nshards = 3\n", "f.toml").unwrap();
        assert_eq!(config.server.shards, 3);
    }

    #[test]
    fn cluster_settings_are_checked_only_when_enabled() {
        // A valid enabled cluster, with one key replaced by `extra` ("key = value").
        let cluster = |extra: &str| {
            let key = extra.split(" = ").next().unwrap_or("");
            let lines: String = [
                "enabled = true",
                "node_id = 1",
                "secret = \"0123456789abcdef\"",
                "listen = \"127.0.0.1:7001\"",
            ]
            .iter()
            .filter(|line| key.is_empty() || !line.starts_with(key))
            .map(|line| format!("{line}\n"))
            .collect();
            Config::from_overrides(&format!("[cluster]\n{lines}{extra}\n"), "f.toml")
        };
        let settings = cluster("").unwrap().cluster_settings().unwrap();
        assert_eq!(settings.link.member.cluster_address, "127.0.0.1:7001");
        assert!(Config::from_overrides("[cluster]\nnode_id = 0\n", "f.toml").is_ok());
        for (extra, key) in [
            ("role = \"edge\"", "cluster.seeds"),
            ("role = \"leader\"", "cluster.role"),
            ("secret = \"short\"", "cluster.secret"),
            ("listen = \"0.0.0.0:7001\"", "cluster.advertise"),
            ("heartbeat_ms = 5000", "cluster.link_timeout_ms"),
        ] {
            let error = cluster(extra).unwrap_err();
            assert!(error.contains(key), "{extra}: {error}");
        }
        let error =
            Config::from_overrides("[admin]\nlisten = \"nowhere\"\n", "f.toml").unwrap_err();
        assert!(error.contains("admin.listen"), "{error}");
    }

    #[test]
    fn seeds_are_addresses_host_names_or_srv_names() {
        let entries: Vec<String> = [
            "10.0.0.1:7883",
            "[fd00::1]:7883",
            "core-0.shardmq.default.svc:7883",
            "localhost:7001",
            "srv:_cluster._tcp.shardmq.default.svc.cluster.local.",
        ]
        .iter()
        .map(|e| e.to_string())
        .collect();
        let (addresses, names) = parse_seeds(&entries).unwrap();
        assert_eq!(
            addresses,
            vec![
                "10.0.0.1:7883".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:7883".parse().unwrap()
            ]
        );
        assert_eq!(
            names,
            vec![
                SeedName::Host {
                    host: "core-0.shardmq.default.svc".into(),
                    port: 7883
                },
                SeedName::Host {
                    host: "localhost".into(),
                    port: 7001
                },
                SeedName::Srv("_cluster._tcp.shardmq.default.svc.cluster.local".into()),
            ]
        );
        assert_eq!(
            names[2].to_string(),
            "srv:_cluster._tcp.shardmq.default.svc.cluster.local"
        );
        for (bad, says) in [
            ("core-0", "expected ADDRESS:PORT, HOST:PORT or srv:NAME"),
            ("core-0:0", "port"),
            ("core-0:70000", "port"),
            ("core-0:", "port"),
            (":7883", "expected"),
            ("core 0:7883", "expected"),
            ("srv:", "srv:NAME"),
            ("srv:bad..name", "srv:NAME"),
            ("10.0.0.1", "expected"),
        ] {
            let error = parse_seeds(&[bad.to_string()]).unwrap_err();
            assert!(
                error.contains("cluster.seeds[0]") && error.contains(says),
                "{bad}: {error}"
            );
        }
        let long = format!("{}.example:7883", "a".repeat(64));
        assert!(parse_seeds(&[long]).is_err());
        let many: Vec<String> = (0..=SEED_NAMES_MAX)
            .map(|i| format!("core-{i}:7883"))
            .collect();
        assert!(parse_seeds(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn dns_server_is_an_address_or_empty() {
        let config = |value: &str| {
            Config::from_overrides(&format!("[cluster]\ndns_server = \"{value}\"\n"), "f.toml")
                .unwrap()
        };
        assert_eq!(config("").dns_server().unwrap(), None);
        assert_eq!(
            config("127.0.0.1:5353").dns_server().unwrap(),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert!(
            config("dns.local")
                .dns_server()
                .unwrap_err()
                .contains("cluster.dns_server")
        );
    }

    #[test]
    fn cluster_tls_is_read_at_start_and_checked() {
        let fixture = |name: &str| {
            format!(
                "{}/net/src/ingress/testdata/{name}",
                env!("CARGO_MANIFEST_DIR")
            )
        };
        let cluster = |name: &str, tls: &str, cert: &str| {
            let text = format!(
                "[cluster]\nenabled = true\nnode_id = 1\nsecret = \"0123456789abcdef\"\n\
                 listen = \"127.0.0.1:7001\"\nname = \"{name}\"\ntls = \"{tls}\"\n\
                 tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_ca_file = \"{}\"\n",
                fixture(cert),
                fixture("node.key"),
                fixture("ca.pem"),
            );
            Config::from_overrides(&text, "f.toml")
        };
        let config = cluster("testcluster", "required", "node.pem").unwrap();
        assert!(config.cluster_settings().unwrap().link.tls.is_some());
        let config = cluster("testcluster", "off", "node.pem").unwrap();
        assert!(config.cluster_settings().unwrap().link.tls.is_none());
        for (name, tls, cert, expected) in [
            (
                "testcluster",
                "maybe",
                "node.pem",
                "`cluster.tls` is \"maybe\"",
            ),
            (
                "testcluster",
                "required",
                "missing.pem",
                "cluster.tls_cert_file",
            ),
            // The certificate does not carry the cluster name.
            ("shardmq", "required", "node.pem", "not valid for name"),
            // The key is not the certificate's.
            (
                "testcluster",
                "required",
                "other-node.pem",
                "certificate and key",
            ),
        ] {
            let error = cluster(name, tls, cert).unwrap_err();
            assert!(error.contains(expected), "{name} {tls} {cert}: {error}");
        }
        let error = Config::from_overrides(
            "[cluster]\nenabled = true\nnode_id = 1\nsecret = \"0123456789abcdef\"\n\
             listen = \"127.0.0.1:7001\"\ntls = \"required\"\n",
            "f.toml",
        )
        .unwrap_err();
        assert!(
            error.contains("`cluster.tls_cert_file` must be set"),
            "{error}"
        );
    }

    #[test]
    fn listener_tables_are_checked_and_replace_the_default_listen() {
        let listeners =
            |text: &str| Config::from_overrides(text, "f.toml").and_then(|c| c.listeners());
        // Without tables: the `server.listen` shorthand alone.
        let only = listeners("").unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].bind.to_string(), "0.0.0.0:1883");
        // Tables without `server.listen`: the tables alone, with their defaults.
        let tables = listeners(
            "[[listener]]\nbind = \"127.0.0.1:1884\"\n\
             [[listener]]\nbind = \"[::1]:1885\"\ntransport = \"tcp\"\nconnections_max = 7\n",
        )
        .unwrap();
        assert_eq!(
            tables,
            vec![
                Listener {
                    bind: "127.0.0.1:1884".parse().unwrap(),
                    transport: TransportKind::Tcp,
                    proxy: None,
                    connections_max: 0,
                },
                Listener {
                    bind: "[::1]:1885".parse().unwrap(),
                    transport: TransportKind::Tcp,
                    proxy: None,
                    connections_max: 7,
                },
            ]
        );
        // Both: the shorthand first, so its index comes before the tables'.
        let both = listeners(
            "[server]\nlisten = [\"127.0.0.1:1883\"]\n[[listener]]\nbind = \"127.0.0.1:1884\"\n",
        )
        .unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].bind.port(), 1883);
        for (text, expected) in [
            ("bind = \"nowhere\"", "`listener[0].bind` is \"nowhere\""),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"quic\"",
                "`listener[0].transport` is \"quic\": expected one of",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"ws\"\npath = \"mqtt\"",
                "a WebSocket path starts with '/'",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"wss\"\npath = \"/ws\"",
                "`listener[0].tls_cert_file` must be set for a \"wss\" listener",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"tls\"",
                "`listener[0].tls_cert_file` must be set",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"tls\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_client_cert = \"required\"",
                "`listener[0].tls_client_ca_file` is not set",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"tls\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_client_ca_file = \"ca\"",
                "`listener[0].tls_client_ca_file` is set but `listener[0].tls_client_cert` is \"none\"",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"tls\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_username_from = \"cn\"",
                "a username comes from a client certificate",
            ),
            (
                "bind = \"127.0.0.1:1\"\nproxy_protocol = \"v3\"",
                "`listener[0].proxy_protocol` is \"v3\"",
            ),
            (
                "bind = \"127.0.0.1:1\"\nproxy_protocol = \"v2\"",
                "`listener[0].proxy_trusted` is empty",
            ),
            (
                "bind = \"127.0.0.1:1\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"10.0.0.0/40\"]",
                "`listener[0].proxy_trusted`: \"10.0.0.0/40\"",
            ),
            (
                "bind = \"127.0.0.1:1\"\nproxy_protocol = \"v1\"\nproxy_trusted = [\"10.0.0.0/8\"]\ntls_username_from = \"cn\"",
                "client certificates need",
            ),
            (
                "bind = \"127.0.0.1:1\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"10.0.0.0/8\"]\ntls_username_from = \"san\"",
                "client certificates need",
            ),
            (
                "bind = \"127.0.0.1:1\"\nproxy_trusted = [\"10.0.0.0/8\"]",
                "`listener[0].proxy_trusted` is set",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntls_cert_file = \"c.pem\"",
                "`listener[0].tls_cert_file` is set but",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntls_client_cert = \"sometimes\"",
                "`listener[0].tls_client_cert` is \"sometimes\"",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntls_username_from = \"cn\"",
                "client certificates need",
            ),
            (
                "bind = \"127.0.0.1:1\"\npath = \"/ws\"",
                "a path belongs to a WebSocket listener",
            ),
            (
                "bind = \"127.0.0.1:1\"\nws_allowed_origins = [\"https://app.example\"]",
                "`listener[0].ws_allowed_origins` is set but `listener[0].transport` is \"tcp\"",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_allowed_origins = [\"https://a.example\", \"\"]",
                "`listener[0].ws_allowed_origins[1]` is \"\": it is empty",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_allowed_origins = [\"https://a.example\\r\\nX: 1\"]",
                "`listener[0].ws_allowed_origins[0]` is \"https://a.example\\r\\nX: 1\": it holds a control character",
            ),
            (
                format!(
                    "bind = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_allowed_origins = [\"https://{}.example\"]",
                    "a".repeat(250)
                )
                .as_str(),
                "\": it is longer than 256 bytes",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_allowed_origins = [\"https://a.example/\"]",
                "`listener[0].ws_allowed_origins[0]` is \"https://a.example/\": an origin has no path",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_allowed_origins = [\"a.example\"]",
                "`listener[0].ws_allowed_origins[0]` is \"a.example\": expected scheme://host[:port]",
            ),
            ("bind = \"127.0.0.1:1\"\nbogus = 1", "bogus"),
            ("transport = \"tcp\"", "bind"),
            (
                "bind = \"127.0.0.1:1\"\nconnections_max = -1",
                "connections_max",
            ),
        ] {
            let error = listeners(&format!("[[listener]]\n{text}\n")).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let tls = listeners(
            "[[listener]]\nbind = \"127.0.0.1:8883\"\ntransport = \"tls\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_client_ca_file = \"ca\"\ntls_client_cert = \"required\"\ntls_username_from = \"san\"\n",
        )
        .unwrap();
        assert_eq!(
            tls[0].transport,
            TransportKind::Tls(TlsFiles {
                name: "listener[0]".into(),
                cert_file: "c".into(),
                key_file: "k".into(),
                client_ca_file: "ca".into(),
                client_cert: ClientCertMode::Required,
                username_from: NameFrom::SubjectAltName,
            })
        );
        let proxied = listeners(
            "[[listener]]\nbind = \"127.0.0.1:1884\"\nproxy_protocol = \"any\"\nproxy_trusted = [\"10.0.0.0/8\", \"::1\"]\ntls_username_from = \"cn\"\n",
        )
        .unwrap();
        assert_eq!(
            proxied[0].proxy,
            Some(ProxySettings {
                accept: ProxyAccept::Any,
                trusted: TrustedNetworks::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap(),
                name_from_ssl_cn: true,
            })
        );
        assert_eq!(proxied[0].transport, TransportKind::Tcp);
        let ws = listeners(
            "[[listener]]\nbind = \"127.0.0.1:8080\"\ntransport = \"ws\"\n\
             [[listener]]\nbind = \"127.0.0.1:8081\"\ntransport = \"wss\"\npath = \"/ws\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\n",
        )
        .unwrap();
        assert_eq!(
            ws[0].transport,
            TransportKind::Ws {
                path: "/mqtt".into(),
                allowed_origins: Vec::new(),
            }
        );
        assert!(matches!(&ws[1].transport, TransportKind::Wss { path, .. } if path == "/ws"));
        let origins = listeners(
            "[[listener]]\nbind = \"127.0.0.1:8081\"\ntransport = \"wss\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\nws_allowed_origins = [\"https://app.example\", \"http://localhost:3000\", \"*\"]\n",
        )
        .unwrap();
        assert!(matches!(
            &origins[0].transport,
            TransportKind::Wss { allowed_origins, .. }
                if allowed_origins == &["https://app.example", "http://localhost:3000", "*"]
        ));
        let error = listeners(
            "[[listener]]\nbind = \"127.0.0.1:1884\"\n[[listener]]\nbind = \"127.0.0.1:1884\"\n",
        )
        .unwrap_err();
        assert!(error.contains("listened on twice"), "{error}");
        let error = listeners("listener = 3\n").unwrap_err();
        assert!(error.contains("array of tables"), "{error}");
        let error = listeners("[server]\nlisten = []\n").unwrap_err();
        assert!(error.contains("no listener"), "{error}");
    }
}
