//! Configuration: `config/default.toml` (built in), then an optional file, then `LIVEREC_…`
//! environment variables, then command-line flags. Every struct denies unknown keys so that a
//! typo is an error at start-up rather than a silently ignored setting.

//!
//! Every section's struct lives in this folder, one file per group of sections, so that the
//! modules that use a section import it from here and `config` imports nothing of theirs.

mod bus;
mod catalog;
mod closed_loop;
mod cluster;
mod demo;
mod model;
mod observability;
mod security;
mod server;
mod session;
mod store;

use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use bus::{Assignment, BusConfig, BusKind, KafkaConfig};
pub use catalog::CatalogConfig;
pub use closed_loop::{DriftReferenceKind, MonitorConfig, RolloutConfig, TrainerConfig};
pub use cluster::ClusterConfig;
pub use demo::DemoConfig;
pub use model::{CoocConfig, ModelConfig, ModelKind, RetrievalConfig};
pub use observability::{LogConfig, LogFormat, TracingConfig};
pub use security::{ApiKeyEntry, AuthConfig, AuthMode, PrivacyConfig, Role};
pub use server::{EventsConfig, LimitsConfig, RecsConfig, ServerConfig, StreamConfig};
pub use session::SessionConfig;
pub use store::{RedisConfig, StoreConfig, StoreKind, MAX_WATCH_TTL_SECS};

/// The built-in defaults; the same text as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "LIVEREC_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    /// Each wrong setting, named the way the user wrote it (the variable or the file), with what
    /// was expected: no figment internals or source locations.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// One line per error: where the setting came from (`LIVEREC_…` variable or file), its key, and
/// what is wrong with it.
fn describe(error: figment::Error, variables: &[(String, String)]) -> String {
    use figment::error::Kind;
    use figment::Source;
    let list = |names: &[&str]| names.join(", ");
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let place = match variables.iter().rev().find(|(path, _)| *path == key) {
                Some((_, variable)) => format!("{variable} (setting {key})"),
                None => match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    Some(Source::File(file)) => format!("setting {key} in {}", file.display()),
                    _ => format!("setting {key}"),
                },
            };
            let what = match &e.kind {
                Kind::UnknownField(field, expected) => {
                    format!("unknown key {field:?}; the keys here are {}", list(expected))
                }
                Kind::UnknownVariant(value, expected) => {
                    format!("unknown value {value:?}; expected one of {}", list(expected))
                }
                Kind::MissingField(field) => format!("missing key {field:?}"),
                other => other.to_string().replace('`', ""),
            };
            format!("{place}: {what}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub events: EventsConfig,
    pub bus: BusConfig,
    pub kafka: KafkaConfig,
    pub store: StoreConfig,
    pub redis: RedisConfig,
    pub session: SessionConfig,
    pub recs: RecsConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
    pub model: ModelConfig,
    pub stream: StreamConfig,
    pub monitor: MonitorConfig,
    pub trainer: TrainerConfig,
    pub rollout: RolloutConfig,
    /// The loop across instances (production mode).
    #[serde(default)]
    pub cluster: ClusterConfig,
    pub demo: DemoConfig,
    pub log: LogConfig,
    pub tracing: TracingConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub privacy: PrivacyConfig,
}

impl Default for Config {
    /// The built-in defaults, with no file and no environment.
    fn default() -> Self {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("config/default.toml matches the Config struct (checked by a unit test)")
    }
}

/// Command-line overrides, applied last.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// Loads the layered configuration from defaults, `file`, the process environment and
    /// `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars(), overrides)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Settings are LIVEREC_<SECTION>__<KEY> (and the LIVEREC_LISTEN shorthand). Other LIVEREC_*
        // variables (LIVEREC_SERVICES_DIR, LIVEREC_TEST_*) belong to the scripts, not the server.
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && (k.contains("__") || k == "LIVEREC_LISTEN"))
            .collect();
        let mut variables = Vec::new();
        for (key, value) in env {
            let path = key[ENV_PREFIX.len()..].to_ascii_lowercase();
            let path = if path == "listen" { "server.listen".to_owned() } else { path.replace("__", ".") };
            variables.push((path.clone(), key));
            // Parsed the way figment parses environment values: numbers, booleans, [arrays].
            let value: figment::value::Value = value.parse().unwrap_or_else(|never| match never {});
            figment = figment.merge(Serialized::default(&path, value));
        }
        if let Some(listen) = overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        let config: Config = figment.extract().map_err(|e| ConfigError::Invalid(describe(e, &variables)))?;
        config.check()?;
        Ok(config)
    }

    /// Checks relations between values that serde cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let fail = |msg: &str| Err(ConfigError::Value(msg.to_owned()));
        if self.recs.default_k == 0 || self.recs.default_k > self.recs.max_k {
            return fail("recs.default_k must be between 1 and recs.max_k");
        }
        if !(1..=3600).contains(&self.recs.lists_refresh_secs) {
            return fail("recs.lists_refresh_secs must be between 1 and 3600");
        }
        if self.session.history_len == 0 {
            return fail("session.history_len must be at least 1");
        }
        if self.session.max_active == 0 {
            return fail("session.max_active must be at least 1");
        }
        if let Err(message) = self.store.check() {
            return fail(message);
        }
        if let Err(message) = self.redis.check() {
            return fail(&message);
        }
        if self.session.mailbox_capacity == 0 || self.model.mailbox_capacity == 0 {
            return fail("mailbox capacities must be at least 1");
        }
        if self.bus.partitions == 0 || self.bus.queue_capacity == 0 {
            return fail("bus.partitions and bus.queue_capacity must be at least 1");
        }
        if self.events.max_batch == 0 {
            return fail("events.max_batch must be at least 1");
        }
        if self.bus.kind == BusKind::Memory && self.bus.queue_events < self.events.max_batch {
            return fail(&format!(
                "bus.queue_events ({}) must be at least events.max_batch ({}): a full batch for one partition would never fit",
                self.bus.queue_events, self.events.max_batch
            ));
        }
        // The server gives events without an id a 36-character UUID, which must pass the limit
        // again when read back from Kafka; Avro v2's session_id context key is 10 characters.
        if self.events.max_id_len < 36 || self.events.max_context_key_len < 10 {
            return fail("events.max_id_len must be at least 36 and events.max_context_key_len at least 10");
        }
        if self.bus.kind == BusKind::Kafka && self.store.kind == StoreKind::Memory {
            return fail("bus.kind = \"kafka\" needs store.kind = \"redis\": instances share profiles through Redis");
        }
        let kafka = &self.kafka;
        if kafka.heartbeat_interval_ms == 0 || kafka.heartbeat_interval_ms >= kafka.session_timeout_ms {
            return fail(&format!(
                "kafka.heartbeat_interval_ms ({}) must be at least 1 and below kafka.session_timeout_ms ({}): \
                 a member that heartbeats less often than the group expects is dropped from it",
                kafka.heartbeat_interval_ms, kafka.session_timeout_ms
            ));
        }
        if self.monitor.bucket_secs == 0 || self.monitor.window_secs < self.monitor.bucket_secs {
            return fail("monitor.bucket_secs must be at least 1 and at most monitor.window_secs");
        }
        if self.cluster.report_interval_ms == 0 {
            return fail("cluster.report_interval_ms must be at least 1");
        }
        if self.model.max_batch == 0 {
            return fail("model.max_batch must be at least 1");
        }
        let r = &self.model.retrieval;
        if r.ann_probe == 0 || r.ann_list_size == 0 {
            return fail("model.retrieval.ann_probe and model.retrieval.ann_list_size must be at least 1");
        }
        if let Err(message) = self.cluster.check() {
            return fail(&message);
        }
        if !(0.0..1.0).contains(&self.rollout.canary_share) || self.rollout.canary_share == 0.0 {
            return fail("rollout.canary_share must be above 0 and below 1");
        }
        let t = &self.trainer;
        if t.epochs == 0 || t.batch_size == 0 || t.max_len == 0 || t.heads == 0 || !t.hidden.is_multiple_of(t.heads) {
            return fail("trainer.epochs, batch_size and max_len must be at least 1, and hidden a multiple of heads");
        }
        if self.stream.heartbeat_secs == 0 || self.stream.client_timeout_secs <= self.stream.heartbeat_secs {
            return fail("stream.heartbeat_secs must be at least 1 and below stream.client_timeout_secs");
        }
        Ok(())
    }

    /// Whether the loop runs across instances: `cluster.enabled` in production mode (Kafka bus
    /// and Redis store); the embedded mode keeps one loop in the one process.
    pub fn cluster_active(&self) -> bool {
        self.cluster.enabled && self.bus.kind == BusKind::Kafka && self.store.kind == StoreKind::Redis
    }

    /// Threads to use where a setting says 0 ("one per core").
    pub fn cores() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn api_keys_and_the_token_secret_come_from_the_environment() {
        let config = Config::load_from(
            None,
            env(&[
                ("LIVEREC_AUTH__TOKEN_SECRET", "0123456789abcdef0123456789abcdef"),
                ("LIVEREC_AUTH__API_KEYS", r#"[{id="ingest",role="producer",salt="00ff",hash="ab"}]"#),
            ]),
            &Overrides::default(),
        )
        .expect("loads");
        assert_eq!(config.auth.api_keys.len(), 1);
        assert_eq!(config.auth.api_keys[0].role, Role::Producer);
        assert_eq!(config.auth.token_secret.len(), 32);
    }

    #[test]
    fn defaults_parse() {
        let config = Config::load_from(None, env(&[]), &Overrides::default()).expect("defaults");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.session.history_len, 50);
    }

    #[test]
    fn env_and_flags_override_in_order() {
        let config = Config::load_from(
            None,
            env(&[
                ("LIVEREC_LISTEN", "127.0.0.1:9000"),
                ("LIVEREC_SESSION__IDLE_TTL_MS", "1234"),
                ("LIVEREC_TEST_REDIS_URL", "redis://ignored"),
                ("LIVEREC_SERVICES_DIR", "/tmp/ignored"),
                ("OTHER", "x"),
            ]),
            &Overrides::default(),
        )
        .expect("env");
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.session.idle_ttl_ms, 1234);
        let flags = Overrides { listen: Some("127.0.0.1:9100".parse().expect("addr")) };
        let config = Config::load_from(None, env(&[("LIVEREC_LISTEN", "127.0.0.1:9000")]), &flags).expect("flags");
        assert_eq!(config.server.listen.port(), 9100);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::load_from(None, env(&[("LIVEREC_SESSION__NO_SUCH_KEY", "1")]), &Overrides::default())
            .expect_err("unknown env key");
        assert!(err.to_string().contains("no_such_key"), "{err}");

        let dir = std::env::temp_dir().join(format!("liverec-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[session]\nhistory_lenght = 3\n").expect("write");
        let err = Config::load_from(Some(&file), env(&[]), &Overrides::default()).expect_err("unknown file key");
        assert!(err.to_string().contains("history_lenght"), "{err}");
        let err = Config::load_from(Some(&dir.join("missing.toml")), env(&[]), &Overrides::default())
            .expect_err("missing file");
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn a_bad_env_value_names_the_variable_and_the_expected_type() {
        let err = Config::load_from(None, env(&[("LIVEREC_SESSION__HISTORY_LEN", "abc")]), &Overrides::default())
            .expect_err("not a number");
        let message = err.to_string();
        assert!(message.contains("LIVEREC_SESSION__HISTORY_LEN"), "{message}");
        assert!(message.contains("session.history_len"), "{message}");
        assert!(message.contains("expected"), "{message}");
        assert!(
            !message.contains(".rs:") && !message.contains("figment") && !message.contains("default."),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_key_message_has_no_stray_backticks() {
        let err = Config::load_from(None, env(&[("LIVEREC_SESSION__NO_SUCH_KEY", "1")]), &Overrides::default())
            .expect_err("unknown env key");
        let message = err.to_string();
        assert!(message.contains("LIVEREC_SESSION__NO_SUCH_KEY"), "{message}");
        assert!(!message.contains('`') && !message.contains(".rs:"), "{message}");
    }

    #[test]
    fn bad_values_are_errors() {
        let err = Config::load_from(None, env(&[("LIVEREC_RECS__DEFAULT_K", "0")]), &Overrides::default())
            .expect_err("k = 0");
        assert!(err.to_string().contains("default_k"), "{err}");
        let err = Config::load_from(None, env(&[("LIVEREC_BUS__QUEUE_EVENTS", "999")]), &Overrides::default())
            .expect_err("a queue smaller than a batch");
        assert!(err.to_string().contains("bus.queue_events (999)"), "{err}");
        assert!(err.to_string().contains("events.max_batch (1000)"), "{err}");
        let err =
            Config::load_from(None, env(&[("LIVEREC_KAFKA__HEARTBEAT_INTERVAL_MS", "4000")]), &Overrides::default())
                .expect_err("a heartbeat as slow as the session timeout");
        assert!(err.to_string().contains("kafka.heartbeat_interval_ms (4000)"), "{err}");
        assert!(err.to_string().contains("kafka.session_timeout_ms (4000)"), "{err}");
    }

    #[test]
    fn the_assignment_kind_is_named_as_librdkafka_names_it() {
        let config = Config::load_from(None, env(&[]), &Overrides::default()).expect("defaults");
        assert_eq!(config.kafka.assignment.strategy(), "cooperative-sticky");
        let config =
            Config::load_from(None, env(&[("LIVEREC_KAFKA__ASSIGNMENT", "roundrobin")]), &Overrides::default())
                .expect("eager");
        assert_eq!(config.kafka.assignment.strategy(), "roundrobin");
        let err = Config::load_from(None, env(&[("LIVEREC_KAFKA__ASSIGNMENT", "sticky")]), &Overrides::default())
            .expect_err("not a kind");
        assert!(err.to_string().contains("LIVEREC_KAFKA__ASSIGNMENT"), "{err}");
        assert!(err.to_string().contains("cooperative-sticky"), "{err}");
    }
}
