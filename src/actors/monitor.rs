//! `MonitorActor`: watches what liverec serves and what users do with it.
//!
//! Sessions report every list they serve (an impression), every attributed click or conversion,
//! and every interaction. Over a sliding window (`monitor.window_secs`, in buckets of
//! `monitor.bucket_secs`) the actor keeps, per model version and experiment variant: impressions,
//! click-through rate, conversion rate, revenue; and for the whole stream: catalogue coverage,
//! intra-list diversity, novelty, active users, events per user, repeat visits, revenue per user.
//!
//! Drift, checked at every bucket boundary:
//! - input drift: population stability index of item popularity (organic events only: clicks on
//!   served lists follow the model, not the users) and of the context mix (device x hour
//!   bucket) against a reference (the first full window the serving version served alone, or
//!   with `monitor.drift_reference = "training"` the recent part of its training window; before
//!   any promotion the first full window the monitor saw), fired only when an index is above
//!   `psi_threshold` and above the level sampling noise reaches at the two samples' sizes
//!   (`monitor::PsiTest`), so a small window of a stationary stream does not fire it;
//! - concept drift: the serving version's CTR against its own baseline (its first full window),
//!   fired only when the drop is both large (`ctr_drop`) and significant (two-proportion z-test
//!   above `z_threshold`), so noise alone does not fire it.
//!
//! A breach is recorded, counted, and sent as `Retrain { reason }` to the trainer when one is
//! attached, at most once per `cooldown_secs`.
//!
//! Production mode (`AttachCluster`): what this instance counts also goes, every
//! `cluster.report_interval_ms`, into a report for the monitor topic, and every instance's
//! reports (`MergeReport`) build a cluster view: another value of the same `MonitorView`. Drift,
//! baselines and the counts verdicts read (`GetCounts`) are then the cluster view's, and
//! `GetReport` carries this instance's own view beside it.
//!
//! Reports reach it through its [`MonitorInbox`], taken in batches every few milliseconds rather
//! than a message each. Inbox and mailbox: `monitor.mailbox_capacity`; sessions never wait and
//! count refusals, so a slow monitor never slows serving. Restart policy: none; the state is
//! statistics that rebuild from traffic.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;

use crate::catalog::{Catalog, ItemIdx};
use crate::config::{DriftReferenceKind, MonitorConfig};
use crate::event::{Context as EventContext, EventType, ItemId};
use crate::eventlog::LoggedEvent;
pub use crate::monitor::drift::DriftReference;
use crate::monitor::drift::{aligned, category_mix, context_psi, item_psi};
use crate::monitor::report::{intra_list_diversity, novelty, variant_report, StreamFigures, VariantBucket};
pub use crate::monitor::report::{
    Breach, BreachKind, ClusterReport, DriftReport, InstanceReport, MonitorReply, MonitorReport, VariantReport,
};
use crate::monitor::stream::StreamTotals;
use crate::monitor::view::{ArmKey, MonitorView, Report, UserEvent, MAX_ENTRIES_PER_RECORD};
pub use crate::monitor::view::{WireArm, WireReport};
use crate::monitor::{psi_test_sized, two_proportion_z, FastMap, PsiTest, Sizes};
use crate::telemetry::Metrics;

/// A list served to a user.
#[derive(Debug)]
pub struct Impression {
    pub version: Arc<str>,
    pub variant: Arc<str>,
    pub items: Vec<ItemIdx>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Click,
    Conversion,
}

/// A click or conversion attributed to a served list.
#[derive(Debug)]
pub struct Outcome {
    pub version: Arc<str>,
    pub variant: Arc<str>,
    pub kind: OutcomeKind,
    /// Position of the item in the list, when the item was in it.
    pub position: Option<usize>,
    /// Purchase amount, for conversions.
    pub value: Option<f64>,
}

/// One applied interaction (for popularity, context mix and business figures): the event log's
/// own record of it, shared, not copied. Only organic events (`LoggedEvent::organic`: not a
/// click on a list liverec served) count towards the item-popularity drift, which must measure
/// what users want, not what the model happened to show them.
#[derive(Debug)]
pub struct Activity {
    /// A hash of the user id: the monitor keys users by it and never keeps the id itself.
    pub user: u64,
    pub event: Arc<LoggedEvent>,
}

/// A report from a session: what [`tell_monitor`](super::lists::tell_monitor) leaves in the
/// inbox. Also a message, which counts it at once (after what the inbox holds).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum Reported {
    Impression(Impression),
    Outcome(Outcome),
    Activity(Activity),
}

impl From<Impression> for Reported {
    fn from(report: Impression) -> Self {
        Reported::Impression(report)
    }
}

impl From<Outcome> for Reported {
    fn from(report: Outcome) -> Self {
        Reported::Outcome(report)
    }
}

impl From<Activity> for Reported {
    fn from(report: Activity) -> Self {
        Reported::Activity(report)
    }
}

/// How long reports gather in the [`MonitorInbox`] before the monitor takes them: one wake-up
/// of the monitor's thread for every report it gathers, instead of one per report.
pub const GATHER: Duration = Duration::from_millis(5);

/// Where sessions leave their reports (impressions, outcomes, activity) for the monitor. A
/// message per report woke the monitor's thread two or three times an event, each an `eventfd`
/// write and a context switch (docs/performance.md, "CPU per event"); here a report is a push
/// under a lock, and the first one into an empty inbox sends the monitor one [`Drain`], which
/// takes everything gathered [`GATHER`] later. Every handler that reads or resets the monitor's
/// figures takes what is gathered first, so a report left before a request is in its answer.
/// Bounded by `monitor.mailbox_capacity` reports: past it reports are refused (counted), as a
/// full mailbox refused them, and serving never waits for the monitor.
pub struct MonitorInbox {
    reports: parking_lot::Mutex<Vec<Reported>>,
    capacity: usize,
    /// A [`Drain`] is on its way or scheduled.
    armed: std::sync::atomic::AtomicBool,
}

impl MonitorInbox {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            reports: parking_lot::Mutex::new(Vec::new()),
            capacity: capacity.max(1),
            armed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Leaves `report` for `monitor`; false when the inbox is full or the monitor has stopped
    /// (the report is dropped).
    pub fn offer(&self, report: Reported, monitor: &Addr<MonitorActor>) -> bool {
        if !monitor.connected() {
            return false;
        }
        {
            let mut reports = self.reports.lock();
            if reports.len() >= self.capacity {
                return false;
            }
            reports.push(report);
        }
        if !self.armed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // Past the mailbox's bound: one `Drain` at a time is in flight, and a report that
            // found the inbox armed must not wait for a later one.
            monitor.do_send(Drain);
        }
        true
    }

    /// Everything gathered, oldest first. Disarms first, so a report left while this takes
    /// the rest sends a new [`Drain`].
    fn take(&self) -> Vec<Reported> {
        self.armed.store(false, std::sync::atomic::Ordering::Release);
        std::mem::take(&mut *self.reports.lock())
    }

    /// No report waiting.
    pub fn is_empty(&self) -> bool {
        self.reports.lock().is_empty()
    }
}

/// Tells the monitor that its inbox has reports: it takes them [`GATHER`] later.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Drain;

/// A retraining request, sent to the trainer.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Retrain {
    pub reason: String,
}

/// The report behind `GET /v1/monitor`.
#[derive(Message, Debug)]
#[rtype(result = "MonitorReply")]
pub struct GetReport;

/// Impressions and clicks per (version, variant) since the monitor started, for canary and
/// experiment verdicts (which diff two readings).
#[derive(Message, Debug)]
#[rtype(result = "ArmCounts")]
pub struct GetCounts;

pub use crate::monitor::{Arm, ArmCounts, ArmTally};

/// A version now serves everyone: the input-drift reference becomes its first full window
/// (`monitor.drift_reference = "serving"`) or `reference`, item popularity and context mix of
/// the recent part of its training window (`"training"`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetReference {
    pub reference: DriftReference,
    /// The promoted version.
    pub version: String,
    /// When the promoted version's run started (ms since the epoch): a breach after that did
    /// not cause the run but was absorbed by it (coalesced), and its cooldown ends here.
    pub run_started_ms: Option<i64>,
}

impl SetReference {
    /// `version` now serves everyone with no training window to judge by (a manual switch, a
    /// rollback, another instance's promotion): its own first full window becomes the reference.
    pub fn serving(version: String) -> Self {
        Self { reference: DriftReference::default(), version, run_started_ms: None }
    }
}

/// Where retraining requests go.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachTrainer(pub Recipient<Retrain>);

/// This instance's part in the cluster-wide monitor (production mode): what to publish, and the
/// cluster view built from every instance's reports (see `bus::monitor_topic`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachCluster {
    /// Where this instance's encoded reports go (the monitor topic's producer drains it, off
    /// this thread: see `bus::monitor_topic::publish`).
    pub reports: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// This instance's id (`cluster.instance_id`).
    pub instance: String,
    /// `cluster.report_interval_ms`.
    pub interval: Duration,
}

/// One report from the monitor topic (any instance's, this one's included).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MergeReport {
    pub report: WireReport,
}

/// The input-drift reference and where it came from.
struct Reference {
    distributions: DriftReference,
    source: String,
    /// A trained version's (its training window or its first window), not the monitor's own
    /// first window before any promotion.
    trained: bool,
}

/// The cluster view and what this instance owes it.
struct Cluster {
    /// Every instance's reports merged (this one's too, as read back from the topic).
    view: MonitorView,
    /// What this instance counted since its last report.
    pending: Report,
    /// Where encoded reports go (see [`AttachCluster::reports`]).
    reports: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// This instance's id, the key of its reports.
    instance: String,
    /// Per instance: when its latest report was made (its clock, ms since the epoch).
    instances: BTreeMap<String, u64>,
    /// Input-drift indices of this instance's own traffic, for the `local` part of the report.
    local_drift: DriftReport,
}

pub struct MonitorActor {
    config: MonitorConfig,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    /// Sessions' reports, taken in batches (see [`MonitorInbox`]).
    inbox: Arc<MonitorInbox>,
    /// A [`Drain`] has scheduled a take.
    draining: bool,
    /// What this instance counted.
    local: MonitorView,
    /// Production mode: the cluster's view, which drift and verdicts then judge.
    cluster: Option<Cluster>,
    /// Reference distributions for input drift, and where they came from.
    reference: Option<Reference>,
    /// The promoted version whose first full window (from `started_tick`) becomes the reference.
    awaited: Option<String>,
    /// Per version: baseline (clicks, impressions) from its first full window.
    baselines: FastMap<Arc<str>, ArmTally>,
    started_tick: u64,
    breaches: VecDeque<Breach>,
    last_retrain: Option<u64>,
    trainer: Option<Recipient<Retrain>>,
    drift: DriftReport,
}

/// The one clock (`event::now_ms`), in the unsigned milliseconds the monitor's buckets count in.
fn now_ms() -> u64 {
    u64::try_from(crate::event::now_ms()).unwrap_or(0)
}

/// An instance whose latest report is older than this many windows has nothing left in the
/// cluster view: it leaves the `instances` list (and is forgotten at the next bucket boundary).
const INSTANCE_GONE_WINDOWS: u64 = 1;

impl MonitorActor {
    pub fn new(config: MonitorConfig, catalog: Arc<Catalog>, metrics: Arc<Metrics>) -> Self {
        let buckets = (config.window_secs / config.bucket_secs.max(1)).max(1) as usize;
        let tick = now_ms() / (config.bucket_secs.max(1) * 1000);
        let drift =
            DriftReport { psi_threshold: config.psi_threshold, z_threshold: config.z_threshold, ..Default::default() };
        Self {
            local: MonitorView::new(buckets),
            cluster: None,
            reference: None,
            awaited: None,
            baselines: FastMap::default(),
            started_tick: tick,
            breaches: VecDeque::new(),
            last_retrain: None,
            trainer: None,
            drift,
            inbox: MonitorInbox::new(config.mailbox_capacity),
            draining: false,
            config,
            catalog,
            metrics,
        }
    }

    /// Where sessions leave their reports for this monitor.
    pub fn inbox(&self) -> Arc<MonitorInbox> {
        self.inbox.clone()
    }

    /// Counts every report gathered in the inbox, in the order they were left.
    fn take_reports(&mut self) {
        for report in self.inbox.take() {
            self.metrics.monitor_queued.dec();
            self.count_report(report);
        }
    }

    fn count_report(&mut self, report: Reported) {
        match report {
            Reported::Impression(report) => self.impression(report),
            Reported::Outcome(report) => self.outcome(report),
            Reported::Activity(report) => self.activity(report),
        }
    }

    fn tick(&self) -> u64 {
        now_ms() / (self.config.bucket_secs.max(1) * 1000)
    }

    fn buckets(&self) -> u64 {
        (self.config.window_secs / self.config.bucket_secs.max(1)).max(1)
    }

    /// Reports made before this (ms since the epoch) have left the cluster view's window.
    fn gone_before(&self) -> u64 {
        now_ms().saturating_sub(INSTANCE_GONE_WINDOWS * self.config.window_secs * 1000)
    }

    /// The view drift alarms and verdicts judge: the cluster's in production, else this one's.
    fn judged(&self) -> &MonitorView {
        self.cluster.as_ref().map_or(&self.local, |c| &c.view)
    }

    /// Adds `add` to `arm` in this instance's view and in its next report.
    fn count(&mut self, arm: &ArmKey, add: &VariantBucket) {
        let tick = self.tick();
        self.local.count(tick, arm, add);
        if let Some(cluster) = &mut self.cluster {
            cluster.pending.count(arm, add);
        }
    }

    fn advance(&mut self) {
        let tick = self.tick();
        self.local.advance(tick);
        if let Some(cluster) = &mut self.cluster {
            cluster.view.advance(tick);
        }
    }

    /// The three input-drift tests of `view` against `reference`, or `None` below `min_samples`.
    fn input_drift(&self, view: &MonitorView, reference: &DriftReference) -> Option<[(&'static str, PsiTest); 3]> {
        let StreamTotals { popularity, context, events, effective_users } = view.stream().totals();
        if events < self.config.min_samples {
            return None;
        }
        // Events are clustered by user (a user keeps a device and a taste): the noise levels are
        // those of the window's effective number of users, not of its events.
        let sizes = Sizes { expected: reference.effective_users, actual: effective_users };
        let popularity_test = item_psi(&reference.popularity, &popularity, self.config.psi_bins, sizes);
        let (expected, actual) = {
            let categories = self.catalog.categories();
            aligned(&category_mix(&reference.popularity, &categories), &category_mix(&popularity, &categories))
        };
        let category_test = psi_test_sized(&expected, &actual, sizes);
        let context_test = context_psi(&reference.context, &context, sizes);
        Some([("item popularity", popularity_test), ("category mix", category_test), ("context mix", context_test)])
    }

    /// Runs at every bucket boundary: references, baselines, drift verdicts, all on the judged
    /// view (see [`MonitorActor::judged`]).
    fn check(&mut self, ctx: &mut Context<Self>) {
        self.take_reports();
        self.advance();
        let tick = self.tick();
        let gone = self.gone_before();
        if let Some(cluster) = &mut self.cluster {
            cluster.instances.retain(|_, at| *at >= gone);
        }
        let full_window = tick >= self.started_tick + self.buckets();

        if self.reference.is_none() && full_window {
            let StreamTotals { popularity, context, events, effective_users } = self.judged().stream().totals();
            if events >= self.config.min_samples {
                let awaited = self.awaited.take();
                self.reference = Some(Reference {
                    distributions: DriftReference { popularity, context, effective_users },
                    trained: awaited.is_some(),
                    source: awaited.map_or_else(|| "first full window".into(), |v| format!("first full window of {v}")),
                });
            }
        }
        if let Some(reference) = &self.reference {
            self.drift.reference = Some(reference.source.clone());
            let judged = self.input_drift(self.judged(), &reference.distributions);
            let local = self.cluster.as_ref().map(|_| self.input_drift(&self.local, &reference.distributions));
            if let (Some(cluster), Some(local)) = (&mut self.cluster, local) {
                cluster.local_drift.reference = Some(reference.source.clone());
                if let Some([(_, p), (_, c), (_, x)]) = local {
                    (cluster.local_drift.popularity_psi, cluster.local_drift.category_psi) = (Some(p.psi), Some(c.psi));
                    cluster.local_drift.context_psi = Some(x.psi);
                }
            }
            if let Some(tests) = judged {
                let [(_, p), (_, c), (_, x)] = tests;
                (self.drift.popularity_psi, self.drift.category_psi, self.drift.context_psi) =
                    (Some(p.psi), Some(c.psi), Some(x.psi));
                self.metrics.set_drift(p.psi, c.psi, x.psi);
                let threshold = self.config.psi_threshold;
                // The first index that is both large and beyond sampling noise (see `PsiTest`).
                if let Some((input, test)) = tests.into_iter().find(|(_, test)| test.drifted(threshold)) {
                    self.breach(
                        ctx,
                        BreachKind::InputDrift,
                        format!("{input} PSI {:.3} > {threshold} (noise level {:.3})", test.psi, test.noise),
                    );
                }
            }
        }

        // The CTR users outside any canary or experiment see now (the busiest control arm).
        if let Some(t) = self
            .judged()
            .variants()
            .filter(|(arm, _)| &*arm.variant == crate::recs::CONTROL)
            .map(|(_, window)| VariantBucket::sum(window))
            .max_by_key(|t| t.impressions)
        {
            self.metrics.set_serving_ctr(if t.impressions > 0 { t.clicks as f64 / t.impressions as f64 } else { 0.0 });
        }

        // Concept drift: each version against its own first full window.
        let buckets = self.buckets();
        let mut verdicts = Vec::new();
        for (ArmKey { version, .. }, window) in self.judged().variants() {
            let totals = VariantBucket::sum(window);
            let Some(first) = self.judged().first_seen(version) else { continue };
            if !self.baselines.contains_key(version) {
                if tick >= first + buckets && totals.impressions >= self.config.min_samples {
                    verdicts.push((version.clone(), None, totals));
                }
                continue;
            }
            verdicts.push((version.clone(), self.baselines.get(version).copied(), totals));
        }
        for (version, baseline, totals) in verdicts {
            match baseline {
                None => {
                    self.baselines.insert(version, ArmTally { impressions: totals.impressions, clicks: totals.clicks });
                }
                Some(ArmTally { impressions: base_impressions, clicks: base_clicks }) => {
                    if totals.impressions < self.config.min_samples || base_impressions == 0 {
                        continue;
                    }
                    let base = base_clicks as f64 / base_impressions as f64;
                    let now = totals.clicks as f64 / totals.impressions as f64;
                    let z = two_proportion_z(base_clicks, base_impressions, totals.clicks, totals.impressions);
                    self.drift.ctr_z = Some(z);
                    if now < base * (1.0 - self.config.ctr_drop) && z > self.config.z_threshold {
                        self.breach(
                            ctx,
                            BreachKind::ConceptDrift,
                            format!("CTR of {version} fell from {base:.4} to {now:.4} (z = {z:.2})"),
                        );
                    }
                }
            }
        }
    }

    fn breach(&mut self, _ctx: &mut Context<Self>, kind: BreachKind, reason: String) {
        let at_ms = now_ms();
        let cooling = self.last_retrain.is_some_and(|t| at_ms < t + self.config.cooldown_secs * 1000);
        if cooling {
            return;
        }
        self.last_retrain = Some(at_ms);
        self.metrics.monitor_breaches.inc();
        tracing::warn!(kind = kind.as_str(), reason = %reason, "monitor breach");
        self.breaches.push_back(Breach { at_ms, kind, reason: reason.clone() });
        while self.breaches.len() > 20 {
            self.breaches.pop_front();
        }
        if let Some(trainer) = &self.trainer {
            trainer.do_send(Retrain { reason });
        }
    }

    /// The report of `view`: its window's figures with `drift` and `breaches`.
    fn report_of(&self, view: &MonitorView, drift: &DriftReport, breaches: Vec<Breach>) -> MonitorReport {
        let mut variants: Vec<VariantReport> = view
            .variants()
            .map(|(ArmKey { version, variant }, window)| {
                variant_report(version, variant, &VariantBucket::sum(window), self.baselines.get(version).copied())
            })
            .filter(|v| v.impressions > 0 || v.clicks > 0)
            .collect();
        variants.sort_by(|a, b| a.version.cmp(&b.version).then(a.variant.cmp(&b.variant)));
        let stream = StreamFigures::of(view.stream(), self.catalog.len());
        MonitorReport {
            window_secs: self.config.window_secs,
            variants,
            coverage: stream.coverage,
            active_users: stream.active_users,
            events: stream.events,
            events_per_user: stream.events_per_user,
            repeat_visit_share: stream.repeat_visit_share,
            revenue_per_user: stream.revenue_per_user,
            drift: drift.clone(),
            breaches,
        }
    }

    fn report(&self) -> MonitorReply {
        let report = self.report_of(self.judged(), &self.drift, self.breaches.iter().cloned().collect());
        let gone = self.gone_before();
        let cluster = self.cluster.as_ref().map(|cluster| {
            ClusterReport {
                instance: cluster.instance.clone(),
                instances: cluster
                    .instances
                    .iter()
                    .filter(|(_, &at)| at >= gone)
                    .map(|(id, &at)| InstanceReport { id: id.clone(), last_report_ms: at })
                    .collect(),
                // Alarms and breaches are judged on the cluster view: none here.
                local: self.report_of(&self.local, &cluster.local_drift, Vec::new()),
            }
        });
        MonitorReply { report, cluster }
    }

    /// Publishes what this instance counted since its last report (an empty report too: it
    /// says the instance is there) and starts the next one.
    fn publish(&mut self) {
        self.take_reports();
        let Some(cluster) = &mut self.cluster else { return };
        let report = std::mem::take(&mut cluster.pending);
        let catalog = &self.catalog;
        let wire = report.to_wire(&cluster.instance, now_ms(), |items| {
            catalog.ids_of(items).into_iter().map(|id| id.0.to_string()).collect()
        });
        for part in wire.split(MAX_ENTRIES_PER_RECORD) {
            let payload = serde_json::to_vec(&part).expect("a report always serialises");
            if cluster.reports.try_send(payload).is_err() {
                // The producer is that far behind (the broker unreachable): these counts are
                // missing from every cluster view; this instance's own view keeps them.
                self.metrics.kafka_errors.inc();
                tracing::warn!(instance = %cluster.instance, "monitor report dropped: the monitor topic's producer is behind");
            }
        }
    }
}

impl Actor for MonitorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity);
        ctx.run_interval(Duration::from_secs(self.config.bucket_secs.max(1)), |act, ctx| act.check(ctx));
    }
}

impl Handler<Reported> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: Reported, _ctx: &mut Self::Context) {
        self.take_reports();
        self.count_report(msg);
    }
}

impl Handler<Drain> for MonitorActor {
    type Result = ();

    fn handle(&mut self, _msg: Drain, ctx: &mut Self::Context) {
        if self.draining {
            return;
        }
        self.draining = true;
        ctx.run_later(GATHER, |act, _ctx| {
            act.draining = false;
            act.take_reports();
        });
    }
}

impl MonitorActor {
    fn impression(&mut self, msg: Impression) {
        let add = VariantBucket {
            impressions: 1,
            diversity_sum: intra_list_diversity(&msg.items, &self.catalog.categories()),
            // Against this instance's popularity: the figure is the list's, wherever it is summed.
            novelty_sum: novelty(&msg.items, self.local.stream().popularity(), self.local.stream().events()),
            novelty_items: msg.items.len() as u64,
            ..VariantBucket::default()
        };
        self.count(&ArmKey { version: msg.version, variant: msg.variant }, &add);
        let tick = self.tick();
        self.local.impressed(tick, &msg.items);
        if let Some(cluster) = &mut self.cluster {
            cluster.pending.impressed(&msg.items);
        }
        self.metrics.monitor_impressions.inc();
    }

    fn outcome(&mut self, msg: Outcome) {
        let add = match msg.kind {
            OutcomeKind::Click => {
                self.metrics.monitor_clicks.inc();
                VariantBucket { clicks: 1, ..VariantBucket::default() }
            }
            OutcomeKind::Conversion => {
                self.metrics.monitor_conversions.inc();
                VariantBucket { conversions: 1, revenue: msg.value.unwrap_or(0.0), ..VariantBucket::default() }
            }
        };
        self.count(&ArmKey { version: msg.version, variant: msg.variant }, &add);
    }

    fn activity(&mut self, msg: Activity) {
        let event = &msg.event;
        let counted = UserEvent {
            user: msg.user,
            organic: (event.organic && !event.event_type.is_negative()).then_some(event.item),
            segment: event.segment,
            revenue: (event.event_type == EventType::Purchase).then(|| event.value.unwrap_or(0.0)),
        };
        let tick = self.tick();
        self.local.activity(tick, &counted);
        if let Some(cluster) = &mut self.cluster {
            cluster.pending.activity(&counted);
        }
    }
}

impl Handler<GetReport> for MonitorActor {
    type Result = MessageResult<GetReport>;

    fn handle(&mut self, _msg: GetReport, _ctx: &mut Self::Context) -> Self::Result {
        self.take_reports();
        self.advance();
        MessageResult(self.report())
    }
}

impl Handler<GetCounts> for MonitorActor {
    type Result = MessageResult<GetCounts>;

    /// The judged view's counts: the whole cluster's in production, so the leader's canary and
    /// experiment verdicts weigh every instance's traffic.
    fn handle(&mut self, _msg: GetCounts, _ctx: &mut Self::Context) -> Self::Result {
        self.take_reports();
        MessageResult(self.judged().counts())
    }
}

impl Handler<AttachCluster> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: AttachCluster, ctx: &mut Self::Context) {
        self.take_reports();
        tracing::info!(instance = %msg.instance, interval_ms = msg.interval.as_millis() as u64, "cluster-wide monitor on");
        let local_drift = DriftReport { reference: None, ..self.drift.clone() };
        self.cluster = Some(Cluster {
            view: MonitorView::new(self.buckets() as usize),
            pending: Report::default(),
            reports: msg.reports,
            instance: msg.instance,
            instances: BTreeMap::new(),
            local_drift,
        });
        ctx.run_interval(msg.interval, |act, _ctx| act.publish());
    }
}

impl Handler<MergeReport> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: MergeReport, _ctx: &mut Self::Context) {
        let bucket_ms = self.config.bucket_secs.max(1) * 1000;
        let Some(cluster) = &mut self.cluster else { return };
        let catalog = &self.catalog;
        let report = msg.report.resolve(|id| catalog.lookup(&ItemId::from(id)));
        // A report stamped ahead of this clock (another instance's clock runs fast) counts now:
        // it must not move the window past this instance's present.
        cluster.view.merge(msg.report.at_ms.min(now_ms()) / bucket_ms, &report);
        let latest = cluster.instances.entry(msg.report.instance).or_default();
        *latest = (*latest).max(msg.report.at_ms);
    }
}

impl MonitorActor {
    /// Whether a promoted version's reference (its run started at `run_started_ms`) ends the
    /// breach cooldown. The cooldown keeps a drift that caused a run from asking again while the
    /// run's version settles. But a breach that came while the run was under way asked for
    /// nothing (the trainer coalesced it), and a breach judged against the monitor's own first
    /// window (no trained version yet) is answered by the first trained version: left cooling,
    /// either would silence the next real drift, unreported, for `cooldown_secs`.
    fn reference_ends_cooldown(&self, run_started_ms: Option<i64>) -> bool {
        let Some(breach) = self.last_retrain else { return false };
        let absorbed = run_started_ms.is_some_and(|started| breach as i64 > started);
        // A promoted version's window still filling is a trained version's reference too.
        let trained = self.awaited.is_some() || self.reference.as_ref().is_some_and(|r| r.trained);
        absorbed || !trained
    }
}

impl MonitorActor {
    /// The drift report under a new reference named `source`: no index until the next check.
    fn new_reference(&mut self, source: String) {
        let (psi_threshold, z_threshold) = (self.config.psi_threshold, self.config.z_threshold);
        let fresh = |ctr_z| DriftReport {
            reference: Some(source.clone()),
            ctr_z,
            psi_threshold,
            z_threshold,
            ..Default::default()
        };
        if let Some(cluster) = &mut self.cluster {
            cluster.local_drift = fresh(cluster.local_drift.ctr_z);
        }
        self.drift = fresh(self.drift.ctr_z);
        // The gauges do not keep the old reference's indices either (an alert on them would
        // stay firing through a pending window).
        self.metrics.set_drift(0.0, 0.0, 0.0);
    }
}

impl Handler<SetReference> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: SetReference, _ctx: &mut Self::Context) {
        self.take_reports();
        if self.reference_ends_cooldown(msg.run_started_ms) {
            self.last_retrain = None;
        }
        let events: f64 = msg.reference.popularity.values().sum();
        let usable = events >= self.config.min_samples as f64 && msg.reference.context.len() == EventContext::SEGMENTS;
        if self.config.drift_reference == DriftReferenceKind::Training && usable {
            let source = format!("training window of {}", msg.version);
            tracing::info!(source = %source, events, "input-drift reference replaced");
            self.new_reference(source.clone());
            self.reference = Some(Reference { distributions: msg.reference, source, trained: true });
            self.awaited = None;
            return;
        }
        // The version's own first full window: its buckets start after this one, which still
        // holds traffic of the previous version (or of the canary). No input-drift verdict until
        // then; concept drift waits for the version's baseline window the same way.
        tracing::info!(
            version = %msg.version,
            training_events = events,
            "input-drift reference: the promoted version's first full window, from the next bucket"
        );
        self.new_reference(format!("first full window of {} (pending)", msg.version));
        self.reference = None;
        self.started_tick = self.tick() + 1;
        self.awaited = Some(msg.version);
    }
}

impl Handler<AttachTrainer> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: AttachTrainer, _ctx: &mut Self::Context) {
        self.trainer = Some(msg.0);
    }
}

/// Decodes the monitor topic's records (`payloads`) and merges each into `monitor`'s cluster
/// view, waiting while its mailbox is full; returns when either side closes. A record that is
/// not a report is logged and skipped.
pub async fn merge_reports(mut payloads: tokio::sync::mpsc::Receiver<Vec<u8>>, monitor: Addr<MonitorActor>) {
    while let Some(payload) = payloads.recv().await {
        let report = match serde_json::from_slice::<WireReport>(&payload) {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(error = %error, bytes = payload.len(), "monitor topic record is not a report; skipped");
                continue;
            }
        };
        if monitor.send(MergeReport { report }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm() -> Arm {
        Arm::new("v1", "control")
    }

    /// This instance's next report carrying any counts (idle intervals publish empty ones).
    async fn next_counted(published: &mut tokio::sync::mpsc::Receiver<Vec<u8>>) -> WireReport {
        loop {
            let payload = published.recv().await.expect("the monitor publishes");
            let report: WireReport = serde_json::from_slice(&payload).expect("a report");
            if !report.arms.is_empty() {
                return report;
            }
        }
    }

    #[actix_rt::test]
    async fn reports_left_in_the_inbox_are_counted_by_themselves_and_before_any_read() {
        let mut config = crate::config::Config::default().monitor;
        config.mailbox_capacity = 4;
        let catalog = Arc::new(Catalog::new());
        let x = catalog.intern(&ItemId::from("x"));
        let metrics = Arc::new(Metrics::default());
        let monitor = MonitorActor::new(config, catalog, metrics.clone());
        let inbox = monitor.inbox();
        let monitor = monitor.start();
        let impression =
            || Reported::from(Impression { version: "v1".into(), variant: "control".into(), items: vec![x] });
        let impressions = || metrics.monitor_impressions.get();

        // Left and read at once: the read takes them first.
        assert!(inbox.offer(impression(), &monitor));
        assert!(inbox.offer(impression(), &monitor));
        assert_eq!(monitor.send(GetCounts).await.expect("counts").get(&arm()).map(|t| t.impressions), Some(2));
        assert!(inbox.is_empty());

        // Left and not read: the drain the first one asked for takes them.
        assert!(inbox.offer(impression(), &monitor));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while impressions() < 3 {
            assert!(std::time::Instant::now() < deadline, "the inbox was never drained");
            actix_rt::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(inbox.is_empty());

        // Full: refused, as a full mailbox refused them, and nothing already in it is lost.
        for _ in 0..4 {
            assert!(inbox.offer(impression(), &monitor));
        }
        assert!(!inbox.offer(impression(), &monitor), "a fifth report past a capacity of four");
        assert_eq!(monitor.send(GetCounts).await.expect("counts").get(&arm()).map(|t| t.impressions), Some(7));

        // A stopped monitor takes nothing: refused, not left to pile up.
        let thread = Arbiter::new();
        let stopped = MonitorActor::new(crate::config::Config::default().monitor, Arc::new(Catalog::new()), metrics);
        let stopped_inbox = stopped.inbox();
        let stopped = MonitorActor::start_in_arbiter(&thread.handle(), move |_| stopped);
        thread.stop();
        thread.join().expect("the monitor's thread ends");
        assert!(!stopped.connected());
        assert!(!stopped_inbox.offer(impression(), &stopped));
        assert!(stopped_inbox.is_empty());
    }

    #[actix_rt::test]
    async fn with_a_cluster_view_verdicts_and_the_report_are_the_clusters_and_its_own_counts_go_out() {
        let config = crate::config::Config::default();
        let catalog = Arc::new(Catalog::new());
        let (x, y) = (catalog.intern(&ItemId::from("x")), catalog.intern(&ItemId::from("y")));
        let monitor = MonitorActor::new(config.monitor, catalog, Arc::new(Metrics::default())).start();
        let (reports, mut published) = tokio::sync::mpsc::channel(64);
        let interval = Duration::from_millis(5);
        monitor.send(AttachCluster { reports, instance: "a".into(), interval }).await.expect("attached");
        let (version, variant): (Arc<str>, Arc<str>) = ("v1".into(), "control".into());
        monitor
            .send(Reported::from(Impression { version: version.clone(), variant: variant.clone(), items: vec![x, y] }))
            .await
            .expect("sent");
        let click = Outcome { version, variant, kind: OutcomeKind::Click, position: Some(0), value: None };
        monitor.send(Reported::from(click)).await.expect("sent");

        // Its counts go out with items named by id.
        let mine = next_counted(&mut published).await;
        assert_eq!((mine.instance.as_str(), mine.arms.len()), ("a", 1), "{mine:?}");
        assert_eq!((mine.arms[0].impressions, mine.arms[0].clicks), (1, 1));
        let mut shown = mine.impressed.clone();
        shown.sort();
        assert_eq!(shown, ["x", "y"]);
        // Verdicts read the cluster view, which has merged nothing yet.
        assert_eq!(monitor.send(GetCounts).await.expect("counts").get(&arm()), None);

        // Its own report back from the topic, and another instance's.
        monitor.send(MergeReport { report: mine.clone() }).await.expect("merged");
        let theirs = WireReport {
            instance: "b".into(),
            arms: vec![WireArm { impressions: 3, clicks: 1, ..mine.arms[0].clone() }],
            impressed: vec!["y".into(), "not-here".into()],
            ..mine
        };
        monitor.send(MergeReport { report: theirs }).await.expect("merged");
        let counts = monitor.send(GetCounts).await.expect("counts");
        assert_eq!(counts.get(&arm()), Some(&ArmTally { impressions: 4, clicks: 2 }));

        let MonitorReply { report, cluster } = monitor.send(GetReport).await.expect("report");
        let cluster = cluster.expect("the cluster part");
        assert_eq!((report.variants[0].impressions, cluster.local.variants[0].impressions), (4, 1));
        let ids: Vec<&str> = cluster.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!((cluster.instance.as_str(), ids), ("a", vec!["a", "b"]));
        let json = serde_json::to_value(MonitorReply { report, cluster: Some(cluster) }).expect("serialises");
        assert_eq!(json["variants"][0]["impressions"], 4, "the cluster's at the top level: {json}");
        assert_eq!(json["local"]["variants"][0]["impressions"], 1, "{json}");
    }

    #[test]
    fn a_promotion_ends_the_cooldown_of_an_absorbed_breach_or_of_one_against_the_first_window() {
        let config = crate::config::Config::default();
        let mut monitor = MonitorActor::new(config.monitor, Arc::new(Catalog::new()), Arc::new(Metrics::default()));
        assert!(!monitor.reference_ends_cooldown(Some(0)), "nothing cooling");
        let reference = |trained| Reference { distributions: DriftReference::default(), source: "s".into(), trained };
        monitor.last_retrain = Some(1_000);
        // Against the monitor's own first window (or none yet): the first trained version answers it.
        monitor.reference = Some(reference(false));
        assert!(monitor.reference_ends_cooldown(Some(2_000)));
        monitor.reference = None;
        assert!(monitor.reference_ends_cooldown(None));
        // Against a trained version's window: the breach that caused the run keeps cooling...
        monitor.reference = Some(reference(true));
        assert!(!monitor.reference_ends_cooldown(Some(1_000)));
        assert!(!monitor.reference_ends_cooldown(None));
        // ...one absorbed by a run already under way does not.
        assert!(monitor.reference_ends_cooldown(Some(500)));
        // A promoted version's own window still filling counts as its reference.
        (monitor.reference, monitor.awaited) = (None, Some("v2".into()));
        assert!(!monitor.reference_ends_cooldown(Some(1_000)));
    }

    /// Sends `users` organic views (one each, items spread over ten) and reads the drift report.
    async fn browse_and_report(monitor: &Addr<MonitorActor>, catalog: &Catalog, users: u64) -> DriftReport {
        for user in 0..users {
            let item_id = ItemId::from(format!("i{}", user % 10).as_str());
            let event = LoggedEvent {
                user: crate::event::UserId::from(format!("u{user}").as_str()),
                interaction: crate::eventlog::Interaction {
                    event_id: crate::event::EventId::new_v7(),
                    item_id: item_id.clone(),
                    event_type: EventType::View,
                    value: None,
                    timestamp: crate::event::now_ms(),
                    rec_id: None,
                },
                item: catalog.intern(&item_id),
                segment: 0,
                organic: true,
                logged_at: crate::event::now_ms(),
            };
            monitor.send(Reported::from(Activity { user, event: Arc::new(event) })).await.expect("sent");
        }
        monitor.send(GetReport).await.expect("report").report.drift
    }

    /// Sends traffic until the drift report names `reference` (each round a second apart at
    /// most: the monitor's buckets are seconds); fails after a minute without it.
    async fn until_reference(monitor: &Addr<MonitorActor>, catalog: &Catalog, reference: &str) -> DriftReport {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let drift = browse_and_report(monitor, catalog, 20).await;
            if drift.reference.as_deref() == Some(reference) {
                return drift;
            }
            assert!(std::time::Instant::now() < deadline, "no reference {reference:?}: {drift:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[actix_rt::test]
    async fn a_promoted_version_is_judged_against_its_own_first_full_window_or_its_training_window() {
        for kind in [DriftReferenceKind::Serving, DriftReferenceKind::Training] {
            let mut config = crate::config::Config::default().monitor;
            (config.bucket_secs, config.window_secs, config.min_samples, config.drift_reference) = (1, 1, 5, kind);
            let catalog = Arc::new(Catalog::new());
            let monitor = MonitorActor::new(config, catalog.clone(), Arc::new(Metrics::default())).start();
            until_reference(&monitor, &catalog, "first full window").await;

            // A training reference too small to judge by falls back to the version's own window.
            let mut training = DriftReference { context: vec![1.0; EventContext::SEGMENTS], ..Default::default() };
            monitor
                .send(SetReference { reference: training.clone(), version: "v2".into(), run_started_ms: None })
                .await
                .expect("sent");
            let pending = monitor.send(GetReport).await.expect("report").report.drift;
            assert_eq!(pending.reference.as_deref(), Some("first full window of v2 (pending)"), "{kind:?}");
            assert_eq!((pending.popularity_psi, pending.category_psi, pending.context_psi), (None, None, None));
            let judged = until_reference(&monitor, &catalog, "first full window of v2").await;
            assert!(judged.popularity_psi.is_some(), "{judged:?}");

            training.popularity =
                (0..10).map(|i| (catalog.intern(&ItemId::from(format!("i{i}").as_str())), 10.0)).collect();
            training.effective_users = Some(100.0);
            monitor
                .send(SetReference { reference: training, version: "v3".into(), run_started_ms: None })
                .await
                .expect("sent");
            let drift = monitor.send(GetReport).await.expect("report").report.drift;
            let expected = match kind {
                DriftReferenceKind::Serving => "first full window of v3 (pending)",
                DriftReferenceKind::Training => "training window of v3",
            };
            assert_eq!(drift.reference.as_deref(), Some(expected));
        }
    }

    #[actix_rt::test]
    async fn without_a_cluster_view_verdicts_and_the_report_are_this_instances() {
        let config = crate::config::Config::default();
        let catalog = Arc::new(Catalog::new());
        let x = catalog.intern(&ItemId::from("x"));
        let monitor = MonitorActor::new(config.monitor, catalog, Arc::new(Metrics::default())).start();
        monitor
            .send(Reported::from(Impression { version: "v1".into(), variant: "control".into(), items: vec![x] }))
            .await
            .expect("sent");
        let counts = monitor.send(GetCounts).await.expect("counts");
        assert_eq!(counts.get(&arm()), Some(&ArmTally { impressions: 1, clicks: 0 }));
        let reply = monitor.send(GetReport).await.expect("report");
        let json = serde_json::to_value(&reply).expect("serialises");
        assert!(json.get("local").is_none() && json.get("instances").is_none(), "embedded: no cluster part: {json}");
        assert_eq!(json["variants"][0]["impressions"], 1);
    }
}
