//! The LangGraph Agent Server API as its reference client sees it: the
//! suite in `tests/langgraph/test_langgraph.py`, written with the real
//! `langgraph-sdk` package (pinned by `scripts/ensure-tools`, run by its
//! venv's `tools-python3` under pytest), against the real `bulkhead serve`
//! with keys required, two agents and the mock model, on both databases.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_testing::{DbKind, TestDb, on_both_databases};
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

/// The browser origin the server lets in (Agent Chat UI's, say).
const CORS_ORIGIN: &str = "https://chat.example.com";

/// The longest the whole suite may take before it counts as hung.
const SUITE_DEADLINE: Duration = Duration::from_secs(900);

async fn the_langgraph_sdk_drives_every_call(kind: DbKind) {
    let Some(python) = support::tools_python("langgraph_sdk, pytest") else {
        return;
    };
    let db = TestDb::new(kind).await;
    let agents = db.dir.path().join("agents.yaml");
    std::fs::write(&agents, AGENTS).unwrap();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AGENT_MODE", "development"),
        ("AUTH_MODE", "keys"),
        ("AGENTS_FILE", agents.to_str().unwrap()),
        // A run that fails fails at once, without the model client's
        // retries.
        ("MODEL_MAX_RETRIES", "0"),
        ("CORS_ALLOWED_ORIGINS", CORS_ORIGIN),
    ];
    let key = create_key(db.dir.path(), &env, &["--name", "sdk"]);
    let other = create_key(db.dir.path(), &env, &["--name", "other-tenant"]);
    let limited = create_key(db.dir.path(), &env, &["--name", "limited", "--rpm", "1"]);
    let (server, base) = serve(db.dir.path(), &env);

    // pytest's report goes to a file, so that a hung suite can be stopped
    // and its report still read.
    let report_path = db.dir.path().join("pytest.log");
    let report_file = std::fs::File::create(&report_path).unwrap();
    let suite = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/langgraph/test_langgraph.py"
    );
    let mut pytest = Command::new(python)
        .args(["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"])
        // A test still running after two minutes prints where it is.
        .args(["-o", "faulthandler_timeout=120"])
        .arg(suite)
        .env("BULKHEAD_URL", &base)
        .env("BULKHEAD_KEY", &key)
        .env("BULKHEAD_OTHER_TENANT_KEY", &other)
        .env("BULKHEAD_LIMITED_KEY", &limited)
        .env("BULKHEAD_CORS_ORIGIN", CORS_ORIGIN)
        // The SDK reads keys from these when given none; the suite gives
        // its own, or none on purpose.
        .env_remove("LANGGRAPH_API_KEY")
        .env_remove("LANGSMITH_API_KEY")
        .env_remove("LANGCHAIN_API_KEY")
        .current_dir(db.dir.path())
        .stdin(Stdio::null())
        .stdout(report_file.try_clone().unwrap())
        .stderr(report_file)
        .spawn()
        .expect("pytest starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = pytest.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > SUITE_DEADLINE {
            let _ = pytest.kill();
            let _ = pytest.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let report = std::fs::read_to_string(&report_path).unwrap_or_default();
    println!("{report}");
    assert!(
        status.is_some(),
        "the langgraph-sdk suite ran past {SUITE_DEADLINE:?} and was stopped (report above); the server said:\n{}",
        server.all_output()
    );
    assert!(
        status.unwrap().success(),
        "the langgraph-sdk suite failed on {kind:?} (report above); the server said:\n{}",
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

on_both_databases!(the_langgraph_sdk_drives_every_call);
