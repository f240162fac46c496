//! OpenTelemetry traces: spans exported over OTLP/HTTP (protobuf) when an
//! endpoint is configured, nothing at all when not. The request span
//! continues the caller's trace (`traceparent`, W3C Trace Context); the
//! engine's spans (`invoke_agent`, `chat`, `execute_tool`) are its
//! children.
//!
//! The exporter runs on the batch processor's own thread with reqwest's
//! blocking client: the processor exports from a thread with no Tokio
//! runtime, where the async client cannot run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::MatchedPath;
use axum::http::{HeaderMap, Request, Response};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::config::ObservabilityConfig;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
/// The endpoint as configured, and as a log line may show it (no
/// credentials, no query).
static ENDPOINT: OnceLock<(String, String)> = OnceLock::new();
/// Whether spans leave the process; read on every request, so an atomic
/// rather than the provider's lock.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (a layer was made by [`layer`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The layer that turns spans into OpenTelemetry spans and exports them
/// to the configured endpoint; `None` when none is configured. Once per
/// process (the global subscriber is set once).
pub fn layer<S>(config: &ObservabilityConfig) -> anyhow::Result<Option<impl Layer<S> + use<S>>>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let Some(endpoint) = config.traces_endpoint() else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.clone())
        .build()
        .context("could not set up the OTLP span exporter")?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("bulkhead");
    if PROVIDER.set(provider).is_err() {
        anyhow::bail!("the OpenTelemetry exporter is already set up in this process");
    }
    let _ = ENDPOINT.set((endpoint.clone(), shown(&endpoint)));
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Source locations and thread names would double every span's
            // size for nothing an operator reads.
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                // Spans at info and above (requests, runs, model and tool
                // calls), and warnings and errors as their events.
                // The SDK's own complaints (an export that failed) go to the
                // log only: as span events they could feed on themselves.
                if metadata.target().starts_with("opentelemetry") {
                    false
                } else if metadata.is_span() {
                    *metadata.level() <= tracing::Level::INFO
                } else {
                    *metadata.level() <= tracing::Level::WARN
                }
            })),
    ))
}

/// Sends the spans still queued; bounded, so that a collector that does not
/// answer cannot hold up a stop (Docker's stop gives the whole process
/// 10 s, the drain takes up to `SHUTDOWN_GRACE_SECONDS` of them).
pub async fn flush() {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    // A thread of its own rather than `spawn_blocking`: the runtime waits
    // for its blocking tasks when it is dropped, and a flush stuck on a
    // collector that does not answer would hold up the exit.
    let (done, flushed) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name("otel-flush".into())
        .spawn(move || {
            let _ = done.send(provider.force_flush());
        });
    if started.is_err() {
        return;
    }
    match tokio::time::timeout(FLUSH_WAIT, flushed).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            let mut error = e.to_string();
            if let Some((endpoint, shown)) = ENDPOINT.get() {
                error = error.replace(endpoint.as_str(), shown);
            }
            tracing::warn!(error, "could not export the last spans");
        }
        Ok(Err(_)) | Err(_) => tracing::warn!("gave up exporting the last spans"),
    }
}

/// Stops the exporter at process exit, sending what the stop's flush left.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
    }
}

const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The endpoint for a log line: without user, password or query.
pub fn shown(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.to_string()
        }
        Err(_) => "the configured endpoint".into(),
    }
}

/// The span of one request. With traces on it is named
/// `{method} {route template}`, of server kind, and continues the trace of
/// the caller's `traceparent`.
pub fn request_span<B>(request: &Request<B>) -> Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
        key_id = Empty,
        otel.name = Empty,
        otel.kind = Empty,
    );
    if !enabled() {
        return span;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let method = request.method().as_str();
    span.record(
        "otel.name",
        match route {
            Some(route) => format!("{method} {route}"),
            None => method.to_string(),
        }
        .as_str(),
    );
    span.record("otel.kind", "server");
    let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
    let _ = span.set_parent(parent);
    span.set_attribute("http.request.method", method.to_string());
    if let Some(route) = route {
        span.set_attribute("http.route", route.to_string());
    }
    span
}

/// The response's status on the request span; a 5xx marks it failed.
pub fn record_response<B>(response: &Response<B>, span: &Span) {
    if !enabled() {
        return;
    }
    let status = response.status();
    span.set_attribute("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.set_attribute("error.type", status.as_str().to_string());
        span.set_status(Status::error(""));
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
