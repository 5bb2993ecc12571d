//! A writer lane on a Redis Cluster: a master that is down holds back the writes of its slots
//! only.
//!
//! The lane sends its batches as one pipeline as on a single server. When one fails, the lane
//! sends the batch again slot by slot: the slots that answer are done, the others are parked
//! with their writes. Later writes of a parked slot join its queue behind them (a user's writes
//! stay in order: all of a user's names are on one slot), while writes of other slots go on as
//! usual; the parked queue is retried with capped exponential backoff until its master (or the
//! master it moved to) takes it. Nothing is dropped and no caller hears "done" before Redis has
//! the write, as on a single server.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use deadpool_redis::redis::cluster_routing::Slot;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::conn::slot_of;
use super::keys::keys;
use super::writer::{Write, Writer};

/// The writes of the slots that failed, in arrival order, and when to try them again.
#[derive(Default)]
struct Parked {
    slots: HashSet<Slot>,
    writes: Vec<Write>,
}

impl Writer {
    pub(super) async fn run_cluster(self, mut queue: mpsc::UnboundedReceiver<Write>) {
        let mut parked = Parked::default();
        let mut delay = self.retry_initial;
        let mut retry_at = Instant::now();
        let mut failing = false;
        let mut open = true;
        let mut batch = Vec::with_capacity(self.batch);
        while open || !parked.writes.is_empty() {
            if parked.writes.is_empty() {
                match queue.recv().await {
                    Some(first) => batch.push(first),
                    None => break,
                }
            } else if open {
                tokio::select! {
                    write = queue.recv() => match write {
                        Some(first) => batch.push(first),
                        None => open = false,
                    },
                    () = tokio::time::sleep_until(retry_at) => {}
                }
            } else {
                tokio::time::sleep_until(retry_at).await;
            }
            while !batch.is_empty() && batch.len() < self.batch {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let started = std::time::Instant::now();
                self.metrics.store_write_batch_size.observe(batch.len() as f64);
                let fresh: Vec<Write> = batch
                    .drain(..)
                    .filter_map(|write| {
                        if parked.slots.contains(&self.slot(&write)) {
                            parked.writes.push(write);
                            None
                        } else {
                            Some(write)
                        }
                    })
                    .collect();
                if !fresh.is_empty() {
                    if self.try_write(&self.pipeline(&fresh)).await.is_ok() {
                        fresh.into_iter().for_each(|write| self.finish(write));
                    } else {
                        self.metrics.store_errors.inc();
                        let failed = self.write_by_slot(fresh).await;
                        if !failed.is_empty() && parked.writes.is_empty() {
                            retry_at = Instant::now() + delay;
                        }
                        for write in failed {
                            parked.slots.insert(self.slot(&write));
                            parked.writes.push(write);
                        }
                    }
                }
                self.metrics.store_write_seconds.observe_duration(started.elapsed());
            }
            if !parked.writes.is_empty() && Instant::now() >= retry_at {
                let writes = std::mem::take(&mut parked.writes);
                parked.writes = self.write_by_slot(writes).await;
                parked.slots = parked.writes.iter().map(|write| self.slot(write)).collect();
                if parked.writes.is_empty() {
                    delay = self.retry_initial;
                } else {
                    self.metrics.store_errors.inc();
                    delay = (delay * 2).min(self.retry_max);
                    retry_at = Instant::now() + delay;
                }
            }
            let now_failing = !parked.writes.is_empty();
            if now_failing != failing {
                failing = now_failing;
                if failing {
                    if self.failing_lanes.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(
                            slots = parked.slots.len(),
                            "redis cluster writes failing for some slots; retrying them with backoff, nothing is dropped"
                        );
                    }
                } else if self.failing_lanes.fetch_sub(1, Ordering::Relaxed) == 1 {
                    tracing::info!("redis cluster writes succeed again");
                }
            }
        }
    }

    /// The slot of the user a write is for.
    fn slot(&self, write: &Write) -> Slot {
        let user = match write {
            Write::Append { update, .. } => &update.user_id,
            Write::Recs { user, .. } | Write::Erase { user, .. } => user,
        };
        slot_of(&keys(&self.prefix, user).history)
    }

    /// Sends `writes` as one pipeline per slot, all at once; finishes those Redis took and returns
    /// the others, in their order.
    async fn write_by_slot(&self, writes: Vec<Write>) -> Vec<Write> {
        let mut groups: Vec<Vec<Write>> = Vec::new();
        let mut index: HashMap<Slot, usize> = HashMap::new();
        for write in writes {
            let at = *index.entry(self.slot(&write)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[at].push(write);
        }
        let pipelines: Vec<_> = groups.iter().map(|group| self.pipeline(group)).collect();
        let results = futures_util::future::join_all(pipelines.iter().map(|pipe| self.try_write(pipe))).await;
        let mut failed = Vec::new();
        for (group, result) in groups.into_iter().zip(results) {
            if result.is_ok() {
                group.into_iter().for_each(|write| self.finish(write));
            } else {
                failed.extend(group);
            }
        }
        failed
    }
}
