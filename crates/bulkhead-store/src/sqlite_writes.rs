//! The store's writes on SQLite, as units for the writer thread. They mirror
//! the PostgreSQL ones in `lib.rs` statement for statement; SQLite numbers
//! its parameters `?N`.

use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    BeginRunError, Begun, DeleteOutcome, NewEvent, NewMessage, SessionRef, StoreError,
    ToolExecutionEnd,
};

/// A [`crate::BeginRun`] the writer thread can own.
pub(crate) struct OwnedBeginRun {
    pub session: SessionMode,
    pub session_id: String,
    pub owner: Option<String>,
    pub agent: Option<String>,
    pub run_id: String,
    pub input: String,
    pub history: Vec<NewMessage>,
    pub unbound_agent: String,
    pub dequeue: bool,
    pub kwargs: Option<String>,
    pub now: i64,
    pub lock_stale_before: i64,
    pub first_event: NewEvent,
}

/// [`SessionRef`] without its id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionMode {
    New,
    Existing,
    Named,
}

impl OwnedBeginRun {
    pub(crate) fn from(begin: &crate::BeginRun<'_>) -> OwnedBeginRun {
        let (session, session_id) = match begin.session {
            SessionRef::New(id) => (SessionMode::New, id),
            SessionRef::Existing(id) => (SessionMode::Existing, id),
            SessionRef::Named(id) => (SessionMode::Named, id),
        };
        OwnedBeginRun {
            session,
            session_id: session_id.to_owned(),
            owner: begin.owner.map(str::to_owned),
            agent: begin.agent.map(str::to_owned),
            run_id: begin.run_id.to_owned(),
            input: begin.input.to_owned(),
            history: begin.history.to_vec(),
            unbound_agent: begin.unbound_agent.to_owned(),
            dequeue: begin.dequeue,
            kwargs: begin.kwargs.map(str::to_owned),
            now: begin.now,
            lock_stale_before: begin.lock_stale_before,
            first_event: begin.first_event.clone(),
        }
    }
}

/// A [`crate::RunProgress`] the writer thread can own.
pub(crate) struct OwnedProgress {
    pub run_id: String,
    pub session_id: String,
    pub messages: Vec<NewMessage>,
    pub events: Vec<NewEvent>,
    pub tokens_used: i64,
    pub steps: i64,
    pub now: i64,
}

impl OwnedProgress {
    pub(crate) fn from(progress: &crate::RunProgress<'_>) -> OwnedProgress {
        OwnedProgress {
            run_id: progress.run_id.to_owned(),
            session_id: progress.session_id.to_owned(),
            messages: progress.messages.to_vec(),
            events: progress.events.to_vec(),
            tokens_used: progress.tokens_used,
            steps: progress.steps,
            now: progress.now,
        }
    }
}

pub(crate) fn recover_abandoned_runs(c: &Connection, now: i64) -> Result<u64, StoreError> {
    c.prepare_cached(INTERRUPT_CALLS_OF_RUNNING_RUNS)?
        .execute(params![now])?;
    let runs = c
        .prepare_cached(
            "UPDATE runs SET status = 'interrupted', finished_at = ?1, \
             error_code = 'server_stopped', \
             error_message = 'the server stopped before the run finished' \
             WHERE status = 'running'",
        )?
        .execute(params![now])?;
    c.prepare_cached(crate::RELEASE_ABANDONED_SESSIONS)?
        .execute([])?;
    Ok(runs as u64)
}

/// The audit records of calls whose process died: without this they would
/// stay `running` for ever.
const INTERRUPT_CALLS_OF_RUNNING_RUNS: &str = "UPDATE tool_executions SET status = 'interrupted', \
     finished_at = ?1, error = 'the server stopped during the call' \
     WHERE status = 'running' \
     AND session_id IN (SELECT session_id FROM runs WHERE status = 'running')";
const INTERRUPT_CALLS_OF_TAKEN_OVER_SESSION: &str = "UPDATE tool_executions SET status = 'interrupted', \
     finished_at = ?1, \
     error = 'the run stopped reporting progress and its session was taken over' \
     WHERE session_id = ?2 AND status IN ('running', 'awaiting_approval')";

/// Opens a run; `Ok(Err(_))` is a refusal, made before anything is written.
pub(crate) fn begin_run(
    c: &Connection,
    begin: &OwnedBeginRun,
) -> Result<Result<Begun, BeginRunError>, StoreError> {
    let session_id = begin.session_id.as_str();
    let created = match begin.session {
        SessionMode::Existing => false,
        SessionMode::New | SessionMode::Named => {
            let Some(new_agent) = begin.agent.as_deref() else {
                return Ok(Err(BeginRunError::Store(StoreError::WriterFailed(
                    "a new session needs an agent".into(),
                ))));
            };
            // A named session that exists already is continued below, as
            // any existing one: locked, its owner and agent checked.
            let conflict = if begin.session == SessionMode::Named {
                " ON CONFLICT (id) DO NOTHING"
            } else {
                ""
            };
            let inserted = c
                .prepare_cached(&format!(
                    "INSERT INTO sessions (id, created_at, updated_at, active_run_id, locked_at, owner, agent) \
                     VALUES (?1, ?2, ?2, ?3, ?2, ?4, ?5){conflict}"
                ))?
                .execute(params![session_id, begin.now, begin.run_id, begin.owner, new_agent])?;
            inserted == 1
        }
    };
    // One writer: nothing can take the queued run between this look and
    // the delete below, and a refusal here has written nothing.
    if begin.dequeue {
        let pending: Option<i64> = c
            .prepare_cached("SELECT 1 FROM queued_runs WHERE id = ?1 AND status = 'pending'")?
            .query_row(params![begin.run_id], |row| row.get(0))
            .optional()?;
        if pending.is_none() {
            return Ok(Err(BeginRunError::NotQueued));
        }
    }
    let agent: String;
    if created {
        agent = begin.agent.clone().unwrap_or_default();
    } else {
        let locked: Option<String> = c
            .prepare_cached(
                "UPDATE sessions SET active_run_id = ?1, locked_at = ?2, updated_at = ?2, \
                 agent = CASE WHEN agent = '' THEN ?7 ELSE agent END \
                 WHERE id = ?3 AND (active_run_id IS NULL OR locked_at < ?4) \
                 AND (?5 IS NULL OR owner = ?5) AND (?6 IS NULL OR agent = ?6 OR agent = '') \
                 RETURNING agent",
            )?
            .query_row(
                params![
                    begin.run_id,
                    begin.now,
                    session_id,
                    begin.lock_stale_before,
                    begin.owner,
                    begin.agent,
                    begin.unbound_agent
                ],
                |row| row.get(0),
            )
            .optional()?;
        let Some(locked) = locked else {
            let holder: Option<(Option<String>, Option<String>, String)> = c
                .prepare_cached("SELECT active_run_id, owner, agent FROM sessions WHERE id = ?1")?
                .query_row(params![session_id], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()?;
            return Ok(Err(crate::refusal(
                begin.owner.as_deref(),
                begin.agent.as_deref(),
                holder,
            )));
        };
        agent = locked;
        // A run that lost its lock to staleness never finished, nor did the
        // call it was making (looked for only then: this is every run's
        // path).
        let taken_over = c
            .prepare_cached(
                "UPDATE runs SET status = 'interrupted', finished_at = ?1, \
                 error_code = 'lock_expired', \
                 error_message = 'the run stopped reporting progress and its session was taken over' \
                 WHERE session_id = ?2 AND status IN ('running', 'awaiting_approval')",
            )?
            .execute(params![begin.now, session_id])?;
        if taken_over > 0 {
            c.prepare_cached(INTERRUPT_CALLS_OF_TAKEN_OVER_SESSION)?
                .execute(params![begin.now, session_id])?;
        }
    }
    if begin.dequeue {
        c.prepare_cached("DELETE FROM queued_runs WHERE id = ?1")?
            .execute(params![begin.run_id])?;
    }
    c.prepare_cached(
        "INSERT INTO runs (id, session_id, status, input, tokens_used, steps, created_at, kwargs) \
         VALUES (?1, ?2, 'running', ?3, 0, 0, ?4, ?5)",
    )?
    .execute(params![
        begin.run_id,
        session_id,
        begin.input,
        begin.now,
        begin.kwargs
    ])?;
    if created || begin.session == SessionMode::Existing {
        write_messages(c, session_id, &begin.run_id, &begin.history, begin.now)?;
    }
    c.prepare_cached(
        "INSERT INTO messages (session_id, run_id, role, content, created_at) \
         VALUES (?1, ?2, 'user', ?3, ?4)",
    )?
    .execute(params![session_id, begin.run_id, begin.input, begin.now])?;
    insert_events(c, &begin.run_id, std::slice::from_ref(&begin.first_event))?;
    Ok(Ok(Begun { agent, created }))
}

fn insert_events(c: &Connection, run_id: &str, events: &[NewEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO run_events (run_id, seq, kind, data, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for event in events {
        insert.execute(params![
            run_id,
            event.seq,
            event.kind,
            event.data,
            event.created_at
        ])?;
    }
    Ok(())
}

fn insert_messages(c: &Connection, progress: &OwnedProgress) -> Result<(), StoreError> {
    write_messages(
        c,
        &progress.session_id,
        &progress.run_id,
        &progress.messages,
        progress.now,
    )
}

fn write_messages(
    c: &Connection,
    session_id: &str,
    run_id: &str,
    messages: &[NewMessage],
    now: i64,
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO messages (session_id, run_id, role, content, tool_calls, tool_call_id, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for message in messages {
        insert.execute(params![
            session_id,
            run_id,
            message.role,
            message.content,
            message.tool_calls,
            message.tool_call_id,
            now
        ])?;
    }
    Ok(())
}

pub(crate) fn record_step(c: &Connection, step: &OwnedProgress) -> Result<(), StoreError> {
    insert_messages(c, step)?;
    insert_events(c, &step.run_id, &step.events)?;
    c.prepare_cached("UPDATE runs SET tokens_used = ?1, steps = ?2 WHERE id = ?3")?
        .execute(params![step.tokens_used, step.steps, step.run_id])?;
    c.prepare_cached("UPDATE sessions SET locked_at = ?1 WHERE id = ?2 AND active_run_id = ?3")?
        .execute(params![step.now, step.session_id, step.run_id])?;
    Ok(())
}

/// A [`crate::FinishRun`] the writer thread can own.
pub(crate) struct OwnedFinish {
    pub progress: OwnedProgress,
    pub status: &'static str,
    pub output: Option<String>,
    pub error: Option<(String, String)>,
    pub usage: Option<(i64, i64)>,
}

impl OwnedFinish {
    pub(crate) fn from(finish: &crate::FinishRun<'_>) -> OwnedFinish {
        OwnedFinish {
            progress: OwnedProgress::from(&finish.progress),
            status: finish.status.as_str(),
            output: finish.output.map(str::to_owned),
            error: finish
                .error
                .map(|(code, message)| (code.to_owned(), message.to_owned())),
            usage: finish.usage,
        }
    }
}

pub(crate) fn finish_run(c: &Connection, finish: &OwnedFinish) -> Result<(), StoreError> {
    let progress = &finish.progress;
    insert_messages(c, progress)?;
    insert_events(c, &progress.run_id, &progress.events)?;
    c.prepare_cached(
        "UPDATE runs SET status = ?1, output = ?2, tokens_used = ?3, steps = ?4, \
         error_code = ?5, error_message = ?6, finished_at = ?7, \
         input_tokens = ?9, output_tokens = ?10 WHERE id = ?8",
    )?
    .execute(params![
        finish.status,
        finish.output,
        progress.tokens_used,
        progress.steps,
        finish.error.as_ref().map(|e| e.0.as_str()),
        finish.error.as_ref().map(|e| e.1.as_str()),
        progress.now,
        progress.run_id,
        finish.usage.map(|u| u.0),
        finish.usage.map(|u| u.1)
    ])?;
    c.prepare_cached(
        "UPDATE sessions SET active_run_id = NULL, locked_at = NULL, updated_at = ?1 \
         WHERE id = ?2 AND active_run_id = ?3",
    )?
    .execute(params![progress.now, progress.session_id, progress.run_id])?;
    Ok(())
}

/// A [`crate::NewToolExecution`] the writer thread can own.
pub(crate) struct OwnedToolExecution {
    pub id: String,
    pub session_id: String,
    pub run_id: String,
    pub call_id: String,
    pub tool: String,
    pub arguments: String,
    pub backend: String,
    pub limits: Option<String>,
    pub started_at: i64,
    pub approval_expires_at: Option<i64>,
}

impl OwnedToolExecution {
    pub(crate) fn from(call: &crate::NewToolExecution<'_>) -> OwnedToolExecution {
        OwnedToolExecution {
            id: call.id.to_owned(),
            session_id: call.session_id.to_owned(),
            run_id: call.run_id.to_owned(),
            call_id: call.call_id.to_owned(),
            tool: call.tool.to_owned(),
            arguments: call.arguments.to_owned(),
            backend: call.backend.to_owned(),
            limits: call.limits.map(str::to_owned),
            started_at: call.started_at,
            approval_expires_at: call.approval_expires_at,
        }
    }
}

pub(crate) fn start_tool_execution(
    c: &Connection,
    call: &OwnedToolExecution,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO tool_executions \
         (id, session_id, run_id, call_id, tool, arguments, backend, limits, status, \
         started_at, approval_expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, \
         CASE WHEN ?10 IS NULL THEN 'running' ELSE 'awaiting_approval' END, ?9, ?10)",
    )?
    .execute(params![
        call.id,
        call.session_id,
        call.run_id,
        call.call_id,
        call.tool,
        call.arguments,
        call.backend,
        call.limits,
        call.started_at,
        call.approval_expires_at
    ])?;
    Ok(())
}

pub(crate) fn finish_tool_execution(
    c: &Connection,
    id: &str,
    end: &ToolExecutionEnd,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE tool_executions SET status = ?1, finished_at = ?2, exit_code = ?3, signal = ?4, \
         killed_reason = ?5, limits_hit = ?6, stdout_bytes = ?7, stderr_bytes = ?8, \
         stdout_truncated = ?9, stderr_truncated = ?10, stdout_sha256 = ?11, \
         stderr_sha256 = ?12, duration_ms = ?13, error = ?14, egress_refusals = ?15 WHERE id = ?16",
    )?
    .execute(params![
        end.status,
        end.finished_at,
        end.exit_code,
        end.signal,
        end.killed_reason,
        end.limits_hit,
        end.stdout_bytes,
        end.stderr_bytes,
        end.stdout_truncated,
        end.stderr_truncated,
        end.stdout_sha256,
        end.stderr_sha256,
        end.duration_ms,
        end.error,
        end.egress_refusals,
        id
    ])?;
    Ok(())
}

pub(crate) fn delete_session(c: &Connection, id: &str) -> Result<DeleteOutcome, StoreError> {
    let deleted = c
        .prepare_cached("DELETE FROM sessions WHERE id = ?1 AND active_run_id IS NULL")?
        .execute(params![id])?;
    if deleted == 1 {
        return Ok(DeleteOutcome::Deleted);
    }
    let exists = c
        .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .exists(params![id])?;
    Ok(if exists {
        DeleteOutcome::Busy
    } else {
        DeleteOutcome::NotFound
    })
}

/// Records what a run did up to a call that waits for a person, and parks
/// the run: `awaiting_approval`, its session held until `until` (past it,
/// the expiry decides; a lock that old is stale only once the lock's TTL
/// has passed too).
pub(crate) fn pause_run(
    c: &Connection,
    step: &OwnedProgress,
    until: i64,
) -> Result<(), StoreError> {
    insert_messages(c, step)?;
    insert_events(c, &step.run_id, &step.events)?;
    c.prepare_cached(
        "UPDATE runs SET tokens_used = ?1, steps = ?2, status = 'awaiting_approval' WHERE id = ?3",
    )?
    .execute(params![step.tokens_used, step.steps, step.run_id])?;
    c.prepare_cached("UPDATE sessions SET locked_at = ?1 WHERE id = ?2 AND active_run_id = ?3")?
        .execute(params![until, step.session_id, step.run_id])?;
    Ok(())
}

/// A [`crate::ApprovalDecision`] the writer thread can own.
pub(crate) struct OwnedDecision {
    pub audit_id: String,
    pub run_id: String,
    pub approve: bool,
    pub decision: String,
    pub decided_by: String,
    pub comment: Option<String>,
    pub now: i64,
}

impl OwnedDecision {
    pub(crate) fn from(d: &crate::ApprovalDecision<'_>) -> OwnedDecision {
        OwnedDecision {
            audit_id: d.audit_id.to_owned(),
            run_id: d.run_id.to_owned(),
            approve: d.approve,
            decision: d.decision.to_owned(),
            decided_by: d.decided_by.to_owned(),
            comment: d.comment.map(str::to_owned),
            now: d.now,
        }
    }
}

pub(crate) fn decide_approval(c: &Connection, d: &OwnedDecision) -> Result<bool, StoreError> {
    let decided = c
        .prepare_cached(crate::approvals::DECIDE_SQLITE)?
        .execute(params![
            if d.approve { "running" } else { "denied" },
            d.decision,
            d.decided_by,
            d.now,
            d.comment,
            d.audit_id,
            d.run_id
        ])?;
    if decided == 0 {
        return Ok(false);
    }
    c.prepare_cached(
        "UPDATE runs SET status = 'running' WHERE id = ?1 AND status = 'awaiting_approval'",
    )?
    .execute(params![d.run_id])?;
    c.prepare_cached("UPDATE sessions SET locked_at = ?1 WHERE active_run_id = ?2")?
        .execute(params![d.now, d.run_id])?;
    Ok(true)
}
