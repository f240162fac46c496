//! The hostile battery, against both backends (the namespace sandbox, and
//! the Docker Engine that `scripts/test` starts with the sandbox image it
//! builds): every case asserts containment, the right record, and a sandbox
//! that still works after.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{Backend, ExecResult, KilledReason, Limits, Operation, Sandbox};

#[path = "support/syscalls.rs"]
mod syscalls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Docker,
}

struct Fixture {
    kind: Kind,
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

fn namespace_backend(root: PathBuf, helper: PathBuf) -> NamespaceBackend {
    NamespaceBackend::new(NamespaceConfig {
        helper,
        helper_args: Vec::new(),
        root,
        host_uid: 100_000,
        cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
        host_gid: 100_000,
        egress: None,
    })
}

fn docker_backend(image: Option<&str>) -> DockerBackend {
    DockerBackend::new(DockerConfig {
        image: image
            .map(str::to_owned)
            .or_else(|| std::env::var("SANDBOX_IMAGE").ok())
            .unwrap_or_else(|| "bulkhead-sandbox:0.1".into()),
        runtime: None,
        socket: None,
        scope: unique_id(),
        egress: None,
        egress_volume: None,
    })
}

fn unique_id() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

async fn fixture(kind: Kind) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sandboxes");
    let backend: Box<dyn Backend> = match kind {
        Kind::Namespace => Box::new(namespace_backend(
            root.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-sandbox-helper")),
        )),
        Kind::Docker => Box::new(docker_backend(None)),
    };
    let id = match kind {
        Kind::Namespace => "session-1".to_string(),
        Kind::Docker => unique_id(),
    };
    let sandbox = backend.create(&id, &limits()).await.unwrap_or_else(|e| {
        panic!("{kind:?} sandbox: {e} (scripts/test starts dockerd and builds the sandbox image)")
    });
    Fixture {
        kind,
        _dir: dir,
        root,
        sandbox,
    }
}
impl Fixture {
    async fn sh(&self, script: &str) -> ExecResult {
        self.run(Operation::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: None,
        })
        .await
    }

    async fn run(&self, operation: Operation) -> ExecResult {
        self.sandbox
            .run(&operation)
            .await
            .expect("the sandbox runs")
    }

    /// The sandbox still runs commands normally.
    async fn assert_healthy(&self) {
        let result = self.sh("echo still-ok").await;
        assert_eq!(result.exit_code, Some(0), "{result:?}");
        assert_eq!(result.stdout.text, "still-ok\n");
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

bulkhead_testing::on_both_backends!(
    a_command_runs_as_an_unprivileged_user_with_nothing_extra,
    the_workspace_persists_between_commands,
    a_fork_bomb_is_contained_by_the_pids_limit,
    memory_beyond_the_limit_is_killed_as_oom,
    an_endless_loop_is_killed_at_the_timeout_with_its_children,
    background_processes_do_not_outlive_their_command,
    an_output_flood_is_truncated_and_stopped,
    filling_tmp_or_the_workspace_stops_at_the_cap,
    the_network_is_empty,
    host_secrets_and_environment_are_out_of_reach,
    writing_outside_the_workspace_fails,
    privilege_escalation_fails,
    killing_the_parent_or_init_changes_nothing,
    file_operations_stay_inside_the_workspace,
    unknown_commands_and_bad_requests_are_clear,
    dangerous_syscalls_are_refused_by_the_one_policy,
);

async fn a_command_runs_as_an_unprivileged_user_with_nothing_extra(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .sh("id -u; id -g; hostname; pwd; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; ls /")
        .await;
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    let out = result.stdout.text;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..4], ["1000", "1000", "sandbox", "/workspace"]);
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    let private = f
        .sh("find /home /root /run/secrets -mindepth 1 2>/dev/null | wc -l")
        .await;
    assert_eq!(
        private.stdout.text.trim(),
        "0",
        "no host home, root or secrets: {private:?}"
    );
    assert!(result.killed_reason.is_none());
    assert_eq!(result.stdout.total_bytes as usize, out.len());
}

async fn the_workspace_persists_between_commands(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .sh("echo kept > notes.txt; echo gone > /tmp/scratch")
        .await;
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    let result = f
        .sh("cat /workspace/notes.txt; cat /tmp/scratch 2>&1 || true")
        .await;
    assert!(result.stdout.text.starts_with("kept\n"), "{result:?}");
    if f.kind == Kind::Namespace {
        // Each namespace call gets a fresh /tmp; a container keeps its own.
        assert!(result.stdout.text.contains("No such file"), "{result:?}");
    }
}

async fn a_fork_bomb_is_contained_by_the_pids_limit(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .run(Operation::Exec {
            argv: vec![
                "python3".into(),
                "-c".into(),
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass".into(),
            ],
            timeout: Some(Duration::from_secs(2)),
        })
        .await;
    assert!(
        result.limits_hit.contains(&KilledReason::Pids),
        "{result:?}"
    );
    assert_eq!(
        result.killed_reason,
        Some(KilledReason::Timeout),
        "{result:?}"
    );
    f.assert_healthy().await;
}

async fn memory_beyond_the_limit_is_killed_as_oom(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .run(Operation::Exec {
            argv: vec![
                "python3".into(),
                "-c".into(),
                "x = bytearray(512 * 1024 * 1024)".into(),
            ],
            timeout: None,
        })
        .await;
    assert_eq!(result.killed_reason, Some(KilledReason::Oom), "{result:?}");
    assert_eq!(result.signal, Some(9), "{result:?}");
    f.assert_healthy().await;
}

async fn an_endless_loop_is_killed_at_the_timeout_with_its_children(kind: Kind) {
    let f = fixture(kind).await;
    let started = std::time::Instant::now();
    let result = f.sh("sleep 1000 & while :; do :; done").await;
    assert_eq!(
        result.killed_reason,
        Some(KilledReason::Timeout),
        "{result:?}"
    );
    assert!(result.duration_ms >= 3000, "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the kill is prompt"
    );
    // Nothing of it is left: its cgroup and processes are gone.
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "sleep 1000"])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
    f.assert_healthy().await;
}

async fn background_processes_do_not_outlive_their_command(kind: Kind) {
    let f = fixture(kind).await;
    let result = f.sh("sleep 777 & echo started").await;
    assert_eq!(result.stdout.text, "started\n");
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "sleep 777"])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
}

async fn an_output_flood_is_truncated_and_stopped(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .run(Operation::Exec {
            argv: vec!["yes".into(), "flood".into()],
            timeout: None,
        })
        .await;
    assert_eq!(
        result.killed_reason,
        Some(KilledReason::OutputLimit),
        "{:?}",
        result.killed_reason
    );
    assert!(result.stdout.truncated);
    assert!(
        result.stdout.total_bytes > 16 << 20,
        "true size recorded: {}",
        result.stdout.total_bytes
    );
    assert!(
        result.stdout.text.len() < 4096 + 100,
        "only head and tail kept: {}",
        result.stdout.text.len()
    );
    assert!(result.stdout.text.starts_with("flood\nflood\n"));
    assert!(result.stdout.text.contains("bytes omitted"));
    assert_eq!(result.stdout.sha256.len(), 64);

    // Under the flood threshold the program finishes, truncated but whole.
    let result = f
        .sh("head -c 100000 /dev/zero | tr '\\0' 'a'; echo; echo end")
        .await;
    assert_eq!(result.exit_code, Some(0));
    assert!(result.killed_reason.is_none());
    assert!(result.stdout.truncated);
    assert_eq!(result.stdout.total_bytes, 100_005);
    assert!(result.stdout.text.ends_with("\nend\n"));
    f.assert_healthy().await;
}

async fn filling_tmp_or_the_workspace_stops_at_the_cap(kind: Kind) {
    let f = fixture(kind).await;
    for target in ["/tmp/fill", "/workspace/fill"] {
        let result = f
            .sh(&format!(
                "dd if=/dev/zero of={target} bs=1M count=64 2>&1; echo rc=$?"
            ))
            .await;
        assert_eq!(
            result.killed_reason,
            Some(KilledReason::Disk),
            "{target}: {result:?}"
        );
        assert!(!result.stdout.text.contains("rc=0"), "{target}: {result:?}");
    }
    // Many small files fill it too.
    let result = f
        .sh("i=0; while [ $i -lt 200 ]; do head -c 100000 /dev/zero > /workspace/f$i || break; i=$((i+1)); done; echo $i")
        .await;
    assert_eq!(result.killed_reason, Some(KilledReason::Disk), "{result:?}");
    let written: u32 = result.stdout.text.trim().parse().unwrap();
    assert!(written < 200, "the workspace cap held at {written} files");
    f.sh("rm -f /workspace/f* /workspace/fill").await;
    f.assert_healthy().await;
}

async fn the_network_is_empty(kind: Kind) {
    let f = fixture(kind).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let result = f
        .run(Operation::Exec {
            argv: vec![
                "python3".into(),
                "-c".into(),
                format!(
                    "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\nexcept OSError as e:\n    print('refused', e)\ntry:\n    socket.getaddrinfo('example.com', 443)\n    print('resolved')\nexcept OSError as e:\n    print('no dns', e)"
                ),
            ],
            timeout: None,
        })
        .await;
    let out = &result.stdout.text;
    assert!(
        out.contains("refused") && !out.contains("connected"),
        "{result:?}"
    );
    assert!(
        out.contains("no dns") && !out.contains("resolved"),
        "{result:?}"
    );
    assert!(
        listener.accept().is_err(),
        "nothing reached the host's listener"
    );
    let result = f.sh("cat /proc/net/dev | tail -n +3 | cut -d: -f1").await;
    assert_eq!(
        result.stdout.text.trim(),
        "lo",
        "only a loopback device: {result:?}"
    );
}

async fn host_secrets_and_environment_are_out_of_reach(kind: Kind) {
    let f = fixture(kind).await;
    let me = std::process::id();
    let result = f
        .sh(&format!(
            "cat /etc/shadow; ls /run/secrets; cat /proc/1/environ | tr '\\0' '\\n'; echo; cat /proc/{me}/environ; env; ls /proc | grep -c '^[0-9]'"
        ))
        .await;
    let out = &result.stdout.text;
    let err = &result.stderr.text;
    // The host's shadow file is absent (namespace) or the image's own and
    // unreadable (docker).
    assert!(
        err.contains("/etc/shadow: No such file") || err.contains("/etc/shadow: Permission denied"),
        "{err}"
    );
    assert!(
        err.contains("/run/secrets") && err.contains("No such file"),
        "{err}"
    );
    if f.kind == Kind::Namespace {
        assert!(err.contains("/proc/1/environ: Permission denied"), "{err}");
    }
    assert!(
        err.contains(&format!("/proc/{me}/environ: No such file")) || me < 10,
        "{err}"
    );
    for line in out.lines().filter(|l| l.contains('=')) {
        let name = line.split('=').next().unwrap();
        assert!(
            [
                "PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "TMPDIR", "PWD", "SHLVL", "_",
                "HOSTNAME"
            ]
            .contains(&name),
            "unexpected variable in the sandbox: {line}"
        );
    }
    let processes: u32 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(
        processes < 10,
        "only the sandbox's own processes are visible: {processes}"
    );
}

async fn writing_outside_the_workspace_fails(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .sh("for p in /x /etc/x /usr/x /usr/bin/x /bin/x /dev/x /proc/x; do touch $p 2>/dev/null && echo WROTE $p; done; echo done")
        .await;
    assert_eq!(result.stdout.text, "done\n", "{result:?}");
    assert!(!std::path::Path::new("/usr/x").exists());
}

async fn privilege_escalation_fails(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .sh("su -c id root </dev/null; sudo id </dev/null; python3 -c 'import os; os.setuid(0)'; mount -t tmpfs none /tmp; unshare -r id; unshare -U id; unshare -m id; umount /workspace; chroot / id; echo end")
        .await;
    let out = &result.stdout.text;
    assert!(!out.contains("uid=0"), "{result:?}");
    assert!(out.ends_with("end\n"), "{result:?}");
    let result = f.sh("grep ' /tmp ' /proc/mounts | grep -c tmpfs").await;
    assert_eq!(result.stdout.text.trim(), "1", "no second tmpfs appeared");
    let result = f.sh("ls /workspace >/dev/null && echo mounted").await;
    assert_eq!(result.stdout.text, "mounted\n");
}

async fn killing_the_parent_or_init_changes_nothing(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .sh("kill -9 1; kill -9 $PPID; kill -9 -1; echo survived")
        .await;
    // kill -1 may take the shell itself; init and the helper must survive
    // to report whatever happened.
    assert!(
        result.exit_code.is_some() || result.signal.is_some(),
        "{result:?}"
    );
    f.assert_healthy().await;
}

async fn file_operations_stay_inside_the_workspace(kind: Kind) {
    let f = fixture(kind).await;
    let write = |path: &str, content: &str| Operation::WriteFile {
        path: path.into(),
        content: content.into(),
    };
    let read = |path: &str| Operation::ReadFile { path: path.into() };

    let result = f.run(write("notes/todo.txt", "buy milk")).await;
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    let result = f.run(read("notes/todo.txt")).await;
    assert_eq!(result.stdout.text, "buy milk");
    let result = f.run(read("/workspace/notes/todo.txt")).await;
    assert_eq!(result.stdout.text, "buy milk");
    let result = f.run(Operation::ListDir { path: ".".into() }).await;
    let listing: serde_json::Value = serde_json::from_str(&result.stdout.text).unwrap();
    assert_eq!(listing[0]["name"], "notes");
    assert_eq!(listing[0]["type"], "dir");

    f.sh("ln -s /etc/passwd passwd-link; ln -s / root-link; ln -s /tmp tmp-link")
        .await;
    for (operation, expected) in [
        (read("../etc/passwd"), "outside the workspace"),
        (read("/etc/passwd"), "outside the workspace"),
        (read("notes/../../etc/hostname"), "outside the workspace"),
        (read("passwd-link"), "resolves outside the workspace"),
        (
            read("root-link/etc/passwd"),
            "resolves outside the workspace",
        ),
        (write("../escape.txt", "x"), "outside the workspace"),
        (write("/etc/evil", "x"), "outside the workspace"),
        (write("passwd-link", "x"), "symbolic link"),
        (
            write("tmp-link/evil", "x"),
            "resolves outside the workspace",
        ),
        (
            Operation::ListDir { path: "..".into() },
            "outside the workspace",
        ),
        (
            Operation::ListDir {
                path: "root-link".into(),
            },
            "resolves outside the workspace",
        ),
    ] {
        let result = f.run(operation.clone()).await;
        assert_eq!(result.exit_code, Some(1), "{operation:?}: {result:?}");
        assert!(
            result.stderr.text.contains(expected),
            "{operation:?}: {}",
            result.stderr.text
        );
    }
    // The host saw none of it.
    let mut passwd = String::new();
    std::fs::File::open("/etc/passwd")
        .unwrap()
        .read_to_string(&mut passwd)
        .unwrap();
    assert!(passwd.contains("root:"));
    f.assert_healthy().await;
}

async fn unknown_commands_and_bad_requests_are_clear(kind: Kind) {
    let f = fixture(kind).await;
    let result = f
        .run(Operation::Exec {
            argv: vec!["no-such-tool".into()],
            timeout: None,
        })
        .await;
    assert_eq!(result.exit_code, Some(127));
    assert!(
        result.stderr.text.contains("no-such-tool") && result.stderr.text.contains("not found"),
        "{result:?}"
    );
    let error = f
        .sandbox
        .run(&Operation::Exec {
            argv: vec![],
            timeout: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, bulkhead_sandbox::SandboxError::Invalid(_)),
        "{error}"
    );
}

async fn dangerous_syscalls_are_refused_by_the_one_policy(kind: Kind) {
    let f = fixture(kind).await;
    let result = f.run(syscalls::operation()).await;
    syscalls::assert_refused(&result);
    f.assert_healthy().await;
}

/// The battery's arguments tell a refusal by the filter apart: in a
/// container like the backend's (same image, user, no capabilities,
/// no-new-privileges) but without a seccomp profile, the syscalls answer
/// something else.
#[tokio::test]
async fn without_a_seccomp_profile_the_battery_reaches_the_syscalls() {
    let Operation::Exec { argv, .. } = syscalls::operation() else {
        unreachable!()
    };
    let output = std::process::Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            "--cap-drop",
            "ALL",
            "--user",
            "1000:1000",
        ])
        .args([
            "--security-opt",
            "no-new-privileges",
            "--security-opt",
            "seccomp=unconfined",
        ])
        .arg(std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into()))
        .args(argv)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    syscalls::assert_unfiltered(&stdout);
}

#[tokio::test]
async fn the_namespace_probe_reports_the_isolation_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let backend = namespace_backend(
        dir.path().to_path_buf(),
        PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-sandbox-helper")),
    );
    let probe = backend.probe().await.expect("isolation is available here");
    let details = probe.details.join(", ");
    assert!(
        details.contains("seccomp mode 2") && details.contains("no_new_privs 1"),
        "{details}"
    );

    // A helper that cannot run means no sandbox, never an unsandboxed run.
    let broken = namespace_backend(
        dir.path().to_path_buf(),
        PathBuf::from("/nonexistent/helper"),
    );
    let error = broken.probe().await.unwrap_err();
    assert!(
        matches!(error, bulkhead_sandbox::SandboxError::Unavailable(_)),
        "{error}"
    );
}

#[tokio::test]
async fn the_docker_probe_checks_the_engine_and_the_image() {
    let probe = docker_backend(None)
        .probe()
        .await
        .expect("the engine and image are there");
    assert!(
        probe.details.iter().any(|d| d.starts_with("engine ")),
        "{probe:?}"
    );
    assert!(
        probe
            .details
            .iter()
            .any(|d| d.starts_with("seccomp moby/profiles")),
        "the profile it applies: {probe:?}"
    );
    let error = docker_backend(Some("bulkhead-no-such-image:0"))
        .probe()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("bulkhead-no-such-image:0"),
        "{error}"
    );
}

#[tokio::test]
async fn docker_sandboxes_carry_the_policys_seccomp_profile() {
    let backend = docker_backend(None);
    let id = unique_id();
    let sandbox = backend.create(&id, &limits()).await.unwrap();
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{json .HostConfig.SecurityOpt}}"])
        .arg(format!("bulkhead-sandbox-{id}"))
        .output()
        .unwrap();
    let _ = sandbox.destroy().await;
    let options: Vec<String> = serde_json::from_slice(&inspect.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&inspect.stderr)));
    assert_eq!(options.len(), 2, "{options:?}");
    assert_eq!(options[0], "no-new-privileges");
    let profile = options[1]
        .strip_prefix("seccomp=")
        .unwrap_or_else(|| panic!("a seccomp profile: {}", options[1]));
    assert_eq!(
        profile,
        bulkhead_sandbox::seccomp_policy::docker_profile(),
        "the policy's profile, as generated"
    );
    // And what it says, read as the engine reads it.
    let profile: serde_json::Value = serde_json::from_str(profile).unwrap();
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let refusing = |name: &str| {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["names"].as_array().unwrap().iter().any(|n| n == name))
            .all(|rule| rule["action"] == "SCMP_ACT_ERRNO")
    };
    for name in ["io_uring_setup", "bpf", "ptrace", "keyctl", "clone3"] {
        assert!(refusing(name), "{name} is refused");
    }
}

#[tokio::test]
async fn docker_sandboxes_are_labelled_and_orphans_removed() {
    let backend = docker_backend(None);
    let id = unique_id();
    let sandbox = backend.create(&id, &limits()).await.unwrap();
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{index .Config.Labels \"dev.bulkhead.sandbox\"}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.NetworkMode}} {{.HostConfig.CapDrop}} {{.HostConfig.Init}} {{.Config.User}}"])
        .arg(format!("bulkhead-sandbox-{id}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    let scope = text.split(' ').next().unwrap().to_string();
    assert!(scope.starts_with('t'), "labelled with its scope: {text}");
    assert_eq!(
        text.trim().split_once(' ').unwrap().1,
        "true none [ALL] true 1000:1000",
        "{text}"
    );
    drop(sandbox);
    // As after a crash: the container is still there; the next start
    // removes it.
    assert_eq!(
        backend.remove_orphans().await.unwrap(),
        1,
        "only its own scope's"
    );
    let gone = std::process::Command::new("docker")
        .args(["inspect", &format!("bulkhead-sandbox-{id}")])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the orphan was removed");
}

/// A server killed outright leaves its runs' cgroups, and whatever still
/// runs in them; the next start removes them, and never a live server's.
#[tokio::test]
async fn the_cgroups_of_a_dead_server_are_removed_at_the_next_start() {
    let version = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        2
    } else {
        1
    };
    let group = format!("bulkhead-orphan-test-{}", std::process::id());
    let parents: Vec<PathBuf> = if version == 1 {
        ["memory", "pids", "cpu"]
            .iter()
            .map(|c| PathBuf::from("/sys/fs/cgroup").join(c).join(&group))
            .collect()
    } else {
        vec![PathBuf::from("/sys/fs/cgroup").join(&group)]
    };
    // A pid no process has: the server that made the cgroup is gone.
    let dead = (3_000_000..4_000_000)
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .unwrap();
    let (orphan, live) = (format!("{dead}-1"), format!("{}-7", std::process::id()));
    for parent in &parents {
        for name in [&orphan, &live] {
            std::fs::create_dir_all(parent.join(name))
                .unwrap_or_else(|e| panic!("{}: {e} (the battery runs as root)", parent.display()));
        }
    }
    // A program that outlived its server, still in the orphan's cgroup.
    let mut outlived = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    // In every controller, as the helper puts its runs.
    for parent in &parents {
        std::fs::write(
            parent.join(&orphan).join("cgroup.procs"),
            outlived.id().to_string(),
        )
        .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let backend = NamespaceBackend::new(NamespaceConfig {
        helper: PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-sandbox-helper")),
        helper_args: Vec::new(),
        root: dir.path().to_path_buf(),
        host_uid: 100_000,
        cgroup: group.clone(),
        host_gid: 100_000,
        egress: None,
    });
    backend.remove_orphans().await.unwrap();

    let status = outlived.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the program that outlived its server was killed"
    );
    for parent in &parents {
        assert!(!parent.join(&orphan).exists(), "{}", parent.display());
        assert!(
            parent.join(&live).exists(),
            "a live server's cgroup is kept"
        );
        let _ = std::fs::remove_dir(parent.join(&live));
        let _ = std::fs::remove_dir(parent);
    }
}
