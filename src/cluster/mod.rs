//! The closed loop as a property of the cluster (production mode, `[cluster]`).
//!
//! - **One leader** ([`lease`]): a Redis lease with a fencing token (the epoch). The leader alone
//!   trains and judges canaries; the other instances (followers) ignore the monitor's and the
//!   schedule's triggers (counted in `liverec_cluster_triggers_ignored_total`) and answer an
//!   operator's loop requests with `409 not_leader`, naming the leader.
//! - **Control records every instance applies** ([`control`], [`record`]): every change of what
//!   serves is published by the leader as the desired serving state on the control topic (one
//!   partition, compacted, one key). Every instance, the leader included, reads that topic and
//!   applies the newest state through its model actor (`actors::control`). A record whose epoch is
//!   below the highest one seen is ignored (fenced): a deposed leader cannot undo its successor's
//!   work. An instance reports ready only once it has applied the newest record at start.
//!
//! [`Cluster`] is the handle the trainer, the HTTP layer and the server share: who leads, this
//! instance's epoch while it leads, and publishing. This module knows nothing of actors: what
//! applies a record is handed to [`follow::follow`] by the server.

pub mod control;
pub mod follow;
pub mod lease;
pub mod record;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use self::control::ControlPublisher;
use self::lease::{Acquired, Holder, Lease};
use self::record::{DesiredState, StateChange};
use crate::config::Config;
use crate::event::now_ms;
use crate::telemetry::Metrics;

/// Who leads, as this instance knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// This instance holds the lease.
    pub leading: bool,
    /// The holder as last read (this instance while it leads); none when unknown or vacant.
    pub leader: Option<Holder>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// This instance does not lead (any more); `leader` is the one it knows of.
    #[error("this instance is not the loop's leader{}", describe(.leader))]
    NotLeader { leader: Option<Holder> },
    /// The control topic did not take the record.
    #[error("the control topic did not acknowledge the record: {0}")]
    Publish(String),
}

fn describe(leader: &Option<Holder>) -> String {
    match leader {
        Some(holder) if !holder.advertise_url.is_empty() => {
            format!("; the leader is {} at {}", holder.instance_id, holder.advertise_url)
        }
        Some(holder) => format!("; the leader is {}", holder.instance_id),
        None => "; no instance leads right now, retry shortly".into(),
    }
}

/// What a leader does after a renewal of its lease (see [`renewal_decision`]).
#[derive(Debug, PartialEq, Eq)]
enum Renewal {
    Renewed,
    /// Not renewed, but the lease is surely still held: lead on and try at the next tick.
    Retry,
    StepDown,
}

/// A renewal sent at `sent` came back at `now` saying `renewed` (`None`: failed or unanswered), and the lease is held until
/// `until` (the last successful renewal's sending time plus `ttl`). Renewed when Redis said yes
/// within the TTL. Refused (another instance holds it): step down at once. Unanswered, failed or
/// late: the key is still ours until `until`, so a busy moment of Redis or of this process does
/// not hand the loop over; the leader steps down only once less than a third of the TTL is left,
/// well before another instance could take the lease.
fn renewal_decision(renewed: Option<bool>, sent: Instant, now: Instant, until: Instant, ttl: Duration) -> Renewal {
    match renewed {
        Some(true) if now < sent + ttl => Renewal::Renewed,
        Some(false) => Renewal::StepDown,
        _ if now + ttl / 3 < until => Renewal::Retry,
        _ => Renewal::StepDown,
    }
}

/// The cluster handle (see the module docs).
pub struct Cluster {
    pub instance_id: String,
    pub advertise_url: String,
    ttl: Duration,
    renew_every: Duration,
    leadership: watch::Sender<Leadership>,
    /// While leading: the epoch, and when the lease must be considered gone (the last renewal's
    /// sending time plus the TTL).
    claim: Mutex<Option<(Holder, Instant)>>,
    /// The highest epoch and sequence number seen in a control record (or published).
    highest_epoch: AtomicU64,
    highest_seq: AtomicU64,
    /// True once the newest control record found at start is applied (see `/readyz`).
    applied_at_start: watch::Sender<bool>,
    publisher: ControlPublisher,
    metrics: Arc<Metrics>,
}

impl Cluster {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Cluster>, ClusterError> {
        let cluster = &config.cluster;
        let publisher = ControlPublisher::new(&config.kafka, cluster.control_topic_name(&config.kafka))
            .map_err(|e| ClusterError::Publish(e.to_string()))?;
        Ok(Arc::new(Cluster {
            instance_id: cluster.instance_id(),
            advertise_url: cluster.advertise_url.clone(),
            ttl: Duration::from_millis(cluster.lease_ttl_ms),
            renew_every: Duration::from_millis(cluster.renew_interval_ms),
            leadership: watch::Sender::new(Leadership::default()),
            claim: Mutex::new(None),
            highest_epoch: AtomicU64::new(0),
            highest_seq: AtomicU64::new(0),
            applied_at_start: watch::Sender::new(false),
            publisher,
            metrics,
        }))
    }

    /// Who leads now.
    pub fn leadership(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    /// Changes of leadership, for the trainer.
    pub fn watch_leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    /// This instance's epoch while its lease is valid (see `lease`); none otherwise.
    pub fn fence(&self) -> Option<u64> {
        let claim = self.claim.lock();
        claim.as_ref().filter(|(_, until)| Instant::now() < *until).map(|(holder, _)| holder.epoch)
    }

    /// Whether the newest control record found at start is applied.
    pub fn applied_at_start(&self) -> bool {
        *self.applied_at_start.borrow()
    }

    pub(crate) fn mark_applied_at_start(&self) {
        self.applied_at_start.send_replace(true);
    }

    /// Notes a record read from the control topic; false when it is fenced (an older epoch than
    /// one already seen), and then it must not be applied.
    pub(crate) fn observe(&self, state: &DesiredState) -> bool {
        let highest = self.highest_epoch.fetch_max(state.epoch, Ordering::SeqCst);
        self.highest_seq.fetch_max(state.seq, Ordering::SeqCst);
        if record::fenced(state, highest) {
            self.metrics.cluster_control_fenced.inc();
            tracing::warn!(
                epoch = state.epoch,
                highest,
                leader = %state.leader,
                seq = state.seq,
                "control record of an older leader ignored (fenced)"
            );
            return false;
        }
        true
    }

    /// Publishes `change` as the desired state, stamped with this instance's epoch: handed to
    /// the producer at once (records land in the order of the calls), and the future resolves
    /// once the broker has it. Refused when this instance does not lead.
    pub fn publish(
        &self,
        change: StateChange,
    ) -> Result<impl Future<Output = Result<DesiredState, ClusterError>> + Send + 'static, ClusterError> {
        let Some(epoch) = self.fence() else {
            return Err(ClusterError::NotLeader { leader: self.leadership().leader });
        };
        let state = DesiredState {
            epoch,
            seq: self.highest_seq.fetch_add(1, Ordering::SeqCst) + 1,
            leader: self.instance_id.clone(),
            at_ms: now_ms(),
            control: change.control,
            challenger: change.challenger,
            run: change.run,
            previous: change.previous,
        };
        let delivered = self.publisher.enqueue(&state);
        Ok(async move {
            delivered.await.map_err(ClusterError::Publish)?;
            tracing::info!(
                epoch,
                seq = state.seq,
                control = %state.control.version,
                challenger = ?state.challenger.as_ref().map(|c| &c.version),
                run = ?state.run.as_ref().map(|r| (r.id, r.phase)),
                "control record published"
            );
            Ok(state)
        })
    }

    fn set_leadership(&self, leadership: Leadership) {
        self.metrics.cluster_leader.set(i64::from(leadership.leading));
        if let Some(holder) = &leadership.leader {
            self.metrics.cluster_epoch.set(i64::try_from(holder.epoch).unwrap_or(i64::MAX));
        }
        self.leadership.send_if_modified(|current| {
            if *current == leadership {
                return false;
            }
            // Followers log the leader they see too: without it, a follower that cannot read the
            // lease (or sees a stale holder) is invisible in its log.
            if current.leading != leadership.leading || current.leader != leadership.leader {
                tracing::info!(
                    leading = leadership.leading,
                    epoch = leadership.leader.as_ref().map(|h| h.epoch),
                    leader = leadership.leader.as_ref().map(|h| h.instance_id.as_str()),
                    "loop leadership changed"
                );
            }
            *current = leadership;
            true
        });
    }

    /// Holds the lease while it can, and tries to take it while another does not: every
    /// `cluster.renew_interval_ms`, until the thread stops or `stop` fires (then a lease held is
    /// released, so another instance takes over at its next try instead of after the TTL).
    pub async fn run_lease(self: Arc<Self>, mut lease: Lease, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reads of the lease that failed in a row: the first is logged, then every 20th, so a
        // follower that cannot reach Redis says so without flooding the log.
        let mut unread = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            let sent = Instant::now();
            let held = self.claim.lock().as_ref().map(|(holder, _)| holder.clone());
            match held {
                Some(holder) => {
                    let outcome = lease.renew(&holder).await;
                    let until = self.claim.lock().as_ref().map_or(sent, |(_, until)| *until);
                    match renewal_decision(outcome.as_ref().ok().copied(), sent, Instant::now(), until, self.ttl) {
                        Renewal::Renewed => {
                            *self.claim.lock() = Some((holder.clone(), sent + self.ttl));
                            self.set_leadership(Leadership { leading: true, leader: Some(holder) });
                        }
                        Renewal::Retry => tracing::warn!(
                            outcome = ?outcome.map_err(|e| e.to_string()),
                            valid_for = ?until.saturating_duration_since(Instant::now()),
                            "loop lease not renewed; still held, trying again"
                        ),
                        Renewal::StepDown => {
                            tracing::warn!(outcome = ?outcome.map_err(|e| e.to_string()), "loop lease not renewed; stepping down");
                            *self.claim.lock() = None;
                            self.set_leadership(Leadership { leading: false, leader: None });
                        }
                    }
                }
                None => match lease.acquire().await {
                    Ok(Acquired::Taken(holder)) => {
                        unread = 0;
                        *self.claim.lock() = Some((holder.clone(), sent + self.ttl));
                        tracing::info!(epoch = holder.epoch, instance = %holder.instance_id, "loop lease taken");
                        self.set_leadership(Leadership { leading: true, leader: Some(holder) });
                    }
                    Ok(Acquired::Held(holder)) => {
                        if unread > 0 {
                            tracing::info!(failed = unread, "loop lease read again");
                        }
                        unread = 0;
                        self.set_leadership(Leadership { leading: false, leader: Some(holder) })
                    }
                    Err(error) => {
                        if unread.is_multiple_of(20) {
                            tracing::warn!(error = %error, failed_in_a_row = unread + 1, "loop lease not read");
                        }
                        unread = unread.saturating_add(1);
                        self.set_leadership(Leadership { leading: false, leader: None });
                    }
                },
            }
        }
        let held = self.claim.lock().take();
        if let Some((holder, _)) = held {
            match lease.release(&holder).await {
                Ok(_) => tracing::info!(epoch = holder.epoch, "loop lease released"),
                Err(error) => tracing::warn!(error = %error, "loop lease not released; it expires with its TTL"),
            }
            self.set_leadership(Leadership { leading: false, leader: None });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_rides_out_a_slow_renewal_while_its_lease_surely_holds() {
        let ttl = Duration::from_secs(9);
        let start = Instant::now();
        let until = start + ttl;
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(renewal_decision(Some(true), at(2), at(3), until, ttl), Renewal::Renewed);
        // Another instance holds it: at once.
        assert_eq!(renewal_decision(Some(false), at(2), at(3), until, ttl), Renewal::StepDown);
        // Unanswered with 7 s of the lease left, then 4 s: lead on.
        assert_eq!(renewal_decision(None, at(2), at(2), until, ttl), Renewal::Retry);
        assert_eq!(renewal_decision(None, at(2), at(5), until, ttl), Renewal::Retry);
        // With 3 s (a third of the TTL) or less left: step down, before anyone could take it.
        assert_eq!(renewal_decision(None, at(4), at(6), until, ttl), Renewal::StepDown);
        // A yes that came back after the TTL proves nothing about the key now.
        assert_eq!(renewal_decision(Some(true), at(1), at(11), until, ttl), Renewal::StepDown);
    }
}
