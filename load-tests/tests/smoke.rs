//! The load generator itself, end to end: a real liverec server on 127.0.0.1:0 in this process,
//! a short scenario with every kind of subscriber, events, GETs and simulated users, and the
//! report it writes. Nothing here asserts a latency: timings belong in the reports.

use std::path::Path;

use liverec::config::Config;
use liverec_load::{run, RunOptions, Scenario};
use serde_json::Value;

/// The embedded default on a free port, small and quick to start (as the root crate's tests).
fn server_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.workers = 2;
    config.session.arbiters = 2;
    config.demo.items = 200;
    config.demo.users = 300;
    config.log.level = "warn".into();
    config
}

const SCENARIO: &str = r#"
name = "tool-smoke"
description = "the tool's own test"
duration_secs = 2.5
events_per_s = 200
users = 20
ws_sockets = 10
ws_subs_per_socket = 2
sse_subscribers = 5
idle_ws_sockets = 5
gets_per_s = 40
late_ms = 1000
# Generous: the run ends as soon as every push arrived; this only bounds a hang.
settle_secs = 30

[sim]
users = 5
steps_per_s = 10
items = 20
categories = 4
workers = 2
"#;

#[actix_rt::test]
async fn a_short_scenario_writes_a_complete_report() {
    let server = liverec::Server::start(server_config()).await.expect("server starts");
    let out = tempfile::tempdir().expect("temp dir");
    let scenario = Scenario::parse(SCENARIO, &[]).expect("valid scenario");
    // The server runs in this process: its pid is ours (the CPU time then includes the generator).
    let options = RunOptions {
        target: server.url(),
        out: Some(out.path().to_owned()),
        server_pid: Some(std::process::id()),
        progress: false,
    };
    let report = run(&scenario, &options).await.expect("the run completes");
    server.stop().await;

    for file in ["report.json", "report.md", "latency.svg"] {
        assert!(out.path().join(file).is_file(), "{file} written");
    }
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).expect("read")).expect("JSON");
    for key in ["events_per_s", "requests_per_s", "errors", "pushes_received", "pushes_dropped"] {
        assert!(json[key].is_number(), "{key} in {json}");
    }
    for key in ["request_ms", "event_to_push_ms"] {
        for q in ["p50", "p90", "p99", "p999"] {
            assert!(json[key][q].is_number(), "{key}.{q}");
        }
    }
    assert_eq!(report.errors, 0, "no errors: {:?}", report.errors_by_kind);
    assert!(report.pushes_received > 0);
    assert_eq!(report.subscribers.confirmed, report.subscribers.expected, "every subscription confirmed");
    assert!(
        report.subscribers.quiet_after_secs.is_some(),
        "the server's earlier work was waited out: {:?}",
        report.subscribers
    );
    assert!(report.events_accepted > 0 && report.event_to_push_ms.count > 0);
    assert!(report.pushes_received_ws > 0 && report.pushes_received_sse > 0 && report.pushes_received_idle > 0);
    assert_eq!(report.pushes_dropped, 0, "every accepted event reached every subscriber of its user");
    assert_eq!(report.event_to_push_ms.count, report.deliveries_expected);
    assert!(report.get_recommendations_ms.count > 0 && report.post_events_ms.count > 0);
    let sim = report.sim.as_ref().expect("simulated users ran");
    assert!(sim.steps > 0, "{sim:?}");
    let work = &report.server.work;
    assert!(work.events_applied.is_some_and(|n| n >= report.events_accepted as f64), "{work:?}");
    assert!(work.applied_events_per_s.is_some_and(|r| r > 0.0), "{work:?}");
    assert!(work.cpu_secs_per_event.is_some_and(|c| c > 0.0), "the server's CPU per event: {work:?}");
    assert_eq!(work.kafka_lag_max_records.unwrap_or(0.0), 0.0, "no lag without Kafka (the gauge stays 0)");
    assert!(report.timeline.iter().any(|s| s.server_applied_events.is_some_and(|n| n > 0.0)), "applied per second");
    assert!(json["server"]["work"]["cpu_secs_per_event"].is_number());
    let markdown = std::fs::read_to_string(out.path().join("report.md")).expect("md");
    assert!(markdown.contains("late") && markdown.contains("1000 ms"), "the late threshold is stated");
    assert!(markdown.contains("the load started then"), "the wait for a quiet server is stated");
    let svg = std::fs::read_to_string(out.path().join("latency.svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("<path"), "a plot with lines");
}

#[actix_rt::test]
async fn non_loopback_targets_are_refused() {
    let scenario = Scenario::parse(SCENARIO, &[]).expect("valid scenario");
    let options = RunOptions { target: "http://192.0.2.1:8080".into(), out: None, server_pid: None, progress: false };
    let error = run(&scenario, &options).await.expect_err("refused").to_string();
    assert!(error.contains("loopback"), "{error}");
}

#[test]
fn every_shipped_scenario_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("scenarios folder") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let scenario = Scenario::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            names.push(scenario.name);
        }
    }
    names.sort();
    for required in ["burst", "headline", "kafka-ingest", "many-subscribers", "smoke", "steady"] {
        assert!(names.iter().any(|n| n == required), "{required} in {names:?}");
    }
}

#[test]
fn the_headline_scenario_is_the_documented_run() {
    // `rest --rate 5000 --users 5000 --sockets 5000 --subs-per-socket 2`: 10,000 subscriptions.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/headline.toml");
    let s = Scenario::load(&path, &[]).expect("headline parses");
    assert_eq!((s.events_per_s, s.users, s.ws_sockets, s.ws_subs_per_socket), (5000.0, 5000, 5000, 2));
    assert_eq!(s.transport, liverec_load::scenario::Transport::Rest);
    assert_eq!(s.ws_sockets * s.ws_subs_per_socket, 10_000);
}

#[test]
fn the_kafka_ingest_scenario_produces_to_the_brokers_given() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/kafka-ingest.toml");
    let s = Scenario::load(&path, &["kafka.brokers=\"127.0.0.1:40001\"".into(), "events_per_s=500".into()])
        .expect("kafka-ingest parses with overrides");
    assert_eq!(s.transport, liverec_load::scenario::Transport::Kafka);
    let kafka = s.kafka.expect("a [kafka] table");
    assert_eq!((kafka.brokers.as_str(), kafka.topic.as_str()), ("127.0.0.1:40001", "liverec.events"));
    assert_eq!(s.events_per_s, 500.0);
    assert!(s.ws_sockets > 0, "subscribers measure event-to-push");
}
