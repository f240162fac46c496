//! Runs: made on a thread (background, waited for, streamed) or stateless
//! (a thread of their own, deleted after), listed, read, joined, cancelled,
//! deleted. Every run goes through the engine's run queue, so a thread
//! runs one at a time in the order asked (`multitask_strategy: enqueue`,
//! the default), or refuses (`reject`), or first cancels what it holds
//! (`interrupt`, `rollback`). A run that resumes an interrupt (`command:
//! {"resume": …}`) is the paused run going on: it keeps its id.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::{CancelAction, CancelOutcome, Decision, EnqueueError, QueueRequest};
use bulkhead_store::ThreadRow;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::assistants::optional_body;
use super::stream::{self, Follow, Modes};
use super::{
    DetailBody, assistant_id, decided_by, find_assistant, object, owned_thread, run_json,
    run_status, thread_not_found, uuid_of,
};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ThreadRunPath {
    /// The thread's UUID.
    thread_id: String,
    /// The run's UUID.
    run_id: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(names("thread_id"), parameter_in = Path)]
#[allow(dead_code)]
pub struct ThreadPath(
    /// The thread's UUID.
    String,
);

/// The body that makes a run. Read by hand, so that each wrong field gets
/// its own message; this type only describes it.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct RunCreate {
    /// The assistant's UUID or graph id (the agent's id).
    #[schema(min_length = 1)]
    assistant_id: String,
    /// `{"messages": [...]}`: the new human message last; on a thread's
    /// first run, the messages before it become its history.
    #[schema(value_type = Option<Object>)]
    input: Option<Value>,
    /// `{"resume": …}` answers the interrupt the thread waits on: approve
    /// (`{"decisions": [{"type": "approve"}]}`, `true`, `"approve"`) or
    /// reject (`{"decisions": [{"type": "reject", "message": …}]}`, `false`).
    #[schema(value_type = Option<Object>)]
    command: Option<Value>,
    /// `values` (the default), `updates`, `messages-tuple`, `custom`, or a list.
    #[schema(value_type = Option<Object>)]
    stream_mode: Option<Value>,
    /// Give every part of the stream an id, so `Last-Event-ID` resumes it.
    stream_resumable: Option<bool>,
    #[schema(value_type = Option<String>, pattern = "^(reject|enqueue|interrupt|rollback)$")]
    multitask_strategy: Option<String>,
    #[schema(value_type = Option<String>, pattern = "^(reject|create)$")]
    if_not_exists: Option<String>,
    #[schema(value_type = Option<String>, pattern = "^(cancel|continue)$")]
    on_disconnect: Option<String>,
    #[schema(value_type = Option<String>, pattern = "^(delete|keep)$")]
    on_completion: Option<String>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// Accepted and kept with the run; Bulkhead's agents are configured
    /// on the server.
    #[schema(value_type = Option<Object>)]
    config: Option<Value>,
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message)
}

fn choice<'a>(body: &'a Value, key: &str, allowed: &[&'a str], default: &'a str) -> Result<&'a str, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(s.as_str()),
        Some(_) => Err(invalid(format!("`{key}` must be one of {}", allowed.join(", ")))),
    }
}

/// A decision from what a client sends as `command.resume`.
fn decision_of(resume: &Value) -> Result<(bool, Option<String>), ApiError> {
    let unknown = || {
        invalid("`command.resume` must approve or reject the call: {\"decisions\": [{\"type\": \"approve\"}]}, {\"type\": \"reject\", \"message\": …}, true or false")
    };
    match resume {
        Value::Bool(approve) => Ok((*approve, None)),
        Value::String(word) => match word.to_ascii_lowercase().as_str() {
            "approve" | "accept" | "yes" | "y" => Ok((true, None)),
            "reject" | "deny" | "ignore" | "no" | "n" => Ok((false, None)),
            _ => Err(unknown()),
        },
        Value::Array(items) => items.first().map_or_else(|| Err(unknown()), decision_of),
        Value::Object(map) => {
            if let Some(decisions) = map.get("decisions") {
                return decision_of(decisions);
            }
            // A map of interrupt id → answer (LangGraph's resume_map).
            if !map.contains_key("type") && map.len() == 1 {
                return decision_of(map.values().next().expect("one"));
            }
            let comment = ["message", "args", "comment"]
                .iter()
                .find_map(|k| map.get(*k))
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
            match map.get("type").and_then(Value::as_str) {
                Some("approve" | "accept") => Ok((true, None)),
                Some("reject" | "deny" | "ignore" | "response") => Ok((false, comment)),
                Some("edit") => Err(invalid(
                    "editing a call's arguments is not supported: approve or reject it",
                )),
                _ => Err(unknown()),
            }
        }
        _ => Err(unknown()),
    }
}

/// A run made, and how its client follows it.
struct Made {
    run: Value,
    run_id: String,
    thread_id: String,
    agent: String,
    follow: Follow,
}

/// Makes a run: on thread `thread` (`None`: stateless), from `body`.
async fn make_run(
    state: &AppState,
    caller: &Caller,
    thread: Option<&str>,
    body: &Value,
) -> Result<Result<Made, Response>, ApiError> {
    let assistant = match body.get("assistant_id") {
        Some(Value::String(id)) => find_assistant(state, id)?,
        _ => return Err(invalid("`assistant_id` is required: an assistant's UUID or graph id")),
    };
    for unsupported in ["interrupt_before", "interrupt_after", "checkpoint", "checkpoint_id", "webhook", "feedback_keys"] {
        if body.get(unsupported).is_some_and(|v| !v.is_null() && v != &json!([])) {
            return Err(invalid(format!("`{unsupported}` is not supported by Bulkhead")));
        }
    }
    if body.get("after_seconds").and_then(Value::as_f64).is_some_and(|s| s > 0.0) {
        return Err(invalid("`after_seconds` (scheduled runs) is not supported by Bulkhead"));
    }
    let modes = Modes::parse(body.get("stream_mode"))?;
    let resumable = match body.get("stream_resumable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream_resumable` must be true or false")),
    };
    let strategy = choice(body, "multitask_strategy", &["reject", "enqueue", "interrupt", "rollback"], "enqueue")?;
    let stateless = thread.is_none();
    let if_not_exists = choice(body, "if_not_exists", &["reject", "create"], if stateless { "create" } else { "reject" })?;
    let on_disconnect = choice(body, "on_disconnect", &["cancel", "continue"], "continue")?;
    let on_completion = choice(body, "on_completion", &["delete", "keep"], if stateless { "delete" } else { "keep" })?;
    for key in ["metadata", "config", "context"] {
        if body.get(key).is_some_and(|v| !v.is_null() && !v.is_object()) {
            return Err(invalid(format!("`{key}` must be an object")));
        }
    }
    let resume = match body.get("command") {
        None | Some(Value::Null) => None,
        Some(Value::Object(command)) => {
            if command.keys().any(|k| k != "resume") {
                return Err(invalid("only `command.resume` is supported by Bulkhead (not goto or update)"));
            }
            command.get("resume").cloned()
        }
        Some(_) => return Err(invalid("`command` must be an object")),
    };
    let input = match (&resume, body.get("input")) {
        (Some(_), None | Some(Value::Null)) => None,
        (Some(_), Some(_)) => return Err(invalid("send either `input` or `command.resume`, not both")),
        (None, Some(input)) if input.is_object() => Some(super::messages::read_input(input)?),
        (None, _) => return Err(invalid("`input` is required: {\"messages\": [...]}, the new human message last")),
    };
    let decision = resume.as_ref().map(decision_of).transpose()?;
    if decision.is_some() && stateless {
        return Err(ApiError::bad_request("invalid_request", "You must provide a thread_id when resuming."));
    }
    let temporary = stateless && on_completion == "delete";

    // The thread.
    let store = state.engine.store();
    let now = bulkhead_agent::now_ms();
    let thread_id = match thread {
        Some(id) => uuid_of("thread", id)?,
        None => bulkhead_agent::new_id(),
    };
    let mut row = match store.thread(&thread_id).await? {
        Some(row) if caller.reaches(row.owner.as_deref()) => row,
        Some(_) => return Err(thread_not_found(&thread_id)),
        None if if_not_exists == "create" => {
            store.create_thread(&thread_id, caller.tenant(), None, now).await?;
            store.thread(&thread_id).await?.ok_or_else(|| thread_not_found(&thread_id))?
        }
        None => return Err(thread_not_found(&thread_id)),
    };
    if !row.agent.is_empty() && row.agent != assistant.id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_agent",
            format!(
                "Thread {thread_id} belongs to assistant {:?} ({}); in Bulkhead a thread runs one assistant for life",
                row.agent,
                assistant_id(&row.agent)
            ),
        ));
    }
    let mut metadata = object(row.metadata.as_deref());
    if metadata.get("graph_id").is_none() {
        metadata["graph_id"] = json!(assistant.id);
        metadata["assistant_id"] = json!(assistant_id(&assistant.id));
        store.set_thread_metadata(&thread_id, &metadata.to_string(), now).await?;
        row.metadata = Some(metadata.to_string());
    }
    let kwargs = json!({
        "input": body.get("input"),
        "command": body.get("command"),
        "stream_mode": body.get("stream_mode").cloned().unwrap_or_else(|| json!(["values"])),
        "stream_resumable": resumable,
        "multitask_strategy": strategy,
        "on_disconnect": on_disconnect,
        "on_completion": on_completion,
        "metadata": body.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "config": body.get("config").cloned().unwrap_or_else(|| json!({})),
        "context": body.get("context").cloned().unwrap_or_else(|| json!({})),
        "temporary": temporary,
    });
    let account = match state.door.admit_run(caller).await {
        Ok(account) => account,
        Err(refused) => return Ok(Err(refused)),
    };
    let mut follow = Follow {
        modes,
        resumable,
        metadata: true,
        after: None,
        cancel_on_disconnect: on_disconnect == "cancel",
        temporary,
    };
    let run_id = if let Some((approve, comment)) = decision {
        let (paused, call) = paused_run(state, &row).await?;
        follow.after = Some((store.last_event_seq(&paused).await?, u32::MAX));
        let decision = Decision {
            audit_id: String::new(),
            approve,
            decision: if approve { "approve" } else { "deny" },
            decided_by: decided_by(caller),
            comment,
        };
        state
            .engine
            .decide(&paused, &call, decision, true, account)
            .await
            .map_err(crate::routes::approvals::decide_error)?;
        paused
    } else {
        let input = input.expect("read above");
        if !input.history.is_empty() && (row.last_run_status.is_some() || row.queued > 0) {
            return Err(invalid(
                "this thread has a conversation already: send only the new human message in `input.messages`",
            ));
        }
        if matches!(strategy, "interrupt" | "rollback") {
            let action = if strategy == "rollback" { CancelAction::Rollback } else { CancelAction::Interrupt };
            super::threads::cancel_all(state, caller, &row, action).await?;
        }
        let run_id = bulkhead_agent::new_id();
        state
            .engine
            .enqueue(QueueRequest {
                run_id: run_id.clone(),
                session_id: thread_id.clone(),
                owner: caller.tenant().map(str::to_string),
                agent: assistant.id.clone(),
                message: input.message,
                history: input.history,
                kwargs: kwargs.to_string(),
                exclusive: strategy == "reject",
                account,
            })
            .await
            .map_err(|e| match e {
                EnqueueError::Busy => ApiError::new(
                    StatusCode::CONFLICT,
                    "session_busy",
                    "Thread is already running a task. Wait for it to finish or choose a different multitask strategy.",
                ),
                EnqueueError::ShuttingDown => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the server is shutting down; retry on another instance",
                ),
                EnqueueError::Store(e) => ApiError::internal(&e),
            })?;
        run_id
    };
    let run = read_run(state, &thread_id, &assistant.id, &run_id)
        .await?
        .unwrap_or_else(|| run_json(&run_id, &thread_id, &assistant.id, now, now, "pending", &kwargs));
    Ok(Ok(Made {
        run,
        run_id,
        thread_id,
        agent: assistant.id.clone(),
        follow,
    }))
}

/// The thread's run paused for a person, and the call it waits on.
async fn paused_run(state: &AppState, row: &ThreadRow) -> Result<(String, String), ApiError> {
    let nothing = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_awaiting_approval",
            format!("Thread {} waits on no interrupt: there is nothing to resume", row.id),
        )
    };
    let run_id = row.active_run_id.clone().ok_or_else(nothing)?;
    let call = state
        .engine
        .store()
        .awaiting_approval(&run_id)
        .await?
        .ok_or_else(nothing)?;
    Ok((run_id, call.call_id))
}

/// A run of the thread as LangGraph shows it, queued or started.
async fn read_run(
    state: &AppState,
    thread_id: &str,
    agent: &str,
    run_id: &str,
) -> Result<Option<Value>, ApiError> {
    let store = state.engine.store();
    if let Some(run) = store.run(run_id).await? {
        if run.session_id != thread_id {
            return Ok(None);
        }
        let kwargs = object(run.kwargs.as_deref());
        return Ok(Some(run_json(
            &run.id,
            thread_id,
            agent,
            run.created_at,
            run.finished_at.unwrap_or(run.created_at),
            run_status(&run.status),
            &kwargs,
        )));
    }
    Ok(store
        .queued_run(run_id)
        .await?
        .filter(|q| q.session_id == thread_id)
        .map(|q| {
            run_json(&q.id, thread_id, &q.agent, q.created_at, q.updated_at, run_status(&q.status), &object(Some(&q.kwargs)))
        }))
}

fn location(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = header::HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

async fn body_of(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    optional_body(state, headers, body).await
}

/// Create a background run
///
/// Queued at once: it runs when the thread is free, whether or not the
/// client stays.
#[utoipa::path(post, path = "/threads/{thread_id}/runs", tag = "langgraph", params(ThreadPath),
    request_body(content = RunCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "The run (`Content-Location` names it)", body = Object),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 404, description = "No such thread (`if_not_exists: reject`) or assistant", body = DetailBody),
        (status = 409, description = "The thread is busy (`multitask_strategy: reject`), runs another assistant, or waits on no interrupt to resume", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
        (status = 503, description = "The server is shutting down", body = DetailBody),
    ),
)]
pub async fn create_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(thread): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_of(&state, &headers, body).await?;
    background(state, caller, Some(thread), body).await
}

async fn background(state: AppState, caller: Caller, thread: Option<String>, body: Value) -> Result<Response, ApiError> {
    let made = match make_run(&state, &caller, thread.as_deref(), &body).await? {
        Ok(made) => made,
        Err(refused) => return Ok(refused),
    };
    if made.follow.temporary {
        let (state, run_id, thread_id) = (state.clone(), made.run_id.clone(), made.thread_id.clone());
        tokio::spawn(async move { stream::remove_when_done(&state, &run_id, &thread_id).await });
    }
    let mut response = Json(made.run).into_response();
    let content = if thread.is_some() {
        format!("/threads/{}/runs/{}", made.thread_id, made.run_id)
    } else {
        format!("/runs/{}", made.run_id)
    };
    location(response.headers_mut(), header::CONTENT_LOCATION, &content);
    Ok(response)
}

/// Create a stateless background run
#[utoipa::path(post, path = "/runs", tag = "langgraph",
    request_body(content = RunCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "The run, on a thread of its own (deleted when it ends, unless `on_completion: keep`)", body = Object),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 404, description = "No such assistant", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
        (status = 503, description = "The server is shutting down", body = DetailBody),
    ),
)]
pub async fn create_stateless_run(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_of(&state, &headers, body).await?;
    background(state, caller, None, body).await
}

async fn wait(state: AppState, caller: Caller, thread: Option<String>, body: Value) -> Result<Response, ApiError> {
    let made = match make_run(&state, &caller, thread.as_deref(), &body).await? {
        Ok(made) => made,
        Err(refused) => return Ok(refused),
    };
    let run_path = format!("/threads/{}/runs/{}", made.thread_id, made.run_id);
    Ok(stream::wait_body(
        state,
        made.run_id,
        made.thread_id,
        made.follow.cancel_on_disconnect,
        made.follow.temporary,
        format!("{run_path}/join"),
        run_path,
    ))
}

/// Create a run and wait for its output
///
/// Answers the thread's values once the run has ended (`__interrupt__`
/// when a call waits for a person, `__error__` when it failed); a newline
/// every five seconds until then keeps the connection open.
#[utoipa::path(post, path = "/threads/{thread_id}/runs/wait", tag = "langgraph", params(ThreadPath),
    request_body(content = RunCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "The thread's values after the run", body = Object),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 404, description = "No such thread or assistant", body = DetailBody),
        (status = 409, description = "The thread is busy (`reject`), runs another assistant, or waits on no interrupt", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
        (status = 503, description = "The server is shutting down", body = DetailBody),
    ),
)]
pub async fn wait_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(thread): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_of(&state, &headers, body).await?;
    wait(state, caller, Some(thread), body).await
}

/// Create a stateless run and wait for its output
#[utoipa::path(post, path = "/runs/wait", tag = "langgraph",
    request_body(content = RunCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "The values after the run", body = Object),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 404, description = "No such assistant", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
        (status = 503, description = "The server is shutting down", body = DetailBody),
    ),
)]
pub async fn wait_stateless_run(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_of(&state, &headers, body).await?;
    wait(state, caller, None, body).await
}

async fn streamed(state: AppState, caller: Caller, thread: Option<String>, body: Value) -> Result<Response, ApiError> {
    if !state.config.enable_streaming {
        return Err(ApiError::bad_request(
            "streaming_disabled",
            "streaming is turned off on this server (ENABLE_STREAMING=false); use runs/wait",
        ));
    }
    let made = match make_run(&state, &caller, thread.as_deref(), &body).await? {
        Ok(made) => made,
        Err(refused) => return Ok(refused),
    };
    let run_path = format!("/threads/{}/runs/{}", made.thread_id, made.run_id);
    Ok(stream::sse(
        state,
        made.run_id,
        made.thread_id,
        made.agent,
        made.follow,
        format!("{run_path}/stream"),
        run_path,
    ))
}

/// Create a run and stream its output
///
/// Server-Sent Events: `metadata` (`run_id`, `attempt`) first, then the
/// parts of each asked `stream_mode`, `error` if it fails; the stream ends
/// when the run has ended or waits for a person. `Location` is where to
/// join it again (with `Last-Event-ID` when `stream_resumable`).
#[utoipa::path(post, path = "/threads/{thread_id}/runs/stream", tag = "langgraph", params(ThreadPath),
    request_body(content = RunCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "The run's stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "The body is not JSON, or streaming is off", body = DetailBody),
        (status = 404, description = "No such thread or assistant", body = DetailBody),
        (status = 409, description = "The thread is busy (`reject`), runs another assistant, or waits on no interrupt", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
        (status = 503, description = "The server is shutting down", body = DetailBody),
    ),
)]
pub async fn stream_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(thread): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_of(&state, &headers, body).await?;
    streamed(state, caller, Some(thread), body).await
}

/// Create a stateless run and stream its output
#[utoipa::path(post, path = "/runs/stream", tag = "langgraph",
    request_body(content = RunCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "The run's stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "The body is not JSON, or streaming is off", body = DetailBody),
        (status = 404, description = "No such assistant", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field is wrong", body = DetailBody),
        (status = 503, description = "The server is shutting down", body = DetailBody),
    ),
)]
pub async fn stream_stateless_run(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_of(&state, &headers, body).await?;
    streamed(state, caller, None, body).await
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
#[allow(dead_code)]
pub struct ListQuery {
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    #[param(minimum = 0)]
    offset: Option<u32>,
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
            Some(v) => v.parse().map_err(|_| invalid(format!("`{key}` must be a number"))),
        }
    };
    let limit = number("limit", 10)?;
    let offset = number("offset", 0)?;
    let status = query_values(query.as_deref(), "status").into_iter().next();
    let store = state.engine.store();
    let agent = row.agent.clone();
    let mut runs: Vec<(i64, Value)> = store
        .runs(&row.id)
        .await?
        .into_iter()
        .map(|run| {
            let kwargs = object(run.kwargs.as_deref());
            (run.created_at, run_json(&run.id, &row.id, &agent, run.created_at, run.finished_at.unwrap_or(run.created_at), run_status(&run.status), &kwargs))
        })
        .collect();
    runs.extend(store.queued_runs(&row.id).await?.into_iter().map(|q| {
        (q.created_at, run_json(&q.id, &row.id, &q.agent, q.created_at, q.updated_at, run_status(&q.status), &object(Some(&q.kwargs))))
    }));
    runs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1["run_id"].as_str().cmp(&a.1["run_id"].as_str())));
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
pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(owned_thread_run(&state, &caller, &thread, &run).await?.2))
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
pub async fn delete_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((thread, run)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (_, run_id, _) = owned_thread_run(&state, &caller, &thread, &run).await?;
    if state.engine.store().delete_run(&run_id, false).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::CONFLICT, "run_in_flight", format!("Run {run_id} is in flight: cancel it first")))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
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
#[allow(dead_code)]
pub struct JoinStreamQuery {
    /// The modes to send (`values` when none is named; repeat it, or send a
    /// JSON list, for several).
    #[param(value_type = Option<String>)]
    stream_mode: Option<String>,
    cancel_on_disconnect: Option<bool>,
}

/// Join a run's stream
///
/// From the start, or after `Last-Event-ID` (a resumable run's part id).
#[utoipa::path(get, path = "/threads/{thread_id}/runs/{run_id}/stream", tag = "langgraph", params(ThreadRunPath, JoinStreamQuery),
    responses(
        (status = 200, description = "The run's stream", content_type = "text/event-stream", body = String),
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
        return Err(ApiError::bad_request("streaming_disabled", "streaming is turned off on this server (ENABLE_STREAMING=false)"));
    }
    let (row, run_id, run) = owned_thread_run(&state, &caller, &thread, &run).await?;
    let asked = query_values(query.as_deref(), "stream_mode");
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
        (status = 409, description = "The run has ended already, or runs on another replica", body = DetailBody),
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
    let action = match query_values(query.as_deref(), "action").first().map(String::as_str) {
        None | Some("interrupt") => CancelAction::Interrupt,
        Some("rollback") => CancelAction::Rollback,
        Some(_) => return Err(invalid("`action` must be interrupt or rollback")),
    };
    let outcome = state
        .engine
        .cancel(&run_id, action, &decided_by(&caller), "cancelled by a client")
        .await?;
    match outcome {
        CancelOutcome::Cancelled => {}
        CancelOutcome::NotFound => {
            return Err(ApiError::not_found("run_not_found", format!("Run {run_id} not found")));
        }
        CancelOutcome::Finished => {
            return Err(ApiError::new(StatusCode::CONFLICT, "run_ended", format!("Run {run_id} has ended already: there is nothing to cancel")));
        }
        CancelOutcome::Elsewhere => {
            return Err(ApiError::new(StatusCode::CONFLICT, "run_elsewhere", format!("Run {run_id} executes on another replica, which alone can cancel it")));
        }
    }
    if query_flag(query.as_deref(), "wait") {
        let values = stream::final_values(&state, &run_id, &row.id).await;
        let mut response = Json(values).into_response();
        location(response.headers_mut(), header::CONTENT_LOCATION, &format!("/threads/{}/runs/{run_id}", row.id));
        return Ok(response);
    }
    Ok(StatusCode::ACCEPTED.into_response())
}
