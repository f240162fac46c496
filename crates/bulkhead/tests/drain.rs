//! Stopping `bulkhead serve` the ways people do, with what they leave
//! around it: a log pipe that is already gone.

mod support;

use std::io::{BufRead, BufReader};
use std::process::Command;

use bulkhead_testing::{DbKind, TestDb};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use support::bulkhead;

/// `bulkhead serve 2>&1 | tee log`, then Ctrl-C: the terminal's SIGINT
/// reaches `tee` too, so the pipe closes as the server starts to drain. A
/// log line that cannot be written is dropped; the run in flight finishes,
/// its client sees the final event, and the server exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_with_the_log_pipe_closed_still_drains() {
    let db = TestDb::new(DbKind::Sqlite).await;
    let (reader, writer) = std::io::pipe().unwrap();
    let mut command: Command = bulkhead(db.dir.path());
    command
        .arg("serve")
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("LOG_FORMAT", "json")
        .env("DATABASE_URL", &db.url)
        .stdin(std::process::Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer);
    let mut child = command.spawn().unwrap();
    // Ours too: only the server may hold a write end, or the pipe would
    // not be the server's alone.
    drop(command);
    let mut log = BufReader::new(reader);
    let address = loop {
        let mut line = String::new();
        assert!(log.read_line(&mut line).unwrap() > 0, "the log ended");
        if let Ok(event) = serde_json::from_str::<Value>(&line)
            && event["message"] == "listening"
        {
            break event["address"].as_str().unwrap().to_string();
        }
    };

    let response = reqwest::Client::new()
        .post(format!("http://{address}/agent"))
        .json(&json!({
            "message": r#"tool:shell {"command": "sleep 2; echo done"}"#,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream().eventsource();
    let mut kinds = Vec::new();
    let mut run_id = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        run_id = run_id.or_else(|| data["run_id"].as_str().map(str::to_string));
        kinds.push(event.event.clone());
        if event.event == "tool_call" {
            break;
        }
    }
    // The tool call is running: `tee` goes, then the server gets Ctrl-C.
    drop(log);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    while let Some(event) = events.next().await {
        kinds.push(event.unwrap().event);
    }
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("run_completed"),
        "{kinds:?}"
    );

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "not a panic (101)");

    let store = bulkhead_store::Store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    let run = store.run(&run_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(run.status, "completed");
    assert!(run.output.unwrap().contains("done"));
    store.close().await;
}
