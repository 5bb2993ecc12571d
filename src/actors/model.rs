//! `ModelActor`: the model's own thread. Sessions and HTTP handlers leave scoring requests,
//! observations and commands in its inbox through a [`ModelHandle`]; the thread takes them in
//! arrival order, runs the requests in batches and answers each caller directly, so arbiter
//! threads never do model work.
//!
//! Why not an actix actor in front of a `SyncArbiter`: a request and its answer then took five
//! hand-offs between four threads (the session's arbiter to the batching actor's, to the system
//! thread that forwards to sync actors, to the inference thread, back to the batching actor,
//! back to the session), each a wake-up and usually a context switch. Now a request wakes the
//! model thread (only if it sleeps) and the answer wakes the caller: two.
//!
//! Batching is opportunistic: a request that finds the thread asleep is scored at once (no timer,
//! no added latency, unless `model.max_wait_us` asks to wait for company); requests that arrive
//! while a batch runs wait for it and go together in the next one, up to `model.max_batch`.
//! Commands (a model swap, a challenger, a similar-items query, the traffic split) run between
//! two batches, in the order they were sent relative to the requests: under a backlog they wait
//! behind the requests queued before them.
//!
//! Mailbox: `model.mailbox_capacity` scoring requests and as many observations waiting; a
//! request that finds that many waiting is answered at once with [`ModelError::Overloaded`]
//! (HTTP: `503` with `Retry-After`), an observation is dropped; both count in
//! `liverec_model_refused_total`. Commands are not bounded (a handful a day). Observations
//! usually arrive inside the scoring request that follows them.
//!
//! Restart policy: a model that panics is caught on the thread, the batch it was scoring is
//! answered with [`ModelError::Stopped`], and the thread goes on with a model from the factory
//! (a challenger that was running is not restored). The thread ends once every handle is
//! dropped, after answering what is left in the inbox.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix::{MailboxError, Message};
use parking_lot::{Condvar, Mutex};
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

/// Replace the serving (control) model. Batches already taken finish on the old model; every
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

/// Items like one item, from the model serving everyone outside a canary or experiment (its
/// neighbours for the online model, its nearest item vectors for the sequential one). Waits in
/// the inbox like a batch, between two batches.
#[derive(Message, Debug)]
#[rtype(result = "SimilarList")]
pub struct Similar {
    pub item: ItemIdx,
    pub k: usize,
    pub filter: ItemFilter,
}

/// The answer to [`Similar`]: most similar first, and the version that found them (empty when
/// the model panicked on it).
#[derive(Debug, Clone, Default)]
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

/// Adopt `[model.retrieval]` settings: every model served from now on (control, challenger,
/// swapped in, or rebuilt after a panic) scores large catalogues in two stages with them.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ConfigureRetrieval {
    pub config: RetrievalConfig,
}

/// Builds a model; used again if the model thread has to start over.
pub type ModelFactory = Arc<dyn Fn() -> Box<dyn Recommender> + Send + Sync>;

/// A message the model thread understands: how it travels through the inbox and is answered.
pub trait ModelMessage: Message + Send + 'static
where
    Self::Result: Send + 'static,
{
    /// The message as the inbox keeps it, answering on `reply`.
    #[doc(hidden)]
    fn into_job(self, reply: oneshot::Sender<Self::Result>) -> Job;
}

/// A message waiting in the model's inbox.
#[doc(hidden)]
pub struct Job(Work);

type Reply = oneshot::Sender<Result<ScoredList, ModelError>>;

enum Work {
    Score {
        request: ScoreRequest,
        user: u64,
        observation: Option<Observation>,
        reply: Reply,
    },
    Observe(Observation),
    /// Runs on the thread between two batches and answers through the reply it holds.
    Command(Box<dyn FnOnce(&mut ModelActor) + Send>),
}

/// A command: `run` with the actor, its result sent back.
fn command<T: Send + 'static>(
    reply: oneshot::Sender<T>,
    run: impl FnOnce(&mut ModelActor) -> T + Send + 'static,
) -> Job {
    Job(Work::Command(Box::new(move |actor| {
        let _ = reply.send(run(actor));
    })))
}

impl ModelMessage for Recommend {
    fn into_job(self, reply: oneshot::Sender<Self::Result>) -> Job {
        Job(Work::Score { request: self.request, user: self.user, observation: self.observation, reply })
    }
}

impl ModelMessage for Observe {
    fn into_job(self, reply: oneshot::Sender<()>) -> Job {
        // Nothing to wait for: "delivered" as soon as it is in the inbox (or refused there).
        let _ = reply.send(());
        Job(Work::Observe(self.observation))
    }
}

impl ModelMessage for SwapModel {
    fn into_job(self, reply: oneshot::Sender<Self::Result>) -> Job {
        command(reply, move |actor| Some(actor.swap(self.model)))
    }
}

impl ModelMessage for StartChallenger {
    fn into_job(self, reply: oneshot::Sender<()>) -> Job {
        command(reply, move |actor| actor.start_challenger(self))
    }
}

impl ModelMessage for EndChallenger {
    fn into_job(self, reply: oneshot::Sender<Self::Result>) -> Job {
        command(reply, move |actor| actor.end_challenger(self.promote))
    }
}

impl ModelMessage for Similar {
    fn into_job(self, reply: oneshot::Sender<SimilarList>) -> Job {
        command(reply, move |actor| {
            actor
                .guarded("finding similar items", |actor| SimilarList {
                    items: actor.control.similar(self.item, self.k, &self.filter, &actor.catalog),
                    version: actor.control.version().to_owned(),
                })
                .unwrap_or_default()
        })
    }
}

impl ModelMessage for CurrentVersion {
    fn into_job(self, reply: oneshot::Sender<Traffic>) -> Job {
        command(reply, |actor| actor.traffic())
    }
}

impl ModelMessage for ConfigureRetrieval {
    fn into_job(self, reply: oneshot::Sender<()>) -> Job {
        command(reply, move |actor| actor.configure_retrieval(self.config))
    }
}

/// The answer to a message sent with [`ModelHandle::send`]; `MailboxError::Closed` if the model
/// thread is gone (or a command panicked before answering).
pub struct ModelReply<T>(oneshot::Receiver<T>);

impl<T> Future for ModelReply<T> {
    type Output = Result<T, MailboxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|answer| answer.map_err(|_| MailboxError::Closed))
    }
}

/// Where callers reach the model thread. Cheap to clone; the thread ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct ModelHandle {
    client: Arc<Client>,
}

/// Shared by every clone of one [`ModelHandle`]: closes the inbox when the last goes.
struct Client {
    inbox: Arc<Inbox>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.inbox.close();
    }
}

impl ModelHandle {
    /// Leaves `msg` in the inbox; the returned future resolves with the answer. A scoring
    /// request or an observation past the inbox's bound is answered (or dropped) at once.
    pub fn send<M>(&self, msg: M) -> ModelReply<M::Result>
    where
        M: ModelMessage,
        M::Result: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.client.inbox.push(msg.into_job(tx));
        ModelReply(rx)
    }

    /// [`Self::send`] without waiting for the answer; bounded the same way (a refused
    /// observation is counted in `liverec_model_refused_total`).
    pub fn post<M>(&self, msg: M)
    where
        M: ModelMessage,
        M::Result: Send + 'static,
    {
        let (tx, _) = oneshot::channel();
        self.client.inbox.push(msg.into_job(tx));
    }

    /// Room the inbox holds for jobs (a burst's room is given back once it drains).
    #[cfg(test)]
    fn queue_room(&self) -> usize {
        self.client.inbox.state.lock().jobs.capacity()
    }

    /// What the thread waits for, if it sleeps.
    #[cfg(test)]
    fn sleeping_until(&self) -> Option<usize> {
        self.client.inbox.state.lock().sleeping_until
    }
}

/// What the model thread waits on: jobs in arrival order, and the counts its bounds apply to.
struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled when the sleeping thread has something to do.
    wake: Condvar,
    /// Scoring requests (and, separately, observations) that may wait.
    capacity: usize,
    metrics: Arc<Metrics>,
}

struct InboxState {
    jobs: VecDeque<Work>,
    /// Scoring requests among `jobs`.
    requests: usize,
    /// Observations among `jobs`, inside requests or alone.
    observations: usize,
    /// What the thread, if asleep, waits for: `Some(n)` wakes it once `n` requests wait or any
    /// other job arrives; `None` while it works (no signal needed, it looks before sleeping).
    sleeping_until: Option<usize>,
    /// No handle is left: the thread answers what remains and ends.
    closed: bool,
    /// The thread has ended: the inbox takes nothing more.
    stopped: bool,
    /// The thread has taken work at least once.
    taken_before: bool,
}

/// What the thread takes from the inbox at once.
enum Taken {
    Batch { observations: Vec<Observation>, requests: Vec<(ScoreRequest, u64)>, replies: Vec<Reply> },
    Command(Box<dyn FnOnce(&mut ModelActor) + Send>),
}

impl Inbox {
    fn push(&self, Job(work): Job) {
        let mut state = self.state.lock();
        if state.stopped {
            // The thread is gone (a panic it could not recover from): nothing waits, so a
            // request hears `Stopped` now and a command's sender hears `Closed`.
            if let Work::Score { reply, .. } = work {
                let _ = reply.send(Err(ModelError::Stopped));
            }
            return;
        }
        let work = match work {
            Work::Score { request, user, observation, reply } => {
                if let Some(observation) = observation {
                    // Observed even when the request is refused below: a batch takes it.
                    if state.observations < self.capacity {
                        state.observations += 1;
                        state.jobs.push_back(Work::Observe(observation));
                    } else {
                        self.metrics.model_refused.inc();
                    }
                }
                if state.requests >= self.capacity {
                    self.metrics.model_refused.inc();
                    let _ = reply.send(Err(ModelError::Overloaded));
                    return;
                }
                state.requests += 1;
                self.metrics.model_queued.set(state.requests as i64);
                Work::Score { request, user, observation: None, reply }
            }
            Work::Observe(observation) => {
                if state.observations >= self.capacity {
                    self.metrics.model_refused.inc();
                    return;
                }
                state.observations += 1;
                Work::Observe(observation)
            }
            command @ Work::Command(_) => command,
        };
        let is_request = matches!(work, Work::Score { .. });
        state.jobs.push_back(work);
        // A sleeping thread is woken by what it waits for; a working one looks before it sleeps.
        let wake = state.sleeping_until.is_some_and(|until| !is_request || state.requests >= until);
        if wake {
            state.sleeping_until = None;
            drop(state);
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_one();
    }

    /// The thread is ending (or unwinding): what waits is answered (requests with `Stopped`,
    /// commands by dropping their reply, so their senders hear `Closed`) and later pushes too.
    fn stop(&self) {
        let mut state = self.state.lock();
        state.stopped = true;
        for work in state.jobs.drain(..) {
            if let Work::Score { reply, .. } = work {
                let _ = reply.send(Err(ModelError::Stopped));
            }
        }
        state.requests = 0;
        state.observations = 0;
        self.metrics.model_queued.set(0);
    }

    /// Waits for work and takes it: a command alone, or the requests and observations at the
    /// front, up to `max_batch` requests. A request that wakes the idle thread waits up to
    /// `max_wait` for that many; requests that came in during a batch go at once, as the next.
    /// `None` once the inbox is closed and empty.
    fn take(&self, max_batch: usize, max_wait: Duration) -> Option<Taken> {
        let mut state = self.state.lock();
        // Whether what waits came in while the thread was idle (before its first take too).
        let mut slept = !std::mem::replace(&mut state.taken_before, true);
        while state.jobs.is_empty() {
            if state.closed {
                return None;
            }
            state.sleeping_until = Some(1);
            self.wake.wait(&mut state);
            slept = true;
        }
        state.sleeping_until = None;
        let lone = slept && state.requests > 0 && !matches!(state.jobs.front(), Some(Work::Command(_)));
        if lone && !max_wait.is_zero() {
            // Trade up to max_wait of latency for fuller batches (worth it for heavy models).
            let deadline = Instant::now() + max_wait;
            while state.requests < max_batch && !state.closed {
                state.sleeping_until = Some(max_batch);
                if self.wake.wait_until(&mut state, deadline).timed_out() {
                    break;
                }
            }
            state.sleeping_until = None;
        }
        let taken = if let Some(Work::Command(_)) = state.jobs.front() {
            let Some(Work::Command(command)) = state.jobs.pop_front() else { unreachable!("just matched") };
            Taken::Command(command)
        } else {
            let (mut observations, mut requests, mut replies) = (Vec::new(), Vec::new(), Vec::new());
            while requests.len() < max_batch {
                match state.jobs.pop_front() {
                    Some(Work::Score { request, user, reply, .. }) => {
                        requests.push((request, user));
                        replies.push(reply);
                    }
                    Some(Work::Observe(observation)) => observations.push(observation),
                    Some(command @ Work::Command(_)) => {
                        // Runs after this batch, as it was sent after these requests.
                        state.jobs.push_front(command);
                        break;
                    }
                    None => break,
                }
            }
            state.requests -= requests.len();
            state.observations -= observations.len();
            self.metrics.model_queued.set(state.requests as i64);
            Taken::Batch { observations, requests, replies }
        };
        if state.jobs.is_empty() && state.jobs.capacity() > 2 * max_batch {
            // A burst can queue thousands of requests; a drained inbox gives that room back
            // rather than keeping it for good (about 1 MB after a wave of 50,000 new users).
            state.jobs.shrink_to(max_batch);
        }
        Some(taken)
    }
}

struct Challenger {
    model: Box<dyn Recommender>,
    variant: Arc<str>,
    share: f64,
    salt: u64,
}

/// The model thread's state: the models it serves, and the settings it serves them with.
pub struct ModelActor {
    control: Box<dyn Recommender>,
    control_variant: Arc<str>,
    challenger: Option<Challenger>,
    /// Builds the control model again after a panic.
    factory: ModelFactory,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    /// The `[model.retrieval]` settings, applied to every model this thread serves.
    retrieval: RetrievalConfig,
    inbox: Arc<Inbox>,
    max_batch: usize,
    /// How long a lone request may wait for company (0: score it at once).
    max_wait: Duration,
}

impl ModelActor {
    /// Starts the model thread serving `model` (the factory's, after a panic); `max_batch`
    /// requests at most per batch, a lone one waiting up to `max_wait` for company, and
    /// `mailbox_capacity` requests (and observations) waiting at most.
    pub fn start_with(
        model: Box<dyn Recommender>,
        factory: ModelFactory,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        max_batch: usize,
        max_wait: Duration,
        mailbox_capacity: usize,
    ) -> ModelHandle {
        let inbox = Arc::new(Inbox {
            state: Mutex::new(InboxState {
                jobs: VecDeque::new(),
                requests: 0,
                observations: 0,
                sleeping_until: None,
                closed: false,
                stopped: false,
                taken_before: false,
            }),
            wake: Condvar::new(),
            capacity: mailbox_capacity,
            metrics: metrics.clone(),
        });
        let actor = ModelActor {
            control: model,
            control_variant: Arc::from(CONTROL),
            challenger: None,
            factory,
            catalog,
            metrics,
            retrieval: RetrievalConfig::default(),
            inbox: inbox.clone(),
            max_batch: max_batch.max(1),
            max_wait,
        };
        std::thread::Builder::new()
            .name("liverec-model".to_owned())
            .spawn(move || actor.run())
            .expect("the OS starts a thread at start-up");
        ModelHandle { client: Arc::new(Client { inbox }) }
    }

    fn run(mut self) {
        // However the loop ends (the last handle gone, or a panic nothing caught), callers
        // waiting in the inbox are answered rather than left waiting for good.
        struct StopOnExit(Arc<Inbox>);
        impl Drop for StopOnExit {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        let _stop = StopOnExit(self.inbox.clone());
        while let Some(taken) = self.inbox.take(self.max_batch, self.max_wait) {
            match taken {
                Taken::Batch { observations, requests, replies } => {
                    let results = self.guarded("scoring a batch", |actor| actor.run_batch(observations, requests));
                    match results {
                        Some(results) => {
                            for (reply, list) in replies.into_iter().zip(results) {
                                let _ = reply.send(Ok(list));
                            }
                        }
                        None => {
                            for reply in replies {
                                let _ = reply.send(Err(ModelError::Stopped));
                            }
                        }
                    }
                }
                Taken::Command(command) => {
                    // A panic here drops the command's reply: its sender hears `Closed`.
                    let _ = self.guarded("running a command", |actor| command(actor));
                }
            }
        }
        tracing::debug!("model thread stopped: no handle left");
    }

    /// Runs `work` with the models, catching a panic in it: logged, `None` returned, and the
    /// control model rebuilt from the factory (a running challenger is dropped).
    fn guarded<T>(&mut self, what: &str, work: impl FnOnce(&mut Self) -> T) -> Option<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut *self))) {
            Ok(done) => Some(done),
            Err(_) => {
                tracing::error!(
                    version = %self.control.version(),
                    what,
                    "the model panicked; it starts over with a model from the factory"
                );
                let (factory, retrieval) = (self.factory.clone(), self.retrieval.clone());
                let fresh = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    let mut fresh = factory();
                    fresh.configure_retrieval(&retrieval);
                    fresh
                }));
                match fresh {
                    Ok(fresh) => {
                        self.control = fresh;
                        self.control_variant = Arc::from(CONTROL);
                        self.challenger = None;
                    }
                    Err(_) => tracing::error!("the model factory panicked too; the model that panicked keeps serving"),
                }
                None
            }
        }
    }

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

    fn run_batch(&mut self, observations: Vec<Observation>, requests: Vec<(ScoreRequest, u64)>) -> Vec<ScoredList> {
        if !observations.is_empty() {
            self.control.observe(&observations);
            if let Some(challenger) = &mut self.challenger {
                challenger.model.observe(&observations);
            }
        }
        // Which requests the challenger answers.
        let to_challenger: Vec<bool> = match &self.challenger {
            Some(c) => requests.iter().map(|(_, user)| traffic_bucket(*user, c.salt) < c.share).collect(),
            None => vec![false; requests.len()],
        };
        let (mut control, mut challenger) = (Vec::new(), Vec::new());
        for ((request, _), &to) in requests.into_iter().zip(&to_challenger) {
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
        to_challenger
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
            .collect()
    }

    fn swap(&mut self, mut model: Box<dyn Recommender>) -> Box<dyn Recommender> {
        tracing::info!(from = self.control.version(), to = model.version(), "serving model swapped");
        model.configure_retrieval(&self.retrieval);
        std::mem::replace(&mut self.control, model)
    }

    fn start_challenger(&mut self, mut msg: StartChallenger) {
        tracing::info!(version = msg.model.version(), variant = %msg.variant, share = msg.share, "challenger serving");
        msg.model.configure_retrieval(&self.retrieval);
        self.control_variant = msg.control_variant;
        self.challenger = Some(Challenger { model: msg.model, variant: msg.variant, share: msg.share, salt: msg.salt });
    }

    fn end_challenger(&mut self, promote: bool) -> Option<Box<dyn Recommender>> {
        let challenger = self.challenger.take()?;
        self.control_variant = Arc::from(CONTROL);
        if promote {
            tracing::info!(from = self.control.version(), to = challenger.model.version(), "challenger promoted");
            Some(std::mem::replace(&mut self.control, challenger.model))
        } else {
            tracing::info!(version = challenger.model.version(), "challenger stopped");
            Some(challenger.model)
        }
    }

    fn configure_retrieval(&mut self, config: RetrievalConfig) {
        self.control.configure_retrieval(&config);
        if let Some(challenger) = &mut self.challenger {
            challenger.model.configure_retrieval(&config);
        }
        self.retrieval = config;
    }

    fn traffic(&self) -> Traffic {
        let share = self.challenger.as_ref().map_or(0.0, |c| c.share);
        Traffic {
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
        }
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

    /// A model thread serving `Fixed(version)`, in batches of up to `max_batch`.
    fn start_fixed(version: &'static str, max_batch: usize) -> ModelHandle {
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
        )
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
        let room = model.queue_room();
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

    type Gate = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

    /// A model thread serving [`Gated`]: the batches it starts (their sizes), and its gate.
    fn start_gated(
        max_batch: usize,
        max_wait: Duration,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> (ModelHandle, tokio::sync::mpsc::UnboundedReceiver<usize>, Gate) {
        let (started_tx, started) = tokio::sync::mpsc::unbounded_channel();
        let gate: Gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fallback")));
        let model = ModelActor::start_with(
            Box::new(Gated { started: started_tx, gate: gate.clone() }),
            factory,
            Arc::new(Catalog::new()),
            metrics,
            max_batch,
            max_wait,
            capacity,
        );
        (model, started, gate)
    }

    /// Lets every batch held at the gate, and every later one, through.
    fn open(gate: &Gate) {
        let (open, wake) = &**gate;
        *open.lock().expect("gate lock") = true;
        wake.notify_all();
    }

    #[actix_rt::test]
    async fn requests_past_the_queue_bound_are_refused_at_once_and_counted() {
        const CAPACITY: usize = 8;
        let metrics = Arc::new(Metrics::default());
        let (actor, mut started, gate) = start_gated(4, Duration::ZERO, CAPACITY, metrics.clone());
        // One batch in flight on the model thread, held there.
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
        open(&gate);
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

    /// A model that reports the size of every batch it scores and its own drop.
    struct Recording {
        batches: std::sync::mpsc::Sender<usize>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Recommender for Recording {
        fn version(&self) -> &str {
            "recording"
        }
        fn observe(&mut self, _observations: &[Observation]) {}
        fn score(&mut self, requests: &[ScoreRequest], _catalog: &Catalog) -> Vec<Vec<Scored>> {
            let _ = self.batches.send(requests.len());
            requests.iter().map(|_| vec![Scored { item: 0, score: 1.0 }]).collect()
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            self.dropped.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn start_recording(
        max_batch: usize,
        max_wait: Duration,
    ) -> (ModelHandle, std::sync::mpsc::Receiver<usize>, Arc<std::sync::atomic::AtomicBool>) {
        let (batches, sizes) = std::sync::mpsc::channel();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let model = Recording { batches, dropped: dropped.clone() };
        let factory: ModelFactory = Arc::new(|| Box::new(Fixed("fallback")));
        let handle = ModelActor::start_with(
            Box::new(model),
            factory,
            Arc::new(Catalog::new()),
            Arc::new(Metrics::default()),
            max_batch,
            max_wait,
            64,
        );
        (handle, sizes, dropped)
    }

    #[actix_rt::test]
    async fn a_lone_request_waits_for_company_but_a_full_batch_goes_at_once() {
        // Stall detector: far shorter than the wait the model is allowed, far longer than any
        // scheduling delay.
        const STALL: Duration = Duration::from_secs(30);
        let (model, sizes, _) = start_recording(4, Duration::from_secs(3600));
        // A session's request after an event carries its observation (queued ahead of it).
        let item = crate::models::HistoryItem { item: 0, event_type: EventType::View, value: None, timestamp: 0 };
        let observation = Observation { previous: Arc::from(Vec::new()), new: vec![item], segment: 0 };
        let first = model.send(Recommend { request: request(), user: 0, observation: Some(observation) });
        // The thread has taken the lone request's wake-up and waits for a full batch (without
        // the wait it would score the request alone and sleep until any job comes).
        let deadline = Instant::now() + STALL;
        while model.sleeping_until() != Some(4) {
            assert!(Instant::now() < deadline, "the thread never waited for company: {:?}", model.sleeping_until());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut replies = vec![first];
        replies.extend((1..4).map(|u| model.send(Recommend { request: request(), user: u, observation: None })));
        let answers = tokio::time::timeout(STALL, futures_util::future::join_all(replies))
            .await
            .expect("a full batch does not wait for max_wait");
        assert!(answers.iter().all(|a| matches!(a, Ok(Ok(_)))), "all answered: {answers:?}");
        let scored: Vec<usize> = sizes.try_iter().collect();
        assert_eq!(scored, vec![4], "the lone request went with the three that came after it");
    }

    #[actix_rt::test]
    async fn the_thread_answers_what_waits_and_ends_once_no_handle_is_left() {
        let (model, _sizes, dropped) = start_recording(2, Duration::ZERO);
        let other = model.clone();
        let replies: Vec<_> =
            (0..10).map(|u| model.send(Recommend { request: request(), user: u, observation: None })).collect();
        drop(model);
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst), "a clone still holds the thread");
        drop(other);
        for reply in replies {
            assert!(matches!(reply.await, Ok(Ok(_))), "a request left before the last handle went is answered");
        }
        // Stall detector: the thread drops its model when it ends.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dropped.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the model thread did not end after its last handle went");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[actix_rt::test]
    async fn requests_that_came_in_during_a_batch_go_next_without_waiting_for_company() {
        const STALL: Duration = Duration::from_secs(30);
        let (model, mut started, gate) = start_gated(4, Duration::from_secs(3600), 64, Arc::new(Metrics::default()));
        let mut replies: Vec<_> =
            (0..4).map(|u| model.send(Recommend { request: request(), user: u, observation: None })).collect();
        assert_eq!(tokio::time::timeout(STALL, started.recv()).await.expect("a full batch starts"), Some(4));
        // Two more while that batch is held: they go as soon as it is done, not an hour later.
        replies.extend((4..6).map(|u| model.send(Recommend { request: request(), user: u, observation: None })));
        open(&gate);
        assert_eq!(tokio::time::timeout(STALL, started.recv()).await.expect("the next batch starts at once"), Some(2));
        let answers = tokio::time::timeout(STALL, futures_util::future::join_all(replies)).await.expect("answered");
        assert!(answers.iter().all(|a| matches!(a, Ok(Ok(_)))), "all answered: {answers:?}");
    }

    #[actix_rt::test]
    async fn a_factory_that_panics_too_leaves_the_old_model_serving() {
        let factory: ModelFactory = Arc::new(|| panic!("the registry is gone"));
        let model = ModelActor::start_with(
            Box::new(PanicsOn99),
            factory,
            Arc::new(Catalog::new()),
            Arc::new(Metrics::default()),
            8,
            Duration::ZERO,
            16,
        );
        let poison = ScoreRequest { k: 99, ..request() };
        let failed = model.send(Recommend { request: poison, user: 1, observation: None }).await.expect("delivered");
        assert!(matches!(failed, Err(ModelError::Stopped)), "the panicking batch is answered: {failed:?}");
        let next = model.send(Recommend { request: request(), user: 1, observation: None }).await.expect("delivered");
        assert_eq!(next.expect("the thread still serves").version.as_ref(), "fragile");
    }

    #[actix_rt::test]
    async fn once_the_thread_has_ended_every_caller_is_answered() {
        let (model, mut started, gate) = start_gated(1, Duration::ZERO, 16, Arc::new(Metrics::default()));
        let held = model.send(Recommend { request: request(), user: 0, observation: None });
        assert_eq!(started.recv().await, Some(1));
        let queued = model.send(Recommend { request: request(), user: 1, observation: None });
        let command = model.send(CurrentVersion);
        // What the thread's exit guard does when the thread ends, however it ends.
        model.client.inbox.stop();
        // Stall detector: without the guard these would wait for good.
        let answered = |reply| tokio::time::timeout(Duration::from_secs(30), reply);
        let queued = answered(queued).await.expect("a queued request is answered");
        assert!(matches!(queued, Ok(Err(ModelError::Stopped))), "a queued request hears Stopped: {queued:?}");
        let command =
            tokio::time::timeout(Duration::from_secs(30), command).await.expect("a queued command is answered");
        assert!(command.is_err(), "a queued command hears Closed");
        let late = answered(model.send(Recommend { request: request(), user: 2, observation: None }))
            .await
            .expect("a request after the end is answered");
        assert!(matches!(late, Ok(Err(ModelError::Stopped))), "a request after the end is answered at once: {late:?}");
        open(&gate);
        assert!(matches!(held.await, Ok(Ok(_))), "the batch in flight finishes");
    }
}
