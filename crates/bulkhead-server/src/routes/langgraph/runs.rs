//! Making runs: on a thread (background, waited for, streamed) or
//! stateless (a thread of their own, deleted after); `run_control.rs` is
//! what is done with them once made. Every run goes through the engine's run queue, so a thread
//! runs one at a time in the order asked (`multitask_strategy: enqueue`,
//! the default), or refuses (`reject`), or first cancels what it holds
//! (`interrupt`, `rollback`). A run that resumes an interrupt (`command:
//! {"resume": …}`) is the paused run going on: it keeps its id.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::{CancelAction, Decision, EnqueueError, QueueRequest};
use bulkhead_store::ThreadRow;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::assistants::optional_body;
use super::invalid;
use super::stream::{self, Follow, Modes};
use super::{
    DetailBody, ThreadPath, assistant_id, decided_by, find_assistant, object, run_json, run_status,
    thread_not_found, uuid_of,
};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;

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

fn choice<'a>(
    body: &'a Value,
    key: &str,
    allowed: &[&'a str],
    default: &'a str,
) -> Result<&'a str, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(s.as_str()),
        Some(_) => Err(invalid(format!(
            "`{key}` must be one of {}",
            allowed.join(", ")
        ))),
    }
}

/// A decision from what a client sends as `command.resume`.
fn decision_of(resume: &Value) -> Result<(bool, Option<String>), ApiError> {
    let unknown = || {
        invalid(
            "`command.resume` must approve or reject the call: {\"decisions\": [{\"type\": \"approve\"}]}, {\"type\": \"reject\", \"message\": …}, true or false",
        )
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
        _ => {
            return Err(invalid(
                "`assistant_id` is required: an assistant's UUID or graph id",
            ));
        }
    };
    for unsupported in [
        "interrupt_before",
        "interrupt_after",
        "webhook",
        "feedback_keys",
    ] {
        if body
            .get(unsupported)
            .is_some_and(|v| !v.is_null() && v != &json!([]))
        {
            return Err(invalid(format!(
                "`{unsupported}` is not supported by Bulkhead"
            )));
        }
    }
    if body
        .get("after_seconds")
        .and_then(Value::as_f64)
        .is_some_and(|s| s > 0.0)
    {
        return Err(invalid(
            "`after_seconds` (scheduled runs) is not supported by Bulkhead",
        ));
    }
    let modes = Modes::parse(body.get("stream_mode"))?;
    let resumable = match body.get("stream_resumable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream_resumable` must be true or false")),
    };
    let strategy = choice(
        body,
        "multitask_strategy",
        &["reject", "enqueue", "interrupt", "rollback"],
        "enqueue",
    )?;
    let stateless = thread.is_none();
    let if_not_exists = choice(
        body,
        "if_not_exists",
        &["reject", "create"],
        if stateless { "create" } else { "reject" },
    )?;
    let on_disconnect = choice(body, "on_disconnect", &["cancel", "continue"], "continue")?;
    let on_completion = choice(
        body,
        "on_completion",
        &["delete", "keep"],
        if stateless { "delete" } else { "keep" },
    )?;
    for key in ["metadata", "config", "context"] {
        if body
            .get(key)
            .is_some_and(|v| !v.is_null() && !v.is_object())
        {
            return Err(invalid(format!("`{key}` must be an object")));
        }
    }
    // `command.resume` decides the call the thread waits on; `goto:
    // "__end__"` ends the paused run without it (Agent Chat UI's "Mark as
    // resolved").
    let (resume, resolve) = match body.get("command") {
        None | Some(Value::Null) => (None, false),
        Some(Value::Object(command)) => {
            if command.keys().any(|k| k != "resume" && k != "goto") {
                return Err(invalid(
                    "only `command.resume` and `command.goto: \"__end__\"` are supported by Bulkhead (not update)",
                ));
            }
            let resolve = match command.get("goto") {
                None | Some(Value::Null) => false,
                Some(Value::String(to)) if to == "__end__" => true,
                Some(_) => {
                    return Err(invalid(
                        "`command.goto` can only be \"__end__\" (end the paused run without its call)",
                    ));
                }
            };
            if resolve && command.get("resume").is_some_and(|r| !r.is_null()) {
                return Err(invalid("send `command.resume` or `command.goto`, not both"));
            }
            (
                command.get("resume").cloned().filter(|r| !r.is_null()),
                resolve,
            )
        }
        Some(_) => return Err(invalid("`command` must be an object")),
    };
    // A command with an empty input (`{}`, as Agent Chat UI sends it)
    // is the command; a new message beside it is ambiguous.
    let empty_input = |input: &Value| {
        input.is_null()
            || input.as_object().is_some_and(|i| {
                i.is_empty()
                    || i.get("messages")
                        .is_some_and(|m| m.as_array().is_some_and(Vec::is_empty))
            })
    };
    let commanded = resume.is_some() || resolve;
    // Checked after the checkpoint: a run from an earlier one (a fork, such
    // as a regenerate, which sends no input) is refused for that first.
    let input = match (commanded, body.get("input")) {
        (true, None) => Ok(None),
        (true, Some(input)) if empty_input(input) => Ok(None),
        (true, Some(_)) => Err(invalid("send either `input` or a `command`, not both")),
        (false, Some(input)) if input.is_object() => super::messages::read_input(input).map(Some),
        (false, _) => Err(invalid(
            "`input` is required: {\"messages\": [...]}, the new human message last",
        )),
    };
    // Without a checkpoint a bad input is refused now, before a thread is
    // made for it.
    let names_checkpoint = ["checkpoint", "checkpoint_id"]
        .iter()
        .any(|key| body.get(*key).is_some_and(|v| !v.is_null()));
    let input = if names_checkpoint { input } else { Ok(input?) };
    let decision = resume.as_ref().map(decision_of).transpose()?;
    if commanded && stateless {
        return Err(ApiError::bad_request(
            "invalid_request",
            "You must provide a thread_id when resuming.",
        ));
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
            store
                .create_thread(&thread_id, caller.tenant(), None, now)
                .await?;
            store
                .thread(&thread_id)
                .await?
                .ok_or_else(|| thread_not_found(&thread_id))?
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
    check_checkpoint(state, &row, body).await?;
    let input = input?;
    let mut metadata = object(row.metadata.as_deref());
    if metadata.get("graph_id").is_none() {
        metadata["graph_id"] = json!(assistant.id);
        metadata["assistant_id"] = json!(assistant_id(&assistant.id));
        store
            .set_thread_metadata(&thread_id, &metadata.to_string(), now)
            .await?;
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
    let run_id = if resolve {
        let (paused, _) = paused_run(state, &row).await?;
        follow.after = Some((store.last_event_seq(&paused).await?, u32::MAX));
        state
            .engine
            .cancel(
                &paused,
                CancelAction::Interrupt,
                &decided_by(caller),
                "a person marked the interrupt resolved",
            )
            .await?;
        paused
    } else if let Some((approve, comment)) = decision {
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
            let action = if strategy == "rollback" {
                CancelAction::Rollback
            } else {
                CancelAction::Interrupt
            };
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
                EnqueueError::Store(e) => ApiError::from(e),
            })?;
        run_id
    };
    // As made: it may have started already, but it was made pending.
    let run = run_json(
        &run_id,
        &thread_id,
        &assistant.id,
        now,
        now,
        "pending",
        &kwargs,
    );
    Ok(Ok(Made {
        run,
        run_id,
        thread_id,
        agent: assistant.id.clone(),
        follow,
    }))
}

/// A run asked to start from a checkpoint (`checkpoint`, `checkpoint_id`):
/// only the thread's latest, which is where every run starts (clients
/// that keep the thread's history, as Agent Chat UI does, send it with
/// each run); an earlier one would fork the thread, which Bulkhead does not.
async fn check_checkpoint(state: &AppState, row: &ThreadRow, body: &Value) -> Result<(), ApiError> {
    let asked = match (body.get("checkpoint"), body.get("checkpoint_id")) {
        (Some(Value::Object(c)), _) if c.get("checkpoint_id").is_some_and(|id| !id.is_null()) => c
            .get("checkpoint_id")
            .and_then(Value::as_str)
            .map(str::to_string),
        (Some(Value::Object(_)) | None | Some(Value::Null), None | Some(Value::Null)) => {
            return Ok(());
        }
        (_, Some(Value::String(id))) => Some(id.clone()),
        _ => None,
    };
    let Some(asked) = asked else {
        return Err(invalid(
            "`checkpoint` must be a checkpoint (`checkpoint_id`), `checkpoint_id` a string",
        ));
    };
    let runs = state.engine.store().runs(&row.id).await?;
    let latest = runs.last().map_or(row.id.as_str(), |run| run.id.as_str());
    if asked == latest {
        Ok(())
    } else {
        Err(invalid(format!(
            "runs from an earlier checkpoint (a fork: regenerate, edit) are not supported by Bulkhead; the thread's latest checkpoint is {latest}"
        )))
    }
}

/// The thread's run paused for a person, and the call it waits on.
async fn paused_run(state: &AppState, row: &ThreadRow) -> Result<(String, String), ApiError> {
    let nothing = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_awaiting_approval",
            format!(
                "Thread {} waits on no interrupt: there is nothing to resume",
                row.id
            ),
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
pub(super) async fn read_run(
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
            run_json(
                &q.id,
                thread_id,
                &q.agent,
                q.created_at,
                q.updated_at,
                run_status(&q.status),
                &object(Some(&q.kwargs)),
            )
        }))
}

pub(super) fn location(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
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

async fn background(
    state: AppState,
    caller: Caller,
    thread: Option<String>,
    body: Value,
) -> Result<Response, ApiError> {
    let made = match make_run(&state, &caller, thread.as_deref(), &body).await? {
        Ok(made) => made,
        Err(refused) => return Ok(refused),
    };
    if made.follow.temporary {
        let (state, run_id, thread_id) =
            (state.clone(), made.run_id.clone(), made.thread_id.clone());
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

async fn wait(
    state: AppState,
    caller: Caller,
    thread: Option<String>,
    body: Value,
) -> Result<Response, ApiError> {
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

async fn streamed(
    state: AppState,
    caller: Caller,
    thread: Option<String>,
    body: Value,
) -> Result<Response, ApiError> {
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
        (status = 200, description = "The run's stream", content_type = "text/event-stream", body = stream::LangGraphEvent),
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
        (status = 200, description = "The run's stream", content_type = "text/event-stream", body = stream::LangGraphEvent),
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
