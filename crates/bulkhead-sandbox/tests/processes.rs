//! Long-lived programs hosted in a sandbox with their stdio connected
//! (`Sandbox::spawn`, what MCP servers run on), against both backends: the
//! namespace sandbox, and the Docker Engine with the sandbox image
//! (`SANDBOX_IMAGE`). Every case checks what reaches the caller and what
//! is left on the host afterwards.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{
    Backend, ExecResult, KilledReason, Limits, Operation, ProcessExit, ProcessSpec, Sandbox,
    SandboxProcess,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Docker,
}

impl Kind {
    /// A number no other test (nor the other backend's run of this one)
    /// uses, for a `sleep` that can be looked for on the host.
    fn unique(self, base: u32) -> u32 {
        base + self as u32
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    sandbox: Arc<dyn Sandbox>,
}

fn limits() -> Limits {
    Limits {
        memory_bytes: 64 << 20,
        cpus: 1.0,
        pids: 32,
        timeout: Duration::from_secs(3),
        output_bytes: 4096,
        disk_bytes: 8 << 20,
    }
}

fn unique_id() -> String {
    format!(
        "p{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

async fn fixture(kind: Kind) -> Fixture {
    fixture_with(kind, limits()).await
}

async fn fixture_with(kind: Kind, limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sandboxes");
    let backend: Box<dyn Backend> = match kind {
        Kind::Namespace => Box::new(NamespaceBackend::new(NamespaceConfig {
            helper: PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-sandbox-helper")),
            helper_args: Vec::new(),
            root: root.clone(),
            host_uid: 100_000,
            host_gid: 100_000,
            cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
            egress: None,
        })),
        Kind::Docker => Box::new(DockerBackend::new(DockerConfig {
            image: std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into()),
            runtime: None,
            socket: None,
            scope: unique_id(),
            egress: None,
            egress_volume: None,
        })),
    };
    let id = match kind {
        Kind::Namespace => "session-1".to_string(),
        Kind::Docker => unique_id(),
    };
    let sandbox = backend.create(&id, &limits).await.unwrap_or_else(|e| {
        panic!("{kind:?} sandbox: {e} (scripts/test starts dockerd and builds the sandbox image)")
    });
    Fixture {
        _dir: dir,
        root,
        sandbox,
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let sandbox = Arc::clone(&self.sandbox);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(sandbox.destroy())
        })
        .join();
        let _ = nix::mount::umount2(
            &self.root.join("session-1"),
            nix::mount::MntFlags::MNT_DETACH,
        );
    }
}

/// A hosted program, its stdout read line by line.
struct Hosted {
    stdin: Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    stdout: BufReader<Pin<Box<dyn AsyncRead + Send>>>,
    exited: futures_util::future::BoxFuture<
        'static,
        Result<ProcessExit, bulkhead_sandbox::SandboxError>,
    >,
    guard: Box<dyn Send + Sync>,
}

const PATIENCE: Duration = Duration::from_secs(20);

impl Fixture {
    async fn spawn(&self, argv: &[&str], env: &[(&str, &str)]) -> Hosted {
        let spec = ProcessSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let SandboxProcess {
            stdin,
            stdout,
            exited,
            guard,
        } = self.sandbox.spawn(&spec).await.expect("the program starts");
        Hosted {
            stdin,
            stdout: BufReader::new(stdout),
            exited,
            guard,
        }
    }

    async fn sh(&self, script: &str) -> ExecResult {
        self.sandbox
            .run(&Operation::Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                timeout: None,
            })
            .await
            .expect("the sandbox runs")
    }

    async fn assert_healthy(&self) {
        let result = self.sh("echo still-ok").await;
        assert_eq!(result.exit_code, Some(0), "{result:?}");
        assert_eq!(result.stdout.text, "still-ok\n");
    }
}

impl Hosted {
    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(PATIENCE, self.stdout.read_line(&mut line))
            .await
            .expect("a line within the patience")
            .expect("stdout reads");
        line
    }

    async fn send(&mut self, text: &str) {
        self.stdin.write_all(text.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Closes stdin, reads stdout to its end, and waits for the exit.
    async fn finish(mut self) -> (String, ProcessExit) {
        self.stdin.shutdown().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(PATIENCE, self.stdout.read_to_string(&mut rest))
            .await
            .expect("stdout ends")
            .unwrap();
        let exit = tokio::time::timeout(PATIENCE, self.exited)
            .await
            .expect("the exit is known within the patience")
            .expect("the exit is known");
        drop(self.guard);
        (rest, exit)
    }
}

/// Whether a process whose command line contains `pattern` runs anywhere
/// on the host (the namespace sandboxes and containers included).
fn running(pattern: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

async fn assert_gone(pattern: &str) {
    for _ in 0..100 {
        if !running(pattern) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{pattern:?} still runs on the host");
}

bulkhead_testing::on_both_backends!(
    a_round_trip_through_cat,
    the_environment_reaches_the_program,
    a_program_outlives_the_operation_timeout,
    dropping_the_process_kills_it_and_its_children,
    destroying_the_sandbox_kills_it,
    a_fork_bomb_hits_the_pids_limit_and_the_host_survives,
    a_memory_hog_is_killed_as_oom,
    host_secrets_are_out_of_reach,
    the_network_is_empty,
    stderr_is_captured_and_capped,
    an_operation_runs_beside_it_on_the_same_workspace,
);

async fn a_round_trip_through_cat(kind: Kind) {
    let f = fixture(kind).await;
    let mut cat = f.spawn(&["cat"], &[]).await;
    cat.send("hello\n").await;
    assert_eq!(cat.line().await, "hello\n");
    cat.send("{\"jsonrpc\":\"2.0\",\"id\":1}\n").await;
    assert_eq!(cat.line().await, "{\"jsonrpc\":\"2.0\",\"id\":1}\n");
    let (rest, exit) = cat.finish().await;
    assert_eq!(rest, "");
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert_eq!(exit.killed_reason, None, "{exit:?}");
    assert!(exit.limits_hit.is_empty(), "{exit:?}");
    assert_eq!(exit.stderr.total_bytes, 0, "{exit:?}");
}

async fn the_environment_reaches_the_program(kind: Kind) {
    let f = fixture(kind).await;
    let secret = "s3cr3t-value-never-logged";
    let spec = ProcessSpec {
        argv: vec!["sh".into()],
        env: vec![("API_TOKEN".into(), secret.into())],
    };
    assert!(
        !format!("{spec:?}").contains(secret),
        "the spec's Debug shows no value"
    );
    let shown = f
        .spawn(
            &["sh", "-c", "echo \"$API_TOKEN|$HOME|$USER|$PATH|$LANG\""],
            &[("API_TOKEN", secret), ("LANG", "C")],
        )
        .await;
    let (out, exit) = shown.finish().await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    let fields: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(fields[0], secret);
    assert_eq!(fields[1], "/workspace", "the sandbox's own HOME");
    assert_eq!(fields[2], "sandbox");
    assert!(fields[3].contains("/usr/bin"), "{out}");
    assert_eq!(fields[4], "C", "spec.env wins over the sandbox's own");
}

async fn a_program_outlives_the_operation_timeout(kind: Kind) {
    let f = fixture_with(
        kind,
        Limits {
            timeout: Duration::from_secs(1),
            ..limits()
        },
    )
    .await;
    let mut cat = f.spawn(&["cat"], &[]).await;
    cat.send("before\n").await;
    assert_eq!(cat.line().await, "before\n");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cat.send("after three seconds\n").await;
    assert_eq!(cat.line().await, "after three seconds\n");
    let (_, exit) = cat.finish().await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert_eq!(exit.killed_reason, None, "{exit:?}");
}

async fn dropping_the_process_kills_it_and_its_children(kind: Kind) {
    let f = fixture(kind).await;
    let sleeper = format!("sleep {}", kind.unique(4711));
    let mut program = f
        .spawn(
            &["sh", "-c", &format!("{sleeper} & echo started; cat")],
            &[],
        )
        .await;
    assert_eq!(program.line().await, "started\n");
    assert!(running(&sleeper), "the child runs before the drop");
    let Hosted {
        stdin,
        mut stdout,
        exited,
        guard,
    } = program;
    drop(guard);
    let exit = tokio::time::timeout(PATIENCE, exited)
        .await
        .expect("the exit is known soon after the drop")
        .expect("the exit is known");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert_eq!(exit.exit_code, None, "{exit:?}");
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stdout.read_to_end(&mut rest))
        .await
        .expect("stdout ends with the tree")
        .unwrap();
    drop(stdin);
    assert_gone(&sleeper).await;
    if kind == Kind::Docker {
        // `[p]`: the pattern does not match the command line that holds it.
        let pattern = sleeper.replacen("sleep", "slee[p]", 1);
        let inside = f.sh(&format!("pgrep -f '{pattern}' || echo none")).await;
        assert_eq!(inside.stdout.text, "none\n", "{inside:?}");
    }
    f.assert_healthy().await;
}

async fn destroying_the_sandbox_kills_it(kind: Kind) {
    let f = fixture(kind).await;
    let sleeper = format!("sleep {}", kind.unique(4721));
    let mut program = f
        .spawn(
            &["sh", "-c", &format!("{sleeper} & echo started; cat")],
            &[],
        )
        .await;
    assert_eq!(program.line().await, "started\n");
    f.sandbox.destroy().await.unwrap();
    let exit = tokio::time::timeout(PATIENCE, program.exited)
        .await
        .expect("the exit is known soon after the sandbox is destroyed");
    if let Ok(exit) = exit {
        assert_ne!(exit.exit_code, Some(0), "{exit:?}");
    }
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, program.stdout.read_to_end(&mut rest))
        .await
        .expect("stdout ends with the tree")
        .unwrap();
    assert_gone(&sleeper).await;
    drop(program.guard);
}

async fn a_fork_bomb_hits_the_pids_limit_and_the_host_survives(kind: Kind) {
    let f = fixture(kind).await;
    let mut bomb = f
        .spawn(
            &[
                "python3",
                "-c",
                "import os\nprint('armed', flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            ],
            &[],
        )
        .await;
    assert_eq!(bomb.line().await, "armed\n");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The host still forks freely.
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success()
    );
    drop(bomb.guard);
    let exit = tokio::time::timeout(Duration::from_secs(60), bomb.exited)
        .await
        .expect("the bomb is stopped")
        .expect("the exit is known");
    assert!(exit.limits_hit.contains(&KilledReason::Pids), "{exit:?}");
    f.assert_healthy().await;
}

async fn a_memory_hog_is_killed_as_oom(kind: Kind) {
    let f = fixture(kind).await;
    let hog = f
        .spawn(&["python3", "-c", "x = bytearray(512 * 1024 * 1024)"], &[])
        .await;
    let (_, exit) = hog.finish().await;
    assert_eq!(exit.killed_reason, Some(KilledReason::Oom), "{exit:?}");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    f.assert_healthy().await;
}

async fn host_secrets_are_out_of_reach(kind: Kind) {
    let f = fixture(kind).await;
    let reader = f
        .spawn(
            &[
                "sh",
                "-c",
                "cat /etc/shadow; id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status",
            ],
            &[],
        )
        .await;
    let (out, exit) = reader.finish().await;
    assert!(!out.contains("root:"), "{out}");
    assert!(
        exit.stderr.text.contains("No such file") || exit.stderr.text.contains("Permission denied"),
        "{exit:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
}

async fn the_network_is_empty(kind: Kind) {
    let f = fixture(kind).await;
    let client = f
        .spawn(
            &[
                "python3",
                "-c",
                "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=3)\n    print('connected')\nexcept OSError as e:\n    print('refused', e)",
            ],
            &[],
        )
        .await;
    let (out, exit) = client.finish().await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert!(out.starts_with("refused"), "{out}");
}

async fn stderr_is_captured_and_capped(kind: Kind) {
    let f = fixture(kind).await;
    let noisy = f
        .spawn(
            &[
                "sh",
                "-c",
                "echo first >&2; head -c 100000 /dev/zero | tr '\\0' e >&2; echo last >&2; echo done",
            ],
            &[],
        )
        .await;
    let (out, exit) = noisy.finish().await;
    assert_eq!(out, "done\n");
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    let stderr = &exit.stderr;
    assert_eq!(stderr.total_bytes, 100_011);
    assert!(stderr.truncated);
    assert!(stderr.text.len() < 4096 + 100, "{}", stderr.text.len());
    assert!(stderr.text.starts_with("first\n"), "{}", stderr.text);
    assert!(stderr.text.ends_with("last\n"), "{}", stderr.text);
}

async fn an_operation_runs_beside_it_on_the_same_workspace(kind: Kind) {
    let f = fixture(kind).await;
    let mut program = f
        .spawn(
            &[
                "sh",
                "-c",
                "echo from-the-program > shared.txt; echo written; read go; cat /workspace/back.txt",
            ],
            &[],
        )
        .await;
    assert_eq!(program.line().await, "written\n");
    let read = f
        .sandbox
        .run(&Operation::ReadFile {
            path: "shared.txt".into(),
        })
        .await
        .unwrap();
    assert_eq!(read.stdout.text, "from-the-program\n", "{read:?}");
    let wrote = f
        .sandbox
        .run(&Operation::WriteFile {
            path: "back.txt".into(),
            content: "from-an-operation\n".into(),
        })
        .await
        .unwrap();
    assert!(wrote.success(), "{wrote:?}");
    f.assert_healthy().await;
    program.send("go\n").await;
    let (out, exit) = program.finish().await;
    assert_eq!(out, "from-an-operation\n");
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
}
