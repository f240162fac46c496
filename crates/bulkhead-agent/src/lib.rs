//! The run engine. A run is one user message answered by the agent loop:
//! model call, tool calls, model call… until the model answers in text or
//! the step budget is spent. Every run is recorded (its status, its messages
//! and each of its events, numbered) before anyone is told it happened.
//!
//! Runs execute on their own tasks, apart from the request that started
//! them: a client that goes away does not lose its run, and shutdown can
//! wait for all of them and interrupt the ones that outlast the grace.

mod agents;
mod approvals;
mod cluster;
mod feeds;
mod leases;
mod mcp_tools;
mod planner;
mod queue;
pub mod roles;
mod run;
mod run_state;
mod sandboxes;
pub mod telemetry;
mod tool_calls;
mod tools;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead_model::{ChatMessage, Completion, ModelError, ToolCall};
use bulkhead_store::{
    BeginRun, BeginRunError, DeleteOutcome, FinishRun, NewEvent, NewMessage, NewToolExecution,
    RunProgress, RunStatus, SessionRef, Store, StoreError, ToolExecutionEnd,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use run_state::{OpenCall, RunState};

pub use agents::{Agent, Agents, ApprovalPolicy, DEFAULT_AGENT, ToolPolicy};
pub use approvals::{DecideError, Decision, PendingApproval};
pub use cluster::Cluster;
pub use feeds::{FeedItem, RunFollower};
pub use queue::{CancelAction, CancelOutcome, EnqueueError, QueueRequest};
pub use roles::{PeerClient, Peers, RoleKind};
pub use sandboxes::SandboxManager;
pub use telemetry::SpanSettings;
pub use tools::{Tool, ToolContext, ToolError, ToolOutput, ToolRegistry};

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How long a tool call waits for a person before it counts as denied.
    pub approval_timeout: Duration,
    /// What the agent server itself may reach: MCP servers over HTTP are
    /// held to it as sandboxed programs are.
    pub egress: bulkhead_sandbox::egress::EgressPolicy,
    /// A session lock not refreshed for this long is presumed abandoned
    /// (its holder crashed) and may be taken over.
    pub lock_ttl: Duration,
    /// On PostgreSQL, how long this replica's runs stay its own without it
    /// renewing its lease (`RUN_LEASE_SECONDS`); then another replica ends
    /// them.
    pub lease: Duration,
    /// Values never to be written into the audit trail (API keys, database
    /// passwords), should a model echo them into tool arguments.
    pub secrets: Vec<String>,
    /// This server's part in a team of agents (see [`roles`]).
    pub role: RoleKind,
    /// A planner's executor and critic.
    pub peers: Option<Arc<PeerClient>>,
    /// What the run, model call and tool call spans carry.
    pub spans: SpanSettings,
}

/// One event of a run, as streamed to a client and stored.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub seq: i64,
    pub kind: &'static str,
    /// JSON object.
    pub data: Arc<str>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    Completed {
        response: String,
        tokens_used: i64,
    },
    Failed {
        failure: Failure,
        tokens_used: i64,
    },
    /// Paused before a tool call until a person decides on it (or the
    /// wait expires); its session stays held.
    AwaitingApproval {
        approval: PendingApproval,
        tokens_used: i64,
    },
}

/// Why a run did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The model endpoint failed or answered garbage.
    Upstream,
    /// The model endpoint did not answer in time.
    UpstreamTimeout,
    /// The model kept calling tools past the step budget.
    MaxSteps,
    /// The server shut down before the run finished.
    Interrupted,
    /// The run could not be recorded.
    Internal,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    /// Stable, machine-readable.
    pub code: &'static str,
    /// Safe to show to the client.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the server is shutting down and accepts no new runs")]
    ShuttingDown,
    #[error("session not found")]
    SessionNotFound,
    #[error("no agent has the id {0:?}")]
    UnknownAgent(String),
    #[error("the session belongs to agent {agent:?}")]
    WrongAgent { agent: String },
    #[error("session {session_id} already has a run in progress ({active_run_id})")]
    SessionBusy {
        session_id: String,
        active_run_id: String,
    },
    /// A queued run that was cancelled or started meanwhile.
    #[error("the run is no longer queued")]
    NotQueued,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A run that has started.
#[derive(Debug)]
pub struct RunHandle {
    pub run_id: String,
    pub session_id: String,
    /// Every event from `run_started` on, when streaming was asked for.
    pub events: Option<mpsc::UnboundedReceiver<EventRecord>>,
    pub outcome: oneshot::Receiver<RunOutcome>,
}

pub struct StartRun {
    pub session_id: Option<String>,
    /// `session_id` names a session the client chose before it exists
    /// (see [`named_session_id`]): continued if it exists, made with that
    /// id (and `history`) if not. `false`: it must exist.
    pub create_if_missing: bool,
    /// What the client says came before `message`, in order: stored ahead
    /// of it when the run makes its session, ignored when it continues one
    /// (which holds its history already).
    pub history: Vec<NewMessage>,
    /// The agent to run: a new session's, or the one an existing session
    /// is expected to belong to. `None`: the default agent for a new
    /// session, whichever agent an existing one has.
    pub agent: Option<String>,
    pub message: String,
    /// Stream the model's text as it is produced (and hand out the events).
    pub stream: bool,
    /// The caller's tenant: a new session becomes theirs, another tenant's
    /// session answers as unknown. `None` when authentication is off.
    pub owner: Option<String>,
    /// Told of the model tokens the run spends; dropped when the run ends.
    pub account: Option<Box<dyn RunAccount>>,
    /// Set when the run comes from the run queue: its id and the client's
    /// options, kept on the run.
    pub queued: Option<QueuedStart>,
}

/// A queued run being started.
#[derive(Debug, Clone)]
pub struct QueuedStart {
    pub run_id: String,
    pub kwargs: String,
}

impl std::fmt::Debug for StartRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartRun")
            .field("session_id", &self.session_id)
            .field("create_if_missing", &self.create_if_missing)
            .field("history", &self.history.len())
            .field("agent", &self.agent)
            .field("stream", &self.stream)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Whoever admitted a run (the server's per-key limits) hears what it
/// spends through this, as it spends it. The account lives exactly as long
/// as the run's task, so dropping it is how a run gives back what it held
/// (its place among the caller's runs in flight), however the run ends.
pub trait RunAccount: Send + Sync + 'static {
    fn tokens_spent(&self, input: u64, output: u64);
}

#[derive(Debug)]
pub struct Engine {
    store: Store,
    agents: Agents,
    mcp: mcp_tools::McpSessions,
    sandboxes: Option<Arc<SandboxManager>>,
    settings: EngineSettings,
    runs: TaskTracker,
    interrupt: CancellationToken,
    accepting: AtomicBool,
    feeds: feeds::RunFeeds,
    queue: queue::RunQueue,
    /// The other replicas, when there are any to reach (see `cluster`).
    cluster: std::sync::OnceLock<Arc<dyn Cluster>>,
    leases: leases::Leases,
}

/// A new id for a session, run or tool call: a UUIDv7, time-ordered so that
/// the store's indexes grow at their end instead of at a random page per
/// insert (a commit then writes a few pages for many runs). Without uuid's
/// shared counter: its ids within one millisecond would follow each other,
/// and a session id is what lets a client continue a conversation, so all
/// 74 bits after the timestamp stay random.
pub fn new_id() -> String {
    uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)).to_string()
}

/// The id of the session a client names `name` (a chat front end's own
/// chat id, say) with `agent`: a UUIDv5 of the three, so the same name
/// finds the same session again, and the same name in another tenant or
/// for another agent is another session. Never a UUIDv7, so it cannot be
/// any session made without a name.
pub fn named_session_id(owner: Option<&str>, agent: &str, name: &str) -> String {
    // Fixed for good: changing it would orphan every named session.
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b1e_53a0_9d43_4c2e_a7f1_0c8e_5d2b_91f4);
    // Lengths first, so no choice of the three parts reads as another's.
    let owner = owner.map_or_else(|| "-".to_string(), |t| format!("t{}:{t}", t.len()));
    let key = format!("{owner}|{}:{agent}|{name}", agent.len());
    uuid::Uuid::new_v5(&NAMESPACE, key.as_bytes()).to_string()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Engine {
    pub fn new(
        store: Store,
        agents: Agents,
        sandboxes: Option<Arc<SandboxManager>>,
        settings: EngineSettings,
    ) -> Engine {
        Engine {
            store,
            agents,
            mcp: Default::default(),
            sandboxes,
            settings,
            runs: TaskTracker::new(),
            interrupt: CancellationToken::new(),
            accepting: AtomicBool::new(true),
            feeds: Default::default(),
            queue: Default::default(),
            cluster: Default::default(),
            leases: Default::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    pub fn sandboxes(&self) -> Option<&SandboxManager> {
        self.sandboxes.as_deref()
    }

    /// Deletes a session (unless a run holds it) and destroys its sandbox.
    pub async fn delete_session(&self, session_id: &str) -> Result<DeleteOutcome, StoreError> {
        let outcome = self.store.delete_session(session_id).await?;
        if outcome == DeleteOutcome::Deleted {
            // Its MCP servers first: a hosted program holds its sandbox.
            self.mcp.release(session_id);
            if let Some(sandboxes) = &self.sandboxes {
                sandboxes.release(session_id).await;
            }
        }
        Ok(outcome)
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Runs in flight.
    pub fn active_runs(&self) -> usize {
        self.runs.len()
    }

    /// Stops taking runs, waits up to `grace` for those in flight, then
    /// interrupts the rest (recorded `interrupted`) and waits for that.
    pub async fn shutdown(&self, grace: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        self.runs.close();
        let in_flight = self.runs.len();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                grace_s = grace.as_secs_f64(),
                "waiting for runs in flight"
            );
        }
        if tokio::time::timeout(grace, self.runs.wait()).await.is_err() {
            tracing::warn!(
                unfinished = self.runs.len(),
                "shutdown grace is over; interrupting the runs still in flight"
            );
            self.interrupt.cancel();
            if tokio::time::timeout(Duration::from_secs(5), self.runs.wait())
                .await
                .is_err()
            {
                tracing::error!("runs did not stop after being interrupted");
            }
        }
        // No run needs them now: their stdio servers are stopped before
        // the sandboxes they run in are destroyed.
        self.mcp.clear();
    }
}

/// PostgreSQL text cannot hold NUL; a tool's output may.
fn sanitize(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

impl Engine {
    /// Runs a write of a run in progress, waiting out an outage of the
    /// database: what a run did must not be lost because PostgreSQL
    /// restarted meanwhile. Gives up on shutdown past the grace (the
    /// lease then lapses and another replica ends the run) and on any
    /// other error.
    pub(crate) async fn persist<T, F, Fut>(&self, mut write: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut wait = Duration::from_millis(100);
        let mut warned = false;
        loop {
            match write().await {
                Err(e) if e.is_unavailable() && !self.interrupt.is_cancelled() => {
                    if !warned {
                        tracing::warn!(error = %e, "the database is unreachable; the run's write waits for it");
                        warned = true;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.interrupt.cancelled() => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                result => {
                    if warned && result.is_ok() {
                        tracing::info!("the database is back; the run's write is done");
                    }
                    return result;
                }
            }
        }
    }
}

fn interrupted() -> Failure {
    Failure {
        kind: FailureKind::Interrupted,
        code: "run_interrupted",
        message: "the server shut down before the run finished".into(),
    }
}

/// The run was ended by another replica when this one's lease lapsed.
fn replica_lost() -> Failure {
    Failure {
        kind: FailureKind::Interrupted,
        code: bulkhead_store::REPLICA_LOST_CODE,
        message: bulkhead_store::REPLICA_LOST_MESSAGE.into(),
    }
}

fn internal(what: &str, error: &StoreError) -> Failure {
    tracing::error!(error = %error, "{what}");
    Failure {
        kind: FailureKind::Internal,
        code: "internal_error",
        message: what.to_string(),
    }
}
