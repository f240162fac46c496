//! A streamed run, read as what a chat client is shown: the text the
//! model produces, then how the run ended. Tool activity stays inside;
//! text the model says before calling tools is part of what it said,
//! set apart from what follows the tools by a blank line.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::{EventRecord, RunOutcome};
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot};

use super::{Answer, outcome};
use crate::error::ApiError;

pub(crate) enum Step {
    Text(String),
    End(End),
}

pub(crate) enum End {
    Completed,
    /// Paused for a person: the text that says so.
    Paused(String),
    Failed(ApiError),
}

pub(crate) struct RunEvents {
    events: mpsc::UnboundedReceiver<EventRecord>,
    outcome: Option<oneshot::Receiver<RunOutcome>>,
    pub(crate) run_id: String,
    pub(crate) session_id: String,
    said: bool,
    tools_since_text: bool,
}

impl RunEvents {
    pub(crate) fn new(handle: bulkhead_agent::RunHandle) -> Result<RunEvents, ApiError> {
        let events = handle
            .events
            .ok_or_else(|| ApiError::internal(&"a streaming run has no event channel"))?;
        Ok(RunEvents {
            events,
            outcome: Some(handle.outcome),
            run_id: handle.run_id,
            session_id: handle.session_id,
            said: false,
            tools_since_text: false,
        })
    }

    /// The next piece of text, or the end.
    pub(crate) async fn next(&mut self) -> Step {
        while let Some(event) = self.events.recv().await {
            match event.kind {
                "message_delta" => {
                    let content = serde_json::from_str::<serde_json::Value>(&event.data)
                        .ok()
                        .and_then(|d| d["content"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    if content.is_empty() {
                        continue;
                    }
                    let text = if self.said && self.tools_since_text {
                        format!("\n\n{content}")
                    } else {
                        content
                    };
                    self.said = true;
                    self.tools_since_text = false;
                    return Step::Text(text);
                }
                "tool_call" => self.tools_since_text = true,
                "run_completed" | "run_failed" | "approval_requested" => break,
                _ => {}
            }
        }
        Step::End(self.end().await)
    }

    /// How the run ended, once it is recorded.
    async fn end(&mut self) -> End {
        let Some(receiver) = self.outcome.take() else {
            return End::Failed(ApiError::internal(&"a run's outcome was read twice"));
        };
        match outcome(&self.run_id, &self.session_id, receiver).await {
            Ok(Answer::Text { text, paused: true }) => End::Paused(text),
            Ok(Answer::Text { paused: false, .. }) => End::Completed,
            Err(error) => End::Failed(error),
        }
    }
}

/// Turns a run's steps into SSE events, one step at a time, with what
/// `render` makes of each; `render` returns no events for the end it has
/// already written.
pub(crate) fn sse<R>(run: RunEvents, first: Step, render: R) -> Response
where
    R: FnMut(Step) -> Vec<Event> + Send + 'static,
{
    struct State<R> {
        run: RunEvents,
        first: Option<Step>,
        pending: VecDeque<Event>,
        render: R,
        ended: bool,
    }
    let state = State {
        run,
        first: Some(first),
        pending: VecDeque::new(),
        render,
        ended: false,
    };
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> = Box::pin(
        futures_util::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(event) = state.pending.pop_front() {
                    return Some((Ok(event), state));
                }
                if state.ended {
                    return None;
                }
                let step = match state.first.take() {
                    Some(step) => step,
                    None => state.run.next().await,
                };
                state.ended = matches!(step, Step::End(_));
                state.pending.extend((state.render)(step));
            }
        }),
    );
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Proxies such as nginx must not buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}
