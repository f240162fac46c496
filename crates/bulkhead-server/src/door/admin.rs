//! `/admin/keys`: the CLI's `keys create | list | revoke` over HTTP, for
//! whoever holds the admin token.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_store::{ApiKey, RevokeOutcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::Admin;
use super::keys::{NewKey, NewKeyError};
use crate::app::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::json_body;
use crate::routes::timestamp;

/// A key as the API and `keys list --json` show it: never its secret or
/// its digest.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyRecord {
    /// The public id: what `keys revoke` and `POST /admin/keys/{key_id}/revoke` take.
    #[schema(example = "0ce3c3f658eaaa31")]
    pub id: String,
    pub name: String,
    /// Keys of one tenant share their sessions.
    pub tenant: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    pub limits: KeyLimits,
}

/// Each limit is `null` when the key has none.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyLimits {
    pub requests_per_minute: Option<i64>,
    pub max_concurrent_runs: Option<i64>,
    pub tokens_per_day: Option<i64>,
}

/// A key just made: the record and, this once, the key itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub record: KeyRecord,
    /// `bk_<id>_<secret>`: shown only in this answer.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Oldest first, revoked ones included.
    pub keys: Vec<KeyRecord>,
}

/// What a new key is made with (read by hand, so that each mistake gets
/// its own message).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the document's description of the body
pub struct NewKeyBody {
    /// What the key is for: up to 100 characters, not all blank, no
    /// control characters (it is printed in `keys list`'s table).
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x1f\x7f-\x9f\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\x00-\x1f\x7f-\x9f]*$"
    )]
    name: String,
    /// Share sessions with the keys of this tenant (default: a tenant of
    /// the key's own).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,100}$")]
    tenant: Option<String>,
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    requests_per_minute: Option<u32>,
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    max_concurrent_runs: Option<u32>,
    #[schema(minimum = 1, maximum = 9_007_199_254_740_991_i64)]
    tokens_per_day: Option<u64>,
}

pub fn key_record(key: &ApiKey) -> KeyRecord {
    KeyRecord {
        id: key.id.clone(),
        name: key.name.clone(),
        tenant: key.tenant.clone(),
        created_at: timestamp(key.created_at),
        last_used_at: key.last_used_at.map(timestamp),
        revoked_at: key.revoked_at.map(timestamp),
        limits: KeyLimits {
            requests_per_minute: key.requests_per_minute,
            max_concurrent_runs: key.max_concurrent_runs,
            tokens_per_day: key.tokens_per_day,
        },
    }
}

/// [`key_record`] as JSON, for the CLI's `keys list --json`.
pub fn key_json(key: &ApiKey) -> Value {
    serde_json::to_value(key_record(key)).expect("a key record serializes")
}

/// The largest request rate and runs in flight a key may be given.
pub const MAX_COUNT: u64 = 1_000_000_000;
/// The largest token budget: JSON's largest exact integer.
pub const MAX_TOKENS: u64 = 9_007_199_254_740_991;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message)
}

/// A whole number from 1 to `max`, or absent.
fn limit(
    body: &mut serde_json::Map<String, Value>,
    name: &str,
    max: u64,
) -> Result<Option<u64>, ApiError> {
    let wrong = || invalid(format!("`{name}` must be a whole number from 1 to {max}"));
    match body.remove(name) {
        None | Some(Value::Null) => Ok(None),
        // JSON has one kind of number: `4.0` is the integer 4.
        Some(Value::Number(n)) => match n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= max as f64)
                .map(|f| f as u64)
        }) {
            Some(v) if (1..=max).contains(&v) => Ok(Some(v)),
            _ => Err(wrong()),
        },
        Some(_) => Err(wrong()),
    }
}

/// Make an API key
///
/// The answer holds the key itself, this once: only its digest is stored.
#[utoipa::path(post, path = "/admin/keys", tag = "keys", security(("admin_token" = [])),
    request_body(content = NewKeyBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The key, shown once", body = CreatedKey),
        (status = 400, description = "`invalid_json`, `invalid_utf8`: not a JSON body", body = ErrorBody),
        (status = 404, description = "`not_found`: the admin API is off (no ADMIN_TOKEN)", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`invalid_request`: a field missing, of the wrong type, out of range or unknown", body = ErrorBody),
    ),
)]
pub async fn create_key(
    _admin: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Value::Object(mut body) = json_body(&headers, body, state.config.max_body_bytes).await?
    else {
        return Err(invalid("the request body must be a JSON object"));
    };
    let name = match body.remove("name") {
        Some(Value::String(name)) => name,
        None | Some(Value::Null) => return Err(invalid("`name` is required")),
        Some(_) => return Err(invalid("`name` must be a string")),
    };
    let tenant = match body.remove("tenant") {
        None | Some(Value::Null) => None,
        Some(Value::String(tenant)) => Some(tenant),
        Some(_) => return Err(invalid("`tenant` must be a string")),
    };
    let new = NewKey {
        name,
        tenant,
        requests_per_minute: limit(&mut body, "requests_per_minute", MAX_COUNT)?.map(|v| v as u32),
        max_concurrent_runs: limit(&mut body, "max_concurrent_runs", MAX_COUNT)?.map(|v| v as u32),
        tokens_per_day: limit(&mut body, "tokens_per_day", MAX_TOKENS)?,
    };
    if let Some(unknown) = body.keys().next() {
        return Err(invalid(format!(
            "unknown field `{unknown}` (expected name, tenant, requests_per_minute, max_concurrent_runs, tokens_per_day)"
        )));
    }
    let (record, key) =
        match super::keys::create(state.engine.store(), new, bulkhead_agent::now_ms()).await {
            Ok(made) => made,
            Err(NewKeyError::Invalid(message)) => return Err(invalid(message)),
            Err(NewKeyError::Store(e)) => return Err(e.into()),
        };
    tracing::info!(key_id = %record.id, name = %record.name, "API key created");
    let answer = CreatedKey {
        record: key_record(&record),
        key,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// List the API keys
///
/// Every key, revoked ones included, oldest first; never a secret.
#[utoipa::path(get, path = "/admin/keys", tag = "keys", security(("admin_token" = [])),
    responses(
        (status = 200, description = "The keys", body = KeyList),
        (status = 404, description = "`not_found`: the admin API is off (no ADMIN_TOKEN)", body = ErrorBody),
    ),
)]
pub async fn list_keys(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<KeyList>, ApiError> {
    let keys = state
        .engine
        .store()
        .api_keys()
        .await?
        .iter()
        .map(key_record)
        .collect();
    Ok(Json(KeyList { keys }))
}

fn key_not_found() -> ApiError {
    ApiError::not_found("key_not_found", "no API key has this id")
}

/// One API key
#[utoipa::path(get, path = "/admin/keys/{key_id}", tag = "keys", security(("admin_token" = [])),
    params(("key_id" = String, Path, description = "The key's public id")),
    responses(
        (status = 200, description = "The key", body = KeyRecord),
        (status = 404, description = "`key_not_found`; `not_found`: the admin API is off", body = ErrorBody),
    ),
)]
pub async fn get_key(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyRecord>, ApiError> {
    let key = state
        .engine
        .store()
        .api_key(&id)
        .await?
        .ok_or_else(key_not_found)?;
    Ok(Json(key_record(&key)))
}

/// Revoke an API key
///
/// It stops working at once on this server and within 2 s on the others.
/// The record stays (with `revoked_at`), so `GET` still shows it: a
/// revocation is an act on the key, not its removal. Revoking twice is not
/// an error: the key is revoked either way.
#[utoipa::path(post, path = "/admin/keys/{key_id}/revoke", tag = "keys", security(("admin_token" = [])),
    params(("key_id" = String, Path, description = "The key's public id")),
    responses(
        (status = 200, description = "The key, revoked", body = KeyRecord),
        (status = 404, description = "`key_not_found`; `not_found`: the admin API is off", body = ErrorBody),
    ),
)]
pub async fn revoke_key(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyRecord>, ApiError> {
    let store = state.engine.store();
    match store.revoke_api_key(&id, bulkhead_agent::now_ms()).await? {
        RevokeOutcome::NotFound => return Err(key_not_found()),
        RevokeOutcome::Revoked => tracing::info!(key_id = %id, "API key revoked"),
        RevokeOutcome::AlreadyRevoked => {}
    }
    state.door.keys().forget(&id);
    let key = store.api_key(&id).await?.ok_or_else(key_not_found)?;
    Ok(Json(key_record(&key)))
}
