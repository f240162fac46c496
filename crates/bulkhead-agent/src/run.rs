//! A run from its opening to its outcome: recorded before anything is
//! sent, driven through the agent loop (one model call per step, then the
//! tools it asked for), its progress recorded step by step.

use super::*;

impl Engine {
    /// Records the run and starts it on its own task.
    pub async fn start_run(self: &Arc<Self>, start: StartRun) -> Result<RunHandle, StartError> {
        // Held from before the check so that shutdown cannot finish waiting
        // between the check and the spawn.
        let in_flight = self.runs.token();
        if !self.is_accepting() {
            return Err(StartError::ShuttingDown);
        }
        let queued = start.queued;
        let run_id = queued
            .as_ref()
            .map_or_else(new_id, |queued| queued.run_id.clone());
        let (session_id, is_new_session) = match start.session_id {
            Some(id) => (id, false),
            None => (new_id(), true),
        };
        // The agent asked for, or for a new session the default one; a
        // session that is continued without naming one runs the agent it
        // belongs to (known once it is locked).
        let asked = match &start.agent {
            Some(id) => Some(Arc::clone(
                self.agents
                    .get(id)
                    .ok_or_else(|| StartError::UnknownAgent(id.clone()))?,
            )),
            None => None,
        };
        let agent = asked
            .clone()
            .unwrap_or_else(|| Arc::clone(self.agents.default_agent()));
        let now = now_ms();
        let mut state = RunState::new(
            run_id.clone(),
            session_id.clone(),
            start.stream,
            Arc::clone(&agent),
        );
        state.input = start.message;
        state.owner = start.owner;
        state.account = start.account;
        state.new_session = is_new_session;
        state.named_session = !is_new_session && start.create_if_missing;
        state.history = start.history;
        // Registered now, so that a cancel finds the run while it opens;
        // attached (and given `run_started`) only once the opening is
        // committed, so that a follower that hears of the run finds its
        // message in the store.
        let feed = self
            .feeds
            .open(&run_id, 1, &self.interrupt, self.cluster.get());
        let started = state.next_event(
            "run_started",
            json!({"run_id": run_id, "session_id": session_id}),
            now,
        );
        let started_data = started.data.clone();
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
            &agent.model,
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
                } else if state.named_session {
                    SessionRef::Named(&state.session_id)
                } else {
                    SessionRef::Existing(&state.session_id)
                };
                let begun = engine
                    .store
                    .begin_run(&BeginRun {
                        session,
                        owner: state.owner.as_deref(),
                        agent: if state.new_session || state.named_session {
                            Some(state.agent.id.as_str())
                        } else {
                            asked.as_ref().map(|agent| agent.id.as_str())
                        },
                        run_id: &state.run_id,
                        input: &state.input,
                        history: &state.history,
                        unbound_agent: asked.as_ref().map_or_else(
                            || engine.agents.default_agent().id.as_str(),
                            |agent| agent.id.as_str(),
                        ),
                        dequeue: queued.is_some(),
                        kwargs: queued.as_ref().map(|queued| queued.kwargs.as_str()),
                        now,
                        lock_stale_before,
                        first_event: started,
                    })
                    .await;
                let session_agent = match begun {
                    Ok(begun) => {
                        feed.push(EventRecord {
                            seq: 1,
                            kind: "run_started",
                            data: Arc::from(started_data.as_str()),
                        });
                        state.attach_feed(Arc::clone(&feed));
                        let _ = begun_tx.send(Ok(()));
                        // Made now, it holds what the state holds; else
                        // it is read back, history and all.
                        state.new_session = begun.created;
                        if !begun.created {
                            state.history = Vec::new();
                        }
                        begun.agent
                    }
                    Err(e) => {
                        engine.feeds.close(&state.run_id, &feed);
                        let _ = begun_tx.send(Err(e));
                        return;
                    }
                };
                let run_metrics = telemetry::RunMetrics::start(begun_at);
                tracing::info!(agent = %session_agent, "run started");
                let outcome = match engine.agents.get(&session_agent) {
                    Some(agent) => {
                        state.agent = Arc::clone(agent);
                        engine.drive(&mut state).await
                    }
                    None => {
                        engine
                            .close(
                                &mut state,
                                Err(Failure {
                                    kind: FailureKind::Internal,
                                    code: "agent_not_configured",
                                    message: format!(
                                        "this session belongs to agent {session_agent:?}, which this server no longer runs"
                                    ),
                                }),
                            )
                            .await
                    }
                };
                engine.report(&state, &outcome, run_metrics, spans);
                engine.feeds.close(&state.run_id, &feed);
                engine.run_ended(&state.session_id);
                let _ = outcome_tx.send(outcome);
            }
            .instrument(span),
        );
        match begun_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(BeginRunError::SessionNotFound)) => return Err(StartError::SessionNotFound),
            Ok(Err(BeginRunError::WrongAgent { agent })) => {
                return Err(StartError::WrongAgent { agent });
            }
            Ok(Err(BeginRunError::SessionBusy { active_run_id })) => {
                return Err(StartError::SessionBusy {
                    session_id,
                    active_run_id,
                });
            }
            Ok(Err(BeginRunError::NotQueued)) => return Err(StartError::NotQueued),
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

    /// Logs, counts and closes the span of a run's outcome.
    pub(crate) fn report(
        &self,
        state: &RunState,
        outcome: &RunOutcome,
        run_metrics: telemetry::RunMetrics,
        spans: SpanSettings,
    ) {
        let (status, failure) = match outcome {
            RunOutcome::Completed { .. } => ("completed", None),
            RunOutcome::AwaitingApproval { .. } => ("awaiting_approval", None),
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
        match outcome {
            RunOutcome::Completed { tokens_used, .. } => {
                tracing::info!(tokens_used, steps = state.steps, "run completed")
            }
            RunOutcome::AwaitingApproval {
                approval,
                tokens_used,
            } => tracing::info!(
                tokens_used,
                steps = state.steps,
                tool = %approval.tool,
                call_id = %approval.call_id,
                "run paused: a tool call awaits approval"
            ),
            // A client's cancel is what the client asked for, not a fault.
            RunOutcome::Failed {
                failure,
                tokens_used,
            } if failure.code == "run_cancelled" => tracing::info!(
                tokens_used,
                steps = state.steps,
                reason = %failure.message,
                "run cancelled"
            ),
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
    }

    pub(crate) async fn drive(&self, state: &mut RunState) -> RunOutcome {
        let ended = match (self.settings.role, &self.settings.peers) {
            (RoleKind::Planner, Some(peers)) => {
                self.planned_run(state, peers).await.map(LoopEnd::Answer)
            }
            _ => {
                let conversation = match self.opening_conversation(state).await {
                    Ok(conversation) => conversation,
                    Err(failure) => return self.close(state, Err(failure)).await,
                };
                self.agent_loop(state, conversation, None).await
            }
        };
        self.close(state, ended).await
    }

    /// Records how a run ended (or that it paused) and says so.
    pub(crate) async fn close(
        &self,
        state: &mut RunState,
        ended: Result<LoopEnd, Failure>,
    ) -> RunOutcome {
        let outcome = match ended {
            Ok(LoopEnd::Answer(response)) => Ok(response),
            Ok(LoopEnd::Paused(approval)) => return self.pause(state, approval).await,
            Err(failure) => Err(failure),
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
                    "input_tokens": state.input_tokens,
                    "output_tokens": state.output_tokens,
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
        let finish = FinishRun {
            progress: state.progress(now),
            status,
            output,
            error: error.map(|f| (f.code, f.message.as_str())),
            usage: Some((state.input_tokens, state.output_tokens)),
        };
        let recorded = self.persist(|| self.store.finish_run(&finish)).await;
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
            (_, Err(StoreError::RunTakenOver)) => {
                tracing::warn!("the run was ended by another replica (this one's lease lapsed)");
                RunOutcome::Failed {
                    failure: replica_lost(),
                    tokens_used,
                }
            }
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

    /// The conversation a new run starts from: the agent's prompt, the
    /// stored history (answered where a call lost its result), the input.
    pub(crate) async fn opening_conversation(
        &self,
        state: &RunState,
    ) -> Result<Vec<ChatMessage>, Failure> {
        // A session this run opened holds nothing but the history it was
        // given and the run's input: no need to read it back.
        let stored: Vec<ChatMessage> = if state.new_session {
            state.history.iter().map(new_chat_message).collect()
        } else {
            self.store
                .messages(&state.session_id)
                .await
                .map_err(|e| internal("could not load the conversation", &e))?
                .into_iter()
                .map(chat_message)
                .collect()
        };
        let mut conversation = self.system_prompt(state);
        conversation.reserve(stored.len() + 1);
        let (history, repaired) = bulkhead_model::history::repair(stored);
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
        Ok(conversation)
    }

    /// The agent's system prompt as the conversation's first message.
    pub(crate) fn system_prompt(&self, state: &RunState) -> Vec<ChatMessage> {
        let prompt = state
            .agent
            .system_prompt
            .clone()
            .or_else(|| self.settings.role.default_prompt().map(str::to_string));
        prompt
            .map(|prompt| ChatMessage::text("system", prompt))
            .into_iter()
            .collect()
    }

    /// Model, tools, model… until a text answer, or a call that must wait
    /// for a person. `resumed`: the calls of the last step still to run
    /// (the first of them decided), when a paused run goes on.
    pub(crate) async fn agent_loop(
        &self,
        state: &mut RunState,
        mut conversation: Vec<ChatMessage>,
        resumed: Option<(Vec<ToolCall>, Decision)>,
    ) -> Result<LoopEnd, Failure> {
        if let Some((calls, decision)) = resumed {
            if let Some(approval) = self
                .run_calls(state, &mut conversation, calls, Some(decision))
                .await?
            {
                return Ok(LoopEnd::Paused(approval));
            }
            self.record_progress(state).await?;
        }
        let max_steps = state.agent.max_steps;
        for step in (state.steps as u32 + 1)..=max_steps {
            state.steps = step as i64;
            let completion = self.call_model(state, &conversation).await?;
            if let Some(usage) = completion.usage {
                state.tokens_used += usage.total_tokens as i64;
                state.input_tokens += usage.prompt_tokens as i64;
                state.output_tokens += usage.completion_tokens as i64;
            }
            if completion.tool_calls.is_empty() {
                return Ok(LoopEnd::Answer(sanitize(completion.content)));
            }
            let calls = self.record_calls(state, &mut conversation, completion);
            if let Some(approval) = self
                .run_calls(state, &mut conversation, calls, None)
                .await?
            {
                return Ok(LoopEnd::Paused(approval));
            }
            self.record_progress(state).await?;
        }
        Err(Failure {
            kind: FailureKind::MaxSteps,
            code: "max_steps_exceeded",
            message: format!(
                "the model was still calling tools after {max_steps} steps (the agent's max_steps)"
            ),
        })
    }

    /// Commits the events and messages gathered since the last commit.
    pub(crate) async fn record_progress(&self, state: &mut RunState) -> Result<(), Failure> {
        let progress = state.progress(now_ms());
        self.persist(|| self.store.record_step(&progress))
            .await
            .map_err(|e| match e {
                StoreError::RunTakenOver => replica_lost(),
                e => internal("could not record the run's progress", &e),
            })?;
        state.pending_events.clear();
        state.pending_messages.clear();
        Ok(())
    }

    pub(crate) async fn call_model(
        &self,
        state: &mut RunState,
        conversation: &[ChatMessage],
    ) -> Result<Completion, Failure> {
        let streaming = state.streaming;
        let spans = self.settings.spans;
        let span = telemetry::chat_span(
            spans,
            &state.agent.model,
            &state.session_id,
            conversation,
            &self.settings.secrets,
        );
        let agent = Arc::clone(&state.agent);
        let offered = self.offered_tools(&agent, &state.session_id).await;
        let cancel = state.cancel.clone();
        let result = {
            let mut sink = |text: &str| {
                let now = now_ms();
                state.emit("message_delta", json!({ "content": text }), now);
            };
            let deltas: Option<&mut bulkhead_model::DeltaSink<'_>> =
                if streaming { Some(&mut sink) } else { None };
            let call = agent.model.complete(conversation, &offered, deltas);
            tokio::select! {
                result = call.instrument(span.clone()) => Some(result),
                () = cancel.cancelled() => None,
            }
        };
        let Some(result) = result else {
            return Err(state.interruption());
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
}

/// How the agent loop stopped, short of a failure.
pub(crate) enum LoopEnd {
    Answer(String),
    Paused(PendingApproval),
}

/// A message given with the run, as the model takes it.
fn new_chat_message(m: &NewMessage) -> ChatMessage {
    ChatMessage {
        role: m.role.to_string(),
        content: m.content.clone(),
        tool_calls: m
            .tool_calls
            .as_deref()
            .and_then(|calls| serde_json::from_str(calls).ok()),
        tool_call_id: m.tool_call_id.clone(),
    }
}

/// A stored message as the model takes it.
pub(crate) fn chat_message(m: bulkhead_store::Message) -> ChatMessage {
    ChatMessage {
        role: m.role,
        content: m.content,
        tool_calls: m
            .tool_calls
            .as_deref()
            .and_then(|calls| serde_json::from_str(calls).ok()),
        tool_call_id: m.tool_call_id,
    }
}
