//! The cluster-wide monitor (production mode): the monitor topic, this instance's reports to it,
//! and the consumer that merges every instance's reports into the monitor's cluster view (see
//! `bus::monitor_topic` and `actors::monitor`).

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use rdkafka::producer::FutureProducer;

use crate::actors::monitor::{merge_reports, AttachCluster, MonitorActor};
use crate::bus::monitor_topic::{self, MonitorPublisher};
use crate::config::Config;
use crate::telemetry::Metrics;

/// Reports read from the topic and not yet merged: the consumer waits while the monitor is
/// behind (a restarted instance reading a window of reports).
const QUEUED_REPORTS: usize = 1024;

/// This instance's reports not yet produced: a minute's worth at the default interval; beyond
/// it (the broker unreachable for longer) the monitor drops them, counted.
const UNSENT_REPORTS: usize = 64;

/// Creates the topic (with `kafka.create_topics`), attaches the cluster view to the monitor, and
/// starts reading the topic from a window ago on `thread` (the monitor's). Errors are Kafka's.
pub(super) async fn start_cluster_monitor(
    config: &Config,
    monitor: Addr<MonitorActor>,
    thread: &actix::prelude::ArbiterHandle,
    metrics: &Arc<Metrics>,
) -> Result<(), String> {
    if !config.cluster.enabled {
        return Ok(());
    }
    let topic = config.cluster.monitor_topic_name(&config.kafka);
    let window_ms = config.monitor.window_secs * 1000;
    if config.kafka.create_topics {
        monitor_topic::ensure_topic(&config.kafka, &topic, window_ms).await.map_err(|e| e.to_string())?;
    }
    // A producer of its own, neither idempotent nor waiting for every replica: a report lost now
    // and then costs a second of counts, and the reports' timeouts while a broker is away must
    // not touch the state of the events' idempotent producer, whose acknowledgements are 202s.
    let producer: FutureProducer = config
        .kafka
        .producer_config()
        .set("enable.idempotence", "false")
        .set("acks", "1")
        .create()
        .map_err(|e: rdkafka::error::KafkaError| e.to_string())?;
    let instance = config.cluster.instance_id();
    let timeout = Duration::from_millis(config.kafka.produce_timeout_ms);
    let (unsent, to_send) = tokio::sync::mpsc::channel(UNSENT_REPORTS);
    let publisher = MonitorPublisher::new(producer, topic.clone(), instance.clone(), timeout);
    thread.spawn(publisher.publish(to_send, metrics.clone()));
    monitor.do_send(AttachCluster {
        reports: unsent,
        instance,
        interval: Duration::from_millis(config.cluster.report_interval_ms.max(1)),
    });
    let from_ms = crate::event::now_ms().saturating_sub(window_ms as i64);
    let (reports, payloads) = tokio::sync::mpsc::channel(QUEUED_REPORTS);
    thread.spawn(monitor_topic::consume(config.kafka.clone(), topic, from_ms, reports, metrics.clone()));
    thread.spawn(merge_reports(payloads, monitor));
    Ok(())
}
