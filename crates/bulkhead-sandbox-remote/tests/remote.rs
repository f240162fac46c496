//! sandboxd and the remote backend over real HTTP on loopback, with the
//! namespace backend doing the isolation behind sandboxd (and the Docker
//! backend, against the engine `scripts/test` starts, for the syscall
//! battery).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{Backend, KilledReason, Limits, Operation, SandboxError};
use bulkhead_sandbox_remote::client::{RemoteBackend, RemoteConfig};
use bulkhead_sandbox_remote::server::{BackendFactory, Daemon, serve};
use secrecy::SecretString;
use tokio::sync::oneshot;

#[path = "../../bulkhead-sandbox/tests/support/syscalls.rs"]
mod syscalls;

const TOKEN: &str = "a-test-token-long-enough-for-sandboxd";

struct Sandboxd {
    url: url::Url,
    root: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sandboxd {
    async fn start(ceiling: Limits) -> Sandboxd {
        let dir = tempfile::tempdir().unwrap();
        Sandboxd::start_at(dir, ceiling, 0, Duration::from_secs(3600)).await
    }

    async fn start_at(
        dir: tempfile::TempDir,
        ceiling: Limits,
        port: u16,
        idle: Duration,
    ) -> Sandboxd {
        let root = dir.path().to_path_buf();
        let helper = bulkhead_testing::sandbox_helper();
        let factory_root = root.clone();
        let factory: BackendFactory = Box::new(move |scope: &str| {
            Ok(Arc::new(NamespaceBackend::new(NamespaceConfig {
                helper: helper.clone(),
                helper_args: Vec::new(),
                root: factory_root.join(scope),
                host_uid: 100_000,
                cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
                host_gid: 100_000,
                egress: None,
            })) as Arc<dyn Backend>)
        });
        Sandboxd::serve(dir, ceiling, port, idle, factory).await
    }

    /// sandboxd making Docker sandboxes, as `bulkhead sandboxd` does with
    /// `SANDBOX_BACKEND=docker`.
    async fn start_docker() -> Sandboxd {
        let dir = tempfile::tempdir().unwrap();
        let run = format!("t{}", std::process::id());
        let factory: BackendFactory = Box::new(move |scope: &str| {
            Ok(Arc::new(DockerBackend::new(DockerConfig {
                image: std::env::var("SANDBOX_IMAGE")
                    .unwrap_or_else(|_| "bulkhead-sandbox:0.1".into()),
                runtime: None,
                socket: None,
                scope: format!("{run}-{scope}"),
                egress: None,
                egress_volume: None,
            })) as Arc<dyn Backend>)
        });
        Sandboxd::serve(
            dir,
            Limits::default(),
            0,
            Duration::from_secs(3600),
            factory,
        )
        .await
    }

    async fn serve(
        dir: tempfile::TempDir,
        ceiling: Limits,
        port: u16,
        idle: Duration,
        factory: BackendFactory,
    ) -> Sandboxd {
        let root = dir.path().to_path_buf();
        let daemon = Daemon::new(&SecretString::from(TOKEN), ceiling, factory);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, daemon, idle, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Sandboxd {
            url,
            root,
            _dir: dir,
            stop: Some(stop),
            task,
        }
    }

    fn client(&self, scope: &str, token: &str) -> RemoteBackend {
        RemoteBackend::new(RemoteConfig {
            url: self.url.clone(),
            token: SecretString::from(token),
            scope: scope.into(),
            egress: None,
        })
        .unwrap()
    }

    /// Stops serving (sandboxd removes its sandboxes) and gives the folder
    /// back for a restart.
    async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap();
        self._dir
    }
}

fn sh(script: &str) -> Operation {
    Operation::Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout: None,
    }
}

#[tokio::test]
async fn runs_commands_and_files_in_a_sandbox_sandboxd_makes() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let backend = sandboxd.client("agents", TOKEN);

    let probe = backend.probe().await.unwrap();
    assert_eq!(probe.backend, "remote");
    assert!(
        probe.details.iter().any(|d| d == "backend namespace"),
        "{:?}",
        probe.details
    );

    let sandbox = backend
        .create("session-1", &Limits::default())
        .await
        .unwrap();
    let result = sandbox
        .run(&sh("id -u; echo hello > note.txt"))
        .await
        .unwrap();
    assert!(result.success(), "{result:?}");
    assert_eq!(
        result.stdout.text.trim(),
        "1000",
        "runs as the sandbox user"
    );

    let read = sandbox
        .run(&Operation::ReadFile {
            path: "note.txt".into(),
        })
        .await
        .unwrap();
    assert_eq!(read.stdout.text, "hello\n");
    assert!(
        sandboxd.root.join("agents").exists(),
        "the scope's sandboxes live under its own folder"
    );

    sandbox.destroy().await.unwrap();
    // A destroyed sandbox is made afresh on its next use: the file is gone.
    let again = backend
        .create("session-1", &Limits::default())
        .await
        .unwrap();
    let read = again
        .run(&Operation::ReadFile {
            path: "note.txt".into(),
        })
        .await
        .unwrap();
    assert!(!read.success(), "{read:?}");
    sandboxd.stop().await;
}

#[tokio::test]
async fn the_ceilings_of_sandboxd_cap_what_a_client_asks_for() {
    let ceiling = Limits {
        timeout: Duration::from_secs(1),
        pids: 32,
        ..Limits::default()
    };
    let sandboxd = Sandboxd::start(ceiling).await;
    let backend = sandboxd.client("greedy", TOKEN);
    let asked = Limits {
        timeout: Duration::from_secs(3600),
        pids: 100_000,
        memory_bytes: 64 << 30,
        ..Limits::default()
    };
    let sandbox = backend.create("s", &asked).await.unwrap();
    assert_eq!(sandbox.limits().timeout, Duration::from_secs(1));
    assert_eq!(sandbox.limits().pids, 32);
    assert_eq!(
        sandbox.limits().memory_bytes,
        Limits::default().memory_bytes
    );

    let result = sandbox.run(&sh("sleep 30")).await.unwrap();
    assert_eq!(
        result.killed_reason,
        Some(KilledReason::Timeout),
        "{result:?}"
    );
    assert!(result.duration_ms < 10_000, "{result:?}");
    sandboxd.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let error = sandboxd
        .client("agents", "not-the-token-at-all-but-long")
        .probe()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SandboxError::Unavailable(m) if m.contains("refused this server's token")),
        "{error}"
    );
    assert!(!error.to_string().contains(TOKEN));

    let http = reqwest::Client::new();
    let response = http
        .put(format!("{}v1/scopes/agents/sandboxes/x", sandboxd.url))
        .json(&Limits::default())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    // Liveness needs no token: it is what the container healthcheck asks.
    let health = http
        .get(format!("{}health", sandboxd.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    sandboxd.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let backend = sandboxd.client("agents", TOKEN);
    let sandbox = backend.create("s", &Limits::default()).await.unwrap();
    let error = sandbox
        .run(&Operation::Exec {
            argv: vec![],
            timeout: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(error, SandboxError::Invalid(_)), "{error}");

    let error = backend
        .create("../../etc", &Limits::default())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&error, SandboxError::Invalid(m) if m.contains("sandbox id")),
        "{error}"
    );

    let bad_scope = RemoteBackend::new(RemoteConfig {
        url: sandboxd.url.clone(),
        token: SecretString::from(TOKEN),
        scope: "..".into(),
        egress: None,
    });
    assert!(bad_scope.unwrap_err().contains("invalid sandbox scope"));
    sandboxd.stop().await;
}

#[tokio::test]
async fn a_client_survives_a_restart_of_sandboxd() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let url = sandboxd.url.clone();
    let backend = sandboxd.client("agents", TOKEN);
    let sandbox = backend.create("kept", &Limits::default()).await.unwrap();
    assert!(sandbox.run(&sh("true")).await.unwrap().success());
    let dir = sandboxd.stop().await;

    let error = sandbox.run(&sh("true")).await.unwrap_err();
    assert!(
        matches!(&error, SandboxError::Unavailable(m) if m.contains("cannot reach sandboxd")),
        "{error}"
    );

    // Back on the same port: the sandbox the client holds is made again
    // on its next use.
    let listener_port = url.port().unwrap();
    let restarted = restart_on(dir, listener_port).await;
    let result = sandbox.run(&sh("echo back")).await.unwrap();
    assert_eq!(result.stdout.text, "back\n", "{result:?}");
    restarted.stop().await;
}

async fn restart_on(dir: tempfile::TempDir, port: u16) -> Sandboxd {
    // The port was just freed; give the kernel a moment if it lingers.
    for _ in 0..50 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Sandboxd::start_at(dir, Limits::default(), port, Duration::from_secs(3600)).await
}

#[tokio::test]
async fn removing_leftovers_of_one_scope_leaves_the_others_alone() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let planner = sandboxd.client("planner", TOKEN);
    let executor = sandboxd.client("executor", TOKEN);
    let mine = planner.create("p1", &Limits::default()).await.unwrap();
    let theirs = executor.create("e1", &Limits::default()).await.unwrap();
    for sandbox in [&mine, &theirs] {
        assert!(
            sandbox
                .run(&Operation::WriteFile {
                    path: "kept.txt".into(),
                    content: "x".into(),
                })
                .await
                .unwrap()
                .success()
        );
    }
    planner.remove_orphans().await.unwrap();
    let read = |sandbox: Arc<dyn bulkhead_sandbox::Sandbox>| async move {
        sandbox
            .run(&Operation::ReadFile {
                path: "kept.txt".into(),
            })
            .await
            .unwrap()
            .success()
    };
    assert!(read(theirs).await, "another scope's workspace was kept");
    assert!(!read(mine).await, "the scope's own leftovers were removed");
    sandboxd.stop().await;
}

#[tokio::test]
async fn sandboxes_left_idle_are_destroyed_by_sandboxd() {
    let dir = tempfile::tempdir().unwrap();
    let sandboxd = Sandboxd::start_at(dir, Limits::default(), 0, Duration::from_secs(1)).await;
    let backend = sandboxd.client("forgetful", TOKEN);
    let sandbox = backend.create("s", &Limits::default()).await.unwrap();
    let write = Operation::WriteFile {
        path: "kept.txt".into(),
        content: "x".into(),
    };
    let read = Operation::ReadFile {
        path: "kept.txt".into(),
    };
    assert!(sandbox.run(&write).await.unwrap().success());
    // Used within the idle time: kept.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sandbox.run(&read).await.unwrap().success());
    // Then left alone for longer: destroyed; the next call gets a fresh one.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(!sandbox.run(&read).await.unwrap().success());
    sandboxd.stop().await;
}

#[tokio::test]
async fn the_syscall_battery_holds_through_sandboxd_on_namespace() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let sandbox = sandboxd
        .client("syscalls", TOKEN)
        .create("s", &Limits::default())
        .await
        .unwrap();
    syscalls::assert_refused(&sandbox.run(&syscalls::operation()).await.unwrap());
    sandboxd.stop().await;
}

#[tokio::test]
async fn the_syscall_battery_holds_through_sandboxd_on_docker() {
    let sandboxd = Sandboxd::start_docker().await;
    let backend = sandboxd.client("syscalls", TOKEN);
    let probe = backend.probe().await.unwrap();
    assert!(
        probe.details.iter().any(|d| d == "backend docker"),
        "{:?}",
        probe.details
    );
    let sandbox = backend.create("s", &Limits::default()).await.unwrap();
    syscalls::assert_refused(&sandbox.run(&syscalls::operation()).await.unwrap());
    sandboxd.stop().await;
}
