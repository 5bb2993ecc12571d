//! Logging and trace set-up: the global `tracing` subscriber, the optional OTLP trace exporter,
//! and the W3C trace context carried across Kafka records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::{LogConfig, LogFormat, TracingConfig};

/// Installs the global tracing subscriber (logs only). `RUST_LOG` wins over the configured level.
pub fn init_logging(config: &LogConfig) {
    // A second initialisation (tests start several servers in one process) is harmless.
    let _ = install(config, None);
}

/// Flushes and stops trace export when dropped (keep it alive while the server runs).
#[must_use = "traces stop being exported when the guard is dropped"]
pub struct TelemetryGuard(Option<SdkTracerProvider>);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("liverec: traces not flushed: {error}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP trace exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Installs logging and, when `tracing.otlp_endpoint` is set, OpenTelemetry trace export over
/// OTLP/HTTP (batched on a background thread; the spans of the event path become traces).
pub fn init(log: &LogConfig, tracing_config: &TracingConfig) -> Result<TelemetryGuard, TelemetryError> {
    if tracing_config.otlp_endpoint.is_empty() {
        init_logging(log);
        return Ok(TelemetryGuard(None));
    }
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    // reqwest, under the exporter, has TLS without a crypto provider of its own (Cargo.toml):
    // ring, as the model registry installs it. Err: one is installed already, which serves.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let failed = |message: String| TelemetryError::Exporter { endpoint: tracing_config.otlp_endpoint.clone(), message };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(tracing_config.otlp_endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .with_headers(Default::default())
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let ratio = tracing_config.sample_ratio.clamp(0.0, 1.0);
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
        .with_resource(Resource::builder().with_service_name(tracing_config.service_name.clone()).build())
        .build();
    let tracer = provider.tracer("liverec");
    if install(log, Some(tracing_opentelemetry::layer().with_tracer(tracer))).is_ok() {
        TRACES_EXPORTED.store(true, Ordering::Relaxed);
    }
    Ok(TelemetryGuard(Some(provider)))
}

/// Set once the OpenTelemetry layer is installed: the event path's spans become traces.
static TRACES_EXPORTED: AtomicBool = AtomicBool::new(false);

/// The span `make` builds when someone can see it (traces are exported, or logs are at `debug`
/// or finer, where the span's fields annotate the log lines inside it), else a disabled span.
/// The event path makes several spans per event; with nothing exported, creating, entering and
/// closing them in the subscriber's registry cost ~4 % of the server's CPU at 2,000 events/s
/// (docs/performance.md), for log lines at `info` that rarely occur inside them.
pub fn span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    let wanted = TRACES_EXPORTED.load(Ordering::Relaxed)
        || tracing::level_filters::LevelFilter::current() >= tracing::Level::DEBUG;
    if wanted {
        make()
    } else {
        tracing::Span::none()
    }
}

type OtelLayer =
    tracing_opentelemetry::OpenTelemetryLayer<tracing_subscriber::Registry, opentelemetry_sdk::trace::SdkTracer>;

fn install(config: &LogConfig, otel: Option<OtelLayer>) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let fmt = match config.format {
        // Colours only for a person at a terminal: a pipe or a log file gets plain text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(true)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    // The OpenTelemetry layer sits first, under the filter, so it sees the same spans the logs do.
    tracing_subscriber::registry().with(otel).with(fmt).with(filter).try_init()
}

/// Records the span's trace id in its `trace_id` field, so every log line inside it carries the
/// id that finds its trace (nothing when trace export is off).
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    if span.is_disabled() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let id = context.span().span_context().trace_id();
    if id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(id));
    }
}

/// W3C trace context of `span` as `(name, value)` headers (`traceparent`), for Kafka records.
pub fn trace_headers(span: &tracing::Span) -> Vec<(String, String)> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut headers = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
    headers.into_iter().collect()
}

/// Makes `span` a child of the trace named by a `traceparent` header value, if valid.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_span_is_built_when_nothing_exports_or_logs_it() {
        // No OTLP layer and no subscriber at `debug` in this test: the span is never made.
        let mut built = false;
        let span = span(|| {
            built = true;
            tracing::info_span!("receive")
        });
        assert!(!built);
        assert!(span.is_none());
        record_trace_id(&span);
        assert!(trace_headers(&span).is_empty(), "a disabled span carries no trace context");
    }
}
