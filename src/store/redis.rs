//! The Redis profile store (deadpool-redis), for production mode.
//!
//! Per user, four keys share one hash tag so a cluster keeps them on one slot:
//! `<prefix>:{<user>}:h` (list: interactions as JSON, oldest first), `…:ids` (sorted set: recent
//! event ids by arrival), `…:s` (list: suppressed items) and `…:p` (hash: latest context, last
//! list, counters). One Lua script appends a user's new interactions atomically: it skips event
//! ids already present, appends, trims every list to its limit and refreshes the TTL.
//!
//! Writes go through one writer task that takes every queued write, sends them as a single
//! pipeline (one round trip for many users), and on failure retries the same pipeline with capped
//! exponential backoff until Redis answers. The script is idempotent, so retrying a pipeline that
//! partly ran is safe, and nothing accepted is dropped while Redis is away: the writes wait and the
//! callers' `Persisted` futures resolve only once Redis has them.
//!
//! The last pushed list of each user is also published on `<prefix>:updates:{<user>}`, so that
//! instances holding subscribers of a user they do not own can forward it (see [`RedisFanout`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{self, AsyncCommands as _};
use deadpool_redis::{Pool, Runtime};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot};

use super::{Interaction, Persisted, Profile, ProfileLimits, ProfileStore, ProfileUpdate, StoreError};
use crate::event::{Context, EventId, ItemId, UserId};
use crate::config::RedisConfig;
use crate::recs::{RecList, RecUpdate};
use crate::telemetry::Metrics;

const APPEND_SCRIPT: &str = r#"
-- KEYS: history list, ids zset, suppressed list, profile hash
-- ARGV: history_len, dedupe_window, suppressed_len, ttl_secs, context_json ('' = unchanged),
--       n, score_base, then n pairs (event_id, interaction_json), then suppressed item ids
local hlen, wlen, slen, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n, base = tonumber(ARGV[6]), tonumber(ARGV[7])
local applied = 0
for i = 0, n - 1 do
  -- ZADD NX adds the id only if it is new: the de-duplication and the insert in one call.
  if redis.call('ZADD', KEYS[2], 'NX', base + i, ARGV[8 + 2 * i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[9 + 2 * i])
    applied = applied + 1
  end
end
if applied > 0 then
  redis.call('LTRIM', KEYS[1], -hlen, -1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(wlen + 1))
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
local first = 8 + 2 * n
if #ARGV >= first then
  for j = first, #ARGV do
    redis.call('LREM', KEYS[3], 0, ARGV[j])
    redis.call('RPUSH', KEYS[3], ARGV[j])
  end
  redis.call('LTRIM', KEYS[3], -slen, -1)
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], 'context', ARGV[5])
  if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
end
return applied
"#;

/// Key names of one user.
struct Keys {
    history: String,
    ids: String,
    suppressed: String,
    profile: String,
}

fn keys(prefix: &str, user: &UserId) -> Keys {
    let base = format!("{prefix}:{{{user}}}");
    Keys {
        history: format!("{base}:h"),
        ids: format!("{base}:ids"),
        suppressed: format!("{base}:s"),
        profile: format!("{base}:p"),
    }
}

/// When the user was erased (a tombstone outlives the profile, so replays skip the user).
fn tombstone_key(prefix: &str, user: &UserId) -> String {
    format!("{prefix}:{{{user}}}:erased")
}

/// A score that grows with time (microseconds since the epoch), for ordering event ids.
fn score_base() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// The pub/sub channel carrying a user's pushed lists.
pub fn updates_channel(prefix: &str, user: &UserId) -> String {
    format!("{prefix}:updates:{{{user}}}")
}

/// The raw parts of one stored profile: history, ids, suppressed, (context, last list).
type RawProfile = (Vec<String>, Vec<String>, Vec<String>, (Option<String>, Option<String>));

struct Load {
    user: UserId,
    reply: oneshot::Sender<Result<RawProfile, String>>,
}

enum Write {
    Append {
        update: ProfileUpdate,
        done: oneshot::Sender<()>,
    },
    Recs {
        user: UserId,
        seq: u64,
        json: bytes::Bytes,
    },
    /// Deletes the user's keys, in order after every write queued before it.
    Erase {
        user: UserId,
        done: oneshot::Sender<()>,
    },
}

pub struct RedisStore {
    pool: Pool,
    prefix: String,
    writes: mpsc::UnboundedSender<Write>,
    loads: mpsc::UnboundedSender<Load>,
    pending_lists: Arc<AtomicUsize>,
    max_pending_lists: usize,
    degraded: Arc<AtomicBool>,
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
        let mut pool_config = deadpool_redis::Config::from_url(config.url.clone());
        pool_config.pool = Some(deadpool_redis::PoolConfig::new(config.pool_size.max(1)));
        let pool =
            pool_config.create_pool(Some(Runtime::Tokio1)).map_err(|e| RedisSetupError::Config(e.to_string()))?;
        let (writes, queue) = mpsc::unbounded_channel();
        let degraded = Arc::new(AtomicBool::new(false));
        let pending_lists = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            pool: pool.clone(),
            prefix: config.key_prefix.clone(),
            limits,
            ttl: config.profile_ttl_secs,
            batch: config.write_batch.max(1),
            retry_initial: Duration::from_millis(config.retry_initial_ms.max(1)),
            retry_max: Duration::from_millis(config.retry_max_ms.max(config.retry_initial_ms.max(1))),
            script: redis::Script::new(APPEND_SCRIPT),
            degraded: degraded.clone(),
            pending_lists: pending_lists.clone(),
            metrics: metrics.clone(),
        };
        arbiter.spawn(writer.run(queue));
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
            writes,
            loads,
            pending_lists,
            max_pending_lists: config.max_pending_lists,
            degraded,
            metrics,
            tombstone_ttl_secs: limits.tombstone_ttl_secs,
        })
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))
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
        self.degraded.load(Ordering::Relaxed)
    }

    async fn load(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.loads
            .send(Load { user: user.clone(), reply })
            .map_err(|_| StoreError::Unavailable("the profile loader stopped".into()))?;
        let (history, ids, suppressed, fields) = rx
            .await
            .map_err(|_| StoreError::Unavailable("the profile loader stopped".into()))?
            .map_err(StoreError::Unavailable)?;
        if history.is_empty() && ids.is_empty() && suppressed.is_empty() && fields.0.is_none() && fields.1.is_none() {
            return Ok(None);
        }
        let mut corrupt = 0;
        let interactions = history
            .iter()
            .filter_map(|json| serde_json::from_str::<Interaction>(json).map_err(|_| corrupt += 1).ok())
            .collect();
        let context = fields.0.and_then(|json| serde_json::from_str::<Context>(&json).map_err(|_| corrupt += 1).ok());
        let last_recs = fields.1.and_then(|json| serde_json::from_str::<RecList>(&json).map_err(|_| corrupt += 1).ok());
        if corrupt > 0 {
            self.metrics.store_errors.add(corrupt);
            tracing::error!(user = %user, entries = corrupt, "skipped unreadable entries of a stored profile");
        }
        Ok(Some(Profile {
            interactions,
            context,
            event_ids: ids.into_iter().map(|id| EventId::from(id.as_str())).collect(),
            suppressed: suppressed.into_iter().map(|id| ItemId::from(id.as_str())).collect(),
            last_recs,
        }))
    }

    fn append(&self, update: ProfileUpdate) -> Persisted {
        let (done, rx) = oneshot::channel();
        if self.writes.send(Write::Append { update, done }).is_err() {
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
        // The list was serialised once when published; the same bytes are stored and broadcast.
        let (user, seq, json) = (update.list.user_id.clone(), update.list.seq, update.json.clone());
        let _ = self.writes.send(Write::Recs { user, seq, json });
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
        self.writes
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
        let _: () = conn.del(&[k.history, k.ids, k.suppressed, k.profile]).await.map_err(unavailable)?;
        Ok(profile)
    }
}

/// Loads profiles in batches: every load queued while one pipeline runs goes in the next, so a
/// burst of new sessions (a rebalance, a wave of new users) costs a few round trips, not one each.
async fn run_loader(
    pool: Pool,
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
        let mut pipe = redis::pipe();
        for load in &pending {
            let k = keys(&prefix, &load.user);
            pipe.lrange(&k.history, 0, -1)
                .zrange(&k.ids, 0, -1)
                .lrange(&k.suppressed, 0, -1)
                .cmd("HMGET")
                .arg(&k.profile)
                .arg("context")
                .arg("recs");
        }
        let started = std::time::Instant::now();
        let result: Result<Vec<redis::Value>, String> = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            pipe.query_async(&mut conn).await.map_err(|e| e.to_string())
        }
        .await;
        metrics.store_load_seconds.observe_duration(started.elapsed());
        match result {
            Ok(values) => {
                let mut values = values.into_iter();
                for load in pending.drain(..) {
                    let mut part = || values.next().ok_or_else(|| "short pipeline reply".to_owned());
                    let raw = (|| -> Result<RawProfile, String> {
                        let conv = |v: redis::Value| -> Result<Vec<String>, String> {
                            redis::from_redis_value(v).map_err(|e| e.to_string())
                        };
                        let history = conv(part()?)?;
                        let ids = conv(part()?)?;
                        let suppressed = conv(part()?)?;
                        let fields = redis::from_redis_value(part()?).map_err(|e| e.to_string())?;
                        Ok((history, ids, suppressed, fields))
                    })();
                    let _ = load.reply.send(raw);
                }
            }
            Err(error) => {
                for load in pending.drain(..) {
                    let _ = load.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

struct Writer {
    pool: Pool,
    prefix: String,
    limits: ProfileLimits,
    ttl: u64,
    batch: usize,
    retry_initial: Duration,
    retry_max: Duration,
    script: redis::Script,
    degraded: Arc<AtomicBool>,
    pending_lists: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Writer {
    async fn run(self, mut queue: mpsc::UnboundedReceiver<Write>) {
        let mut batch = Vec::with_capacity(self.batch);
        while let Some(first) = queue.recv().await {
            batch.push(first);
            while batch.len() < self.batch {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            self.write_until_done(&batch).await;
            self.metrics.store_write_seconds.observe_duration(started.elapsed());
            self.metrics.store_write_batch_size.observe(batch.len() as f64);
            for write in batch.drain(..) {
                match write {
                    Write::Append { done, .. } | Write::Erase { done, .. } => {
                        let _ = done.send(());
                    }
                    Write::Recs { .. } => {
                        self.pending_lists.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn pipeline(&self, batch: &[Write]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        // Only the newest list of each user in the batch is stored and published: the older ones
        // are already stale, as they would be for a slow subscriber.
        let mut newest: HashMap<&UserId, u64> = HashMap::new();
        for write in batch {
            if let Write::Recs { user, seq, .. } = write {
                let entry = newest.entry(user).or_insert(*seq);
                *entry = (*entry).max(*seq);
            }
        }
        for write in batch {
            match write {
                Write::Append { update, .. } => {
                    let k = keys(&self.prefix, &update.user_id);
                    let context =
                        update.context.as_ref().and_then(|c| serde_json::to_string(c).ok()).unwrap_or_default();
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(self.script.get_hash())
                        .arg(4)
                        .arg(&k.history)
                        .arg(&k.ids)
                        .arg(&k.suppressed)
                        .arg(&k.profile)
                        .arg(self.limits.history_len)
                        .arg(self.limits.dedupe_window)
                        .arg(self.limits.suppressed_len)
                        .arg(self.ttl)
                        .arg(context)
                        .arg(update.interactions.len())
                        // Scores order the ids by arrival; only their order matters (trimming).
                        .arg(score_base());
                    for interaction in &update.interactions {
                        let json = serde_json::to_string(interaction).expect("interactions serialise");
                        cmd.arg(interaction.event_id.as_str()).arg(json);
                    }
                    for item in &update.suppressed {
                        cmd.arg(item.as_str());
                    }
                    cmd.ignore();
                }
                Write::Erase { user, .. } => {
                    let k = keys(&self.prefix, user);
                    pipe.del(&[&k.history, &k.ids, &k.suppressed, &k.profile]).ignore();
                    // Every instance with a stream of the user closes it (see RedisFanout).
                    pipe.publish(updates_channel(&self.prefix, user), erased_notice(user)).ignore();
                }
                Write::Recs { user, seq, .. } if newest.get(user) != Some(seq) => {}
                Write::Recs { user, seq, json } => {
                    let k = keys(&self.prefix, user);
                    pipe.cmd("HSET").arg(&k.profile).arg("recs").arg(json.as_ref()).arg("recs_seq").arg(*seq).ignore();
                    if self.ttl > 0 {
                        pipe.expire(&k.profile, self.ttl as i64).ignore();
                    }
                    pipe.publish(updates_channel(&self.prefix, user), json.as_ref()).ignore();
                }
            }
        }
        pipe
    }

    /// Sends the batch as one pipeline, retrying with capped backoff until Redis accepts it.
    async fn write_until_done(&self, batch: &[Write]) {
        let pipe = self.pipeline(batch);
        let mut delay = self.retry_initial;
        loop {
            match self.try_write(&pipe).await {
                Ok(()) => {
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!("redis writes succeed again");
                    }
                    return;
                }
                Err(error) => {
                    self.metrics.store_errors.inc();
                    if !self.degraded.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %error, "redis writes failing; retrying with backoff, nothing is dropped");
                    }
                    actix_rt::time::sleep(delay).await;
                    delay = (delay * 2).min(self.retry_max);
                }
            }
        }
    }

    async fn try_write(&self, pipe: &redis::Pipeline) -> Result<(), String> {
        let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => Ok(()),
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                    || e.to_string().contains("NOSCRIPT") =>
            {
                // Redis restarted (or flushed its scripts): load the script and send again. The
                // script skips event ids it already has, so the part that ran is not applied twice.
                self.script.prepare_invoke().load_async(&mut conn).await.map_err(|e| e.to_string())?;
                pipe.query_async::<()>(&mut conn).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Forwards lists published by other instances to local subscribers: subscribes to the channel of
/// every user this instance has a hub for, and re-subscribes after Redis comes back. An erasure
/// travels the same channel, so every instance closes the erased user's streams.
pub struct RedisFanout;

/// What arrives on a user's update channel.
#[derive(Debug)]
pub enum FanoutMessage {
    /// A list another instance published.
    List(RecList),
    /// The user was erased (on any instance).
    Erased(UserId),
}

/// The message published on a user's update channel when the user is erased. Lists are JSON
/// objects that start with `{"rec_id"`, so the two never mix.
fn erased_notice(user: &UserId) -> String {
    serde_json::json!({ "erased": user }).to_string()
}

fn parse_update(payload: &str) -> Result<FanoutMessage, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Erased {
        erased: UserId,
    }
    if payload.starts_with("{\"erased\"") {
        return serde_json::from_str::<Erased>(payload).map(|e| FanoutMessage::Erased(e.erased));
    }
    serde_json::from_str(payload).map(FanoutMessage::List)
}

/// What the registry asks of the fan-out.
#[derive(Debug)]
pub enum FanoutCommand {
    Watch(UserId),
    Unwatch(UserId),
}

/// The registry's side of the fan-out: commands queue for `RedisFanout::run`. A closed channel
/// (the fan-out ended with the server) drops them.
impl super::UpdateFanout for mpsc::UnboundedSender<FanoutCommand> {
    fn watch(&self, user: &UserId) {
        let _ = self.send(FanoutCommand::Watch(user.clone()));
    }

    fn unwatch(&self, user: &UserId) {
        let _ = self.send(FanoutCommand::Unwatch(user.clone()));
    }
}

impl RedisFanout {
    /// Runs until `commands` closes. `deliver` gets every list published for a watched user, and
    /// every erasure of one.
    pub async fn run(
        url: String,
        prefix: String,
        mut commands: mpsc::UnboundedReceiver<FanoutCommand>,
        deliver: impl Fn(FanoutMessage) + 'static,
        metrics: Arc<Metrics>,
    ) {
        let mut watched: HashSet<UserId> = HashSet::new();
        let mut delay = Duration::from_millis(50);
        loop {
            let client = match redis::Client::open(url.as_str()) {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(error = %error, "invalid redis url for update fan-out");
                    return;
                }
            };
            let pubsub = match client.get_async_pubsub().await {
                Ok(pubsub) => pubsub,
                Err(error) => {
                    metrics.store_errors.inc();
                    tracing::debug!(error = %error, "update fan-out cannot reach redis; retrying");
                    actix_rt::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    // Keep the watch list current while disconnected.
                    while let Ok(command) = commands.try_recv() {
                        apply(&mut watched, command);
                    }
                    continue;
                }
            };
            delay = Duration::from_millis(50);
            let (mut sink, mut stream) = pubsub.split();
            let mut ok = true;
            for user in &watched {
                if sink.subscribe(updates_channel(&prefix, user)).await.is_err() {
                    ok = false;
                    break;
                }
            }
            while ok {
                tokio::select! {
                    command = commands.recv() => {
                        let Some(command) = command else { return };
                        let result = match &command {
                            FanoutCommand::Watch(user) => sink.subscribe(updates_channel(&prefix, user)).await,
                            FanoutCommand::Unwatch(user) => sink.unsubscribe(updates_channel(&prefix, user)).await,
                        };
                        apply(&mut watched, command);
                        ok = result.is_ok();
                    }
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        let Ok(payload) = message.get_payload::<String>() else { continue };
                        match parse_update(&payload) {
                            Ok(message) => deliver(message),
                            Err(error) => tracing::warn!(error = %error, "unreadable list on an update channel"),
                        }
                    }
                }
            }
            metrics.store_errors.inc();
            tracing::warn!("update fan-out lost its redis connection; reconnecting");
        }
    }
}

fn apply(watched: &mut HashSet<UserId>, command: FanoutCommand) {
    match command {
        FanoutCommand::Watch(user) => {
            watched.insert(user);
        }
        FanoutCommand::Unwatch(user) => {
            watched.remove(&user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_channels_carry_lists_and_erasures_apart() {
        let erased = parse_update(&erased_notice(&UserId::from("erin"))).expect("notice");
        assert!(matches!(erased, FanoutMessage::Erased(user) if user.as_str() == "erin"));
        let list = RecList {
            rec_id: "r1".into(),
            user_id: UserId::from("erin"),
            model_version: "v1".into(),
            variant: "control".into(),
            generated_at: 1,
            seq: 3,
            last_event_id: None,
            items: vec![],
        };
        let parsed = parse_update(&serde_json::to_string(&list).expect("list")).expect("list");
        assert!(matches!(parsed, FanoutMessage::List(l) if l == list));
        assert!(parse_update("{\"erased\": 5}").is_err());
    }
}
