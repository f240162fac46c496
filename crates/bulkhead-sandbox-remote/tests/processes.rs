//! Programs hosted through sandboxd: the remote backend's `spawn` over real
//! HTTP on loopback (one upgraded connection per program), the namespace
//! backend doing the isolation behind sandboxd.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{
    Backend, KilledReason, Limits, ProcessExit, ProcessSpec, SandboxError, SandboxProcess,
};
use bulkhead_sandbox_remote::client::{RemoteBackend, RemoteConfig};
use bulkhead_sandbox_remote::server::{BackendFactory, Daemon, serve};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

const TOKEN: &str = "a-test-token-long-enough-for-sandboxd";
const PATIENCE: Duration = Duration::from_secs(20);

struct Sandboxd {
    url: url::Url,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sandboxd {
    async fn start(ceiling: Limits) -> Sandboxd {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let helper = bulkhead_testing::sandbox_helper();
        let factory: BackendFactory = Box::new(move |scope: &str| {
            Ok(Arc::new(NamespaceBackend::new(NamespaceConfig {
                helper: helper.clone(),
                helper_args: Vec::new(),
                root: root.join(scope),
                host_uid: 100_000,
                cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
                host_gid: 100_000,
                egress: None,
            })) as Arc<dyn Backend>)
        });
        let daemon = Daemon::new(&SecretString::from(TOKEN), ceiling, factory);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, daemon, Duration::from_secs(3600), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Sandboxd {
            url,
            _dir: dir,
            stop: Some(stop),
            task,
        }
    }

    fn client(&self, token: &str) -> RemoteBackend {
        RemoteBackend::new(RemoteConfig {
            url: self.url.clone(),
            token: SecretString::from(token),
            scope: "agents".into(),
            egress: None,
        })
        .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap();
    }
}

fn spec(argv: &[&str], env: &[(&str, &str)]) -> ProcessSpec {
    ProcessSpec {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Closes stdin, reads stdout to its end, waits for the exit.
async fn finish(process: SandboxProcess) -> (String, ProcessExit) {
    let SandboxProcess {
        mut stdin,
        mut stdout,
        exited,
        guard,
    } = process;
    stdin.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(PATIENCE, stdout.read_to_string(&mut out))
        .await
        .expect("stdout ends")
        .unwrap();
    let exit = tokio::time::timeout(PATIENCE, exited)
        .await
        .expect("the exit comes")
        .expect("the exit is known");
    drop(guard);
    (out, exit)
}

fn running(pattern: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_through_cat_over_sandboxd() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let sandbox = sandboxd
        .client(TOKEN)
        .create("s", &Limits::default())
        .await
        .unwrap();
    let process = sandbox.spawn(&spec(&["cat"], &[])).await.unwrap();
    let SandboxProcess {
        mut stdin,
        stdout,
        exited,
        guard,
    } = process;
    let mut lines = BufReader::new(stdout);
    for message in ["hello\n", "{\"jsonrpc\":\"2.0\",\"id\":1}\n"] {
        stdin.write_all(message.as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(PATIENCE, lines.read_line(&mut line))
            .await
            .expect("the line comes back")
            .unwrap();
        assert_eq!(line, message);
    }
    // A large message crosses several frames whole.
    let big = "x".repeat(300_000) + "\n";
    let (wrote, read) = tokio::join!(
        async {
            stdin.write_all(big.as_bytes()).await.unwrap();
            stdin.flush().await.unwrap();
        },
        async {
            let mut line = String::new();
            tokio::time::timeout(PATIENCE, lines.read_line(&mut line))
                .await
                .expect("the large line comes back")
                .unwrap();
            line
        }
    );
    let () = wrote;
    assert_eq!(read.len(), big.len());
    let (out, exit) = finish(SandboxProcess {
        stdin,
        stdout: Box::pin(lines),
        exited,
        guard,
    })
    .await;
    assert_eq!(out, "");
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert!(exit.limits_hit.is_empty(), "{exit:?}");
    // And an operation in the same sandbox still runs.
    let result = sandbox
        .run(&bulkhead_sandbox::Operation::Exec {
            argv: vec!["true".into()],
            timeout: None,
        })
        .await
        .unwrap();
    assert!(result.success(), "{result:?}");
    sandboxd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_and_the_exit_cross_sandboxd() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let sandbox = sandboxd
        .client(TOKEN)
        .create("s", &Limits::default())
        .await
        .unwrap();
    let process = sandbox
        .spawn(&spec(
            &[
                "sh",
                "-c",
                "echo \"$API_TOKEN $HOME\"; echo oops >&2; exit 3",
            ],
            &[("API_TOKEN", "remote-secret")],
        ))
        .await
        .unwrap();
    let (out, exit) = finish(process).await;
    assert_eq!(out, "remote-secret /workspace\n");
    assert_eq!(exit.exit_code, Some(3), "{exit:?}");
    assert_eq!(exit.stderr.text, "oops\n", "{exit:?}");
    sandboxd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ceilings_of_sandboxd_hold_for_a_hosted_program() {
    let ceiling = Limits {
        memory_bytes: 64 << 20,
        ..Limits::default()
    };
    let sandboxd = Sandboxd::start(ceiling).await;
    let asked = Limits {
        memory_bytes: 4 << 30,
        ..Limits::default()
    };
    let sandbox = sandboxd.client(TOKEN).create("s", &asked).await.unwrap();
    let hog = sandbox
        .spawn(&spec(
            &["python3", "-c", "x = bytearray(512 * 1024 * 1024)"],
            &[],
        ))
        .await
        .unwrap();
    let (_, exit) = finish(hog).await;
    assert_eq!(exit.killed_reason, Some(KilledReason::Oom), "{exit:?}");
    sandboxd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_process_closes_the_connection_and_sandboxd_kills_it() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let sandbox = sandboxd
        .client(TOKEN)
        .create("s", &Limits::default())
        .await
        .unwrap();
    let sleeper = "sleep 4731";
    let process = sandbox
        .spawn(&spec(
            &["sh", "-c", &format!("{sleeper} & echo started; cat")],
            &[],
        ))
        .await
        .unwrap();
    let mut stdout = BufReader::new(process.stdout);
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, stdout.read_line(&mut line))
        .await
        .expect("the program starts")
        .unwrap();
    assert_eq!(line, "started\n");
    assert!(running(sleeper));
    drop(process.guard);
    let exit = tokio::time::timeout(PATIENCE, process.exited)
        .await
        .expect("the exit future resolves once the connection is gone");
    assert!(exit.is_err(), "the client left before the exit: {exit:?}");
    for _ in 0..100 {
        if !running(sleeper) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!running(sleeper), "sandboxd killed the program's tree");
    drop(process.stdin);
    sandboxd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosting_needs_the_token_and_the_upgrade() {
    let sandboxd = Sandboxd::start(Limits::default()).await;
    let good = sandboxd
        .client(TOKEN)
        .create("s", &Limits::default())
        .await
        .unwrap();
    let bad = sandboxd
        .client("not-the-token-at-all-but-long")
        .create("s", &Limits::default())
        .await;
    assert!(
        matches!(&bad, Err(SandboxError::Unavailable(m)) if m.contains("refused this server's token")),
        "{:?}",
        bad.err()
    );

    let url = format!("{}v1/scopes/agents/sandboxes/s/processes", sandboxd.url);
    let body = serde_json::json!({"limits": Limits::default(), "spec": {"argv": ["cat"]}});
    let http = reqwest::Client::new();
    let no_token = http
        .post(&url)
        .header("connection", "upgrade")
        .header("upgrade", "bulkhead-stdio")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong_token = http
        .post(&url)
        .bearer_auth("not-the-token-at-all-but-long")
        .header("connection", "upgrade")
        .header("upgrade", "bulkhead-stdio")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_token.status(), 401);
    let no_upgrade = http
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(no_upgrade.status(), 426);
    let answer: serde_json::Value = no_upgrade.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "upgrade_required");

    // A request no backend can carry out is refused before the upgrade.
    let empty = good.spawn(&spec(&[], &[])).await.err().unwrap();
    assert!(matches!(empty, SandboxError::Invalid(_)), "{empty}");
    let refused = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("connection", "upgrade")
        .header("upgrade", "bulkhead-stdio")
        .json(&serde_json::json!({"limits": Limits::default(), "spec": {"argv": []}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    sandboxd.stop().await;
}
