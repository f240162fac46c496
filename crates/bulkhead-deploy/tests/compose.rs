//! compose.yaml on a real Docker Engine with docker-compose 1.29: the stack
//! comes up healthy, answers `/agent` with tool calls in sandboxes made by
//! sandboxd (the agent container holds no socket), keeps conversations
//! across `down` and `up`, and rides out a PostgreSQL outage.

use std::time::{Duration, Instant};

use bulkhead_deploy::{Compose, build_image, docker, free_port};
use serde_json::{Value, json};

const FILES: &[&str] = &["compose.yaml", "deploy/compose/mock-model.yaml"];
const SERVICES: &[&str] = &["bulkhead", "sandboxd", "postgres", "model"];

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    match client.get(url).send().await {
        Ok(response) => (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        ),
        Err(_) => (0, Value::Null),
    }
}

async fn wait_for_status(
    client: &reqwest::Client,
    url: &str,
    status: u16,
    within: Duration,
) -> Value {
    let started = Instant::now();
    loop {
        let (got, body) = get(client, url).await;
        if got == status {
            return body;
        }
        assert!(
            started.elapsed() < within,
            "{url} answered {got} {body}, not {status}, for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn agent(client: &reqwest::Client, base: &str, body: Value) -> Value {
    let response = client
        .post(format!("{base}/agent"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_runs_keeps_its_data_and_survives_a_database_outage() {
    build_image();
    let port = free_port().to_string();
    let compose = Compose::new(FILES, &[("BULKHEAD_PORT", &port)]);
    compose.run(&["up", "-d", "--no-build"]);
    compose.wait_healthy(SERVICES, Duration::from_secs(90));

    // Production mode: every route but the probes needs a key, made in
    // the container as the README shows.
    let key = compose.run(&[
        "exec",
        "-T",
        "bulkhead",
        "/bulkhead",
        "keys",
        "create",
        "--name",
        "compose-test",
    ]);
    let client = bulkhead_deploy::client_with_key(&key);
    let base = format!("http://127.0.0.1:{port}");
    let ready = wait_for_status(
        &client,
        &format!("{base}/ready"),
        200,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        ready["checks"]["database"]["backend"], "postgres",
        "{ready}"
    );
    assert!(
        ready["checks"]["redis"].is_null(),
        "no Redis in the default stack: {ready}"
    );
    assert_eq!(ready["checks"]["sandbox"]["backend"], "remote", "{ready}");
    assert_eq!(ready["checks"]["model"]["kind"], "remote", "{ready}");

    // A tool call runs in a sandbox container that sandboxd made.
    let first = agent(
        &client,
        &base,
        json!({"message": r#"tool:shell {"command": "id -u; cat /proc/1/cgroup | grep -c docker"}"#}),
    )
    .await;
    let session = first["session_id"].as_str().unwrap().to_string();
    assert!(
        first["response"]
            .as_str()
            .unwrap()
            .starts_with("tool result: exit code: 0\nstdout:\n1000\n"),
        "{first}"
    );
    let (_, audit) = get(&client, &format!("{base}/sessions/{session}/audit")).await;
    let record = &audit["tool_calls"][0];
    assert_eq!(record["backend"], "remote", "{audit}");
    assert_eq!(record["limits"]["memory_bytes"], 256 << 20, "{audit}");
    let sandboxes = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=dev.bulkhead.session={session}"),
    ]);
    assert_eq!(sandboxes.lines().count(), 1, "one sandbox: {sandboxes:?}");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.NetworkMode}} {{.Config.User}}",
            &sandboxes
        ]),
        "none 1000:1000"
    );

    // The agent's container: no engine socket, nothing extra; published on
    // loopback only.
    let bulkhead = compose.container("bulkhead");
    let inspect: Value = serde_json::from_str(&docker(&["inspect", &bulkhead])).unwrap();
    let inspect = &inspect[0];
    assert_eq!(
        inspect["HostConfig"]["PortBindings"]["8000/tcp"][0]["HostIp"], "127.0.0.1",
        "{}",
        inspect["HostConfig"]["PortBindings"]
    );
    let mounts = inspect["Mounts"].to_string();
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    assert!(
        !mounts.contains("\"Destination\":\"/data\""),
        "no anonymous volume for the unused data folder: {mounts}"
    );
    assert_eq!(inspect["HostConfig"]["CapDrop"], json!(["ALL"]));
    assert_eq!(inspect["HostConfig"]["CapAdd"], Value::Null);
    assert_eq!(inspect["HostConfig"]["Privileged"], false);
    assert_eq!(inspect["HostConfig"]["ReadonlyRootfs"], true);
    assert_eq!(inspect["HostConfig"]["Memory"], 256 << 20);
    assert_eq!(inspect["HostConfig"]["NanoCpus"], 1_000_000_000u64);
    assert_eq!(inspect["Config"]["User"], "65532:65532");
    assert!(
        inspect["HostConfig"]["SecurityOpt"]
            .to_string()
            .contains("no-new-privileges"),
        "{}",
        inspect["HostConfig"]
    );
    for service in ["postgres", "sandboxd", "model"] {
        let id = compose.container(service);
        assert_eq!(
            docker(&[
                "inspect",
                "-f",
                "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.RestartPolicy.Name}}",
                &id
            ]),
            "true unless-stopped",
            "{service}"
        );
        assert_ne!(
            docker(&["inspect", "-f", "{{.HostConfig.Memory}}", &id]),
            "0",
            "{service}"
        );
    }
    // The model key is a file secret: never in the environment.
    let environment = inspect["Config"]["Env"].to_string();
    assert!(
        !environment.contains("sk-compose-test-canary"),
        "{environment}"
    );
    let logs = docker(&["logs", &bulkhead]);
    assert!(!logs.contains("sk-compose-test-canary"));

    // down and up: the conversation is in the volume.
    compose.run(&["down", "-t", "10"]);
    assert_eq!(
        docker(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=dev.bulkhead.session={session}"),
        ]),
        "",
        "sandboxd removes its sandboxes when it stops"
    );
    compose.run(&["up", "-d", "--no-build"]);
    compose.wait_healthy(SERVICES, Duration::from_secs(90));
    wait_for_status(
        &client,
        &format!("{base}/ready"),
        200,
        Duration::from_secs(20),
    )
    .await;
    let (status, kept) = get(&client, &format!("{base}/sessions/{session}")).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(
        kept["messages"][0]["content"],
        json!(r#"tool:shell {"command": "id -u; cat /proc/1/cgroup | grep -c docker"}"#)
    );
    let again = agent(
        &client,
        &base,
        json!({"message": "still there?", "session_id": session}),
    )
    .await;
    assert_eq!(again["response"], "echo: still there?");

    // PostgreSQL stops: not ready, still alive; back: ready, no restart.
    let started_at = docker(&[
        "inspect",
        "-f",
        "{{.State.StartedAt}}",
        &compose.container("bulkhead"),
    ]);
    compose.run(&["stop", "postgres"]);
    let not_ready = wait_for_status(
        &client,
        &format!("{base}/ready"),
        503,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        not_ready["checks"]["database"]["status"], "fail",
        "{not_ready}"
    );
    // The database is what this replica cannot serve without: the
    // orchestrator's probe fails too.
    assert_eq!(get(&client, &format!("{base}/ready/replica")).await.0, 503);
    assert_eq!(get(&client, &format!("{base}/health")).await.0, 200);
    compose.run(&["start", "postgres"]);
    wait_for_status(
        &client,
        &format!("{base}/ready"),
        200,
        Duration::from_secs(30),
    )
    .await;
    let after = agent(
        &client,
        &base,
        json!({"message": "recovered", "session_id": session}),
    )
    .await;
    assert_eq!(after["response"], "echo: recovered");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.State.StartedAt}}",
            &compose.container("bulkhead")
        ]),
        started_at,
        "bulkhead was not restarted"
    );
}

#[test]
fn the_compose_files_are_valid_for_docker_compose_1_29() {
    for files in [
        &["compose.yaml"][..],
        FILES,
        &["deploy/compose/multi-agent.yaml"][..],
    ] {
        let compose = Compose::new(files, &[]);
        let config = compose.run(&["config"]);
        assert!(config.contains("services:"), "{config}");
    }
}
