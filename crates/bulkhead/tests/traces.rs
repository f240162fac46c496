//! Spans as a collector receives them: `bulkhead serve` exports to an
//! OTLP/HTTP endpoint the test serves, and the requests are decoded with
//! the OpenTelemetry project's published protobuf definitions
//! (`opentelemetry-proto`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::serve;

/// What the test's collector received: each span with its service name.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>);

/// An OTLP/HTTP receiver on a loopback port: `POST /v1/traces` with a
/// protobuf `ExportTraceServiceRequest`, as a collector takes it.
async fn collector() -> (String, Received) {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, header};
    let received = Received::default();
    async fn export(
        State(received): State<Received>,
        headers: HeaderMap,
        body: Bytes,
    ) -> impl axum::response::IntoResponse {
        assert_eq!(headers[header::CONTENT_TYPE], "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
        let mut spans = received.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
    }
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), received)
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        any_value::Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

/// Every string an attribute holds, arrays included.
fn strings(attributes: &[KeyValue]) -> Vec<String> {
    fn walk(value: &any_value::Value, out: &mut Vec<String>) {
        match value {
            any_value::Value::StringValue(s) => out.push(s.clone()),
            any_value::Value::ArrayValue(array) => {
                for value in array.values.iter().filter_map(|v| v.value.as_ref()) {
                    walk(value, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for value in attributes
        .iter()
        .filter_map(|kv| kv.value.as_ref()?.value.as_ref())
    {
        walk(value, &mut out);
    }
    out
}

const CANARY: &str = "zq-canary-7731";

/// Runs one `/agent` request with a tool call through a `bulkhead serve`
/// that exports to `collector`, under the caller's trace `trace_id` /
/// `parent`; stops the server (which flushes) and returns the answer.
async fn traced_run(collector: &str, trace_id: &str, parent: &str, env: &[(&str, &str)]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
        ("OTEL_SERVICE_NAME", "bulkhead-under-test"),
    ];
    vars.extend_from_slice(env);
    let (mut server, url) = serve(dir.path(), &vars);
    let response = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .json(&json!({"message": format!("tool:current_time {{\"format\": \"unix\", \"note\": \"{CANARY}\"}}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    let session: Value = support::get_json(format!(
        "{url}/sessions/{}",
        answer["session_id"].as_str().unwrap()
    ))
    .await;
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    json!({"answer": answer, "session": session})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_the_genai_conventions_under_the_callers_trace() {
    let (endpoint, received) = collector().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let run = traced_run(&endpoint, trace_id, caller_span, &[]).await;
    let session_id = run["answer"]["session_id"].as_str().unwrap();
    let run_id = run["answer"]["run_id"].as_str().unwrap();
    let call_id = run["session"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|m| m["tool_call_id"].as_str())
        .expect("the tool's result in the conversation")
        .to_string();

    let spans = received.0.lock().unwrap().clone();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let named = |prefix: &str| {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name.starts_with(prefix))
            .collect::<Vec<_>>()
    };
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "bulkhead-under-test"),
        "{names:?}"
    );
    // The test's own GET of the session sent no traceparent: a trace of
    // its own, with no parent.
    let (traced, own): (Vec<_>, Vec<_>) = spans
        .iter()
        .map(|(_, s)| s)
        .partition(|s| !s.name.starts_with("GET /sessions/"));
    assert_eq!(own.len(), 1, "{names:?}");
    assert_ne!(hex(&own[0].trace_id), trace_id);
    assert!(own[0].parent_span_id.is_empty());
    assert!(
        traced.iter().all(|s| hex(&s.trace_id) == trace_id),
        "every span of the run continues the caller's trace: {names:?}"
    );

    let request = named("POST /agent");
    assert_eq!(request.len(), 1, "{names:?}");
    let request = request[0];
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(hex(&request.parent_span_id), caller_span);
    assert_eq!(
        text(&request.attributes, "http.route").as_deref(),
        Some("/agent")
    );
    assert_eq!(
        int(&request.attributes, "http.response.status_code"),
        Some(200)
    );

    let agent = named("invoke_agent");
    assert_eq!(agent.len(), 1, "{names:?}");
    let agent = agent[0];
    assert_eq!(agent.name, "invoke_agent general");
    assert_eq!(agent.kind, SpanKind::Internal as i32);
    assert_eq!(agent.parent_span_id, request.span_id);
    let attrs = &agent.attributes;
    assert_eq!(
        text(attrs, "gen_ai.operation.name").as_deref(),
        Some("invoke_agent")
    );
    assert_eq!(
        text(attrs, "gen_ai.conversation.id").as_deref(),
        Some(session_id)
    );
    assert_eq!(text(attrs, "gen_ai.agent.name").as_deref(), Some("general"));
    assert_eq!(text(attrs, "bulkhead.run.id").as_deref(), Some(run_id));

    let chats = named("chat ");
    assert_eq!(chats.len(), 2, "the tool call, then the answer: {names:?}");
    let mut finish_reasons = Vec::new();
    for chat in &chats {
        assert_eq!(chat.name, "chat bulkhead-mock");
        assert_eq!(chat.kind, SpanKind::Client as i32);
        assert_eq!(chat.parent_span_id, agent.span_id);
        let attrs = &chat.attributes;
        assert_eq!(
            text(attrs, "gen_ai.operation.name").as_deref(),
            Some("chat")
        );
        assert_eq!(
            text(attrs, "gen_ai.provider.name").as_deref(),
            Some("bulkhead.mock")
        );
        assert_eq!(
            text(attrs, "gen_ai.request.model").as_deref(),
            Some("bulkhead-mock")
        );
        assert_eq!(
            text(attrs, "gen_ai.response.model").as_deref(),
            Some("bulkhead-mock")
        );
        assert_eq!(
            text(attrs, "gen_ai.conversation.id").as_deref(),
            Some(session_id)
        );
        assert!(int(attrs, "gen_ai.usage.input_tokens").unwrap() > 0);
        assert!(int(attrs, "gen_ai.usage.output_tokens").unwrap() > 0);
        finish_reasons.extend(strings(
            &attrs
                .iter()
                .filter(|kv| kv.key == "gen_ai.response.finish_reasons")
                .cloned()
                .collect::<Vec<_>>(),
        ));
    }
    finish_reasons.sort();
    assert_eq!(finish_reasons, ["stop", "tool_calls"]);

    let tools = named("execute_tool");
    assert_eq!(tools.len(), 1, "{names:?}");
    let tool = tools[0];
    assert_eq!(tool.name, "execute_tool current_time");
    assert_eq!(tool.parent_span_id, agent.span_id);
    let attrs = &tool.attributes;
    assert_eq!(
        text(attrs, "gen_ai.operation.name").as_deref(),
        Some("execute_tool")
    );
    assert_eq!(
        text(attrs, "gen_ai.tool.name").as_deref(),
        Some("current_time")
    );
    assert_eq!(
        text(attrs, "gen_ai.tool.call.id").as_deref(),
        Some(call_id.as_str())
    );
    assert!(text(attrs, "error.type").is_none());

    for (_, span) in &spans {
        for value in strings(&span.attributes) {
            assert!(
                !value.contains(CANARY),
                "{}: content on a span without the opt-in: {value}",
                span.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contents_go_on_spans_only_with_the_opt_in() {
    let (endpoint, received) = collector().await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    traced_run(
        &endpoint,
        trace_id,
        "b7ad6b7169203331",
        &[("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")],
    )
    .await;
    let spans = received.0.lock().unwrap().clone();
    let span = |prefix: &str| {
        spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s.name.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} span"))
            .clone()
    };
    let chat = span("chat ");
    let input: Value =
        serde_json::from_str(&text(&chat.attributes, "gen_ai.input.messages").unwrap()).unwrap();
    let user = input
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "user")
        .expect("the user's message");
    assert_eq!(user["parts"][0]["type"], "text");
    assert!(
        user["parts"][0]["content"]
            .as_str()
            .unwrap()
            .contains(CANARY)
    );
    let output: Value =
        serde_json::from_str(&text(&chat.attributes, "gen_ai.output.messages").unwrap()).unwrap();
    assert_eq!(output[0]["role"], "assistant");

    let tool = span("execute_tool");
    let arguments = text(&tool.attributes, "gen_ai.tool.call.arguments").unwrap();
    assert!(arguments.contains(CANARY), "{arguments}");
    let result = text(&tool.attributes, "gen_ai.tool.call.result").unwrap();
    assert!(
        result.parse::<i64>().is_ok(),
        "the unix time the tool answered: {result}"
    );
}

/// A planner hands its steps to its peers with the run's `traceparent`:
/// their spans land in the planner's trace, under its run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planners_trace_follows_its_steps_into_its_peers() {
    let (endpoint, received) = collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "peer"),
    ];
    let peer_dir = tempfile::tempdir().unwrap();
    let (mut peer, peer_url) = serve(peer_dir.path(), &otel);
    let dir = tempfile::tempdir().unwrap();
    let (mut planner, url) = serve(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "planner"),
            ("AGENT_ROLE", "planner"),
            ("EXECUTOR_URL", peer_url.as_str()),
            ("CRITIC_URL", peer_url.as_str()),
        ],
    );
    let trace_id = "5c1e3f1e9d4b4a7f8e2d6c0b1a9f8e7d";
    let response = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .header("traceparent", format!("00-{trace_id}-a1b2c3d4e5f60718-01"))
        .json(&json!({"message": "say:first step\nsecond step"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for server in [&mut planner, &mut peer] {
        server.signal(Signal::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(20)).success());
    }

    let spans = received.0.lock().unwrap().clone();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let names: Vec<(&str, &str)> = spans
        .iter()
        .map(|(service, s)| (service.as_str(), s.name.as_str()))
        .collect();
    let planner_run = spans
        .iter()
        .find(|(service, s)| service == "planner" && s.name == "invoke_agent planner")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("{names:?}"));
    assert_eq!(hex(&planner_run.trace_id), trace_id);
    // Two steps to the executor, one review by the critic.
    let peer_requests: Vec<_> = spans
        .iter()
        .filter(|(service, s)| service == "peer" && s.name == "POST /agent")
        .map(|(_, s)| s)
        .collect();
    assert_eq!(peer_requests.len(), 3, "{names:?}");
    for request in peer_requests {
        assert_eq!(hex(&request.trace_id), trace_id, "{names:?}");
        assert_eq!(request.parent_span_id, planner_run.span_id);
    }
}

/// A call to an OpenAI-compatible endpoint (the mock model over HTTP) is
/// an `openai` chat with the request's parameters; a refused one carries
/// the status as `error.type` and fails its span and the run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_model_call_is_an_openai_chat() {
    let (endpoint, received) = collector().await;
    let model = bulkhead_testing::spawn_mock_model(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = serve(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("MODEL_ENDPOINT", model.as_str()),
            ("MODEL_NAME", "gpt-4o-mini"),
            ("TEMPERATURE", "0.5"),
            ("MAX_TOKENS", "256"),
            ("MODEL_MAX_RETRIES", "0"),
        ],
    );
    let client = reqwest::Client::new();
    for (message, status) in [
        ("hello", StatusCode::OK),
        ("fail:400", StatusCode::BAD_GATEWAY),
    ] {
        let response = client
            .post(format!("{url}/agent"))
            .json(&json!({ "message": message }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());

    let spans = received.0.lock().unwrap().clone();
    let chats: Vec<_> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "chat gpt-4o-mini")
        .collect();
    assert_eq!(
        chats.len(),
        2,
        "{:?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    for chat in &chats {
        let attrs = &chat.attributes;
        assert_eq!(
            text(attrs, "gen_ai.provider.name").as_deref(),
            Some("openai")
        );
        assert_eq!(
            text(attrs, "gen_ai.request.model").as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(int(attrs, "gen_ai.request.max_tokens"), Some(256));
        assert!(matches!(
            attribute(attrs, "gen_ai.request.temperature"),
            Some(any_value::Value::DoubleValue(t)) if (t - 0.5).abs() < 1e-6
        ));
    }
    let (ok, failed) = (chats[0], chats[1]);
    // The mock names itself in its answers.
    assert_eq!(
        text(&ok.attributes, "gen_ai.response.model").as_deref(),
        Some("bulkhead-mock")
    );
    assert!(text(&ok.attributes, "error.type").is_none());
    assert_eq!(
        text(&failed.attributes, "error.type").as_deref(),
        Some("400")
    );
    // Status code 2 is ERROR in OTLP.
    assert_eq!(failed.status.as_ref().map(|s| s.code), Some(2));
    let failed_run = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.span_id == failed.parent_span_id)
        .expect("the failed call's run");
    assert_eq!(
        text(&failed_run.attributes, "error.type").as_deref(),
        Some("model_error")
    );
}
