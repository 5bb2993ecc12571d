//! Rate limits: a token bucket per client IP and one per credential (API key or stream token),
//! both optional (`limits.per_ip_per_sec`, `limits.per_key_per_sec`; 0 turns one off). A request
//! over either answers `429` with `Retry-After` and a JSON error; probes and scrapes
//! (`/healthz`, `/readyz`, `/metrics`) are never limited. Open connections are capped per IP and in
//! all ([`Connections`]), below the open-file limit. The middleware that applies them is in
//! `http::middleware`.
//!
//! Every distinct IP or credential gets a bucket, and anyone can invent credentials, so the
//! buckets are bounded ([`KeyedLimiter`]): buckets idle long enough to be full again are swept
//! away as requests pass, and past [`MAX_KEYS`] live buckets new keys share one overflow bucket.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::http::StatusCode;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::config::LimitsConfig;

/// The buckets, shared by every worker.
pub struct Limiters {
    /// Open streams per client IP, and the most allowed (0: any number).
    streams: std::sync::Arc<dashmap::DashMap<IpAddr, usize>>,
    max_streams: usize,
    per_ip: Option<KeyedLimiter<IpAddr>>,
    /// Keyed by a digest of the credential, so no secret sits in memory as a map key.
    per_key: Option<KeyedLimiter<[u8; 16]>>,
}

/// Live buckets per limiter (per IP, per credential) before new keys share an overflow bucket:
/// about 5 MB each at most.
pub const MAX_KEYS: usize = 100_000;

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate)))
}

/// Buckets in a map of at most `max` keys; a key that finds the map full is measured against
/// one shared overflow bucket, so an attacker inventing keys gets one key's quota in all (and
/// new honest clients are limited with them until the sweep frees room).
pub struct BoundedStore<K: Hash + Eq + Clone> {
    map: DashMapStateStore<K>,
    overflow: InMemoryState,
    max: usize,
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Checked then inserted without a lock: racing callers may pass `max` by a few keys.
        if self.map.len() >= self.max && !self.map.contains_key(key) {
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        self.map.measure_and_replace(key, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.map.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A keyed token bucket whose idle keys are evicted: every `sweep_every` (the time a drained
/// bucket takes to fill again, at least a second) the first request to pass drops the buckets
/// that are full again (indistinguishable from a new one) and shrinks the map.
pub struct KeyedLimiter<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: RateLimiter<K, BoundedStore<K>, C, NoOpMiddleware<C::Instant>>,
    origin: C::Instant,
    /// Nanoseconds from `origin` to the last sweep.
    last_sweep: AtomicU64,
    sweep_every: u64,
}

impl<K: Hash + Eq + Clone, C: Clock> KeyedLimiter<K, C> {
    pub fn new(quota: Quota, max_keys: usize, clock: C) -> Self {
        let refill = quota.burst_size_replenished_in();
        let sweep_every = refill.max(std::time::Duration::from_secs(1)).as_nanos().min(u64::MAX as u128) as u64;
        let origin = clock.now();
        let store =
            BoundedStore { map: DashMapStateStore::default(), overflow: InMemoryState::default(), max: max_keys };
        KeyedLimiter {
            limiter: RateLimiter::new(quota, store, clock),
            origin,
            last_sweep: AtomicU64::new(0),
            sweep_every,
        }
    }

    /// Takes a token from `key`'s bucket, sweeping first when a sweep is due.
    pub fn check(&self, key: &K) -> Result<(), NotUntil<C::Instant>> {
        self.sweep_if_due();
        self.limiter.check_key(key)
    }

    /// Live buckets (the overflow bucket not counted).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn sweep_if_due(&self) {
        let now = self.limiter.clock().now().duration_since(self.origin).as_u64();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.sweep_every {
            return;
        }
        // One caller sweeps; the others go on.
        if self.last_sweep.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}

impl Limiters {
    pub fn new(config: &LimitsConfig) -> Limiters {
        Limiters {
            streams: Default::default(),
            max_streams: config.streams_per_ip,
            per_ip: quota(config.per_ip_per_sec, config.per_ip_burst)
                .map(|q| KeyedLimiter::new(q, MAX_KEYS, DefaultClock::default())),
            per_key: quota(config.per_key_per_sec, config.per_key_burst)
                .map(|q| KeyedLimiter::new(q, MAX_KEYS, DefaultClock::default())),
        }
    }

    /// Live rate-limit buckets, per IP and per credential.
    pub fn keys(&self) -> (usize, usize) {
        (self.per_ip.as_ref().map_or(0, KeyedLimiter::len), self.per_key.as_ref().map_or(0, KeyedLimiter::len))
    }

    /// `Err(seconds to wait)` when the request is over a limit.
    pub fn check(&self, ip: Option<IpAddr>, credential: Option<&str>) -> Result<(), u64> {
        let wait = |not_until: governor::NotUntil<governor::clock::QuantaInstant>| {
            not_until.wait_time_from(DefaultClock::default().now()).as_secs_f64().ceil().max(1.0) as u64
        };
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip) {
            limiter.check(&ip).map_err(wait)?;
        }
        if let (Some(limiter), Some(credential)) = (&self.per_key, credential) {
            let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
            let key: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
            limiter.check(&key).map_err(wait)?;
        }
        Ok(())
    }
}

/// An open stream counted against its client IP; released when dropped.
pub struct StreamSlot {
    streams: std::sync::Arc<dashmap::DashMap<IpAddr, usize>>,
    ip: Option<IpAddr>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.streams.remove_if_mut(&ip, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
        }
    }
}

impl Limiters {
    /// A slot for one more stream from `ip`, or `429` when it holds `limits.streams_per_ip`.
    pub fn open_stream(&self, ip: Option<IpAddr>) -> Result<StreamSlot, ApiError> {
        let Some(ip) = ip.filter(|_| self.max_streams > 0) else {
            return Ok(StreamSlot { streams: self.streams.clone(), ip: None });
        };
        let mut open = self.streams.entry(ip).or_insert(0);
        if *open >= self.max_streams {
            return Err(ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!("this address already holds {} open streams (limits.streams_per_ip)", self.max_streams),
                )
            });
        }
        *open += 1;
        Ok(StreamSlot { streams: self.streams.clone(), ip: Some(ip) })
    }
}

/// Open connections, counted from accept to close, per client IP and in all. A connection is
/// ranked when it opens: one over `limits.connections_per_ip`, or past nine tenths of
/// `limits.max_connections`, has its requests refused (probes excepted) and is closed.
pub struct Connections {
    per_ip: std::sync::Arc<dashmap::DashMap<IpAddr, usize>>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max_per_ip: usize,
    /// Open connections past which only probes are served: the rest of `max` is their room.
    max_served: usize,
}

/// One open connection, kept in its connection data until it closes.
pub struct ConnectionSlot {
    per_ip: std::sync::Arc<dashmap::DashMap<IpAddr, usize>>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ip: Option<IpAddr>,
    refusal: Option<Refusal>,
}

/// Why a connection's requests are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    PerIp(usize),
    Total(usize),
}

impl Connections {
    /// Counts connections against `config`'s caps; `max` is the total (`limits.max_connections`
    /// or the default derived from the file-descriptor limit, see [`max_connections`]).
    pub fn new(config: &LimitsConfig, max: usize) -> Connections {
        Connections {
            per_ip: Default::default(),
            open: Default::default(),
            max_per_ip: config.connections_per_ip,
            max_served: max.saturating_sub((max / 10).max(1)),
        }
    }

    /// Counts a connection from `ip` that has just been accepted.
    pub fn open(&self, ip: Option<IpAddr>) -> ConnectionSlot {
        use std::sync::atomic::Ordering;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let from_ip = ip.map(|ip| {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            *count += 1;
            *count
        });
        let refusal = match from_ip {
            Some(n) if self.max_per_ip > 0 && n > self.max_per_ip => Some(Refusal::PerIp(self.max_per_ip)),
            _ if open > self.max_served => Some(Refusal::Total(self.max_served)),
            _ => None,
        };
        ConnectionSlot { per_ip: self.per_ip.clone(), open: self.open.clone(), ip, refusal }
    }
}

impl ConnectionSlot {
    /// The answer to every request but a probe on this connection, if it is over a cap.
    pub fn refusal(&self) -> Option<ApiError> {
        let (status, message) = match self.refusal? {
            Refusal::PerIp(max) => (
                StatusCode::TOO_MANY_REQUESTS,
                format!("this address already holds {max} open connections (limits.connections_per_ip)"),
            ),
            Refusal::Total(max) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the server holds {max} open connections, its share for requests (limits.max_connections)"),
            ),
        };
        Some(ApiError { retry_after: Some(1), ..ApiError::new(status, "too_many_connections", message) })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(ip) = self.ip {
            self.per_ip.remove_if_mut(&ip, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
        }
    }
}

/// Raises the soft limit on open files to the hard limit and returns it (`None` where it cannot
/// be read): every connection is a file descriptor.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    #[allow(clippy::unnecessary_cast)] // `rlim_t` is u64 here, not on every target
    Some(limit.rlim_cur as u64)
}

/// The total connection cap: `limits.max_connections`, or by default three quarters of the
/// open-file limit (the rest for the store, the bus, models and logs), so accepting pauses
/// before `accept` could fail with "too many open files".
pub fn max_connections(config: &LimitsConfig, open_files: Option<u64>) -> usize {
    match config.max_connections {
        0 => open_files.map_or(25_000, |n| usize::try_from(n / 4 * 3).unwrap_or(usize::MAX)).max(64),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: usize) -> LimitsConfig {
        LimitsConfig {
            per_ip_per_sec: 0,
            per_ip_burst: 0,
            per_key_per_sec: 0,
            per_key_burst: 0,
            streams_per_ip: 0,
            connections_per_ip: per_ip,
            max_connections: 0,
        }
    }

    #[test]
    fn connections_over_a_cap_are_refused_and_slots_come_back_when_they_close() {
        let connections = Connections::new(&limits(2), 100);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let first = [connections.open(Some(a)), connections.open(Some(a))];
        assert!(first.iter().all(|slot| slot.refusal().is_none()));
        let third = connections.open(Some(a));
        assert_eq!(third.refusal().map(|e| e.status.as_u16()), Some(429));
        assert!(connections.open(Some(b)).refusal().is_none(), "another address has its own share");
        drop((first, third));
        assert!(connections.open(Some(a)).refusal().is_none(), "closed connections free their slots");
        assert_eq!(connections.open.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(connections.per_ip.is_empty());

        // In all: the last tenth is kept for probes.
        let connections = Connections::new(&limits(0), 20);
        let held: Vec<_> = (0..18).map(|_| connections.open(Some(a))).collect();
        assert!(held.iter().all(|slot| slot.refusal().is_none()));
        assert_eq!(connections.open(Some(a)).refusal().map(|e| e.status.as_u16()), Some(503));
    }

    fn key(i: u32) -> [u8; 16] {
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&i.to_be_bytes());
        key
    }

    #[test]
    fn idle_rate_limit_keys_are_evicted_once_their_bucket_is_full_again() {
        let clock = governor::clock::FakeRelativeClock::default();
        let quota = quota(10, 20).expect("a quota");
        let limiter = KeyedLimiter::new(quota, MAX_KEYS, clock.clone());
        for i in 0..50_000 {
            assert!(limiter.check(&key(i)).is_ok(), "a new key has its burst");
        }
        assert_eq!(limiter.len(), 50_000);
        // 20 tokens at 10 a second: every bucket is full again after two seconds.
        clock.advance(std::time::Duration::from_millis(2_100));
        assert!(limiter.check(&key(u32::MAX)).is_ok());
        assert!(limiter.len() <= 1, "idle keys are swept: {} left", limiter.len());
        // A key still draining stays, and keeps its state.
        for _ in 0..20 {
            let _ = limiter.check(&key(7));
        }
        assert!(limiter.check(&key(7)).is_err(), "the burst is spent");
        clock.advance(std::time::Duration::from_millis(1_100));
        let _ = limiter.check(&key(8));
        assert!(!limiter.is_empty(), "a recently used bucket is kept");
    }

    #[test]
    fn past_the_key_cap_new_keys_share_one_bucket() {
        let clock = governor::clock::FakeRelativeClock::default();
        let limiter = KeyedLimiter::new(quota(1, 3).expect("a quota"), 100, clock);
        for i in 0..100 {
            assert!(limiter.check(&key(i)).is_ok());
        }
        let over: Vec<bool> = (100..110).map(|i| limiter.check(&key(i)).is_ok()).collect();
        assert_eq!(limiter.len(), 100, "no bucket past the cap");
        assert_eq!(over.iter().filter(|ok| **ok).count(), 3, "new keys share one burst of 3: {over:?}");
        assert!(limiter.check(&key(5)).is_ok(), "keys already in have their own bucket");
    }

    #[test]
    fn stream_counts_leave_no_entry_behind() {
        let limiters = Limiters::new(&LimitsConfig { streams_per_ip: 2, ..limits(0) });
        let ips: Vec<IpAddr> = (0..100u8).map(|i| IpAddr::from([10, 0, 1, i])).collect();
        let slots: Vec<_> = ips.iter().map(|ip| limiters.open_stream(Some(*ip)).expect("a slot")).collect();
        assert_eq!(limiters.streams.len(), 100);
        drop(slots);
        assert!(limiters.streams.is_empty(), "closed streams leave no zero counts");
    }

    #[test]
    fn the_default_total_cap_leaves_a_quarter_of_the_open_files() {
        assert_eq!(max_connections(&limits(0), Some(20_000)), 15_000);
        assert_eq!(max_connections(&LimitsConfig { max_connections: 500, ..limits(0) }, Some(20_000)), 500);
        assert_eq!(max_connections(&limits(0), Some(16)), 64);
    }
}
