//! `POST /runs/{run_id}/approvals`: a person's decision on the tool call a
//! paused run waits on. The run goes on, and the answer is the run's, as
//! from `POST /agent`: JSON once it ends (or pauses again), or its events.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bulkhead_agent::{DecideError, Decision};
use serde_json::Value;
use utoipa::ToSchema;

use super::agent::{AgentResponse, AwaitingApprovalResponse, StreamEvent, event_stream, finished};
use super::sessions::{RunPath, owned_run, run_id};
use crate::app::AppState;
use crate::door::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::json_body;

/// The longest comment kept with a decision.
const MAX_COMMENT_CHARS: usize = 2000;

/// The body of `POST /runs/{run_id}/approvals`. Read by hand, so that
/// each wrong field gets its own message; this type only describes it.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ApprovalBody {
    /// The call the run waits on (`approval.call_id` of the run, or of the
    /// `approval_requested` event).
    #[schema(min_length = 1, example = "call_mock_1")]
    call_id: String,
    decision: DecisionKind,
    /// Kept in the audit with the decision; a denial's comment is told to
    /// the model. At most 2000 characters.
    #[schema(max_length = 2000, pattern = r"^[^\x00]*$")]
    comment: Option<String>,
    /// Answer with the resumed run's events as Server-Sent Events. Absent:
    /// `Accept: text/event-stream` decides.
    stream: Option<bool>,
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum DecisionKind {
    Approve,
    Deny,
}

fn field_error(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message)
}

/// Decide on a tool call waiting for approval
///
/// Approve: the call runs and the run goes on. Deny: the model is told a
/// person denied it, and the run goes on. Answers like `POST /agent`.
#[utoipa::path(post, path = "/runs/{run_id}/approvals", tag = "runs", params(RunPath),
    request_body(content = ApprovalBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The run went on and completed (JSON), or its events from here on (`stream`)", content(
            (AgentResponse = "application/json"),
            (StreamEvent = "text/event-stream"),
        )),
        (status = 202, description = "The run went on and paused again, at another call", body = AwaitingApprovalResponse),
        (status = 400, description = "`invalid_json`, `invalid_utf8`, `invalid_body`: the body is not a JSON document; `invalid_run_id`; `streaming_disabled`", body = ErrorBody),
        (status = 404, description = "`run_not_found`", body = ErrorBody),
        (status = 409, description = "`not_awaiting_approval`: the run waits for no decision (`status`); `already_decided`: someone, or the expiry, decided first", body = ErrorBody),
        (status = 422, description = "`invalid_request`: a field is missing or wrong; `unknown_call_id`: the run waits on another call (`awaiting_call_id`)", body = ErrorBody),
        (status = 413, description = "`body_too_large`: larger than MAX_BODY_BYTES", body = ErrorBody),
        (status = 500, description = "`internal_error` (logged)", body = ErrorBody),
        (status = 502, description = "`model_error`, `max_steps_exceeded`: the run went on and failed (`session_id`, `run_id`)", body = ErrorBody),
        (status = 503, description = "`shutting_down`; `run_interrupted`: the server stopped during the run", body = ErrorBody),
        (status = 504, description = "`model_timeout`: the run went on and the model did not answer in time", body = ErrorBody),
    ),
)]
pub async fn decide(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = run_id(&raw)?;
    let Value::Object(mut body) = json_body(&headers, body, state.config.max_body_bytes).await?
    else {
        return Err(field_error("the request body must be a JSON object"));
    };
    let call_id = match body.remove("call_id") {
        Some(Value::String(call_id)) if !call_id.is_empty() => call_id,
        None | Some(Value::Null) => return Err(field_error("`call_id` is required")),
        Some(_) => return Err(field_error("`call_id` must be a non-empty string")),
    };
    let approve = match body.remove("decision") {
        Some(Value::String(d)) if d == "approve" => true,
        Some(Value::String(d)) if d == "deny" => false,
        None | Some(Value::Null) => return Err(field_error("`decision` is required")),
        Some(_) => return Err(field_error("`decision` must be \"approve\" or \"deny\"")),
    };
    let comment = match body.remove("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.contains('\0') => {
            return Err(field_error("`comment` must not contain NUL characters"));
        }
        Some(Value::String(c)) if c.chars().count() > MAX_COMMENT_CHARS => {
            return Err(field_error(format!(
                "`comment` is longer than {MAX_COMMENT_CHARS} characters"
            )));
        }
        Some(Value::String(c)) => Some(c),
        Some(_) => return Err(field_error("`comment` must be a string or null")),
    };
    let stream = match body.remove("stream") {
        None | Some(Value::Null) => super::agent::wants_event_stream(&headers),
        Some(Value::Bool(stream)) => stream,
        Some(_) => return Err(field_error("`stream` must be true or false")),
    };
    if let Some(unknown) = body.keys().next() {
        return Err(field_error(format!(
            "unknown field `{unknown}` (expected call_id, decision, comment, stream)"
        )));
    }
    if stream && !state.config.enable_streaming {
        return Err(ApiError::bad_request(
            "streaming_disabled",
            "streaming is turned off on this server (ENABLE_STREAMING=false); send \"stream\": false",
        ));
    }
    owned_run(&state, &caller, &id).await?;
    let account = match state.door.admit_run(&caller).await {
        Ok(account) => account,
        Err(refused) => return Ok(refused),
    };
    let decision = Decision {
        audit_id: String::new(),
        approve,
        decision: if approve { "approve" } else { "deny" },
        decided_by: match &caller {
            Caller::Anonymous => "anonymous".into(),
            Caller::Key(key) => key.id.clone(),
        },
        comment,
    };
    let handle = state
        .engine
        .decide(&id, &call_id, decision, stream, account)
        .await
        .map_err(decide_error)?;
    if stream {
        Ok(event_stream(handle))
    } else {
        finished(handle).await
    }
}

/// A decision the engine refused, as an answer.
pub(crate) fn decide_error(e: DecideError) -> ApiError {
    match e {
        DecideError::RunNotFound => ApiError::not_found("run_not_found", "no run has this id"),
        DecideError::NotAwaiting { status } => ApiError::new(
            StatusCode::CONFLICT,
            "not_awaiting_approval",
            format!("the run waits for no decision: it is {status}"),
        )
        .with("status", status),
        DecideError::UnknownCall { awaiting } => ApiError::unprocessable(
            "unknown_call_id",
            format!("the run waits for a decision on call {awaiting:?}, not on this one"),
        )
        .with("awaiting_call_id", awaiting),
        DecideError::AlreadyDecided => ApiError::new(
            StatusCode::CONFLICT,
            "already_decided",
            "this call has been decided already (by someone else, or it expired)",
        ),
        DecideError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; retry on another instance",
        ),
        DecideError::Store(e) => ApiError::from(e),
    }
}
