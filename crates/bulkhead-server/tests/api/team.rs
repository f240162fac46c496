//! A planner, an executor and a critic; Redis in readiness; roles checked at start.

use super::*;

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
    let mut executor = executor;
    executor.shut_down().await.unwrap();
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

on_both_databases!(
    a_task_flows_from_planner_to_executor_to_critic,
    readiness_checks_redis_when_configured,
);
