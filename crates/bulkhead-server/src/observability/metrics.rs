//! Prometheus metrics: one recorder per process (tests build several
//! servers in one), rendered by our own `GET /metrics` route rather than
//! a listener of the exporter's. Labels are route templates and names,
//! never ids: every label value comes from a fixed set or from the
//! configuration.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::AppState;
use crate::error::ApiError;

pub const HTTP_REQUESTS: &str = "bulkhead_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "bulkhead_http_request_duration_seconds";
/// Emitted by whatever refuses a credential, with a `reason`.
pub const AUTH_FAILURES: &str = "bulkhead_auth_failures_total";
/// Emitted by the limits, with the `limit` that refused.
pub const RATE_LIMITED: &str = "bulkhead_rate_limited_total";
/// Emitted by the limits when Redis fails them (the request goes through).
pub const LIMIT_ERRORS: &str = "bulkhead_limit_errors_total";

/// Seconds, from a fast `/health` to a long run.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// How often histograms are folded and idle series swept, scraped or not.
const UPKEEP: Duration = Duration::from_secs(5);

/// The process's recorder, installed on first use; `None` if another
/// recorder was installed first (not ours: nothing would reach this one).
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("the buckets are not empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    let upkeep = handle.clone();
                    // A thread, not a task: the recorder outlives any one
                    // runtime (tests start several).
                    let started = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(UPKEEP);
                                upkeep.run_upkeep();
                            }
                        });
                    if let Err(e) = started {
                        tracing::warn!(error = %e, "could not start the metrics upkeep thread; scrapes still fold histograms");
                    }
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not install the metrics recorder: /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by method, route template (unmatched for no route) and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time to the response's head by method, route template and status (a stream's body is not included)"
    );
    describe_counter!(
        AUTH_FAILURES,
        "Requests refused for their credentials, by reason"
    );
    describe_counter!(RATE_LIMITED, "Requests refused by a limit, by limit");
    describe_counter!(
        LIMIT_ERRORS,
        "Times the limits could not ask Redis and let a request through"
    );
    bulkhead_agent::telemetry::describe();
}

/// Prometheus metrics
///
/// The Prometheus text format. Open, or behind its own token
/// (`METRICS_TOKEN`); absent (404) when metrics are off
/// (`ENABLE_METRICS=false`).
#[utoipa::path(get, path = "/metrics", tag = "probes", security(()),
    responses(
        (status = 200, description = "Every metric, in the Prometheus text format",
            content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, description = "`unauthorized`: METRICS_TOKEN is set and was not sent",
            body = crate::error::ErrorBody),
        (status = 404, description = "`not_found`: metrics are off", body = crate::error::ErrorBody),
    ),
)]
pub(crate) async fn scrape(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let Some(handle) = app.metrics() else {
        return ApiError::not_found("not_found", "no such route").into_response();
    };
    if let Some(expected) = app.metrics_token_digest()
        && !crate::door::bearer_matches(&headers, expected)
    {
        metrics::counter!(AUTH_FAILURES, "reason" => "metrics_token").increment(1);
        tracing::warn!("refused a /metrics request without the metrics token");
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "/metrics needs the metrics token: Authorization: Bearer <METRICS_TOKEN>",
        )
        .into_response();
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        handle.render(),
    )
        .into_response()
}

/// Counts and times every request by method, route template and status.
/// Runs after routing, so a matched request carries its template; one
/// that matched nothing is `unmatched`, never its raw path.
pub(crate) async fn track(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if app.metrics().is_none() {
        return next.run(request).await;
    }
    let started = Instant::now();
    let method = method_label(request.method());
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => intern(path.as_str()),
        None => "unmatched",
    };
    let response = next.run(request).await;
    let status = response.status();
    let labels = [
        ("method", method),
        ("route", route),
        ("status", status_label(status)),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, &labels).record(started.elapsed());
    response
}

/// A route template as a `'static` label, so that labelling a request
/// allocates nothing. The templates are the router's, a fixed few: each is
/// leaked once.
fn intern(template: &str) -> &'static str {
    static TEMPLATES: OnceLock<RwLock<HashMap<String, &'static str>>> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(Default::default);
    if let Some(interned) = templates
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(template)
    {
        return interned;
    }
    templates
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(template.to_string())
        .or_insert_with(|| Box::leak(template.to_string().into_boxed_str()))
}

/// The status as a label: the codes the server answers without
/// allocating, any other by its digits.
fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        // Three digits: a bounded set, whatever a handler answers.
        other => intern(&other.to_string()),
    }
}

/// The method as a label: the standard ones, and `other` for any other
/// token a client may invent.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_interned() {
        let first = intern(&String::from("/sessions/{session_id}"));
        let second = intern(&String::from("/sessions/{session_id}"));
        assert_eq!(first, "/sessions/{session_id}");
        assert!(std::ptr::eq(first, second));
        assert_eq!(status_label(StatusCode::IM_A_TEAPOT), "418");
        assert_eq!(status_label(StatusCode::NOT_FOUND), "404");
    }

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(
            method_label(&Method::from_bytes(b"X-UUID-0d7e").unwrap()),
            "other"
        );
    }
}
