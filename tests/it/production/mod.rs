//! Production mode against the real Apache Kafka broker and Redis server that the test command
//! starts (`scripts/services up`); the helpers they share are in `support::services` and
//! `support::restart`.

mod catalogue;
mod cluster;
mod cluster_closed_loop;
mod cluster_loop;
mod cluster_monitor;
mod consumed;
mod erasure;
mod failover;
mod kafka;
mod memory;
mod rebalance;
mod registry;
mod shutdown;
mod store_writer;
mod training_window;
mod watch;

use liverec::config::Config;
use liverec::Server;
use serde_json::Value;

use crate::support::*;

/// `liverec serve` on `port` as a production instance of `config` (its Kafka topics, group and
/// partitions, its Redis and key prefix), for tests that run the binary as users do; each adds
/// its own settings (`LIVEREC_…` variables) before spawning it.
fn serve_command(config: &Config, port: u16) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_liverec"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("LIVEREC_BUS__KIND", "kafka")
        .env("LIVEREC_STORE__KIND", "redis")
        .env("LIVEREC_KAFKA__BROKERS", &config.kafka.brokers)
        .env("LIVEREC_KAFKA__EVENTS_TOPIC", &config.kafka.events_topic)
        .env("LIVEREC_KAFKA__DEAD_LETTER_TOPIC", &config.kafka.dead_letter_topic)
        .env("LIVEREC_KAFKA__GROUP_ID", &config.kafka.group_id)
        .env("LIVEREC_KAFKA__PARTITIONS", PARTITIONS.to_string())
        .env("LIVEREC_KAFKA__SESSION_TIMEOUT_MS", "6000")
        .env("LIVEREC_REDIS__URL", &config.redis.url)
        .env("LIVEREC_REDIS__KEY_PREFIX", &config.redis.key_prefix);
    command
}

/// Waits until exactly one of `instances` (id, base URL) says it leads and every one names it,
/// with the same epoch; returns the leader's index and the epoch. On a timeout it prints what
/// each instance last answered (or why it did not), so a failure tells a vacant lease, a
/// disagreement and an instance that does not answer apart.
async fn agreed_leader_of(instances: &[(&str, &str)]) -> (usize, u64) {
    let start = std::time::Instant::now();
    loop {
        let mut views = Vec::new();
        for (id, url) in instances {
            let view = match client().get(format!("{url}/v1/admin/models")).send().await {
                Err(error) => Err(format!("no answer: {error}")),
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    match response.json::<Value>().limit(16 * 1024 * 1024).await {
                        Ok(body) if status == 200 => Ok(body["cluster"].clone()),
                        Ok(body) => Err(format!("{status}: {body}")),
                        Err(error) => Err(format!("{status}, body unreadable: {error}")),
                    }
                }
            };
            views.push((id.to_string(), view));
        }
        if let Some(agreed) = leader_agreement(&views) {
            return agreed;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for exactly one leader, named alike by every instance; last views: {views:?}"
        );
        actix_rt::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The leader's index and epoch when exactly one view says it leads and all name it.
fn leader_agreement(views: &[(String, Result<Value, String>)]) -> Option<(usize, u64)> {
    let mut leaders = Vec::new();
    let mut named = Vec::new();
    for (i, (_, cluster)) in views.iter().enumerate() {
        let cluster = cluster.as_ref().ok()?;
        if cluster["leader"] == true {
            leaders.push(i);
        }
        named.push((cluster["leader_instance_id"].as_str()?.to_owned(), cluster["epoch"].as_u64()?));
    }
    let first = named.first()?.clone();
    let [leader] = leaders[..] else { return None };
    (named.iter().all(|n| *n == first) && first.0 == views[leader].0).then_some((leader, first.1))
}

/// `GET {url}{path}` of a liverec process: status and JSON body; none while it does not answer.
async fn get_at(url: &str, path: &str) -> Option<(u16, Value)> {
    let mut response = client().get(format!("{url}{path}")).send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.json::<Value>().limit(16 * 1024 * 1024).await.ok()?;
    Some((status, body))
}

/// `POST {url}{path}` with a JSON body: status and JSON body (null when the body is not JSON).
async fn post_at(url: &str, path: &str, body: Value) -> (u16, Value) {
    let mut response = client()
        .post(format!("{url}{path}"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.json::<Value>().limit(16 * 1024 * 1024).await.unwrap_or(Value::Null))
}

/// One sample of a liverec process's `/metrics`; none while it does not answer.
async fn metric_at(url: &str, sample: &str) -> Option<f64> {
    let mut response = client().get(format!("{url}/metrics")).send().await.ok()?;
    let text = String::from_utf8(response.body().limit(16 * 1024 * 1024).await.ok()?.to_vec()).ok()?;
    parse_metric(&text, sample)
}

/// An in-process instance's `/readyz` body; none while it does not answer.
async fn readiness(server: &Server) -> Option<Value> {
    client().get(format!("{}/readyz", server.url())).send().await.ok()?.json().await.ok()
}

/// The Kafka partitions an in-process instance says it owns (`/readyz`); none while it does not
/// answer.
async fn partitions(server: &Server) -> Option<Vec<i32>> {
    serde_json::from_value(readiness(server).await?["kafka_partitions"].clone()).ok()
}

/// Two instances of `config`, once each owns some of the topic's partitions; A's partitions.
async fn two_instances(config: &Config) -> (Server, Server, Vec<i32>) {
    let a = start(config.clone()).await;
    let b = start(config.clone()).await;
    let owned_by_a = eventually("both instances own partitions", || async {
        let (pa, pb) = (partitions(&a).await?, partitions(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(pa)
    })
    .await;
    (a, b, owned_by_a)
}
