//! The tool calls of a step: each recorded in the audit trail before it
//! runs and completed after, its arguments redacted, its result handed back
//! to the model.

use sha2::Digest;

use super::*;

impl Engine {
    /// Records the model's message calling tools, and answers its calls.
    pub(crate) fn record_calls(
        &self,
        state: &mut RunState,
        conversation: &mut Vec<ChatMessage>,
        completion: Completion,
    ) -> Vec<ToolCall> {
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
        calls
    }

    /// Runs the calls of a step in order, each under the agent's policy.
    /// Stops at a call that must wait for a person (recorded, not run) and
    /// returns it; the calls after it stay unanswered until the run goes
    /// on. `decided`: the first call's decision, when a paused run resumes.
    pub(crate) async fn run_calls(
        &self,
        state: &mut RunState,
        conversation: &mut Vec<ChatMessage>,
        calls: Vec<ToolCall>,
        mut decided: Option<Decision>,
    ) -> Result<Option<PendingApproval>, Failure> {
        state.open_calls = calls
            .iter()
            .map(|call| OpenCall {
                call: call.clone(),
                audit_id: None,
            })
            .collect();
        for call in calls {
            let name = call.function.name.as_str();
            let decision = decided.take();
            let audit_id = match &decision {
                Some(decision) => decision.audit_id.clone(),
                None => new_id(),
            };
            if let Some(open) = state.open_calls.first_mut() {
                open.audit_id = Some(audit_id.clone());
            }
            let policy = state.agent.approval.for_tool(name);
            let output = match (&decision, policy) {
                (Some(decision), _) => {
                    state.emit(
                        "approval_decided",
                        json!({
                            "id": call.id,
                            "name": name,
                            "audit_id": audit_id,
                            "decision": decision.decision,
                            "decided_by": decision.decided_by,
                            "comment": decision.comment,
                        }),
                        now_ms(),
                    );
                    if decision.approve {
                        self.traced_call(state, &audit_id, &call, true).await?
                    } else {
                        self.refuse_decided(&audit_id, &call, decision)
                    }
                }
                (None, ToolPolicy::Deny) => {
                    self.emit_tool_call(state, &call, &audit_id);
                    self.refuse_by_policy(state, &audit_id, &call).await
                }
                (None, ToolPolicy::Ask)
                    if state.agent.tools.has(name) || state.agent.mcp_server(name).is_some() =>
                {
                    self.emit_tool_call(state, &call, &audit_id);
                    return self.ask(state, &audit_id, &call).await.map(Some);
                }
                (None, _) => {
                    self.emit_tool_call(state, &call, &audit_id);
                    self.traced_call(state, &audit_id, &call, false).await?
                }
            };
            self.answer_call(state, conversation, call, &audit_id, output);
        }
        Ok(None)
    }

    fn emit_tool_call(&self, state: &mut RunState, call: &ToolCall, audit_id: &str) {
        state.emit(
            "tool_call",
            json!({"id": call.id, "name": call.function.name, "arguments": call.function.arguments, "audit_id": audit_id}),
            now_ms(),
        );
    }

    /// A call run inside its `execute_tool` span.
    async fn traced_call(
        &self,
        state: &RunState,
        audit_id: &str,
        call: &ToolCall,
        recorded: bool,
    ) -> Result<ToolOutput, Failure> {
        let span = telemetry::tool_span(self.settings.spans, &call.function.name, &call.id, || {
            redact_arguments(&call.function.arguments, &self.settings.secrets)
        });
        self.audited_call(state, audit_id, call, recorded)
            .instrument(span)
            .await
    }

    /// Hands a call's result to the client, the record and the model.
    fn answer_call(
        &self,
        state: &mut RunState,
        conversation: &mut Vec<ChatMessage>,
        call: ToolCall,
        audit_id: &str,
        output: ToolOutput,
    ) {
        let mut result = json!({
            "id": call.id,
            "name": call.function.name,
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
        if !state.open_calls.is_empty() {
            state.open_calls.remove(0);
        }
        conversation.push(ChatMessage {
            role: "tool".into(),
            content: Some(content),
            tool_calls: None,
            tool_call_id: Some(call.id),
        });
    }

    /// A call the agent's policy forbids: recorded as refused, not run.
    async fn refuse_by_policy(
        &self,
        state: &RunState,
        audit_id: &str,
        call: &ToolCall,
    ) -> ToolOutput {
        let name = call.function.name.as_str();
        let message = format!("the tool `{name}` is denied by this agent's policy");
        let now = now_ms();
        let recorded = self
            .store
            .start_tool_execution(&NewToolExecution {
                id: audit_id,
                session_id: &state.session_id,
                run_id: &state.run_id,
                call_id: &call.id,
                tool: name,
                arguments: &redact_arguments(&call.function.arguments, &self.settings.secrets),
                backend: "none",
                limits: None,
                started_at: now,
                approval_expires_at: None,
            })
            .await;
        if recorded.is_ok() {
            let end = ToolExecutionEnd {
                status: "refused",
                finished_at: now,
                duration_ms: Some(0),
                error: Some(message.clone()),
                ..ToolExecutionEnd::default()
            };
            if let Err(e) = self.store.finish_tool_execution(audit_id, &end).await {
                tracing::error!(error = %e, audit_id, "could not complete the record of a tool call");
            }
        }
        telemetry::tool_call_ended(name, "refused", None);
        tracing::info!(
            audit_id,
            tool = name,
            "tool call refused by the agent's policy"
        );
        ToolOutput {
            content: format!("error: {message}"),
            is_error: true,
            execution: None,
        }
    }

    /// A call a person denied or nobody answered: its record already says
    /// so (the decision was written on it); the model is told.
    fn refuse_decided(&self, audit_id: &str, call: &ToolCall, decision: &Decision) -> ToolOutput {
        let name = call.function.name.as_str();
        telemetry::tool_call_ended(name, "denied", None);
        tracing::info!(audit_id, tool = name, decision = %decision.decision, "tool call not run");
        let mut content = if decision.decision == "expired" {
            "error: not run: the request for a person's approval expired without an answer"
                .to_string()
        } else {
            "error: not run: denied by a person".to_string()
        };
        if let Some(comment) = &decision.comment {
            content.push_str(&format!(" (they said: {comment})"));
        }
        ToolOutput {
            content,
            is_error: true,
            execution: None,
        }
    }

    /// Records the call, runs it, completes the record. A call that cannot
    /// be recorded is not run.
    ///
    /// `recorded`: the call's record exists already (an approved call,
    /// recorded when it began to wait).
    pub(crate) async fn audited_call(
        &self,
        state: &RunState,
        audit_id: &str,
        call: &ToolCall,
        recorded: bool,
    ) -> Result<ToolOutput, Failure> {
        let name = call.function.name.as_str();
        let tools = &state.agent.tools;
        let mcp_server = state.agent.mcp_server(name);
        let sandboxed = state.agent.runs_in_sandbox(name);
        let (backend, limits) = match (&self.sandboxes, sandboxed) {
            (Some(sandboxes), true) => {
                // The limits on record are those the sandbox applies, which
                // a remote sandboxd may have lowered; the configured ones
                // when no sandbox can be had (the call is then refused).
                let limits = match sandboxes
                    .for_session(&state.session_id, &state.agent.limits)
                    .await
                {
                    Ok(sandbox) => sandbox.limits().clone(),
                    Err(_) => state.agent.limits.clone(),
                };
                (
                    sandboxes.backend_name(),
                    serde_json::to_string(&limits).ok(),
                )
            }
            (None, true) => ("none", None),
            (_, false) if mcp_server.is_some() => ("mcp-http", None),
            (_, false) => ("builtin", None),
        };
        let arguments = redact_arguments(&call.function.arguments, &self.settings.secrets);
        let started_at = now_ms();
        let recorded = if recorded {
            Ok(())
        } else {
            self.store
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
                    approval_expires_at: None,
                })
                .await
        };
        let label = if tools.has(name) || mcp_server.is_some() {
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
            limits: &state.agent.limits,
        };
        let ran = Instant::now();
        let cancel = state.cancel.clone();
        let result = tokio::select! {
            result = async {
                if mcp_server.is_some() {
                    self.call_mcp(state, name, &call.function.arguments).await
                } else {
                    tools.call(context, name, &call.function.arguments).await
                }
            } => result,
            () = cancel.cancelled() => {
                telemetry::tool_call_ended(label, "interrupted", Some(ran.elapsed()));
                telemetry::tool_ended(&tracing::Span::current(), spans, "interrupted", None, &[]);
                let failure = state.interruption();
                let error = if failure.code == "run_cancelled" {
                    format!("the run was cancelled during the call: {}", failure.message)
                } else {
                    "the server shut down during the call".to_string()
                };
                let end = ToolExecutionEnd {
                    status: "interrupted",
                    finished_at: now_ms(),
                    error: Some(error),
                    ..ToolExecutionEnd::default()
                };
                let _ = self.store.finish_tool_execution(audit_id, &end).await;
                return Err(failure);
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
            // A tool that runs no program (built in, MCP): its result is
            // what the record sizes and hashes.
            stdout_bytes: Some(
                execution.map_or(output.content.len() as i64, |x| x.stdout.total_bytes as i64),
            ),
            stderr_bytes: execution.map(|x| x.stderr.total_bytes as i64),
            stdout_truncated: execution.map(|x| x.stdout.truncated),
            stderr_truncated: execution.map(|x| x.stderr.truncated),
            stdout_sha256: Some(execution.map_or_else(
                || hex::encode(sha2::Sha256::digest(output.content.as_bytes())),
                |x| x.stdout.sha256.clone(),
            )),
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
}

/// Tool arguments as the audit trail keeps them: values under secret-looking
/// keys and any configured secret are replaced by `[REDACTED]`.
pub(crate) fn redact_arguments(arguments: &str, secrets: &[String]) -> String {
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
