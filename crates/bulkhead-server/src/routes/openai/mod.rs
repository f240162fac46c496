//! The OpenAI-compatible face (`/v1/…`): every agent is a model that any
//! OpenAI client can call. A protocol layer only: requests become runs of
//! the same engine `/agent` uses, through the same door, and runs become
//! chat completions or responses. What the client sees is the agent's
//! answer; its tool calls stay inside, on the run's record as always.
//!
//! Shapes follow the `openai` Python package, the protocol's reference
//! client, which the test suite drives (`crates/bulkhead/tests/openai.rs`).

pub(crate) mod chat;
mod errors;
pub(crate) mod messages;
pub(crate) mod models;
pub(crate) mod responses;
mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bulkhead_agent::{
    PendingApproval, RunAccount, RunHandle, RunOutcome, StartRun, named_session_id,
};
use bulkhead_store::NewMessage;
use serde_json::{Map, Value};

use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;

pub use errors::openai_errors;
pub(crate) use errors::{OpenAiErrorBody, is_openai};

/// The header that names a Bulkhead session, asked and answered.
pub const SESSION_HEADER: &str = "x-bulkhead-session-id";
/// Open WebUI's chat id (sent with `ENABLE_FORWARD_USER_INFO_HEADERS`).
pub const OPEN_WEBUI_CHAT_HEADER: &str = "x-openwebui-chat-id";
/// The run that answered.
pub const RUN_HEADER: &str = "x-bulkhead-run-id";
/// The longest conversation name taken (OpenAI's metadata values are at
/// most 512 characters).
const MAX_NAME: usize = 512;

/// Which conversation a request continues, by the rule README's
/// "OpenAI-compatible API" states: the first of `X-Bulkhead-Session-Id`,
/// `X-OpenWebUI-Chat-Id`, `metadata.session_id` and a string `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Conversation {
    /// None named: a new session, seeded with the request's history.
    Stateless,
    /// A Bulkhead session id: it must exist and be the caller's.
    Session(String),
    /// A name of the client's own: the session derived from it, made on
    /// first use.
    Named(String),
}

impl Conversation {
    pub(crate) fn from_request(
        headers: &HeaderMap,
        metadata: Option<&Value>,
        user: Option<&Value>,
    ) -> Result<Conversation, ApiError> {
        if let Some(value) = headers.get(SESSION_HEADER) {
            let id = value.to_str().map_err(|_| {
                param_error("X-Bulkhead-Session-Id", "must be a session id (a UUID)")
            })?;
            return crate::extract::parse_id(
                id.trim(),
                "the X-Bulkhead-Session-Id header",
                "invalid_session_id",
                StatusCode::BAD_REQUEST,
            )
            .map(Conversation::Session)
            .map_err(|e| e.with("param", "X-Bulkhead-Session-Id"));
        }
        if let Some(value) = headers.get(OPEN_WEBUI_CHAT_HEADER) {
            let name = value
                .to_str()
                .map_err(|_| param_error("X-OpenWebUI-Chat-Id", "must be visible ASCII"))?;
            if let Some(name) = name_of(name, "X-OpenWebUI-Chat-Id")? {
                return Ok(Conversation::Named(name));
            }
        }
        match metadata {
            None | Some(Value::Null) => {}
            Some(Value::Object(metadata)) => match metadata.get("session_id") {
                None | Some(Value::Null) => {}
                Some(Value::String(name)) => {
                    if let Some(name) = name_of(name, "metadata.session_id")? {
                        return Ok(Conversation::Named(name));
                    }
                }
                Some(_) => {
                    return Err(param_error("metadata.session_id", "must be a string"));
                }
            },
            Some(_) => return Err(param_error("metadata", "must be an object")),
        }
        // Open WebUI sends an object as `user` to its pipelines: only a
        // string names anything.
        if let Some(Value::String(name)) = user
            && let Some(name) = name_of(name, "user")?
        {
            return Ok(Conversation::Named(name));
        }
        Ok(Conversation::Stateless)
    }
}

/// A conversation's name, trimmed; blank is no name (a front end's
/// template with nothing to fill in).
fn name_of(raw: &str, param: &'static str) -> Result<Option<String>, ApiError> {
    let name = raw.trim();
    if name.is_empty() {
        return Ok(None);
    }
    if name.chars().count() > MAX_NAME {
        return Err(param_error(
            param,
            format!("must be at most {MAX_NAME} characters"),
        ));
    }
    if name.contains('\0') {
        return Err(param_error(param, "must not contain NUL characters"));
    }
    Ok(Some(name.to_string()))
}

/// A 400 naming the request's field (`param` in OpenAI's error shape).
pub(crate) fn param_error(param: &'static str, what: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_request", format!("`{param}` {what}")).with("param", param)
}

/// What a request asks of the engine, read from either API.
pub(crate) struct Turn {
    pub agent: String,
    pub conversation: Conversation,
    /// What came before the new message, for a session the run makes.
    pub history: Vec<NewMessage>,
    pub message: String,
    pub stream: bool,
}

/// Tokens the run's model calls reported, input and output apart (the
/// engine's own `tokens_used` is their sum).
#[derive(Debug, Default)]
pub(crate) struct Usage {
    input: AtomicU64,
    output: AtomicU64,
}

impl Usage {
    pub(crate) fn input(&self) -> u64 {
        self.input.load(Ordering::Relaxed)
    }

    pub(crate) fn output(&self) -> u64 {
        self.output.load(Ordering::Relaxed)
    }
}

/// The run's account: hears what each model call spent and passes it on
/// to the door's (the key's limits), which it holds for the run's life.
struct Meter {
    usage: Arc<Usage>,
    door: Option<Box<dyn RunAccount>>,
}

impl RunAccount for Meter {
    fn tokens_spent(&self, input: u64, output: u64) {
        self.usage.input.fetch_add(input, Ordering::Relaxed);
        self.usage.output.fetch_add(output, Ordering::Relaxed);
        if let Some(door) = &self.door {
            door.tokens_spent(input, output);
        }
    }
}

/// A run started for a request of either API.
pub(crate) struct Started {
    pub handle: RunHandle,
    pub usage: Arc<Usage>,
    pub agent: String,
    /// Unix seconds.
    pub created: u64,
}

/// Admits and starts the run a turn asks for. `Err(response)`: the door
/// refused it (429) or the engine did; either way nothing ran.
pub(crate) async fn start(
    state: &AppState,
    caller: &Caller,
    turn: Turn,
) -> Result<Started, Response> {
    use axum::response::IntoResponse;
    if turn.stream && !state.config.enable_streaming {
        return Err(ApiError::bad_request(
            "streaming_disabled",
            "streaming is turned off on this server (ENABLE_STREAMING=false); send \"stream\": false",
        )
        .with("param", "stream")
        .into_response());
    }
    let Some(agent) = state.engine.agents().get(&turn.agent) else {
        return Err(models::unknown_model(state, &turn.agent).into_response());
    };
    let agent_id = agent.id.clone();
    let owner = caller.tenant().map(str::to_string);
    // A session named by its id holds its conversation: what the client
    // sent before its new message is not stored again.
    let mut history = turn.history;
    let (session_id, create_if_missing) = match turn.conversation {
        Conversation::Stateless => (None, false),
        Conversation::Session(id) => {
            history.clear();
            (Some(id), false)
        }
        Conversation::Named(name) => (
            Some(named_session_id(owner.as_deref(), &agent_id, &name)),
            true,
        ),
    };
    let door = state.door.admit_run(caller).await?;
    let usage = Arc::new(Usage::default());
    let handle = state
        .engine
        .start_run(StartRun {
            session_id,
            create_if_missing,
            history,
            agent: Some(agent_id.clone()),
            message: turn.message,
            stream: turn.stream,
            owner,
            account: Some(Box::new(Meter {
                usage: Arc::clone(&usage),
                door,
            })),
            queued: None,
        })
        .await
        .map_err(|e| crate::routes::agent::start_error(e).into_response())?;
    Ok(Started {
        handle,
        usage,
        agent: agent_id,
        created: unix_seconds(),
    })
}

/// What the client is shown of a run that paused for a person: a chat
/// cannot hold a pending tool call, so the reply says what waits and how
/// to decide it.
pub(crate) fn approval_text(run_id: &str, approval: &PendingApproval) -> String {
    format!(
        "The agent wants to run the tool `{tool}` with {arguments} and is waiting for a person \
         to approve it (until {expires}). Approve it with POST /runs/{run_id}/approvals \
         {{\"call_id\": \"{call}\", \"decision\": \"approve\"}} (or \"deny\"), or with \
         `bulkhead chat --session <session id>`; the answer then joins this conversation. \
         Until then this conversation is busy.",
        tool = approval.tool,
        arguments = approval.arguments,
        expires = crate::routes::timestamp(approval.expires_at),
        call = approval.call_id,
    )
}

/// A run's outcome as text for the client, or the error it answers with.
pub(crate) enum Answer {
    Text { text: String, paused: bool },
}

/// Waits for a run's outcome. Failures become the error `/agent` would
/// answer, which the `/v1` layer puts in OpenAI's shape.
pub(crate) async fn outcome(
    run_id: &str,
    session_id: &str,
    outcome: tokio::sync::oneshot::Receiver<RunOutcome>,
) -> Result<Answer, ApiError> {
    match outcome.await {
        Ok(RunOutcome::Completed { response, .. }) => Ok(Answer::Text {
            text: response,
            paused: false,
        }),
        Ok(RunOutcome::AwaitingApproval { approval, .. }) => Ok(Answer::Text {
            text: approval_text(run_id, &approval),
            paused: true,
        }),
        Ok(RunOutcome::Failed { failure, .. }) => Err(crate::routes::agent::failure_error(
            &failure, session_id, run_id,
        )),
        Err(_) => Err(ApiError::internal(&"the run task ended without an outcome")
            .with("session_id", session_id)
            .with("run_id", run_id)),
    }
}

/// The session and run a response is about, as headers.
pub(crate) fn run_headers(headers: &mut HeaderMap, session_id: &str, run_id: &str) {
    if let Ok(value) = HeaderValue::from_str(session_id) {
        headers.insert(SESSION_HEADER, value);
    }
    if let Ok(value) = HeaderValue::from_str(run_id) {
        headers.insert(RUN_HEADER, value);
    }
}

/// A run id without hyphens, for ids in OpenAI's style (`chatcmpl-…`).
pub(crate) fn compact(run_id: &str) -> String {
    run_id.replace('-', "")
}

pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Client-side tools have nowhere to run: the agent's tools are its own.
pub(crate) fn refuse_tools(body: &Map<String, Value>) -> Result<(), ApiError> {
    match body.get("tools") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(tools)) if tools.is_empty() => Ok(()),
        Some(_) => Err(param_error(
            "tools",
            "are not supported: this model is an agent that runs its own tools (GET /agents lists them)",
        )),
    }
}

/// A JSON object's field, for readers of either API.
pub(crate) fn take(body: &mut Map<String, Value>, key: &str) -> Option<Value> {
    match body.remove(key) {
        None | Some(Value::Null) => None,
        Some(value) => Some(value),
    }
}
