//! Integration tests: one binary, real server, real clients.

mod support;

mod auth;
mod catalogue;
mod cli;
mod closed_loop;
mod dashboard;
mod deploy_files;
mod events;
mod limits;
mod models;
mod monitor;
mod observability;
mod openapi;
mod privacy;
mod production;
mod recommendations;
mod streams;
mod users;
