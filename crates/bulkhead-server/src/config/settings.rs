//! The one table of settings: every variable Bulkhead reads, its default, what
//! it means, whether it is a secret and which commands read it. The reader
//! takes literal defaults from here, `bulkhead serve --help` and
//! `bulkhead sandboxd --help` print it, `bulkhead config` lists every row, the
//! unknown-variable warning knows these names, and a test keeps the README's
//! Configuration tables equal to it.

/// A setting's default, written as the README's default column shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// The value used when the variable is unset (`` `8000` `` in the README).
    Literal(&'static str),
    /// No value (`none`).
    None,
    /// A default that depends on something else, described in words.
    Note(&'static str),
}

impl Default {
    /// As the README's default column writes it.
    pub fn markdown(&self) -> String {
        match self {
            Default::Literal(value) => format!("`{value}`"),
            Default::None => "none".into(),
            Default::Note(note) => (*note).into(),
        }
    }
}

/// Which commands read a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `serve` (and `config`, `migrate`, `sandbox exec`, which read the same
    /// configuration).
    Server,
    /// `sandboxd` only.
    Sandboxd,
    /// Both.
    Both,
}

impl Scope {
    pub fn server(self) -> bool {
        matches!(self, Scope::Server | Scope::Both)
    }

    pub fn sandboxd(self) -> bool {
        matches!(self, Scope::Sandboxd | Scope::Both)
    }

    pub fn commands(self) -> &'static str {
        match self {
            Scope::Server => "serve",
            Scope::Sandboxd => "sandboxd",
            Scope::Both => "serve, sandboxd",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub default: Default,
    /// The README's meaning column (Markdown).
    pub meaning: &'static str,
    /// Read from `<NAME>`, `<NAME>_FILE` or the secrets folder, never shown.
    pub secret: bool,
    pub scope: Scope,
}

/// The setting called `name`.
pub fn find(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Older spellings still read, and the setting that replaced each.
pub const ALIASES: &[(&str, &str)] = &[("SANDBOX_EGRESS_SOCKET", "SANDBOX_EGRESS_DIR")];

/// Every name Bulkhead reads: the settings, `<NAME>_FILE` of each secret,
/// and the older spellings.
pub fn known_names() -> impl Iterator<Item = String> {
    SETTINGS
        .iter()
        .flat_map(|s| {
            let file = s.secret.then(|| format!("{}_FILE", s.name));
            std::iter::once(s.name.to_string()).chain(file)
        })
        .chain(ALIASES.iter().map(|(old, _)| old.to_string()))
}

/// The settings a command reads, as `--help` shows them: name, default,
/// meaning (Markdown's backticks dropped), wrapped to `width`.
pub fn help(sandboxd: bool, width: usize) -> String {
    let mut text = String::from(
        "Settings (environment variables, over a .env file in the working directory; \
         a secret can also come from the file <NAME>_FILE names, or from \
         $SECRETS_DIR/<name>):\n",
    );
    for setting in SETTINGS {
        if !(if sandboxd {
            setting.scope.sandboxd()
        } else {
            setting.scope.server()
        }) {
            continue;
        }
        let default = match setting.default {
            Default::Literal(value) => format!("[default: {value}]"),
            Default::None => "[default: none]".into(),
            Default::Note(note) => format!("[default: {}]", note.replace('`', "")),
        };
        let secret = if setting.secret { " [secret]" } else { "" };
        text.push_str(&format!("\n  {}  {default}{secret}\n", setting.name));
        for line in wrap(&setting.meaning.replace('`', ""), width.saturating_sub(6)) {
            text.push_str(&format!("      {line}\n"));
        }
    }
    text
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// In the README's order: its Configuration table, its sandbox table, then
/// its Observability table.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "AGENT_MODE",
        default: Default::Literal("development"),
        meaning: "`development` or `production`. Production refuses to start without `MODEL_ENDPOINT` and logs JSON",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MODEL_ENDPOINT",
        default: Default::None,
        meaning: "OpenAI-compatible base URL (`https://api.openai.com/v1`, vLLM, Ollama, llama.cpp, LiteLLM…). A URL copied with a call's path (`…/v1/chat/completions`) is cut back to its base, with a warning. Unset in development: the built-in mock model",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MODEL_NAME",
        default: Default::Literal("gpt-4o-mini"),
        meaning: "model sent with each request",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "OPENAI_API_KEY",
        default: Default::None,
        meaning: "bearer key for the model endpoint (secret, see below)",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "TEMPERATURE",
        default: Default::Literal("0.7"),
        meaning: "0 to 2",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MAX_TOKENS",
        default: Default::Literal("4096"),
        meaning: "per model call",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MAX_STEPS",
        default: Default::Literal("8"),
        meaning: "model calls allowed per run (1–100)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MODEL_TIMEOUT_SECONDS",
        default: Default::Literal("60"),
        meaning: "bound on one attempt, request to last streamed byte",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MODEL_MAX_RETRIES",
        default: Default::Literal("3"),
        meaning: "retries on 429, 5xx and connection errors, with jittered exponential backoff (250 ms doubling, capped at 8 s) or the server's `Retry-After` (up to 60 s) when longer. A stream that already produced text is not retried. Timeouts are not retried",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "SYSTEM_PROMPT",
        default: Default::None,
        meaning: "prepended to every conversation",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "AGENTS_FILE",
        default: Default::None,
        meaning: "a YAML file declaring the server's agents, each with its prompt, model, tools, MCP servers, sandbox limits, step budget and approval policy ([Agents](#agents)); unset: one agent, `default`, made of the settings above",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "APPROVAL_TIMEOUT_SECONDS",
        default: Default::Literal("3600"),
        meaning: "how long a tool call an agent's policy marks `ask` waits for a person; unanswered, it is denied",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "AUTH_MODE",
        default: Default::Note("`keys` in production, `none` in development"),
        meaning: "`keys`: every route but the probes, `/metrics`, `/openapi.json` and `/docs` needs an API key (`bulkhead keys create`); `none`: no authentication (production accepts it only when set explicitly)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "ADMIN_TOKEN",
        default: Default::None,
        meaning: "opens `/admin/keys` to `Authorization: Bearer <token>` (secret, at least 24 characters); unset, the admin API is off",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "HOST",
        default: Default::Note("`0.0.0.0`; `127.0.0.1` when `AUTH_MODE=none`"),
        meaning: "listen address; an unauthenticated server listens on loopback unless `HOST` says otherwise",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "PORT",
        default: Default::Literal("8000"),
        meaning: "listen port (`0` picks one; the `listening` log line has it)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "DATABASE_URL",
        default: Default::Literal("sqlite://data/bulkhead.db"),
        meaning: "`sqlite://path` (file and folder created, WAL) or `postgres://user:pass@host/db` (secret)",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "DATABASE_PASSWORD",
        default: Default::None,
        meaning: "put into a `postgres://user@host/db` URL that has no password (secret: `/run/secrets/database_password` is the file PostgreSQL's image reads too)",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "DATABASE_MAX_CONNECTIONS",
        default: Default::Literal("10"),
        meaning: "PostgreSQL pool size, or SQLite reader connections (SQLite has one writer)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "DATABASE_CONNECT_TIMEOUT_SECONDS",
        default: Default::Literal("30"),
        meaning: "how long start-up waits for PostgreSQL to accept connections (each failed attempt is logged with its cause). An SQLite path is not waited for: one the server cannot write stops start-up at once, naming the path, the uid and the fix",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "ENABLE_STREAMING",
        default: Default::Literal("true"),
        meaning: "`false` turns stream requests into `400 streaming_disabled`",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "CORS_ALLOWED_ORIGINS",
        default: Default::None,
        meaning: "browser origins allowed to call the API (CORS), comma-separated (`https://chat.example.com`), or `*`; unset, no cross-origin request is allowed. Allowed origins may send the key headers and `Last-Event-ID` and read `Content-Location` and `Location` (how LangGraph's browser clients, such as Agent Chat UI, follow a run)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "ENABLE_TRACING",
        default: Default::Literal("false"),
        meaning: "also log each request's and run's duration when it ends",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MAX_BODY_BYTES",
        default: Default::Literal("1048576"),
        meaning: "request body limit",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "SHUTDOWN_GRACE_SECONDS",
        default: Default::Literal("8"),
        meaning: "how long runs in flight may finish after SIGTERM (under Docker's 10 s)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "LOG_LEVEL",
        default: Default::Literal("info"),
        meaning: "`trace`…`error` (`WARNING`, `CRITICAL` accepted) or a tracing filter such as `info,bulkhead_agent=debug`",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "LOG_FORMAT",
        default: Default::Note("`json` in production, `text` in development"),
        meaning: "JSON lines or readable text, on stdout, unbuffered",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "AGENT_ROLE",
        default: Default::Literal("general"),
        meaning: r#"`planner`, `executor`, `critic` or `general`: see "Several agents" below"#,
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "EXECUTOR_URL",
        default: Default::None,
        meaning: "a planner's executor (required with `AGENT_ROLE=planner`), e.g. `http://executor:8000`",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "CRITIC_URL",
        default: Default::None,
        meaning: "a planner's critic (required with `AGENT_ROLE=planner`), e.g. `http://critic:8000`",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "EXECUTOR_API_KEY",
        default: Default::None,
        meaning: "the API key a planner sends its executor, when the executor requires keys (secret)",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "CRITIC_API_KEY",
        default: Default::None,
        meaning: "the API key a planner sends its critic, when the critic requires keys (secret)",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "DELEGATE_TIMEOUT_SECONDS",
        default: Default::Literal("300"),
        meaning: "how long a planner waits for one peer's answer",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MAX_PLAN_STEPS",
        default: Default::Literal("8"),
        meaning: "steps a planner takes from a plan (the rest are dropped, and the `plan` event says how many)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "MOCK_MODEL_LATENCY_MS",
        default: Default::Literal("0"),
        meaning: "delay of the in-process mock model (for demos and load tests)",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "REDIS_URL",
        default: Default::None,
        meaning: "checked by `/ready` (secret); with several replicas, the link between them: each run's events reach followers on every replica live (pub/sub), a cancel reaches the replica running the run, and the per-key limit counters are shared (without it, limits are per process and a run on another replica is followed by polling the database); session locks and run leases stay in the database",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "RUN_LEASE_SECONDS",
        default: Default::Literal("10"),
        meaning: "on PostgreSQL, how long a replica's runs stay its own without it renewing its lease (every third of it); when a replica dies, another one ends its runs `interrupted` (`replica_lost`) and frees their sessions within this time. From 2 to 300",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "SECRETS_DIR",
        default: Default::Literal("/run/secrets"),
        meaning: "where secret files are looked for",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_BACKEND",
        default: Default::Literal("namespace"),
        meaning: "`namespace`, `docker` or `remote`",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_MEMORY",
        default: Default::Literal("256m"),
        meaning: "memory per call, no swap",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_CPUS",
        default: Default::Literal("1"),
        meaning: "CPU quota per call",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_PIDS",
        default: Default::Literal("128"),
        meaning: "processes and threads per call",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_TIMEOUT_SECONDS",
        default: Default::Literal("30"),
        meaning: "wall-clock limit per call",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_OUTPUT_LIMIT",
        default: Default::Literal("64k"),
        meaning: "stdout and stderr kept per call, each",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_DISK",
        default: Default::Literal("128m"),
        meaning: "size of the workspace and of /tmp, each",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_IDLE_SECONDS",
        default: Default::Literal("600"),
        meaning: "an unused session sandbox is destroyed after this",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_ROOT",
        default: Default::Literal("data/sandboxes"),
        meaning: "where workspaces live on the host",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_HOST_UID",
        default: Default::Literal("100000"),
        meaning: "host uid and gid sandboxed programs run as when the server is root",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_CGROUP",
        default: Default::Literal("bulkhead"),
        meaning: "the cgroup (under `/sys/fs/cgroup`, or each controller's folder on v1) each call's cgroup is made in; root makes it, another user needs it delegated (see \"Running without root\")",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_HELPER",
        default: Default::Note("this executable"),
        meaning: "the namespace backend's helper (`bulkhead __sandbox-helper`)",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_IMAGE",
        default: Default::Literal("bulkhead-sandbox:0.1"),
        meaning: "the docker backend's image (`scripts/ensure-images` builds it from `deploy/sandbox/Dockerfile`)",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_RUNTIME",
        default: Default::Note("engine default"),
        meaning: "the docker backend's OCI runtime, e.g. `runsc`",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_SCOPE",
        default: Default::Literal("bulkhead"),
        meaning: "the docker backend's label value; start-up removes orphans of this scope only",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "DOCKER_HOST",
        default: Default::Literal("unix:///var/run/docker.sock"),
        meaning: "the engine's socket (unix sockets only)",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_EGRESS_ALLOW",
        default: Default::None,
        meaning: "destinations sandboxes may reach through the egress proxy: `api.github.com,*.pypi.org,10.0.0.5:8080,10.20.0.0/16:443`; names reach public addresses only, internal ones only by address or CIDR (see Egress)",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_EGRESS_DIR",
        default: Default::Note("`$SANDBOX_ROOT/.egress`"),
        meaning: "absolute folder where the egress proxy makes each sandbox's socket (required with the remote backend and an allowlist: a folder in the volume sandboxd mounts them from). `SANDBOX_EGRESS_SOCKET=<dir>/egress.sock`, the older spelling, is still read",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_EGRESS_VOLUME",
        default: Default::None,
        meaning: "docker backend (sandboxd): the named volume holding the egress sockets; each sandbox gets its own mounted read-only at `/run/bulkhead/egress.sock` from there instead of from a host path",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOX_REMOTE_URL",
        default: Default::None,
        meaning: "the remote backend's sandboxd, e.g. `http://sandboxd:7070`",
        secret: false,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOXD_TOKEN",
        default: Default::None,
        meaning: "the token sandboxd requires and the remote backend presents (secret; at least 24 characters)",
        secret: true,
        scope: Scope::Both,
    },
    Setting {
        name: "SANDBOXD_HOST",
        default: Default::Literal("0.0.0.0"),
        meaning: "the address `bulkhead sandboxd` listens on",
        secret: false,
        scope: Scope::Sandboxd,
    },
    Setting {
        name: "SANDBOXD_PORT",
        default: Default::Literal("7070"),
        meaning: "the port `bulkhead sandboxd` listens on",
        secret: false,
        scope: Scope::Sandboxd,
    },
    Setting {
        name: "ENABLE_METRICS",
        default: Default::Literal("true"),
        meaning: "serve Prometheus metrics at `GET /metrics`; `false` records none and `/metrics` answers 404",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "METRICS_TOKEN",
        default: Default::None,
        meaning: "when set, `/metrics` answers only requests with `Authorization: Bearer <token>` (secret); unset, it is open",
        secret: true,
        scope: Scope::Server,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: Default::None,
        meaning: "OTLP/HTTP collector base URL (`http://otel-collector:4318`): spans are POSTed as protobuf to `<base>/v1/traces`. Unset: no spans are exported",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        default: Default::None,
        meaning: "the full URL spans are POSTed to, used as it is; wins over `OTEL_EXPORTER_OTLP_ENDPOINT`",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "OTEL_SERVICE_NAME",
        default: Default::Literal("bulkhead"),
        meaning: "`service.name` of the exported spans",
        secret: false,
        scope: Scope::Server,
    },
    Setting {
        name: "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        default: Default::Literal("false"),
        meaning: "`true` puts message contents, tool arguments and tool results on the spans (`gen_ai.input.messages`, `gen_ai.output.messages`, `gen_ai.tool.call.arguments`, `gen_ai.tool.call.result`)",
        secret: false,
        scope: Scope::Server,
    },
];
