//! A run once made: listed, read, deleted, joined (its output, or its
//! stream from the start or after `Last-Event-ID`), cancelled.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::{CancelAction, CancelOutcome};
use bulkhead_store::ThreadRow;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::invalid;
use super::runs::{location, read_run};
use super::stream::{self, Follow, Modes};
use super::{
    DetailBody, ThreadPath, decided_by, object, owned_thread, run_json, run_status, uuid_of,
};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ThreadRunPath {
    /// The thread's UUID.
    #[param(format = Uuid)]
    thread_id: String,
    /// The run's UUID.
    #[param(format = Uuid)]
    run_id: String,
}

/// The query string's values of `key`, each `a` or a JSON list.
fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    let mut values = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k != key {
            continue;
        }
        match serde_json::from_str::<Vec<String>>(&v) {
            Ok(list) if v.starts_with('[') => values.extend(list),
            _ => values.push(v.into_owned()),
        }
    }
    values
}

fn query_flag(query: Option<&str>, key: &str) -> bool {
    query_values(query, key)
        .first()
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// A run of a thread the caller reaches: the thread, and the run as shown.
async fn owned_thread_run(
    state: &AppState,
    caller: &Caller,
    thread: &str,
    run: &str,
) -> Result<(ThreadRow, String, Value), ApiError> {
    let row = owned_thread(state, caller, thread).await?;
    let run_id = uuid_of("run", run)?;
    let agent = thread_agent(state, &row, &run_id).await?;
    let run = read_run(state, &row.id, &agent, &run_id)
        .await?
        .ok_or_else(|| ApiError::not_found("run_not_found", format!("Run {run_id} not found")))?;
    Ok((row, run_id, run))
}

/// The agent a thread's run runs: the thread's, or its queued run's.
async fn thread_agent(state: &AppState, row: &ThreadRow, run_id: &str) -> Result<String, ApiError> {
    if !row.agent.is_empty() {
        return Ok(row.agent.clone());
    }
    Ok(state
        .engine
        .store()
        .queued_run(run_id)
        .await?
        .map(|q| q.agent)
        .unwrap_or_else(|| state.engine.agents().default_agent().id.clone()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListQuery {
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    #[param(minimum = 0)]
    offset: Option<i64>,
    #[param(value_type = Option<String>, pattern = "^(pending|running|success|error|interrupted)$")]
    status: Option<String>,
}

/// List a thread's runs
///
/// Newest first, queued ones included.
#[utoipa::path(get, path = "/threads/{thread_id}/runs", tag = "langgraph", params(ThreadPath, ListQuery),
    responses(
        (status = 200, description = "The runs", body = Vec<Object>),
        (status = 404, description = "No such thread", body = DetailBody),
        (status = 422, description = "The id is not a UUID, or a bad query", body = DetailBody),
    ),
)]
pub async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    Path(thread): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    let row = owned_thread(&state, &caller, &thread).await?;
    let number = |key: &str, default: usize| -> Result<usize, ApiError> {
        match query_values(query.as_deref(), key).first() {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| invalid(format!("`{key}` must be a number"))),
        }
    };
    let limit = number("limit", 10)?;
    if !(1..=1000).contains(&limit) {
        return Err(invalid("`limit` must be from 1 to 1000"));
    }
    let offset = number("offset", 0)?;
    if offset > i64::MAX as usize {
        return Err(invalid("`offset` is too large"));
    }
    let status = query_values(query.as_deref(), "status").into_iter().next();
    if status
        .as_deref()
        .is_some_and(|s| !["pending", "running", "success", "error", "interrupted"].contains(&s))
    {
        return Err(invalid(
            "`status` must be pending, running, success, error or interrupted",
        ));
    }
    let store = state.engine.store();
    let agent = row.agent.clone();
    let mut runs: Vec<(i64, Value)> = store
        .runs(&row.id)
        .await?
        .into_iter()
        .map(|run| {
            let kwargs = object(run.kwargs.as_deref());
            (
                run.created_at,
                run_json(
                    &run.id,
                    &row.id,
                    &agent,
                    run.created_at,
                    run.finished_at.unwrap_or(run.created_at),
                    run_status(&run.status),
                    &kwargs,
                ),
            )
        })
        .collect();
    runs.extend(store.queued_runs(&row.id).await?.into_iter().map(|q| {
        (
            q.created_at,
            run_json(
                &q.id,
                &row.id,
                &q.agent,
                q.created_at,
                q.updated_at,
                run_status(&q.status),
                &object(Some(&q.kwargs)),
            ),
        )
    }));
    runs.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| b.1["run_id"].as_str().cmp(&a.1["run_id"].as_str()))
    });
    Ok(Json(
        runs.into_iter()
            .map(|(_, run)| run)
            .filter(|run| status.as_deref().is_none_or(|s| run["status"] == s))
            .skip(offset)
            .take(limit)
            .collect(),
    ))
}

/// Get a run
#[utoipa::path(get, path = "/threads/{thread_id}/runs/{run_id}", tag = "langgraph", params(ThreadRunPath),
    responses(
        (status = 200, description = "The run", body = Object),
        (status = 404, description = "No such thread or run", body = DetailBody),
        (status = 422, description = "An id is not a UUID", body = DetailBody),
    ),
)]
pub async fn get_thread_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        owned_thread_run(&state, &caller, &thread, &run).await?.2,
    ))
}

/// Delete a run
///
/// Its record and events; the conversation keeps what it said, and the
/// audit trail its tool calls. A queued run is taken out of the queue.
#[utoipa::path(delete, path = "/threads/{thread_id}/runs/{run_id}", tag = "langgraph", params(ThreadRunPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such thread or run", body = DetailBody),
        (status = 409, description = "The run is in flight: cancel it first", body = DetailBody),
        (status = 422, description = "An id is not a UUID", body = DetailBody),
    ),
)]
pub async fn delete_thread_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (_, run_id, _) = owned_thread_run(&state, &caller, &thread, &run).await?;
    if state.engine.store().delete_run(&run_id, false).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_in_flight",
            format!("Run {run_id} is in flight: cancel it first"),
        ))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct JoinQuery {
    /// Cancel the run if this client goes away.
    cancel_on_disconnect: Option<bool>,
}

/// Wait for a run's output
#[utoipa::path(get, path = "/threads/{thread_id}/runs/{run_id}/join", tag = "langgraph", params(ThreadRunPath, JoinQuery),
    responses(
        (status = 200, description = "The thread's values once the run has ended", body = Object),
        (status = 404, description = "No such thread or run", body = DetailBody),
        (status = 422, description = "An id is not a UUID", body = DetailBody),
    ),
)]
pub async fn join_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (row, run_id, _) = owned_thread_run(&state, &caller, &thread, &run).await?;
    let run_path = format!("/threads/{}/runs/{run_id}", row.id);
    Ok(stream::wait_body(
        state,
        run_id,
        row.id,
        query_flag(query.as_deref(), "cancel_on_disconnect"),
        false,
        format!("{run_path}/join"),
        run_path,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct JoinStreamQuery {
    /// The modes to send (the run's own when none is named; repeat it for
    /// several).
    #[param(value_type = Option<String>, pattern = "^(values|updates|messages|messages-tuple|custom)?$")]
    stream_mode: Option<String>,
    cancel_on_disconnect: Option<bool>,
}

/// Join a run's stream
///
/// From the start, or after `Last-Event-ID` (a resumable run's part id).
#[utoipa::path(get, path = "/threads/{thread_id}/runs/{run_id}/stream", tag = "langgraph", params(ThreadRunPath, JoinStreamQuery),
    responses(
        (status = 200, description = "The run's stream", content_type = "text/event-stream", body = stream::LangGraphEvent),
        (status = 400, description = "Streaming is off", body = DetailBody),
        (status = 404, description = "No such thread or run", body = DetailBody),
        (status = 422, description = "An id is not a UUID, or an unsupported mode", body = DetailBody),
    ),
)]
pub async fn join_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !state.config.enable_streaming {
        return Err(ApiError::bad_request(
            "streaming_disabled",
            "streaming is turned off on this server (ENABLE_STREAMING=false)",
        ));
    }
    let (row, run_id, run) = owned_thread_run(&state, &caller, &thread, &run).await?;
    // `?stream_mode=` is how httpx writes the SDK's default, None: the
    // run's own modes.
    let asked: Vec<String> = query_values(query.as_deref(), "stream_mode")
        .into_iter()
        .filter(|mode| !mode.is_empty())
        .collect();
    let modes = if asked.is_empty() {
        let kwargs_modes = run["kwargs"].get("stream_mode").cloned();
        Modes::parse(kwargs_modes.as_ref())?
    } else {
        Modes::parse(Some(&json!(asked)))?
    };
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(stream::parse_event_id);
    let agent = thread_agent(&state, &row, &run_id).await?;
    let run_path = format!("/threads/{}/runs/{run_id}", row.id);
    Ok(stream::sse(
        state,
        run_id,
        row.id,
        agent,
        Follow {
            modes,
            resumable: run["kwargs"]["stream_resumable"].as_bool().unwrap_or(false),
            metadata: after.is_none(),
            after,
            cancel_on_disconnect: query_flag(query.as_deref(), "cancel_on_disconnect"),
            temporary: false,
        },
        format!("{run_path}/stream"),
        run_path,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct CancelQuery {
    /// Answer once the run has stopped, with the thread's values.
    wait: Option<bool>,
    /// `interrupt` (the default): stop it, keep what it did; `rollback`:
    /// stop it and delete it with what it added to the conversation.
    #[param(value_type = Option<String>, pattern = "^(interrupt|rollback)$")]
    action: Option<String>,
}

/// Cancel a run
#[utoipa::path(post, path = "/threads/{thread_id}/runs/{run_id}/cancel", tag = "langgraph", params(ThreadRunPath, CancelQuery),
    responses(
        (status = 200, description = "`wait`: the thread's values once the run stopped", body = Object),
        (status = 202, description = "Cancelled"),
        (status = 404, description = "No such thread or run", body = DetailBody),
        (status = 409, description = "The run has ended already, or runs on another replica that could not be reached (no `REDIS_URL`)", body = DetailBody),
        (status = 422, description = "An id is not a UUID, or a bad action", body = DetailBody),
    ),
)]
pub async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (row, run_id, _) = owned_thread_run(&state, &caller, &thread, &run).await?;
    let action = match query_values(query.as_deref(), "action")
        .first()
        .map(String::as_str)
    {
        None | Some("interrupt") => CancelAction::Interrupt,
        Some("rollback") => CancelAction::Rollback,
        Some(_) => return Err(invalid("`action` must be interrupt or rollback")),
    };
    let outcome = state
        .engine
        .cancel(
            &run_id,
            action,
            &decided_by(&caller),
            "cancelled by a client",
        )
        .await?;
    match outcome {
        CancelOutcome::Cancelled => {}
        CancelOutcome::NotFound => {
            return Err(ApiError::not_found(
                "run_not_found",
                format!("Run {run_id} not found"),
            ));
        }
        CancelOutcome::Finished => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "run_ended",
                format!("Run {run_id} has ended already: there is nothing to cancel"),
            ));
        }
        CancelOutcome::Elsewhere => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "run_elsewhere",
                format!(
                    "Run {run_id} executes on another replica, which could not be reached: \
                     set REDIS_URL on every replica to cancel across them"
                ),
            ));
        }
    }
    if query_flag(query.as_deref(), "wait") {
        let values = stream::final_values(&state, &run_id, &row.id).await;
        let mut response = Json(values).into_response();
        location(
            response.headers_mut(),
            header::CONTENT_LOCATION,
            &format!("/threads/{}/runs/{run_id}", row.id),
        );
        return Ok(response);
    }
    Ok(StatusCode::ACCEPTED.into_response())
}
