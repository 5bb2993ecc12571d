//! `ModelActor`: collects scoring requests and observations from sessions into batches and runs
//! them on a dedicated inference thread, so arbiter threads never do model work.
//!
//! Batching is opportunistic: a request that arrives while the model is idle is flushed as soon as
//! the mailbox has been drained (no timer, no added latency); requests that arrive while a batch
//! runs wait for it and go together in the next one, up to `model.max_batch`.
//!
//! Mailbox: `model.mailbox_capacity`; sessions `send` (and wait) for scoring and `try_send`
//! observations, counting refusals. Restart policy: none needed; the actor holds no state that
//! outlives a batch, and the inference worker is a `SyncArbiter` thread that actix restarts with
//! a fresh model from the factory if it panics.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::catalog::Catalog;
use crate::models::{Observation, Recommender, ScoreRequest, Scored};
use crate::telemetry::Metrics;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("the model worker stopped")]
    Stopped,
}

/// Scored items for one request, with the version of the model that produced them.
#[derive(Debug, Clone)]
pub struct ScoredList {
    pub items: Vec<Scored>,
    pub version: Arc<str>,
}

/// Rank items for one user.
#[derive(Message, Debug)]
#[rtype(result = "Result<ScoredList, ModelError>")]
pub struct Recommend {
    pub request: ScoreRequest,
}

/// New interactions for models that learn online.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Observe {
    pub observation: Observation,
}

type Reply = oneshot::Sender<Result<ScoredList, ModelError>>;

pub struct ModelActor {
    worker: Addr<InferenceWorker>,
    max_batch: usize,
    /// How long a lone request may wait for company (0: flush as soon as the mailbox is drained).
    max_wait: std::time::Duration,
    mailbox_capacity: usize,
    pending: VecDeque<(ScoreRequest, Reply)>,
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
        let worker = SyncArbiter::start(1, move || InferenceWorker {
            model: first.lock().take().unwrap_or_else(|| factory()),
            catalog: catalog.clone(),
            metrics: metrics.clone(),
        });
        ModelActor::start_in_arbiter(arbiter, move |_| ModelActor {
            worker,
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
        let (requests, replies): (Vec<_>, Vec<_>) = self.pending.drain(..n).unzip();
        let observations = std::mem::take(&mut self.observations);
        self.inflight = true;
        self.worker
            .send(RunBatch { observations, requests })
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.inflight = false;
                match result {
                    Ok(output) => {
                        for (reply, items) in replies.into_iter().zip(output.results) {
                            let _ = reply.send(Ok(ScoredList { items, version: output.version.clone() }));
                        }
                    }
                    Err(error) => {
                        tracing::error!(error = %error, "model worker unavailable");
                        for reply in replies {
                            let _ = reply.send(Err(ModelError::Stopped));
                        }
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
        let (tx, rx) = oneshot::channel();
        self.pending.push_back((msg.request, tx));
        self.schedule(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(ModelError::Stopped)) })
    }
}

impl Handler<Observe> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: Observe, ctx: &mut Self::Context) {
        self.observations.push(msg.observation);
        self.schedule(ctx);
    }
}

/// Replace the serving model. Batches already sent finish on the old model; every later batch
/// uses the new one, so no request is dropped or answered by a half-swapped model.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SwapModel {
    pub model: Box<dyn Recommender>,
}

impl std::fmt::Debug for SwapModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapModel").field("version", &self.model.version()).finish()
    }
}

impl Handler<SwapModel> for ModelActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: SwapModel, _ctx: &mut Self::Context) -> Self::Result {
        // The worker's mailbox is ordered: the swap lands between two batches.
        let worker = self.worker.clone();
        Box::pin(async move {
            let _ = worker.send(msg).await;
        })
    }
}

/// The version of the model now serving.
#[derive(Message, Debug)]
#[rtype(result = "String")]
pub struct CurrentVersion;

impl Handler<CurrentVersion> for ModelActor {
    type Result = ResponseFuture<String>;

    fn handle(&mut self, _msg: CurrentVersion, _ctx: &mut Self::Context) -> Self::Result {
        let worker = self.worker.clone();
        Box::pin(async move { worker.send(CurrentVersion).await.unwrap_or_default() })
    }
}

/// The inference thread: owns the model and runs whole batches.
pub struct InferenceWorker {
    model: Box<dyn Recommender>,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
}

impl Actor for InferenceWorker {
    type Context = SyncContext<Self>;
}

#[derive(Message)]
#[rtype(result = "BatchOutput")]
struct RunBatch {
    observations: Vec<Observation>,
    requests: Vec<ScoreRequest>,
}

struct BatchOutput {
    results: Vec<Vec<Scored>>,
    version: Arc<str>,
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

impl Handler<RunBatch> for InferenceWorker {
    type Result = BatchOutput;

    fn handle(&mut self, msg: RunBatch, _ctx: &mut Self::Context) -> BatchOutput {
        if !msg.observations.is_empty() {
            self.model.observe(&msg.observations);
        }
        let results = if msg.requests.is_empty() {
            Vec::new()
        } else {
            let started = Instant::now();
            let results = self.model.score(&msg.requests, &self.catalog);
            self.metrics.model_inference_seconds.observe_duration(started.elapsed());
            self.metrics.model_batches.inc();
            self.metrics.model_batch_size.observe(msg.requests.len() as f64);
            self.metrics.model_requests.add(msg.requests.len() as u64);
            results
        };
        BatchOutput { results, version: Arc::from(self.model.version()) }
    }
}

impl Handler<SwapModel> for InferenceWorker {
    type Result = ();

    fn handle(&mut self, msg: SwapModel, _ctx: &mut Self::Context) {
        tracing::info!(from = self.model.version(), to = msg.model.version(), "serving model swapped");
        self.model = msg.model;
    }
}

impl Handler<CurrentVersion> for InferenceWorker {
    type Result = String;

    fn handle(&mut self, _msg: CurrentVersion, _ctx: &mut Self::Context) -> String {
        self.model.version().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ItemId;

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

    #[actix_rt::test]
    async fn a_swap_drops_no_request_and_never_goes_back() {
        let catalog = Arc::new(Catalog::new());
        catalog.intern(&ItemId::from("i0"));
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fallback")));
        let arbiter = Arbiter::current();
        let model = ModelActor::start_with(
            Box::new(Fixed("a")),
            factory,
            catalog,
            Arc::new(Metrics::default()),
            4,
            std::time::Duration::ZERO,
            1024,
            &arbiter,
        );
        let before: Vec<_> = (0..200).map(|_| model.send(Recommend { request: request() })).collect();
        let swap = model.send(SwapModel { model: Box::new(Fixed("b")) });
        let after: Vec<_> = (0..200).map(|_| model.send(Recommend { request: request() })).collect();
        let mut versions = Vec::new();
        for reply in futures_util::future::join_all(before).await {
            versions.push(reply.expect("delivered").expect("scored").version.to_string());
        }
        swap.await.expect("swapped");
        for reply in futures_util::future::join_all(after).await {
            versions.push(reply.expect("delivered").expect("scored").version.to_string());
        }
        assert_eq!(versions.len(), 400, "every request answered");
        let first_b = versions.iter().position(|v| v == "b").expect("the new model serves");
        assert!(versions[first_b..].iter().all(|v| v == "b"), "no answer from the old model after the swap");
        assert!(versions[200..].iter().all(|v| v == "b"), "requests sent after the swap use the new model");
        assert_eq!(model.send(CurrentVersion).await.expect("version"), "b");
    }
}
