//! `ModelActor`: collects scoring requests and observations from sessions into batches and runs
//! them on a dedicated inference thread, so arbiter threads never do model work.
//!
//! Batching is opportunistic: a request that arrives while the model is idle is flushed as soon as
//! the mailbox has been drained (no timer, no added latency); requests that arrive while a batch
//! runs wait for it and go together in the next one, up to `model.max_batch`.
//!
//! Mailbox: `model.mailbox_capacity`; sessions `send` (and wait) for scoring and `try_send`
//! observations, counting refusals. The handlers move messages out of the mailbox at once, so the
//! same capacity bounds what waits for a batch: a scoring request that finds that many queued is
//! answered at once with [`ModelError::Overloaded`] (HTTP: `503` with `Retry-After`), and an
//! observation that finds that many is dropped; both count in `liverec_model_refused_total`.
//! Observations usually arrive inside the scoring request that follows them.
//!
//! Restart policy: none needed; the actor holds no state that outlives a batch. The inference
//! worker is a `SyncArbiter` thread; a model that panics is caught there (actix's sync threads do
//! not catch panics themselves), its batch answered with [`ModelError::Stopped`], and the worker
//! stopped, which makes actix start a fresh one with a model from the factory (a challenger that
//! was running is not restored).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::catalog::{Catalog, ItemIdx};
use crate::config::RetrievalConfig;
use crate::models::retrieval::Source;
use crate::models::{ItemFilter, Observation, Recommender, ScoreRequest, Scored};
use crate::recs::CONTROL;
use crate::telemetry::Metrics;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("the model worker stopped")]
    Stopped,
    /// `model.mailbox_capacity` requests already wait for a batch.
    #[error("the model is overloaded")]
    Overloaded,
}

/// Scored items for one request, with the version of the model that produced them and the
/// experiment variant the user was in.
#[derive(Debug, Clone)]
pub struct ScoredList {
    pub items: Vec<Scored>,
    pub version: Arc<str>,
    pub variant: Arc<str>,
}

/// Rank items for one user.
#[derive(Message, Debug)]
#[rtype(result = "Result<ScoredList, ModelError>")]
pub struct Recommend {
    pub request: ScoreRequest,
    /// [`crate::bus::user_hash`] of the user: decides which variant serves them while a canary or an
    /// experiment runs.
    pub user: u64,
    /// New interactions for models that learn online, as an [`Observe`] would bring them: a
    /// session that has just applied events sends them with its scoring request, one message
    /// instead of two. Observed before the request is scored.
    pub observation: Option<Observation>,
}

/// Where a user falls in `[0, 1)` for the split salted with `salt` (a new salt reshuffles who
/// is in which variant, so consecutive canaries do not always hit the same users).
pub fn traffic_bucket(user: u64, salt: u64) -> f64 {
    // splitmix64 finaliser: spreads FNV's low-entropy high bits.
    let mut z = user ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// New interactions for models that learn online.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Observe {
    pub observation: Observation,
}

type Reply = oneshot::Sender<Result<ScoredList, ModelError>>;

/// Pending scoring requests: the request, the user's hash, and where the answer goes.
type Pending = (ScoreRequest, u64, Reply);

pub struct ModelActor {
    worker: Addr<InferenceWorker>,
    /// The `[model.retrieval]` settings, shared with the inference thread (and applied to every
    /// model it serves, a restarted thread's included).
    retrieval: Arc<Mutex<RetrievalConfig>>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    /// How long a lone request may wait for company (0: flush as soon as the mailbox is drained).
    max_wait: std::time::Duration,
    /// Bounds the mailbox, and the requests and the observations waiting for a batch.
    mailbox_capacity: usize,
    pending: VecDeque<Pending>,
    observations: Vec<Observation>,
    flush_scheduled: bool,
    inflight: bool,
}

/// Builds a model; used again if the inference thread has to start over.
pub type ModelFactory = Arc<dyn Fn() -> Box<dyn Recommender> + Send + Sync>;

impl ModelActor {
    /// Starts the inference thread with `model` (or the factory's, on restart) and the batching
    /// actor on `arbiter`.
    #[allow(clippy::too_many_arguments)] // each is a distinct setting; a struct would only rename them
    pub fn start_with(
        model: Box<dyn Recommender>,
        factory: ModelFactory,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        max_batch: usize,
        max_wait: std::time::Duration,
        mailbox_capacity: usize,
        arbiter: &ArbiterHandle,
    ) -> Addr<ModelActor> {
        let first = Arc::new(Mutex::new(Some(model)));
        let actor_metrics = metrics.clone();
        let retrieval = Arc::new(Mutex::new(RetrievalConfig::default()));
        let worker_retrieval = retrieval.clone();
        let worker = SyncArbiter::start(1, move || {
            let mut control = first.lock().take().unwrap_or_else(|| factory());
            let config = worker_retrieval.lock().clone();
            control.configure_retrieval(&config);
            InferenceWorker {
                control,
                control_variant: Arc::from(CONTROL),
                challenger: None,
                catalog: catalog.clone(),
                metrics: metrics.clone(),
                retrieval: worker_retrieval.clone(),
            }
        });
        ModelActor::start_in_arbiter(arbiter, move |_| ModelActor {
            worker,
            retrieval,
            metrics: actor_metrics,
            max_batch,
            max_wait,
            mailbox_capacity,
            pending: VecDeque::new(),
            observations: Vec::new(),
            flush_scheduled: false,
            inflight: false,
        })
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if self.flush_scheduled || self.inflight {
            return;
        }
        self.flush_scheduled = true;
        if self.max_wait.is_zero() || self.pending.len() >= self.max_batch {
            // A ready future runs after the context has drained its mailbox, so everything that
            // arrived together goes in one batch, with no added wait.
            ctx.spawn(fut::ready(()).map(|(), act: &mut Self, ctx| {
                act.flush_scheduled = false;
                act.flush(ctx);
            }));
        } else {
            // Trade up to max_wait of latency for fuller batches (worth it for heavy models).
            ctx.run_later(self.max_wait, |act, ctx| {
                act.flush_scheduled = false;
                act.flush(ctx);
            });
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.inflight || (self.pending.is_empty() && self.observations.is_empty()) {
            return;
        }
        let n = self.pending.len().min(self.max_batch);
        let (requests, replies): (Vec<_>, Vec<_>) = self.pending.drain(..n).map(|(r, u, tx)| ((r, u), tx)).unzip();
        if self.pending.is_empty() && self.pending.capacity() > 2 * self.max_batch {
            // A burst can queue thousands of requests; a drained queue gives that room back
            // rather than keeping it for good (about 1 MB after a wave of 50,000 new users).
            self.pending.shrink_to(self.max_batch);
        }
        self.metrics.model_queued.set(self.pending.len() as i64);
        let observations = std::mem::take(&mut self.observations);
        self.inflight = true;
        self.worker
            .send(RunBatch { observations, requests })
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.inflight = false;
                match result {
                    Ok(output) => {
                        for (reply, list) in replies.into_iter().zip(output.results) {
                            let _ = reply.send(Ok(list));
                        }
                    }
                    Err(error) => {
                        for reply in replies {
                            let _ = reply.send(Err(ModelError::Stopped));
                        }
                        if !act.worker.connected() {
                            // The inference thread is gone (the server is stopping): answer
                            // everything still waiting now, with one line, rather than one
                            // batch and one error line at a time.
                            let waiting = act.pending.len();
                            for (_, _, reply) in act.pending.drain(..) {
                                let _ = reply.send(Err(ModelError::Stopped));
                            }
                            act.metrics.model_queued.set(0);
                            tracing::warn!(error = %error, waiting, "model worker stopped; waiting requests answered with an error");
                            return;
                        }
                        tracing::error!(error = %error, "model worker unavailable");
                    }
                }
                act.flush(ctx);
            })
            .spawn(ctx);
    }
}

impl Actor for ModelActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<Recommend> for ModelActor {
    type Result = ResponseFuture<Result<ScoredList, ModelError>>;

    fn handle(&mut self, msg: Recommend, ctx: &mut Self::Context) -> Self::Result {
        // Observed even when the request is refused below: the batch in flight (there is one,
        // the queue being full) takes it when it is done.
        if let Some(observation) = msg.observation {
            self.observe(observation);
        }
        if self.pending.len() >= self.mailbox_capacity {
            self.metrics.model_refused.inc();
            return Box::pin(async { Err(ModelError::Overloaded) });
        }
        let (tx, rx) = oneshot::channel();
        self.pending.push_back((msg.request, msg.user, tx));
        self.metrics.model_queued.set(self.pending.len() as i64);
        self.schedule(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(ModelError::Stopped)) })
    }
}

impl Handler<Observe> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: Observe, ctx: &mut Self::Context) {
        if self.observe(msg.observation) {
            self.schedule(ctx);
        }
    }
}

impl ModelActor {
    /// Queues `observation` for the next batch; false when that many already wait (the online
    /// model misses it, as it would a refused `try_send`).
    fn observe(&mut self, observation: Observation) -> bool {
        if self.observations.len() >= self.mailbox_capacity {
            self.metrics.model_refused.inc();
            return false;
        }
        self.observations.push(observation);
        true
    }
}

/// Replace the serving (control) model. Batches already sent finish on the old model; every
/// later batch uses the new one, so no request is dropped or answered by a half-swapped model.
/// Answers with the model it replaced. A running challenger keeps running.
#[derive(Message)]
#[rtype(result = "Option<Box<dyn Recommender>>")]
pub struct SwapModel {
    pub model: Box<dyn Recommender>,
}

impl std::fmt::Debug for SwapModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapModel").field("version", &self.model.version()).finish()
    }
}

/// Serve `model` to a `share` of users (by [`traffic_bucket`] with `salt`) as `variant`, and
/// label the rest `control_variant`. Replaces any running challenger.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartChallenger {
    pub model: Box<dyn Recommender>,
    pub variant: Arc<str>,
    pub control_variant: Arc<str>,
    pub share: f64,
    pub salt: u64,
}

/// Stop the challenger: `promote` makes it the control model for everyone, otherwise the
/// control model serves everyone again. Answers with the model taken out of service.
#[derive(Message, Debug)]
#[rtype(result = "Option<Box<dyn Recommender>>")]
pub struct EndChallenger {
    pub promote: bool,
}

/// Scores with the control model alone (the validation gate compares candidates with it).
#[derive(Message, Debug)]
#[rtype(result = "Vec<Vec<Scored>>")]
pub struct ScoreControl {
    pub requests: Vec<ScoreRequest>,
}

/// Items like one item, from the model serving everyone outside a canary or experiment (its
/// neighbours for the online model, its nearest item vectors for the sequential one). Waits in
/// the inference thread's queue like a batch, between two batches.
#[derive(Message, Debug)]
#[rtype(result = "SimilarList")]
pub struct Similar {
    pub item: ItemIdx,
    pub k: usize,
    pub filter: ItemFilter,
}

/// The answer to [`Similar`]: most similar first, and the version that found them (empty when
/// the worker is gone).
#[derive(Debug, Clone, Default, MessageResponse)]
pub struct SimilarList {
    pub items: Vec<Scored>,
    pub version: String,
}

/// Which versions serve whom.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Traffic {
    pub control: ArmInfo,
    pub challenger: Option<ArmInfo>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ArmInfo {
    pub version: String,
    pub variant: String,
    /// Share of users this arm serves.
    pub share: f64,
}

impl Traffic {
    /// The version serving users outside any canary or experiment.
    pub fn serving(&self) -> &str {
        &self.control.version
    }
}

/// The traffic split now.
#[derive(Message, Debug)]
#[rtype(result = "Traffic")]
pub struct CurrentVersion;

macro_rules! forward_to_worker {
    ($msg:ty, $result:ty) => {
        impl Handler<$msg> for ModelActor {
            type Result = ResponseFuture<$result>;

            fn handle(&mut self, msg: $msg, _ctx: &mut Self::Context) -> Self::Result {
                // The worker's mailbox is ordered: the change lands between two batches.
                let worker = self.worker.clone();
                Box::pin(async move { worker.send(msg).await.unwrap_or_default() })
            }
        }
    };
}

/// Adopt `[model.retrieval]` settings: every model served from now on (control, challenger,
/// swapped in, or rebuilt after a restart) scores large catalogues in two stages with them.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ConfigureRetrieval {
    pub config: RetrievalConfig,
}

impl Handler<ConfigureRetrieval> for ModelActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: ConfigureRetrieval, _ctx: &mut Self::Context) -> Self::Result {
        *self.retrieval.lock() = msg.config.clone();
        let worker = self.worker.clone();
        Box::pin(async move { worker.send(msg).await.unwrap_or_default() })
    }
}

forward_to_worker!(SwapModel, Option<Box<dyn Recommender>>);
forward_to_worker!(StartChallenger, ());
forward_to_worker!(EndChallenger, Option<Box<dyn Recommender>>);
forward_to_worker!(ScoreControl, Vec<Vec<Scored>>);
forward_to_worker!(Similar, SimilarList);

impl Handler<CurrentVersion> for ModelActor {
    type Result = ResponseFuture<Traffic>;

    fn handle(&mut self, msg: CurrentVersion, _ctx: &mut Self::Context) -> Self::Result {
        let worker = self.worker.clone();
        Box::pin(async move {
            worker.send(msg).await.unwrap_or_else(|_| Traffic {
                control: ArmInfo { version: String::new(), variant: CONTROL.to_owned(), share: 1.0 },
                challenger: None,
            })
        })
    }
}

struct Challenger {
    model: Box<dyn Recommender>,
    variant: Arc<str>,
    share: f64,
    salt: u64,
}

/// The inference thread: owns the models and runs whole batches.
pub struct InferenceWorker {
    control: Box<dyn Recommender>,
    control_variant: Arc<str>,
    challenger: Option<Challenger>,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    retrieval: Arc<Mutex<RetrievalConfig>>,
}

impl Actor for InferenceWorker {
    type Context = SyncContext<Self>;
}

#[derive(Message)]
#[rtype(result = "BatchOutput")]
struct RunBatch {
    observations: Vec<Observation>,
    requests: Vec<(ScoreRequest, u64)>,
}

struct BatchOutput {
    results: Vec<ScoredList>,
}

impl<A, M> actix::dev::MessageResponse<A, M> for BatchOutput
where
    A: Actor,
    M: Message<Result = BatchOutput>,
{
    fn handle(self, _ctx: &mut A::Context, tx: Option<actix::dev::OneshotSender<M::Result>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl InferenceWorker {
    fn score_timed(
        model: &mut dyn Recommender,
        requests: &[ScoreRequest],
        catalog: &Catalog,
        metrics: &Metrics,
    ) -> Vec<Vec<Scored>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let results = model.score(requests, catalog);
        metrics.model_inference_seconds.observe_duration(started.elapsed());
        metrics.model_batches.inc();
        metrics.model_batch_size.observe(requests.len() as f64);
        metrics.model_requests.add(requests.len() as u64);
        let counts = model.take_candidate_counts();
        if !counts.is_empty() {
            for source in Source::ALL {
                let counter = match source {
                    Source::Ann => &metrics.model_candidates_ann,
                    Source::Cooccurrence => &metrics.model_candidates_cooccurrence,
                    Source::Popular => &metrics.model_candidates_popular,
                    Source::Cold => &metrics.model_candidates_cold,
                };
                counter.add(counts.get(source));
            }
        }
        results
    }

    /// Applies the current retrieval settings to a model about to serve.
    fn configure(&self, model: &mut dyn Recommender) {
        let config = self.retrieval.lock().clone();
        model.configure_retrieval(&config);
    }
}

impl Handler<ConfigureRetrieval> for InferenceWorker {
    type Result = ();

    fn handle(&mut self, msg: ConfigureRetrieval, _ctx: &mut Self::Context) {
        self.control.configure_retrieval(&msg.config);
        if let Some(challenger) = &mut self.challenger {
            challenger.model.configure_retrieval(&msg.config);
        }
    }
}

impl Handler<RunBatch> for InferenceWorker {
    type Result = BatchOutput;

    /// A model that panics scoring or observing must not take the inference thread with it:
    /// actix's sync threads do not catch panics (the thread would end, and the next batch sent
    /// to it would panic the arbiter that forwards it). The batch's requests are answered with
    /// [`ModelError::Stopped`] (no results), and the worker stops, which makes its `SyncContext`
    /// start a fresh one from the factory.
    fn handle(&mut self, msg: RunBatch, ctx: &mut Self::Context) -> BatchOutput {
        self.guarded(ctx, "scoring a batch", |worker| worker.run_batch(msg))
            .unwrap_or(BatchOutput { results: Vec::new() })
    }
}

impl InferenceWorker {
    /// Runs `work` with the models, catching a panic in it: logged, `None` returned, and the
    /// worker stopped, which makes its `SyncContext` start a fresh one from the factory.
    fn guarded<T>(&mut self, ctx: &mut SyncContext<Self>, what: &str, work: impl FnOnce(&mut Self) -> T) -> Option<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut *self))) {
            Ok(done) => Some(done),
            Err(_) => {
                tracing::error!(
                    version = %self.control.version(),
                    what,
                    "the model panicked; the inference thread starts over with a model from the factory"
                );
                ctx.stop();
                None
            }
        }
    }

    fn run_batch(&mut self, msg: RunBatch) -> BatchOutput {
        if !msg.observations.is_empty() {
            self.control.observe(&msg.observations);
            if let Some(challenger) = &mut self.challenger {
                challenger.model.observe(&msg.observations);
            }
        }
        // Which requests the challenger answers.
        let to_challenger: Vec<bool> = match &self.challenger {
            Some(c) => msg.requests.iter().map(|(_, user)| traffic_bucket(*user, c.salt) < c.share).collect(),
            None => vec![false; msg.requests.len()],
        };
        let (mut control, mut challenger) = (Vec::new(), Vec::new());
        for ((request, _), &to) in msg.requests.into_iter().zip(&to_challenger) {
            if to {
                challenger.push(request)
            } else {
                control.push(request)
            }
        }
        let control_version: Arc<str> = Arc::from(self.control.version());
        let mut control_lists =
            Self::score_timed(self.control.as_mut(), &control, &self.catalog, &self.metrics).into_iter();
        let (mut challenger_lists, challenger_arm) = match &mut self.challenger {
            Some(c) => (
                Self::score_timed(c.model.as_mut(), &challenger, &self.catalog, &self.metrics).into_iter(),
                Some((Arc::<str>::from(c.model.version()), c.variant.clone())),
            ),
            None => (Vec::new().into_iter(), None),
        };
        let results = to_challenger
            .iter()
            .map(|&to| match (to, &challenger_arm) {
                (true, Some((version, variant))) => ScoredList {
                    items: challenger_lists.next().unwrap_or_default(),
                    version: version.clone(),
                    variant: variant.clone(),
                },
                _ => ScoredList {
                    items: control_lists.next().unwrap_or_default(),
                    version: control_version.clone(),
                    variant: self.control_variant.clone(),
                },
            })
            .collect();
        BatchOutput { results }
    }
}

impl Handler<Similar> for InferenceWorker {
    type Result = SimilarList;

    /// A panic is caught as in [`RunBatch`]: an empty answer, and a fresh worker.
    fn handle(&mut self, msg: Similar, ctx: &mut Self::Context) -> SimilarList {
        self.guarded(ctx, "finding similar items", |worker| SimilarList {
            items: worker.control.similar(msg.item, msg.k, &msg.filter, &worker.catalog),
            version: worker.control.version().to_owned(),
        })
        .unwrap_or_default()
    }
}

impl Handler<SwapModel> for InferenceWorker {
    type Result = Option<Box<dyn Recommender>>;

    fn handle(&mut self, mut msg: SwapModel, _ctx: &mut Self::Context) -> Self::Result {
        tracing::info!(from = self.control.version(), to = msg.model.version(), "serving model swapped");
        self.configure(msg.model.as_mut());
        Some(std::mem::replace(&mut self.control, msg.model))
    }
}

impl Handler<StartChallenger> for InferenceWorker {
    type Result = ();

    fn handle(&mut self, mut msg: StartChallenger, _ctx: &mut Self::Context) {
        tracing::info!(version = msg.model.version(), variant = %msg.variant, share = msg.share, "challenger serving");
        self.configure(msg.model.as_mut());
        self.control_variant = msg.control_variant;
        self.challenger = Some(Challenger { model: msg.model, variant: msg.variant, share: msg.share, salt: msg.salt });
    }
}

impl Handler<EndChallenger> for InferenceWorker {
    type Result = Option<Box<dyn Recommender>>;

    fn handle(&mut self, msg: EndChallenger, _ctx: &mut Self::Context) -> Self::Result {
        let challenger = self.challenger.take()?;
        self.control_variant = Arc::from(CONTROL);
        if msg.promote {
            tracing::info!(from = self.control.version(), to = challenger.model.version(), "challenger promoted");
            Some(std::mem::replace(&mut self.control, challenger.model))
        } else {
            tracing::info!(version = challenger.model.version(), "challenger stopped");
            Some(challenger.model)
        }
    }
}

impl Handler<ScoreControl> for InferenceWorker {
    type Result = Vec<Vec<Scored>>;

    /// A panic is caught as in [`RunBatch`]: no lists, and a fresh worker.
    fn handle(&mut self, msg: ScoreControl, ctx: &mut Self::Context) -> Self::Result {
        self.guarded(ctx, "scoring for the control arm", |worker| worker.control.score(&msg.requests, &worker.catalog))
            .unwrap_or_default()
    }
}

impl Handler<CurrentVersion> for InferenceWorker {
    type Result = MessageResult<CurrentVersion>;

    fn handle(&mut self, _msg: CurrentVersion, _ctx: &mut Self::Context) -> Self::Result {
        let share = self.challenger.as_ref().map_or(0.0, |c| c.share);
        MessageResult(Traffic {
            control: ArmInfo {
                version: self.control.version().to_owned(),
                variant: self.control_variant.to_string(),
                share: 1.0 - share,
            },
            challenger: self.challenger.as_ref().map(|c| ArmInfo {
                version: c.model.version().to_owned(),
                variant: c.variant.to_string(),
                share: c.share,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::user_hash;
    use crate::event::{EventType, ItemId};

    /// A model that ranks item 0 first and reports a fixed version.
    struct Fixed(&'static str);

    impl Recommender for Fixed {
        fn version(&self) -> &str {
            self.0
        }
        fn observe(&mut self, _observations: &[Observation]) {}
        fn score(&mut self, requests: &[ScoreRequest], _catalog: &Catalog) -> Vec<Vec<Scored>> {
            requests.iter().map(|_| vec![Scored { item: 0, score: 1.0 }]).collect()
        }
    }

    /// A model actor serving `Fixed(version)` on this arbiter, in batches of up to `max_batch`.
    fn start_fixed(version: &'static str, max_batch: usize) -> Addr<ModelActor> {
        let catalog = Arc::new(Catalog::new());
        catalog.intern(&ItemId::from("i0"));
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fallback")));
        ModelActor::start_with(
            Box::new(Fixed(version)),
            factory,
            catalog,
            Arc::new(Metrics::default()),
            max_batch,
            std::time::Duration::ZERO,
            4096,
            &Arbiter::current(),
        )
    }

    /// The room the request queue holds (a burst's room is given back once it drains).
    #[derive(Message)]
    #[rtype(result = "usize")]
    struct QueueRoom;

    impl Handler<QueueRoom> for ModelActor {
        type Result = usize;

        fn handle(&mut self, _msg: QueueRoom, _ctx: &mut Self::Context) -> usize {
            self.pending.capacity()
        }
    }

    fn request() -> ScoreRequest {
        ScoreRequest {
            history: Arc::from(Vec::new()),
            segment: 0,
            exclude: vec![],
            negatives: vec![],
            categories: None,
            k: 1,
        }
    }

    /// A model that scores each request by how many new interactions it has observed so far.
    struct Counting(Arc<std::sync::atomic::AtomicUsize>);

    impl Recommender for Counting {
        fn version(&self) -> &str {
            "counting"
        }
        fn observe(&mut self, observations: &[Observation]) {
            let new: usize = observations.iter().map(|o| o.new.len()).sum();
            self.0.fetch_add(new, std::sync::atomic::Ordering::SeqCst);
        }
        fn score(&mut self, requests: &[ScoreRequest], _catalog: &Catalog) -> Vec<Vec<Scored>> {
            let seen = self.0.load(std::sync::atomic::Ordering::SeqCst) as f32;
            requests.iter().map(|_| vec![Scored { item: 0, score: seen }]).collect()
        }
    }

    #[actix_rt::test]
    async fn an_observation_sent_with_a_request_is_observed_before_it_is_scored() {
        let catalog = Arc::new(Catalog::new());
        catalog.intern(&ItemId::from("i0"));
        let observed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let model = Counting(observed.clone());
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fallback")));
        let metrics = Arc::new(Metrics::default());
        let actor = ModelActor::start_with(
            Box::new(model),
            factory,
            catalog,
            metrics.clone(),
            8,
            std::time::Duration::ZERO,
            16,
            &Arbiter::current(),
        );
        let item = crate::models::HistoryItem { item: 0, event_type: EventType::View, value: None, timestamp: 0 };
        let observation = Observation { previous: Arc::from(Vec::new()), new: vec![item, item], segment: 0 };
        let scored = actor
            .send(Recommend { request: request(), user: 7, observation: Some(observation) })
            .await
            .expect("delivered")
            .expect("scored");
        assert_eq!(scored.items[0].score, 2.0, "the request's own observation counts in its list");
        assert_eq!(observed.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(metrics.model_refused.get(), 0);
    }

    /// A model that panics on a request for 99 items.
    struct PanicsOn99;

    impl Recommender for PanicsOn99 {
        fn version(&self) -> &str {
            "fragile"
        }
        fn observe(&mut self, _observations: &[Observation]) {}
        fn score(&mut self, requests: &[ScoreRequest], _catalog: &Catalog) -> Vec<Vec<Scored>> {
            assert!(requests.iter().all(|r| r.k != 99), "a request this model cannot score");
            requests.iter().map(|_| vec![Scored { item: 0, score: 1.0 }]).collect()
        }
    }

    #[actix_rt::test]
    async fn a_model_that_panics_fails_its_batch_and_the_factorys_model_serves_the_next() {
        let catalog = Arc::new(Catalog::new());
        catalog.intern(&ItemId::from("i0"));
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fresh")));
        let actor = ModelActor::start_with(
            Box::new(PanicsOn99),
            factory,
            catalog,
            Arc::new(Metrics::default()),
            8,
            std::time::Duration::ZERO,
            16,
            &Arbiter::current(),
        );
        let scored = actor.send(Recommend { request: request(), user: 1, observation: None }).await.expect("delivered");
        assert_eq!(scored.expect("scored").version.as_ref(), "fragile");
        let poison = ScoreRequest { k: 99, ..request() };
        let failed = actor.send(Recommend { request: poison, user: 1, observation: None }).await.expect("delivered");
        assert!(matches!(failed, Err(ModelError::Stopped)), "the panicking batch is answered: {failed:?}");
        for _ in 0..3 {
            let next =
                actor.send(Recommend { request: request(), user: 1, observation: None }).await.expect("delivered");
            assert_eq!(next.expect("scored after the panic").version.as_ref(), "fresh");
        }
    }

    #[actix_rt::test]
    async fn a_swap_drops_no_request_and_never_goes_back() {
        let model = start_fixed("a", 4);
        let before: Vec<_> =
            (0..200).map(|u| model.send(Recommend { request: request(), user: u, observation: None })).collect();
        let swap = model.send(SwapModel { model: Box::new(Fixed("b")) });
        let after: Vec<_> =
            (0..200).map(|u| model.send(Recommend { request: request(), user: u, observation: None })).collect();
        let mut versions = Vec::new();
        for reply in futures_util::future::join_all(before).await {
            versions.push(reply.expect("delivered").expect("scored").version.to_string());
        }
        let displaced = swap.await.expect("swapped").expect("the old model comes back");
        assert_eq!(displaced.version(), "a");
        for reply in futures_util::future::join_all(after).await {
            versions.push(reply.expect("delivered").expect("scored").version.to_string());
        }
        assert_eq!(versions.len(), 400, "every request answered");
        let first_b = versions.iter().position(|v| v == "b").expect("the new model serves");
        assert!(versions[first_b..].iter().all(|v| v == "b"), "no answer from the old model after the swap");
        assert!(versions[200..].iter().all(|v| v == "b"), "requests sent after the swap use the new model");
        assert_eq!(model.send(CurrentVersion).await.expect("version").serving(), "b");
        let room = model.send(QueueRoom).await.expect("room");
        assert!(room <= 8, "400 requests queued at once, then drained: the queue kept room for {room}");
    }

    #[actix_rt::test]
    async fn a_challenger_serves_its_share_by_stable_hash_and_can_be_promoted() {
        let model = start_fixed("a", 8);
        model
            .send(StartChallenger {
                model: Box::new(Fixed("b")),
                variant: Arc::from("canary"),
                control_variant: Arc::from(CONTROL),
                share: 0.25,
                salt: 9,
            })
            .await
            .expect("started");
        let users: Vec<u64> = (0..2000).map(|u| user_hash(&format!("user-{u}"))).collect();
        let first = futures_util::future::join_all(
            users.iter().map(|&user| model.send(Recommend { request: request(), user, observation: None })),
        )
        .await;
        let again = futures_util::future::join_all(
            users.iter().map(|&user| model.send(Recommend { request: request(), user, observation: None })),
        )
        .await;
        let arm = |r: &Result<Result<ScoredList, ModelError>, MailboxError>| {
            let list = r.as_ref().expect("delivered").as_ref().expect("scored");
            (list.version.to_string(), list.variant.to_string())
        };
        let canary = first.iter().filter(|r| arm(r) == ("b".into(), "canary".into())).count();
        assert!((400..600).contains(&canary), "about a quarter of users get the canary: {canary}");
        assert!(first.iter().zip(&again).all(|(a, b)| arm(a) == arm(b)), "a user stays in their variant");
        let traffic = model.send(CurrentVersion).await.expect("traffic");
        assert_eq!(traffic.challenger.as_ref().map(|c| c.share), Some(0.25));
        let old = model.send(EndChallenger { promote: true }).await.expect("ended").expect("displaced");
        assert_eq!(old.version(), "a");
        let after = model
            .send(Recommend { request: request(), user: users[0], observation: None })
            .await
            .expect("delivered")
            .expect("scored");
        assert_eq!((&*after.version, &*after.variant), ("b", CONTROL));
    }

    /// A model whose batches wait for the test: it reports each batch it starts, then blocks
    /// until the gate opens.
    struct Gated {
        started: tokio::sync::mpsc::UnboundedSender<usize>,
        gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    }

    impl Recommender for Gated {
        fn version(&self) -> &str {
            "gated"
        }
        fn observe(&mut self, _observations: &[Observation]) {}
        fn score(&mut self, requests: &[ScoreRequest], _catalog: &Catalog) -> Vec<Vec<Scored>> {
            let _ = self.started.send(requests.len());
            let (open, wake) = &*self.gate;
            let mut open = open.lock().expect("gate lock");
            while !*open {
                open = wake.wait(open).expect("gate lock");
            }
            requests.iter().map(|_| vec![Scored { item: 0, score: 1.0 }]).collect()
        }
    }

    #[actix_rt::test]
    async fn requests_past_the_queue_bound_are_refused_at_once_and_counted() {
        const CAPACITY: usize = 8;
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let metrics = Arc::new(Metrics::default());
        let model = Gated { started: started_tx, gate: gate.clone() };
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fallback")));
        let actor = ModelActor::start_with(
            Box::new(model),
            factory,
            Arc::new(Catalog::new()),
            metrics.clone(),
            4,
            std::time::Duration::ZERO,
            CAPACITY,
            &Arbiter::current(),
        );
        // One batch in flight on the inference thread, held there.
        let first = actor.send(Recommend { request: request(), user: 0, observation: None });
        let first = actix_rt::spawn(first);
        assert_eq!(started.recv().await, Some(1));
        // CAPACITY requests wait for the next batch; every one past them is answered now.
        let waiting: Vec<_> = (0..CAPACITY as u64)
            .map(|u| actix_rt::spawn(actor.send(Recommend { request: request(), user: u, observation: None })))
            .collect();
        for user in 0..3 * CAPACITY as u64 {
            // A stall detector: without the bound the request would wait for the gate forever.
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                actor.send(Recommend { request: request(), user, observation: None }),
            )
            .await
            .expect("answered without waiting for the batch in flight")
            .expect("delivered");
            assert!(matches!(answer, Err(ModelError::Overloaded)), "refused while the queue is full: {answer:?}");
        }
        assert_eq!(metrics.model_refused.get(), 3 * CAPACITY as u64);
        assert_eq!(metrics.model_queued.get(), CAPACITY as i64);
        // Observations beyond the bound are dropped and counted too.
        for _ in 0..CAPACITY + 2 {
            actor
                .send(Observe {
                    observation: Observation { previous: Arc::from(Vec::new()), new: Vec::new(), segment: 0 },
                })
                .await
                .expect("delivered");
        }
        assert_eq!(metrics.model_refused.get(), 3 * CAPACITY as u64 + 2);
        {
            let (open, wake) = &*gate;
            *open.lock().expect("gate lock") = true;
            wake.notify_all();
        }
        assert!(first.await.expect("joined").expect("delivered").is_ok(), "the batch in flight is answered");
        for waiting in waiting {
            assert!(waiting.await.expect("joined").expect("delivered").is_ok(), "queued requests are answered");
        }
        // With the queue drained, requests are served again.
        assert!(actor
            .send(Recommend { request: request(), user: 1, observation: None })
            .await
            .expect("delivered")
            .is_ok());
    }
}
