//! Egress through sandboxd, wired as the Compose stacks wire it: the agent
//! server runs the proxy in a folder of a named volume, sandboxd's docker
//! backend mounts each sandbox's own socket from that volume. Real dockerd
//! (started by `scripts/test`), real HTTP on loopback.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::egress::{EgressPolicy, EgressProxy, FETCH_SCRIPT};
use bulkhead_sandbox::{Backend, ExecResult, Limits, Operation, Sandbox};
use bulkhead_sandbox_remote::client::{RemoteBackend, RemoteConfig};
use bulkhead_sandbox_remote::server::{BackendFactory, Daemon, serve};
use secrecy::SecretString;

const TOKEN: &str = "a-test-token-long-enough-for-sandboxd";

fn docker(args: &[&str]) -> String {
    let output = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs (scripts/test starts dockerd)");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A named volume, removed when dropped.
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}

async fn fetch(sandbox: &Arc<dyn Sandbox>, url: &str) -> ExecResult {
    sandbox
        .run(&Operation::Exec {
            argv: vec![
                "python3".into(),
                "-c".into(),
                FETCH_SCRIPT.into(),
                serde_json::json!({ "url": url }).to_string(),
            ],
            timeout: None,
        })
        .await
        .expect("the sandbox runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_sandboxd_makes_gets_its_own_gate_and_its_refusals_are_on_record() {
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let volume = Volume(format!("bh-egress-{unique}"));
    docker(&["volume", "create", &volume.0]);
    // This process plays the agent server: it sees the volume's folder as
    // the engine's host does.
    let folder = docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume.0]);

    let outside = bulkhead_testing::outside_address();
    let listener = tokio::net::TcpListener::bind((outside, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut request = [0u8; 2048];
            let _ = stream.read(&mut request).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nreached",
                )
                .await;
        }
    });

    // sandboxd: docker sandboxes, no proxy of its own, the gates' volume.
    let image = std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into());
    let volume_name = volume.0.clone();
    let factory: BackendFactory = Box::new(move |scope: &str| {
        Ok(Arc::new(DockerBackend::new(DockerConfig {
            image: image.clone(),
            runtime: None,
            socket: None,
            scope: scope.to_string(),
            egress: None,
            egress_volume: Some(volume_name.clone()),
        })) as Arc<dyn Backend>)
    });
    let daemon = Daemon::new(&SecretString::from(TOKEN), Limits::default(), factory);
    let tcp = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let url = url::Url::parse(&format!("http://{}", tcp.local_addr().unwrap())).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sandboxd = tokio::spawn(async move {
        serve(tcp, daemon, Duration::from_secs(3600), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });

    let policy = EgressPolicy::parse(&format!("localhost:{port}, {outside}:{port}")).unwrap();
    let proxy = Arc::new(EgressProxy::new(folder.as_ref(), Arc::new(policy)).unwrap());
    let scope = format!("egress-{unique}");
    let client = |egress: Option<Arc<EgressProxy>>, scope: &str| {
        RemoteBackend::new(RemoteConfig {
            url: url.clone(),
            token: SecretString::from(TOKEN),
            scope: scope.to_string(),
            egress,
        })
        .unwrap()
    };
    let with_egress = client(Some(proxy), &scope);
    let (first_id, second_id) = (format!("first-{unique}"), format!("second-{unique}"));
    let first = with_egress
        .create(&first_id, &Limits::default())
        .await
        .unwrap();
    let second = with_egress
        .create(&second_id, &Limits::default())
        .await
        .unwrap();

    // The named address is reached, through the sandbox's own socket.
    let result = fetch(&first, &format!("http://{outside}:{port}/")).await;
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    assert!(result.stdout.text.ends_with("reached"), "{result:?}");
    assert!(result.egress_refusals.is_empty(), "{result:?}");

    // A listed name that leads to loopback: refused, and the refusal is on
    // the record of the operation that met it, in that sandbox only.
    let result = fetch(&second, &format!("http://localhost:{port}/")).await;
    assert_eq!(result.exit_code, Some(1), "{result:?}");
    assert!(
        result.stderr.text.contains("refused: loopback"),
        "{result:?}"
    );
    assert_eq!(result.egress_refusals.len(), 1, "{result:?}");
    assert_eq!(result.egress_refusals[0].host, "localhost");
    let result = fetch(&first, &format!("http://{outside}:{port}/")).await;
    assert!(result.egress_refusals.is_empty(), "{result:?}");

    // Each container sees one socket, its own, and no other sandbox's.
    let listing = first
        .run(&Operation::Exec {
            argv: vec!["ls".into(), "-A".into(), "/run/bulkhead".into()],
            timeout: None,
        })
        .await
        .unwrap();
    assert_eq!(listing.stdout.text, "egress.sock\n", "{listing:?}");
    let mounts = docker(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{if eq .Destination \"/run/bulkhead/egress.sock\"}}{{.Source}} {{.RW}}{{end}}{{end}}",
        &format!("bulkhead-sandbox-{second_id}"),
    ]);
    assert_eq!(
        mounts,
        format!(
            "{folder}/{} false",
            bulkhead_sandbox::egress::remote_gate_name(&scope, &second_id)
        ),
        "the second sandbox's own gate, read-only"
    );

    // A server that allows no egress opens no gate: its sandbox has none.
    let without = client(None, &format!("{scope}-none"));
    let sealed = without
        .create(&format!("sealed-{unique}"), &Limits::default())
        .await
        .unwrap();
    let result = fetch(&sealed, &format!("http://{outside}:{port}/")).await;
    assert_eq!(result.exit_code, Some(1), "{result:?}");
    assert!(
        result.stderr.text.contains("no egress from this sandbox"),
        "{result:?}"
    );

    for sandbox in [first, second, sealed] {
        sandbox.destroy().await.unwrap();
    }
    let _ = stop.send(());
    sandboxd.await.unwrap();
}
