//! Integration tests: one binary, real server, real clients.

mod support;

mod auth;
mod bad_input;
mod cli;
mod closed_loop;
mod dashboard;
mod deploy_files;
mod fanout;
mod lifecycle;
mod models;
mod monitor;
mod observability;
mod openapi;
mod privacy;
mod production;
mod streams;
