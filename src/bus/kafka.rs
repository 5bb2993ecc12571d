//! The Kafka event bus (rdkafka): `POST /v1/events` produces here, and the ingest actors of every
//! instance consume the topic in one consumer group. The catalogue travels on a topic of its own
//! (`bus::items`), which every instance reads whole.
//!
//! The producer is idempotent with `acks=all`, so a `202` means the broker has the events. Records
//! are keyed by user id and partitioned with murmur2, as Java clients do, so one user's events stay
//! in order on one partition whichever client produced them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::{codec, BusError, EventBatch, EventBus};
use crate::config::KafkaConfig;
use crate::event::UserId;

/// Header carrying the wall-clock time (µs since the epoch) at which liverec received the event,
/// so event-to-push latency can be measured across processes.
pub const RECEIVED_HEADER: &str = "liverec-received-us";

/// Header on the records liverec produces: their user id is already the one liverec keeps (the
/// pseudonym when `privacy.pseudonymize` is on), so the consumer must not map it again. Records
/// without it come from other producers and are pseudonymised as they are consumed.
pub const PSEUDONYMIZED_HEADER: &str = "liverec-pseudonymized";

impl KafkaConfig {
    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", &self.client_id);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger_ms.to_string())
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", self.produce_timeout_ms.to_string());
        config
    }

    /// The items topic's consumer: no consumer group and no commits, since every instance reads
    /// every partition from the start (`actors::catalog_feed`); partition ends are reported so
    /// the instance knows when it has caught up.
    pub fn items_consumer_config(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        config
    }

    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", &self.group_id)
            // Offsets are stored by liverec only once events are applied and durable, then
            // committed in the background; see actors::kafka_ingest.
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", self.commit_interval_ms.to_string())
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", self.heartbeat_interval_ms.to_string())
            .set("partition.assignment.strategy", self.assignment.strategy())
            // Statistics carry the consumer lag exported as liverec_kafka_consumer_lag_records.
            .set("statistics.interval.ms", "5000");
        config
    }
}

/// Creates the events, dead-letter and (compacted) items topics if they do not exist, and warns
/// when an existing items topic is not compacted.
pub async fn ensure_topics(config: &KafkaConfig) -> Result<(), rdkafka::error::KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.base().create()?;
    let items_topic = config.items_topic_name();
    let replication = || TopicReplication::Fixed(config.replication_factor);
    let topics = [
        NewTopic::new(&config.events_topic, config.partitions, replication()),
        NewTopic::new(&config.dead_letter_topic, config.partitions, replication()),
        // Compacted: the newest record of each item is kept for good, so the topic is the
        // whole catalogue however old (see bus::items). One partition: every instance applies
        // the changes in one order, so all make the same decisions (catalog.max_items), and
        // catalogue changes are few enough for one.
        NewTopic::new(&items_topic, 1, replication()).set("cleanup.policy", "compact"),
    ];
    create_missing(&admin, &topics).await?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    warn_unless_compacted(&admin, &items_topic, &options).await;
    Ok(())
}

/// Creates those of `topics` that do not exist yet (an existing topic is left as it is): the
/// events topics here, the monitor topic (`bus::monitor_topic`) and the control topic
/// (`cluster::control`).
pub async fn create_missing(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[NewTopic<'_>],
) -> Result<(), rdkafka::error::KafkaError> {
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(topic = %topic, code = ?code, "cannot create topic");
                return Err(rdkafka::error::KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

/// An items topic that deletes old records (created by hand, or by a broker's
/// `auto.create.topics.enable`) loses items: say so loudly, but serve.
async fn warn_unless_compacted(admin: &AdminClient<DefaultClientContext>, topic: &str, options: &AdminOptions) {
    let policy = match admin.describe_configs([&ResourceSpecifier::Topic(topic)], options).await {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(resource)) => resource
                .get("cleanup.policy")
                .and_then(|entry| entry.value.clone())
                .ok_or_else(|| "not described".to_owned()),
            Some(Err(code)) => Err(code.to_string()),
            None => Err("no answer".to_owned()),
        },
        Err(error) => Err(error.to_string()),
    };
    match policy {
        Ok(policy) if policy.split(',').any(|p| p.trim() == "compact") => {}
        Ok(policy) => tracing::warn!(
            topic,
            cleanup_policy = %policy,
            "the items topic is not compacted: items older than its retention are lost to instances that start later; set cleanup.policy=compact"
        ),
        Err(error) => tracing::warn!(topic, error = %error, "cannot read the items topic's cleanup.policy"),
    }
}

/// The session timeouts the cluster's brokers accept, in ms: the largest of their
/// `group.min.session.timeout.ms` and the smallest of their `group.max.session.timeout.ms`.
/// A broker refuses a member that asks for a timeout outside them, and librdkafka then retries
/// the join for good; the ingest asks first and fits `kafka.session_timeout_ms` in
/// ([`fit_session_timeout`]). Reading them needs the `DescribeConfigs` permission on the cluster.
pub async fn session_timeout_bounds(config: &KafkaConfig) -> Result<(u64, u64), String> {
    let admin: AdminClient<DefaultClientContext> = config.base().create().map_err(|e| e.to_string())?;
    let admin = std::sync::Arc::new(admin);
    let topic = config.events_topic.clone();
    // librdkafka's metadata call blocks its caller: not on this runtime's thread.
    let ids = tokio::task::spawn_blocking({
        let admin = admin.clone();
        move || {
            let metadata = admin.inner().fetch_metadata(Some(&topic), Duration::from_secs(10));
            metadata.map(|m| m.brokers().iter().map(|b| b.id()).collect::<Vec<i32>>())
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Err("the cluster's metadata names no broker".to_owned());
    }
    let resources: Vec<ResourceSpecifier> = ids.iter().map(|&id| ResourceSpecifier::Broker(id)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin.describe_configs(&resources, &options).await.map_err(|e| e.to_string())?;
    let (mut least, mut most) = (0u64, u64::MAX);
    for resource in described {
        let resource = resource.map_err(|code| code.to_string())?;
        let read = |name: &str| -> Result<u64, String> {
            let entry = resource.get(name).and_then(|entry| entry.value.as_deref());
            entry.and_then(|v| v.parse().ok()).ok_or_else(|| format!("the broker does not describe {name}"))
        };
        least = least.max(read("group.min.session.timeout.ms")?);
        most = most.min(read("group.max.session.timeout.ms")?);
    }
    Ok((least, most))
}

/// `session_ms` moved into the brokers' `bounds`, and a heartbeat interval below it: the
/// configured one, or a third of the session timeout where the configured one no longer fits.
pub fn fit_session_timeout(session_ms: u64, heartbeat_ms: u64, bounds: (u64, u64)) -> (u64, u64) {
    let (least, most) = bounds;
    let session = if least <= most { session_ms.clamp(least, most) } else { session_ms };
    let heartbeat = if heartbeat_ms < session { heartbeat_ms } else { (session / 3).max(1) };
    (session, heartbeat)
}

/// Microseconds since the Unix epoch, now.
pub fn wall_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

pub struct KafkaBus {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl KafkaBus {
    pub fn new(config: &KafkaConfig) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(Self {
            producer: config.producer_config().create()?,
            topic: config.events_topic.clone(),
            timeout: Duration::from_millis(config.produce_timeout_ms),
        })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Produces a control record keyed by `user`, so it reaches the owner of the user's partition
    /// in order with the user's events; returns once the broker has it.
    async fn control(&self, user: &UserId, what: &str, payload: &[u8]) -> Result<(), BusError> {
        let headers = OwnedHeaders::new().insert(Header { key: CONTROL_HEADER, value: Some(what) });
        let record = FutureRecord::to(&self.topic).key(user.as_str()).payload(payload).headers(headers);
        self.producer
            .send(record, self.timeout)
            .await
            .map(|_| ())
            .map_err(|(e, _)| BusError::Unavailable(e.to_string()))
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, batch: EventBatch) -> Result<(), BusError> {
        let received = (wall_micros() - batch.received.elapsed().as_micros() as i64).to_string();
        let payloads: Vec<Vec<u8>> = batch.events.iter().map(codec::encode_json).collect();
        // The consumer continues the receiving request's trace from these headers.
        let trace = crate::telemetry::trace_headers(&batch.span);
        let sends = batch.events.iter().zip(&payloads).map(|(event, payload)| {
            let mut headers = OwnedHeaders::new()
                .insert(Header { key: "content-type", value: Some("application/json") })
                .insert(Header { key: RECEIVED_HEADER, value: Some(received.as_str()) })
                .insert(Header { key: PSEUDONYMIZED_HEADER, value: Some("1") });
            for (key, value) in &trace {
                headers = headers.insert(Header { key: key.as_str(), value: Some(value.as_str()) });
            }
            let record = FutureRecord::to(&self.topic).key(event.user_id.as_str()).payload(payload).headers(headers);
            // send() copies the record into librdkafka before it returns its future.
            self.producer.send(record, self.timeout)
        });
        let results = join_all(sends).await;
        let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        if let Some((error, _)) = failed.first() {
            tracing::warn!(error = %error, failed = failed.len(), "events not acknowledged by kafka");
            return Err(BusError::Unavailable(error.to_string()));
        }
        Ok(())
    }

    async fn notify_reload(&self, user: &UserId) -> Result<(), BusError> {
        self.control(user, CONTROL_RELOAD, &[]).await
    }

    async fn notify_shown(&self, user: &UserId, list_json: &[u8]) -> Result<(), BusError> {
        self.control(user, CONTROL_SHOWN, list_json).await
    }
}

/// A record that cannot be applied (of the events or the items topic), on its way to the
/// dead-letter topic with the reason.
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    /// A stable code, as the REST API would answer (`liverec-error-code`).
    pub code: &'static str,
    pub reason: String,
}

/// Produces `letter`, read from `source`, to `topic` with its reason in headers; retries until the
/// broker has it, so a caller that waits for it may then move past the record.
pub async fn send_dead_letter(producer: FutureProducer, topic: String, source: String, letter: DeadLetter) {
    let partition = letter.partition.to_string();
    let offset = letter.offset.to_string();
    loop {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "liverec-error-code", value: Some(letter.code) })
            .insert(Header { key: "liverec-error-reason", value: Some(letter.reason.as_str()) })
            .insert(Header { key: "liverec-source-topic", value: Some(source.as_str()) })
            .insert(Header { key: "liverec-source-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "liverec-source-offset", value: Some(offset.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &letter.payload {
            record = record.payload(payload.as_slice());
        }
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => return,
            Err((error, _)) => {
                tracing::warn!(error = %error, "dead-letter produce failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Header marking a control record (no event payload); its value says what to do.
pub const CONTROL_HEADER: &str = "liverec-control";
/// Control value: the owner of the record's key (a user id) reloads that user from the store.
pub const CONTROL_RELOAD: &str = "reload";
/// Control value: the record's payload is a list another instance served the user of the
/// record's key; the owner counts its impression and attributes clicks on it.
pub const CONTROL_SHOWN: &str = "shown";

/// Kafka's murmur2 (as in the Java client), used to find a key's partition.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition a user's events go to, among `partitions`.
pub fn partition_for(user: &str, partitions: i32) -> i32 {
    ((murmur2(user.as_bytes()) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Reference values from Kafka's own Utils.murmur2 tests.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32, -58897971);
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn a_session_timeout_is_fitted_into_what_the_brokers_accept() {
        // Inside: unchanged. Below the floor (a stock broker's 6 s): raised, heartbeat kept.
        assert_eq!(fit_session_timeout(4000, 1000, (2000, 1_800_000)), (4000, 1000));
        assert_eq!(fit_session_timeout(4000, 1000, (6000, 1_800_000)), (6000, 1000));
        // Above the ceiling: lowered, and a heartbeat that no longer fits becomes a third of it.
        assert_eq!(fit_session_timeout(60_000, 20_000, (6000, 30_000)), (30_000, 20_000));
        assert_eq!(fit_session_timeout(60_000, 45_000, (6000, 30_000)), (30_000, 10_000));
        // Bounds that contradict each other (brokers configured apart): left as configured.
        assert_eq!(fit_session_timeout(4000, 1000, (10_000, 8000)), (4000, 1000));
    }
}
