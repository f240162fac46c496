//! One sandbox per session, made on the session's first sandboxed tool call
//! and destroyed when the session is deleted, after it has been idle for a
//! while, or when the server stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_sandbox::pool::SandboxPool;
use bulkhead_sandbox::{Backend, Limits, Sandbox, SandboxError};
use tokio::sync::{Mutex, OnceCell};

pub struct SandboxManager {
    backend: Arc<dyn Backend>,
    limits: Limits,
    idle: Duration,
    sessions: SandboxPool<String>,
    /// What the probe found, once it succeeded: isolation that worked once
    /// is not probed again.
    available: OnceCell<Vec<String>>,
    /// The last failed probe: when, and why. A failure is retried after
    /// `PROBE_RETRY`, because a remote sandboxd or an engine may come up
    /// after the server.
    last_failure: Mutex<Option<(Instant, String)>>,
}

const PROBE_RETRY: Duration = Duration::from_secs(2);

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("backend", &self.backend.name())
            .field("limits", &self.limits)
            .finish()
    }
}

impl SandboxManager {
    pub fn new(backend: Arc<dyn Backend>, limits: Limits, idle: Duration) -> SandboxManager {
        SandboxManager {
            backend,
            limits,
            idle,
            sessions: SandboxPool::new(),
            available: OnceCell::new(),
            last_failure: Mutex::new(None),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// How long a session's sandbox may sit unused before it is destroyed.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// The server's limits: the ceiling of every agent's.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Probes the backend until a probe succeeds; success is kept, a
    /// failure for `PROBE_RETRY`. `Ok` holds what the probe found, `Err`
    /// why isolation is unavailable.
    pub async fn availability(&self) -> Result<Vec<String>, String> {
        if let Some(details) = self.available.get() {
            return Ok(details.clone());
        }
        // One probe at a time; the others wait for its answer.
        let mut last_failure = self.last_failure.lock().await;
        if let Some(details) = self.available.get() {
            return Ok(details.clone());
        }
        if let Some((at, message)) = last_failure.as_ref()
            && at.elapsed() < PROBE_RETRY
        {
            return Err(message.clone());
        }
        match self.backend.probe().await {
            Ok(probe) => {
                tracing::info!(backend = self.backend.name(), details = ?probe.details, "sandbox available");
                let _ = self.available.set(probe.details.clone());
                *last_failure = None;
                Ok(probe.details)
            }
            Err(e) => {
                if last_failure.is_none() {
                    tracing::error!(backend = self.backend.name(), error = %e, "sandbox unavailable: tool calls will be refused");
                }
                // The reason alone: a refused call wraps it again.
                let message = match e {
                    SandboxError::Unavailable(reason) => reason,
                    other => other.to_string(),
                };
                *last_failure = Some((Instant::now(), message.clone()));
                Err(message)
            }
        }
    }

    /// For readiness: the probe succeeded once and the backend still
    /// answers now.
    pub async fn readiness(&self) -> Result<Vec<String>, String> {
        let details = self.availability().await?;
        self.backend.check().await.map_err(|e| e.to_string())?;
        Ok(details)
    }

    /// The session's sandbox, made if needed. Refuses when the backend
    /// failed its probe: nothing ever runs unsandboxed.
    /// `limits`: the session's agent's, within the server's (see
    /// [`SandboxManager::limits`]); a sandbox keeps those it was made with.
    pub async fn for_session(
        &self,
        session_id: &str,
        limits: &Limits,
    ) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.availability()
            .await
            .map_err(SandboxError::Unavailable)?;
        self.sessions
            .get_or_create(session_id.to_string(), || async {
                let sandbox = self.backend.create(session_id, limits).await?;
                crate::telemetry::sandbox_created(self.backend.name());
                Ok(sandbox)
            })
            .await
    }

    /// Destroys the session's sandbox and its workspace, if it has one.
    pub async fn release(&self, session_id: &str) {
        self.sessions.release(&session_id.to_string()).await;
    }

    /// Destroys sandboxes unused for longer than the idle time.
    pub async fn reap_idle(&self) {
        self.sessions.reap_idle(self.idle).await;
    }

    /// Destroys every sandbox (at shutdown).
    pub async fn destroy_all(&self) {
        self.sessions.destroy_all().await;
    }

    /// How often `reap_idle` should run.
    pub fn reap_interval(&self) -> Duration {
        (self.idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}
