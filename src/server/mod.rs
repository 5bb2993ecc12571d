//! The app builder: [`Server::start`] builds every part in a short sequence of named steps
//! (catalogue and model, threads, store, actors, bus and sessions, HTTP server) and runs it;
//! `main.rs` and the integration tests both use it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::{Actor, Addr, Arbiter};
use actix_web::{web, App, HttpServer};
use tokio::sync::watch;

use crate::actors;
use crate::actors::catalog_feed::{CatalogConsumer, CatalogFeed};
use crate::actors::ingest::IngestActor;
use crate::actors::kafka_ingest::KafkaIngestActor;
use crate::actors::model::{ConfigureRetrieval, ModelActor, ModelFactory, ModelHandle};
use crate::actors::monitor::MonitorActor;
use crate::actors::registry::SessionRegistry;
use crate::actors::session;
use crate::actors::trainer::source::TrainingSource;
use crate::actors::trainer::TrainerActor;
use crate::actors::SessionDeps;
use crate::bus::kafka::{self, KafkaBus};
use crate::bus::memory::MemoryBus;
use crate::bus::EventBus;
use crate::catalog::{Admission, Catalog};
use crate::cluster::lease::Lease;
use crate::cluster::record::ServingVersion;
use crate::cluster::{control as cluster_control, follow as cluster_follow, Cluster};
use crate::config::{BusKind, Config, ModelKind, StoreKind};
use crate::demo;
use crate::eventlog::EventLog;
use crate::http::{self, AppState};
use crate::models::registry::Registry;
use crate::models::Recommender;
use crate::models::{self, cooccurrence::CoocModel};
use crate::store::memory::{MemoryBounds, MemoryStore};
use crate::store::redis::{watch_ttl, FanoutHandle, FanoutMessage, RedisFanout, RedisStore, WatchTable};
use crate::store::{ProfileLimits, ProfileStore};
use crate::telemetry::Metrics;

mod catalog;
mod housekeeping;
mod monitor;
use housekeeping::{start_housekeeping, Threads as CachedThreads};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Registry(#[from] models::registry::RegistryError),
    #[error("privacy: {0}")]
    Privacy(String),
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::AuthConfigError),
    #[error("cluster: {0}")]
    Cluster(String),
}

/// A running liverec server.
pub struct Server {
    /// The address the HTTP server listens on (useful with port 0).
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    handle: actix_web::dev::ServerHandle,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    arbiters: Vec<Arbiter>,
    /// The Kafka consumer's thread, stopped first on a graceful stop (see [`Server::stop`]).
    ingest_arbiter: Option<Arbiter>,
    /// Held so the supervisor restarts a failed consumer: actix restarts a supervised actor only
    /// while some address of it is alive. Set once the catalogue is loaded (see [`start_bus`]).
    _kafka_ingest: Arc<OnceLock<actix::Addr<KafkaIngestActor>>>,
    /// The items topic's consumer (production mode), held for the same reason.
    _catalog_consumer: Option<actix::Addr<CatalogConsumer>>,
    /// The loop across instances (production mode): released on a graceful stop.
    cluster: Option<Arc<Cluster>>,
}

impl Server {
    /// Builds every part and starts serving. Must run inside an actix system (`#[actix_web::main]`
    /// or `#[actix_rt::test]`).
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let catalog = Arc::new(Catalog::with_admission(Admission {
            accept_unknown_items: config.catalog.accept_unknown_items,
            max_event_items: config.catalog.max_event_items,
        }));
        // The registry first: a wrong bucket or credential stops start-up before anything runs.
        let model_registry = Registry::open(&config.model)?;
        let initial = load_catalog_and_model(&config, &catalog, &model_registry)?;
        let threads = Threads::start(&config);
        let store = open_store(&config, &metrics, &threads.io)?;
        let pseudonyms =
            Arc::new(crate::privacy::Pseudonyms::new(&config.privacy).map_err(|e| StartError::Privacy(e.to_string()))?);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let cluster = start_cluster(&config, &metrics, &threads, shutdown_rx.clone()).await?;
        let online = model_factory(&config, &catalog, &model_registry, None);
        let serving =
            ServingVersion { name: initial.serving_name.clone(), version: initial.model.version().to_owned() };
        let actors = start_actors(
            &config,
            &catalog,
            &metrics,
            initial,
            &threads,
            &store,
            &pseudonyms,
            &model_registry,
            cluster.clone(),
            serving.clone(),
        );
        if let Some(cluster) = &cluster {
            follow_control(&config, cluster, &actors, &catalog, online, serving, &threads, &model_registry);
        }
        let deps = session_deps(&config, &catalog, &store, &metrics, actors.clone(), pseudonyms)?;
        let bus = start_bus(&config, deps, &threads, &metrics).await?;
        let event_log = actors.event_log.clone();
        let cached = CachedThreads::default();
        for thread in threads.handles.iter().chain([&threads.io.handle(), &threads.monitor.handle()]) {
            cached.add(thread.clone());
        }
        start_housekeeping(
            &config,
            store.clone(),
            event_log,
            bus.registry.clone(),
            metrics.clone(),
            cached.clone(),
            &threads.io,
        );
        let state = app_state(
            &config,
            catalog,
            store,
            metrics.clone(),
            actors,
            bus.bus,
            bus.registry,
            bus.items,
            shutdown_rx,
            model_registry,
            cluster.clone(),
        )?;
        let http = serve_http(&config, state, cached)?;
        let mut arbiters = threads.into_arbiters();
        arbiters.push(bus.catalog_arbiter);
        Ok(Server {
            addr: http.addr,
            metrics,
            handle: http.handle,
            shutdown: shutdown_tx,
            task: http.task,
            arbiters,
            ingest_arbiter: bus.ingest_arbiter,
            _kafka_ingest: bus.kafka_ingest,
            _catalog_consumer: bus.catalog_consumer,
            cluster,
        })
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: streams get a close frame (WebSocket) or a `shutdown` event (SSE), then the
    /// server stops accepting and waits for open requests up to the shutdown timeout.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        // Give stream tasks a moment to write their close frames before connections are dropped.
        tokio::task::yield_now().await;
        // The loop's lease is released (on the cluster thread) so that another instance leads at
        // its next try rather than after the lease's TTL.
        if let Some(cluster) = &self.cluster {
            let mut leadership = cluster.watch_leadership();
            let released = leadership.wait_for(|l| !l.leading);
            let _ = tokio::time::timeout(Duration::from_secs(2), released).await;
        }
        self.handle.stop(true).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        // The Kafka consumer leaves the group before anything else stops: dropping it closes it,
        // which revokes its partitions (waiting for in-flight batches, which needs the sessions
        // and the store still running, and committing them) and tells the group at once, so
        // another instance takes over now rather than after the session timeout.
        if let Some(ingest) = self.ingest_arbiter {
            ingest.stop();
            let joined = tokio::task::spawn_blocking(move || ingest.join());
            if tokio::time::timeout(Duration::from_secs(30), joined).await.is_err() {
                tracing::warn!("the kafka consumer did not close within 30 s; the group will time it out");
            }
        }
        for arbiter in self.arbiters {
            arbiter.stop();
        }
    }
}

/// Builds the serving model again after a model panicked on the model thread: a fresh online
/// model, or the same registry version reloaded (from the local cache when the registry is shared).
fn model_factory(config: &Config, catalog: &Arc<Catalog>, registry: &Registry, name: Option<String>) -> ModelFactory {
    let cooc = config.model.cooccurrence.clone();
    let (catalog, registry) = (catalog.clone(), registry.clone());
    Arc::new(move || -> Box<dyn Recommender> {
        if let Some(name) = &name {
            match registry.load(name, &catalog) {
                Ok(model) => return Box::new(model),
                Err(error) => tracing::error!(error = %error, "cannot reload the model; serving the online baseline"),
            }
        }
        Box::new(CoocModel::new(cooc.clone()))
    })
}

/// The model served from the start, how to build it again, and what start-up still owes it.
struct InitialModel {
    model: Box<dyn Recommender>,
    factory: ModelFactory,
    /// The registry version served (its directory name), if any.
    serving_name: Option<String>,
    /// Whether to train a demo sequential model in the background and swap it in.
    train_demo: bool,
}

/// Step 1, catalogue and model: loads the demo catalogue when the demo is on, then the model to
/// serve (the online co-occurrence model, warmed on demo sessions in the demo, or the sequential
/// model's registry version, with the online model while the registry is still empty).
fn load_catalog_and_model(
    config: &Config,
    catalog: &Arc<Catalog>,
    registry: &Registry,
) -> Result<InitialModel, StartError> {
    if config.demo.enabled {
        demo::load_catalog(catalog, config.demo.items, config.demo.seed);
    }
    let mut train_demo = false;
    let mut serving_name = None;
    let (model, factory): (Box<dyn Recommender>, ModelFactory) = match config.model.kind {
        ModelKind::Cooccurrence => {
            let mut model = CoocModel::new(config.model.cooccurrence.clone());
            if config.demo.enabled {
                let observations =
                    demo::warmup_observations(catalog, config.demo.items, config.demo.users, config.demo.seed);
                model.observe(&observations);
                tracing::info!(
                    items = catalog.len(),
                    sessions = observations.len(),
                    "demo catalogue loaded and model warmed"
                );
            }
            (Box::new(model), model_factory(config, catalog, registry, None))
        }
        ModelKind::Sequential => {
            models::keep_freed_memory();
            match registry.resolve(&config.model.version) {
                Ok(name) => {
                    let model = registry.load(&name, catalog)?;
                    tracing::info!(version = model.version(), name, registry = %registry, "sequential model loaded");
                    serving_name = Some(name.clone());
                    (Box::new(model), model_factory(config, catalog, registry, Some(name)))
                }
                // An empty registry: serve the online model at once. In the embedded demo, train
                // a small sequential model on the demo sessions in the background; otherwise
                // the trainer learns a first version from live traffic (the gate and the
                // canary judge it against the online model).
                Err(models::registry::RegistryError::Empty(_)) if config.demo.enabled || config.trainer.enabled => {
                    train_demo = config.demo.enabled;
                    let mut model = CoocModel::new(config.model.cooccurrence.clone());
                    if config.demo.enabled {
                        model.observe(&demo::warmup_observations(
                            catalog,
                            config.demo.items,
                            config.demo.users,
                            config.demo.seed,
                        ));
                    } else {
                        tracing::info!(
                            "model registry empty: serving the online model until a trained version is promoted"
                        );
                    }
                    (Box::new(model), model_factory(config, catalog, registry, None))
                }
                Err(error) => return Err(error.into()),
            }
        }
    };
    Ok(InitialModel { model, factory, serving_name, train_demo })
}

/// The threads the actors run on.
struct Threads {
    /// Session actors, the ingest actors and the model actor (on the first).
    sessions: Vec<Arbiter>,
    handles: Vec<actix::prelude::ArbiterHandle>,
    /// I/O that must never wait behind sessions: the store writer, the update fan-out.
    io: Arbiter,
    /// The monitor and the trainer: window arithmetic must not delay store writes.
    monitor: Arbiter,
    /// The loop's lease and the control topic's consumer (production mode).
    cluster: Arbiter,
}

impl Threads {
    /// Step 2: starts `session.arbiters` session threads (one per core when 0) and the I/O and
    /// monitor threads.
    fn start(config: &Config) -> Threads {
        let arbiter_count = match config.session.arbiters {
            0 => Config::cores(),
            n => n,
        };
        let sessions: Vec<Arbiter> = (0..arbiter_count).map(|_| Arbiter::new()).collect();
        let handles = sessions.iter().map(Arbiter::handle).collect();
        Threads { sessions, handles, io: Arbiter::new(), monitor: Arbiter::new(), cluster: Arbiter::new() }
    }

    /// Every thread, for [`Server::stop`] to stop.
    fn into_arbiters(self) -> Vec<Arbiter> {
        let mut arbiters = self.sessions;
        arbiters.extend([self.io, self.monitor, self.cluster]);
        arbiters
    }
}

/// Step 3, the profile store: in memory, or Redis with its writer on the I/O thread.
fn open_store(config: &Config, metrics: &Arc<Metrics>, io: &Arbiter) -> Result<Arc<dyn ProfileStore>, StartError> {
    let limits = ProfileLimits::of(config);
    Ok(match config.store.kind {
        StoreKind::Memory => {
            let bounds = MemoryBounds {
                max_profiles: config.store.memory_max_profiles,
                idle_ttl_secs: config.store.memory_idle_ttl_secs,
                max_tombstones: config.store.memory_max_tombstones,
            };
            Arc::new(MemoryStore::new(limits, bounds, metrics.clone()))
        }
        StoreKind::Redis => Arc::new(
            RedisStore::start(&config.redis, limits, metrics.clone(), &io.handle())
                .map_err(|e| StartError::Redis(e.to_string()))?,
        ),
    })
}

/// The actors below the sessions, and the event log they share.
#[derive(Clone)]
struct Actors {
    model: ModelHandle,
    monitor: Addr<MonitorActor>,
    monitor_inbox: Arc<actors::monitor::MonitorInbox>,
    trainer: Addr<TrainerActor>,
    event_log: Arc<EventLog>,
}

/// Step 4, the actors: the model actor (batched inference) on the first session thread, the
/// monitor and the trainer on the monitor thread, the monitor attached to the trainer; and, when
/// start-up owes it, the demo model's training in the background. The trainer reads its windows
/// from the in-memory event log, or with the Kafka bus from the events topic (tombstones from
/// `store`, user ids mapped by `pseudonyms` as the ingest maps them).
#[allow(clippy::too_many_arguments)] // the start-up's parts, each distinct
fn start_actors(
    config: &Arc<Config>,
    catalog: &Arc<Catalog>,
    metrics: &Arc<Metrics>,
    initial: InitialModel,
    threads: &Threads,
    store: &Arc<dyn ProfileStore>,
    pseudonyms: &Arc<crate::privacy::Pseudonyms>,
    registry: &Registry,
    cluster: Option<Arc<Cluster>>,
    serving: ServingVersion,
) -> Actors {
    let mut initial_model = initial.model;
    initial_model.configure_retrieval(&config.model.retrieval);
    let model = ModelActor::start_with(
        initial_model,
        initial.factory,
        catalog.clone(),
        metrics.clone(),
        config.model.max_batch,
        Duration::from_micros(config.model.max_wait_us),
        config.model.mailbox_capacity,
    );
    // Models swapped in later (retraining, rollouts, a model rebuilt after a panic) get the
    // same settings; sent before any request, so the first batch already has them.
    model.post(ConfigureRetrieval { config: config.model.retrieval.clone() });
    let monitor = MonitorActor::new(config.monitor.clone(), catalog.clone(), metrics.clone());
    let monitor_inbox = monitor.inbox();
    let monitor = MonitorActor::start_in_arbiter(&threads.monitor.handle(), move |_| monitor);
    let event_log = EventLog::new(config.trainer.window_secs, config.trainer.max_events);
    let source = match config.bus.kind {
        BusKind::Memory => TrainingSource::memory(event_log.clone(), config.trainer.window_secs),
        BusKind::Kafka => {
            TrainingSource::kafka(config, catalog.clone(), pseudonyms.clone(), store.clone(), threads.io.handle())
        }
    };
    let trainer = {
        let trainer = TrainerActor::new(
            config,
            catalog.clone(),
            source,
            model.clone(),
            monitor.clone(),
            metrics.clone(),
            initial.serving_name,
            registry.clone(),
        );
        let trainer = match cluster {
            Some(cluster) => trainer.with_cluster(cluster, serving),
            None => trainer,
        };
        TrainerActor::start_in_arbiter(&threads.monitor.handle(), move |_| trainer)
    };
    monitor.do_send(actors::monitor::AttachTrainer(trainer.clone().recipient()));
    if initial.train_demo {
        train_demo_model(config.clone(), catalog.clone(), trainer.clone(), registry.clone());
    }
    Actors { model, monitor, monitor_inbox, trainer, event_log }
}

/// The loop across instances (production mode with `cluster.enabled`): creates the control topic,
/// and holds (or tries to take) the loop's lease on the cluster thread until `shutdown`.
async fn start_cluster(
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    threads: &Threads,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<Arc<Cluster>>, StartError> {
    if !config.cluster_active() {
        return Ok(None);
    }
    let topic = config.cluster.control_topic_name(&config.kafka);
    if config.kafka.create_topics {
        cluster_control::ensure_topic(&config.kafka, &topic).await.map_err(|e| StartError::Kafka(e.to_string()))?;
    }
    let cluster = Cluster::new(config, metrics.clone()).map_err(|e| StartError::Cluster(e.to_string()))?;
    let lease = Lease::new(
        &config.redis,
        cluster.instance_id.clone(),
        cluster.advertise_url.clone(),
        Duration::from_millis(config.cluster.lease_ttl_ms),
    );
    tracing::info!(instance = %cluster.instance_id, topic = %topic, key = lease.leader_key(), "the loop runs across instances");
    let leasing = cluster.clone();
    threads.cluster.spawn_fn(move || {
        actix_rt::spawn(leasing.run_lease(lease, shutdown));
    });
    Ok(Some(cluster))
}

/// Every instance applies the desired serving state the leader publishes (see `actors::control`).
#[allow(clippy::too_many_arguments)] // the start-up's parts, each distinct
fn follow_control(
    config: &Arc<Config>,
    cluster: &Arc<Cluster>,
    actors: &Actors,
    catalog: &Arc<Catalog>,
    online: ModelFactory,
    serving: ServingVersion,
    threads: &Threads,
    registry: &Registry,
) {
    let applier = actors::control::ControlApplier::new(
        actors.model.clone(),
        registry.clone(),
        catalog.clone(),
        online,
        serving,
        actors.trainer.clone().recipient(),
    );
    let (kafka, topic, cluster) =
        (config.kafka.clone(), config.cluster.control_topic_name(&config.kafka), cluster.clone());
    threads.cluster.spawn_fn(move || {
        let applier = std::rc::Rc::new(tokio::sync::Mutex::new(applier));
        actix_rt::spawn(cluster_follow::follow(kafka, topic, cluster, move |state| {
            let applier = applier.clone();
            async move { applier.lock().await.apply(state).await }
        }));
    });
}

/// Trains the demo's sequential model on a thread of its own and asks the trainer to promote it.
fn train_demo_model(config: Arc<Config>, catalog: Arc<Catalog>, trainer: Addr<TrainerActor>, registry: Registry) {
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let trained = demo::train_sequential(
            &catalog,
            config.demo.items,
            config.demo.users,
            config.demo.seed,
            &registry.staging_dir(),
        )
        .and_then(|path| registry.publish(&path, "demo").map(|_| path).map_err(|e| e.to_string()));
        match trained {
            Ok(path) => {
                tracing::info!(
                    path = %path.display(),
                    seconds = started.elapsed().as_secs_f64(),
                    "demo sequential model trained; swapping it in"
                );
                trainer.do_send(actors::trainer::rollout::Promote {
                    name: path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    reason: "demo model trained at start-up".into(),
                });
            }
            Err(error) => tracing::error!(error = %error, "demo sequential model not trained"),
        }
    });
}

/// What every session shares: configuration, catalogue, store, the actors below, the event log
/// and the pseudonymiser.
fn session_deps(
    config: &Arc<Config>,
    catalog: &Arc<Catalog>,
    store: &Arc<dyn ProfileStore>,
    metrics: &Arc<Metrics>,
    actors: Actors,
    pseudonyms: Arc<crate::privacy::Pseudonyms>,
) -> Result<Arc<SessionDeps>, StartError> {
    Ok(Arc::new(SessionDeps {
        config: config.clone(),
        catalog: catalog.clone(),
        store: store.clone(),
        model: actors.model,
        monitor: actors.monitor,
        monitor_inbox: actors.monitor_inbox,
        metrics: metrics.clone(),
        event_log: actors.event_log,
        cold_lists: Arc::new(crate::actors::cold_lists::ColdLists::new(crate::actors::cold_lists::COLD_LISTS_KEPT)),
        pseudonyms,
    }))
}

/// The event bus and the session registry that consumes it, and the catalogue's feed.
struct Bus {
    bus: Arc<dyn EventBus>,
    registry: Arc<SessionRegistry>,
    /// The supervised Kafka consumer (with the Kafka bus), once started.
    kafka_ingest: Arc<OnceLock<Addr<KafkaIngestActor>>>,
    /// The Kafka consumer's thread.
    ingest_arbiter: Option<Arbiter>,
    /// Where catalogue changes go.
    items: Arc<CatalogFeed>,
    /// The supervised items topic consumer (with the Kafka bus), and its thread.
    catalog_consumer: Option<Addr<CatalogConsumer>>,
    catalog_arbiter: Arbiter,
}

/// Step 5, the bus and the sessions: in process (one ingest actor per partition, spread over
/// the session threads), or Kafka (the supervised consumer on a thread of its own, lists fanned
/// out to other instances through Redis); and the catalogue's feed (see `catalog.rs`).
async fn start_bus(
    config: &Arc<Config>,
    deps: Arc<SessionDeps>,
    threads: &Threads,
    metrics: &Arc<Metrics>,
) -> Result<Bus, StartError> {
    let handles = &threads.handles;
    let catalog = deps.catalog.clone();
    let catalog_arbiter = Arbiter::new();
    match config.bus.kind {
        BusKind::Memory => {
            let registry = SessionRegistry::new(deps, handles.clone(), Arc::new(session::start));
            let (memory, queues) =
                MemoryBus::new(config.bus.partitions, config.bus.queue_capacity, config.bus.queue_events);
            for (partition, queue) in queues.into_iter().enumerate() {
                let registry = registry.clone();
                let arbiter = &handles[partition % handles.len()];
                IngestActor::start_in_arbiter(arbiter, move |_| IngestActor::new(partition, registry, queue));
            }
            let (items, _) = catalog::start_feed(config, catalog, &registry, metrics, None, &catalog_arbiter);
            Ok(Bus {
                bus: Arc::new(memory),
                registry,
                kafka_ingest: Arc::default(),
                ingest_arbiter: None,
                items,
                catalog_consumer: None,
                catalog_arbiter,
            })
        }
        BusKind::Kafka => {
            let watches = Arc::new(WatchTable::new(watch_ttl(&config.redis)));
            let (fanout, fanout_rx) = FanoutHandle::new(watches.clone());
            let registry = SessionRegistry::with_mode(
                deps,
                handles.clone(),
                Arc::new(session::start),
                true,
                Some(Arc::new(fanout)),
            );
            let (delivering, watching) = (registry.clone(), registry.clone());
            threads.io.handle().spawn(RedisFanout::run(
                config.redis.clone(),
                fanout_rx,
                watches,
                move || watching.users_with_subscribers(),
                move |message| match message {
                    FanoutMessage::List(list) => delivering.deliver_remote(list),
                    FanoutMessage::Erased(user) => {
                        let registry = delivering.clone();
                        tokio::spawn(async move { registry.erase(&user).await });
                    }
                    FanoutMessage::Watched(user) => delivering.watch_appeared(&user),
                },
                metrics.clone(),
            ));
            if config.kafka.create_topics {
                kafka::ensure_topics(&config.kafka).await.map_err(|e| StartError::Kafka(e.to_string()))?;
            }
            let kafka_bus = KafkaBus::new(&config.kafka).map_err(|e| StartError::Kafka(e.to_string()))?;
            let producer = kafka_bus.producer().clone();
            monitor::start_cluster_monitor(config, registry.deps.monitor.clone(), &threads.monitor.handle(), metrics)
                .await
                .map_err(StartError::Kafka)?;
            let (kafka_config, ingest_registry, ingest_metrics) =
                (config.kafka.clone(), registry.clone(), metrics.clone());
            let limits = config.events.limits();
            let (items, catalog_consumer) =
                catalog::start_feed(config, catalog, &registry, metrics, Some(producer.clone()), &catalog_arbiter);
            // Its own thread: on a revoke the consumer blocks until in-flight events are
            // durable, which needs the store writer on the io thread to keep running.
            let ingest = Arbiter::new();
            let kafka_ingest = catalog::start_when_loaded(&ingest, &items, move || {
                KafkaIngestActor::new(kafka_config, ingest_registry, producer, ingest_metrics, limits)
            });
            Ok(Bus {
                bus: Arc::new(kafka_bus),
                registry,
                kafka_ingest,
                ingest_arbiter: Some(ingest),
                items,
                catalog_consumer,
                catalog_arbiter,
            })
        }
    }
}

/// What every HTTP handler reaches: the parts built so far, the authenticator and the rate
/// limiters, and the shutdown signal streams watch.
#[allow(clippy::too_many_arguments)]
fn app_state(
    config: &Arc<Config>,
    catalog: Arc<Catalog>,
    store: Arc<dyn ProfileStore>,
    metrics: Arc<Metrics>,
    actors: Actors,
    bus: Arc<dyn EventBus>,
    registry: Arc<SessionRegistry>,
    items: Arc<CatalogFeed>,
    shutdown: watch::Receiver<bool>,
    model_registry: Registry,
    cluster: Option<Arc<Cluster>>,
) -> Result<AppState, StartError> {
    let auth = Arc::new(crate::auth::Auth::new(&config.auth, config.demo.enabled)?);
    if !auth.enabled() && !config.demo.enabled {
        tracing::warn!("auth is off (auth.mode = \"off\"): anyone who reaches the port may read and write");
    }
    Ok(AppState {
        monitor: actors.monitor,
        trainer: actors.trainer,
        auth,
        limiters: Arc::new(http::limits::Limiters::new(&config.limits)),
        config: config.clone(),
        pseudonyms: registry.deps.pseudonyms.clone(),
        event_log: registry.deps.event_log.clone(),
        lists: http::segment_lists::SegmentLists::start(
            config.recs.lists_refresh_secs,
            catalog.clone(),
            registry.deps.event_log.clone(),
            shutdown.clone(),
        ),
        registry,
        bus,
        store,
        catalog,
        items,
        metrics,
        shutdown,
        model_registry,
        cluster,
    })
}

/// The running HTTP server.
struct Http {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Step 6, the HTTP server: binds `server.listen`, serves the routes with the error handlers,
/// rate limits and CORS, and runs on its own task.
fn serve_http(config: &Config, state: AppState, cached: CachedThreads) -> Result<Http, StartError> {
    let workers = match config.server.workers {
        0 => Config::cores(),
        n => n,
    };
    let addr = config.server.listen;
    let cors_origins = config.auth.allowed_origins.clone();
    let open_files = http::limits::raise_open_file_limit();
    let max_connections = http::limits::max_connections(&config.limits, open_files);
    let connections = Arc::new(http::limits::Connections::new(&config.limits, max_connections));
    let registry = state.model_registry.to_string();
    let server = HttpServer::new(move || {
        // Runs once on each worker thread as it starts.
        cached.add(actix_rt::Arbiter::current());
        App::new()
            .app_data(web::Data::new(state.clone()))
            .wrap(
                actix_web::middleware::ErrorHandlers::new()
                    .handler(actix_web::http::StatusCode::METHOD_NOT_ALLOWED, http::method_not_allowed),
            )
            .wrap(actix_web::middleware::from_fn(http::middleware::limit))
            .wrap(http::cors(&cors_origins))
            .configure(http::configure)
            .default_service(web::to(http::not_found))
    })
    // Each connection is counted (per IP and in all) from accept to close; accepting pauses at
    // the cap, shared out among the workers.
    .on_connect(move |conn, data| {
        let ip = conn.downcast_ref::<actix_web::rt::net::TcpStream>().and_then(|s| s.peer_addr().ok()).map(|a| a.ip());
        data.insert(connections.open(ip));
    })
    .max_connections(max_connections.div_ceil(workers).max(1))
    .client_request_timeout(Duration::from_millis(config.server.client_request_timeout_ms))
    .client_disconnect_timeout(Duration::from_millis(config.server.client_disconnect_timeout_ms))
    .workers(workers)
    .backlog(config.server.backlog)
    .disable_signals()
    .shutdown_timeout(config.server.shutdown_timeout_secs)
    .bind(addr)
    .map_err(|source| StartError::Bind { addr, source })?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(max_connections, open_files = open_files.unwrap_or(0), "connection cap");
    tracing::info!(addr = %bound, dashboard = %format!("http://{bound}/"), registry = %registry, store = %format!("{:?}", config.store.kind), bus = %format!("{:?}", config.bus.kind), "liverec listening");
    Ok(Http { addr: bound, handle, task })
}
