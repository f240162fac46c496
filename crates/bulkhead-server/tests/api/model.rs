//! The model over HTTP: its answers, its failures and timeouts, and readiness that reflects it.

use super::*;

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

on_both_databases!(
    a_remote_model_is_called_over_http,
    upstream_errors_answer_502_and_keep_the_record,
    upstream_timeouts_answer_504,
    an_unreachable_model_answers_502_and_fails_readiness,
    max_steps_bounds_the_loop,
);
