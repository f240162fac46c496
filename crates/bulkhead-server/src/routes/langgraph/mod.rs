//! LangGraph's Agent Server API, the protocol of `langgraph-sdk` (Python
//! and JS) and Agent Chat UI, over the same engine and door as the rest:
//! assistants are the agents, threads are sessions, runs go through the
//! engine's run queue. `assistants.rs`, `threads.rs` (threads, their state
//! and history), `runs.rs` (making runs, reading, cancelling, joining
//! them), `stream.rs` (a run's events as LangGraph's stream parts, and the
//! final values a waiting client gets), `messages.rs` (LangChain's message
//! dicts), `errors.rs` (the `{"detail"}` dialect).

pub mod assistants;
mod errors;
mod messages;
pub mod run_control;
pub mod runs;
mod stream;
pub mod threads;
mod translate;

use std::collections::HashMap;
use std::sync::Arc;

use bulkhead_agent::Agent;
use bulkhead_store::{Run, ThreadRow};
use serde_json::{Map, Value, json};

pub(crate) use errors::{DetailBody, langgraph_errors};

use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;
use crate::routes::timestamp;
use messages::Usage;

/// A thread's id in a path.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ThreadPath {
    /// The thread's UUID.
    #[param(format = Uuid)]
    thread_id: String,
}

/// The namespace of assistants' UUIDs: an assistant's id is the same on
/// every server that runs an agent of that id.
const ASSISTANTS: uuid::Uuid = uuid::Uuid::from_u128(0x2f6c_1a9e_5b7d_4e31_9c04_8a6f_d3e2_b715);

pub(crate) fn assistant_id(agent: &str) -> String {
    uuid::Uuid::new_v5(&ASSISTANTS, agent.as_bytes()).to_string()
}

/// The agent an assistant id names: its UUID or its graph id (the agent's).
pub(crate) fn find_assistant(state: &AppState, id: &str) -> Result<Arc<Agent>, ApiError> {
    let agents = state.engine.agents();
    agents
        .get(id)
        .or_else(|| agents.iter().find(|agent| assistant_id(&agent.id) == id))
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(
                "agent_not_found",
                format!(
                    "Assistant {id:?} not found: use an assistant_id from POST /assistants/search, or a graph id ({})",
                    agents.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )
        })
}

/// A field of a request that is wrong, as every LangGraph route says it.
pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message)
}

/// A UUID from a path or body, or 422 naming what it should have been.
pub(crate) fn uuid_of(what: &str, id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            ApiError::unprocessable("invalid_id", format!("Invalid {what} ID: must be a UUID"))
        })
}

pub(crate) fn thread_not_found(id: &str) -> ApiError {
    ApiError::not_found("session_not_found", format!("Thread {id} not found"))
}

/// The thread, if the caller reaches it.
pub(crate) async fn owned_thread(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<ThreadRow, ApiError> {
    let id = uuid_of("thread", id)?;
    state
        .engine
        .store()
        .thread(&id)
        .await?
        .filter(|row| caller.reaches(row.owner.as_deref()))
        .ok_or_else(|| thread_not_found(&id))
}

/// `idle`, `busy` (a run in flight or queued), `interrupted` (a tool call
/// waits for a person), `error` (its latest run failed).
pub(crate) fn thread_status(row: &ThreadRow) -> &'static str {
    let last = row.last_run_status.as_deref();
    if last == Some("awaiting_approval") {
        "interrupted"
    } else if row.active_run_id.is_some() || row.queued > 0 {
        "busy"
    } else if last == Some("failed") {
        "error"
    } else {
        "idle"
    }
}

/// A Bulkhead run status in LangGraph's words.
pub(crate) fn run_status(status: &str) -> &'static str {
    match status {
        "pending" => "pending",
        "running" => "running",
        "completed" => "success",
        "failed" => "error",
        _ => "interrupted",
    }
}

pub(crate) fn object(text: Option<&str>) -> Value {
    text.and_then(|t| serde_json::from_str::<Value>(t).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// Each finished run's token usage, by run id.
pub(crate) fn usage_of(runs: &[Run]) -> HashMap<String, Usage> {
    runs.iter()
        .filter_map(|run| {
            Some((
                run.id.clone(),
                Usage {
                    input: run.input_tokens?,
                    output: run.output_tokens?,
                },
            ))
        })
        .collect()
}

/// The thread's values: its whole conversation.
pub(crate) async fn thread_values(state: &AppState, session_id: &str) -> Result<Value, ApiError> {
    let store = state.engine.store();
    let stored = store.messages(session_id).await?;
    let runs = store.runs(session_id).await?;
    Ok(json!({ "messages": messages::conversation(&stored, &usage_of(&runs)) }))
}

/// How a call waiting for a person shows in LangGraph: an interrupt whose
/// value is a human-in-the-loop request (LangChain's `action_requests`
/// and `review_configs`, which Agent Chat UI renders), its id the call's.
pub(crate) fn interrupt(call_id: &str, tool: &str, arguments: &str) -> Value {
    let args = messages::tool_call(call_id, tool, arguments)["args"].clone();
    json!({
        "value": {
            "action_requests": [{
                "name": tool,
                "args": args,
                "description": format!("The agent's approval policy asks a person before `{tool}` runs. Approve to run it, reject to tell the model it was denied."),
            }],
            "review_configs": [{
                "action_name": tool,
                "allowed_decisions": ["approve", "reject"],
            }],
        },
        "id": call_id,
    })
}

/// The interrupts a thread waits on: the call its paused run waits on.
pub(crate) async fn thread_interrupts(
    state: &AppState,
    row: &ThreadRow,
) -> Result<Vec<Value>, ApiError> {
    let Some(run_id) = row.active_run_id.as_deref() else {
        return Ok(Vec::new());
    };
    Ok(state
        .engine
        .store()
        .awaiting_approval(run_id)
        .await?
        .map(|call| interrupt(&call.call_id, &call.tool, &call.arguments))
        .into_iter()
        .collect())
}

pub(crate) fn thread_json(row: &ThreadRow, values: Option<Value>, interrupts: &[Value]) -> Value {
    let interrupts: Map<String, Value> = interrupts
        .iter()
        .map(|i| (i["id"].as_str().unwrap_or_default().to_string(), json!([i])))
        .collect();
    json!({
        "thread_id": row.id,
        "created_at": timestamp(row.created_at),
        "updated_at": timestamp(row.updated_at),
        "state_updated_at": timestamp(row.updated_at),
        "metadata": object(row.metadata.as_deref()),
        "status": thread_status(row),
        "config": {},
        "values": values.unwrap_or(Value::Null),
        "interrupts": interrupts,
        "error": null,
    })
}

/// A run as LangGraph shows it. `kwargs` is what the client asked for (for
/// a run made by Bulkhead's own API, nothing).
pub(crate) fn run_json(
    run_id: &str,
    thread_id: &str,
    agent: &str,
    created_at: i64,
    updated_at: i64,
    status: &str,
    kwargs: &Value,
) -> Value {
    json!({
        "run_id": run_id,
        "thread_id": thread_id,
        "assistant_id": assistant_id(agent),
        "created_at": timestamp(created_at),
        "updated_at": timestamp(updated_at),
        "status": status,
        "metadata": kwargs.get("metadata").cloned().filter(Value::is_object).unwrap_or_else(|| json!({})),
        "kwargs": kwargs,
        "multitask_strategy": kwargs.get("multitask_strategy").cloned().unwrap_or_else(|| json!("enqueue")),
    })
}

/// Who decides a call when a caller resumes or cancels: its key's id.
pub(crate) fn decided_by(caller: &Caller) -> String {
    match caller {
        Caller::Anonymous => "anonymous".into(),
        Caller::Key(key) => key.id.clone(),
    }
}
