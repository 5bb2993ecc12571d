//! The instruments behind [`super::Metrics`] and the registrar that declares them: each
//! declaration creates the instrument, records its family, and hands the instrument back, so a
//! metric is named, described and labelled in one place.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

/// A monotonic count, observed by an OpenTelemetry observable counter at collection.
#[derive(Default, Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A level that goes up and down, observed by an OpenTelemetry observable gauge.
#[derive(Default, Debug, Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A floating-point level (stored as bits), observed by an OpenTelemetry observable gauge.
#[derive(Default, Debug, Clone)]
pub struct FloatGauge(Arc<AtomicU64>);

impl FloatGauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A monotonic floating-point total that the process reads from elsewhere (the kernel's account
/// of its CPU time) and sets at each scrape, observed by an OpenTelemetry observable counter.
#[derive(Default, Debug, Clone)]
pub struct FloatCounter(Arc<AtomicU64>);

impl FloatCounter {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// An OpenTelemetry histogram with explicit buckets (in the metric's unit), and the labels of
/// this series.
#[derive(Clone)]
pub struct Histogram {
    instrument: opentelemetry::metrics::Histogram<f64>,
    labels: Arc<[KeyValue]>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("labels", &self.labels).finish()
    }
}

impl Histogram {
    pub fn observe(&self, value: f64) {
        self.instrument.record(value, &self.labels);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }
}

/// Latency buckets, 100 µs to 10 s.
pub const LATENCY_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Bounds for training runs, in seconds.
pub const TRAINING_BOUNDS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Batch-size buckets.
pub const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The labels of one series: low cardinality (a source, a kind, a stage), never an id.
pub(super) type Labels = &'static [(&'static str, &'static str)];

/// A metric family: the name Prometheus shows (given whole, the exporter adds no suffix) and its
/// help text. A family with several labelled series is named once and its series declared in it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Family {
    pub name: &'static str,
    pub help: &'static str,
}

impl Family {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Family { name, help }
    }
}

/// A value read by an OpenTelemetry observable instrument when a scrape collects it.
trait Observed: Clone + Send + Sync + 'static {
    /// The Prometheus type of the family.
    const KIND: &'static str;
    /// Registers one observable instrument that reports every series of `family`.
    fn register(meter: &Meter, family: Family, series: Vec<(Vec<KeyValue>, Self)>);
}

impl Observed for Counter {
    const KIND: &'static str = "counter";
    fn register(meter: &Meter, family: Family, series: Vec<(Vec<KeyValue>, Self)>) {
        meter
            .u64_observable_counter(family.name)
            .with_description(family.help)
            .with_callback(move |observer| {
                for (labels, counter) in &series {
                    observer.observe(counter.get(), labels);
                }
            })
            .build();
    }
}

impl Observed for Gauge {
    const KIND: &'static str = "gauge";
    fn register(meter: &Meter, family: Family, series: Vec<(Vec<KeyValue>, Self)>) {
        meter
            .i64_observable_gauge(family.name)
            .with_description(family.help)
            .with_callback(move |observer| {
                for (labels, gauge) in &series {
                    observer.observe(gauge.get(), labels);
                }
            })
            .build();
    }
}

impl Observed for FloatGauge {
    const KIND: &'static str = "gauge";
    fn register(meter: &Meter, family: Family, series: Vec<(Vec<KeyValue>, Self)>) {
        meter
            .f64_observable_gauge(family.name)
            .with_description(family.help)
            .with_callback(move |observer| {
                for (labels, gauge) in &series {
                    observer.observe(gauge.get(), labels);
                }
            })
            .build();
    }
}

impl Observed for FloatCounter {
    const KIND: &'static str = "counter";
    fn register(meter: &Meter, family: Family, series: Vec<(Vec<KeyValue>, Self)>) {
        meter
            .f64_observable_counter(family.name)
            .with_description(family.help)
            .with_callback(move |observer| {
                for (labels, counter) in &series {
                    observer.observe(counter.get(), labels);
                }
            })
            .build();
    }
}

/// The series of one observed family, gathered until [`Registrar::finish`] registers them.
struct Pending<T> {
    family: Family,
    series: Vec<(Vec<KeyValue>, T)>,
}

/// Declares instruments on one meter and hands each back. Observed families (counters, gauges)
/// are registered once all their series are known, in [`Registrar::finish`], because one
/// OpenTelemetry instrument reports every series of a family; histograms are built at once.
pub(super) struct Registrar {
    meter: Meter,
    /// Every family declared, in order: (name, Prometheus type).
    families: RefCell<Vec<(&'static str, &'static str)>>,
    counters: RefCell<Vec<Pending<Counter>>>,
    gauges: RefCell<Vec<Pending<Gauge>>>,
    float_gauges: RefCell<Vec<Pending<FloatGauge>>>,
    float_counters: RefCell<Vec<Pending<FloatCounter>>>,
}

fn key_values(labels: Labels) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect()
}

impl Registrar {
    pub fn new(meter: Meter) -> Self {
        Registrar {
            meter,
            families: RefCell::default(),
            counters: RefCell::default(),
            gauges: RefCell::default(),
            float_gauges: RefCell::default(),
            float_counters: RefCell::default(),
        }
    }

    fn declare(&self, name: &'static str, kind: &'static str) {
        let mut families = self.families.borrow_mut();
        if !families.iter().any(|(n, _)| *n == name) {
            families.push((name, kind));
        }
    }

    /// Adds `instrument` as the series `labels` of `family`, and hands it back.
    fn observe<T: Observed>(
        &self,
        pending: &RefCell<Vec<Pending<T>>>,
        family: Family,
        labels: Labels,
        instrument: T,
    ) -> T {
        self.declare(family.name, T::KIND);
        let mut pending = pending.borrow_mut();
        let series = (key_values(labels), instrument.clone());
        match pending.iter_mut().find(|p| p.family.name == family.name) {
            Some(p) => {
                debug_assert_eq!(p.family.help, family.help, "one help text per family");
                p.series.push(series);
            }
            None => pending.push(Pending { family, series: vec![series] }),
        }
        instrument
    }

    /// A counter without labels, in a family of its own.
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.counter_in(Family::new(name, help), &[])
    }

    /// One labelled series of a counter family.
    pub fn counter_in(&self, family: Family, labels: Labels) -> Counter {
        self.observe(&self.counters, family, labels, Counter::default())
    }

    /// Reports an existing counter as a series of another family too.
    pub fn counter_also_in(&self, family: Family, labels: Labels, counter: &Counter) {
        self.observe(&self.counters, family, labels, counter.clone());
    }

    /// A gauge without labels, in a family of its own.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        self.gauge_in(Family::new(name, help), &[])
    }

    /// One labelled series of a gauge family.
    pub fn gauge_in(&self, family: Family, labels: Labels) -> Gauge {
        self.observe(&self.gauges, family, labels, Gauge::default())
    }

    /// A floating-point gauge without labels, in a family of its own.
    pub fn float_gauge(&self, name: &'static str, help: &'static str) -> FloatGauge {
        self.float_gauge_in(Family::new(name, help), &[])
    }

    /// One labelled series of a floating-point gauge family.
    pub fn float_gauge_in(&self, family: Family, labels: Labels) -> FloatGauge {
        self.observe(&self.float_gauges, family, labels, FloatGauge::default())
    }

    /// A floating-point counter without labels, in a family of its own (see [`FloatCounter`]).
    pub fn float_counter(&self, name: &'static str, help: &'static str) -> FloatCounter {
        self.observe(&self.float_counters, Family::new(name, help), &[], FloatCounter::default())
    }

    /// A histogram without labels, with explicit `bounds`.
    pub fn histogram(&self, name: &'static str, help: &'static str, bounds: &[f64]) -> Histogram {
        self.histogram_in(Family::new(name, help), bounds, &[])
    }

    /// One labelled series of a histogram family.
    pub fn histogram_in(&self, family: Family, bounds: &[f64], labels: Labels) -> Histogram {
        self.declare(family.name, "histogram");
        let instrument = self
            .meter
            .f64_histogram(family.name)
            .with_description(family.help)
            .with_boundaries(bounds.to_vec())
            .build();
        Histogram { instrument, labels: key_values(labels).into() }
    }

    /// Registers every observed family and returns the families declared, in order.
    pub fn finish(self) -> Vec<(&'static str, &'static str)> {
        fn register<T: Observed>(meter: &Meter, pending: RefCell<Vec<Pending<T>>>) {
            for Pending { family, series } in pending.into_inner() {
                T::register(meter, family, series);
            }
        }
        register(&self.meter, self.counters);
        register(&self.meter, self.gauges);
        register(&self.meter, self.float_gauges);
        register(&self.meter, self.float_counters);
        self.families.into_inner()
    }
}
