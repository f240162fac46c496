//! One sandbox per session, made on the session's first sandboxed tool call
//! and destroyed when the session is deleted, after it has been idle for a
//! while, or when the server stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_sandbox::{Backend, Limits, Sandbox, SandboxError};
use tokio::sync::{Mutex, OnceCell};

/// A session's sandbox, made once on first use; concurrent first uses wait
/// for the same creation instead of racing to make two.
struct Slot {
    sandbox: OnceCell<Arc<dyn Sandbox>>,
    last_used: std::sync::Mutex<Instant>,
}

impl Slot {
    fn touch(&self) {
        if let Ok(mut last_used) = self.last_used.lock() {
            *last_used = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

pub struct SandboxManager {
    backend: Arc<dyn Backend>,
    limits: Limits,
    idle: Duration,
    sessions: Mutex<HashMap<String, Arc<Slot>>>,
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
            sessions: Mutex::new(HashMap::new()),
            available: OnceCell::new(),
            last_failure: Mutex::new(None),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

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
                let message = e.to_string();
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
    pub async fn for_session(&self, session_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.availability()
            .await
            .map_err(SandboxError::Unavailable)?;
        let slot = Arc::clone(
            self.sessions
                .lock()
                .await
                .entry(session_id.to_string())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        sandbox: OnceCell::new(),
                        last_used: std::sync::Mutex::new(Instant::now()),
                    })
                }),
        );
        // Made outside the map's lock: a container takes a while to start
        // and other sessions must not wait for it.
        let sandbox = slot
            .sandbox
            .get_or_try_init(|| self.backend.create(session_id, &self.limits))
            .await?;
        slot.touch();
        Ok(Arc::clone(sandbox))
    }

    /// Destroys the session's sandbox and its workspace, if it has one.
    pub async fn release(&self, session_id: &str) {
        let slot = self.sessions.lock().await.remove(session_id);
        if let Some(sandbox) = slot.as_ref().and_then(|s| s.sandbox.get())
            && let Err(e) = sandbox.destroy().await
        {
            tracing::warn!(session_id, error = %e, "could not destroy a sandbox");
        }
    }

    /// Destroys sandboxes unused for longer than the idle time.
    pub async fn reap_idle(&self) {
        let idle: Vec<(String, Arc<Slot>)> = {
            let mut sessions = self.sessions.lock().await;
            let expired: Vec<String> = sessions
                .iter()
                .filter(|(_, slot)| {
                    slot.idle_for() >= self.idle
                        // Not in use: only the slot holds the sandbox.
                        && slot.sandbox.get().is_none_or(|s| Arc::strong_count(s) == 1)
                        && Arc::strong_count(slot) == 1
                })
                .map(|(id, _)| id.clone())
                .collect();
            expired
                .into_iter()
                .filter_map(|id| sessions.remove(&id).map(|slot| (id, slot)))
                .collect()
        };
        for (session_id, slot) in idle {
            if let Some(sandbox) = slot.sandbox.get() {
                tracing::info!(session_id = %session_id, "destroying an idle sandbox");
                if let Err(e) = sandbox.destroy().await {
                    tracing::warn!(session_id = %session_id, error = %e, "could not destroy a sandbox");
                }
            }
        }
    }

    /// Destroys every sandbox (at shutdown).
    pub async fn destroy_all(&self) {
        let all: Vec<Arc<Slot>> = self
            .sessions
            .lock()
            .await
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in all {
            if let Some(sandbox) = slot.sandbox.get() {
                let _ = sandbox.destroy().await;
            }
        }
    }

    /// How often `reap_idle` should run.
    pub fn reap_interval(&self) -> Duration {
        (self.idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}
