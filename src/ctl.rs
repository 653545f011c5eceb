//! `shardmq ctl`'s inspection commands (nodes, clients, subscriptions, routes, retained):
//! their arguments, the admin API request each one makes, and the table a person reads.
//!
//! Owns: the mapping from a command to its endpoint (parameters in the query string, ids and
//! topics percent-encoded into the path) and the rendering of the answer as aligned columns
//! under a header row. `--json` bypasses the rendering (`main.rs`).
//! Never: talks to a node itself (`admin::ctl` makes the request).

use clap::{Args, Subcommand};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::admin::CtlRequest;

/// The inspection commands of `shardmq ctl` (flattened into its command list).
#[derive(Debug, Subcommand)]
pub enum Inspect {
    /// Every node's role, version, uptime, connections and message rates.
    Nodes,
    /// Connected clients (list, `show ID`, `kick ID`).
    Clients(ClientsArgs),
    /// Subscriptions of the sessions.
    Subscriptions(SubscriptionsArgs),
    /// The route table as this node sees it.
    Routes(RoutesArgs),
    /// Retained messages.
    #[command(subcommand)]
    Retained(RetainedCommand),
}

#[derive(Debug, Args)]
pub struct ClientsArgs {
    #[command(subcommand)]
    pub command: Option<ClientsCommand>,
    /// Only clients whose identifier starts with P.
    #[arg(long, value_name = "P")]
    pub client_id_prefix: Option<String>,
    /// Only clients with this username.
    #[arg(long, value_name = "U")]
    pub username: Option<String>,
    /// Only clients from this IP address (or whose `ip:port` starts with A).
    #[arg(long, value_name = "A")]
    pub address: Option<String>,
    /// Only clients of node N.
    #[arg(long, value_name = "N")]
    pub node: Option<u64>,
    /// At most N clients (default 100, at most 1000).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// One connected client and its subscriptions.
    Show { client_id: String },
    /// End the client's connection (5.0 clients get DISCONNECT 0x98, Administrative action).
    Kick { client_id: String },
}

#[derive(Debug, Args)]
pub struct SubscriptionsArgs {
    #[arg(long, value_name = "P")]
    pub client_id_prefix: Option<String>,
    #[arg(long, value_name = "P")]
    pub filter_prefix: Option<String>,
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RoutesArgs {
    #[arg(long, value_name = "P")]
    pub filter_prefix: Option<String>,
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum RetainedCommand {
    /// Retained messages by topic prefix, or matching an MQTT topic filter.
    List {
        #[arg(long, value_name = "P")]
        topic_prefix: Option<String>,
        #[arg(long, value_name = "FILTER")]
        filter: Option<String>,
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// One retained message with its payload.
    Get { topic: String },
    /// Clear the topic's retained message.
    Delete { topic: String },
}

/// `path?key=value&...` with the given parameters only.
fn with_query(path: &str, parameters: &[(&str, Option<String>)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in parameters {
        if let Some(value) = value {
            query.append_pair(key, value);
        }
    }
    let query = query.finish();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

/// `text` as one URL path segment (every byte but ASCII letters and digits percent-encoded).
pub fn segment(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// The request an inspection command makes.
pub fn request(command: &Inspect) -> (String, CtlRequest) {
    let limit = |limit: &Option<usize>| limit.map(|l| l.to_string());
    let get = |path: String| (path, CtlRequest::Get);
    match command {
        Inspect::Nodes => get("/api/v1/nodes".into()),
        Inspect::Clients(args) => match &args.command {
            Some(ClientsCommand::Show { client_id }) => {
                get(format!("/api/v1/clients/{}", segment(client_id)))
            }
            Some(ClientsCommand::Kick { client_id }) => (
                format!("/api/v1/clients/{}", segment(client_id)),
                CtlRequest::Delete,
            ),
            None => get(with_query(
                "/api/v1/clients",
                &[
                    ("client_id_prefix", args.client_id_prefix.clone()),
                    ("username", args.username.clone()),
                    ("address", args.address.clone()),
                    ("node", args.node.map(|n| n.to_string())),
                    ("limit", limit(&args.limit)),
                ],
            )),
        },
        Inspect::Subscriptions(args) => get(with_query(
            "/api/v1/subscriptions",
            &[
                ("client_id_prefix", args.client_id_prefix.clone()),
                ("filter_prefix", args.filter_prefix.clone()),
                ("limit", limit(&args.limit)),
            ],
        )),
        Inspect::Routes(args) => get(with_query(
            "/api/v1/routes",
            &[
                ("filter_prefix", args.filter_prefix.clone()),
                ("limit", limit(&args.limit)),
            ],
        )),
        Inspect::Retained(RetainedCommand::List {
            topic_prefix,
            filter,
            limit: count,
        }) => get(with_query(
            "/api/v1/retained",
            &[
                ("topic_prefix", topic_prefix.clone()),
                ("filter", filter.clone()),
                ("limit", limit(count)),
            ],
        )),
        Inspect::Retained(RetainedCommand::Get { topic }) => {
            get(format!("/api/v1/retained/{}", segment(topic)))
        }
        Inspect::Retained(RetainedCommand::Delete { topic }) => (
            format!("/api/v1/retained/{}", segment(topic)),
            CtlRequest::Delete,
        ),
    }
}

/// How long ago a Unix time in ms was, as `1h02m`, `3m07s` or `12s`.
fn age(since_ms: &Value) -> String {
    let Some(since_ms) = since_ms.as_u64() else {
        return "-".into();
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let seconds = now_ms.saturating_sub(since_ms) / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// A JSON value as a table cell: strings bare but for their control characters (escaped:
/// a client identifier or a topic must not move the operator's cursor or start a new row),
/// null as `-`.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => {
            let mut out = String::with_capacity(text.len());
            for c in text.chars() {
                if c.is_control() {
                    out.extend(c.escape_default());
                } else {
                    out.push(c);
                }
            }
            out
        }
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Aligned columns under a header row, two spaces apart; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, text) in widths.iter_mut().zip(row) {
            *width = (*width).max(text.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (position, (text, width)) in cells.iter().zip(&widths).enumerate() {
            if position == last {
                out.push_str(text);
            } else {
                out.push_str(text);
                out.extend(std::iter::repeat_n(' ', width - text.chars().count() + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut lines = vec![line(header.to_vec())];
    lines.extend(
        rows.iter()
            .map(|row| line(row.iter().map(String::as_str).collect())),
    );
    lines.join("\n")
}

/// The rows of `answer[key]`, one cell per field.
fn rows_of(answer: &Value, key: &str, fields: &[&str]) -> Vec<Vec<String>> {
    answer[key]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|entry| fields.iter().map(|field| cell(&entry[*field])).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// A listing's table, and below it whether it was cut at the limit and which nodes failed.
fn listing(answer: &Value, key: &str, header: &[&str], fields: &[&str]) -> String {
    let mut text = table(header, &rows_of(answer, key, fields));
    if answer["truncated"].as_bool() == Some(true) {
        text.push_str("\n(more matched: raise --limit or narrow the filters)");
    }
    for error in answer["errors"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "\nnode {}: {}",
            cell(&error["node"]),
            cell(&error["error"])
        ));
    }
    text
}

/// The answer to an inspection command, for a person.
pub fn render(command: &Inspect, answer: &Value) -> String {
    match command {
        Inspect::Nodes => {
            let rows: Vec<Vec<String>> = answer["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|node| match node.get("error") {
                    Some(error) => vec![cell(&node["node"]), format!("error: {}", cell(error))],
                    None => [
                        "node",
                        "role",
                        "version",
                        "uptime_seconds",
                        "connections",
                        "sessions_online",
                        "subscriptions",
                        "messages_received_per_second",
                        "messages_sent_per_second",
                    ]
                    .iter()
                    .map(|field| match &node[*field] {
                        Value::Number(n) if n.is_f64() => {
                            format!("{:.1}", n.as_f64().unwrap_or(0.0))
                        }
                        value => cell(value),
                    })
                    .collect(),
                })
                .collect();
            table(
                &[
                    "NODE",
                    "ROLE",
                    "VERSION",
                    "UPTIME_S",
                    "CONNECTIONS",
                    "SESSIONS",
                    "SUBS",
                    "IN/S",
                    "OUT/S",
                ],
                &rows,
            )
        }
        Inspect::Clients(args) => match &args.command {
            None => {
                let mut answer = answer.clone();
                for client in answer["clients"].as_array_mut().into_iter().flatten() {
                    client["connected_for"] = age(&client["connected_since_ms"]).into();
                }
                listing(
                    &answer,
                    "clients",
                    &[
                        "CLIENT_ID",
                        "NODE",
                        "USERNAME",
                        "ADDRESS",
                        "PROTO",
                        "KEEPALIVE",
                        "SUBS",
                        "QUEUED",
                        "INFLIGHT",
                        "CONNECTED",
                    ],
                    &[
                        "client_id",
                        "node",
                        "username",
                        "address",
                        "protocol",
                        "keep_alive",
                        "subscriptions",
                        "queued",
                        "inflight",
                        "connected_for",
                    ],
                )
            }
            Some(ClientsCommand::Show { .. }) => {
                let fields = [
                    "client_id",
                    "node",
                    "username",
                    "address",
                    "listener",
                    "protocol",
                    "connected_since_ms",
                    "keep_alive",
                    "clean_start",
                    "session_expiry",
                    "subscriptions",
                    "queued",
                    "inflight",
                ];
                let rows: Vec<Vec<String>> = fields
                    .iter()
                    .map(|field| vec![(*field).to_string(), cell(&answer[*field])])
                    .collect();
                let subscriptions = rows_of(
                    answer,
                    "subscription_list",
                    &[
                        "filter",
                        "qos",
                        "no_local",
                        "retain_as_published",
                        "retain_handling",
                    ],
                );
                format!(
                    "{}\n\n{}",
                    table(&["FIELD", "VALUE"], &rows),
                    table(
                        &[
                            "FILTER",
                            "QOS",
                            "NO_LOCAL",
                            "RETAIN_AS_PUBLISHED",
                            "RETAIN_HANDLING"
                        ],
                        &subscriptions
                    )
                )
            }
            Some(ClientsCommand::Kick { client_id }) => {
                format!("kicked {client_id} (node {})", cell(&answer["node"]))
            }
        },
        Inspect::Subscriptions(_) => listing(
            answer,
            "subscriptions",
            &["CLIENT_ID", "NODE", "FILTER", "QOS"],
            &["client_id", "node", "filter", "qos"],
        ),
        Inspect::Routes(_) => listing(answer, "routes", &["FILTER", "NODES"], &["filter", "nodes"]),
        Inspect::Retained(RetainedCommand::List { .. }) => listing(
            answer,
            "retained",
            &["TOPIC", "QOS", "BYTES"],
            &["topic", "qos", "bytes"],
        ),
        Inspect::Retained(RetainedCommand::Get { .. }) => {
            let payload = match &answer["payload_text"] {
                Value::String(text) => text.clone(),
                _ => format!("(base64) {}", cell(&answer["payload_base64"])),
            };
            let mut rows = vec![
                vec!["topic".to_string(), cell(&answer["topic"])],
                vec!["qos".to_string(), cell(&answer["qos"])],
                vec!["bytes".to_string(), cell(&answer["bytes"])],
                vec!["payload".to_string(), payload],
            ];
            if answer["payload_truncated"].as_bool() == Some(true) {
                rows.push(vec!["payload_truncated".into(), "true".into()]);
            }
            table(&["FIELD", "VALUE"], &rows)
        }
        Inspect::Retained(RetainedCommand::Delete { topic }) => format!("deleted {topic}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns_under_the_header() {
        let text = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["b".into(), "y".into()],
            ],
        );
        assert_eq!(text, "A          LONGER\nwide cell  x\nb          y");
    }

    #[test]
    fn cells_escape_control_characters() {
        assert_eq!(cell(&Value::from("a\nb\u{1b}[2J")), "a\\nb\\u{1b}[2J");
        assert_eq!(cell(&Value::from("caf\u{e9}")), "caf\u{e9}");
        assert_eq!(cell(&Value::Null), "-");
    }

    #[test]
    fn ids_and_topics_are_one_path_segment() {
        let (path, _) = request(&Inspect::Retained(RetainedCommand::Get {
            topic: "a/b c".into(),
        }));
        assert_eq!(path, "/api/v1/retained/a%2Fb%20c");
        let (path, _) = request(&Inspect::Routes(RoutesArgs {
            filter_prefix: Some("a/#".into()),
            limit: Some(5),
        }));
        assert_eq!(path, "/api/v1/routes?filter_prefix=a%2F%23&limit=5");
    }
}
