//! `bulkhead chat` as people use it: a real server, the real client on
//! pipes, real signals.

mod support;

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use support::{bulkhead, create_key, get_json, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_replies_and_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[]);
    let mut chat = bulkhead(dir.path())
        .args(["chat", "--url", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"hello chat\ntool:current_time\n/session\n/quit\n")
        .unwrap();
    let output = chat.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stdout.contains("agent> echo: hello chat"), "{stdout}");
    assert!(stdout.contains("agent> tool result: 20"), "{stdout}");
    assert!(stderr.contains("[tool current_time"), "{stderr}");
    let session = session_shown(&stderr).unwrap_or_else(|| panic!("{stderr}"));
    let conversation: Value = reqwest::get(format!("{url}/sessions/{session}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let users: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        ["hello chat", "tool:current_time"],
        "both lines went to one session"
    );
}

/// A call the agent's policy makes wait: chat shows it, asks y/n, and the
/// answer decides it; with keys, the audit names the key that decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_asks_before_a_call_that_needs_approval() {
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents.yaml");
    std::fs::write(
        &agents,
        "agents:\n  - id: careful\n    tools: [current_time]\n    approval:\n      tools:\n        current_time: ask\n",
    )
    .unwrap();
    let agents = agents.display().to_string();
    let env = [("AUTH_MODE", "keys"), ("AGENTS_FILE", agents.as_str())];
    let key = create_key(dir.path(), &env, &["--name", "person"]);
    let (_server, url) = serve(dir.path(), &env);
    let mut chat = bulkhead(dir.path())
        .args([
            "chat",
            "--url",
            &url,
            "--agent",
            "careful",
            "--api-key",
            &key,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"tool:current_time {}\ny\ntool:current_time {}\nn\n/quit\n")
        .unwrap();
    let output = chat.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("[approval needed] current_time {}"),
        "{stderr}"
    );
    assert!(stderr.contains("run it? [y/N]"), "{stderr}");
    assert!(stdout.contains("agent> tool result: 20"), "{stdout}");
    assert!(
        stdout.contains("agent> tool result: error: not run: denied by a person"),
        "{stdout}"
    );
    let session = session_shown(&stderr).unwrap_or_else(|| panic!("{stderr}"));
    let client = reqwest::Client::new();
    let audit: Value = client
        .get(format!("{url}/sessions/{session}/audit"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let decisions: Vec<(&str, &str)> = audit["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["approval"]["decision"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(decisions, [("approve", "completed"), ("deny", "denied")]);
    let key_id = key.split('_').nth(1).unwrap();
    assert_eq!(audit["tool_calls"][0]["approval"]["decided_by"], key_id);
}

/// Against a server that requires keys, chat says at once when it has
/// none (or a bad one), and works with one from `BULKHEAD_API_KEY` or
/// `--api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sends_its_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("AUTH_MODE", "keys")];
    let key = create_key(dir.path(), &env, &["--name", "chat"]);
    let (_server, url) = serve(dir.path(), &env);
    let run = |extra: &[&str], env_key: Option<&str>| {
        let mut command = bulkhead(dir.path());
        command.args(["chat", "--url", &url]).args(extra);
        if let Some(key) = env_key {
            command.env("BULKHEAD_API_KEY", key);
        }
        let mut chat = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        chat.stdin
            .take()
            .unwrap()
            .write_all(b"hello with a key\n/quit\n")
            .unwrap();
        chat.wait_with_output().unwrap()
    };
    let refused = run(&[], None);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8(refused.stderr).unwrap();
    assert!(
        said.contains("refused the API key") && said.contains("--api-key"),
        "{said}"
    );
    let wrong = run(&["--api-key", "bk_nope"], None);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(!String::from_utf8(wrong.stderr).unwrap().contains("bk_nope"));
    for output in [run(&[], Some(&key)), run(&["--api-key", &key], None)] {
        assert!(output.status.success());
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(stdout.contains("agent> echo: hello with a key"), "{stdout}");
    }
}

/// The session id `bulkhead chat` showed, as `(session <id>)`.
fn session_shown(stderr: &str) -> Option<String> {
    let (_, rest) = stderr.split_once("(session ")?;
    Some(rest.split_once(')')?.0.to_string())
}

/// `bulkhead chat` on pipes, its output gathered as it comes (unsplit, so
/// that a prompt without its newline is seen).
struct Chat {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Chat {
    fn spawn(dir: &std::path::Path, url: &str) -> Chat {
        let mut child = bulkhead(dir)
            .args(["chat", "--url", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let gather = |mut stream: Box<dyn std::io::Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = Arc::clone(&text);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buffer) {
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            });
            text
        };
        let stdout = gather(Box::new(child.stdout.take().unwrap()));
        let stderr = gather(Box::new(child.stderr.take().unwrap()));
        let stdin = child.stdin.take().unwrap();
        Chat {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
    }

    /// Waits until `done(stdout, stderr)`.
    fn wait_until(&mut self, what: &str, done: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (out, err) = (
                self.stdout.lock().unwrap().clone(),
                self.stderr.lock().unwrap().clone(),
            );
            if done(&out, &err) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("chat exited ({status}) before {what}:\n{out}\n{err}");
            }
            assert!(Instant::now() < deadline, "no {what}:\n{out}\n{err}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn interrupt(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).unwrap();
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn chat_says_so_when_no_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let output = bulkhead(dir.path())
        .args(["chat", "--url", &url])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("Connected"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(&format!(
            "bulkhead chat: no Bulkhead server answers at {url} ("
        )) && stderr.contains("bulkhead serve"),
        "{stderr}"
    );
}

/// Ctrl-C while a reply is on its way stops that reply, not the client:
/// the next line is answered (after the stopped run, which the server still
/// finishes, has ended), and Ctrl-C at the prompt quits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_ctrl_c_stops_the_reply_not_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[("MOCK_MODEL_LATENCY_MS", "2000")]);
    let mut chat = Chat::spawn(dir.path(), &url);
    chat.wait_until("the prompt", |_, err| {
        err.contains("Connected to") && err.ends_with("you> ")
    });
    chat.type_line("slow one");
    // The session is known as soon as the run starts, long before the reply.
    chat.wait_until("the session id", |_, err| err.contains("(session "));
    assert!(!chat.stdout.lock().unwrap().contains("agent>"));
    chat.interrupt();
    chat.wait_until("the stop note", |_, err| {
        err.contains("(reply stopped") && err.ends_with("you> ")
    });
    assert!(
        chat.child.try_wait().unwrap().is_none(),
        "the client lives on"
    );

    chat.type_line("next");
    chat.wait_until("the next reply", |out, err| {
        out.contains("agent> echo: next") && err.ends_with("you> ")
    });
    assert!(
        !chat.stdout.lock().unwrap().contains("slow one"),
        "the stopped reply is not shown"
    );
    let session = session_shown(&chat.stderr.lock().unwrap()).unwrap();

    // Let the prompt wait for input before the Ctrl-C meant for it.
    std::thread::sleep(Duration::from_millis(300));
    chat.interrupt();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = chat.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "Ctrl-C at the prompt did not quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        chat.stderr.lock().unwrap().contains(&format!(
            "continue it with: bulkhead chat --session {session}"
        )),
        "{}",
        chat.stderr.lock().unwrap()
    );

    // Both lines went to the one session, and the stopped run was finished.
    let conversation = get_json(format!("{url}/sessions/{session}")).await;
    let said: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        said,
        ["slow one", "echo: slow one", "next", "echo: next"],
        "{conversation}"
    );
}
