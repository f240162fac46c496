//! Roles for several agents working as one (`AGENT_ROLE`), each a Bulkhead
//! server of its own, talking over the same HTTP API any client uses:
//!
//! - **planner**: asks its model for a plan (one step per line), hands each
//!   step to the executor in one executor session (so the steps share a
//!   workspace), then asks the critic to review the results against the
//!   task. Its answer is the plan, the results and the review. It runs no
//!   tool itself.
//! - **executor**: the ordinary agent loop with the sandboxed tools.
//! - **critic**: the agent loop without tools, with a reviewer's prompt.
//!
//! Without a role, a server is a general agent (the executor's behaviour).
//! Every hand-over is an event of the planner's run (`plan`, `delegated`,
//! `delegate_result`), so one task can be followed through all three.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use url::Url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    General,
    Planner,
    Executor,
    Critic,
}

impl RoleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleKind::General => "general",
            RoleKind::Planner => "planner",
            RoleKind::Executor => "executor",
            RoleKind::Critic => "critic",
        }
    }

    /// Whether the role's model is offered the tools.
    pub fn uses_tools(self) -> bool {
        matches!(self, RoleKind::General | RoleKind::Executor)
    }

    /// The system prompt of the role when `SYSTEM_PROMPT` does not set one.
    pub fn default_prompt(self) -> Option<&'static str> {
        match self {
            RoleKind::General => None,
            RoleKind::Planner => Some(
                "You are the planner of a team of agents. Break the user's task into a short \
                 list of concrete steps for an executor that has a shell and file tools in a \
                 sandbox. Answer with the steps only, one per line, each a self-contained \
                 instruction; no numbering, no commentary.",
            ),
            RoleKind::Executor => Some(
                "You are the executor of a team of agents. Carry out the instruction you are \
                 given with your tools, then report briefly what you did and what came out.",
            ),
            RoleKind::Critic => Some(
                "You are the critic of a team of agents. You are given a task, the plan made \
                 for it and the executor's results. Say whether the results accomplish the \
                 task, and name anything wrong or missing.",
            ),
        }
    }
}

/// Where a planner sends its steps and its review requests.
#[derive(Debug, Clone)]
pub struct Peers {
    pub executor: Url,
    pub critic: Url,
    /// How long one hand-over may take (the peer's whole run).
    pub timeout: Duration,
    /// Steps taken from a plan at most; the rest are dropped (and said so).
    pub max_steps: usize,
    /// The API keys the executor and the critic require, when they do
    /// (`EXECUTOR_API_KEY`, `CRITIC_API_KEY`); sent as `Authorization: Bearer`.
    pub executor_key: Option<secrecy::SecretString>,
    pub critic_key: Option<secrecy::SecretString>,
}

/// A peer's answer to one `/agent` request.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerAnswer {
    pub response: String,
    pub session_id: String,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub tokens_used: i64,
}

#[derive(Debug)]
pub struct PeerClient {
    peers: Peers,
    http: reqwest::Client,
}

impl PeerClient {
    pub fn new(peers: Peers) -> Result<PeerClient, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(peers.timeout)
            // Peers sit on the internal network, never behind a proxy.
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(PeerClient { peers, http })
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// `POST <peer>/agent`; the error is safe to show to the client.
    pub async fn ask(
        &self,
        role: RoleKind,
        message: &str,
        session_id: Option<&str>,
    ) -> Result<PeerAnswer, String> {
        let base = match role {
            RoleKind::Critic => &self.peers.critic,
            _ => &self.peers.executor,
        };
        let name = role.as_str();
        let url = base
            .join("agent")
            .map_err(|e| format!("the {name}'s URL is unusable: {e}"))?;
        let mut request = self
            .http
            .post(url)
            .json(&json!({"message": message, "session_id": session_id, "stream": false}));
        let key = match role {
            RoleKind::Critic => &self.peers.critic_key,
            _ => &self.peers.executor_key,
        };
        if let Some(key) = key {
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                    .map_err(|_| format!("the {name}'s API key is not a valid header value"))?;
            value.set_sensitive(true);
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        // The peer's spans join this run's trace.
        if let Some(traceparent) = crate::telemetry::traceparent() {
            request = request.header("traceparent", traceparent);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                format!("the {name} did not answer within {:?}", self.peers.timeout)
            } else {
                format!("the {name} at {base} is unreachable")
            }
        })?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|_| format!("the {name} answered {status} with a body that is not JSON"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            return Err(format!("the {name} answered {status}: {message}"));
        }
        serde_json::from_value(body)
            .map_err(|e| format!("the {name}'s answer lacks a field the API promises: {e}"))
    }
}

/// The steps of a plan: its non-empty lines, list markers (`1.`, `2)`,
/// `-`, `*`) taken off, at most `max`.
pub fn parse_steps(plan: &str, max: usize) -> (Vec<String>, usize) {
    let steps: Vec<String> = plan
        .lines()
        .map(strip_marker)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect();
    let dropped = steps.len().saturating_sub(max);
    (steps.into_iter().take(max).collect(), dropped)
}

fn strip_marker(line: &str) -> &str {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("- ").or_else(|| line.strip_prefix("* ")) {
        return rest.trim();
    }
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    if digits > 0
        && let Some(rest) = line[digits..]
            .strip_prefix(". ")
            .or_else(|| line[digits..].strip_prefix(") "))
    {
        return rest.trim();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_read_line_by_line_without_their_markers() {
        let (steps, dropped) = parse_steps(
            "1. list the files\n\n2) count them\n- report\n* done\n3.5 percent is fine\ntool:shell {\"command\": \"ls\"}",
            10,
        );
        assert_eq!(
            steps,
            [
                "list the files",
                "count them",
                "report",
                "done",
                "3.5 percent is fine",
                "tool:shell {\"command\": \"ls\"}"
            ]
        );
        assert_eq!(dropped, 0);
        let (steps, dropped) = parse_steps("a\nb\nc", 2);
        assert_eq!((steps.len(), dropped), (2, 1));
        assert!(parse_steps("  \n\n", 3).0.is_empty());
    }
}
