//! What the engine tells operators: metrics (runs, tool calls, sandboxes)
//! through the `metrics` facade, and OpenTelemetry spans that follow the
//! GenAI semantic conventions: `invoke_agent` for a run, `chat {model}` for
//! each model call, `execute_tool {tool}` for each tool call.
//!
//! The `gen_ai.*` attributes go to the OpenTelemetry span only
//! (`set_attribute`), not into the log lines' span fields, and message
//! contents only with the opt-in. With spans off, no span is made for a
//! model or tool call and nothing here allocates.

use std::time::{Duration, Instant};

use bulkhead_model::{ChatMessage, Completion, Model, ModelError};
use opentelemetry::trace::Status;
use opentelemetry::{Array, StringValue, Value};
use serde_json::json;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const RUNS: &str = "bulkhead_runs_total";
pub const RUNS_IN_FLIGHT: &str = "bulkhead_runs_in_flight";
pub const RUN_DURATION: &str = "bulkhead_run_duration_seconds";
pub const TOOL_CALLS: &str = "bulkhead_tool_calls_total";
pub const TOOL_CALL_DURATION: &str = "bulkhead_tool_call_duration_seconds";
pub const ORPHANED_RUNS: &str = "bulkhead_orphaned_runs_total";
pub const LEASE_LOSSES: &str = "bulkhead_lease_losses_total";
pub const SANDBOX_CREATIONS: &str = "bulkhead_sandbox_creations_total";
pub const SANDBOX_EXEC_DURATION: &str = "bulkhead_sandbox_exec_duration_seconds";

/// Describes the engine's metrics (and the model's) to the recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    bulkhead_model::telemetry::describe();
    describe_counter!(
        RUNS,
        "Runs by final status (completed, failed, interrupted)"
    );
    describe_gauge!(RUNS_IN_FLIGHT, "Runs recorded and not yet finished");
    describe_counter!(
        ORPHANED_RUNS,
        "Runs of another replica whose lease lapsed, ended interrupted by this one"
    );
    describe_counter!(
        LEASE_LOSSES,
        "Times this replica found its lease lapsed and its runs ended by another"
    );
    describe_histogram!(
        RUN_DURATION,
        Unit::Seconds,
        "Duration of runs by final status, from the request to the last record"
    );
    describe_counter!(
        TOOL_CALLS,
        "Tool calls by tool and outcome (completed, error, failed, refused, interrupted, unrecorded)"
    );
    describe_histogram!(
        TOOL_CALL_DURATION,
        Unit::Seconds,
        "Duration of tool calls by tool, audit records excluded"
    );
    describe_counter!(
        SANDBOX_CREATIONS,
        "Sandboxes made by backend (one per session, on its first sandboxed call)"
    );
    describe_histogram!(
        SANDBOX_EXEC_DURATION,
        Unit::Seconds,
        "Duration of one operation in a sandbox by backend"
    );
}

/// What the engine's spans carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpanSettings {
    /// Spans are exported: give them their OpenTelemetry names and
    /// attributes, and make the model and tool call spans.
    pub enabled: bool,
    /// Message contents, tool arguments and results go on the spans.
    pub capture_content: bool,
}

/// A run in flight: counted while it lives, whatever ends it.
pub(crate) struct RunMetrics {
    started: Instant,
}

impl RunMetrics {
    pub(crate) fn start(started: Instant) -> RunMetrics {
        metrics::gauge!(RUNS_IN_FLIGHT).increment(1);
        RunMetrics { started }
    }

    pub(crate) fn finish(self, status: &'static str) {
        let elapsed = self.started.elapsed();
        metrics::counter!(RUNS, "status" => status).increment(1);
        metrics::histogram!(RUN_DURATION, "status" => status).record(elapsed);
    }
}

impl Drop for RunMetrics {
    fn drop(&mut self) {
        metrics::gauge!(RUNS_IN_FLIGHT).decrement(1);
    }
}

/// A tool call's end. `tool` is a registered tool's name or `unknown`:
/// the model chooses the name, and a label must not take any value it
/// writes.
pub(crate) fn tool_call_ended(tool: &str, outcome: &'static str, duration: Option<Duration>) {
    metrics::counter!(TOOL_CALLS, "tool" => tool.to_string(), "outcome" => outcome).increment(1);
    if let Some(duration) = duration {
        metrics::histogram!(TOOL_CALL_DURATION, "tool" => tool.to_string()).record(duration);
    }
}

pub(crate) fn sandbox_created(backend: &'static str) {
    metrics::counter!(SANDBOX_CREATIONS, "backend" => backend).increment(1);
}

pub(crate) fn sandbox_exec(backend: &'static str, duration: Duration) {
    metrics::histogram!(SANDBOX_EXEC_DURATION, "backend" => backend).record(duration);
}

/// The run's span: `run` in the logs, `invoke_agent {agent}` when exported.
pub(crate) fn run_span(
    settings: SpanSettings,
    agent: &str,
    model: &Model,
    run_id: &str,
    session_id: &str,
) -> Span {
    let span = tracing::info_span!(
        "run",
        run_id = %run_id,
        session_id = %session_id,
        otel.name = Empty,
    );
    if settings.enabled {
        span.record("otel.name", format!("invoke_agent {agent}").as_str());
        span.set_attribute("gen_ai.operation.name", "invoke_agent");
        span.set_attribute("gen_ai.agent.name", agent.to_string());
        span.set_attribute("gen_ai.provider.name", model.provider());
        span.set_attribute("gen_ai.request.model", model.name().to_string());
        span.set_attribute("gen_ai.conversation.id", session_id.to_string());
        span.set_attribute("bulkhead.run.id", run_id.to_string());
    }
    span
}

/// The end of the run on its span: its status, and the failure's code as
/// `error.type`.
pub(crate) fn run_ended(span: &Span, settings: SpanSettings, failure: Option<(&str, &str)>) {
    if !settings.enabled {
        return;
    }
    if let Some((code, message)) = failure {
        span.set_attribute("error.type", code.to_string());
        span.set_status(Status::error(message.to_string()));
    }
}

/// A model call's span, `chat {model}` (client kind), a child of the
/// run's; `Span::none()` when spans are off.
pub(crate) fn chat_span(
    settings: SpanSettings,
    model: &Model,
    session_id: &str,
    conversation: &[ChatMessage],
    secrets: &[String],
) -> Span {
    if !settings.enabled {
        return Span::none();
    }
    let span = tracing::info_span!("chat", otel.name = Empty, otel.kind = "client");
    span.record("otel.name", format!("chat {}", model.name()).as_str());
    span.set_attribute("gen_ai.operation.name", "chat");
    span.set_attribute("gen_ai.provider.name", model.provider());
    span.set_attribute("gen_ai.request.model", model.name().to_string());
    span.set_attribute("gen_ai.conversation.id", session_id.to_string());
    if let Some((temperature, max_tokens)) = model.request_parameters() {
        span.set_attribute("gen_ai.request.temperature", f64::from(temperature));
        span.set_attribute("gen_ai.request.max_tokens", i64::from(max_tokens));
    }
    if settings.capture_content {
        let messages: Vec<_> = conversation
            .iter()
            .map(|m| message_json(m, None, secrets))
            .collect();
        span.set_attribute(
            "gen_ai.input.messages",
            serde_json::Value::Array(messages).to_string(),
        );
    }
    span
}

/// What the model answered, or why it did not, on its span.
pub(crate) fn chat_ended(
    span: &Span,
    settings: SpanSettings,
    result: &Result<Completion, ModelError>,
    secrets: &[String],
) {
    if !settings.enabled {
        return;
    }
    match result {
        Ok(completion) => {
            if let Some(model) = &completion.model {
                span.set_attribute("gen_ai.response.model", model.clone());
            }
            if let Some(usage) = &completion.usage {
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens as i64);
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens as i64);
            }
            if let Some(reason) = &completion.finish_reason {
                span.set_attribute(
                    "gen_ai.response.finish_reasons",
                    Value::Array(Array::String(vec![StringValue::from(reason.clone())])),
                );
            }
            if settings.capture_content {
                let message = ChatMessage {
                    role: "assistant".into(),
                    content: (!completion.content.is_empty()).then(|| completion.content.clone()),
                    tool_calls: (!completion.tool_calls.is_empty())
                        .then(|| completion.tool_calls.clone()),
                    tool_call_id: None,
                };
                let output = message_json(&message, completion.finish_reason.as_deref(), secrets);
                span.set_attribute(
                    "gen_ai.output.messages",
                    serde_json::Value::Array(vec![output]).to_string(),
                );
            }
        }
        Err(error) => {
            span.set_attribute("error.type", error.kind().into_owned());
            span.set_status(Status::error(error.to_string()));
        }
    }
}

/// A tool call's span, `execute_tool {tool}`; `Span::none()` when spans
/// are off. `arguments` are as the audit trail keeps them (redacted).
pub(crate) fn tool_span(
    settings: SpanSettings,
    name: &str,
    call_id: &str,
    arguments: impl FnOnce() -> String,
) -> Span {
    if !settings.enabled {
        return Span::none();
    }
    let span = tracing::info_span!("execute_tool", otel.name = Empty);
    span.record("otel.name", format!("execute_tool {name}").as_str());
    span.set_attribute("gen_ai.operation.name", "execute_tool");
    span.set_attribute("gen_ai.tool.name", name.to_string());
    span.set_attribute("gen_ai.tool.call.id", call_id.to_string());
    span.set_attribute("gen_ai.tool.type", "function");
    if settings.capture_content {
        span.set_attribute("gen_ai.tool.call.arguments", arguments());
    }
    span
}

/// The tool call's outcome on its span; the result only with the opt-in.
pub(crate) fn tool_ended(
    span: &Span,
    settings: SpanSettings,
    outcome: &'static str,
    result: Option<&str>,
    secrets: &[String],
) {
    if !settings.enabled {
        return;
    }
    if outcome != "completed" {
        span.set_attribute("error.type", outcome);
        span.set_status(Status::error(format!("the tool call ended {outcome}")));
    }
    if settings.capture_content
        && let Some(result) = result
    {
        span.set_attribute("gen_ai.tool.call.result", scrub(result, secrets));
    }
}

/// The current span as a W3C `traceparent`, for a request to a peer;
/// `None` when spans are not exported.
pub(crate) fn traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = Span::current().context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        )
    })
}

/// A message as the GenAI conventions write one: a role and its parts.
fn message_json(
    message: &ChatMessage,
    finish_reason: Option<&str>,
    secrets: &[String],
) -> serde_json::Value {
    let mut parts = Vec::new();
    let content = message.content.as_deref().map(|c| scrub(c, secrets));
    match (message.role.as_str(), &message.tool_call_id) {
        ("tool", Some(id)) => parts.push(json!({
            "type": "tool_call_response",
            "id": id,
            "response": content,
        })),
        _ => {
            if let Some(content) = content {
                parts.push(json!({"type": "text", "content": content}));
            }
        }
    }
    for call in message.tool_calls.iter().flatten() {
        let arguments = scrub(&call.function.arguments, secrets);
        parts.push(json!({
            "type": "tool_call",
            "id": call.id,
            "name": call.function.name,
            "arguments": serde_json::from_str::<serde_json::Value>(&arguments)
                .unwrap_or(serde_json::Value::String(arguments)),
        }));
    }
    let mut value = json!({"role": message.role, "parts": parts});
    if let Some(reason) = finish_reason {
        value["finish_reason"] = json!(reason);
    }
    value
}

/// Contents with every configured secret taken out, as in the audit trail.
fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 4)
        .fold(text.to_string(), |text, secret| {
            bulkhead_model::redact_secret(&text, secret)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_written_as_the_conventions_have_them() {
        let call = bulkhead_model::ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: bulkhead_model::FunctionCall {
                name: "shell".into(),
                arguments: r#"{"command": "echo sk-secret-123"}"#.into(),
            },
        };
        let assistant = ChatMessage {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(vec![call]),
            tool_call_id: None,
        };
        let value = message_json(&assistant, Some("tool_calls"), &["sk-secret-123".into()]);
        assert_eq!(value["role"], "assistant");
        assert_eq!(value["finish_reason"], "tool_calls");
        assert_eq!(value["parts"][0]["type"], "tool_call");
        assert_eq!(value["parts"][0]["name"], "shell");
        assert_eq!(value["parts"][0]["arguments"]["command"], "echo [REDACTED]");
        let result = ChatMessage {
            role: "tool".into(),
            content: Some("done".into()),
            tool_calls: None,
            tool_call_id: Some("call_1".into()),
        };
        let value = message_json(&result, None, &[]);
        assert_eq!(
            value["parts"][0],
            json!({"type": "tool_call_response", "id": "call_1", "response": "done"})
        );
    }
}
