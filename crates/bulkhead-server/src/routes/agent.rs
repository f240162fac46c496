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
use serde_json::{Value, json};

use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;
use crate::extract::{json_body, parse_id};

/// A validated `/agent` request.
#[derive(Debug)]
struct AgentRequest {
    message: String,
    session_id: Option<String>,
    stream: Option<bool>,
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
        let stream = match body.remove("stream") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(stream)) => Some(stream),
            Some(_) => return Err(field_error("`stream` must be true or false")),
        };
        Ok(AgentRequest {
            message,
            session_id,
            stream,
        })
    }
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

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
            message: request.message,
            stream,
            owner: caller.tenant().map(str::to_string),
            account,
        })
        .await
        .map_err(start_error)?;
    if stream {
        Ok(event_stream(handle))
    } else {
        finished(handle).await
    }
}

fn start_error(error: StartError) -> ApiError {
    match error {
        StartError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; retry on another instance",
        ),
        StartError::SessionNotFound => {
            ApiError::not_found("session_not_found", "no session has this session_id")
        }
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
        StartError::Store(e) => ApiError::internal(&e),
    }
}

async fn finished(handle: RunHandle) -> Result<Response, ApiError> {
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
        }) => Ok(Json(json!({
            "response": response,
            "session_id": session_id,
            "tokens_used": tokens_used,
            "run_id": run_id,
        }))
        .into_response()),
        Ok(RunOutcome::Failed { failure, .. }) => {
            let status = match failure.kind {
                FailureKind::Upstream | FailureKind::MaxSteps => StatusCode::BAD_GATEWAY,
                FailureKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
                FailureKind::Interrupted => StatusCode::SERVICE_UNAVAILABLE,
                FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(status, failure.code, failure.message)
                .with("session_id", session_id)
                .with("run_id", run_id))
        }
        Err(_) => Err(ApiError::internal(&"the run task ended without an outcome")),
    }
}

fn event_stream(handle: RunHandle) -> Response {
    let Some(events) = handle.events else {
        return ApiError::internal(&"a streaming run has no event channel").into_response();
    };
    let events = futures_util::stream::unfold(events, |mut events| async move {
        events.recv().await.map(|event| (event, events))
    })
    .map(|event| {
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
