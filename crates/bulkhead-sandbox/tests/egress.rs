//! The hostile battery's egress cases, against both backends: a private
//! host in a network namespace this test makes (nothing leaves the
//! machine), reached by names the test writes into /etc/hosts. Each sandbox
//! talks to the proxy only through its own socket, with the real
//! `http_fetch` program.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::egress::{EgressPolicy, EgressProxy, FETCH_SCRIPT};
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{Backend, ExecResult, Limits, Operation, Sandbox};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Docker,
}

fn run(command: &mut Command) {
    let output = command.output().expect("the command runs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A host on a private network: a network namespace joined to this one by
/// a veth pair, with an HTTP listener inside on two addresses (one the
/// operator names, one only a name leads to). Removed when dropped.
struct PrivateHost {
    namespace: String,
    address: Ipv4Addr,
    other_address: Ipv4Addr,
    port: u16,
    /// Connections the listener accepted.
    reached: Arc<AtomicUsize>,
}

impl PrivateHost {
    fn start(tag: &str, subnet: u8) -> PrivateHost {
        let namespace = format!("bh-egress-{tag}");
        let (outer, inner) = (format!("bhe{tag}a"), format!("bhe{tag}b"));
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .output();
        let _ = Command::new("ip").args(["link", "del", &outer]).output();
        run(Command::new("ip").args(["netns", "add", &namespace]));
        run(Command::new("ip").args([
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]));
        run(Command::new("ip").args(["link", "set", &inner, "netns", &namespace]));
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("10.213.{subnet}.1/24"),
            "dev",
            &outer,
        ]));
        run(Command::new("ip").args(["link", "set", &outer, "up"]));
        let in_namespace = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", &namespace])
                .args(args));
        };
        in_namespace(&[
            "ip",
            "addr",
            "add",
            &format!("10.213.{subnet}.2/24"),
            "dev",
            &inner,
        ]);
        in_namespace(&[
            "ip",
            "addr",
            "add",
            &format!("10.213.{subnet}.3/24"),
            "dev",
            &inner,
        ]);
        in_namespace(&["ip", "link", "set", &inner, "up"]);
        in_namespace(&["ip", "link", "set", "lo", "up"]);
        let address = Ipv4Addr::new(10, 213, subnet, 2);
        // The listener's socket belongs to the namespace it was made in: a
        // thread enters it, binds, and hands the socket back.
        let listener = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(format!("/var/run/netns/{namespace}")).unwrap();
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()
                })
                .join()
                .unwrap()
        });
        let port = listener.local_addr().unwrap().port();
        let reached = Arc::new(AtomicUsize::new(0));
        std::thread::spawn({
            let reached = Arc::clone(&reached);
            move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { break };
                    reached.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request);
                    let body = "hello from the private network";
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
        PrivateHost {
            namespace,
            address,
            other_address: Ipv4Addr::new(10, 213, subnet, 3),
            port,
            reached,
        }
    }
}

impl Drop for PrivateHost {
    fn drop(&mut self) {
        // Deleting the namespace takes its end of the veth pair, and so the
        // pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}

/// Names in /etc/hosts for as long as it lives, written under a lock so
/// that tests running at once do not lose each other's lines.
struct HostsEntries {
    lines: Vec<String>,
}

const HOSTS: &str = "/etc/hosts";

fn with_hosts_locked(edit: impl FnOnce(String) -> String) {
    let lock = std::fs::File::create("/tmp/bulkhead-test-hosts.lock").unwrap();
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|_guard| {
            let text = std::fs::read_to_string(HOSTS).unwrap_or_default();
            std::fs::write(HOSTS, edit(text)).expect("tests run as root and may edit /etc/hosts");
        })
        .unwrap_or_else(|(_, e)| panic!("cannot lock the hosts file: {e}"));
}

impl HostsEntries {
    fn add(lines: Vec<String>) -> HostsEntries {
        with_hosts_locked(|mut text| {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            for line in &lines {
                text.push_str(line);
                text.push('\n');
            }
            text
        });
        HostsEntries { lines }
    }
}

impl Drop for HostsEntries {
    fn drop(&mut self) {
        with_hosts_locked(|text| {
            text.lines()
                .filter(|line| !self.lines.iter().any(|ours| ours == line))
                .map(|line| format!("{line}\n"))
                .collect()
        });
    }
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(20),
        ..Limits::default()
    }
}

async fn sandbox(
    kind: Kind,
    tag: &str,
    proxy: Arc<EgressProxy>,
    root: PathBuf,
) -> Arc<dyn Sandbox> {
    let backend: Box<dyn Backend> = match kind {
        Kind::Namespace => Box::new(NamespaceBackend::new(NamespaceConfig {
            helper: PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-sandbox-helper")),
            helper_args: Vec::new(),
            root,
            host_uid: 100_000,
            cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
            host_gid: 100_000,
            egress: Some(proxy),
        })),
        Kind::Docker => Box::new(DockerBackend::new(DockerConfig {
            image: std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into()),
            runtime: None,
            socket: None,
            scope: format!("egress-{tag}"),
            egress: Some(proxy),
            egress_volume: None,
        })),
    };
    backend
        .create(&format!("egress-{tag}"), &limits())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{kind:?} sandbox: {e} (scripts/test starts dockerd and builds the sandbox image)"
            )
        })
}

/// Destroys the sandbox (its container, for docker) when the test ends,
/// passed or failed.
struct Destroy(Arc<dyn Sandbox>);

impl Drop for Destroy {
    fn drop(&mut self) {
        let sandbox = Arc::clone(&self.0);
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(sandbox.destroy())
        })
        .join();
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

async fn a_private_host_is_reached_only_by_naming_its_address(kind: Kind) {
    let subnet = match kind {
        Kind::Namespace => 1 + (std::process::id() % 100) as u8,
        Kind::Docker => 101 + (std::process::id() % 100) as u8,
    };
    let tag = format!("{}{subnet}", std::process::id() % 10_000);
    let host = PrivateHost::start(&tag, subnet);
    let (address, other_address, port) = (host.address, host.other_address, host.port);
    let name = format!("app-{tag}.corp-{tag}.example");
    let mapped = format!("mapped-{tag}.corp-{tag}.example");
    let _names = HostsEntries::add(vec![
        format!("{other_address} {name}"),
        format!("::ffff:{other_address} {mapped}"),
    ]);
    let policy =
        EgressPolicy::parse(&format!("*.corp-{tag}.example:{port}, {address}:{port}")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Arc::new(EgressProxy::new(&dir.path().join("egress"), Arc::new(policy)).unwrap());
    let sandbox = sandbox(kind, &tag, proxy, dir.path().join("sandboxes")).await;
    let _destroy = Destroy(Arc::clone(&sandbox));

    // A name under the allowed wildcard that resolves to a private
    // address: refused, with the rule, and on the operation's record.
    let result = fetch(&sandbox, &format!("http://{name}:{port}/")).await;
    assert_eq!(result.exit_code, Some(1), "{result:?}");
    assert!(
        result.stderr.text.contains(&format!(
            "{name}:{port} ({other_address}) refused: private (RFC 1918"
        )),
        "{result:?}"
    );
    assert_eq!(result.egress_refusals.len(), 1, "{result:?}");
    assert_eq!(result.egress_refusals[0].host, name);
    assert_eq!(
        result.egress_refusals[0].address.as_deref(),
        Some(other_address.to_string().as_str())
    );
    assert!(
        result.egress_refusals[0].rule.contains("RFC 1918"),
        "{result:?}"
    );

    // The same address in its IPv4-mapped IPv6 form: refused too.
    let result = fetch(&sandbox, &format!("http://{mapped}:{port}/")).await;
    assert_eq!(result.exit_code, Some(1), "{result:?}");
    assert!(
        result.stderr.text.contains("refused: private (RFC 1918"),
        "{result:?}"
    );
    assert_eq!(result.egress_refusals.len(), 1, "{result:?}");
    assert_eq!(result.egress_refusals[0].host, mapped);
    assert_eq!(
        host.reached.load(Ordering::SeqCst),
        0,
        "nothing reached the private host through a name"
    );

    // The address the operator named: reached.
    let result = fetch(&sandbox, &format!("http://{address}:{port}/")).await;
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    assert!(
        result.stdout.text.starts_with("HTTP 200 OK")
            && result
                .stdout
                .text
                .ends_with("hello from the private network"),
        "{result:?}"
    );
    assert!(result.egress_refusals.is_empty(), "{result:?}");
    assert_eq!(host.reached.load(Ordering::SeqCst), 1);

    // Not on the list at all (another port): refused without a lookup.
    let result = fetch(
        &sandbox,
        &format!("http://{address}:{}/", port.wrapping_add(1)),
    )
    .await;
    assert_eq!(result.exit_code, Some(1), "{result:?}");
    assert_eq!(result.egress_refusals.len(), 1, "{result:?}");
    assert_eq!(
        result.egress_refusals[0].rule,
        "not in SANDBOX_EGRESS_ALLOW"
    );
}

mod namespace_backend {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_private_host_is_reached_only_by_naming_its_address() {
        super::a_private_host_is_reached_only_by_naming_its_address(super::Kind::Namespace).await
    }
}

mod docker_backend {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_private_host_is_reached_only_by_naming_its_address() {
        super::a_private_host_is_reached_only_by_naming_its_address(super::Kind::Docker).await
    }
}
