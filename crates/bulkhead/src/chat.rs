//! `bulkhead chat`: a terminal client for a running server. Reads a line,
//! streams the reply as it comes, keeps the session across lines.
//!
//! A tool call the agent's policy makes wait for a person is shown with its
//! arguments and asked about (y/n); the answer is sent as the decision and
//! the reply goes on.
//!
//! Ctrl-C while a reply streams stops that reply and returns to the prompt;
//! at the prompt it quits. The server has no way to cancel a run, so a
//! stopped reply's run still finishes there (and is kept in the session):
//! a line sent before it has finished waits for it rather than failing as
//! `session_busy`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::signal::unix::{SignalKind, signal};

const HELP: &str = "Type a message and press Enter. Commands: /new (new session), \
                    /session (show the session id), /quit (or Ctrl-D). Ctrl-C stops a \
                    reply; at the prompt it quits.";

/// How long the server has to answer `/health` before chat gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(
    url: Option<String>,
    session: Option<String>,
    api_key: Option<String>,
    agent: Option<String>,
) -> ExitCode {
    let base = url.unwrap_or_else(|| {
        let port = std::env::var("PORT").ok().filter(|p| !p.trim().is_empty());
        format!(
            "http://127.0.0.1:{}",
            port.as_deref().unwrap_or("8000").trim()
        )
    });
    let base = base.trim_end_matches('/').to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
        let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")) else {
            eprintln!("bulkhead chat: the API key holds characters no HTTP header can carry");
            return ExitCode::from(2);
        };
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = match reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .default_headers(headers)
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("bulkhead chat: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(problem) = check_server(&client, &base).await {
        eprintln!("bulkhead chat: {problem}");
        return ExitCode::FAILURE;
    }
    // From here SIGINT is ours: it stops a reply instead of the client.
    let mut interrupts = match signal(SignalKind::interrupt()) {
        Ok(interrupts) => interrupts,
        Err(e) => {
            eprintln!("bulkhead chat: cannot handle Ctrl-C: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("Connected to {base}. {HELP}");
    let mut session = session;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("you> ");
        let _ = std::io::stderr().flush();
        // A Ctrl-C pressed as a reply ended was meant for the reply, not
        // as a request to quit.
        while interrupts.recv().now_or_never().is_some() {}
        let read = tokio::select! {
            read = lines.next_line() => read,
            _ = interrupts.recv() => {
                eprintln!();
                break;
            }
        };
        let line = match read {
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
        let sent = tokio::select! {
            sent = send(&client, &base, message, &mut session, agent.as_deref(), &mut lines) => sent,
            _ = interrupts.recv() => {
                // Dropping the request closes its stream; the run goes on
                // on the server, which keeps whatever it answers.
                let mut stdout = std::io::stdout();
                let _ = writeln!(stdout);
                let _ = stdout.flush();
                eprintln!("(reply stopped; the server still finishes the run and keeps it in the session)");
                continue;
            }
        };
        if let Err(e) = sent {
            eprintln!("error: {e}");
        }
    }
    if let Some(id) = session {
        eprintln!("Session {id}; continue it with: bulkhead chat --session {id}");
    }
    ExitCode::SUCCESS
}

/// Makes sure a Bulkhead server answers at `base` before saying so.
async fn check_server(client: &reqwest::Client, base: &str) -> Result<(), String> {
    let unreachable = |reason: String| {
        format!(
            "no Bulkhead server answers at {base} ({reason}); start one with `bulkhead serve`, \
             or give its address with --url"
        )
    };
    let response = client
        .get(format!("{base}/health"))
        .timeout(CONNECT_TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(describe(&e)))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() || body["status"] != "healthy" {
        return Err(unreachable(format!(
            "GET /health answered {status}, not a Bulkhead server's {{\"status\": \"healthy\"}}"
        )));
    }
    // A route behind the door, with an id nobody has: 404 means the key
    // (or the lack of one) is accepted, 401 that the first message would
    // be refused.
    let probe = client
        .get(format!("{base}/runs/00000000-0000-0000-0000-000000000000"))
        .timeout(CONNECT_TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(describe(&e)))?;
    if probe.status() == reqwest::StatusCode::UNAUTHORIZED {
        let body: Value = probe.json().await.unwrap_or(Value::Null);
        let reason = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no details");
        return Err(format!(
            "the server at {base} refused the API key ({reason}); give one with --api-key or BULKHEAD_API_KEY \
             (an operator makes keys with `bulkhead keys create --name NAME`)"
        ));
    }
    Ok(())
}

/// A request error in a few words, without reqwest's nesting.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return format!("no answer within {}s", CONNECT_TIMEOUT.as_secs());
    }
    let mut source: &dyn std::error::Error = error;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}

/// Sends one message and prints the streamed answer. The session id is
/// taken (and shown) as soon as the run has started, so that a reply cut
/// short still leaves the session known.
async fn send(
    client: &reqwest::Client,
    base: &str,
    message: &str,
    session: &mut Option<String>,
    agent: Option<&str>,
    lines: &mut Lines<BufReader<Stdin>>,
) -> anyhow::Result<()> {
    // A session continued runs its own agent; only a new one is told which.
    let agent = if session.is_some() { None } else { agent };
    let response = loop {
        let response = client
            .post(format!("{base}/agent"))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(
                &json!({"message": message, "session_id": session, "agent": agent, "stream": true}),
            )
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", describe(&e)))?;
        if response.status().is_success() {
            break response;
        }
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
        match (
            code,
            body.pointer("/error/active_run_id").and_then(Value::as_str),
        ) {
            ("streaming_disabled", _) => {
                return send_plain(client, base, message, session, agent, lines).await;
            }
            // Most often the run of a reply stopped with Ctrl-C, or one
            // left waiting for a decision.
            ("session_busy", Some(run)) => {
                if let Some(approval) = waiting_approval(client, base, run).await? {
                    eprintln!("(the session's previous run waits for a decision first)");
                    let mut pending = Some(approval);
                    while let Some(approval) = pending {
                        pending = decide(client, base, &approval, lines, session).await?;
                    }
                    continue;
                }
                eprintln!(
                    "(waiting for the session's previous run to finish; Ctrl-C to stop waiting)"
                );
                wait_for_run(client, base, run).await?;
            }
            _ => anyhow::bail!("{status}: {text}"),
        }
    };
    let mut pending = follow(response, session).await?;
    while let Some(approval) = pending {
        pending = decide(client, base, &approval, lines, session).await?;
    }
    Ok(())
}

/// Prints a run's events as they come. Returns the approval the run
/// paused for, if it did.
async fn follow(
    response: reqwest::Response,
    session: &mut Option<String>,
) -> anyhow::Result<Option<Value>> {
    let mut events = response.bytes_stream().eventsource();
    let mut stdout = std::io::stdout();
    let mut printed = false;
    let mut paused = None;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| anyhow::anyhow!("the stream broke: {e}"))?;
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "run_started" => {
                if let Some(id) = data["session_id"].as_str()
                    && session.as_deref() != Some(id)
                {
                    eprintln!("(session {id})");
                    *session = Some(id.to_owned());
                }
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
            "approval_decided" => {
                eprintln!(
                    "  [{} by {}]",
                    match data["decision"].as_str() {
                        Some("approve") => "approved",
                        Some("deny") => "denied",
                        Some("expired") => "expired",
                        _ => "decided",
                    },
                    data["decided_by"].as_str().unwrap_or("?")
                );
            }
            "approval_requested" => paused = Some(data),
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
    Ok(paused)
}

/// Shows a call waiting for approval, asks y/n, sends the answer and
/// follows the run from there. Returns the next approval it pauses for.
async fn decide(
    client: &reqwest::Client,
    base: &str,
    approval: &Value,
    lines: &mut Lines<BufReader<Stdin>>,
    session: &mut Option<String>,
) -> anyhow::Result<Option<Value>> {
    let (Some(run), Some(call)) = (approval["run_id"].as_str(), approval["call_id"].as_str())
    else {
        anyhow::bail!("the server asked for an approval without naming the call");
    };
    let approve = ask_person(approval, lines).await?;
    let response = client
        .post(format!("{base}/runs/{run}/approvals"))
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .json(&json!({
            "call_id": call,
            "decision": if approve { "approve" } else { "deny" },
            "stream": true,
        }))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", describe(&e)))?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        anyhow::bail!(
            "{status}: {}",
            body.pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no details")
        );
    }
    follow(response, session).await
}

/// Shows the call and asks; anything but `y` or `yes` (end of input
/// included) is a no.
async fn ask_person(approval: &Value, lines: &mut Lines<BufReader<Stdin>>) -> anyhow::Result<bool> {
    eprint!(
        "  [approval needed] {} {}\n  run it? [y/N] ",
        approval["tool"].as_str().unwrap_or("?"),
        approval["arguments"].as_str().unwrap_or("")
    );
    let _ = std::io::stderr().flush();
    let answer = lines.next_line().await?.unwrap_or_default();
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// The approval `run` waits for, if it waits for one.
async fn waiting_approval(
    client: &reqwest::Client,
    base: &str,
    run: &str,
) -> anyhow::Result<Option<Value>> {
    let body: Value = client
        .get(format!("{base}/runs/{run}"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", describe(&e)))?
        .json()
        .await
        .unwrap_or(Value::Null);
    if body["status"] != "awaiting_approval" {
        return Ok(None);
    }
    let mut approval = body["approval"].clone();
    approval["run_id"] = body["run_id"].clone();
    Ok(Some(approval))
}

/// Waits until `run` is no longer running.
async fn wait_for_run(client: &reqwest::Client, base: &str, run: &str) -> anyhow::Result<()> {
    loop {
        let response = client
            .get(format!("{base}/runs/{run}"))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", describe(&e)))?;
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if body["status"] != "running" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// For servers with streaming turned off.
async fn send_plain(
    client: &reqwest::Client,
    base: &str,
    message: &str,
    session: &mut Option<String>,
    agent: Option<&str>,
    lines: &mut Lines<BufReader<Stdin>>,
) -> anyhow::Result<()> {
    let response = client
        .post(format!("{base}/agent"))
        .json(&json!({"message": message, "session_id": session, "agent": agent, "stream": false}))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", describe(&e)))?;
    let mut status = response.status();
    let mut body: Value = response.json().await.unwrap_or(Value::Null);
    while status == reqwest::StatusCode::ACCEPTED && body["status"] == "awaiting_approval" {
        let approval = &body["approval"];
        let approve = ask_person(approval, lines).await?;
        let run = body["run_id"].as_str().unwrap_or_default();
        let response = client
            .post(format!("{base}/runs/{run}/approvals"))
            .json(&json!({
                "call_id": approval["call_id"],
                "decision": if approve { "approve" } else { "deny" },
                "stream": false,
            }))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", describe(&e)))?;
        status = response.status();
        body = response.json().await.unwrap_or(Value::Null);
    }
    if !status.is_success() {
        let text = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no details");
        anyhow::bail!("{status}: {text}");
    }
    println!("agent> {}", body["response"].as_str().unwrap_or_default());
    if let Some(id) = body["session_id"].as_str()
        && session.as_deref() != Some(id)
    {
        eprintln!("(session {id})");
        *session = Some(id.to_owned());
    }
    Ok(())
}
