//! Configuration, read once at start from the environment (and `.env`, and
//! secret files), validated whole, and never read again. An invalid value
//! stops the process with one line naming the variable.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_agent::RoleKind;
use bulkhead_store::Backend;
use secrecy::{ExposeSecret, SecretString};

/// Where secret files are looked for when neither `<NAME>` nor `<NAME>_FILE`
/// is set: Docker and Kubernetes mount secrets here.
pub const DEFAULT_SECRETS_DIR: &str = "/run/secrets";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/bulkhead.db";
/// Built from `deploy/sandbox/Dockerfile` (`scripts/ensure-images`).
pub const DEFAULT_SANDBOX_IMAGE: &str = "bulkhead-sandbox:0.1";

/// A configuration problem, always about one variable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

fn invalid(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        message: message.into(),
    }
}

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

/// Where a value came from, for `bulkhead config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Environment,
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Environment => f.write_str("environment"),
            Source::File(path) => write!(f, "file {}", path.display()),
        }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxBackendKind {
    Namespace,
    Docker,
    /// Sandboxes made by a `bulkhead sandboxd` elsewhere.
    Remote,
}

impl SandboxBackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxBackendKind::Namespace => "namespace",
            SandboxBackendKind::Docker => "docker",
            SandboxBackendKind::Remote => "remote",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub backend: SandboxBackendKind,
    pub limits: bulkhead_sandbox::Limits,
    /// Where session workspaces live on the host.
    pub root: PathBuf,
    /// Host uid and gid sandboxed programs run as when the server is root.
    pub host_uid: u32,
    /// A session's sandbox unused this long is destroyed.
    pub idle: Duration,
    /// The namespace backend's helper executable (default: this binary).
    pub helper: Option<PathBuf>,
    /// The docker backend's image, OCI runtime, engine socket and scope.
    pub image: String,
    pub runtime: Option<String>,
    pub docker_host: Option<String>,
    pub scope: String,
    /// Hosts sandboxed programs may reach through the egress proxy.
    pub egress: bulkhead_sandbox::egress::EgressPolicy,
    /// Where the egress proxy makes each sandbox's socket (default
    /// `$SANDBOX_ROOT/.egress`).
    pub egress_dir: Option<PathBuf>,
    /// The docker backend's named volume holding the egress sockets, each
    /// mounted into its sandbox from there instead of from a host path
    /// (sandboxd in a container).
    pub egress_volume: Option<String>,
    /// The remote backend's sandboxd, and the token both sides hold.
    pub remote_url: Option<url::Url>,
    pub sandboxd_token: Option<SecretString>,
}

/// `bulkhead sandboxd`: where it listens, the token it requires, and the
/// local backend (and ceilings) it serves.
#[derive(Debug, Clone)]
pub struct SandboxdConfig {
    pub host: IpAddr,
    pub port: u16,
    pub token: SecretString,
    pub sandbox: SandboxConfig,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// Shorter tokens are refused: the token is all that stands between a
/// network neighbour and the engine.
pub const MIN_SANDBOXD_TOKEN_LEN: usize = 24;

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: AgentMode,
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
    pub system_prompt: Option<String>,
    pub enable_streaming: bool,
    pub enable_tracing: bool,
    pub max_steps: u32,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub sandbox: SandboxConfig,
    sources: HashMap<&'static str, Source>,
}

/// The variables Bulkhead reads: process environment over `.env`, plus a
/// folder of secret files.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
    secrets_dir: PathBuf,
}

impl Environment {
    /// The process environment, over `.env` in the working directory when
    /// there is one (the environment wins). Nothing is written back.
    pub fn from_process() -> Result<Environment, ConfigError> {
        let mut vars = HashMap::new();
        match dotenvy::from_path_iter(".env") {
            Ok(entries) => {
                for entry in entries {
                    let (key, value) =
                        entry.map_err(|e| invalid(".env", format!("cannot be parsed: {e}")))?;
                    vars.insert(key, value);
                }
            }
            Err(e) if e.not_found() => {}
            Err(e) => return Err(invalid(".env", format!("cannot be read: {e}"))),
        }
        for (key, value) in std::env::vars_os() {
            if let (Ok(key), Ok(value)) = (key.into_string(), value.into_string()) {
                vars.insert(key, value);
            }
        }
        Ok(Environment::from_map(vars))
    }

    pub fn from_map(vars: HashMap<String, String>) -> Environment {
        let secrets_dir = vars
            .get("SECRETS_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SECRETS_DIR));
        Environment { vars, secrets_dir }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Environment {
        Environment::from_map(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A variable's value; empty counts as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }
}

/// Reads typed values and remembers where each came from.
struct Reader<'a> {
    env: &'a Environment,
    sources: HashMap<&'static str, Source>,
}

impl Reader<'_> {
    fn raw(&mut self, name: &'static str) -> Option<String> {
        let value = self.env.get(name).map(|v| v.trim().to_string());
        self.sources.insert(
            name,
            if value.is_some() {
                Source::Environment
            } else {
                Source::Default
            },
        );
        value
    }

    fn parse<T: std::str::FromStr>(
        &mut self,
        name: &'static str,
        default: T,
        expected: &str,
        valid: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(text) => match text.parse::<T>() {
                Ok(value) if valid(&value) => Ok(value),
                _ => Err(invalid(name, format!("expected {expected}, got {text:?}"))),
            },
        }
    }

    fn flag(&mut self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(text) => match text.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(invalid(
                    name,
                    format!("expected true or false, got {text:?}"),
                )),
            },
        }
    }

    fn seconds(
        &mut self,
        name: &'static str,
        default: f64,
        max: f64,
    ) -> Result<Duration, ConfigError> {
        let seconds = self.parse(
            name,
            default,
            &format!("a number of seconds above 0 and at most {max}"),
            |s: &f64| s.is_finite() && *s > 0.0 && *s <= max,
        )?;
        Ok(Duration::from_secs_f64(seconds))
    }

    /// A size in bytes, written as `268435456`, `256m`, `64k` or `1g`.
    fn size(&mut self, name: &'static str, default: u64, min: u64) -> Result<u64, ConfigError> {
        let Some(text) = self.raw(name) else {
            return Ok(default);
        };
        let lower = text.to_ascii_lowercase();
        let lower = lower.trim_end_matches('b');
        let (digits, unit) = match lower.char_indices().last() {
            Some((i, 'k')) => (&lower[..i], 1u64 << 10),
            Some((i, 'm')) => (&lower[..i], 1 << 20),
            Some((i, 'g')) => (&lower[..i], 1 << 30),
            _ => (lower, 1),
        };
        digits
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .filter(|bytes| *bytes >= min)
            .ok_or_else(|| {
                invalid(
                    name,
                    format!("expected a size of at least {min} bytes such as 256m, 64k or 1g, got {text:?}"),
                )
            })
    }

    /// `<NAME>`, else the file `<NAME>_FILE` names, else
    /// `<secrets dir>/<name>`. Setting both of the first two is an error.
    fn secret(
        &mut self,
        name: &'static str,
        file_var: &'static str,
    ) -> Result<Option<SecretString>, ConfigError> {
        let direct = self.env.get(name);
        let file = self.env.get(file_var);
        let (value, source) = match (direct, file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    name,
                    format!("set either {name} or {file_var}, not both"),
                ));
            }
            (Some(value), None) => (Some(value.to_string()), Source::Environment),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let value = read_secret_file(&path).map_err(|e| {
                    invalid(file_var, format!("cannot read {}: {e}", path.display()))
                })?;
                (Some(value), Source::File(path))
            }
            (None, None) => {
                let path = self.env.secrets_dir.join(name.to_ascii_lowercase());
                match read_secret_file(&path) {
                    Ok(value) => (Some(value), Source::File(path)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, Source::Default),
                    Err(e) => {
                        return Err(invalid(
                            name,
                            format!("cannot read {}: {e}", path.display()),
                        ));
                    }
                }
            }
        };
        self.sources.insert(name, source);
        Ok(value
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(SecretString::from))
    }
}

fn read_secret_file(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

fn read_sandbox(r: &mut Reader<'_>) -> Result<SandboxConfig, ConfigError> {
    let sandbox = SandboxConfig {
        backend: match r
            .raw("SANDBOX_BACKEND")
            .map(|b| b.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("namespace") => SandboxBackendKind::Namespace,
            Some("docker") => SandboxBackendKind::Docker,
            Some("remote") => SandboxBackendKind::Remote,
            Some(other) => {
                return Err(invalid(
                    "SANDBOX_BACKEND",
                    format!("expected namespace, docker or remote, got {other:?}"),
                ));
            }
        },
        limits: bulkhead_sandbox::Limits {
            memory_bytes: r.size("SANDBOX_MEMORY", 256 << 20, 4 << 20)?,
            cpus: r.parse(
                "SANDBOX_CPUS",
                1.0f64,
                "a number of CPUs from 0.01 to 256",
                |c| (0.01..=256.0).contains(c),
            )?,
            pids: r.parse(
                "SANDBOX_PIDS",
                128u32,
                "a whole number from 4 to 100000",
                |n| (4..=100_000).contains(n),
            )?,
            timeout: r.seconds("SANDBOX_TIMEOUT_SECONDS", 30.0, 86_400.0)?,
            output_bytes: r.size("SANDBOX_OUTPUT_LIMIT", 64 << 10, 256)? as usize,
            disk_bytes: r.size("SANDBOX_DISK", 128 << 20, 1 << 20)?,
        },
        root: r
            .raw("SANDBOX_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data/sandboxes")),
        host_uid: r.parse(
            "SANDBOX_HOST_UID",
            100_000u32,
            "a uid from 1 to 4294967294",
            |u| *u >= 1 && *u < u32::MAX,
        )?,
        idle: r.seconds("SANDBOX_IDLE_SECONDS", 600.0, 7.0 * 86_400.0)?,
        helper: r.raw("SANDBOX_HELPER").map(PathBuf::from),
        image: r
            .raw("SANDBOX_IMAGE")
            .unwrap_or_else(|| DEFAULT_SANDBOX_IMAGE.to_string()),
        runtime: r.raw("SANDBOX_RUNTIME"),
        docker_host: match r.raw("DOCKER_HOST") {
            Some(host) if host.starts_with("unix://") => Some(host),
            Some(host) => {
                return Err(invalid(
                    "DOCKER_HOST",
                    format!("expected a unix:// socket, got {host:?}"),
                ));
            }
            None => None,
        },
        scope: r.raw("SANDBOX_SCOPE").unwrap_or_else(|| "bulkhead".into()),
        egress: bulkhead_sandbox::egress::EgressPolicy::parse(
            &r.raw("SANDBOX_EGRESS_ALLOW").unwrap_or_default(),
        )
        .map_err(|e| invalid("SANDBOX_EGRESS_ALLOW", e))?,
        remote_url: match r.raw("SANDBOX_REMOTE_URL") {
            None => None,
            Some(text) => Some(
                url::Url::parse(&text)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .ok_or_else(|| {
                        invalid(
                            "SANDBOX_REMOTE_URL",
                            "expected an http:// or https:// URL such as http://sandboxd:7070",
                        )
                    })?,
            ),
        },
        sandboxd_token: r.secret("SANDBOXD_TOKEN", "SANDBOXD_TOKEN_FILE")?,
        egress_dir: match (r.raw("SANDBOX_EGRESS_DIR"), r.raw("SANDBOX_EGRESS_SOCKET")) {
            (Some(dir), _) => Some(PathBuf::from(dir)),
            // The older spelling named one socket; its folder now holds one
            // per sandbox.
            (None, Some(socket)) => match Path::new(&socket).parent() {
                Some(dir) if Path::new(&socket).file_name() == Some("egress.sock".as_ref()) => {
                    Some(dir.to_path_buf())
                }
                _ => {
                    return Err(invalid(
                        "SANDBOX_EGRESS_SOCKET",
                        "expected a path ending in /egress.sock; better, set SANDBOX_EGRESS_DIR to its folder",
                    ));
                }
            },
            (None, None) => None,
        },
        egress_volume: r.raw("SANDBOX_EGRESS_VOLUME"),
    };
    if sandbox
        .egress_dir
        .as_ref()
        .is_some_and(|dir| !dir.is_absolute())
    {
        return Err(invalid(
            "SANDBOX_EGRESS_DIR",
            "expected an absolute path (a folder in the volume sandboxd mounts sockets from, with the remote backend)",
        ));
    }
    if let Some(volume) = &sandbox.egress_volume
        && !bulkhead_sandbox_remote::is_valid_name(volume)
    {
        return Err(invalid(
            "SANDBOX_EGRESS_VOLUME",
            "expected a volume name: 1 to 128 letters, digits, '-', '_' or '.'",
        ));
    }
    if !bulkhead_sandbox_remote::is_valid_name(&sandbox.scope) {
        return Err(invalid(
            "SANDBOX_SCOPE",
            "expected 1 to 128 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(sandbox)
}

fn read_log_level(r: &mut Reader<'_>) -> Result<String, ConfigError> {
    let log_level = r.raw("LOG_LEVEL").unwrap_or_else(|| "info".into());
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

impl SandboxdConfig {
    /// sandboxd reads the same `SANDBOX_*` variables as `serve` (its limits
    /// are the ceilings of every sandbox it makes), plus `SANDBOXD_HOST`,
    /// `SANDBOXD_PORT` and the token it requires.
    pub fn from_env(env: &Environment) -> Result<SandboxdConfig, ConfigError> {
        let mut r = Reader {
            env,
            sources: HashMap::new(),
        };
        let host = r.parse(
            "SANDBOXD_HOST",
            IpAddr::from([0, 0, 0, 0]),
            "an IP address such as 0.0.0.0 or 127.0.0.1",
            |_| true,
        )?;
        let port = r.parse("SANDBOXD_PORT", 7070u16, "a port number (0-65535)", |_| {
            true
        })?;
        let sandbox = read_sandbox(&mut r)?;
        if sandbox.backend == SandboxBackendKind::Remote {
            return Err(invalid(
                "SANDBOX_BACKEND",
                "sandboxd makes sandboxes itself: expected namespace or docker",
            ));
        }
        let token = sandbox.sandboxd_token.clone().ok_or_else(|| {
            invalid(
                "SANDBOXD_TOKEN",
                "is required: sandboxd serves only clients that present it (or set SANDBOXD_TOKEN_FILE)",
            )
        })?;
        if token.expose_secret().len() < MIN_SANDBOXD_TOKEN_LEN {
            return Err(invalid(
                "SANDBOXD_TOKEN",
                format!(
                    "must be at least {MIN_SANDBOXD_TOKEN_LEN} characters (try `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(SandboxdConfig {
            host,
            port,
            token,
            sandbox,
            log_level: read_log_level(&mut r)?,
            log_format: read_log_format(&mut r, LogFormat::Json)?,
        })
    }
}

impl Config {
    /// Reads and validates everything; the first problem found is returned.
    pub fn from_env(env: &Environment) -> Result<Config, ConfigError> {
        let mut r = Reader {
            env,
            sources: HashMap::new(),
        };
        let mode = match r
            .raw("AGENT_MODE")
            .map(|m| m.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("development") | Some("dev") => AgentMode::Development,
            Some("production") | Some("prod") => AgentMode::Production,
            Some(other) => {
                return Err(invalid(
                    "AGENT_MODE",
                    format!("expected development or production, got {other:?}"),
                ));
            }
        };
        let host = r.parse(
            "HOST",
            IpAddr::from([0, 0, 0, 0]),
            "an IP address such as 0.0.0.0 or 127.0.0.1",
            |_| true,
        )?;
        let port = r.parse("PORT", 8000u16, "a port number (0-65535)", |_| true)?;

        let database_url = r
            .secret("DATABASE_URL", "DATABASE_URL_FILE")?
            .unwrap_or_else(|| SecretString::from(DEFAULT_DATABASE_URL));
        if Backend::from_url(database_url.expose_secret()).is_err() {
            return Err(invalid(
                "DATABASE_URL",
                "expected a sqlite:// or postgres:// URL",
            ));
        }
        let database_url = match r.secret("DATABASE_PASSWORD", "DATABASE_PASSWORD_FILE")? {
            None => database_url,
            Some(password) => with_password(&database_url, &password)?,
        };
        let database_max_connections = r.parse(
            "DATABASE_MAX_CONNECTIONS",
            10u32,
            "a whole number from 1 to 1000",
            |n| (1..=1000).contains(n),
        )?;
        let database_connect_timeout =
            r.seconds("DATABASE_CONNECT_TIMEOUT_SECONDS", 30.0, 3600.0)?;

        let redis_url = r.secret("REDIS_URL", "REDIS_URL_FILE")?;
        if let Some(url) = &redis_url {
            let url = url.expose_secret();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid("REDIS_URL", "expected a redis:// or rediss:// URL"));
            }
        }

        let endpoint = r.raw("MODEL_ENDPOINT");
        if let Some(endpoint) = &endpoint {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            if rest.is_none_or(|host| host.is_empty() || host.starts_with('/')) {
                return Err(invalid(
                    "MODEL_ENDPOINT",
                    "expected an http:// or https:// base URL such as https://api.openai.com/v1",
                ));
            }
        } else if mode == AgentMode::Production {
            return Err(invalid(
                "MODEL_ENDPOINT",
                "is required when AGENT_MODE=production (an OpenAI-compatible base URL such as https://api.openai.com/v1)",
            ));
        }
        let model = ModelConfig {
            name: r.raw("MODEL_NAME").unwrap_or_else(|| "gpt-4o-mini".into()),
            api_key: r.secret("OPENAI_API_KEY", "OPENAI_API_KEY_FILE")?,
            temperature: r.parse("TEMPERATURE", 0.7f32, "a number from 0 to 2", |t| {
                (0.0..=2.0).contains(t)
            })?,
            max_tokens: r.parse("MAX_TOKENS", 4096u32, "a whole number of at least 1", |n| {
                *n >= 1
            })?,
            timeout: r.seconds("MODEL_TIMEOUT_SECONDS", 60.0, 3600.0)?,
            max_retries: r.parse(
                "MODEL_MAX_RETRIES",
                3u32,
                "a whole number from 0 to 10",
                |n| *n <= 10,
            )?,
            mock_latency: Duration::from_millis(r.parse(
                "MOCK_MODEL_LATENCY_MS",
                0u64,
                "a whole number of milliseconds",
                |n| *n <= 600_000,
            )?),
            endpoint,
        };

        let log_level = read_log_level(&mut r)?;
        let log_format = read_log_format(
            &mut r,
            match mode {
                AgentMode::Production => LogFormat::Json,
                AgentMode::Development => LogFormat::Text,
            },
        )?;

        let sandbox = read_sandbox(&mut r)?;
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

        let role = match r
            .raw("AGENT_ROLE")
            .map(|role| role.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("general") | Some("agent") => RoleKind::General,
            Some("planner") => RoleKind::Planner,
            Some("executor") => RoleKind::Executor,
            Some("critic") => RoleKind::Critic,
            Some(other) => {
                return Err(invalid(
                    "AGENT_ROLE",
                    format!("expected planner, executor, critic or general, got {other:?}"),
                ));
            }
        };
        let peers = if role == RoleKind::Planner {
            let mut peer = |name: &'static str, example: &str| {
                let text = r.raw(name).ok_or_else(|| {
                    invalid(
                        name,
                        format!("is required when AGENT_ROLE=planner (e.g. {example})"),
                    )
                })?;
                let mut url = url::Url::parse(&text)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .ok_or_else(|| {
                        invalid(
                            name,
                            format!("expected an http:// base URL such as {example}"),
                        )
                    })?;
                // `join("agent")` must land under the base's path.
                if !url.path().ends_with('/') {
                    url.set_path(&format!("{}/", url.path()));
                }
                Ok::<_, ConfigError>(url)
            };
            let executor = peer("EXECUTOR_URL", "http://executor:8000")?;
            let critic = peer("CRITIC_URL", "http://critic:8000")?;
            Some(bulkhead_agent::Peers {
                executor,
                critic,
                timeout: r.seconds("DELEGATE_TIMEOUT_SECONDS", 300.0, 86_400.0)?,
                max_steps: r.parse(
                    "MAX_PLAN_STEPS",
                    8usize,
                    "a whole number from 1 to 100",
                    |n| (1..=100).contains(n),
                )?,
            })
        } else {
            None
        };

        let config = Config {
            mode,
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
            system_prompt: r.raw("SYSTEM_PROMPT"),
            enable_streaming: r.flag("ENABLE_STREAMING", true)?,
            enable_tracing: r.flag("ENABLE_TRACING", false)?,
            max_steps: r.parse("MAX_STEPS", 8u32, "a whole number from 1 to 100", |n| {
                (1..=100).contains(n)
            })?,
            max_body_bytes: r.parse(
                "MAX_BODY_BYTES",
                1024 * 1024usize,
                "a number of bytes from 1024 to 1073741824",
                |n| (1024..=1 << 30).contains(n),
            )?,
            shutdown_grace: r.seconds("SHUTDOWN_GRACE_SECONDS", 8.0, 3600.0)?,
            sandbox,
            sources: HashMap::new(),
        };
        Ok(Config {
            sources: r.sources,
            ..config
        })
    }

    /// The effective configuration as (variable, shown value, source), with
    /// every secret redacted.
    pub fn describe(&self) -> Vec<(&'static str, String, String)> {
        let secret = |value: &Option<SecretString>| match value {
            Some(_) => "[redacted]".to_string(),
            None => "(not set)".to_string(),
        };
        let optional = |value: &Option<String>| value.clone().unwrap_or_else(|| "(not set)".into());
        let rows: Vec<(&'static str, String)> = vec![
            ("AGENT_MODE", self.mode.as_str().into()),
            ("AGENT_ROLE", self.role.as_str().into()),
            (
                "EXECUTOR_URL",
                self.peers
                    .as_ref()
                    .map(|p| p.executor.to_string())
                    .unwrap_or_else(|| "(not set)".into()),
            ),
            (
                "CRITIC_URL",
                self.peers
                    .as_ref()
                    .map(|p| p.critic.to_string())
                    .unwrap_or_else(|| "(not set)".into()),
            ),
            ("HOST", self.host.to_string()),
            ("PORT", self.port.to_string()),
            (
                "DATABASE_URL",
                redact_url_password(self.database_url.expose_secret()),
            ),
            (
                "DATABASE_MAX_CONNECTIONS",
                self.database_max_connections.to_string(),
            ),
            (
                "DATABASE_CONNECT_TIMEOUT_SECONDS",
                self.database_connect_timeout.as_secs_f64().to_string(),
            ),
            (
                "REDIS_URL",
                self.redis_url
                    .as_ref()
                    .map(|u| redact_url_password(u.expose_secret()))
                    .unwrap_or_else(|| "(not set)".into()),
            ),
            (
                "MODEL_ENDPOINT",
                self.model
                    .endpoint
                    .as_deref()
                    .map(redact_url_password)
                    .unwrap_or_else(|| "(not set: built-in mock model)".into()),
            ),
            ("MODEL_NAME", self.model.name.clone()),
            ("OPENAI_API_KEY", secret(&self.model.api_key)),
            ("TEMPERATURE", self.model.temperature.to_string()),
            ("MAX_TOKENS", self.model.max_tokens.to_string()),
            (
                "MODEL_TIMEOUT_SECONDS",
                self.model.timeout.as_secs_f64().to_string(),
            ),
            ("MODEL_MAX_RETRIES", self.model.max_retries.to_string()),
            (
                "MOCK_MODEL_LATENCY_MS",
                self.model.mock_latency.as_millis().to_string(),
            ),
            ("MAX_STEPS", self.max_steps.to_string()),
            ("SYSTEM_PROMPT", optional(&self.system_prompt)),
            ("ENABLE_STREAMING", self.enable_streaming.to_string()),
            ("ENABLE_TRACING", self.enable_tracing.to_string()),
            ("MAX_BODY_BYTES", self.max_body_bytes.to_string()),
            (
                "SHUTDOWN_GRACE_SECONDS",
                self.shutdown_grace.as_secs_f64().to_string(),
            ),
            ("SANDBOX_BACKEND", self.sandbox.backend.as_str().into()),
            (
                "SANDBOX_MEMORY",
                self.sandbox.limits.memory_bytes.to_string(),
            ),
            ("SANDBOX_CPUS", self.sandbox.limits.cpus.to_string()),
            ("SANDBOX_PIDS", self.sandbox.limits.pids.to_string()),
            (
                "SANDBOX_TIMEOUT_SECONDS",
                self.sandbox.limits.timeout.as_secs_f64().to_string(),
            ),
            (
                "SANDBOX_OUTPUT_LIMIT",
                self.sandbox.limits.output_bytes.to_string(),
            ),
            ("SANDBOX_DISK", self.sandbox.limits.disk_bytes.to_string()),
            ("SANDBOX_ROOT", self.sandbox.root.display().to_string()),
            ("SANDBOX_HOST_UID", self.sandbox.host_uid.to_string()),
            (
                "SANDBOX_IDLE_SECONDS",
                self.sandbox.idle.as_secs_f64().to_string(),
            ),
            (
                "SANDBOX_HELPER",
                self.sandbox
                    .helper
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(this executable)".into()),
            ),
            ("SANDBOX_IMAGE", self.sandbox.image.clone()),
            (
                "SANDBOX_RUNTIME",
                self.sandbox
                    .runtime
                    .clone()
                    .unwrap_or_else(|| "(engine default)".into()),
            ),
            ("SANDBOX_SCOPE", self.sandbox.scope.clone()),
            (
                "SANDBOX_REMOTE_URL",
                self.sandbox
                    .remote_url
                    .as_ref()
                    .map(|u| redact_url_password(u.as_str()))
                    .unwrap_or_else(|| "(not set)".into()),
            ),
            ("SANDBOXD_TOKEN", secret(&self.sandbox.sandboxd_token)),
            (
                "SANDBOX_EGRESS_DIR",
                self.sandbox
                    .egress_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "($SANDBOX_ROOT/.egress)".into()),
            ),
            (
                "SANDBOX_EGRESS_VOLUME",
                self.sandbox
                    .egress_volume
                    .clone()
                    .unwrap_or_else(|| "(not set)".into()),
            ),
            (
                "DOCKER_HOST",
                self.sandbox
                    .docker_host
                    .clone()
                    .unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
            ),
            (
                "SANDBOX_EGRESS_ALLOW",
                if self.sandbox.egress.is_empty() {
                    "(none: no network)".into()
                } else {
                    self.sandbox.egress.to_string()
                },
            ),
            ("LOG_LEVEL", self.log_level.clone()),
            (
                "LOG_FORMAT",
                match self.log_format {
                    LogFormat::Json => "json".into(),
                    LogFormat::Text => "text".into(),
                },
            ),
        ];
        rows.into_iter()
            .map(|(name, value)| {
                let source = self
                    .sources
                    .get(name)
                    .cloned()
                    .unwrap_or(Source::Default)
                    .to_string();
                (name, value, source)
            })
            .collect()
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

/// `scheme://user:password@host/…` → `scheme://user:[redacted]@host/…`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    let shown = if userinfo.contains(':') {
        format!("{user}:[redacted]")
    } else {
        "[redacted]".to_string()
    };
    format!(
        "{}{}{}",
        &url[..authority_start],
        shown,
        &url[authority_start + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let mut pairs: Vec<(&str, &str)> = pairs.to_vec();
        let secrets = dir.path().to_str().unwrap().to_string();
        pairs.push(("SECRETS_DIR", &secrets));
        Config::from_env(&Environment::from_pairs(pairs))
    }

    #[test]
    fn defaults_match_the_tutorials() {
        let config = load(&[]).unwrap();
        assert_eq!(config.mode, AgentMode::Development);
        assert_eq!(config.port, 8000);
        assert_eq!(config.host.to_string(), "0.0.0.0");
        assert_eq!(config.model.name, "gpt-4o-mini");
        assert_eq!(config.model.temperature, 0.7);
        assert_eq!(config.model.max_tokens, 4096);
        assert_eq!(config.max_steps, 8);
        assert_eq!(config.shutdown_grace, Duration::from_secs(8));
        assert_eq!(config.max_body_bytes, 1 << 20);
        assert!(config.enable_streaming);
        assert!(config.uses_mock_model());
        assert_eq!(config.database_url.expose_secret(), DEFAULT_DATABASE_URL);
        assert_eq!(config.sandbox.backend, SandboxBackendKind::Namespace);
        assert_eq!(config.sandbox.limits, bulkhead_sandbox::Limits::default());
    }

    #[test]
    fn sandbox_sizes_take_units() {
        let config = load(&[
            ("SANDBOX_MEMORY", "512m"),
            ("SANDBOX_DISK", "1g"),
            ("SANDBOX_OUTPUT_LIMIT", "16k"),
        ])
        .unwrap();
        assert_eq!(config.sandbox.limits.memory_bytes, 512 << 20);
        assert_eq!(config.sandbox.limits.disk_bytes, 1 << 30);
        assert_eq!(config.sandbox.limits.output_bytes, 16 << 10);
    }

    #[test]
    fn production_needs_a_model_endpoint() {
        let error = load(&[("AGENT_MODE", "production")]).unwrap_err();
        assert_eq!(error.variable, "MODEL_ENDPOINT");
        let config = load(&[
            ("AGENT_MODE", "production"),
            ("MODEL_ENDPOINT", "https://api.openai.com/v1"),
        ])
        .unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn invalid_values_name_their_variable() {
        for (name, value) in [
            ("TEMPERATURE", "hot"),
            ("TEMPERATURE", "3"),
            ("MAX_TOKENS", "0"),
            ("PORT", "70000"),
            ("HOST", "not an ip"),
            ("AGENT_MODE", "staging"),
            ("ENABLE_STREAMING", "maybe"),
            ("MAX_STEPS", "0"),
            ("DATABASE_URL", "mysql://x"),
            ("MODEL_ENDPOINT", "api.openai.com"),
            ("LOG_LEVEL", "loud"),
            ("SHUTDOWN_GRACE_SECONDS", "-1"),
            ("SANDBOX_BACKEND", "chroot"),
            ("SANDBOX_MEMORY", "lots"),
            ("SANDBOX_MEMORY", "1k"),
            ("SANDBOX_EGRESS_ALLOW", "http://example.com/"),
            ("SANDBOX_PIDS", "0"),
        ] {
            let error = load(&[(name, value)]).unwrap_err();
            assert_eq!(error.variable, name, "{name}={value}: {error}");
        }
    }

    #[test]
    fn secrets_come_from_env_file_or_secrets_dir_and_are_never_described() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "sk-from-file\n").unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("openai_api_key"), "sk-from-secrets-dir").unwrap();
        let secrets_dir = secrets.to_str().unwrap();
        let key_path = key_file.to_str().unwrap();

        let from_file = Config::from_env(&Environment::from_pairs([
            ("OPENAI_API_KEY_FILE", key_path),
            ("SECRETS_DIR", secrets_dir),
        ]))
        .unwrap();
        assert_eq!(
            from_file.model.api_key.as_ref().unwrap().expose_secret(),
            "sk-from-file"
        );

        let from_dir =
            Config::from_env(&Environment::from_pairs([("SECRETS_DIR", secrets_dir)])).unwrap();
        assert_eq!(
            from_dir.model.api_key.as_ref().unwrap().expose_secret(),
            "sk-from-secrets-dir"
        );

        let both = Config::from_env(&Environment::from_pairs([
            ("OPENAI_API_KEY", "sk-env"),
            ("OPENAI_API_KEY_FILE", key_path),
            ("SECRETS_DIR", secrets_dir),
        ]))
        .unwrap_err();
        assert_eq!(both.variable, "OPENAI_API_KEY");
        assert!(!both.to_string().contains("sk-env"));

        let described = format!("{:?}", from_file.describe());
        assert!(!described.contains("sk-from-file"), "{described}");
        assert!(described.contains("[redacted]"));
        let debug = format!("{from_file:?}");
        assert!(
            !debug.contains("sk-from-file"),
            "Debug leaks the key: {debug}"
        );
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url_password("postgres://bulkhead:s3cret@db:5432/bulkhead"),
            "postgres://bulkhead:[redacted]@db:5432/bulkhead"
        );
        assert_eq!(
            redact_url_password("sqlite://data/bulkhead.db"),
            "sqlite://data/bulkhead.db"
        );
        assert_eq!(
            redact_url_password("redis://:pw@redis:6379/0"),
            "redis://:[redacted]@redis:6379/0"
        );
    }

    #[test]
    fn the_database_password_can_be_a_secret_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("database_password"), "p@ss/word\n").unwrap();
        let secrets_dir = dir.path().to_str().unwrap();
        let config = Config::from_env(&Environment::from_pairs([
            ("DATABASE_URL", "postgres://bulkhead@db:5432/bulkhead"),
            ("SECRETS_DIR", secrets_dir),
        ]))
        .unwrap();
        assert_eq!(
            config.database_url.expose_secret(),
            "postgres://bulkhead:p%40ss%2Fword@db:5432/bulkhead"
        );
        let described = format!("{:?}", config.describe());
        assert!(!described.contains("p%40ss"), "{described}");

        for (url, expected) in [
            (
                "postgres://bulkhead:other@db/bulkhead",
                "keep it in one place",
            ),
            ("postgres://db/bulkhead", "names no user"),
            ("sqlite://data/bulkhead.db", "postgres://"),
        ] {
            let error = Config::from_env(&Environment::from_pairs([
                ("DATABASE_URL", url),
                ("SECRETS_DIR", secrets_dir),
            ]))
            .unwrap_err();
            assert_eq!(error.variable, "DATABASE_PASSWORD");
            assert!(error.message.contains(expected), "{error}");
            assert!(!error.to_string().contains("p@ss"), "{error}");
        }
    }

    #[test]
    fn remote_sandboxes_and_sandboxd_need_a_url_and_a_strong_token() {
        let no_secrets = [("SECRETS_DIR", "/nonexistent")];
        let env = |pairs: &[(&'static str, &'static str)]| {
            Environment::from_pairs(no_secrets.iter().chain(pairs).copied())
        };
        let error = Config::from_env(&env(&[("SANDBOX_BACKEND", "remote")])).unwrap_err();
        assert_eq!(error.variable, "SANDBOX_REMOTE_URL");
        let error = Config::from_env(&env(&[
            ("SANDBOX_BACKEND", "remote"),
            ("SANDBOX_REMOTE_URL", "http://sandboxd:7070"),
        ]))
        .unwrap_err();
        assert_eq!(error.variable, "SANDBOXD_TOKEN");
        let error = Config::from_env(&env(&[
            ("SANDBOX_BACKEND", "remote"),
            ("SANDBOX_REMOTE_URL", "ftp://sandboxd"),
        ]))
        .unwrap_err();
        assert_eq!(error.variable, "SANDBOX_REMOTE_URL");
        let config = Config::from_env(&env(&[
            ("SANDBOX_BACKEND", "remote"),
            ("SANDBOX_REMOTE_URL", "http://sandboxd:7070"),
            ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
        ]))
        .unwrap();
        let described = format!("{:?}", config.describe());
        assert!(!described.contains("0123456789abcdef"), "{described}");
        let error = Config::from_env(&env(&[("SANDBOX_SCOPE", "a/b")])).unwrap_err();
        assert_eq!(error.variable, "SANDBOX_SCOPE");
        let remote = [
            ("SANDBOX_BACKEND", "remote"),
            ("SANDBOX_REMOTE_URL", "http://sandboxd:7070"),
            ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
            ("SANDBOX_EGRESS_ALLOW", "api.github.com"),
        ];
        let error = Config::from_env(&env(&remote)).unwrap_err();
        assert_eq!(error.variable, "SANDBOX_EGRESS_DIR", "{error}");
        let with_dir: Vec<_> = remote
            .iter()
            .copied()
            .chain([("SANDBOX_EGRESS_DIR", "/run/bulkhead-egress")])
            .collect();
        let config = Config::from_env(&env(&with_dir)).unwrap();
        assert_eq!(
            config.sandbox.egress_dir.as_deref(),
            Some(Path::new("/run/bulkhead-egress"))
        );
        // The older spelling names a socket in that folder.
        let with_socket: Vec<_> = remote
            .iter()
            .copied()
            .chain([("SANDBOX_EGRESS_SOCKET", "/run/bulkhead-egress/egress.sock")])
            .collect();
        let config = Config::from_env(&env(&with_socket)).unwrap();
        assert_eq!(
            config.sandbox.egress_dir.as_deref(),
            Some(Path::new("/run/bulkhead-egress"))
        );
        let error = Config::from_env(&env(&[("SANDBOX_EGRESS_SOCKET", "/tmp/proxy")])).unwrap_err();
        assert_eq!(error.variable, "SANDBOX_EGRESS_SOCKET");
        let error = Config::from_env(&env(&[("SANDBOX_EGRESS_DIR", "egress")])).unwrap_err();
        assert_eq!(error.variable, "SANDBOX_EGRESS_DIR");
        let error = Config::from_env(&env(&[("SANDBOX_EGRESS_VOLUME", "../x")])).unwrap_err();
        assert_eq!(error.variable, "SANDBOX_EGRESS_VOLUME");

        let error = SandboxdConfig::from_env(&env(&[])).unwrap_err();
        assert_eq!(error.variable, "SANDBOXD_TOKEN");
        let error = SandboxdConfig::from_env(&env(&[("SANDBOXD_TOKEN", "short")])).unwrap_err();
        assert!(error.message.contains("at least 24"), "{error}");
        assert!(!error.to_string().contains("short"), "{error}");
        let error = SandboxdConfig::from_env(&env(&[
            ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
            ("SANDBOX_BACKEND", "remote"),
        ]))
        .unwrap_err();
        assert_eq!(error.variable, "SANDBOX_BACKEND");
        let sandboxd = SandboxdConfig::from_env(&env(&[
            ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
            ("SANDBOX_BACKEND", "docker"),
            ("SANDBOXD_PORT", "7171"),
        ]))
        .unwrap();
        assert_eq!(sandboxd.port, 7171);
        assert_eq!(sandboxd.sandbox.backend, SandboxBackendKind::Docker);
    }
}
