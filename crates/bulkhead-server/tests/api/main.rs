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

mod agents;
mod approvals;
mod containment;
mod conversation;
mod mcp;
mod model;
mod shutdown;
mod streaming;
mod team;
mod tools;

struct TestApp {
    base: String,
    client: reqwest::Client,
    db: Option<TestDb>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

async fn spawn_app(kind: DbKind, env: &[(&str, &str)]) -> TestApp {
    start_on(TestDb::new(kind).await, env).await
}

/// A server on `db`, which may hold what an earlier server recorded.
async fn start_on(db: TestDb, env: &[(&str, &str)]) -> TestApp {
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
        db: Some(db),
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

    /// Stops the server and starts another on the same database.
    async fn restart(mut self, env: &[(&str, &str)]) -> TestApp {
        self.shut_down().await.unwrap();
        start_on(self.db.take().unwrap(), env).await
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
