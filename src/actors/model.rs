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
    pub fn start_with(
        model: Box<dyn Recommender>,
        factory: ModelFactory,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        max_batch: usize,
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
        // A ready future runs after the context has drained its mailbox, so everything that
        // arrived together goes in one batch.
        ctx.spawn(fut::ready(()).map(|(), act: &mut Self, ctx| {
            act.flush_scheduled = false;
            act.flush(ctx);
        }));
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
