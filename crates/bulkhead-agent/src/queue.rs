//! The run queue: runs accepted for a session and started, one at a time
//! and in the order accepted, as the session becomes free. A queued run is
//! in the store before its client hears of it, so it survives the request
//! that made it and a restart; whichever process opens it takes it out of
//! the queue in the same transaction, so it starts once. This process
//! remembers which sessions it queued for, to look at the queue when one of
//! their runs ends instead of after every run; `dispatch_all` (at start and
//! on the housekeeping tick) finds the rest.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::*;

/// A run to queue.
pub struct QueueRequest {
    /// Allocated by the caller (`new_id`), so that it can answer with it.
    pub run_id: String,
    pub session_id: String,
    pub owner: Option<String>,
    /// The agent it runs (the session's, or the one it will be bound to).
    pub agent: String,
    pub message: String,
    /// Stored before `message` when it starts: a thread's first run.
    pub history: Vec<NewMessage>,
    /// How the client asked for it (JSON), kept on the run.
    pub kwargs: String,
    /// Refuse it if the session has a run in flight or queued.
    pub exclusive: bool,
    /// The caller's admission, held from now until the run ends.
    pub account: Option<Box<dyn RunAccount>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the server is shutting down and accepts no new runs")]
    ShuttingDown,
    #[error("the session has a run in flight or queued")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAction {
    /// Stop it; what it did stays, the run ends `interrupted`.
    Interrupt,
    /// Stop it and remove it: the run and what it added to the
    /// conversation are deleted (its tool calls stay in the audit trail).
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    /// It had ended already.
    Finished,
    /// It runs in another process (a replica) that could not be reached
    /// (no Redis to reach it through, or no answer in time).
    Elsewhere,
    NotFound,
}

#[derive(Default)]
pub(crate) struct RunQueue {
    /// Admissions of queued runs, handed to the run when it starts.
    accounts: Mutex<HashMap<String, Box<dyn RunAccount>>>,
    /// Sessions this process queued runs for.
    waiting: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for RunQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunQueue").finish_non_exhaustive()
    }
}

impl RunQueue {
    fn take_account(&self, run_id: &str) -> Option<Box<dyn RunAccount>> {
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(run_id)
    }

    fn keep_account(&self, run_id: &str, account: Option<Box<dyn RunAccount>>) {
        if let Some(account) = account {
            self.accounts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(run_id.to_string(), account);
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine {
    /// Queues a run, then starts it if its session is free.
    pub async fn enqueue(self: &Arc<Self>, request: QueueRequest) -> Result<(), EnqueueError> {
        if !self.is_accepting() {
            return Err(EnqueueError::ShuttingDown);
        }
        let history = if request.history.is_empty() {
            None
        } else {
            Some(history_json(&request.history))
        };
        let queued = self
            .store
            .enqueue_run(
                &bulkhead_store::NewQueuedRun {
                    id: &request.run_id,
                    session_id: &request.session_id,
                    owner: request.owner.as_deref(),
                    agent: &request.agent,
                    input: &request.message,
                    history: history.as_deref(),
                    kwargs: &request.kwargs,
                    now: now_ms(),
                },
                request.exclusive,
            )
            .await?;
        if !queued {
            return Err(EnqueueError::Busy);
        }
        self.queue.keep_account(&request.run_id, request.account);
        self.queue.waiting().insert(request.session_id.clone());
        self.dispatch(&request.session_id).await;
        Ok(())
    }

    /// Starts the session's oldest queued run if the session is free.
    pub async fn dispatch(self: &Arc<Self>, session_id: &str) {
        loop {
            let next = match self.store.next_queued_run(session_id).await {
                Ok(Some(next)) => next,
                Ok(None) => {
                    self.queue.waiting().remove(session_id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(session_id, error = %e, "could not read the run queue");
                    return;
                }
            };
            let history = next
                .history
                .as_deref()
                .map(history_from_json)
                .unwrap_or_default();
            let account = self.queue.take_account(&next.id);
            let started = self
                .start_run(StartRun {
                    session_id: Some(next.session_id.clone()),
                    create_if_missing: false,
                    history,
                    agent: Some(next.agent.clone()),
                    message: next.input.clone(),
                    // Deltas for whoever follows the run's feed.
                    stream: true,
                    owner: next.owner.clone(),
                    account,
                    queued: Some(QueuedStart {
                        run_id: next.id.clone(),
                        kwargs: next.kwargs.clone(),
                    }),
                })
                .await;
            match started {
                Ok(_) => return,
                // Its turn comes when the session's run ends.
                Err(StartError::SessionBusy { .. } | StartError::ShuttingDown) => return,
                // Cancelled, or another process took it: the next one.
                Err(StartError::NotQueued) => continue,
                Err(StartError::Store(e)) => {
                    tracing::warn!(run_id = %next.id, error = %e, "could not start a queued run");
                    return;
                }
                Err(
                    e @ (StartError::SessionNotFound
                    | StartError::UnknownAgent(_)
                    | StartError::WrongAgent { .. }),
                ) => {
                    // It can never start: leave it cancelled, not blocking
                    // the runs queued after it.
                    tracing::warn!(run_id = %next.id, error = %e, "a queued run cannot start; it is cancelled");
                    let _ = self
                        .store
                        .cancel_queued_run(&next.id, false, now_ms())
                        .await;
                }
            }
        }
    }

    /// Looks at the queue of every session with queued runs.
    pub async fn dispatch_all(self: &Arc<Self>) {
        let sessions = match self.store.sessions_with_queued_runs().await {
            Ok(sessions) => sessions,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the run queue");
                return;
            }
        };
        for session_id in sessions {
            self.queue.waiting().insert(session_id.clone());
            self.dispatch(&session_id).await;
        }
    }

    /// A run of the session ended (or paused): its next queued run may go.
    pub(crate) fn run_ended(self: &Arc<Self>, session_id: &str) {
        if !self.queue.waiting().contains(session_id) {
            return;
        }
        let engine = Arc::clone(self);
        let session_id = session_id.to_string();
        tokio::spawn(async move { engine.dispatch(&session_id).await });
    }

    /// Cancels a run, queued, executing here or paused for a person, and
    /// waits until it has ended.
    pub async fn cancel(
        self: &Arc<Self>,
        run_id: &str,
        action: CancelAction,
        cancelled_by: &str,
        reason: &'static str,
    ) -> Result<CancelOutcome, StoreError> {
        let rollback = action == CancelAction::Rollback;
        if let Some(queued) = self.store.queued_run(run_id).await? {
            if self
                .store
                .cancel_queued_run(run_id, rollback, now_ms())
                .await?
            {
                return Ok(CancelOutcome::Cancelled);
            }
            if queued.status != "pending" {
                if rollback {
                    self.store.delete_run(run_id, true).await?;
                }
                return Ok(CancelOutcome::Finished);
            }
            // Started meanwhile: cancelled below like any run.
        }
        if let Some(mut follower) = self.follow_run(run_id, i64::MAX) {
            self.cancel_run(run_id, reason);
            while !matches!(follower.next().await, FeedItem::Ended) {}
        } else {
            let Some(run) = self.store.run(run_id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            if run.status == RunStatus::AwaitingApproval.as_str() {
                match self.cancel_paused(run_id, cancelled_by, reason).await {
                    Ok(handle) => {
                        let _ = handle.outcome.await;
                    }
                    Err(DecideError::Store(e)) => return Err(e),
                    // Decided (or cancelled) a moment ago: it goes on or
                    // has ended; look again.
                    Err(_) => {
                        if let Some(mut follower) = self.follow_run(run_id, i64::MAX) {
                            self.cancel_run(run_id, reason);
                            while !matches!(follower.next().await, FeedItem::Ended) {}
                        }
                    }
                }
            } else if run.status == RunStatus::Running.as_str() {
                // Executing on another replica: ask it, and wait for the
                // run's end there (or for the lease to end it).
                let Some(cluster) = self.cluster.get() else {
                    return Ok(CancelOutcome::Elsewhere);
                };
                cluster.request_cancel(run_id, reason);
                let deadline = Instant::now() + self.settings.lease + Duration::from_secs(5);
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    match self.store.run(run_id).await? {
                        Some(run) if run.status == RunStatus::Running.as_str() => {
                            if Instant::now() > deadline {
                                return Ok(CancelOutcome::Elsewhere);
                            }
                        }
                        _ => break,
                    }
                }
            } else {
                if rollback {
                    self.store.delete_run(run_id, true).await?;
                }
                return Ok(CancelOutcome::Finished);
            }
        }
        if rollback {
            self.store.delete_run(run_id, true).await?;
        }
        Ok(CancelOutcome::Cancelled)
    }
}

/// A queued run's history as stored with it.
fn history_json(history: &[NewMessage]) -> String {
    Value::Array(
        history
            .iter()
            .map(|m| {
                json!({
                    "role": m.role,
                    "content": m.content,
                    "tool_calls": m.tool_calls,
                    "tool_call_id": m.tool_call_id,
                })
            })
            .collect(),
    )
    .to_string()
}

fn history_from_json(text: &str) -> Vec<NewMessage> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let text_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    items
        .iter()
        .filter_map(|m| {
            let role = match m.get("role").and_then(Value::as_str)? {
                "system" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                _ => return None,
            };
            Some(NewMessage {
                role,
                content: text_of(m, "content"),
                tool_calls: text_of(m, "tool_calls"),
                tool_call_id: text_of(m, "tool_call_id"),
            })
        })
        .collect()
}
