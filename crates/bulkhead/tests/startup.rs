//! Starting `bulkhead serve` the ways people do: on a folder it may not
//! write, on a database that is not up, beside a server already running on
//! the same data, and interrupted before it serves.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use bulkhead_testing::{DbKind, TestDb};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Process, bulkhead, serve};

/// The uid of the published image's user.
const NON_ROOT: u32 = 65532;

/// `bulkhead serve` with `env`, which is expected to stop during start-up
/// within `within`; returns it exited, with its output.
fn serve_expecting_exit(
    command: std::process::Command,
    env: &[(&str, &str)],
    within: Duration,
) -> (Process, std::process::ExitStatus) {
    let mut command = command;
    command
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("LOG_FORMAT", "json");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut process = Process::spawn(command);
    let status = process.wait_exit(within);
    (process, status)
}

fn stderr_line(process: &Process) -> String {
    let stderr = process.stderr.lock().unwrap().clone();
    assert_eq!(stderr.len(), 1, "one line on stderr: {stderr:?}");
    stderr[0].clone()
}

/// A folder anyone may enter (tempdir makes them 0700), owned by root.
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A non-root user against a root-owned 0755 folder (what `sudo` leaves
/// behind, or an image's folder owned by root), and against a database file
/// root made in a folder the user may write: both stop start-up at once,
/// with one line naming the path, the uid and the fix.
#[test]
fn a_database_path_the_uid_cannot_write_stops_start_up_at_once() {
    let dir = open_tempdir();
    let root_owned = dir.path().join("root-owned");
    std::fs::create_dir(&root_owned).unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(shared.join("bulkhead.db"), b"").unwrap();
    std::fs::set_permissions(
        shared.join("bulkhead.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    for (database, named) in [
        (root_owned.join("bulkhead.db"), root_owned.clone()),
        (shared.join("bulkhead.db"), shared.join("bulkhead.db")),
    ] {
        let url = format!("sqlite://{}", database.display());
        let mut command = bulkhead(dir.path());
        command
            .arg("serve")
            .uid(NON_ROOT)
            .gid(NON_ROOT)
            .env("SANDBOX_ROOT", shared.join("sandboxes"));
        let started = Instant::now();
        let (process, status) =
            serve_expecting_exit(command, &[("DATABASE_URL", &url)], Duration::from_secs(5));
        assert!(!status.success(), "{}", process.all_output());
        assert!(started.elapsed() < Duration::from_secs(5));
        let line = stderr_line(&process);
        for expected in [
            named.display().to_string(),
            format!("uid {NON_ROOT}"),
            "permission denied".into(),
            format!("chown -R {NON_ROOT}"),
        ] {
            assert!(line.contains(&expected), "{expected:?} in {line}");
        }
        assert!(
            !process.all_output().contains("not reachable yet"),
            "a file is not retried: {}",
            process.all_output()
        );
    }
}

/// A data folder on a filesystem mounted read-only: a tmpfs remounted `ro`
/// in a mount namespace of the server's own, so the test leaves no mount
/// behind even if it fails.
#[test]
fn a_read_only_database_folder_stops_start_up_at_once() {
    let dir = open_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut command = std::process::Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(r#"mount -t tmpfs tmpfs "$1"; mount -o remount,ro "$1"; shift; exec "$@""#)
        .arg("sh")
        .arg(&data)
        .arg(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SECRETS_DIR", dir.path().join("no-secrets"))
        .env("SANDBOX_ROOT", dir.path().join("sandboxes"))
        .current_dir(dir.path());
    let url = format!("sqlite://{}/bulkhead.db", data.display());
    let started = Instant::now();
    let (process, status) =
        serve_expecting_exit(command, &[("DATABASE_URL", &url)], Duration::from_secs(5));
    assert!(!status.success(), "{}", process.all_output());
    assert!(started.elapsed() < Duration::from_secs(5));
    let line = stderr_line(&process);
    for expected in [
        data.display().to_string(),
        "uid 0".into(),
        "read-only file system".into(),
        "writable volume".into(),
    ] {
        assert!(line.contains(&expected), "{expected:?} in {line}");
    }
}

/// PostgreSQL that is not up (yet) is a server that may come: retried,
/// and every attempt says what the connection met, not "pool timed out".
#[test]
fn a_postgres_nobody_listens_on_is_retried_with_the_real_error() {
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_port();
    let url = format!("postgres://bulkhead:hunter2hunter2@127.0.0.1:{closed}/bulkhead");
    let mut command = bulkhead(dir.path());
    command.arg("serve");
    let (process, status) = serve_expecting_exit(
        command,
        &[
            ("DATABASE_URL", &url),
            ("DATABASE_CONNECT_TIMEOUT_SECONDS", "2"),
        ],
        Duration::from_secs(15),
    );
    assert!(!status.success());
    let output = process.all_output();
    let retries: Vec<Value> = process
        .stdout
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == "database not reachable yet")
        .collect();
    assert!(retries.len() >= 2, "retried: {output}");
    for retry in &retries {
        let error = retry["error"].as_str().unwrap().to_lowercase();
        assert!(error.contains("connection refused"), "{retry}");
    }
    assert!(
        !output.to_lowercase().contains("pool timed out"),
        "{output}"
    );
    assert!(!output.contains("hunter2"), "{output}");
    assert!(
        stderr_line(&process)
            .to_lowercase()
            .contains("connection refused"),
        "{output}"
    );
}

/// Ctrl-C or SIGTERM while start-up waits for a database ends the process
/// at once, with the shell's code for that signal.
#[test]
fn a_signal_during_start_up_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://bulkhead@127.0.0.1:{}/bulkhead", closed_port());
    for (signal, code) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let mut command = bulkhead(dir.path());
        command
            .arg("serve")
            .env("LOG_FORMAT", "json")
            .env("PORT", "0")
            .env("DATABASE_URL", &url)
            .env("DATABASE_CONNECT_TIMEOUT_SECONDS", "60");
        let mut process = Process::spawn(command);
        process.wait_for("a retry", |line| {
            line.contains("database not reachable yet").then_some(())
        });
        std::thread::sleep(Duration::from_millis(700));
        let sent = Instant::now();
        process.signal(signal);
        let status = process.wait_exit(Duration::from_millis(1500));
        assert!(sent.elapsed() < Duration::from_millis(1500));
        assert_eq!(status.code(), Some(code), "{}", process.all_output());
        assert!(
            !process.all_output().contains("listening"),
            "{}",
            process.all_output()
        );
    }
}

/// Two `serve` on the same data (same folder, another port): the second
/// refuses before touching anything and names the first; the first keeps
/// its workspace and its run in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_refuses_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (first, url) = serve(dir.path(), &[]);
    let client = reqwest::Client::new();
    let agent = |body: Value| {
        let client = client.clone();
        let url = format!("{url}/agent");
        async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let wrote = agent(json!({
        "message": r#"tool:write_file {"path": "keep.txt", "content": "mine"}"#
    }))
    .await;
    let session = wrote["session_id"].as_str().unwrap().to_string();
    // A second session's run is in flight while the second server starts.
    let in_flight = tokio::spawn(agent(json!({
        "message": r#"tool:shell {"command": "sleep 2; echo done"}"#
    })));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let (second, status) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            let mut command = bulkhead(&dir);
            command.arg("serve");
            serve_expecting_exit(command, &[], Duration::from_secs(5))
        }
    })
    .await
    .unwrap();
    assert!(!status.success(), "{}", second.all_output());
    assert!(started.elapsed() < Duration::from_secs(5));
    let line = stderr_line(&second);
    assert!(
        line.contains(&format!("pid {}", first.child.id())),
        "{line}"
    );
    assert!(line.contains("bulkhead.db"), "{line}");

    let done = in_flight.await.unwrap();
    assert!(
        done["response"].as_str().unwrap().contains("done"),
        "{done}"
    );
    let read = agent(json!({
        "message": r#"tool:read_file {"path": "keep.txt"}"#,
        "session_id": session,
    }))
    .await;
    assert!(
        read["response"].as_str().unwrap().contains("mine"),
        "{read}"
    );
    for session in [&session, done["session_id"].as_str().unwrap()] {
        let runs: Value = client
            .get(format!("{url}/sessions/{session}/runs"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for run in runs["runs"].as_array().unwrap() {
            assert_eq!(run["status"], "completed", "{runs}");
        }
    }
}

/// Replicas share a PostgreSQL database on purpose, so only a local
/// sandbox root is theirs alone: two with their own roots both serve, a
/// third on a root in use refuses and names its holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_lock_only_their_sandbox_root() {
    let db = TestDb::new(DbKind::Postgres).await;
    let dir = db.dir.path();
    let root = |name: &str| dir.join(name).display().to_string();
    let (first, _) = serve(
        dir,
        &[("DATABASE_URL", &db.url), ("SANDBOX_ROOT", &root("a"))],
    );
    let (_second, _) = serve(
        dir,
        &[("DATABASE_URL", &db.url), ("SANDBOX_ROOT", &root("b"))],
    );
    let mut command = bulkhead(dir);
    command.arg("serve");
    let (third, status) = tokio::task::spawn_blocking({
        let (url, root) = (db.url.clone(), root("a"));
        move || {
            serve_expecting_exit(
                command,
                &[("DATABASE_URL", &url), ("SANDBOX_ROOT", &root)],
                Duration::from_secs(5),
            )
        }
    })
    .await
    .unwrap();
    assert!(!status.success(), "{}", third.all_output());
    let line = stderr_line(&third);
    assert!(
        line.contains(&format!("pid {}", first.child.id())),
        "{line}"
    );
    assert!(line.contains("SANDBOX_ROOT"), "{line}");
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Started with no authentication and no `HOST`, the server listens on
/// loopback only and says so loudly, with how to change it; production
/// without `AUTH_MODE` requires keys.
#[test]
fn an_unauthenticated_server_listens_on_loopback_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let listening = |env: &[(&str, &str)]| {
        let mut command = bulkhead(dir.path());
        command
            .arg("serve")
            .env("PORT", "0")
            .env("LOG_FORMAT", "json");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut server = Process::spawn(command);
        let address = server.wait_for("the listening line", |line| {
            let event: Value = serde_json::from_str(line).ok()?;
            (event["message"] == "listening")
                .then(|| event["address"].as_str().unwrap().to_string())
        });
        server.signal(Signal::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(10)).success());
        let events: Vec<Value> = server
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (address, events)
    };
    let said = |events: &[Value], level: &str, needle: &str| {
        events
            .iter()
            .any(|e| e["level"] == level && e["message"].as_str().unwrap_or("").contains(needle))
    };

    let (address, events) = listening(&[]);
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    assert!(
        said(&events, "WARN", "AUTHENTICATION IS OFF") && said(&events, "WARN", "HOST=0.0.0.0"),
        "{events:?}"
    );

    let (address, events) = listening(&[("HOST", "0.0.0.0")]);
    assert!(
        address.starts_with("0.0.0.0:"),
        "an explicit HOST is obeyed: {address}"
    );
    assert!(said(&events, "WARN", "AUTHENTICATION IS OFF"), "{events:?}");

    let (address, events) = listening(&[
        ("AGENT_MODE", "production"),
        ("MODEL_ENDPOINT", "http://127.0.0.1:9/v1"),
    ]);
    assert!(address.starts_with("0.0.0.0:"), "{address}");
    assert!(said(&events, "INFO", "API keys required"), "{events:?}");
    assert!(!said(&events, "WARN", "AUTHENTICATION IS OFF"));
}

/// A bad agents file stops start-up at once, with one line naming the
/// file, the agent and the field, and what was expected there.
#[test]
fn a_bad_agents_file_stops_start_up_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents.yaml");
    std::fs::write(
        &file,
        "agents:\n  - id: support\n    model:\n      temperature: 7\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let mut command = bulkhead(dir.path());
    command.arg("serve");
    let started = Instant::now();
    let (process, status) =
        serve_expecting_exit(command, &[("AGENTS_FILE", &file)], Duration::from_secs(5));
    assert!(!status.success(), "{}", process.all_output());
    assert!(started.elapsed() < Duration::from_secs(5));
    let line = stderr_line(&process);
    for expected in [
        file.as_str(),
        "agent \"support\"",
        "model.temperature",
        "expected a number from 0 to 2",
    ] {
        assert!(line.contains(expected), "{expected:?} in {line}");
    }
}
