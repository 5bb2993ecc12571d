//! Where the store's commands go: one Redis server (a deadpool of multiplexed connections) or a
//! Redis Cluster (`redis.cluster_nodes`; one cluster connection, itself multiplexed, that routes
//! every command to the master of its key's slot and follows the cluster's redirections).
//!
//! The store's code builds the same pipelines for both: all keys of a user share the hash tag
//! `{<user>}` (see `keys`), so a user's script call, its keys and its update channel sit on one
//! slot, and the cluster connection splits a pipeline by node, keeping each user's commands in
//! order. Only the publish command differs: a cluster publishes on the channel's shard
//! (`SPUBLISH`, Redis 7.0 and later), where a classic `PUBLISH` would be copied to every node.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{
    self, aio::ConnectionLike, cluster::ClusterClientBuilder, cluster_async::ClusterConnection,
};
use deadpool_redis::{Pool, Runtime};

use crate::config::RedisConfig;

/// Attempts of one command inside the cluster connection (redirections and reconnections) before
/// it reports the error: the store's writer retries the whole write itself, with its own backoff,
/// so a dead master costs a few milliseconds per attempt, not the client's 16 retries.
const CLUSTER_RETRIES: u32 = 2;
/// How long connecting to Redis (a node of a cluster) may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long Redis (a node) may take to answer before the attempt counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The store's way to Redis (see the module docs).
#[derive(Clone)]
pub(crate) enum Redis {
    Single(Pool),
    Cluster(Arc<Cluster>),
}

pub(crate) struct Cluster {
    client: redis::cluster::ClusterClient,
    /// Made on first use (the cluster need not be up when the server starts), then shared.
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
}

/// A connection of either kind.
pub(crate) enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

impl Redis {
    /// Connections are made lazily, so Redis need not be up yet.
    pub(crate) fn new(config: &RedisConfig) -> Result<Self, String> {
        if config.cluster_nodes.is_empty() {
            // The client's default response timeout (500 ms) is shorter than a large pipeline
            // takes on a loaded Redis: the writer then sent the whole pipeline again, adding work
            // where there was already too much.
            let connection = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let manager =
                deadpool_redis::Manager::new_with_config(config.url.as_str(), connection).map_err(|e| e.to_string())?;
            let pool = Pool::builder(manager)
                .max_size(config.pool_size.max(1))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| e.to_string())?;
            return Ok(Self::Single(pool));
        }
        let client = cluster_client(&config.cluster_nodes, None)?;
        Ok(Self::Cluster(Arc::new(Cluster { client, connection: tokio::sync::Mutex::new(None) })))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The command that publishes a user's update: sharded in a cluster (see the module docs).
    pub(super) fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    pub(crate) async fn get(&self) -> Result<Conn, String> {
        match self {
            Self::Single(pool) => pool.get().await.map(Conn::Single).map_err(|e| e.to_string()),
            Self::Cluster(cluster) => {
                let mut connection = cluster.connection.lock().await;
                if let Some(connection) = connection.as_ref() {
                    return Ok(Conn::Cluster(connection.clone()));
                }
                let made = cluster.client.get_async_connection().await.map_err(|e| e.to_string())?;
                *connection = Some(made.clone());
                Ok(Conn::Cluster(made))
            }
        }
    }
}

/// A cluster client of the store's settings; `push` receives the pub/sub messages (RESP3).
pub(super) fn cluster_client(
    nodes: &[String],
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient, String> {
    let builder = ClusterClientBuilder::new(nodes.to_vec())
        .retries(CLUSTER_RETRIES)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT);
    let builder = match push {
        Some(push) => builder.use_protocol(redis::ProtocolVersion::RESP3).push_sender(push),
        None => builder,
    };
    builder.build().map_err(|e| e.to_string())
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The hash slot of a user's keys and channel (every one of them carries the user's hash tag).
pub(super) fn slot_of(key: &str) -> redis::cluster_routing::Slot {
    redis::cluster_routing::Slot::for_key(key)
}
