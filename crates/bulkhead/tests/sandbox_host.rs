//! The namespace sandbox where a newcomer first starts it: from a private
//! folder (`mktemp -d`), as a non-root user, and stopped with Ctrl-C. The
//! real binary, a real uid, real signals to the process group.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// A uid no account has: the server runs as it in the non-root tests.
const USER: u32 = 61_042;

/// These tests make a uid, folders and cgroups of their own, which takes
/// root; under CI they must run.
fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "these tests need root (they run the server as another uid)"
    );
    eprintln!("skipped: not root");
    false
}

struct Server {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    url: String,
}

impl Server {
    /// `bulkhead serve` from `dir`, on a free port, with JSON logs; `wrap`
    /// prefixes the command (to change uid or cgroup as a user would).
    fn start(dir: &Path, wrap: &[&str], env: &[(&str, &str)], own_group: bool) -> Server {
        let binary = env!("CARGO_BIN_EXE_bulkhead");
        let mut command = match wrap.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("SECRETS_DIR", dir.join("no-secrets"))
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if own_group {
            // As a shell starts a foreground job: the leader of its group.
            command.process_group(0);
        }
        let mut child = command.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child,
            lines,
            url: String::new(),
        };
        let address = server.wait_for("the listening line", |event| {
            (event["message"] == "listening")
                .then(|| event["address"].as_str().unwrap().to_string())
        });
        server.url = format!("http://{address}");
        server
    }

    fn wait_for<T>(&mut self, what: &str, find: impl Fn(&Value) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find_map(|event| find(&event));
            if let Some(found) = found {
                return found;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited ({status}) before {what}: {:?}", self.lines);
            }
            assert!(Instant::now() < deadline, "no {what}: {:?}", self.lines);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = reqwest::get(format!("{}{path}", self.url)).await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn agent(&self, body: Value) -> Value {
        reqwest::Client::new()
            .post(format!("{}/agent", self.url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shell(command: &str) -> Value {
    let arguments = json!({ "command": command });
    json!({ "message": format!("tool:shell {arguments}") })
}

/// A scratch folder of mode 0700, as `mktemp -d` makes, owned by `uid`.
fn private_folder(uid: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn as_user(uid: u32) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
    ]
}

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Where a cgroup `group` lives: one folder on v2, one per controller the
/// sandbox uses on v1.
fn cgroup_dirs(group: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if cgroup_v2() {
        vec![root.join(group)]
    } else {
        ["memory", "pids", "cpu"]
            .iter()
            .map(|c| root.join(c).join(group))
            .collect()
    }
}

#[tokio::test]
async fn the_namespace_sandbox_works_from_a_private_working_directory() {
    if !root_or_skip() {
        return;
    }
    let dir = private_folder(0);
    // The egress gate is mounted from the folder too.
    let mut server = Server::start(
        dir.path(),
        &[],
        &[("SANDBOX_EGRESS_ALLOW", "example.com")],
        false,
    );
    let (status, ready) = server.get("/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["status"], "ok", "{ready}");

    let body = server
        .agent(shell("echo kept > note; cat note; id -u; ls /run/bulkhead"))
        .await;
    assert_eq!(
        body["response"], "tool result: exit code: 0\nstdout:\nkept\n1000\negress.sock\n",
        "{body}"
    );
    let session = body["session_id"].as_str().unwrap();
    let body = server
        .agent(json!({"message": "tool:read_file {\"path\": \"note\"}", "session_id": session}))
        .await;
    assert!(
        body["response"].as_str().unwrap().contains("kept"),
        "{body}"
    );

    let mode = std::fs::metadata(dir.path()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "the user's folder was loosened");
    kill(Pid::from_raw(server.pid()), Signal::SIGTERM).unwrap();
    assert_eq!(server.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test]
async fn a_non_root_user_without_a_delegated_cgroup_is_told_what_to_do_in_one_line() {
    if !root_or_skip() {
        return;
    }
    let dir = private_folder(USER);
    let wrap = as_user(USER);
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let server = Server::start(dir.path(), &wrap, &[], false);

    let (status, ready) = server.get("/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"]["sandbox"]["status"], "fail", "{ready}");
    let reason = ready["checks"]["sandbox"]["message"].as_str().unwrap();
    for remedy in [
        &format!("as uid {USER}, not root"),
        "run bulkhead as root",
        &format!("delegate a cgroup to uid {USER}"),
        "SANDBOX_CGROUP",
        "SANDBOX_BACKEND=docker",
    ] {
        assert!(reason.contains(remedy), "{remedy:?} missing: {reason}");
    }
    assert!(!reason.contains('\n'), "{reason}");

    let body = server.agent(shell("id")).await;
    let response = body["response"].as_str().unwrap();
    assert_eq!(
        response,
        format!("tool result: error: sandbox unavailable: {reason}; the tool was not run"),
        "not that one line, once"
    );
}

#[tokio::test]
async fn a_non_root_user_with_a_delegated_cgroup_runs_tools_under_its_limits() {
    if !root_or_skip() {
        return;
    }
    let group = format!("bulkhead-test-{USER}-{}", std::process::id());
    let dirs = cgroup_dirs(&group);
    let _removed = Removed(dirs.clone());
    // What root does once for the user (the README's recipe).
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    let v2_leaf = dirs[0].join("server");
    if cgroup_v2() {
        std::fs::create_dir_all(&v2_leaf).unwrap();
    }
    for dir in &dirs {
        Command::new("chown")
            .args(["-R", &format!("{USER}:{USER}")])
            .arg(dir)
            .status()
            .unwrap();
    }
    let folder = private_folder(USER);
    let mut wrap: Vec<String> = Vec::new();
    if cgroup_v2() {
        // On v2 a process may only be moved between cgroups below one it
        // may write: the server starts inside the delegated subtree.
        let procs = v2_leaf.join("cgroup.procs");
        wrap = vec![
            "sh".into(),
            "-c".into(),
            format!("echo $$ > {} && exec \"$@\"", procs.display()),
            "sh".into(),
        ];
    }
    wrap.extend(as_user(USER));
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let mut server = Server::start(folder.path(), &wrap, &[("SANDBOX_CGROUP", &group)], false);

    let (status, ready) = server.get("/ready").await;
    assert_eq!(status, 200, "{ready}");
    let body = server
        .agent(shell("id -u; grep -c bulkhead-test /proc/self/cgroup"))
        .await;
    let expected = if cgroup_v2() { 1 } else { 3 };
    assert_eq!(
        body["response"],
        format!("tool result: exit code: 0\nstdout:\n1000\n{expected}\n"),
        "not run in the delegated cgroup: {body}"
    );

    kill(Pid::from_raw(server.pid()), Signal::SIGTERM).unwrap();
    assert_eq!(server.wait_exit(Duration::from_secs(15)).code(), Some(0));
    for dir in &dirs {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir() && e.file_name() != "server")
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }
}

/// Removes the delegated cgroups, pass or fail.
struct Removed(Vec<PathBuf>);

impl Drop for Removed {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir.join("server"));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The per-call cgroups the server with this pid has now.
fn cgroups_of(pid: i32) -> Vec<PathBuf> {
    cgroup_dirs(bulkhead_sandbox::namespace::DEFAULT_CGROUP)
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{pid}-"))
        })
        .map(|e| e.path())
        .collect()
}

#[tokio::test]
async fn ctrl_c_in_the_terminal_drains_a_running_tool_call() {
    if !root_or_skip() {
        return;
    }
    let dir = private_folder(0);
    let mut server = Server::start(dir.path(), &[], &[], true);
    server.wait_for("the sandbox probe", |event| {
        (event["message"] == "sandbox available").then_some(())
    });
    let pid = server.pid();
    let run = tokio::spawn({
        let url = format!("{}/agent", server.url);
        async move {
            let mut request = shell("sleep 3; echo done");
            request["stream"] = json!(true);
            let response = reqwest::Client::new()
                .post(url)
                .json(&request)
                .send()
                .await
                .unwrap();
            response.text().await.unwrap()
        }
    });
    // The call is running once its cgroup exists (the probe's is gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    while cgroups_of(pid).is_empty() {
        assert!(Instant::now() < deadline, "the tool call never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // What the terminal does on Ctrl-C: SIGINT to the foreground group.
    kill(Pid::from_raw(-pid), Signal::SIGINT).unwrap();
    let stream = run.await.unwrap();
    let result = stream
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find(|data| data["name"] == "shell" && data.get("content").is_some())
        .unwrap_or_else(|| panic!("no tool result: {stream}"));
    assert_eq!(result["is_error"], false, "{stream}");
    assert!(
        result["content"].as_str().unwrap().contains("done"),
        "{stream}"
    );
    assert!(stream.contains("run_completed"), "{stream}");
    let session = stream
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find_map(|data| data["session_id"].as_str().map(String::from))
        .unwrap();
    assert_eq!(server.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert_eq!(
        cgroups_of(pid),
        Vec::<PathBuf>::new(),
        "cgroups left behind"
    );

    // The audit trail, as the next start of the server shows it.
    let server = Server::start(dir.path(), &[], &[], false);
    let (_, audit) = server.get(&format!("/sessions/{session}/audit")).await;
    let calls = audit["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{audit}");
    assert_eq!(calls[0]["status"], "completed", "{audit}");
    assert_eq!(calls[0]["exit_code"], 0, "{audit}");
}
