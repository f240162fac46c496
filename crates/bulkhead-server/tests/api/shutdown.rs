//! Draining on shutdown, and runs that outlive their clients.

use super::*;

async fn shutdown_drains_runs_in_flight(kind: DbKind) {
    let mut app = spawn_app(
        kind,
        &[
            ("MOCK_MODEL_LATENCY_MS", "1000"),
            ("SHUTDOWN_GRACE_SECONDS", "5"),
        ],
    )
    .await;
    let (_, first) = app.post_agent(json!({"message": "before"})).await;
    let session = first["session_id"].as_str().unwrap().to_string();
    let in_flight = {
        let client = app.client.clone();
        let url = format!("{}/agent", app.base);
        let body = json!({"message": "finish me", "session_id": session});
        tokio::spawn(async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        })
    };
    // Two clients with a connection open and idle, as a load balancer
    // keeps them.
    let open_connection = || async {
        let client = reqwest::Client::new();
        let health = client
            .get(format!("{}/health", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        client
    };
    let prober = open_connection().await;
    let latecomer = open_connection().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = app.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Draining: new connections are refused (a load balancer sends them
    // elsewhere); not ready; connections already open are still served,
    // each answer closing its connection.
    let refused = reqwest::Client::new()
        .get(format!("{}/health", app.base))
        .send()
        .await;
    assert!(
        refused.as_ref().is_err_and(|e| e.is_connect()),
        "a new connection is refused: {refused:?}"
    );
    let ready = prober
        .get(format!("{}/ready", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.headers()["connection"], "close");
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["server"]["status"], "fail");
    let late = latecomer
        .post(format!("{}/agent", app.base))
        .json(&json!({"message": "sent on an open connection", "session_id": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), StatusCode::OK);
    assert_eq!(late.headers()["connection"], "close");
    let late: Value = late.json().await.unwrap();
    assert_eq!(late["response"], "echo: sent on an open connection");

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"], "echo: finish me");
    app.server
        .take()
        .unwrap()
        .await
        .unwrap()
        .expect("clean stop");

    // The record survived the stop: reopen the same database.
    let db = app.db.take().unwrap();
    let store = bulkhead_store::Store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    let runs = store.runs(&session).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status == "completed"), "{runs:?}");
    let late = store
        .runs(late["session_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(late[0].status, "completed");
    store.close().await;
}

async fn shutdown_interrupts_runs_past_the_grace(kind: DbKind) {
    let mut app = spawn_app(
        kind,
        &[
            ("MOCK_MODEL_LATENCY_MS", "5000"),
            ("SHUTDOWN_GRACE_SECONDS", "0.3"),
        ],
    )
    .await;
    let in_flight = {
        let client = app.client.clone();
        let url = format!("{}/agent", app.base);
        tokio::spawn(async move {
            let response = client
                .post(url)
                .json(&json!({"message": "never done"}))
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    app.shut_down().await.expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the grace bounds the drain"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "run_interrupted",
    );

    let db = app.db.take().unwrap();
    let store = bulkhead_store::Store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    let run = store
        .run(body["error"]["run_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, "interrupted");
    let session = store.session(&run.session_id).await.unwrap().unwrap();
    assert_eq!(session.active_run_id, None, "the session is released");
    store.close().await;
}

/// A conversation an older release left with a call and no result (it did
/// so when shutdown cut a tool call short): the model is sent it mended, so
/// the session works again instead of failing every message with the 400
/// a strict endpoint (and the mock) answers.
async fn a_stored_call_without_its_result_does_not_poison_the_session(kind: DbKind) {
    use bulkhead_store::{
        BeginRun, FinishRun, NewEvent, NewMessage, RunProgress, RunStatus, SessionRef,
    };
    let app = spawn_app(kind, &[]).await;
    let (status, first) = app.post_agent(json!({"message": "hello"})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let session = first["session_id"].as_str().unwrap();

    let store = bulkhead_store::Store::connect(&app.db.as_ref().unwrap().url, &Default::default())
        .await
        .unwrap();
    let (run, now) = (
        "01900000-0000-7000-8000-000000000001",
        bulkhead_agent::now_ms(),
    );
    store
        .begin_run(&BeginRun {
            session: SessionRef::Existing(session),
            owner: None,
            agent: Some("default"),
            run_id: run,
            input: "tool:shell {}",
            history: &[],
            unbound_agent: "default",
            dequeue: false,
            kwargs: None,
            now,
            lock_stale_before: 0,
            first_event: NewEvent {
                seq: 1,
                kind: "run_started",
                data: "{}".into(),
                created_at: now,
            },
        })
        .await
        .unwrap();
    let calls =
        r#"[{"id":"call_old","type":"function","function":{"name":"shell","arguments":"{}"}}]"#;
    store
        .finish_run(&FinishRun {
            progress: RunProgress {
                run_id: run,
                session_id: session,
                messages: &[NewMessage {
                    role: "assistant",
                    content: None,
                    tool_calls: Some(calls.into()),
                    tool_call_id: None,
                }],
                events: &[],
                tokens_used: 0,
                steps: 1,
                now: now + 1,
            },
            status: RunStatus::Interrupted,
            output: None,
            error: Some((
                "run_interrupted",
                "the server shut down before the run finished",
            )),
            usage: None,
        })
        .await
        .unwrap();
    store.close().await;

    let (status, next) = app
        .post_agent(json!({"message": "still there?", "session_id": session}))
        .await;
    assert_eq!(status, StatusCode::OK, "{next}");
    assert_eq!(next["response"], "echo: still there?");
}

async fn a_client_that_leaves_does_not_lose_its_run(kind: DbKind) {
    let app = spawn_app(kind, &[("MOCK_MODEL_LATENCY_MS", "300")]).await;
    let response = app
        .client
        .post(format!("{}/agent", app.base))
        .json(&json!({"message": "I will not wait", "stream": true}))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream().eventsource();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first.event, "run_started");
    let started: Value = serde_json::from_str(&first.data).unwrap();
    drop(events);

    let run_id = started["run_id"].as_str().unwrap();
    let mut status = Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, run) = app.get(&format!("/runs/{run_id}")).await;
        status = run["status"].clone();
        if status != "running" {
            assert_eq!(run["output"], "echo: I will not wait");
            break;
        }
    }
    assert_eq!(status, "completed");
}

on_both_databases!(
    shutdown_drains_runs_in_flight,
    shutdown_interrupts_runs_past_the_grace,
    a_stored_call_without_its_result_does_not_poison_the_session,
    a_client_that_leaves_does_not_lose_its_run,
);
