//! The Redis store's writers: `redis.write_pipelines` lanes, each a task that takes every write
//! queued for it and sends them as one pipeline (one round trip for many users), retrying the same
//! pipeline with capped exponential backoff until Redis answers (see the store's module docs).
//!
//! Users are spread over the lanes by a hash of their id, so one user's writes always go through
//! the same lane, in the order of the calls, while the lanes keep several pipelines in flight on
//! the pool's multiplexed connections. Within a pipeline the appends of one user become one script
//! call (all their events, in order), which also stores the user's newest pushed list; a list
//! with no append of its user in the pipeline is a call of its own (no events), and up to 32
//! users share one script call.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use tokio::sync::{mpsc, oneshot};

use super::conn::Redis;
use super::fanout::erased_notice;
use super::keys::{keys, updates_channel};
use crate::event::{Context, ItemId, UserId};
use crate::store::{codec, consumed_secs, EventDigest, Interaction, ProfileLimits, ProfileUpdate};
use crate::telemetry::Metrics;

/// Users in one script call at most (one Redis server; in a cluster a call holds one user, since
/// a script may only touch keys of one slot). The call's fixed cost (parsing the `EVALSHA`,
/// building Lua's `KEYS` and `ARGV`) is paid once for all of them; a call of 32 one-event users
/// kept Redis busy for 0.5-0.75 ms on a loaded 2-core machine (docs/performance.md).
const USERS_PER_CALL: usize = 32;

/// Keys a user takes in a script call (see the script).
const KEYS_PER_USER: usize = 7;

pub(super) const APPEND_SCRIPT: &str = r#"
-- Appends the new interactions of one or more users (one Redis server; one user in a cluster).
-- KEYS, 7 per user: history list, profile string, suppressed list, three forms written before
--       that are read until they expire (the profile hash, the ids in a sorted set, the digests
--       in a string), and the consumed items (a sorted set: item, last time in seconds).
-- ARGV: history_len, dedupe_window, suppressed_len, ttl_secs, consumed_max, then per user:
--       context ('' = unchanged), list ('' = unchanged), n, m, then n quintuples (8-byte digest
--       of the event id, event id, encoded interaction, the time in seconds if its item counts as
--       consumed ('' = it does not), its item id), then m suppressed item ids.
-- The profile string (codec::decode_profile reads it): byte 2 (the form), a flags byte (bit 0:
-- the older set of ids may still exist), the lengths of the context and of the list (2 bytes
-- each, big endian), the context (JSON), the list (stored form), then the de-duplication window:
-- the digests of the newest event ids, 8 bytes each, oldest first. A user costs one GET and one
-- SET of it, an RPUSH and an EXPIRE of the history when events are new (and an LTRIM once the
-- history is full), and a ZADD, a ZCARD and an EXPIRE of the consumed set when new events count
-- (and a ZREMRANGEBYRANK once it is full: the items consumed longest ago go, ties by item).
local hlen, wlen, slen, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cmax = tonumber(ARGV[5])
local function known(seen, digest)
  local from = 1
  while true do
    local at = string.find(seen, digest, from, true)
    if not at then return false end
    if at % 8 == 1 then return true end
    from = at + 1
  end
end
local function u16(s, at) return string.byte(s, at) * 256 + string.byte(s, at + 1) end
local function be16(n) return string.char(math.floor(n / 256), n % 256) end
local a, applied = 6, 0
for u = 0, #KEYS / 7 - 1 do
  local h, q, s, p, ids, e = KEYS[7 * u + 1], KEYS[7 * u + 2], KEYS[7 * u + 3], KEYS[7 * u + 4], KEYS[7 * u + 5], KEYS[7 * u + 6]
  local c = KEYS[7 * u + 7]
  local context, list, n, m = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  -- Longer than the string's lengths can say: left unchanged (a context is a few dozen bytes,
  -- a list of 10 items about 130).
  if #context > 65535 then context = '' end
  if #list > 65535 then list = '' end
  local stored = redis.call('GET', q)
  local seen, old_context, old_list, legacy, moved = '', '', '', false, false
  if stored then
    local clen, llen = u16(stored, 3), u16(stored, 5)
    old_context = string.sub(stored, 7, 6 + clen)
    old_list = string.sub(stored, 7 + clen, 6 + clen + llen)
    seen = string.sub(stored, 7 + clen + llen)
    if string.byte(stored, 2) % 2 == 1 then legacy = redis.call('EXISTS', ids) == 1 end
  elseif redis.call('EXISTS', p, e, ids) > 0 then
    -- The user's first write in this form: the older forms move into it. The hash's window has a
    -- marker byte in front while the set of ids exists; the digest string is older than it.
    local old = redis.call('HMGET', p, 'e', 'context', 'recs')
    local window = old[1] or ''
    if #window % 8 == 1 then window = string.sub(window, 2) end
    seen = (redis.call('GET', e) or '') .. window
    old_context, old_list = old[2] or '', old[3] or ''
    legacy, moved = redis.call('EXISTS', ids) == 1, true
  end
  -- The new digests are joined to the window once per user: appending each to the window would
  -- copy the whole window (8 KB when full) per event.
  -- consumed: the latest time of each item the new events consumed.
  local entries, fresh, added, consumed, items = {}, {}, {}, {}, {}
  for i = 1, n do
    local digest = ARGV[a]
    if not fresh[digest] and not known(seen, digest) and not (legacy and redis.call('ZSCORE', ids, ARGV[a + 1])) then
      fresh[digest] = true
      added[#added + 1] = digest
      entries[#entries + 1] = ARGV[a + 2]
      if ARGV[a + 3] ~= '' and cmax > 0 then
        local item, at = ARGV[a + 4], tonumber(ARGV[a + 3])
        if not consumed[item] then items[#items + 1] = item end
        if not consumed[item] or consumed[item] < at then consumed[item] = at end
      end
    end
    a = a + 5
  end
  if #items > 0 then
    local zadd = {}
    for _, item in ipairs(items) do
      zadd[#zadd + 1] = consumed[item]
      zadd[#zadd + 1] = item
    end
    -- GT: an item consumed again keeps its latest time (a replay never moves it back).
    for from = 1, #zadd, 1000 do
      redis.call('ZADD', c, 'GT', unpack(zadd, from, math.min(from + 999, #zadd)))
    end
    local card = redis.call('ZCARD', c)
    if card > cmax then redis.call('ZREMRANGEBYRANK', c, 0, card - cmax - 1) end
    if ttl > 0 then redis.call('EXPIRE', c, ttl) end
  end
  if #entries > 0 then
    seen = seen .. table.concat(added)
    applied = applied + #entries
    local len = 0
    -- Lua passes at most a few thousand values to one call.
    for from = 1, #entries, 1000 do
      len = redis.call('RPUSH', h, unpack(entries, from, math.min(from + 999, #entries)))
    end
    if len > hlen then redis.call('LTRIM', h, -hlen, -1) end
    if ttl > 0 then redis.call('EXPIRE', h, ttl) end
    if wlen < 1 then seen = '' elseif #seen > 8 * wlen then seen = string.sub(seen, -8 * wlen) end
  end
  if m > 0 then
    for j = a, a + m - 1 do
      redis.call('LREM', s, 0, ARGV[j])
      redis.call('RPUSH', s, ARGV[j])
    end
    redis.call('LTRIM', s, -slen, -1)
    if ttl > 0 then redis.call('EXPIRE', s, ttl) end
    a = a + m
  end
  if #entries > 0 or context ~= '' or list ~= '' or moved then
    if context ~= '' then old_context = context end
    if list ~= '' then old_list = list end
    local value = string.char(2, legacy and 1 or 0) .. be16(#old_context) .. be16(#old_list) .. old_context .. old_list .. seen
    if ttl > 0 then redis.call('SET', q, value, 'EX', ttl) else redis.call('SET', q, value) end
    if moved then redis.call('DEL', p, e) end
  end
end
return applied
"#;

/// A write queued for a lane.
pub(super) enum Write {
    Append {
        update: ProfileUpdate,
        done: oneshot::Sender<()>,
    },
    Recs {
        user: UserId,
        seq: u64,
        /// The list as published (JSON).
        json: bytes::Bytes,
        /// The list as stored (`codec::encode_list`).
        stored: Vec<u8>,
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

/// The appends of one user in one pipeline, merged into one script call (in call order), with
/// the user's newest list.
struct UserCall<'a> {
    user: &'a UserId,
    events: Vec<&'a Interaction>,
    suppressed: Vec<&'a ItemId>,
    /// The newest context of the merged appends.
    context: Option<&'a Context>,
    /// The user's newest list in the pipeline (stored form).
    recs: Option<&'a [u8]>,
}

/// What a pipeline does for one user, in order: a merged call sits where the user's first append
/// (or list) was.
enum Step<'a> {
    Call(&'a UserId, usize),
    Erase(&'a UserId),
    /// The broadcast of a list the user's merged call stores.
    Publish(&'a UserId, &'a [u8]),
}

impl Step<'_> {
    fn user(&self) -> &UserId {
        match self {
            Step::Call(user, _) | Step::Erase(user) | Step::Publish(user, _) => user,
        }
    }
}

/// What the pipeline sends: script calls for several users, and the other steps.
enum Command<'a> {
    /// One script call for these users' merged calls (indices into the plan's calls).
    Calls(Vec<usize>),
    Step(Step<'a>),
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

    /// Plans the batch: one call per user for consecutive appends and lists (an erasure closes the
    /// user's call, so writes after it start a new one), and only the newest list of each user
    /// (the older ones are already stale, as they would be for a slow subscriber).
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
        // The user's open call, or a new one where this write is.
        fn call_of<'a>(
            user: &'a UserId,
            open: &mut HashMap<&'a UserId, usize>,
            steps: &mut Vec<Step<'a>>,
            calls: &mut Vec<UserCall<'a>>,
        ) -> usize {
            *open.entry(user).or_insert_with(|| {
                calls.push(UserCall { user, events: Vec::new(), suppressed: Vec::new(), context: None, recs: None });
                steps.push(Step::Call(user, calls.len() - 1));
                calls.len() - 1
            })
        }
        for write in batch {
            match write {
                Write::Append { update, .. } => {
                    let index = call_of(&update.user_id, &mut open, &mut steps, &mut calls);
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
                Write::Recs { user, json, stored, .. } => {
                    let index = call_of(user, &mut open, &mut steps, &mut calls);
                    calls[index].recs = Some(stored.as_slice());
                    steps.push(Step::Publish(user, json.as_ref()));
                }
            }
        }
        (steps, calls)
    }

    /// Puts the merged calls of up to `per_call` users into one script call. Only the order of
    /// each user's own steps matters (users share no key or channel), so a user's steps after
    /// its call wait until the call is sent, and a user with such a step waiting starts a new
    /// call; other users' steps go out at once.
    fn group(steps: Vec<Step<'_>>, per_call: usize) -> Vec<Command<'_>> {
        let mut out = Vec::with_capacity(steps.len());
        let mut group: Vec<usize> = Vec::new();
        let mut waiting: Vec<Step> = Vec::new();
        let mut touched: HashSet<&UserId> = HashSet::new();
        fn flush_into<'a>(
            out: &mut Vec<Command<'a>>,
            group: &mut Vec<usize>,
            waiting: &mut Vec<Step<'a>>,
            touched: &mut HashSet<&'a UserId>,
        ) {
            if !group.is_empty() {
                out.push(Command::Calls(std::mem::take(group)));
            }
            out.extend(waiting.drain(..).map(Command::Step));
            touched.clear();
        }
        for step in steps {
            match step {
                Step::Call(user, index) => {
                    if touched.contains(user) || group.len() >= per_call {
                        flush_into(&mut out, &mut group, &mut waiting, &mut touched);
                    }
                    touched.insert(user);
                    group.push(index);
                }
                step if touched.contains(step.user()) => waiting.push(step),
                step => out.push(Command::Step(step)),
            }
        }
        flush_into(&mut out, &mut group, &mut waiting, &mut touched);
        out
    }

    pub(super) fn pipeline(&self, batch: &[Write]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let (steps, calls) = Self::plan(batch);
        // A script may only touch keys of one slot in a cluster.
        let per_call = if self.pool.is_cluster() { 1 } else { USERS_PER_CALL };
        for command in Self::group(steps, per_call) {
            match command {
                Command::Calls(indices) => self.append_call(&mut pipe, &calls, &indices),
                Command::Step(Step::Call(_, index)) => self.append_call(&mut pipe, &calls, &[index]),
                Command::Step(Step::Erase(user)) => {
                    pipe.del(&keys(&self.prefix, user).all()).ignore();
                    // Every instance with a stream of the user closes it (see RedisFanout).
                    self.publish(&mut pipe, user, erased_notice(user).as_bytes());
                }
                Command::Step(Step::Publish(user, json)) => self.publish(&mut pipe, user, json),
            }
        }
        pipe
    }

    /// Publishes on the user's update channel (`SPUBLISH` in a cluster: see `conn`).
    fn publish(&self, pipe: &mut redis::Pipeline, user: &UserId, payload: &[u8]) {
        pipe.cmd(self.pool.publish_command()).arg(updates_channel(&self.prefix, user)).arg(payload).ignore();
    }

    /// One script call for the merged calls `indices` of `calls` (see `APPEND_SCRIPT`).
    fn append_call(&self, pipe: &mut redis::Pipeline, calls: &[UserCall], indices: &[usize]) {
        let cmd = pipe.cmd("EVALSHA").arg(self.script.get_hash()).arg(KEYS_PER_USER * indices.len());
        for &index in indices {
            let k = keys(&self.prefix, calls[index].user);
            cmd.arg(&k.history)
                .arg(&k.profile)
                .arg(&k.suppressed)
                .arg(&k.legacy_profile)
                .arg(&k.legacy_ids)
                .arg(&k.digests)
                .arg(&k.consumed);
        }
        cmd.arg(self.limits.history_len)
            .arg(self.limits.dedupe_window)
            .arg(self.limits.suppressed_len)
            .arg(self.ttl)
            .arg(self.limits.consumed_max);
        for &index in indices {
            let call = &calls[index];
            let context = call.context.and_then(|c| serde_json::to_string(c).ok()).unwrap_or_default();
            cmd.arg(context).arg(call.recs.unwrap_or_default()).arg(call.events.len()).arg(call.suppressed.len());
            for interaction in &call.events {
                // The id itself goes along only for the check against a legacy set of ids.
                cmd.arg(&EventDigest::of(&interaction.event_id).0.to_be_bytes()[..])
                    .arg(&*interaction.event_id.as_str())
                    .arg(codec::encode(interaction));
                // The item again, as the consumed set's member: the script does not decode entries.
                if self.limits.consumes(interaction) {
                    cmd.arg(consumed_secs(interaction.timestamp)).arg(interaction.item_id.as_str());
                } else {
                    cmd.arg("").arg("");
                }
            }
            for item in &call.suppressed {
                cmd.arg(item.as_str());
            }
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
        Write::Recs {
            user: UserId::from(user),
            seq,
            json: bytes::Bytes::from(format!("list {seq}")),
            stored: format!("stored {seq}").into_bytes(),
        }
    }

    fn describe(step: &Step) -> String {
        match step {
            Step::Call(user, index) => format!("call {user} {index}"),
            Step::Erase(user) => format!("erase {user}"),
            Step::Publish(user, json) => format!("publish {user} {}", String::from_utf8_lossy(json)),
        }
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
        let shape: Vec<String> = steps.iter().map(describe).collect();
        assert_eq!(shape, ["call ann 0", "call bob 1", "publish ann list 3", "erase ann", "call ann 2"]);
        assert_eq!(ids(&calls[0]), ["a1", "a2", "a3"], "ann's appends before the erasure, in order");
        assert_eq!(calls[0].recs, Some(&b"stored 3"[..]), "only the newest list is stored");
        assert_eq!(ids(&calls[1]), ["b1", "b2"]);
        assert_eq!(ids(&calls[2]), ["a4"], "an append after the erasure starts a new call");
        assert!(calls[2].recs.is_none());
    }

    #[test]
    fn calls_of_many_users_share_a_script_call_and_each_users_steps_keep_their_order() {
        let batch = vec![
            append("ann", &["a1"]),
            recs("ann", 1),
            append("bob", &["b1"]),
            recs("bob", 1),
            recs("cy", 2),
            Write::Erase { user: UserId::from("ann"), done: oneshot::channel().0 },
            append("ann", &["a2"]),
            append("dan", &["d1"]),
            append("eve", &["e1"]),
        ];
        let (steps, calls) = Writer::plan(&batch);
        let shape = |commands: Vec<Command>| -> Vec<String> {
            commands
                .iter()
                .map(|command| match command {
                    Command::Calls(indices) => {
                        let users: Vec<&str> = indices.iter().map(|&i| calls[i].user.as_str()).collect();
                        format!("calls {}", users.join(" "))
                    }
                    Command::Step(step) => describe(step),
                })
                .collect()
        };
        // cy's list alone is a call like an append; each publish waits for its user's call; ann's
        // append after the erasure starts the next call, after the erasure.
        assert_eq!(
            shape(Writer::group(steps, 32)),
            [
                "calls ann bob cy",
                "publish ann list 1",
                "publish bob list 1",
                "publish cy list 2",
                "erase ann",
                "calls ann dan eve"
            ]
        );
        assert_eq!(calls[2].recs, Some(&b"stored 2"[..]), "cy's list, stored by its call");
        assert!(calls[2].events.is_empty());
        let (steps, _) = Writer::plan(&batch);
        assert_eq!(
            shape(Writer::group(steps, 1)),
            [
                "calls ann",
                "publish ann list 1",
                "calls bob",
                "publish bob list 1",
                "erase ann",
                "calls cy",
                "publish cy list 2",
                "calls ann",
                "calls dan",
                "calls eve"
            ],
            "one user a call (a cluster)"
        );
    }
}
