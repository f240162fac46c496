//! The sandbox settings `serve` and `sandboxd` share, and sandboxd's own.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::LogFormat;
use super::reader::{ConfigError, ConfigWarning, Environment, Reader, invalid};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxBackendKind {
    Namespace,
    Docker,
    /// Sandboxes made by a `bulkhead sandboxd` elsewhere.
    Remote,
}

impl SandboxBackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxBackendKind::Namespace => "namespace",
            SandboxBackendKind::Docker => "docker",
            SandboxBackendKind::Remote => "remote",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub backend: SandboxBackendKind,
    pub limits: bulkhead_sandbox::Limits,
    /// Where session workspaces live on the host.
    pub root: PathBuf,
    /// Host uid and gid sandboxed programs run as when the server is root.
    pub host_uid: u32,
    /// The cgroup the namespace backend makes its per-call cgroups in.
    pub cgroup: String,
    /// A session's sandbox unused this long is destroyed.
    pub idle: Duration,
    /// The namespace backend's helper executable (default: this binary).
    pub helper: Option<PathBuf>,
    /// The docker backend's image, OCI runtime, engine socket and scope.
    pub image: String,
    pub runtime: Option<String>,
    pub docker_host: Option<String>,
    pub scope: String,
    /// Hosts sandboxed programs may reach through the egress proxy.
    pub egress: bulkhead_sandbox::egress::EgressPolicy,
    /// Where the egress proxy makes each sandbox's socket (default
    /// `$SANDBOX_ROOT/.egress`).
    pub egress_dir: Option<PathBuf>,
    /// The docker backend's named volume holding the egress sockets, each
    /// mounted into its sandbox from there instead of from a host path
    /// (sandboxd in a container).
    pub egress_volume: Option<String>,
    /// The remote backend's sandboxd, and the token both sides hold.
    pub remote_url: Option<url::Url>,
    pub sandboxd_token: Option<SecretString>,
}

/// `bulkhead sandboxd`: where it listens, the token it requires, and the
/// local backend (and ceilings) it serves.
#[derive(Debug, Clone)]
pub struct SandboxdConfig {
    pub host: IpAddr,
    pub port: u16,
    pub token: SecretString,
    pub sandbox: SandboxConfig,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Unknown variables that look like a slip (`SANDBOX_MEMROY`).
    pub warnings: Vec<ConfigWarning>,
}

/// Shorter tokens are refused: the token is all that stands between a
/// network neighbour and the engine.
pub const MIN_SANDBOXD_TOKEN_LEN: usize = 24;

pub(super) fn read_sandbox(r: &mut Reader<'_>) -> Result<SandboxConfig, ConfigError> {
    let sandbox = SandboxConfig {
        backend: match r.text("SANDBOX_BACKEND").to_ascii_lowercase().as_str() {
            "namespace" => SandboxBackendKind::Namespace,
            "docker" => SandboxBackendKind::Docker,
            "remote" => SandboxBackendKind::Remote,
            other => {
                return Err(invalid(
                    "SANDBOX_BACKEND",
                    format!("expected namespace, docker or remote, got {other:?}"),
                ));
            }
        },
        limits: bulkhead_sandbox::Limits {
            memory_bytes: r.size("SANDBOX_MEMORY", 4 << 20)?,
            cpus: r.parse(
                "SANDBOX_CPUS",
                "a number of CPUs from 0.01 to 256",
                |c: &f64| (0.01..=256.0).contains(c),
            )?,
            pids: r.parse(
                "SANDBOX_PIDS",
                "a whole number from 4 to 100000",
                |n: &u32| (4..=100_000).contains(n),
            )?,
            timeout: r.seconds("SANDBOX_TIMEOUT_SECONDS", 86_400.0)?,
            output_bytes: r.size("SANDBOX_OUTPUT_LIMIT", 256)? as usize,
            disk_bytes: r.size("SANDBOX_DISK", 1 << 20)?,
        },
        root: PathBuf::from(r.text("SANDBOX_ROOT")),
        host_uid: r.parse(
            "SANDBOX_HOST_UID",
            "a uid from 1 to 4294967294",
            |u: &u32| *u >= 1 && *u < u32::MAX,
        )?,
        cgroup: r.parse(
            "SANDBOX_CGROUP",
            "a cgroup path such as bulkhead or user.slice/bulkhead (no \"..\")",
            |c: &String| bulkhead_sandbox::namespace::valid_cgroup(c),
        )?,
        idle: r.seconds("SANDBOX_IDLE_SECONDS", 7.0 * 86_400.0)?,
        helper: r.raw("SANDBOX_HELPER").map(PathBuf::from),
        image: r.text("SANDBOX_IMAGE"),
        runtime: r.raw("SANDBOX_RUNTIME"),
        docker_host: match r.raw("DOCKER_HOST") {
            Some(host) if host.starts_with("unix://") => Some(host),
            Some(host) => {
                return Err(invalid(
                    "DOCKER_HOST",
                    format!("expected a unix:// socket, got {host:?}"),
                ));
            }
            None => None,
        },
        scope: r.text("SANDBOX_SCOPE"),
        egress: bulkhead_sandbox::egress::EgressPolicy::parse(
            &r.raw("SANDBOX_EGRESS_ALLOW").unwrap_or_default(),
        )
        .map_err(|e| invalid("SANDBOX_EGRESS_ALLOW", e))?,
        remote_url: match r.raw("SANDBOX_REMOTE_URL") {
            None => None,
            Some(text) => Some(
                url::Url::parse(&text)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .ok_or_else(|| {
                        invalid(
                            "SANDBOX_REMOTE_URL",
                            "expected an http:// or https:// URL such as http://sandboxd:7070",
                        )
                    })?,
            ),
        },
        sandboxd_token: r.secret("SANDBOXD_TOKEN", "SANDBOXD_TOKEN_FILE")?,
        egress_dir: match (r.raw("SANDBOX_EGRESS_DIR"), r.raw("SANDBOX_EGRESS_SOCKET")) {
            (Some(dir), _) => Some(PathBuf::from(dir)),
            // The older spelling named one socket; its folder now holds one
            // per sandbox.
            (None, Some(socket)) => match Path::new(&socket).parent() {
                Some(dir) if Path::new(&socket).file_name() == Some("egress.sock".as_ref()) => {
                    Some(dir.to_path_buf())
                }
                _ => {
                    return Err(invalid(
                        "SANDBOX_EGRESS_SOCKET",
                        "expected a path ending in /egress.sock; better, set SANDBOX_EGRESS_DIR to its folder",
                    ));
                }
            },
            (None, None) => None,
        },
        egress_volume: r.raw("SANDBOX_EGRESS_VOLUME"),
    };
    if sandbox
        .egress_dir
        .as_ref()
        .is_some_and(|dir| !dir.is_absolute())
    {
        return Err(invalid(
            "SANDBOX_EGRESS_DIR",
            "expected an absolute path (a folder in the volume sandboxd mounts sockets from, with the remote backend)",
        ));
    }
    if let Some(volume) = &sandbox.egress_volume
        && !bulkhead_sandbox_remote::is_valid_name(volume)
    {
        return Err(invalid(
            "SANDBOX_EGRESS_VOLUME",
            "expected a volume name: 1 to 128 letters, digits, '-', '_' or '.'",
        ));
    }
    if !bulkhead_sandbox_remote::is_valid_name(&sandbox.scope) {
        return Err(invalid(
            "SANDBOX_SCOPE",
            "expected 1 to 128 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(sandbox)
}

impl SandboxdConfig {
    /// sandboxd reads the same `SANDBOX_*` variables as `serve` (its limits
    /// are the ceilings of every sandbox it makes), plus `SANDBOXD_HOST`,
    /// `SANDBOXD_PORT` and the token it requires.
    pub fn from_env(env: &Environment) -> Result<SandboxdConfig, ConfigError> {
        let mut r = Reader::new(env);
        let (host, port) = super::read_listen(&mut r, "SANDBOXD_HOST", "SANDBOXD_PORT")?;
        let sandbox = read_sandbox(&mut r)?;
        if sandbox.backend == SandboxBackendKind::Remote {
            return Err(invalid(
                "SANDBOX_BACKEND",
                "sandboxd makes sandboxes itself: expected namespace or docker",
            ));
        }
        let token = sandbox.sandboxd_token.clone().ok_or_else(|| {
            invalid(
                "SANDBOXD_TOKEN",
                "is required: sandboxd serves only clients that present it (or set SANDBOXD_TOKEN_FILE)",
            )
        })?;
        // The token is all that guards sandboxd: an example value never
        // does, whatever the mode.
        super::reader::refuse_placeholder("SANDBOXD_TOKEN", Some(&token))?;
        if token.expose_secret().len() < MIN_SANDBOXD_TOKEN_LEN {
            return Err(invalid(
                "SANDBOXD_TOKEN",
                format!(
                    "must be at least {MIN_SANDBOXD_TOKEN_LEN} characters (try `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(SandboxdConfig {
            host,
            port,
            token,
            sandbox,
            log_level: super::read_log_level(&mut r)?,
            log_format: super::read_log_format(&mut r, LogFormat::Json)?,
            warnings: env.unknown_variables(),
        })
    }
}
