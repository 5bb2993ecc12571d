//! Scenario files (`load-tests/scenarios/*.toml`): what one run of `liverec-load` does.
//!
//! Every key is documented on its field below and in each scenario file; an unknown key is an
//! error, so a typo never silently runs a different test. `--set key=value` on the command line
//! overrides a key (the value is TOML: `--set ws_sockets=18000`, `--set 'kafka.brokers="127.0.0.1:9092"'`).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Longest run a scenario may ask for: a load test is always bounded.
pub const MAX_DURATION_SECS: f64 = 3600.0;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Toml(String),
    #[error("invalid override {0:?}: expected key=value with a TOML value")]
    Override(String),
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// How events reach the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// `POST /v1/events`, one event per request; the request latency is measured.
    #[default]
    Rest,
    /// Produced to Kafka (`[kafka]`); the server must run with `bus.kind = "kafka"`.
    Kafka,
}

/// From `at_secs` on (until the next step), events are sent at `events_per_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateStep {
    pub at_secs: f64,
    pub events_per_s: f64,
}

/// Where to produce events when `transport = "kafka"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers (loopback only).
    pub brokers: String,
    /// The server's `kafka.events_topic`.
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_topic() -> String {
    "liverec.events".into()
}

/// Simulated users (`liverec::sim`) browsing alongside the generated load: each step fetches a
/// list and clicks a recommended item or views one of their own. Their requests and events add
/// to the server's load; the report gives their counts, errors and click-through rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSettings {
    /// Simulated users.
    pub users: usize,
    /// Steps per second over all simulated users (each step is a GET and a POST).
    pub steps_per_s: f64,
    /// Items the simulator adds to the catalogue before it starts (`sim-item-NNNN`).
    #[serde(default = "default_sim_items")]
    pub items: usize,
    /// Categories the simulated items are spread over.
    #[serde(default = "default_sim_categories")]
    pub categories: usize,
    /// Concurrent simulated clients.
    #[serde(default = "default_sim_workers")]
    pub workers: usize,
    /// Seed of the simulated users' tastes.
    #[serde(default = "default_sim_seed")]
    pub seed: u64,
}

fn default_sim_items() -> usize {
    400
}
fn default_sim_categories() -> usize {
    8
}
fn default_sim_workers() -> usize {
    4
}
fn default_sim_seed() -> u64 {
    7
}

/// One load-test run. Keys not given take the defaults shown on each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name used in the report.
    pub name: String,
    /// What the scenario is for (copied into the report).
    #[serde(default)]
    pub description: String,
    /// Seconds of load: events and GETs are sent for this long (at most one hour).
    pub duration_secs: f64,
    /// Constant event rate, events per second (used when `rate_steps` is empty; 0 = no events).
    #[serde(default)]
    pub events_per_s: f64,
    /// A rate that changes over the run: a list of `{ at_secs, events_per_s }`, the first at 0,
    /// in increasing `at_secs`. Replaces `events_per_s`.
    #[serde(default)]
    pub rate_steps: Vec<RateStep>,
    /// `"rest"` (default) or `"kafka"`.
    #[serde(default)]
    pub transport: Transport,
    /// Needed when `transport = "kafka"`.
    #[serde(default)]
    pub kafka: Option<KafkaSettings>,
    /// Distinct users the events are spread over (`load-user-N`).
    pub users: usize,
    /// WebSocket connections that subscribe to active users (those that receive events).
    #[serde(default)]
    pub ws_sockets: usize,
    /// Users each of those sockets subscribes to, round robin over the active users (the
    /// server's `stream.ws_max_subscriptions`, 16 by default, bounds it).
    #[serde(default = "one")]
    pub ws_subs_per_socket: usize,
    /// SSE streams (`GET /v1/users/{id}/recommendations/stream`), one active user each.
    #[serde(default)]
    pub sse_subscribers: usize,
    /// WebSocket connections that each subscribe to one user who receives no events
    /// (`idle-user-N`): they hold a hub, a session and a socket on the server, and answer pings.
    #[serde(default)]
    pub idle_ws_sockets: usize,
    /// `GET /v1/users/{id}/recommendations` per second, on random active users.
    #[serde(default)]
    pub gets_per_s: f64,
    /// A push is late when it reaches its subscriber more than this many milliseconds after
    /// the event it reflects was sent.
    #[serde(default = "default_late_ms")]
    pub late_ms: f64,
    /// After the load, wait at most this long for the last pushes; an event a subscriber has
    /// still not seen reflected then counts as a dropped push.
    #[serde(default = "default_settle_secs")]
    pub settle_secs: f64,
    /// Most HTTP connections for POSTs and GETs (an overloaded server then shows as request
    /// latency rather than as ever more connections).
    #[serde(default = "default_http_connections")]
    pub http_connections: usize,
    /// Subscriber connections opened at once while setting up.
    #[serde(default = "default_connect_concurrency")]
    pub connect_concurrency: usize,
    /// Item ids are `<item_prefix><n>` with n in `item_base..item_base + items`, zero-padded to
    /// `item_pad` digits (the demo catalogue: `item-0000`..; MovieLens: prefix "", pad 0,
    /// base 1, 1682 items).
    #[serde(default = "default_items")]
    pub items: u64,
    #[serde(default = "default_item_prefix")]
    pub item_prefix: String,
    #[serde(default = "default_item_pad")]
    pub item_pad: usize,
    #[serde(default)]
    pub item_base: u64,
    /// Simulated users browsing alongside (optional).
    #[serde(default)]
    pub sim: Option<SimSettings>,
}

fn one() -> usize {
    1
}
fn default_late_ms() -> f64 {
    100.0
}
fn default_settle_secs() -> f64 {
    5.0
}
fn default_http_connections() -> usize {
    256
}
fn default_connect_concurrency() -> usize {
    64
}
fn default_items() -> u64 {
    500
}
fn default_item_prefix() -> String {
    "item-".into()
}
fn default_item_pad() -> usize {
    4
}

impl Scenario {
    /// Reads a scenario file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, overrides)
    }

    /// Parses scenario TOML and applies `key=value` overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Scenario, ScenarioError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ScenarioError::Toml(e.to_string()))?;
        for item in overrides {
            if !item.contains('=') {
                return Err(ScenarioError::Override(item.clone()));
            }
            let patch: toml::Table = toml::from_str(item).map_err(|_| ScenarioError::Override(item.clone()))?;
            merge(&mut table, patch);
        }
        let scenario: Scenario = table.try_into().map_err(|e: toml::de::Error| ScenarioError::Toml(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        if !(self.duration_secs > 0.0 && self.duration_secs <= MAX_DURATION_SECS) {
            return bad(format!("duration_secs must be in (0, {MAX_DURATION_SECS}], not {}", self.duration_secs));
        }
        if self.users == 0 {
            return bad("users must be at least 1".into());
        }
        if !(self.events_per_s >= 0.0 && self.gets_per_s >= 0.0 && self.late_ms > 0.0 && self.settle_secs >= 0.0) {
            return bad("events_per_s, gets_per_s and settle_secs must be >= 0, late_ms > 0".into());
        }
        if !self.rate_steps.is_empty() {
            if self.rate_steps[0].at_secs != 0.0 {
                return bad("the first of rate_steps must start at at_secs = 0".into());
            }
            if self.rate_steps.windows(2).any(|w| w[1].at_secs <= w[0].at_secs) {
                return bad("rate_steps must be in increasing at_secs".into());
            }
            if self.rate_steps.iter().any(|s| s.events_per_s < 0.0) {
                return bad("a rate step's events_per_s must be >= 0".into());
            }
        }
        if self.ws_subs_per_socket == 0 {
            return bad("ws_subs_per_socket must be at least 1".into());
        }
        if self.items == 0 || self.http_connections == 0 || self.connect_concurrency == 0 {
            return bad("items, http_connections and connect_concurrency must be at least 1".into());
        }
        if self.transport == Transport::Kafka && self.kafka.is_none() {
            return bad("transport = \"kafka\" needs a [kafka] table with brokers".into());
        }
        if let Some(sim) = &self.sim {
            if sim.users == 0 || sim.steps_per_s <= 0.0 || sim.items == 0 {
                return bad("sim.users, sim.steps_per_s and sim.items must be positive".into());
            }
        }
        Ok(())
    }

    /// Target event rate at `t` seconds into the run.
    pub fn rate_at(&self, t: f64) -> f64 {
        if self.rate_steps.is_empty() {
            return self.events_per_s;
        }
        self.rate_steps.iter().take_while(|s| s.at_secs <= t).last().map_or(0.0, |s| s.events_per_s)
    }

    /// Events due by `t` seconds into the run: the integral of the rate from 0 to `t`.
    pub fn events_due(&self, t: f64) -> u64 {
        let t = t.min(self.duration_secs);
        if self.rate_steps.is_empty() {
            return (self.events_per_s * t) as u64;
        }
        let mut total = 0.0;
        for (i, step) in self.rate_steps.iter().enumerate() {
            if step.at_secs >= t {
                break;
            }
            let end = self.rate_steps.get(i + 1).map_or(t, |next| next.at_secs.min(t));
            total += step.events_per_s * (end - step.at_secs);
        }
        total as u64
    }

    /// Subscriber sockets and streams the run opens.
    pub fn connections(&self) -> usize {
        self.ws_sockets + self.sse_subscribers + self.idle_ws_sockets
    }
}

/// Merges `patch` into `base`, table by table (so `sim.users = 5` changes only that key).
fn merge(base: &mut toml::Table, patch: toml::Table) {
    for (key, value) in patch {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(inner)) => merge(existing, inner),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name = \"t\"\nduration_secs = 10\nusers = 5\nevents_per_s = 100\n";

    #[test]
    fn defaults_fill_the_rest() {
        let s = Scenario::parse(MINIMAL, &[]).expect("valid");
        assert_eq!(s.ws_subs_per_socket, 1);
        assert_eq!(s.late_ms, 100.0);
        assert_eq!(s.transport, Transport::Rest);
        assert_eq!(s.events_due(2.0), 200);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Scenario::parse(&format!("{MINIMAL}ws_socket = 3\n"), &[]).expect_err("typo");
        assert!(err.to_string().contains("ws_socket"), "{err}");
        let err = Scenario::parse(&format!("{MINIMAL}[sim]\nusers = 1\nsteps_per_s = 1\nspeed = 2\n"), &[])
            .expect_err("nested typo");
        assert!(err.to_string().contains("speed"), "{err}");
    }

    #[test]
    fn overrides_replace_keys_and_are_checked() {
        let s = Scenario::parse(MINIMAL, &["users=7".into(), "late_ms = 20.5".into()]).expect("valid");
        assert_eq!((s.users, s.late_ms), (7, 20.5));
        assert!(Scenario::parse(MINIMAL, &["nope".into()]).is_err());
        assert!(Scenario::parse(MINIMAL, &["colour=1".into()]).is_err());
        assert!(Scenario::parse(MINIMAL, &["duration_secs=100000".into()]).is_err());
    }

    #[test]
    fn steps_integrate() {
        let text = format!(
            "{MINIMAL}rate_steps = [{{ at_secs = 0, events_per_s = 100 }}, {{ at_secs = 2, events_per_s = 1000 }}, {{ at_secs = 4, events_per_s = 0 }}]\n"
        );
        let s = Scenario::parse(&text, &[]).expect("valid");
        assert_eq!(s.events_due(1.0), 100);
        assert_eq!(s.events_due(3.0), 1200);
        assert_eq!(s.events_due(9.0), 2200);
        assert_eq!(s.rate_at(2.5), 1000.0);
        assert_eq!(s.rate_at(5.0), 0.0);
        let unordered = format!(
            "{MINIMAL}rate_steps = [{{ at_secs = 0, events_per_s = 1 }}, {{ at_secs = 0, events_per_s = 2 }}]\n"
        );
        assert!(Scenario::parse(&unordered, &[]).is_err());
    }

    #[test]
    fn kafka_needs_brokers() {
        assert!(Scenario::parse(&format!("{MINIMAL}transport = \"kafka\"\n"), &[]).is_err());
        let ok = format!("{MINIMAL}transport = \"kafka\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n");
        assert_eq!(Scenario::parse(&ok, &[]).expect("valid").kafka.expect("kafka").topic, "liverec.events");
    }
}
