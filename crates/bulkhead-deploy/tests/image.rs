//! The image built from the root Dockerfile, run on a real Docker Engine:
//! small, non-root, healthy fast, fine with a read-only root and no
//! capabilities, serving `/agent` through a published port, and stopping
//! cleanly on SIGTERM with a request in flight.

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_deploy::{IMAGE, build_image, docker, unique_suffix};
use serde_json::{Value, json};

/// Containers and a network made for one test, removed afterwards.
struct Scene {
    suffix: String,
    containers: Vec<String>,
}

impl Scene {
    fn new() -> Scene {
        let suffix = unique_suffix();
        docker(&["network", "create", &format!("bulkhead-test-{suffix}")]);
        Scene {
            suffix,
            containers: Vec::new(),
        }
    }

    fn network(&self) -> String {
        format!("bulkhead-test-{}", self.suffix)
    }

    fn run(&mut self, name: &str, args: &[&str]) -> String {
        let name = format!("{name}-{}", self.suffix);
        let network = self.network();
        let mut all = vec!["run", "-d", "--name", &name, "--network", &network];
        all.extend_from_slice(args);
        docker(&all);
        self.containers.push(name.clone());
        name
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", container])
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network()])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_is_small_non_root_healthy_and_stops_cleanly() {
    build_image();
    let size: u64 = docker(&["image", "inspect", "-f", "{{.Size}}", IMAGE])
        .parse()
        .unwrap();
    // A guard against bloat, not the target: the 15 MB budget lives in
    // bench/run, and BENCHMARKS.md says where the image stands against it
    // (25.2 MB with agents, MCP, the OpenAI facade and the LangGraph API)
    // and what would win it back.
    assert!(size <= 26 << 20, "the image is {size} bytes, over 26 MiB");
    assert_eq!(
        docker(&["image", "inspect", "-f", "{{.Config.User}}", IMAGE]),
        "65532:65532"
    );

    let mut scene = Scene::new();
    let mock = scene.run(
        "mock",
        &[
            IMAGE,
            "mock-model",
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
            "--latency-ms",
            "1500",
        ],
    );
    let started = Instant::now();
    let server = scene.run(
        "bulkhead",
        &[
            "-p",
            "127.0.0.1::8000",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            "/data:uid=65532,gid=65532,mode=0700",
            "-e",
            &format!("MODEL_ENDPOINT=http://{mock}:8080/v1"),
            IMAGE,
        ],
    );
    let mut health = String::new();
    while started.elapsed() < Duration::from_secs(5) {
        health = docker(&["inspect", "-f", "{{.State.Health.Status}}", &server]);
        if health == "healthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health,
        "healthy",
        "healthy within 5 s: {}",
        docker(&["logs", &server])
    );

    let processes = docker(&["top", &server, "-o", "pid,uid,args"]);
    assert!(
        processes
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().nth(1) == Some("65532")),
        "runs as uid 65532: {processes}"
    );

    let port = docker(&["port", &server, "8000"]);
    let address = port.lines().next().unwrap().to_string();
    // The image runs in production: a key, made in the container.
    let key = docker(&[
        "exec",
        &server,
        "/bulkhead",
        "keys",
        "create",
        "--name",
        "image-test",
    ]);
    assert!(key.starts_with("bk_"), "{key}");
    let refused = reqwest::Client::new()
        .post(format!("http://{address}/agent"))
        .json(&json!({"message": "no key"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let client = bulkhead_deploy::client_with_key(&key);
    let body: Value = client
        .post(format!("http://{address}/agent"))
        .json(&json!({"message": "from the image"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["response"], "echo: from the image", "{body}");

    // SIGTERM (docker stop) with a slow request in flight: it answers, and
    // the container exits 0 within the grace.
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = format!("http://{address}/agent");
        async move {
            let response = client
                .post(url)
                .json(&json!({"message": "finish me", "session_id": body["session_id"]}))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopping = Instant::now();
    docker(&["stop", "-t", "10", &server]);
    assert!(
        stopping.elapsed() < Duration::from_secs(9),
        "stopped within the grace"
    );
    let (status, answer) = in_flight.await.unwrap();
    assert_eq!(
        (status, answer["response"].as_str()),
        (200, Some("echo: finish me")),
        "{answer}"
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &server]),
        "0"
    );
    let logs = docker(&["logs", &server]);
    assert!(
        logs.contains("\"signal\":\"SIGTERM\"") && logs.contains("stopped"),
        "{logs}"
    );
}
