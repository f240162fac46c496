//! What can go wrong, in words a model (and an operator) can act on.

use std::time::Duration;

/// A failed MCP call or connection. Its `Display` is written for the model:
/// it names the server, says what happened and never carries a secret.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum McpError {
    /// The name is not `<server>__<tool>` of a server this agent has.
    #[error("there is no MCP tool `{0}`")]
    UnknownTool(String),
    /// The agent's allowlist for this server does not have the tool.
    #[error("the tool `{tool}` of the MCP server `{server}` is not allowed for this agent")]
    NotAllowed { server: String, tool: String },
    /// The server could not be started or reached, or did not complete the
    /// handshake; `reason` says which.
    #[error("the MCP server `{server}` is unavailable: {reason}")]
    Unavailable { server: String, reason: String },
    /// The server failed recently and is not tried again yet.
    #[error(
        "the MCP server `{server}` is unavailable (it failed {ago_s} s ago and is retried after {backoff_s} s): {reason}"
    )]
    BackingOff {
        server: String,
        reason: String,
        ago_s: u64,
        backoff_s: u64,
    },
    /// The server's process ended (a stdio server).
    #[error("the MCP server `{server}` exited ({status}){}", stderr_suffix(.stderr))]
    Exited {
        server: String,
        /// `code 1`, `signal 9`, `killed: oom`…
        status: String,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
    /// The call took longer than the server's call timeout; the connection
    /// was dropped (the process killed) and is made again on the next use.
    #[error(
        "the MCP server `{server}` did not answer the call to `{tool}` within {} s; it was stopped and will be restarted on the next call",
        .after.as_secs_f64()
    )]
    Timeout {
        server: String,
        tool: String,
        after: Duration,
    },
    /// The server sent a single message larger than the limit.
    #[error(
        "the MCP server `{server}` sent a message larger than {} MiB; it was stopped",
        .limit >> 20
    )]
    TooLarge { server: String, limit: usize },
    /// The egress policy does not allow the server's URL.
    #[error(
        "the MCP server `{server}` at {destination} is not allowed by the egress policy: {rule}"
    )]
    EgressRefused {
        server: String,
        destination: String,
        rule: String,
    },
    /// The connection ended or broke while a call was under way.
    #[error("the connection to the MCP server `{server}` was lost: {reason}")]
    Disconnected { server: String, reason: String },
    /// The server answered the call with a JSON-RPC error (unknown tool,
    /// invalid arguments…).
    #[error("the MCP server `{server}` refused the call to `{tool}`: {message}")]
    Refused {
        server: String,
        tool: String,
        message: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

impl McpError {
    /// The server the error is about, when there is one.
    pub fn server(&self) -> Option<&str> {
        match self {
            McpError::UnknownTool(_) => None,
            McpError::NotAllowed { server, .. }
            | McpError::Unavailable { server, .. }
            | McpError::BackingOff { server, .. }
            | McpError::Exited { server, .. }
            | McpError::Timeout { server, .. }
            | McpError::TooLarge { server, .. }
            | McpError::EgressRefused { server, .. }
            | McpError::Disconnected { server, .. }
            | McpError::Refused { server, .. } => Some(server),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_well() {
        let exited = McpError::Exited {
            server: "time".into(),
            status: "code 1".into(),
            stderr: "ModuleNotFoundError: no module named x\n".into(),
        };
        assert_eq!(
            exited.to_string(),
            "the MCP server `time` exited (code 1): ModuleNotFoundError: no module named x"
        );
        let quiet = McpError::Exited {
            server: "time".into(),
            status: "signal 9".into(),
            stderr: String::new(),
        };
        assert_eq!(quiet.to_string(), "the MCP server `time` exited (signal 9)");
        let timeout = McpError::Timeout {
            server: "slow".into(),
            tool: "sleep".into(),
            after: Duration::from_millis(1500),
        };
        assert!(timeout.to_string().contains("within 1.5 s"), "{timeout}");
        let large = McpError::TooLarge {
            server: "f".into(),
            limit: 4 << 20,
        };
        assert!(large.to_string().contains("4 MiB"), "{large}");
    }
}
