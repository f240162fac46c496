//! A run's events as LangGraph's stream parts, and what a client waiting
//! for a run is answered.
//!
//! Events come from the engine's live feed while this process executes the
//! run, else from the store (polled while the run is queued or executes
//! elsewhere). Every follower translates the run's events from the first,
//! on top of the conversation as it stood before the run: the parts it
//! sends are a pure function of those, so the ids of a resumable stream
//! (`<event seq>-<part>`) name the same part on every connection, and
//! `Last-Event-ID` resumes exactly after it.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::{CancelAction, EventRecord, FeedItem};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::messages::{self, Usage};
use crate::app::AppState;
use crate::error::ApiError;

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

/// Where a run's events are read: the feed while this process executes it,
/// the store otherwise. The channel closes once the run has ended or
/// paused (everything it emitted sent), or is cancelled while queued.
pub(crate) fn run_events(state: AppState, run_id: String) -> mpsc::Receiver<EventRecord> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let store = state.engine.store();
        let mut after = 0;
        let mut idle = Duration::from_millis(10);
        loop {
            if let Some(mut follower) = state.engine.follow_run(&run_id, after) {
                if after + 1 < follower.first_seq() {
                    let Ok(stored) = store.run_events(&run_id, after).await else {
                        return;
                    };
                    for event in stored.into_iter().filter(|e| e.seq < follower.first_seq()) {
                        after = event.seq;
                        if tx.send(record(event)).await.is_err() {
                            return;
                        }
                    }
                }
                loop {
                    match follower.next().await {
                        FeedItem::Event(event) if event.seq > after => {
                            after = event.seq;
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                        FeedItem::Event(_) => {}
                        FeedItem::Ended => return,
                    }
                }
            }
            match store.run(&run_id).await {
                Ok(Some(run)) => {
                    let Ok(stored) = store.run_events(&run_id, after).await else {
                        return;
                    };
                    for event in stored {
                        after = event.seq;
                        if tx.send(record(event)).await.is_err() {
                            return;
                        }
                    }
                    if run.status != "running" {
                        return;
                    }
                }
                Ok(None) => match store.queued_run(&run_id).await {
                    Ok(Some(queued)) if queued.status == "pending" => {}
                    _ => return,
                },
                Err(_) => return,
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(idle).await;
            idle = (idle * 2).min(Duration::from_millis(250));
        }
    });
    rx
}

fn record(event: bulkhead_store::RunEvent) -> EventRecord {
    let kind: &'static str = match event.kind.as_str() {
        "run_started" => "run_started",
        "message_delta" => "message_delta",
        "tool_call" => "tool_call",
        "tool_result" => "tool_result",
        "run_completed" => "run_completed",
        "run_failed" => "run_failed",
        "approval_requested" => "approval_requested",
        "approval_decided" => "approval_decided",
        _ => "other",
    };
    EventRecord {
        seq: event.seq,
        kind,
        data: event.data.into(),
    }
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
                let interrupt = super::interrupt(&text("call_id"), &text("tool"), &text("arguments"));
                if self.modes.updates {
                    self.push("updates", json!({ "__interrupt__": [interrupt] }));
                } else if self.modes.values {
                    self.push("values", json!({ "__interrupt__": [interrupt] }));
                }
                self.custom("approval_requested", &data);
            }
            "approval_decided" => self.custom("approval_decided", &data),
            "run_completed" => {
                let response = text("response");
                let usage = match (data["input_tokens"].as_i64(), data["output_tokens"].as_i64()) {
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

/// How a client follows a run: the modes, whether parts carry ids, whether
/// it begins with the `metadata` part, and the part it resumes after
/// (`None`: from the start).
pub(crate) struct Follow {
    pub modes: Modes,
    pub resumable: bool,
    pub metadata: bool,
    pub after: Option<(i64, u32)>,
    /// Cancel the run if the client goes away.
    pub cancel_on_disconnect: bool,
    /// A stateless run's thread, deleted once the run ends.
    pub temporary: bool,
}

/// `Last-Event-ID` as a place in the stream.
pub(crate) fn parse_event_id(id: &str) -> Option<(i64, u32)> {
    let (seq, index) = id.trim().split_once('-')?;
    Some((seq.parse().ok()?, index.parse().ok()?))
}

/// The run's stream as Server-Sent Events, `Location` (where to reconnect)
/// and `Content-Location` (the run) set.
pub(crate) fn sse(
    state: AppState,
    run_id: String,
    thread_id: String,
    agent: String,
    follow: Follow,
    location: String,
    content_location: String,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let conversation = match load_conversation(&state, &thread_id).await {
            Some(conversation) => conversation,
            None => Vec::new(),
        };
        let mut translator =
            Translator::new(follow.modes, &run_id, &thread_id, &agent, conversation);
        let mut gone = false;
        if follow.metadata {
            let mut metadata = Event::default()
                .event("metadata")
                .data(json!({"run_id": run_id, "attempt": 1}).to_string());
            if follow.resumable {
                metadata = metadata.id("0-0");
            }
            gone = tx.send(metadata).await.is_err();
        }
        let mut events = run_events(state.clone(), run_id.clone());
        while !gone {
            let Some(event) = events.recv().await else {
                break;
            };
            for part in translator.on(&event) {
                if follow.after.is_some_and(|after| part.at <= after) {
                    continue;
                }
                let mut sse = Event::default().event(part.event).data(part.data.to_string());
                if follow.resumable {
                    sse = sse.id(format!("{}-{}", part.at.0, part.at.1));
                }
                if tx.send(sse).await.is_err() {
                    gone = true;
                    break;
                }
            }
        }
        drop(events);
        if gone && follow.cancel_on_disconnect {
            let _ = state
                .engine
                .cancel(&run_id, CancelAction::Interrupt, "disconnect", "the client disconnected (on_disconnect=cancel)")
                .await;
        }
        if follow.temporary {
            remove_when_done(&state, &run_id, &thread_id).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok::<_, Infallible>(event), rx))
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)).text("heartbeat"))
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&content_location) {
        headers.insert(header::CONTENT_LOCATION, value);
    }
    response
}

async fn load_conversation(state: &AppState, thread_id: &str) -> Option<Vec<Value>> {
    let values = super::thread_values(state, thread_id).await.ok()?;
    values["messages"].as_array().cloned()
}

/// What a client waiting for a run gets, once it has ended or paused: the
/// thread's values (with `__interrupt__` when a call waits for a person),
/// or `{"__error__": {error, message}}` when it failed.
pub(crate) async fn final_values(state: &AppState, run_id: &str, thread_id: &str) -> Value {
    let store = state.engine.store();
    if let Ok(Some(run)) = store.run(run_id).await
        && run.status == "failed"
    {
        return json!({"__error__": {
            "error": run.error_code.unwrap_or_else(|| "run_failed".into()),
            "message": run.error_message.unwrap_or_default(),
        }});
    }
    let mut values = super::thread_values(state, thread_id)
        .await
        .unwrap_or_else(|_| json!({}));
    if let Ok(Some(call)) = store.awaiting_approval(run_id).await {
        values["__interrupt__"] = json!([super::interrupt(&call.call_id, &call.tool, &call.arguments)]);
    }
    values
}

/// A JSON answer given once the run has ended or paused; until then a
/// newline every five seconds keeps the connection open (JSON parsers skip
/// leading whitespace), as LangGraph's server does.
pub(crate) fn wait_body(
    state: AppState,
    run_id: String,
    thread_id: String,
    cancel_on_disconnect: bool,
    temporary: bool,
    location: String,
    content_location: String,
) -> Response {
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(4);
    tokio::spawn(async move {
        let mut events = run_events(state.clone(), run_id.clone());
        let mut gone = false;
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        beat.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => if event.is_none() { break },
                _ = beat.tick(), if !gone => {
                    gone = tx.send(bytes::Bytes::from_static(b"\n")).await.is_err();
                    if gone && cancel_on_disconnect {
                        let _ = state.engine.cancel(&run_id, CancelAction::Interrupt, "disconnect", "the client disconnected (on_disconnect=cancel)").await;
                    }
                }
            }
        }
        let values = final_values(&state, &run_id, &thread_id).await;
        let _ = tx.send(bytes::Bytes::from(values.to_string())).await;
        if temporary {
            remove_when_done(&state, &run_id, &thread_id).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&content_location) {
        headers.insert(header::CONTENT_LOCATION, value);
    }
    response
}

/// Deletes a stateless run's thread once the run is over; a run paused
/// for a person cannot be resumed without a thread, so it is cancelled.
pub(crate) async fn remove_when_done(state: &AppState, run_id: &str, thread_id: &str) {
    let mut events = run_events(state.clone(), run_id.to_string());
    while events.recv().await.is_some() {}
    if let Ok(Some(run)) = state.engine.store().run(run_id).await
        && run.status == "awaiting_approval"
    {
        let _ = state
            .engine
            .cancel(run_id, CancelAction::Interrupt, "stateless", "a stateless run cannot wait for a person")
            .await;
    }
    if let Err(e) = state.engine.delete_session(thread_id).await {
        tracing::warn!(thread_id, error = %e, "could not delete a stateless run's thread");
    }
}
