//! Tool calls through the agent loop: recorded before they run, audited after, in each backend.

use super::*;

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
    let workspace = app
        .db
        .as_ref()
        .unwrap()
        .dir
        .path()
        .join("sandboxes")
        .join(session);
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

/// A tool call whose audit record cannot be written does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_tool_call_does_not_run() {
    let app = spawn_app(DbKind::Sqlite, &[]).await;
    let (body, _) = call_tool(&app, None, "shell", json!({"command": "echo ready"})).await;
    let session = body["session_id"].as_str().unwrap().to_string();
    let workspace = app
        .db
        .as_ref()
        .unwrap()
        .dir
        .path()
        .join("sandboxes")
        .join(&session);
    // Break the audit trail under the running server.
    let database = app.db.as_ref().unwrap().dir.path().join("bulkhead.db");
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

on_both_databases!(
    sandboxed_tools_run_and_are_audited,
    docker_tools_run_and_are_audited,
    deleting_a_session_destroys_its_workspace,
    without_isolation_tools_are_refused_and_not_ready,
    tools_are_called_and_recorded,
    tool_errors_go_back_to_the_model,
);
