//! The front door end to end: keys, ownership, the admin API and per-key
//! limits, on the real server over loopback, on both databases, with the
//! limit counters in process and in a real Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_server::door::keys::{self, NewKey};
use bulkhead_server::{App, Config, Environment, Server};
use bulkhead_testing::{DbKind, TestDb, on_both_databases, sandbox_helper};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

struct TestApp {
    base: String,
    app: Arc<App>,
    _db: TestDb,
    _stop: oneshot::Sender<()>,
}

async fn spawn_app(kind: DbKind, env: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new(kind).await;
    let dir = db.dir.path();
    let mut vars: std::collections::HashMap<String, String> = [
        ("DATABASE_URL", db.url.clone()),
        ("AUTH_MODE", "keys".into()),
        ("ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("HOST", "127.0.0.1".into()),
        ("PORT", "0".into()),
        ("SECRETS_DIR", dir.join("no-secrets").display().to_string()),
        ("SANDBOX_ROOT", dir.join("sandboxes").display().to_string()),
        ("SANDBOX_HELPER", sandbox_helper().display().to_string()),
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
    let app = server.app();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        app,
        _db: db,
        _stop: stop,
    }
}

/// A request's answer: status, headers and JSON body (`Null` if none).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl TestApp {
    async fn key(&self, new: NewKey) -> String {
        keys::create(self.app.engine.store(), new, bulkhead_server::now_ms())
            .await
            .unwrap()
            .1
    }

    async fn key_named(&self, name: &str) -> String {
        self.key(NewKey {
            name: name.into(),
            ..NewKey::default()
        })
        .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }

    async fn call(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let client = reqwest::Client::new();
        let url = format!("{}{path}", self.base);
        let mut request = match method {
            "GET" => client.get(url),
            "POST" => client.post(url),
            "DELETE" => client.delete(url),
            "PATCH" => client.patch(url),
            other => panic!("{other}"),
        };
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    async fn agent(&self, key: &str, body: Value) -> Answer {
        self.call(Some(key), "POST", "/agent", Some(body)).await
    }
}

fn assert_unauthorized(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "{what}: {}",
        answer.body
    );
    assert_eq!(answer.body["error"]["code"], "unauthorized", "{what}");
    assert!(
        answer.headers[reqwest::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer realm="),
        "{what}: a challenge names the scheme"
    );
}

fn unknown_id() -> String {
    uuid_like(0x5eed)
}

fn uuid_like(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// Every route that takes a session or run id, with another key's ids,
/// answers exactly as it does for an id nobody has.
async fn a_foreign_id_is_an_unknown_id_on_every_route(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let owner = app.key_named("owner").await;
    let stranger = app.key_named("stranger").await;
    let made = app
        .agent(&owner, json!({"message": "tool:current_time {}"}))
        .await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    let session = made.body["session_id"].as_str().unwrap().to_string();
    let run = made.body["run_id"].as_str().unwrap().to_string();
    let (unknown_session, unknown_run) = (unknown_id(), uuid_like(0xbeef));

    // (method, path with {s} and {r}, body)
    let routes: Vec<(&str, &str, Option<Value>)> = vec![
        ("GET", "/sessions/{s}", None),
        ("GET", "/sessions/{s}/runs", None),
        ("GET", "/sessions/{s}/audit", None),
        ("GET", "/runs/{r}", None),
        ("GET", "/runs/{r}/events", None),
        ("GET", "/runs/{r}/events?after=1", None),
        (
            "POST",
            "/agent",
            Some(json!({"message": "mine now", "session_id": "{s}"})),
        ),
        ("DELETE", "/sessions/{s}", None),
    ];
    let fill = |text: &str, s: &str, r: &str| text.replace("{s}", s).replace("{r}", r);
    for (method, path, body) in &routes {
        let body_for = |s: &str, r: &str| {
            body.as_ref()
                .map(|b| serde_json::from_str(&fill(&b.to_string(), s, r)).unwrap())
        };
        let foreign = app
            .call(
                Some(&stranger),
                method,
                &fill(path, &session, &run),
                body_for(&session, &run),
            )
            .await;
        let unknown = app
            .call(
                Some(&stranger),
                method,
                &fill(path, &unknown_session, &unknown_run),
                body_for(&unknown_session, &unknown_run),
            )
            .await;
        assert_eq!(
            foreign.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            foreign.body
        );
        assert_eq!(
            (foreign.status, &foreign.body),
            (unknown.status, &unknown.body),
            "{method} {path}: another key's id answers as an unknown id"
        );
        let mine = app
            .call(
                Some(&owner),
                method,
                &fill(path, &session, &run),
                body_for(&session, &run),
            )
            .await;
        assert!(
            mine.status.is_success(),
            "{method} {path}: the owner reaches it: {} {}",
            mine.status,
            mine.body
        );
    }
    // The owner's DELETE went last and took the session: nothing the
    // stranger tried touched it before.
    let gone = app
        .call(Some(&owner), "GET", &format!("/sessions/{session}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);

    // A key of the same tenant shares the sessions (key rotation).
    let first = app
        .agent(&owner, json!({"message": "kept across rotation"}))
        .await;
    let session = first.body["session_id"].as_str().unwrap();
    let owner_tenant = bulkhead_server::door::keys::parse(&owner)
        .unwrap()
        .to_string();
    let rotated = app
        .key(NewKey {
            name: "rotated".into(),
            tenant: Some(owner_tenant),
            ..NewKey::default()
        })
        .await;
    let continued = app
        .agent(&rotated, json!({"message": "again", "session_id": session}))
        .await;
    assert_eq!(continued.status, StatusCode::OK, "{}", continued.body);
}

/// A run waiting for a person is decided only by its tenant: to another
/// key it is an unknown run, and the decision records the key that made it.
async fn a_paused_run_is_decided_only_by_its_tenant(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents.yaml");
    std::fs::write(
        &agents,
        "agents:\n  - id: default\n    tools: [current_time]\n    approval:\n      default: ask\n",
    )
    .unwrap();
    let agents = agents.display().to_string();
    let app = spawn_app(kind, &[("AGENTS_FILE", agents.as_str())]).await;
    let owner = app.key_named("owner").await;
    let stranger = app.key_named("stranger").await;
    let paused = app
        .agent(&owner, json!({"message": "tool:current_time {}"}))
        .await;
    assert_eq!(paused.status, StatusCode::ACCEPTED, "{}", paused.body);
    let run = paused.body["run_id"].as_str().unwrap();
    let decision = json!({"call_id": paused.body["approval"]["call_id"], "decision": "approve"});
    let foreign = app
        .call(
            Some(&stranger),
            "POST",
            &format!("/runs/{run}/approvals"),
            Some(decision.clone()),
        )
        .await;
    let unknown = app
        .call(
            Some(&stranger),
            "POST",
            &format!("/runs/{}/approvals", unknown_id()),
            Some(decision.clone()),
        )
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{}", foreign.body);
    assert_eq!(
        (foreign.status, &foreign.body),
        (unknown.status, &unknown.body)
    );
    let decided = app
        .call(
            Some(&owner),
            "POST",
            &format!("/runs/{run}/approvals"),
            Some(decision),
        )
        .await;
    assert_eq!(decided.status, StatusCode::OK, "{}", decided.body);
    let session = paused.body["session_id"].as_str().unwrap();
    let audit = app
        .call(
            Some(&owner),
            "GET",
            &format!("/sessions/{session}/audit"),
            None,
        )
        .await;
    let owner_id = bulkhead_server::door::keys::parse(&owner).unwrap();
    assert_eq!(
        audit.body["tool_calls"][0]["approval"]["decided_by"], owner_id,
        "{}",
        audit.body
    );
}

/// Without a valid key in a form the server reads, every route but the
/// open ones answers 401 with a challenge, and never echoes the key.
async fn every_protected_route_needs_a_valid_key(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let key = app.key_named("client").await;
    let revoked = app.key_named("revoked").await;
    let revoked_id = keys::parse(&revoked).unwrap().to_string();
    let id = unknown_id();
    let protected = [
        ("POST", "/agent".to_string()),
        ("GET", format!("/sessions/{id}")),
        ("DELETE", format!("/sessions/{id}")),
        ("GET", format!("/sessions/{id}/runs")),
        ("GET", format!("/sessions/{id}/audit")),
        ("GET", format!("/runs/{id}")),
        ("GET", format!("/runs/{id}/events")),
        ("POST", format!("/runs/{id}/approvals")),
        ("GET", "/agents".to_string()),
        ("GET", "/agents/default".to_string()),
        ("GET", "/no-such-route".to_string()),
    ];
    for (method, path) in &protected {
        let answer = app
            .call(None, method, path, Some(json!({"message": "hi"})))
            .await;
        assert_unauthorized(&answer, &format!("{method} {path} without a key"));
    }
    // The OpenAI face: the same refusal, in OpenAI's shape.
    for (method, path) in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/default"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/no-such-route"),
    ] {
        let answer = app
            .call(None, method, path, Some(json!({"model": "default"})))
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(
            (&answer.body["error"]["type"], &answer.body["error"]["code"]),
            (&json!("authentication_error"), &json!("invalid_api_key")),
            "{method} {path}: {}",
            answer.body
        );
        assert!(
            answer
                .headers
                .contains_key(reqwest::header::WWW_AUTHENTICATE)
        );
    }
    // The LangGraph face: the same refusal, as `{"detail"}`.
    for (method, path) in [
        ("POST", "/assistants/search".to_string()),
        ("GET", "/assistants/default".to_string()),
        ("POST", "/threads".to_string()),
        ("POST", "/threads/search".to_string()),
        ("POST", "/threads/count".to_string()),
        ("GET", format!("/threads/{id}")),
        ("PATCH", format!("/threads/{id}")),
        ("DELETE", format!("/threads/{id}")),
        ("GET", format!("/threads/{id}/state")),
        ("POST", format!("/threads/{id}/history")),
        ("POST", format!("/threads/{id}/runs")),
        ("GET", format!("/threads/{id}/runs")),
        ("POST", format!("/threads/{id}/runs/wait")),
        ("POST", format!("/threads/{id}/runs/stream")),
        ("GET", format!("/threads/{id}/runs/{id}")),
        ("DELETE", format!("/threads/{id}/runs/{id}")),
        ("GET", format!("/threads/{id}/runs/{id}/join")),
        ("GET", format!("/threads/{id}/runs/{id}/stream")),
        ("POST", format!("/threads/{id}/runs/{id}/cancel")),
        ("POST", "/runs".to_string()),
        ("POST", "/runs/wait".to_string()),
        ("POST", "/runs/stream".to_string()),
    ] {
        let answer = app
            .call(
                None,
                method,
                &path,
                Some(json!({"assistant_id": "default"})),
            )
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert!(
            answer.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("API key")),
            "{method} {path}: {}",
            answer.body
        );
        assert!(
            answer
                .headers
                .contains_key(reqwest::header::WWW_AUTHENTICATE)
        );
    }
    for open in ["/health", "/ready", "/ready/replica", "/info"] {
        let answer = app.call(None, "GET", open, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{open} stays open");
    }

    let revoke = app
        .send(
            reqwest::Client::new()
                .post(format!("{}/admin/keys/{revoked_id}/revoke", app.base))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(revoke.status, StatusCode::OK, "{}", revoke.body);

    let client = reqwest::Client::new();
    let agent = || {
        client
            .post(format!("{}/agent", app.base))
            .json(&json!({"message": "hi"}))
    };
    let mut wrong_secret = key.clone();
    wrong_secret.replace_range(key.len() - 4.., "0000");
    let mut unknown_id_key = key.clone();
    unknown_id_key.replace_range(3..7, "ffff");
    let refused: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("malformed", agent().bearer_auth("not-a-key")),
        ("a wrong secret", agent().bearer_auth(&wrong_secret)),
        ("an unknown id", agent().bearer_auth(&unknown_id_key)),
        ("a revoked key", agent().bearer_auth(&revoked)),
        ("no scheme", agent().header("authorization", &key)),
        (
            "Basic",
            agent().header("authorization", format!("Basic {key}")),
        ),
        ("api-key header", agent().header("api-key", &key)),
        (
            "a query parameter",
            client
                .post(format!("{}/agent?api_key={key}", app.base))
                .json(&json!({"message": "hi"})),
        ),
        ("x-api-key revoked", agent().header("x-api-key", &revoked)),
    ];
    for (what, request) in refused {
        let answer = app.send(request).await;
        assert_unauthorized(&answer, what);
        let text = answer.body.to_string();
        assert!(
            !text.contains(&key[20..]) && !text.contains(&revoked[20..]),
            "{what}: the key is not echoed: {text}"
        );
    }
    let accepted: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("Bearer", agent().bearer_auth(&key)),
        (
            "bearer in lower case",
            agent().header("authorization", format!("bearer {key}")),
        ),
        ("x-api-key", agent().header("x-api-key", &key)),
    ];
    for (what, request) in accepted {
        let answer = app.send(request).await;
        assert_eq!(answer.status, StatusCode::OK, "{what}: {}", answer.body);
    }
    // `last_used_at` is recorded (without holding up the request).
    let deadline = Instant::now() + Duration::from_secs(5);
    let key_id = keys::parse(&key).unwrap();
    while app
        .app
        .engine
        .store()
        .api_key(key_id)
        .await
        .unwrap()
        .unwrap()
        .last_used_at
        .is_none()
    {
        assert!(Instant::now() < deadline, "last use recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn the_admin_api_makes_lists_and_revokes_keys(kind: DbKind) {
    let app = spawn_app(kind, &[]).await;
    let client = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{}{path}", app.base))
            .bearer_auth(ADMIN_TOKEN)
    };
    let some_key = app.key_named("not an admin").await;
    for (what, token) in [
        ("none", None),
        ("wrong", Some("x".repeat(40))),
        ("an API key", Some(some_key.clone())),
    ] {
        let mut request = client.get(format!("{}/admin/keys", app.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = app.send(request).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(answer.body["error"]["code"], "unauthorized");
    }
    let created = app
        .send(admin(reqwest::Method::POST, "/admin/keys").json(&json!({
            "name": "made over http",
            "requests_per_minute": 100,
            "tokens_per_day": 5000,
        })))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let key = created.body["key"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(keys::parse(&key), Some(id.as_str()));
    assert_eq!(created.body["limits"]["requests_per_minute"], 100);
    assert_eq!(created.body["limits"]["max_concurrent_runs"], Value::Null);
    assert_eq!(
        app.agent(&key, json!({"message": "hi"})).await.status,
        StatusCode::OK
    );

    let listed = app.send(admin(reqwest::Method::GET, "/admin/keys")).await;
    assert_eq!(listed.status, StatusCode::OK);
    let text = listed.body.to_string();
    assert!(!text.contains(&key[20..]), "the list never holds a secret");
    assert!(!text.contains("digest"));
    let names: Vec<&str> = listed.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["not an admin", "made over http"]);

    for (body, field) in [
        (json!({}), "name"),
        (
            json!({"name": "x", "requests_per_minute": 0}),
            "requests_per_minute",
        ),
        (json!({"name": "x", "tokens_per_day": -1}), "tokens_per_day"),
        (json!({"name": "x", "colour": "red"}), "colour"),
        (json!({"name": "x", "tenant": "no spaces"}), "tenant"),
    ] {
        let answer = app
            .send(admin(reqwest::Method::POST, "/admin/keys").json(&body))
            .await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            answer.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{body}: {}",
            answer.body
        );
    }

    let revoked = app
        .send(admin(
            reqwest::Method::POST,
            &format!("/admin/keys/{id}/revoke"),
        ))
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert!(revoked.body["revoked_at"].is_string());
    // At once on the server that revoked it.
    assert_unauthorized(&app.agent(&key, json!({"message": "hi"})).await, "revoked");
    let again = app
        .send(admin(
            reqwest::Method::POST,
            &format!("/admin/keys/{id}/revoke"),
        ))
        .await;
    assert_eq!(again.status, StatusCode::OK, "revoking twice is fine");
    let unknown = app
        .send(admin(
            reqwest::Method::POST,
            "/admin/keys/ffffffffffffffff/revoke",
        ))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.body["error"]["code"], "key_not_found");

    // Without ADMIN_TOKEN there is no admin API at all.
    let closed = spawn_app(kind, &[("ADMIN_TOKEN", "")]).await;
    let answer = closed
        .send(
            client
                .get(format!("{}/admin/keys", closed.base))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ADMIN_TOKEN")
    );
}

/// With `AUTH_MODE=none` nothing asks for a key, and sessions made then
/// belong to no key.
async fn without_authentication_everything_is_open(kind: DbKind) {
    let app = spawn_app(kind, &[("AUTH_MODE", "none")]).await;
    let answer = app
        .call(None, "POST", "/agent", Some(json!({"message": "hi"})))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let session = answer.body["session_id"].as_str().unwrap();
    let read = app
        .call(None, "GET", &format!("/sessions/{session}"), None)
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(
        app.app
            .engine
            .store()
            .session(session)
            .await
            .unwrap()
            .unwrap()
            .owner,
        None
    );
}

fn retry_after(answer: &Answer) -> Duration {
    Duration::from_secs(
        answer.headers[reqwest::header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap(),
    )
}

fn assert_rate_limited(answer: &Answer, limit: &str) {
    assert_eq!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{limit}: {}",
        answer.body
    );
    assert_eq!(answer.body["error"]["code"], "rate_limited");
    assert_eq!(answer.body["error"]["limit"], limit);
    assert_eq!(answer.headers["x-ratelimit-remaining"], "0");
    assert!(answer.headers.contains_key("x-ratelimit-limit"));
    assert!(answer.headers.contains_key("x-ratelimit-reset"));
    assert!(retry_after(answer) >= Duration::from_secs(1));
}

/// Each limit is reached, says so, and lifts when `Retry-After` says.
async fn limits_are_reached_and_lift(kind: DbKind, redis: bool) {
    let redis_url = std::env::var("TEST_REDIS_URL").unwrap_or_default();
    if redis {
        assert!(
            !redis_url.is_empty(),
            "TEST_REDIS_URL is not set: run the suite with scripts/test, which starts Redis"
        );
    }
    let mut env = vec![("MOCK_MODEL_LATENCY_MS", "300")];
    if redis {
        env.push(("REDIS_URL", redis_url.as_str()));
    }
    let app = spawn_app(kind, &env).await;

    // Requests per minute: 60 means one more each second, 60 at once.
    let key = app
        .key(NewKey {
            name: "rpm".into(),
            requests_per_minute: Some(60),
            ..NewKey::default()
        })
        .await;
    let path = format!("/runs/{}", unknown_id());
    let mut refused = None;
    for sent in 1..=120 {
        let answer = app.call(Some(&key), "GET", &path, None).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((sent, answer));
            break;
        }
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.headers["x-ratelimit-limit"], "60");
    }
    // One more comes back each second, and a debug build is slow: the
    // refusal comes after the 60th, while the burst lasts.
    let (sent, answer) = refused.expect("a burst past 60 is refused");
    assert!(sent > 60, "refused at request {sent}");
    assert_rate_limited(&answer, "requests_per_minute");
    tokio::time::sleep(retry_after(&answer)).await;
    let again = app.call(Some(&key), "GET", &path, None).await;
    assert_eq!(
        again.status,
        StatusCode::NOT_FOUND,
        "Retry-After was honoured"
    );

    // Runs in flight: the second run waits for the first to end.
    let key = app
        .key(NewKey {
            name: "one run".into(),
            max_concurrent_runs: Some(1),
            ..NewKey::default()
        })
        .await;
    let first = tokio::spawn({
        let (base, key) = (app.base.clone(), key.clone());
        async move {
            reqwest::Client::new()
                .post(format!("{base}/agent"))
                .bearer_auth(key)
                .json(&json!({"message": "slow"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = app.agent(&key, json!({"message": "too soon"})).await;
    assert_rate_limited(&second, "concurrent_runs");
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let third = app.agent(&key, json!({"message": "after"})).await;
        if third.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place is given back: {}",
            third.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Tokens per day: checked when a run starts, never during one.
    let key = app
        .key(NewKey {
            name: "tokens".into(),
            tokens_per_day: Some(5),
            ..NewKey::default()
        })
        .await;
    let small = app.agent(&key, json!({"message": "hi"})).await;
    assert_eq!(small.status, StatusCode::OK);
    assert!(small.body["tokens_used"].as_i64().unwrap() < 5);
    // Still under the budget when it starts; it spends past it in its
    // second step, and is allowed to finish.
    let over = app
        .agent(&key, json!({"message": "tool:current_time {}"}))
        .await;
    assert_eq!(over.status, StatusCode::OK, "{}", over.body);
    let deadline = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        let answer = app.agent(&key, json!({"message": "more"})).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the budget is spent: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_rate_limited(&refused, "tokens_per_day");
    assert!(
        retry_after(&refused) <= Duration::from_secs(86_400),
        "until the next UTC day"
    );
    // Another key is not held back by this one's limits.
    let other = app.key_named("unlimited").await;
    assert_eq!(
        app.agent(&other, json!({"message": "hi"})).await.status,
        StatusCode::OK
    );
}

async fn limits_in_process(kind: DbKind) {
    limits_are_reached_and_lift(kind, false).await
}

async fn limits_in_redis(kind: DbKind) {
    limits_are_reached_and_lift(kind, true).await
}

/// A Redis that does not answer lets requests through uncounted: the
/// counters' outage is not the API's.
async fn limits_fail_open_when_redis_is_gone(kind: DbKind) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app(kind, &[("REDIS_URL", &url)]).await;
    let key = app
        .key(NewKey {
            name: "strict".into(),
            requests_per_minute: Some(1),
            max_concurrent_runs: Some(1),
            tokens_per_day: Some(1),
            ..NewKey::default()
        })
        .await;
    for _ in 0..3 {
        let answer = app.agent(&key, json!({"message": "hi"})).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
}

/// A planner whose executor and critic require keys sends each its own;
/// without them, the hand-over fails with the peer's refusal.
async fn a_planner_sends_its_peers_their_keys(kind: DbKind) {
    let executor = spawn_app(kind, &[("AGENT_ROLE", "executor")]).await;
    let critic = spawn_app(kind, &[("AGENT_ROLE", "critic")]).await;
    let executor_key = executor.key_named("planner").await;
    let critic_key = critic.key_named("planner").await;
    let peers = [
        ("AGENT_ROLE", "planner"),
        ("AUTH_MODE", "none"),
        ("EXECUTOR_URL", executor.base.as_str()),
        ("CRITIC_URL", critic.base.as_str()),
    ];
    let planner = spawn_app(
        kind,
        &[
            &peers[..],
            &[
                ("EXECUTOR_API_KEY", executor_key.as_str()),
                ("CRITIC_API_KEY", critic_key.as_str()),
            ],
        ]
        .concat(),
    )
    .await;
    let answer = planner
        .call(
            None,
            "POST",
            "/agent",
            Some(json!({"message": "say:the one step"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(
        answer.body["response"]
            .as_str()
            .unwrap()
            .contains("Results:\n1. echo: the one step"),
        "{}",
        answer.body
    );

    let keyless = spawn_app(kind, &peers).await;
    let refused = keyless
        .call(
            None,
            "POST",
            "/agent",
            Some(json!({"message": "say:the one step"})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "delegate_error");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{}",
        refused.body
    );
}

/// With `CORS_ALLOWED_ORIGINS`, a page of an allowed origin may call the
/// API with its key (the preflight carries none, and is answered before
/// the door) and read where a run is; another origin gets no CORS grant.
async fn allowed_origins_may_call_from_a_browser(kind: DbKind) {
    let app = spawn_app(
        kind,
        &[("CORS_ALLOWED_ORIGINS", "https://chat.example.com")],
    )
    .await;
    let key = app.key_named("browser").await;
    let client = reqwest::Client::new();
    let preflight = |origin: &str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{}/threads", app.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-api-key, content-type")
    };
    let granted = app.send(preflight("https://chat.example.com")).await;
    assert!(granted.status.is_success(), "{}", granted.status);
    assert_eq!(
        granted.headers["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let allowed_headers = granted.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed_headers.contains("x-api-key"), "{allowed_headers}");
    let other = app.send(preflight("https://evil.example.net")).await;
    assert!(!other.headers.contains_key("access-control-allow-origin"));

    let run = app
        .send(
            client
                .post(format!("{}/runs/wait", app.base))
                .header("origin", "https://chat.example.com")
                .header("x-api-key", &key)
                .json(&json!({"assistant_id": "default", "input": {"messages": [{"role": "user", "content": "hi"}]}})),
        )
        .await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.body);
    let exposed = run.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("content-location"), "{exposed}");
    assert!(run.headers.contains_key("content-location"));
}

on_both_databases!(
    allowed_origins_may_call_from_a_browser,
    a_planner_sends_its_peers_their_keys,
    limits_fail_open_when_redis_is_gone,
    a_foreign_id_is_an_unknown_id_on_every_route,
    a_paused_run_is_decided_only_by_its_tenant,
    every_protected_route_needs_a_valid_key,
    the_admin_api_makes_lists_and_revokes_keys,
    without_authentication_everything_is_open,
    limits_in_process,
    limits_in_redis,
);
