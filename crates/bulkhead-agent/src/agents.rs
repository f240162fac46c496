//! The agents a server runs: each with its instructions, its model, its
//! tools, its sandbox limits, its step budget and its approval policy.
//! Where they come from (an `AGENTS_FILE`, or the environment for the one
//! `default` agent) is the server's business; the engine takes them made.

use std::sync::Arc;

use bulkhead_model::Model;
use bulkhead_sandbox::Limits;

use crate::tools::ToolRegistry;

/// The id of the agent a server without an agents file runs, and the one a
/// request that names none gets.
pub const DEFAULT_AGENT: &str = "default";

/// What happens when the model calls a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolPolicy {
    /// Runs at once.
    Auto,
    /// Waits for a person to approve or deny it.
    Ask,
    /// Never offered to the model; refused if it calls it anyway.
    Deny,
}

impl Agent {
    /// Whether a call of this tool runs in the session's sandbox: a
    /// sandboxed built-in tool, or any tool of a stdio MCP server (which
    /// runs there like a command).
    pub fn runs_in_sandbox(&self, tool: &str) -> bool {
        self.tools.is_sandboxed(tool)
            || self
                .mcp_server(tool)
                .is_some_and(|s| matches!(s.transport, bulkhead_mcp::McpTransport::Stdio { .. }))
    }

    /// The MCP server a tool name belongs to, if it names one of this
    /// agent's (`<server>__<tool>`).
    pub fn mcp_server(&self, tool: &str) -> Option<&bulkhead_mcp::McpServerConfig> {
        let (server, _) = bulkhead_mcp::split_qualified(tool)?;
        self.mcp_servers.iter().find(|s| s.name == server)
    }
}

impl ToolPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolPolicy::Auto => "auto",
            ToolPolicy::Ask => "ask",
            ToolPolicy::Deny => "deny",
        }
    }

    pub fn parse(text: &str) -> Option<ToolPolicy> {
        match text {
            "auto" => Some(ToolPolicy::Auto),
            "ask" => Some(ToolPolicy::Ask),
            "deny" => Some(ToolPolicy::Deny),
            _ => None,
        }
    }
}

/// An agent's tool policy: a rule per tool name (or per prefix, written
/// `prefix*`, e.g. `time__*` for every tool of the MCP server `time`), and
/// a default for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalPolicy {
    pub default: ToolPolicy,
    /// In the order written; an exact name wins over a prefix, a longer
    /// prefix over a shorter one.
    pub rules: Vec<(String, ToolPolicy)>,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        ApprovalPolicy {
            default: ToolPolicy::Auto,
            rules: Vec::new(),
        }
    }
}

impl ApprovalPolicy {
    pub fn for_tool(&self, name: &str) -> ToolPolicy {
        if let Some((_, policy)) = self.rules.iter().find(|(rule, _)| rule == name) {
            return *policy;
        }
        self.rules
            .iter()
            .filter_map(|(rule, policy)| {
                let prefix = rule.strip_suffix('*')?;
                name.starts_with(prefix).then_some((prefix.len(), *policy))
            })
            .max_by_key(|(length, _)| *length)
            .map_or(self.default, |(_, policy)| policy)
    }
}

/// One agent, as the engine runs it.
#[derive(Debug)]
pub struct Agent {
    /// Used in URLs and stored with each of its sessions.
    pub id: String,
    pub name: String,
    pub description: String,
    /// Prepended to every conversation sent to the model, when set.
    pub system_prompt: Option<String>,
    pub model: Arc<Model>,
    /// The built-in tools it may use (MCP tools come on top).
    pub tools: ToolRegistry,
    /// The MCP servers whose tools it may use, as `<server>__<tool>`.
    pub mcp_servers: Vec<bulkhead_mcp::McpServerConfig>,
    /// The limits of its sessions' sandboxes (within the server's).
    pub limits: Limits,
    /// Model calls allowed in one run.
    pub max_steps: u32,
    pub approval: ApprovalPolicy,
}

/// The agents of a server, in the order they were declared.
#[derive(Debug, Clone)]
pub struct Agents {
    list: Vec<Arc<Agent>>,
}

impl Agents {
    /// Refuses an empty list and duplicate ids.
    pub fn new(list: Vec<Agent>) -> Result<Agents, String> {
        if list.is_empty() {
            return Err("no agents".into());
        }
        let mut seen = std::collections::HashSet::new();
        for agent in &list {
            if !seen.insert(agent.id.as_str()) {
                return Err(format!("two agents have the id {:?}", agent.id));
            }
        }
        Ok(Agents {
            list: list.into_iter().map(Arc::new).collect(),
        })
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Agent>> {
        self.list.iter().find(|agent| agent.id == id)
    }

    /// The agent a request that names none gets: `default` if there is
    /// one, else the first declared.
    pub fn default_agent(&self) -> &Arc<Agent> {
        self.get(DEFAULT_AGENT).unwrap_or(&self.list[0])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Agent>> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_win_over_prefixes_and_longer_prefixes_over_shorter() {
        let policy = ApprovalPolicy {
            default: ToolPolicy::Auto,
            rules: vec![
                ("time__*".into(), ToolPolicy::Ask),
                ("time__get_*".into(), ToolPolicy::Deny),
                ("time__get_current_time".into(), ToolPolicy::Auto),
                ("shell".into(), ToolPolicy::Ask),
            ],
        };
        assert_eq!(policy.for_tool("shell"), ToolPolicy::Ask);
        assert_eq!(policy.for_tool("time__convert_time"), ToolPolicy::Ask);
        assert_eq!(policy.for_tool("time__get_zone"), ToolPolicy::Deny);
        assert_eq!(policy.for_tool("time__get_current_time"), ToolPolicy::Auto);
        assert_eq!(policy.for_tool("read_file"), ToolPolicy::Auto);
    }
}
