//! Production mode, the Kafka side: ingestion from external producers (JSON from kcat, Avro of
//! two schema versions), poison records to the dead-letter topic, the supervised consumer
//! restarted with backoff, and a broker restart while clients post.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use liverec::bus::codec;
use liverec::config::Config;
use liverec::event::EventIn;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::support::*;

fn producer(config: &Config) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .create()
        .expect("producer")
}

/// Whether the broker takes a record from an idempotent producer, as the server's is. After a
/// restart the broker answers metadata (what `scripts/services start-kafka` waits for) before
/// it hands out producer ids ("coordinator load in progress"), and on a busy machine that took
/// over a minute: the broker's own start, not the server's recovery.
async fn broker_takes_an_idempotent_produce(config: &Config) -> bool {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "5000")
        .create()
        .expect("producer");
    let topic = format!("{}.probe", config.kafka.events_topic);
    producer.send(FutureRecord::to(&topic).key("probe").payload("probe"), Duration::ZERO).await.is_ok()
}

async fn produce(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    producer
        .send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("broker acknowledges");
}

/// Produces one line with kcat, the external Kafka client.
fn kcat_produce(config: &Config, key: &str, value: &str) {
    use std::io::Write as _;
    let mut child = Command::new("kcat")
        .args(["-P", "-b", &config.kafka.brokers, "-t", &config.kafka.events_topic, "-K", "\t"])
        .args(["-X", "partitioner=murmur2_random"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat is installed by scripts/services");
    writeln!(child.stdin.take().expect("stdin"), "{key}\t{value}").expect("write to kcat");
    assert!(child.wait().expect("kcat").success(), "kcat failed to produce");
}

fn wire(user: &str, item: &str, id: &str) -> EventIn {
    serde_json::from_value(json!({ "user_id": user, "item_id": item, "event_type": "view", "event_id": id }))
        .expect("event")
}

#[actix_rt::test]
async fn events_from_external_producers_reach_sessions_and_subscribers() {
    let _services = SERVICES.read().await;
    let config = production_config("external");
    let server = start(config.clone()).await;
    let redis = redis_conn(&config).await;

    let mut ws = WsClient::connect(&server).await;
    ws.send_json(&json!({ "subscribe": "kc-user" })).await;
    ws.next_of_type("subscribed").await;
    let first = ws.next_of_type("recommendations").await;

    // JSON from kcat.
    let event = json!({ "user_id": "kc-user", "item_id": "item-0007", "event_type": "click", "event_id": "kc-1" });
    kcat_produce(&config, "kc-user", &event.to_string());
    let next = ws.next_of_type("recommendations").await;
    assert!(next["data"]["seq"].as_u64() > first["data"]["seq"].as_u64());
    assert!(!items(&next["data"]).contains(&"item-0007".to_owned()));

    // Avro from an old (v1) and a new (v2) writer.
    let kafka = producer(&config);
    let old = codec::encode_avro(&wire("kc-user", "item-0008", "kc-2"), 1, None).expect("v1");
    let new = codec::encode_avro(&wire("kc-user", "item-0009", "kc-3"), 2, Some("browser-7")).expect("v2");
    produce(&kafka, &config.kafka.events_topic, "kc-user", &old).await;
    produce(&kafka, &config.kafka.events_topic, "kc-user", &new).await;
    let ids = eventually("all three events stored in redis", || {
        let config = &config;
        let redis = redis.clone();
        async move {
            let ids = stored_ids(redis, config, "kc-user").await;
            (ids.len() == 3).then_some(ids)
        }
    })
    .await;
    assert_eq!(ids, vec!["kc-1", "kc-2", "kc-3"]);
    let export = get(&server, "/v1/users/kc-user/export").await;
    let interactions = export.body["profile"]["interactions"].as_array().expect("interactions").clone();
    assert_eq!(interactions.len(), 3);
    assert_eq!(export.body["profile"]["context"]["attributes"]["session_id"], "browser-7");

    // REST in Kafka mode answers 202 only once the broker has the events, and they apply too.
    post_events(
        &server,
        json!({ "user_id": "kc-user", "item_id": "item-0010", "event_type": "view", "event_id": "kc-4" }),
    )
    .await;
    eventually("the REST event stored", || {
        let config = &config;
        let redis = redis.clone();
        async move { (stored_ids(redis, config, "kc-user").await.len() == 4).then_some(()) }
    })
    .await;
    server.stop().await;
}

#[actix_rt::test]
async fn poison_records_go_to_the_dead_letter_topic_and_the_partition_moves_on() {
    let _services = SERVICES.read().await;
    let config = production_config("poison");
    let server = start(config.clone()).await;
    let kafka = producer(&config);
    let topic = &config.kafka.events_topic;
    // All on one key, so they share a partition: the good event after them must not be stuck.
    produce(&kafka, topic, "victim", b"\xff\xfe not json").await;
    produce(&kafka, topic, "victim", br#"{"user_id":"victim","item_id":"x","event_type":"teleport"}"#).await;
    produce(&kafka, topic, "victim", &[0, 0, 0, 0, 42, 1, 2, 3]).await;
    produce(
        &kafka,
        topic,
        "victim",
        br#"{"user_id":"victim","item_id":"item-0001","event_type":"view","event_id":"ok-1"}"#,
    )
    .await;
    eventually("the good event applied after the poison", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&server, "liverec_kafka_dead_letters_total").await, 3.0);

    // The dead-letter topic holds the three records with their reasons, read with kcat.
    let out = Command::new("kcat")
        .args(["-C", "-b", &config.kafka.brokers, "-t", &config.kafka.dead_letter_topic, "-c", "3", "-e", "-q"])
        .args(["-o", "beginning", "-f", "%h\\n"])
        .output()
        .expect("kcat");
    let text = String::from_utf8_lossy(&out.stdout);
    for code in ["malformed_json", "invalid_event", "unknown_schema"] {
        assert!(text.contains(&format!("liverec-error-code={code}")), "{code} missing in:\n{text}");
    }
    assert!(text.contains(&format!("liverec-source-topic={topic}")), "{text}");
    server.stop().await;
}

#[actix_rt::test]
async fn a_failing_consumer_is_restarted_with_backoff_and_counted() {
    let _services = SERVICES.read().await;
    let mut config = production_config("supervised");
    // librdkafka refuses to create a consumer whose session timeout exceeds max.poll.interval.ms
    // (300 s by default); the producer is unaffected, so the server starts and only the consumer
    // fails, again and again.
    config.kafka.session_timeout_ms = 400_000;
    config.kafka.restart_backoff_initial_ms = 10;
    config.kafka.restart_backoff_max_ms = 40;
    let server = start(config).await;
    eventually("several restarts counted", || async {
        (metric(&server, "liverec_kafka_consumer_restarts_total").await >= 3.0).then_some(())
    })
    .await;
    // The rest of the server keeps serving meanwhile.
    assert_eq!(get(&server, "/healthz").await.status, 200);
    assert_eq!(get(&server, "/v1/users/anyone/recommendations").await.status, 200);
    server.stop().await;
}

/// Runs `scripts/services ACTION` off the test's runtime, so the clients posting meanwhile keep
/// going while the script waits for the broker to stop or start.
async fn services_script_off_runtime(action: &'static str) {
    let started = std::time::Instant::now();
    let ok = actix_rt::task::spawn_blocking(move || services_script(action)).await.expect("scripts/services thread");
    assert!(ok, "scripts/services {action} failed");
    eprintln!("scripts/services {action} took {:?}", started.elapsed());
}

/// Starts the broker again when dropped (a no-op if it runs), so a test that stopped it never
/// leaves it down for the tests after it, even when it fails half way.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        if !services_script("start-kafka") {
            eprintln!("scripts/services start-kafka failed: the broker may still be down");
        }
    }
}

/// The broker's state, as the restart test moves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broker {
    Up,
    /// `scripts/services stop-kafka` is running.
    Stopping,
    Down,
    /// `scripts/services start-kafka` is running.
    Starting,
    Restarted,
}

/// One `POST /v1/events` as a client saw it.
#[derive(Debug)]
struct Attempt {
    batch: usize,
    /// The broker when the request was sent, and when its answer came.
    broker: Broker,
    ended: Broker,
    status: u16,
    code: Option<String>,
    retry_after: Option<String>,
    /// Printed for the record, never asserted on.
    took: Duration,
}

/// The restart test's client ([`RestartClient`]), recording an [`Attempt`] of each request.
async fn post_until_stopped(
    url: String,
    broker: std::rc::Rc<std::cell::Cell<Broker>>,
    attempts: std::rc::Rc<std::cell::RefCell<Vec<Attempt>>>,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) {
    let client = RestartClient { url, prefix: "kr", phase: broker, in_flight: Default::default(), stop };
    client.run(attempts, Attempt::from).await;
}

impl From<Exchange<Broker>> for Attempt {
    fn from(exchange: Exchange<Broker>) -> Attempt {
        let Exchange { batch, sent: broker, ended, answer, took } = exchange;
        match answer {
            Ok(answer) => Attempt {
                batch,
                broker,
                ended,
                status: answer.status,
                code: answer.body["error"]["code"].as_str().map(str::to_owned),
                retry_after: answer.retry_after,
                took,
            },
            // On a loaded machine the client's own timeout can run out before the server's
            // produce timeout: no answer, which a client retries with the same ids like a 503.
            Err(_) => {
                Attempt { batch, broker, ended, status: 0, code: Some("no_answer".into()), retry_after: None, took }
            }
        }
    }
}

#[actix_rt::test]
async fn a_kafka_broker_restart_refuses_with_503_meanwhile_and_applies_every_accepted_event_once() {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    let _services = SERVICES.write().await;
    let config = production_config("kafka-restart");
    let server = start(config.clone()).await;
    let broker = Rc::new(Cell::new(Broker::Up));
    let attempts: Rc<RefCell<Vec<Attempt>>> = Rc::default();
    let stop = Rc::new(Cell::new(false));
    let client_task = actix_rt::spawn(post_until_stopped(server.url(), broker.clone(), attempts.clone(), stop.clone()));
    let accepted_while = |at: Broker| attempts.borrow().iter().filter(|a| a.broker == at && a.status == 202).count();

    eventually("events accepted before the outage", || async { (accepted_while(Broker::Up) >= 10).then_some(()) })
        .await;
    let _broker_back = BrokerBack;
    broker.set(Broker::Stopping);
    services_script_off_runtime("stop-kafka").await;
    broker.set(Broker::Down);
    // A request waits for the broker up to kafka.produce_timeout_ms (librdkafka's
    // message.timeout.ms; the default 5 s is kept) before it is refused: librdkafka keeps the
    // records queued and retries the missing broker until then, so each 503 takes that long.
    eventually("a request refused while the broker is down", || async {
        attempts.borrow().iter().any(|a| a.broker == Broker::Down && a.status != 202).then_some(())
    })
    .await;
    broker.set(Broker::Starting);
    services_script_off_runtime("start-kafka").await;
    // The broker ready for idempotent producers first (a stall bound for a JVM's restart on a
    // busy machine), then the server's own recovery within the usual deadline.
    eventually_within(Duration::from_secs(300), "the restarted broker to take an idempotent produce", || async {
        broker_takes_an_idempotent_produce(&config).await.then_some(())
    })
    .await;
    broker.set(Broker::Restarted);
    eventually("events accepted again after the restart", || async {
        (accepted_while(Broker::Restarted) >= 10).then_some(())
    })
    .await;
    stop.set(true);
    actix_rt::time::timeout(DEADLINE, client_task).await.expect("the client stops").expect("the client task");

    let attempts = attempts.take();
    for a in summarise(&attempts) {
        eprintln!("{a}");
    }
    // What clients saw: 202, or 503 bus_unavailable with a Retry-After; nothing else.
    for a in &attempts {
        if a.status != 202 && a.status != 0 {
            assert_eq!(a.status, 503, "{a:?}");
            assert_eq!(a.code.as_deref(), Some("bus_unavailable"), "{a:?}");
            let seconds: u64 = a.retry_after.as_deref().and_then(|s| s.parse().ok()).expect("Retry-After in seconds");
            assert!(seconds > 0, "{a:?}");
        }
    }
    // A request sent while the broker is down waits for it, and is accepted if the broker is back
    // in time: only those that began and ended during the outage must be refused.
    let during = |at: Broker| attempts.iter().filter(move |a| a.broker == at && a.ended == at);
    assert!(during(Broker::Up).all(|a| a.status == 202));
    assert!(during(Broker::Down).all(|a| a.status == 503 || a.status == 0));
    assert!(during(Broker::Up).all(|a| a.status != 0), "no timeouts while the broker is up");
    let refused = attempts.iter().filter(|a| a.status == 503).count();
    let unanswered = attempts.iter().filter(|a| a.status == 0).count();
    // The server counts each refusal, also those whose client had stopped waiting.
    let shed = metric(&server, "liverec_ingest_shed_batches_total").await;
    assert!(shed >= refused as f64 && shed <= (refused + unanswered) as f64, "{shed} vs {refused} + {unanswered}");
    // The client moves on only after a 202, so every batch it made was accepted in the end,
    // among them those refused first and retried with the same ids.
    let batches = attempts.last().expect("attempts").batch + 1;
    assert!((0..batches).all(|b| attempts.iter().any(|a| a.batch == b && a.status == 202)));
    let retried: HashSet<usize> = attempts.iter().filter(|a| a.status != 202).map(|a| a.batch).collect();
    assert!(!retried.is_empty());

    let mut expected = restart_expected("kr", batches);
    // One more event per user, posted with the broker up: once it is stored, every earlier
    // record of that user (the replayed ones too) has been consumed and applied or skipped,
    // since a user's records are applied in order.
    for (user, ids) in &mut expected {
        let last = format!("kr-last-{user}");
        post_events(
            &server,
            json!({ "user_id": user, "item_id": "item-0199", "event_type": "view", "event_id": last }),
        )
        .await;
        ids.push(last);
    }
    assert_stored_exactly(&config, &expected).await;
    let total: usize = expected.iter().map(|(_, ids)| ids.len()).sum();
    assert_eq!(metric(&server, "liverec_session_applied_events_total").await, total as f64);
    eprintln!(
        "{batches} batches, {total} events, {refused} refused requests over {} retried batches; duplicates skipped: {}; \
         consumer errors: {}, consumer restarts: {}",
        retried.len(),
        metric(&server, "liverec_session_duplicate_events_total").await,
        metric(&server, "liverec_kafka_consumer_errors_total").await,
        metric(&server, "liverec_kafka_consumer_restarts_total").await,
    );
    server.stop().await;
}

/// Consecutive attempts with the same broker state and status, as lines for the test's output.
fn summarise(attempts: &[Attempt]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest = attempts;
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take_while(|a| a.broker == first.broker && a.ended == first.ended && a.status == first.status)
            .count();
        let (group, tail) = rest.split_at(run);
        let slowest = group.iter().map(|a| a.took).max().unwrap_or_default();
        let fastest = group.iter().map(|a| a.took).min().unwrap_or_default();
        lines.push(format!(
            "broker {:?} -> {:?}: {run} x {} {} (batches {}..={}, {fastest:?}..{slowest:?} each)",
            first.broker,
            first.ended,
            first.status,
            first.code.as_deref().unwrap_or(""),
            first.batch,
            group.last().map_or(first.batch, |a| a.batch),
        ));
        rest = tail;
    }
    lines
}

/// With pseudonyms on, an event reaches the same user whether it came through REST (liverec
/// pseudonymises it and marks the record) or from an external producer (the consumer
/// pseudonymises it), and a record whose raw id is alice's pseudonym is not alice's.
#[actix_rt::test]
async fn pseudonyms_are_applied_once_to_every_record() {
    let _services = SERVICES.read().await;
    let mut config = production_config("pseudonyms");
    config.privacy.pseudonymize = true;
    config.privacy.salt = "a salt that is thirty-two characters long".into();
    let server = start(config.clone()).await;
    post_events(
        &server,
        json!({ "user_id": "kp-alice", "item_id": "item-0010", "event_type": "view", "event_id": "kp-1" }),
    )
    .await;
    let event = json!({ "user_id": "kp-alice", "item_id": "item-0011", "event_type": "view", "event_id": "kp-2" });
    kcat_produce(&config, "kp-alice", &event.to_string());
    let export = eventually("both of alice's events applied to her", || async {
        let export = get(&server, "/v1/users/kp-alice/export").await.body;
        (export["profile"]["interactions"].as_array().map(Vec::len) == Some(2)).then_some(export)
    })
    .await;
    let pseudonym = export["user_id"].as_str().expect("user id").to_owned();
    let forged = json!({ "user_id": pseudonym, "item_id": "item-0012", "event_type": "view", "event_id": "kp-3" });
    kcat_produce(&config, &pseudonym, &forged.to_string());
    eventually("the pseudonym-shaped raw id applied to another user", || async {
        let other = get(&server, &format!("/v1/users/{pseudonym}/export")).await.body;
        (other["profile"]["interactions"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    let export = get(&server, "/v1/users/kp-alice/export").await.body;
    assert_eq!(export["profile"]["interactions"].as_array().map(Vec::len), Some(2), "{export}");
    server.stop().await;
}
