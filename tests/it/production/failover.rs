//! Production mode, failover: two instances in one consumer group surviving a SIGKILL, a Redis
//! restart, an erasure reaching every instance, and an instance SIGKILLed and restarted while a
//! client posts to it.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use liverec::bus::kafka::partition_for;
use liverec::config::Config;
use serde_json::{json, Value};

use crate::support::*;

/// A liverec process, as a user runs it.
struct Instance {
    child: Child,
    url: String,
}

impl Instance {
    fn spawn(config: &Config, port: u16) -> Instance {
        let child = super::serve_command(config, port)
            .env("LIVEREC_KAFKA__COMMIT_INTERVAL_MS", "200")
            .env("LIVEREC_DEMO__ITEMS", "200")
            .env("LIVEREC_DEMO__USERS", "300")
            .env("LIVEREC_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn liverec");
        Instance { child, url: format!("http://127.0.0.1:{port}") }
    }

    async fn partitions(&self) -> Option<Vec<i32>> {
        let mut response = client().get(format!("{}/readyz", self.url)).send().await.ok()?;
        let body: Value = response.json().await.ok()?;
        serde_json::from_value(body["kafka_partitions"].clone()).ok()
    }

    fn kill(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[actix_rt::test]
async fn two_instances_share_users_and_a_sigkill_loses_nothing_and_applies_nothing_twice() {
    let _services = SERVICES.read().await;
    let config = production_config("group");
    let a = Instance::spawn(&config, free_port());
    let mut b = Instance::spawn(&config, free_port());
    let (parts_a, parts_b) = eventually("both instances own partitions", || async {
        let (pa, pb) = (a.partitions().await?, b.partitions().await?);
        let all: HashSet<i32> = pa.iter().chain(&pb).copied().collect();
        // Settled: every partition owned, by exactly one of them (mid-rebalance, both may claim some).
        let settled = all.len() == PARTITIONS as usize && pa.len() + pb.len() == PARTITIONS as usize;
        (!pa.is_empty() && !pb.is_empty() && settled).then_some((pa, pb))
    })
    .await;
    assert!(parts_a.iter().all(|p| !parts_b.contains(p)), "{parts_a:?} / {parts_b:?}");

    // A user whose events B consumes, watched by a client connected to A.
    let watched =
        (0..).map(|i| format!("g-user-{i}")).find(|u| parts_b.contains(&partition_for(u, PARTITIONS))).expect("user");
    let (_, mut ws) = awc::Client::new().ws(format!("{}/v1/ws", a.url)).connect().await.expect("ws to A");
    use futures_util::{SinkExt as _, StreamExt as _};
    ws.send(awc::ws::Message::Text(json!({ "subscribe": watched }).to_string().into())).await.expect("send");
    let post = |url: String, body: Value| async move {
        let response = client()
            .post(format!("{url}/v1/events"))
            .insert_header(("content-type", "application/json"))
            .send_body(body.to_string())
            .await
            .expect("POST");
        response.status().as_u16()
    };
    assert_eq!(
        post(
            a.url.clone(),
            json!({ "user_id": watched, "item_id": "item-0042", "event_type": "click", "event_id": "w-1" })
        )
        .await,
        202
    );
    let pushed = actix_rt::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(awc::ws::Frame::Text(bytes))) => {
                    let message: Value = serde_json::from_slice(&bytes).expect("json");
                    if message["type"] == "recommendations"
                        && !items(&message["data"]).contains(&"item-0042".to_owned())
                    {
                        // The list that reflects the click, computed on B, pushed by A.
                        if message["data"]["seq"].as_u64() >= Some(1) {
                            return message;
                        }
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("A pushes B's list");
    assert_eq!(pushed["data"]["user_id"], Value::from(watched.clone()));
    let mut got = client().get(format!("{}/v1/users/{watched}/recommendations", a.url)).send().await.expect("GET on A");
    assert_eq!(got.status().as_u16(), 200);
    let listed: Value = got.json().await.expect("json");
    assert!(!items(&listed).contains(&"item-0042".to_owned()), "A serves B's current list: {listed}");

    // A stream of events over 20 users; B is killed half way.
    let users: Vec<String> = (0..20).map(|u| format!("g-stream-{u}")).collect();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..30 {
        if round == 15 {
            b.kill();
        }
        let batch: Vec<Value> = users
            .iter()
            .map(|u| {
                let id = format!("{u}-e{round}");
                expected.entry(u.clone()).or_default().push(id.clone());
                json!({ "user_id": u, "item_id": format!("item-{:04}", round), "event_type": "view", "event_id": id })
            })
            .collect();
        // Acknowledged means the broker has them; A keeps answering throughout.
        assert_eq!(post(a.url.clone(), json!(batch)).await, 202);
    }
    eventually("A owns every partition after B died", || async {
        (a.partitions().await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    let redis = redis_conn(&config).await;
    for (user, ids) in &expected {
        let stored = eventually(&format!("every event of {user} in redis"), || {
            let redis = redis.clone();
            let config = &config;
            async move {
                let stored = stored_ids(redis, config, user).await;
                (stored.len() >= ids.len()).then_some(stored)
            }
        })
        .await;
        assert_eq!(&stored, ids, "{user}: each acknowledged event exactly once, in order");
    }
}

#[actix_rt::test]
async fn a_redis_restart_keeps_serving_and_loses_no_accepted_event() {
    let _services = SERVICES.write().await;
    let config = production_config("redis-restart");
    let server = start(config.clone()).await;
    let services_script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services");
    let run = |action: &str| {
        let status = Command::new("bash").arg(services_script).arg(action).status().expect("scripts/services");
        assert!(status.success(), "scripts/services {action} failed");
    };
    let event = |round: usize| json!({ "user_id": "steady", "item_id": format!("item-{round:04}"), "event_type": "view", "event_id": format!("r-{round}") });
    for round in 0..5 {
        post_events(&server, event(round)).await;
    }
    eventually("first events applied", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 5.0).then_some(())
    })
    .await;

    run("stop-redis");
    // Whatever fails below, Redis comes back for the tests after this one.
    let restarted = RestartOnDrop::new(services_script, "start-redis");
    for round in 5..10 {
        post_events(&server, event(round)).await;
    }
    eventually_within(SERVICE_DEADLINE, "the server reports the store degraded", || async {
        let ready = get(&server, "/readyz").await;
        (ready.status == 200 && ready.body["degraded"] == true).then_some(())
    })
    .await;
    // Sessions keep applying and serving from memory while writes wait.
    eventually("events applied while redis is down", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 10.0).then_some(())
    })
    .await;
    // The list that reflects the last event (its `last_event_id`; the one served just after the
    // event is applied may still be the previous one) leaves out the item just viewed.
    let recs = eventually("a list reflecting the last event", || async {
        let recs = get(&server, "/v1/users/steady/recommendations").await;
        (recs.status == 200 && recs.body["last_event_id"] == "r-9").then_some(recs)
    })
    .await;
    assert!(!items(&recs.body).contains(&"item-0009".to_owned()), "{}", recs.body);

    restarted.disarm();
    run("start-redis");
    let redis = redis_conn(&config).await;
    let stored = eventually("every accepted event in redis", || {
        let redis = redis.clone();
        let config = &config;
        async move {
            let stored = stored_ids(redis, config, "steady").await;
            (stored.len() >= 10).then_some(stored)
        }
    })
    .await;
    let expected: Vec<String> = (0..10).map(|r| format!("r-{r}")).collect();
    assert_eq!(stored, expected);
    eventually("no longer degraded", || async {
        (get(&server, "/readyz").await.body["degraded"] == false).then_some(())
    })
    .await;
    server.stop().await;
}

/// `DELETE /v1/users/{id}` on one instance reaches the others: the erasure travels the user's
/// update channel in Redis, so an instance with a stream of the user closes it, and the owner of
/// the user's partition (told through Kafka to reload the user) purges its retained event log.
#[actix_rt::test]
async fn an_erasure_reaches_the_streams_and_the_event_log_of_every_instance() {
    let _services = SERVICES.read().await;
    let config = production_config("erase");
    let (a, b, owned_by_a) = super::two_instances(&config).await;
    // A user A consumes and streams; the erasure goes to B.
    let user = (0..)
        .map(|i| format!("e-user-{i}"))
        .find(|u| owned_by_a.contains(&partition_for(u, PARTITIONS)))
        .expect("user");
    let mut stream = SseStream::connect(&a, &user, None).await;
    post_events(&b, event(&user, "item-0007", "click")).await;
    // The first list may predate the click; the one after it names the click's event.
    while !stream.next_list().await["last_event_id"].is_string() {}
    assert_eq!(metric(&a, "liverec_eventlog_events").await, 1.0, "A logged the click for training");

    let mut response = client().delete(format!("{}/v1/users/{user}", b.url())).send().await.expect("DELETE");
    assert_eq!(response.status().as_u16(), 200);
    let erased: Value = response.json().await.expect("json");
    assert_eq!(erased["user_id"], json!(user));
    let last = actix_rt::time::timeout(DEADLINE, async {
        let mut last = None;
        while let Some(event) = stream.next_event().await {
            last = Some(event);
        }
        last
    })
    .await
    .expect("A's stream ends after the erasure")
    .expect("A's stream says why it ends");
    assert_eq!(last.event, "erased", "{last:?}");
    eventually_within(SERVICE_DEADLINE, "A's event log forgets the user", || async {
        (metric(&a, "liverec_eventlog_events").await == 0.0).then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// The liverec process of the SIGKILL test, as the test moves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Process {
    First,
    /// SIGKILLed; no process listens on the port.
    Killed,
    /// Started again with the same configuration and port; it may not listen yet.
    Second,
}

/// One `POST /v1/events` as the client of the SIGKILL test saw it.
#[derive(Debug)]
struct Post {
    /// The batch the client was posting; a retry keeps its number and its event ids.
    batch: usize,
    /// The process when the request was sent, and when its answer (or error) came.
    process: Process,
    ended: Process,
    /// The status, or the client's error when no answer came.
    outcome: Result<u16, String>,
    /// Printed for the record, never asserted on.
    took: Duration,
}

/// The SIGKILL test's client ([`RestartClient`]), recording a [`Post`] of each request.
async fn post_across_restarts(
    url: String,
    process: std::rc::Rc<std::cell::Cell<Process>>,
    posts: std::rc::Rc<std::cell::RefCell<Vec<Post>>>,
    in_flight: std::rc::Rc<std::cell::Cell<bool>>,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) {
    let client = RestartClient { url, prefix: "ks", phase: process, in_flight, stop };
    client.run(posts, Post::from).await;
}

impl From<Exchange<Process>> for Post {
    fn from(exchange: Exchange<Process>) -> Post {
        let Exchange { batch, sent, ended, answer, took } = exchange;
        Post { batch, process: sent, ended, outcome: answer.map(|a| a.status), took }
    }
}

/// One metric sample of a liverec process, if it answers and has it.
async fn instance_metric(instance: &Instance, sample: &str) -> Option<f64> {
    let mut response = client().get(format!("{}/metrics", instance.url)).send().await.ok()?;
    let bytes = response.body().limit(16 * 1024 * 1024).await.ok()?;
    parse_metric(&String::from_utf8_lossy(&bytes), sample)
}

#[actix_rt::test]
async fn a_sigkilled_instance_restarted_under_rest_load_applies_every_accepted_event_once() {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    let _services = SERVICES.read().await;
    let config = production_config("sigkill-restart");
    // The same port for both processes, as a supervisor restarting a service uses: the client
    // keeps posting to one address.
    let port = free_port();
    let mut first = Instance::spawn(&config, port);
    eventually("the first process owns every partition", || async {
        (first.partitions().await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    let process = Rc::new(Cell::new(Process::First));
    let posts: Rc<RefCell<Vec<Post>>> = Rc::default();
    let in_flight = Rc::new(Cell::new(false));
    let stop = Rc::new(Cell::new(false));
    let client_task = actix_rt::spawn(post_across_restarts(
        first.url.clone(),
        process.clone(),
        posts.clone(),
        in_flight.clone(),
        stop.clone(),
    ));
    let accepted_from = |at: Process| posts.borrow().iter().filter(|p| p.process == at && p.outcome == Ok(202)).count();

    // Killed once it has applied (and, every 200 ms, committed) part of the stream, while a
    // request of the client is on its way: the process may be producing that batch, or have
    // answered it, when it dies.
    eventually("events accepted and applied by the first process", || async {
        let applied = instance_metric(&first, "liverec_session_applied_events_total").await?;
        (accepted_from(Process::First) >= 20 && applied >= 40.0).then_some(())
    })
    .await;
    eventually("a request on its way", || async { in_flight.get().then_some(()) }).await;
    process.set(Process::Killed);
    first.kill();
    let killed_at = std::time::Instant::now();
    eventually("a request failed while no process listens", || async {
        posts.borrow().iter().any(|p| p.process == Process::Killed && p.outcome.is_err()).then_some(())
    })
    .await;

    // The same configuration, so the same consumer group: it resumes from the committed offsets.
    let mut second = Instance::spawn(&config, port);
    process.set(Process::Second);
    eventually("events accepted by the second process", || {
        let exited = second.child.try_wait().ok().flatten();
        async move {
            assert!(exited.is_none(), "the second process exited: {exited:?}");
            (accepted_from(Process::Second) >= 20).then_some(())
        }
    })
    .await;
    // It takes the partitions over once the group has dropped the killed member.
    eventually("the second process owns every partition", || async {
        (second.partitions().await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    let owned_after = killed_at.elapsed();
    stop.set(true);
    actix_rt::time::timeout(DEADLINE, client_task).await.expect("the client stops").expect("the client task");

    let posts = posts.take();
    eprintln!("the second process owned every partition {owned_after:?} after the kill (printed, not asserted)");
    for line in summarise_posts(&posts) {
        eprintln!("{line}");
    }
    // What the client saw: a 202, or no answer at all (its connection refused or dropped);
    // never an error status, and every request to the live first process was accepted.
    for p in &posts {
        assert!(matches!(p.outcome, Ok(202) | Err(_)), "{p:?}");
    }
    let during = |at: Process| posts.iter().filter(move |p| p.process == at && p.ended == at);
    assert!(during(Process::First).all(|p| p.outcome == Ok(202)));
    assert!(during(Process::Killed).all(|p| p.outcome.is_err()));
    // The client moves on only after a 202, so every batch it made was accepted in the end,
    // among them those that got no answer and were retried with the same ids.
    let batches = posts.last().expect("posts").batch + 1;
    assert!((0..batches).all(|b| posts.iter().any(|p| p.batch == b && p.outcome == Ok(202))));
    let retried: HashSet<usize> = posts.iter().filter(|p| p.outcome.is_err()).map(|p| p.batch).collect();
    assert!(!retried.is_empty());

    let mut expected = restart_expected("ks", batches);
    // One more event per user: once it is stored, every earlier record of that user (the
    // replayed tail too) has been consumed by the second process and applied or skipped, since a
    // user's records are applied in order.
    for (user, ids) in &mut expected {
        let last = format!("ks-last-{user}");
        let response = client()
            .post(format!("{}/v1/events", second.url))
            .insert_header(("content-type", "application/json"))
            .send_body(
                json!({ "user_id": user, "item_id": "item-0199", "event_type": "view", "event_id": last }).to_string(),
            )
            .await
            .expect("POST to the second process");
        assert_eq!(response.status().as_u16(), 202);
        ids.push(last);
    }
    assert_stored_exactly(&config, &expected).await;
    let total: usize = expected.iter().map(|(_, ids)| ids.len()).sum();
    let refused = posts.iter().filter(|p| p.outcome.is_err()).count();
    // For the record: how often the retried batches' ids are in the topic (twice for each event
    // the killed process had produced, all or part of a batch, before dying without an answer).
    let in_log = records_per_event_id(&config);
    let mut retried_in_log: Vec<(usize, Vec<usize>)> = retried
        .iter()
        .map(|&b| (b, restart_batch("ks", b).iter().map(|(_, id)| in_log.get(id).copied().unwrap_or(0)).collect()))
        .collect();
    retried_in_log.sort();
    eprintln!(
        "{batches} batches, {total} events, {refused} requests without an answer over {} retried batches \
         (records per id in the topic, by batch: {retried_in_log:?}); the topic holds {} records; \
         the second process applied {:?} and skipped {:?} duplicates",
        retried.len(),
        in_log.values().sum::<usize>(),
        instance_metric(&second, "liverec_session_applied_events_total").await,
        instance_metric(&second, "liverec_session_duplicate_events_total").await,
    );
}

/// How many records of the events topic carry each event id, read with kcat.
fn records_per_event_id(config: &Config) -> HashMap<String, usize> {
    let out = Command::new("kcat")
        .args(["-C", "-b", &config.kafka.brokers, "-t", &config.kafka.events_topic, "-e", "-q"])
        .args(["-o", "beginning", "-f", "%s\\n"])
        .output()
        .expect("kcat");
    let mut counts = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(id) =
            serde_json::from_str::<Value>(line).ok().and_then(|v| v["event_id"].as_str().map(str::to_owned))
        {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

/// Consecutive posts with the same processes and outcome, as lines for the test's output.
fn summarise_posts(posts: &[Post]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest = posts;
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take_while(|p| p.process == first.process && p.ended == first.ended && p.outcome == first.outcome)
            .count();
        let (group, tail) = rest.split_at(run);
        let slowest = group.iter().map(|p| p.took).max().unwrap_or_default();
        let fastest = group.iter().map(|p| p.took).min().unwrap_or_default();
        let outcome = match &first.outcome {
            Ok(status) => status.to_string(),
            Err(error) => format!("error: {error}"),
        };
        lines.push(format!(
            "process {:?} -> {:?}: {run} x {outcome} (batches {}..={}, {fastest:?}..{slowest:?} each)",
            first.process,
            first.ended,
            first.batch,
            group.last().map_or(first.batch, |p| p.batch),
        ));
        rest = tail;
    }
    lines
}

/// Runs `scripts/services ACTION` when dropped unless disarmed: a test that stops a service
/// must not leave it stopped for the tests after it when it fails midway.
struct RestartOnDrop {
    script: &'static str,
    action: &'static str,
    armed: bool,
}

impl RestartOnDrop {
    fn new(script: &'static str, action: &'static str) -> RestartOnDrop {
        RestartOnDrop { script, action, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = Command::new("bash").arg(self.script).arg(self.action).status();
        }
    }
}
