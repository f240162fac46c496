//! The HTTP surface. Handlers parse, call the engine or the store, and
//! shape the answer; they never run the agent loop or a tool themselves.

mod agent;
mod agents;
mod approvals;
mod health;
pub mod langgraph;
pub mod openai;
mod sessions;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, OnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::door;
use crate::error::ApiError;
use crate::observability;
use crate::openapi;

/// Every route, each with its entry in the OpenAPI document: a route is
/// added here, as `.routes(routes!(handler))` of a handler annotated with
/// `#[utoipa::path]`, and nowhere else (a test fails on a route the
/// document lacks). Handlers of one path go in one `routes!`.
pub(crate) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(agent::post_agent))
        .routes(routes!(agents::list_agents))
        .routes(routes!(agents::get_agent))
        .routes(routes!(approvals::decide))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(health::ready_replica))
        .routes(routes!(sessions::get_session, sessions::delete_session))
        .routes(routes!(sessions::session_runs))
        .routes(routes!(sessions::session_audit))
        .routes(routes!(sessions::get_run))
        .routes(routes!(sessions::run_events))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs))
        .routes(routes!(observability::metrics::scrape))
        .routes(routes!(door::admin::list_keys, door::admin::create_key))
        .routes(routes!(door::admin::get_key))
        .routes(routes!(door::admin::revoke_key))
        .routes(routes!(openai::models::list_models))
        .routes(routes!(openai::models::get_model))
        .routes(routes!(openai::chat::chat_completions))
        .routes(routes!(openai::responses::create_response))
        .routes(routes!(langgraph::assistants::info))
        .routes(routes!(langgraph::assistants::search_assistants))
        .routes(routes!(langgraph::assistants::get_assistant))
        .routes(routes!(langgraph::threads::create_thread))
        .routes(routes!(langgraph::threads::search_threads))
        .routes(routes!(langgraph::threads::count_threads))
        .routes(routes!(
            langgraph::threads::get_thread,
            langgraph::threads::patch_thread,
            langgraph::threads::delete_thread
        ))
        .routes(routes!(langgraph::threads::get_state))
        .routes(routes!(langgraph::threads::get_history))
        .routes(routes!(
            langgraph::runs::create_run,
            langgraph::run_control::list_runs
        ))
        .routes(routes!(langgraph::runs::wait_run))
        .routes(routes!(langgraph::runs::stream_run))
        .routes(routes!(langgraph::runs::create_stateless_run))
        .routes(routes!(langgraph::runs::wait_stateless_run))
        .routes(routes!(langgraph::runs::stream_stateless_run))
        .routes(routes!(
            langgraph::run_control::get_thread_run,
            langgraph::run_control::delete_thread_run
        ))
        .routes(routes!(langgraph::run_control::join_run))
        .routes(routes!(langgraph::run_control::join_stream))
        .routes(routes!(langgraph::run_control::cancel_run))
}

/// `CORS_ALLOWED_ORIGINS` as a layer: a browser page of those origins may
/// call the API with its key headers and read where a run is
/// (`Content-Location`, `Location`), as LangGraph's browser clients do.
/// Outside the door: a preflight carries no key.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                header::CONTENT_LOCATION,
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static(openai::SESSION_HEADER),
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

pub fn router(state: AppState) -> Router {
    let cors = cors(&state.config.cors_allowed_origins);
    let (routes, _) = api().split_for_parts();
    let routes = routes
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
            .option_layer(cors)
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                observability::metrics::track,
            ))
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(trace)
            .layer(PropagateRequestIdLayer::x_request_id())
            // Around the door and the panic catcher: every error a `/v1`
            // client can see is in OpenAI's shape.
            .layer(axum::middleware::from_fn(openai::openai_errors))
            // Likewise for LangGraph's routes, in its server's shape.
            .layer(axum::middleware::from_fn(langgraph::langgraph_errors))
            .layer(CatchPanicLayer::custom(panic_response))
            .layer(axum::middleware::from_fn_with_state(
                state,
                crate::serve::close_when_draining,
            )),
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
