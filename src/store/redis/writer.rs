//! The Redis store's writers: `redis.write_pipelines` lanes, each a task that takes every write
//! queued for it and sends them as one pipeline (one round trip for many users), retrying the same
//! pipeline with capped exponential backoff until Redis answers (see the store's module docs).
//!
//! Users are spread over the lanes by a hash of their id, so one user's writes always go through
//! the same lane, in the order of the calls, while the lanes keep several pipelines in flight on
//! the pool's multiplexed connections. Within a pipeline the appends of one user become one script
//! call (all their events, in order), which also stores the user's newest pushed list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use tokio::sync::{mpsc, oneshot};

use super::codec;
use super::conn::Redis;
use super::fanout::erased_notice;
use super::keys::{keys, updates_channel};
use crate::event::{Context, ItemId, UserId};
use crate::store::{EventDigest, Interaction, ProfileLimits, ProfileUpdate};
use crate::telemetry::Metrics;

pub(super) const APPEND_SCRIPT: &str = r#"
-- KEYS: history list, legacy ids zset, event-digest string, suppressed list, profile hash
-- ARGV: history_len, dedupe_window, suppressed_len, ttl_secs, context_json ('' = unchanged),
--       recs_json ('' = unchanged), recs_seq, n, then n triples (8-byte digest of the event id,
--       event id, encoded interaction), then suppressed item ids
local hlen, wlen, slen, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tonumber(ARGV[8])
local applied = 0
-- The window: the digests of the newest event ids, 8 bytes each, oldest first.
local seen = redis.call('GET', KEYS[3]) or ''
-- Profiles written before kept the ids themselves in a sorted set: checked until it expires.
local legacy = redis.call('EXISTS', KEYS[2]) == 1
local function known(digest)
  local from = 1
  while true do
    local at = string.find(seen, digest, from, true)
    if not at then return false end
    if at % 8 == 1 then return true end
    from = at + 1
  end
end
for i = 0, n - 1 do
  local digest, id = ARGV[9 + 3 * i], ARGV[10 + 3 * i]
  if not known(digest) and not (legacy and redis.call('ZSCORE', KEYS[2], id)) then
    seen = seen .. digest
    redis.call('RPUSH', KEYS[1], ARGV[11 + 3 * i])
    applied = applied + 1
  end
end
if applied > 0 then
  if wlen < 1 then seen = '' elseif #seen > 8 * wlen then seen = string.sub(seen, -8 * wlen) end
  redis.call('SET', KEYS[3], seen)
  redis.call('LTRIM', KEYS[1], -hlen, -1)
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end
local first = 9 + 3 * n
if #ARGV >= first then
  for j = first, #ARGV do
    redis.call('LREM', KEYS[4], 0, ARGV[j])
    redis.call('RPUSH', KEYS[4], ARGV[j])
  end
  redis.call('LTRIM', KEYS[4], -slen, -1)
  if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[5], 'context', ARGV[5])
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[5], 'recs', ARGV[6], 'recs_seq', ARGV[7])
end
if ttl > 0 and (ARGV[5] ~= '' or ARGV[6] ~= '') then redis.call('EXPIRE', KEYS[5], ttl) end
return applied
"#;
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
/// One lane of the store's writes (see the module docs).
pub(super) struct Writer {
    pub(super) pool: Redis,
    pub(super) prefix: String,
    pub(super) limits: ProfileLimits,
    pub(super) ttl: u64,
    pub(super) batch: usize,
    pub(super) retry_initial: Duration,
    pub(super) retry_max: Duration,
    pub(super) script: redis::Script,
    /// Lanes whose writes are failing now (the store is degraded while any is).
    pub(super) failing_lanes: Arc<AtomicUsize>,
    pub(super) pending_lists: Arc<AtomicUsize>,
    pub(super) metrics: Arc<Metrics>,
}

/// The appends of one user in one pipeline, merged into one script call (in call order).
#[derive(Default)]
struct UserCall<'a> {
    events: Vec<&'a Interaction>,
    suppressed: Vec<&'a ItemId>,
    /// The newest context of the merged appends.
    context: Option<&'a Context>,
    /// The user's newest list in the pipeline, when it comes after the first append.
    recs: Option<(u64, &'a [u8])>,
}

/// What a pipeline does, in order: a merged call sits where the user's first append was.
enum Step<'a> {
    Call(&'a UserId, usize),
    Erase(&'a UserId),
    /// A list stored on its own (no append of the user before it in the pipeline).
    Recs(&'a UserId, u64, &'a [u8]),
    /// The broadcast of a list the user's merged call stores.
    Publish(&'a UserId, &'a [u8]),
}

impl Writer {
    pub(super) async fn run(self, mut queue: mpsc::UnboundedReceiver<Write>) {
        let mut batch = Vec::with_capacity(self.batch);
        let mut failing = false;
        while let Some(first) = queue.recv().await {
            batch.push(first);
            while batch.len() < self.batch {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            self.write_until_done(&batch, &mut failing).await;
            self.metrics.store_write_seconds.observe_duration(started.elapsed());
            self.metrics.store_write_batch_size.observe(batch.len() as f64);
            for write in batch.drain(..) {
                self.finish(write);
            }
        }
    }

    /// A write Redis has: its caller learns it, or a pending list stops counting.
    pub(super) fn finish(&self, write: Write) {
        match write {
            Write::Append { done, .. } | Write::Erase { done, .. } => {
                let _ = done.send(());
            }
            Write::Recs { .. } => {
                self.pending_lists.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Plans the batch: one call per user for consecutive appends (an erasure closes the user's
    /// call, so appends after it start a new one), and only the newest list of each user (the
    /// older ones are already stale, as they would be for a slow subscriber).
    fn plan<'a>(batch: &'a [Write]) -> (Vec<Step<'a>>, Vec<UserCall<'a>>) {
        let mut newest: HashMap<&UserId, u64> = HashMap::new();
        for write in batch {
            if let Write::Recs { user, seq, .. } = write {
                let entry = newest.entry(user).or_insert(*seq);
                *entry = (*entry).max(*seq);
            }
        }
        let (mut steps, mut calls) = (Vec::with_capacity(batch.len()), Vec::<UserCall>::new());
        let mut open: HashMap<&UserId, usize> = HashMap::new();
        for write in batch {
            match write {
                Write::Append { update, .. } => {
                    let index = *open.entry(&update.user_id).or_insert_with(|| {
                        calls.push(UserCall::default());
                        steps.push(Step::Call(&update.user_id, calls.len() - 1));
                        calls.len() - 1
                    });
                    let call = &mut calls[index];
                    call.events.extend(update.interactions.iter());
                    call.suppressed.extend(update.suppressed.iter());
                    if let Some(context) = &update.context {
                        call.context = Some(context);
                    }
                }
                Write::Erase { user, .. } => {
                    open.remove(user);
                    steps.push(Step::Erase(user));
                }
                Write::Recs { user, seq, .. } if newest.get(user) != Some(seq) => {}
                Write::Recs { user, seq, json } => match open.get(user) {
                    Some(&index) => {
                        calls[index].recs = Some((*seq, json.as_ref()));
                        steps.push(Step::Publish(user, json.as_ref()));
                    }
                    None => steps.push(Step::Recs(user, *seq, json.as_ref())),
                },
            }
        }
        (steps, calls)
    }

    pub(super) fn pipeline(&self, batch: &[Write]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let (steps, calls) = Self::plan(batch);
        for step in steps {
            match step {
                Step::Call(user, index) => self.append_call(&mut pipe, user, &calls[index]),
                Step::Erase(user) => {
                    let k = keys(&self.prefix, user);
                    pipe.del(&[&k.history, &k.legacy_ids, &k.digests, &k.suppressed, &k.profile]).ignore();
                    // Every instance with a stream of the user closes it (see RedisFanout).
                    self.publish(&mut pipe, user, erased_notice(user).as_bytes());
                }
                Step::Recs(user, seq, json) => {
                    let k = keys(&self.prefix, user);
                    pipe.cmd("HSET").arg(&k.profile).arg("recs").arg(json).arg("recs_seq").arg(seq).ignore();
                    if self.ttl > 0 {
                        pipe.expire(&k.profile, self.ttl as i64).ignore();
                    }
                    self.publish(&mut pipe, user, json);
                }
                Step::Publish(user, json) => self.publish(&mut pipe, user, json),
            }
        }
        pipe
    }

    /// Publishes on the user's update channel (`SPUBLISH` in a cluster: see `conn`).
    fn publish(&self, pipe: &mut redis::Pipeline, user: &UserId, payload: &[u8]) {
        pipe.cmd(self.pool.publish_command()).arg(updates_channel(&self.prefix, user)).arg(payload).ignore();
    }

    fn append_call(&self, pipe: &mut redis::Pipeline, user: &UserId, call: &UserCall) {
        let k = keys(&self.prefix, user);
        let context = call.context.and_then(|c| serde_json::to_string(c).ok()).unwrap_or_default();
        let (recs_seq, recs) = call.recs.unwrap_or((0, b""));
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(self.script.get_hash())
            .arg(5)
            .arg(&k.history)
            .arg(&k.legacy_ids)
            .arg(&k.digests)
            .arg(&k.suppressed)
            .arg(&k.profile)
            .arg(self.limits.history_len)
            .arg(self.limits.dedupe_window)
            .arg(self.limits.suppressed_len)
            .arg(self.ttl)
            .arg(context)
            .arg(recs)
            .arg(recs_seq)
            .arg(call.events.len());
        for interaction in &call.events {
            // The id itself goes along only for the check against a legacy set of ids.
            cmd.arg(&EventDigest::of(&interaction.event_id).0.to_be_bytes()[..])
                .arg(interaction.event_id.as_str())
                .arg(codec::encode(interaction));
        }
        for item in &call.suppressed {
            cmd.arg(item.as_str());
        }
        cmd.ignore();
    }

    /// Sends the batch as one pipeline, retrying with capped backoff until Redis accepts it.
    /// `failing` is this lane's part of the store's degraded state.
    async fn write_until_done(&self, batch: &[Write], failing: &mut bool) {
        let pipe = self.pipeline(batch);
        let mut delay = self.retry_initial;
        loop {
            match self.try_write(&pipe).await {
                Ok(()) => {
                    if std::mem::take(failing) && self.failing_lanes.fetch_sub(1, Ordering::Relaxed) == 1 {
                        tracing::info!("redis writes succeed again");
                    }
                    return;
                }
                Err(error) => {
                    self.metrics.store_errors.inc();
                    if !std::mem::replace(failing, true) && self.failing_lanes.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(error = %error, "redis writes failing; retrying with backoff, nothing is dropped");
                    }
                    actix_rt::time::sleep(delay).await;
                    delay = (delay * 2).min(self.retry_max);
                }
            }
        }
    }

    pub(super) async fn try_write(&self, pipe: &redis::Pipeline) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn append(user: &str, ids: &[&str]) -> Write {
        let interactions = ids.iter().map(|id| Interaction::view(id, "i", 1)).collect();
        let update = ProfileUpdate { user_id: UserId::from(user), interactions, context: None, suppressed: vec![] };
        Write::Append { update, done: oneshot::channel().0 }
    }

    fn recs(user: &str, seq: u64) -> Write {
        Write::Recs { user: UserId::from(user), seq, json: bytes::Bytes::from(format!("list {seq}")) }
    }

    fn ids(call: &UserCall) -> Vec<String> {
        call.events.iter().map(|i| i.event_id.as_str().to_owned()).collect()
    }

    #[test]
    fn a_users_appends_merge_into_one_call_until_an_erasure_and_carry_the_newest_list() {
        let batch = vec![
            recs("ann", 1),
            append("ann", &["a1", "a2"]),
            append("bob", &["b1"]),
            recs("ann", 2),
            append("ann", &["a3"]),
            recs("ann", 3),
            Write::Erase { user: UserId::from("ann"), done: oneshot::channel().0 },
            append("ann", &["a4"]),
            append("bob", &["b2"]),
        ];
        let (steps, calls) = Writer::plan(&batch);
        let shape: Vec<String> = steps
            .iter()
            .map(|step| match step {
                Step::Call(user, index) => format!("call {user} {index}"),
                Step::Erase(user) => format!("erase {user}"),
                Step::Recs(user, seq, _) => format!("recs {user} {seq}"),
                Step::Publish(user, json) => format!("publish {user} {}", String::from_utf8_lossy(json)),
            })
            .collect();
        assert_eq!(shape, ["call ann 0", "call bob 1", "publish ann list 3", "erase ann", "call ann 2"]);
        assert_eq!(ids(&calls[0]), ["a1", "a2", "a3"], "ann's appends before the erasure, in order");
        assert_eq!(calls[0].recs.map(|(seq, _)| seq), Some(3), "only the newest list is stored");
        assert_eq!(ids(&calls[1]), ["b1", "b2"]);
        assert_eq!(ids(&calls[2]), ["a4"], "an append after the erasure starts a new call");
        assert!(calls[2].recs.is_none());
    }
}
