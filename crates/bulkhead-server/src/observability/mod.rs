//! What the server tells operators besides its logs: Prometheus metrics
//! (`metrics.rs`: the recorder, `GET /metrics`, the HTTP layer) and
//! OpenTelemetry traces (`traces.rs`: the OTLP exporter, the request span
//! and the caller's `traceparent`). The engine's own metrics and spans are
//! `bulkhead_agent::telemetry`'s; the model's, `bulkhead_model::telemetry`'s.

pub mod metrics;
pub mod traces;
