//! What an agent says about one MCP server: its name, how to reach it,
//! which of its tools it may use, and how long to wait for it.

use std::time::Duration;

/// The separator between a server's name and a tool's name in the name the
/// model sees (`time__get_current_time`); server names may not contain it,
/// so a qualified name splits one way only.
pub const SEPARATOR: &str = "__";

/// The longest server name: the model's tool names are limited (OpenAI
/// allows 64 characters), and the server's part should leave room for the
/// tool's.
pub const MAX_NAME_LEN: usize = 32;

/// Connecting (start, `initialize`, `tools/list`) when not said otherwise.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// One `tools/call` when not said otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One MCP server of an agent.
#[derive(Clone)]
pub struct McpServerConfig {
    /// 1–32 of `[a-z0-9_-]`, without `__`: the prefix of its tools' names.
    pub name: String,
    pub transport: McpTransport,
    /// The server's tool names the agent may use; `None`: all of them.
    pub tools: Option<Vec<String>>,
    /// Start (or connect), `initialize` and the whole `tools/list`.
    pub startup_timeout: Duration,
    /// One `tools/call`; past it the connection is dropped.
    pub call_timeout: Duration,
}

/// How to reach a server.
#[derive(Clone)]
pub enum McpTransport {
    /// A program speaking MCP on its stdin and stdout, started inside the
    /// session's sandbox (never on the host).
    Stdio {
        /// The program and its arguments.
        command: Vec<String>,
        /// Set in its environment. Values may be secrets: never logged.
        env: Vec<(String, String)>,
    },
    /// A Streamable HTTP endpoint, reached by the agent server itself when
    /// the egress policy allows its host and port.
    Http {
        url: url::Url,
        /// Sent with every request. Values may be secrets: never logged.
        headers: Vec<(String, String)>,
    },
}

impl McpTransport {
    pub fn kind(&self) -> &'static str {
        match self {
            McpTransport::Stdio { .. } => "stdio",
            McpTransport::Http { .. } => "http",
        }
    }
}

// By hand: the values of `env` and `headers` may be secrets.
impl std::fmt::Debug for McpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |pairs: &[(String, String)]| -> Vec<String> {
            pairs.iter().map(|(name, _)| name.clone()).collect()
        };
        match self {
            McpTransport::Stdio { command, env } => f
                .debug_struct("Stdio")
                .field("command", command)
                .field("env", &names(env))
                .finish(),
            McpTransport::Http { url, headers } => f
                .debug_struct("Http")
                .field("url", &redacted_url(url))
                .field("headers", &names(headers))
                .finish(),
        }
    }
}

impl std::fmt::Debug for McpServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServerConfig")
            .field("name", &self.name)
            .field("transport", &self.transport)
            .field("tools", &self.tools)
            .field("startup_timeout", &self.startup_timeout)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// A URL fit for a log line: without its user, password and query (where
/// people put tokens).
pub(crate) fn redacted_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if shown.query().is_some() {
        shown.set_query(Some("…"));
    }
    shown.to_string()
}

impl McpServerConfig {
    /// A server started in the sandbox, with the default timeouts and all
    /// its tools.
    pub fn stdio(
        name: impl Into<String>,
        command: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<McpServerConfig, String> {
        McpServerConfig::new(name.into(), McpTransport::Stdio { command, env })
    }

    /// A Streamable HTTP server, with the default timeouts and all its
    /// tools.
    pub fn http(
        name: impl Into<String>,
        url: url::Url,
        headers: Vec<(String, String)>,
    ) -> Result<McpServerConfig, String> {
        McpServerConfig::new(name.into(), McpTransport::Http { url, headers })
    }

    fn new(name: String, transport: McpTransport) -> Result<McpServerConfig, String> {
        let config = McpServerConfig {
            name,
            transport,
            tools: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        };
        config.validate()?;
        Ok(config)
    }

    /// Only these tools of the server.
    pub fn with_tools<I, S>(mut self, tools: I) -> Result<McpServerConfig, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tools = Some(tools.into_iter().map(Into::into).collect());
        self.validate()?;
        Ok(self)
    }

    pub fn with_timeouts(
        mut self,
        startup: Duration,
        call: Duration,
    ) -> Result<McpServerConfig, String> {
        self.startup_timeout = startup;
        self.call_timeout = call;
        self.validate()?;
        Ok(self)
    }

    /// Everything a server's entry must satisfy, in one message naming the
    /// server (never a secret value).
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        let name = &self.name;
        match &self.transport {
            McpTransport::Stdio { command, env } => {
                if command.first().is_none_or(|program| program.is_empty()) {
                    return Err(format!("MCP server `{name}`: the command is empty"));
                }
                if command.iter().any(|arg| arg.contains('\0')) {
                    return Err(format!(
                        "MCP server `{name}`: the command must not contain NUL"
                    ));
                }
                for (var, value) in env {
                    if var.is_empty()
                        || var.contains('=')
                        || var.contains('\0')
                        || value.contains('\0')
                    {
                        return Err(format!(
                            "MCP server `{name}`: invalid environment variable {var:?}"
                        ));
                    }
                }
            }
            McpTransport::Http { url, headers } => {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!(
                        "MCP server `{name}`: the URL must be http or https, not {}",
                        url.scheme()
                    ));
                }
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(format!("MCP server `{name}`: the URL has no host"));
                }
                for (header, value) in headers {
                    if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                        return Err(format!(
                            "MCP server `{name}`: {header:?} is not a header name"
                        ));
                    }
                    if reqwest::header::HeaderValue::from_str(value).is_err() {
                        // The value is not shown: it may be a secret.
                        return Err(format!(
                            "MCP server `{name}`: the value of header {header:?} is not valid in HTTP"
                        ));
                    }
                }
            }
        }
        if let Some(tools) = &self.tools
            && let Some(bad) = tools.iter().find(|t| t.is_empty())
        {
            return Err(format!(
                "MCP server `{name}`: an empty tool name in the allowlist ({bad:?})"
            ));
        }
        for (what, timeout) in [
            ("startup timeout", self.startup_timeout),
            ("call timeout", self.call_timeout),
        ] {
            if timeout.is_zero() {
                return Err(format!("MCP server `{name}`: the {what} must be above 0"));
            }
        }
        Ok(())
    }

    /// Whether the agent may use the server's tool `tool`.
    pub fn allows_tool(&self, tool: &str) -> bool {
        self.tools
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|t| t == tool))
    }
}

/// A server name: 1–32 of `[a-z0-9_-]`, not containing `__`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "MCP server name {name:?}: 1 to {MAX_NAME_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "MCP server name {name:?}: only a-z, 0-9, `_` and `-`"
        ));
    }
    if name.contains(SEPARATOR) {
        return Err(format!(
            "MCP server name {name:?}: must not contain `{SEPARATOR}`, which separates it from its tools' names"
        ));
    }
    Ok(())
}

/// `<server>__<tool>`.
pub fn qualified_name(server: &str, tool: &str) -> String {
    format!("{server}{SEPARATOR}{tool}")
}

/// Splits `<server>__<tool>` at the first `__` (server names have none).
pub fn split_qualified(qualified: &str) -> Option<(&str, &str)> {
    qualified
        .split_once(SEPARATOR)
        .filter(|(server, tool)| !server.is_empty() && !tool.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["time", "a", "git-hub_2", &"x".repeat(32)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "1 to 32"),
            (&"x".repeat(33), "1 to 32"),
            ("Time", "only a-z"),
            ("a b", "only a-z"),
            ("a.b", "only a-z"),
            ("a__b", "must not contain `__`"),
            ("__", "must not contain"),
        ] {
            let error = validate_name(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
        // A single underscore at an edge is fine; qualified names still split.
        assert_eq!(split_qualified("a___b"), Some(("a", "_b")));
        assert_eq!(
            split_qualified("time__get_current_time"),
            Some(("time", "get_current_time"))
        );
        assert_eq!(split_qualified("time__"), None);
        assert_eq!(split_qualified("shell"), None);
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let config = McpServerConfig::stdio(
            "gh",
            vec!["server".into()],
            vec![("TOKEN".into(), "s3cret-env".into())],
        )
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            shown.contains("TOKEN") && !shown.contains("s3cret"),
            "{shown}"
        );

        let url = url::Url::parse("https://user:pw@mcp.example.com/mcp?key=s3cret-q").unwrap();
        let config = McpServerConfig::http(
            "api",
            url,
            vec![("Authorization".into(), "Bearer s3cret-h".into())],
        )
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw"),
            "{shown}"
        );

        let url = url::Url::parse("https://mcp.example.com/").unwrap();
        let error = McpServerConfig::http(
            "api",
            url,
            vec![("X-Key".into(), "bad\nvalue-s3cret".into())],
        )
        .unwrap_err();
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn bad_entries_are_refused() {
        let url = url::Url::parse("ftp://example.com/").unwrap();
        assert!(
            McpServerConfig::http("x", url, vec![])
                .unwrap_err()
                .contains("http or https")
        );
        assert!(
            McpServerConfig::stdio("x", vec![], vec![])
                .unwrap_err()
                .contains("empty")
        );
        let config = McpServerConfig::stdio("x", vec!["p".into()], vec![]).unwrap();
        assert!(
            config
                .clone()
                .with_timeouts(Duration::ZERO, Duration::from_secs(1))
                .is_err()
        );
        let config = config.with_tools(["a", "b"]).unwrap();
        assert!(config.allows_tool("a") && !config.allows_tool("c"));
    }
}
