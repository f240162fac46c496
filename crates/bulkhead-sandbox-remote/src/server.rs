//! sandboxd: a local backend served over HTTP to agent servers that hold a
//! shared token.

mod process;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bulkhead_sandbox::pool::SandboxPool;
use bulkhead_sandbox::{Backend, ExecResult, Limits, Probe, Sandbox, SandboxError};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

use crate::{ErrorBody, ErrorObject, RunRequest};

/// Makes the backend for one scope (its value of the sandbox label).
pub type BackendFactory =
    Box<dyn Fn(&str) -> Result<Arc<dyn Backend>, String> + Send + Sync + 'static>;

/// A file written through sandboxd arrives in one request body.
const MAX_BODY_BYTES: usize = 64 << 20;

pub struct Daemon {
    token_digest: [u8; 32],
    ceiling: Limits,
    factory: BackendFactory,
    backends: Mutex<HashMap<String, Arc<dyn Backend>>>,
    sandboxes: SandboxPool<(String, String)>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("ceiling", &self.ceiling)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// `ceiling` caps whatever limits a client asks for.
    pub fn new(token: &SecretString, ceiling: Limits, factory: BackendFactory) -> Arc<Daemon> {
        Arc::new(Daemon {
            token_digest: Sha256::digest(token.expose_secret().as_bytes()).into(),
            ceiling,
            factory,
            backends: Mutex::new(HashMap::new()),
            sandboxes: SandboxPool::new(),
        })
    }

    async fn backend(&self, scope: &str) -> Result<Arc<dyn Backend>, ApiError> {
        validate_name("scope", scope)?;
        let mut backends = self.backends.lock().await;
        if let Some(backend) = backends.get(scope) {
            return Ok(Arc::clone(backend));
        }
        let backend = (self.factory)(scope).map_err(|message| {
            tracing::error!(scope, error = %message, "cannot make a sandbox backend");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_unavailable",
                "sandboxd cannot make sandboxes (see its log)",
            )
        })?;
        backends.insert(scope.to_string(), Arc::clone(&backend));
        Ok(backend)
    }

    /// The sandbox, made with `limits` (capped) if sandboxd does not hold it.
    /// Never replaced while held: a client that wants a fresh one destroys
    /// it first (and a server starting anew clears its scope), so that no
    /// request can remove a container another request is using.
    async fn sandbox(
        &self,
        scope: &str,
        id: &str,
        limits: &Limits,
    ) -> Result<Arc<dyn Sandbox>, ApiError> {
        let backend = self.backend(scope).await?;
        validate_name("sandbox id", id)?;
        let limits = cap(limits, &self.ceiling);
        let made = self
            .sandboxes
            .get_or_create((scope.to_string(), id.to_string()), || async {
                let made = backend.create(id, &limits).await;
                match &made {
                    Ok(_) => tracing::info!(scope, id, ?limits, "sandbox made"),
                    Err(e) => tracing::warn!(scope, id, error = %e, "could not make a sandbox"),
                }
                made
            })
            .await?;
        Ok(made)
    }

    /// Destroys the sandboxes no request has used for `idle`: a server that
    /// went away for good does not leave its sandboxes running forever. A
    /// server that comes back gets a fresh sandbox on its next call.
    pub async fn reap_idle(&self, idle: std::time::Duration) {
        self.sandboxes.reap_idle(idle).await;
    }

    /// Destroys every sandbox sandboxd holds (at shutdown).
    pub async fn destroy_all(&self) {
        self.sandboxes.destroy_all().await;
    }

    fn token_matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.token_digest).into()
    }
}

/// The lower of each limit.
pub fn cap(asked: &Limits, ceiling: &Limits) -> Limits {
    Limits {
        memory_bytes: asked.memory_bytes.min(ceiling.memory_bytes),
        cpus: asked.cpus.min(ceiling.cpus),
        pids: asked.pids.min(ceiling.pids),
        timeout: asked.timeout.min(ceiling.timeout),
        output_bytes: asked.output_bytes.min(ceiling.output_bytes),
        disk_bytes: asked.disk_bytes.min(ceiling.disk_bytes),
    }
}

fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    if !crate::is_valid_name(name) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("the {what} must be 1 to 128 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

/// The HTTP API of sandboxd.
pub fn router(daemon: Arc<Daemon>) -> Router {
    let api = Router::new()
        .route("/v1/scopes/{scope}/probe", get(probe))
        .route("/v1/scopes/{scope}/ping", get(ping))
        .route("/v1/scopes/{scope}/sandboxes", delete(remove_orphans))
        .route(
            "/v1/scopes/{scope}/sandboxes/{id}",
            put(create).delete(destroy),
        )
        .route("/v1/scopes/{scope}/sandboxes/{id}/run", post(run))
        .route(
            "/v1/scopes/{scope}/sandboxes/{id}/processes",
            post(process::start),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&daemon),
            require_token,
        ));
    Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "healthy"})) }),
        )
        .merge(api)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(daemon)
}

/// Serves until `shutdown` completes, then destroys every sandbox. Meanwhile
/// sandboxes idle for `idle` are destroyed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    daemon: Arc<Daemon>,
    idle: std::time::Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper = tokio::spawn({
        let daemon = Arc::clone(&daemon);
        async move {
            let period = (idle / 2).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(30),
            );
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                daemon.reap_idle(idle).await;
            }
        }
    });
    let served = axum::serve(listener, router(Arc::clone(&daemon)))
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    daemon.destroy_all().await;
    served
}

async fn require_token(
    State(daemon): State<Arc<Daemon>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if daemon.token_matches(token) => next.run(request).await,
        _ => {
            tracing::warn!(path = %request.uri().path(), "refused a request without the right token");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid sandboxd token is required",
            )
            .into_response()
        }
    }
}

async fn probe(
    State(daemon): State<Arc<Daemon>>,
    Path(scope): Path<String>,
) -> Result<Json<Probe>, ApiError> {
    let backend = daemon.backend(&scope).await?;
    let mut probe = backend.probe().await?;
    probe.details.push("served by sandboxd".into());
    Ok(Json(probe))
}

/// Readiness of a client: sandboxd answers and accepts its token.
async fn ping(Path(scope): Path<String>) -> Result<StatusCode, ApiError> {
    validate_name("scope", &scope)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create(
    State(daemon): State<Arc<Daemon>>,
    Path((scope, id)): Path<(String, String)>,
    Json(limits): Json<Limits>,
) -> Result<Json<Limits>, ApiError> {
    let sandbox = daemon.sandbox(&scope, &id, &limits).await?;
    Ok(Json(sandbox.limits().clone()))
}

async fn run(
    State(daemon): State<Arc<Daemon>>,
    Path((scope, id)): Path<(String, String)>,
    Json(request): Json<RunRequest>,
) -> Result<Json<ExecResult>, ApiError> {
    request.operation.validate()?;
    let sandbox = daemon.sandbox(&scope, &id, &request.limits).await?;
    let result = sandbox.run(&request.operation).await?;
    tracing::info!(
        scope,
        id,
        op = operation_name(&request.operation),
        exit_code = result.exit_code,
        signal = result.signal,
        killed = result.killed_reason.map(|r| r.as_str()),
        duration_ms = result.duration_ms,
        "sandbox operation"
    );
    Ok(Json(result))
}

fn operation_name(operation: &bulkhead_sandbox::Operation) -> &'static str {
    use bulkhead_sandbox::Operation;
    match operation {
        Operation::Exec { .. } => "exec",
        Operation::ReadFile { .. } => "read_file",
        Operation::WriteFile { .. } => "write_file",
        Operation::ListDir { .. } => "list_dir",
    }
}

async fn destroy(
    State(daemon): State<Arc<Daemon>>,
    Path((scope, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate_name("scope", &scope)?;
    validate_name("sandbox id", &id)?;
    if let Some(sandbox) = daemon.sandboxes.take(&(scope.clone(), id.clone())).await {
        sandbox.destroy().await?;
        tracing::info!(scope, id, "sandbox destroyed");
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_orphans(
    State(daemon): State<Arc<Daemon>>,
    Path(scope): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let backend = daemon.backend(&scope).await?;
    daemon
        .sandboxes
        .forget(|(slot_scope, _)| *slot_scope == scope)
        .await;
    let removed = backend.remove_orphans().await?;
    Ok(Json(json!({"removed": removed})))
}

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<SandboxError> for ApiError {
    fn from(error: SandboxError) -> ApiError {
        match error {
            SandboxError::Invalid(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            }
            SandboxError::Unavailable(message) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_unavailable",
                message,
            ),
            SandboxError::Io(e) => {
                tracing::error!(error = %e, "sandbox I/O error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "sandbox_io",
                    "sandboxd hit an I/O error (see its log)",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorObject {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
