//! Reading back what was recorded: sessions, their runs, and run events.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use bulkhead_store::{DeleteOutcome, Run, Session};
use serde::Deserialize;
use serde_json::{Value, json};

use super::timestamp;
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;
use crate::extract::parse_id;

fn session_id(raw: &str) -> Result<String, ApiError> {
    parse_id(
        raw,
        "the session id",
        "invalid_session_id",
        StatusCode::BAD_REQUEST,
    )
}

fn run_id(raw: &str) -> Result<String, ApiError> {
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
async fn owned_run(state: &AppState, caller: &Caller, id: &str) -> Result<Run, ApiError> {
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

/// The conversation, oldest message first.
pub async fn get_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&raw)?;
    let session = owned_session(&state, &caller, &id).await?;
    let store = state.engine.store();
    let messages: Vec<Value> = store
        .messages(&id)
        .await?
        .into_iter()
        .map(|m| {
            let mut message = json!({
                "role": m.role,
                "content": m.content,
                "run_id": m.run_id,
                "created_at": timestamp(m.created_at),
            });
            if let Some(calls) = m.tool_calls.as_deref() {
                message["tool_calls"] = serde_json::from_str(calls).unwrap_or(Value::Null);
            }
            if let Some(call_id) = m.tool_call_id {
                message["tool_call_id"] = call_id.into();
            }
            message
        })
        .collect();
    Ok(Json(json!({
        "session_id": session.id,
        "created_at": timestamp(session.created_at),
        "updated_at": timestamp(session.updated_at),
        "active_run_id": session.active_run_id,
        "messages": messages,
    })))
}

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

fn run_json(run: Run) -> Value {
    let error = run
        .error_code
        .map(|code| json!({"code": code, "message": run.error_message}));
    json!({
        "run_id": run.id,
        "session_id": run.session_id,
        "status": run.status,
        "input": run.input,
        "output": run.output,
        "tokens_used": run.tokens_used,
        "steps": run.steps,
        "error": error,
        "created_at": timestamp(run.created_at),
        "finished_at": run.finished_at.map(timestamp),
    })
}

/// The runs made on a session, oldest first.
pub async fn session_runs(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&raw)?;
    owned_session(&state, &caller, &id).await?;
    let store = state.engine.store();
    let runs: Vec<Value> = store.runs(&id).await?.into_iter().map(run_json).collect();
    Ok(Json(json!({"session_id": id, "runs": runs})))
}

fn run_not_found() -> ApiError {
    ApiError::not_found("run_not_found", "no run has this id")
}

pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = run_id(&raw)?;
    let run = owned_run(&state, &caller, &id).await?;
    Ok(Json(run_json(run)))
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Only events with an id above this one.
    #[serde(default)]
    after: Option<i64>,
}

/// A run's recorded events, in order, each with its id (the same id the
/// event had on the stream).
pub async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = run_id(&raw)?;
    let Query(query) = query.map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            "`after` must be a whole number (an event id)",
        )
    })?;
    let run = owned_run(&state, &caller, &id).await?;
    let store = state.engine.store();
    let events: Vec<Value> = store
        .run_events(&id, query.after.unwrap_or(0))
        .await?
        .into_iter()
        .map(|e| {
            json!({
                "id": e.seq,
                "event": e.kind,
                "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null),
                "created_at": timestamp(e.created_at),
            })
        })
        .collect();
    Ok(Json(
        json!({"run_id": id, "status": run.status, "events": events}),
    ))
}

/// The session's tool calls as audited: what ran, where, under which
/// limits, and how it ended. Oldest first.
pub async fn session_audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&raw)?;
    owned_session(&state, &caller, &id).await?;
    let store = state.engine.store();
    let parse = |text: Option<String>| {
        text.and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or(Value::Null)
    };
    let records: Vec<Value> = store
        .tool_executions(&id)
        .await?
        .into_iter()
        .map(|x| {
            json!({
                "audit_id": x.id,
                "run_id": x.run_id,
                "call_id": x.call_id,
                "tool": x.tool,
                "arguments": serde_json::from_str::<Value>(&x.arguments)
                    .unwrap_or(Value::String(x.arguments)),
                "backend": x.backend,
                "limits": parse(x.limits),
                "status": x.status,
                "started_at": timestamp(x.started_at),
                "finished_at": x.finished_at.map(timestamp),
                "exit_code": x.exit_code,
                "signal": x.signal,
                "killed_reason": x.killed_reason,
                "limits_hit": parse(x.limits_hit),
                "stdout": {"bytes": x.stdout_bytes, "truncated": x.stdout_truncated, "sha256": x.stdout_sha256},
                "stderr": {"bytes": x.stderr_bytes, "truncated": x.stderr_truncated, "sha256": x.stderr_sha256},
                "duration_ms": x.duration_ms,
                "error": x.error,
                "egress_refusals": parse(x.egress_refusals),
            })
        })
        .collect();
    Ok(Json(json!({"session_id": id, "tool_calls": records})))
}
