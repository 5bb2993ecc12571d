//! The leader's lease in Redis, with a fencing token.
//!
//! Two keys share the hash tag `{cluster}` (one slot on a Redis Cluster): `<prefix>:{cluster}:leader`
//! holds `<epoch>\n<instance_id>\n<advertise_url>` with a TTL of `cluster.lease_ttl_ms`, and
//! `<prefix>:{cluster}:epoch` counts leaderships. Taking the lease is one script: when the leader
//! key is absent, `INCR` the epoch and `SET` the key with its TTL, so no leader ever holds the lease
//! without a new epoch (a `SET NX` then an `INCR` in two round trips could lose the second). When
//! the key already names this instance (its own earlier try was taken in Redis but its answer came
//! too late, or this instance restarted within the TTL), the script extends it and hands it back:
//! nobody else can have held it in between, so the epoch still fences, and the instance does not
//! leave the loop leaderless for a TTL (followers would see a leader that does not know it leads). The
//! leader renews with a compare-and-extend script (the `PEXPIRE` only if the value is still its
//! own); a renewal refused makes it step down at once, one that fails or goes unanswered is tried
//! again while a third of the TTL is left (`renewal_decision` in the cluster module). It also
//! counts itself leader only until its last renewal was *sent* plus the TTL, so a renewal stuck in
//! the network never stretches its reign past the key's.
//!
//! Why Redis and not a Kafka consumer group: the failover time is one TTL, not a session timeout
//! plus a rebalance; the epoch is an explicit fencing token that every control record carries;
//! and the loop's leadership does not move with the ingest group's rebalances.

use std::time::Duration;

use deadpool_redis::redis::{self, Script};

use crate::config::RedisConfig;
use crate::store::redis::conn::Redis;

const ACQUIRE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder then
  local epoch, rest = string.match(holder, '^(%d+)\n(.*)$')
  if rest == ARGV[1] .. '\n' .. ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {1, holder}
  end
  return {0, holder}
end
local epoch = redis.call('INCR', KEYS[2])
local value = epoch .. '\n' .. ARGV[1] .. '\n' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return {1, value}
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The holder of the lease, as its value names it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub epoch: u64,
    pub instance_id: String,
    pub advertise_url: String,
}

impl Holder {
    fn parse(value: &str) -> Option<Holder> {
        let mut parts = value.splitn(3, '\n');
        let epoch = parts.next()?.parse().ok()?;
        let instance_id = parts.next()?.to_owned();
        let advertise_url = parts.next().unwrap_or_default().to_owned();
        Some(Holder { epoch, instance_id, advertise_url })
    }

    fn value(&self) -> String {
        format!("{}\n{}\n{}", self.epoch, self.instance_id, self.advertise_url)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the lease holds an unreadable value")]
    Unreadable,
}

/// What a call to [`Lease::acquire`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired {
    /// This instance leads now.
    Taken(Holder),
    /// Another instance (or this one, under an older value) holds it.
    Held(Holder),
}

/// The lease's keys and this instance's claim to them. Commands go the store's way to Redis (one
/// server's pool, or the cluster connection); connections are made on first use, so Redis need
/// not be up when the server starts.
pub struct Lease {
    redis: Result<Redis, String>,
    leader_key: String,
    epoch_key: String,
    instance_id: String,
    advertise_url: String,
    ttl: Duration,
}

impl Lease {
    pub fn new(config: &RedisConfig, instance_id: String, advertise_url: String, ttl: Duration) -> Self {
        Self {
            redis: Redis::new(config),
            leader_key: format!("{}:{{cluster}}:leader", config.key_prefix),
            epoch_key: format!("{}:{{cluster}}:epoch", config.key_prefix),
            instance_id,
            advertise_url,
            ttl,
        }
    }

    pub fn leader_key(&self) -> &str {
        &self.leader_key
    }

    /// How long a renewal or a release may take: a third of the TTL, so a leader whose Redis is
    /// slow steps down well before its key expires.
    fn answer_within(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    async fn run<T: redis::FromRedisValue>(
        &mut self,
        invocation: redis::ScriptInvocation<'_>,
        within: Duration,
    ) -> Result<T, LeaseError> {
        let redis = self.redis.as_ref().map_err(|e| LeaseError::Redis(e.clone()))?;
        let call = async {
            let mut conn = redis.get().await.map_err(LeaseError::Redis)?;
            invocation.invoke_async(&mut conn).await.map_err(|e| LeaseError::Redis(e.to_string()))
        };
        tokio::time::timeout(within, call).await.unwrap_or(Err(LeaseError::Timeout(within)))
    }

    /// Takes the lease if nobody holds it (or takes back its own); says who does otherwise. The
    /// answer may take up to the TTL: a taken lease counts from when the call was sent, so a late
    /// answer only shortens the claim, and cutting the call short on a loaded machine (connecting
    /// included) left the instance asking again and again without ever hearing back.
    pub async fn acquire(&mut self) -> Result<Acquired, LeaseError> {
        let script = Script::new(ACQUIRE);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.leader_key)
            .key(&self.epoch_key)
            .arg(&self.instance_id)
            .arg(&self.advertise_url)
            .arg(self.ttl.as_millis() as u64);
        let (taken, value): (i64, String) = self.run(invocation, self.ttl).await?;
        let holder = Holder::parse(&value).ok_or(LeaseError::Unreadable)?;
        Ok(if taken == 1 { Acquired::Taken(holder) } else { Acquired::Held(holder) })
    }

    /// Extends the lease `holder` took; false when it is no longer this instance's.
    pub async fn renew(&mut self, holder: &Holder) -> Result<bool, LeaseError> {
        let script = Script::new(RENEW);
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.leader_key).arg(holder.value()).arg(self.ttl.as_millis() as u64);
        let renewed: i64 = self.run(invocation, self.answer_within()).await?;
        Ok(renewed == 1)
    }

    /// Gives the lease up (a graceful stop), so another instance takes it at its next try.
    pub async fn release(&mut self, holder: &Holder) -> Result<bool, LeaseError> {
        let script = Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.leader_key).arg(holder.value());
        let released: i64 = self.run(invocation, self.answer_within()).await?;
        Ok(released == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_round_trips_through_the_lease_value() {
        let holder = Holder { epoch: 12, instance_id: "host-1".into(), advertise_url: "http://h:8080".into() };
        assert_eq!(Holder::parse(&holder.value()), Some(holder));
        let bare = Holder { epoch: 1, instance_id: "x".into(), advertise_url: String::new() };
        assert_eq!(Holder::parse(&bare.value()), Some(bare));
        assert_eq!(Holder::parse("not a number\nx\n"), None);
    }
}
