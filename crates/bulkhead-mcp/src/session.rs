//! One agent's MCP servers for one session: connections made on first use,
//! remade after they break, held back for a while after they fail.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::egress::EgressPolicy;
use rmcp::model::CallToolRequestParams;
use rmcp::service::ServiceError;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::SandboxSource;
use crate::config::{McpServerConfig, qualified_name, split_qualified};
use crate::connection::Connection;
use crate::error::McpError;
use crate::output::{McpOutput, render};

/// How long a server that failed to start is left alone before it is tried
/// again, so that a broken server costs one attempt, not one per step.
pub const RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// A tool of an MCP server as the model is offered it.
#[derive(Debug, Clone, PartialEq)]
pub struct McpTool {
    /// `<server>__<tool>`: the name the model calls it by.
    pub qualified_name: String,
    pub server: String,
    /// The server's own name for it.
    pub tool: String,
    /// The server's description (its title when it has none), or empty.
    pub description: String,
    /// A JSON Schema object for the arguments.
    pub input_schema: Value,
}

struct Server {
    config: McpServerConfig,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    connection: Option<Arc<Connection>>,
    /// The last failure to connect and when it happened.
    failed: Option<(Instant, McpError)>,
}

/// One agent's MCP servers in one session. Dropping it drops every
/// connection, which kills the stdio servers.
pub struct McpSession {
    servers: Vec<Server>,
    policy: EgressPolicy,
    retry_backoff: Duration,
}

impl std::fmt::Debug for McpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .servers
            .iter()
            .map(|s| s.config.name.as_str())
            .collect();
        f.debug_struct("McpSession")
            .field("servers", &names)
            .finish_non_exhaustive()
    }
}

impl McpSession {
    /// The servers (validated, names unique) and the egress policy HTTP
    /// servers are judged by. Nothing is started yet.
    pub fn new(servers: Vec<McpServerConfig>, policy: EgressPolicy) -> Result<McpSession, String> {
        let mut seen = std::collections::HashSet::new();
        for config in &servers {
            config.validate()?;
            if !seen.insert(config.name.as_str()) {
                return Err(format!("MCP server `{}` is listed twice", config.name));
            }
        }
        Ok(McpSession {
            servers: servers
                .into_iter()
                .map(|config| Server {
                    config,
                    slot: Mutex::new(Slot::default()),
                })
                .collect(),
            policy,
            retry_backoff: RETRY_BACKOFF,
        })
    }

    /// Another back-off than [`RETRY_BACKOFF`] (tests).
    pub fn with_retry_backoff(mut self, backoff: Duration) -> McpSession {
        self.retry_backoff = backoff;
        self
    }

    pub fn servers(&self) -> impl Iterator<Item = &McpServerConfig> {
        self.servers.iter().map(|s| &s.config)
    }

    /// The allowed tools of every server that is, or can now be, connected.
    /// A server that fails contributes nothing this time (one warning is
    /// logged) and is tried again after the back-off.
    pub async fn tools(&self, sandboxes: &dyn SandboxSource) -> Vec<McpTool> {
        let lists = futures_util::future::join_all(self.servers.iter().map(|server| async move {
            let Ok(connection) = self.connected(server, sandboxes).await else {
                return Vec::new();
            };
            let name = &server.config.name;
            connection
                .tools
                .iter()
                .filter(|tool| server.config.allows_tool(&tool.name))
                .map(|tool| McpTool {
                    qualified_name: qualified_name(name, &tool.name),
                    server: name.clone(),
                    tool: tool.name.to_string(),
                    description: tool
                        .description
                        .as_deref()
                        .map(str::to_string)
                        .or_else(|| tool.title.clone())
                        .unwrap_or_default(),
                    input_schema: Value::Object((*tool.input_schema).clone()),
                })
                .collect::<Vec<_>>()
        }))
        .await;
        lists.into_iter().flatten().collect()
    }

    /// Calls `<server>__<tool>` with `arguments`, within the server's call
    /// timeout. Every failure is an [`McpError`] the model can read.
    pub async fn call(
        &self,
        sandboxes: &dyn SandboxSource,
        qualified: &str,
        arguments: Map<String, Value>,
    ) -> Result<McpOutput, McpError> {
        let unknown = || McpError::UnknownTool(qualified.to_string());
        let (server_name, tool) = split_qualified(qualified).ok_or_else(unknown)?;
        let server = self
            .servers
            .iter()
            .find(|s| s.config.name == server_name)
            .ok_or_else(unknown)?;
        if !server.config.allows_tool(tool) {
            return Err(McpError::NotAllowed {
                server: server_name.to_string(),
                tool: tool.to_string(),
            });
        }
        let connection = self.connected(server, sandboxes).await?;
        if !connection.tools.iter().any(|t| t.name == tool) {
            return Err(unknown());
        }
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = Some(arguments);
        let timeout = server.config.call_timeout;
        let answer = tokio::time::timeout(timeout, connection.call_tool(params)).await;
        let error = match answer {
            Ok(Ok(result)) => return Ok(render(result)),
            Ok(Err(ServiceError::McpError(error))) => {
                return Err(McpError::Refused {
                    server: server_name.to_string(),
                    tool: tool.to_string(),
                    message: error.message.to_string(),
                });
            }
            Ok(Err(ServiceError::UnexpectedResponse)) => {
                return Err(McpError::Refused {
                    server: server_name.to_string(),
                    tool: tool.to_string(),
                    message: "it answered with something other than a tool result".into(),
                });
            }
            Ok(Err(e)) => {
                let error = McpError::Disconnected {
                    server: server_name.to_string(),
                    reason: e.to_string(),
                };
                connection.broken(error).await
            }
            Err(_) => McpError::Timeout {
                server: server_name.to_string(),
                tool: tool.to_string(),
                after: timeout,
            },
        };
        // The connection is done for: the next use makes a new one.
        connection.kill();
        self.forget(server, &connection).await;
        tracing::warn!(server = server_name, tool, "MCP call failed: {error}");
        Err(error)
    }

    /// The server's live connection, made now if there is none and the
    /// server is not backing off.
    async fn connected(
        &self,
        server: &Server,
        sandboxes: &dyn SandboxSource,
    ) -> Result<Arc<Connection>, McpError> {
        let name = server.config.name.as_str();
        let mut slot = server.slot.lock().await;
        if let Some(connection) = &slot.connection {
            if !connection.is_closed() {
                return Ok(connection.clone());
            }
            // It ended between two uses; say how, then start afresh.
            let error = McpError::Disconnected {
                server: name.to_string(),
                reason: "the connection closed".into(),
            };
            let error = connection.broken(error).await;
            tracing::warn!(server = name, "MCP server ended while idle: {error}");
            slot.connection = None;
        }
        if let Some((at, error)) = &slot.failed
            && at.elapsed() < self.retry_backoff
        {
            return Err(McpError::BackingOff {
                server: name.to_string(),
                reason: error.to_string(),
                ago_s: at.elapsed().as_secs(),
                backoff_s: self.retry_backoff.as_secs(),
            });
        }
        match Connection::open(&server.config, sandboxes, &self.policy).await {
            Ok(connection) => {
                tracing::info!(
                    server = name,
                    transport = server.config.transport.kind(),
                    tools = connection.tools.len(),
                    "MCP server connected"
                );
                let connection = Arc::new(connection);
                slot.connection = Some(connection.clone());
                slot.failed = None;
                Ok(connection)
            }
            Err(error) => {
                tracing::warn!(
                    server = name,
                    transport = server.config.transport.kind(),
                    retry_after_s = self.retry_backoff.as_secs(),
                    "MCP server offers no tools: {error}"
                );
                slot.failed = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    async fn forget(&self, server: &Server, connection: &Arc<Connection>) {
        let mut slot = server.slot.lock().await;
        if slot
            .connection
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, connection))
        {
            slot.connection = None;
        }
    }
}
