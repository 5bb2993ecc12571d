//! Rate limits: a token bucket per client IP and one per credential (API key or stream token),
//! both optional (`limits.per_ip_per_sec`, `limits.per_key_per_sec`; 0 turns one off). A request
//! over either answers `429` with `Retry-After` and a JSON error; probes and scrapes
//! (`/healthz`, `/readyz`, `/metrics`) are never limited. The middleware that applies them is in
//! `http::middleware`.

use std::net::IpAddr;
use std::num::NonZeroU32;

use actix_web::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::config::LimitsConfig;

/// The buckets, shared by every worker.
pub struct Limiters {
    /// Open streams per client IP, and the most allowed (0: any number).
    streams: std::sync::Arc<dashmap::DashMap<IpAddr, usize>>,
    max_streams: usize,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Keyed by a digest of the credential, so no secret sits in memory as a map key.
    per_key: Option<DefaultKeyedRateLimiter<[u8; 16]>>,
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate)))
}

impl Limiters {
    pub fn new(config: &LimitsConfig) -> Limiters {
        Limiters {
            streams: Default::default(),
            max_streams: config.streams_per_ip,
            per_ip: quota(config.per_ip_per_sec, config.per_ip_burst).map(RateLimiter::keyed),
            per_key: quota(config.per_key_per_sec, config.per_key_burst).map(RateLimiter::keyed),
        }
    }

    /// `Err(seconds to wait)` when the request is over a limit.
    pub fn check(&self, ip: Option<IpAddr>, credential: Option<&str>) -> Result<(), u64> {
        let wait = |not_until: governor::NotUntil<governor::clock::QuantaInstant>| {
            not_until.wait_time_from(DefaultClock::default().now()).as_secs_f64().ceil().max(1.0) as u64
        };
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip) {
            limiter.check_key(&ip).map_err(wait)?;
        }
        if let (Some(limiter), Some(credential)) = (&self.per_key, credential) {
            let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
            let key: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
            limiter.check_key(&key).map_err(wait)?;
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
