//! The application: what a running server holds, how it starts, and how it
//! stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_agent::{
    Agent, Agents, Engine, EngineSettings, PeerClient, SandboxManager, ToolPolicy, ToolRegistry,
};
use bulkhead_model::{MockModel, Model, ModelSettings, OpenAiClient};
use bulkhead_store::{Store, StoreOptions};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use crate::config::{AgentMode, Config};

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

pub struct App {
    pub config: Config,
    pub engine: Arc<Engine>,
    /// Keys, ownership and limits: see `door`.
    pub door: crate::door::Door,
    model_probe: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Checked by `/ready` when `REDIS_URL` is set.
    redis: Option<redis::Client>,
    /// The link to the other replicas, through that Redis.
    cluster: Option<Arc<crate::cluster::RedisCluster>>,
    /// Set on SIGTERM: `/ready` fails and every answer closes its
    /// connection (see `serve`).
    draining: std::sync::atomic::AtomicBool,
    /// This server's claim on its SQLite file and local sandbox root.
    _locks: Vec<crate::data_lock::DataLock>,
    /// Renders `/metrics`; `None` when metrics are off.
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// `METRICS_TOKEN`'s digest, when `/metrics` is behind it.
    metrics_token_digest: Option<[u8; 32]>,
    /// `/openapi.json` as this server serves it.
    openapi: bytes::Bytes,
}

/// How long a model-endpoint probe result is reused by `/ready`, so that
/// probes do not turn into a load on the model provider.
const PROBE_TTL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl App {
    /// Connects to the database (waiting for it up to
    /// `DATABASE_CONNECT_TIMEOUT_SECONDS`), migrates it and sets up the model.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let locks = lock_data(&config)?;
        // The database and the sandbox backend are set up side by side: the
        // first `/ready` waits for both, so start-up takes the longer of the
        // two rather than their sum.
        for warning in &config.warnings {
            tracing::warn!(variable = %warning.variable, "{}", warning.message);
        }
        let role = config.role;
        let database = async {
            let store = connect_store(&config).await?;
            let applied = store.migrate().await.context("database migration failed")?;
            tracing::info!(
                backend = store.backend().as_str(),
                migrations = applied,
                "database ready"
            );
            if store.backend() == bulkhead_store::Backend::Sqlite {
                let recovered = store
                    .recover_abandoned_runs(bulkhead_agent::now_ms())
                    .await
                    .context("could not recover runs left by a previous process")?;
                if recovered > 0 {
                    tracing::warn!(
                        runs = recovered,
                        "marked runs left unfinished by a previous process as interrupted"
                    );
                }
            }
            anyhow::Ok(store)
        };
        // Roles that run no tools need no sandbox: nothing to probe, nothing
        // to make, and no sandbox entry in /ready.
        let sandboxes = async {
            if role.uses_tools() {
                anyhow::Ok(Some(start_sandboxes(&config).await?))
            } else {
                tracing::info!(
                    role = role.as_str(),
                    "this role runs no tools: no sandbox backend"
                );
                Ok(None)
            }
        };
        let (store, sandboxes) = tokio::try_join!(database, sandboxes)?;
        // Which replica this process is, for the runs it executes: their
        // lease is its lease (PostgreSQL; nothing changes on SQLite).
        let replica = bulkhead_agent::new_id();
        let store = store.for_replica(&replica);
        if store.replica().is_some() {
            tracing::info!(
                replica = %replica,
                lease_s = config.run_lease.as_secs(),
                "runs executed here are held under this replica's lease"
            );
        }
        let redis = match &config.redis_url {
            None => None,
            Some(url) => {
                tracing::info!(
                    "REDIS_URL is set: per-key limits are counted there and runs are followed across replicas through it; /ready checks it"
                );
                // Parsing only; nothing connects until a limit or /ready asks.
                Some(
                    redis::Client::open(url.expose_secret())
                        .map_err(|_| anyhow::anyhow!("REDIS_URL: not a valid Redis URL"))?,
                )
            }
        };
        let agents = build_agents(&config)?;
        // A session lock outlives the longest silence of a healthy run: one
        // model call with all its retries, plus room for a tool call.
        let lock_ttl = config.model.timeout * (config.model.max_retries + 1)
            + Duration::from_secs(8) * config.model.max_retries
            + Duration::from_secs(120);
        let peers = match &config.peers {
            Some(peers) => Some(Arc::new(
                PeerClient::new(peers.clone()).map_err(|e| anyhow::anyhow!("{e}"))?,
            )),
            None => None,
        };
        let mut secrets: Vec<String> = Vec::new();
        for agent in &config.agents {
            secrets.extend(agent_secrets(agent));
        }
        if let Some(key) = &config.model.api_key {
            secrets.push(key.expose_secret().to_string());
        }
        for url in [Some(&config.database_url), config.redis_url.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(password) = url_password(url.expose_secret()) {
                secrets.push(password);
            }
        }
        let engine = Engine::new(
            store,
            agents,
            sandboxes,
            EngineSettings {
                approval_timeout: config.approval_timeout,
                egress: config.sandbox.egress.clone(),
                lock_ttl,
                lease: config.run_lease,
                secrets,
                role,
                peers,
                spans: bulkhead_agent::SpanSettings {
                    enabled: crate::observability::traces::enabled(),
                    capture_content: config.observability.capture_content,
                },
            },
        );
        let metrics = if config.observability.enable_metrics {
            crate::observability::metrics::install()
        } else {
            None
        };
        let metrics_token_digest = config
            .observability
            .metrics_token
            .as_ref()
            .map(crate::door::token_digest);
        announce_auth(&config);
        let door = crate::door::Door::new(
            config.auth_mode,
            engine.store().clone(),
            redis.clone(),
            config.admin_token.as_ref(),
            config.run_lease,
        );
        let engine = Arc::new(engine);
        let cluster = redis.clone().map(crate::cluster::RedisCluster::start);
        if let Some(cluster) = &cluster {
            cluster.attach(&engine);
        }
        spawn_approval_expiry(&engine);
        engine.spawn_lease_keeper();
        let openapi = crate::openapi::document_for(
            config.enable_streaming,
            &config
                .agents
                .iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>(),
        );
        Ok(App {
            openapi,
            config,
            engine,
            door,
            model_probe: Mutex::new(None),
            redis,
            cluster,
            draining: Default::default(),
            _locks: locks,
            metrics,
            metrics_token_digest,
        })
    }

    pub(crate) fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the server is stopping: from SIGTERM on.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst) || !self.engine.is_accepting()
    }

    /// The link to the other replicas, when `REDIS_URL` is set.
    pub(crate) fn cluster(&self) -> Option<&Arc<crate::cluster::RedisCluster>> {
        self.cluster.as_ref()
    }

    pub(crate) fn openapi_document(&self) -> &bytes::Bytes {
        &self.openapi
    }

    pub fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle> {
        self.metrics.as_ref()
    }

    pub(crate) fn metrics_token_digest(&self) -> Option<&[u8; 32]> {
        self.metrics_token_digest.as_ref()
    }

    /// Whether Redis answers a PING; `None` when no Redis is configured.
    pub async fn probe_redis(&self) -> Option<Result<(), String>> {
        let client = self.redis.as_ref()?;
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        Some(match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                // Only the kind: an error's text is not promised to leave
                // the URL's password out.
                tracing::warn!(kind = ?e.kind(), "readiness: redis check failed");
                Err("redis is not answering".into())
            }
            Err(_) => Err(format!(
                "redis did not answer within {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        })
    }

    /// Whether the model endpoint answers, cached for a few seconds.
    /// Whether every agent's model is the in-process mock.
    pub fn uses_only_mock_models(&self) -> bool {
        self.engine
            .agents()
            .iter()
            .all(|agent| agent.model.is_mock())
    }

    /// Probes each distinct model endpoint the agents use (one probe per
    /// endpoint, not per agent); the first failure is the answer.
    pub async fn probe_model(&self) -> Result<(), String> {
        let mut cached = self.model_probe.lock().await;
        if let Some((at, result)) = cached.as_ref()
            && at.elapsed() < PROBE_TTL
        {
            return result.clone();
        }
        let mut probed: Vec<&str> = Vec::new();
        let mut result = Ok(());
        for agent in self.engine.agents().iter() {
            let Model::Remote(client) = &*agent.model else {
                continue;
            };
            let endpoint = client.settings().endpoint.as_str();
            if probed.contains(&endpoint) {
                continue;
            }
            probed.push(endpoint);
            if let Err(e) = client.probe(PROBE_TIMEOUT).await {
                tracing::warn!(error = %e, agent = %agent.id, "model endpoint probe failed");
                let message = match e {
                    bulkhead_model::ModelError::Status { message, .. } => message,
                    bulkhead_model::ModelError::Timeout(_) => {
                        "the model endpoint did not answer in time".into()
                    }
                    _ => "the model endpoint is unreachable".into(),
                };
                result = Err(if self.engine.agents().iter().count() > 1 {
                    format!("agent {}: {message}", agent.id)
                } else {
                    message
                });
                break;
            }
        }
        *cached = Some((Instant::now(), result.clone()));
        result
    }
}

/// Says at start who may call this server, loudly when the answer is
/// "anyone who can reach it".
/// The engine's agents, from their configuration: a model client each (the
/// mock shared by those without an endpoint), the built-in tools each may
/// use (none for roles that run no tools; none its policy denies).
fn build_agents(config: &Config) -> anyhow::Result<Agents> {
    let role = config.role;
    let all_tools = if role.uses_tools() {
        ToolRegistry::with_sandbox_tools(Arc::new(config.sandbox.egress.clone()))
    } else {
        ToolRegistry::default()
    };
    let mut mock: Option<Arc<Model>> = None;
    let mut agents = Vec::with_capacity(config.agents.len());
    for agent in &config.agents {
        let model = match &agent.model.endpoint {
            Some(endpoint) => {
                tracing::info!(
                    agent = %agent.id,
                    endpoint = %crate::config::redact_url_password(endpoint),
                    model = %agent.model.name,
                    api_key = if agent.model.api_key.is_some() { "set" } else { "not set" },
                    "model endpoint"
                );
                Arc::new(Model::Remote(
                    OpenAiClient::new(ModelSettings {
                        endpoint: endpoint.clone(),
                        model: agent.model.name.clone(),
                        api_key: agent.model.api_key.clone(),
                        temperature: agent.model.temperature,
                        max_tokens: agent.model.max_tokens,
                        timeout: agent.model.timeout,
                        max_retries: agent.model.max_retries,
                        retry_base: Duration::from_millis(250),
                        retry_cap: Duration::from_secs(8),
                    })
                    .with_context(|| {
                        format!("agent {}: could not set up the model client", agent.id)
                    })?,
                ))
            }
            None => {
                debug_assert_eq!(config.mode, AgentMode::Development);
                Arc::clone(mock.get_or_insert_with(|| {
                    tracing::warn!(
                        "NO MODEL CONFIGURED: AGENT_MODE=development and MODEL_ENDPOINT is unset, so the built-in \
                         MOCK MODEL answers (it echoes). Set MODEL_ENDPOINT for a real model."
                    );
                    Arc::new(Model::Mock(MockModel::new(config.model.mock_latency)))
                }))
            }
        };
        if agent.model.endpoint.is_none() {
            tracing::info!(agent = %agent.id, endpoint = "built-in", model = "mock", "model endpoint");
        }
        let names: Vec<String> = match &agent.tools {
            Some(names) if role.uses_tools() => names.clone(),
            Some(_) => {
                tracing::warn!(agent = %agent.id, role = role.as_str(), "this role runs no tools: the agent's `tools` are ignored");
                Vec::new()
            }
            None => all_tools.names().map(str::to_string).collect(),
        };
        let offered: Vec<&String> = names
            .iter()
            .filter(|name| agent.approval.for_tool(name) != ToolPolicy::Deny)
            .collect();
        let tools = all_tools
            .subset(&offered)
            .map_err(|name| anyhow::anyhow!("agent {}: no built-in tool {name:?}", agent.id))?;
        let mcp_servers = if role.uses_tools() {
            agent
                .mcp_servers
                .iter()
                .map(mcp_server)
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| anyhow::anyhow!("agent {}: {e}", agent.id))?
        } else {
            Vec::new()
        };
        agents.push(Agent {
            id: agent.id.clone(),
            mcp_servers,
            name: agent.name.clone(),
            description: agent.description.clone(),
            system_prompt: agent.system_prompt.clone(),
            model,
            tools,
            limits: agent.limits.clone(),
            max_steps: agent.max_steps,
            approval: agent.approval.clone(),
        });
    }
    if let Some(file) = &config.agents_file {
        tracing::info!(file = %file.display(), agents = agents.len(), "agents from AGENTS_FILE");
    }
    Agents::new(agents).map_err(|e| anyhow::anyhow!("AGENTS_FILE: {e}"))
}

/// An MCP server as the engine's client takes it. Secret values are
/// handed over here and nowhere else.
fn mcp_server(
    spec: &crate::config::McpServerSpec,
) -> Result<bulkhead_mcp::McpServerConfig, String> {
    use crate::config::McpTransportSpec;
    let exposed = |secrets: &[(String, secrecy::SecretString)]| {
        secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.expose_secret().to_string()))
            .collect::<Vec<_>>()
    };
    let server = match &spec.transport {
        McpTransportSpec::Stdio {
            command,
            env,
            secret_env,
        } => {
            let mut all = env.clone();
            all.extend(exposed(secret_env));
            bulkhead_mcp::McpServerConfig::stdio(&spec.name, command.clone(), all)?
        }
        McpTransportSpec::Http {
            url,
            headers,
            secret_headers,
        } => {
            let mut all = headers.clone();
            all.extend(exposed(secret_headers));
            bulkhead_mcp::McpServerConfig::http(&spec.name, url.clone(), all)?
        }
    };
    let server = match &spec.tools {
        Some(tools) => server.with_tools(tools.iter().cloned())?,
        None => server,
    };
    server.with_timeouts(spec.startup_timeout, spec.call_timeout)
}

/// Values an agent holds that must never reach the audit trail.
fn agent_secrets(agent: &crate::config::AgentConfig) -> Vec<String> {
    use crate::config::McpTransportSpec;
    let mut secrets: Vec<String> = agent
        .model
        .api_key
        .iter()
        .map(|key| key.expose_secret().to_string())
        .collect();
    for server in &agent.mcp_servers {
        let values = match &server.transport {
            McpTransportSpec::Stdio { secret_env, .. } => secret_env,
            McpTransportSpec::Http { secret_headers, .. } => secret_headers,
        };
        secrets.extend(values.iter().map(|(_, v)| v.expose_secret().to_string()));
    }
    secrets
}

fn announce_auth(config: &Config) {
    use crate::door::AuthMode;
    match config.auth_mode {
        AuthMode::Keys => tracing::info!(
            admin_api = if config.admin_token.is_some() {
                "on"
            } else {
                "off"
            },
            "authentication: API keys required (create one with `bulkhead keys create --name NAME`)"
        ),
        AuthMode::None if config.loopback_by_default => tracing::warn!(
            "AUTHENTICATION IS OFF (AUTH_MODE=none): anyone who reaches this server can use it. \
             It listens on 127.0.0.1 only; set HOST=0.0.0.0 to accept connections from the network, \
             or AUTH_MODE=keys to require API keys"
        ),
        AuthMode::None => tracing::warn!(
            host = %config.host,
            "AUTHENTICATION IS OFF (AUTH_MODE=none) and HOST is set: anyone who reaches this address \
             can run tools and spend the model key. Set AUTH_MODE=keys to require API keys"
        ),
    }
}

/// Claims what this server alone may use, before anything touches it
/// (recovery of runs, orphan removal): the SQLite file, and the sandbox root
/// of a local backend. PostgreSQL is not locked: replicas share it on
/// purpose, and nothing they do at start assumes they are alone on it.
fn lock_data(config: &Config) -> anyhow::Result<Vec<crate::data_lock::DataLock>> {
    use crate::config::SandboxBackendKind;
    let mut locks = Vec::new();
    if let Some(file) = bulkhead_store::sqlite_file(config.database_url.expose_secret())? {
        locks.push(crate::data_lock::lock_database(&file)?);
    }
    let local = matches!(
        config.sandbox.backend,
        SandboxBackendKind::Namespace | SandboxBackendKind::Docker
    );
    if config.role.uses_tools() && local {
        locks.push(crate::data_lock::lock_sandbox_root(&config.sandbox.root)?);
    }
    Ok(locks)
}

/// The sandbox backend, cleared of what a previous process left, with its
/// first probe and the idle reaper started.
async fn start_sandboxes(config: &Config) -> anyhow::Result<Arc<SandboxManager>> {
    let backend = crate::sandbox::backend(config.sandbox.backend, &config.sandbox)
        .map_err(|e| anyhow::anyhow!("sandbox: {e}"))?;
    match backend.remove_orphans().await {
        Ok(0) => {}
        Ok(removed) => tracing::warn!(removed, "removed sandboxes left by a previous process"),
        Err(e) => {
            tracing::warn!(error = %e, "could not remove sandboxes left by a previous process")
        }
    }
    let sandboxes = Arc::new(SandboxManager::new(
        backend,
        config.sandbox.limits.clone(),
        config.sandbox.idle,
    ));
    // Tool calls lag the first sandbox probe by nothing: start it now.
    tokio::spawn({
        let sandboxes = Arc::clone(&sandboxes);
        async move {
            let _ = sandboxes.availability().await;
            let mut tick = tokio::time::interval(sandboxes.reap_interval());
            loop {
                tick.tick().await;
                sandboxes.reap_idle().await;
            }
        }
    });
    Ok(sandboxes)
}

/// Every second: denies the tool calls whose wait for a person is over
/// (any replica may: a call is decided once), and drops the MCP connections
/// of sessions gone idle. At start and every five seconds: starts the
/// queued runs whose session is free (queued before a restart, or by
/// another replica). Ends with the engine.
fn spawn_approval_expiry(engine: &Arc<Engine>) {
    let engine = Arc::downgrade(engine);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            let Some(engine) = engine.upgrade() else {
                break;
            };
            if engine.is_accepting() {
                engine.expire_approvals().await;
                if ticks.is_multiple_of(5) {
                    engine.dispatch_all().await;
                }
            }
            ticks += 1;
            engine.reap_idle_mcp();
        }
    });
}

/// The password of a `scheme://user:password@host/…` URL.
fn url_password(url: &str) -> Option<String> {
    let authority = url.split_once("://")?.1.split(['/', '?', '#']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    let password = userinfo.split_once(':')?.1;
    (!password.is_empty()).then(|| password.to_string())
}

/// Connects to the database. Only a network database is waited for: a
/// server that is not up yet may come; a local file that cannot be opened
/// will not change by itself, so that stops start-up at once.
async fn connect_store(config: &Config) -> anyhow::Result<Store> {
    use bulkhead_store::StoreError;
    let url = config.database_url.expose_secret();
    let options = StoreOptions {
        max_connections: config.database_max_connections,
        acquire_timeout: Duration::from_secs(5),
    };
    let network = config.database_backend() == bulkhead_store::Backend::Postgres;
    let deadline = Instant::now() + config.database_connect_timeout;
    let mut wait = Duration::from_millis(200);
    loop {
        match Store::connect(url, &options).await {
            Ok(store) => return Ok(store),
            Err(StoreError::NotWritable { path, source }) => {
                let folder = path.parent().unwrap_or(&path);
                return Err(crate::data_lock::refused(
                    &path,
                    folder,
                    "DATABASE_URL",
                    &source,
                ));
            }
            Err(e @ (StoreError::Database(_) | StoreError::ConnectTimeout(_)))
                if network && Instant::now() + wait < deadline =>
            {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "database not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "could not connect to the {} database",
                    config.database_backend().as_str()
                )));
            }
        }
    }
}
