//! Shared test helpers: a real server on 127.0.0.1:0, real HTTP/SSE/WebSocket clients, metric
//! scraping, and waiting with a deadline instead of sleeping.
//!
//! Every test module takes them all with `use crate::support::*;`.

mod http;
mod restart;
mod server;
mod services;
mod sse;
mod ws;

pub use http::*;
pub use restart::*;
pub use server::*;
pub use services::*;
pub use sse::*;
pub use ws::*;
