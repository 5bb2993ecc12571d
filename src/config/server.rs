//! The `[server]`, `[events]`, `[recs]`, `[stream]` and `[limits]` sections: the HTTP server,
//! what it accepts, and how much of it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::event::EventLimits;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server binds to.
    pub listen: SocketAddr,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// Seconds to wait for open connections on shutdown.
    pub shutdown_timeout_secs: u64,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Milliseconds a client has to send a whole request head (408 and closed after; 0: none).
    pub client_request_timeout_ms: u64,
    /// Milliseconds a closing connection may take to shut down before it is dropped.
    pub client_disconnect_timeout_ms: u64,
    /// Seconds a client has to send a whole request body once its head arrived (408 after).
    pub body_timeout_secs: u64,
    /// Connections the kernel may queue before they are accepted (capped by the kernel's
    /// `net.core.somaxconn`).
    pub backlog: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Most events in one batch.
    pub max_batch: usize,
    /// Longest id, in characters.
    pub max_id_len: usize,
    pub max_context_attributes: usize,
    pub max_context_key_len: usize,
    pub max_context_value_len: usize,
    /// Highest `value` of a `rating` (ratings run from 0).
    pub max_rating: f64,
    /// Highest `value` of a `dwell`, in seconds.
    pub max_dwell_secs: f64,
    /// Highest `value` of a `purchase` or `add_to_cart`, and of any other event type.
    pub max_amount: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecsConfig {
    pub default_k: usize,
    pub max_k: usize,
    /// Seconds between two refreshes of the non-personal lists (popular, trending, latest,
    /// similar items), and their `Cache-Control: max-age`.
    pub lists_refresh_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub heartbeat_secs: u64,
    pub client_timeout_secs: u64,
    pub ws_max_frame_bytes: usize,
    pub ws_max_message_bytes: usize,
    pub ws_max_subscriptions: usize,
}

impl EventsConfig {
    pub fn limits(&self) -> EventLimits {
        EventLimits {
            max_id_len: self.max_id_len,
            max_context_attributes: self.max_context_attributes,
            max_context_key_len: self.max_context_key_len,
            max_context_value_len: self.max_context_value_len,
            max_rating: self.max_rating,
            max_dwell_secs: self.max_dwell_secs,
            max_amount: self.max_amount,
        }
    }
}

/// Settings of the `[limits]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per second per client IP, and the burst allowed above it (0: no limit).
    pub per_ip_per_sec: u32,
    pub per_ip_burst: u32,
    /// Requests per second per credential, and its burst (0: no limit).
    pub per_key_per_sec: u32,
    pub per_key_burst: u32,
    /// Open streams (SSE and WebSocket) per client IP (0: no limit).
    pub streams_per_ip: usize,
    /// Open connections per client IP; requests on more answer 429 and close (0: no limit).
    pub connections_per_ip: usize,
    /// Open connections in all (0: three quarters of the file-descriptor limit). Accepting pauses
    /// at it; past nine tenths of it only probes are served.
    pub max_connections: usize,
}
