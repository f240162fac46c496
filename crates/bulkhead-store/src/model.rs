//! The rows the store reads and the records it is handed to write.

use serde::Serialize;
use sqlx::FromRow;

use crate::StoreError;

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Session {
    pub id: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub active_run_id: Option<String>,
    /// The tenant the session belongs to; `None` when it was made with
    /// authentication off.
    pub owner: Option<String>,
    /// The agent the session belongs to, for life; `''` for a session made
    /// before any run (a thread), until its first run binds it.
    pub agent: String,
    /// The JSON object a client set on it (a thread's metadata), if any.
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, FromRow)]
pub struct Message {
    pub id: i64,
    pub session_id: String,
    pub run_id: Option<String>,
    pub role: String,
    pub content: Option<String>,
    /// JSON array of OpenAI-shaped tool calls, when the assistant made some.
    pub tool_calls: Option<String>,
    pub tool_call_id: Option<String>,
    pub created_at: i64,
}

/// A message to append to a conversation.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub role: &'static str,
    pub content: Option<String>,
    pub tool_calls: Option<String>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
    Interrupted,
    /// Paused before a tool call until a person decides on it.
    AwaitingApproval,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::AwaitingApproval => "awaiting_approval",
        }
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct Run {
    pub id: String,
    pub session_id: String,
    /// One of [`RunStatus`]'s names.
    pub status: String,
    pub input: String,
    pub output: Option<String>,
    pub tokens_used: i64,
    pub steps: i64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// How a protocol's client asked for the run (JSON), for a run that
    /// came through the run queue.
    pub kwargs: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
}

#[derive(Debug, Clone, FromRow)]
pub struct RunEvent {
    pub run_id: String,
    pub seq: i64,
    pub kind: String,
    /// The event's JSON payload.
    pub data: String,
    pub created_at: i64,
}

/// An event to append to a run's record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub seq: i64,
    pub kind: &'static str,
    pub data: String,
    pub created_at: i64,
}

/// Whether a run starts a new session or continues one.
#[derive(Debug, Clone, Copy)]
pub enum SessionRef<'a> {
    New(&'a str),
    Existing(&'a str),
    /// Continues the session with this id if there is one, else creates
    /// it with this id: a conversation a client names before it exists
    /// (an id derived from a chat front end's own chat id).
    Named(&'a str),
}

#[derive(Debug)]
pub struct BeginRun<'a> {
    pub session: SessionRef<'a>,
    /// The caller's tenant: a new session is made theirs, and an existing
    /// one of another tenant is refused as if it did not exist. `None`
    /// (authentication off) makes unowned sessions and reaches any.
    pub owner: Option<&'a str>,
    /// The agent a new session gets; for an existing session, the agent the
    /// caller expects it to belong to (`None`: whichever it has).
    pub agent: Option<&'a str>,
    pub run_id: &'a str,
    pub input: &'a str,
    /// Stored before `input`, with this run's id, when this opening creates
    /// the session (`New`, or `Named` on first use) or continues an
    /// `Existing` one (whose caller knows it holds no conversation yet: a
    /// thread's first run); ignored when it continues a `Named` one. What
    /// a client that keeps its own history sent.
    pub history: &'a [NewMessage],
    /// The agent an existing session that belongs to none yet (made before
    /// any run, agent `''`) is bound to by this run.
    pub unbound_agent: &'a str,
    /// The run was queued: its row in `queued_runs` is taken in the same
    /// transaction (refused with `NotQueued` if it is no longer pending),
    /// and its `kwargs` kept on the run.
    pub dequeue: bool,
    pub kwargs: Option<&'a str>,
    pub now: i64,
    /// A session lock taken before this instant is considered abandoned.
    pub lock_stale_before: i64,
    pub first_event: NewEvent,
}

/// A run opened: the agent its session belongs to, and whether the
/// opening created the session (then it holds only the history and input
/// the opening stored, and need not be read back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    pub agent: String,
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BeginRunError {
    #[error("session not found")]
    SessionNotFound,
    #[error("session is busy with run {active_run_id}")]
    SessionBusy { active_run_id: String },
    /// The session belongs to another agent than the one asked for.
    #[error("session belongs to agent {agent}")]
    WrongAgent { agent: String },
    /// A queued run that is no longer pending (cancelled, or started).
    #[error("the run is no longer queued")]
    NotQueued,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a run has produced since it was last recorded.
#[derive(Debug)]
pub struct RunProgress<'a> {
    pub run_id: &'a str,
    pub session_id: &'a str,
    pub messages: &'a [NewMessage],
    pub events: &'a [NewEvent],
    pub tokens_used: i64,
    pub steps: i64,
    pub now: i64,
}

#[derive(Debug)]
pub struct FinishRun<'a> {
    pub progress: RunProgress<'a>,
    pub status: RunStatus,
    pub output: Option<&'a str>,
    /// Error code and message of a run that did not complete.
    pub error: Option<(&'a str, &'a str)>,
    /// Tokens the model's calls took in and gave out.
    pub usage: Option<(i64, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    Busy,
}

/// A tool call as recorded before it runs.
#[derive(Debug, Clone)]
pub struct NewToolExecution<'a> {
    pub id: &'a str,
    pub session_id: &'a str,
    pub run_id: &'a str,
    pub call_id: &'a str,
    pub tool: &'a str,
    /// JSON, secrets redacted.
    pub arguments: &'a str,
    pub backend: &'a str,
    /// JSON of the limits applied, for sandboxed tools.
    pub limits: Option<&'a str>,
    pub started_at: i64,
    /// Set when the call waits for a person's approval until then: the row
    /// is recorded `awaiting_approval` instead of `running`.
    pub approval_expires_at: Option<i64>,
}

/// How a recorded tool call ended.
#[derive(Debug, Clone, Default)]
pub struct ToolExecutionEnd {
    /// `completed` (it ran), `failed` (it could not run), or `refused`.
    pub status: &'static str,
    pub finished_at: i64,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub killed_reason: Option<String>,
    /// JSON array.
    pub limits_hit: Option<String>,
    pub stdout_bytes: Option<i64>,
    pub stderr_bytes: Option<i64>,
    pub stdout_truncated: Option<bool>,
    pub stderr_truncated: Option<bool>,
    pub stdout_sha256: Option<String>,
    pub stderr_sha256: Option<String>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    /// JSON array of the egress refusals the call's programs met.
    pub egress_refusals: Option<String>,
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ToolExecution {
    pub id: String,
    pub session_id: String,
    pub run_id: String,
    pub call_id: String,
    pub tool: String,
    pub arguments: String,
    pub backend: String,
    pub limits: Option<String>,
    pub status: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub killed_reason: Option<String>,
    pub limits_hit: Option<String>,
    pub stdout_bytes: Option<i64>,
    pub stderr_bytes: Option<i64>,
    pub stdout_truncated: Option<bool>,
    pub stderr_truncated: Option<bool>,
    pub stdout_sha256: Option<String>,
    pub stderr_sha256: Option<String>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub egress_refusals: Option<String>,
    pub approval_expires_at: Option<i64>,
    /// `approve`, `deny` or `expired`.
    pub approval_decision: Option<String>,
    /// A key id, `anonymous` (AUTH_MODE=none) or `expiry`.
    pub approval_decided_by: Option<String>,
    pub approval_decided_at: Option<i64>,
    pub approval_comment: Option<String>,
}

/// A person's (or the clock's) answer to a call awaiting approval.
#[derive(Debug, Clone)]
pub struct ApprovalDecision<'a> {
    /// The call's audit record.
    pub audit_id: &'a str,
    pub run_id: &'a str,
    pub approve: bool,
    /// `approve`, `deny` or `expired`.
    pub decision: &'a str,
    pub decided_by: &'a str,
    pub comment: Option<&'a str>,
    pub now: i64,
}
