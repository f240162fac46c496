//! The conversation in LangChain's message dicts, as LangGraph clients
//! read and send it: `type` human/ai/tool/system, `content`, `id`, an AI
//! message's `tool_calls` (`name`, parsed `args`, `id`) and
//! `usage_metadata`, a tool message's `tool_call_id`, `name` and `status`.
//!
//! A stored message's id is `<run_id>-<n>`, its place among the messages
//! its run added: the same id whether it is read back from the store or
//! built from the run's events while it streams, so that a client merging
//! streamed chunks and states by id sees one message, not two.

use std::collections::HashMap;

use bulkhead_store::{Message, NewMessage};
use serde_json::{Value, json};

use super::invalid;
use crate::error::ApiError;

/// A run's token usage, for the answer that ends it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub input: i64,
    pub output: i64,
}

impl Usage {
    pub(crate) fn value(self) -> Value {
        json!({
            "input_tokens": self.input,
            "output_tokens": self.output,
            "total_tokens": self.input + self.output,
        })
    }
}

pub(crate) fn message_id(run_id: &str, n: usize) -> String {
    format!("{run_id}-{n}")
}

pub(crate) fn human(id: &str, content: &str) -> Value {
    json!({
        "type": "human", "content": content, "id": id, "name": null,
        "additional_kwargs": {}, "response_metadata": {}, "example": false,
    })
}

pub(crate) fn system(id: &str, content: &str) -> Value {
    json!({
        "type": "system", "content": content, "id": id, "name": null,
        "additional_kwargs": {}, "response_metadata": {},
    })
}

pub(crate) fn ai(id: &str, content: &str, tool_calls: &[Value], usage: Option<Usage>) -> Value {
    json!({
        "type": "ai", "content": content, "id": id, "name": null,
        "tool_calls": tool_calls, "invalid_tool_calls": [],
        "usage_metadata": usage.map(Usage::value),
        "additional_kwargs": {}, "response_metadata": {}, "example": false,
    })
}

pub(crate) fn tool(id: &str, content: &str, call_id: &str, name: &str, is_error: bool) -> Value {
    json!({
        "type": "tool", "content": content, "id": id, "name": name,
        "tool_call_id": call_id, "status": if is_error { "error" } else { "success" },
        "artifact": null, "additional_kwargs": {}, "response_metadata": {},
    })
}

/// A call as LangChain writes it, from OpenAI's `{id, function: {name,
/// arguments}}` (arguments that are not a JSON object become `{}`; the
/// model's text is kept in the audit trail).
pub(crate) fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    let args = serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    json!({"name": name, "args": args, "id": id, "type": "tool_call"})
}

/// The stored conversation as LangChain messages. `usage`: each run's, put
/// on the run's answer (its last AI message without calls).
pub(crate) fn conversation(stored: &[Message], usage: &HashMap<String, Usage>) -> Vec<Value> {
    let mut per_run: HashMap<&str, usize> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let last_answer: HashMap<&str, usize> = stored
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant" && m.tool_calls.is_none())
        .filter_map(|(i, m)| Some((m.run_id.as_deref()?, i)))
        .collect();
    stored
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let id = match m.run_id.as_deref() {
                Some(run) => {
                    let n = per_run.entry(run).or_default();
                    *n += 1;
                    message_id(run, *n - 1)
                }
                None => format!("message-{}", m.id),
            };
            let content = m.content.as_deref().unwrap_or_default();
            match m.role.as_str() {
                "user" => human(&id, content),
                "system" => system(&id, content),
                "tool" => {
                    let call_id = m.tool_call_id.as_deref().unwrap_or_default();
                    let name = names.get(call_id).map(String::as_str).unwrap_or_default();
                    tool(&id, content, call_id, name, content.starts_with("error:"))
                }
                _ => {
                    let calls: Vec<Value> = m
                        .tool_calls
                        .as_deref()
                        .and_then(|c| serde_json::from_str::<Vec<Value>>(c).ok())
                        .unwrap_or_default()
                        .iter()
                        .map(|call| {
                            let call_id = call["id"].as_str().unwrap_or_default();
                            let name = call["function"]["name"].as_str().unwrap_or_default();
                            names.insert(call_id.to_string(), name.to_string());
                            tool_call(
                                call_id,
                                name,
                                call["function"]["arguments"].as_str().unwrap_or("{}"),
                            )
                        })
                        .collect();
                    let answer_usage = m
                        .run_id
                        .as_deref()
                        .filter(|run| last_answer.get(run) == Some(&i))
                        .and_then(|run| usage.get(run).copied());
                    ai(&id, content, &calls, answer_usage)
                }
            }
        })
        .collect()
}

/// What a run's `input` says: the messages before the turn (history, for
/// a thread's first run) and the turn itself, the last, a human message.
pub(crate) struct Input {
    pub history: Vec<NewMessage>,
    pub message: String,
}

/// Reads `input.messages`: a list of message dicts (`role` or `type`,
/// `content` as text or a list of text blocks), `[role, content]` pairs or
/// strings (a human message each), or one string.
pub(crate) fn read_input(input: &Value) -> Result<Input, ApiError> {
    let messages = match input.get("messages") {
        Some(Value::Array(items)) => items.clone(),
        Some(Value::String(text)) => vec![Value::String(text.clone())],
        Some(Value::Object(_)) => vec![input["messages"].clone()],
        Some(_) => return Err(invalid("`input.messages` must be a list of messages")),
        None => {
            return Err(invalid(
                "`input` must hold `messages`, the new human message last (Bulkhead's assistants take a conversation, not arbitrary state)",
            ));
        }
    };
    let mut read = Vec::with_capacity(messages.len());
    for (i, item) in messages.iter().enumerate() {
        read.push(read_message(item).map_err(|e| invalid(format!("`input.messages[{i}]`: {e}")))?);
    }
    let Some(last) = read.pop() else {
        return Err(invalid(
            "`input.messages` is empty: send the new human message",
        ));
    };
    if last.role != "user" {
        return Err(invalid(format!(
            "the last of `input.messages` must be a human message (the turn), not {}",
            last.role
        )));
    }
    let message = last.content.unwrap_or_default();
    if message.trim().is_empty() {
        return Err(invalid("the human message is empty"));
    }
    Ok(Input {
        history: read,
        message,
    })
}

fn read_message(item: &Value) -> Result<NewMessage, String> {
    let (kind, content) = match item {
        Value::String(text) => ("user", Value::String(text.clone())),
        Value::Array(pair) if pair.len() == 2 => {
            (role(pair[0].as_str().unwrap_or_default())?, pair[1].clone())
        }
        Value::Object(m) => {
            let kind = m
                .get("role")
                .or_else(|| m.get("type"))
                .and_then(Value::as_str)
                .ok_or("a message needs `role` or `type`")?;
            (
                role(kind)?,
                m.get("content").cloned().unwrap_or(Value::Null),
            )
        }
        _ => return Err("a message is a dict, a [role, content] pair or a string".into()),
    };
    let text = text_of(&content)?;
    if text.contains('\0') {
        return Err("`content` contains NUL".into());
    }
    let mut message = NewMessage {
        role: kind,
        content: Some(text),
        tool_calls: None,
        tool_call_id: None,
    };
    match kind {
        "assistant" => {
            let calls = item.get("tool_calls").and_then(Value::as_array);
            if let Some(calls) = calls.filter(|c| !c.is_empty()) {
                let openai: Vec<Value> = calls
                    .iter()
                    .map(|call| {
                        let name = call["name"].as_str().ok_or("a tool call needs `name`")?;
                        let id = call["id"].as_str().ok_or("a tool call needs `id`")?;
                        Ok(json!({
                            "id": id, "type": "function",
                            "function": {"name": name, "arguments": call.get("args").map_or_else(|| "{}".to_string(), Value::to_string)},
                        }))
                    })
                    .collect::<Result<_, String>>()?;
                message.tool_calls = Some(Value::Array(openai).to_string());
            }
        }
        "tool" => {
            let call_id = item
                .get("tool_call_id")
                .and_then(Value::as_str)
                .ok_or("a tool message needs `tool_call_id`")?;
            message.tool_call_id = Some(call_id.to_string());
        }
        _ => {}
    }
    Ok(message)
}

fn role(kind: &str) -> Result<&'static str, String> {
    Ok(match kind {
        "human" | "user" => "user",
        "ai" | "assistant" => "assistant",
        "tool" => "tool",
        "system" | "developer" => "system",
        other => return Err(format!("unknown message type {other:?}")),
    })
}

/// A message's text: a string, or the `text` of its text blocks.
fn text_of(content: &Value) -> Result<String, String> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for block in blocks {
                match block {
                    Value::String(part) => text.push_str(part),
                    Value::Object(b) if b.get("type").and_then(Value::as_str) == Some("text") => {
                        text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    _ => {
                        return Err(
                            "only text content is supported (blocks of `type: text`)".into()
                        );
                    }
                }
            }
            Ok(text)
        }
        _ => Err("`content` must be text or a list of text blocks".into()),
    }
}
