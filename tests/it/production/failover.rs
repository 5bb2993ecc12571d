//! Production mode against the real Apache Kafka broker and Redis server that the test command
//! starts (`scripts/services up`): ingestion from external producers, Avro evolution, the
//! dead-letter topic, two instances in one consumer group surviving a SIGKILL, a Redis restart,
//! a Kafka broker restart while clients post, and an instance SIGKILLed and restarted while a
//! client posts to it.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis::{self, AsyncCommands as _};
use liverec::bus::codec;
use liverec::bus::kafka::partition_for;
use liverec::config::{BusKind, Config, StoreKind};
use liverec::event::EventIn;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::support::*;

/// Tests that restart a service take this lock for writing; every other test that uses the
/// services holds it for reading, so a restart never pulls Redis from under another test.
static SERVICES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const PARTITIONS: i32 = 4;

/// The broker and Redis started by the test command. Missing services fail the test loudly.
pub struct Services {
    pub brokers: String,
    pub redis_url: String,
}

pub fn services() -> Services {
    let get = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with scripts/test, which starts Kafka and Redis (scripts/services up)")
        })
    };
    Services { brokers: get("LIVEREC_TEST_KAFKA_BROKERS"), redis_url: get("LIVEREC_TEST_REDIS_URL") }
}

/// A name no other test run uses: topics, consumer group and key prefix are per test.
fn unique(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos();
    format!("it-{name}-{}-{nanos}", std::process::id())
}

fn production_config(name: &str) -> Config {
    let services = services();
    let id = unique(name);
    let mut config = test_config();
    config.bus.kind = BusKind::Kafka;
    config.store.kind = StoreKind::Redis;
    config.kafka.brokers = services.brokers;
    config.kafka.events_topic = format!("{id}.events");
    config.kafka.dead_letter_topic = format!("{id}.dlq");
    config.kafka.group_id = id.clone();
    config.kafka.partitions = PARTITIONS;
    config.kafka.commit_interval_ms = 200;
    config.kafka.session_timeout_ms = 6000;
    config.redis.url = services.redis_url;
    config.redis.key_prefix = id;
    config.redis.retry_max_ms = 500;
    config
}

async fn redis_conn(config: &Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis.url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Event ids in the user's Redis history, in stored order.
async fn stored_ids(mut conn: redis::aio::MultiplexedConnection, config: &Config, user: &str) -> Vec<String> {
    let key = format!("{}:{{{user}}}:h", config.redis.key_prefix);
    let entries: Vec<String> = conn.lrange(&key, 0, -1).await.unwrap_or_default();
    drop(conn);
    entries
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("stored JSON")["event_id"].as_str().expect("id").to_owned())
        .collect()
}

fn producer(config: &Config) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .create()
        .expect("producer")
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

/// A liverec process, as a user runs it.
struct Instance {
    child: Child,
    url: String,
}

impl Instance {
    fn spawn(config: &Config, port: u16) -> Instance {
        let child = Command::new(env!("CARGO_BIN_EXE_liverec"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("LIVEREC_BUS__KIND", "kafka")
            .env("LIVEREC_STORE__KIND", "redis")
            .env("LIVEREC_KAFKA__BROKERS", &config.kafka.brokers)
            .env("LIVEREC_KAFKA__EVENTS_TOPIC", &config.kafka.events_topic)
            .env("LIVEREC_KAFKA__DEAD_LETTER_TOPIC", &config.kafka.dead_letter_topic)
            .env("LIVEREC_KAFKA__GROUP_ID", &config.kafka.group_id)
            .env("LIVEREC_KAFKA__PARTITIONS", PARTITIONS.to_string())
            .env("LIVEREC_KAFKA__SESSION_TIMEOUT_MS", "6000")
            .env("LIVEREC_KAFKA__COMMIT_INTERVAL_MS", "200")
            .env("LIVEREC_REDIS__URL", &config.redis.url)
            .env("LIVEREC_REDIS__KEY_PREFIX", &config.redis.key_prefix)
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
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
    for round in 5..10 {
        post_events(&server, event(round)).await;
    }
    eventually("the server reports the store degraded", || async {
        let ready = get(&server, "/readyz").await;
        (ready.status == 200 && ready.body["degraded"] == true).then_some(())
    })
    .await;
    // Sessions keep applying and serving from memory while writes wait.
    eventually("events applied while redis is down", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 10.0).then_some(())
    })
    .await;
    let recs = get(&server, "/v1/users/steady/recommendations").await;
    assert_eq!(recs.status, 200);
    assert!(!items(&recs.body).contains(&"item-0009".to_owned()));

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
    let a = start(config.clone()).await;
    let b = start(config).await;
    let owned_by_a = eventually("both instances own partitions", || async {
        let parts = |server: &liverec::Server| {
            let url = format!("{}/readyz", server.url());
            async move {
                let ready: Value = client().get(url).send().await.ok()?.json().await.ok()?;
                serde_json::from_value::<Vec<i32>>(ready["kafka_partitions"].clone()).ok()
            }
        };
        let (pa, pb) = (parts(&a).await?, parts(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(pa)
    })
    .await;
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
    eventually("A's event log forgets the user", || async {
        (metric(&a, "liverec_eventlog_events").await == 0.0).then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
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

/// Runs `scripts/services ACTION` (stop-kafka, start-kafka, ...) and tells whether it succeeded.
fn services_script(action: &str) -> bool {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
        .arg(action)
        .status()
        .is_ok_and(|status| status.success())
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

/// Users get at most this many events each (plus one at the end), below `session.history_len`
/// (50), so the stored history holds every one of them.
const BATCHES_PER_USER: usize = 40;

/// Batch `batch` of a restart test: one event for each of four users, each with its own id; the
/// ids and user names start with `prefix`.
fn restart_batch(prefix: &str, batch: usize) -> Vec<(String, String)> {
    (0..4).map(|j| (format!("{prefix}-{}-{j}", batch / BATCHES_PER_USER), format!("{prefix}-{batch}-{j}"))).collect()
}

/// The JSON body of [`restart_batch`]: a `view` of one item per user.
fn restart_body(prefix: &str, batch: usize) -> String {
    let events: Vec<Value> = restart_batch(prefix, batch)
        .into_iter()
        .map(|(user, id)| {
            json!({ "user_id": user, "item_id": format!("item-{:04}", batch % 200), "event_type": "view", "event_id": id })
        })
        .collect();
    Value::from(events).to_string()
}

/// The restart tests' clients send 20 requests a second: a pace, not a wait for anything.
fn client_pace() -> actix_rt::time::Interval {
    let mut pace = actix_rt::time::interval(Duration::from_millis(50));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pace
}

/// A client posting batches one after another until `stop`: a batch refused is retried, with
/// the same event ids, until it is accepted, as the `503` tells clients to.
async fn post_until_stopped(
    url: String,
    broker: std::rc::Rc<std::cell::Cell<Broker>>,
    attempts: std::rc::Rc<std::cell::RefCell<Vec<Attempt>>>,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) {
    // The pace of the clients (20 requests a second), not a wait for anything: it keeps the
    // number of events, and of users, small whatever the outage lasts.
    let mut pace = client_pace();
    let client = client();
    for batch in 0.. {
        if stop.get() {
            return;
        }
        let body = restart_body("kr", batch);
        loop {
            pace.tick().await;
            let at = broker.get();
            let started = std::time::Instant::now();
            let sent = client
                .post(format!("{url}/v1/events"))
                .insert_header(("content-type", "application/json"))
                .send_body(body.clone())
                .await;
            // On a loaded machine the client's own timeout can run out before the server's
            // produce timeout: no answer, which a client retries with the same ids like a 503.
            let Ok(mut response) = sent else {
                attempts.borrow_mut().push(Attempt {
                    batch,
                    broker: at,
                    ended: broker.get(),
                    status: 0,
                    code: Some("no_answer".into()),
                    retry_after: None,
                    took: started.elapsed(),
                });
                continue;
            };
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let json: Value = response.json().await.unwrap_or(Value::Null);
            let code = json["error"]["code"].as_str().map(str::to_owned);
            attempts.borrow_mut().push(Attempt {
                batch,
                broker: at,
                ended: broker.get(),
                status,
                code,
                retry_after,
                took: started.elapsed(),
            });
            if status == 202 {
                break;
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

    let mut expected: Vec<(String, Vec<String>)> = Vec::new();
    for batch in 0..batches {
        for (user, id) in restart_batch("kr", batch) {
            match expected.iter_mut().find(|(u, _)| *u == user) {
                Some((_, ids)) => ids.push(id),
                None => expected.push((user, vec![id])),
            }
        }
    }
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
    let redis = redis_conn(&config).await;
    for (user, ids) in &expected {
        let stored = eventually(&format!("the last event of {user} in redis"), || {
            let redis = redis.clone();
            let config = &config;
            async move {
                let stored = stored_ids(redis, config, user).await;
                (stored.last() == ids.last()).then_some(stored)
            }
        })
        .await;
        assert_eq!(&stored, ids, "{user}: every event that got a 202 exactly once and in order");
    }
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

/// A client posting batches to `url` one after another until `stop`: a batch that did not get a
/// `202` (no answer at all, when the process is gone) is retried, with the same event ids, until
/// it does.
async fn post_across_restarts(
    url: String,
    process: std::rc::Rc<std::cell::Cell<Process>>,
    posts: std::rc::Rc<std::cell::RefCell<Vec<Post>>>,
    in_flight: std::rc::Rc<std::cell::Cell<bool>>,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) {
    // The pace of the client (20 requests a second), not a wait for anything: it keeps the
    // number of events small however long the process takes to come back.
    let mut pace = client_pace();
    let client = client();
    for batch in 0.. {
        if stop.get() {
            return;
        }
        let body = restart_body("ks", batch);
        loop {
            pace.tick().await;
            let at = process.get();
            let started = std::time::Instant::now();
            in_flight.set(true);
            let sent = client
                .post(format!("{url}/v1/events"))
                .insert_header(("content-type", "application/json"))
                .send_body(body.clone())
                .await;
            let outcome = match sent {
                Ok(mut response) => {
                    // Read the body so the connection can be reused; its loss changes nothing.
                    let _ = response.body().await;
                    Ok(response.status().as_u16())
                }
                Err(error) => Err(error.to_string()),
            };
            in_flight.set(false);
            let accepted = outcome == Ok(202);
            posts.borrow_mut().push(Post {
                batch,
                process: at,
                ended: process.get(),
                outcome,
                took: started.elapsed(),
            });
            if accepted {
                break;
            }
        }
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

    let mut expected: Vec<(String, Vec<String>)> = Vec::new();
    for batch in 0..batches {
        for (user, id) in restart_batch("ks", batch) {
            match expected.iter_mut().find(|(u, _)| *u == user) {
                Some((_, ids)) => ids.push(id),
                None => expected.push((user, vec![id])),
            }
        }
    }
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
    let redis = redis_conn(&config).await;
    for (user, ids) in &expected {
        let stored = eventually(&format!("the last event of {user} in redis"), || {
            let redis = redis.clone();
            let config = &config;
            async move {
                let stored = stored_ids(redis, config, user).await;
                (stored.last() == ids.last()).then_some(stored)
            }
        })
        .await;
        assert_eq!(&stored, ids, "{user}: every event that got a 202 exactly once and in order, none missing");
    }
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
