//! The mock model: a deterministic OpenAI-compatible model, served over HTTP
//! by `bulkhead mock-model` and used in-process by `serve` in development.
//!
//! Behaviour, on the conversation it is given:
//! - the last message is a tool result → `tool result: <the result>`;
//! - the last user message is `tool:<name> <json arguments>` → a call of tool
//!   `<name>` with those arguments (`{}` when none are given);
//! - the last user message is `fail:<status>` (400–599) → that HTTP error;
//! - the last user message is `say:<text>` → exactly `<text>` (newlines
//!   kept: how a test scripts a planner's plan);
//! - the last user message is `whoami` → `model: <the model asked for>;
//!   endpoint: <the address it was sent to, or built-in>; system: <the
//!   system prompt, or none>` (which agent is answering, and through what);
//! - the last user message is `tools?` → `tools: <name>(<argument>, …); …`,
//!   the tools offered with the properties of each one's schema;
//! - the last message is a user message `sleep:<ms>` (up to 60000) → waits
//!   that long, then `slept <ms> ms` (a slow run, to cancel or queue
//!   behind);
//! - the last message is a user message `drip:<ms> <text>` (`ms` up to
//!   5000) → `<text>`, streamed a word every `<ms>` (a run whose events
//!   come over time, to follow live);
//! - anything else → `echo: <last user message>`.
//!
//! Usage counts whitespace-separated words: the prompt's message contents,
//! then the reply (a tool call counts its name and arguments).
//!
//! Before any of that it checks the history as OpenAI does
//! ([`crate::history::validate`]) and refuses a malformed one with OpenAI's
//! 400, so that every test meets what a strict endpoint would say.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde_json::json;

use crate::types::{
    ChatChunk, ChatCompletion, ChatMessage, ChatRequest, Choice, ChunkChoice, Completion, Delta,
    FunctionCall, FunctionDelta, ToolCall, ToolCallDelta, ToolSpec, Usage,
};
use crate::{DeltaSink, ModelError};

/// The name `/v1/models` lists and completions report.
pub const MOCK_MODEL_NAME: &str = "bulkhead-mock";

#[derive(Debug, Default)]
pub struct MockModel {
    latency: Duration,
    calls: AtomicU64,
}

/// What the mock decided to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum MockReply {
    Text(String),
    ToolCall { name: String, arguments: String },
    Fail(StatusCode),
}

impl MockModel {
    pub fn new(latency: Duration) -> MockModel {
        MockModel {
            latency,
            calls: AtomicU64::new(0),
        }
    }

    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// The mock's answer to a conversation.
    pub fn reply(messages: &[ChatMessage]) -> MockReply {
        Self::reply_as(MOCK_MODEL_NAME, "built-in", messages, &[])
    }

    /// The mock's answer to a conversation sent to model `model` at
    /// `endpoint`.
    pub fn reply_as(
        model: &str,
        endpoint: &str,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> MockReply {
        if let Some(last) = messages.last()
            && last.role == "tool"
        {
            return MockReply::Text(format!(
                "tool result: {}",
                last.content.as_deref().unwrap_or_default()
            ));
        }
        let user = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .and_then(|m| m.content.as_deref())
            .unwrap_or_default();
        if let Some(call) = user.strip_prefix("tool:") {
            let call = call.trim_start();
            let (name, arguments) = match call.find(char::is_whitespace) {
                Some(at) => (&call[..at], call[at..].trim()),
                None => (call, ""),
            };
            if !name.is_empty() {
                return MockReply::ToolCall {
                    name: name.to_string(),
                    arguments: if arguments.is_empty() {
                        "{}".to_string()
                    } else {
                        arguments.to_string()
                    },
                };
            }
        }
        if let Some(code) = user.strip_prefix("fail:")
            && let Ok(status) = code.trim().parse::<u16>()
            && let Ok(status) = StatusCode::from_u16(status)
            && (status.is_client_error() || status.is_server_error())
        {
            return MockReply::Fail(status);
        }
        if user.trim() == "whoami" {
            let system = messages
                .iter()
                .find(|m| m.role == "system")
                .and_then(|m| m.content.as_deref())
                .unwrap_or("none");
            return MockReply::Text(format!(
                "model: {model}; endpoint: {endpoint}; system: {system}"
            ));
        }
        if user.trim() == "tools?" {
            let offered: Vec<String> = tools
                .iter()
                .map(|tool| {
                    let properties = tool.function.parameters["properties"]
                        .as_object()
                        .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default();
                    format!("{}({properties})", tool.function.name)
                })
                .collect();
            return MockReply::Text(format!("tools: {}", offered.join("; ")));
        }
        if let Some(text) = user.strip_prefix("say:") {
            return MockReply::Text(text.to_string());
        }
        if let Some((_, text)) = Self::asked_drip(messages) {
            return MockReply::Text(text);
        }
        if let Some(delay) = Self::asked_delay(messages) {
            return MockReply::Text(format!("slept {} ms", delay.as_millis()));
        }
        MockReply::Text(format!("echo: {user}"))
    }

    fn usage(messages: &[ChatMessage], reply: &MockReply) -> Usage {
        let prompt: usize = messages
            .iter()
            .map(|m| words(m.content.as_deref().unwrap_or_default()))
            .sum();
        let completion = match reply {
            MockReply::Text(text) => words(text),
            MockReply::ToolCall { name, arguments } => words(name) + words(arguments),
            MockReply::Fail(_) => 0,
        };
        Usage {
            prompt_tokens: prompt as u64,
            completion_tokens: completion as u64,
            total_tokens: (prompt + completion) as u64,
        }
    }

    fn next_call_id(&self) -> String {
        format!(
            "call_mock_{}",
            self.calls.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// The wait a conversation ending in a user's `sleep:<ms>` asks for.
    pub fn asked_delay(messages: &[ChatMessage]) -> Option<Duration> {
        let last = messages.last().filter(|m| m.role == "user")?;
        let ms: u64 = last
            .content
            .as_deref()?
            .strip_prefix("sleep:")?
            .trim()
            .parse()
            .ok()?;
        (ms <= 60_000).then(|| Duration::from_millis(ms))
    }

    /// The pause between words and the text a conversation ending in a
    /// user's `drip:<ms> <text>` asks for.
    pub fn asked_drip(messages: &[ChatMessage]) -> Option<(Duration, String)> {
        let last = messages.last().filter(|m| m.role == "user")?;
        let (ms, text) = last
            .content
            .as_deref()?
            .strip_prefix("drip:")?
            .split_once(' ')?;
        let ms: u64 = ms.parse().ok()?;
        (ms <= 5_000).then(|| (Duration::from_millis(ms), text.to_string()))
    }

    /// The in-process path: the same answers as the HTTP server, without a
    /// socket. Text is handed to `deltas` word by word when streaming.
    pub async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&mut DeltaSink<'_>>,
    ) -> Result<Completion, ModelError> {
        if let Err(refusal) = crate::history::validate(messages) {
            return Err(ModelError::Status {
                status: StatusCode::BAD_REQUEST.as_u16(),
                message: refusal.message,
            });
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if let Some(delay) = Self::asked_delay(messages) {
            tokio::time::sleep(delay).await;
        }
        let reply = Self::reply_as(MOCK_MODEL_NAME, "built-in", messages, tools);
        let usage = Self::usage(messages, &reply);
        let drip = Self::asked_drip(messages).map(|(pause, _)| pause);
        match reply {
            MockReply::Fail(status) => Err(ModelError::Status {
                status: status.as_u16(),
                message: format!("mock model asked to fail with {status}"),
            }),
            MockReply::Text(text) => {
                let mut sink = deltas;
                for (n, piece) in text.split_inclusive(' ').enumerate() {
                    if let Some(pause) = drip.filter(|_| n > 0) {
                        tokio::time::sleep(pause).await;
                    }
                    if let Some(sink) = sink.as_mut() {
                        sink(piece);
                    }
                }
                Ok(Completion {
                    content: text,
                    tool_calls: Vec::new(),
                    usage: Some(usage),
                    finish_reason: Some("stop".into()),
                    model: Some(MOCK_MODEL_NAME.into()),
                })
            }
            MockReply::ToolCall { name, arguments } => Ok(Completion {
                content: String::new(),
                tool_calls: vec![ToolCall {
                    id: self.next_call_id(),
                    kind: "function".into(),
                    function: FunctionCall { name, arguments },
                }],
                usage: Some(usage),
                finish_reason: Some("tool_calls".into()),
                model: Some(MOCK_MODEL_NAME.into()),
            }),
        }
    }

    /// The HTTP face: `POST /v1/chat/completions`, `GET /v1/models`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route(
                "/health",
                get(|| async { Json(json!({"status": "healthy"})) }),
            )
            .fallback(|| async {
                error_response(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route on the mock model",
                )
            })
            .with_state(self)
    }
}

/// Serves the mock model on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mock: Arc<MockModel>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, mock.router())
        .with_graceful_shutdown(shutdown)
        .await
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": kind}})),
    )
        .into_response()
}

async fn models() -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": MOCK_MODEL_NAME, "object": "model", "created": 0, "owned_by": "bulkhead"}]
    }))
}

async fn chat_completions(
    State(mock): State<Arc<MockModel>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("invalid chat completion request: {e}"),
            );
        }
    };
    if request.messages.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages must not be empty",
        );
    }
    if let Err(refusal) = crate::history::validate(&request.messages) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {
                "message": refusal.message,
                "type": "invalid_request_error",
                "param": refusal.param,
                "code": refusal.code,
            }})),
        )
            .into_response();
    }
    if !mock.latency.is_zero() {
        tokio::time::sleep(mock.latency).await;
    }
    if let Some(delay) = MockModel::asked_delay(&request.messages) {
        tokio::time::sleep(delay).await;
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("unknown");
    let reply = MockModel::reply_as(&request.model, host, &request.messages, &request.tools);
    let usage = MockModel::usage(&request.messages, &reply);
    let id = format!("chatcmpl-mock-{}", fastrand::u64(..));
    let created = unix_seconds();
    let (content, tool_calls, finish_reason) = match reply {
        MockReply::Fail(status) => {
            return error_response(
                status,
                "mock_failure",
                &format!("mock model asked to fail with {status}"),
            );
        }
        MockReply::Text(text) => (Some(text), None, "stop"),
        MockReply::ToolCall { name, arguments } => (
            None,
            Some(vec![ToolCall {
                id: mock.next_call_id(),
                kind: "function".into(),
                function: FunctionCall { name, arguments },
            }]),
            "tool_calls",
        ),
    };
    if !request.stream {
        if let (Some((pause, _)), Some(text)) = (MockModel::asked_drip(&request.messages), &content)
        {
            let pauses = text.split_inclusive(' ').count().saturating_sub(1);
            tokio::time::sleep(pause * pauses as u32).await;
        }
        return Json(ChatCompletion {
            id,
            object: "chat.completion".into(),
            created,
            model: MOCK_MODEL_NAME.into(),
            choices: vec![Choice {
                index: 0,
                message: ChatMessage {
                    role: "assistant".into(),
                    content,
                    tool_calls,
                    tool_call_id: None,
                },
                finish_reason: Some(finish_reason.into()),
            }],
            usage: Some(usage),
        })
        .into_response();
    }

    let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk".into(),
        created,
        model: MOCK_MODEL_NAME.into(),
        choices,
        usage,
    };
    let delta = |delta: Delta, finish: Option<&str>| ChunkChoice {
        index: 0,
        delta,
        finish_reason: finish.map(str::to_owned),
    };
    let mut chunks = vec![chunk(
        vec![delta(
            Delta {
                role: Some("assistant".into()),
                ..Delta::default()
            },
            None,
        )],
        None,
    )];
    if let Some(text) = &content {
        for piece in text.split_inclusive(' ') {
            chunks.push(chunk(
                vec![delta(
                    Delta {
                        content: Some(piece.to_string()),
                        ..Delta::default()
                    },
                    None,
                )],
                None,
            ));
        }
    }
    for (index, call) in tool_calls.into_iter().flatten().enumerate() {
        chunks.push(chunk(
            vec![delta(
                Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index,
                        id: Some(call.id),
                        kind: Some("function".into()),
                        function: Some(FunctionDelta {
                            name: Some(call.function.name),
                            arguments: Some(call.function.arguments),
                        }),
                    }]),
                    ..Delta::default()
                },
                None,
            )],
            None,
        ));
    }
    chunks.push(chunk(
        vec![delta(Delta::default(), Some(finish_reason))],
        None,
    ));
    if request.stream_options.is_some_and(|o| o.include_usage) {
        chunks.push(chunk(Vec::new(), Some(usage)));
    }
    let words_end = 1 + content
        .as_deref()
        .map_or(0, |t| t.split_inclusive(' ').count());
    let mut events: Vec<Result<Event, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Event::default().data(serde_json::to_string(c).unwrap_or_default())))
        .collect();
    events.push(Ok(Event::default().data("[DONE]")));
    // The first chunk carries the role; each word after the first waits.
    let drip = MockModel::asked_drip(&request.messages).map(|(pause, _)| pause);
    let events = futures_util::stream::iter(events.into_iter().enumerate()).then(
        move |(n, event)| async move {
            if let Some(pause) = drip.filter(|_| n > 1 && n < words_end) {
                tokio::time::sleep(pause).await;
            }
            event
        },
    );
    Sse::new(events).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> ChatMessage {
        ChatMessage::text("user", text)
    }

    #[test]
    fn echoes_the_last_user_message() {
        let messages = [
            user("first"),
            ChatMessage::text("assistant", "echo: first"),
            user("hello there"),
        ];
        assert_eq!(
            MockModel::reply(&messages),
            MockReply::Text("echo: hello there".into())
        );
        let usage = MockModel::usage(&messages, &MockModel::reply(&messages));
        assert_eq!(usage.prompt_tokens, 5);
        assert_eq!(usage.completion_tokens, 3);
        assert_eq!(usage.total_tokens, 8);
    }

    #[test]
    fn tool_prefix_makes_a_tool_call_and_the_result_comes_back() {
        let reply = MockModel::reply(&[user("tool:current_time {\"tz\": \"UTC\"}")]);
        assert_eq!(
            reply,
            MockReply::ToolCall {
                name: "current_time".into(),
                arguments: "{\"tz\": \"UTC\"}".into()
            }
        );
        assert_eq!(
            MockModel::reply(&[user("tool:current_time")]),
            MockReply::ToolCall {
                name: "current_time".into(),
                arguments: "{}".into()
            }
        );
        let mut result = ChatMessage::text("tool", "12:00");
        result.tool_call_id = Some("call_1".into());
        assert_eq!(
            MockModel::reply(&[user("tool:current_time"), result]),
            MockReply::Text("tool result: 12:00".into())
        );
    }

    #[test]
    fn fail_prefix_asks_for_an_error_status() {
        assert_eq!(
            MockModel::reply(&[user("fail:503")]),
            MockReply::Fail(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            MockModel::reply(&[user("fail:200")]),
            MockReply::Text("echo: fail:200".into())
        );
        assert_eq!(
            MockModel::reply(&[user("sleep:250")]),
            MockReply::Text("slept 250 ms".into())
        );
        assert_eq!(
            MockModel::asked_delay(&[user("sleep:250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(MockModel::asked_delay(&[user("sleep:999999")]), None);
        assert_eq!(
            MockModel::asked_drip(&[user("drip:200 one two")]),
            Some((Duration::from_millis(200), "one two".to_string()))
        );
        assert_eq!(
            MockModel::reply(&[user("drip:10 one two")]),
            MockReply::Text("one two".into())
        );
        assert_eq!(MockModel::asked_drip(&[user("drip:9000 slow")]), None);
        assert_eq!(
            MockModel::reply(&[user("say:step one\nstep two")]),
            MockReply::Text("step one\nstep two".into())
        );
    }
}
