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

/// A machine beyond this one, as far as routing goes: a network namespace
/// joined to the host by a veth pair, serving HTTP on port 80.
struct Beyond {
    namespace: String,
    address: String,
    url: String,
    server: std::process::Child,
}

impl Beyond {
    fn start() -> Beyond {
        let id = std::process::id() % 200 + 20;
        let namespace = format!("bh-beyond-{id}");
        let (host_side, inside) = (format!("bhb{id}h"), format!("bhb{id}n"));
        let (host_address, address) = (format!("10.253.{id}.1"), format!("10.253.{id}.2"));
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip runs");
            assert!(status.success(), "ip {args:?}");
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &host_side])
            .status();
        ip(&["netns", "add", &namespace]);
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &namespace]);
        ip(&[
            "addr",
            "add",
            &format!("{host_address}/24"),
            "dev",
            &host_side,
        ]);
        ip(&["link", "set", &host_side, "up"]);
        let in_namespace = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &namespace, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_namespace(&["addr", "add", &format!("{address}/24"), "dev", &inside]);
        in_namespace(&["link", "set", &inside, "up"]);
        in_namespace(&["link", "set", "lo", "up"]);
        in_namespace(&["route", "add", "default", "via", &host_address]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &namespace,
                "python3",
                "-m",
                "http.server",
                "80",
                "--bind",
                &address,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 serves HTTP");
        let url = format!("http://{address}/");
        for _ in 0..50 {
            let up = Command::new("ip")
                .args(["netns", "exec", &namespace, "python3", "-c"])
                .arg(format!(
                    "import urllib.request; urllib.request.urlopen('{url}', timeout=1)"
                ))
                .status()
                .is_ok_and(|s| s.success());
            if up {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Beyond {
            namespace,
            address,
            url,
            server,
        }
    }
}

impl Drop for Beyond {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}

struct Outside(String);

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.0])
            .output();
    }
}

#[test]
fn a_task_flows_through_planner_executor_and_critic_on_isolated_networks() {
    build_image();
    // A machine beyond this one, which the executor's tools may reach.
    let beyond = Beyond::start();
    let allowed = format!("{}:80", beyond.address);
    let compose = Compose::new(&[FILE], &[("EXECUTOR_EGRESS_ALLOW", &allowed)]);
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

    // The executor's tools reach the allowed host through its egress proxy
    // (the sandbox itself still has no network), and nothing else.
    let fetch = ask_planner(
        &internal,
        &format!(
            "say:tool:http_fetch {{\"url\": \"{}\"}}\ntool:http_fetch {{\"url\": \"http://{}:9000/v1/models\"}}",
            beyond.url, "192.0.2.1"
        ),
    );
    let response = fetch["body"]["response"]
        .as_str()
        .unwrap_or_else(|| panic!("{fetch}"));
    assert!(
        response.contains("Results:\n1. tool result: HTTP 200 OK"),
        "the allowed host answered: {response}"
    );
    assert!(
        response.contains("2. tool result: error:")
            && response.contains("is not in SANDBOX_EGRESS_ALLOW"),
        "any other host is refused: {response}"
    );

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
    // And the machine beyond this one: the executor's egress network routes
    // to it; the planner's internal network does not. (Docker's internal
    // networks do still let a container reach the host's own addresses:
    // see the README.)
    assert!(
        reaches(&executor, &beyond.url),
        "the executor reaches {}",
        beyond.url
    );
    assert!(
        !reaches(&planner, &beyond.url),
        "the planner must not reach {}",
        beyond.url
    );
    assert!(!reaches(&compose.container("critic"), &outside_url));
}
