//! The `[log]` and `[tracing]` sections.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// OpenTelemetry traces: spans of the event path, exported over OTLP/HTTP when an endpoint is
/// set (off by default).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`; empty: no export.
    pub otlp_endpoint: String,
    pub service_name: String,
    /// Share of traces kept (a new trace's sampling decision; children follow their parent).
    pub sample_ratio: f64,
}
