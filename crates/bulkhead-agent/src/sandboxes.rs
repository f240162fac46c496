//! One sandbox per session, made on the session's first sandboxed tool call
//! and destroyed when the session is deleted, after it has been idle for a
//! while, or when the server stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_sandbox::{Backend, Limits, Sandbox, SandboxError};
use tokio::sync::{Mutex, OnceCell};

struct Entry {
    sandbox: Arc<dyn Sandbox>,
    last_used: Instant,
}

pub struct SandboxManager {
    backend: Arc<dyn Backend>,
    limits: Limits,
    idle: Duration,
    sessions: Mutex<HashMap<String, Entry>>,
    /// Whether isolation can be had here, checked once.
    available: OnceCell<Result<Vec<String>, String>>,
}

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
            sessions: Mutex::new(HashMap::new()),
            available: OnceCell::new(),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Probes the backend the first time; the answer is kept. `Ok` holds
    /// what the probe found, `Err` why isolation is unavailable.
    pub async fn availability(&self) -> Result<Vec<String>, String> {
        self.available
            .get_or_init(|| async {
                match self.backend.probe().await {
                    Ok(probe) => {
                        tracing::info!(backend = self.backend.name(), details = ?probe.details, "sandbox available");
                        Ok(probe.details)
                    }
                    Err(e) => {
                        tracing::error!(backend = self.backend.name(), error = %e, "sandbox unavailable: tool calls will be refused");
                        Err(e.to_string())
                    }
                }
            })
            .await
            .clone()
    }

    /// The session's sandbox, made if needed. Refuses when the backend
    /// failed its probe: nothing ever runs unsandboxed.
    pub async fn for_session(&self, session_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.availability()
            .await
            .map_err(SandboxError::Unavailable)?;
        let mut sessions = self.sessions.lock().await;
        if let Some(entry) = sessions.get_mut(session_id) {
            entry.last_used = Instant::now();
            return Ok(Arc::clone(&entry.sandbox));
        }
        let sandbox = self.backend.create(session_id, &self.limits).await?;
        sessions.insert(
            session_id.to_string(),
            Entry {
                sandbox: Arc::clone(&sandbox),
                last_used: Instant::now(),
            },
        );
        Ok(sandbox)
    }

    /// Destroys the session's sandbox and its workspace, if it has one.
    pub async fn release(&self, session_id: &str) {
        let entry = self.sessions.lock().await.remove(session_id);
        if let Some(entry) = entry
            && let Err(e) = entry.sandbox.destroy().await
        {
            tracing::warn!(session_id, error = %e, "could not destroy a sandbox");
        }
    }

    /// Destroys sandboxes unused for longer than the idle time.
    pub async fn reap_idle(&self) {
        let idle: Vec<(String, Arc<dyn Sandbox>)> = {
            let mut sessions = self.sessions.lock().await;
            let expired: Vec<String> = sessions
                .iter()
                .filter(|(_, e)| {
                    e.last_used.elapsed() >= self.idle && Arc::strong_count(&e.sandbox) == 1
                })
                .map(|(id, _)| id.clone())
                .collect();
            expired
                .into_iter()
                .filter_map(|id| sessions.remove(&id).map(|e| (id, e.sandbox)))
                .collect()
        };
        for (session_id, sandbox) in idle {
            tracing::info!(session_id = %session_id, "destroying an idle sandbox");
            if let Err(e) = sandbox.destroy().await {
                tracing::warn!(session_id = %session_id, error = %e, "could not destroy a sandbox");
            }
        }
    }

    /// Destroys every sandbox (at shutdown).
    pub async fn destroy_all(&self) {
        let all: Vec<Arc<dyn Sandbox>> = self
            .sessions
            .lock()
            .await
            .drain()
            .map(|(_, e)| e.sandbox)
            .collect();
        for sandbox in all {
            let _ = sandbox.destroy().await;
        }
    }

    /// How often `reap_idle` should run.
    pub fn reap_interval(&self) -> Duration {
        (self.idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}
