//! `GET /agents`: the agents this server runs, as configured (no secrets).

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::config::{AgentConfig, McpTransportSpec};
use crate::door::Caller;
use crate::error::{ApiError, ErrorBody};

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    /// In the order they are declared.
    agents: Vec<AgentBody>,
}

/// An agent: what it is, which model and tools it has, its limits and its
/// approval policy. Keys and secret values are never shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentBody {
    #[schema(example = "default")]
    id: String,
    name: String,
    description: String,
    /// The agent a request that names none runs.
    default: bool,
    system_prompt: Option<String>,
    model: AgentModel,
    /// The built-in tools offered to its model (those its policy denies
    /// are not).
    tools: Vec<String>,
    mcp_servers: Vec<AgentMcpServer>,
    sandbox: AgentSandbox,
    max_steps: u32,
    approval: AgentApproval,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentModel {
    /// `mock` (the built-in mock model) or `openai` (an OpenAI-compatible
    /// endpoint).
    provider: String,
    name: String,
    /// The base URL, any password in it hidden; `null` for the mock.
    endpoint: Option<String>,
    temperature: f32,
    max_tokens: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentMcpServer {
    name: String,
    /// `stdio` (run inside the session's sandbox) or `http`.
    transport: String,
    /// The program, for `stdio`.
    command: Option<Vec<String>>,
    /// The endpoint, for `http`.
    url: Option<String>,
    /// The server's tools the agent may use; `null`: all.
    tools: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentSandbox {
    memory_mb: u64,
    cpus: f64,
    pids: u32,
    timeout_seconds: f64,
    disk_mb: u64,
    output_kb: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentApproval {
    /// `auto`, `ask` or `deny`: for tools no rule names.
    default: String,
    /// Tool name (or prefix ending in `*`) → `auto`, `ask` or `deny`.
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    tools: std::collections::BTreeMap<String, String>,
}

/// The id of an agent.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct AgentPath {
    #[param(example = "default")]
    agent_id: String,
}

fn describe(state: &AppState, config: &AgentConfig) -> AgentBody {
    let engine_agent = state.engine.agents().get(&config.id);
    let default_id = &state.engine.agents().default_agent().id;
    let mb = 1u64 << 20;
    AgentBody {
        id: config.id.clone(),
        name: config.name.clone(),
        description: config.description.clone(),
        default: &config.id == default_id,
        system_prompt: engine_agent.and_then(|a| a.system_prompt.clone()),
        model: AgentModel {
            provider: if config.model.endpoint.is_some() {
                "openai".into()
            } else {
                "mock".into()
            },
            name: if config.model.endpoint.is_some() {
                config.model.name.clone()
            } else {
                bulkhead_model::mock::MOCK_MODEL_NAME.into()
            },
            endpoint: config
                .model
                .endpoint
                .as_deref()
                .map(crate::config::redact_url_password),
            temperature: config.model.temperature,
            max_tokens: config.model.max_tokens,
        },
        tools: engine_agent
            .map(|a| a.tools.names().map(str::to_string).collect())
            .unwrap_or_default(),
        mcp_servers: config
            .mcp_servers
            .iter()
            .map(|server| match &server.transport {
                McpTransportSpec::Stdio { command, .. } => AgentMcpServer {
                    name: server.name.clone(),
                    transport: "stdio".into(),
                    command: Some(command.clone()),
                    url: None,
                    tools: server.tools.clone(),
                },
                McpTransportSpec::Http { url, .. } => AgentMcpServer {
                    name: server.name.clone(),
                    transport: "http".into(),
                    command: None,
                    url: Some(crate::config::redact_url_password(url.as_str())),
                    tools: server.tools.clone(),
                },
            })
            .collect(),
        sandbox: AgentSandbox {
            memory_mb: config.limits.memory_bytes / mb,
            cpus: config.limits.cpus,
            pids: config.limits.pids,
            timeout_seconds: config.limits.timeout.as_secs_f64(),
            disk_mb: config.limits.disk_bytes / mb,
            output_kb: config.limits.output_bytes as u64 >> 10,
        },
        max_steps: config.max_steps,
        approval: AgentApproval {
            default: config.approval.default.as_str().into(),
            tools: config
                .approval
                .rules
                .iter()
                .map(|(tool, policy)| (tool.clone(), policy.as_str().to_string()))
                .collect(),
        },
    }
}

/// The agents
///
/// Every agent this server runs (`AGENTS_FILE`, or the one `default`
/// agent), in the order declared.
#[utoipa::path(get, path = "/agents", tag = "agents",
    responses((status = 200, description = "The agents", body = AgentList)),
)]
pub async fn list_agents(State(state): State<AppState>, _caller: Caller) -> Json<AgentList> {
    Json(AgentList {
        agents: state
            .config
            .agents
            .iter()
            .map(|agent| describe(&state, agent))
            .collect(),
    })
}

/// One agent
#[utoipa::path(get, path = "/agents/{agent_id}", tag = "agents", params(AgentPath),
    responses(
        (status = 200, description = "The agent", body = AgentBody),
        (status = 404, description = "`agent_not_found`", body = ErrorBody),
    ),
)]
pub async fn get_agent(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentBody>, ApiError> {
    state
        .config
        .agents
        .iter()
        .find(|agent| agent.id == id)
        .map(|agent| Json(describe(&state, agent)))
        .ok_or_else(|| {
            ApiError::not_found("agent_not_found", "this server runs no agent with this id")
        })
}
