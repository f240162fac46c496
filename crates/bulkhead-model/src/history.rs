//! What a conversation must look like for an OpenAI-compatible endpoint to
//! take it, and how to mend one that does not.
//!
//! Strict endpoints (OpenAI, Azure, DeepSeek, vLLM with some templates)
//! answer 400 to a history in which an assistant's `tool_calls` are not all
//! answered by the `tool` messages right after it, or a `tool` message
//! answers no call. Because the whole history is sent with every request,
//! one such message poisons every later request of its session. The mock
//! model applies [`validate`] so that the test suite meets the same refusal;
//! the agent applies [`repair`] to what it loads, so that a history recorded
//! wrongly (by an older release, or a bug) heals instead of failing forever.

use std::collections::HashSet;

use crate::types::ChatMessage;

/// The roles OpenAI accepts.
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Why an endpoint would refuse a history, in OpenAI's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HistoryError {
    /// The offending field, as OpenAI names it (`messages.[3].role`).
    pub param: String,
    pub message: String,
    /// OpenAI's `code`, null for most of these.
    pub code: Option<&'static str>,
}

/// Checks a history the way OpenAI's chat-completions endpoint does.
pub fn validate(messages: &[ChatMessage]) -> Result<(), HistoryError> {
    // The calls of the assistant message the current run of `tool`
    // messages answers, and those of them still unanswered.
    let mut open: Option<(usize, Vec<String>, Vec<String>)> = None;
    for (index, message) in messages.iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return Err(HistoryError {
                param: format!("messages[{index}].role"),
                message: format!(
                    "Invalid value: '{}'. Supported values are: 'system', 'assistant', 'user', \
                     'function', 'tool', and 'developer'.",
                    message.role
                ),
                code: Some("invalid_value"),
            });
        }
        if message.role == "tool" {
            let Some((_, calls, unanswered)) = open.as_mut() else {
                return Err(HistoryError {
                    param: format!("messages.[{index}].role"),
                    // Sic: OpenAI's spelling.
                    message: "Invalid parameter: messages with role 'tool' must be a response \
                              to a preceeding message with 'tool_calls'."
                        .into(),
                    code: None,
                });
            };
            let Some(id) = message.tool_call_id.as_deref() else {
                return Err(HistoryError {
                    param: format!("messages[{index}].tool_call_id"),
                    message: format!(
                        "Missing required parameter: 'messages[{index}].tool_call_id'."
                    ),
                    code: Some("missing_required_parameter"),
                });
            };
            if !calls.iter().any(|c| c == id) {
                return Err(HistoryError {
                    param: format!("messages.[{index}].tool_call_id"),
                    message: format!(
                        "Invalid parameter: 'tool_call_id' of '{id}' not found in 'tool_calls' \
                         of previous message."
                    ),
                    code: None,
                });
            }
            unanswered.retain(|c| c != id);
            continue;
        }
        if let Some((at, _, unanswered)) = open.take() {
            dangling(at, &unanswered)?;
        }
        if message.role == "assistant"
            && let Some(calls) = message.tool_calls.as_ref().filter(|c| !c.is_empty())
        {
            let ids: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
            open = Some((index, ids.clone(), ids));
        }
    }
    if let Some((at, _, unanswered)) = open {
        dangling(at, &unanswered)?;
    }
    Ok(())
}

fn dangling(at: usize, unanswered: &[String]) -> Result<(), HistoryError> {
    if unanswered.is_empty() {
        return Ok(());
    }
    Err(HistoryError {
        param: format!("messages.[{at}].role"),
        message: format!(
            "An assistant message with 'tool_calls' must be followed by tool messages \
             responding to each 'tool_call_id'. The following tool_call_ids did not have \
             response messages: {}",
            unanswered.join(", ")
        ),
        code: None,
    })
}

/// The result given to a call whose history holds none.
pub const UNANSWERED_CALL: &str =
    "error: interrupted before it finished (no result of this call was recorded)";

/// A history every endpoint takes, as close to `messages` as can be: each
/// call left without a result gets [`UNANSWERED_CALL`] right after the
/// results it has, and a `tool` message that answers no call before it is
/// dropped (nothing can be said of what it answered). Returns how many
/// messages were added or dropped.
pub fn repair(messages: Vec<ChatMessage>) -> (Vec<ChatMessage>, usize) {
    let mut repaired = Vec::with_capacity(messages.len());
    let mut changes = 0;
    // The open assistant message's calls, and those answered so far.
    let mut open: Option<(Vec<String>, HashSet<String>)> = None;
    let close = |open: &mut Option<(Vec<String>, HashSet<String>)>,
                 repaired: &mut Vec<ChatMessage>,
                 changes: &mut usize| {
        if let Some((calls, answered)) = open.take() {
            for id in calls.into_iter().filter(|id| !answered.contains(id)) {
                *changes += 1;
                repaired.push(ChatMessage {
                    role: "tool".into(),
                    content: Some(UNANSWERED_CALL.into()),
                    tool_calls: None,
                    tool_call_id: Some(id),
                });
            }
        }
    };
    for mut message in messages {
        if message.role == "tool" {
            let answers_an_open_call = match (&mut open, message.tool_call_id.as_deref()) {
                (Some((calls, answered)), Some(id)) => {
                    calls.iter().any(|c| c == id) && answered.insert(id.to_owned())
                }
                _ => false,
            };
            if answers_an_open_call {
                repaired.push(message);
            } else {
                changes += 1;
            }
            continue;
        }
        close(&mut open, &mut repaired, &mut changes);
        if message.tool_calls.as_ref().is_some_and(Vec::is_empty) {
            // OpenAI refuses an empty `tool_calls` array.
            message.tool_calls = None;
        }
        if message.role == "assistant"
            && let Some(calls) = &message.tool_calls
        {
            open = Some((calls.iter().map(|c| c.id.clone()).collect(), HashSet::new()));
        }
        repaired.push(message);
    }
    close(&mut open, &mut repaired, &mut changes);
    (repaired, changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FunctionCall, ToolCall};

    fn text(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    fn calls(ids: &[&str]) -> ChatMessage {
        ChatMessage {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(
                ids.iter()
                    .map(|id| ToolCall {
                        id: (*id).into(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: "shell".into(),
                            arguments: "{}".into(),
                        },
                    })
                    .collect(),
            ),
            tool_call_id: None,
        }
    }

    fn result(id: &str) -> ChatMessage {
        ChatMessage {
            role: "tool".into(),
            content: Some("ok".into()),
            tool_calls: None,
            tool_call_id: Some(id.into()),
        }
    }

    #[test]
    fn a_well_formed_history_passes() {
        let history = [
            text("system", "be brief"),
            text("user", "a"),
            calls(&["c1", "c2"]),
            result("c2"),
            result("c1"),
            text("assistant", "done"),
            text("user", "b"),
            text("user", "c"),
        ];
        assert_eq!(validate(&history), Ok(()));
        assert_eq!(repair(history.to_vec()), (history.to_vec(), 0));
    }

    #[test]
    fn a_call_without_its_result_is_refused_as_openai_does() {
        let history = [
            text("user", "a"),
            calls(&["c1", "c2"]),
            result("c1"),
            text("user", "b"),
        ];
        let error = validate(&history).unwrap_err();
        assert_eq!(error.param, "messages.[1].role");
        assert_eq!(error.code, None);
        assert_eq!(
            error.message,
            "An assistant message with 'tool_calls' must be followed by tool messages \
             responding to each 'tool_call_id'. The following tool_call_ids did not have \
             response messages: c2"
        );
        // The same at the very end of the history.
        let error = validate(&history[..2]).unwrap_err();
        assert!(
            error.message.ends_with("response messages: c1, c2"),
            "{error}"
        );
    }

    #[test]
    fn a_tool_message_must_answer_a_call_just_before_it() {
        let orphan = [text("user", "a"), result("c1")];
        let error = validate(&orphan).unwrap_err();
        assert_eq!(error.param, "messages.[1].role");
        assert!(
            error
                .message
                .contains("must be a response to a preceeding message"),
            "{error}"
        );
        // After a user message the calls are closed, even if answered late.
        let late = [
            text("user", "a"),
            calls(&["c1"]),
            text("user", "b"),
            result("c1"),
        ];
        assert_eq!(validate(&late).unwrap_err().param, "messages.[1].role");
        let unknown = [text("user", "a"), calls(&["c1"]), result("c9")];
        let error = validate(&unknown).unwrap_err();
        assert_eq!(error.param, "messages.[2].tool_call_id");
        assert!(error.message.contains("'c9' not found"), "{error}");
        let mut anonymous = result("c1");
        anonymous.tool_call_id = None;
        let error = validate(&[text("user", "a"), calls(&["c1"]), anonymous]).unwrap_err();
        assert_eq!(error.code, Some("missing_required_parameter"));
    }

    #[test]
    fn an_unknown_role_is_refused() {
        let error = validate(&[text("robot", "beep")]).unwrap_err();
        assert_eq!(error.param, "messages[0].role");
        assert_eq!(error.code, Some("invalid_value"));
    }

    #[test]
    fn repair_answers_dangling_calls_and_drops_orphans() {
        let broken = vec![
            text("user", "a"),
            calls(&["c1", "c2"]),
            result("c1"),
            text("user", "b"),
            result("c7"),
            calls(&["c3"]),
        ];
        assert!(validate(&broken).is_err());
        let (repaired, changes) = repair(broken);
        assert_eq!(validate(&repaired), Ok(()), "{repaired:#?}");
        assert_eq!(changes, 3, "two answers added, one orphan dropped");
        let roles: Vec<(&str, Option<&str>)> = repaired
            .iter()
            .map(|m| (m.role.as_str(), m.tool_call_id.as_deref()))
            .collect();
        assert_eq!(
            roles,
            [
                ("user", None),
                ("assistant", None),
                ("tool", Some("c1")),
                ("tool", Some("c2")),
                ("user", None),
                ("assistant", None),
                ("tool", Some("c3")),
            ]
        );
        assert_eq!(repaired[3].content.as_deref(), Some(UNANSWERED_CALL));
    }
}
