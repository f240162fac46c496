//! `POST /v1/chat/completions`: a turn of an agent as a chat completion,
//! whole or as `chat.completion.chunk` events.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::errors::error_value;
use super::messages::{Dialect, read};
use super::stream::{End, RunEvents, Step, sse};
use super::{
    Answer, Conversation, OpenAiErrorBody, Started, Turn, compact, outcome, param_error,
    run_headers, start, take,
};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;
use crate::extract::json_body;

/// The body of `POST /v1/chat/completions`, as far as the agent reads it.
/// Sampling settings (`temperature`, `max_tokens`…) are the agent's own:
/// sent, they are accepted and not used.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ChatCompletionRequest {
    /// The agent to talk to (`GET /v1/models`).
    #[schema(example = "default")]
    model: String,
    /// The conversation; the last message is the user's new turn. When the
    /// request continues a session, only that message is new; otherwise the
    /// rest is the history the new session starts from. Roles `system`,
    /// `developer`, `user`, `assistant`; text content only.
    #[schema(min_items = 1)]
    messages: Vec<ChatMessageIn>,
    /// Answer as `chat.completion.chunk` Server-Sent Events.
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// `session_id` names a conversation of the client's own (see
    /// "OpenAI-compatible API" in the README).
    metadata: Option<ChatMetadata>,
    /// A string names a conversation, as `metadata.session_id` does.
    #[schema(value_type = Option<Object>)]
    user: Option<Value>,
    /// One answer per request.
    #[schema(minimum = 1, maximum = 1)]
    n: Option<u32>,
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ChatMessageIn {
    #[schema(value_type = String, pattern = "^(system|developer|user|assistant)$")]
    role: String,
    /// Text, or a list of `{"type": "text", "text": …}` parts.
    #[schema(schema_with = content_schema)]
    content: Value,
}

/// A message's content: text, or text parts.
pub(crate) fn content_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let part = ObjectBuilder::new()
        .property(
            "type",
            string().enum_values(Some(["text", "input_text", "output_text"])),
        )
        .property("text", string())
        .required("type")
        .required("text");
    Schema::OneOf(
        OneOfBuilder::new()
            .item(string())
            .item(ArrayBuilder::new().items(part))
            .build(),
    )
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct StreamOptions {
    /// Send a last chunk with the run's `usage` and no choices.
    include_usage: Option<bool>,
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ChatMetadata {
    /// A name for the conversation, 1–512 characters: the same name
    /// continues the same session.
    #[schema(max_length = 512)]
    session_id: Option<String>,
}

/// A chat completion: the agent's final reply to the turn.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-` and the run's id.
    id: String,
    #[schema(example = "chat.completion")]
    object: &'static str,
    created: u64,
    /// The agent.
    model: String,
    choices: Vec<ChatChoice>,
    usage: ChatUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    index: u32,
    message: ChatMessageOut,
    /// `stop`: the agent answered (or, paused for a person's approval,
    /// says so).
    #[schema(example = "stop")]
    finish_reason: &'static str,
    #[schema(value_type = Option<Object>)]
    logprobs: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatMessageOut {
    #[schema(example = "assistant")]
    role: &'static str,
    content: String,
    refusal: Option<String>,
}

/// Tokens over every model call of the run (its tool steps included).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

/// One event of a streamed completion: `data:` a `chat.completion.chunk`
/// (`{"id", "object", "created", "model", "choices": [{"index", "delta",
/// "finish_reason"}]}`, the last with `usage` and no choices when
/// `stream_options.include_usage`), an `{"error"}` if the run fails once
/// text was sent, and `[DONE]`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ChatChunkEvent {
    #[schema(content_media_type = "application/json")]
    data: String,
}

struct ChatRequest {
    turn: Turn,
    include_usage: bool,
}

fn read_request(headers: &HeaderMap, value: Value) -> Result<ChatRequest, ApiError> {
    let Value::Object(mut body) = value else {
        return Err(param_error("body", "must be a JSON object"));
    };
    let agent = match take(&mut body, "model") {
        Some(Value::String(model)) => model,
        Some(_) => return Err(param_error("model", "must be a string: an agent's id")),
        None => {
            return Err(param_error(
                "model",
                "is required: an agent's id (GET /v1/models)",
            ));
        }
    };
    let (history, message) = match take(&mut body, "messages") {
        Some(Value::Array(list)) => read(&list, Dialect::Chat)?,
        Some(_) => return Err(param_error("messages", "must be a list of messages")),
        None => return Err(param_error("messages", "is required")),
    };
    let stream = match take(&mut body, "stream") {
        None => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => return Err(param_error("stream", "must be true or false")),
    };
    let include_usage = match take(&mut body, "stream_options") {
        None => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(include)) => *include,
            Some(_) => {
                return Err(param_error(
                    "stream_options.include_usage",
                    "must be true or false",
                ));
            }
        },
        Some(_) => return Err(param_error("stream_options", "must be an object")),
    };
    match take(&mut body, "n") {
        None => {}
        Some(n) if n == 1 => {}
        Some(_) => return Err(param_error("n", "must be 1: an agent gives one answer")),
    }
    super::refuse_tools(&body)?;
    let conversation = Conversation::from_request(headers, body.get("metadata"), body.get("user"))?;
    Ok(ChatRequest {
        turn: Turn {
            agent,
            conversation,
            history,
            message,
            stream,
        },
        include_usage,
    })
}

/// Talk to an agent, OpenAI's way
///
/// `model` is an agent. The request continues a session when it names
/// one (`X-Bulkhead-Session-Id`, `X-OpenWebUI-Chat-Id`,
/// `metadata.session_id`, a string `user`, in that order); then only its
/// last message is new. Otherwise it starts a new session from its
/// `messages`. The answer names the session in `X-Bulkhead-Session-Id`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    params(
        ("X-Bulkhead-Session-Id" = Option<String>, Header, format = Uuid,
            description = "A session to continue (one this API or `/agent` made)"),
        ("X-OpenWebUI-Chat-Id" = Option<String>, Header,
            description = "Open WebUI's chat id: the same id continues the same session, made on first use"),
    ),
    request_body(content = ChatCompletionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The agent's reply (JSON), or its chunks (`stream`)", content(
            (ChatCompletion = "application/json"),
            (ChatChunkEvent = "text/event-stream"),
        ), headers(
            ("x-bulkhead-session-id" = String, description = "The session the turn went into"),
            ("x-bulkhead-run-id" = String, description = "The run that answered"),
        )),
        (status = 400, description = "`invalid_request` (`param` names the field), `invalid_json`, `invalid_session_id`, `streaming_disabled`", body = OpenAiErrorBody),
        (status = 404, description = "`model_not_found`: no agent has this id; `session_not_found`", body = OpenAiErrorBody),
        (status = 409, description = "`session_busy`: the session has a run in progress or waiting for an approval; `wrong_agent`: the session belongs to another agent (`x-should-retry: false`)", body = OpenAiErrorBody),
        (status = 413, description = "`body_too_large`", body = OpenAiErrorBody),
        (status = 500, description = "`internal_error` (logged)", body = OpenAiErrorBody),
        (status = 502, description = "`model_error`, `max_steps_exceeded`: the run failed (`session_id`, `run_id`; `x-should-retry: false`)", body = OpenAiErrorBody),
        (status = 503, description = "`shutting_down`, `run_interrupted`", body = OpenAiErrorBody),
        (status = 504, description = "`model_timeout`", body = OpenAiErrorBody),
    ),
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request = read_request(
        &headers,
        json_body(&headers, body, state.config.max_body_bytes).await?,
    )?;
    let started = match start(&state, &caller, request.turn).await {
        Ok(started) => started,
        Err(refused) => return Ok(refused),
    };
    if started.handle.events.is_some() {
        return streamed(started, request.include_usage).await;
    }
    let Started {
        handle,
        usage,
        agent,
        created,
    } = started;
    let (run_id, session_id) = (handle.run_id, handle.session_id);
    let Answer::Text { text, .. } = outcome(&run_id, &session_id, handle.outcome).await?;
    let mut response = Json(ChatCompletion {
        id: format!("chatcmpl-{}", compact(&run_id)),
        object: "chat.completion",
        created,
        model: agent,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageOut {
                role: "assistant",
                content: text,
                refusal: None,
            },
            finish_reason: "stop",
            logprobs: None,
        }],
        usage: ChatUsage {
            prompt_tokens: usage.input(),
            completion_tokens: usage.output(),
            total_tokens: usage.input() + usage.output(),
        },
    })
    .into_response();
    run_headers(response.headers_mut(), &session_id, &run_id);
    Ok(response)
}

/// The chunks, once the run has something to say: a run that fails before
/// its first word is an HTTP error, like a request that never ran.
async fn streamed(started: Started, include_usage: bool) -> Result<Response, ApiError> {
    let Started {
        handle,
        usage,
        agent,
        created,
    } = started;
    let mut run = RunEvents::new(handle)?;
    let first = run.next().await;
    if let Step::End(End::Failed(error)) = first {
        return Err(error);
    }
    let (run_id, session_id) = (run.run_id.clone(), run.session_id.clone());
    let id = format!("chatcmpl-{}", compact(&run_id));
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": agent,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let data = |value: Value| Event::default().data(value.to_string());
    let mut opened = false;
    let render = move |step: Step| {
        let mut events = Vec::new();
        if !opened {
            opened = true;
            events.push(data(chunk(
                json!({"role": "assistant", "content": ""}),
                None,
            )));
        }
        let close = |events: &mut Vec<Event>| {
            events.push(data(chunk(json!({}), Some("stop"))));
            if include_usage {
                let mut last = chunk(json!({}), None);
                last["choices"] = json!([]);
                last["usage"] = json!({
                    "prompt_tokens": usage.input(),
                    "completion_tokens": usage.output(),
                    "total_tokens": usage.input() + usage.output(),
                });
                events.push(data(last));
            }
            events.push(Event::default().data("[DONE]"));
        };
        match step {
            Step::Text(text) => events.push(data(chunk(json!({ "content": text }), None))),
            Step::End(End::Completed) => close(&mut events),
            Step::End(End::Paused(text)) => {
                events.push(data(chunk(json!({ "content": text }), None)));
                close(&mut events);
            }
            // The status has gone: OpenAI's clients raise on an `error`.
            Step::End(End::Failed(error)) => events.push(data(error_value(error))),
        }
        events
    };
    let mut response = sse(run, first, render);
    run_headers(response.headers_mut(), &session_id, &run_id);
    Ok(response)
}
