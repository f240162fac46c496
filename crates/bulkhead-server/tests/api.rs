//! The HTTP API end to end: the real server on a loopback port, a fresh real
//! database per test (SQLite and PostgreSQL), the mock model in-process or
//! over HTTP.

use std::time::Duration;

use bulkhead_server::{Config, Environment, Server};
use bulkhead_testing::{DbKind, TestDb, on_both_databases, sandbox_helper, spawn_mock_model};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct TestApp {
    base: String,
    client: reqwest::Client,
    _db: TestDb,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

async fn spawn_app(kind: DbKind, env: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new(kind).await;
    let secrets = db.dir.path().join("no-secrets");
    let mut vars: std::collections::HashMap<String, String> = [
        ("DATABASE_URL", db.url.clone()),
        ("HOST", "127.0.0.1".into()),
        ("PORT", "0".into()),
        ("SECRETS_DIR", secrets.display().to_string()),
        (
            "SANDBOX_ROOT",
            db.dir.path().join("sandboxes").display().to_string(),
        ),
        ("SANDBOX_HELPER", sandbox_helper().display().to_string()),
        ("SANDBOX_TIMEOUT_SECONDS", "3".to_string()),
        ("SANDBOX_MEMORY", "64m".to_string()),
        ("SANDBOX_PIDS", "32".to_string()),
        ("SANDBOX_DISK", "8m".to_string()),
        ("SANDBOX_OUTPUT_LIMIT", "4k".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (key, value) in env {
        vars.insert(key.to_string(), value.to_string());
    }
    let config = Config::from_env(&Environment::from_map(vars)).expect("valid test configuration");
    let server = Server::bind(config).await.expect("server starts");
    let base = format!("http://{}", server.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        client: reqwest::Client::new(),
        _db: db,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    async fn post_agent(&self, body: Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}/agent", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, body: Vec<u8>) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}/agent", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let streamed = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.to_str().unwrap().starts_with("text/event-stream"));
        if streamed {
            // `"stream": true` in a generated body: the stream must end well.
            let (_, kind, data) = collect_events(response).await.pop().unwrap();
            assert_eq!(kind, "run_completed", "{data}");
            return (status, data);
        }
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{status}: the body is not JSON: {text:?}"));
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts with `"stream": true` and collects `(id, event, data)`.
    async fn stream_agent(&self, body: Value) -> Vec<(i64, String, Value)> {
        let response = self
            .client
            .post(format!("{}/agent", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        collect_events(response).await
    }

    /// Signals shutdown and waits for the server to stop.
    async fn shut_down(&mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap()
    }
}

async fn collect_events(response: reqwest::Response) -> Vec<(i64, String, Value)> {
    let mut events = response.bytes_stream().eventsource();
    let mut collected = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        collected.push((
            event.id.parse().unwrap(),
            event.event,
            serde_json::from_str(&event.data).unwrap(),
        ));
    }
    collected
}

fn assert_error(status: StatusCode, body: &Value, expected_status: StatusCode, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

async fn probes_answer(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (status, body) = app.get("/health").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"status": "healthy"}))
    );
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["database"]["status"], "ok");
    assert_eq!(
        body["checks"]["database"]["backend"],
        match kind {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgres",
        }
    );
    assert_eq!(body["checks"]["model"]["status"], "ok");
    assert_eq!(body["checks"]["sandbox"]["status"], "ok");
    assert_eq!(body["checks"]["sandbox"]["backend"], "namespace");
}

async fn a_conversation_continues_with_its_history(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (status, first) = app.post_agent(json!({"message": "hello there"})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["response"], "echo: hello there");
    // The mock counts words: 2 in the prompt, 3 in the answer.
    assert_eq!(first["tokens_used"], 5);
    let session = first["session_id"].as_str().unwrap().to_string();

    let (status, second) = app
        .post_agent(json!({"message": "and again", "session_id": session}))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["session_id"], session.as_str());
    assert_eq!(second["response"], "echo: and again");
    // The prompt now holds the whole history: 2 + 3 + 2 words, answer 3.
    assert_eq!(second["tokens_used"], 10);

    let (status, conversation) = app.get(&format!("/sessions/{session}")).await;
    assert_eq!(status, StatusCode::OK);
    let turns: Vec<(String, String)> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        turns,
        [
            ("user".into(), "hello there".into()),
            ("assistant".into(), "echo: hello there".into()),
            ("user".into(), "and again".into()),
            ("assistant".into(), "echo: and again".into()),
        ]
    );
}

async fn sessions_runs_and_events_are_readable(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (_, first) = app.post_agent(json!({"message": "one"})).await;
    let session = first["session_id"].as_str().unwrap();
    let (_, second) = app
        .post_agent(json!({"message": "two", "session_id": session}))
        .await;

    let (status, runs) = app.get(&format!("/sessions/{session}/runs")).await;
    assert_eq!(status, StatusCode::OK);
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["run_id"], first["run_id"]);
    assert_eq!(runs[1]["run_id"], second["run_id"]);
    for run in runs {
        assert_eq!(run["status"], "completed");
        assert!(run["finished_at"].is_string());
    }

    let run_id = second["run_id"].as_str().unwrap();
    let (status, run) = app.get(&format!("/runs/{run_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(run["input"], "two");
    assert_eq!(run["output"], "echo: two");
    assert_eq!(run["tokens_used"], second["tokens_used"]);
    assert_eq!(run["error"], Value::Null);

    let (status, events) = app.get(&format!("/runs/{run_id}/events")).await;
    assert_eq!(status, StatusCode::OK);
    let events = events["events"].as_array().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["run_started", "message_delta", "run_completed"]);
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(events[2]["data"]["session_id"], session);
    assert_eq!(events[2]["data"]["tokens_used"], second["tokens_used"]);

    let (_, later) = app.get(&format!("/runs/{run_id}/events?after=2")).await;
    assert_eq!(later["events"].as_array().unwrap().len(), 1);
    let (status, body) = app.get(&format!("/runs/{run_id}/events?after=x")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
}

async fn unknown_and_malformed_ids_are_rejected(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let unknown = "8c1d1f1e-32fb-4c39-9d0a-6c3b1f0e7a11";
    let (status, body) = app
        .post_agent(json!({"message": "hi", "session_id": unknown}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "session_not_found");
    let (status, body) = app
        .post_agent(json!({"message": "hi", "session_id": "not-a-uuid"}))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_session_id",
    );
    for path in [
        format!("/sessions/{unknown}"),
        format!("/sessions/{unknown}/runs"),
    ] {
        let (status, body) = app.get(&path).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "session_not_found");
    }
    for path in [
        format!("/runs/{unknown}"),
        format!("/runs/{unknown}/events"),
    ] {
        let (status, body) = app.get(&path).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "run_not_found");
    }
    let (status, body) = app.get("/sessions/zzz").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_session_id");
    let (status, body) = app.get("/runs/zzz").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_run_id");
    // Nothing was created by the refused requests.
    let (_, first) = app.post_agent(json!({"message": "hi"})).await;
    assert_eq!(first["response"], "echo: hi");
}

async fn deleting_a_session_forgets_it(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (_, first) = app.post_agent(json!({"message": "remember me"})).await;
    let session = first["session_id"].as_str().unwrap();
    let url = format!("{}/sessions/{session}", app.base);
    let response = app.client.delete(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = app.get(&format!("/sessions/{session}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "session_not_found");
    let (status, body) = app
        .get(&format!("/runs/{}", first["run_id"].as_str().unwrap()))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "run_not_found");
    let response = app.client.delete(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (status, body) = app
        .post_agent(json!({"message": "again", "session_id": session}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "session_not_found");
}

async fn tools_are_called_and_recorded(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (status, body) = app
        .post_agent(json!({"message": "tool:current_time {\"format\": \"unix\"}"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer = body["response"].as_str().unwrap();
    let seconds: i64 = answer
        .strip_prefix("tool result: ")
        .unwrap_or_else(|| panic!("{answer}"))
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - seconds).abs() < 60, "{seconds} vs {now}");

    let run_id = body["run_id"].as_str().unwrap();
    let (_, events) = app.get(&format!("/runs/{run_id}/events")).await;
    let events = events["events"].as_array().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "tool_call",
            "tool_result",
            "message_delta",
            "run_completed"
        ]
    );
    assert_eq!(events[1]["data"]["name"], "current_time");
    assert_eq!(events[1]["data"]["arguments"], "{\"format\": \"unix\"}");
    assert_eq!(events[2]["data"]["id"], events[1]["data"]["id"]);
    assert_eq!(events[2]["data"]["is_error"], false);
    assert_eq!(events[2]["data"]["content"], seconds.to_string());

    let (_, run) = app.get(&format!("/runs/{run_id}")).await;
    assert_eq!(run["steps"], 2);
    let session = body["session_id"].as_str().unwrap();
    let (_, conversation) = app.get(&format!("/sessions/{session}")).await;
    let messages = conversation["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(
        messages[1]["tool_calls"][0]["function"]["name"],
        "current_time"
    );
    assert_eq!(
        messages[2]["tool_call_id"],
        messages[1]["tool_calls"][0]["id"]
    );

    // The conversation with tool messages in it goes back to the model.
    let (status, body) = app
        .post_agent(json!({"message": "thanks", "session_id": session}))
        .await;
    assert_eq!(
        (status, body["response"].as_str()),
        (StatusCode::OK, Some("echo: thanks"))
    );
}

async fn tool_errors_go_back_to_the_model(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (status, body) = app
        .post_agent(json!({"message": "tool:format_disk {}"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["response"],
        "tool result: error: unknown tool `format_disk`"
    );
    let (_, events) = app
        .get(&format!(
            "/runs/{}/events",
            body["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(events["events"][2]["event"], "tool_result");
    assert_eq!(events["events"][2]["data"]["is_error"], true);

    let (_, body) = app
        .post_agent(json!({"message": "tool:current_time {not json"}))
        .await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .starts_with("tool result: error: invalid arguments"),
        "{body}"
    );
}

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

async fn a_remote_model_is_called_over_http(kind: DbKind) {
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let app = spawn_app(
        kind,
        &[
            ("MODEL_ENDPOINT", &endpoint),
            ("AGENT_MODE", "production"),
            // What this test is about is the model; keys have their own.
            ("AUTH_MODE", "none"),
        ],
    )
    .await;
    let (_, ready) = app.get("/ready").await;
    assert_eq!(
        ready["checks"]["model"],
        json!({"status": "ok", "kind": "remote"})
    );
    let (status, body) = app.post_agent(json!({"message": "over the wire"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"], "echo: over the wire");
    assert_eq!(body["tokens_used"], 7);
    let session = body["session_id"].as_str().unwrap();

    let events = app
        .stream_agent(
            json!({"message": "tool:current_time", "session_id": session, "stream": true}),
        )
        .await;
    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(kinds[..3], ["run_started", "tool_call", "tool_result"]);
    let done = &events.last().unwrap().2;
    assert_eq!(events.last().unwrap().1, "run_completed");
    assert!(
        done["response"]
            .as_str()
            .unwrap()
            .starts_with("tool result: 20"),
        "{done}"
    );
    assert!(done["tokens_used"].as_i64().unwrap() > 0);
}

async fn upstream_errors_answer_502_and_keep_the_record(kind: DbKind) {
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let app = spawn_app(
        kind,
        &[("MODEL_ENDPOINT", &endpoint), ("MODEL_MAX_RETRIES", "0")],
    )
    .await;
    let (status, body) = app.post_agent(json!({"message": "fail:500"})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "model_error");
    let session = body["error"]["session_id"].as_str().unwrap();
    let run_id = body["error"]["run_id"].as_str().unwrap();

    let (_, run) = app.get(&format!("/runs/{run_id}")).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["error"]["code"], "model_error");
    let (_, conversation) = app.get(&format!("/sessions/{session}")).await;
    assert_eq!(
        conversation["messages"][0]["content"], "fail:500",
        "the user's message stays"
    );
    let (_, events) = app.get(&format!("/runs/{run_id}/events")).await;
    let last = events["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "run_failed");
    assert_eq!(last["data"]["error"]["code"], "model_error");

    // The session is free again and carries on.
    let (status, body) = app
        .post_agent(json!({"message": "better now", "session_id": session}))
        .await;
    assert_eq!(
        (status, body["response"].as_str()),
        (StatusCode::OK, Some("echo: better now"))
    );

    // Streaming clients get the failure as the last event.
    let events = app
        .stream_agent(json!({"message": "fail:503", "session_id": session, "stream": true}))
        .await;
    let (_, kind, data) = events.last().unwrap();
    assert_eq!(kind, "run_failed");
    assert_eq!(data["session_id"], session);
    assert_eq!(data["tokens_used"], 0);
}

async fn upstream_timeouts_answer_504(kind: DbKind) {
    let endpoint = spawn_mock_model(Duration::from_millis(1500)).await;
    let app = spawn_app(
        kind,
        &[
            ("MODEL_ENDPOINT", &endpoint),
            ("MODEL_TIMEOUT_SECONDS", "0.2"),
        ],
    )
    .await;
    let (status, body) = app.post_agent(json!({"message": "too slow"})).await;
    assert_error(status, &body, StatusCode::GATEWAY_TIMEOUT, "model_timeout");
    let (_, run) = app
        .get(&format!(
            "/runs/{}",
            body["error"]["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(run["status"], "failed");
}

/// The endpoint a person writes without its `/v1`: the server answers, but
/// not at `<base>/models`. Ready must not call that model `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_endpoint_whose_models_answers_404_is_not_ready() {
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let without_v1 = endpoint.trim_end_matches("/v1").to_string();
    let app = spawn_app(DbKind::Sqlite, &[("MODEL_ENDPOINT", &without_v1)]).await;
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["model"]["status"], "fail", "{ready}");
    let message = ready["checks"]["model"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("404 at {without_v1}/models"))
            && message.contains("MODEL_ENDPOINT")
            && message.contains("/v1"),
        "{message}"
    );
}

async fn an_unreachable_model_answers_502_and_fails_readiness(kind: DbKind) {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{closed}/v1");
    let app = spawn_app(
        kind,
        &[("MODEL_ENDPOINT", &endpoint), ("MODEL_MAX_RETRIES", "1")],
    )
    .await;
    let (status, body) = app.post_agent(json!({"message": "anyone?"})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "model_error");
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["status"], "not ready");
    assert_eq!(ready["checks"]["model"]["status"], "fail");
    assert_eq!(ready["checks"]["database"]["status"], "ok");
    let (status, _) = app.get("/health").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "liveness does not depend on the model"
    );
    // The orchestrator's probe: a model outage is every replica's, so this
    // replica stays in the Service, and says what is down.
    let (status, replica) = app.get("/ready/replica").await;
    assert_eq!(status, StatusCode::OK, "{replica}");
    assert_eq!(replica["status"], "ready");
    assert_eq!(replica["checks"]["model"]["status"], "fail", "{replica}");
}

async fn max_steps_bounds_the_loop(kind: DbKind) {
    let app = spawn_app(kind, &[("MAX_STEPS", "1")]).await;
    let (status, body) = app
        .post_agent(json!({"message": "tool:current_time"}))
        .await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "max_steps_exceeded");
    let (_, run) = app
        .get(&format!(
            "/runs/{}",
            body["error"]["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        (run["status"].as_str(), run["steps"].as_i64()),
        (Some("failed"), Some(1))
    );
}

async fn a_busy_session_answers_409_and_history_stays_whole(kind: DbKind) {
    let app = spawn_app(kind, &[("MOCK_MODEL_LATENCY_MS", "400")]).await;
    let (_, first) = app.post_agent(json!({"message": "start"})).await;
    let session = first["session_id"].as_str().unwrap().to_string();

    let attempts = (0..6).map(|i| {
        let body = json!({"message": format!("message {i}"), "session_id": session});
        let client = app.client.clone();
        let url = format!("{}/agent", app.base);
        tokio::spawn(async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        })
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut ok = 0;
    for result in results {
        let (status, body) = result.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {
                assert_eq!(body["error"]["code"], "session_busy", "{body}");
                assert_eq!(body["error"]["session_id"], session.as_str());
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok, 1, "exactly one concurrent run wins the session");

    let (_, conversation) = app.get(&format!("/sessions/{session}")).await;
    let roles: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant"],
        "no interleaving"
    );
    let (_, runs) = app.get(&format!("/sessions/{session}/runs")).await;
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        2,
        "refused runs leave no trace"
    );

    // While a run holds the session it cannot be deleted either.
    let slow = {
        let client = app.client.clone();
        let url = format!("{}/agent", app.base);
        let body = json!({"message": "slow", "session_id": session});
        tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let response = app
        .client
        .delete(format!("{}/sessions/{session}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
}

async fn bad_input_gets_clear_errors(kind: DbKind) {
    let app = spawn_app(kind, &[("MAX_BODY_BYTES", "2048")]).await;
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (
            b"{\"message\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (b"".to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        (
            b"not json at all".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            b"{\"message\": \"caf\xc3\x28\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
        ),
        (
            b"{}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"[\"hi\"]".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": 42}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": null}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": \"\"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": \"   \"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": \"a\\u0000b\"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": \"hi\", \"session_id\": 7}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            b"{\"message\": \"hi\", \"stream\": \"yes\"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            format!("{{\"message\": \"{}\"}}", "x".repeat(4096)).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let shown = String::from_utf8_lossy(&body)
            .chars()
            .take(60)
            .collect::<String>();
        let (got_status, got) = app.post_raw(body).await;
        assert_eq!(got_status, status, "{shown}: {got}");
        assert_eq!(got["error"]["code"], code, "{shown}: {got}");
    }

    // A body over the limit without a Content-Length (chunked) too.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024]))),
    );
    let response = app
        .client
        .post(format!("{}/agent", app.base))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The rest of that body was never read: the server says it closes the
    // connection, so the client's next request goes on a new one and works.
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );

    let (status, body) = app.get("/no/such/route").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let response = app
        .client
        .get(format!("{}/agent", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // Still serving, and nothing was recorded by the refused requests.
    let (status, body) = app.post_agent(json!({"message": "still here"})).await;
    assert_eq!(
        (status, body["response"].as_str()),
        (StatusCode::OK, Some("echo: still here"))
    );
}

async fn request_ids_are_returned(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let response = app
        .client
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let response = app
        .client
        .post(format!("{}/agent", app.base))
        .header("x-request-id", "trace-me-123")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-123");
}

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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = app.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Draining: not ready, no new runs, but the listener still answers.
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["server"]["status"], "fail");
    let (status, body) = app.post_agent(json!({"message": "too late"})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
    );
    let (status, _) = app.get("/health").await;
    assert_eq!(status, StatusCode::OK);

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
    let db = std::mem::replace(&mut app._db, TestDb::new(DbKind::Sqlite).await);
    let store = bulkhead_store::Store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    let runs = store.runs(&session).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status == "completed"), "{runs:?}");
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

    let db = std::mem::replace(&mut app._db, TestDb::new(DbKind::Sqlite).await);
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

    let store = bulkhead_store::Store::connect(&app._db.url, &Default::default())
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
            run_id: run,
            input: "tool:shell {}",
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

/// `tool:<name> <json>` through the agent loop: the answer, the run's
/// events, and the session's audit record of the call.
async fn call_tool(
    app: &TestApp,
    session: Option<&str>,
    tool: &str,
    arguments: Value,
) -> (Value, Value) {
    let (status, body) = app
        .post_agent(json!({"message": format!("tool:{tool} {arguments}"), "session_id": session}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let session = body["session_id"].as_str().unwrap();
    let (_, audit) = app.get(&format!("/sessions/{session}/audit")).await;
    let record = audit["tool_calls"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    (body, record)
}

/// The environment for a sandbox backend: the namespace default, or the
/// Docker Engine that `scripts/test` starts (each app with a scope of its
/// own, so that its start-up orphan sweep leaves other tests alone).
fn backend_env(backend: &str) -> Vec<(String, String)> {
    match backend {
        "docker" => vec![
            ("SANDBOX_BACKEND".into(), "docker".into()),
            (
                "SANDBOX_SCOPE".into(),
                format!("test-{}", uuid::Uuid::new_v4().simple()),
            ),
        ],
        _ => Vec::new(),
    }
}

async fn spawn_app_on(kind: DbKind, backend: &str) -> TestApp {
    let env = backend_env(backend);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_app(kind, &pairs).await
}

async fn sandboxed_tools_run_and_are_audited(kind: DbKind) {
    tools_run_and_are_audited(kind, "namespace").await
}

async fn docker_tools_run_and_are_audited(kind: DbKind) {
    tools_run_and_are_audited(kind, "docker").await
}

async fn tools_run_and_are_audited(kind: DbKind, backend: &str) {
    let mut app = spawn_app_on(kind, backend).await;
    let (body, record) = call_tool(&app, None, "shell", json!({"command": "echo hi; id -u"})).await;
    assert_eq!(
        body["response"],
        "tool result: exit code: 0\nstdout:\nhi\n1000\n"
    );
    let session = body["session_id"].as_str().unwrap().to_string();
    assert_eq!(record["tool"], "shell");
    assert_eq!(record["backend"], backend);
    assert_eq!(record["status"], "completed");
    assert_eq!(record["arguments"]["command"], "echo hi; id -u");
    assert_eq!(record["exit_code"], 0);
    assert_eq!(record["killed_reason"], Value::Null);
    assert_eq!(record["stdout"]["bytes"], 8);
    assert_eq!(record["stdout"]["truncated"], false);
    // sha256 of "hi\n1000\n", the whole output.
    assert_eq!(
        record["stdout"]["sha256"],
        "97fb486753ab6e44f54f457cf8a0202c5350639cc914ef86e370edff78a0c1eb"
    );
    assert_eq!(record["limits"]["memory_bytes"], 64 << 20);
    assert_eq!(record["limits"]["pids"], 32);
    assert!(record["finished_at"].is_string() && record["duration_ms"].is_number());
    assert_eq!(record["run_id"], body["run_id"]);

    // The run's events carry the same record.
    let (_, events) = app
        .get(&format!(
            "/runs/{}/events",
            body["run_id"].as_str().unwrap()
        ))
        .await;
    let events = events["events"].as_array().unwrap();
    assert_eq!(events[1]["event"], "tool_call");
    assert_eq!(events[1]["data"]["audit_id"], record["audit_id"]);
    assert_eq!(events[2]["data"]["execution"]["exit_code"], 0);
    assert_eq!(events[2]["data"]["execution"]["stdout_bytes"], 8);

    // The workspace persists across the session's runs.
    let (body, _) = call_tool(
        &app,
        Some(&session),
        "write_file",
        json!({"path": "notes/a.txt", "content": "remember"}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().contains("wrote 8 bytes"),
        "{body}"
    );
    let (body, _) = call_tool(
        &app,
        Some(&session),
        "read_file",
        json!({"path": "notes/a.txt"}),
    )
    .await;
    assert_eq!(body["response"], "tool result: remember");
    let (body, _) = call_tool(&app, Some(&session), "list_dir", json!({})).await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("\"name\":\"notes\""),
        "{body}"
    );
    let (body, _) = call_tool(
        &app,
        Some(&session),
        "shell",
        json!({"command": "cat notes/a.txt"}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().contains("remember"),
        "{body}"
    );

    // Another session sees none of it.
    let (body, _) = call_tool(&app, None, "read_file", json!({"path": "notes/a.txt"})).await;
    assert!(
        body["response"].as_str().unwrap().contains("error:"),
        "{body}"
    );

    let (_, audit) = app.get(&format!("/sessions/{session}/audit")).await;
    assert_eq!(audit["tool_calls"].as_array().unwrap().len(), 5);
    // Stopping destroys every sandbox (for docker: its containers).
    app.shut_down().await.unwrap();
}

async fn hostile_tool_calls_are_contained_through_the_agent_loop(kind: DbKind) {
    hostile_tool_calls_are_contained(kind, "namespace").await
}

async fn hostile_tool_calls_are_contained_in_docker(kind: DbKind) {
    hostile_tool_calls_are_contained(kind, "docker").await
}

async fn hostile_tool_calls_are_contained(kind: DbKind, backend: &str) {
    let mut app = spawn_app_on(kind, backend).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cases: Vec<(&str, Value, Option<&str>, &str)> = vec![
        (
            "shell",
            json!({"command": "python3 -c 'import os\nwhile True:\n  try: os.fork()\n  except OSError: pass'", "timeout_seconds": 1}),
            Some("timeout"),
            "stopped by the sandbox: timeout",
        ),
        (
            "shell",
            json!({"command": "python3 -c 'x = bytearray(512 << 20)'"}),
            Some("oom"),
            "stopped by the sandbox: oom",
        ),
        (
            "shell",
            json!({"command": "while :; do :; done"}),
            Some("timeout"),
            "stopped by the sandbox: timeout",
        ),
        (
            "shell",
            json!({"command": "yes"}),
            Some("output_limit"),
            "stdout truncated",
        ),
        (
            "shell",
            json!({"command": "dd if=/dev/zero of=/tmp/x bs=1M count=64"}),
            Some("disk"),
            "stopped by the sandbox: disk",
        ),
        (
            "shell",
            json!({"command": "dd if=/dev/zero of=big bs=1M count=64"}),
            Some("disk"),
            "stopped by the sandbox: disk",
        ),
        (
            "shell",
            json!({"command": format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"")}),
            None,
            "exit code: 1",
        ),
        (
            "shell",
            json!({"command": "getent hosts example.com"}),
            None,
            "exit code: 2",
        ),
        (
            "shell",
            json!({"command": "cat /etc/shadow /proc/1/environ; ls /run/secrets"}),
            None,
            "No such file",
        ),
        (
            "shell",
            json!({"command": "touch /etc/evil /usr/evil"}),
            None,
            "Read-only file system",
        ),
        (
            "shell",
            json!({"command": "unshare -r id; mount -t tmpfs x /tmp; su root -c id"}),
            None,
            "exit code: 1",
        ),
        (
            "shell",
            json!({"command": "kill -9 1; echo alive"}),
            None,
            "alive",
        ),
        (
            "read_file",
            json!({"path": "../../etc/passwd"}),
            None,
            "outside the workspace",
        ),
        (
            "read_file",
            json!({"path": "/etc/passwd"}),
            None,
            "outside the workspace",
        ),
        (
            "write_file",
            json!({"path": "../x", "content": "x"}),
            None,
            "outside the workspace",
        ),
        (
            "list_dir",
            json!({"path": "/"}),
            None,
            "outside the workspace",
        ),
    ];
    for (tool, arguments, killed, expected) in cases {
        let (body, record) = call_tool(&app, None, tool, arguments.clone()).await;
        let response = body["response"].as_str().unwrap();
        assert!(
            response.contains(expected),
            "{tool} {arguments}: {response}"
        );
        assert_eq!(
            record["killed_reason"].as_str(),
            killed,
            "{tool} {arguments}: {record}"
        );
        assert_eq!(record["status"], "completed", "{record}");
        assert!(
            response.len() < 12_000,
            "the model gets a capped answer: {}",
            response.len()
        );
    }
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "nothing reached the host's listener"
    );
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "still healthy: {ready}");

    // Symlinks pointing out of the workspace.
    let (body, _) = call_tool(
        &app,
        None,
        "shell",
        json!({"command": "ln -s /etc/passwd p"}),
    )
    .await;
    let session = body["session_id"].as_str().unwrap().to_string();
    let (body, _) = call_tool(&app, Some(&session), "read_file", json!({"path": "p"})).await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("resolves outside the workspace"),
        "{body}"
    );
    let (body, _) = call_tool(
        &app,
        Some(&session),
        "write_file",
        json!({"path": "p", "content": "x"}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().contains("symbolic link"),
        "{body}"
    );
    app.shut_down().await.unwrap();
}

async fn deleting_a_session_destroys_its_workspace(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let (body, _) = call_tool(
        &app,
        None,
        "write_file",
        json!({"path": "f.txt", "content": "x"}),
    )
    .await;
    let session = body["session_id"].as_str().unwrap();
    let workspace = app._db.dir.path().join("sandboxes").join(session);
    assert!(workspace.exists());
    let response = app
        .client
        .delete(format!("{}/sessions/{session}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(!workspace.exists(), "the workspace went with the session");
}

async fn without_isolation_tools_are_refused_and_not_ready(kind: DbKind) {
    let app = spawn_app(kind, &[("SANDBOX_HELPER", "/nonexistent/helper")]).await;
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["status"], "fail");
    let (body, record) = call_tool(
        &app,
        None,
        "shell",
        json!({"command": "echo should-not-run"}),
    )
    .await;
    let response = body["response"].as_str().unwrap();
    assert!(
        response.contains("sandbox unavailable") && response.contains("not run"),
        "{response}"
    );
    assert!(!response.contains("should-not-run\n"), "{response}");
    assert_eq!(record["status"], "refused");
    assert_eq!(record["exit_code"], Value::Null);
    // Tools that need no sandbox still work.
    let (body, _) = call_tool(&app, None, "current_time", json!({"format": "unix"})).await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .starts_with("tool result: 1"),
        "{body}"
    );
}

async fn http_fetch_reaches_allowed_hosts_only(kind: DbKind) {
    egress_is_allowlisted(kind, "namespace").await
}

async fn http_fetch_reaches_allowed_hosts_only_from_docker(kind: DbKind) {
    egress_is_allowlisted(kind, "docker").await
}

async fn egress_is_allowlisted(kind: DbKind, backend: &str) {
    let ip = bulkhead_testing::outside_address();
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let outside = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/hello",
            axum::routing::get(|| async { "hello from outside" })
                .post(|body: String| async move { format!("posted: {body}") }),
        );
        axum::serve(listener, app).await
    });
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let loopback_port = loopback.local_addr().unwrap().port();
    let allow = format!("{outside},localhost:{loopback_port}");
    let mut env = backend_env(backend);
    env.push(("SANDBOX_EGRESS_ALLOW".into(), allow));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut app = spawn_app(kind, &pairs).await;

    let (body, record) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": format!("http://{outside}/hello")}),
    )
    .await;
    let response = body["response"].as_str().unwrap();
    assert!(
        response.contains("HTTP 200 OK") && response.ends_with("hello from outside"),
        "{response}"
    );
    assert_eq!(record["status"], "completed");
    assert_eq!(record["backend"], backend);
    assert_eq!(record["egress_refusals"], json!([]), "{record}");

    let (body, _) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": format!("http://{outside}/hello"), "method": "POST", "body": "data"}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().ends_with("posted: data"),
        "{body}"
    );

    // Not on the list: refused before anything runs.
    let (body, record) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": "https://example.com/"}),
    )
    .await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("not in SANDBOX_EGRESS_ALLOW"),
        "{body}"
    );
    assert_eq!(record["status"], "refused");

    assert_eq!(record["egress_refusals"], Value::Null, "nothing ran");

    // On the list, but pointing at the host's loopback: the proxy refuses,
    // says why, and the refusal is on the call's record.
    let (body, record) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": format!("http://localhost:{loopback_port}/")}),
    )
    .await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains(&format!("localhost:{loopback_port} (")),
        "{body}"
    );
    let refusals = record["egress_refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 1, "{record}");
    assert_eq!(refusals[0]["host"], "localhost");
    assert_eq!(refusals[0]["port"], loopback_port);
    assert!(
        ["127.0.0.1", "::1"].contains(&refusals[0]["address"].as_str().unwrap())
            && refusals[0]["rule"]
                .as_str()
                .unwrap()
                .starts_with("loopback"),
        "{record}"
    );
    loopback.set_nonblocking(true).unwrap();
    assert!(
        loopback.accept().is_err(),
        "nothing reached the loopback listener"
    );

    // Shell commands have no network either way, only the proxy's socket.
    let (body, _) = call_tool(
        &app,
        None,
        "shell",
        json!({"command": format!("python3 -c \"import socket; socket.create_connection(('{ip}', {}), timeout=2)\"", outside.port())}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().contains("exit code: 1"),
        "{body}"
    );
    app.shut_down().await.unwrap();
}

on_both_databases!(
    a_task_flows_from_planner_to_executor_to_critic,
    tools_run_through_a_remote_sandboxd,
    readiness_checks_redis_when_configured,
    http_fetch_reaches_allowed_hosts_only,
    http_fetch_reaches_allowed_hosts_only_from_docker,
    sandboxed_tools_run_and_are_audited,
    docker_tools_run_and_are_audited,
    hostile_tool_calls_are_contained_through_the_agent_loop,
    hostile_tool_calls_are_contained_in_docker,
    deleting_a_session_destroys_its_workspace,
    without_isolation_tools_are_refused_and_not_ready,
    probes_answer,
    a_conversation_continues_with_its_history,
    sessions_runs_and_events_are_readable,
    unknown_and_malformed_ids_are_rejected,
    deleting_a_session_forgets_it,
    tools_are_called_and_recorded,
    tool_errors_go_back_to_the_model,
    streaming_sends_numbered_events_that_match_the_record,
    accept_header_asks_for_a_stream,
    streaming_can_be_turned_off,
    a_remote_model_is_called_over_http,
    upstream_errors_answer_502_and_keep_the_record,
    upstream_timeouts_answer_504,
    an_unreachable_model_answers_502_and_fails_readiness,
    max_steps_bounds_the_loop,
    a_busy_session_answers_409_and_history_stays_whole,
    bad_input_gets_clear_errors,
    request_ids_are_returned,
    shutdown_drains_runs_in_flight,
    shutdown_interrupts_runs_past_the_grace,
    a_stored_call_without_its_result_does_not_poison_the_session,
    a_client_that_leaves_does_not_lose_its_run,
    request_bodies_never_cause_a_server_error,
);

/// Any body at all: the answer is 200 or a 4xx with the error shape, never
/// a 5xx, and the server keeps serving.
async fn request_bodies_never_cause_a_server_error(kind: DbKind) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, TestRunner};

    let app = spawn_app(kind, &[("MAX_BODY_BYTES", "4096")]).await;
    let session = app.post_agent(json!({"message": "seed"})).await.1["session_id"]
        .as_str()
        .unwrap()
        .to_string();

    let json_leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from(session.clone())),
        Just(Value::from("8c1d1f1e-32fb-4c39-9d0a-6c3b1f0e7a11")),
    ];
    let json_value = json_leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::hash_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let field = prop_oneof![
        Just("message".to_string()),
        Just("session_id".to_string()),
        Just("stream".to_string()),
        ".{0,8}"
    ];
    let agent_like = prop::collection::vec((field, json_value.clone()), 0..4).prop_map(|fields| {
        serde_json::to_vec(&Value::Object(fields.into_iter().collect())).unwrap()
    });
    let bodies = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        agent_like,
        prop::collection::vec(any::<u8>(), 4000..5000),
    ];

    let mut runner = TestRunner::new(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::block_in_place(|| {
        runner.run(&bodies, |body| {
            let (status, value) = handle.block_on(app.post_raw(body.clone()));
            prop_assert!(!status.is_server_error(), "{status}: {value}");
            if status == StatusCode::OK {
                prop_assert!(value["response"].is_string(), "{value}");
            } else {
                prop_assert!(status.is_client_error(), "{status}: {value}");
                prop_assert!(value["error"]["code"].is_string(), "{value}");
                prop_assert!(value["error"]["message"].is_string(), "{value}");
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (status, _) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK);
}

/// A tool call whose audit record cannot be written does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_tool_call_does_not_run() {
    let app = spawn_app(DbKind::Sqlite, &[]).await;
    let (body, _) = call_tool(&app, None, "shell", json!({"command": "echo ready"})).await;
    let session = body["session_id"].as_str().unwrap().to_string();
    let workspace = app._db.dir.path().join("sandboxes").join(&session);
    // Break the audit trail under the running server.
    let database = app._db.dir.path().join("bulkhead.db");
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE tool_executions'); c.commit()",
        ])
        .arg(&database)
        .status()
        .unwrap();
    assert!(status.success());
    let (status, body) = app
        .post_agent(json!({
            "message": "tool:shell {\"command\": \"touch /workspace/ran\"}",
            "session_id": session,
        }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = body["response"].as_str().unwrap();
    assert!(
        response.contains("could not be recorded") && response.contains("not run"),
        "{response}"
    );
    assert!(
        workspace.exists() && !workspace.join("ran").exists(),
        "the command did not run"
    );
}

const SANDBOXD_TOKEN: &str = "api-test-sandboxd-token-0123456789";

/// sandboxd in-process on a loopback port, serving namespace sandboxes with
/// the given ceilings, as `bulkhead sandboxd` does.
async fn spawn_sandboxd(
    root: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> (u16, oneshot::Sender<()>, JoinHandle<()>) {
    let mut vars: std::collections::HashMap<String, String> = [
        ("SANDBOXD_TOKEN", SANDBOXD_TOKEN.to_string()),
        ("SANDBOX_ROOT", root.display().to_string()),
        ("SANDBOX_HELPER", sandbox_helper().display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (key, value) in env {
        vars.insert(key.to_string(), value.to_string());
    }
    let config = bulkhead_server::config::SandboxdConfig::from_env(&Environment::from_map(vars))
        .expect("valid sandboxd configuration");
    let factory = bulkhead_server::sandbox::sandboxd_factory(&config.sandbox).unwrap();
    let daemon = bulkhead_sandbox_remote::server::Daemon::new(
        &config.token,
        config.sandbox.limits.clone(),
        factory,
    );
    let idle = config.sandbox.idle;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        bulkhead_sandbox_remote::server::serve(listener, daemon, idle, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (port, stop, task)
}

/// The agent server holds no means to make a sandbox: sandboxd does, caps
/// the limits, and the tool calls are audited as usual.
async fn tools_run_through_a_remote_sandboxd(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let (port, stop, task) = spawn_sandboxd(
        dir.path(),
        0,
        &[("SANDBOX_PIDS", "16"), ("SANDBOX_TIMEOUT_SECONDS", "2")],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let scope = format!("api-{}", uuid::Uuid::new_v4().simple());
    let remote_env = [
        ("SANDBOX_BACKEND", "remote"),
        ("SANDBOX_REMOTE_URL", url.as_str()),
        ("SANDBOXD_TOKEN", SANDBOXD_TOKEN),
        ("SANDBOX_SCOPE", scope.as_str()),
        // Asks for more than sandboxd allows.
        ("SANDBOX_TIMEOUT_SECONDS", "600"),
        ("SANDBOX_HELPER", "/nonexistent/helper"),
    ];
    let mut app = spawn_app(kind, &remote_env).await;
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["backend"], "remote");

    let (body, record) = call_tool(&app, None, "shell", json!({"command": "echo hi; id -u"})).await;
    assert_eq!(
        body["response"],
        "tool result: exit code: 0\nstdout:\nhi\n1000\n"
    );
    let session = body["session_id"].as_str().unwrap().to_string();
    assert_eq!(record["backend"], "remote");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["limits"]["pids"], 16, "sandboxd's ceiling: {record}");
    assert_eq!(record["limits"]["timeout_ms"], 2000, "{record}");
    let (_, record) = call_tool(
        &app,
        Some(&session),
        "shell",
        json!({"command": "sleep 30"}),
    )
    .await;
    assert_eq!(record["killed_reason"], "timeout", "{record}");
    assert!(
        dir.path().join(&scope).exists(),
        "the sandbox lived on sandboxd's side, under the server's scope"
    );

    // sandboxd gone: tools are refused, readiness fails, liveness holds.
    let _ = stop.send(());
    task.await.unwrap();
    let (body, record) = call_tool(&app, Some(&session), "shell", json!({"command": "true"})).await;
    assert_eq!(record["status"], "refused", "{body}");
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["status"], "fail");
    assert!(
        !ready.to_string().contains(SANDBOXD_TOKEN),
        "the token never leaves: {ready}"
    );
    let (status, replica) = app.get("/ready/replica").await;
    assert_eq!(status, StatusCode::OK, "sandboxd is shared: {replica}");
    assert_eq!(replica["checks"]["sandbox"]["status"], "fail");
    assert_eq!(app.get("/health").await.0, StatusCode::OK);

    // Back again: the server recovers without a restart.
    let (_, stop, task) = spawn_sandboxd(dir.path(), port, &[]).await;
    let (body, record) = call_tool(
        &app,
        Some(&session),
        "shell",
        json!({"command": "echo back"}),
    )
    .await;
    assert_eq!(record["status"], "completed", "{body}");
    assert!(
        body["response"].as_str().unwrap().contains("back"),
        "{body}"
    );
    assert_eq!(app.get("/ready").await.0, StatusCode::OK);
    app.shut_down().await.unwrap();
    let _ = stop.send(());
    task.await.unwrap();
}

fn test_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("TEST_REDIS_URL is not set: run the suite with scripts/test, which installs and starts Redis")
    })
}

async fn readiness_checks_redis_when_configured(kind: DbKind) {
    let app = spawn_app(kind, &[("REDIS_URL", &test_redis_url())]).await;
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["redis"]["status"], "ok");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("redis://:s3cret-redis-canary@{closed}/0");
    let app = spawn_app(kind, &[("REDIS_URL", &url)]).await;
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["redis"]["status"], "fail");
    assert_eq!(ready["checks"]["database"]["status"], "ok");
    assert!(
        !ready.to_string().contains("s3cret-redis-canary"),
        "{ready}"
    );
    assert_eq!(app.get("/health").await.0, StatusCode::OK);

    // Without REDIS_URL there is no redis entry at all.
    let app = spawn_app(kind, &[]).await;
    let (_, ready) = app.get("/ready").await;
    assert!(ready["checks"].get("redis").is_none(), "{ready}");
}

/// Three servers in their roles: a task goes planner → executor (twice,
/// one workspace) → critic, and every hand-over is on the planner's record.
async fn a_task_flows_from_planner_to_executor_to_critic(kind: DbKind) {
    let executor = spawn_app(kind, &[("AGENT_ROLE", "executor")]).await;
    let critic = spawn_app(kind, &[("AGENT_ROLE", "critic")]).await;
    let planner = spawn_app(
        kind,
        &[
            ("AGENT_ROLE", "planner"),
            ("EXECUTOR_URL", &executor.base),
            ("CRITIC_URL", &critic.base),
        ],
    )
    .await;
    for (app, has_sandbox) in [(&planner, false), (&critic, false), (&executor, true)] {
        let (status, ready) = app.get("/ready").await;
        assert_eq!(status, StatusCode::OK, "{ready}");
        assert_eq!(
            ready["checks"].get("sandbox").is_some(),
            has_sandbox,
            "{ready}"
        );
    }

    let task = "say:tool:write_file {\"path\": \"out.txt\", \"content\": \"step one\"}\n\
                2. tool:read_file {\"path\": \"out.txt\"}";
    let (status, body) = planner.post_agent(json!({"message": task})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = body["response"].as_str().unwrap();
    assert!(
        response.starts_with(
            "Plan:\n1. tool:write_file {\"path\": \"out.txt\", \"content\": \"step one\"}\n\
             2. tool:read_file {\"path\": \"out.txt\"}\n\nResults:\n\
             1. tool result: wrote 8 bytes"
        ),
        "{response}"
    );
    assert!(
        response.contains("2. tool result: step one\n\nReview:\necho: Task:\nsay:tool:write_file"),
        "the executor's second step saw the first one's file, and the critic saw it all: {response}"
    );

    let (_, events) = planner
        .get(&format!(
            "/runs/{}/events",
            body["run_id"].as_str().unwrap()
        ))
        .await;
    let events = events["events"].as_array().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "message_delta",
            "plan",
            "delegated",
            "delegate_result",
            "delegated",
            "delegate_result",
            "delegated",
            "delegate_result",
            "run_completed"
        ],
        "{events:?}"
    );
    let first = &events[4]["data"];
    let second = &events[6]["data"];
    assert_eq!(first["role"], "executor");
    assert_eq!(
        first["session_id"], second["session_id"],
        "one executor session for the whole task"
    );
    assert_eq!(events[8]["data"]["role"], "critic");

    // The executor's own record: two audited tool calls in a sandbox.
    let executor_session = first["session_id"].as_str().unwrap();
    let (_, audit) = executor
        .get(&format!("/sessions/{executor_session}/audit"))
        .await;
    let calls = audit["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{audit}");
    assert!(
        calls
            .iter()
            .all(|c| c["backend"] == "namespace" && c["status"] == "completed")
    );
    // The tokens of all three are counted on the planner's run.
    assert!(
        body["tokens_used"].as_i64().unwrap()
            > first["tokens_used"].as_i64().unwrap()
                + events[8]["data"]["tokens_used"].as_i64().unwrap(),
        "{body}"
    );

    // A planner whose executor is gone fails clearly.
    drop(executor);
    let (status, body) = planner.post_agent(json!({"message": "say:one step"})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "delegate_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("executor"),
        "{body}"
    );
}

#[test]
fn roles_are_checked_at_start() {
    for (env, variable) in [
        (vec![("AGENT_ROLE", "boss")], "AGENT_ROLE"),
        (vec![("AGENT_ROLE", "planner")], "EXECUTOR_URL"),
        (
            vec![
                ("AGENT_ROLE", "planner"),
                ("EXECUTOR_URL", "http://executor:8000"),
            ],
            "CRITIC_URL",
        ),
        (
            vec![
                ("AGENT_ROLE", "planner"),
                ("EXECUTOR_URL", "executor:8000"),
                ("CRITIC_URL", "http://critic:8000"),
            ],
            "EXECUTOR_URL",
        ),
    ] {
        let error = Config::from_env(&Environment::from_pairs(env)).unwrap_err();
        assert_eq!(error.variable, variable, "{error}");
    }
}
