//! `/admin/keys`: the CLI's `keys create | list | revoke` over HTTP, for
//! whoever holds the admin token.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bulkhead_store::{ApiKey, RevokeOutcome};
use serde_json::{Value, json};

use super::Admin;
use super::keys::{NewKey, NewKeyError};
use crate::app::AppState;
use crate::error::ApiError;
use crate::extract::json_body;
use crate::routes::timestamp;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{key_id}", get(get_key).delete(revoke_key))
}

/// A key as the API and `keys list --json` show it: never its secret or
/// its digest.
pub fn key_json(key: &ApiKey) -> Value {
    json!({
        "id": key.id,
        "name": key.name,
        "tenant": key.tenant,
        "created_at": timestamp(key.created_at),
        "last_used_at": key.last_used_at.map(timestamp),
        "revoked_at": key.revoked_at.map(timestamp),
        "limits": {
            "requests_per_minute": key.requests_per_minute,
            "max_concurrent_runs": key.max_concurrent_runs,
            "tokens_per_day": key.tokens_per_day,
        },
    })
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message)
}

/// A whole number of at least 1, or absent.
fn limit(body: &mut serde_json::Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match body.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v >= 1 && v <= i64::MAX as u64 => Ok(Some(v)),
            _ => Err(invalid(format!(
                "`{name}` must be a whole number of at least 1"
            ))),
        },
        Some(_) => Err(invalid(format!(
            "`{name}` must be a whole number of at least 1"
        ))),
    }
}

async fn create_key(
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
    let to_u32 = |v: Option<u64>, name: &str| {
        v.map(|v| u32::try_from(v).map_err(|_| invalid(format!("`{name}` is too large"))))
            .transpose()
    };
    let new = NewKey {
        name,
        tenant,
        requests_per_minute: to_u32(
            limit(&mut body, "requests_per_minute")?,
            "requests_per_minute",
        )?,
        max_concurrent_runs: to_u32(
            limit(&mut body, "max_concurrent_runs")?,
            "max_concurrent_runs",
        )?,
        tokens_per_day: limit(&mut body, "tokens_per_day")?,
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
    let mut answer = key_json(&record);
    answer["key"] = key.into();
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn list_keys(_admin: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let keys: Vec<Value> = state
        .engine
        .store()
        .api_keys()
        .await?
        .iter()
        .map(key_json)
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

fn key_not_found() -> ApiError {
    ApiError::not_found("key_not_found", "no API key has this id")
}

async fn get_key(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = state
        .engine
        .store()
        .api_key(&id)
        .await?
        .ok_or_else(key_not_found)?;
    Ok(Json(key_json(&key)))
}

/// Revoking twice is not an error: the key is revoked either way.
async fn revoke_key(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.engine.store();
    match store.revoke_api_key(&id, bulkhead_agent::now_ms()).await? {
        RevokeOutcome::NotFound => return Err(key_not_found()),
        RevokeOutcome::Revoked => tracing::info!(key_id = %id, "API key revoked"),
        RevokeOutcome::AlreadyRevoked => {}
    }
    state.door.keys().forget(&id);
    let key = store.api_key(&id).await?.ok_or_else(key_not_found)?;
    Ok(Json(key_json(&key)))
}
