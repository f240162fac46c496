//! Human approval of tool calls: an `ask` call parks its run, the pause
//! survives a restart, one decision lets it go on, the expiry denies, and
//! the audit says who decided what and when.

use super::*;

const CAREFUL: &str = r#"
agents:
  - id: careful
    tools: [current_time]
    approval:
      default: auto
      tools:
        current_time: ask
  - id: strict
    tools: [current_time]
    approval:
      default: deny
"#;

fn careful_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("agents.yaml");
    std::fs::write(&path, CAREFUL).unwrap();
    path.display().to_string()
}

impl TestApp {
    async fn decide(&self, run_id: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}/runs/{run_id}/approvals", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The session's audit record of its one call.
    async fn only_call(&self, session: &str) -> Value {
        let (_, audit) = self.get(&format!("/sessions/{session}/audit")).await;
        let calls = audit["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{audit}");
        calls[0].clone()
    }
}

async fn an_approved_call_runs_after_a_restart(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = careful_file(&dir);
    let env = [("AGENTS_FILE", file.as_str())];
    let app = spawn_app(kind, &env).await;
    let (status, paused) = app
        .post_agent(
            json!({"message": "tool:current_time {\"format\": \"unix\"}", "agent": "careful"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{paused}");
    assert_eq!(paused["status"], "awaiting_approval");
    assert_eq!(paused["approval"]["tool"], "current_time");
    assert_eq!(paused["approval"]["arguments"], "{\"format\": \"unix\"}");
    let run_id = paused["run_id"].as_str().unwrap().to_string();
    let session = paused["session_id"].as_str().unwrap().to_string();
    let call_id = paused["approval"]["call_id"].as_str().unwrap().to_string();
    // Nothing ran; the session is held.
    let call = app.only_call(&session).await;
    assert_eq!(call["status"], "awaiting_approval");
    assert!(call["approval"]["decision"].is_null(), "{call}");
    let (status, busy) = app
        .post_agent(json!({"message": "hello", "session_id": session}))
        .await;
    assert_error(status, &busy, StatusCode::CONFLICT, "session_busy");

    // The pause outlives the server.
    let app = app.restart(&env).await;
    let (_, run) = app.get(&format!("/runs/{run_id}")).await;
    assert_eq!(run["status"], "awaiting_approval", "{run}");
    assert_eq!(run["approval"]["call_id"], call_id.as_str());

    let (status, wrong) = app
        .decide(
            &run_id,
            json!({"call_id": "call_other", "decision": "approve"}),
        )
        .await;
    assert_error(
        status,
        &wrong,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_call_id",
    );
    assert_eq!(wrong["error"]["awaiting_call_id"], call_id.as_str());
    let (status, done) = app
        .decide(
            &run_id,
            json!({"call_id": call_id, "decision": "approve", "comment": "fine"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["run_id"], run_id.as_str());
    let seconds: i64 = done["response"]
        .as_str()
        .unwrap()
        .strip_prefix("tool result: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(seconds > 1_700_000_000, "{done}");
    let call = app.only_call(&session).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["approval"]["decision"], "approve");
    assert_eq!(call["approval"]["decided_by"], "anonymous");
    assert_eq!(call["approval"]["comment"], "fine");
    assert!(call["approval"]["decided_at"].is_string(), "{call}");
    assert!(call["stdout"]["sha256"].is_string(), "{call}");

    // Decided once: the run waits for nothing now.
    let (status, again) = app
        .decide(&run_id, json!({"call_id": call_id, "decision": "deny"}))
        .await;
    assert_error(
        status,
        &again,
        StatusCode::CONFLICT,
        "not_awaiting_approval",
    );
    // The session is free again.
    let (status, _) = app
        .post_agent(json!({"message": "hello", "session_id": session}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_denied_call_tells_the_model_and_is_audited(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = careful_file(&dir);
    let app = spawn_app(kind, &[("AGENTS_FILE", file.as_str())]).await;
    let (_, paused) = app
        .post_agent(json!({"message": "tool:current_time {}", "agent": "careful"}))
        .await;
    let run_id = paused["run_id"].as_str().unwrap();
    let (status, done) = app
        .decide(
            run_id,
            json!({"call_id": paused["approval"]["call_id"], "decision": "deny", "comment": "not now"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(
        done["response"],
        "tool result: error: not run: denied by a person (they said: not now)"
    );
    let call = app.only_call(paused["session_id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "denied", "{call}");
    assert_eq!(call["approval"]["decision"], "deny");
    assert_eq!(call["approval"]["comment"], "not now");

    // Refusals of the request itself.
    let (status, body) = app
        .decide(run_id, json!({"call_id": "x", "decision": "maybe"}))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    let (status, body) = app.decide(run_id, json!({"decision": "approve"})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    let (status, body) = app
        .decide(
            "01900000-0000-7000-8000-000000000009",
            json!({"call_id": "x", "decision": "approve"}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "run_not_found");
}

async fn an_unanswered_call_expires_as_denied(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = careful_file(&dir);
    let app = spawn_app(
        kind,
        &[
            ("AGENTS_FILE", file.as_str()),
            ("APPROVAL_TIMEOUT_SECONDS", "1"),
        ],
    )
    .await;
    let (status, paused) = app
        .post_agent(json!({"message": "tool:current_time {}", "agent": "careful"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{paused}");
    let run_id = paused["run_id"].as_str().unwrap();
    let mut run = Value::Null;
    for _ in 0..100 {
        run = app.get(&format!("/runs/{run_id}")).await.1;
        if run["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        run["output"],
        "tool result: error: not run: the request for a person's approval expired without an answer"
    );
    let call = app.only_call(paused["session_id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "denied", "{call}");
    assert_eq!(call["approval"]["decision"], "expired");
    assert_eq!(call["approval"]["decided_by"], "expiry");
}

/// A streaming client sees the pause (the stream ends on
/// `approval_requested`), and the decision's own stream carries the run on
/// with the next event ids; the run's record has them all, in order.
async fn streams_show_the_pause_and_the_resumption(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = careful_file(&dir);
    let app = spawn_app(kind, &[("AGENTS_FILE", file.as_str())]).await;
    let paused = app
        .stream_agent(
            json!({"message": "tool:current_time {}", "agent": "careful", "stream": true}),
        )
        .await;
    let kinds: Vec<&str> = paused.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(kinds, ["run_started", "tool_call", "approval_requested"]);
    let request = &paused[2].2;
    let run_id = request["run_id"].as_str().unwrap();
    assert_eq!(request["tool"], "current_time");
    let response = app
        .client
        .post(format!("{}/runs/{run_id}/approvals", app.base))
        .json(&json!({"call_id": request["call_id"], "decision": "approve", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let resumed = collect_events(response).await;
    let kinds: Vec<&str> = resumed.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"approval_decided"), "{kinds:?}");
    assert_eq!(kinds.get(1), Some(&"tool_result"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"run_completed"), "{kinds:?}");
    let ids: Vec<i64> = paused
        .iter()
        .chain(&resumed)
        .map(|(id, _, _)| *id)
        .collect();
    let expected: Vec<i64> = (1..=ids.len() as i64).collect();
    assert_eq!(ids, expected);
    let (_, recorded) = app.get(&format!("/runs/{run_id}/events")).await;
    let recorded: Vec<i64> = recorded["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(recorded, expected);
}

/// `deny`: the tool is not offered, and a call to it anyway is refused and
/// recorded as refused.
async fn a_denied_tool_is_refused_by_policy(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = careful_file(&dir);
    let app = spawn_app(kind, &[("AGENTS_FILE", file.as_str())]).await;
    let (_, agent) = app.get("/agents/strict").await;
    assert_eq!(agent["tools"], json!([]));
    assert_eq!(agent["approval"]["default"], "deny");
    let (status, body) = app
        .post_agent(json!({"message": "tool:current_time {}", "agent": "strict"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["response"],
        "tool result: error: the tool `current_time` is denied by this agent's policy"
    );
    let call = app.only_call(body["session_id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "refused", "{call}");
}

/// A run queued behind a paused one (LangGraph's `enqueue`) is stored, not
/// held in memory: it outlives a restart and starts once the paused run,
/// decided on the new process, has ended.
async fn a_queued_run_outlives_a_restart_and_starts_when_its_thread_frees(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = careful_file(&dir);
    let env = [("AGENTS_FILE", file.as_str())];
    let app = spawn_app(kind, &env).await;
    let post = |app: &TestApp, path: String, body: Value| {
        let request = app.client.post(format!("{}{path}", app.base)).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, thread) = post(&app, "/threads".into(), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{thread}");
    let thread = thread["thread_id"].as_str().unwrap().to_string();
    let message = |text: &str| json!({"messages": [{"role": "user", "content": text}]});
    let (status, paused) = post(
        &app,
        format!("/threads/{thread}/runs/wait"),
        json!({"assistant_id": "careful", "input": message("tool:current_time {}")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    let call_id = paused["__interrupt__"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, queued) = post(
        &app,
        format!("/threads/{thread}/runs"),
        json!({"assistant_id": "careful", "input": message("after the pause")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{queued}");
    assert_eq!(queued["status"], "pending");
    let queued_id = queued["run_id"].as_str().unwrap().to_string();

    let app = app.restart(&env).await;
    let (_, run) = app
        .get(&format!("/threads/{thread}/runs/{queued_id}"))
        .await;
    assert_eq!(run["status"], "pending", "{run}");
    let (_, runs) = app.get(&format!("/sessions/{thread}/runs")).await;
    let paused_id = runs["runs"][0]["run_id"].as_str().unwrap().to_string();
    let (status, done) = app
        .decide(
            &paused_id,
            json!({"call_id": call_id, "decision": "approve"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");

    let mut status = Value::Null;
    for _ in 0..100 {
        let (_, run) = app
            .get(&format!("/threads/{thread}/runs/{queued_id}"))
            .await;
        status = run["status"].clone();
        if status == "success" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "success");
    let (_, session) = app.get(&format!("/sessions/{thread}")).await;
    let said: Vec<&str> = session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant" && m["tool_calls"].is_null())
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(said.last(), Some(&"echo: after the pause"), "{session}");
}

on_both_databases!(
    a_queued_run_outlives_a_restart_and_starts_when_its_thread_frees,
    an_approved_call_runs_after_a_restart,
    a_denied_call_tells_the_model_and_is_audited,
    an_unanswered_call_expires_as_denied,
    streams_show_the_pause_and_the_resumption,
    a_denied_tool_is_refused_by_policy,
);
