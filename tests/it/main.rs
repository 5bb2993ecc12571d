//! Integration tests: one binary, real server, real clients.
//!
//! Each module is named after the resource or behaviour it checks:
//!
//! - `events`: `POST /v1/events` applies an event id once; bad REST input is refused
//! - `recommendations`: what a list holds (likes, dislikes)
//! - `streams`: SSE and WebSocket subscribers, fan-out, resuming, bad WebSocket messages
//! - `catalogue`: items put and read
//! - `nonpersonal`: popular, trending, latest and similar items, basket lists; their caching
//! - `users`: sessions stopping and rebuilding, anonymous merge, erasure
//! - `privacy`: pseudonymised ids
//! - `models`: serving and switching trained versions
//! - `served`: the serving-path evaluation; served lists equal the offline serving lists
//! - `closed_loop` and `monitor`: drift, retraining, canary, promotion; attribution
//! - `auth` and `limits`: keys, tokens, origins, CORS; rate and stream limits
//! - `connections`: idle connections closed by timeouts, per-IP and total connection caps
//! - `memory`: the embedded mode's bounds (stored profiles, sessions, tombstones; no state for unknown users)
//! - `production::kafka` and `production::failover`: against the real Kafka and Redis
//! - `import`: `liverec import` of files into a running server (REST) and its Kafka topic
//! - `deploy_files`, `cli`, `observability`, `openapi`, `dashboard`: what ships around the server
//!
//! Shared clients and helpers (server, HTTP, SSE, WebSocket, services, the restart client) are
//! in `support`.

mod support;

mod auth;
mod catalogue;
mod cli;
mod closed_loop;
mod connections;
mod dashboard;
mod deploy_files;
mod events;
mod import;
mod items;
mod limits;
mod memory;
mod models;
mod monitor;
mod nonpersonal;
mod observability;
mod openapi;
mod privacy;
mod production;
mod recommendations;
mod retrieval;
mod served;
mod streams;
mod support_waits;
mod users;
