//! Hostile tool calls, egress and the remote sandboxd, through the whole agent loop.

use super::*;

async fn hostile_tool_calls_are_contained_through_the_agent_loop(kind: DbKind) {
    hostile_tool_calls_are_contained(kind, "namespace").await
}

async fn hostile_tool_calls_are_contained_in_docker(kind: DbKind) {
    hostile_tool_calls_are_contained(kind, "docker").await
}

async fn hostile_tool_calls_are_contained(kind: DbKind, backend: &str) {
    let mut app = spawn_app_on(kind, backend).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cases: Vec<(&str, Value, Option<&str>, &str)> = vec![
        (
            "shell",
            json!({"command": "python3 -c 'import os\nwhile True:\n  try: os.fork()\n  except OSError: pass'", "timeout_seconds": 1}),
            Some("timeout"),
            "stopped by the sandbox: timeout",
        ),
        (
            "shell",
            json!({"command": "python3 -c 'x = bytearray(512 << 20)'"}),
            Some("oom"),
            "stopped by the sandbox: oom",
        ),
        (
            "shell",
            json!({"command": "while :; do :; done"}),
            Some("timeout"),
            "stopped by the sandbox: timeout",
        ),
        (
            "shell",
            json!({"command": "yes"}),
            Some("output_limit"),
            "stdout truncated",
        ),
        (
            "shell",
            json!({"command": "dd if=/dev/zero of=/tmp/x bs=1M count=64"}),
            Some("disk"),
            "stopped by the sandbox: disk",
        ),
        (
            "shell",
            json!({"command": "dd if=/dev/zero of=big bs=1M count=64"}),
            Some("disk"),
            "stopped by the sandbox: disk",
        ),
        (
            "shell",
            json!({"command": format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"")}),
            None,
            "exit code: 1",
        ),
        (
            "shell",
            json!({"command": "getent hosts example.com"}),
            None,
            "exit code: 2",
        ),
        (
            "shell",
            json!({"command": "cat /etc/shadow /proc/1/environ; ls /run/secrets"}),
            None,
            "No such file",
        ),
        (
            "shell",
            json!({"command": "touch /etc/evil /usr/evil"}),
            None,
            "Read-only file system",
        ),
        (
            "shell",
            json!({"command": "unshare -r id; mount -t tmpfs x /tmp; su root -c id"}),
            None,
            "exit code: 1",
        ),
        (
            "shell",
            json!({"command": "kill -9 1; echo alive"}),
            None,
            "alive",
        ),
        (
            "read_file",
            json!({"path": "../../etc/passwd"}),
            None,
            "outside the workspace",
        ),
        (
            "read_file",
            json!({"path": "/etc/passwd"}),
            None,
            "outside the workspace",
        ),
        (
            "write_file",
            json!({"path": "../x", "content": "x"}),
            None,
            "outside the workspace",
        ),
        (
            "list_dir",
            json!({"path": "/"}),
            None,
            "outside the workspace",
        ),
    ];
    for (tool, arguments, killed, expected) in cases {
        let (body, record) = call_tool(&app, None, tool, arguments.clone()).await;
        let response = body["response"].as_str().unwrap();
        assert!(
            response.contains(expected),
            "{tool} {arguments}: {response}"
        );
        assert_eq!(
            record["killed_reason"].as_str(),
            killed,
            "{tool} {arguments}: {record}"
        );
        assert_eq!(record["status"], "completed", "{record}");
        assert!(
            response.len() < 12_000,
            "the model gets a capped answer: {}",
            response.len()
        );
    }
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "nothing reached the host's listener"
    );
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "still healthy: {ready}");

    // Symlinks pointing out of the workspace.
    let (body, _) = call_tool(
        &app,
        None,
        "shell",
        json!({"command": "ln -s /etc/passwd p"}),
    )
    .await;
    let session = body["session_id"].as_str().unwrap().to_string();
    let (body, _) = call_tool(&app, Some(&session), "read_file", json!({"path": "p"})).await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("resolves outside the workspace"),
        "{body}"
    );
    let (body, _) = call_tool(
        &app,
        Some(&session),
        "write_file",
        json!({"path": "p", "content": "x"}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().contains("symbolic link"),
        "{body}"
    );
    app.shut_down().await.unwrap();
}

async fn http_fetch_reaches_allowed_hosts_only(kind: DbKind) {
    egress_is_allowlisted(kind, "namespace").await
}

async fn http_fetch_reaches_allowed_hosts_only_from_docker(kind: DbKind) {
    egress_is_allowlisted(kind, "docker").await
}

async fn egress_is_allowlisted(kind: DbKind, backend: &str) {
    let ip = bulkhead_testing::outside_address();
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let outside = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/hello",
            axum::routing::get(|| async { "hello from outside" })
                .post(|body: String| async move { format!("posted: {body}") }),
        );
        axum::serve(listener, app).await
    });
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let loopback_port = loopback.local_addr().unwrap().port();
    let allow = format!("{outside},localhost:{loopback_port}");
    let mut env = backend_env(backend);
    env.push(("SANDBOX_EGRESS_ALLOW".into(), allow));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut app = spawn_app(kind, &pairs).await;

    let (body, record) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": format!("http://{outside}/hello")}),
    )
    .await;
    let response = body["response"].as_str().unwrap();
    assert!(
        response.contains("HTTP 200 OK") && response.ends_with("hello from outside"),
        "{response}"
    );
    assert_eq!(record["status"], "completed");
    assert_eq!(record["backend"], backend);
    assert_eq!(record["egress_refusals"], json!([]), "{record}");

    let (body, _) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": format!("http://{outside}/hello"), "method": "POST", "body": "data"}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().ends_with("posted: data"),
        "{body}"
    );

    // Not on the list: refused before anything runs.
    let (body, record) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": "https://example.com/"}),
    )
    .await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("not in SANDBOX_EGRESS_ALLOW"),
        "{body}"
    );
    assert_eq!(record["status"], "refused");

    assert_eq!(record["egress_refusals"], Value::Null, "nothing ran");

    // On the list, but pointing at the host's loopback: the proxy refuses,
    // says why, and the refusal is on the call's record.
    let (body, record) = call_tool(
        &app,
        None,
        "http_fetch",
        json!({"url": format!("http://localhost:{loopback_port}/")}),
    )
    .await;
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains(&format!("localhost:{loopback_port} (")),
        "{body}"
    );
    let refusals = record["egress_refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 1, "{record}");
    assert_eq!(refusals[0]["host"], "localhost");
    assert_eq!(refusals[0]["port"], loopback_port);
    assert!(
        ["127.0.0.1", "::1"].contains(&refusals[0]["address"].as_str().unwrap())
            && refusals[0]["rule"]
                .as_str()
                .unwrap()
                .starts_with("loopback"),
        "{record}"
    );
    loopback.set_nonblocking(true).unwrap();
    assert!(
        loopback.accept().is_err(),
        "nothing reached the loopback listener"
    );

    // Shell commands have no network either way, only the proxy's socket.
    let (body, _) = call_tool(
        &app,
        None,
        "shell",
        json!({"command": format!("python3 -c \"import socket; socket.create_connection(('{ip}', {}), timeout=2)\"", outside.port())}),
    )
    .await;
    assert!(
        body["response"].as_str().unwrap().contains("exit code: 1"),
        "{body}"
    );
    app.shut_down().await.unwrap();
}

const SANDBOXD_TOKEN: &str = "api-test-sandboxd-token-0123456789";

/// sandboxd in-process on a loopback port, serving namespace sandboxes with
/// the given ceilings, as `bulkhead sandboxd` does.
async fn spawn_sandboxd(
    root: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> (u16, oneshot::Sender<()>, JoinHandle<()>) {
    let mut vars: std::collections::HashMap<String, String> = [
        ("SANDBOXD_TOKEN", SANDBOXD_TOKEN.to_string()),
        ("SANDBOX_ROOT", root.display().to_string()),
        ("SANDBOX_HELPER", sandbox_helper().display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (key, value) in env {
        vars.insert(key.to_string(), value.to_string());
    }
    let config = bulkhead_server::config::SandboxdConfig::from_env(&Environment::from_map(vars))
        .expect("valid sandboxd configuration");
    let factory = bulkhead_server::sandbox::sandboxd_factory(&config.sandbox).unwrap();
    let daemon = bulkhead_sandbox_remote::server::Daemon::new(
        &config.token,
        config.sandbox.limits.clone(),
        factory,
    );
    let idle = config.sandbox.idle;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        bulkhead_sandbox_remote::server::serve(listener, daemon, idle, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (port, stop, task)
}

/// The agent server holds no means to make a sandbox: sandboxd does, caps
/// the limits, and the tool calls are audited as usual.
async fn tools_run_through_a_remote_sandboxd(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let (port, stop, task) = spawn_sandboxd(
        dir.path(),
        0,
        &[("SANDBOX_PIDS", "16"), ("SANDBOX_TIMEOUT_SECONDS", "2")],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let scope = format!("api-{}", uuid::Uuid::new_v4().simple());
    let remote_env = [
        ("SANDBOX_BACKEND", "remote"),
        ("SANDBOX_REMOTE_URL", url.as_str()),
        ("SANDBOXD_TOKEN", SANDBOXD_TOKEN),
        ("SANDBOX_SCOPE", scope.as_str()),
        // Asks for more than sandboxd allows.
        ("SANDBOX_TIMEOUT_SECONDS", "600"),
        ("SANDBOX_HELPER", "/nonexistent/helper"),
    ];
    let mut app = spawn_app(kind, &remote_env).await;
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["backend"], "remote");

    let (body, record) = call_tool(&app, None, "shell", json!({"command": "echo hi; id -u"})).await;
    assert_eq!(
        body["response"],
        "tool result: exit code: 0\nstdout:\nhi\n1000\n"
    );
    let session = body["session_id"].as_str().unwrap().to_string();
    assert_eq!(record["backend"], "remote");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["limits"]["pids"], 16, "sandboxd's ceiling: {record}");
    assert_eq!(record["limits"]["timeout_ms"], 2000, "{record}");
    let (_, record) = call_tool(
        &app,
        Some(&session),
        "shell",
        json!({"command": "sleep 30"}),
    )
    .await;
    assert_eq!(record["killed_reason"], "timeout", "{record}");
    assert!(
        dir.path().join(&scope).exists(),
        "the sandbox lived on sandboxd's side, under the server's scope"
    );

    // sandboxd gone: tools are refused, readiness fails, liveness holds.
    let _ = stop.send(());
    task.await.unwrap();
    let (body, record) = call_tool(&app, Some(&session), "shell", json!({"command": "true"})).await;
    assert_eq!(record["status"], "refused", "{body}");
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["status"], "fail");
    assert!(
        !ready.to_string().contains(SANDBOXD_TOKEN),
        "the token never leaves: {ready}"
    );
    let (status, replica) = app.get("/ready/replica").await;
    assert_eq!(status, StatusCode::OK, "sandboxd is shared: {replica}");
    assert_eq!(replica["checks"]["sandbox"]["status"], "fail");
    assert_eq!(app.get("/health").await.0, StatusCode::OK);

    // Back again: the server recovers without a restart.
    let (_, stop, task) = spawn_sandboxd(dir.path(), port, &[]).await;
    let (body, record) = call_tool(
        &app,
        Some(&session),
        "shell",
        json!({"command": "echo back"}),
    )
    .await;
    assert_eq!(record["status"], "completed", "{body}");
    assert!(
        body["response"].as_str().unwrap().contains("back"),
        "{body}"
    );
    assert_eq!(app.get("/ready").await.0, StatusCode::OK);
    app.shut_down().await.unwrap();
    let _ = stop.send(());
    task.await.unwrap();
}

on_both_databases!(
    tools_run_through_a_remote_sandboxd,
    http_fetch_reaches_allowed_hosts_only,
    http_fetch_reaches_allowed_hosts_only_from_docker,
    hostile_tool_calls_are_contained_through_the_agent_loop,
    hostile_tool_calls_are_contained_in_docker,
);
