//! The tools an agent may call. Each one is offered to the model as an
//! OpenAI function schema; the registry dispatches calls by name.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use bulkhead_model::{FunctionSpec, ToolSpec};
use bulkhead_sandbox::egress::{EgressPolicy, FETCH_SCRIPT};
use bulkhead_sandbox::{ExecResult, Operation};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use crate::sandboxes::SandboxManager;

/// Why a tool call produced no result. The text goes back to the model.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool `{0}`")]
    Unknown(String),
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The sandbox could not be had; the call was refused, nothing ran.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// What a tool call runs with.
#[derive(Clone, Copy)]
pub struct ToolContext<'a> {
    pub session_id: &'a str,
    pub sandboxes: Option<&'a SandboxManager>,
    /// The limits of the session's sandbox (its agent's).
    pub limits: &'a bulkhead_sandbox::Limits,
}

/// A tool's answer, and the sandboxed execution behind it if there was one.
#[derive(Debug, Clone)]
pub struct ToolOutput {
    pub content: String,
    pub is_error: bool,
    pub execution: Option<ExecResult>,
}

pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// JSON Schema of the arguments object.
    fn parameters(&self) -> Value;
    /// Whether the tool runs in the session's sandbox.
    fn sandboxed(&self) -> bool {
        false
    }
    fn call<'a>(
        &'a self,
        context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>>;
}

fn text(content: String) -> ToolOutput {
    ToolOutput {
        content,
        is_error: false,
        execution: None,
    }
}

#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: HashMap<String, Arc<dyn Tool>>,
    specs: Vec<ToolSpec>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl ToolRegistry {
    /// The tools every server has.
    pub fn with_builtins() -> ToolRegistry {
        let mut registry = ToolRegistry::default();
        registry.register(Arc::new(CurrentTime));
        registry
    }

    /// The built-in tools and the sandboxed ones: `shell`, `read_file`,
    /// `write_file`, `list_dir`, and `http_fetch` to the hosts `egress`
    /// allows (none when it is empty).
    pub fn with_sandbox_tools(egress: Arc<EgressPolicy>) -> ToolRegistry {
        let mut registry = ToolRegistry::with_builtins();
        registry.register(Arc::new(Shell));
        registry.register(Arc::new(ReadFile));
        registry.register(Arc::new(WriteFile));
        registry.register(Arc::new(ListDir));
        registry.register(Arc::new(HttpFetch { egress }));
        registry
    }

    /// The tools named in `names`, in that order. A name the registry does
    /// not have is the error.
    pub fn subset<S: AsRef<str>>(&self, names: &[S]) -> Result<ToolRegistry, String> {
        let mut subset = ToolRegistry::default();
        for name in names {
            let tool = self
                .tools
                .get(name.as_ref())
                .ok_or_else(|| name.as_ref().to_string())?;
            subset.register(Arc::clone(tool));
        }
        Ok(subset)
    }

    /// The names of the tools, in the order they are offered.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|spec| spec.function.name.as_str())
    }

    /// Whether a tool of that name is registered.
    pub fn has(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub fn is_sandboxed(&self, name: &str) -> bool {
        self.tools.get(name).is_some_and(|t| t.sandboxed())
    }

    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.specs.retain(|s| s.function.name != tool.name());
        self.specs.push(ToolSpec {
            kind: "function".into(),
            function: FunctionSpec {
                name: tool.name().to_string(),
                description: tool.description().to_string(),
                parameters: tool.parameters(),
            },
        });
        self.tools.insert(tool.name().to_string(), tool);
    }

    pub fn specs(&self) -> &[ToolSpec] {
        &self.specs
    }

    /// Runs a call as the model wrote it: `arguments` is JSON text.
    pub async fn call(
        &self,
        context: ToolContext<'_>,
        name: &str,
        arguments: &str,
    ) -> Result<ToolOutput, ToolError> {
        let tool = self
            .tools
            .get(name)
            .ok_or_else(|| ToolError::Unknown(name.to_string()))?;
        let arguments = if arguments.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(arguments)
                .map_err(|e| ToolError::InvalidArguments(format!("not valid JSON: {e}")))?
        };
        if !arguments.is_object() {
            return Err(ToolError::InvalidArguments(
                "arguments must be a JSON object".into(),
            ));
        }
        tool.call(context, arguments).await
    }
}

/// `current_time`: the time now, in UTC. Harmless, and useful to show the
/// tool-calling path end to end.
struct CurrentTime;

impl Tool for CurrentTime {
    fn name(&self) -> &str {
        "current_time"
    }

    fn description(&self) -> &str {
        "The current date and time in UTC, as RFC 3339 (default) or Unix seconds."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "format": {"type": "string", "enum": ["rfc3339", "unix"], "description": "Output format"}
            },
            "additionalProperties": false
        })
    }

    fn call<'a>(
        &'a self,
        _context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>> {
        Box::pin(async move {
            let now = time::OffsetDateTime::now_utc();
            match arguments.get("format").and_then(Value::as_str) {
                None | Some("rfc3339") => now
                    .format(&time::format_description::well_known::Rfc3339)
                    .map(text)
                    .map_err(|e| ToolError::Failed(e.to_string())),
                Some("unix") => Ok(text(now.unix_timestamp().to_string())),
                Some(other) => Err(ToolError::InvalidArguments(format!(
                    "format must be \"rfc3339\" or \"unix\", not {other:?}"
                ))),
            }
        })
    }
}

fn string_argument<'a>(arguments: &'a Value, name: &str) -> Result<&'a str, ToolError> {
    match arguments.get(name) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(ToolError::InvalidArguments(format!(
            "`{name}` must be a string"
        ))),
        None => Err(ToolError::InvalidArguments(format!("`{name}` is required"))),
    }
}

/// Runs an operation in the session's sandbox.
async fn in_sandbox(
    context: ToolContext<'_>,
    operation: Operation,
) -> Result<ExecResult, ToolError> {
    let manager = context.sandboxes.ok_or_else(|| {
        ToolError::Refused("no sandbox is configured; the tool was not run".into())
    })?;
    let sandbox = manager
        .for_session(context.session_id, context.limits)
        .await
        .map_err(|e| ToolError::Refused(format!("{e}; the tool was not run")))?;
    let started = std::time::Instant::now();
    let result = sandbox.run(&operation).await;
    crate::telemetry::sandbox_exec(manager.backend_name(), started.elapsed());
    result.map_err(|e| ToolError::Refused(format!("{e}; the tool was not run")))
}

/// A file tool's answer: its stdout, or its stderr as the error.
fn file_output(result: ExecResult) -> ToolOutput {
    let ok = result.success();
    let content = if ok {
        let mut content = result.stdout.text.clone();
        if result.stdout.truncated {
            content.push_str(&format!(
                "\n[output truncated: {} bytes in all]",
                result.stdout.total_bytes
            ));
        }
        content
    } else {
        let reason = result.stderr.text.trim();
        match result.killed_reason {
            Some(killed) => format!(
                "error: stopped by the sandbox ({}) {reason}",
                killed.as_str()
            ),
            None => format!("error: {reason}"),
        }
    };
    ToolOutput {
        content,
        is_error: !ok,
        execution: Some(result),
    }
}

/// `shell`: a command line run by /bin/sh in the session's sandbox.
struct Shell;

impl Tool for Shell {
    fn name(&self) -> &str {
        "shell"
    }

    fn description(&self) -> &str {
        "Run a shell command line (/bin/sh -c) in this session's sandbox: a Linux system with the \
         host's tools read-only, the working directory /workspace (kept between calls) and /tmp \
         (not kept), no network, and limits on memory, processes, time and output."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The command line"},
                "timeout_seconds": {"type": "number", "description": "Stop it after this many seconds (at most the sandbox's limit)"}
            },
            "required": ["command"],
            "additionalProperties": false
        })
    }

    fn sandboxed(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>> {
        Box::pin(async move {
            let command = string_argument(&arguments, "command")?;
            if command.trim().is_empty() {
                return Err(ToolError::InvalidArguments(
                    "`command` must not be empty".into(),
                ));
            }
            let timeout = match arguments.get("timeout_seconds") {
                None | Some(Value::Null) => None,
                Some(value) => match value.as_f64() {
                    Some(seconds) if seconds > 0.0 && seconds.is_finite() => {
                        Some(Duration::from_secs_f64(seconds.min(86_400.0)))
                    }
                    _ => {
                        return Err(ToolError::InvalidArguments(
                            "`timeout_seconds` must be a positive number".into(),
                        ));
                    }
                },
            };
            let result = in_sandbox(
                context,
                Operation::Exec {
                    argv: vec!["/bin/sh".into(), "-c".into(), command.to_string()],
                    timeout,
                },
            )
            .await?;
            let mut content = match (result.exit_code, result.signal) {
                (Some(code), _) => format!("exit code: {code}\n"),
                (None, Some(signal)) => format!("killed by signal {signal}\n"),
                (None, None) => String::new(),
            };
            if let Some(reason) = result.killed_reason {
                content.push_str(&format!("stopped by the sandbox: {}\n", reason.as_str()));
            }
            for (name, output) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
                if output.total_bytes > 0 {
                    content.push_str(&format!("{name}:\n{}", output.text));
                    if !output.text.ends_with('\n') {
                        content.push('\n');
                    }
                    if output.truncated {
                        content.push_str(&format!(
                            "[{name} truncated: {} bytes in all]\n",
                            output.total_bytes
                        ));
                    }
                }
            }
            Ok(ToolOutput {
                content,
                is_error: !result.success(),
                execution: Some(result),
            })
        })
    }
}

/// `read_file`: a file of the workspace.
struct ReadFile;

impl Tool for ReadFile {
    fn name(&self) -> &str {
        "read_file"
    }

    fn description(&self) -> &str {
        "Read a text file from this session's workspace (paths relative to /workspace)."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
            "additionalProperties": false
        })
    }

    fn sandboxed(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>> {
        Box::pin(async move {
            let path = string_argument(&arguments, "path")?.to_string();
            Ok(file_output(
                in_sandbox(context, Operation::ReadFile { path }).await?,
            ))
        })
    }
}

/// `write_file`: creates or replaces a file of the workspace.
struct WriteFile;

impl Tool for WriteFile {
    fn name(&self) -> &str {
        "write_file"
    }

    fn description(&self) -> &str {
        "Create or replace a text file in this session's workspace (paths relative to /workspace; \
         folders are created)."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
            "additionalProperties": false
        })
    }

    fn sandboxed(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>> {
        Box::pin(async move {
            let path = string_argument(&arguments, "path")?.to_string();
            let content = string_argument(&arguments, "content")?.to_string();
            Ok(file_output(
                in_sandbox(context, Operation::WriteFile { path, content }).await?,
            ))
        })
    }
}

/// `list_dir`: the entries of a workspace folder.
struct ListDir;

impl Tool for ListDir {
    fn name(&self) -> &str {
        "list_dir"
    }

    fn description(&self) -> &str {
        "List a folder of this session's workspace as JSON (name, type, size); default: the workspace."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "additionalProperties": false
        })
    }

    fn sandboxed(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>> {
        Box::pin(async move {
            let path = match arguments.get("path") {
                None | Some(Value::Null) => ".".to_string(),
                Some(_) => string_argument(&arguments, "path")?.to_string(),
            };
            Ok(file_output(
                in_sandbox(context, Operation::ListDir { path }).await?,
            ))
        })
    }
}

/// `http_fetch`: one GET or POST, run inside the session's sandbox, whose
/// only way out is the egress proxy and its allowlist.
struct HttpFetch {
    egress: Arc<EgressPolicy>,
}

impl Tool for HttpFetch {
    fn name(&self) -> &str {
        "http_fetch"
    }

    fn description(&self) -> &str {
        "Fetch a URL (GET or POST) from inside this session's sandbox. Only the hosts the \
         operator allows (SANDBOX_EGRESS_ALLOW) can be reached. Returns the status line, \
         headers and body."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "url": {"type": "string", "description": "http:// or https:// URL"},
                "method": {"type": "string", "enum": ["GET", "POST"]},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "body": {"type": "string"}
            },
            "required": ["url"],
            "additionalProperties": false
        })
    }

    fn sandboxed(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: ToolContext<'a>,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>> {
        Box::pin(async move {
            let raw = string_argument(&arguments, "url")?;
            let url = url::Url::parse(raw)
                .map_err(|e| ToolError::InvalidArguments(format!("`url` is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ToolError::InvalidArguments(
                    "`url` must be http:// or https://".into(),
                ));
            }
            let host = url
                .host_str()
                .ok_or_else(|| ToolError::InvalidArguments("`url` has no host".into()))?;
            let port = url.port_or_known_default().unwrap_or(443);
            let method = match arguments
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("GET")
            {
                m if m.eq_ignore_ascii_case("GET") => "GET",
                m if m.eq_ignore_ascii_case("POST") => "POST",
                other => {
                    return Err(ToolError::InvalidArguments(format!(
                        "`method` must be GET or POST, not {other:?}"
                    )));
                }
            };
            if !self.egress.allows(host, port) {
                return Err(ToolError::Refused(format!(
                    "{host}:{port} is not in SANDBOX_EGRESS_ALLOW; nothing was fetched"
                )));
            }
            let mut request = json!({"url": url.as_str(), "method": method});
            if let Some(headers) = arguments.get("headers").filter(|h| !h.is_null()) {
                if !headers
                    .as_object()
                    .is_some_and(|h| h.values().all(Value::is_string))
                {
                    return Err(ToolError::InvalidArguments(
                        "`headers` must be an object of strings".into(),
                    ));
                }
                request["headers"] = headers.clone();
            }
            if arguments.get("body").is_some_and(|b| !b.is_null()) {
                request["body"] = Value::String(string_argument(&arguments, "body")?.to_string());
            }
            let result = in_sandbox(
                context,
                Operation::Exec {
                    argv: vec![
                        "python3".into(),
                        "-c".into(),
                        FETCH_SCRIPT.into(),
                        request.to_string(),
                    ],
                    timeout: None,
                },
            )
            .await?;
            Ok(file_output(result))
        })
    }
}
