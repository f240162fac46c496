//! The one error type of the HTTP layer. Every error leaves as
//! `{"error": {"code", "message"}}` with its status; causes of internal
//! errors are logged here and never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bulkhead_store::StoreError;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra members of the error object (a run's ids, say).
    pub details: Map<String, Value>,
    /// Answer with `Connection: close`: the request's body was left unread,
    /// so the connection cannot carry another request.
    pub close_connection: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Map::new(),
            close_connection: false,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// Logs the cause; the client learns only that something failed.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "an internal error occurred; it has been logged",
        )
    }

    /// Tells the client not to send another request on this connection.
    pub fn closing_connection(mut self) -> ApiError {
        self.close_connection = true;
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// The body of every error answer, as the OpenAPI document describes it.
/// `IntoResponse` below writes the same shape from an [`ApiError`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

/// `code` is stable and meant for programs; `message` is for a person and
/// may change. Some errors carry the ids they are about.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    #[schema(example = "session_not_found")]
    pub code: String,
    #[schema(example = "no session has this id")]
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub run_id: Option<String>,
    /// The run that holds the session (`session_busy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub active_run_id: Option<String>,
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        // A database that is down or restarting comes back: the client
        // may retry, unlike after a fault of ours.
        if error.is_unavailable() {
            tracing::warn!(error = %error, "the database is not answering");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is not answering; nothing was done; retry shortly",
            );
        }
        ApiError::internal(&error)
    }
}

/// What an error answer said, kept on the response beside its body, so
/// that a layer answering in another API's dialect (`/v1`, OpenAI's) can
/// say the same without parsing the body back.
#[derive(Debug, Clone)]
pub struct ErrorParts {
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let parts = ErrorParts {
            code: self.code,
            message: self.message.clone(),
            details: self.details.clone(),
        };
        let mut error = Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.into());
        error.extend(self.details);
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        response.extensions_mut().insert(parts);
        if self.close_connection {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}
