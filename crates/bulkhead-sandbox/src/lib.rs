//! Run untrusted commands with hard limits and a record of what happened.
//!
//! A [`Backend`] makes one [`Sandbox`] per session; a sandbox runs
//! [`Operation`]s (a command, or a file operation inside its workspace) and
//! reports each as an [`ExecResult`]: exit code or signal, why it was
//! stopped, and its output capped (head and tail kept, true size and sha256
//! of the whole recorded). It can also host a long-lived program with its
//! stdin and stdout connected to the caller ([`Sandbox::spawn`], for MCP
//! servers): the same limits and isolation but no timeout.
//!
//! The `namespace` backend needs no daemon: every operation runs in fresh
//! Linux namespaces (user, pid, mount, net, ipc, uts, cgroup) under a PID 1
//! of its own, on a read-only view of the host's system folders with the
//! session's workspace writable and a size-capped tmpfs at /tmp, as a
//! non-root user with no capabilities, no_new_privs, a seccomp filter and a
//! landlock ruleset, inside a cgroup that caps memory (no swap), pids and
//! CPU. Only the workspace persists from one operation to the next.
//!
//! This crate knows nothing of HTTP, of agents or of the database.

// The namespace backend forks, execs and calls a handful of syscalls that
// have no safe wrapper; every `unsafe` block says why it is sound.
#![allow(unsafe_code)]

pub mod docker;
pub mod egress;
pub mod namespace;
mod output;
mod paths;
pub mod pool;
pub mod seccomp_policy;
mod stdin;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use output::CapturedOutput;

/// Hard limits applied to every operation in a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (and memory + swap: no swap) in bytes.
    pub memory_bytes: u64,
    /// CPU time per wall second (1.0 = one core).
    pub cpus: f64,
    /// Processes and threads at once.
    pub pids: u32,
    /// Wall-clock time of one operation; the whole process tree is killed
    /// when it is over.
    #[serde(rename = "timeout_ms", with = "duration_ms")]
    pub timeout: Duration,
    /// Bytes of stdout and of stderr kept (half head, half tail).
    pub output_bytes: usize,
    /// Size of the workspace and of /tmp, each.
    pub disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            cpus: 1.0,
            pids: 128,
            timeout: Duration::from_secs(30),
            output_bytes: 64 << 10,
            disk_bytes: 128 << 20,
        }
    }
}

impl Limits {
    /// An operation producing more than this much output is a flood: it is
    /// killed with [`KilledReason::OutputLimit`].
    pub fn output_flood_bytes(&self) -> u64 {
        (self.output_bytes as u64)
            .saturating_mul(1024)
            .max(16 << 20)
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(deserializer)?))
    }
}

/// A filesystem with less room than this left counts as full: tmpfs keeps
/// a block or two back, so "no space left" rarely reads as exactly zero.
pub(crate) fn nearly_full(available_bytes: u64) -> bool {
    available_bytes < 64 << 10
}

/// What to run in a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// A program and its arguments; a bare name is looked up in PATH.
    Exec {
        argv: Vec<String>,
        /// Shorter than the sandbox's timeout, if given.
        #[serde(default, rename = "timeout_ms", with = "optional_duration_ms")]
        timeout: Option<Duration>,
    },
    /// A file in the workspace; its content is the operation's stdout.
    ReadFile { path: String },
    /// Creates or replaces a file in the workspace (parents created).
    WriteFile { path: String, content: String },
    /// The entries of a folder in the workspace, as JSON on stdout.
    ListDir { path: String },
}

mod optional_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_some(&(d.as_millis() as u64)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(deserializer)?.map(Duration::from_millis))
    }
}

impl Operation {
    /// Refuses requests no backend can carry out.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let texts: Vec<&str> = match self {
            Operation::Exec { argv, .. } => {
                if argv.first().is_none_or(|program| program.is_empty()) {
                    return Err(SandboxError::Invalid("the command is empty".into()));
                }
                argv.iter().map(String::as_str).collect()
            }
            Operation::ReadFile { path } | Operation::ListDir { path } => vec![path],
            Operation::WriteFile { path, .. } => vec![path],
        };
        if texts.iter().any(|t| t.contains('\0')) {
            return Err(SandboxError::Invalid(
                "arguments and paths must not contain NUL".into(),
            ));
        }
        Ok(())
    }
}

/// Sandbox ids name folders and containers: letters, digits, `-` and `_`.
pub(crate) fn validate_id(id: &str) -> Result<(), SandboxError> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(SandboxError::Invalid(format!("invalid sandbox id {id:?}")));
    }
    Ok(())
}

/// Why the sandbox stopped an operation, or the limit it ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KilledReason {
    Timeout,
    Oom,
    Pids,
    OutputLimit,
    Disk,
}

impl KilledReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KilledReason::Timeout => "timeout",
            KilledReason::Oom => "oom",
            KilledReason::Pids => "pids",
            KilledReason::OutputLimit => "output_limit",
            KilledReason::Disk => "disk",
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Set when the program exited.
    pub exit_code: Option<i32>,
    /// Set when a signal ended it.
    pub signal: Option<i32>,
    pub killed_reason: Option<KilledReason>,
    /// Every limit the operation ran into, whether or not it stopped it (a
    /// fork bomb hits `pids` before the timeout ends it).
    #[serde(default)]
    pub limits_hit: Vec<KilledReason>,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
    pub duration_ms: u64,
    /// The tunnels the egress proxy refused the operation's programs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_refusals: Vec<EgressRefusal>,
}

/// A destination the egress proxy refused a sandboxed program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRefusal {
    /// As the program asked for it (a name or an address).
    pub host: String,
    pub port: u16,
    /// The address the name resolved to, when that is what was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The rule that refused it, in words.
    pub rule: String,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.killed_reason.is_none()
    }

    /// The exit code a shell would report: the code, or 128 + signal.
    pub fn shell_status(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Isolation could not be set up; nothing was run.
    #[error("sandbox unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (empty command, say).
    #[error("invalid sandbox request: {0}")]
    Invalid(String),
    #[error("sandbox I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// What a backend could set up on this machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub backend: String,
    /// Facts about the isolation in place (cgroup version, landlock ABI…).
    pub details: Vec<String>,
}

/// A long-lived program to host in a sandbox with its stdin and stdout
/// connected to the caller (an MCP server speaking JSON-RPC over stdio).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// A program and its arguments; a bare name is looked up in PATH.
    pub argv: Vec<String>,
    /// Set in the program's environment, over the sandbox's own (PATH,
    /// HOME…). Values may be secrets: never logged.
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for ProcessSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ProcessSpec")
            .field("argv", &self.argv)
            .field("env", &names)
            .finish()
    }
}

impl ProcessSpec {
    /// Refuses requests no backend can carry out.
    pub fn validate(&self) -> Result<(), SandboxError> {
        Operation::Exec {
            argv: self.argv.clone(),
            timeout: None,
        }
        .validate()?;
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0')
            {
                return Err(SandboxError::Invalid(format!(
                    "invalid environment variable name {name:?}"
                )));
            }
        }
        Ok(())
    }
}

/// How a hosted process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessExit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why the sandbox stopped it, if it did (memory, pids, disk, output).
    pub killed_reason: Option<KilledReason>,
    #[serde(default)]
    pub limits_hit: Vec<KilledReason>,
    /// What it wrote to stderr, capped like an operation's output.
    pub stderr: CapturedOutput,
}

/// A program running in a sandbox, its stdio connected to the caller.
///
/// The sandbox's limits apply to it (memory, pids, CPU, disk, no network
/// but the egress gate) except the per-operation timeout: it runs until it
/// exits, until this is dropped, or until its sandbox is destroyed. Dropping
/// it kills the program and everything it started. While it runs it holds
/// its sandbox, so a [`pool::SandboxPool`] does not reap the sandbox as idle.
///
/// A program that cannot be found or executed is still started: it exits
/// at once with 127 or 126 and says why on stderr, as in a shell.
pub struct SandboxProcess {
    /// The program's stdin. Dropping it or shutting it down closes it,
    /// which is how a polite caller asks the program to end.
    pub stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// The program's stdout, as raw bytes. Unbounded: the caller caps what
    /// it reads. It ends when the program and everything it started are
    /// gone.
    pub stdout: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    /// Resolves once the program has ended; an error when how it ended
    /// cannot be known (the helper or the connection to sandboxd broke
    /// off), in which case the program is gone or being killed.
    pub exited: BoxFuture<'static, Result<ProcessExit, SandboxError>>,
    /// Holds whatever keeps the program alive; dropped, it kills it and
    /// everything it started.
    pub guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for SandboxProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxProcess").finish_non_exhaustive()
    }
}

/// One session's sandbox.
pub trait Sandbox: Send + Sync {
    fn backend(&self) -> &'static str;
    fn limits(&self) -> &Limits;
    fn run<'a>(
        &'a self,
        operation: &'a Operation,
    ) -> BoxFuture<'a, Result<ExecResult, SandboxError>>;
    /// Starts a long-lived program with its stdio connected (see
    /// [`SandboxProcess`]). Returns once the program has been started.
    fn spawn<'a>(
        &'a self,
        spec: &'a ProcessSpec,
    ) -> BoxFuture<'a, Result<SandboxProcess, SandboxError>> {
        let _ = spec;
        let backend = self.backend();
        Box::pin(async move {
            Err(SandboxError::Unavailable(format!(
                "the {backend} backend cannot host long-lived programs"
            )))
        })
    }
    /// Removes the sandbox and its workspace.
    fn destroy(&self) -> BoxFuture<'_, Result<(), SandboxError>>;
}

/// A kind of sandbox.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Checks that isolation can be had here by running a command in a
    /// fresh sandbox. An error means tool calls must be refused.
    fn probe(&self) -> BoxFuture<'_, Result<Probe, SandboxError>>;
    /// A cheap check, for readiness, that what the probe found still
    /// answers (the engine, a remote service); nothing is made.
    fn check(&self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async { Ok(()) })
    }
    fn create<'a>(
        &'a self,
        id: &'a str,
        limits: &'a Limits,
    ) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, SandboxError>>;
    /// Removes the sandboxes a previous process left behind (a crash);
    /// returns how many.
    fn remove_orphans(&self) -> BoxFuture<'_, Result<usize, SandboxError>>;
}
