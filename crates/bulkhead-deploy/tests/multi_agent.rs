//! deploy/compose/multi-agent.yaml on a real Docker Engine: a task flows
//! planner → executor → critic; the planner reaches nothing beyond the
//! internal network while the executor reaches a host on the egress
//! network; the executor's tool calls run in sandboxes that sandboxd makes,
//! with their limits, and the executor holds no engine socket.

use std::process::Command;
use std::time::Duration;

use bulkhead_deploy::{Compose, IMAGE, build_image, docker, sandbox_image, unique_suffix};
use serde_json::Value;

const FILE: &str = "deploy/compose/multi-agent.yaml";
const SERVICES: &[&str] = &["planner", "executor", "critic", "model", "sandboxd"];

/// Posts `task` to the planner from a client on the internal network (the
/// planner is published nowhere) and returns its answer and run events.
fn ask_planner(network: &str, task: &str) -> Value {
    const CLIENT: &str = r#"
import json, sys, urllib.request, urllib.error
request = urllib.request.Request(
    "http://planner:8000/agent",
    data=json.dumps({"message": sys.argv[1]}).encode(),
    headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.load(response)
except urllib.error.HTTPError as error:
    body = json.load(error)
events = []
if "run_id" in body:
    with urllib.request.urlopen("http://planner:8000/runs/%s/events" % body["run_id"], timeout=10) as response:
        events = json.load(response)["events"]
print(json.dumps({"body": body, "events": events}))
"#;
    let output = docker(&[
        "run",
        "--rm",
        "--network",
        network,
        &sandbox_image(),
        "python3",
        "-c",
        CLIENT,
        task,
    ]);
    serde_json::from_str(&output).unwrap_or_else(|_| panic!("not JSON: {output}"))
}

/// Whether `url` answers 2xx from inside `container`'s network namespace.
fn reaches(container: &str, url: &str) -> bool {
    Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            &format!("container:{container}"),
            IMAGE,
            "healthcheck",
            "--url",
            url,
            "--timeout-ms",
            "2000",
        ])
        .output()
        .expect("docker runs")
        .status
        .success()
}

fn address_on(container: &str, network: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        container,
    ])
}

/// This machine's own address on its main interface: a place outside every
/// Docker network.
fn host_address() -> String {
    let output = Command::new("ip")
        .args(["-4", "-o", "route", "get", "192.0.2.1"])
        .output()
        .expect("ip runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.split_whitespace()
        .skip_while(|word| *word != "src")
        .nth(1)
        .unwrap_or_else(|| panic!("no source address in {text:?}"))
        .to_string()
}

struct Outside(String);

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[test]
fn a_task_flows_through_planner_executor_and_critic_on_isolated_networks() {
    build_image();
    let compose = Compose::new(&[FILE], &[]);
    compose.run(&["up", "-d", "--no-build"]);
    compose.wait_healthy(SERVICES, Duration::from_secs(90));
    let internal = format!("{}_internal", compose.project);
    let egress = format!("{}_egress", compose.project);

    let task = "say:tool:shell {\"command\": \"id -u; echo checked > note.txt\"}\n\
                tool:read_file {\"path\": \"note.txt\"}";
    let answer = ask_planner(&internal, task);
    let body = &answer["body"];
    let response = body["response"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(
        response.starts_with(
            "Plan:\n1. tool:shell {\"command\": \"id -u; echo checked > note.txt\"}\n\
             2. tool:read_file {\"path\": \"note.txt\"}\n\n\
             Results:\n1. tool result: exit code: 0\nstdout:\n1000\n"
        ),
        "{response}"
    );
    assert!(
        response.contains("2. tool result: checked\n\n\nReview:\necho: Task:\n"),
        "the second step read the first one's file; the critic saw it all: {response}"
    );
    let kinds: Vec<&str> = answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "delegated").count(),
        3,
        "two steps to the executor, one review by the critic: {kinds:?}"
    );

    // The tool calls ran in a sandbox sandboxd made, with its limits.
    let sandbox = docker(&[
        "ps",
        "-q",
        "--filter",
        "label=dev.bulkhead.sandbox=executor",
    ]);
    assert_eq!(sandbox.lines().count(), 1, "{sandbox:?}");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.NetworkMode}} {{.Config.User}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}} {{.HostConfig.ReadonlyRootfs}}",
            &sandbox
        ]),
        format!("none 1000:1000 {} 128 true", 256 << 20)
    );
    let executor = compose.container("executor");
    let mounts = docker(&[
        "inspect",
        "-f",
        "{{json .Mounts}} {{.HostConfig.CapDrop}}",
        &executor,
    ]);
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    assert!(mounts.ends_with("[ALL]"), "{mounts}");
    let logs = docker(&["logs", &executor]);
    assert!(
        logs.contains("\"message\":\"tool call audited\"")
            && logs.contains("\"backend\":\"remote\""),
        "{logs}"
    );
    let critic_logs = docker(&["logs", &compose.container("critic")]);
    assert!(critic_logs.contains("run completed"), "{critic_logs}");

    // A host on the egress network: the executor reaches it, the planner
    // does not; the planner reaches its peers but nothing outside.
    let outside = Outside(format!("bulkhead-outside-{}", unique_suffix()));
    docker(&[
        "run",
        "-d",
        "--name",
        &outside.0,
        "--network",
        &egress,
        IMAGE,
        "mock-model",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
    ]);
    let outside_url = format!("http://{}:9000/v1/models", address_on(&outside.0, &egress));
    let planner = compose.container("planner");
    let executor_url = format!("http://{}:8000/health", address_on(&executor, &internal));
    let mut reached = false;
    for _ in 0..20 {
        reached = reaches(&executor, &outside_url);
        if reached {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(reached, "the executor reaches {outside_url}");
    assert!(
        reaches(&planner, &executor_url),
        "the planner reaches the executor"
    );
    assert!(
        !reaches(&planner, &outside_url),
        "the planner must not reach {outside_url}"
    );
    // And a listener on this machine's own address: the executor's
    // networks route to it, the planner's do not.
    let listener = std::net::TcpListener::bind((host_address().as_str(), 0)).unwrap();
    let host = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut request = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    assert!(reaches(&executor, &host), "the executor reaches {host}");
    assert!(
        !reaches(&planner, &host),
        "the planner must not reach {host}"
    );
    assert!(!reaches(&compose.container("critic"), &outside_url));
}
