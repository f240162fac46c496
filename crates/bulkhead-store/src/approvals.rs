//! Runs paused before a tool call until a person decides on it: the pause,
//! the decision (claimed once: whoever records it resumes the run), and the
//! reads that find what waits and what has expired.

use crate::sqlite_writes::{self, OwnedDecision, OwnedProgress};
use crate::{ApprovalDecision, Pools, RunProgress, Store, StoreError, ToolExecution};

/// Records a decision on a call still awaiting one; the call's row becomes
/// `running` (approved, about to run) or `denied`. `?N`: SQLite's numbering.
pub(crate) const DECIDE_SQLITE: &str = "UPDATE tool_executions SET status = ?1, \
     approval_decision = ?2, approval_decided_by = ?3, approval_decided_at = ?4, \
     approval_comment = ?5 \
     WHERE id = ?6 AND run_id = ?7 AND status = 'awaiting_approval'";
const DECIDE_POSTGRES: &str = "UPDATE tool_executions SET status = $1, \
     approval_decision = $2, approval_decided_by = $3, approval_decided_at = $4, \
     approval_comment = $5 \
     WHERE id = $6 AND run_id = $7 AND status = 'awaiting_approval'";

const EXECUTION_COLUMNS: &str = "id, session_id, run_id, call_id, tool, arguments, backend, \
    limits, status, started_at, finished_at, exit_code, signal, killed_reason, limits_hit, \
    stdout_bytes, stderr_bytes, stdout_truncated, stderr_truncated, stdout_sha256, \
    stderr_sha256, duration_ms, error, egress_refusals, approval_expires_at, approval_decision, \
    approval_decided_by, approval_decided_at, approval_comment";

impl Store {
    /// Records the run's progress up to a call that waits for a person (its
    /// `awaiting_approval` audit row is already written) and parks the run,
    /// its session held until `until`.
    pub async fn pause_run(&self, step: &RunProgress<'_>, until: i64) -> Result<(), StoreError> {
        match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let step = OwnedProgress::from(step);
                writer
                    .write(move |c| sqlite_writes::pause_run(c, &step, until))
                    .await
            }
            Pools::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                crate::insert_messages_pg(&mut tx, step).await?;
                let running = sqlx::query(
                    "UPDATE runs SET tokens_used = $1, steps = $2, status = 'awaiting_approval' \
                     WHERE id = $3 AND status = 'running'",
                )
                .bind(step.tokens_used)
                .bind(step.steps)
                .bind(step.run_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if running == 0 {
                    return Err(StoreError::RunTakenOver);
                }
                sqlx::query(
                    "UPDATE sessions SET locked_at = $1 WHERE id = $2 AND active_run_id = $3",
                )
                .bind(until)
                .bind(step.session_id)
                .bind(step.run_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Records a decision if the call still awaits one, and sets its run
    /// running again. `false`: someone (or the expiry) decided first, or
    /// there is no such call; nothing was written.
    pub async fn decide_approval(&self, d: &ApprovalDecision<'_>) -> Result<bool, StoreError> {
        match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let d = OwnedDecision::from(d);
                writer
                    .write(move |c| sqlite_writes::decide_approval(c, &d))
                    .await
            }
            Pools::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let decided = sqlx::query(DECIDE_POSTGRES)
                    .bind(if d.approve { "running" } else { "denied" })
                    .bind(d.decision)
                    .bind(d.decided_by)
                    .bind(d.now)
                    .bind(d.comment)
                    .bind(d.audit_id)
                    .bind(d.run_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if decided == 0 {
                    return Ok(false);
                }
                // Resumed by this replica: its lease now covers the run.
                sqlx::query(
                    "UPDATE runs SET status = 'running', replica_id = $2 \
                     WHERE id = $1 AND status = 'awaiting_approval'",
                )
                .bind(d.run_id)
                .bind(self.replica.as_deref())
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE sessions SET locked_at = $1 WHERE active_run_id = $2")
                    .bind(d.now)
                    .bind(d.run_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }
        }
    }

    /// The call a run waits on, if it waits.
    pub async fn awaiting_approval(
        &self,
        run_id: &str,
    ) -> Result<Option<ToolExecution>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, ToolExecution>(&format!(
                "SELECT {EXECUTION_COLUMNS} FROM tool_executions \
                 WHERE run_id = $1 AND status = 'awaiting_approval' ORDER BY started_at LIMIT 1"
            ))
            .bind(run_id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// Calls whose wait for a person ended at or before `now`, oldest first.
    pub async fn expired_approvals(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<ToolExecution>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, ToolExecution>(&format!(
                "SELECT {EXECUTION_COLUMNS} FROM tool_executions \
                 WHERE status = 'awaiting_approval' AND approval_expires_at <= $1 \
                 ORDER BY approval_expires_at LIMIT $2"
            ))
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
    }

    /// The highest event number a run has recorded (0: none).
    pub async fn last_event_seq(&self, run_id: &str) -> Result<i64, StoreError> {
        with_reader!(self, |pool| {
            let (seq,): (Option<i64>,) =
                sqlx::query_as("SELECT MAX(seq) FROM run_events WHERE run_id = $1")
                    .bind(run_id)
                    .fetch_one(pool)
                    .await?;
            Ok(seq.unwrap_or(0))
        })
    }
}
