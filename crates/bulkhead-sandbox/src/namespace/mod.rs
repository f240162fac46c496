//! The namespace backend: no daemon, one helper process per operation.
//!
//! The server side ([`NamespaceBackend`]) spawns the helper executable
//! (`bulkhead __sandbox-helper`, or the `bulkhead-sandbox-helper` binary),
//! writes the operation to its stdin and reads one JSON report from its
//! stdout. The helper is a plain single-threaded process, so it may fork
//! freely: it creates the cgroup, forks a child that unshares the
//! namespaces, maps the child's user ids, and pumps the program's output
//! through the caps until it ends or its time is up. See `helper.rs` for the
//! host side and `inside.rs` for what runs inside the namespaces.

mod cgroup;
mod helper;
mod hosting;
mod inside;
mod process;
mod seccomp;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use helper::helper_main;

use crate::egress::{EgressGate, EgressProxy};
use crate::{
    Backend, ExecResult, Limits, Operation, Probe, ProcessSpec, Sandbox, SandboxError,
    SandboxProcess,
};

/// The uid (and gid) sandboxed programs have inside their namespaces.
pub const SANDBOX_UID: u32 = 1000;

/// The cgroup per-call cgroups are made in, under the hierarchy's root
/// (v2) or each controller's (v1).
pub const DEFAULT_CGROUP: &str = "bulkhead";

/// A relative cgroup path that stays under the hierarchy's root.
pub fn valid_cgroup(path: &str) -> bool {
    !path.is_empty()
        && path
            .trim_matches('/')
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// What the server hands the helper for one operation or hosted program.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HelperRequest {
    pub task: Task,
    pub limits: Limits,
    /// Host folder mounted at /workspace.
    pub workspace: PathBuf,
    /// Host folder the helper may create scratch folders in.
    pub state_dir: PathBuf,
    /// Host uid and gid that the sandbox's uid 1000 maps to.
    pub host_uid: u32,
    pub host_gid: u32,
    /// Unique per operation; names its cgroup.
    pub run_id: String,
    /// The cgroup the operation's cgroup is made in.
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// The egress proxy's socket, shown inside as
    /// [`crate::egress::SANDBOX_SOCKET`].
    #[serde(default)]
    pub egress_socket: Option<PathBuf>,
}

fn default_cgroup() -> String {
    DEFAULT_CGROUP.into()
}

/// What the helper runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Task {
    /// Run to completion under the timeout, output captured; one
    /// [`HelperReport`] on the helper's stdout.
    Operation(Operation),
    /// A long-lived program on the helper's own stdin and stdout; the
    /// helper reports on its stderr (see `process.rs`).
    Process(ProcessSpec),
}

/// The helper's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HelperReport {
    Finished(ExecResult),
    /// Isolation could not be set up; nothing ran.
    Unavailable(String),
}

#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// An executable whose `main` calls [`helper_main`] when started with
    /// `helper_args` (the `bulkhead-sandbox-helper` binary ignores them).
    pub helper: PathBuf,
    pub helper_args: Vec<String>,
    /// Where session workspaces live on the host.
    pub root: PathBuf,
    /// Host uid/gid for sandboxed programs when the server runs as root
    /// (otherwise the server's own ids are used).
    pub host_uid: u32,
    pub host_gid: u32,
    /// The cgroup per-call cgroups are made in ([`DEFAULT_CGROUP`]). Root
    /// makes it; any other user needs it made and delegated to them.
    pub cgroup: String,
    /// The egress proxy, if sandboxes may reach any host: each sandbox gets
    /// a gate of its own.
    pub egress: Option<Arc<EgressProxy>>,
}

impl NamespaceConfig {
    /// `helper` (or, by default, the running `bulkhead` binary) started
    /// with the hidden `__sandbox-helper` subcommand.
    pub fn with_helper(helper: Option<PathBuf>, root: PathBuf) -> std::io::Result<NamespaceConfig> {
        Ok(NamespaceConfig {
            helper: match helper {
                Some(helper) => helper,
                None => std::env::current_exe()?,
            },
            helper_args: vec!["__sandbox-helper".into()],
            root,
            host_uid: 100_000,
            host_gid: 100_000,
            cgroup: DEFAULT_CGROUP.into(),
            egress: None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct NamespaceBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NamespaceConfig,
    privileged: bool,
    uid: u32,
    gid: u32,
}

/// Numbers the runs of this process: a run's cgroup is named
/// `<server pid>-<n>`, and one process may hold several backends (sandboxd
/// has one per scope), whose runs must not share a name.
static RUNS: AtomicU64 = AtomicU64::new(0);

impl NamespaceBackend {
    pub fn new(config: NamespaceConfig) -> NamespaceBackend {
        let privileged = nix::unistd::geteuid().is_root();
        let (uid, gid) = if privileged {
            (config.host_uid, config.host_gid)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        NamespaceBackend {
            inner: Arc::new(Inner {
                config,
                privileged,
                uid,
                gid,
            }),
        }
    }
}

impl Inner {
    fn state_dir(&self) -> PathBuf {
        self.config.root.join(".state")
    }

    /// The request for `task` in the sandbox whose workspace is
    /// `workspace`; `run_id` names its cgroup.
    fn request(
        &self,
        workspace: &Path,
        limits: &Limits,
        egress_socket: Option<&Path>,
        task: Task,
    ) -> HelperRequest {
        HelperRequest {
            task,
            limits: limits.clone(),
            workspace: workspace.to_path_buf(),
            state_dir: self.state_dir(),
            host_uid: self.uid,
            host_gid: self.gid,
            run_id: format!(
                "{}-{}",
                std::process::id(),
                RUNS.fetch_add(1, Ordering::Relaxed)
            ),
            egress_socket: egress_socket.map(Path::to_path_buf),
            cgroup: self.config.cgroup.clone(),
        }
    }

    /// Starts the helper with its stdio piped.
    fn start_helper(&self) -> Result<tokio::process::Child, SandboxError> {
        let mut command = tokio::process::Command::new(&self.config.helper);
        command
            .args(&self.config.helper_args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // If the caller gives up (shutdown), the helper dies, and with
            // it the whole sandbox (parent-death signals down the chain).
            .kill_on_drop(true);
        let server = std::process::id() as libc::pid_t;
        // SAFETY: setsid, prctl and getppid are async-signal-safe syscalls
        // touching no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                // A session of its own: Ctrl-C in the server's terminal
                // signals the whole foreground process group, and the
                // server drains on SIGINT; a helper in that group would be
                // killed mid-call instead, its call refused and its cgroup
                // left behind.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Out of the group, the helper would outlive a server that
                // dies without dropping it (a CLI killed by Ctrl-C): it
                // dies with the thread that started it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != server {
                    return Err(std::io::Error::other("the server went away"));
                }
                Ok(())
            });
        }
        command.spawn().map_err(|e| {
            SandboxError::Unavailable(format!(
                "cannot start the sandbox helper {}: {e}",
                self.config.helper.display()
            ))
        })
    }

    async fn run_helper(
        &self,
        workspace: &Path,
        limits: &Limits,
        egress_socket: Option<&Path>,
        operation: &Operation,
    ) -> Result<ExecResult, SandboxError> {
        operation.validate()?;
        let request = self.request(
            workspace,
            limits,
            egress_socket,
            Task::Operation(operation.clone()),
        );
        let mut child = self.start_helper()?;
        let body = serde_json::to_vec(&request)
            .map_err(|e| SandboxError::Invalid(format!("cannot encode the request: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(&body).await?;
        drop(stdin);
        let mut report = Vec::new();
        let mut diagnostics = Vec::new();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr").take(64 << 10);
        // The helper enforces the limits itself; this outer bound only
        // guards against a helper that stops answering (a bug), so that a
        // tool call can never hang a run.
        let bound = limits.timeout + Duration::from_secs(30);
        let read = tokio::time::timeout(bound, async {
            tokio::try_join!(
                stdout.read_to_end(&mut report),
                stderr.read_to_end(&mut diagnostics)
            )
        })
        .await;
        match read {
            Ok(result) => {
                result?;
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(SandboxError::Unavailable(format!(
                    "the sandbox helper did not report within {}s",
                    bound.as_secs()
                )));
            }
        }
        let status = child.wait().await?;
        match serde_json::from_slice::<HelperReport>(&report) {
            Ok(HelperReport::Finished(result)) => Ok(result),
            Ok(HelperReport::Unavailable(reason)) => Err(SandboxError::Unavailable(reason)),
            Err(_) => Err(SandboxError::Unavailable(format!(
                "the sandbox helper failed ({status}): {}",
                String::from_utf8_lossy(&diagnostics).trim()
            ))),
        }
    }
}

impl Backend for NamespaceBackend {
    fn name(&self) -> &'static str {
        "namespace"
    }

    fn probe(&self) -> BoxFuture<'_, Result<Probe, SandboxError>> {
        Box::pin(async move {
            let sandbox = self.create("probe", &Limits::default()).await?;
            let result = sandbox
                .run(&Operation::Exec {
                    argv: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "id -u; cat /proc/self/status".into(),
                    ],
                    timeout: None,
                })
                .await;
            let _ = sandbox.destroy().await;
            let result = result?;
            if !result.success() {
                return Err(SandboxError::Unavailable(format!(
                    "a probe command failed in the sandbox: {}",
                    result.stderr.text.trim()
                )));
            }
            let text = &result.stdout.text;
            let uid_line = text.lines().next().unwrap_or_default().trim().to_string();
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            if uid_line != SANDBOX_UID.to_string() || field("CapEff:") != "0000000000000000" {
                return Err(SandboxError::Unavailable(format!(
                    "the probe ran with uid {uid_line} and capabilities {}",
                    field("CapEff:")
                )));
            }
            let mut details = vec![
                format!("cgroup v{}", cgroup::version().unwrap_or(0)),
                format!("seccomp mode {}", field("Seccomp:")),
                format!("no_new_privs {}", field("NoNewPrivs:")),
                format!("landlock ABI {}", inside::landlock_abi()),
            ];
            details.push(if self.inner.privileged {
                "workspace: size-capped tmpfs".into()
            } else {
                "workspace: host folder, files capped by RLIMIT_FSIZE (not running as root)".into()
            });
            Ok(Probe {
                backend: "namespace".into(),
                details,
            })
        })
    }

    fn remove_orphans(&self) -> BoxFuture<'_, Result<usize, SandboxError>> {
        Box::pin(async move {
            // Cgroups of runs whose server died (a SIGKILL), and anything
            // still running in them.
            let group = self.inner.config.cgroup.clone();
            let cgroups = tokio::task::spawn_blocking(move || cgroup::remove_orphans(&group))
                .await
                .unwrap_or(0);
            if cgroups > 0 {
                tracing::warn!(cgroups, "removed the cgroups of runs whose server is gone");
            }
            let root = &self.inner.config.root;
            let entries = match std::fs::read_dir(root) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e.into()),
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                let path = entry.path();
                // Sandbox ids never start with a dot: `.state` and the
                // egress proxy's `.egress` are not sandboxes.
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
                if std::fs::remove_dir_all(&path).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        limits: &'a Limits,
    ) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, SandboxError>> {
        Box::pin(async move {
            crate::validate_id(id)?;
            let inner = &self.inner;
            let workspace = inner.config.root.join(id);
            std::fs::create_dir_all(inner.state_dir())?;
            // The sandbox's uid looks up its root folder in here (see
            // `helper::open_path`): searchable, whatever the umask.
            std::fs::set_permissions(
                inner.state_dir(),
                std::os::unix::fs::PermissionsExt::from_mode(0o711),
            )?;
            std::fs::create_dir_all(&workspace)?;
            if inner.privileged {
                mount_workspace(&workspace, limits, inner.uid, inner.gid)?;
            }
            let gate = match &inner.config.egress {
                Some(proxy) => Some(proxy.open_local_gate().map_err(|e| {
                    SandboxError::Unavailable(format!(
                        "cannot open an egress socket in {}: {e}",
                        proxy.folder().display()
                    ))
                })?),
                None => None,
            };
            Ok(Arc::new_cyclic(|me| NamespaceSandbox {
                inner: Arc::clone(inner),
                workspace,
                limits: limits.clone(),
                gate,
                me: me.clone(),
                hosted: process::Hosted::default(),
            }) as Arc<dyn Sandbox>)
        })
    }
}

/// A size-capped tmpfs owned by the sandbox's host uid, so the disk limit
/// is the kernel's and not a promise.
fn mount_workspace(path: &Path, limits: &Limits, uid: u32, gid: u32) -> Result<(), SandboxError> {
    use nix::mount::{MsFlags, mount};
    if is_mount_point(path) {
        return Ok(());
    }
    let options = format!("size={},uid={uid},gid={gid},mode=0700", limits.disk_bytes);
    mount(
        Some("bulkhead-workspace"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| SandboxError::Unavailable(format!("cannot mount the workspace tmpfs: {e}")))
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mount_point| Path::new(mount_point) == canonical)
}

struct NamespaceSandbox {
    inner: Arc<Inner>,
    workspace: PathBuf,
    limits: Limits,
    /// Bound at [`crate::egress::SANDBOX_SOCKET`] in every operation.
    gate: Option<EgressGate>,
    /// Itself, for the hosted programs that hold it while they run.
    me: std::sync::Weak<NamespaceSandbox>,
    /// The programs it hosts, killed when it is destroyed.
    hosted: process::Hosted,
}

impl Sandbox for NamespaceSandbox {
    fn backend(&self) -> &'static str {
        "namespace"
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn run<'b>(
        &'b self,
        operation: &'b Operation,
    ) -> BoxFuture<'b, Result<ExecResult, SandboxError>> {
        let gate = self.gate.as_ref();
        Box::pin(crate::egress::attributed(
            gate,
            self.inner.run_helper(
                &self.workspace,
                &self.limits,
                gate.map(EgressGate::path),
                operation,
            ),
        ))
    }

    fn spawn<'b>(
        &'b self,
        spec: &'b ProcessSpec,
    ) -> BoxFuture<'b, Result<SandboxProcess, SandboxError>> {
        Box::pin(async move {
            let sandbox = self
                .me
                .upgrade()
                .ok_or_else(|| SandboxError::Unavailable("the sandbox is being dropped".into()))?;
            process::spawn(sandbox, spec).await
        })
    }

    fn destroy(&self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            self.hosted.kill_all().await;
            if self.inner.privileged {
                let _ = nix::mount::umount2(&self.workspace, nix::mount::MntFlags::MNT_DETACH);
            }
            match std::fs::remove_dir_all(&self.workspace) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }
}
