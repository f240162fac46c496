//! `AGENTS_FILE`: the agents a server runs, declared in YAML. Read once at
//! start with the rest of the configuration; a problem stops start-up with
//! one line naming the file, the agent and the field.
//!
//! Without the file the server runs one agent, `default`, made of the
//! environment (`MODEL_*`, `SYSTEM_PROMPT`, `MAX_STEPS`, `SANDBOX_*`), so a
//! deployment that never heard of agents keeps working unchanged.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bulkhead_agent::{ApprovalPolicy, DEFAULT_AGENT, ToolPolicy};
use bulkhead_sandbox::Limits;
use secrecy::SecretString;
use serde::Deserialize;

use super::reader::{ConfigError, Environment, invalid};
use super::{AgentMode, ModelConfig};

/// One agent, resolved: every field filled from the file or the server's
/// own settings, every limit within the server's.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: String,
    pub name: String,
    pub description: String,
    pub system_prompt: Option<String>,
    pub model: ModelConfig,
    /// The built-in tools it may use; `None`: every one the server has.
    pub tools: Option<Vec<String>>,
    pub mcp_servers: Vec<McpServerSpec>,
    pub limits: Limits,
    pub max_steps: u32,
    pub approval: ApprovalPolicy,
}

/// An MCP server an agent may use, as declared.
#[derive(Debug, Clone)]
pub struct McpServerSpec {
    /// Tools are offered as `<name>__<tool>`.
    pub name: String,
    pub transport: McpTransportSpec,
    /// The server's tools the agent may use; `None`: all of them.
    pub tools: Option<Vec<String>>,
    pub startup_timeout: Duration,
    pub call_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum McpTransportSpec {
    /// A program started inside the session's sandbox, spoken to over its
    /// stdin and stdout.
    Stdio {
        command: Vec<String>,
        env: Vec<(String, String)>,
        /// Values are secrets: never logged, redacted from the audit.
        secret_env: Vec<(String, SecretString)>,
    },
    /// A Streamable HTTP endpoint, reached only if the egress allowlist
    /// allows its host.
    Http {
        url: url::Url,
        headers: Vec<(String, String)>,
        secret_headers: Vec<(String, SecretString)>,
    },
}

/// The longest an MCP server may take to start and list its tools, and a
/// call to answer, unless the agent says otherwise.
const MCP_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const MCP_CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    agents: Vec<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentEntry {
    id: String,
    name: Option<String>,
    #[serde(default)]
    description: String,
    system_prompt: Option<String>,
    #[serde(default)]
    model: ModelEntry,
    tools: Option<Vec<String>>,
    #[serde(default)]
    mcp_servers: Vec<McpEntry>,
    #[serde(default)]
    sandbox: SandboxEntry,
    max_steps: Option<u32>,
    #[serde(default)]
    approval: ApprovalEntry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    endpoint: Option<String>,
    name: Option<String>,
    /// The name of a secret holding the key, read like every secret:
    /// `<NAME>`, the file `<NAME>_FILE` names, or `$SECRETS_DIR/<name>`.
    api_key_secret: Option<String>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct McpEntry {
    name: String,
    command: Option<Vec<String>>,
    url: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Environment variables whose values are secrets, by secret name.
    #[serde(default)]
    secret_env: BTreeMap<String, String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    secret_headers: BTreeMap<String, String>,
    tools: Option<Vec<String>>,
    startup_timeout_seconds: Option<f64>,
    call_timeout_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SandboxEntry {
    memory_mb: Option<u64>,
    cpus: Option<f64>,
    pids: Option<u32>,
    timeout_seconds: Option<f64>,
    disk_mb: Option<u64>,
    output_kb: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApprovalEntry {
    default: Option<String>,
    #[serde(default)]
    tools: BTreeMap<String, String>,
}

/// What reading an agent needs from the rest of the configuration.
pub(crate) struct Defaults<'a> {
    pub env: &'a Environment,
    pub mode: AgentMode,
    pub model: &'a ModelConfig,
    pub system_prompt: Option<&'a String>,
    pub max_steps: u32,
    /// The server's sandbox limits: every agent's ceiling.
    pub limits: &'a Limits,
    /// The built-in tools the server has.
    pub builtin_tools: &'a [String],
}

/// The agent a server without `AGENTS_FILE` runs.
pub(crate) fn default_agent(defaults: &Defaults<'_>) -> AgentConfig {
    AgentConfig {
        id: DEFAULT_AGENT.into(),
        name: DEFAULT_AGENT.into(),
        description:
            "The server's agent, made of its environment (MODEL_*, SYSTEM_PROMPT, MAX_STEPS)".into(),
        system_prompt: defaults.system_prompt.cloned(),
        model: defaults.model.clone(),
        tools: None,
        mcp_servers: Vec::new(),
        limits: defaults.limits.clone(),
        max_steps: defaults.max_steps,
        approval: ApprovalPolicy::default(),
    }
}

/// Reads and checks the agents file.
pub(crate) fn read_file(
    path: &Path,
    defaults: &Defaults<'_>,
) -> Result<Vec<AgentConfig>, ConfigError> {
    let fail = |message: String| invalid("AGENTS_FILE", format!("{}: {message}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let file: FileEntry = serde_norway::from_str(&text).map_err(|e| {
        fail(format!(
            "not an agents file ({}); it holds `agents:`, a list of agents",
            one_line(&e.to_string())
        ))
    })?;
    if file.agents.is_empty() {
        return Err(fail("`agents` is empty; declare at least one agent".into()));
    }
    let mut agents: Vec<AgentConfig> = Vec::with_capacity(file.agents.len());
    for (index, value) in file.agents.into_iter().enumerate() {
        let label = value.get("id").and_then(|id| id.as_str()).map_or_else(
            || format!("agent #{}", index + 1),
            |id| format!("agent {id:?}"),
        );
        let field_error =
            |field: &str, message: String| fail(format!("{label}: {field}: {message}"));
        let entry: AgentEntry = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let message = one_line(&e.into_inner().to_string());
            if field == "." {
                fail(format!("{label}: {message}"))
            } else {
                field_error(&field, message)
            }
        })?;
        let agent =
            resolve(entry, defaults).map_err(|(field, message)| field_error(&field, message))?;
        if agents.iter().any(|a| a.id == agent.id) {
            return Err(field_error("id", "another agent has this id".into()));
        }
        agents.push(agent);
    }
    Ok(agents)
}

/// serde's messages may span lines (YAML positions); start-up says one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

type FieldError = (String, String);

fn field(name: &str, message: impl Into<String>) -> FieldError {
    (name.to_string(), message.into())
}

/// Ids name agents in URLs: 1 to 64 lowercase letters, digits, `-` or `_`,
/// starting with a letter or digit.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !id.starts_with(['-', '_'])
}

fn resolve(entry: AgentEntry, defaults: &Defaults<'_>) -> Result<AgentConfig, FieldError> {
    if !valid_agent_id(&entry.id) {
        return Err(field(
            "id",
            format!(
                "{:?} is not a valid id: 1 to 64 lowercase letters, digits, `-` or `_`, starting with a letter or digit",
                entry.id
            ),
        ));
    }
    let model = resolve_model(entry.model, defaults)?;
    if let Some(tools) = &entry.tools {
        for tool in tools {
            if !defaults.builtin_tools.contains(tool) {
                return Err(field(
                    "tools",
                    format!(
                        "no built-in tool is called {tool:?} (there are: {}); MCP tools come from `mcp_servers`",
                        defaults.builtin_tools.join(", ")
                    ),
                ));
            }
        }
    }
    let mut mcp_servers: Vec<McpServerSpec> = Vec::new();
    for (index, server) in entry.mcp_servers.into_iter().enumerate() {
        let spec = resolve_mcp(server, defaults.env)
            .map_err(|(name, message)| field(&format!("mcp_servers[{index}].{name}"), message))?;
        if mcp_servers.iter().any(|s| s.name == spec.name) {
            return Err(field(
                &format!("mcp_servers[{index}].name"),
                format!("two MCP servers are called {:?}", spec.name),
            ));
        }
        mcp_servers.push(spec);
    }
    let limits = resolve_limits(entry.sandbox, defaults.limits)?;
    let max_steps = entry.max_steps.unwrap_or(defaults.max_steps);
    if !(1..=100).contains(&max_steps) {
        return Err(field("max_steps", "expected a whole number from 1 to 100"));
    }
    let approval = resolve_approval(entry.approval)?;
    Ok(AgentConfig {
        name: entry.name.unwrap_or_else(|| entry.id.clone()),
        id: entry.id,
        description: entry.description,
        system_prompt: entry
            .system_prompt
            .or_else(|| defaults.system_prompt.cloned()),
        model,
        tools: entry.tools,
        mcp_servers,
        limits,
        max_steps,
        approval,
    })
}

fn resolve_model(entry: ModelEntry, defaults: &Defaults<'_>) -> Result<ModelConfig, FieldError> {
    let server = defaults.model;
    let endpoint = match entry.endpoint {
        None => server.endpoint.clone(),
        Some(text) => {
            let parsed = url::Url::parse(&text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                .ok_or_else(|| {
                    field(
                        "model.endpoint",
                        "expected an http:// or https:// base URL such as https://api.openai.com/v1",
                    )
                })?;
            Some(parsed.as_str().trim_end_matches('/').to_string())
        }
    };
    if endpoint.is_none() && defaults.mode == AgentMode::Production {
        return Err(field(
            "model.endpoint",
            "is required in production (or set MODEL_ENDPOINT for every agent)",
        ));
    }
    // The server's key goes only to the server's endpoint: an agent that
    // names another provider names its key too, so no key is ever sent to
    // a provider it was not meant for.
    let api_key = match entry.api_key_secret {
        Some(name) => Some(
            secret_by_name(defaults.env, &name)
                .map_err(|message| field("model.api_key_secret", message))?
                .ok_or_else(|| {
                    field(
                        "model.api_key_secret",
                        format!(
                            "no secret {name:?} is set (set {name}, {name}_FILE, or put it in $SECRETS_DIR/{})",
                            name.to_ascii_lowercase()
                        ),
                    )
                })?,
        ),
        None if endpoint == server.endpoint => server.api_key.clone(),
        None => None,
    };
    let temperature = entry.temperature.unwrap_or(server.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(field("model.temperature", "expected a number from 0 to 2"));
    }
    let max_tokens = entry.max_tokens.unwrap_or(server.max_tokens);
    if max_tokens < 1 {
        return Err(field(
            "model.max_tokens",
            "expected a whole number of at least 1",
        ));
    }
    Ok(ModelConfig {
        endpoint,
        name: entry.name.unwrap_or_else(|| server.name.clone()),
        api_key,
        temperature,
        max_tokens,
        timeout: server.timeout,
        max_retries: server.max_retries,
        mock_latency: server.mock_latency,
    })
}

/// A secret named in the agents file, read like every secret: `<NAME>`,
/// else the file `<NAME>_FILE` names, else `$SECRETS_DIR/<name>`.
fn secret_by_name(env: &Environment, name: &str) -> Result<Option<SecretString>, String> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(format!(
            "{name:?} is not a secret's name: uppercase letters, digits and `_`, like OPENAI_API_KEY"
        ));
    }
    env.secret(name, &format!("{name}_FILE"))
        .map(|(value, _)| value)
        .map_err(|e| e.message)
}

/// MCP server names become tool name prefixes (`<name>__<tool>`).
pub fn valid_mcp_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !name.contains("__")
}

fn resolve_mcp(entry: McpEntry, env: &Environment) -> Result<McpServerSpec, FieldError> {
    if !valid_mcp_name(&entry.name) {
        return Err(field(
            "name",
            format!(
                "{:?} is not a valid MCP server name: 1 to 32 lowercase letters, digits, `-` or `_`, without `__`",
                entry.name
            ),
        ));
    }
    let secrets = |map: BTreeMap<String, String>, what: &str| {
        map.into_iter()
            .map(|(key, secret)| {
                let value = secret_by_name(env, &secret)
                    .map_err(|m| field(&format!("{what}.{key}"), m))?
                    .ok_or_else(|| {
                        field(
                            &format!("{what}.{key}"),
                            format!("no secret {secret:?} is set"),
                        )
                    })?;
                Ok((key, value))
            })
            .collect::<Result<Vec<_>, FieldError>>()
    };
    let transport = match (entry.command, entry.url) {
        (Some(command), None) => {
            if command.first().is_none_or(|program| program.is_empty()) {
                return Err(field(
                    "command",
                    "is empty; give the program and its arguments as a list",
                ));
            }
            if !entry.headers.is_empty() || !entry.secret_headers.is_empty() {
                return Err(field(
                    "headers",
                    "only an MCP server reached by `url` takes headers",
                ));
            }
            for key in entry.env.keys().chain(entry.secret_env.keys()) {
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(field("env", format!("{key:?} is not a variable name")));
                }
            }
            McpTransportSpec::Stdio {
                command,
                env: entry.env.into_iter().collect(),
                secret_env: secrets(entry.secret_env, "secret_env")?,
            }
        }
        (None, Some(url)) => {
            let url = url::Url::parse(&url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                .ok_or_else(|| {
                    field(
                        "url",
                        "expected an http:// or https:// URL such as http://mcp.internal:8000/mcp",
                    )
                })?;
            if !entry.env.is_empty() || !entry.secret_env.is_empty() {
                return Err(field(
                    "env",
                    "only an MCP server started by `command` takes env",
                ));
            }
            McpTransportSpec::Http {
                url,
                headers: entry.headers.into_iter().collect(),
                secret_headers: secrets(entry.secret_headers, "secret_headers")?,
            }
        }
        (Some(_), Some(_)) => {
            return Err(field(
                "url",
                "give either `command` (stdio, run in the sandbox) or `url` (Streamable HTTP), not both",
            ));
        }
        (None, None) => {
            return Err(field(
                "command",
                "give `command` (stdio, run in the sandbox) or `url` (Streamable HTTP)",
            ));
        }
    };
    let seconds = |value: Option<f64>, name: &str, default: Duration| match value {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(Duration::from_secs_f64(s)),
        Some(_) => Err(field(
            name,
            "expected a number of seconds above 0 and at most 3600",
        )),
    };
    Ok(McpServerSpec {
        name: entry.name,
        transport,
        tools: entry.tools,
        startup_timeout: seconds(
            entry.startup_timeout_seconds,
            "startup_timeout_seconds",
            MCP_STARTUP_TIMEOUT,
        )?,
        call_timeout: seconds(
            entry.call_timeout_seconds,
            "call_timeout_seconds",
            MCP_CALL_TIMEOUT,
        )?,
    })
}

/// The agent's limits: each one it sets must stay within the server's.
fn resolve_limits(entry: SandboxEntry, server: &Limits) -> Result<Limits, FieldError> {
    fn within<T: PartialOrd + Copy + std::fmt::Display>(
        name: &str,
        asked: Option<T>,
        zero: T,
        ceiling: T,
        setting: &str,
        shown: impl Fn(T) -> String,
    ) -> Result<Option<T>, FieldError> {
        match asked {
            None => Ok(None),
            Some(value) if value > zero && value <= ceiling => Ok(Some(value)),
            Some(value) => Err(field(
                &format!("sandbox.{name}"),
                format!(
                    "{value} is not above 0 and within the server's {setting} ({})",
                    shown(ceiling)
                ),
            )),
        }
    }
    let mb = 1u64 << 20;
    let mut limits = server.clone();
    if let Some(m) = within(
        "memory_mb",
        entry.memory_mb,
        0,
        server.memory_bytes / mb,
        "SANDBOX_MEMORY",
        |v| format!("{v} MB"),
    )? {
        limits.memory_bytes = m * mb;
    }
    if let Some(c) = within("cpus", entry.cpus, 0.0, server.cpus, "SANDBOX_CPUS", |v| {
        v.to_string()
    })? {
        limits.cpus = c;
    }
    if let Some(p) = within("pids", entry.pids, 0, server.pids, "SANDBOX_PIDS", |v| {
        v.to_string()
    })? {
        limits.pids = p;
    }
    if let Some(t) = within(
        "timeout_seconds",
        entry.timeout_seconds,
        0.0,
        server.timeout.as_secs_f64(),
        "SANDBOX_TIMEOUT_SECONDS",
        |v| format!("{v} s"),
    )? {
        limits.timeout = Duration::from_secs_f64(t);
    }
    if let Some(d) = within(
        "disk_mb",
        entry.disk_mb,
        0,
        server.disk_bytes / mb,
        "SANDBOX_DISK",
        |v| format!("{v} MB"),
    )? {
        limits.disk_bytes = d * mb;
    }
    if let Some(o) = within(
        "output_kb",
        entry.output_kb,
        0,
        server.output_bytes as u64 >> 10,
        "SANDBOX_OUTPUT",
        |v| format!("{v} KB"),
    )? {
        limits.output_bytes = (o << 10) as usize;
    }
    Ok(limits)
}

fn resolve_approval(entry: ApprovalEntry) -> Result<ApprovalPolicy, FieldError> {
    let parse = |name: &str, text: &str| {
        ToolPolicy::parse(text)
            .ok_or_else(|| field(name, format!("expected auto, ask or deny, got {text:?}")))
    };
    let default = match &entry.default {
        None => ToolPolicy::Auto,
        Some(text) => parse("approval.default", text)?,
    };
    let mut rules = Vec::with_capacity(entry.tools.len());
    for (tool, policy) in entry.tools {
        let name = format!("approval.tools.{tool}");
        if tool.is_empty() || tool[..tool.len().saturating_sub(1)].contains('*') {
            return Err(field(
                &name,
                "a tool name, or a prefix ending in `*` (e.g. time__*)",
            ));
        }
        rules.push((tool, parse(&name, &policy)?));
    }
    Ok(ApprovalPolicy { default, rules })
}
