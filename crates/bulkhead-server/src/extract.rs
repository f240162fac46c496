//! Reading request bodies ourselves, so that every way a body can be wrong
//! gets its own status and message instead of a framework's plain text.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::Value;

use crate::error::ApiError;

/// The body as a JSON value: 413 past `limit`, 400 when it is not UTF-8 or
/// not JSON.
pub async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes (MAX_BODY_BYTES)"),
        )
        // The rest of the body is not read; a client that reused the
        // connection would have its next request fail.
        .closing_connection()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let limited = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if limited {
            too_large()
        } else {
            ApiError::bad_request("invalid_body", "the request body could not be read")
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body is empty; expected a JSON object",
        ));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_utf8",
            format!(
                "the request body is not valid UTF-8 (first bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    serde_json::from_str(text).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

/// A UUID from a path or a body, in canonical lowercase form.
pub fn parse_id(
    value: &str,
    what: &'static str,
    code: &'static str,
    status: StatusCode,
) -> Result<String, ApiError> {
    uuid::Uuid::try_parse(value)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| {
            let shown: String = value.chars().take(64).collect();
            ApiError::new(
                status,
                code,
                format!("{what} must be a UUID, got {shown:?}"),
            )
        })
}
