//! Which users some instance watches (production mode): the owner of a user stores and publishes
//! the user's lists only while one does (see the store's module docs, "Lists nobody watches").
//!
//! Every instance with a subscriber of a user announces it on the one channel
//! `<prefix>:watch` (`{"watch": [users], "ttl_ms": n}`): at once when a subscriber arrives, then
//! again every third of `redis.watch_ttl_secs` while any subscriber stays. Every instance listens
//! and keeps the users announced within the last TTL in this table. An instance cannot know what
//! was announced before it listened, so for one TTL after it starts listening (its start, and
//! every reconnection of the fan-out) it counts every user as watched.
//!
//! One channel rather than a key per user: the owner learns of a watch without a read on its hot
//! path or when a session starts, and without holding a subscription per user; a watch costs
//! Redis one `PUBLISH` per re-announcement round per ~1,000 watched users (one message names
//! them all).

use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::event::UserId;

/// Most users named in one announcement.
pub(super) const ANNOUNCE_CHUNK: usize = 1000;

/// The channel every instance announces its watched users on.
pub(super) fn watch_channel(prefix: &str) -> String {
    format!("{prefix}:watch")
}

/// An announcement: these users have subscribers on the announcing instance for `ttl_ms`.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Announcement {
    pub(super) watch: Vec<UserId>,
    pub(super) ttl_ms: u64,
}

/// The users announced lately, as this instance heard them (see the module docs).
pub struct WatchTable {
    /// `redis.watch_ttl_secs`; zero: the feature is off and every user counts as watched.
    ttl: Duration,
    /// When each announced user's newest announcement lapses.
    until: DashMap<UserId, Instant, foldhash::fast::RandomState>,
    /// Until then every user counts as watched (announcements made before this instance
    /// listened are unknown to it); `None` before it first listens.
    blind_until: Mutex<Option<Instant>>,
}

impl WatchTable {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, until: DashMap::default(), blind_until: Mutex::new(None) }
    }

    /// Whether the feature is on (`redis.watch_ttl_secs` > 0).
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The re-announcement period: a third of the TTL, so one lost announcement never lets a
    /// watch lapse.
    pub(super) fn period(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether some instance announced `user` within the TTL (always, while this instance may
    /// have missed announcements, and when the feature is off).
    pub fn watched(&self, user: &UserId) -> bool {
        self.watched_at(user, Instant::now())
    }

    fn watched_at(&self, user: &UserId, now: Instant) -> bool {
        if !self.enabled() {
            return true;
        }
        self.blind_at(now) || self.until.get(user).is_some_and(|until| now < *until)
    }

    /// Whether an announcement of `user` is current, as heard (never while the feature is off;
    /// the blind time after listening does not count: only what was heard).
    pub fn announced(&self, user: &UserId) -> bool {
        self.announced_at(user, Instant::now())
    }

    fn announced_at(&self, user: &UserId, now: Instant) -> bool {
        self.enabled() && self.until.get(user).is_some_and(|until| now < *until)
    }

    fn blind_at(&self, now: Instant) -> bool {
        self.blind_until.lock().is_none_or(|until| now < until)
    }

    /// Records an announcement of `user` lasting `ttl`; true when the user was not watched
    /// before (as far as this table knew; never while every user counts as watched, when every
    /// list was stored anyway: a restarted instance does not push a fresh list per watched user).
    pub(super) fn heard(&self, user: UserId, ttl: Duration) -> bool {
        self.heard_at(user, ttl, Instant::now())
    }

    fn heard_at(&self, user: UserId, ttl: Duration, now: Instant) -> bool {
        let until = now + ttl.min(Duration::from_secs(crate::config::MAX_WATCH_TTL_SECS));
        let new = match self.until.insert(user, until) {
            Some(previous) => previous <= now,
            None => true,
        };
        new && !self.blind_at(now)
    }

    /// This instance (re)starts listening: it may have missed announcements, so every user
    /// counts as watched for one TTL.
    pub(super) fn listening(&self) {
        self.listening_at(Instant::now());
    }

    fn listening_at(&self, now: Instant) {
        *self.blind_until.lock() = Some(now + self.ttl);
    }

    /// Forgets lapsed announcements (called every announcement round).
    pub(super) fn expire(&self) {
        self.expire_at(Instant::now());
    }

    fn expire_at(&self, now: Instant) {
        self.until.retain(|_, until| *until > now);
    }

    /// Users whose announcement is current.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_counts_as_watched_until_one_ttl_after_listening_then_only_announced_ones() {
        let table = WatchTable::new(Duration::from_secs(30));
        let (ann, bob) = (UserId::from("ann"), UserId::from("bob"));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(table.watched_at(&bob, at(100)), "before listening nothing is known: everyone counts as watched");
        table.listening_at(t0);
        assert!(table.watched_at(&bob, at(29)), "within one TTL of listening, announcements may have been missed");
        assert!(!table.heard_at(ann.clone(), Duration::from_secs(60), t0), "every list is stored meanwhile: not new");
        assert!(!table.heard_at(ann.clone(), Duration::from_secs(60), at(1)), "a re-announcement is not new");
        assert!(table.watched_at(&ann, at(31)));
        assert!(!table.watched_at(&bob, at(31)), "not announced: not watched once the blind TTL is over");
        assert!(table.heard_at(bob.clone(), Duration::from_secs(1), at(31)));
        assert!(table.watched_at(&bob, at(31)));
        assert!(!table.watched_at(&bob, at(33)), "an announcement lapses after its TTL");
        table.expire_at(at(33));
        assert_eq!(table.len(), 1, "the lapsed one is forgotten");
        assert!(table.heard_at(bob, Duration::from_secs(1), at(40)), "a lapsed watch announced again is new");
        assert!(!table.watched_at(&ann, at(62)), "ann's lapses too");
    }

    #[test]
    fn with_a_zero_ttl_every_user_is_watched() {
        let table = WatchTable::new(Duration::ZERO);
        table.listening();
        assert!(!table.enabled());
        assert!(table.watched(&UserId::from("anyone")));
        assert!(!table.announced(&UserId::from("anyone")), "watched, but nobody is known to be");
    }

    #[test]
    fn announced_means_heard_not_merely_possibly_missed() {
        let table = WatchTable::new(Duration::from_secs(30));
        let (ann, bob) = (UserId::from("ann"), UserId::from("bob"));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        table.listening_at(t0);
        assert!(table.watched_at(&bob, at(1)) && !table.announced_at(&bob, at(1)), "the blind TTL is no announcement");
        table.heard_at(ann.clone(), Duration::from_secs(30), at(2));
        assert!(table.announced_at(&ann, at(31)));
        assert!(!table.announced_at(&ann, at(32)), "an announcement lapses after its TTL");
    }
}
