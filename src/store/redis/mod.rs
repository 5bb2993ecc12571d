//! The Redis profile store (deadpool-redis), for production mode.
//!
//! Per user, four keys share one hash tag so a cluster keeps them on one slot:
//! `<prefix>:{<user>}:h` (list: interactions in a compact binary form, oldest first; see
//! `codec`), `…:s` (list: suppressed items), `…:q` (string: the latest context as JSON, the
//! last stored list in a compact binary form and the 8-byte digests of the newest
//! `session.dedupe_window` event ids, oldest first; see `codec::decode_profile`) and `…:c`
//! (sorted set: every consumed item, scored by when it was last consumed in seconds, at most
//! `session.consumed_max`). One Lua script appends the new interactions of one or more users
//! atomically: it skips events whose id digest is present, appends, records the consumed items,
//! trims every list and the set to its limit and refreshes the TTL. Profiles written
//! before hold forms that are still read until they expire: JSON interactions and lists, a sorted
//! set of the event ids themselves (`…:ids`, checked by the script too), and the window, context
//! and list in a hash (`…:p`) with older digests in a string of their own (`…:e`); the next write
//! of the user moves those two into the profile string.
//!
//! Writes go through `redis.write_pipelines` writer lanes (users spread over them by a hash of their
//! id, so each user's writes stay in order): each lane takes every write queued for it, sends them
//! as a single pipeline (one round trip for many users; one script call for up to 32 users on one
//! server, one per user in a cluster, however many of a user's appends it merges, which also
//! stores the user's newest list), and on failure retries the same pipeline with capped
//! exponential backoff until Redis answers. Several lanes keep several
//! pipelines in flight on the pool's multiplexed connections (default one: they share the I/O
//! thread). The script is idempotent, so retrying a pipeline that partly ran is safe, and nothing
//! accepted is dropped while Redis is away: the writes wait and the callers' `Persisted` futures
//! resolve only once Redis has them.
//!
//! The last pushed list of each user is also published on `<prefix>:updates:{<user>}`, so that
//! instances holding subscribers of a user they do not own can forward it (see [`RedisFanout`]).
//!
//! With `redis.cluster_nodes` set the same keys live in a Redis Cluster (see `conn`): a user's
//! keys and channel share a slot, lists go out with `SPUBLISH`, and a writer lane that cannot
//! reach one master holds back only the writes of that master's slots (see `parking`), so the
//! users of the other masters keep being written.
//!
//! Lists nobody watches are neither stored nor published: instances announce the users they hold
//! subscribers of, and the owner's session skips the others (see `watch`).
pub(crate) mod conn;
mod fanout;
mod keys;
mod parking;
mod watch;
mod writer;

use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{self, AsyncCommands as _};
use tokio::sync::{mpsc, oneshot};

pub use self::fanout::{watch_ttl, FanoutCommand, FanoutHandle, FanoutMessage, RedisFanout};
pub use self::keys::updates_channel;
pub use self::watch::WatchTable;

/// Reads one entry of a user's history list (`<prefix>:{<user>}:h`), in either stored form, for
/// tools and tests that read the keys directly.
pub fn decode_history_entry(entry: &[u8]) -> Option<Interaction> {
    codec::decode(entry)
}

/// Reads the last list stored for `user` out of its profile string (`<prefix>:{<user>}:q`), or
/// out of the `recs` field of the hash written before (`…:p`), in any stored form, for tools and
/// tests that read the keys directly.
pub fn decode_stored_list(stored: &[u8], user: &UserId) -> Option<RecList> {
    codec::decode_any_list(stored, user)
}
use self::conn::{Conn, Redis};
use self::keys::{keys, tombstone_key};
use self::writer::{Write, Writer, APPEND_SCRIPT};
use super::{
    codec, ConsumedItem, EventDigest, Interaction, Persisted, Profile, ProfileLimits, ProfileStore, ProfileUpdate,
    StoreError,
};
use crate::config::RedisConfig;
use crate::event::{Context, EventId, ItemId, UserId};
use crate::recs::{RecList, RecUpdate};
use crate::telemetry::Metrics;

/// The raw parts of one stored profile: history, legacy ids, legacy digests, suppressed, (context,
/// last list, digests) of the legacy hash, the profile string, the consumed items with their times.
type RawProfile = (
    Vec<Vec<u8>>,
    Vec<String>,
    Option<Vec<u8>>,
    Vec<String>,
    (Option<String>, Option<Vec<u8>>, Option<Vec<u8>>),
    Option<Vec<u8>>,
    Vec<(String, f64)>,
);

struct Load {
    user: UserId,
    reply: oneshot::Sender<Result<RawProfile, String>>,
}
pub struct RedisStore {
    pool: Redis,
    prefix: String,
    /// The writer lanes' queues; a user's writes always go to the same one.
    lanes: Vec<mpsc::UnboundedSender<Write>>,
    loads: mpsc::UnboundedSender<Load>,
    pending_lists: Arc<AtomicUsize>,
    max_pending_lists: usize,
    /// Writer lanes whose writes are failing now.
    failing_lanes: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    tombstone_ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid redis configuration: {0}")]
    Config(String),
}

impl RedisStore {
    /// Creates the pool and starts the writer task on `arbiter`. Connections are made
    /// lazily, so Redis need not be up yet.
    pub fn start(
        config: &RedisConfig,
        limits: ProfileLimits,
        metrics: Arc<Metrics>,
        arbiter: &actix::ArbiterHandle,
    ) -> Result<Self, RedisSetupError> {
        let pool = Redis::new(config).map_err(RedisSetupError::Config)?;
        let failing_lanes = Arc::new(AtomicUsize::new(0));
        let pending_lists = Arc::new(AtomicUsize::new(0));
        let script = redis::Script::new(APPEND_SCRIPT);
        let lanes = (0..config.write_pipelines.max(1))
            .map(|_| {
                let (lane, queue) = mpsc::unbounded_channel();
                let writer = Writer {
                    pool: pool.clone(),
                    prefix: config.key_prefix.clone(),
                    limits,
                    ttl: config.profile_ttl_secs,
                    batch: config.write_batch.max(1),
                    retry_initial: Duration::from_millis(config.retry_initial_ms.max(1)),
                    retry_max: Duration::from_millis(config.retry_max_ms.max(config.retry_initial_ms.max(1))),
                    script: script.clone(),
                    failing_lanes: failing_lanes.clone(),
                    pending_lists: pending_lists.clone(),
                    metrics: metrics.clone(),
                };
                if pool.is_cluster() {
                    arbiter.spawn(writer.run_cluster(queue));
                } else {
                    arbiter.spawn(writer.run(queue));
                }
                lane
            })
            .collect();
        let (loads, load_queue) = mpsc::unbounded_channel();
        arbiter.spawn(run_loader(
            pool.clone(),
            config.key_prefix.clone(),
            config.write_batch.max(1),
            load_queue,
            metrics.clone(),
        ));
        Ok(Self {
            pool,
            prefix: config.key_prefix.clone(),
            lanes,
            loads,
            pending_lists,
            max_pending_lists: config.max_pending_lists,
            failing_lanes,
            metrics,
            tombstone_ttl_secs: limits.tombstone_ttl_secs,
        })
    }

    /// The writer lane of `user`. A fixed hasher: the choice only has to be stable in this process.
    fn lane(&self, user: &UserId) -> &mpsc::UnboundedSender<Write> {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(user.as_str());
        &self.lanes[(hash % self.lanes.len() as u64) as usize]
    }

    async fn connection(&self) -> Result<Conn, StoreError> {
        self.pool.get().await.map_err(StoreError::Unavailable)
    }

    /// Whether Redis answers a PING now.
    pub async fn ping(&self) -> bool {
        match self.connection().await {
            Ok(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok(),
            Err(_) => false,
        }
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl ProfileStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn degraded(&self) -> bool {
        self.failing_lanes.load(Ordering::Relaxed) > 0
    }

    async fn load(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.loads
            .send(Load { user: user.clone(), reply })
            .map_err(|_| StoreError::Unavailable("the profile loader stopped".into()))?;
        let (history, legacy_ids, legacy_digests, suppressed, (context, recs, digests), profile, consumed) = rx
            .await
            .map_err(|_| StoreError::Unavailable("the profile loader stopped".into()))?
            .map_err(StoreError::Unavailable)?;
        let mut corrupt = 0;
        let (window, context, recs) = match profile {
            // The profile string holds everything the older forms did (the script moved them).
            Some(stored) => match codec::decode_profile(&stored) {
                Some(parts) => (
                    parts.window.to_vec(),
                    std::str::from_utf8(parts.context).ok().filter(|c| !c.is_empty()).map(str::to_owned),
                    Some(parts.list.to_vec()).filter(|list| !list.is_empty()),
                ),
                None => {
                    corrupt += 1;
                    (Vec::new(), None, None)
                }
            },
            None => {
                // The digests in a string of their own are older than those in the hash.
                let mut window = legacy_digests.unwrap_or_default();
                let digests = digests.unwrap_or_default();
                // A marker byte in front while a legacy set of ids exists (see the script).
                window.extend(if digests.len() % 8 == 1 { &digests[1..] } else { &digests[..] });
                (window, context, recs)
            }
        };
        if history.is_empty()
            && legacy_ids.is_empty()
            && window.is_empty()
            && suppressed.is_empty()
            && context.is_none()
            && recs.is_none()
            && consumed.is_empty()
            && corrupt == 0
        {
            return Ok(None);
        }
        let interactions = history
            .iter()
            .filter_map(|entry| {
                let read = codec::decode(entry);
                corrupt += u64::from(read.is_none());
                read
            })
            .collect();
        let context = context.and_then(|json| serde_json::from_str::<Context>(&json).map_err(|_| corrupt += 1).ok());
        let last_recs = recs.and_then(|stored| {
            let list = codec::decode_list(&stored, user);
            corrupt += u64::from(list.is_none());
            list
        });
        if corrupt > 0 {
            self.metrics.store_errors.add(corrupt);
            tracing::error!(user = %user, entries = corrupt, "skipped unreadable entries of a stored profile");
        }
        Ok(Some(Profile {
            interactions,
            context,
            // A profile from before the digests has only the legacy ids; one written since a
            // legacy profile has both: the legacy ids are older.
            event_ids: legacy_ids
                .iter()
                .map(|id| EventDigest::of(&EventId::from(id.as_str())))
                .chain(window.chunks_exact(8).map(|d| EventDigest(u64::from_be_bytes(d.try_into().expect("8 bytes")))))
                .collect(),
            suppressed: suppressed.into_iter().map(|id| ItemId::from(id.as_str())).collect(),
            last_recs,
            consumed: consumed_items(consumed),
        }))
    }

    fn append(&self, update: ProfileUpdate) -> Persisted {
        let (done, rx) = oneshot::channel();
        let lane = self.lane(&update.user_id);
        if lane.send(Write::Append { update, done }).is_err() {
            // The writer is gone (shutting down): never report this as durable.
            return Box::pin(std::future::pending());
        }
        Box::pin(async move {
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }

    fn save_recs(&self, update: &RecUpdate) {
        if self.pending_lists.load(Ordering::Relaxed) >= self.max_pending_lists {
            self.metrics.store_errors.inc();
            return;
        }
        self.pending_lists.fetch_add(1, Ordering::Relaxed);
        // The list is serialised once (shared with the streams and `GET`s that read it): those
        // bytes are broadcast, and Redis keeps the compact form (`codec::encode_list`, about a
        // fifth of the JSON's bytes).
        let (user, seq, json) = (update.list.user_id.clone(), update.list.seq, update.json());
        let stored = codec::encode_list(&update.list);
        let _ = self.lane(&user).send(Write::Recs { user, seq, json, stored });
    }

    async fn erase(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.connection().await?;
        let key = tombstone_key(&self.prefix, user);
        let _: () = if self.tombstone_ttl_secs > 0 {
            conn.set_ex(key, at_ms, self.tombstone_ttl_secs).await.map_err(unavailable)?
        } else {
            conn.set(key, at_ms).await.map_err(unavailable)?
        };
        let (done, rx) = oneshot::channel();
        self.lane(user)
            .send(Write::Erase { user: user.clone(), done })
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?;
        rx.await.map_err(|_| StoreError::Unavailable("the store writer stopped".into()))
    }

    async fn tombstone(&self, user: &UserId) -> Result<Option<i64>, StoreError> {
        let mut conn = self.connection().await?;
        conn.get(tombstone_key(&self.prefix, user)).await.map_err(unavailable)
    }

    async fn remove(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        let profile = self.load(user).await?;
        let k = keys(&self.prefix, user);
        let mut conn = self.connection().await?;
        let _: () = conn.del(&k.all()).await.map_err(unavailable)?;
        Ok(profile)
    }
}

/// The consumed set as the profile holds it: sorted by item, times as whole seconds.
fn consumed_items(stored: Vec<(String, f64)>) -> Vec<ConsumedItem> {
    let mut items: Vec<ConsumedItem> = stored
        .into_iter()
        .map(|(item, secs)| ConsumedItem { item_id: ItemId::from(item.as_str()), at_secs: secs as u32 })
        .collect();
    items.sort_unstable_by(|a, b| a.item_id.as_str().cmp(b.item_id.as_str()));
    items
}

/// Loads profiles in batches: every load queued while one pipeline runs goes in the next, so a
/// burst of new sessions (a rebalance, a wave of new users) costs a few round trips, not one each.
/// In a cluster a failed batch is read again user by user, so the users of a master that is down
/// do not fail the loads of the others.
async fn run_loader(
    pool: Redis,
    prefix: String,
    batch: usize,
    mut queue: mpsc::UnboundedReceiver<Load>,
    metrics: Arc<Metrics>,
) {
    let mut pending = Vec::with_capacity(batch);
    while let Some(first) = queue.recv().await {
        pending.push(first);
        while pending.len() < batch {
            match queue.try_recv() {
                Ok(load) => pending.push(load),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let users: Vec<&UserId> = pending.iter().map(|load| &load.user).collect();
        let mut results = read_profiles(&pool, &prefix, &users).await;
        if pool.is_cluster() && users.len() > 1 && results.iter().all(Result::is_err) {
            let one_by_one = users.iter().map(|user| read_profiles(&pool, &prefix, std::slice::from_ref(user)));
            results = futures_util::future::join_all(one_by_one).await.into_iter().flatten().collect();
        }
        metrics.store_load_seconds.observe_duration(started.elapsed());
        for (load, raw) in pending.drain(..).zip(results) {
            let _ = load.reply.send(raw);
        }
    }
}

/// Reads the profiles of `users` in one pipeline: one result per user.
async fn read_profiles(pool: &Redis, prefix: &str, users: &[&UserId]) -> Vec<Result<RawProfile, String>> {
    let mut pipe = redis::pipe();
    for user in users {
        let k = keys(prefix, user);
        pipe.lrange(&k.history, 0, -1)
            .zrange(&k.legacy_ids, 0, -1)
            .get(&k.digests)
            .lrange(&k.suppressed, 0, -1)
            .cmd("HMGET")
            .arg(&k.legacy_profile)
            .arg("context")
            .arg("recs")
            .arg("e")
            .get(&k.profile)
            .zrange_withscores(&k.consumed, 0, -1);
    }
    let result: Result<Vec<redis::Value>, String> = async {
        let mut conn = pool.get().await?;
        pipe.query_async(&mut conn).await.map_err(|e| e.to_string())
    }
    .await;
    let values = match result {
        Ok(values) => values,
        Err(error) => return users.iter().map(|_| Err(error.clone())).collect(),
    };
    let mut values = values.into_iter();
    users
        .iter()
        .map(|_| {
            let mut part = || values.next().ok_or_else(|| "short pipeline reply".to_owned());
            fn conv<T: redis::FromRedisValue>(v: redis::Value) -> Result<T, String> {
                redis::from_redis_value(v).map_err(|e| e.to_string())
            }
            let history = conv(part()?)?;
            let legacy_ids = conv(part()?)?;
            let legacy_digests = conv(part()?)?;
            let suppressed = conv(part()?)?;
            let fields = conv(part()?)?;
            let profile = conv(part()?)?;
            let consumed = conv(part()?)?;
            Ok((history, legacy_ids, legacy_digests, suppressed, fields, profile, consumed))
        })
        .collect()
}
