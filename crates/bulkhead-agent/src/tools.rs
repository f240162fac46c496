//! The tools an agent may call. Each one is offered to the model as an
//! OpenAI function schema; the registry dispatches calls by name.

use std::collections::HashMap;
use std::sync::Arc;

use bulkhead_model::{FunctionSpec, ToolSpec};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

/// Why a tool call produced no result. The text goes back to the model.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool `{0}`")]
    Unknown(String),
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("{0}")]
    Failed(String),
}

pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// JSON Schema of the arguments object.
    fn parameters(&self) -> Value;
    fn call(&self, arguments: Value) -> BoxFuture<'_, Result<String, ToolError>>;
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
    pub async fn call(&self, name: &str, arguments: &str) -> Result<String, ToolError> {
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
        tool.call(arguments).await
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

    fn call(&self, arguments: Value) -> BoxFuture<'_, Result<String, ToolError>> {
        Box::pin(async move {
            let now = time::OffsetDateTime::now_utc();
            match arguments.get("format").and_then(Value::as_str) {
                None | Some("rfc3339") => now
                    .format(&time::format_description::well_known::Rfc3339)
                    .map_err(|e| ToolError::Failed(e.to_string())),
                Some("unix") => Ok(now.unix_timestamp().to_string()),
                Some(other) => Err(ToolError::InvalidArguments(format!(
                    "format must be \"rfc3339\" or \"unix\", not {other:?}"
                ))),
            }
        })
    }
}
