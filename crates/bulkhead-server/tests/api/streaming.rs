//! Server-Sent Events: numbered, the same as the record, asked for by body or header, and turned off.

use super::*;

async fn streaming_sends_numbered_events_that_match_the_record(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let events = app
        .stream_agent(json!({"message": "stream these words", "stream": true}))
        .await;
    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "message_delta",
            "message_delta",
            "message_delta",
            "message_delta",
            "run_completed"
        ]
    );
    let ids: Vec<i64> = events.iter().map(|(id, ..)| *id).collect();
    assert_eq!(ids, (1..=6).collect::<Vec<_>>());
    let text: String = events
        .iter()
        .filter(|(_, kind, _)| kind == "message_delta")
        .map(|(_, _, data)| data["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo: stream these words");
    let done = &events[5].2;
    assert_eq!(done["response"], "echo: stream these words");
    assert_eq!(done["tokens_used"], 7);
    let session = done["session_id"].as_str().unwrap();
    assert_eq!(events[0].2["session_id"], session);

    let run_id = done["run_id"].as_str().unwrap();
    let (_, recorded) = app.get(&format!("/runs/{run_id}/events")).await;
    let recorded: Vec<(i64, String, Value)> = recorded["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["event"].as_str().unwrap().to_string(),
                e["data"].clone(),
            )
        })
        .collect();
    assert_eq!(recorded, events, "the record is what was streamed");

    // A streamed turn continues the same session.
    let events = app
        .stream_agent(
            json!({"message": "tool:current_time", "session_id": session, "stream": true}),
        )
        .await;
    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(kinds[..3], ["run_started", "tool_call", "tool_result"]);
    assert_eq!(kinds.last(), Some(&"run_completed"));
    assert_eq!(events.last().unwrap().2["session_id"], session);
}

async fn accept_header_asks_for_a_stream(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let response = app
        .client
        .post(format!("{}/agent", app.base))
        .header("accept", "text/event-stream")
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    let events = collect_events(response).await;
    assert_eq!(events.first().unwrap().1, "run_started");
    assert_eq!(events.last().unwrap().1, "run_completed");
    // An explicit "stream": false wins over the header.
    let response = app
        .client
        .post(format!("{}/agent", app.base))
        .header("accept", "text/event-stream")
        .json(&json!({"message": "hi", "stream": false}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["response"], "echo: hi");
}

async fn streaming_can_be_turned_off(kind: DbKind) {
    let app = spawn_app(kind, &[("ENABLE_STREAMING", "false")]).await;
    let (status, body) = app
        .post_agent(json!({"message": "hi", "stream": true}))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "streaming_disabled");
    let (status, body) = app.post_agent(json!({"message": "hi"})).await;
    assert_eq!(
        (status, body["response"].as_str()),
        (StatusCode::OK, Some("echo: hi"))
    );
}

on_both_databases!(
    streaming_sends_numbered_events_that_match_the_record,
    accept_header_asks_for_a_stream,
    streaming_can_be_turned_off,
);
