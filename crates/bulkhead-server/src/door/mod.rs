//! The front door: one layer every request passes through before any
//! handler. It decides who is calling (an API key, or nobody when
//! `AUTH_MODE=none`), refuses what that caller may not do (no key, a bad
//! key, a key over its request rate) and hands the handler a [`Caller`].
//! Handlers never read credentials themselves; they take a `Caller` and ask
//! it for the tenant that owns what they read or make, and for a run's
//! admission.
//!
//! Open without a key: the probes (`/health`, `/ready`, `/ready/replica`),
//! `/metrics` (which has its own token when one is set), and the API's
//! description (`/openapi.json`, `/docs`), which is the same for every
//! server and holds no data. `/admin/…` takes the admin token instead of a
//! key.

pub mod admin;
pub mod keys;
pub mod limits;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bulkhead_agent::RunAccount;
use bulkhead_store::{ApiKey, Store};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use admin::key_json;
use keys::{KeyBook, Refused};
use limits::{Counters, Over, Standing};

use crate::app::AppState;
use crate::error::ApiError;
use crate::observability::metrics::{AUTH_FAILURES, RATE_LIMITED};

/// `AUTH_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Keys,
    None,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Keys => "keys",
            AuthMode::None => "none",
        }
    }
}

/// Routes that answer without a key. Exact paths: `/health/x` is not open.
const OPEN_PATHS: &[&str] = &[
    "/health",
    "/ready",
    "/ready/replica",
    "/metrics",
    "/openapi.json",
    "/docs",
    // LangGraph clients (Agent Chat UI) ask it before anything, keyless,
    // as LangGraph's server answers it: the version and what is served.
    "/info",
];

pub fn is_open(path: &str) -> bool {
    OPEN_PATHS.contains(&path)
}

fn is_admin(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

pub struct Door {
    mode: AuthMode,
    keys: KeyBook,
    counters: Counters,
    /// SHA-256 of `ADMIN_TOKEN`: compared in constant time whatever the
    /// length of what is presented.
    admin_token: Option<[u8; 32]>,
}

impl Door {
    pub fn new(
        mode: AuthMode,
        store: Store,
        redis: Option<redis::Client>,
        admin_token: Option<&SecretString>,
        run_lease: std::time::Duration,
    ) -> Door {
        Door {
            mode,
            keys: KeyBook::new(store),
            counters: match redis {
                Some(client) => Counters::shared(client, run_lease),
                None => Counters::local(),
            },
            admin_token: admin_token.map(token_digest),
        }
    }

    pub fn keys(&self) -> &KeyBook {
        &self.keys
    }

    /// Lets a run start for `caller`, or answers 429 naming the limit. The
    /// account goes with the run and gives its place back when the run ends.
    pub async fn admit_run(
        &self,
        caller: &Caller,
    ) -> Result<Option<Box<dyn RunAccount>>, Response> {
        match caller {
            Caller::Anonymous => Ok(None),
            Caller::Key(key) => match self.counters.admit_run(key).await {
                Ok(account) => Ok(Some(account)),
                Err(over) => Err(rate_limited(over)),
            },
        }
    }
}

/// Who is calling, as the door established it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `AUTH_MODE=none`: no identity, everything reachable.
    Anonymous,
    Key(Arc<ApiKey>),
}

impl Caller {
    /// The tenant whose sessions this caller reaches; `None` when
    /// authentication is off.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Key(key) => Some(&key.tenant),
        }
    }

    /// Whether this caller may see something owned by `owner`.
    pub fn reaches(&self, owner: Option<&str>) -> bool {
        bulkhead_store::reaches(self.tenant(), owner)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, ApiError> {
        // No caller means the door did not run for this route: refuse
        // rather than serve it as anyone.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::internal(&"a handler that needs a caller ran without the door")
        })
    }
}

/// Proof that the door checked the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Admin, ApiError> {
        parts
            .extensions
            .get::<Admin>()
            .copied()
            .ok_or_else(|| ApiError::internal(&"an admin handler ran without the door"))
    }
}

/// The layer itself.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // A refusal leaves the request's body unread, so the connection cannot
    // carry another request: say so, or a client that reuses it (httpx,
    // as `langgraph-sdk` and `openai` do) fails its next request.
    let has_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length != "0")
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    let mut response = admit(state, request, next).await;
    if has_body
        && (response.status() == StatusCode::UNAUTHORIZED
            || response.status() == StatusCode::TOO_MANY_REQUESTS
            || response.status() == StatusCode::SERVICE_UNAVAILABLE)
        && response.extensions().get::<Refusal>().is_some()
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Marks an answer the door gave itself, its request unread.
#[derive(Debug, Clone, Copy)]
struct Refusal;

fn refused(mut response: Response) -> Response {
    response.extensions_mut().insert(Refusal);
    response
}

async fn admit(state: AppState, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if is_open(path) {
        return next.run(request).await;
    }
    let door = &state.door;
    if is_admin(path) {
        return match admin_refusal(door, request.headers()) {
            None => {
                request.extensions_mut().insert(Admin);
                next.run(request).await
            }
            Some(refusal) => refused(refusal),
        };
    }
    if door.mode == AuthMode::None {
        request.extensions_mut().insert(Caller::Anonymous);
        return next.run(request).await;
    }
    let key = match presented_key(request.headers()) {
        Err(refusal) => return refused(unauthorized(refusal)),
        Ok(presented) => match door.keys.check(presented).await {
            Ok(Ok(key)) => key,
            Ok(Err(refusal)) => return refused(unauthorized(refusal)),
            Err(e) => {
                tracing::error!(error = %e, "could not read API keys");
                return refused(
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the API key could not be checked: the database is not answering; retry shortly",
                    )
                    .into_response(),
                );
            }
        },
    };
    tracing::Span::current().record("key_id", key.id.as_str());
    let standing = match door.counters.request(&key).await {
        Ok(standing) => standing,
        Err(over) => return refused(rate_limited(over)),
    };
    request.extensions_mut().insert(Caller::Key(Arc::new(key)));
    let mut response = next.run(request).await;
    if let Some(standing) = standing {
        rate_headers(response.headers_mut(), &standing);
    }
    response
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in
/// any case).
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The digest a secret token (the admin token, the metrics token) is kept
/// as, so that comparing it takes the same time whatever is presented.
pub(crate) fn token_digest(token: &SecretString) -> [u8; 32] {
    Sha256::digest(token.expose_secret().as_bytes()).into()
}

/// Whether `Authorization: Bearer <token>` carries the token whose digest
/// is `expected`, compared in constant time.
pub(crate) fn bearer_matches(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
    else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    digest.ct_eq(expected).into()
}

/// The key from `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented_key(headers: &HeaderMap) -> Result<&str, Refused> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| Refused::Malformed)?;
        return bearer(value).ok_or(Refused::Malformed);
    }
    if let Some(value) = headers.get("x-api-key") {
        return value
            .to_str()
            .map(str::trim)
            .map_err(|_| Refused::Malformed);
    }
    Err(Refused::Missing)
}

/// Why `/admin/…` is refused, if it is.
fn admin_refusal(door: &Door, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = &door.admin_token else {
        return Some(
            ApiError::not_found(
                "not_found",
                "the admin API is off: start the server with ADMIN_TOKEN set to turn it on",
            )
            .into_response(),
        );
    };
    if bearer_matches(headers, expected) {
        return None;
    }
    metrics::counter!(AUTH_FAILURES, "reason" => "admin_token").increment(1);
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin API needs the admin token: send `Authorization: Bearer <ADMIN_TOKEN>`",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"bulkhead-admin\""),
    );
    Some(response)
}

fn unauthorized(refused: Refused) -> Response {
    metrics::counter!(AUTH_FAILURES, "reason" => refused.reason()).increment(1);
    let (message, challenge) = match refused {
        Refused::Missing => (
            "this route needs an API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
            "Bearer realm=\"bulkhead\"",
        ),
        Refused::Malformed => (
            "the API key is not in Bulkhead's form (bk_<id>_<secret>); send the whole key as `Authorization: Bearer <key>` or `x-api-key: <key>`",
            "Bearer realm=\"bulkhead\", error=\"invalid_token\"",
        ),
        Refused::Unknown | Refused::Revoked => (
            "the API key is unknown or revoked",
            "Bearer realm=\"bulkhead\", error=\"invalid_token\"",
        ),
    };
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// Whole seconds, rounded up, never 0: `Retry-After: 0` invites a spin.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_millis().div_ceil(1000).max(1) as u64
}

fn rate_limited(over: Over) -> Response {
    metrics::counter!(RATE_LIMITED, "limit" => over.limit.name()).increment(1);
    let retry_after = whole_seconds(over.retry_after);
    let what = match over.limit {
        limits::Limit::RequestsPerMinute => "requests per minute",
        limits::Limit::ConcurrentRuns => "runs in flight",
        limits::Limit::TokensPerDay => "model tokens per day (UTC)",
    };
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "this key's limit of {} {what} is reached; retry in {retry_after} s",
            over.allowed
        ),
    )
    .with("limit", over.limit.name())
    .into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    rate_headers(
        headers,
        &Standing {
            limit: over.allowed,
            remaining: 0,
            reset: over.retry_after,
        },
    );
    response
}

fn rate_headers(headers: &mut HeaderMap, standing: &Standing) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(standing.limit));
    headers.insert(
        "x-ratelimit-remaining",
        HeaderValue::from(standing.remaining),
    );
    headers.insert(
        "x-ratelimit-reset",
        HeaderValue::from(standing.reset.as_millis().div_ceil(1000) as u64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_token_matches() {
        let expected = token_digest(&SecretString::from("s3cret-metrics-token"));
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            bearer_matches(&headers, &expected)
        };
        assert!(with("Bearer s3cret-metrics-token"));
        assert!(with("bearer  s3cret-metrics-token "));
        assert!(!with("Bearer s3cret-metrics-toke"));
        assert!(!with("Basic s3cret-metrics-token"));
        assert!(!with("s3cret-metrics-token"));
        assert!(!bearer_matches(&HeaderMap::new(), &expected));
    }

    /// The door lets in without a key exactly what the OpenAPI document
    /// says is open, so neither can drift from the other.
    #[test]
    fn the_door_opens_what_the_document_calls_open() {
        let document = crate::openapi::document();
        let mut open = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let documented_open = operation["security"].as_array().is_some_and(Vec::is_empty);
                assert_eq!(
                    super::is_open(path),
                    documented_open,
                    "{method} {path}: the door and the document disagree"
                );
                if documented_open {
                    open.push(path.clone());
                }
            }
        }
        assert!(open.contains(&"/health".to_string()), "{open:?}");
        for path in super::OPEN_PATHS {
            assert!(
                open.contains(&path.to_string()),
                "{path} is open at the door but not in the document"
            );
        }
    }
}
