//! liverec: a real-time recommendation server. Events come in, the user's session changes at
//! once, and a fresh list is pushed to the user's open streams.
//!
//! [`Server::start`] builds and runs the whole server; `main.rs` and the integration tests both
//! use it.

pub mod actors;
pub mod auth;
pub mod bus;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod eval;
/// Events on the wire and their validation (the `liverec-wire` crate).
pub use liverec_wire::event;
pub mod eventlog;
pub mod http;
/// `liverec import`: data files into a running server (REST) or Kafka; its REST client also
/// posts the serving-path evaluation's events.
pub mod import;
pub mod models;
pub mod monitor;
pub mod privacy;
pub mod recs;
pub mod sim;
pub mod store;
pub mod telemetry;

mod server;
pub use server::{Server, StartError};
