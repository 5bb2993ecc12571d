//! Cold-start lists shown to users without a session, kept for the session that starts later
//! so a click on one is attributed (see [`ColdLists`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::event::UserId;
use crate::recs::RecUpdate;

/// Users whose cold-start list [`ColdLists`] keeps by default (a list is about 1-2 KB).
pub const COLD_LISTS_KEPT: usize = 10_000;

/// Cold-start lists shown to users the process keeps no state for (a `GET` before their first
/// event starts no session), remembered so that the session their first event starts can
/// attribute a click on one: without this, the first click of every new user would count as
/// organic and the cold-start list's impression would never take its click. Bounded: past
/// `capacity` users the oldest list is forgotten (its click then counts as organic).
pub struct ColdLists {
    capacity: usize,
    inner: Mutex<ColdInner>,
}

#[derive(Default)]
struct ColdInner {
    seq: u64,
    by_user: HashMap<UserId, (u64, Instant, Arc<RecUpdate>)>,
    order: VecDeque<(u64, UserId)>,
}

impl ColdLists {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, inner: Mutex::new(ColdInner::default()) }
    }

    /// Remembers the first `k` items of the list shown to `user` (replacing an older one of
    /// theirs), without its serialised forms.
    pub fn remember(&self, user: &UserId, update: &RecUpdate, k: usize) {
        if self.capacity == 0 || !update.is_shown() {
            return;
        }
        let update = RecUpdate::shown_bare(&update.list, k);
        let mut inner = self.inner.lock();
        inner.seq += 1;
        let seq = inner.seq;
        inner.by_user.insert(user.clone(), (seq, Instant::now(), update));
        inner.order.push_back((seq, user.clone()));
        while inner.by_user.len() > self.capacity || inner.order.len() > 2 * self.capacity {
            let Some((old, user)) = inner.order.pop_front() else { break };
            if inner.by_user.get(&user).is_some_and(|(s, _, _)| *s == old) {
                inner.by_user.remove(&user);
            }
        }
    }

    /// Whether the list kept for `user` is the one named `rec_id`.
    pub fn holds(&self, user: &UserId, rec_id: &str) -> bool {
        self.inner.lock().by_user.get(user).is_some_and(|(_, _, update)| update.list.rec_id == rec_id)
    }

    /// The list last shown to `user` without a session, and when; forgotten here once taken.
    pub fn take(&self, user: &UserId) -> Option<(Instant, Arc<RecUpdate>)> {
        self.inner.lock().by_user.remove(user).map(|(_, at, update)| (at, update))
    }
}
