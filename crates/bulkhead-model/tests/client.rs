//! The client against real HTTP servers on loopback: the mock model, and
//! upstreams that fail the way real providers do.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bulkhead_model::{ChatMessage, ModelError, ModelSettings, OpenAiClient, ToolSpec};
use bulkhead_testing::spawn_mock_model;
use secrecy::SecretString;

fn settings(endpoint: &str) -> ModelSettings {
    ModelSettings {
        endpoint: endpoint.to_string(),
        model: "gpt-4o-mini".into(),
        api_key: Some(SecretString::from("sk-test-key-0123456789")),
        temperature: 0.7,
        max_tokens: 256,
        timeout: Duration::from_secs(5),
        max_retries: 3,
        retry_base: Duration::from_millis(10),
        retry_cap: Duration::from_millis(50),
    }
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::text("user", text)]
}

/// An upstream that answers the first `failures` calls with `status` (and
/// `retry_after`), then succeeds; it counts calls and keeps the last
/// Authorization header.
struct Flaky {
    calls: AtomicUsize,
    failures: usize,
    status: StatusCode,
    retry_after: Option<&'static str>,
    authorization: std::sync::Mutex<Option<String>>,
}

async fn spawn_flaky(
    failures: usize,
    status: StatusCode,
    retry_after: Option<&'static str>,
) -> (String, Arc<Flaky>) {
    let flaky = Arc::new(Flaky {
        calls: AtomicUsize::new(0),
        failures,
        status,
        retry_after,
        authorization: std::sync::Mutex::new(None),
    });
    let state = Arc::clone(&flaky);
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap| {
            let state = Arc::clone(&state);
            async move {
                *state.authorization.lock().unwrap() = headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string());
                let call = state.calls.fetch_add(1, Ordering::SeqCst);
                if call < state.failures {
                    let mut response = (
                        state.status,
                        r#"{"error": {"message": "Incorrect API key provided: sk-test-key-0123456789 is rate limited"}}"#,
                    )
                        .into_response();
                    if let Some(after) = state.retry_after {
                        response.headers_mut().insert("retry-after", after.parse().unwrap());
                    }
                    return response;
                }
                Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(
                        r#"{"id":"x","object":"chat.completion","created":0,"model":"m",
                           "choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],
                           "usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                    ))
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1"), flaky)
}

#[tokio::test]
async fn completes_against_the_mock_model_with_and_without_streaming() {
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let client = OpenAiClient::new(settings(&endpoint)).unwrap();
    let plain = client
        .complete(&user("hello world"), &[], None)
        .await
        .unwrap();
    assert_eq!(plain.content, "echo: hello world");
    assert_eq!(plain.usage.unwrap().total_tokens, 5);

    let mut pieces = Vec::new();
    let mut sink = |text: &str| pieces.push(text.to_string());
    let streamed = client
        .complete(&user("hello world"), &[], Some(&mut sink))
        .await
        .unwrap();
    assert_eq!(pieces, ["echo: ", "hello ", "world"]);
    assert_eq!(streamed.content, plain.content);
    assert_eq!(
        streamed.usage, plain.usage,
        "usage arrives in the last streamed chunk"
    );
    assert_eq!(streamed.finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn tool_calls_come_back_streamed_or_not() {
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let client = OpenAiClient::new(settings(&endpoint)).unwrap();
    let tools: Vec<ToolSpec> = Vec::new();
    for stream in [false, true] {
        let mut sink = |_: &str| {};
        let deltas: Option<&mut bulkhead_model::DeltaSink<'_>> =
            if stream { Some(&mut sink) } else { None };
        let completion = client
            .complete(&user("tool:lookup {\"q\": \"rust\"}"), &tools, deltas)
            .await
            .unwrap();
        assert_eq!(completion.tool_calls.len(), 1, "stream={stream}");
        assert_eq!(completion.tool_calls[0].function.name, "lookup");
        assert_eq!(
            completion.tool_calls[0].function.arguments,
            "{\"q\": \"rust\"}"
        );
        assert!(completion.tool_calls[0].id.starts_with("call_"));
        assert_eq!(completion.finish_reason.as_deref(), Some("tool_calls"));
    }
}

/// The history a strict endpoint refuses: the model's call of `id`, and
/// then the user speaks again instead of a tool result.
fn dangling_call(id: &str) -> Vec<ChatMessage> {
    let call: bulkhead_model::ToolCall = serde_json::from_value(serde_json::json!({
        "id": id, "type": "function", "function": {"name": "shell", "arguments": "{}"}
    }))
    .unwrap();
    vec![
        ChatMessage::text("user", "tool:shell"),
        ChatMessage {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(vec![call]),
            tool_call_id: None,
        },
        ChatMessage::text("user", "are you there?"),
    ]
}

#[tokio::test]
async fn the_mock_refuses_a_dangling_call_as_openai_does() {
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let response = reqwest::Client::new()
        .post(format!("{endpoint}/chat/completions"))
        .json(&serde_json::json!({"model": "any", "messages": dangling_call("call_x")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": {
            "message": "An assistant message with 'tool_calls' must be followed by tool \
                        messages responding to each 'tool_call_id'. The following \
                        tool_call_ids did not have response messages: call_x",
            "type": "invalid_request_error",
            "param": "messages.[1].role",
            "code": null,
        }})
    );

    // Through the client: a 400 is the caller's fault, so it is not retried,
    // and OpenAI's message reaches whoever reads the error.
    let client = OpenAiClient::new(settings(&endpoint)).unwrap();
    let error = client
        .complete(&dangling_call("call_x"), &[], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ModelError::Status { status: 400, message } if message.contains("call_x")),
        "{error:?}"
    );

    // The in-process mock refuses the same history the same way.
    let error = bulkhead_model::MockModel::default()
        .complete(&dangling_call("call_y"), &[], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ModelError::Status { status: 400, message }
            if message.contains("did not have response messages: call_y")),
        "{error:?}"
    );
}

#[tokio::test]
async fn retries_429_and_5xx_then_succeeds() {
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::BAD_GATEWAY,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        let (endpoint, flaky) = spawn_flaky(2, status, None).await;
        let client = OpenAiClient::new(settings(&endpoint)).unwrap();
        let completion = client.complete(&user("hi"), &[], None).await.unwrap();
        assert_eq!(completion.content, "fine");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3, "{status}");
        assert_eq!(
            flaky.authorization.lock().unwrap().as_deref(),
            Some("Bearer sk-test-key-0123456789")
        );
    }
}

#[tokio::test]
async fn gives_up_after_the_last_retry_with_a_redacted_error() {
    let (endpoint, flaky) = spawn_flaky(100, StatusCode::TOO_MANY_REQUESTS, Some("0")).await;
    let client = OpenAiClient::new(settings(&endpoint)).unwrap();
    let error = client.complete(&user("hi"), &[], None).await.unwrap_err();
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        4,
        "one attempt and three retries"
    );
    assert!(
        matches!(error, ModelError::Status { status: 429, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(!text.contains("sk-test-key-0123456789"), "{text}");
    assert!(text.contains("[REDACTED]"), "{text}");
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let (endpoint, flaky) = spawn_flaky(100, StatusCode::BAD_REQUEST, None).await;
    let client = OpenAiClient::new(settings(&endpoint)).unwrap();
    let error = client.complete(&user("hi"), &[], None).await.unwrap_err();
    assert!(
        matches!(error, ModelError::Status { status: 400, .. }),
        "{error:?}"
    );
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (endpoint, flaky) = spawn_flaky(1, StatusCode::TOO_MANY_REQUESTS, Some("1")).await;
    let client = OpenAiClient::new(settings(&endpoint)).unwrap();
    let started = Instant::now();
    client.complete(&user("hi"), &[], None).await.unwrap();
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);
    // Backoff alone would wait at most 50 ms here.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slow_model_times_out_without_retrying() {
    let endpoint = spawn_mock_model(Duration::from_millis(2000)).await;
    let mut settings = settings(&endpoint);
    settings.timeout = Duration::from_millis(200);
    let client = OpenAiClient::new(settings).unwrap();
    let started = Instant::now();
    let error = client.complete(&user("hi"), &[], None).await.unwrap_err();
    assert!(matches!(error, ModelError::Timeout(_)), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "not retried: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connection_failures_are_retried_then_reported() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = OpenAiClient::new(settings(&format!("http://{closed}/v1"))).unwrap();
    let error = client.complete(&user("hi"), &[], None).await.unwrap_err();
    assert!(matches!(error, ModelError::Connect(_)), "{error:?}");
    assert!(
        !error.to_string().contains(&closed.port().to_string()),
        "no URL in the error: {error}"
    );
}
