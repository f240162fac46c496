//! A conversation as a client sends it (chat `messages`, a response's
//! `input`) read into what the engine takes: the history before the new
//! user message, and that message. Text only: the agent's model is the
//! agent's, and its tools are its own, so a client's tool calls and
//! images have nowhere to go and are refused by name.

use bulkhead_store::NewMessage;
use serde_json::Value;

use crate::error::ApiError;

/// What the parts of a conversation may be called, per API.
#[derive(Clone, Copy)]
pub(crate) enum Dialect {
    Chat,
    Responses,
}

impl Dialect {
    fn list(self) -> &'static str {
        match self {
            Dialect::Chat => "messages",
            Dialect::Responses => "input",
        }
    }
}

fn error(at: String, what: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_request", format!("`{at}` {what}")).with("param", at)
}

/// Reads a list of messages. The last must be the user's: it is the new
/// turn; the rest is history.
pub(crate) fn read(
    list: &[Value],
    dialect: Dialect,
) -> Result<(Vec<NewMessage>, String), ApiError> {
    let name = dialect.list();
    if list.is_empty() {
        return Err(error(name.into(), "must not be empty"));
    }
    let mut history = Vec::with_capacity(list.len());
    for (index, item) in list.iter().enumerate() {
        history.push(message(item, &format!("{name}[{index}]"), dialect)?);
    }
    let last = history.pop().expect("not empty");
    let at = format!("{name}[{}]", list.len() - 1);
    if last.role != "user" {
        return Err(error(
            format!("{at}.role"),
            "must be `user`: the last message is the new turn the agent answers",
        ));
    }
    let text = last.content.unwrap_or_default();
    new_text(&text, &format!("{at}.content"))?;
    Ok((history, text))
}

/// The new turn's text: something to answer.
pub(crate) fn new_text(text: &str, at: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(error(at.into(), "must not be empty"));
    }
    Ok(())
}

fn message(item: &Value, at: &str, dialect: Dialect) -> Result<NewMessage, ApiError> {
    let Value::Object(fields) = item else {
        return Err(error(
            at.into(),
            "must be an object with `role` and `content`",
        ));
    };
    if let Dialect::Responses = dialect
        && let Some(kind) = fields.get("type")
        && kind != "message"
    {
        return Err(error(
            format!("{at}.type"),
            format!(
                "{kind} is not supported: input items are messages (`{{\"role\", \"content\"}}`); \
                 the agent runs its own tools"
            ),
        ));
    }
    let role = match fields.get("role").and_then(Value::as_str) {
        // A developer message is the newer name of a system message, and
        // not every model endpoint knows it.
        Some("system") | Some("developer") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some("tool") | Some("function") => {
            return Err(error(
                format!("{at}.role"),
                "is not supported: this model is an agent that runs its own tools, so a client's tool results have no call to answer",
            ));
        }
        _ => {
            return Err(error(
                format!("{at}.role"),
                "must be one of `system`, `developer`, `user`, `assistant`",
            ));
        }
    };
    if fields
        .get("tool_calls")
        .is_some_and(|calls| !calls.is_null() && calls.as_array().is_none_or(|c| !c.is_empty()))
    {
        return Err(error(
            format!("{at}.tool_calls"),
            "are not supported: this model is an agent that runs its own tools",
        ));
    }
    let content = match fields.get("content") {
        None | Some(Value::Null) if role == "assistant" => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (index, part) in parts.iter().enumerate() {
                text.push_str(part_text(part, &format!("{at}.content[{index}]"))?);
            }
            text
        }
        _ => {
            return Err(error(
                format!("{at}.content"),
                "must be a string or a list of text parts",
            ));
        }
    };
    if content.contains('\0') {
        return Err(error(
            format!("{at}.content"),
            "must not contain NUL characters",
        ));
    }
    Ok(NewMessage {
        role,
        content: Some(content),
        tool_calls: None,
        tool_call_id: None,
    })
}

/// A text part, in either API's words (`text`; `input_text`,
/// `output_text`).
fn part_text<'a>(part: &'a Value, at: &str) -> Result<&'a str, ApiError> {
    let kind = part.get("type").and_then(Value::as_str);
    match (kind, part.get("text").and_then(Value::as_str)) {
        (Some("text" | "input_text" | "output_text"), Some(text)) => Ok(text),
        (Some(kind), _) if !matches!(kind, "text" | "input_text" | "output_text") => Err(error(
            format!("{at}.type"),
            format!("`{kind}` is not supported: only text reaches the agent"),
        )),
        _ => Err(error(
            at.into(),
            "must be a text part: `{\"type\": \"text\", \"text\": \"…\"}`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list(value: Value) -> Vec<Value> {
        value.as_array().unwrap().clone()
    }

    #[test]
    fn the_last_user_message_is_the_turn_and_the_rest_history() {
        let (history, text) = read(
            &list(json!([
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "hello", "refusal": null},
                {"role": "user", "content": "again"},
            ])),
            Dialect::Chat,
        )
        .unwrap();
        assert_eq!(text, "again");
        let roles: Vec<_> = history.iter().map(|m| m.role).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(history[1].content.as_deref(), Some("hi there"));
    }

    #[test]
    fn what_cannot_reach_the_agent_is_refused_by_name() {
        let param = |value: Value, dialect| {
            read(&list(value), dialect).unwrap_err().details["param"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            param(
                json!([{"role": "assistant", "content": "x"}]),
                Dialect::Chat
            ),
            "messages[0].role"
        );
        assert_eq!(
            param(
                json!([{"role": "tool", "content": "x", "tool_call_id": "c"}, {"role": "user", "content": "x"}]),
                Dialect::Chat
            ),
            "messages[0].role"
        );
        assert_eq!(
            param(
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                Dialect::Chat
            ),
            "messages[0].content[0].type"
        );
        assert_eq!(
            param(json!([{"role": "user", "content": "  "}]), Dialect::Chat),
            "messages[0].content"
        );
        assert_eq!(
            param(
                json!([{"type": "function_call_output", "call_id": "c", "output": "x"}]),
                Dialect::Responses
            ),
            "input[0].type"
        );
        assert_eq!(param(json!([]), Dialect::Responses), "input");
    }
}
