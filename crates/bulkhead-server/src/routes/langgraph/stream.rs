//! Following a run: its events (`cluster::follow`, wherever it executes);
//! its stream as Server-Sent Events (parts
//! made by `translate.rs`, `Last-Event-ID` resuming exactly after one); and
//! what a client waiting for it is answered.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkhead_agent::CancelAction;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::translate::Translator;
pub(crate) use super::translate::{LangGraphEvent, Modes};
use crate::app::AppState;
use crate::cluster::follow::run_events;

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
        // Made at the run's first event: by then its opening (its message,
        // and whatever runs before it in the queue said) is in the store.
        let mut translator: Option<Translator> = None;
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
        let mut events = run_events(state.clone(), run_id.clone(), 0);
        while !gone {
            // A client that leaves while the run is silent is noticed at
            // once, not at the run's next event.
            let event = tokio::select! {
                event = events.recv() => event,
                () = tx.closed() => {
                    gone = true;
                    break;
                }
            };
            let Some(event) = event else {
                break;
            };
            if translator.is_none() {
                let conversation = load_conversation(&state, &thread_id)
                    .await
                    .unwrap_or_default();
                translator = Some(Translator::new(
                    follow.modes,
                    &run_id,
                    &thread_id,
                    &agent,
                    conversation,
                ));
            }
            let translator = translator.as_mut().expect("made above");
            for part in translator.on(&event) {
                if follow.after.is_some_and(|after| part.at <= after) {
                    continue;
                }
                let mut sse = Event::default()
                    .event(part.event)
                    .data(part.data.to_string());
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
                .cancel(
                    &run_id,
                    CancelAction::Interrupt,
                    "disconnect",
                    "the client disconnected (on_disconnect=cancel)",
                )
                .await;
        }
        if follow.temporary {
            remove_when_done(&state, &run_id, &thread_id).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    let mut response = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(5))
                .text("heartbeat"),
        )
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
        values["__interrupt__"] =
            json!([super::interrupt(&call.call_id, &call.tool, &call.arguments)]);
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
        let mut events = run_events(state.clone(), run_id.clone(), 0);
        let mut gone = false;
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        beat.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => if event.is_none() { break },
                _ = beat.tick(), if !gone => {
                    gone = tx.send(bytes::Bytes::from_static(b"\n")).await.is_err();
                }
                () = tx.closed(), if !gone => gone = true,
            }
            if gone && cancel_on_disconnect {
                let _ = state
                    .engine
                    .cancel(
                        &run_id,
                        CancelAction::Interrupt,
                        "disconnect",
                        "the client disconnected (on_disconnect=cancel)",
                    )
                    .await;
                break;
            }
        }
        let values = final_values(&state, &run_id, &thread_id).await;
        let _ = tx.send(bytes::Bytes::from(values.to_string())).await;
        if temporary {
            remove_when_done(&state, &run_id, &thread_id).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
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
    let mut events = run_events(state.clone(), run_id.to_string(), 0);
    while events.recv().await.is_some() {}
    if let Ok(Some(run)) = state.engine.store().run(run_id).await
        && run.status == "awaiting_approval"
    {
        let _ = state
            .engine
            .cancel(
                run_id,
                CancelAction::Interrupt,
                "stateless",
                "a stateless run cannot wait for a person",
            )
            .await;
    }
    if let Err(e) = state.engine.delete_session(thread_id).await {
        tracing::warn!(thread_id, error = %e, "could not delete a stateless run's thread");
    }
}
