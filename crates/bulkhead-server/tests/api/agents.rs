//! Agents from `AGENTS_FILE`: each its prompt, model endpoint and tools; a
//! session stays with its agent; `GET /agents` shows no secret.

use super::*;

/// Writes an agents file into a folder the caller keeps.
fn agents_file(dir: &tempfile::TempDir, yaml: &str) -> String {
    let path = dir.path().join("agents.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

async fn two_agents_keep_their_own_prompt_model_and_tools(kind: DbKind) {
    let alpha_endpoint = spawn_mock_model(Duration::ZERO).await;
    let beta_endpoint = spawn_mock_model(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let file = agents_file(
        &dir,
        &format!(
            r#"
agents:
  - id: alpha
    name: Alpha
    description: Tells the time
    system_prompt: You are Alpha.
    model:
      endpoint: {alpha_endpoint}
      name: alpha-model
      api_key_secret: ALPHA_KEY
      temperature: 0.1
    tools: [current_time]
    max_steps: 3
  - id: beta
    system_prompt: |
      You are Beta.
    model:
      endpoint: {beta_endpoint}
      name: beta-model
    tools: []
"#
        ),
    );
    let app = spawn_app(
        kind,
        &[
            ("AGENTS_FILE", &file),
            ("ALPHA_KEY", "sk-alpha-very-secret-1234"),
        ],
    )
    .await;
    let port = |endpoint: &str| {
        endpoint
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_string()
    };

    // Each agent answers through its own endpoint, model and prompt.
    let (status, alpha) = app
        .post_agent(json!({"message": "whoami", "agent": "alpha"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{alpha}");
    assert_eq!(
        alpha["response"],
        format!(
            "model: alpha-model; endpoint: {}; system: You are Alpha.",
            port(&alpha_endpoint)
        )
    );
    let (_, beta) = app
        .post_agent(json!({"message": "whoami", "agent": "beta"}))
        .await;
    assert_eq!(
        beta["response"],
        format!(
            "model: beta-model; endpoint: {}; system: You are Beta.\n",
            port(&beta_endpoint)
        )
    );
    // No `default` in the file: a request naming no agent gets the first.
    let (_, unnamed) = app.post_agent(json!({"message": "whoami"})).await;
    assert!(
        unnamed["response"]
            .as_str()
            .unwrap()
            .starts_with("model: alpha-model"),
        "{unnamed}"
    );

    // A session stays with its agent: continued without naming one, it is
    // still alpha's; naming another is refused.
    let alpha_session = alpha["session_id"].as_str().unwrap();
    let (_, again) = app
        .post_agent(json!({"message": "whoami", "session_id": alpha_session}))
        .await;
    assert!(
        again["response"]
            .as_str()
            .unwrap()
            .ends_with("system: You are Alpha."),
        "{again}"
    );
    let (status, refused) = app
        .post_agent(json!({"message": "whoami", "session_id": alpha_session, "agent": "beta"}))
        .await;
    assert_error(status, &refused, StatusCode::CONFLICT, "wrong_agent");
    assert_eq!(refused["error"]["agent"], "alpha");
    let (_, session) = app.get(&format!("/sessions/{alpha_session}")).await;
    assert_eq!(session["agent"], "alpha");

    // Tools: alpha has current_time, beta has none.
    let (_, timed) = app
        .post_agent(json!({"message": "tool:current_time {}", "agent": "alpha"}))
        .await;
    assert!(
        timed["response"]
            .as_str()
            .unwrap()
            .starts_with("tool result: 20"),
        "{timed}"
    );
    let (_, untooled) = app
        .post_agent(json!({"message": "tool:current_time {}", "agent": "beta"}))
        .await;
    assert_eq!(
        untooled["response"],
        "tool result: error: unknown tool `current_time`"
    );

    // What the agents are, with no secret in it.
    let response = app
        .client
        .get(format!("{}/agents", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(!text.contains("sk-alpha-very-secret-1234"), "{text}");
    let agents: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "beta"]);
    assert_eq!(agents["agents"][0]["default"], true);
    assert_eq!(agents["agents"][0]["tools"], json!(["current_time"]));
    assert_eq!(agents["agents"][0]["model"]["name"], "alpha-model");
    assert_eq!(agents["agents"][0]["max_steps"], 3);
    let (status, beta) = app.get("/agents/beta").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(beta["name"], "beta");
    assert_eq!(beta["tools"], json!([]));
    let (status, missing) = app.get("/agents/gamma").await;
    assert_error(status, &missing, StatusCode::NOT_FOUND, "agent_not_found");
    let (status, missing) = app
        .post_agent(json!({"message": "hi", "agent": "gamma"}))
        .await;
    assert_error(status, &missing, StatusCode::NOT_FOUND, "agent_not_found");
    let (status, invalid) = app
        .post_agent(json!({"message": "hi", "agent": "Not An Id"}))
        .await;
    assert_error(
        status,
        &invalid,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
}

/// Without `AGENTS_FILE`, one agent, `default`, made of the environment:
/// what every deployment before agents had.
async fn without_a_file_the_default_agent_is_the_environment(kind: DbKind) {
    let app = spawn_app(kind, &[("SYSTEM_PROMPT", "Be brief."), ("MAX_STEPS", "5")]).await;
    let (_, agents) = app.get("/agents").await;
    let agents = agents["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], "default");
    assert_eq!(agents[0]["max_steps"], 5);
    assert_eq!(agents[0]["model"]["provider"], "mock");
    let (_, body) = app
        .post_agent(json!({"message": "whoami", "agent": "default"}))
        .await;
    assert_eq!(
        body["response"],
        "model: bulkhead-mock; endpoint: built-in; system: Be brief."
    );
}

on_both_databases!(
    two_agents_keep_their_own_prompt_model_and_tools,
    without_a_file_the_default_agent_is_the_environment,
);
