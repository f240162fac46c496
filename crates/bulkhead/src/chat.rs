//! `bulkhead chat`: a terminal client for a running server. Reads a line,
//! streams the reply as it comes, keeps the session across lines.

use std::io::Write;
use std::process::ExitCode;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const HELP: &str = "Type a message and press Enter. Commands: /new (new session), \
                    /session (show the session id), /quit (or Ctrl-D).";

pub async fn run(url: Option<String>, session: Option<String>) -> ExitCode {
    let base = url.unwrap_or_else(|| {
        let port = std::env::var("PORT").ok().filter(|p| !p.trim().is_empty());
        format!(
            "http://127.0.0.1:{}",
            port.as_deref().unwrap_or("8000").trim()
        )
    });
    let base = base.trim_end_matches('/').to_string();
    let client = match reqwest::Client::builder().build() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("bulkhead chat: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("Connected to {base}. {HELP}");
    let mut session = session;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("you> ");
        let _ = std::io::stderr().flush();
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                eprintln!("bulkhead chat: cannot read input: {e}");
                return ExitCode::FAILURE;
            }
        };
        let message = line.trim();
        match message {
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            "/new" => {
                session = None;
                eprintln!("(new session)");
                continue;
            }
            "/session" => {
                eprintln!("{}", session.as_deref().unwrap_or("(no session yet)"));
                continue;
            }
            _ => {}
        }
        match send(&client, &base, message, session.as_deref()).await {
            Ok(Some(id)) => {
                if session.as_deref() != Some(id.as_str()) {
                    eprintln!("(session {id})");
                }
                session = Some(id);
            }
            Ok(None) => {}
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if let Some(id) = session {
        eprintln!("Session {id}; continue it with: bulkhead chat --session {id}");
    }
    ExitCode::SUCCESS
}

/// Sends one message and prints the streamed answer. Returns the session id
/// the server reported.
async fn send(
    client: &reqwest::Client,
    base: &str,
    message: &str,
    session: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let response = client
        .post(format!("{base}/agent"))
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .json(&json!({"message": message, "session_id": session, "stream": true}))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", e.without_url()))?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("");
        let text = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no details");
        if code == "streaming_disabled" {
            return send_plain(client, base, message, session).await;
        }
        anyhow::bail!("{status}: {text}");
    }
    let mut events = response.bytes_stream().eventsource();
    let mut stdout = std::io::stdout();
    let mut session_id = None;
    let mut printed = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| anyhow::anyhow!("the stream broke: {e}"))?;
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "run_started" => {
                session_id = data["session_id"].as_str().map(str::to_owned);
            }
            "message_delta" => {
                if !printed {
                    write!(stdout, "agent> ")?;
                    printed = true;
                }
                write!(stdout, "{}", data["content"].as_str().unwrap_or_default())?;
                stdout.flush()?;
            }
            "tool_call" => {
                eprintln!(
                    "  [tool {} {}]",
                    data["name"].as_str().unwrap_or("?"),
                    data["arguments"].as_str().unwrap_or("")
                );
            }
            "tool_result" => {
                eprintln!("  [result {}]", data["content"].as_str().unwrap_or(""));
            }
            "run_completed" => {
                if printed {
                    writeln!(stdout)?;
                }
                eprintln!("  ({} tokens)", data["tokens_used"]);
            }
            "run_failed" => {
                if printed {
                    writeln!(stdout)?;
                }
                eprintln!(
                    "error: {}",
                    data.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("the run failed")
                );
            }
            _ => {}
        }
    }
    Ok(session_id)
}

/// For servers with streaming turned off.
async fn send_plain(
    client: &reqwest::Client,
    base: &str,
    message: &str,
    session: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let response = client
        .post(format!("{base}/agent"))
        .json(&json!({"message": message, "session_id": session, "stream": false}))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", e.without_url()))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let text = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no details");
        anyhow::bail!("{status}: {text}");
    }
    println!("agent> {}", body["response"].as_str().unwrap_or_default());
    Ok(body["session_id"].as_str().map(str::to_owned))
}
