//! `/metrics` as Prometheus reads it: parsed by the Prometheus project's
//! own Python parser (`prometheus-client`, pinned by `scripts/ensure-tools`,
//! run as `tools-python3`), before and after what should move it.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{client_with_key, create_key, serve};

const METRICS_TOKEN: &str = "metrics-token-for-the-test-0123456789";

/// One sample of a scrape: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// A scrape as `prometheus_client.parser.text_string_to_metric_families`
/// reads it: the families' types by name, and every sample.
struct Scrape {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the sample with this name and these labels (others
    /// ignored), 0 when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .map(|s| s.value)
            .sum()
    }
}

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {"types": {}, "samples": []}
for family in text_string_to_metric_families(sys.stdin.read()):
    out["types"][family.name] = family.type
    for s in family.samples:
        out["samples"].append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// The venv's python with prometheus-client, or `None` (a skip) outside CI.
fn parser() -> Option<String> {
    let python = "tools-python3";
    let usable = Command::new(python)
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if usable {
        return Some(python.into());
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "tools-python3 with prometheus-client must be on PATH under CI (scripts/ensure-tools)"
    );
    eprintln!("skipped: no tools-python3 with prometheus-client (run scripts/ensure-tools)");
    None
}

fn parse(python: &str, text: &str) -> Scrape {
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Value = serde_json::from_slice(&output.stdout).unwrap();
    Scrape {
        types: serde_json::from_value(parsed["types"].clone()).unwrap(),
        samples: parsed["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Sample {
                name: s["name"].as_str().unwrap().into(),
                labels: serde_json::from_value(s["labels"].clone()).unwrap(),
                value: s["value"].as_f64().unwrap(),
            })
            .collect(),
    }
}

/// Whether `text` holds a UUID (8-4-4-4-12 hex digits).
fn has_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(35)).any(|start| {
        bytes[start..start + 36]
            .iter()
            .enumerate()
            .all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
    })
}

async fn scrape(client: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = client.get(format!("{url}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn metrics_count_runs_tool_calls_requests_and_refusals() {
    let Some(python) = parser() else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = [("METRICS_TOKEN", METRICS_TOKEN), ("AUTH_MODE", "keys")];
    let key = create_key(dir.path(), &env, &["--name", "metrics"]);
    let slow_key = create_key(dir.path(), &env, &["--name", "limited", "--rpm", "1"]);
    let (_server, url) = serve(dir.path(), &env);
    // Scrapes go without the API key (they have their own token).
    let client = reqwest::Client::new();
    let keyed = client_with_key(&key);

    let before = scrape(&client, &url, Some(METRICS_TOKEN)).await;
    assert_eq!(before.status(), StatusCode::OK);
    assert!(
        before.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let before = parse(&python, &before.text().await.unwrap());

    let answer: Value = keyed
        .post(format!("{url}/agent"))
        .json(&json!({"message": "tool:current_time {}"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        answer["response"]
            .as_str()
            .unwrap()
            .starts_with("tool result: "),
        "{answer}"
    );
    let session_id = answer["session_id"].as_str().unwrap();
    let session = keyed
        .get(format!("{url}/sessions/{session_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), StatusCode::OK);
    // A command in the session's sandbox, and a model that fails.
    for (message, status) in [
        (r#"tool:shell {"command": "true"}"#, StatusCode::OK),
        ("fail:503", StatusCode::BAD_GATEWAY),
    ] {
        let response = keyed
            .post(format!("{url}/agent"))
            .json(&json!({"message": message, "session_id": session_id}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{message}");
    }

    // Refused at the door: no key, a key nobody has, a key over its rate.
    let no_key = client
        .post(format!("{url}/agent"))
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), StatusCode::UNAUTHORIZED);
    let mut unknown = key.clone();
    unknown.replace_range(3..7, if &key[3..7] == "ffff" { "0000" } else { "ffff" });
    let unknown = client_with_key(&unknown)
        .post(format!("{url}/agent"))
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    let limited = client_with_key(&slow_key);
    for expected in [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
        let response = limited
            .post(format!("{url}/agent"))
            .json(&json!({"message": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
    }

    for token in [Some("not-the-metrics-token"), None] {
        let refused = scrape(&client, &url, token).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(refused.headers()["www-authenticate"], "Bearer");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert!(!body.to_string().contains(METRICS_TOKEN));
    }

    let text = scrape(&client, &url, Some(METRICS_TOKEN))
        .await
        .text()
        .await
        .unwrap();
    let after = parse(&python, &text);
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };

    assert_eq!(
        moved("bulkhead_runs_total", &[("status", "completed")]),
        3.0,
        "two tool runs and the limited key's one"
    );
    assert_eq!(
        moved(
            "bulkhead_tool_calls_total",
            &[("tool", "current_time"), ("outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "bulkhead_http_requests_total",
            &[("method", "POST"), ("route", "/agent"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        moved(
            "bulkhead_http_requests_total",
            &[("method", "POST"), ("route", "/agent"), ("status", "502")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "bulkhead_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/sessions/{session_id}"),
                ("status", "200")
            ]
        ),
        1.0,
        "a route is labelled by its template"
    );
    assert_eq!(
        moved(
            "bulkhead_http_requests_total",
            &[("route", "/metrics"), ("status", "401")]
        ),
        2.0
    );
    assert_eq!(
        moved(
            "bulkhead_auth_failures_total",
            &[("reason", "metrics_token")]
        ),
        2.0
    );
    for reason in ["missing", "unknown"] {
        assert_eq!(
            moved("bulkhead_auth_failures_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        moved(
            "bulkhead_http_requests_total",
            &[("method", "POST"), ("route", "/agent"), ("status", "401")]
        ),
        2.0
    );
    assert_eq!(
        moved(
            "bulkhead_rate_limited_total",
            &[("limit", "requests_per_minute")]
        ),
        1.0
    );
    // Two model calls per tool run (the tool call, then the answer to its
    // result), one for a plain message.
    assert_eq!(
        moved(
            "bulkhead_model_calls_total",
            &[("model", "bulkhead-mock"), ("outcome", "ok")]
        ),
        5.0,
        "two for each tool run, one for the limited key's run"
    );
    assert!(moved("bulkhead_model_tokens_total", &[("type", "input")]) > 0.0);
    assert!(moved("bulkhead_model_tokens_total", &[("type", "output")]) > 0.0);
    assert_eq!(moved("bulkhead_runs_total", &[("status", "failed")]), 1.0);
    assert_eq!(
        moved(
            "bulkhead_model_calls_total",
            &[("model", "bulkhead-mock"), ("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "bulkhead_model_errors_total",
            &[("model", "bulkhead-mock"), ("kind", "503")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "bulkhead_tool_calls_total",
            &[("tool", "shell"), ("outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "bulkhead_sandbox_creations_total",
            &[("backend", "namespace")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "bulkhead_sandbox_exec_duration_seconds_count",
            &[("backend", "namespace")]
        ),
        1.0
    );
    assert_eq!(after.value("bulkhead_runs_in_flight", &[]), 0.0);
    assert_eq!(
        moved(
            "bulkhead_run_duration_seconds_count",
            &[("status", "completed")]
        ),
        3.0
    );
    for (family, kind) in [
        ("bulkhead_http_request_duration_seconds", "histogram"),
        ("bulkhead_run_duration_seconds", "histogram"),
        ("bulkhead_model_call_duration_seconds", "histogram"),
        ("bulkhead_model_time_to_first_token_seconds", "histogram"),
        ("bulkhead_tool_call_duration_seconds", "histogram"),
        ("bulkhead_runs_in_flight", "gauge"),
        // The parser names a counter's family without its `_total`.
        ("bulkhead_runs", "counter"),
    ] {
        assert_eq!(
            after.types.get(family).map(String::as_str),
            Some(kind),
            "{family}: {:?}",
            after.types
        );
    }

    for sample in &after.samples {
        for (label, value) in &sample.labels {
            assert!(
                !has_uuid(value),
                "{}{{{label}={value:?}}}: an id in a label",
                sample.name
            );
        }
    }
    assert!(!text.contains(session_id));
}

#[tokio::test]
async fn metrics_off_means_no_route() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[("ENABLE_METRICS", "false")]);
    let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn an_open_metrics_route_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[]);
    let health = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(
            r#"bulkhead_http_requests_total{method="GET",route="/health",status="200"} 1"#
        ),
        "{text}"
    );
}
