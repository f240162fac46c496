//! The MCP tools of an agent's sessions. Each session of an agent with MCP
//! servers holds an [`McpSession`] (its servers' connections, made on first
//! use): stdio servers run inside that session's sandbox, so they share its
//! workspace and limits and die with it. A session's connections unused for
//! as long as a sandbox may idle are dropped (which stops its stdio
//! servers, and so lets the sandbox be reaped in its turn).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use bulkhead_mcp::{McpSession, SandboxSource};
use bulkhead_model::{FunctionSpec, ToolSpec};
use bulkhead_sandbox::{Limits, Sandbox};
use futures_util::future::BoxFuture;

use super::*;
use crate::tools::{ToolError, ToolOutput};

/// How long a session's MCP connections live unused when the server has no
/// sandboxes to take the idle time from.
const DEFAULT_IDLE: Duration = Duration::from_secs(600);

/// The sessions' MCP connections, by session id.
#[derive(Default)]
pub(crate) struct McpSessions {
    sessions: std::sync::Mutex<HashMap<String, (Arc<McpSession>, Instant)>>,
}

impl std::fmt::Debug for McpSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpSessions").finish_non_exhaustive()
    }
}

impl McpSessions {
    fn get_or_make(
        &self,
        session_id: &str,
        make: impl FnOnce() -> Result<McpSession, String>,
    ) -> Result<Arc<McpSession>, String> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((session, used)) = sessions.get_mut(session_id) {
            *used = Instant::now();
            return Ok(Arc::clone(session));
        }
        let session = Arc::new(make()?);
        sessions.insert(
            session_id.to_string(),
            (Arc::clone(&session), Instant::now()),
        );
        Ok(session)
    }

    /// Drops every session's connections (at shutdown).
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|e| e.into_inner()));
        drop(all);
    }

    pub(crate) fn release(&self, session_id: &str) {
        let removed = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session_id);
        drop(removed);
    }

    fn reap(&self, idle: Duration) -> usize {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let before = sessions.len();
        // One a call is using stays: the call holds it.
        sessions
            .retain(|_, (session, used)| used.elapsed() < idle || Arc::strong_count(session) > 1);
        before - sessions.len()
    }
}

/// The session's sandbox, made when a stdio server first needs it.
struct SessionSandbox<'a> {
    sandboxes: Option<&'a SandboxManager>,
    session_id: &'a str,
    limits: &'a Limits,
}

impl SandboxSource for SessionSandbox<'_> {
    fn sandbox(&self) -> BoxFuture<'_, Result<Arc<dyn Sandbox>, String>> {
        Box::pin(async move {
            let sandboxes = self.sandboxes.ok_or_else(|| {
                "this server runs no sandboxes (its role runs no tools)".to_string()
            })?;
            sandboxes
                .for_session(self.session_id, self.limits)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Engine {
    /// The session's MCP connections, made on first use; `None` for an
    /// agent with no MCP servers.
    fn mcp_session(&self, agent: &Agent, session_id: &str) -> Option<Arc<McpSession>> {
        if agent.mcp_servers.is_empty() {
            return None;
        }
        match self.mcp.get_or_make(session_id, || {
            McpSession::new(agent.mcp_servers.clone(), self.settings.egress.clone())
        }) {
            Ok(session) => Some(session),
            Err(e) => {
                tracing::error!(agent = %agent.id, error = %e, "the agent's MCP servers are misconfigured");
                None
            }
        }
    }

    /// What the model is offered: the agent's built-in tools and, listed at
    /// first use, its MCP servers' (those its policy does not deny). An
    /// agent without MCP servers lends its own list: nothing is copied on
    /// the hot path.
    pub(crate) async fn offered_tools<'a>(
        &self,
        agent: &'a Agent,
        session_id: &str,
    ) -> Cow<'a, [ToolSpec]> {
        let builtin = agent.tools.specs();
        let Some(mcp) = self.mcp_session(agent, session_id) else {
            return Cow::Borrowed(builtin);
        };
        let source = SessionSandbox {
            sandboxes: self.sandboxes.as_deref(),
            session_id,
            limits: &agent.limits,
        };
        let mut specs = builtin.to_vec();
        for tool in mcp.tools(&source).await {
            if agent.approval.for_tool(&tool.qualified_name) == ToolPolicy::Deny {
                continue;
            }
            specs.push(ToolSpec {
                kind: "function".into(),
                function: FunctionSpec {
                    name: tool.qualified_name,
                    description: tool.description,
                    parameters: tool.input_schema,
                },
            });
        }
        Cow::Owned(specs)
    }

    /// Calls an MCP tool of the agent's. Its errors are the model's to read.
    pub(crate) async fn call_mcp(
        &self,
        state: &RunState,
        name: &str,
        arguments: &str,
    ) -> Result<ToolOutput, ToolError> {
        let arguments = if arguments.trim().is_empty() {
            serde_json::Map::new()
        } else {
            match serde_json::from_str::<Value>(arguments) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(ToolError::InvalidArguments(
                        "arguments must be a JSON object".into(),
                    ));
                }
                Err(e) => {
                    return Err(ToolError::InvalidArguments(format!("not valid JSON: {e}")));
                }
            }
        };
        let mcp = self
            .mcp_session(&state.agent, &state.session_id)
            .ok_or_else(|| ToolError::Unknown(name.to_string()))?;
        let source = SessionSandbox {
            sandboxes: self.sandboxes.as_deref(),
            session_id: &state.session_id,
            limits: &state.agent.limits,
        };
        let output = mcp
            .call(&source, name, arguments)
            .await
            .map_err(|e| ToolError::Failed(e.to_string()))?;
        Ok(ToolOutput {
            content: output.content,
            is_error: output.is_error,
            execution: None,
        })
    }

    /// Drops the MCP connections of sessions unused for as long as a
    /// sandbox may idle. Returns how many.
    pub fn reap_idle_mcp(&self) -> usize {
        let idle = self
            .sandboxes
            .as_ref()
            .map_or(DEFAULT_IDLE, |sandboxes| sandboxes.idle());
        self.mcp.reap(idle)
    }
}
