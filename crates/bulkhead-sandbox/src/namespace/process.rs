//! Hosting a long-lived program, server side.
//!
//! The helper runs in process mode: the request goes first on its stdin
//! (`P<length>\n<json>`, read to the byte), after which its stdin and
//! stdout *are* the program's, handed through the fork chain with no copy
//! in between. The helper reports on its stderr instead, one JSON line
//! each: [`ProcessReport::Started`] once the program is about to be
//! executed (or `Unavailable` when isolation could not be set up), then
//! `Exited` when it has ended. Its stderr is the program's own no more
//! than an operation's output is: the helper captures it, capped.
//!
//! Stopping: the guard sends the helper SIGTERM, on which it kills the
//! program's tree, removes its cgroup and reports. A helper that does not
//! manage within [`GRACE`] is killed (its own parent-death chain takes the
//! rest) and the server removes the cgroup. A server that dies takes its
//! helpers with it the same way as for operations. That parent-death
//! signal follows the *thread* that started the helper: a runtime's
//! worker threads live as long as it, but a program spawned from a
//! short-lived thread (a blocking pool's) would die with that thread.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr};
use tokio::sync::{Notify, oneshot, watch};

use super::cgroup::Cgroup;
use super::{NamespaceSandbox, Task};
use crate::egress::EgressGate;
use crate::{ProcessExit, ProcessSpec, SandboxError, SandboxProcess};

/// What the helper says on its stderr in process mode, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ProcessReport {
    /// The program is set up and about to be executed: its stdio is live.
    Started,
    /// It has ended; its tree is gone and its cgroup removed.
    Exited(ProcessExit),
    /// Isolation could not be set up (nothing ran), or the helper failed.
    Unavailable(String),
}

/// The first byte of a process request on the helper's stdin (an
/// operation's request, read to EOF, starts with `{`).
pub(crate) const PROCESS_MARK: u8 = b'P';

/// The largest process request the helper reads.
pub(crate) const MAX_REQUEST: usize = 16 << 20;

/// How long a helper asked to stop has to kill the tree and clean up.
const GRACE: Duration = Duration::from_secs(5);

/// Bound on setting up the namespaces, mounts and cgroup.
const SETUP: Duration = Duration::from_secs(60);

/// The programs a sandbox hosts, stopped when it is destroyed.
#[derive(Default)]
pub(super) struct Hosted {
    programs: Mutex<Vec<Weak<Program>>>,
}

impl Hosted {
    fn add(&self, program: &Arc<Program>) {
        let mut programs = self.programs.lock().unwrap_or_else(PoisonError::into_inner);
        programs.retain(|p| p.strong_count() > 0);
        programs.push(Arc::downgrade(program));
    }

    /// Stops every hosted program and waits, bounded, until each helper
    /// is gone (its tree killed and its cgroup removed).
    pub(super) async fn kill_all(&self) {
        let programs: Vec<Arc<Program>> = self
            .programs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .filter_map(|p| p.upgrade())
            .collect();
        for program in &programs {
            program.stop();
        }
        for program in &programs {
            let mut gone = program.gone.subscribe();
            let _ = tokio::time::timeout(GRACE * 2, gone.wait_for(|gone| *gone)).await;
        }
    }
}

/// One hosted program's helper, shared by its guard, its monitor and its
/// sandbox.
struct Program {
    /// The helper's pid until it is reaped: a pid signalled after that
    /// could be another process's.
    pid: Mutex<Option<i32>>,
    /// Asked to stop: the monitor starts the grace.
    stopping: Notify,
    gone: watch::Sender<bool>,
}

impl Program {
    /// Asks the helper to kill the program's tree. Synchronous, so that a
    /// guard dropped outside a runtime still stops its program.
    fn stop(&self) {
        if let Some(pid) = *self.pid.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        self.stopping.notify_one();
    }
}

struct Guard(Arc<Program>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Starts `spec` in `sandbox`; returns once the program is about to run.
pub(super) async fn spawn(
    sandbox: Arc<NamespaceSandbox>,
    spec: &ProcessSpec,
) -> Result<SandboxProcess, SandboxError> {
    spec.validate()?;
    let request = sandbox.inner.request(
        &sandbox.workspace,
        &sandbox.limits,
        sandbox.gate.as_ref().map(EgressGate::path),
        Task::Process(spec.clone()),
    );
    let cgroup = (request.cgroup.clone(), request.run_id.clone());
    let body = serde_json::to_vec(&request)
        .map_err(|e| SandboxError::Invalid(format!("cannot encode the request: {e}")))?;
    let mut child = sandbox.inner.start_helper()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut reports = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    stdin
        .write_all(format!("{}{}\n", PROCESS_MARK as char, body.len()).as_bytes())
        .await?;
    stdin.write_all(&body).await?;

    match tokio::time::timeout(SETUP, next_report(&mut reports)).await {
        Ok(Ok(ProcessReport::Started)) => {}
        Ok(Ok(ProcessReport::Unavailable(reason))) => {
            let _ = child.wait().await;
            return Err(SandboxError::Unavailable(reason));
        }
        Ok(Ok(ProcessReport::Exited(_))) => {
            return Err(SandboxError::Unavailable(
                "the sandbox helper reported an exit before a start".into(),
            ));
        }
        Ok(Err(diagnostics)) => {
            let status = child.wait().await;
            return Err(SandboxError::Unavailable(format!(
                "the sandbox helper failed ({}): {diagnostics}",
                shown(&status)
            )));
        }
        Err(_) => {
            // Dropping the child kills it, and the chain with it.
            return Err(SandboxError::Unavailable(format!(
                "the sandbox helper did not start the program within {}s",
                SETUP.as_secs()
            )));
        }
    }

    let (gone, _) = watch::channel(false);
    let program = Arc::new(Program {
        pid: Mutex::new(child.id().map(|pid| pid as i32)),
        stopping: Notify::new(),
        gone,
    });
    sandbox.hosted.add(&program);
    let (exit_sender, exit) = oneshot::channel();
    tokio::spawn(monitor(
        sandbox,
        Arc::clone(&program),
        child,
        reports,
        cgroup,
        exit_sender,
    ));
    Ok(SandboxProcess {
        stdin: crate::stdin::closing_on_drop(stdin),
        stdout: Box::pin(stdout),
        exited: Box::pin(async move {
            exit.await.unwrap_or_else(|_| {
                Err(SandboxError::Unavailable(
                    "the hosted program's monitor went away (the runtime shut down)".into(),
                ))
            })
        }),
        guard: Box::new(Guard(program)),
    })
}

/// Waits for the helper's last report (stopping it when asked), reaps it,
/// and hands on how the program ended. Holds the sandbox meanwhile.
async fn monitor(
    sandbox: Arc<NamespaceSandbox>,
    program: Arc<Program>,
    mut child: Child,
    mut reports: Lines<BufReader<ChildStderr>>,
    (group, name): (String, String),
    exit: oneshot::Sender<Result<ProcessExit, SandboxError>>,
) {
    let report = tokio::select! {
        report = next_report(&mut reports) => report,
        () = program.stopping.notified() => {
            match tokio::time::timeout(GRACE, next_report(&mut reports)).await {
                Ok(report) => report,
                Err(_) => {
                    let _ = child.start_kill();
                    Err(format!("the sandbox helper did not stop within {}s", GRACE.as_secs()))
                }
            }
        }
    };
    *program.pid.lock().unwrap_or_else(PoisonError::into_inner) = None;
    let status = child.wait().await;
    let result = match report {
        Ok(ProcessReport::Exited(process_exit)) => Ok(process_exit),
        Ok(ProcessReport::Unavailable(reason)) => Err(SandboxError::Unavailable(reason)),
        Ok(ProcessReport::Started) => Err(SandboxError::Unavailable(
            "the sandbox helper reported a second start".into(),
        )),
        Err(diagnostics) => Err(SandboxError::Unavailable(format!(
            "the sandbox helper failed ({}): {diagnostics}",
            shown(&status)
        ))),
    };
    if result.is_err() {
        // The helper may not have removed its cgroup: whatever is left in
        // it is killed and it goes.
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(cgroup) = Cgroup::existing(&group, &name) {
                cgroup.remove();
            }
        })
        .await;
    }
    program.gone.send_replace(true);
    drop(sandbox);
    let _ = exit.send(result);
}

/// The helper's next report; at the end of its stderr, whatever else it
/// wrote there (a panic), as the error.
async fn next_report(reports: &mut Lines<BufReader<ChildStderr>>) -> Result<ProcessReport, String> {
    let mut diagnostics = String::new();
    loop {
        match reports.next_line().await {
            Ok(Some(line)) => match serde_json::from_str(&line) {
                Ok(report) => return Ok(report),
                Err(_) if diagnostics.len() < 4096 => {
                    diagnostics.push_str(line.trim());
                    diagnostics.push(' ');
                }
                Err(_) => {}
            },
            Ok(None) => {
                let diagnostics = diagnostics.trim();
                return Err(if diagnostics.is_empty() {
                    "it ended without a report".into()
                } else {
                    diagnostics.to_string()
                });
            }
            Err(e) => return Err(format!("cannot read its report: {e}")),
        }
    }
}

fn shown(status: &std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    }
}
