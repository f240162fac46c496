//! Reading back what was recorded: sessions, their runs, and run events.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use bulkhead_store::{DeleteOutcome, Run, Session};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::timestamp;
use crate::app::AppState;
use crate::door::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::parse_id;

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionBody {
    #[schema(format = Uuid)]
    session_id: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The run in progress, if any: the session takes no other until it ends.
    #[schema(format = Uuid)]
    active_run_id: Option<String>,
    /// The agent the session belongs to (`GET /agents/{agent_id}`).
    agent: String,
    /// Oldest first: user, assistant, tool calls and tool results.
    messages: Vec<MessageBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageBody {
    /// `user`, `assistant` or `tool`.
    role: String,
    content: Option<String>,
    #[schema(format = Uuid)]
    run_id: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
    /// The assistant's tool calls, OpenAI-shaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunBody {
    #[schema(format = Uuid)]
    run_id: String,
    #[schema(format = Uuid)]
    session_id: String,
    /// `running`, `awaiting_approval`, `completed`, `failed` or
    /// `interrupted`.
    status: String,
    input: String,
    output: Option<String>,
    tokens_used: i64,
    steps: i64,
    error: Option<RunError>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    /// The call the run waits on, when it is `awaiting_approval`.
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<super::agent::ApprovalRequest>,
}

/// Why a run did not complete.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunError {
    code: String,
    message: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionRuns {
    #[schema(format = Uuid)]
    session_id: String,
    runs: Vec<RunBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunEvents {
    #[schema(format = Uuid)]
    run_id: String,
    status: String,
    events: Vec<EventBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventBody {
    /// The id the event had on the stream.
    id: i64,
    #[schema(value_type = super::agent::EventKind)]
    event: String,
    data: Value,
    #[schema(format = DateTime)]
    created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionAudit {
    #[schema(format = Uuid)]
    session_id: String,
    tool_calls: Vec<AuditRecord>,
}

/// A tool call as audited: recorded before it ran, completed after.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditRecord {
    #[schema(format = Uuid)]
    audit_id: String,
    #[schema(format = Uuid)]
    run_id: String,
    call_id: String,
    tool: String,
    /// The call's arguments (secrets redacted): JSON, or the text the
    /// model sent when it was not JSON.
    arguments: Value,
    backend: String,
    limits: Value,
    /// `running`, `completed` (it ran), `failed` (it could not run),
    /// `refused` (no sandbox, or the agent's policy denies the tool),
    /// `awaiting_approval`, `denied` (by a person, or unanswered: see
    /// `approval`), or `interrupted`.
    status: String,
    #[schema(format = DateTime)]
    started_at: String,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    exit_code: Option<i64>,
    signal: Option<i64>,
    killed_reason: Option<String>,
    limits_hit: Value,
    stdout: OutputSummary,
    stderr: OutputSummary,
    duration_ms: Option<i64>,
    error: Option<String>,
    egress_refusals: Value,
    /// For a call its agent's policy made wait for a person: until when,
    /// and what was decided, by whom, when.
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<ApprovalRecord>,
}

/// A person's decision on a call, as audited.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalRecord {
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// `approve`, `deny` or `expired`; absent while it waits.
    decision: Option<String>,
    /// The API key that decided (its id), `anonymous` (authentication
    /// off) or `expiry`.
    decided_by: Option<String>,
    #[schema(format = DateTime)]
    decided_at: Option<String>,
    comment: Option<String>,
}

/// What a program wrote to one stream; the audit keeps its size and
/// digest, not its text.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputSummary {
    bytes: Option<i64>,
    truncated: Option<bool>,
    sha256: Option<String>,
}

/// The id of a session, from `POST /agent`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct SessionPath {
    #[param(format = Uuid)]
    session_id: String,
}

/// The id of a run.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct RunPath {
    #[param(format = Uuid)]
    run_id: String,
}

fn session_id(raw: &str) -> Result<String, ApiError> {
    parse_id(
        raw,
        "the session id",
        "invalid_session_id",
        StatusCode::BAD_REQUEST,
    )
}

pub(crate) fn run_id(raw: &str) -> Result<String, ApiError> {
    parse_id(raw, "the run id", "invalid_run_id", StatusCode::BAD_REQUEST)
}

fn session_not_found() -> ApiError {
    ApiError::not_found("session_not_found", "no session has this id")
}

/// The session, if it exists and the caller's tenant owns it: another
/// tenant's session answers exactly as an unknown one.
async fn owned_session(state: &AppState, caller: &Caller, id: &str) -> Result<Session, ApiError> {
    state
        .engine
        .store()
        .session(id)
        .await?
        .filter(|session| caller.reaches(session.owner.as_deref()))
        .ok_or_else(session_not_found)
}

/// The run, if it exists and belongs to a session the caller owns.
pub(crate) async fn owned_run(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Run, ApiError> {
    let store = state.engine.store();
    let run = store.run(id).await?.ok_or_else(run_not_found)?;
    if caller.tenant().is_some() {
        let owner = store.session(&run.session_id).await?.and_then(|s| s.owner);
        if !caller.reaches(owner.as_deref()) {
            return Err(run_not_found());
        }
    }
    Ok(run)
}

/// A session's conversation
///
/// Oldest message first: user, assistant, tool calls and tool results.
#[utoipa::path(get, path = "/sessions/{session_id}", tag = "sessions", params(SessionPath),
    responses(
        (status = 200, description = "The session", body = SessionBody),
        (status = 400, description = "`invalid_session_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
    ),
)]
pub async fn get_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<SessionBody>, ApiError> {
    let id = session_id(&raw)?;
    let session = owned_session(&state, &caller, &id).await?;
    let store = state.engine.store();
    let messages = store
        .messages(&id)
        .await?
        .into_iter()
        .map(|m| MessageBody {
            role: m.role,
            content: m.content,
            run_id: m.run_id,
            created_at: timestamp(m.created_at),
            tool_calls: m
                .tool_calls
                .map(|calls| serde_json::from_str(&calls).unwrap_or(Value::Null)),
            tool_call_id: m.tool_call_id,
        })
        .collect();
    Ok(Json(SessionBody {
        session_id: session.id,
        created_at: timestamp(session.created_at),
        updated_at: timestamp(session.updated_at),
        active_run_id: session.active_run_id,
        agent: session.agent,
        messages,
    }))
}

/// Delete a session
///
/// The session, its messages, runs and events.
#[utoipa::path(delete, path = "/sessions/{session_id}", tag = "sessions", params(SessionPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_session_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "`session_busy`: a run is in progress; delete once it has finished", body = ErrorBody),
    ),
)]
pub async fn delete_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = session_id(&raw)?;
    owned_session(&state, &caller, &id).await?;
    match state.engine.delete_session(&id).await? {
        DeleteOutcome::Deleted => {
            tracing::info!(session_id = %id, "session deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(session_not_found()),
        DeleteOutcome::Busy => Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_busy",
            "this session has a run in progress; delete it once the run has finished",
        )),
    }
}

fn run_body(run: Run) -> RunBody {
    let error = run.error_code.map(|code| RunError {
        code,
        message: run.error_message,
    });
    RunBody {
        run_id: run.id,
        session_id: run.session_id,
        status: run.status,
        input: run.input,
        output: run.output,
        tokens_used: run.tokens_used,
        steps: run.steps,
        error,
        created_at: timestamp(run.created_at),
        finished_at: run.finished_at.map(timestamp),
        approval: None,
    }
}

/// A session's runs
///
/// Oldest first, with status, tokens, steps and error.
#[utoipa::path(get, path = "/sessions/{session_id}/runs", tag = "sessions", params(SessionPath),
    responses(
        (status = 200, description = "The session's runs", body = SessionRuns),
        (status = 400, description = "`invalid_session_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
    ),
)]
pub async fn session_runs(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<SessionRuns>, ApiError> {
    let id = session_id(&raw)?;
    owned_session(&state, &caller, &id).await?;
    let store = state.engine.store();
    let runs = store.runs(&id).await?.into_iter().map(run_body).collect();
    Ok(Json(SessionRuns {
        session_id: id,
        runs,
    }))
}

fn run_not_found() -> ApiError {
    ApiError::not_found("run_not_found", "no run has this id")
}

/// One run
#[utoipa::path(get, path = "/runs/{run_id}", tag = "runs", params(RunPath),
    responses(
        (status = 200, description = "The run", body = RunBody, links(
            ("decide" = (operation_id = "decide", description = "Deny the call the run waits on, if it waits",
                parameters(("run_id" = "$response.body#/run_id")),
                request_body = json!({"call_id": "{$response.body#/approval/call_id}", "decision": "deny"}))),
        )),
        (status = 400, description = "`invalid_run_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`run_not_found`", body = ErrorBody),
    ),
)]
pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<RunBody>, ApiError> {
    let id = run_id(&raw)?;
    let run = owned_run(&state, &caller, &id).await?;
    let awaiting = run.status == "awaiting_approval";
    let mut body = run_body(run);
    if awaiting && let Some(call) = state.engine.store().awaiting_approval(&id).await? {
        body.approval = Some(super::agent::ApprovalRequest::from_record(&call));
    }
    Ok(Json(body))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with an id above this one (to resume after the last
    /// event seen).
    #[serde(default)]
    after: Option<i64>,
}

/// A run's events, recorded or live
///
/// In order, each with its id (the same id the event had on the stream).
/// With `Accept: text/event-stream`, the run is followed live, from any
/// replica whatever replica executes it: the events after `after` (or
/// `Last-Event-ID`) as Server-Sent Events, until the run ends or pauses.
#[utoipa::path(get, path = "/runs/{run_id}/events", tag = "runs", params(RunPath, EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "With `Accept: text/event-stream`: resume after this event id (as `after`)")),
    responses(
        (status = 200, description = "The run's events (JSON), or the run followed live (`Accept: text/event-stream`)", content(
            (RunEvents = "application/json"),
            (super::agent::StreamEvent = "text/event-stream"),
        )),
        (status = 400, description = "`invalid_run_id`: not a UUID; `invalid_query`: `after` (or `Last-Event-ID`) is not a whole number", body = ErrorBody),
        (status = 404, description = "`run_not_found`", body = ErrorBody),
    ),
)]
pub async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    headers: axum::http::HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let id = run_id(&raw)?;
    let Query(query) = query.map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            "`after` must be a whole number (an event id)",
        )
    })?;
    let run = owned_run(&state, &caller, &id).await?;
    if super::agent::wants_event_stream(&headers) {
        let resume = match headers.get("last-event-id") {
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            "`Last-Event-ID` must be a whole number (an event id)",
                        )
                    })?,
            ),
            None => None,
        };
        let after = resume.or(query.after).unwrap_or(0);
        let events = crate::cluster::follow::run_events(state.clone(), id, after);
        return Ok(super::agent::sse_of(futures_util::stream::unfold(
            events,
            |mut events| async move { events.recv().await.map(|event| (event, events)) },
        )));
    }
    let store = state.engine.store();
    let events = store
        .run_events(&id, query.after.unwrap_or(0))
        .await?
        .into_iter()
        .map(|e| EventBody {
            id: e.seq,
            event: e.kind,
            data: serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null),
            created_at: timestamp(e.created_at),
        })
        .collect();
    Ok(Json(RunEvents {
        run_id: id,
        status: run.status,
        events,
    })
    .into_response())
}

/// A session's tool calls, as audited
///
/// What ran, where, under which limits, and how it ended. Oldest first.
#[utoipa::path(get, path = "/sessions/{session_id}/audit", tag = "sessions", params(SessionPath),
    responses(
        (status = 200, description = "The session's audit trail", body = SessionAudit),
        (status = 400, description = "`invalid_session_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
    ),
)]
pub async fn session_audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<SessionAudit>, ApiError> {
    let id = session_id(&raw)?;
    owned_session(&state, &caller, &id).await?;
    let store = state.engine.store();
    let parse = |text: Option<String>| {
        text.and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or(Value::Null)
    };
    let tool_calls = store
        .tool_executions(&id)
        .await?
        .into_iter()
        .map(|x| AuditRecord {
            audit_id: x.id,
            run_id: x.run_id,
            call_id: x.call_id,
            tool: x.tool,
            arguments: serde_json::from_str::<Value>(&x.arguments)
                .unwrap_or(Value::String(x.arguments)),
            backend: x.backend,
            limits: parse(x.limits),
            status: x.status,
            started_at: timestamp(x.started_at),
            finished_at: x.finished_at.map(timestamp),
            exit_code: x.exit_code,
            signal: x.signal,
            killed_reason: x.killed_reason,
            limits_hit: parse(x.limits_hit),
            stdout: OutputSummary {
                bytes: x.stdout_bytes,
                truncated: x.stdout_truncated,
                sha256: x.stdout_sha256,
            },
            stderr: OutputSummary {
                bytes: x.stderr_bytes,
                truncated: x.stderr_truncated,
                sha256: x.stderr_sha256,
            },
            duration_ms: x.duration_ms,
            error: x.error,
            egress_refusals: parse(x.egress_refusals),
            approval: x.approval_expires_at.map(|expires_at| ApprovalRecord {
                expires_at: Some(timestamp(expires_at)),
                decision: x.approval_decision,
                decided_by: x.approval_decided_by,
                decided_at: x.approval_decided_at.map(timestamp),
                comment: x.approval_comment,
            }),
        })
        .collect();
    Ok(Json(SessionAudit {
        session_id: id,
        tool_calls,
    }))
}
