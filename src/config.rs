//! The configuration: TOML with every key defaulted from the embedded `default.toml`. Unknown
//! keys and out-of-range values are errors that name the key, reported before anything starts.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use shardmq_net::mqtt::QoS;
use shardmq_shards::{Limits, SharedStrategy};

/// The embedded defaults.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub reactor: Reactor,
    pub limits: LimitsConfig,
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
        let overrides: toml::Table = overrides
            .parse()
            .map_err(|error| format!("{source}: {error}"))?;
        merge(&mut table, overrides, "")?;
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|error| format!("{source}: {error}"))?;
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
        check(
            !self.server.listen.is_empty(),
            "`server.listen` must name at least one address",
        )?;
        check(self.server.backlog > 0, "`server.backlog` must be positive")?;
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
            self.limits.queued_messages_per_session_max > 0,
            "`limits.queued_messages_per_session_max` must be positive",
        )?;
        self.shared_strategy()?;
        Ok(())
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
        let config = Config::from_overrides("[server]\nshards = 3\n", "f.toml").unwrap();
        assert_eq!(config.server.shards, 3);
    }
}
