//! A run's events as LangGraph's stream parts. Every follower runs its own
//! `Translator` from the run's first event, over the conversation as it
//! stood before the run: the parts it makes are a pure function of those,
//! so the ids of a resumable stream (`<event seq>-<part>`) name the same
//! part on every connection.

use bulkhead_agent::EventRecord;
use serde_json::{Value, json};

use super::messages::{self, Usage};
use crate::error::ApiError;

/// One Server-Sent Event of a LangGraph stream, as the OpenAPI document
/// describes it (the stream itself is written by `sse`).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct LangGraphEvent {
    /// `<event seq>-<part>`: only on a run made `stream_resumable`, to send
    /// back as `Last-Event-ID`.
    #[schema(pattern = "^[0-9]+-[0-9]+$")]
    id: Option<String>,
    event: LangGraphEventKind,
    /// The part's JSON.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// What a part of a LangGraph stream is: `metadata` first, then the modes
/// asked (`messages` for `messages-tuple`), `error` if the run fails.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum LangGraphEventKind {
    Metadata,
    Values,
    Updates,
    Messages,
    Custom,
    Error,
}

/// The stream modes a client asked for. `messages-tuple` (and `messages`,
/// which Bulkhead sends the same way) is sent as event `messages`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Modes {
    pub values: bool,
    pub updates: bool,
    pub messages: bool,
    pub custom: bool,
}

impl Modes {
    pub(crate) fn parse(value: Option<&Value>) -> Result<Modes, ApiError> {
        let names: Vec<&str> = match value {
            None | Some(Value::Null) => vec!["values"],
            Some(Value::String(mode)) => vec![mode.as_str()],
            Some(Value::Array(modes)) => modes
                .iter()
                .map(|m| m.as_str().ok_or_else(unsupported_mode))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(unsupported_mode()),
        };
        let mut modes = Modes::default();
        for name in names {
            match name {
                "values" => modes.values = true,
                "updates" => modes.updates = true,
                "messages" | "messages-tuple" => modes.messages = true,
                "custom" => modes.custom = true,
                other => {
                    return Err(ApiError::unprocessable(
                        "invalid_request",
                        format!(
                            "stream_mode {other:?} is not supported by Bulkhead; use values, updates, messages-tuple or custom"
                        ),
                    ));
                }
            }
        }
        Ok(modes)
    }
}

fn unsupported_mode() -> ApiError {
    ApiError::unprocessable(
        "invalid_request",
        "`stream_mode` must be a mode or a list of modes (values, updates, messages-tuple, custom)",
    )
}

/// A part of the stream: its event name, data, and its place `(event seq,
/// index among that event's parts)`.
pub(crate) struct Part {
    pub event: &'static str,
    pub data: Value,
    pub at: (i64, u32),
}

/// An AI message being built from a model call's events.
struct Draft {
    id: String,
    content: String,
    calls: Vec<Value>,
}

/// Turns one run's events into LangGraph's stream parts.
pub(crate) struct Translator {
    modes: Modes,
    run_id: String,
    thread_id: String,
    agent: String,
    messages: Vec<Value>,
    /// Messages of this run in the conversation before its events: the
    /// next message it adds is number `numbered`.
    numbered: usize,
    draft: Option<Draft>,
    step: u32,
    parts: Vec<Part>,
    at: i64,
}

impl Translator {
    /// `conversation`: the stored conversation now; what came before the
    /// run's events is kept (up to and with the run's human message).
    pub(crate) fn new(
        modes: Modes,
        run_id: &str,
        thread_id: &str,
        agent: &str,
        conversation: Vec<Value>,
    ) -> Translator {
        let prefix = format!("{run_id}-");
        let own = |m: &Value| m["id"].as_str().is_some_and(|id| id.starts_with(&prefix));
        let cut = conversation
            .iter()
            .rposition(|m| own(m) && m["type"] == "human")
            .map_or(conversation.len(), |i| i + 1);
        let mut messages = conversation;
        messages.truncate(cut);
        let numbered = messages.iter().filter(|m| own(m)).count();
        Translator {
            modes,
            run_id: run_id.to_string(),
            thread_id: thread_id.to_string(),
            agent: agent.to_string(),
            messages,
            numbered,
            draft: None,
            step: 0,
            parts: Vec::new(),
            at: 0,
        }
    }

    fn next_id(&mut self) -> String {
        self.numbered += 1;
        messages::message_id(&self.run_id, self.numbered - 1)
    }

    fn push(&mut self, event: &'static str, data: Value) {
        let index = self.parts.len() as u32;
        self.parts.push(Part {
            event,
            data,
            at: (self.at, index),
        });
    }

    fn meta(&self, node: &str) -> Value {
        json!({
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "graph_id": self.agent,
            "assistant_id": super::assistant_id(&self.agent),
            "langgraph_node": node,
            "langgraph_step": self.step,
            "langgraph_checkpoint_ns": "",
        })
    }

    fn values(&mut self) {
        if self.modes.values {
            let data = json!({ "messages": self.messages });
            self.push("values", data);
        }
    }

    fn update(&mut self, node: &str, message: Value) {
        if self.modes.updates {
            self.push("updates", json!({ node: { "messages": [message] } }));
        }
    }

    fn chunk(&mut self, id: &str, content: &str, calls: &[Value], call_chunks: &[Value]) {
        if self.modes.messages {
            let chunk = json!({
                "type": "AIMessageChunk", "content": content, "id": id, "name": null,
                "tool_calls": calls, "tool_call_chunks": call_chunks, "invalid_tool_calls": [],
                "additional_kwargs": {}, "response_metadata": {}, "usage_metadata": null,
                "example": false,
            });
            let meta = self.meta("model");
            self.push("messages", json!([chunk, meta]));
        }
    }

    fn draft(&mut self) -> &mut Draft {
        if self.draft.is_none() {
            self.step += 1;
            let id = self.next_id();
            self.draft = Some(Draft {
                id,
                content: String::new(),
                calls: Vec::new(),
            });
        }
        self.draft.as_mut().expect("made above")
    }

    /// The model call's message is complete: it joins the conversation.
    fn flush(&mut self, usage: Option<Usage>) {
        if let Some(draft) = self.draft.take() {
            let message = messages::ai(&draft.id, &draft.content, &draft.calls, usage);
            self.messages.push(message.clone());
            self.update("model", message);
            self.values();
        }
    }

    fn custom(&mut self, kind: &str, data: &Value) {
        if self.modes.custom {
            let mut data = data.clone();
            if let Some(object) = data.as_object_mut() {
                object.insert("type".into(), json!(kind));
            }
            self.push("custom", data);
        }
    }

    /// The parts one event makes.
    pub(crate) fn on(&mut self, event: &EventRecord) -> Vec<Part> {
        self.at = event.seq;
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let text = |key: &str| data[key].as_str().unwrap_or_default().to_string();
        match event.kind {
            "run_started" => self.values(),
            "message_delta" => {
                let delta = text("content");
                let draft = self.draft();
                draft.content.push_str(&delta);
                let id = draft.id.clone();
                self.chunk(&id, &delta, &[], &[]);
            }
            "tool_call" => {
                let (id, name, arguments) = (text("id"), text("name"), text("arguments"));
                let call = messages::tool_call(&id, &name, &arguments);
                let draft = self.draft();
                let index = draft.calls.len();
                draft.calls.push(call.clone());
                let message_id = draft.id.clone();
                let call_chunk = json!({
                    "name": name, "args": arguments, "id": id, "index": index,
                    "type": "tool_call_chunk",
                });
                self.chunk(&message_id, "", &[call], &[call_chunk]);
                self.custom("tool_call", &data);
            }
            "tool_result" => {
                self.flush(None);
                let id = self.next_id();
                let message = messages::tool(
                    &id,
                    &text("content"),
                    &text("id"),
                    &text("name"),
                    data["is_error"].as_bool().unwrap_or(false),
                );
                self.messages.push(message.clone());
                if self.modes.messages {
                    let meta = self.meta("tools");
                    self.push("messages", json!([message.clone(), meta]));
                }
                self.update("tools", message);
                self.values();
                self.custom("tool_result", &data);
            }
            "approval_requested" => {
                self.flush(None);
                let interrupt =
                    super::interrupt(&text("call_id"), &text("tool"), &text("arguments"));
                if self.modes.updates {
                    self.push("updates", json!({ "__interrupt__": [interrupt.clone()] }));
                }
                if self.modes.values {
                    let state = json!({ "messages": self.messages, "__interrupt__": [interrupt] });
                    self.push("values", state);
                }
                self.custom("approval_requested", &data);
            }
            "approval_decided" => self.custom("approval_decided", &data),
            "run_completed" => {
                let response = text("response");
                let usage = match (
                    data["input_tokens"].as_i64(),
                    data["output_tokens"].as_i64(),
                ) {
                    (Some(input), Some(output)) => Some(Usage { input, output }),
                    _ => None,
                };
                let streamed = self.draft.as_ref().is_some_and(|d| !d.content.is_empty());
                let draft = self.draft();
                draft.content = response.clone();
                let id = draft.id.clone();
                if !streamed && !response.is_empty() {
                    self.chunk(&id, &response, &[], &[]);
                }
                self.flush(usage);
            }
            "run_failed" => {
                // What the failed call said was not kept in the conversation.
                self.draft = None;
                let code = data["error"]["code"].as_str().unwrap_or("run_failed");
                if code != "run_cancelled" {
                    let message = data["error"]["message"].as_str().unwrap_or_default();
                    self.push("error", json!({ "error": code, "message": message }));
                }
            }
            _ => {}
        }
        std::mem::take(&mut self.parts)
    }
}
