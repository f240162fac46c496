//! The HTTP surface. Handlers parse, call the engine or the store, and
//! shape the answer; they never run the agent loop or a tool themselves.

mod agent;
mod health;
mod sessions;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, OnResponse, TraceLayer};
use tracing::Level;

use crate::app::AppState;
use crate::error::ApiError;
use crate::observability;

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/agent", post(agent::post_agent))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/ready/replica", get(health::ready_replica))
        .route(
            "/sessions/{session_id}",
            get(sessions::get_session).delete(sessions::delete_session),
        )
        .route("/sessions/{session_id}/runs", get(sessions::session_runs))
        .route("/sessions/{session_id}/audit", get(sessions::session_audit))
        .route("/runs/{run_id}", get(sessions::get_run))
        .route("/runs/{run_id}/events", get(sessions::run_events))
        .route("/metrics", get(observability::metrics::scrape))
        .merge(crate::door::admin_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside the request span (so a refusal is logged with its request
        // id) and around every route and the fallback alike.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::door::guard,
        ))
        .with_state(state.clone());

    let on_response = DefaultOnResponse::new()
        .level(Level::INFO)
        .latency_unit(tower_http::LatencyUnit::Micros);
    let trace = TraceLayer::new_for_http()
        .make_span_with(observability::traces::request_span)
        .on_response(
            move |response: &axum::http::Response<_>, latency, span: &tracing::Span| {
                observability::traces::record_response(response, span);
                on_response.on_response(response, latency, span);
            },
        )
        .on_failure(DefaultOnFailure::new().level(Level::WARN));
    routes.layer(
        ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(
                state,
                observability::metrics::track,
            ))
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(trace)
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(CatchPanicLayer::custom(panic_response)),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "an internal error occurred; it has been logged",
    )
    .into_response()
}

/// RFC 3339 in UTC, from milliseconds since the epoch.
pub fn timestamp(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
