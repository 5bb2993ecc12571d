//! `KafkaIngestActor`: consumes the events topic in the instance's consumer group and hands events
//! to sessions, committing nothing before it is safe.
//!
//! Delivery: at least once, applied exactly once. A record's offset is stored for commit only
//! after every event of its batch has been applied by its session and the profile store has made
//! the result durable (or, for a bad record, after the dead-letter topic acknowledged it). Offsets
//! are stored strictly in batch order, so a committed offset never passes an event that is not yet
//! durable. After a crash the uncommitted tail is consumed again; sessions and the Redis script
//! skip event ids the profile already holds, so a replay is applied once.
//!
//! Backpressure: at most `kafka.max_inflight_events` records wait for durability; past that the
//! consumer pauses its partitions (it keeps polling, so it stays in the group) and resumes once
//! half of them are done. Counting records, not batches, keeps light traffic (many tiny batches)
//! from pausing the consumer for nothing.
//!
//! Rebalances: before partitions are revoked, the actor waits for every in-flight batch to become
//! durable, stores and commits its offsets, and stops the sessions of users on those partitions,
//! so the next owner rebuilds them from Redis. Newly assigned partitions are rebuilt lazily. With
//! the default cooperative assignment (`kafka.assignment`) a rebalance revokes and assigns only
//! the partitions that move, and the others keep their owner and sessions; with an eager one every
//! partition is revoked and the whole share assigned again. Either way the set of partitions
//! owned is what the assignments added and the revocations did not take away.
//!
//! Supervision: the actor runs under an actix `Supervisor`. If the consumer fails (it cannot be
//! created, or the loop ends with an error) the actor stops and is restarted after a capped
//! exponential backoff; restarts are counted in `liverec_kafka_consumer_restarts_total`.
//! Mailbox: the actor takes no messages; its input is the Kafka consumer itself.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::{join_all, JoinAll};
use futures_util::FutureExt as _;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::messages::Reload;
use super::registry::SessionRegistry;
use crate::bus::kafka::{self, send_dead_letter, wall_micros, DeadLetter};
use crate::bus::record::{received_micros, EventRecord, RecordDecoder};
use crate::config::KafkaConfig;
use crate::event::{now_ms, Event, UserId};
use crate::recs::{RecList, RecUpdate};
use crate::store::Persisted;
use crate::telemetry::Metrics;

/// A batch applied by sessions, waiting to be durable before its offsets are stored.
struct InFlight {
    /// Next offset to consume, per partition, once this batch is durable.
    offsets: Vec<(i32, i64)>,
    /// Records in the batch.
    records: usize,
    done: JoinAll<Persisted>,
    finished: bool,
    /// When the batch was consumed (its age says whether ingest is stalled).
    since: Instant,
}

impl InFlight {
    fn poll_done(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.finished {
            return Poll::Ready(());
        }
        match self.done.poll_unpin(cx) {
            Poll::Ready(_) => {
                self.finished = true;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

type Queue = Arc<Mutex<VecDeque<InFlight>>>;

/// A batch unfinished for this long means ingest cannot progress: a healthy one finishes within
/// the store's write latency, and even a store outage is retried well within it. Long enough that
/// a slow burst is not reported, short enough that an operator hears before the lag is large.
const STALL_AFTER: Duration = Duration::from_secs(30);

/// Consumer context: reacts to rebalances.
struct IngestContext {
    topic: String,
    queue: Queue,
    registry: Arc<SessionRegistry>,
    metrics: Arc<Metrics>,
    /// The consume loop has paused its partitions (too many records in flight), the one record
    /// of that state: partitions assigned meanwhile start paused too, or a cooperative assignment
    /// would slip past the bound, and others start resumed.
    paused: Arc<AtomicBool>,
}

impl ClientContext for IngestContext {
    /// librdkafka's periodic statistics: the consumer lag of the partitions this instance owns.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .get(&self.topic)
            .map(|topic| topic.partitions.values().filter(|p| p.partition >= 0).map(|p| p.consumer_lag.max(0)).sum())
            .unwrap_or(0);
        self.metrics.kafka_lag.set(lag);
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        // Wait until everything handed to sessions is durable, then commit it, so the next owner
        // starts exactly after it. Persistence completes on other threads (sessions, the store
        // writer), so blocking this one briefly cannot deadlock.
        let pending: Vec<InFlight> = self.queue.lock().drain(..).collect();
        let started = Instant::now();
        for mut batch in pending {
            block_until_durable(&mut batch);
            store_offsets(consumer, &self.topic, &batch.offsets);
        }
        if consumer.assignment_lost() {
            // The group moved these partitions on without waiting for this member (it missed its
            // session timeout): the commit is refused, and the new owner replays the uncommitted
            // tail, which the store de-duplicates by event id.
            tracing::warn!("partitions lost (this instance missed the group's session timeout); their new owner replays what was not committed");
        } else if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is also a "failure" (no offset); harmless.
            tracing::debug!(error = %error, "commit on revoke");
        }
        let partitions: HashSet<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        let released = self.registry.release_partitions(&partitions);
        let owned = self.registry.remove_assigned(&partitions);
        self.metrics.kafka_rebalances.inc();
        self.metrics.kafka_partitions_revoked.add(partitions.len() as u64);
        let mut partitions: Vec<i32> = partitions.into_iter().collect();
        partitions.sort_unstable();
        tracing::info!(
            partitions = ?partitions,
            owned = ?owned,
            sessions = released,
            waited_ms = started.elapsed().as_millis() as u64,
            "partitions revoked: in-flight events committed, sessions released"
        );
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else { return };
        self.metrics.kafka_group_refused.set(0);
        // A partition keeps a pause of ours across a revocation, so one that comes back must be
        // set to the loop's state either way: paused while it is, consumed otherwise.
        if assigned.count() > 0 {
            let paused = self.paused.load(Ordering::Relaxed);
            let result = if paused { consumer.pause(assigned) } else { consumer.resume(assigned) };
            if let Err(error) = result {
                tracing::warn!(error = %error, paused, "cannot set newly assigned partitions to the loop's state");
            }
        }
        let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
        let owned = self.registry.add_assigned(&partitions);
        tracing::info!(partitions = ?partitions, owned = ?owned, "partitions assigned");
    }
}

/// Blocks this thread until `batch` is durable. The revoke callback runs inside the consume
/// loop's task, whose tokio budget a busy loop may have spent (polling a batch of a thousand
/// `Persisted` futures spends it at once). With the budget spent, a finished oneshot answers
/// `Pending` and hands its wake-up to the tokio scheduler, which cannot run while this thread
/// blocks: the revoke then waited forever and the whole group with it (seen under load when an
/// instance joined, docs/performance.md "Scale-out"). Hence the wait opts out of the budget.
fn block_until_durable(batch: &mut InFlight) {
    futures_executor::block_on(tokio::task::unconstrained(std::future::poll_fn(|cx| batch.poll_done(cx))));
}

fn store_offsets<C: ConsumerContext, K: Consumer<C>>(consumer: &K, topic: &str, offsets: &[(i32, i64)]) {
    let mut list = TopicPartitionList::new();
    for &(partition, next) in offsets {
        if let Err(error) = list.add_partition_offset(topic, partition, Offset::Offset(next)) {
            tracing::error!(error = %error, "cannot build offset list");
        }
    }
    if let Err(error) = consumer.store_offsets(&list) {
        // A partition revoked meanwhile refuses the store; its next owner replays the tail.
        tracing::debug!(error = %error, "offsets not stored");
    }
}

pub struct KafkaIngestActor {
    config: KafkaConfig,
    registry: Arc<SessionRegistry>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    limits: crate::event::EventLimits,
    restarts: u32,
    started_at: Instant,
}

impl KafkaIngestActor {
    pub fn new(
        config: KafkaConfig,
        registry: Arc<SessionRegistry>,
        producer: FutureProducer,
        metrics: Arc<Metrics>,
        limits: crate::event::EventLimits,
    ) -> Self {
        Self { config, registry, producer, metrics, limits, restarts: 0, started_at: Instant::now() }
    }

    fn backoff(&self) -> Duration {
        self.config.restart_backoff(self.restarts)
    }
}

impl Actor for KafkaIngestActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let delay = self.backoff();
        self.started_at = Instant::now() + delay;
        ctx.run_later(delay, |act, ctx| {
            let run = Consume {
                config: act.config.clone(),
                registry: act.registry.clone(),
                producer: act.producer.clone(),
                metrics: act.metrics.clone(),
                limits: act.limits.clone(),
            }
            .run();
            ctx.spawn(run.into_actor(act).map(|result, _act, ctx| {
                if let Err(error) = result {
                    tracing::error!(error = %error, "kafka consumer failed; restarting");
                }
                ctx.stop();
            }));
        });
    }
}

impl Supervised for KafkaIngestActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.metrics.kafka_restarts.inc();
        // A consumer that ran for a good while before failing starts over from a short backoff.
        if self.started_at.elapsed() > Duration::from_secs(60) {
            self.restarts = 0;
        }
        self.restarts = self.restarts.saturating_add(1);
    }
}

/// One run of the consume loop, from consumer creation to failure.
struct Consume {
    config: KafkaConfig,
    registry: Arc<SessionRegistry>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    limits: crate::event::EventLimits,
}

impl Consume {
    /// Fits `kafka.session_timeout_ms` into what the brokers accept, as the consumer is about to
    /// ask for it: a stock broker refuses less than 6 s, and a member refused for its timeout
    /// would retry the join for good, consuming nothing. Where the bounds cannot be read (no
    /// `DescribeConfigs` permission), the configured value is asked for as it is.
    async fn fit_session_timeout(&mut self) {
        let (session, heartbeat) = (self.config.session_timeout_ms, self.config.heartbeat_interval_ms);
        match kafka::session_timeout_bounds(&self.config).await {
            Ok(bounds) => {
                let fitted = kafka::fit_session_timeout(session, heartbeat, bounds);
                if fitted != (session, heartbeat) {
                    tracing::info!(
                        configured_ms = session,
                        used_ms = fitted.0,
                        heartbeat_interval_ms = fitted.1,
                        broker_min_ms = bounds.0,
                        broker_max_ms = bounds.1,
                        "kafka.session_timeout_ms lies outside the brokers' group.min/max.session.timeout.ms: \
                         asking for the nearest they accept. A killed instance's partitions move after about \
                         this long"
                    );
                }
                (self.config.session_timeout_ms, self.config.heartbeat_interval_ms) = fitted;
            }
            Err(error) => tracing::warn!(
                error = %error,
                session_timeout_ms = session,
                "cannot read the brokers' session timeout bounds; asking for kafka.session_timeout_ms as configured"
            ),
        }
    }

    async fn run(mut self) -> Result<(), KafkaError> {
        // A consumer that failed ended without revoking anything: this one starts owning nothing,
        // and the sessions of what the last one owned rebuild from the store when their
        // partitions come back, since the group may have moved them meanwhile.
        let stale: HashSet<i32> = self.registry.assigned().into_iter().collect();
        if !stale.is_empty() {
            self.registry.release_partitions(&stale);
            self.registry.remove_assigned(&stale);
        }
        self.metrics.kafka_group_refused.set(0);
        let queue: Queue = Arc::new(Mutex::new(VecDeque::new()));
        let paused_flag = Arc::new(AtomicBool::new(false));
        let context = IngestContext {
            topic: self.config.events_topic.clone(),
            queue: queue.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            paused: paused_flag.clone(),
        };
        self.fit_session_timeout().await;
        let consumer: StreamConsumer<IngestContext> = self.config.consumer_config().create_with_context(context)?;
        consumer.subscribe(&[&self.config.events_topic])?;
        tracing::info!(
            topic = %self.config.events_topic,
            group = %self.config.group_id,
            session_timeout_ms = self.config.session_timeout_ms,
            heartbeat_interval_ms = self.config.heartbeat_interval_ms,
            "kafka consumer started"
        );
        let max_inflight = self.config.max_inflight_events.max(1);
        let mut stalled = false;
        // Wakes the loop while nothing arrives, so a stall is seen even when nothing else moves.
        let mut tick = actix_rt::time::interval(Duration::from_secs(1));
        loop {
            self.store_finished(&consumer, &queue);
            self.watch_stall(&queue, &mut stalled);
            let inflight: usize = queue.lock().iter().map(|b| b.records).sum();
            let paused = paused_flag.load(Ordering::Relaxed);
            if !paused && inflight >= max_inflight {
                paused_flag.store(true, Ordering::Relaxed);
                consumer.pause(&consumer.assignment()?)?;
                self.metrics.kafka_paused.inc();
                tracing::debug!(inflight, "sessions behind: partitions paused");
            } else if paused && inflight <= max_inflight / 2 {
                paused_flag.store(false, Ordering::Relaxed);
                consumer.resume(&consumer.assignment()?)?;
                tracing::debug!(inflight, "partitions resumed");
            }
            let head_done = std::future::poll_fn(|cx| match queue.lock().front_mut() {
                Some(batch) => batch.poll_done(cx),
                None => Poll::Pending,
            });
            tokio::select! {
                message = consumer.recv() => {
                    let first = match message {
                        Ok(message) => message,
                        // Most consumption errors are transient (a topic not yet propagated, a
                        // broker restarting) and librdkafka recovers by itself; only a fatal
                        // error ends this consumer, for the supervisor to restart it.
                        Err(error) if consumer.client().fatal_error().is_none() => {
                            self.metrics.kafka_errors.inc();
                            let code = error.rdkafka_error_code();
                            let refused = matches!(
                                code,
                                Some(RDKafkaErrorCode::InconsistentGroupProtocol | RDKafkaErrorCode::InvalidSessionTimeout)
                            );
                            // Not transient: it lasts until the other members or the brokers'
                            // settings change. An assignment, once they have, clears it. Said
                            // once, not at each retry.
                            if refused && self.metrics.kafka_group_refused.get() == 0 {
                                self.metrics.kafka_group_refused.set(1);
                                if code == Some(RDKafkaErrorCode::InvalidSessionTimeout) {
                                    tracing::error!(
                                        group = %self.config.group_id,
                                        session_timeout_ms = self.config.session_timeout_ms,
                                        "the brokers refuse this instance's session timeout: kafka.session_timeout_ms \
                                         (LIVEREC_KAFKA__SESSION_TIMEOUT_MS) must lie between their \
                                         group.min.session.timeout.ms and group.max.session.timeout.ms, which could \
                                         not be read to fit it. Nothing is consumed here until it does"
                                    );
                                } else {
                                    tracing::error!(
                                        group = %self.config.group_id,
                                        assignment = self.config.assignment.strategy(),
                                        "the consumer group refuses this instance: its members share partitions another \
                                         way; every instance of a group needs the same kafka.assignment \
                                         (LIVEREC_KAFKA__ASSIGNMENT). Nothing is consumed here until they agree"
                                    );
                                }
                            }
                            tracing::warn!(error = %error, "kafka consumption error; continuing");
                            actix_rt::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        Err(error) => return Err(error),
                    };
                    let mut records = vec![first];
                    // Take whatever else is already fetched, up to the batch size, without waiting.
                    while records.len() < self.config.max_batch {
                        match consumer.recv().now_or_never() {
                            Some(Ok(message)) => records.push(message),
                            // Handled on the next turn of the loop.
                            Some(Err(_)) | None => break,
                        }
                    }
                    let batch = self.dispatch(records).await;
                    queue.lock().push_back(batch);
                }
                () = head_done => {}
                _ = tick.tick() => {}
            }
        }
    }

    /// Publishes the age of the oldest unfinished batch, and says once, in the log, the metric and
    /// (through it) `/readyz`, when ingest stalls and when it recovers.
    fn watch_stall(&self, queue: &Queue, stalled: &mut bool) {
        let (age, records) =
            queue.lock().front().map(|b| (b.since.elapsed(), b.records)).unwrap_or((Duration::ZERO, 0));
        self.metrics.kafka_oldest_batch_seconds.set(age.as_secs() as i64);
        let now_stalled = age >= STALL_AFTER;
        if now_stalled == *stalled {
            return;
        }
        *stalled = now_stalled;
        self.metrics.kafka_stalled.set(i64::from(now_stalled));
        if now_stalled {
            tracing::error!(
                age_s = age.as_secs(),
                records,
                "kafka ingest stalled: a batch is not applied and durable; no later offset is committed"
            );
        } else {
            tracing::warn!("kafka ingest progresses again");
        }
    }

    /// Stores the offsets of every finished batch at the head of the queue, in order.
    fn store_finished(&self, consumer: &StreamConsumer<IngestContext>, queue: &Queue) {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut queue = queue.lock();
        while let Some(batch) = queue.front_mut() {
            if batch.poll_done(&mut cx).is_pending() {
                break;
            }
            let batch = queue.pop_front().expect("front exists");
            store_offsets(consumer, &self.config.events_topic, &batch.offsets);
        }
    }

    /// Decodes records, sends bad ones to the dead-letter topic and good ones to their sessions.
    /// Returns once sessions have applied the events in memory; durability is in the result.
    async fn dispatch(&self, mut records: Vec<BorrowedMessage<'_>>) -> InFlight {
        // The batch is gathered over several receives, and a receive may run a revocation: the
        // records taken before it from a partition given up since belong to its new owner, which
        // consumes them from the committed offset. Applied here, they would start sessions for
        // users this instance no longer owns. No rebalance runs during dispatch, so this holds.
        let owned = self.registry.assigned();
        let before = records.len();
        records.retain(|record| owned.binary_search(&record.partition()).is_ok());
        if records.len() < before {
            tracing::debug!(dropped = before - records.len(), "records of revoked partitions left to their new owner");
        }
        let now = now_ms();
        let wall_now = wall_micros();
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        let mut by_user: Vec<(UserId, i32, Vec<Event>, Instant)> = Vec::new();
        let mut index: HashMap<UserId, usize> = HashMap::new();
        let mut dead = Vec::new();
        let mut reloads = Vec::new();
        let mut shown = Vec::new();
        let decoder = RecordDecoder {
            limits: &self.limits,
            catalog: &self.registry.deps.catalog,
            pseudonyms: &self.registry.deps.pseudonyms,
        };
        for record in &records {
            let next = offsets.entry(record.partition()).or_insert(0);
            *next = (*next).max(record.offset() + 1);
            match decoder.decode(record, now) {
                EventRecord::Reload(user) => {
                    if let Some(user) = user {
                        reloads.push((user, record.partition()));
                    }
                }
                EventRecord::Shown(user, list) => match shown_list(user, &list) {
                    Ok(update) => shown.push(update),
                    Err(reason) => dead.push(DeadLetter {
                        key: record.key().map(<[u8]>::to_vec),
                        payload: Some(list),
                        partition: record.partition(),
                        offset: record.offset(),
                        code: "invalid_control",
                        reason,
                    }),
                },
                EventRecord::Event(event) => {
                    let received = received_at(record, wall_now);
                    match index.get(&event.user_id) {
                        Some(&i) => by_user[i].2.push(event),
                        None => {
                            index.insert(event.user_id.clone(), by_user.len());
                            by_user.push((event.user_id.clone(), record.partition(), vec![event], received));
                        }
                    }
                }
                EventRecord::Invalid { code, reason } => dead.push(DeadLetter {
                    key: record.key().map(<[u8]>::to_vec),
                    payload: record.payload().map(<[u8]>::to_vec),
                    partition: record.partition(),
                    offset: record.offset(),
                    code,
                    reason,
                }),
            }
        }
        let count = records.len();
        self.metrics.kafka_records.add(count as u64);
        // One span per consumed batch, continuing the trace of its first traced record.
        let span = crate::telemetry::span(|| {
            tracing::info_span!("kafka_receive", records = count, trace_id = tracing::field::Empty)
        });
        if let Some(parent) = records.iter().find_map(traceparent) {
            crate::telemetry::continue_trace(&span, &parent);
        }
        crate::telemetry::record_trace_id(&span);
        drop(records);
        let mut persisted: Vec<Persisted> = Vec::with_capacity(by_user.len() + dead.len());
        for letter in dead {
            persisted.push(self.dead_letter(letter));
        }
        // Lists shown elsewhere go first: a click polled with the list it was on is attributed to
        // it (an event just before a list, polled with it, cannot be on it but by chance).
        for (user, update) in shown {
            self.registry.shown_by_peer(&user, update);
        }
        let applies: Vec<_> = by_user
            .into_iter()
            .map(|(user, partition, events, received)| {
                let registry = self.registry.clone();
                let span = span.clone();
                async move { registry.apply(&user, Some(partition), events, received, span).await }
            })
            .collect();
        for applied in join_all(applies).await {
            persisted.push(applied.persisted);
        }
        for (user, partition) in reloads {
            // An erasure through another instance: the owner purges its retained event log
            // here, whatever its session of the user is doing. (Left to the session's reload,
            // a session stopping because the erasure reached it through Redis first dropped
            // the reload, and the erased user's events stayed in the log for training.)
            let deps = &self.registry.deps;
            if let Ok(Some(at)) = deps.store.tombstone(&user).await {
                deps.event_log.remove_user(&user, at);
            }
            let (_, session) = self.registry.session_on_partition(&user, partition);
            // A session that stopped meanwhile needs no reload: the next one loads the store.
            let _ = session.reload(Reload).await;
        }
        InFlight {
            offsets: offsets.into_iter().collect(),
            records: count,
            done: join_all(persisted),
            finished: false,
            since: Instant::now(),
        }
    }

    /// Produces a bad record to the dead-letter topic; resolves once the broker has it.
    fn dead_letter(&self, letter: DeadLetter) -> Persisted {
        self.metrics.kafka_dead_letters.inc();
        tracing::warn!(partition = letter.partition, offset = letter.offset, code = letter.code, reason = %letter.reason, "record sent to the dead-letter topic");
        let producer = self.producer.clone();
        let topic = self.config.dead_letter_topic.clone();
        let source = self.config.events_topic.clone();
        Box::pin(send_dead_letter(producer, topic, source, letter))
    }
}

/// The W3C `traceparent` header of a record, if it has one.
fn traceparent(record: &BorrowedMessage<'_>) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = record.headers()?;
    headers
        .iter()
        .find(|h| h.key == "traceparent")
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// When liverec first received the event: the REST header if present, else now.
/// The list of a "shown" control record, whose user must be the record's key.
fn shown_list(user: Option<UserId>, json: &[u8]) -> Result<(UserId, Arc<RecUpdate>), String> {
    let user = user.ok_or("a shown-list control record needs the user id as its key")?;
    let list: RecList = serde_json::from_slice(json).map_err(|e| format!("the shown list is not a list: {e}"))?;
    if list.user_id != user {
        return Err(format!("the shown list is {}'s, the record's key {user}", list.user_id));
    }
    Ok((user, RecUpdate::bare(list)))
}

fn received_at(record: &BorrowedMessage<'_>, wall_now: i64) -> Instant {
    let header = received_micros(record);
    let now = Instant::now();
    match header {
        Some(micros) if micros <= wall_now => {
            now.checked_sub(Duration::from_micros((wall_now - micros) as u64)).unwrap_or(now)
        }
        _ => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_record_is_a_list_of_its_keys_user_or_a_dead_letter() {
        let list = serde_json::json!({
            "rec_id": "r1", "user_id": "ann", "model_version": "v1", "variant": "control",
            "generated_at": 5, "seq": 2, "last_event_id": null, "items": [{"item_id": "a", "score": 0.5}]
        });
        let json = serde_json::to_vec(&list).expect("json");
        let (user, update) = shown_list(Some(UserId::from("ann")), &json).expect("ann's list");
        assert_eq!((user.as_str(), update.list.rec_id.as_str()), ("ann", "r1"));
        assert!(!update.is_shown(), "counted by the owner when it takes it, not before");
        let bob = shown_list(Some(UserId::from("bob")), &json).expect_err("not bob's");
        assert!(bob.contains("bob") && bob.contains("ann"), "{bob}");
        assert!(shown_list(None, &json).expect_err("no key").contains("key"));
        assert!(shown_list(Some(UserId::from("ann")), b"{").expect_err("not json").contains("not a list"));
    }

    /// A revoke that comes while the consume loop's task has spent its tokio budget still sees
    /// an in-flight batch finish (before, it waited forever and so did the consumer group).
    #[test]
    fn a_revoke_sees_in_flight_batches_finish_after_the_loop_spent_its_tokio_budget() {
        let (finished_tx, finished_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
            runtime.block_on(async move {
                // Spend the task's budget, as a consume loop does polling many Persisted futures.
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                for n in 0..1000 {
                    tx.send(n).expect("open");
                }
                let mut received = 0;
                while rx.recv().now_or_never().is_some() {
                    received += 1;
                }
                assert!(received < 1000, "the budget was not spent: {received} received");
                // A batch that is already durable.
                let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                done_tx.send(()).expect("open");
                let persisted: Persisted = Box::pin(async move {
                    let _ = done_rx.await;
                });
                let mut batch = InFlight {
                    offsets: vec![(0, 1)],
                    records: 1,
                    done: join_all(vec![persisted]),
                    finished: false,
                    since: Instant::now(),
                };
                block_until_durable(&mut batch);
            });
            let _ = finished_tx.send(());
        });
        // A stall detector, not a speed demand: the wait takes microseconds when it works.
        assert!(
            finished_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "the revoke's wait for a durable batch never returned"
        );
    }
}
