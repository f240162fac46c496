//! Threads are sessions: made empty (`POST /threads`) or by a run that
//! asks for one, read, searched, given metadata, deleted; their state is
//! the conversation, and their history one state per finished run (a run
//! is Bulkhead's checkpoint).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::CancelAction;
use bulkhead_store::ThreadRow;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::assistants::{holds, optional_body, page};
use super::invalid;
use super::{
    DetailBody, ThreadPath, messages, object, owned_thread, thread_interrupts, thread_json,
    thread_status, thread_values, usage_of, uuid_of,
};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;
use crate::routes::timestamp;

/// The body of `POST /threads`; every field may be left out.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ThreadCreate {
    /// The thread's id; a new UUID when left out.
    #[schema(format = Uuid)]
    thread_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// What to do when a thread with this id exists: `raise` (409, the
    /// default) or `do_nothing` (answer it as it is).
    #[schema(value_type = Option<String>, pattern = "^(raise|do_nothing)$")]
    if_exists: Option<String>,
}

/// The body of `POST /threads/search` and `/threads/count`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ThreadSearch {
    /// Only threads whose metadata holds these keys and values.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    #[schema(value_type = Option<String>, pattern = "^(idle|busy|interrupted|error)$")]
    status: Option<String>,
    /// Only these threads.
    #[schema(value_type = Option<Vec<String>>)]
    ids: Option<Vec<Value>>,
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    #[schema(minimum = 0)]
    offset: Option<i64>,
    /// `updated_at` (the default), `created_at`, `state_updated_at`,
    /// `thread_id` or `status`.
    #[schema(value_type = Option<String>, pattern = "^(thread_id|created_at|updated_at|state_updated_at|status)$")]
    sort_by: Option<String>,
    /// `asc`, or newest first (`desc`, the default).
    sort_order: Option<String>,
}

/// The body of `PATCH /threads/{thread_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ThreadPatch {
    /// Merged into the thread's metadata (a key set to null is removed).
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
}

/// The body of `POST /threads/{thread_id}/history`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct HistoryRequest {
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only states before this checkpoint (`{"checkpoint_id": …}`).
    #[schema(value_type = Option<Object>)]
    before: Option<Value>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    #[schema(value_type = Option<Object>)]
    checkpoint: Option<Value>,
}

fn metadata_of(body: &Value) -> Result<Option<Map<String, Value>>, ApiError> {
    match body.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(_) => Err(invalid("`metadata` must be an object")),
    }
}

/// Create a thread
#[utoipa::path(post, path = "/threads", tag = "langgraph",
    request_body(content = Option<ThreadCreate>, content_type = "application/json"),
    responses(
        (status = 200, description = "The thread", body = Object),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 409, description = "A thread with this id exists (`if_exists: raise`)", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
    ),
)]
pub async fn create_thread(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = optional_body(&state, &headers, body).await?;
    let id = match body.get("thread_id") {
        None | Some(Value::Null) => bulkhead_agent::new_id(),
        Some(Value::String(id)) => uuid_of("thread", id)?,
        Some(_) => return Err(invalid("`thread_id` must be a UUID string")),
    };
    let raise = match body.get("if_exists").and_then(Value::as_str) {
        None | Some("raise") => true,
        Some("do_nothing") => false,
        Some(other) => {
            return Err(invalid(format!(
                "`if_exists` must be raise or do_nothing, not {other:?}"
            )));
        }
    };
    let metadata = metadata_of(&body)?.map(|m| Value::Object(m).to_string());
    let store = state.engine.store();
    let created = store
        .create_thread(
            &id,
            caller.tenant(),
            metadata.as_deref(),
            bulkhead_agent::now_ms(),
        )
        .await?;
    let row = store
        .thread(&id)
        .await?
        .ok_or_else(|| super::thread_not_found(&id))?;
    if !created && (raise || !caller.reaches(row.owner.as_deref())) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "thread_exists",
            format!("Thread {id} already exists"),
        ));
    }
    let values = thread_values(&state, &id).await?;
    let interrupts = thread_interrupts(&state, &row).await?;
    Ok(Json(thread_json(&row, Some(values), &interrupts)))
}

/// Get a thread
#[utoipa::path(get, path = "/threads/{thread_id}", tag = "langgraph", params(ThreadPath),
    responses(
        (status = 200, description = "The thread, its values the conversation", body = Object),
        (status = 404, description = "No such thread (or another tenant's)", body = DetailBody),
        (status = 422, description = "The id is not a UUID", body = DetailBody),
    ),
)]
pub async fn get_thread(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = owned_thread(&state, &caller, &id).await?;
    let values = thread_values(&state, &row.id).await?;
    let interrupts = thread_interrupts(&state, &row).await?;
    Ok(Json(thread_json(&row, Some(values), &interrupts)))
}

/// Update a thread's metadata
#[utoipa::path(patch, path = "/threads/{thread_id}", tag = "langgraph", params(ThreadPath),
    request_body(content = Option<ThreadPatch>, content_type = "application/json"),
    responses(
        (status = 200, description = "The thread", body = Object),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 404, description = "No such thread", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong, or the id is not a UUID", body = DetailBody),
    ),
)]
pub async fn patch_thread(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    // The body first: an answer sent with it unread closes the connection.
    let body = optional_body(&state, &headers, body).await?;
    let row = owned_thread(&state, &caller, &id).await?;
    if let Some(patch) = metadata_of(&body)? {
        let mut metadata = object(row.metadata.as_deref());
        let merged = metadata.as_object_mut().expect("an object");
        for (key, value) in patch {
            if value.is_null() {
                merged.remove(&key);
            } else {
                merged.insert(key, value);
            }
        }
        state
            .engine
            .store()
            .set_thread_metadata(&row.id, &metadata.to_string(), bulkhead_agent::now_ms())
            .await?;
    }
    get_thread(State(state), caller, Path(row.id)).await
}

/// Delete a thread
///
/// Its runs in flight or queued are cancelled first.
#[utoipa::path(delete, path = "/threads/{thread_id}", tag = "langgraph", params(ThreadPath),
    responses(
        (status = 204, description = "Deleted, with its conversation, runs and events"),
        (status = 404, description = "No such thread", body = DetailBody),
        (status = 409, description = "A run of it executes on another replica", body = DetailBody),
        (status = 422, description = "The id is not a UUID", body = DetailBody),
    ),
)]
pub async fn delete_thread(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = owned_thread(&state, &caller, &id).await?;
    cancel_all(&state, &caller, &row, CancelAction::Interrupt).await?;
    match state.engine.delete_session(&row.id).await? {
        bulkhead_store::DeleteOutcome::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        bulkhead_store::DeleteOutcome::NotFound => Err(super::thread_not_found(&row.id)),
        bulkhead_store::DeleteOutcome::Busy => Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_busy",
            "a run of this thread is still in flight; cancel it, then delete the thread",
        )),
    }
}

/// Cancels the thread's run in flight and its queued runs.
pub(crate) async fn cancel_all(
    state: &AppState,
    caller: &Caller,
    row: &ThreadRow,
    action: CancelAction,
) -> Result<(), ApiError> {
    let store = state.engine.store();
    let mut runs: Vec<String> = row.active_run_id.iter().cloned().collect();
    runs.extend(
        store
            .queued_runs(&row.id)
            .await?
            .into_iter()
            .filter(|q| q.status == "pending")
            .map(|q| q.id),
    );
    for run in runs {
        state
            .engine
            .cancel(
                &run,
                action,
                &super::decided_by(caller),
                "superseded: the thread's runs were cancelled",
            )
            .await?;
    }
    Ok(())
}

/// The caller's threads that match a search body, most recently updated
/// first.
async fn matching(
    state: &AppState,
    caller: &Caller,
    body: &Value,
) -> Result<Vec<ThreadRow>, ApiError> {
    let metadata = metadata_of(body)?.map(Value::Object).unwrap_or(Value::Null);
    let status = match body.get("status") {
        None | Some(Value::Null) => None,
        Some(Value::String(s))
            if ["idle", "busy", "interrupted", "error"].contains(&s.as_str()) =>
        {
            Some(s.clone())
        }
        Some(_) => return Err(invalid("`status` must be idle, busy, interrupted or error")),
    };
    let ids: Option<Vec<String>> = match body.get("ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(ids)) => Some(
            ids.iter()
                .map(|id| {
                    id.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid("`ids` must be thread ids"))
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(invalid("`ids` must be a list of thread ids")),
    };
    Ok(state
        .engine
        .store()
        .threads(caller.tenant())
        .await?
        .into_iter()
        .filter(|row| holds(&object(row.metadata.as_deref()), &metadata))
        .filter(|row| status.as_deref().is_none_or(|s| thread_status(row) == s))
        .filter(|row| ids.as_ref().is_none_or(|ids| ids.contains(&row.id)))
        .collect())
}

/// Orders threads as `sort_by` (`thread_id`, `created_at`, `updated_at`
/// (the default), `state_updated_at`, `status`) and `sort_order` (`desc`,
/// the default, or `asc`) say.
fn sort(rows: &mut [ThreadRow], body: &Value) -> Result<(), ApiError> {
    let by = match body.get("sort_by") {
        None | Some(Value::Null) => "updated_at",
        Some(Value::String(by)) => by.as_str(),
        Some(_) => return Err(invalid("`sort_by` must be a string")),
    };
    // As LangGraph's server: descending unless `asc`.
    let ascending = match body.get("sort_order") {
        None | Some(Value::Null) => false,
        Some(Value::String(order)) => order.eq_ignore_ascii_case("asc"),
        Some(_) => return Err(invalid("`sort_order` must be asc or desc")),
    };
    match by {
        "thread_id" => rows.sort_by(|a, b| a.id.cmp(&b.id)),
        "created_at" => rows.sort_by_key(|r| (r.created_at, r.id.clone())),
        "updated_at" | "state_updated_at" => rows.sort_by_key(|r| (r.updated_at, r.id.clone())),
        "status" => {
            rows.sort_by(|a, b| thread_status(a).cmp(thread_status(b)).then(a.id.cmp(&b.id)))
        }
        other => {
            return Err(invalid(format!(
                "`sort_by` {other:?} is not one of thread_id, created_at, updated_at, state_updated_at, status"
            )));
        }
    }
    if !ascending {
        rows.reverse();
    }
    Ok(())
}

/// Search threads
///
/// By metadata (each key and value held), status and ids; most recently
/// updated first, with their values.
#[utoipa::path(post, path = "/threads/search", tag = "langgraph",
    request_body(content = Option<ThreadSearch>, content_type = "application/json"),
    responses(
        (status = 200, description = "The matching threads", body = Vec<Object>),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
    ),
)]
pub async fn search_threads(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Vec<Value>>, ApiError> {
    let body = optional_body(&state, &headers, body).await?;
    let (limit, offset) = page(&body)?;
    let mut rows = matching(&state, &caller, &body).await?;
    sort(&mut rows, &body)?;
    let mut found = Vec::new();
    for row in rows.into_iter().skip(offset).take(limit) {
        let values = thread_values(&state, &row.id).await?;
        let interrupts = thread_interrupts(&state, &row).await?;
        found.push(thread_json(&row, Some(values), &interrupts));
    }
    Ok(Json(found))
}

/// Count threads
#[utoipa::path(post, path = "/threads/count", tag = "langgraph",
    request_body(content = Option<ThreadSearch>, content_type = "application/json"),
    responses(
        (status = 200, description = "How many threads match", body = u64, content_type = "application/json"),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
    ),
)]
pub async fn count_threads(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<u64>, ApiError> {
    let body = optional_body(&state, &headers, body).await?;
    page(&body)?;
    let mut rows = matching(&state, &caller, &body).await?;
    sort(&mut rows, &body)?;
    Ok(Json(rows.len() as u64))
}

/// A state of the thread: the conversation `messages` as of a checkpoint,
/// what waits (`interrupts`, the `tools` task), and the checkpoint's ids.
fn thread_state(
    row: &ThreadRow,
    messages: &[Value],
    checkpoint: &str,
    parent: Option<&str>,
    created_at: i64,
    interrupts: &[Value],
) -> Value {
    let checkpoint_of = |id: &str| json!({"thread_id": row.id, "checkpoint_ns": "", "checkpoint_id": id, "checkpoint_map": null});
    let tasks: Vec<Value> = interrupts
        .iter()
        .map(|i| json!({"id": i["id"], "name": "tools", "path": ["__pregel_pull", "tools"], "error": null, "interrupts": [i], "checkpoint": null, "state": null, "result": null}))
        .collect();
    json!({
        "values": {"messages": messages},
        "next": if interrupts.is_empty() { json!([]) } else { json!(["tools"]) },
        "tasks": tasks,
        "checkpoint": checkpoint_of(checkpoint),
        "metadata": object(row.metadata.as_deref()),
        "created_at": timestamp(created_at),
        "parent_checkpoint": parent.map(checkpoint_of),
        "interrupts": interrupts,
    })
}

/// Every state of the thread, newest first: now, then after each of its
/// runs (the run's id is the checkpoint's).
async fn states(state: &AppState, row: &ThreadRow) -> Result<Vec<Value>, ApiError> {
    let store = state.engine.store();
    let stored = store.messages(&row.id).await?;
    let runs = store.runs(&row.id).await?;
    let conversation = messages::conversation(&stored, &usage_of(&runs));
    let interrupts = thread_interrupts(state, row).await?;
    let mut states = Vec::with_capacity(runs.len() + 1);
    // The conversation after each run: up to its last message.
    for (i, run) in runs.iter().enumerate() {
        let end = stored
            .iter()
            .rposition(|m| m.run_id.as_deref() == Some(run.id.as_str()))
            .map_or(0, |at| at + 1);
        let parent = i.checked_sub(1).map(|p| runs[p].id.as_str());
        let waiting: &[Value] = if i + 1 == runs.len() {
            &interrupts
        } else {
            &[]
        };
        states.push(thread_state(
            row,
            &conversation[..end.min(conversation.len())],
            &run.id,
            parent,
            run.finished_at.unwrap_or(run.created_at),
            waiting,
        ));
    }
    states.reverse();
    Ok(states)
}

/// Get a thread's state
#[utoipa::path(get, path = "/threads/{thread_id}/state", tag = "langgraph", params(ThreadPath),
    responses(
        (status = 200, description = "The thread's current state", body = Object),
        (status = 404, description = "No such thread", body = DetailBody),
        (status = 422, description = "The id is not a UUID", body = DetailBody),
    ),
)]
pub async fn get_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = owned_thread(&state, &caller, &id).await?;
    let mut states = states(&state, &row).await?;
    if states.is_empty() {
        // No run yet: the empty conversation, at no checkpoint of a run.
        return Ok(Json(thread_state(
            &row,
            &[],
            &row.id,
            None,
            row.created_at,
            &[],
        )));
    }
    Ok(Json(states.remove(0)))
}

/// Get a thread's history
///
/// One state per run of the thread, newest first.
#[utoipa::path(post, path = "/threads/{thread_id}/history", tag = "langgraph", params(ThreadPath),
    request_body(content = Option<HistoryRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The thread's states, newest first", body = Vec<Object>),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 404, description = "No such thread", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong, or the id is not a UUID", body = DetailBody),
    ),
)]
pub async fn get_history(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Vec<Value>>, ApiError> {
    let body = optional_body(&state, &headers, body).await?;
    let row = owned_thread(&state, &caller, &id).await?;
    let (limit, _) = page(&body)?;
    let before = match body.get("before") {
        None | Some(Value::Null) => None,
        // A checkpoint config (`{"configurable": {"checkpoint_id"}}`, as
        // the SDK sends a state's `checkpoint` back), or the checkpoint.
        Some(Value::Object(b)) => b
            .get("configurable")
            .unwrap_or(&Value::Null)
            .get("checkpoint_id")
            .or_else(|| b.get("checkpoint_id"))
            .and_then(Value::as_str)
            .map(str::to_string),
        Some(_) => {
            return Err(invalid(
                "`before` must be a checkpoint config (`{\"configurable\": {\"checkpoint_id\": …}}`)",
            ));
        }
    };
    let metadata = metadata_of(&body)?
        .map(Value::Object)
        .unwrap_or(Value::Null);
    if body
        .get("checkpoint")
        .is_some_and(|c| !c.is_null() && !c.is_object())
    {
        return Err(invalid("`checkpoint` must be an object"));
    }
    let states: Vec<Value> = states(&state, &row)
        .await?
        .into_iter()
        .filter(|s| holds(&s["metadata"], &metadata))
        .collect();
    let from = match &before {
        Some(id) => states
            .iter()
            .position(|s| s["checkpoint"]["checkpoint_id"] == *id)
            .map_or(states.len(), |at| at + 1),
        None => 0,
    };
    Ok(Json(states.into_iter().skip(from).take(limit).collect()))
}
