//! Errors on LangGraph's routes in its server's shape, `{"detail": ...}`,
//! whoever made them: the door (401, 429), the router, body reading, a
//! handler. One layer rewrites the body of any error answer on those paths
//! from the [`ErrorParts`] it carries, as `/v1` does for OpenAI's.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::error::ErrorParts;

/// The body of every error on LangGraph's routes. `detail` is for a
/// person; the status says what happened, as the `langgraph-sdk` maps it
/// (400, 401, 404, 409, 422, 429, 5xx).
#[derive(Debug, Serialize, ToSchema)]
pub struct DetailBody {
    #[schema(example = "Thread not found")]
    pub detail: String,
}

/// Whether a path is LangGraph's: its assistants, threads, and the
/// stateless runs (`/runs/{run_id}` and what is under it are Bulkhead's).
pub(crate) fn is_langgraph(path: &str) -> bool {
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    under("/assistants")
        || under("/threads")
        || matches!(path, "/runs" | "/runs/wait" | "/runs/stream")
}

/// The layer. Outside the door and the panic catcher, so that what they
/// answer is rewritten too.
pub async fn langgraph_errors(request: Request, next: Next) -> Response {
    if !is_langgraph(request.uri().path()) {
        return next.run(request).await;
    }
    let response = next.run(request).await;
    let Some(parts) = response.extensions().get::<ErrorParts>().cloned() else {
        return response;
    };
    let (mut head, _) = response.into_parts();
    let body = serde_json::to_vec(&json!({ "detail": parts.message })).unwrap_or_default();
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(head, Body::from(body))
}
