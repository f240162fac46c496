//! The run engine. A run is one user message answered by the agent loop:
//! model call, tool calls, model call… until the model answers in text or
//! the step budget is spent. Every run is recorded (its status, its messages
//! and each of its events, numbered) before anyone is told it happened.
//!
//! Runs execute on their own tasks, apart from the request that started
//! them: a client that goes away does not lose its run, and shutdown can
//! wait for all of them and interrupt the ones that outlast the grace.

pub mod roles;
mod sandboxes;
pub mod telemetry;
mod tools;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead_model::{ChatMessage, Completion, Model, ModelError, ToolCall};
use bulkhead_store::{
    BeginRun, BeginRunError, DeleteOutcome, FinishRun, NewEvent, NewMessage, NewToolExecution,
    RunProgress, RunStatus, SessionRef, Store, StoreError, ToolExecutionEnd,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use roles::{PeerClient, Peers, RoleKind};
pub use sandboxes::SandboxManager;
pub use telemetry::SpanSettings;
pub use tools::{Tool, ToolContext, ToolError, ToolOutput, ToolRegistry};

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Model calls allowed in one run.
    pub max_steps: u32,
    /// Prepended to every conversation sent to the model, when set.
    pub system_prompt: Option<String>,
    /// A session lock not refreshed for this long is presumed abandoned
    /// (its holder crashed) and may be taken over.
    pub lock_ttl: Duration,
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
    Completed { response: String, tokens_used: i64 },
    Failed { failure: Failure, tokens_used: i64 },
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
    #[error("session {session_id} already has a run in progress ({active_run_id})")]
    SessionBusy {
        session_id: String,
        active_run_id: String,
    },
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
    pub message: String,
    /// Stream the model's text as it is produced (and hand out the events).
    pub stream: bool,
    /// The caller's tenant: a new session becomes theirs, another tenant's
    /// session answers as unknown. `None` when authentication is off.
    pub owner: Option<String>,
    /// Told of the model tokens the run spends; dropped when the run ends.
    pub account: Option<Box<dyn RunAccount>>,
}

impl std::fmt::Debug for StartRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartRun")
            .field("session_id", &self.session_id)
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
    model: Arc<Model>,
    tools: ToolRegistry,
    sandboxes: Option<Arc<SandboxManager>>,
    settings: EngineSettings,
    runs: TaskTracker,
    interrupt: CancellationToken,
    accepting: AtomicBool,
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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Engine {
    pub fn new(
        store: Store,
        model: Arc<Model>,
        tools: ToolRegistry,
        sandboxes: Option<Arc<SandboxManager>>,
        settings: EngineSettings,
    ) -> Engine {
        Engine {
            store,
            model,
            tools,
            sandboxes,
            settings,
            runs: TaskTracker::new(),
            interrupt: CancellationToken::new(),
            accepting: AtomicBool::new(true),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn sandboxes(&self) -> Option<&SandboxManager> {
        self.sandboxes.as_deref()
    }

    /// Deletes a session (unless a run holds it) and destroys its sandbox.
    pub async fn delete_session(&self, session_id: &str) -> Result<DeleteOutcome, StoreError> {
        let outcome = self.store.delete_session(session_id).await?;
        if outcome == DeleteOutcome::Deleted
            && let Some(sandboxes) = &self.sandboxes
        {
            sandboxes.release(session_id).await;
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

    /// Records the run and starts it on its own task.
    pub async fn start_run(self: &Arc<Self>, start: StartRun) -> Result<RunHandle, StartError> {
        // Held from before the check so that shutdown cannot finish waiting
        // between the check and the spawn.
        let in_flight = self.runs.token();
        if !self.is_accepting() {
            return Err(StartError::ShuttingDown);
        }
        let run_id = new_id();
        let (session_id, is_new_session) = match start.session_id {
            Some(id) => (id, false),
            None => (new_id(), true),
        };
        let now = now_ms();
        let mut state = RunState::new(run_id.clone(), session_id.clone(), start.stream);
        state.input = start.message;
        state.owner = start.owner;
        state.account = start.account;
        state.new_session = is_new_session;
        let started = state.next_event(
            "run_started",
            json!({"run_id": run_id, "session_id": session_id}),
            now,
        );
        let lock_stale_before = now - self.settings.lock_ttl.as_millis() as i64;
        let events = state.take_receiver();
        let (begun_tx, begun_rx) = oneshot::channel();
        let (outcome_tx, outcome_rx) = oneshot::channel();
        let engine = Arc::clone(self);
        let begun_at = Instant::now();
        let spans = self.settings.spans;
        let span = telemetry::run_span(
            spans,
            self.settings.role.as_str(),
            &self.model,
            &run_id,
            &session_id,
        );
        // The run is opened on its own task, not the caller's: a client that
        // hangs up while the opening is being written cancels the caller,
        // and a run opened by then must still be driven to its end and
        // closed, not left `running` with its session locked.
        self.runs.spawn(
            async move {
                let _in_flight = in_flight;
                let session = if state.new_session {
                    SessionRef::New(&state.session_id)
                } else {
                    SessionRef::Existing(&state.session_id)
                };
                let begun = engine
                    .store
                    .begin_run(&BeginRun {
                        session,
                        owner: state.owner.as_deref(),
                        run_id: &state.run_id,
                        input: &state.input,
                        now,
                        lock_stale_before,
                        first_event: started,
                    })
                    .await;
                let opened = begun.is_ok();
                let _ = begun_tx.send(begun);
                if !opened {
                    return;
                }
                let run_metrics = telemetry::RunMetrics::start(begun_at);
                tracing::info!("run started");
                let outcome = engine.drive(&mut state).await;
                let (status, failure) = match &outcome {
                    RunOutcome::Completed { .. } => ("completed", None),
                    RunOutcome::Failed { failure, .. } => (
                        if failure.kind == FailureKind::Interrupted {
                            "interrupted"
                        } else {
                            "failed"
                        },
                        Some((failure.code, failure.message.as_str())),
                    ),
                };
                run_metrics.finish(status);
                telemetry::run_ended(&tracing::Span::current(), spans, failure);
                match &outcome {
                    RunOutcome::Completed { tokens_used, .. } => {
                        tracing::info!(tokens_used, steps = state.steps, "run completed")
                    }
                    RunOutcome::Failed {
                        failure,
                        tokens_used,
                    } => tracing::warn!(
                        tokens_used,
                        steps = state.steps,
                        code = failure.code,
                        error = %failure.message,
                        "run did not complete"
                    ),
                }
                let _ = outcome_tx.send(outcome);
            }
            .instrument(span),
        );
        match begun_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(BeginRunError::SessionNotFound)) => return Err(StartError::SessionNotFound),
            Ok(Err(BeginRunError::SessionBusy { active_run_id })) => {
                return Err(StartError::SessionBusy {
                    session_id,
                    active_run_id,
                });
            }
            Ok(Err(BeginRunError::Store(e))) => return Err(StartError::Store(e)),
            Err(_) => {
                return Err(StartError::Store(StoreError::WriterFailed(
                    "the run's task ended before the run was opened".into(),
                )));
            }
        }
        Ok(RunHandle {
            run_id,
            session_id,
            events,
            outcome: outcome_rx,
        })
    }

    async fn drive(&self, state: &mut RunState) -> RunOutcome {
        let outcome = match (self.settings.role, &self.settings.peers) {
            (RoleKind::Planner, Some(peers)) => self.planned_run(state, peers).await,
            _ => self.agent_loop(state).await,
        };
        let (status, output, error) = match &outcome {
            Ok(response) => (RunStatus::Completed, Some(response.as_str()), None),
            Err(failure) => (
                if failure.kind == FailureKind::Interrupted {
                    RunStatus::Interrupted
                } else {
                    RunStatus::Failed
                },
                None,
                Some(failure),
            ),
        };
        let now = now_ms();
        match &outcome {
            Ok(response) => {
                state.pending_messages.push(NewMessage {
                    role: "assistant",
                    content: Some(response.clone()),
                    tool_calls: None,
                    tool_call_id: None,
                });
                let data = json!({
                    "run_id": state.run_id,
                    "session_id": state.session_id,
                    "response": response,
                    "tokens_used": state.tokens_used,
                });
                state.emit("run_completed", data, now);
            }
            Err(failure) => {
                state.answer_open_calls(failure, now);
                let data = json!({
                    "run_id": state.run_id,
                    "session_id": state.session_id,
                    "tokens_used": state.tokens_used,
                    "error": {"code": failure.code, "message": failure.message},
                });
                state.emit("run_failed", data, now);
            }
        }
        let recorded = self
            .store
            .finish_run(&FinishRun {
                progress: state.progress(now),
                status,
                output,
                error: error.map(|f| (f.code, f.message.as_str())),
            })
            .await;
        let tokens_used = state.tokens_used;
        match (outcome, recorded) {
            (Ok(response), Ok(())) => RunOutcome::Completed {
                response,
                tokens_used,
            },
            (Err(failure), Ok(())) => RunOutcome::Failed {
                failure,
                tokens_used,
            },
            (_, Err(e)) => {
                tracing::error!(error = %e, "could not record the end of the run");
                RunOutcome::Failed {
                    failure: Failure {
                        kind: FailureKind::Internal,
                        code: "internal_error",
                        message: "the run could not be recorded".into(),
                    },
                    tokens_used,
                }
            }
        }
    }

    /// Model, tools, model… until a text answer. Returns that answer.
    async fn agent_loop(&self, state: &mut RunState) -> Result<String, Failure> {
        // A session this run opened holds nothing but the run's input: no
        // need to read it back.
        let stored = if state.new_session {
            Vec::new()
        } else {
            self.store
                .messages(&state.session_id)
                .await
                .map_err(|e| internal("could not load the conversation", &e))?
        };
        let mut conversation: Vec<ChatMessage> = Vec::with_capacity(stored.len() + 2);
        if let Some(prompt) = &self.settings.system_prompt {
            conversation.push(ChatMessage::text("system", prompt.clone()));
        }
        let (history, repaired) = bulkhead_model::history::repair(
            stored
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                    tool_calls: m
                        .tool_calls
                        .as_deref()
                        .and_then(|calls| serde_json::from_str(calls).ok()),
                    tool_call_id: m.tool_call_id,
                })
                .collect(),
        );
        if repaired > 0 {
            // Recorded by a release that left interrupted calls unanswered;
            // sent as it is, a strict endpoint would refuse this session
            // for good.
            tracing::warn!(
                repaired,
                "the stored conversation had tool calls without results; sent with those answered"
            );
        }
        conversation.extend(history);
        if state.new_session {
            conversation.push(ChatMessage::text("user", state.input.clone()));
        }

        for step in 1..=self.settings.max_steps {
            state.steps = step as i64;
            let completion = self.call_model(state, &conversation).await?;
            state.tokens_used += completion
                .usage
                .map(|u| u.total_tokens as i64)
                .unwrap_or_default();
            if completion.tool_calls.is_empty() {
                return Ok(sanitize(completion.content));
            }
            self.run_tools(state, &mut conversation, completion).await?;
            self.record_progress(state).await?;
        }
        Err(Failure {
            kind: FailureKind::MaxSteps,
            code: "max_steps_exceeded",
            message: format!(
                "the model was still calling tools after {} steps (MAX_STEPS)",
                self.settings.max_steps
            ),
        })
    }

    /// The planner's run: a plan from the model, each step handed to the
    /// executor (one executor session for the whole task), the results
    /// handed to the critic. Each hand-over is recorded before the next.
    async fn planned_run(
        &self,
        state: &mut RunState,
        peers: &PeerClient,
    ) -> Result<String, Failure> {
        let plan = self.agent_loop(state).await?;
        let (mut steps, dropped) = roles::parse_steps(&plan, peers.peers().max_steps);
        if steps.is_empty() {
            steps.push(state.input.clone());
        }
        state.emit(
            "plan",
            json!({"steps": steps, "dropped": dropped}),
            now_ms(),
        );
        self.record_progress(state).await?;

        let mut executor_session: Option<String> = None;
        let mut results = Vec::with_capacity(steps.len());
        for (index, step) in steps.iter().enumerate() {
            state.emit(
                "delegated",
                json!({"role": "executor", "step": index + 1, "message": step, "session_id": executor_session}),
                now_ms(),
            );
            let answer = self
                .delegate(peers, RoleKind::Executor, step, executor_session.as_deref())
                .await?;
            state.tokens_used += answer.tokens_used;
            state.emit(
                "delegate_result",
                json!({
                    "role": "executor",
                    "step": index + 1,
                    "response": answer.response,
                    "session_id": answer.session_id,
                    "run_id": answer.run_id,
                    "tokens_used": answer.tokens_used,
                }),
                now_ms(),
            );
            executor_session = Some(answer.session_id);
            results.push(answer.response);
            self.record_progress(state).await?;
        }

        let numbered = |items: &[String]| {
            items
                .iter()
                .enumerate()
                .map(|(i, item)| format!("{}. {item}", i + 1))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let (plan, results) = (numbered(&steps), numbered(&results));
        let request = format!(
            "Task:\n{}\n\nPlan:\n{plan}\n\nResults:\n{results}",
            state.input
        );
        state.emit(
            "delegated",
            json!({"role": "critic", "message": request}),
            now_ms(),
        );
        let review = self
            .delegate(peers, RoleKind::Critic, &request, None)
            .await?;
        state.tokens_used += review.tokens_used;
        state.emit(
            "delegate_result",
            json!({
                "role": "critic",
                "response": review.response,
                "session_id": review.session_id,
                "run_id": review.run_id,
                "tokens_used": review.tokens_used,
            }),
            now_ms(),
        );
        Ok(format!(
            "Plan:\n{plan}\n\nResults:\n{results}\n\nReview:\n{}",
            review.response
        ))
    }

    async fn delegate(
        &self,
        peers: &PeerClient,
        role: RoleKind,
        message: &str,
        session_id: Option<&str>,
    ) -> Result<roles::PeerAnswer, Failure> {
        tokio::select! {
            answer = peers.ask(role, message, session_id) => answer.map_err(|message| Failure {
                kind: FailureKind::Upstream,
                code: "delegate_error",
                message,
            }),
            () = self.interrupt.cancelled() => Err(interrupted()),
        }
    }

    /// Commits the events and messages gathered since the last commit.
    async fn record_progress(&self, state: &mut RunState) -> Result<(), Failure> {
        self.store
            .record_step(&state.progress(now_ms()))
            .await
            .map_err(|e| internal("could not record the run's progress", &e))?;
        state.pending_events.clear();
        state.pending_messages.clear();
        Ok(())
    }

    async fn call_model(
        &self,
        state: &mut RunState,
        conversation: &[ChatMessage],
    ) -> Result<Completion, Failure> {
        let streaming = state.streaming;
        let spans = self.settings.spans;
        let span = telemetry::chat_span(
            spans,
            &self.model,
            &state.session_id,
            conversation,
            &self.settings.secrets,
        );
        let result = {
            let mut sink = |text: &str| {
                let now = now_ms();
                state.emit("message_delta", json!({ "content": text }), now);
            };
            let deltas: Option<&mut bulkhead_model::DeltaSink<'_>> =
                if streaming { Some(&mut sink) } else { None };
            let call = self
                .model
                .complete(conversation, self.tools.specs(), deltas);
            tokio::select! {
                result = call.instrument(span.clone()) => result,
                () = self.interrupt.cancelled() => return Err(interrupted()),
            }
        };
        telemetry::chat_ended(&span, spans, &result, &self.settings.secrets);
        let completion = result.map_err(|e| {
            let (kind, code) = match e {
                ModelError::Timeout(_) => (FailureKind::UpstreamTimeout, "model_timeout"),
                _ => (FailureKind::Upstream, "model_error"),
            };
            Failure {
                kind,
                code,
                message: e.to_string(),
            }
        })?;
        if let (Some(account), Some(usage)) = (&state.account, &completion.usage) {
            account.tokens_spent(usage.prompt_tokens, usage.completion_tokens);
        }
        if !streaming && !completion.content.is_empty() {
            state.emit(
                "message_delta",
                json!({ "content": completion.content }),
                now_ms(),
            );
        }
        Ok(completion)
    }

    async fn run_tools(
        &self,
        state: &mut RunState,
        conversation: &mut Vec<ChatMessage>,
        completion: Completion,
    ) -> Result<(), Failure> {
        let calls: Vec<ToolCall> = completion.tool_calls;
        let assistant = ChatMessage {
            role: "assistant".into(),
            content: (!completion.content.is_empty()).then(|| sanitize(completion.content)),
            tool_calls: Some(calls.clone()),
            tool_call_id: None,
        };
        state.pending_messages.push(NewMessage {
            role: "assistant",
            content: assistant.content.clone(),
            tool_calls: serde_json::to_string(&calls).ok(),
            tool_call_id: None,
        });
        conversation.push(assistant);
        state.open_calls = calls
            .iter()
            .map(|call| OpenCall {
                call: call.clone(),
                audit_id: None,
            })
            .collect();
        for call in calls {
            let name = call.function.name.as_str();
            let audit_id = new_id();
            if let Some(open) = state.open_calls.first_mut() {
                open.audit_id = Some(audit_id.clone());
            }
            state.emit(
                "tool_call",
                json!({"id": call.id, "name": name, "arguments": call.function.arguments, "audit_id": audit_id}),
                now_ms(),
            );
            let span = telemetry::tool_span(self.settings.spans, name, &call.id, || {
                redact_arguments(&call.function.arguments, &self.settings.secrets)
            });
            let output = self
                .audited_call(state, &audit_id, &call)
                .instrument(span)
                .await?;
            let mut result = json!({
                "id": call.id,
                "name": name,
                "content": output.content,
                "is_error": output.is_error,
                "audit_id": audit_id,
            });
            if let Some(execution) = &output.execution {
                result["execution"] = json!({
                    "exit_code": execution.exit_code,
                    "signal": execution.signal,
                    "killed_reason": execution.killed_reason,
                    "limits_hit": execution.limits_hit,
                    "duration_ms": execution.duration_ms,
                    "stdout_bytes": execution.stdout.total_bytes,
                    "stderr_bytes": execution.stderr.total_bytes,
                    "truncated": execution.stdout.truncated || execution.stderr.truncated,
                    "egress_refused": execution.egress_refusals.len(),
                });
            }
            state.emit("tool_result", result, now_ms());
            let content = sanitize(output.content);
            state.pending_messages.push(NewMessage {
                role: "tool",
                content: Some(content.clone()),
                tool_calls: None,
                tool_call_id: Some(call.id.clone()),
            });
            state.open_calls.remove(0);
            conversation.push(ChatMessage {
                role: "tool".into(),
                content: Some(content),
                tool_calls: None,
                tool_call_id: Some(call.id),
            });
        }
        Ok(())
    }

    /// Records the call, runs it, completes the record. A call that cannot
    /// be recorded is not run.
    async fn audited_call(
        &self,
        state: &RunState,
        audit_id: &str,
        call: &ToolCall,
    ) -> Result<ToolOutput, Failure> {
        let name = call.function.name.as_str();
        let sandboxed = self.tools.is_sandboxed(name);
        let (backend, limits) = match (&self.sandboxes, sandboxed) {
            (Some(sandboxes), true) => {
                // The limits on record are those the sandbox applies, which
                // a remote sandboxd may have lowered; the configured ones
                // when no sandbox can be had (the call is then refused).
                let limits = match sandboxes.for_session(&state.session_id).await {
                    Ok(sandbox) => sandbox.limits().clone(),
                    Err(_) => sandboxes.limits().clone(),
                };
                (
                    sandboxes.backend_name(),
                    serde_json::to_string(&limits).ok(),
                )
            }
            (None, true) => ("none", None),
            (_, false) => ("builtin", None),
        };
        let arguments = redact_arguments(&call.function.arguments, &self.settings.secrets);
        let started_at = now_ms();
        let recorded = self
            .store
            .start_tool_execution(&NewToolExecution {
                id: audit_id,
                session_id: &state.session_id,
                run_id: &state.run_id,
                call_id: &call.id,
                tool: name,
                arguments: &arguments,
                backend,
                limits: limits.as_deref(),
                started_at,
            })
            .await;
        let label = if self.tools.has(name) {
            name
        } else {
            "unknown"
        };
        let spans = self.settings.spans;
        if let Err(e) = recorded {
            tracing::error!(error = %e, tool = name, "could not record a tool call; it was not run");
            telemetry::tool_call_ended(label, "unrecorded", None);
            telemetry::tool_ended(&tracing::Span::current(), spans, "unrecorded", None, &[]);
            return Ok(ToolOutput {
                content:
                    "error: the call could not be recorded in the audit trail, so it was not run"
                        .into(),
                is_error: true,
                execution: None,
            });
        }
        let context = ToolContext {
            session_id: &state.session_id,
            sandboxes: self.sandboxes.as_deref(),
        };
        let ran = Instant::now();
        let result = tokio::select! {
            result = self.tools.call(context, name, &call.function.arguments) => result,
            () = self.interrupt.cancelled() => {
                telemetry::tool_call_ended(label, "interrupted", Some(ran.elapsed()));
                telemetry::tool_ended(&tracing::Span::current(), spans, "interrupted", None, &[]);
                let end = ToolExecutionEnd {
                    status: "interrupted",
                    finished_at: now_ms(),
                    error: Some("the server shut down during the call".into()),
                    ..ToolExecutionEnd::default()
                };
                let _ = self.store.finish_tool_execution(audit_id, &end).await;
                return Err(interrupted());
            }
        };
        let finished_at = now_ms();
        let duration = ran.elapsed();
        let (output, status, error) = match result {
            Ok(output) => (output, "completed", None),
            Err(e) => {
                let status = if matches!(e, ToolError::Refused(_)) {
                    "refused"
                } else {
                    "failed"
                };
                let message = e.to_string();
                (
                    ToolOutput {
                        content: format!("error: {message}"),
                        is_error: true,
                        execution: None,
                    },
                    status,
                    Some(message),
                )
            }
        };
        let outcome = match status {
            "completed" if output.is_error => "error",
            other => other,
        };
        telemetry::tool_call_ended(label, outcome, Some(duration));
        telemetry::tool_ended(
            &tracing::Span::current(),
            spans,
            outcome,
            Some(&output.content),
            &self.settings.secrets,
        );
        let execution = output.execution.as_ref();
        let end = ToolExecutionEnd {
            status,
            finished_at,
            exit_code: execution.and_then(|x| x.exit_code).map(i64::from),
            signal: execution.and_then(|x| x.signal).map(i64::from),
            killed_reason: execution
                .and_then(|x| x.killed_reason)
                .map(|r| r.as_str().to_string()),
            limits_hit: execution.map(|x| json!(x.limits_hit).to_string()),
            stdout_bytes: execution.map(|x| x.stdout.total_bytes as i64),
            stderr_bytes: execution.map(|x| x.stderr.total_bytes as i64),
            stdout_truncated: execution.map(|x| x.stdout.truncated),
            stderr_truncated: execution.map(|x| x.stderr.truncated),
            stdout_sha256: execution.map(|x| x.stdout.sha256.clone()),
            stderr_sha256: execution.map(|x| x.stderr.sha256.clone()),
            duration_ms: Some(execution.map_or(finished_at - started_at, |x| x.duration_ms as i64)),
            error,
            egress_refusals: execution.map(|x| json!(x.egress_refusals).to_string()),
        };
        if let Err(e) = self.store.finish_tool_execution(audit_id, &end).await {
            tracing::error!(error = %e, audit_id, "could not complete the record of a tool call");
        }
        tracing::info!(
            audit_id,
            tool = name,
            backend,
            status,
            exit_code = end.exit_code,
            signal = end.signal,
            killed_reason = end.killed_reason.as_deref(),
            duration_ms = end.duration_ms,
            stdout_bytes = end.stdout_bytes,
            stderr_bytes = end.stderr_bytes,
            truncated =
                end.stdout_truncated.unwrap_or(false) || end.stderr_truncated.unwrap_or(false),
            egress_refused = execution.map_or(0, |x| x.egress_refusals.len()),
            "tool call audited"
        );
        Ok(output)
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

/// Tool arguments as the audit trail keeps them: values under secret-looking
/// keys and any configured secret are replaced by `[REDACTED]`.
fn redact_arguments(arguments: &str, secrets: &[String]) -> String {
    fn walk(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    let key = key.to_ascii_lowercase();
                    if [
                        "password",
                        "passwd",
                        "secret",
                        "token",
                        "api_key",
                        "apikey",
                        "authorization",
                    ]
                    .iter()
                    .any(|s| key.contains(s))
                    {
                        *value = Value::String("[REDACTED]".into());
                    } else {
                        walk(value);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut text = match serde_json::from_str::<Value>(arguments) {
        Ok(mut value) => {
            walk(&mut value);
            value.to_string()
        }
        Err(_) => arguments.to_string(),
    };
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        text = bulkhead_model::redact_secret(&text, secret);
    }
    sanitize(text)
}

fn interrupted() -> Failure {
    Failure {
        kind: FailureKind::Interrupted,
        code: "run_interrupted",
        message: "the server shut down before the run finished".into(),
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

/// A call the model made whose result is not recorded yet.
struct OpenCall {
    call: ToolCall,
    /// Set once the call has been started (and so audited).
    audit_id: Option<String>,
}

/// What a run accumulates between two writes to the store.
struct RunState {
    run_id: String,
    session_id: String,
    /// The user's message that started the run.
    input: String,
    /// The run opened its session: the conversation is its input alone.
    new_session: bool,
    owner: Option<String>,
    account: Option<Box<dyn RunAccount>>,
    streaming: bool,
    seq: i64,
    steps: i64,
    tokens_used: i64,
    pending_events: Vec<NewEvent>,
    pending_messages: Vec<NewMessage>,
    /// The current step's calls still without a result, in order.
    open_calls: Vec<OpenCall>,
    sender: Option<mpsc::UnboundedSender<EventRecord>>,
    receiver: Option<mpsc::UnboundedReceiver<EventRecord>>,
}

impl RunState {
    fn new(run_id: String, session_id: String, streaming: bool) -> RunState {
        let (sender, receiver) = if streaming {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        RunState {
            run_id,
            session_id,
            input: String::new(),
            new_session: false,
            owner: None,
            account: None,
            streaming,
            seq: 0,
            steps: 0,
            tokens_used: 0,
            pending_events: Vec::new(),
            pending_messages: Vec::new(),
            open_calls: Vec::new(),
            sender,
            receiver,
        }
    }

    fn take_receiver(&mut self) -> Option<mpsc::UnboundedReceiver<EventRecord>> {
        self.receiver.take()
    }

    /// Numbers an event, queues it for the store and hands it to the client.
    fn emit(&mut self, kind: &'static str, data: Value, now: i64) {
        let event = self.next_event(kind, data, now);
        self.pending_events.push(event);
    }

    /// Numbers an event and hands it to the client.
    fn next_event(&mut self, kind: &'static str, data: Value, now: i64) -> NewEvent {
        self.seq += 1;
        let data = data.to_string();
        if let Some(sender) = &self.sender {
            // A client that went away does not stop the run.
            let _ = sender.send(EventRecord {
                seq: self.seq,
                kind,
                data: Arc::from(data.as_str()),
            });
        }
        NewEvent {
            seq: self.seq,
            kind,
            data,
            created_at: now,
        }
    }

    /// Gives every call the run leaves unanswered a result saying so. The
    /// whole history goes to the model with each later message, and strict
    /// endpoints refuse one in which a call has no result: without this, one
    /// interrupted call would make every later message of the session fail.
    fn answer_open_calls(&mut self, failure: &Failure, now: i64) {
        for OpenCall { call, audit_id } in std::mem::take(&mut self.open_calls) {
            let content = match (&audit_id, &failure.kind) {
                (Some(_), FailureKind::Interrupted) => {
                    "error: interrupted before it finished: the server shut down during the call"
                        .to_string()
                }
                (Some(_), _) => {
                    format!("error: interrupted before it finished: {}", failure.message)
                }
                (None, _) => format!(
                    "error: not run: the run ended before this call started ({})",
                    failure.message
                ),
            };
            self.emit(
                "tool_result",
                json!({
                    "id": call.id,
                    "name": call.function.name,
                    "content": content,
                    "is_error": true,
                    "audit_id": audit_id,
                }),
                now,
            );
            self.pending_messages.push(NewMessage {
                role: "tool",
                content: Some(content),
                tool_calls: None,
                tool_call_id: Some(call.id),
            });
        }
    }

    fn progress(&self, now: i64) -> RunProgress<'_> {
        RunProgress {
            run_id: &self.run_id,
            session_id: &self.session_id,
            messages: &self.pending_messages,
            events: &self.pending_events,
            tokens_used: self.tokens_used,
            steps: self.steps,
            now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_arguments_hide_secrets() {
        let redacted = redact_arguments(
            r#"{"command": "curl -H 'x: sk-live-123456789' host", "api_key": "abc", "nested": {"Password": "p"}}"#,
            &["sk-live-123456789".into()],
        );
        assert!(!redacted.contains("sk-live-123456789"), "{redacted}");
        assert!(
            !redacted.contains("\"abc\"") && !redacted.contains("\"p\""),
            "{redacted}"
        );
        assert!(redacted.contains("curl -H"), "{redacted}");
    }
}
