//! `GET /v1/models`: the server's agents, each a model.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::OpenAiErrorBody;
use crate::app::AppState;
use crate::door::Caller;
use crate::error::ApiError;

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    #[schema(example = "list")]
    object: &'static str,
    /// One per agent, in the order they are declared.
    data: Vec<ModelBody>,
}

/// An agent, as a model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelBody {
    /// The agent's id: what `model` names in a request.
    #[schema(example = "default")]
    id: String,
    /// Always `model`.
    #[schema(example = "model")]
    object: &'static str,
    /// When this server started (Unix seconds): agents are defined at start.
    created: u64,
    #[schema(example = "bulkhead")]
    owned_by: &'static str,
    /// The agent's name and description (`GET /agents` has the rest), which
    /// front ends such as Open WebUI show.
    name: String,
    description: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ModelPath {
    /// An agent's id.
    #[allow(dead_code)]
    model_id: String,
}

fn created() -> u64 {
    static STARTED: OnceLock<u64> = OnceLock::new();
    *STARTED.get_or_init(super::unix_seconds)
}

fn model(agent: &bulkhead_agent::Agent) -> ModelBody {
    ModelBody {
        id: agent.id.clone(),
        object: "model",
        created: created(),
        owned_by: "bulkhead",
        name: agent.name.clone(),
        description: agent.description.clone(),
    }
}

/// The 404 for a `model` that is none of the agents, naming those there are.
pub(crate) fn unknown_model(state: &AppState, asked: &str) -> ApiError {
    let ids: Vec<&str> = state
        .engine
        .agents()
        .iter()
        .map(|a| a.id.as_str())
        .collect();
    let shown: String = asked.chars().take(64).collect();
    ApiError::not_found(
        "model_not_found",
        format!(
            "The model `{shown}` does not exist: the models here are this server's agents ({}); GET /v1/models lists them",
            ids.join(", ")
        ),
    )
    .with("param", "model")
}

/// List the models (the agents)
///
/// Every agent this server runs, as a model an OpenAI client can name.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The agents, as models", body = ModelList)),
)]
pub async fn list_models(State(state): State<AppState>, _caller: Caller) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state.engine.agents().iter().map(|a| model(a)).collect(),
    })
}

/// One model (an agent)
#[utoipa::path(get, path = "/v1/models/{model_id}", tag = "openai", params(ModelPath),
    responses(
        (status = 200, description = "The agent, as a model", body = ModelBody),
        (status = 404, description = "`model_not_found`: no agent has this id", body = OpenAiErrorBody),
    ),
)]
pub async fn get_model(
    State(state): State<AppState>,
    _caller: Caller,
    Path(model_id): Path<String>,
) -> Result<Json<ModelBody>, ApiError> {
    state
        .engine
        .agents()
        .get(&model_id)
        .map(|agent| Json(model(agent)))
        .ok_or_else(|| unknown_model(&state, &model_id))
}
