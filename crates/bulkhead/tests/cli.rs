//! The `bulkhead` binary as users run it: real processes, real signals,
//! real databases, logs read from stdout.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_testing::{DbKind, TestDb, on_both_databases, spawn_mock_model};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Process, bulkhead, client_with_key, create_key, get_json, serve};

#[test]
fn every_subcommand_has_help() {
    let dir = tempfile::tempdir().unwrap();
    let output = bulkhead(dir.path()).arg("--help").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for command in [
        "serve",
        "mock-model",
        "healthcheck",
        "migrate",
        "config",
        "chat",
    ] {
        assert!(
            text.contains(command),
            "{command} missing from --help: {text}"
        );
        let output = bulkhead(dir.path())
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{command} --help");
        assert!(
            String::from_utf8(output.stdout)
                .unwrap()
                .contains("Usage: bulkhead")
        );
    }
}

#[test]
fn config_prints_the_effective_values_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let output = bulkhead(dir.path())
        .arg("config")
        .env("OPENAI_API_KEY", "sk-canary-config-123456")
        .env(
            "DATABASE_URL",
            "postgres://bulkhead:hunter2hunter2@db:5432/bulkhead",
        )
        .env("TEMPERATURE", "0.2")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        !text.contains("sk-canary-config-123456") && !text.contains("hunter2"),
        "{text}"
    );
    assert!(
        text.contains("OPENAI_API_KEY") && text.contains("[redacted]"),
        "{text}"
    );
    assert!(
        text.contains("postgres://bulkhead:[redacted]@db:5432/bulkhead"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("TEMPERATURE")
            && l.contains("0.2")
            && l.contains("environment")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("MODEL_NAME")
            && l.contains("gpt-4o-mini")
            && l.contains("default")),
        "{text}"
    );

    let output = bulkhead(dir.path())
        .args(["config", "--json"])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["PORT"]["value"], 8000);
    assert_eq!(json["AGENT_MODE"]["value"], "development");
}

#[test]
fn invalid_configuration_fails_with_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("TEMPERATURE", "hot"),
        ("PORT", "99999"),
        ("AGENT_MODE", "staging"),
    ] {
        for subcommand in ["config", "serve"] {
            let output = bulkhead(dir.path())
                .arg(subcommand)
                .env(name, value)
                .output()
                .unwrap();
            assert_eq!(
                output.status.code(),
                Some(2),
                "{subcommand} with {name}={value}"
            );
            let stderr = String::from_utf8(output.stderr).unwrap();
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains(name), "{stderr}");
        }
    }
}

#[test]
fn production_refuses_to_start_without_a_model_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let output = bulkhead(dir.path())
        .arg("serve")
        .env("AGENT_MODE", "production")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("MODEL_ENDPOINT") && stderr.contains("production"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was started");
}

#[test]
fn healthcheck_reports_whether_the_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let status = bulkhead(dir.path())
        .arg("healthcheck")
        .env("PORT", closed.port().to_string())
        .output()
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(1));

    let (_server, url) = serve(dir.path(), &[]);
    let port = url.rsplit(':').next().unwrap();
    let status = bulkhead(dir.path())
        .arg("healthcheck")
        .env("PORT", port)
        .status()
        .unwrap();
    assert!(status.success());
    let status = bulkhead(dir.path())
        .args(["healthcheck", "--port", port])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn migrate_prepares_the_database(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let output = bulkhead(db.dir.path())
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("up to date"), "{text}");
    let store = bulkhead_store::Store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    assert!(
        store.session("none").await.unwrap().is_none(),
        "the schema is there"
    );
    store.close().await;
}

#[tokio::test]
async fn mock_model_serves_the_openai_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = bulkhead(dir.path());
    command.args(["mock-model", "--port", "0"]);
    let mut process = Process::spawn(command);
    let base = process.wait_for("the address", |line| {
        line.strip_prefix("mock model listening on ")
            .map(str::to_owned)
    });
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "bulkhead-mock");

    let body = json!({"model": "any", "messages": [{"role": "user", "content": "hi there"}]});
    let completion: Value = client
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "echo: hi there"
    );
    assert_eq!(completion["usage"]["total_tokens"], 5);

    let mut stream = body.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let text = client
        .post(format!("{base}/chat/completions"))
        .json(&stream)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"content\":\"echo: \""), "{text}");
    assert!(text.contains("\"total_tokens\":5"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let response = client
        .post(format!("{base}/chat/completions"))
        .json(&json!({"model": "any", "messages": [{"role": "user", "content": "fail:429"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);

    // A history OpenAI refuses, refused as OpenAI does.
    let orphan = json!({"model": "any", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]});
    let response = client
        .post(format!("{base}/chat/completions"))
        .json(&orphan)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let refusal: Value = response.json().await.unwrap();
    assert_eq!(refusal["error"]["type"], "invalid_request_error");
    assert_eq!(refusal["error"]["param"], "messages.[1].role");
    assert_eq!(refusal["error"]["code"], Value::Null);

    process.signal(Signal::SIGTERM);
    assert!(process.wait_exit(Duration::from_secs(5)).success());
}

async fn sigterm_drains_the_run_in_flight(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let (mut server, url) = serve(
        db.dir.path(),
        &[("DATABASE_URL", &db.url), ("MOCK_MODEL_LATENCY_MS", "1500")],
    );
    let client = reqwest::Client::new();
    let request = tokio::spawn({
        let client = client.clone();
        let url = format!("{url}/agent");
        async move {
            let response = client
                .post(url)
                .json(&json!({"message": "slow one"}))
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    });
    server.wait_for("the run to start", |line| {
        line.contains("run started").then_some(())
    });
    server.signal(Signal::SIGTERM);
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "echo: slow one");
    let exit = server.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", server.all_output());
    let logs = server.all_output();
    assert!(
        logs.contains("SIGTERM") && logs.contains("stopped"),
        "{logs}"
    );

    let store = bulkhead_store::Store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    let run = store
        .run(body["run_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, "completed");
    assert_eq!(run.output.as_deref(), Some("echo: slow one"));
    store.close().await;
}

/// A streamed `/agent` request read as it arrives.
struct Stream {
    response: reqwest::Response,
    text: String,
}

impl Stream {
    async fn open(url: &str, body: Value) -> Stream {
        let response = reqwest::Client::new()
            .post(format!("{url}/agent"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        Stream {
            response,
            text: String::new(),
        }
    }

    /// Reads until `what` has arrived; false if the stream ended first.
    async fn read_until(&mut self, what: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.text.contains(what) {
            let chunk = tokio::time::timeout_at(deadline.into(), self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no {what} in {}", self.text));
            match chunk {
                Ok(Some(bytes)) => self.text.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// The `data` of the first event of `kind` read so far.
    fn event(&self, kind: &str) -> Value {
        let mut lines = self.text.lines();
        while let Some(line) = lines.next() {
            if line == format!("event: {kind}") {
                let data = lines.find_map(|l| l.strip_prefix("data: ")).unwrap();
                return serde_json::from_str(data).unwrap();
            }
        }
        panic!("no {kind} event in {}", self.text)
    }
}

const SLOW_TOOL_CALL: &str = r#"tool:shell {"command": "sleep 30"}"#;

/// SIGTERM while a tool call runs, past the grace: the run ends interrupted
/// and the call gets a recorded result, so that the session, sent whole to a
/// strict model (the mock refuses a call without its result, as OpenAI
/// does) with every later message, still works after a restart.
async fn a_tool_call_cut_off_by_shutdown_does_not_poison_its_session(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("SHUTDOWN_GRACE_SECONDS", "1"),
    ];
    let (mut server, url) = serve(db.dir.path(), &env);
    let mut stream = Stream::open(&url, json!({"message": SLOW_TOOL_CALL, "stream": true})).await;
    assert!(stream.read_until("event: tool_call").await);
    let started = stream.event("run_started");
    let (session, run) = (
        started["session_id"].as_str().unwrap().to_string(),
        started["run_id"].as_str().unwrap().to_string(),
    );
    server.signal(Signal::SIGTERM);
    stream.read_until("event: run_failed").await;
    assert_eq!(
        stream.event("run_failed")["error"]["code"],
        "run_interrupted",
        "{}",
        stream.text
    );
    let result = stream.event("tool_result");
    assert_eq!(result["is_error"], true);
    assert_eq!(
        result["content"],
        "error: interrupted before it finished: the server shut down during the call"
    );
    assert_eq!(
        server.wait_exit(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        server.all_output()
    );

    let (_server, url) = serve(db.dir.path(), &env);
    assert_eq!(
        get_json(format!("{url}/runs/{run}")).await["status"],
        "interrupted"
    );
    let next = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .json(&json!({"message": "are you there?", "session_id": session}))
        .send()
        .await
        .unwrap();
    let (status, body) = (next.status(), next.json::<Value>().await.unwrap());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "echo: are you there?");

    let conversation = get_json(format!("{url}/sessions/{session}")).await;
    let messages = conversation["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "tool", "user", "assistant"],
        "{conversation}"
    );
    let call_id = &messages[1]["tool_calls"][0]["id"];
    assert_eq!(&messages[2]["tool_call_id"], call_id);
    assert_eq!(messages[2]["content"], result["content"]);
    let audit = get_json(format!("{url}/sessions/{session}/audit")).await;
    assert_eq!(audit["tool_calls"][0]["status"], "interrupted", "{audit}");
}

/// The same cut made by a crash (SIGKILL): nothing of the step was
/// committed, so the history has no call without its result, and the
/// restart closes the run and the call's audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_cut_off_by_a_crash_does_not_poison_its_session() {
    let db = TestDb::new(DbKind::Sqlite).await;
    // The model over HTTP, as a real endpoint is reached.
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("MODEL_ENDPOINT", endpoint.as_str()),
    ];
    let (mut server, url) = serve(db.dir.path(), &env);
    let mut stream = Stream::open(&url, json!({"message": SLOW_TOOL_CALL, "stream": true})).await;
    assert!(stream.read_until("event: tool_call").await);
    let started = stream.event("run_started");
    let (session, run) = (
        started["session_id"].as_str().unwrap().to_string(),
        started["run_id"].as_str().unwrap().to_string(),
    );
    // The call is on record (it is audited before it runs) when it is cut.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit = get_json(format!("{url}/sessions/{session}/audit")).await;
        if audit["tool_calls"][0]["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the call never started: {audit}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(5));

    let (_server, url) = serve(db.dir.path(), &env);
    let recovered = get_json(format!("{url}/runs/{run}")).await;
    assert_eq!(recovered["status"], "interrupted", "{recovered}");
    let next = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .json(&json!({"message": "are you there?", "session_id": session}))
        .send()
        .await
        .unwrap();
    let (status, body) = (next.status(), next.json::<Value>().await.unwrap());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "echo: are you there?");
    let audit = get_json(format!("{url}/sessions/{session}/audit")).await;
    assert_eq!(audit["tool_calls"][0]["status"], "interrupted", "{audit}");
    assert_eq!(
        audit["tool_calls"][0]["error"], "the server stopped during the call",
        "{audit}"
    );
}

on_both_databases!(
    migrate_prepares_the_database,
    sigterm_drains_the_run_in_flight,
    a_tool_call_cut_off_by_shutdown_does_not_poison_its_session,
);

const CANARY: &str = "sk-canary-7f3a9c2e5b1d4086a2c4e6f8";
const ADMIN_CANARY: &str = "admin-canary-0b9d8e7f6a5c4b3a2918";

/// An upstream that checks the key, and quotes it back in its 401 like
/// OpenAI does, to prove Bulkhead never passes upstream text on verbatim.
async fn spawn_key_checking_upstream() -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let record = Arc::clone(&record);
            async move {
                let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                record.lock().unwrap().push(auth.clone());
                if auth != format!("Bearer {CANARY}") || body.contains("leak") {
                    let message = format!("Incorrect API key provided: {CANARY}. You can find your API key at ...");
                    return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"message": message}}))).into_response();
                }
                axum::Json(json!({
                    "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "authorised"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                }))
                .into_response()
            }
        }),
    )
    .route("/v1/models", axum::routing::get(|| async { axum::Json(json!({"data": []})) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1"), seen)
}

async fn exercise_and_collect(url: &str, key: &str) -> String {
    let client = client_with_key(key);
    let mut seen = String::new();
    // A key that is wrong by one character is refused without being
    // quoted back.
    let mut wrong = key.to_string();
    wrong.pop();
    wrong.push(if key.ends_with('0') { '1' } else { '0' });
    let refused = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .header("x-api-key", &wrong)
        .json(&json!({"message": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    seen.push_str(&refused.text().await.unwrap());
    let ok = client
        .post(format!("{url}/agent"))
        .json(&json!({"message": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok: Value = ok.json().await.unwrap();
    assert_eq!(
        ok["response"], "authorised",
        "the key from the secret reached the model"
    );
    seen.push_str(&ok.to_string());
    let session = ok["session_id"].as_str().unwrap();
    let leak = client
        .post(format!("{url}/agent"))
        .json(&json!({"message": "please leak", "session_id": session}))
        .send()
        .await
        .unwrap();
    assert_eq!(leak.status(), 502);
    seen.push_str(&leak.text().await.unwrap());
    let stream = client
        .post(format!("{url}/agent"))
        .json(&json!({"message": "leak via stream", "session_id": session, "stream": true}))
        .send()
        .await
        .unwrap();
    seen.push_str(&stream.text().await.unwrap());
    for path in [
        "/ready".to_string(),
        "/health".to_string(),
        format!("/sessions/{session}"),
        format!("/sessions/{session}/runs"),
        format!("/runs/{}/events", ok["run_id"].as_str().unwrap()),
        "/nope".to_string(),
    ] {
        seen.push_str(
            &client
                .get(format!("{url}{path}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    for (_, runs) in [(
        (),
        client
            .get(format!("{url}/sessions/{session}/runs"))
            .send()
            .await
            .unwrap(),
    )] {
        let runs: Value = runs.json().await.unwrap();
        for run in runs["runs"].as_array().unwrap() {
            let events = client
                .get(format!(
                    "{url}/runs/{}/events",
                    run["run_id"].as_str().unwrap()
                ))
                .send()
                .await
                .unwrap();
            seen.push_str(&events.text().await.unwrap());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_appears_in_no_log_error_or_response() {
    let (endpoint, upstream_seen) = spawn_key_checking_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai_api_key");
    std::fs::write(&key_file, format!("{CANARY}\n")).unwrap();
    let secrets_dir = dir.path().join("secrets");
    std::fs::create_dir(&secrets_dir).unwrap();
    std::fs::write(secrets_dir.join("openai_api_key"), CANARY).unwrap();

    // From OPENAI_API_KEY_FILE, then from the secrets folder.
    let key_path = key_file.display().to_string();
    let secrets_path = secrets_dir.display().to_string();
    let variants: [Vec<(&str, &str)>; 2] = [
        vec![("OPENAI_API_KEY_FILE", &key_path)],
        vec![("SECRETS_DIR", &secrets_path)],
    ];
    for variant in variants {
        let mut env = vec![
            ("MODEL_ENDPOINT", endpoint.as_str()),
            ("AGENT_MODE", "production"),
            ("LOG_LEVEL", "trace"),
            ("MODEL_MAX_RETRIES", "0"),
        ];
        env.extend(variant.iter().copied());
        env.push(("ADMIN_TOKEN", ADMIN_CANARY));
        let bulkhead_key = create_key(dir.path(), &env, &["--name", "leak-test"]);
        let (mut server, url) = serve(dir.path(), &env);
        let responses = exercise_and_collect(&url, &bulkhead_key).await;
        let mut config = bulkhead(dir.path());
        config.arg("config");
        for (key, value) in &env {
            config.env(key, value);
        }
        let config = config.output().unwrap();
        assert!(config.status.success());
        server.signal(Signal::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(10)).success());
        let logs = server.all_output();
        assert!(logs.lines().count() > 20, "trace logging is on: {logs}");
        for (what, text) in [
            ("responses", responses),
            ("logs", logs),
            ("config", String::from_utf8(config.stdout).unwrap()),
        ] {
            assert!(
                !text.contains(CANARY),
                "the key leaked into the {what}: {text}"
            );
            assert!(
                !text.contains(&CANARY[3..15]),
                "part of the key leaked into the {what}: {text}"
            );
            let secret_part = bulkhead_key.rsplit('_').next().unwrap();
            assert!(
                !text.contains(secret_part) && !text.contains(&secret_part[..12]),
                "the Bulkhead API key leaked into the {what}: {text}"
            );
            assert!(
                !text.contains(ADMIN_CANARY),
                "the admin token leaked into the {what}: {text}"
            );
        }
    }
    let seen = upstream_seen.lock().unwrap();
    assert!(
        seen.iter().all(|auth| auth == &format!("Bearer {CANARY}")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_carrying_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = serve(dir.path(), &[("AGENT_MODE", "development")]);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{url}/agent"))
        .header("x-request-id", "req-under-test-42")
        .json(&json!({"message": "log me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-under-test-42");
    server.signal(Signal::SIGINT);
    assert!(
        server.wait_exit(Duration::from_secs(10)).success(),
        "SIGINT also stops cleanly"
    );
    let lines = server.stdout.lock().unwrap().clone();
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "WARN"
                && e["message"].as_str().unwrap_or("").contains("MOCK MODEL")),
        "the mock model is announced loudly"
    );
    let tagged: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["request_id"] == "req-under-test-42"))
        })
        .collect();
    let messages: Vec<&str> = tagged
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    for expected in [
        "run started",
        "run completed",
        "finished processing request",
    ] {
        assert!(
            messages.contains(&expected),
            "{expected} not tagged with the request id: {messages:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_database_is_created_beside_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = spawn_mock_model(Duration::ZERO).await;
    let (mut server, url) = serve(dir.path(), &[("MODEL_ENDPOINT", &endpoint)]);
    let body: Value = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .json(&json!({"message": "persist me"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["response"], "echo: persist me");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(
        dir.path().join("data/bulkhead.db").exists(),
        "sqlite://data/bulkhead.db, folder created"
    );

    // A restart on the same file continues the conversation.
    let (_server, url) = serve(dir.path(), &[("MODEL_ENDPOINT", &endpoint)]);
    let session = body["session_id"].as_str().unwrap();
    let next: Value = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .json(&json!({"message": "still here", "session_id": session}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next["session_id"], session);
    assert_eq!(next["response"], "echo: still here");
}

#[test]
fn sandbox_exec_runs_one_command_and_mirrors_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let sandboxes = dir.path().join("sandboxes");
    let output = bulkhead(dir.path())
        .args([
            "sandbox",
            "exec",
            "--json",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; id -u; exit 7",
        ])
        .env("SANDBOX_ROOT", &sandboxes)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let record: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record["exit_code"], 7);
    assert_eq!(record["signal"], Value::Null);
    assert_eq!(record["killed_reason"], Value::Null);
    assert_eq!(record["stdout"]["text"], "out\n1000\n");
    assert_eq!(record["stderr"]["text"], "err\n");
    assert_eq!(record["truncated"], false);
    assert_eq!(record["backend"], "namespace");
    assert!(record["duration_ms"].is_u64());
    assert_eq!(record["limits"]["pids"], 128);

    let output = bulkhead(dir.path())
        .args([
            "sandbox",
            "exec",
            "--",
            "sh",
            "-c",
            "echo hello; echo oops >&2",
        ])
        .env("SANDBOX_ROOT", &sandboxes)
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "hello\n");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("oops\n") && stderr.contains("[sandbox namespace: exit 0"),
        "{stderr}"
    );

    let output = bulkhead(dir.path())
        .args(["sandbox", "exec", "--json", "--", "sleep", "30"])
        .env("SANDBOX_ROOT", &sandboxes)
        .env("SANDBOX_TIMEOUT_SECONDS", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(128 + 9));
    let record: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record["killed_reason"], "timeout");
    assert_eq!(record["signal"], 9);
    // Each exec's sandbox is removed afterwards.
    let left: Vec<_> = std::fs::read_dir(&sandboxes)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != ".state")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn sandbox_exec_runs_on_the_docker_backend_too() {
    let dir = tempfile::tempdir().unwrap();
    let output = bulkhead(dir.path())
        .args([
            "sandbox",
            "exec",
            "--backend",
            "docker",
            "--json",
            "--",
            "sh",
            "-c",
            "id -u; exit 4",
        ])
        .env(
            "SANDBOX_IMAGE",
            std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into()),
        )
        .env("SANDBOX_SCOPE", format!("cli-test-{}", std::process::id()))
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let record: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record["backend"], "docker");
    assert_eq!(record["stdout"]["text"], "1000\n");
    let output = bulkhead(dir.path())
        .args(["sandbox", "exec", "--backend", "chroot", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown backend"));
}
