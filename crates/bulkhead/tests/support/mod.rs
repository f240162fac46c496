//! What the tests of the `bulkhead` binary share: the binary with an empty
//! environment, a running process with its output collected, `serve`.
#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The binary with an empty environment, in a scratch folder.
pub fn bulkhead(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SECRETS_DIR", dir.join("no-secrets"))
        .current_dir(dir);
    command
}

pub struct Process {
    pub child: Child,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub fn spawn(mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Process {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for a stdout line matching `find` and returns what it extracts.
    pub fn wait_for<T>(&mut self, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = self.stdout.lock().unwrap().iter().find_map(|l| find(l)) {
                return found;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "exited ({status}) before {what}: {:?} {:?}",
                    self.stdout, self.stderr
                );
            }
            assert!(Instant::now() < deadline, "no {what}: {:?}", self.stdout);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn all_output(&self) -> String {
        let mut all = self.stdout.lock().unwrap().join("\n");
        all.push('\n');
        all.push_str(&self.stderr.lock().unwrap().join("\n"));
        all
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bulkhead serve` on a free port with JSON logs; returns it with its URL.
pub fn serve(dir: &std::path::Path, env: &[(&str, &str)]) -> (Process, String) {
    let mut command = bulkhead(dir);
    command
        .arg("serve")
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("LOG_FORMAT", "json");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut process = Process::spawn(command);
    let address = process.wait_for("the listening line", |line| {
        let event: Value = serde_json::from_str(line).ok()?;
        (event["message"] == "listening").then(|| event["address"].as_str().unwrap().to_string())
    });
    (process, format!("http://{address}"))
}

/// GET a URL and parse its JSON answer.
pub async fn get_json(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// `bulkhead keys create` with `env` (the server's configuration, so the
/// same database); returns the key it printed.
pub fn create_key(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut command = bulkhead(dir);
    command.args(["keys", "create"]).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "keys create: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("bk_"), "a key on stdout alone: {key:?}");
    key
}

/// A client that sends `key` as `Authorization: Bearer` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The tools venv's python (`tools-python3`, made by `scripts/ensure-tools`)
/// if it can import `modules` (a reference client and pytest), or `None`
/// (a skip) outside CI; under CI its absence fails the test.
#[allow(dead_code)]
pub fn tools_python(modules: &str) -> Option<&'static str> {
    let python = "tools-python3";
    let usable = Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if usable {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "tools-python3 able to import {modules} must be on PATH under CI (scripts/ensure-tools)"
    );
    eprintln!("skipped: no tools-python3 able to import {modules} (run scripts/ensure-tools)");
    None
}
