//! The contract of the tutorials: probes, conversations and their record, and every way a request can be wrong.

use super::*;

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

on_both_databases!(
    probes_answer,
    a_conversation_continues_with_its_history,
    sessions_runs_and_events_are_readable,
    unknown_and_malformed_ids_are_rejected,
    deleting_a_session_forgets_it,
    a_busy_session_answers_409_and_history_stays_whole,
    bad_input_gets_clear_errors,
    request_ids_are_returned,
    request_bodies_never_cause_a_server_error,
);
