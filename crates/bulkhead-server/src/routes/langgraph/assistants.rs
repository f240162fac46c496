//! Assistants are the server's agents, read-only: `POST /assistants/search`
//! and `GET /assistants/{assistant_id}`. An assistant's id is a UUID made
//! from its agent's id, which is also its `graph_id`; either names it.

use std::sync::OnceLock;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use bulkhead_agent::Agent;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::{DetailBody, assistant_id, find_assistant};
use crate::app::AppState;
use crate::error::ApiError;
use crate::extract::json_body;
use crate::routes::timestamp;

/// When this server started: when its assistants were made.
fn since() -> i64 {
    static SINCE: OnceLock<i64> = OnceLock::new();
    *SINCE.get_or_init(bulkhead_agent::now_ms)
}

pub(crate) fn assistant_json(agent: &Agent) -> Value {
    json!({
        "assistant_id": assistant_id(&agent.id),
        "graph_id": agent.id,
        "name": if agent.name.is_empty() { &agent.id } else { &agent.name },
        "description": agent.description,
        "config": {"configurable": {}},
        "context": {},
        "metadata": {"created_by": "system"},
        "version": 1,
        "created_at": timestamp(since()),
        "updated_at": timestamp(since()),
    })
}

/// The body of `POST /assistants/search`; every field may be left out.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct AssistantSearch {
    /// Only the assistant of this graph (agent) id.
    graph_id: Option<String>,
    /// Only assistants whose name contains this (case-insensitive).
    name: Option<String>,
    /// Only assistants whose metadata holds these keys and values.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    #[schema(minimum = 0)]
    offset: Option<i64>,
    sort_by: Option<String>,
    sort_order: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(names("assistant_id"), parameter_in = Path)]
#[allow(dead_code)]
pub struct AssistantPath(
    /// The assistant's UUID, or its graph id (the agent's id).
    String,
);

/// Whether `metadata` holds every key of `filter` with its value.
pub(crate) fn holds(metadata: &Value, filter: &Value) -> bool {
    match filter.as_object() {
        Some(filter) => filter.iter().all(|(k, v)| metadata.get(k) == Some(v)),
        None => true,
    }
}

pub(crate) fn page(body: &Value) -> Result<(usize, usize), ApiError> {
    // JSON Schema's integers include `2.0`.
    let number = |key: &str, default: u64, min: u64, max: u64| match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= max as f64)
                    .map(|f| f as u64)
            })
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                ApiError::unprocessable(
                    "invalid_request",
                    format!("`{key}` must be a whole number from {min} to {max}"),
                )
            }),
    };
    let limit = number("limit", 10, 1, 1000)?;
    let offset = number("offset", 0, 0, i64::MAX as u64)?;
    Ok((
        limit as usize,
        usize::try_from(offset).unwrap_or(usize::MAX),
    ))
}

/// Search assistants
///
/// The agents this server runs, as LangGraph assistants.
#[utoipa::path(post, path = "/assistants/search", tag = "langgraph",
    request_body(content = Option<AssistantSearch>, content_type = "application/json"),
    responses(
        (status = 200, description = "The matching assistants", body = Vec<Object>),
        (status = 400, description = "The body is not JSON", body = DetailBody),
        (status = 413, description = "The body is over MAX_BODY_BYTES", body = DetailBody),
        (status = 422, description = "A field has the wrong type", body = DetailBody),
    ),
)]
pub async fn search_assistants(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Vec<Value>>, ApiError> {
    let body = optional_body(&state, &headers, body).await?;
    let (limit, offset) = page(&body)?;
    let text = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::unprocessable(
            "invalid_request",
            format!("`{key}` must be a string"),
        )),
    };
    let graph_id = text("graph_id")?;
    // Accepted, and of no use: the agents are few, in the file's order.
    text("sort_by")?;
    text("sort_order")?;
    let name = text("name")?.map(|n| n.to_lowercase());
    let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
    if !metadata.is_null() && !metadata.is_object() {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "`metadata` must be an object",
        ));
    }
    let found = state
        .engine
        .agents()
        .iter()
        .map(|agent| assistant_json(agent))
        .filter(|a| graph_id.as_ref().is_none_or(|g| a["graph_id"] == *g))
        .filter(|a| {
            name.as_ref().is_none_or(|n| {
                a["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_lowercase()
                    .contains(n)
            })
        })
        .filter(|a| holds(&a["metadata"], &metadata))
        .skip(offset)
        .take(limit)
        .collect();
    Ok(Json(found))
}

/// A body that may be empty or `null` (`{}` then).
pub(crate) async fn optional_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let limit = state.config.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let value = json_body(headers, Body::from(bytes), limit).await?;
    if value.is_null() {
        return Ok(json!({}));
    }
    if !value.is_object() {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

/// What this server is, as LangGraph clients ask
///
/// Open, as on LangGraph's server: the version and which of its
/// capabilities are served (assistants yes; crons and LangSmith no).
#[utoipa::path(get, path = "/info", tag = "langgraph", security(()),
    responses((status = 200, description = "The server's version and flags", body = Object)),
)]
pub async fn info() -> Json<Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "server": "bulkhead",
        "flags": {
            "assistants": true,
            "crons": false,
            "langsmith": false,
            "langsmith_tracing_replicas": false,
        },
    }))
}

/// Get an assistant
#[utoipa::path(get, path = "/assistants/{assistant_id}", tag = "langgraph", params(AssistantPath),
    responses(
        (status = 200, description = "The assistant", body = Object),
        (status = 404, description = "No agent has this id", body = DetailBody),
    ),
)]
pub async fn get_assistant(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(assistant_json(&*find_assistant(&state, &id)?)))
}
