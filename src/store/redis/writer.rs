//! The Redis store's writer: one task that takes every queued write and sends them as a single
//! pipeline (one round trip for many users), retrying the same pipeline with capped exponential
//! backoff until Redis answers (see the store's module docs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::Pool;
use tokio::sync::{mpsc, oneshot};

use super::fanout::erased_notice;
use super::keys::{keys, updates_channel};
use crate::event::UserId;
use crate::store::{ProfileLimits, ProfileUpdate};
use crate::telemetry::Metrics;

pub(super) const APPEND_SCRIPT: &str = r#"
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
/// A score that grows with time (microseconds since the epoch), for ordering event ids.
fn score_base() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}
pub(super) enum Write {
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
pub(super) struct Writer {
    pub(super) pool: Pool,
    pub(super) prefix: String,
    pub(super) limits: ProfileLimits,
    pub(super) ttl: u64,
    pub(super) batch: usize,
    pub(super) retry_initial: Duration,
    pub(super) retry_max: Duration,
    pub(super) script: redis::Script,
    pub(super) degraded: Arc<AtomicBool>,
    pub(super) pending_lists: Arc<AtomicUsize>,
    pub(super) metrics: Arc<Metrics>,
}

impl Writer {
    pub(super) async fn run(self, mut queue: mpsc::UnboundedReceiver<Write>) {
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
