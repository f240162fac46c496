//! Errors under `/v1` in OpenAI's shape, whoever made them: the door (401,
//! 429), the router (404, 405), body reading (400, 413), a handler or a
//! run. One layer around everything rewrites the body of any error answer
//! to a `/v1` path from the [`ErrorParts`] it carries, so that no handler
//! knows the dialect and nothing is parsed back.
//!
//! It also says when the SDKs must not retry (`x-should-retry: false`, which
//! the `openai` packages obey before their own rules): when a retry would
//! run an agent turn twice or cannot succeed.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::error::ErrorParts;

/// The body of every error under `/v1`, as OpenAI answers them.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiError,
}

/// `type` is the class of error (`invalid_request_error`,
/// `authentication_error`, `permission_error`, `rate_limit_error`,
/// `server_error`); `code` the exact one, Bulkhead's (`session_busy`,
/// `model_error`…) or OpenAI's where it has one (`invalid_api_key`,
/// `model_not_found`, `rate_limit_exceeded`); `param` the field at fault.
/// A run's failure also carries `session_id` and `run_id`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiError {
    #[schema(example = "`messages` must not be empty")]
    pub message: String,
    #[serde(rename = "type")]
    #[schema(example = "invalid_request_error")]
    pub kind: String,
    pub param: Option<String>,
    #[schema(example = "invalid_request")]
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub run_id: Option<String>,
}

/// Whether a path is the OpenAI face's.
pub(crate) fn is_openai(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// The layer. Outside the door and the panic catcher, so that what they
/// answer is rewritten too.
pub async fn openai_errors(request: Request, next: Next) -> Response {
    if !is_openai(request.uri().path()) {
        return next.run(request).await;
    }
    let response = next.run(request).await;
    let Some(parts) = response.extensions().get::<ErrorParts>().cloned() else {
        return response;
    };
    let (mut head, _) = response.into_parts();
    let status = head.status;
    if let Some(session_id) = parts.details.get("session_id").and_then(Value::as_str)
        && let Ok(value) = HeaderValue::from_str(session_id)
    {
        head.headers.insert(super::SESSION_HEADER, value);
    }
    if let Some(retry) = should_retry(status, &parts) {
        head.headers
            .insert("x-should-retry", HeaderValue::from_static(retry));
    }
    let body = serde_json::to_vec(&body(status, parts)).unwrap_or_default();
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(head, Body::from(body))
}

/// `false` where the SDK would otherwise retry and must not: a busy or
/// foreign session (409: the SDKs retry 409 as a lock timeout) and a
/// server error once a run has started (it is recorded; sent again, the
/// turn would run twice). `None`: the SDK's own rules are right (a 429,
/// or a 503 before any run).
fn should_retry(status: StatusCode, parts: &ErrorParts) -> Option<&'static str> {
    let run_started = parts.details.contains_key("run_id");
    (status == StatusCode::CONFLICT || (status.is_server_error() && run_started)).then_some("false")
}

/// An error in OpenAI's shape, for a stream already under way (where it
/// is sent as an event: the status has gone).
pub(crate) fn error_value(error: crate::error::ApiError) -> Value {
    let parts = ErrorParts {
        code: error.code,
        message: error.message,
        details: error.details,
    };
    body(error.status, parts)
}

fn body(status: StatusCode, parts: ErrorParts) -> Value {
    let ErrorParts {
        code,
        message,
        mut details,
    } = parts;
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        500.. => "server_error",
        _ => "invalid_request_error",
    };
    // OpenAI's own codes where a client may look for them.
    let code = match code {
        "unauthorized" => "invalid_api_key",
        "rate_limited" => "rate_limit_exceeded",
        "agent_not_found" => "model_not_found",
        other => other,
    };
    let param = details.remove("param").unwrap_or(Value::Null);
    let mut error = Map::new();
    error.insert("message".into(), message.into());
    error.insert("type".into(), kind.into());
    error.insert("param".into(), param);
    error.insert("code".into(), code.into());
    error.extend(details);
    json!({ "error": error })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(code: &'static str, details: Value) -> ErrorParts {
        ErrorParts {
            code,
            message: "m".into(),
            details: details.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn errors_take_openais_shape_and_keep_their_ids() {
        let body = body(
            StatusCode::BAD_GATEWAY,
            parts("model_error", json!({"session_id": "s", "run_id": "r"})),
        );
        assert_eq!(
            body,
            json!({"error": {"message": "m", "type": "server_error", "param": null,
                "code": "model_error", "session_id": "s", "run_id": "r"}})
        );
        let body = super::body(
            StatusCode::BAD_REQUEST,
            parts("invalid_request", json!({"param": "messages"})),
        );
        assert_eq!(body["error"]["param"], "messages");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let body = super::body(StatusCode::UNAUTHORIZED, parts("unauthorized", json!({})));
        assert_eq!(
            (&body["error"]["type"], &body["error"]["code"]),
            (&json!("authentication_error"), &json!("invalid_api_key"))
        );
    }

    #[test]
    fn no_retry_where_a_turn_would_run_twice() {
        let started = parts("model_error", json!({"run_id": "r"}));
        let before = parts("shutting_down", json!({}));
        assert_eq!(
            should_retry(StatusCode::BAD_GATEWAY, &started),
            Some("false")
        );
        assert_eq!(
            should_retry(StatusCode::CONFLICT, &parts("session_busy", json!({}))),
            Some("false")
        );
        assert_eq!(should_retry(StatusCode::SERVICE_UNAVAILABLE, &before), None);
        assert_eq!(
            should_retry(
                StatusCode::TOO_MANY_REQUESTS,
                &parts("rate_limited", json!({}))
            ),
            None
        );
        assert!(is_openai("/v1/chat/completions") && !is_openai("/v10") && !is_openai("/agent"));
    }
}
