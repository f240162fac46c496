//! One live connection to one server: made within the startup timeout
//! (start or reach, `initialize`, every page of `tools/list`), and the
//! explanation of its failures.

use std::time::Duration;

use bulkhead_sandbox::egress::EgressPolicy;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
    PaginatedRequestParams, Tool,
};
use rmcp::service::{RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use tokio::time::{Instant, timeout_at};

use crate::SandboxSource;
use crate::bounded::{MAX_MESSAGE_BYTES, Overflow};
use crate::config::{McpServerConfig, McpTransport};
use crate::error::McpError;
use crate::http::judged_client;
use crate::stdio::{self, Process};

/// A server listing more pages than this is not listed further: each page
/// is capped, and so is their number.
const MAX_TOOL_PAGES: usize = 64;

/// How long to wait, once stdout has ended, for the sandbox to report how
/// the program ended.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct Connection {
    server: String,
    service: RunningService<RoleClient, ClientConfig>,
    /// Every tool the server listed (the allowlist is applied by the session).
    pub(crate) tools: Vec<Tool>,
    overflow: Overflow,
    process: Option<Process>,
}

fn client_config() -> ClientConfig {
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("bulkhead", env!("CARGO_PKG_VERSION")),
    )
}

impl Connection {
    /// Starts or reaches the server and lists its tools, all within its
    /// startup timeout.
    pub(crate) async fn open(
        config: &McpServerConfig,
        sandboxes: &dyn SandboxSource,
        policy: &EgressPolicy,
    ) -> Result<Connection, McpError> {
        let server = config.name.as_str();
        let deadline = Instant::now() + config.startup_timeout;
        let overflow = Overflow::default();
        let unavailable = |reason: String| McpError::Unavailable {
            server: server.to_string(),
            reason,
        };
        let late = |what: &str| {
            unavailable(format!(
                "{what} took longer than the startup timeout ({} s)",
                config.startup_timeout.as_secs_f64()
            ))
        };

        let (handshake, process) = match &config.transport {
            McpTransport::Stdio { command, env } => {
                let sandbox = timeout_at(deadline, sandboxes.sandbox())
                    .await
                    .map_err(|_| late("making the session's sandbox"))?
                    .map_err(|e| unavailable(format!("no sandbox to run it in: {e}")))?;
                let (reader, writer, process) = timeout_at(
                    deadline,
                    stdio::spawn(server, sandbox.as_ref(), command, env, overflow.clone()),
                )
                .await
                .map_err(|_| late("starting the program"))??;
                let transport = AsyncRwTransport::<RoleClient, _, _>::new(reader, writer)
                    .with_max_line_length(MAX_MESSAGE_BYTES);
                let handshake = timeout_at(deadline, client_config().serve(transport)).await;
                (handshake, Some(process))
            }
            McpTransport::Http { url, headers } => {
                let client = timeout_at(
                    deadline,
                    judged_client(server, url, headers, policy, overflow.clone()),
                )
                .await
                .map_err(|_| late("resolving the server's host"))??;
                let mut transport_config =
                    StreamableHttpClientTransportConfig::with_uri(url.as_str());
                transport_config.max_sse_event_size = MAX_MESSAGE_BYTES;
                transport_config.max_json_response_size = MAX_MESSAGE_BYTES;
                let transport =
                    StreamableHttpClientTransport::with_client(client, transport_config);
                let handshake = timeout_at(deadline, client_config().serve(transport)).await;
                (handshake, None)
            }
        };

        let mut connection = match handshake {
            Ok(Ok(service)) => Connection {
                server: server.to_string(),
                service,
                tools: Vec::new(),
                overflow,
                process,
            },
            Ok(Err(e)) => {
                let error = unavailable(format!("the MCP handshake failed: {e}"));
                return Err(broken(server, &overflow, process.as_ref(), error).await);
            }
            Err(_) => {
                let error = late("the MCP handshake (`initialize`)");
                return Err(late_with_stderr(process, error).await);
            }
        };
        match timeout_at(deadline, connection.list_tools()).await {
            Ok(Ok(tools)) => {
                connection.tools = tools;
                Ok(connection)
            }
            Ok(Err(e)) => {
                let error = unavailable(format!("`tools/list` failed: {e}"));
                Err(connection.broken(error).await)
            }
            Err(_) => {
                let error = late("listing the tools (`tools/list`)");
                Err(late_with_stderr(connection.process.take(), error).await)
            }
        }
    }

    async fn list_tools(&self) -> Result<Vec<Tool>, ServiceError> {
        let mut tools = Vec::new();
        let mut cursor = None;
        for _ in 0..MAX_TOOL_PAGES {
            let page = self
                .service
                .list_tools(Some(PaginatedRequestParams::default().with_cursor(cursor)))
                .await?;
            tools.extend(page.tools);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(tools),
            }
        }
        tracing::warn!(
            server = %self.server,
            pages = MAX_TOOL_PAGES,
            "MCP server lists more pages of tools than are read; the rest are not offered"
        );
        Ok(tools)
    }

    pub(crate) async fn call_tool(
        &self,
        params: CallToolRequestParams,
    ) -> Result<CallToolResult, ServiceError> {
        self.service.call_tool(params).await
    }

    /// Whether the connection has ended (the transport closed, the process
    /// exited, or it was killed).
    pub(crate) fn is_closed(&self) -> bool {
        self.service.is_closed() || self.service.is_transport_closed()
    }

    /// Stops the server now: the process is killed, the connection ended.
    pub(crate) fn kill(&self) {
        if let Some(process) = &self.process {
            process.kill();
        }
        self.service.cancellation_token().cancel();
    }

    /// What to tell of a connection that broke: a message over the cap, the
    /// process's exit with its stderr, or else `error`.
    pub(crate) async fn broken(&self, error: McpError) -> McpError {
        broken(&self.server, &self.overflow, self.process.as_ref(), error).await
    }
}

async fn broken(
    server: &str,
    overflow: &Overflow,
    process: Option<&Process>,
    error: McpError,
) -> McpError {
    if overflow.is_set() {
        return McpError::TooLarge {
            server: server.to_string(),
            limit: MAX_MESSAGE_BYTES,
        };
    }
    let Some(process) = process else {
        return error;
    };
    match process.exit_within(EXIT_REPORT_WAIT).await {
        Some(Ok(exit)) => McpError::Exited {
            server: server.to_string(),
            status: stdio::status(&exit),
            stderr: stdio::tail(&exit.stderr.text),
        },
        Some(Err(lost)) => McpError::Disconnected {
            server: server.to_string(),
            reason: format!("its process in the sandbox was lost ({lost})"),
        },
        None => error,
    }
}

/// A server that was too slow is killed; what it wrote to stderr often
/// says why it hung (a missing module, a prompt for input).
async fn late_with_stderr(process: Option<Process>, error: McpError) -> McpError {
    let Some(process) = process else {
        return error;
    };
    process.kill();
    let _ = process.exit_within(EXIT_REPORT_WAIT).await;
    match (error, process.stderr_tail()) {
        (McpError::Unavailable { server, reason }, Some(stderr)) => McpError::Unavailable {
            server,
            reason: format!("{reason}; its stderr: {stderr}"),
        },
        (error, _) => error,
    }
}
