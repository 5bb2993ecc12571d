//! The monitor's per-message cost against the size of its window: an `Impression` (intra-list
//! diversity, novelty under the window's item popularity, the arm's counts) and an `Activity`
//! (item popularity, context mix, the user's bucket), with the window already holding organic
//! events on `n` distinct items (1,000 and 100,000).
//!
//! Each iteration `send`s one message to a running `MonitorActor` and awaits its handling, so a
//! figure includes the mailbox round trip (a few microseconds); what must not show is a cost that
//! grows with `n`. Default monitor config (a 300 s window in 10 s buckets), so nothing the setup
//! counted leaves the window during a run.
//!
//! `elements/s` are messages/s. Run: `cargo bench --bench monitor`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use liverec::actors::monitor::{Activity, Impression, MonitorActor, Reported};
use liverec::catalog::{Catalog, ItemIdx};
use liverec::config::Config;
use liverec::event::{EventId, EventType, ItemId, UserId};
use liverec::eventlog::{Interaction, LoggedEvent};
use liverec::telemetry::Metrics;

const DISTINCT: [u32; 2] = [1_000, 100_000];
const LIST_LEN: usize = 10;

fn activity(n: u64, item: ItemIdx) -> Activity {
    let event = LoggedEvent {
        user: UserId::from("bench-user"),
        interaction: Interaction {
            event_id: EventId::from(format!("bench-{n}").as_str()),
            item_id: ItemId::from("bench-item"),
            event_type: EventType::View,
            value: None,
            timestamp: 0,
            rec_id: None,
        },
        item,
        segment: (n % 8) as usize,
        organic: true,
        logged_at: 0,
    };
    Activity { user: n % 5_000, event: Arc::new(event) }
}

/// A monitor whose window holds two organic events on each of `distinct` items.
async fn monitor(distinct: u32) -> Addr<MonitorActor> {
    let catalog = Arc::new(Catalog::new());
    liverec::demo::load_catalog(&catalog, 2_000, 7);
    let monitor = MonitorActor::new(Config::default().monitor, catalog, Arc::new(Metrics::default())).start();
    for n in 0..2 * u64::from(distinct) {
        monitor.send(Reported::from(activity(n, (n % u64::from(distinct)) as ItemIdx))).await.expect("monitor runs");
    }
    monitor
}

fn bench_monitor(c: &mut Criterion) {
    let system = actix::System::new();
    let mut group = c.benchmark_group("monitor");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for distinct in DISTINCT {
        let addr = system.block_on(monitor(distinct));
        group.bench_with_input(BenchmarkId::new("impression", distinct), &distinct, |b, &distinct| {
            let mut next = 0u32;
            b.iter_custom(|iters| {
                system.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        next = next.wrapping_add(1);
                        let items = (0..LIST_LEN as u32).map(|k| (next * 7 + k * 13) % distinct).collect();
                        let impression = Impression { version: "bench".into(), variant: "control".into(), items };
                        addr.send(Reported::from(impression)).await.expect("monitor runs");
                    }
                    started.elapsed()
                })
            })
        });
        group.bench_with_input(BenchmarkId::new("activity", distinct), &distinct, |b, &distinct| {
            let mut next = 0u64;
            b.iter_custom(|iters| {
                system.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        next += 1;
                        addr.send(Reported::from(activity(next, (next * 7 % u64::from(distinct)) as ItemIdx)))
                            .await
                            .expect("monitor runs");
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_monitor);
criterion_main!(benches);
