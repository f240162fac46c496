//! `bulkhead keys` and the servers that honour them, as an operator uses
//! them: keys made and revoked with the CLI while `bulkhead serve` runs, on
//! both databases; limits shared by two server processes through one Redis.

mod support;

use std::time::{Duration, Instant};

use bulkhead_testing::{DbKind, TestDb, on_both_databases};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Process, bulkhead, client_with_key, create_key, serve};

fn keys_cli(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut command = bulkhead(dir);
    command.arg("keys").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn stop(mut server: Process) {
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

async fn a_key_made_by_the_cli_opens_the_api_until_revoked(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let dir = db.dir.path();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AGENT_MODE", "production"),
        ("MODEL_ENDPOINT", "http://127.0.0.1:9/v1"),
    ];
    // Made before any server has run on this database.
    let key = create_key(dir, &env, &["--name", "ci", "--rpm", "600"]);
    let (server, url) = serve(dir, &env);

    let anonymous = reqwest::Client::new()
        .get(format!(
            "{url}/sessions/00000000-0000-4000-8000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anonymous.status(),
        StatusCode::UNAUTHORIZED,
        "production requires keys"
    );
    let client = client_with_key(&key);
    let answer = client
        .get(format!(
            "{url}/sessions/00000000-0000-4000-8000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status(),
        StatusCode::NOT_FOUND,
        "the key is accepted"
    );
    assert_eq!(answer.headers()["x-ratelimit-limit"], "600");

    let listed = keys_cli(dir, &env, &["list", "--json"]);
    assert!(listed.status.success());
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let id = key.split('_').nth(1).unwrap();
    assert_eq!(listed["keys"][0]["id"], id);
    assert_eq!(listed["keys"][0]["name"], "ci");
    assert_eq!(listed["keys"][0]["limits"]["requests_per_minute"], 600);
    let table = keys_cli(dir, &env, &["list"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains(id) && table.contains("600 requests/min"),
        "{table}"
    );
    for listing in [listed.to_string(), table] {
        assert!(!listing.contains(&key[20..]), "never the secret: {listing}");
    }

    let revoked = keys_cli(dir, &env, &["revoke", id]);
    assert!(revoked.status.success());
    // Another process revoked it: the server sees it within its key cache's
    // lifetime (2 s).
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let answer = client
            .get(format!(
                "{url}/sessions/00000000-0000-4000-8000-000000000000"
            ))
            .send()
            .await
            .unwrap();
        if answer.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "the revocation took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unknown = keys_cli(dir, &env, &["revoke", "ffffffffffffffff"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("keys list"));
    let bad = keys_cli(dir, &env, &["create", "--name", "x", "--rpm", "0"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a zero limit is refused by the CLI"
    );
    stop(server);
}

on_both_databases!(a_key_made_by_the_cli_opens_the_api_until_revoked);

/// Two server processes on one PostgreSQL and one Redis count a key's
/// requests and runs together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_keys_limits_through_redis() {
    let redis = std::env::var("TEST_REDIS_URL").expect(
        "TEST_REDIS_URL is not set: run the suite with scripts/test, which installs and starts Redis",
    );
    let db = TestDb::new(DbKind::Postgres).await;
    let dir = db.dir.path();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AUTH_MODE", "keys"),
        ("REDIS_URL", redis.as_str()),
        ("MOCK_MODEL_LATENCY_MS", "1500"),
    ];
    // Each server claims its own sandbox root.
    let root = |name: &str| dir.join(name).display().to_string();
    let (root_a, root_b) = (root("sandboxes-a"), root("sandboxes-b"));
    let (a, url_a) = serve(
        dir,
        &[&env[..], &[("SANDBOX_ROOT", root_a.as_str())]].concat(),
    );
    let (b, url_b) = serve(
        dir,
        &[&env[..], &[("SANDBOX_ROOT", root_b.as_str())]].concat(),
    );

    let key = create_key(dir, &env, &["--name", "shared", "--rpm", "3"]);
    let client = client_with_key(&key);
    let probe = |url: &str| {
        client
            .get(format!("{url}/runs/00000000-0000-4000-8000-000000000000"))
            .send()
    };
    for url in [&url_a, &url_b, &url_a] {
        assert_eq!(probe(url).await.unwrap().status(), StatusCode::NOT_FOUND);
    }
    let refused = probe(&url_b).await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the fourth request is over the limit, on whichever server"
    );
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=20).contains(&retry),
        "one request back in 20 s: {retry}"
    );

    let key = create_key(
        dir,
        &env,
        &["--name", "one run", "--max-concurrent-runs", "1"],
    );
    let client = client_with_key(&key);
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), url_a.clone());
        async move {
            client
                .post(format!("{url}/agent"))
                .json(&json!({"message": "slow"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elsewhere = client
        .post(format!("{url_b}/agent"))
        .json(&json!({"message": "on the other server"}))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = elsewhere.json().await.unwrap();
    assert_eq!(body["error"]["limit"], "concurrent_runs");
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = client
            .post(format!("{url_b}/agent"))
            .json(&json!({"message": "now"}))
            .send()
            .await
            .unwrap();
        if after.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the place came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(a);
    stop(b);
}
