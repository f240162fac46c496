//! The MCP client the run engine offers tools through.
//!
//! An agent lists MCP servers ([`McpServerConfig`]); a session holds them
//! in an [`McpSession`], which connects to each on first use and offers
//! their tools as `<server>__<tool>` ([`McpTool`]) and calls them
//! ([`McpOutput`], or an [`McpError`] written for the model).
//!
//! - Stdio servers run only inside the session's sandbox
//!   (`Sandbox::spawn`): this crate has no way to start a host process.
//! - Streamable HTTP servers are reached by the agent server itself, only
//!   when the egress policy allows the URL's host and port, and only at the
//!   addresses that were judged.
//! - Every message read from a server is capped ([`MAX_MESSAGE_BYTES`]);
//!   startup and every call have a timeout; nothing here panics on what a
//!   server does.
//!
//! This crate knows nothing of HTTP routes, agents files or the database.

mod bounded;
mod config;
mod connection;
mod error;
mod http;
mod output;
mod session;
mod stdio;

use std::sync::Arc;

use bulkhead_sandbox::Sandbox;
use futures_util::future::BoxFuture;

pub use bounded::MAX_MESSAGE_BYTES;
pub use config::{
    DEFAULT_CALL_TIMEOUT, DEFAULT_STARTUP_TIMEOUT, MAX_NAME_LEN, McpServerConfig, McpTransport,
    SEPARATOR, qualified_name, split_qualified, validate_name,
};
pub use error::McpError;
pub use output::McpOutput;
pub use session::{McpSession, McpTool, RETRY_BACKOFF};

/// Gives the session's sandbox when a stdio server needs one: making a
/// sandbox costs, and HTTP servers need none.
pub trait SandboxSource: Send + Sync {
    /// The session's sandbox, made if need be; the error says why there is
    /// none.
    fn sandbox(&self) -> BoxFuture<'_, Result<Arc<dyn Sandbox>, String>>;
}

/// A sandbox already made.
impl SandboxSource for Arc<dyn Sandbox> {
    fn sandbox(&self) -> BoxFuture<'_, Result<Arc<dyn Sandbox>, String>> {
        let sandbox = self.clone();
        Box::pin(async move { Ok(sandbox) })
    }
}

/// No sandbox: stdio servers are unavailable (an agent with HTTP servers
/// only).
#[derive(Debug, Clone, Copy)]
pub struct NoSandbox;

impl SandboxSource for NoSandbox {
    fn sandbox(&self) -> BoxFuture<'_, Result<Arc<dyn Sandbox>, String>> {
        Box::pin(async { Err("this session has no sandbox".to_string()) })
    }
}
