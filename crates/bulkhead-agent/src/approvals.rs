//! Tool calls that wait for a person. A call the agent's policy marks `ask`
//! is recorded (its audit row `awaiting_approval`, with the moment the wait
//! expires), announced (`approval_requested`), and the run is parked:
//! `awaiting_approval`, its session held, its task ended. Nothing of it
//! lives in memory, so the pause survives a restart. A decision (a person's,
//! or the expiry's, which denies) is claimed once in the store, and the run
//! goes on from what the store holds: the call decided, the calls after it
//! in the same step, then the agent loop.

use serde::Serialize;

use super::*;
use crate::run::{LoopEnd, chat_message};
use crate::tool_calls::redact_arguments;

/// A call waiting for a person, as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct PendingApproval {
    pub run_id: String,
    pub session_id: String,
    /// The model's id of the call: what a decision names.
    pub call_id: String,
    pub tool: String,
    /// As the model wrote them (JSON text), as in the `tool_call` event.
    pub arguments: String,
    pub audit_id: String,
    /// When the wait ends with the call denied (ms since the epoch).
    pub expires_at: i64,
}

/// A decision on a waiting call, as the run goes on with it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub audit_id: String,
    pub approve: bool,
    /// `approve`, `deny` or `expired`.
    pub decision: &'static str,
    /// A key id, `anonymous` or `expiry`.
    pub decided_by: String,
    pub comment: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("run not found")]
    RunNotFound,
    #[error("the run is not waiting for an approval (it is {status})")]
    NotAwaiting { status: String },
    #[error("the run is waiting for a decision on call {awaiting:?}, not on this one")]
    UnknownCall { awaiting: String },
    #[error("this call has been decided already")]
    AlreadyDecided,
    #[error("the server is shutting down and accepts no new runs")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Engine {
    /// Records a call as waiting for a person and announces it.
    pub(crate) async fn ask(
        &self,
        state: &mut RunState,
        audit_id: &str,
        call: &ToolCall,
    ) -> Result<PendingApproval, Failure> {
        let now = now_ms();
        let expires_at = now + self.settings.approval_timeout.as_millis() as i64;
        let name = call.function.name.as_str();
        let sandboxed = state.agent.runs_in_sandbox(name);
        let limits = serde_json::to_string(&state.agent.limits).unwrap_or_default();
        self.store
            .start_tool_execution(&NewToolExecution {
                id: audit_id,
                session_id: &state.session_id,
                run_id: &state.run_id,
                call_id: &call.id,
                tool: name,
                arguments: &redact_arguments(&call.function.arguments, &self.settings.secrets),
                backend: if sandboxed {
                    self.sandbox_backend()
                } else if state.agent.mcp_server(name).is_some() {
                    "mcp-http"
                } else {
                    "builtin"
                },
                // What a sandboxed call will run under, as audited_call
                // records for a call that runs at once.
                limits: sandboxed.then_some(limits.as_str()),
                started_at: now,
                approval_expires_at: Some(expires_at),
            })
            .await
            .map_err(|e| internal("could not record a call awaiting approval", &e))?;
        let approval = PendingApproval {
            run_id: state.run_id.clone(),
            session_id: state.session_id.clone(),
            call_id: call.id.clone(),
            tool: name.to_string(),
            arguments: call.function.arguments.clone(),
            audit_id: audit_id.to_string(),
            expires_at,
        };
        state.emit(
            "approval_requested",
            serde_json::to_value(&approval).unwrap_or_default(),
            now,
        );
        Ok(approval)
    }

    fn sandbox_backend(&self) -> &'static str {
        self.sandboxes
            .as_ref()
            .map_or("none", |sandboxes| sandboxes.backend_name())
    }

    /// Parks the run until its call is decided.
    pub(crate) async fn pause(
        &self,
        state: &mut RunState,
        approval: PendingApproval,
    ) -> RunOutcome {
        let now = now_ms();
        let progress = state.progress(now);
        match self
            .persist(|| self.store.pause_run(&progress, approval.expires_at))
            .await
        {
            Ok(()) => {
                state.pending_events.clear();
                state.pending_messages.clear();
                RunOutcome::AwaitingApproval {
                    approval,
                    tokens_used: state.tokens_used,
                }
            }
            Err(e) => {
                let failure = internal("could not record the run's pause", &e);
                Box::pin(self.close(state, Err(failure))).await
            }
        }
    }

    /// Decides the call a paused run waits on, and lets the run go on (on
    /// a task of its own, like any run). Exactly one decision is taken for
    /// a call: a second one, or one after the expiry, is refused.
    pub async fn decide(
        self: &Arc<Self>,
        run_id: &str,
        call_id: &str,
        decision: Decision,
        stream: bool,
        account: Option<Box<dyn RunAccount>>,
    ) -> Result<RunHandle, DecideError> {
        self.decide_or_cancel(run_id, Some(call_id), decision, stream, account, None)
            .await
    }

    /// Ends a paused run without running its call: the call is recorded
    /// denied (by `decided_by`), every call of its step gets a result
    /// saying so, and the run ends `interrupted` with `reason`.
    pub async fn cancel_paused(
        self: &Arc<Self>,
        run_id: &str,
        decided_by: &str,
        reason: &'static str,
    ) -> Result<RunHandle, DecideError> {
        let decision = Decision {
            audit_id: String::new(),
            approve: false,
            decision: "cancelled",
            decided_by: decided_by.to_string(),
            comment: Some(reason.to_string()),
        };
        self.decide_or_cancel(run_id, None, decision, false, None, Some(reason))
            .await
    }

    async fn decide_or_cancel(
        self: &Arc<Self>,
        run_id: &str,
        call_id: Option<&str>,
        decision: Decision,
        stream: bool,
        account: Option<Box<dyn RunAccount>>,
        cancel_reason: Option<&'static str>,
    ) -> Result<RunHandle, DecideError> {
        let cancel = cancel_reason.is_some();
        let in_flight = self.runs.token();
        if !self.is_accepting() {
            return Err(DecideError::ShuttingDown);
        }
        let run = self
            .store
            .run(run_id)
            .await?
            .ok_or(DecideError::RunNotFound)?;
        let awaiting = self.store.awaiting_approval(run_id).await?;
        let awaiting = match awaiting {
            Some(awaiting) if run.status == RunStatus::AwaitingApproval.as_str() => awaiting,
            _ => return Err(DecideError::NotAwaiting { status: run.status }),
        };
        if call_id.is_some_and(|call_id| awaiting.call_id != call_id) {
            return Err(DecideError::UnknownCall {
                awaiting: awaiting.call_id,
            });
        }
        let call_id = awaiting.call_id.as_str();
        let session = self
            .store
            .session(&run.session_id)
            .await?
            .ok_or(DecideError::RunNotFound)?;
        let decision = Decision {
            audit_id: awaiting.id.clone(),
            ..decision
        };
        let claimed = self
            .store
            .decide_approval(&bulkhead_store::ApprovalDecision {
                audit_id: &decision.audit_id,
                run_id,
                approve: decision.approve,
                decision: decision.decision,
                decided_by: &decision.decided_by,
                comment: decision.comment.as_deref(),
                now: now_ms(),
            })
            .await?;
        if !claimed {
            return Err(DecideError::AlreadyDecided);
        }
        tracing::info!(
            run_id,
            call_id,
            tool = %awaiting.tool,
            decision = decision.decision,
            decided_by = %decision.decided_by,
            "tool call decided"
        );

        let agent = self
            .agents
            .get(&session.agent)
            .cloned()
            .unwrap_or_else(|| Arc::clone(self.agents.default_agent()));
        let known_agent = self.agents.get(&session.agent).is_some();
        let mut state = RunState::new(
            run.id.clone(),
            run.session_id.clone(),
            stream,
            Arc::clone(&agent),
        );
        state.input = run.input;
        state.owner = session.owner;
        state.account = account;
        state.steps = run.steps;
        state.tokens_used = run.tokens_used;
        state.seq = self.store.last_event_seq(run_id).await?;
        let feed = self.feeds.open(
            &state.run_id,
            state.seq + 1,
            &self.interrupt,
            self.cluster.get(),
        );
        if let Some(reason) = cancel_reason {
            feed.mark_cancelled(reason);
        }
        state.attach_feed(Arc::clone(&feed));
        let events = state.take_receiver();
        let (outcome_tx, outcome_rx) = oneshot::channel();
        let spans = self.settings.spans;
        let span = telemetry::run_span(
            spans,
            self.settings.role.as_str(),
            &agent.model,
            &state.run_id,
            &state.session_id,
        );
        let engine = Arc::clone(self);
        let session_agent = session.agent;
        self.runs.spawn(
            async move {
                let _in_flight = in_flight;
                let run_metrics = telemetry::RunMetrics::start(Instant::now());
                tracing::info!(agent = %session_agent, "run resumed");
                let ended = if cancel {
                    engine.cancelled_pause(&mut state).await
                } else if known_agent {
                    engine.resumed_loop(&mut state, decision).await
                } else {
                    Err(Failure {
                        kind: FailureKind::Internal,
                        code: "agent_not_configured",
                        message: format!(
                            "this session belongs to agent {session_agent:?}, which this server no longer runs"
                        ),
                    })
                };
                let outcome = engine.close(&mut state, ended).await;
                engine.report(&state, &outcome, run_metrics, spans);
                engine.feeds.close(&state.run_id, &feed);
                engine.run_ended(&state.session_id);
                let _ = outcome_tx.send(outcome);
            }
            .instrument(span),
        );
        Ok(RunHandle {
            run_id: run.id,
            session_id: run.session_id,
            events,
            outcome: outcome_rx,
        })
    }

    /// The conversation as it stood at the pause, then the loop from the
    /// decided call on.
    async fn resumed_loop(
        &self,
        state: &mut RunState,
        decision: Decision,
    ) -> Result<LoopEnd, Failure> {
        let (conversation, left) = self.paused_step(state).await?;
        self.agent_loop(state, conversation, Some((left, decision)))
            .await
    }

    /// A paused run cancelled: the calls of its step are left open, so
    /// that closing the run answers each.
    async fn cancelled_pause(&self, state: &mut RunState) -> Result<LoopEnd, Failure> {
        let (_, left) = self.paused_step(state).await?;
        state.open_calls = left
            .into_iter()
            .map(|call| OpenCall {
                call,
                audit_id: None,
            })
            .collect();
        Err(state.interruption())
    }

    /// The conversation up to and with the step that paused, and that
    /// step's calls still without a result, the decided one first.
    async fn paused_step(
        &self,
        state: &RunState,
    ) -> Result<(Vec<ChatMessage>, Vec<ToolCall>), Failure> {
        let stored = self
            .store
            .messages(&state.session_id)
            .await
            .map_err(|e| internal("could not load the conversation", &e))?;
        // The step that paused: the run's last message calling tools. What
        // precedes it is history (repaired as always); its calls without a
        // result yet are what is left to run, the decided one first.
        let at = stored
            .iter()
            .rposition(|m| {
                m.run_id.as_deref() == Some(state.run_id.as_str())
                    && m.role == "assistant"
                    && m.tool_calls.is_some()
            })
            .ok_or_else(|| Failure {
                kind: FailureKind::Internal,
                code: "internal_error",
                message: "the paused step is missing from the conversation".into(),
            })?;
        let mut stored: Vec<ChatMessage> = stored.into_iter().map(chat_message).collect();
        let step: Vec<ChatMessage> = stored.split_off(at);
        let mut conversation = self.system_prompt(state);
        let (history, _) = bulkhead_model::history::repair(stored);
        conversation.extend(history);
        let calls = step[0].tool_calls.clone().unwrap_or_default();
        let answered: Vec<&str> = step[1..]
            .iter()
            .filter_map(|m| m.tool_call_id.as_deref())
            .collect();
        let left: Vec<ToolCall> = calls
            .into_iter()
            .filter(|call| !answered.contains(&call.id.as_str()))
            .collect();
        conversation.extend(step);
        Ok((conversation, left))
    }

    /// Denies every call whose wait is over, letting its run go on. Returns
    /// how many it decided. Called periodically; any replica may do it (a
    /// call is decided once).
    pub async fn expire_approvals(self: &Arc<Self>) -> usize {
        let expired = match self.store.expired_approvals(now_ms(), 64).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for expired approvals");
                return 0;
            }
        };
        let mut decided = 0;
        for call in expired {
            let decision = Decision {
                audit_id: call.id.clone(),
                approve: false,
                decision: "expired",
                decided_by: "expiry".into(),
                comment: None,
            };
            match self
                .decide(&call.run_id, &call.call_id, decision, false, None)
                .await
            {
                Ok(_) => {
                    decided += 1;
                    tracing::info!(
                        run_id = %call.run_id,
                        tool = %call.tool,
                        "an approval request expired unanswered: the call is denied"
                    );
                }
                Err(DecideError::AlreadyDecided | DecideError::ShuttingDown) => {}
                Err(e) => {
                    tracing::warn!(run_id = %call.run_id, error = %e, "could not expire an approval request")
                }
            }
        }
        decided
    }
}
