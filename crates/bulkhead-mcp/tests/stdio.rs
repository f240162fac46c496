//! Stdio servers, started in a real sandbox: the namespace backend (with
//! the venv scripts/ensure-tools puts under /usr, which it sees) and Docker
//! (with bulkhead-sandbox-mcp:test, built by scripts/ensure-images). The
//! pinned `mcp-server-time`, then servers that misbehave: one that never
//! answers, one that exits at once, one that crashes or hangs in a call,
//! one that floods stdout.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_mcp::{McpError, McpServerConfig, McpSession};
use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::egress::EgressPolicy;
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{Backend, Limits, Sandbox};
use serde_json::json;
use support::{arguments, gone};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Docker,
}

impl Kind {
    /// A number no other test, nor this one on the other backend, uses:
    /// marks a server's command line so the test can look for it on the
    /// host.
    fn marker(self, base: u32) -> String {
        format!("bhmcp{}", base * 2 + self as u32)
    }

    /// The system's python3 (both backends have it there).
    fn python(self) -> String {
        "/usr/bin/python3".into()
    }

    /// The test image has the venv where scripts/ensure-tools puts it.
    fn time_server(self) -> String {
        let venv = match self {
            Kind::Namespace => support::mcp_venv(),
            Kind::Docker => "/usr/local/lib/bulkhead-test-mcp/venv".into(),
        };
        venv.join("bin/mcp-server-time").display().to_string()
    }
}

fn mcp_test_image() -> String {
    std::env::var("MCP_TEST_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox-mcp:test".into())
}

struct Fixture {
    _dir: tempfile::TempDir,
    sandbox: Arc<dyn Sandbox>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let sandbox = Arc::clone(&self.sandbox);
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(sandbox.destroy())
        })
        .join();
    }
}

fn unique_id() -> String {
    format!(
        "mcp{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

/// The session's sandbox, or `None` when the test cannot run here (see
/// `support::available`).
async fn fixture(kind: Kind) -> Option<Fixture> {
    let dir = tempfile::tempdir().unwrap();
    let backend: Box<dyn Backend> = match kind {
        Kind::Namespace => {
            if !support::venv_ready() {
                return None;
            }
            Box::new(NamespaceBackend::new(NamespaceConfig {
                helper: bulkhead_testing::sandbox_helper(),
                helper_args: Vec::new(),
                root: dir.path().join("sandboxes"),
                host_uid: 100_000,
                host_gid: 100_000,
                cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
                egress: None,
            }))
        }
        Kind::Docker => {
            let image = mcp_test_image();
            let present = std::process::Command::new("docker")
                .args(["image", "inspect", &image])
                .output()
                .is_ok_and(|out| out.status.success());
            if !support::available(
                (!present).then(|| format!("image {image} is missing: run scripts/ensure-images")),
            ) {
                return None;
            }
            Box::new(DockerBackend::new(DockerConfig {
                image,
                runtime: None,
                socket: None,
                scope: unique_id(),
                egress: None,
                egress_volume: None,
            }))
        }
    };
    let limits = Limits {
        memory_bytes: 512 << 20,
        pids: 64,
        output_bytes: 8 << 10,
        disk_bytes: 32 << 20,
        ..Limits::default()
    };
    let sandbox = backend
        .create(&unique_id(), &limits)
        .await
        .unwrap_or_else(|e| panic!("{kind:?} sandbox: {e}"));
    Some(Fixture { _dir: dir, sandbox })
}

fn server(name: &str, command: Vec<String>) -> McpServerConfig {
    McpServerConfig::stdio(name, command, vec![])
        .unwrap()
        .with_timeouts(Duration::from_secs(60), Duration::from_secs(20))
        .unwrap()
}

fn session(config: McpServerConfig) -> McpSession {
    McpSession::new(vec![config], EgressPolicy::default())
        .unwrap()
        .with_retry_backoff(Duration::ZERO)
}

/// A small MCP server by hand: `echo`, `crash` (writes to stderr and exits
/// 1) and `hang` (never answers).
const HAND_MADE: &str = r#"
import json, sys, time
for line in sys.stdin:
    message = json.loads(line)
    method = message.get("method")
    if method == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"],
                  "capabilities": {"tools": {}},
                  "serverInfo": {"name": "hand-made", "version": "1"}}
    elif method == "tools/list":
        schema = {"type": "object", "properties": {"text": {"type": "string"}}}
        result = {"tools": [{"name": name, "inputSchema": schema} for name in ("echo", "crash", "hang")]}
    elif method == "tools/call":
        name = message["params"]["name"]
        if name == "crash":
            sys.stderr.write("Traceback: something broke in crash\n")
            sys.exit(1)
        if name == "hang":
            time.sleep(3600)
        text = message["params"].get("arguments", {}).get("text", "")
        result = {"content": [{"type": "text", "text": text}]}
    else:
        continue
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
    sys.stdout.flush()
"#;

fn hand_made(kind: Kind, marker: &str) -> Vec<String> {
    vec![kind.python(), "-c".into(), HAND_MADE.into(), marker.into()]
}

bulkhead_testing::on_both_backends!(
    the_time_server_lists_its_tools_and_answers,
    a_server_that_never_answers_initialize_offers_nothing_and_is_stopped,
    a_server_that_exits_at_once_is_reported_with_its_stderr,
    a_crash_during_a_call_is_reported_and_the_next_call_restarts_it,
    a_call_past_its_timeout_kills_the_server,
    a_server_that_floods_stdout_is_stopped,
);

async fn the_time_server_lists_its_tools_and_answers(kind: Kind) {
    let Some(fixture) = fixture(kind).await else {
        return;
    };
    let command = vec![kind.time_server(), "--local-timezone".into(), "UTC".into()];
    let session = session(server("time", command));
    let tools = session.tools(&fixture.sandbox).await;
    if tools.is_empty() {
        // Why, in the failure (the back-off is zero: this tries again).
        let error = session
            .call(
                &fixture.sandbox,
                "time__get_current_time",
                serde_json::Map::new(),
            )
            .await;
        panic!("no tools: {error:?}");
    }
    let mut names: Vec<&str> = tools.iter().map(|t| t.qualified_name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["time__convert_time", "time__get_current_time"]);
    let get = tools.iter().find(|t| t.tool == "get_current_time").unwrap();
    assert!(
        get.input_schema["properties"]["timezone"].is_object(),
        "{get:?}"
    );

    let output = session
        .call(
            &fixture.sandbox,
            "time__get_current_time",
            arguments(json!({"timezone": "UTC"})),
        )
        .await
        .unwrap();
    assert!(!output.is_error, "{output:?}");
    let answer: serde_json::Value = serde_json::from_str(&output.content).unwrap();
    assert_eq!(answer["timezone"], "UTC", "{answer}");
    assert!(
        answer["datetime"]
            .as_str()
            .is_some_and(|d| d.starts_with("20")),
        "{answer}"
    );

    // A bad argument is the server's answer, which the model reads.
    let output = session
        .call(
            &fixture.sandbox,
            "time__get_current_time",
            arguments(json!({"timezone": "Nowhere/Atlantis"})),
        )
        .await;
    match output {
        Ok(output) => assert!(output.is_error, "{output:?}"),
        Err(error) => assert!(error.to_string().contains("time"), "{error}"),
    }
}

async fn a_server_that_never_answers_initialize_offers_nothing_and_is_stopped(kind: Kind) {
    let Some(fixture) = fixture(kind).await else {
        return;
    };
    let marker = kind.marker(1);
    let command = vec![
        kind.python(),
        "-c".into(),
        "import sys, time; sys.stderr.write('waiting for a licence key\\n'); sys.stderr.flush(); time.sleep(3600)".into(),
        marker.clone(),
    ];
    let config = server("mute", command)
        .with_timeouts(Duration::from_secs(3), Duration::from_secs(5))
        .unwrap();
    let session = McpSession::new(vec![config], EgressPolicy::default()).unwrap();
    let started = Instant::now();
    assert!(session.tools(&fixture.sandbox).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        gone(&marker, Duration::from_secs(10)).await,
        "{marker} still runs"
    );

    // Within the back-off the call fails at once, saying why.
    let error = session
        .call(&fixture.sandbox, "mute__anything", serde_json::Map::new())
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, McpError::BackingOff { .. }), "{error:?}");
    assert!(text.contains("startup timeout (3 s)"), "{text}");
    assert!(text.contains("waiting for a licence key"), "{text}");
}

async fn a_server_that_exits_at_once_is_reported_with_its_stderr(kind: Kind) {
    let Some(fixture) = fixture(kind).await else {
        return;
    };
    let command = vec![
        kind.python(),
        "-c".into(),
        "import sys; sys.stderr.write('boom: no configuration file\\n'); sys.exit(3)".into(),
    ];
    let bad = session(server("bad", command));
    assert!(bad.tools(&fixture.sandbox).await.is_empty());
    let error = bad
        .call(&fixture.sandbox, "bad__anything", serde_json::Map::new())
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the MCP server `bad` exited (code 3): boom: no configuration file"
    );

    // A program that is not there: the sandbox's shell-like 127.
    let missing = session(server("none", vec!["/nonexistent/mcp-server".into()]));
    let error = missing
        .call(&fixture.sandbox, "none__anything", serde_json::Map::new())
        .await
        .unwrap_err();
    // 127 or 126 (the namespace backend says 126 for ENOENT), and why.
    assert!(
        matches!(&error, McpError::Exited { status, stderr, .. }
            if status.starts_with("code 12") && stderr.contains("/nonexistent/mcp-server")),
        "{error:?}"
    );
}

async fn a_crash_during_a_call_is_reported_and_the_next_call_restarts_it(kind: Kind) {
    let Some(fixture) = fixture(kind).await else {
        return;
    };
    let marker = kind.marker(2);
    let session = session(server("hand", hand_made(kind, &marker)));
    let echo = |text: &str| arguments(json!({"text": text}));
    let output = session
        .call(&fixture.sandbox, "hand__echo", echo("one"))
        .await
        .unwrap();
    assert_eq!(output.content, "one");
    assert!(
        support::processes_with(&marker) > 0,
        "the server's command line is seen on the host"
    );

    let error = session
        .call(&fixture.sandbox, "hand__crash", serde_json::Map::new())
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the MCP server `hand` exited (code 1): Traceback: something broke in crash"
    );
    let output = session
        .call(&fixture.sandbox, "hand__echo", echo("two"))
        .await
        .unwrap();
    assert_eq!(output.content, "two");

    // Dropping the session stops its servers.
    drop(session);
    assert!(
        gone(&marker, Duration::from_secs(10)).await,
        "{marker} still runs"
    );
}

async fn a_call_past_its_timeout_kills_the_server(kind: Kind) {
    let Some(fixture) = fixture(kind).await else {
        return;
    };
    let marker = kind.marker(3);
    let config = server("hand", hand_made(kind, &marker))
        .with_timeouts(Duration::from_secs(60), Duration::from_secs(2))
        .unwrap();
    let session = session(config);
    let started = Instant::now();
    let error = session
        .call(&fixture.sandbox, "hand__hang", serde_json::Map::new())
        .await
        .unwrap_err();
    assert!(matches!(error, McpError::Timeout { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        gone(&marker, Duration::from_secs(10)).await,
        "{marker} still runs"
    );

    let output = session
        .call(
            &fixture.sandbox,
            "hand__echo",
            arguments(json!({"text": "back"})),
        )
        .await
        .unwrap();
    assert_eq!(output.content, "back");
}

async fn a_server_that_floods_stdout_is_stopped(kind: Kind) {
    let Some(fixture) = fixture(kind).await else {
        return;
    };
    let marker = kind.marker(4);
    let command = vec![
        kind.python(),
        "-c".into(),
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)".into(),
        marker.clone(),
    ];
    let session = session(server("flood", command));
    assert!(session.tools(&fixture.sandbox).await.is_empty());
    assert!(
        gone(&marker, Duration::from_secs(10)).await,
        "{marker} still runs"
    );
    let error = session
        .call(&fixture.sandbox, "flood__anything", serde_json::Map::new())
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the MCP server `flood` sent a message larger than 4 MiB; it was stopped"
    );
}
