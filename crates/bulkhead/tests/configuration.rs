//! Configuration as people meet it in the real binary: `serve --help`,
//! `bulkhead config`, and what the start-up log says about the settings.

mod support;

use std::time::Duration;

use bulkhead_testing::spawn_mock_model;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Process, bulkhead, serve};

/// The JSON log lines a process has printed so far.
fn log_events(process: &Process) -> Vec<Value> {
    process
        .stdout
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn serve_help_lists_every_setting_with_its_default_and_meaning() {
    use bulkhead_server::config::settings::{Default, SETTINGS};
    let dir = tempfile::tempdir().unwrap();
    let help = |command: &str| {
        let output = bulkhead(dir.path())
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let (serve, sandboxd) = (help("serve"), help("sandboxd"));
    for setting in SETTINGS {
        let line = match setting.default {
            Default::Literal(value) => format!("  {}  [default: {value}]", setting.name),
            _ => format!("  {}  [default: ", setting.name),
        };
        assert_eq!(
            serve.contains(&line),
            setting.scope.server(),
            "{line:?} in serve --help:\n{serve}"
        );
        assert_eq!(
            sandboxd.contains(&line),
            setting.scope.sandboxd(),
            "{line:?} in sandboxd --help:\n{sandboxd}"
        );
    }
    assert!(serve.contains("model sent with each request"), "{serve}");
    assert!(
        serve.contains("OPENAI_API_KEY  [default: none] [secret]"),
        "{serve}"
    );
}

#[test]
fn config_labels_dotenv_values_lists_every_setting_and_prints_typed_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "MODEL_NAME=llama3\nMODEL_NAM=oops-value\nMAX_STEPS=5\n",
    )
    .unwrap();
    let output = bulkhead(dir.path())
        .arg("config")
        .env("MAX_STEPS", "6")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("MODEL_NAME ") && l.contains("llama3") && l.ends_with("(.env)")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("MAX_STEPS ")
            && l.contains('6')
            && l.ends_with("(environment)")),
        "the environment wins over .env: {text}"
    );
    assert!(
        stderr.contains("MODEL_NAM is not a Bulkhead setting; did you mean MODEL_NAME?")
            && !stderr.contains("oops-value"),
        "{stderr}"
    );
    for setting in bulkhead_server::config::settings::SETTINGS {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(setting.name)),
            "{} missing from bulkhead config: {text}",
            setting.name
        );
    }

    let output = bulkhead(dir.path())
        .args(["config", "--json"])
        .env("MAX_STEPS", "6")
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json.as_object().unwrap().len(),
        bulkhead_server::config::settings::SETTINGS.len()
    );
    assert_eq!(json["PORT"], json!({"value": 8000, "source": "default"}));
    assert_eq!(json["MAX_STEPS"]["value"], 6);
    assert_eq!(json["ENABLE_STREAMING"]["value"], true);
    assert_eq!(json["TEMPERATURE"]["value"], 0.7);
    assert_eq!(json["MODEL_ENDPOINT"]["value"], Value::Null);
    assert_eq!(json["OPENAI_API_KEY"]["value"], Value::Null);
    assert_eq!(json["MODEL_NAME"]["source"], ".env");
}

#[test]
fn a_near_miss_in_dotenv_is_warned_about_in_the_startup_log() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "MODEL_NAM=gpt-4o\n").unwrap();
    let (mut server, _) = serve(dir.path(), &[]);
    let events = log_events(&server);
    let warning = events
        .iter()
        .find(|e| e["level"] == "WARN" && e["variable"] == "MODEL_NAM")
        .unwrap_or_else(|| panic!("no warning about MODEL_NAM: {events:?}"));
    assert_eq!(
        warning["message"],
        "MODEL_NAM is not a Bulkhead setting; did you mean MODEL_NAME? (set in .env)"
    );
    assert!(
        !server.all_output().contains("gpt-4o\""),
        "no value is shown"
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completions_url_is_used_as_its_base_and_the_log_names_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = spawn_mock_model(Duration::ZERO).await;
    let copied = format!("{base}/chat/completions");
    let (mut server, url) = serve(
        dir.path(),
        &[("MODEL_ENDPOINT", &copied), ("MODEL_NAME", "mock-7b")],
    );
    let events = log_events(&server);
    assert!(
        events.iter().any(|e| e["level"] == "WARN"
            && e["variable"] == "MODEL_ENDPOINT"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("/chat/completions")
                    && m.contains(&format!("using the API base {base} "))),),
        "the cut is named: {events:?}"
    );
    assert!(
        events.iter().any(|e| e["message"] == "model endpoint"
            && e["endpoint"] == base.as_str()
            && e["model"] == "mock-7b"),
        "the start-up log names the endpoint and model: {events:?}"
    );
    let client = reqwest::Client::new();
    let ready: Value = client
        .get(format!("{url}/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["model"]["status"], "ok", "{ready}");
    let reply: Value = client
        .post(format!("{url}/agent"))
        .json(&json!({"message": "through the base"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["response"], "echo: through the base", "{reply}");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn openai_without_a_key_is_a_warning_at_start_and_the_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _) = serve(
        dir.path(),
        &[("MODEL_ENDPOINT", "https://api.openai.com/v1")],
    );
    let events = log_events(&server);
    assert!(
        events.iter().any(|e| {
            e["level"] == "WARN"
                && e["variable"] == "OPENAI_API_KEY"
                && e["message"].as_str().is_some_and(|m| {
                    m.contains("api.openai.com") && m.contains("OPENAI_API_KEY_FILE")
                })
        }),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["message"] == "model endpoint"
            && e["endpoint"] == "https://api.openai.com/v1"
            && e["model"] == "gpt-4o-mini"
            && e["api_key"] == "not set"),
        "{events:?}"
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
