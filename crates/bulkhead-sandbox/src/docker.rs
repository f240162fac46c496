//! The Docker Engine backend: one container per session, through the
//! Engine API on its unix socket (bollard).
//!
//! The container: `SANDBOX_IMAGE` running `sleep infinity` under Docker's
//! init, as uid 1000, read-only root, a tmpfs /tmp, the workspace a
//! size-capped tmpfs volume, `network none`, every capability dropped,
//! `no-new-privileges`, the seccomp profile of [`crate::seccomp_policy`],
//! memory (no swap), CPU and pids limits, and
//! `SANDBOX_RUNTIME` (e.g. `runsc`) when set. Operations are `docker exec`s
//! in it; each runs as the leader of its own process group so that a
//! timeout kills the whole group. Hosted programs are execs too (see
//! `docker/process.rs`).

mod process;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::{
    Config, CreateContainerOptions, KillContainerOptions, ListContainersOptions, LogOutput,
    RemoveContainerOptions, RestartContainerOptions,
};
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{HostConfig, Mount, MountTypeEnum, ResourcesUlimits};
use bollard::volume::{CreateVolumeOptions, ListVolumesOptions, RemoveVolumeOptions};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, OnceCell};

use crate::egress::{EgressGate, EgressProxy};
use crate::output::OutputCapture;
use crate::paths::{WORKSPACE, workspace_path};
use crate::{
    Backend, ExecResult, KilledReason, Limits, Operation, Probe, ProcessSpec, Sandbox,
    SandboxError, SandboxProcess,
};

/// Every container and volume the backend makes carries this label.
pub const LABEL: &str = "dev.bulkhead.sandbox";
const SESSION_LABEL: &str = "dev.bulkhead.session";
const USER: &str = "1000:1000";
const ENV: &[&str] = &[
    "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
    "HOME=/workspace",
    "USER=sandbox",
    "LANG=C.UTF-8",
    "TERM=dumb",
    "TMPDIR=/tmp",
];

#[derive(Debug, Clone)]
pub struct DockerConfig {
    pub image: String,
    /// An OCI runtime registered with the engine, such as `runsc`.
    pub runtime: Option<String>,
    /// The engine's unix socket (default /var/run/docker.sock).
    pub socket: Option<String>,
    /// The value of the `dev.bulkhead.sandbox` label on everything this
    /// backend makes; orphans are looked for under this value only, so
    /// that servers sharing an engine leave each other's sandboxes alone.
    pub scope: String,
    /// The egress proxy, if sandboxes may reach any host: each sandbox gets
    /// a gate of its own, mounted read-only at
    /// [`crate::egress::SANDBOX_SOCKET`].
    pub egress: Option<Arc<EgressProxy>>,
    /// A named volume holding the proxy's gates, for when whoever runs the
    /// proxy is itself a container and has no host path to offer: a gate
    /// is mounted from the volume's folder on the engine's host. Without a
    /// proxy of its own (sandboxd), the gate is the one the client opened
    /// for the sandbox ([`crate::egress::remote_gate_name`]), if it did.
    pub egress_volume: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DockerBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: DockerConfig,
    client: OnceCell<Docker>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Unavailable(format!("{what}: {e}"))
}

impl Inner {
    async fn client(&self) -> Result<&Docker, SandboxError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self
                    .config
                    .socket
                    .clone()
                    .unwrap_or_else(|| "/var/run/docker.sock".into());
                let socket = socket.trim_start_matches("unix://").to_string();
                let docker = Docker::connect_with_unix(&socket, 120, bollard::API_DEFAULT_VERSION)
                    .map_err(|e| unavailable("cannot reach the Docker Engine", e))?;
                docker.negotiate_version().await.map_err(|e| {
                    unavailable(&format!("the Docker Engine at {socket} does not answer"), e)
                })
            })
            .await
    }
}

impl DockerBackend {
    pub fn new(config: DockerConfig) -> DockerBackend {
        DockerBackend {
            inner: Arc::new(Inner {
                config,
                client: OnceCell::new(),
            }),
        }
    }
}

/// Removes a sandbox's container (killing what runs in it) and then its
/// workspace volume.
async fn remove(
    docker: &Docker,
    container: &str,
    volume: &str,
) -> Result<(), bollard::errors::Error> {
    let removed = docker
        .remove_container(
            container,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await;
    let _ = docker
        .remove_volume(volume, Some(RemoveVolumeOptions { force: true }))
        .await;
    match removed {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

fn container_name(id: &str) -> String {
    format!("bulkhead-sandbox-{id}")
}

fn volume_name(id: &str) -> String {
    format!("bulkhead-workspace-{id}")
}

impl DockerBackend {
    /// The gate a new sandbox gets (when the proxy is ours) and the path on
    /// the engine's host to mount at [`crate::egress::SANDBOX_SOCKET`].
    async fn egress_source(
        &self,
        docker: &Docker,
        id: &str,
    ) -> Result<(Option<EgressGate>, Option<String>), SandboxError> {
        let config = &self.inner.config;
        let folder_on_host = match &config.egress_volume {
            Some(volume) => match docker.inspect_volume(volume).await {
                Ok(volume) => Some(volume.mountpoint),
                Err(e) if config.egress.is_some() => {
                    return Err(unavailable(
                        &format!("cannot find the egress volume {volume}"),
                        e,
                    ));
                }
                Err(e) => {
                    tracing::warn!(volume, error = %e, "no egress volume: the sandbox gets no egress");
                    return Ok((None, None));
                }
            },
            None => None,
        };
        match (&config.egress, folder_on_host) {
            (Some(proxy), folder) => {
                let gate = proxy.open_local_gate().map_err(|e| {
                    unavailable(
                        &format!(
                            "cannot open an egress socket in {}",
                            proxy.folder().display()
                        ),
                        e,
                    )
                })?;
                let source = match folder {
                    Some(folder) => format!("{folder}/{}", gate.file_name()),
                    None => gate.path().display().to_string(),
                };
                Ok((Some(gate), Some(source)))
            }
            (None, Some(folder)) => Ok((
                None,
                Some(format!(
                    "{folder}/{}",
                    crate::egress::remote_gate_name(&config.scope, id)
                )),
            )),
            (None, None) => Ok((None, None)),
        }
    }
}

impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn probe(&self) -> BoxFuture<'_, Result<Probe, SandboxError>> {
        Box::pin(async move {
            let docker = self.inner.client().await?;
            docker
                .inspect_image(&self.inner.config.image)
                .await
                .map_err(|e| {
                    unavailable(
                        &format!("the sandbox image {} is missing", self.inner.config.image),
                        e,
                    )
                })?;
            let id = format!("probe-{}-{}", std::process::id(), fastrand_suffix());
            let sandbox = self.create(&id, &Limits::default()).await?;
            let result = sandbox
                .run(&Operation::Exec {
                    argv: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "id -u; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status".into(),
                    ],
                    timeout: None,
                })
                .await;
            let _ = sandbox.destroy().await;
            let result = result?;
            let text = result.stdout.text.clone();
            if !result.success()
                || text.lines().next() != Some("1000")
                || !text.contains("CapEff:\t0000000000000000")
                || !text.contains("NoNewPrivs:\t1")
            {
                return Err(SandboxError::Unavailable(format!(
                    "a probe container did not run confined: {text} {}",
                    result.stderr.text
                )));
            }
            let version = docker
                .version()
                .await
                .map_err(|e| unavailable("docker version", e))?;
            Ok(Probe {
                backend: "docker".into(),
                details: vec![
                    format!("engine {}", version.version.unwrap_or_default()),
                    format!("image {}", self.inner.config.image),
                    format!(
                        "runtime {}",
                        self.inner.config.runtime.as_deref().unwrap_or("default")
                    ),
                    format!(
                        "seccomp {} less the {} syscalls of the policy",
                        crate::seccomp_policy::MOBY_DEFAULT_SOURCE,
                        crate::seccomp_policy::REFUSED.len()
                    ),
                ],
            })
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            let docker = self.inner.client().await?;
            docker
                .ping()
                .await
                .map(|_| ())
                .map_err(|e| unavailable("the Docker Engine does not answer", e))
        })
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        limits: &'a Limits,
    ) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, SandboxError>> {
        Box::pin(async move {
            crate::validate_id(id)?;
            let docker = self.inner.client().await?;
            let name = container_name(id);
            let volume = volume_name(id);
            // A leftover of the same name (a crash) is replaced.
            let _ = remove(docker, &name, &volume).await;
            let labels: HashMap<String, String> = [
                (LABEL.to_string(), self.inner.config.scope.clone()),
                (SESSION_LABEL.to_string(), id.to_string()),
            ]
            .into();
            docker
                .create_volume(CreateVolumeOptions {
                    name: volume.clone(),
                    driver: "local".into(),
                    driver_opts: [
                        ("type".to_string(), "tmpfs".to_string()),
                        ("device".to_string(), "tmpfs".to_string()),
                        (
                            "o".to_string(),
                            format!(
                                "size={},uid=1000,gid=1000,mode=0700,nosuid,nodev",
                                limits.disk_bytes
                            ),
                        ),
                    ]
                    .into(),
                    labels: labels.clone(),
                })
                .await
                .map_err(|e| unavailable("cannot create the workspace volume", e))?;
            let (gate, egress_source) = self.egress_source(docker, id).await?;
            let memory = limits.memory_bytes as i64;
            let host_config = HostConfig {
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some((limits.cpus * 1e9) as i64),
                pids_limit: Some(i64::from(limits.pids)),
                readonly_rootfs: Some(true),
                tmpfs: Some(
                    [(
                        "/tmp".to_string(),
                        format!("rw,nosuid,nodev,size={},mode=1777", limits.disk_bytes),
                    )]
                    .into(),
                ),
                mounts: Some(
                    std::iter::once(Mount {
                        target: Some(WORKSPACE.into()),
                        source: Some(volume.clone()),
                        typ: Some(MountTypeEnum::VOLUME),
                        ..Default::default()
                    })
                    .chain(egress_source.as_ref().map(|source| Mount {
                        target: Some(crate::egress::SANDBOX_SOCKET.into()),
                        source: Some(source.clone()),
                        typ: Some(MountTypeEnum::BIND),
                        read_only: Some(true),
                        ..Default::default()
                    }))
                    .collect(),
                ),
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                // The engine's own default varies with its version (20.10
                // allows io_uring): the policy every backend shares instead.
                security_opt: Some(vec![
                    "no-new-privileges".into(),
                    format!("seccomp={}", crate::seccomp_policy::docker_profile()),
                ]),
                init: Some(true),
                runtime: self.inner.config.runtime.clone(),
                ulimits: Some(vec![
                    ResourcesUlimits {
                        name: Some("core".into()),
                        soft: Some(0),
                        hard: Some(0),
                    },
                    ResourcesUlimits {
                        name: Some("nofile".into()),
                        soft: Some(1024),
                        hard: Some(1024),
                    },
                    ResourcesUlimits {
                        name: Some("fsize".into()),
                        soft: Some(limits.disk_bytes as i64),
                        hard: Some(limits.disk_bytes as i64),
                    },
                ]),
                ..Default::default()
            };
            let config = Config {
                image: Some(self.inner.config.image.clone()),
                cmd: Some(vec!["sleep".to_string(), "infinity".to_string()]),
                user: Some(USER.into()),
                hostname: Some("sandbox".into()),
                working_dir: Some(WORKSPACE.into()),
                env: Some(ENV.iter().map(|s| s.to_string()).collect()),
                labels: Some(labels),
                network_disabled: Some(true),
                host_config: Some(host_config),
                ..Default::default()
            };
            let options = CreateContainerOptions {
                name: name.clone(),
                platform: None,
            };
            let created = match docker
                .create_container(Some(options.clone()), config.clone())
                .await
            {
                // The client has no gate for this sandbox: it allows no
                // egress, so the sandbox gets none.
                Err(e)
                    if gate.is_none()
                        && egress_source.is_some()
                        && e.to_string().contains("bind source path does not exist") =>
                {
                    let mut config = config;
                    if let Some(mounts) = config
                        .host_config
                        .as_mut()
                        .and_then(|host| host.mounts.as_mut())
                    {
                        mounts.retain(|m| m.typ != Some(MountTypeEnum::BIND));
                    }
                    docker.create_container(Some(options), config).await
                }
                other => other,
            };
            let id = created
                .map_err(|e| unavailable("cannot create the sandbox container", e))?
                .id;
            if let Err(e) = docker.start_container::<String>(&name, None).await {
                let _ = remove(docker, &name, &volume).await;
                return Err(unavailable("cannot start the sandbox container", e));
            }
            Ok(Arc::new_cyclic(|me| DockerSandbox {
                inner: Arc::clone(&self.inner),
                name,
                id,
                gate,
                init_pid: std::sync::Mutex::new(None),
                volume,
                limits: limits.clone(),
                counters: Mutex::new(Counters::default()),
                pending_hits: Mutex::new(Vec::new()),
                me: me.clone(),
                destroyed: std::sync::atomic::AtomicBool::new(false),
            }) as Arc<dyn Sandbox>)
        })
    }

    fn remove_orphans(&self) -> BoxFuture<'_, Result<usize, SandboxError>> {
        Box::pin(async move {
            let docker = self.inner.client().await?;
            let filters: HashMap<String, Vec<String>> = [(
                "label".to_string(),
                vec![format!("{LABEL}={}", self.inner.config.scope)],
            )]
            .into();
            let containers = docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: filters.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(|e| unavailable("cannot list containers", e))?;
            let mut removed = 0;
            for container in containers {
                if let Some(id) = container.id
                    && docker
                        .remove_container(
                            &id,
                            Some(RemoveContainerOptions {
                                force: true,
                                v: true,
                                ..Default::default()
                            }),
                        )
                        .await
                        .is_ok()
                {
                    removed += 1;
                }
            }
            if let Ok(volumes) = docker
                .list_volumes(Some(ListVolumesOptions { filters }))
                .await
            {
                for volume in volumes.volumes.unwrap_or_default() {
                    let _ = docker
                        .remove_volume(&volume.name, Some(RemoveVolumeOptions { force: true }))
                        .await;
                }
            }
            Ok(removed)
        })
    }
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or_default()
}

/// What the container's cgroup and filesystems say.
struct Observation {
    counters: Counters,
    full: bool,
}

/// Cumulative cgroup counters seen after the last operation.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    oom_kills: u64,
    pids_refusals: u64,
}

struct DockerSandbox {
    inner: Arc<Inner>,
    name: String,
    /// This sandbox's socket to the egress proxy, when the proxy is ours.
    gate: Option<EgressGate>,
    /// The container's full id, which its cgroup paths contain.
    id: String,
    /// The host pid of the container's init, once looked up: reading the
    /// cgroup counters then costs no round trip to the engine.
    init_pid: std::sync::Mutex<Option<i64>>,
    volume: String,
    limits: Limits,
    counters: Mutex<Counters>,
    /// Limits seen struck before a kill, for the result being assembled.
    pending_hits: Mutex<Vec<KilledReason>>,
    /// Itself, for the hosted programs that hold it while they run.
    me: std::sync::Weak<DockerSandbox>,
    /// Its container is removed: a hosted program that ended with it has
    /// nothing left to inspect.
    destroyed: std::sync::atomic::AtomicBool,
}

const READ_SCRIPT: &str = r#"p=$(realpath -e -- "$1") || exit 1
case "$p" in /workspace|/workspace/*) exec cat -- "$p";; esac
echo "$1: resolves outside the workspace" >&2; exit 1"#;

const WRITE_SCRIPT: &str = r#"d=$(dirname -- "$1")
mkdir -p -- "$d" || exit 1
r=$(realpath -e -- "$d") || exit 1
case "$r" in /workspace|/workspace/*) ;; *) echo "$1: resolves outside the workspace" >&2; exit 1;; esac
if [ -L "$1" ]; then echo "$1: is a symbolic link; refusing to write through it" >&2; exit 1; fi
cat > "$1" || exit 1
echo "wrote $(wc -c < "$1") bytes to $1""#;

const LIST_SCRIPT: &str = r#"p=$(realpath -e -- "$1") || exit 1
case "$p" in /workspace|/workspace/*) ;; *) echo "$1: resolves outside the workspace" >&2; exit 1;; esac
[ -d "$p" ] || { echo "$1: Not a directory" >&2; exit 1; }
find "$p" -mindepth 1 -maxdepth 1 -printf '%f\t%y\t%s\n'"#;

const STATS_SCRIPT: &str = r#"cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events 2>/dev/null | grep '^oom_kill ' | head -n 1
cat /sys/fs/cgroup/pids/pids.events /sys/fs/cgroup/pids.events 2>/dev/null | grep '^max ' | head -n 1
df -P /tmp /workspace | tail -n 2 | awk '{print "avail " $4}'"#;

impl DockerSandbox {
    /// Creates an exec; a container that stopped (every process of the
    /// sandbox user killed, say) is started again first.
    async fn create_exec(
        &self,
        options: CreateExecOptions<String>,
    ) -> Result<String, SandboxError> {
        let docker = self.inner.client().await?;
        match docker.create_exec(&self.name, options.clone()).await {
            Ok(exec) => Ok(exec.id),
            Err(first) => {
                if self.running(docker).await.unwrap_or(false) {
                    return Err(unavailable("docker exec", first));
                }
                self.restart().await?;
                docker
                    .create_exec(&self.name, options)
                    .await
                    .map(|exec| exec.id)
                    .map_err(|e| unavailable("docker exec", e))
            }
        }
    }

    /// Runs a command of ours to completion (kill, stats); returns its
    /// stdout, bounded.
    async fn plain(&self, argv: Vec<String>) -> Result<String, SandboxError> {
        tokio::time::timeout(Duration::from_secs(10), self.plain_unbounded(argv))
            .await
            .map_err(|_| {
                SandboxError::Unavailable("the Docker Engine did not answer in time".into())
            })?
    }

    async fn plain_unbounded(&self, argv: Vec<String>) -> Result<String, SandboxError> {
        let docker = self.inner.client().await?;
        let exec_id = self
            .create_exec(CreateExecOptions {
                cmd: Some(argv),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                user: Some(USER.to_string()),
                ..Default::default()
            })
            .await?;
        let mut stdout = String::new();
        if let StartExecResults::Attached { mut output, .. } = docker
            .start_exec(&exec_id, None::<StartExecOptions>)
            .await
            .map_err(|e| unavailable("docker exec", e))?
        {
            while let Some(Ok(chunk)) = output.next().await {
                if let LogOutput::StdOut { message } = chunk
                    && stdout.len() < 64 << 10
                {
                    stdout.push_str(&String::from_utf8_lossy(&message));
                }
            }
        }
        Ok(stdout)
    }

    /// Kills the operation's process group (and, if its id is unknown,
    /// every process of the sandbox user but init).
    async fn kill_group(&self, marker: &str) {
        let script = format!(
            "g=$(cat /tmp/.bulkhead-{marker} 2>/dev/null); if [ -n \"$g\" ]; then kill -KILL -$g; else kill -KILL -1; fi"
        );
        let _ = self
            .plain(vec!["/bin/sh".into(), "-c".into(), script])
            .await;
    }

    /// Runs a program; if the container turned out to be stopping (its
    /// processes were all killed, say by `kill -9 -1`), starts it again and
    /// runs the program once more.
    async fn exec(
        &self,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecResult, SandboxError> {
        let first = self.exec_once(argv.clone(), stdin.clone(), timeout).await;
        // An exec into a container that is stopping fails in one of several
        // ways depending on how far the stop has got: an engine error, or
        // exit code 126 with the engine's message ("cannot exec in a
        // stopped state", "task … not found") on stdout and nothing on
        // stderr. When the runtime itself says the container is stopped, that is
        // believed at once: the engine's own state can lag behind it by
        // many seconds on a busy machine (seen in CI), so the container is
        // restarted through the engine, which settles its state first.
        // A bare 126 with nothing on stderr may be a program's own answer,
        // so then the state decides, watched briefly.
        match &first {
            Ok(result)
                if result.exit_code == Some(126)
                    && result.stdout.total_bytes + result.stderr.total_bytes < 1024 =>
            {
                // The runtime's words may come on either stream.
                let text = format!("{}\n{}", result.stdout.text, result.stderr.text);
                // "error executing setns process": the runtime could not
                // enter the container's namespaces, whose init is gone.
                let engine_says_stopped = text.contains("cannot exec in a stopped")
                    || (text.contains("OCI runtime")
                        && (text.contains("stopped")
                            || text.contains("not running")
                            || text.contains("setns")));
                if engine_says_stopped {
                    self.restart_now().await?;
                } else if result.stderr.total_bytes == 0
                    && self.stopped_or_stopping(Duration::from_secs(1)).await
                {
                    self.restart().await?;
                } else {
                    return first;
                }
            }
            Err(SandboxError::Unavailable(_)) => {
                if !self.stopped_or_stopping(Duration::from_secs(10)).await {
                    return first;
                }
                self.restart().await?;
            }
            _ => return first,
        }
        self.exec_once(argv, stdin, timeout).await
    }

    /// Whether the container is down or on its way down within `watch`
    /// (the engine notices a dead init with a delay).
    async fn stopped_or_stopping(&self, watch: Duration) -> bool {
        let Ok(docker) = self.inner.client().await else {
            return false;
        };
        for _ in 0..(watch.as_millis() / 50).max(1) {
            if !self.running(docker).await.unwrap_or(false) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Restarts the container through the engine without waiting for its
    /// state to catch up (the engine stops what is left, then starts it).
    async fn restart_now(&self) -> Result<(), SandboxError> {
        let docker = self.inner.client().await?;
        *self.counters.lock().await = Counters::default();
        docker
            .restart_container(&self.name, Some(RestartContainerOptions { t: 0 }))
            .await
            .map_err(|e| unavailable("cannot restart the sandbox container", e))
    }

    /// Whether the engine reports the container running.
    async fn running(&self, docker: &Docker) -> Result<bool, SandboxError> {
        Ok(docker
            .inspect_container(&self.name, None)
            .await
            .map_err(|e| unavailable("cannot inspect the sandbox container", e))?
            .state
            .and_then(|s| s.running)
            .unwrap_or(false))
    }

    /// Waits for the container to finish stopping, then starts it.
    async fn restart(&self) -> Result<(), SandboxError> {
        let docker = self.inner.client().await?;
        for _ in 0..100 {
            if !self.running(docker).await? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        *self.counters.lock().await = Counters::default();
        match docker.start_container::<String>(&self.name, None).await {
            Ok(()) => Ok(()),
            // 304: someone else started it already.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(unavailable("cannot restart the sandbox container", e)),
        }
    }

    async fn exec_once(
        &self,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecResult, SandboxError> {
        let docker = self.inner.client().await?;
        let started = Instant::now();
        let marker = format!("{}-{}", std::process::id(), fastrand_suffix());
        // The program runs in a process group of its own, led by a shell
        // that notes the group's id (for a timeout to kill) and, when the
        // program ends, kills what it left running, so that background
        // processes do not hold the output open or outlive their command.
        let mut command = vec![
            "setsid".to_string(),
            "-w".to_string(),
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "echo $$ > /tmp/.bulkhead-{marker} 2>/dev/null; \"$@\"; s=$?; \
                 for p in $(pgrep -g $$); do [ \"$p\" != $$ ] && kill -9 \"$p\"; done 2>/dev/null; \
                 rm -f /tmp/.bulkhead-{marker}; exit $s"
            ),
            "sh".to_string(),
        ];
        command.extend(argv);
        let exec_id = self
            .create_exec(CreateExecOptions {
                cmd: Some(command),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                attach_stdin: Some(stdin.is_some()),
                user: Some(USER.to_string()),
                working_dir: Some(WORKSPACE.to_string()),
                env: Some(ENV.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            })
            .await?;
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = docker
            .start_exec(&exec_id, None::<StartExecOptions>)
            .await
            .map_err(|e| unavailable("docker exec", e))?
        else {
            return Err(SandboxError::Unavailable(
                "docker exec did not attach".into(),
            ));
        };
        if let Some(bytes) = stdin {
            input.write_all(&bytes).await?;
            input.shutdown().await?;
        }
        drop(input);
        let mut stdout = OutputCapture::new(self.limits.output_bytes);
        let mut stderr = OutputCapture::new(self.limits.output_bytes);
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let flood = self.limits.output_flood_bytes();
        let mut killed = None;
        loop {
            match tokio::time::timeout_at(deadline, output.next()).await {
                Err(_) => {
                    killed = Some(KilledReason::Timeout);
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => break,
                Ok(Some(Ok(chunk))) => match chunk {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        stdout.push(&message)
                    }
                    LogOutput::StdErr { message } => stderr.push(&message),
                    LogOutput::StdIn { .. } => {}
                },
            }
            if stdout.total() + stderr.total() > flood {
                killed = Some(KilledReason::OutputLimit);
                break;
            }
        }
        if killed.is_some() {
            // Counters first: a last resort below restarts the container,
            // and a restart starts them again from zero.
            let struck_before_kill = self.limits_struck().await;
            // Keep reading while the kill goes in: an unread stream can
            // hold the engine up.
            let drain = tokio::time::timeout(Duration::from_secs(2), async {
                while output.next().await.is_some() {}
            });
            let ((), drained) = tokio::join!(self.kill_group(&marker), drain);
            if drained.is_err() {
                // The group outlived its kill (a fork bomb leaves no room
                // for the kill's own process): stop the whole container;
                // the next call starts it again, with the workspace intact.
                let _ = docker
                    .kill_container(&self.name, Some(KillContainerOptions { signal: "SIGKILL" }))
                    .await;
                *self.counters.lock().await = Counters::default();
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while output.next().await.is_some() {}
                })
                .await;
            }
            self.pending_hits.lock().await.extend(struck_before_kill);
        }
        drop(output);
        let mut inspected = docker
            .inspect_exec(&exec_id)
            .await
            .map_err(|e| unavailable("docker exec", e))?;
        for _ in 0..50 {
            if inspected.running != Some(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            inspected = docker
                .inspect_exec(&exec_id)
                .await
                .map_err(|e| unavailable("docker exec", e))?;
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        // Docker reports a signal death as 128 + signal.
        let code = inspected.exit_code;
        let (exit_code, signal) = match (killed, code) {
            (Some(_), _) => (None, Some(9)),
            (None, Some(code)) if code > 128 && code <= 128 + 64 => {
                (None, Some((code - 128) as i32))
            }
            (None, Some(code)) => (Some(code as i32), None),
            (None, None) => (None, Some(9)),
        };
        let mut limits_hit: Vec<KilledReason> = killed.into_iter().collect();
        let mut struck = std::mem::take(&mut *self.pending_hits.lock().await);
        struck.extend(self.limits_struck().await);
        for hit in struck {
            if !limits_hit.contains(&hit) {
                limits_hit.push(hit);
            }
        }
        if signal == Some(libc::SIGXFSZ) && !limits_hit.contains(&KilledReason::Disk) {
            limits_hit.push(KilledReason::Disk);
        }
        Ok(ExecResult {
            exit_code,
            signal,
            killed_reason: limits_hit.first().copied(),
            limits_hit,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
            duration_ms,
            egress_refusals: Vec::new(),
        })
    }

    /// Which limits struck since the last look: OOM kills and refused
    /// forks from the container's cgroup counters, a full /tmp or
    /// workspace. Read from the host when the engine is local (no exec),
    /// else by an exec in the container.
    async fn limits_struck(&self) -> Vec<KilledReason> {
        let observed = match self.host_observation().await {
            Some(observed) => observed,
            None => match self.exec_observation().await {
                Some(observed) => observed,
                None => return Vec::new(),
            },
        };
        let mut counters = self.counters.lock().await;
        let mut hit = Vec::new();
        if observed.counters.oom_kills > counters.oom_kills {
            hit.push(KilledReason::Oom);
        }
        if observed.counters.pids_refusals > counters.pids_refusals {
            hit.push(KilledReason::Pids);
        }
        if observed.full {
            hit.push(KilledReason::Disk);
        }
        *counters = observed.counters;
        hit
    }

    /// The host pid of the container's init and its `/proc/<pid>/cgroup`:
    /// the cached pid while its cgroup still names this container (a
    /// restart gives a new init), else asked of the engine.
    async fn init_cgroups(&self) -> Option<(i64, String)> {
        let cached = self.init_pid.lock().ok().and_then(|pid| *pid);
        if let Some(pid) = cached
            && let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            && cgroups.contains(&self.id)
        {
            return Some((pid, cgroups));
        }
        let docker = self.inner.client().await.ok()?;
        let pid = docker
            .inspect_container(&self.name, None)
            .await
            .ok()?
            .state?
            .pid?;
        if pid <= 0 {
            return None;
        }
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        if let Ok(mut cached) = self.init_pid.lock() {
            *cached = Some(pid);
        }
        Some((pid, cgroups))
    }

    async fn host_observation(&self) -> Option<Observation> {
        let (pid, cgroups) = self.init_cgroups().await?;
        let path_of = |controller: &str| {
            cgroups.lines().find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_string())
            })
        };
        let (oom_file, pids_file) = match (path_of("memory"), path_of("pids")) {
            (Some(memory), Some(pids)) => (
                format!("/sys/fs/cgroup/memory{memory}/memory.oom_control"),
                format!("/sys/fs/cgroup/pids{pids}/pids.events"),
            ),
            _ => {
                let unified = path_of("")?;
                (
                    format!("/sys/fs/cgroup{unified}/memory.events"),
                    format!("/sys/fs/cgroup{unified}/pids.events"),
                )
            }
        };
        let counter = |file: &str, key: &str| -> Option<u64> {
            std::fs::read_to_string(file)
                .ok()?
                .lines()
                .find_map(|line| line.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        };
        let full = ["tmp", "workspace"].iter().any(|dir| {
            nix::sys::statvfs::statvfs(format!("/proc/{pid}/root/{dir}").as_str())
                .is_ok_and(|s| crate::nearly_full(s.blocks_available() * s.fragment_size()))
        });
        Some(Observation {
            counters: Counters {
                oom_kills: counter(&oom_file, "oom_kill ")?,
                pids_refusals: counter(&pids_file, "max ")?,
            },
            full,
        })
    }

    async fn exec_observation(&self) -> Option<Observation> {
        let stats = self
            .plain(vec!["/bin/sh".into(), "-c".into(), STATS_SCRIPT.into()])
            .await
            .ok()?;
        let value = |key: &str| {
            stats
                .lines()
                .filter_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().parse::<u64>().unwrap_or(0))
                .collect::<Vec<_>>()
        };
        Some(Observation {
            counters: Counters {
                oom_kills: value("oom_kill ").first().copied().unwrap_or(0),
                pids_refusals: value("max ").first().copied().unwrap_or(0),
            },
            full: value("avail ")
                .iter()
                .any(|kib| crate::nearly_full(kib * 1024)),
        })
    }

    async fn file_operation(
        &self,
        script: &str,
        path: &str,
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecResult, SandboxError> {
        if let Err(message) = workspace_path(path) {
            return Ok(refusal(message));
        }
        self.exec(
            vec![
                "/bin/sh".into(),
                "-c".into(),
                script.into(),
                "sh".into(),
                path.into(),
            ],
            stdin,
            self.limits.timeout,
        )
        .await
    }
}

/// A file operation refused before anything ran.
fn refusal(message: String) -> ExecResult {
    let mut stderr = OutputCapture::new(4096);
    stderr.push(format!("{message}\n").as_bytes());
    ExecResult {
        exit_code: Some(1),
        signal: None,
        killed_reason: None,
        limits_hit: Vec::new(),
        stdout: OutputCapture::new(0).finish(),
        stderr: stderr.finish(),
        duration_ms: 0,
        egress_refusals: Vec::new(),
    }
}

impl Sandbox for DockerSandbox {
    fn backend(&self) -> &'static str {
        "docker"
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn run<'a>(
        &'a self,
        operation: &'a Operation,
    ) -> BoxFuture<'a, Result<ExecResult, SandboxError>> {
        Box::pin(crate::egress::attributed(self.gate.as_ref(), async move {
            operation.validate()?;
            match operation {
                Operation::Exec { argv, timeout } => {
                    let timeout =
                        timeout.map_or(self.limits.timeout, |t| t.min(self.limits.timeout));
                    self.exec(argv.clone(), None, timeout).await
                }
                Operation::ReadFile { path } => self.file_operation(READ_SCRIPT, path, None).await,
                Operation::WriteFile { path, content } => {
                    if workspace_path(path).is_ok_and(|p| p == std::path::Path::new(WORKSPACE)) {
                        return Ok(refusal(format!("{path}: is the workspace itself")));
                    }
                    self.file_operation(WRITE_SCRIPT, path, Some(content.as_bytes().to_vec()))
                        .await
                }
                Operation::ListDir { path } => {
                    let mut result = self.file_operation(LIST_SCRIPT, path, None).await?;
                    if result.exit_code == Some(0) {
                        let mut entries: Vec<serde_json::Value> = result
                            .stdout
                            .text
                            .lines()
                            .filter_map(|line| {
                                let mut fields = line.split('\t');
                                let name = fields.next()?;
                                let kind = match fields.next()? {
                                    "d" => "dir",
                                    "f" => "file",
                                    "l" => "symlink",
                                    _ => "other",
                                };
                                let size: u64 = fields.next()?.parse().ok()?;
                                Some(serde_json::json!({"name": name, "type": kind, "size": size}))
                            })
                            .collect();
                        entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                        let mut capture = OutputCapture::new(self.limits.output_bytes);
                        capture.push(format!("{}\n", serde_json::Value::Array(entries)).as_bytes());
                        result.stdout = capture.finish();
                    }
                    Ok(result)
                }
            }
        }))
    }

    fn spawn<'a>(
        &'a self,
        spec: &'a ProcessSpec,
    ) -> BoxFuture<'a, Result<SandboxProcess, SandboxError>> {
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
            let docker = self.inner.client().await?;
            // Hosted programs die with the container.
            self.destroyed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            remove(docker, &self.name, &self.volume)
                .await
                .map_err(|e| unavailable("cannot remove the sandbox container", e))
        })
    }
}
