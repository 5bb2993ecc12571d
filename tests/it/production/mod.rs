//! Production mode against the real Apache Kafka broker and Redis server that the test command
//! starts (`scripts/services up`); the helpers they share are in `support::services` and
//! `support::restart`.

mod catalogue;
mod cluster;
mod cluster_closed_loop;
mod cluster_loop;
mod cluster_monitor;
mod erasure;
mod failover;
mod kafka;
mod memory;
mod registry;
mod shutdown;
mod store_writer;
mod training_window;
mod watch;

use liverec::config::Config;
use liverec::Server;
use serde_json::Value;

use crate::support::*;

/// Two instances of `config`, once each owns some of the topic's partitions; A's partitions.
async fn two_instances(config: &Config) -> (Server, Server, Vec<i32>) {
    let a = start(config.clone()).await;
    let b = start(config.clone()).await;
    let owned_by_a = eventually("both instances own partitions", || async {
        let parts = |server: &Server| {
            let url = format!("{}/readyz", server.url());
            async move {
                let ready: Value = client().get(url).send().await.ok()?.json().await.ok()?;
                serde_json::from_value::<Vec<i32>>(ready["kafka_partitions"].clone()).ok()
            }
        };
        let (pa, pb) = (parts(&a).await?, parts(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(pa)
    })
    .await;
    (a, b, owned_by_a)
}
