//! `POST /agent`: the tutorials' contract, answered as JSON or as
//! Server-Sent Events.

use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::{FailureKind, RunHandle, RunOutcome, StartError, StartRun};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::door::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{json_body, parse_id};

/// A validated `/agent` request.
#[derive(Debug)]
struct AgentRequest {
    message: String,
    session_id: Option<String>,
    agent: Option<String>,
    stream: Option<bool>,
}

/// The body of `POST /agent`. Read by hand (`AgentRequest::from_json`) so
/// that each wrong field gets its own message; this type only describes it.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct AgentRequestBody {
    /// What the user says. Not blank, no NUL characters.
    // Whitespace is spelled out as `str::trim` sees it (Unicode White_Space):
    // `\s` differs between regex dialects (ECMA counts U+FEFF, Python
    // U+001C), and a fuzzer takes the pattern at its word.
    #[schema(
        min_length = 1,
        pattern = r"^[^\x00]*[^\x00\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\x00]*$",
        example = "hello"
    )]
    message: String,
    /// A session to continue; `null` or absent starts a new one.
    #[schema(format = Uuid)]
    session_id: Option<String>,
    /// The agent (`GET /agents`) to run. A new session belongs to it for
    /// life; absent, the default agent. For a session continued, absent
    /// means the agent it belongs to, and another one is refused (409).
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,63}$", example = "default")]
    agent: Option<String>,
    /// Answer as Server-Sent Events. Absent: `Accept: text/event-stream`
    /// decides.
    stream: Option<bool>,
}

/// A run paused before a tool call until a person decides on it
/// (`POST /runs/{run_id}/approvals`).
#[derive(Debug, Serialize, ToSchema)]
pub struct AwaitingApprovalResponse {
    /// Always `awaiting_approval`.
    #[schema(example = "awaiting_approval")]
    status: &'static str,
    #[schema(format = Uuid)]
    session_id: String,
    #[schema(format = Uuid)]
    run_id: String,
    tokens_used: i64,
    approval: ApprovalRequest,
}

/// The call a paused run waits on, as `approval_requested` carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalRequest {
    /// What a decision names.
    call_id: String,
    tool: String,
    /// The call's arguments, as the model wrote them (JSON text).
    arguments: String,
    /// The call's record in `GET /sessions/{session_id}/audit`.
    #[schema(format = Uuid)]
    audit_id: String,
    /// When it will be denied if nobody answers (RFC 3339).
    expires_at: String,
}

impl ApprovalRequest {
    pub(crate) fn from(approval: &bulkhead_agent::PendingApproval) -> ApprovalRequest {
        ApprovalRequest {
            call_id: approval.call_id.clone(),
            tool: approval.tool.clone(),
            arguments: approval.arguments.clone(),
            audit_id: approval.audit_id.clone(),
            expires_at: crate::routes::timestamp(approval.expires_at),
        }
    }

    pub(crate) fn from_record(call: &bulkhead_store::ToolExecution) -> ApprovalRequest {
        ApprovalRequest {
            call_id: call.call_id.clone(),
            tool: call.tool.clone(),
            arguments: call.arguments.clone(),
            audit_id: call.id.clone(),
            expires_at: crate::routes::timestamp(call.approval_expires_at.unwrap_or_default()),
        }
    }
}

/// A finished run.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentResponse {
    #[schema(example = "echo: hello")]
    response: String,
    #[schema(format = Uuid)]
    session_id: String,
    /// The sum of the model's `usage.total_tokens` over the run.
    tokens_used: i64,
    #[schema(format = Uuid)]
    run_id: String,
}

/// One Server-Sent Event of a streamed run. Before OpenAPI 3.2 (and its
/// `itemSchema`), the schema of `text/event-stream` describes each event.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct StreamEvent {
    /// The event's number in its run: 1, 2, 3… (`GET /runs/{run_id}/events`
    /// has the same ids, to resume after the last one seen).
    #[schema(pattern = "^[1-9][0-9]*$")]
    id: String,
    event: EventKind,
    /// The event's JSON payload.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// What happened in a run. `plan`, `delegated` and `delegate_result` come
/// from a planner's runs.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum EventKind {
    RunStarted,
    MessageDelta,
    ToolCall,
    ToolResult,
    RunCompleted,
    RunFailed,
    ApprovalRequested,
    ApprovalDecided,
    Plan,
    Delegated,
    DelegateResult,
}

fn field_error(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message)
}

impl AgentRequest {
    fn from_json(value: Value) -> Result<AgentRequest, ApiError> {
        let Value::Object(mut body) = value else {
            return Err(field_error("the request body must be a JSON object"));
        };
        let message = match body.remove("message") {
            None | Some(Value::Null) => return Err(field_error("`message` is required")),
            Some(Value::String(message)) => message,
            Some(_) => return Err(field_error("`message` must be a string")),
        };
        if message.trim().is_empty() {
            return Err(field_error("`message` must not be empty"));
        }
        if message.contains('\0') {
            return Err(field_error("`message` must not contain NUL characters"));
        }
        let session_id = match body.remove("session_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(parse_id(
                &id,
                "`session_id`",
                "invalid_session_id",
                StatusCode::UNPROCESSABLE_ENTITY,
            )?),
            Some(_) => return Err(field_error("`session_id` must be a string or null")),
        };
        let agent = match body.remove("agent") {
            None | Some(Value::Null) => None,
            Some(Value::String(agent)) if crate::config::agents::valid_agent_id(&agent) => {
                Some(agent)
            }
            Some(Value::String(_)) => {
                return Err(field_error(
                    "`agent` must be an agent id: 1 to 64 lowercase letters, digits, `-` or `_` (see GET /agents)",
                ));
            }
            Some(_) => return Err(field_error("`agent` must be a string or null")),
        };
        let stream = match body.remove("stream") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(stream)) => Some(stream),
            Some(_) => return Err(field_error("`stream` must be true or false")),
        };
        Ok(AgentRequest {
            message,
            session_id,
            agent,
            stream,
        })
    }
}

pub(crate) fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Send a message to the agent
///
/// Starts a run in a new session, or in the session named by
/// `session_id` (with its history). Answers when the run has finished, or
/// streams it as Server-Sent Events (`run_started`, `message_delta`,
/// `tool_call`, `tool_result`, then `run_completed` or `run_failed`) with
/// ids 1, 2, 3… per run.
#[utoipa::path(post, path = "/agent", tag = "agent",
    request_body(content = AgentRequestBody, content_type = "application/json",
        description = "Read as JSON whatever its `Content-Type` (`curl -d` sends a form type)"),
    responses(
        (status = 202, description = "The run paused before a tool call that waits for a person (`POST /runs/{run_id}/approvals`)", body = AwaitingApprovalResponse, links(
            ("decide" = (operation_id = "decide", description = "Approve the call the run waits on",
                parameters(("run_id" = "$response.body#/run_id")),
                request_body = json!({"call_id": "{$response.body#/approval/call_id}", "decision": "approve"}))),
        )),
        (status = 200, description = "The run completed (JSON), or its events (`stream`)", content(
            (AgentResponse = "application/json"),
            (StreamEvent = "text/event-stream"),
        ), links(
            ("continue" = (operation_id = "post_agent", description = "Continue the conversation",
                request_body = json!({"message": "and then?", "session_id": "{$response.body#/session_id}"}))),
            ("session" = (operation_id = "get_session", description = "The conversation so far",
                parameters(("session_id" = "$response.body#/session_id")))),
            ("runs" = (operation_id = "session_runs", description = "The session's runs",
                parameters(("session_id" = "$response.body#/session_id")))),
            ("audit" = (operation_id = "session_audit", description = "The session's tool calls",
                parameters(("session_id" = "$response.body#/session_id")))),
            ("delete" = (operation_id = "delete_session", description = "Delete the session",
                parameters(("session_id" = "$response.body#/session_id")))),
            ("run" = (operation_id = "get_run", description = "This run",
                parameters(("run_id" = "$response.body#/run_id")))),
            ("events" = (operation_id = "run_events", description = "This run's events",
                parameters(("run_id" = "$response.body#/run_id")))),
        )),
        (status = 400, description = "`invalid_json`, `invalid_utf8`, `invalid_body`: the body is not a JSON document; `streaming_disabled`: `stream` asked of a server with ENABLE_STREAMING=false", body = ErrorBody),
        (status = 404, description = "`session_not_found`: no session has this `session_id`; `agent_not_found`: no agent has this `agent`", body = ErrorBody),
        (status = 409, description = "`session_busy`: the session has a run in progress or waiting for an approval (`active_run_id`); `wrong_agent`: the session belongs to another agent (`agent`)", body = ErrorBody),
        (status = 413, description = "`body_too_large`: larger than MAX_BODY_BYTES", body = ErrorBody),
        (status = 422, description = "`invalid_request`, `invalid_session_id`: a field is missing or wrong", body = ErrorBody),
        (status = 500, description = "`internal_error` (logged)", body = ErrorBody),
        (status = 502, description = "`model_error`, `delegate_error`, `max_steps_exceeded`: the model (or a delegate agent) failed, or the run reached its step limit (`session_id`, `run_id`)", body = ErrorBody),
        (status = 503, description = "`shutting_down`: no new runs; `run_interrupted`: the server stopped during the run", body = ErrorBody),
        (status = 504, description = "`model_timeout`: the model did not answer in time (`session_id`, `run_id`)", body = ErrorBody),
    ),
)]
pub async fn post_agent(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request =
        AgentRequest::from_json(json_body(&headers, body, state.config.max_body_bytes).await?)?;
    // An explicit `"stream"` wins over the Accept header.
    let stream = request
        .stream
        .unwrap_or_else(|| wants_event_stream(&headers));
    if stream && !state.config.enable_streaming {
        return Err(ApiError::bad_request(
            "streaming_disabled",
            "streaming is turned off on this server (ENABLE_STREAMING=false); send \"stream\": false",
        ));
    }
    let account = match state.door.admit_run(&caller).await {
        Ok(account) => account,
        Err(refused) => return Ok(refused),
    };
    let handle = state
        .engine
        .start_run(StartRun {
            session_id: request.session_id,
            create_if_missing: false,
            history: Vec::new(),
            agent: request.agent,
            message: request.message,
            stream,
            owner: caller.tenant().map(str::to_string),
            account,
            queued: None,
        })
        .await
        .map_err(start_error)?;
    if stream {
        Ok(event_stream(handle))
    } else {
        finished(handle).await
    }
}

pub(crate) fn start_error(error: StartError) -> ApiError {
    match error {
        StartError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; retry on another instance",
        ),
        StartError::SessionNotFound => {
            ApiError::not_found("session_not_found", "no session has this session_id")
        }
        StartError::UnknownAgent(agent) => ApiError::not_found(
            "agent_not_found",
            format!("this server runs no agent {agent:?} (GET /agents lists them)"),
        ),
        StartError::WrongAgent { agent } => ApiError::new(
            StatusCode::CONFLICT,
            "wrong_agent",
            format!(
                "this session belongs to agent {agent:?} for life; leave `agent` out or send {agent:?}"
            ),
        )
        .with("agent", agent),
        StartError::SessionBusy {
            session_id,
            active_run_id,
        } => ApiError::new(
            StatusCode::CONFLICT,
            "session_busy",
            "this session already has a run in progress; wait for it to finish, then send again",
        )
        .with("session_id", session_id)
        .with("active_run_id", active_run_id),
        // Only the run queue starts queued runs, and it handles this.
        StartError::NotQueued => ApiError::new(
            StatusCode::CONFLICT,
            "run_not_queued",
            "the run is no longer queued",
        ),
        StartError::Store(e) => ApiError::from(e),
    }
}

/// The answer to a run that has ended or paused, as JSON.
pub(crate) async fn finished(handle: RunHandle) -> Result<Response, ApiError> {
    let RunHandle {
        run_id,
        session_id,
        outcome,
        ..
    } = handle;
    match outcome.await {
        Ok(RunOutcome::Completed {
            response,
            tokens_used,
        }) => Ok(Json(AgentResponse {
            response,
            session_id,
            tokens_used,
            run_id,
        })
        .into_response()),
        Ok(RunOutcome::AwaitingApproval {
            approval,
            tokens_used,
        }) => Ok((
            StatusCode::ACCEPTED,
            Json(AwaitingApprovalResponse {
                status: "awaiting_approval",
                session_id,
                run_id,
                tokens_used,
                approval: ApprovalRequest::from(&approval),
            }),
        )
            .into_response()),
        Ok(RunOutcome::Failed { failure, .. }) => {
            Err(failure_error(&failure, &session_id, &run_id))
        }
        Err(_) => Err(ApiError::internal(&"the run task ended without an outcome")),
    }
}

/// The error a run that failed answers with.
pub(crate) fn failure_error(
    failure: &bulkhead_agent::Failure,
    session_id: &str,
    run_id: &str,
) -> ApiError {
    let status = match failure.kind {
        FailureKind::Upstream | FailureKind::MaxSteps => StatusCode::BAD_GATEWAY,
        FailureKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        FailureKind::Interrupted => StatusCode::SERVICE_UNAVAILABLE,
        FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, failure.code, failure.message.clone())
        .with("session_id", session_id)
        .with("run_id", run_id)
}

/// A run's events, live, as Server-Sent Events; the stream ends when the
/// run ends or pauses.
pub(crate) fn event_stream(handle: RunHandle) -> Response {
    let Some(events) = handle.events else {
        return ApiError::internal(&"a streaming run has no event channel").into_response();
    };
    sse_of(futures_util::stream::unfold(
        events,
        |mut events| async move { events.recv().await.map(|event| (event, events)) },
    ))
}

/// A run's events as Server-Sent Events, each with its id, until the
/// channel closes.
pub(crate) fn sse_of(
    events: impl futures_util::Stream<Item = bulkhead_agent::EventRecord> + Send + 'static,
) -> Response {
    let events = events.map(|event| {
        Ok::<_, Infallible>(
            Event::default()
                .id(event.seq.to_string())
                .event(event.kind)
                .data(&*event.data),
        )
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Proxies such as nginx must not buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}
