//! Configuration, read once at start from the environment (and `.env`, and
//! secret files), validated whole, and never read again. An invalid value
//! stops the process with one line naming the variable.
//!
//! `settings.rs` is the table of every setting (name, default, meaning,
//! secret, commands); `reader.rs` where values come from and the typed reads;
//! `sandbox.rs` the sandbox settings `serve` and `sandboxd` share;
//! `describe.rs` what `bulkhead config` shows.

pub mod agents;
mod describe;
mod observability;
mod reader;
mod sandbox;
pub mod settings;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bulkhead_agent::RoleKind;
use bulkhead_store::Backend;
use secrecy::{ExposeSecret, SecretString};

pub use agents::{AgentConfig, McpServerSpec, McpTransportSpec};
pub use describe::{Described, redact_url_password};
pub use observability::ObservabilityConfig;
pub use reader::{ConfigError, ConfigWarning, Environment, Source};
pub use sandbox::{MIN_SANDBOXD_TOKEN_LEN, SandboxBackendKind, SandboxConfig, SandboxdConfig};

use reader::{Reader, invalid, literal_default};

/// Where secret files are looked for when neither `<NAME>` nor `<NAME>_FILE`
/// is set: Docker and Kubernetes mount secrets here.
pub const DEFAULT_SECRETS_DIR: &str = "/run/secrets";

/// Shorter admin tokens are refused at start.
pub const MIN_ADMIN_TOKEN_LEN: usize = 24;

pub use crate::door::AuthMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    Development,
    Production,
}

impl AgentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentMode::Development => "development",
            AgentMode::Production => "production",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `None` only in development: the built-in mock model answers.
    pub endpoint: Option<String>,
    pub name: String,
    pub api_key: Option<SecretString>,
    pub temperature: f32,
    pub max_tokens: u32,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Latency of the in-process mock model.
    pub mock_latency: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: AgentMode,
    pub auth_mode: AuthMode,
    /// Opens `/admin/keys`.
    pub admin_token: Option<SecretString>,
    /// `HOST` was unset and authentication is off, so the server listens
    /// on loopback only (start-up says so, and how to change it).
    pub loopback_by_default: bool,
    pub host: IpAddr,
    pub port: u16,
    pub database_url: SecretString,
    pub database_max_connections: u32,
    pub database_connect_timeout: Duration,
    pub redis_url: Option<SecretString>,
    pub model: ModelConfig,
    pub log_level: String,
    pub log_format: LogFormat,
    /// This server's part in a team of agents (`AGENT_ROLE`).
    pub role: bulkhead_agent::RoleKind,
    /// A planner's executor and critic (`EXECUTOR_URL`, `CRITIC_URL`).
    pub peers: Option<bulkhead_agent::Peers>,
    /// What `EXECUTOR_URL`, `CRITIC_URL`, `DELEGATE_TIMEOUT_SECONDS` and
    /// `MAX_PLAN_STEPS` say, whatever the role (they are checked always).
    pub team: Team,
    pub system_prompt: Option<String>,
    /// The agents this server runs: those of `AGENTS_FILE`, or one,
    /// `default`, made of the settings above.
    pub agents: Vec<AgentConfig>,
    pub agents_file: Option<std::path::PathBuf>,
    /// How long a call waits for a person before it is denied.
    pub approval_timeout: Duration,
    pub enable_streaming: bool,
    /// Origins a browser may call the API from: none (no CORS), some, or
    /// `*` (any).
    pub cors_allowed_origins: Vec<String>,
    pub enable_tracing: bool,
    pub max_steps: u32,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// How long a replica's runs stay its own without it renewing its
    /// lease (PostgreSQL).
    pub run_lease: Duration,
    pub sandbox: SandboxConfig,
    /// Metrics and traces.
    pub observability: ObservabilityConfig,
    /// What start-up should say without stopping: unknown variables that
    /// look like a slip, an endpoint that was corrected, a missing key.
    pub warnings: Vec<ConfigWarning>,
    sources: HashMap<&'static str, Source>,
    /// `SANDBOXD_HOST` and `SANDBOXD_PORT`, checked so that `bulkhead
    /// config` shows every setting; only sandboxd listens there.
    sandboxd_listen: (IpAddr, u16),
    secrets_dir: std::path::PathBuf,
}

/// The planner's peers as configured.
#[derive(Debug, Clone)]
pub struct Team {
    pub executor_url: Option<url::Url>,
    pub critic_url: Option<url::Url>,
    pub delegate_timeout: Duration,
    pub max_plan_steps: usize,
    /// The keys a planner sends to peers that require them.
    pub executor_key: Option<SecretString>,
    pub critic_key: Option<SecretString>,
}

fn read_log_level(r: &mut Reader<'_>) -> Result<String, ConfigError> {
    let log_level = r.text("LOG_LEVEL");
    normalise_log_level(&log_level).ok_or_else(|| {
        invalid(
            "LOG_LEVEL",
            format!("expected trace, debug, info, warn or error, got {log_level:?}"),
        )
    })
}

fn read_log_format(r: &mut Reader<'_>, default: LogFormat) -> Result<LogFormat, ConfigError> {
    match r
        .raw("LOG_FORMAT")
        .map(|f| f.to_ascii_lowercase())
        .as_deref()
    {
        None => Ok(default),
        Some("json") => Ok(LogFormat::Json),
        Some("text") | Some("pretty") => Ok(LogFormat::Text),
        Some(other) => Err(invalid(
            "LOG_FORMAT",
            format!("expected json or text, got {other:?}"),
        )),
    }
}

fn read_listen(
    r: &mut Reader<'_>,
    host: &'static str,
    port: &'static str,
) -> Result<(IpAddr, u16), ConfigError> {
    Ok((
        r.parse(host, "an IP address such as 0.0.0.0 or 127.0.0.1", |_| true)?,
        r.parse(port, "a port number (0-65535)", |_| true)?,
    ))
}

/// Path endings of single API calls, which people copy from curl examples
/// into `MODEL_ENDPOINT`; the client adds them to the base itself.
const CALL_PATHS: &[&str] = &["/chat/completions", "/completions", "/models"];

/// Hosted APIs that answer every call 401 without a key.
const KEYED_HOSTS: &[&str] = &[
    "api.openai.com",
    "openrouter.ai",
    "api.groq.com",
    "api.mistral.ai",
    "api.together.xyz",
    "api.deepseek.com",
];

/// `MODEL_ENDPOINT`: an http(s) base URL. One that ends in a call's path
/// (`…/v1/chat/completions`) is cut back to its base, with a warning
/// naming what was cut.
fn read_model_endpoint(
    r: &mut Reader<'_>,
    mode: AgentMode,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Option<String>, ConfigError> {
    let Some(text) = r.raw("MODEL_ENDPOINT") else {
        if mode == AgentMode::Production {
            return Err(invalid(
                "MODEL_ENDPOINT",
                "is required when AGENT_MODE=production (an OpenAI-compatible base URL such as https://api.openai.com/v1)",
            ));
        }
        return Ok(None);
    };
    let parsed = url::Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    let Some(mut parsed) = parsed else {
        return Err(invalid(
            "MODEL_ENDPOINT",
            "expected an http:// or https:// base URL such as https://api.openai.com/v1",
        ));
    };
    let path = parsed.path().trim_end_matches('/').to_string();
    if let Some(call) = CALL_PATHS.iter().find(|call| path.ends_with(*call)) {
        parsed.set_path(&path[..path.len() - call.len()]);
        let base = parsed.as_str().trim_end_matches('/').to_string();
        warnings.push(ConfigWarning {
            variable: "MODEL_ENDPOINT".into(),
            message: format!(
                "MODEL_ENDPOINT ends in {call}, the path of one call; using the API base {} (set MODEL_ENDPOINT to it to silence this)",
                redact_url_password(&base)
            ),
        });
        return Ok(Some(base));
    }
    Ok(Some(text.trim_end_matches('/').to_string()))
}

/// A planner's peer: an http(s) base URL ending in `/`, so that
/// `join("agent")` lands under its path.
fn read_peer(
    r: &mut Reader<'_>,
    name: &'static str,
    example: &str,
) -> Result<Option<url::Url>, ConfigError> {
    let Some(text) = r.raw(name) else {
        return Ok(None);
    };
    let mut url = url::Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| {
            invalid(
                name,
                format!("expected an http:// base URL such as {example}"),
            )
        })?;
    if !url.path().ends_with('/') {
        url.set_path(&format!("{}/", url.path()));
    }
    Ok(Some(url))
}

impl Config {
    /// Reads and validates everything; the first problem found is returned.
    pub fn from_env(env: &Environment) -> Result<Config, ConfigError> {
        let mut r = Reader::new(env);
        let mut warnings = env.unknown_variables();
        r.raw("SECRETS_DIR");
        let mode = match r.text("AGENT_MODE").to_ascii_lowercase().as_str() {
            "development" | "dev" => AgentMode::Development,
            "production" | "prod" => AgentMode::Production,
            other => {
                return Err(invalid(
                    "AGENT_MODE",
                    format!("expected development or production, got {other:?}"),
                ));
            }
        };
        let auth_mode = match r
            .raw("AUTH_MODE")
            .map(|m| m.to_ascii_lowercase())
            .as_deref()
        {
            None => match mode {
                AgentMode::Production => AuthMode::Keys,
                AgentMode::Development => AuthMode::None,
            },
            Some("keys") => AuthMode::Keys,
            Some("none") => AuthMode::None,
            Some(other) => {
                return Err(invalid(
                    "AUTH_MODE",
                    format!("expected keys or none, got {other:?}"),
                ));
            }
        };
        let admin_token = r.secret("ADMIN_TOKEN", "ADMIN_TOKEN_FILE")?;
        if let Some(token) = &admin_token {
            reader::refuse_placeholder("ADMIN_TOKEN", Some(token))?;
            if token.expose_secret().len() < MIN_ADMIN_TOKEN_LEN {
                return Err(invalid(
                    "ADMIN_TOKEN",
                    format!(
                        "must be at least {MIN_ADMIN_TOKEN_LEN} characters (try `openssl rand -hex 32`)"
                    ),
                ));
            }
        }
        // An unauthenticated server is reachable from the network only when
        // HOST says so.
        let explicit_host = r.raw("HOST");
        let loopback_by_default = auth_mode == AuthMode::None && explicit_host.is_none();
        let host = match explicit_host {
            None if loopback_by_default => IpAddr::from([127, 0, 0, 1]),
            None => IpAddr::from([0, 0, 0, 0]),
            Some(text) => text.parse().map_err(|_| {
                invalid(
                    "HOST",
                    format!("expected an IP address such as 0.0.0.0 or 127.0.0.1, got {text:?}"),
                )
            })?,
        };
        let port = r.parse("PORT", "a port number (0-65535)", |_| true)?;
        let sandboxd_listen = read_listen(&mut r, "SANDBOXD_HOST", "SANDBOXD_PORT")?;

        let database_url = r
            .secret("DATABASE_URL", "DATABASE_URL_FILE")?
            .unwrap_or_else(|| SecretString::from(literal_default("DATABASE_URL")));
        if Backend::from_url(database_url.expose_secret()).is_err() {
            return Err(invalid(
                "DATABASE_URL",
                "expected a sqlite:// or postgres:// URL",
            ));
        }
        let database_password = r.secret("DATABASE_PASSWORD", "DATABASE_PASSWORD_FILE")?;
        if mode == AgentMode::Production {
            reader::refuse_placeholder("DATABASE_PASSWORD", database_password.as_ref())?;
        }
        let database_url = match database_password {
            None => database_url,
            Some(password) => with_password(&database_url, &password)?,
        };
        let database_max_connections = r.parse(
            "DATABASE_MAX_CONNECTIONS",
            "a whole number from 1 to 1000",
            |n: &u32| (1..=1000).contains(n),
        )?;
        let database_connect_timeout = r.seconds("DATABASE_CONNECT_TIMEOUT_SECONDS", 3600.0)?;

        let redis_url = r.secret("REDIS_URL", "REDIS_URL_FILE")?;
        if let Some(url) = &redis_url {
            let url = url.expose_secret();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid("REDIS_URL", "expected a redis:// or rediss:// URL"));
            }
        }

        let endpoint = read_model_endpoint(&mut r, mode, &mut warnings)?;
        let model = ModelConfig {
            name: r.text("MODEL_NAME"),
            api_key: r.secret("OPENAI_API_KEY", "OPENAI_API_KEY_FILE")?,
            temperature: r.parse("TEMPERATURE", "a number from 0 to 2", |t: &f32| {
                (0.0..=2.0).contains(t)
            })?,
            max_tokens: r.parse("MAX_TOKENS", "a whole number of at least 1", |n: &u32| {
                *n >= 1
            })?,
            timeout: r.seconds("MODEL_TIMEOUT_SECONDS", 3600.0)?,
            max_retries: r.parse(
                "MODEL_MAX_RETRIES",
                "a whole number from 0 to 10",
                |n: &u32| *n <= 10,
            )?,
            mock_latency: Duration::from_millis(r.parse(
                "MOCK_MODEL_LATENCY_MS",
                "a whole number of milliseconds",
                |n: &u64| *n <= 600_000,
            )?),
            endpoint,
        };
        if mode == AgentMode::Production {
            reader::refuse_placeholder("OPENAI_API_KEY", model.api_key.as_ref())?;
        }
        if model.api_key.is_none()
            && let Some(host) = model
                .endpoint
                .as_deref()
                .and_then(|e| url::Url::parse(e).ok())
                .and_then(|u| u.host_str().map(str::to_string))
            && KEYED_HOSTS.contains(&host.as_str())
        {
            warnings.push(ConfigWarning {
                variable: "OPENAI_API_KEY".into(),
                message: format!(
                    "OPENAI_API_KEY is not set, and {host} refuses calls without a key: every run will fail until it is (set OPENAI_API_KEY, OPENAI_API_KEY_FILE or $SECRETS_DIR/openai_api_key)"
                ),
            });
        }

        let log_level = read_log_level(&mut r)?;
        let log_format = read_log_format(
            &mut r,
            match mode {
                AgentMode::Production => LogFormat::Json,
                AgentMode::Development => LogFormat::Text,
            },
        )?;

        let sandbox = sandbox::read_sandbox(&mut r)?;
        if mode == AgentMode::Production {
            reader::refuse_placeholder("SANDBOXD_TOKEN", sandbox.sandboxd_token.as_ref())?;
        }
        if sandbox.backend == SandboxBackendKind::Remote {
            if sandbox.remote_url.is_none() {
                return Err(invalid(
                    "SANDBOX_REMOTE_URL",
                    "is required when SANDBOX_BACKEND=remote (sandboxd's URL, such as http://sandboxd:7070)",
                ));
            }
            if sandbox.sandboxd_token.is_none() {
                return Err(invalid(
                    "SANDBOXD_TOKEN",
                    "is required when SANDBOX_BACKEND=remote (the token sandboxd was started with)",
                ));
            }
            if !sandbox.egress.is_empty() && sandbox.egress_dir.is_none() {
                return Err(invalid(
                    "SANDBOX_EGRESS_DIR",
                    "is required with SANDBOX_BACKEND=remote and SANDBOX_EGRESS_ALLOW: the folder where this server mounts the volume sandboxd mounts sandboxes' egress sockets from (SANDBOX_EGRESS_VOLUME on sandboxd)",
                ));
            }
        }

        let role = match r.text("AGENT_ROLE").to_ascii_lowercase().as_str() {
            "general" | "agent" => RoleKind::General,
            "planner" => RoleKind::Planner,
            "executor" => RoleKind::Executor,
            "critic" => RoleKind::Critic,
            other => {
                return Err(invalid(
                    "AGENT_ROLE",
                    format!("expected planner, executor, critic or general, got {other:?}"),
                ));
            }
        };
        let team = Team {
            executor_url: read_peer(&mut r, "EXECUTOR_URL", "http://executor:8000")?,
            critic_url: read_peer(&mut r, "CRITIC_URL", "http://critic:8000")?,
            delegate_timeout: r.seconds("DELEGATE_TIMEOUT_SECONDS", 86_400.0)?,
            max_plan_steps: r.parse(
                "MAX_PLAN_STEPS",
                "a whole number from 1 to 100",
                |n: &usize| (1..=100).contains(n),
            )?,
            executor_key: r.secret("EXECUTOR_API_KEY", "EXECUTOR_API_KEY_FILE")?,
            critic_key: r.secret("CRITIC_API_KEY", "CRITIC_API_KEY_FILE")?,
        };
        let peers = if role == RoleKind::Planner {
            let required = |name: &'static str, url: &Option<url::Url>, example: &str| {
                url.clone().ok_or_else(|| {
                    invalid(
                        name,
                        format!("is required when AGENT_ROLE=planner (e.g. {example})"),
                    )
                })
            };
            Some(bulkhead_agent::Peers {
                executor: required("EXECUTOR_URL", &team.executor_url, "http://executor:8000")?,
                critic: required("CRITIC_URL", &team.critic_url, "http://critic:8000")?,
                timeout: team.delegate_timeout,
                max_steps: team.max_plan_steps,
                executor_key: team.executor_key.clone(),
                critic_key: team.critic_key.clone(),
            })
        } else {
            None
        };

        let observability = observability::read(&mut r, mode)?;
        let system_prompt = r.raw("SYSTEM_PROMPT");
        let max_steps = r.parse("MAX_STEPS", "a whole number from 1 to 100", |n: &u32| {
            (1..=100).contains(n)
        })?;
        let approval_timeout = r.seconds("APPROVAL_TIMEOUT_SECONDS", 30.0 * 86_400.0)?;
        let agents_file = r.raw("AGENTS_FILE").map(std::path::PathBuf::from);
        let builtin_tools: Vec<String> = bulkhead_agent::ToolRegistry::with_sandbox_tools(
            std::sync::Arc::new(sandbox.egress.clone()),
        )
        .names()
        .map(str::to_string)
        .collect();
        let defaults = agents::Defaults {
            env,
            mode,
            model: &model,
            system_prompt: system_prompt.as_ref(),
            max_steps,
            limits: &sandbox.limits,
            builtin_tools: &builtin_tools,
        };
        let agents = match &agents_file {
            None => vec![agents::default_agent(&defaults)],
            Some(path) => agents::read_file(path, &defaults)?,
        };
        let config = Config {
            mode,
            auth_mode,
            admin_token,
            loopback_by_default,
            host,
            port,
            database_url,
            database_max_connections,
            database_connect_timeout,
            redis_url,
            model,
            log_level,
            log_format,
            role,
            peers,
            team,
            system_prompt,
            agents,
            agents_file,
            approval_timeout,
            enable_streaming: r.flag("ENABLE_STREAMING")?,
            cors_allowed_origins: cors_origins(r.raw("CORS_ALLOWED_ORIGINS"))?,
            enable_tracing: r.flag("ENABLE_TRACING")?,
            max_steps,
            max_body_bytes: r.parse(
                "MAX_BODY_BYTES",
                "a number of bytes from 1024 to 1073741824",
                |n: &usize| (1024..=1 << 30).contains(n),
            )?,
            shutdown_grace: r.seconds("SHUTDOWN_GRACE_SECONDS", 3600.0)?,
            run_lease: Duration::from_secs(r.parse(
                "RUN_LEASE_SECONDS",
                "a whole number of seconds from 2 to 300",
                |n: &u64| (2..=300).contains(n),
            )?),
            sandbox,
            observability,
            warnings,
            sources: HashMap::new(),
            sandboxd_listen,
            secrets_dir: env.secrets_dir.clone(),
        };
        Ok(Config {
            sources: r.sources,
            ..config
        })
    }

    /// Whether the in-process mock model stands in for a real one.
    pub fn uses_mock_model(&self) -> bool {
        self.model.endpoint.is_none()
    }

    pub fn database_backend(&self) -> Backend {
        // Validated in `from_env`.
        Backend::from_url(self.database_url.expose_secret()).unwrap_or(Backend::Sqlite)
    }
}

/// `DATABASE_URL` with `DATABASE_PASSWORD` put in, so that the password can
/// be a secret file of its own (the one PostgreSQL's image reads too).
fn with_password(url: &SecretString, password: &SecretString) -> Result<SecretString, ConfigError> {
    let mut parsed = url::Url::parse(url.expose_secret())
        .ok()
        .filter(|u| matches!(u.scheme(), "postgres" | "postgresql"))
        .ok_or_else(|| {
            invalid(
                "DATABASE_PASSWORD",
                "only applies to a postgres:// DATABASE_URL",
            )
        })?;
    if parsed.password().is_some() {
        return Err(invalid(
            "DATABASE_PASSWORD",
            "DATABASE_URL already holds a password: keep it in one place",
        ));
    }
    if parsed.username().is_empty() {
        return Err(invalid(
            "DATABASE_PASSWORD",
            "DATABASE_URL names no user to go with it (postgres://user@host/db)",
        ));
    }
    parsed
        .set_password(Some(password.expose_secret()))
        .map_err(|()| invalid("DATABASE_PASSWORD", "cannot be put in DATABASE_URL"))?;
    Ok(SecretString::from(parsed.to_string()))
}

/// Accepts tracing's levels and Python's names for them (`WARNING`,
/// `CRITICAL`), or a full tracing filter directive such as
/// `info,bulkhead_agent=debug`.
fn normalise_log_level(level: &str) -> Option<String> {
    let lower = level.trim().to_ascii_lowercase();
    let simple = match lower.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" | "off" => lower.clone(),
        "warning" => "warn".into(),
        "critical" | "fatal" => "error".into(),
        _ if lower.contains('=') => return Some(lower),
        _ => return None,
    };
    Some(simple)
}

/// `CORS_ALLOWED_ORIGINS`: `*`, or origins (`scheme://host[:port]`, no
/// path), comma-separated.
fn cors_origins(raw: Option<String>) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let mut origins = Vec::new();
    for origin in raw.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if origin == "*" {
            origins.push(origin.to_string());
            continue;
        }
        let parsed = url::Url::parse(origin).ok().filter(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.path() == "/"
                && !origin.ends_with('/')
                && u.query().is_none()
                && u.username().is_empty()
        });
        if parsed.is_none() {
            return Err(reader::invalid(
                "CORS_ALLOWED_ORIGINS",
                format!(
                    "{origin:?} is not an origin: write scheme://host[:port] (no path, no trailing slash), or *"
                ),
            ));
        }
        origins.push(origin.to_string());
    }
    if origins.len() > 1 && origins.iter().any(|o| o == "*") {
        return Err(reader::invalid(
            "CORS_ALLOWED_ORIGINS",
            "`*` allows every origin: give it alone, or list origins",
        ));
    }
    Ok(origins)
}
