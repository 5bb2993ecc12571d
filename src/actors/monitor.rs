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
//!   bucket) against a reference (the model's training window when the trainer sets one,
//!   else the first full window the monitor saw), fired only when an index is above
//!   `psi_threshold` and above the level sampling noise reaches at the two samples' sizes
//!   (`monitor::PsiTest`), so a small window of a stationary stream does not fire it;
//! - concept drift: the serving version's CTR against its own baseline (its first full window),
//!   fired only when the drop is both large (`ctr_drop`) and significant (two-proportion z-test
//!   above `z_threshold`), so noise alone does not fire it.
//!
//! A breach is recorded, counted, and sent as `Retrain { reason }` to the trainer when one is
//! attached, at most once per `cooldown_secs`.
//!
//! Mailbox: `monitor.mailbox_capacity`; sessions `try_send` and count refusals, so a slow monitor
//! never slows serving. Restart policy: none; the state is statistics that rebuild from traffic.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;

use crate::catalog::{Catalog, ItemIdx};
use crate::config::MonitorConfig;
use crate::event::{Context as EventContext, EventType};
use crate::eventlog::LoggedEvent;
pub use crate::monitor::drift::DriftReference;
use crate::monitor::drift::{aligned, category_mix, context_psi, item_psi};
use crate::monitor::report::{intra_list_diversity, novelty, variant_report, StreamFigures, VariantBucket};
pub use crate::monitor::report::{Breach, BreachKind, DriftReport, MonitorReport, VariantReport};
use crate::monitor::stream::{StreamBucket, StreamTotals, StreamWindow};
use crate::monitor::{psi_test, two_proportion_z, FastMap, Window};
use crate::telemetry::Metrics;

/// A list served to a user.
#[derive(Message, Debug)]
#[rtype(result = "()")]
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
#[derive(Message, Debug)]
#[rtype(result = "()")]
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
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Activity {
    /// A hash of the user id: the monitor keys users by it and never keeps the id itself.
    pub user: u64,
    pub event: Arc<LoggedEvent>,
}

/// A retraining request, sent to the trainer.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Retrain {
    pub reason: String,
}

/// The report behind `GET /v1/monitor`.
#[derive(Message, Debug)]
#[rtype(result = "MonitorReport")]
pub struct GetReport;

/// Impressions and clicks per (version, variant) since the monitor started, for canary and
/// experiment verdicts (which diff two readings).
#[derive(Message, Debug)]
#[rtype(result = "ArmCounts")]
pub struct GetCounts;

pub use crate::monitor::{Arm, ArmCounts, ArmTally};

/// The input-drift reference of a newly promoted version: item popularity and context mix of
/// the recent part of its training window.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetReference {
    pub reference: DriftReference,
    pub source: String,
}

/// Where retraining requests go.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachTrainer(pub Recipient<Retrain>);

/// The input-drift reference and where it came from.
struct Reference {
    distributions: DriftReference,
    source: String,
}

/// A version and variant as the monitor keys its counts on the hot path (shared strings, so a
/// lookup allocates nothing); [`Arm`] is the same pair as the trainer reads it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ArmKey {
    version: Arc<str>,
    variant: Arc<str>,
}

pub struct MonitorActor {
    config: MonitorConfig,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    variants: FastMap<ArmKey, Window<VariantBucket>>,
    /// The whole stream's buckets, with the window's item popularity as a running sum.
    stream: StreamWindow,
    /// Reference distributions for input drift, and where they came from.
    reference: Option<Reference>,
    /// Per version: baseline (clicks, impressions) from its first full window.
    baselines: FastMap<Arc<str>, ArmTally>,
    /// When each version was first seen (its first full window ends a window later).
    first_seen: FastMap<Arc<str>, u64>,
    started_tick: u64,
    breaches: VecDeque<Breach>,
    last_retrain: Option<u64>,
    trainer: Option<Recipient<Retrain>>,
    drift: DriftReport,
    /// Impressions and clicks per (version, variant) since start.
    totals: FastMap<ArmKey, ArmTally>,
}

/// The one clock (`event::now_ms`), in the unsigned milliseconds the monitor's buckets count in.
fn now_ms() -> u64 {
    u64::try_from(crate::event::now_ms()).unwrap_or(0)
}

impl MonitorActor {
    pub fn new(config: MonitorConfig, catalog: Arc<Catalog>, metrics: Arc<Metrics>) -> Self {
        let buckets = (config.window_secs / config.bucket_secs.max(1)).max(1) as usize;
        let tick = now_ms() / (config.bucket_secs.max(1) * 1000);
        let drift =
            DriftReport { psi_threshold: config.psi_threshold, z_threshold: config.z_threshold, ..Default::default() };
        Self {
            variants: FastMap::default(),
            stream: StreamWindow::new(buckets),
            reference: None,
            baselines: FastMap::default(),
            first_seen: FastMap::default(),
            started_tick: tick,
            breaches: VecDeque::new(),
            last_retrain: None,
            trainer: None,
            drift,
            totals: FastMap::default(),
            config,
            catalog,
            metrics,
        }
    }

    fn tick(&self) -> u64 {
        now_ms() / (self.config.bucket_secs.max(1) * 1000)
    }

    fn buckets(&self) -> u64 {
        (self.config.window_secs / self.config.bucket_secs.max(1)).max(1)
    }

    fn variant(&mut self, version: &Arc<str>, variant: &Arc<str>) -> &mut VariantBucket {
        let tick = self.tick();
        let buckets = self.buckets() as usize;
        if !self.first_seen.contains_key(version) {
            self.first_seen.insert(version.clone(), tick);
        }
        self.variants
            .entry(ArmKey { version: version.clone(), variant: variant.clone() })
            .or_insert_with(|| Window::new(buckets))
            .at(tick)
    }

    fn stream_bucket(&mut self) -> &mut StreamBucket {
        let tick = self.tick();
        self.stream.bucket(tick)
    }

    /// Runs at every bucket boundary: references, baselines, drift verdicts.
    fn check(&mut self, ctx: &mut Context<Self>) {
        let tick = self.tick();
        for window in self.variants.values_mut() {
            window.advance(tick);
        }
        self.stream.advance(tick);
        let full_window = tick >= self.started_tick + self.buckets();
        let StreamTotals { popularity, context, events } = self.stream.totals();

        if self.reference.is_none() && full_window && events >= self.config.min_samples {
            self.reference = Some(Reference {
                distributions: DriftReference { popularity: popularity.clone(), context: context.clone() },
                source: "first full window".into(),
            });
        }
        if let Some(Reference {
            distributions: DriftReference { popularity: reference_pop, context: reference_ctx },
            source,
        }) = &self.reference
        {
            self.drift.reference = Some(source.clone());
            if events >= self.config.min_samples {
                let popularity_test = item_psi(reference_pop, &popularity, self.config.psi_bins);
                let (expected, actual) = {
                    let categories = self.catalog.categories();
                    aligned(&category_mix(reference_pop, &categories), &category_mix(&popularity, &categories))
                };
                let category_test = psi_test(&expected, &actual);
                let context_test = context_psi(reference_ctx, &context);
                self.drift.popularity_psi = Some(popularity_test.psi);
                self.drift.category_psi = Some(category_test.psi);
                self.drift.context_psi = Some(context_test.psi);
                self.metrics.set_drift(popularity_test.psi, category_test.psi, context_test.psi);
                let threshold = self.config.psi_threshold;
                // The first index that is both large and beyond sampling noise (see `PsiTest`).
                let tests = [
                    ("item popularity", popularity_test),
                    ("category mix", category_test),
                    ("context mix", context_test),
                ];
                let drifted = tests.into_iter().find(|(_, test)| test.drifted(threshold));
                if let Some((input, test)) = drifted {
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
            .variants
            .iter()
            .filter(|(arm, _)| &*arm.variant == crate::recs::CONTROL)
            .map(|(_, window)| VariantBucket::sum(window))
            .max_by_key(|t| t.impressions)
        {
            self.metrics.set_serving_ctr(if t.impressions > 0 { t.clicks as f64 / t.impressions as f64 } else { 0.0 });
        }

        // Concept drift: each version against its own first full window.
        let buckets = self.buckets();
        let mut verdicts = Vec::new();
        for (ArmKey { version, .. }, window) in &self.variants {
            let totals = VariantBucket::sum(window);
            let Some(&first) = self.first_seen.get(version) else { continue };
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

    fn report(&self) -> MonitorReport {
        let mut variants: Vec<VariantReport> = self
            .variants
            .iter()
            .map(|(ArmKey { version, variant }, window)| {
                variant_report(version, variant, &VariantBucket::sum(window), self.baselines.get(version).copied())
            })
            .filter(|v| v.impressions > 0 || v.clicks > 0)
            .collect();
        variants.sort_by(|a, b| a.version.cmp(&b.version).then(a.variant.cmp(&b.variant)));
        let stream = StreamFigures::of(&self.stream, self.catalog.len());
        MonitorReport {
            window_secs: self.config.window_secs,
            variants,
            coverage: stream.coverage,
            active_users: stream.active_users,
            events: stream.events,
            events_per_user: stream.events_per_user,
            repeat_visit_share: stream.repeat_visit_share,
            revenue_per_user: stream.revenue_per_user,
            drift: self.drift.clone(),
            breaches: self.breaches.iter().cloned().collect(),
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

impl Handler<Impression> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: Impression, _ctx: &mut Self::Context) {
        self.metrics.monitor_queued.dec();
        let diversity = intra_list_diversity(&msg.items, &self.catalog.categories());
        let novelty = novelty(&msg.items, self.stream.popularity(), self.stream.events());
        let items = msg.items.len() as u64;
        self.totals
            .entry(ArmKey { version: msg.version.clone(), variant: msg.variant.clone() })
            .or_default()
            .impressions += 1;
        let bucket = self.variant(&msg.version, &msg.variant);
        bucket.impressions += 1;
        bucket.diversity_sum += diversity;
        bucket.novelty_sum += novelty;
        bucket.novelty_items += items;
        self.stream_bucket().impressed.extend(msg.items);
        self.metrics.monitor_impressions.inc();
    }
}

impl Handler<Outcome> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: Outcome, _ctx: &mut Self::Context) {
        self.metrics.monitor_queued.dec();
        if msg.kind == OutcomeKind::Click {
            self.totals
                .entry(ArmKey { version: msg.version.clone(), variant: msg.variant.clone() })
                .or_default()
                .clicks += 1;
        }
        let bucket = self.variant(&msg.version, &msg.variant);
        match msg.kind {
            OutcomeKind::Click => bucket.clicks += 1,
            OutcomeKind::Conversion => {
                bucket.conversions += 1;
                bucket.revenue += msg.value.unwrap_or(0.0);
            }
        }
        match msg.kind {
            OutcomeKind::Click => self.metrics.monitor_clicks.inc(),
            OutcomeKind::Conversion => self.metrics.monitor_conversions.inc(),
        }
    }
}

impl Handler<Activity> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: Activity, _ctx: &mut Self::Context) {
        self.metrics.monitor_queued.dec();
        let event = &msg.event;
        let tick = self.tick();
        if event.organic && !event.event_type.is_negative() {
            self.stream.count_organic(tick, event.item);
        }
        let bucket = self.stream.bucket(tick);
        if let Some(slot) = bucket.context.get_mut(event.segment) {
            *slot += 1;
        }
        let user = bucket.users.entry(msg.user).or_default();
        user.events += 1;
        if event.event_type == EventType::Purchase {
            user.revenue += event.value.unwrap_or(0.0);
        }
    }
}

impl Handler<GetReport> for MonitorActor {
    type Result = MessageResult<GetReport>;

    fn handle(&mut self, _msg: GetReport, _ctx: &mut Self::Context) -> Self::Result {
        let tick = self.tick();
        self.stream.advance(tick);
        for window in self.variants.values_mut() {
            window.advance(tick);
        }
        MessageResult(self.report())
    }
}

impl Handler<GetCounts> for MonitorActor {
    type Result = MessageResult<GetCounts>;

    fn handle(&mut self, _msg: GetCounts, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.totals.iter().map(|(arm, &tally)| (Arm::new(&*arm.version, &*arm.variant), tally)).collect())
    }
}

impl Handler<SetReference> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: SetReference, _ctx: &mut Self::Context) {
        let events: f64 = msg.reference.popularity.values().sum();
        if events < self.config.min_samples as f64 || msg.reference.context.len() != EventContext::SEGMENTS {
            // Too little to compare with: the next full window becomes the reference instead.
            tracing::info!(events, "training reference too small; the next full window becomes the reference");
            self.reference = None;
            self.started_tick = self.tick();
            return;
        }
        tracing::info!(source = %msg.source, events, "input-drift reference replaced");
        self.reference = Some(Reference { distributions: msg.reference, source: msg.source });
    }
}

impl Handler<AttachTrainer> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: AttachTrainer, _ctx: &mut Self::Context) {
        self.trainer = Some(msg.0);
    }
}
