//! Applying events to user sessions, without HTTP: the per-event work of the server between
//! "an event was received" and "a fresh list is published to the user's subscribers".
//!
//! Why this level: the pure per-event functions of `SessionActor` are private, and what costs is
//! the actor path itself (mailbox hop to the session's arbiter thread, dedupe, ring buffer, store
//! append, model and monitor messages, re-ranking on the model thread, list serialisation).
//! So the bench builds the same parts `Server::start` builds for the embedded default (demo
//! catalogue of 2,000 items, co-occurrence model warmed on 3,000 demo sessions, in-memory store,
//! model thread, monitor, one session arbiter thread) inside an actix
//! `System`, and talks to sessions through the `SessionRegistry`, as the ingest actors do:
//!
//! - `apply/{n}`: `ApplyEvents` with `n` events for one user, until the session answers and the
//!   store write is done (the memory store completes at once). Users rotate over 1,000 live
//!   sessions. Re-ranking that the events trigger runs meanwhile on the model thread and is
//!   not waited for (it competes for the CPU, as in the server).
//! - `event_to_list`: one event, until the hub publishes a list whose `last_event_id` is that
//!   event: apply + scoring by the model + serialising the list once for every stream kind. This
//!   is the server-side part of event-to-push latency, with no sockets.
//!
//! `elements/s` are events/s. Run: `cargo bench --bench session`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Arbiter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use liverec::actors::messages::ApplyEvents;
use liverec::actors::model::{ModelActor, ModelFactory};
use liverec::actors::monitor::MonitorActor;
use liverec::actors::registry::SessionRegistry;
use liverec::actors::SessionDeps;
use liverec::catalog::Catalog;
use liverec::config::Config;
use liverec::event::{now_ms, Event, EventIn, EventLimits, EventType, UserId};
use liverec::eventlog::EventLog;
use liverec::models::cooccurrence::CoocModel;
use liverec::models::Recommender;
use liverec::store::memory::{MemoryBounds, MemoryStore};
use liverec::store::ProfileLimits;
use liverec::telemetry::Metrics;

const ITEMS: usize = 2000;
const USERS: usize = 1000;
const BATCHES: [usize; 3] = [1, 16, 256];

/// Unique event ids across the whole bench (sessions drop repeated ids).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn event(user: &UserId, limits: &EventLimits) -> Event {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut wire = EventIn::new(user.as_str(), format!("item-{:04}", (n * 31) % ITEMS as u64), EventType::View);
    wire.event_id = Some(format!("bench-{n}"));
    wire.validate(limits, now_ms()).expect("a valid event")
}

/// The embedded default's session machinery (see `Server::start`), without HTTP and bus.
fn registry(config: Config, session_arbiter: &Arbiter) -> Arc<SessionRegistry> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let catalog = Arc::new(Catalog::new());
    liverec::demo::load_catalog(&catalog, ITEMS, config.demo.seed);
    let mut model = CoocModel::new(config.model.cooccurrence.clone());
    model.observe(&liverec::demo::warmup_observations(&catalog, ITEMS, 3000, config.demo.seed));
    let cooc = config.model.cooccurrence.clone();
    let factory: ModelFactory = Arc::new(move || -> Box<dyn Recommender> { Box::new(CoocModel::new(cooc.clone())) });
    let model = ModelActor::start_with(
        Box::new(model),
        factory,
        catalog.clone(),
        metrics.clone(),
        config.model.max_batch,
        Duration::from_micros(config.model.max_wait_us),
        config.model.mailbox_capacity,
    );
    let monitor = MonitorActor::new(config.monitor.clone(), catalog.clone(), metrics.clone());
    let monitor_inbox = monitor.inbox();
    let monitor = monitor.start();
    let limits = ProfileLimits::of(&config);
    let deps = Arc::new(SessionDeps {
        event_log: EventLog::new(config.trainer.window_secs, config.trainer.max_events),
        store: Arc::new(MemoryStore::new(limits, MemoryBounds::UNBOUNDED, metrics.clone())),
        config,
        catalog,
        model,
        monitor,
        monitor_inbox,
        metrics,
        pseudonyms: Default::default(),
        cold_lists: Arc::new(liverec::actors::cold_lists::ColdLists::new(0)),
    });
    SessionRegistry::new(deps, vec![session_arbiter.handle()], Arc::new(liverec::actors::session::start))
}

fn bench_session(c: &mut Criterion) {
    let system = actix::System::new();
    let session_arbiter = Arbiter::new();
    let mut config = Config::default();
    config.log.level = "warn".into();
    let limits = config.events.limits();
    let registry = system.block_on(async { registry(config, &session_arbiter) });
    let users: Vec<UserId> = (0..USERS).map(|u| UserId::from(format!("bench-user-{u}").as_str())).collect();
    // Start every session, each with a little history, before measuring.
    system.block_on(async {
        for user in &users {
            let (_, session) = registry.session(user);
            let events = (0..5).map(|_| event(user, &limits)).collect();
            let applied = session
                .apply(ApplyEvents { events, received: Instant::now(), span: tracing::Span::none() })
                .await
                .expect("applied");
            applied.persisted.await;
        }
    });

    let mut group = c.benchmark_group("session");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("apply", batch), &batch, |b, &batch| {
            let mut next_user = 0usize;
            b.iter_custom(|iters| {
                system.block_on(async {
                    let mut busy = Duration::ZERO;
                    for _ in 0..iters {
                        let user = &users[next_user % USERS];
                        next_user += 1;
                        let events: Vec<Event> = (0..batch).map(|_| event(user, &limits)).collect();
                        let started = Instant::now();
                        let (_, session) = registry.session(user);
                        let applied = session
                            .apply(ApplyEvents { events, received: started, span: tracing::Span::none() })
                            .await
                            .expect("applied");
                        applied.persisted.await;
                        busy += started.elapsed();
                    }
                    busy
                })
            })
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("event_to_list", |b| {
        let mut next_user = 0usize;
        b.iter_custom(|iters| {
            system.block_on(async {
                let mut busy = Duration::ZERO;
                for _ in 0..iters {
                    let user = &users[next_user % USERS];
                    next_user += 1;
                    let (mut subscription, session) = registry.subscribe(user);
                    let session = session.expect("the embedded mode runs sessions");
                    let event = event(user, &limits);
                    let id = event.event_id.clone();
                    let started = Instant::now();
                    let _ = session
                        .apply(ApplyEvents { events: vec![event], received: started, span: tracing::Span::none() })
                        .await
                        .expect("applied");
                    let receiver = subscription.receiver();
                    loop {
                        let reflected = receiver
                            .borrow_and_update()
                            .as_ref()
                            .is_some_and(|update| update.list.last_event_id.as_ref() == Some(&id));
                        if reflected {
                            break;
                        }
                        receiver.changed().await.expect("the hub lives while subscribed");
                    }
                    busy += started.elapsed();
                }
                busy
            })
        })
    });
    group.finish();
    session_arbiter.stop();
}

criterion_group!(benches, bench_session);
criterion_main!(benches);
