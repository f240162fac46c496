//! The OpenAI-compatible API as its reference client sees it: the suite in
//! `tests/openai/test_openai.py`, written with the official `openai`
//! package (pinned by `scripts/ensure-tools`, run by its venv's
//! `tools-python3` under pytest), against the real `bulkhead serve` with
//! keys required, two agents and the mock model.

mod support;

use std::process::Command;

use bulkhead_testing::{DbKind, TestDb};
use support::{create_key, serve};

const AGENTS: &str = "\
agents:
  - id: default
    name: Default
    description: Answers with the mock model
  - id: guarded
    name: Guarded
    description: Asks a person before it reads the clock
    approval:
      default: auto
      tools:
        current_time: ask
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_talks_to_every_agent() {
    let Some(python) = support::tools_python("openai, pytest") else {
        return;
    };
    let db = TestDb::new(DbKind::Sqlite).await;
    let agents = db.dir.path().join("agents.yaml");
    std::fs::write(&agents, AGENTS).unwrap();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AGENT_MODE", "development"),
        ("AUTH_MODE", "keys"),
        ("AGENTS_FILE", agents.to_str().unwrap()),
        // A run that fails fails at once: the suite counts requests, not
        // the model client's retries.
        ("MODEL_MAX_RETRIES", "0"),
    ];
    let key = create_key(db.dir.path(), &env, &["--name", "sdk"]);
    let other = create_key(db.dir.path(), &env, &["--name", "other-tenant"]);
    let limited = create_key(db.dir.path(), &env, &["--name", "limited", "--rpm", "1"]);
    let (server, base) = serve(db.dir.path(), &env);

    let suite = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai/test_openai.py");
    let output = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(suite)
        .env("BULKHEAD_URL", &base)
        .env("BULKHEAD_KEY", &key)
        .env("BULKHEAD_OTHER_TENANT_KEY", &other)
        .env("BULKHEAD_LIMITED_KEY", &limited)
        .current_dir(db.dir.path())
        .output()
        .expect("pytest runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(
        output.status.success(),
        "the openai SDK's suite failed (report above); the server said:\n{}",
        server.all_output()
    );
    // Every test ran: none skipped, none deselected.
    assert!(
        report.contains(" passed") && !report.contains("skipped"),
        "{report}"
    );
    for secret in [&key, &other, &limited] {
        assert!(
            !server.all_output().contains(secret.as_str()),
            "a key reached the log"
        );
    }
}
