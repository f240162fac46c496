//! `POST /v1/responses`: a turn as a Responses API response, text only.
//! A response's id is its run's (`resp_` and the run id), so
//! `previous_response_id` finds the session that run went into.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::errors::error_value;
use super::messages::{Dialect, new_text, read};
use super::stream::{End, RunEvents, Step, sse};
use super::{
    Answer, Conversation, OpenAiErrorBody, Started, Turn, compact, outcome, param_error,
    run_headers, start, take,
};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;
use crate::extract::json_body;

/// The body of `POST /v1/responses`, as far as the agent reads it.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ResponseRequest {
    /// The agent (`GET /v1/models`).
    #[schema(example = "default")]
    model: String,
    /// The user's text, or messages whose last is the user's new turn.
    #[schema(schema_with = input_schema)]
    input: Value,
    /// A system message ahead of the history of a session this request
    /// starts; a continued session keeps the one it started with.
    instructions: Option<String>,
    /// Continue the session of that response (`resp_…`).
    #[schema(pattern = "^resp_[0-9a-fA-F]{32}$")]
    previous_response_id: Option<String>,
    /// Answer as the Responses API's Server-Sent Events.
    stream: Option<bool>,
    /// `session_id` names a conversation, as for chat completions.
    metadata: Option<super::chat::ChatMetadata>,
    #[schema(value_type = Option<Object>)]
    user: Option<Value>,
}

/// `input`: text, or messages (`{"role", "content"}`, `type` `message`).
fn input_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    let message = ObjectBuilder::new()
        .property(
            "role",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["system", "developer", "user", "assistant"])),
        )
        .property("content", super::chat::content_schema())
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["message"])),
        )
        .required("role")
        .required("content");
    Schema::OneOf(
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ArrayBuilder::new().items(message).min_items(Some(1)))
            .build(),
    )
}

/// A response (`object: response`), with the agent's reply as one output
/// message and the run's usage; shaped as the `openai` package reads it.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ResponseObject {
    /// `resp_` and the run's id.
    id: String,
    #[schema(example = "response")]
    object: String,
    created_at: u64,
    #[schema(example = "completed")]
    status: String,
    model: String,
    /// One `message` with one `output_text`.
    #[schema(value_type = Vec<Object>)]
    output: Vec<Value>,
    #[schema(value_type = Object)]
    usage: Value,
    previous_response_id: Option<String>,
}

/// One event of a streamed response: `event:` its type (`response.created`,
/// `response.in_progress`, `response.output_item.added`,
/// `response.content_part.added`, `response.output_text.delta`…,
/// `response.output_text.done`, `response.content_part.done`,
/// `response.output_item.done`, `response.completed`, or `response.failed`
/// if the run fails once text was sent), `data:` the event as JSON.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ResponseEvent {
    event: String,
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The run a response id names.
fn response_run(id: &str) -> Result<String, ApiError> {
    id.strip_prefix("resp_")
        .and_then(|hex| uuid::Uuid::try_parse(hex).ok())
        .map(|run| run.hyphenated().to_string())
        .ok_or_else(|| {
            param_error(
                "previous_response_id",
                "must be the id of a response this server gave (`resp_…`)",
            )
        })
}

async fn read_request(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    value: Value,
) -> Result<(Turn, Option<String>), ApiError> {
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
    let (mut history, message) = match take(&mut body, "input") {
        Some(Value::String(text)) => {
            new_text(&text, "input")?;
            if text.contains('\0') {
                return Err(param_error("input", "must not contain NUL characters"));
            }
            (Vec::new(), text)
        }
        Some(Value::Array(list)) => read(&list, Dialect::Responses)?,
        Some(_) => {
            return Err(param_error(
                "input",
                "must be a string or a list of messages",
            ));
        }
        None => return Err(param_error("input", "is required")),
    };
    match take(&mut body, "instructions") {
        None => {}
        Some(Value::String(text)) if !text.contains('\0') => history.insert(
            0,
            bulkhead_store::NewMessage {
                role: "system",
                content: Some(text),
                tool_calls: None,
                tool_call_id: None,
            },
        ),
        Some(_) => return Err(param_error("instructions", "must be a string without NUL")),
    }
    super::refuse_tools(&body)?;
    let stream = match take(&mut body, "stream") {
        None => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => return Err(param_error("stream", "must be true or false")),
    };
    let previous = match take(&mut body, "previous_response_id") {
        None => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(param_error("previous_response_id", "must be a string")),
    };
    let conversation = match &previous {
        Some(id) => {
            let run = crate::routes::sessions::owned_run(state, caller, &response_run(id)?)
                .await
                .map_err(|e| {
                    if e.code == "run_not_found" {
                        ApiError::not_found(
                            "previous_response_not_found",
                            format!("no response has the id {id:?}"),
                        )
                        .with("param", "previous_response_id")
                    } else {
                        e
                    }
                })?;
            Conversation::Session(run.session_id)
        }
        None => Conversation::from_request(headers, body.get("metadata"), body.get("user"))?,
    };
    Ok((
        Turn {
            agent,
            conversation,
            history,
            message,
            stream,
        },
        previous,
    ))
}

/// Talk to an agent through the Responses API
///
/// Text in, the agent's reply out. `previous_response_id` continues the
/// session of that response; without it, the same rule as chat
/// completions names a session, or the request starts one.
#[utoipa::path(post, path = "/v1/responses", tag = "openai",
    params(
        ("X-Bulkhead-Session-Id" = Option<String>, Header, format = Uuid,
            description = "A session to continue"),
        ("X-OpenWebUI-Chat-Id" = Option<String>, Header,
            description = "Open WebUI's chat id: the same id continues the same session"),
    ),
    request_body(content = ResponseRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The response (JSON), or its events (`stream`)", content(
            (ResponseObject = "application/json"),
            (ResponseEvent = "text/event-stream"),
        ), headers(
            ("x-bulkhead-session-id" = String, description = "The session the turn went into"),
            ("x-bulkhead-run-id" = String, description = "The run that answered"),
        )),
        (status = 400, description = "`invalid_request` (`param` names the field), `invalid_json`, `invalid_session_id`, `streaming_disabled`", body = OpenAiErrorBody),
        (status = 404, description = "`model_not_found`, `previous_response_not_found`, `session_not_found`", body = OpenAiErrorBody),
        (status = 409, description = "`session_busy`, `wrong_agent` (`x-should-retry: false`)", body = OpenAiErrorBody),
        (status = 413, description = "`body_too_large`", body = OpenAiErrorBody),
        (status = 500, description = "`internal_error` (logged)", body = OpenAiErrorBody),
        (status = 502, description = "`model_error`, `max_steps_exceeded` (`x-should-retry: false`)", body = OpenAiErrorBody),
        (status = 503, description = "`shutting_down`, `run_interrupted`", body = OpenAiErrorBody),
        (status = 504, description = "`model_timeout`", body = OpenAiErrorBody),
    ),
)]
pub async fn create_response(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let value = json_body(&headers, body, state.config.max_body_bytes).await?;
    let (turn, previous) = read_request(&state, &caller, &headers, value).await?;
    let started = match start(&state, &caller, turn).await {
        Ok(started) => started,
        Err(refused) => return Ok(refused),
    };
    let shape = Shape {
        id: format!("resp_{}", compact(&started.handle.run_id)),
        message_id: format!("msg_{}", compact(&started.handle.run_id)),
        created: started.created,
        model: started.agent.clone(),
        previous,
    };
    if started.handle.events.is_some() {
        return streamed(started, shape).await;
    }
    let Started { handle, usage, .. } = started;
    let (run_id, session_id) = (handle.run_id, handle.session_id);
    let Answer::Text { text, .. } = outcome(&run_id, &session_id, handle.outcome).await?;
    let mut response =
        Json(shape.response("completed", Some(&text), Some(usage_of(&usage)))).into_response();
    run_headers(response.headers_mut(), &session_id, &run_id);
    Ok(response)
}

/// What every rendering of one response shares.
#[derive(Clone)]
struct Shape {
    id: String,
    message_id: String,
    created: u64,
    model: String,
    previous: Option<String>,
}

impl Shape {
    fn part(text: &str) -> Value {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }

    fn message(&self, text: Option<&str>) -> Value {
        let (status, content) = match text {
            Some(text) => ("completed", json!([Shape::part(text)])),
            None => ("in_progress", json!([])),
        };
        json!({"type": "message", "id": self.message_id, "status": status,
               "role": "assistant", "content": content})
    }

    /// The response object; `text` is its output once there is one.
    fn response(&self, status: &str, text: Option<&str>, usage: Option<Value>) -> Value {
        let output = match text {
            Some(_) => json!([self.message(text)]),
            None => json!([]),
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": null,
            "incomplete_details": null, "instructions": null, "metadata": {},
            "parallel_tool_calls": false, "tool_choice": "auto", "tools": [],
            "temperature": null, "top_p": null, "text": {"format": {"type": "text"}},
            "previous_response_id": self.previous,
        })
    }
}

fn usage_of(usage: &super::Usage) -> Value {
    json!({
        "input_tokens": usage.input(),
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.output(),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.input() + usage.output(),
    })
}

/// The Responses API's event sequence, around the run's text.
async fn streamed(started: Started, shape: Shape) -> Result<Response, ApiError> {
    let Started { handle, usage, .. } = started;
    let mut run = RunEvents::new(handle)?;
    let first = run.next().await;
    if let Step::End(End::Failed(error)) = first {
        return Err(error);
    }
    let (run_id, session_id) = (run.run_id.clone(), run.session_id.clone());
    let mut sequence = 0u64;
    let mut text = String::new();
    let mut opened = false;
    let render = move |step: Step| {
        let mut events = Vec::new();
        let mut emit = |kind: &str, mut data: Value| {
            data["type"] = kind.into();
            data["sequence_number"] = sequence.into();
            sequence += 1;
            events.push(Event::default().event(kind).data(data.to_string()));
        };
        let at = json!({"item_id": shape.message_id, "output_index": 0, "content_index": 0});
        let with = |mut base: Value, more: Value| {
            if let (Some(base), Value::Object(more)) = (base.as_object_mut(), more) {
                base.extend(more);
            }
            base
        };
        if !opened {
            opened = true;
            let response = shape.response("in_progress", None, None);
            emit("response.created", json!({ "response": response }));
            emit("response.in_progress", json!({ "response": response }));
            emit(
                "response.output_item.added",
                json!({"output_index": 0, "item": shape.message(None)}),
            );
            emit(
                "response.content_part.added",
                with(at.clone(), json!({"part": Shape::part("")})),
            );
        }
        let mut delta = |piece: &str, emit: &mut dyn FnMut(&str, Value)| {
            text.push_str(piece);
            emit(
                "response.output_text.delta",
                with(at.clone(), json!({"delta": piece, "logprobs": []})),
            );
        };
        match step {
            Step::Text(piece) => delta(&piece, &mut emit),
            Step::End(End::Failed(error)) => {
                let error = error_value(error)["error"].take();
                let mut response = shape.response("failed", None, Some(usage_of(&usage)));
                response["error"] = json!({"code": error["code"], "message": error["message"]});
                emit("response.failed", json!({ "response": response }));
            }
            Step::End(end) => {
                if let End::Paused(notice) = end {
                    delta(&notice, &mut emit);
                }
                emit(
                    "response.output_text.done",
                    with(at.clone(), json!({"text": text, "logprobs": []})),
                );
                emit(
                    "response.content_part.done",
                    with(at.clone(), json!({"part": Shape::part(&text)})),
                );
                emit(
                    "response.output_item.done",
                    json!({"output_index": 0, "item": shape.message(Some(&text))}),
                );
                let response = shape.response("completed", Some(&text), Some(usage_of(&usage)));
                emit("response.completed", json!({ "response": response }));
            }
        }
        events
    };
    let mut response = sse(run, first, render);
    run_headers(response.headers_mut(), &session_id, &run_id);
    Ok(response)
}
