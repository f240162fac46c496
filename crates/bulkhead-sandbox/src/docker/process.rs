//! Hosting a long-lived program in a Docker sandbox: an exec with stdin,
//! stdout and stderr attached, as the sandbox user with the sandbox's
//! environment, under the container's memory, pids and CPU limits.
//!
//! An exec cannot be killed through the engine, so the program runs in a
//! process group of its own, led by a small shell that first writes the
//! group's id as the first line of stdout (before the program exists, so
//! the program cannot forge it) and, when the program ends, kills what it
//! left running. Stopping is `kill -KILL -<group>` by a second exec; a
//! group that outlives its kill (a fork bomb leaves no room for the kill's
//! own process) takes the container down with it, as a timed-out operation
//! does, and the next operation starts it again.

use std::sync::Arc;
use std::time::Duration;

use bollard::container::{KillContainerOptions, LogOutput};
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::{Notify, oneshot};

use super::{Counters, DockerSandbox, ENV, USER, unavailable};
use crate::output::OutputCapture;
use crate::paths::WORKSPACE;
use crate::{KilledReason, ProcessExit, ProcessSpec, SandboxError, SandboxProcess};

/// `$$` first, alone on its line: the group's id, for the kill.
const WRAPPER: &str = "echo $$; \"$@\"; s=$?; \
    for p in $(pgrep -g $$); do [ \"$p\" != $$ ] && kill -9 \"$p\"; done 2>/dev/null; exit $s";

/// Bound on the engine starting the exec and the wrapper saying its group.
const SETUP: Duration = Duration::from_secs(60);

/// Bytes of the program's stdout held for a caller that reads slowly.
const STDOUT_BUFFER: usize = 64 << 10;

type Output =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

struct Guard(Arc<Notify>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// The sandbox's environment with `spec`'s set over it.
fn environment(spec: &ProcessSpec) -> Vec<String> {
    ENV.iter()
        .filter(|own| {
            let name = own.split('=').next().unwrap_or_default();
            !spec.env.iter().any(|(set, _)| set == name)
        })
        .map(|own| own.to_string())
        .chain(
            spec.env
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        )
        .collect()
}

pub(super) async fn spawn(
    sandbox: Arc<DockerSandbox>,
    spec: &ProcessSpec,
) -> Result<SandboxProcess, SandboxError> {
    spec.validate()?;
    let docker = sandbox.inner.client().await?;
    let mut command: Vec<String> = ["setsid", "-w", "/bin/sh", "-c", WRAPPER, "sh"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    command.extend(spec.argv.iter().cloned());
    let exec_id = sandbox
        .create_exec(CreateExecOptions {
            cmd: Some(command),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            user: Some(USER.to_string()),
            working_dir: Some(WORKSPACE.to_string()),
            env: Some(environment(spec)),
            ..Default::default()
        })
        .await?;
    let StartExecResults::Attached { mut output, input } = docker
        .start_exec(&exec_id, None::<StartExecOptions>)
        .await
        .map_err(|e| unavailable("docker exec", e))?
    else {
        return Err(SandboxError::Unavailable(
            "docker exec did not attach".into(),
        ));
    };
    let mut stderr = OutputCapture::new(sandbox.limits.output_bytes);
    let (group, early) = tokio::time::timeout(SETUP, group_line(&mut output, &mut stderr))
        .await
        .map_err(|_| {
            SandboxError::Unavailable(format!(
                "the program did not start within {}s",
                SETUP.as_secs()
            ))
        })??;
    let (stdout, feed) = tokio::io::duplex(STDOUT_BUFFER);
    let stop = Arc::new(Notify::new());
    let (exit_sender, exit) = oneshot::channel();
    tokio::spawn(monitor(Monitor {
        sandbox,
        exec_id,
        group,
        output,
        feed,
        stderr,
        stop: Arc::clone(&stop),
        exit: exit_sender,
        early,
    }));
    Ok(SandboxProcess {
        stdin: crate::stdin::closing_on_drop(input),
        stdout: Box::pin(stdout),
        exited: Box::pin(async move {
            exit.await.unwrap_or_else(|_| {
                Err(SandboxError::Unavailable(
                    "the hosted program's monitor went away (the runtime shut down)".into(),
                ))
            })
        }),
        guard: Box::new(Guard(stop)),
    })
}

/// Reads up to the wrapper's first line: the process group's id, and what
/// the program already wrote after it.
async fn group_line(
    output: &mut Output,
    stderr: &mut OutputCapture,
) -> Result<(u32, Vec<u8>), SandboxError> {
    let mut stdout = Vec::new();
    loop {
        match output.next().await {
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                stdout.extend_from_slice(&message);
                if let Some(end) = stdout.iter().position(|b| *b == b'\n') {
                    let group = std::str::from_utf8(&stdout[..end])
                        .ok()
                        .and_then(|line| line.trim().parse().ok())
                        .ok_or_else(|| {
                            SandboxError::Unavailable(
                                "the program's wrapper did not say its process group".into(),
                            )
                        })?;
                    return Ok((group, stdout.split_off(end + 1)));
                }
                if stdout.len() > 64 {
                    return Err(SandboxError::Unavailable(
                        "the program's wrapper did not say its process group".into(),
                    ));
                }
            }
            Some(Ok(LogOutput::StdErr { message })) => stderr.push(&message),
            Some(Ok(LogOutput::StdIn { .. })) => {}
            Some(Err(e)) => return Err(unavailable("docker exec", e)),
            None => {
                let said = std::mem::replace(stderr, OutputCapture::new(0)).finish();
                return Err(SandboxError::Unavailable(format!(
                    "the program could not be started: {}",
                    said.text.trim()
                )));
            }
        }
    }
}

struct Monitor {
    sandbox: Arc<DockerSandbox>,
    exec_id: String,
    group: u32,
    output: Output,
    /// The caller's stdout, written here.
    feed: DuplexStream,
    stderr: OutputCapture,
    stop: Arc<Notify>,
    exit: oneshot::Sender<Result<ProcessExit, SandboxError>>,
    /// Stdout that came with the group's line.
    early: Vec<u8>,
}

/// Carries the program's output until it ends or is stopped, then reports
/// how it ended. Holds the sandbox meanwhile.
async fn monitor(mut m: Monitor) {
    let flood = m.sandbox.limits.output_flood_bytes();
    let mut feeding = m.feed.write_all(&m.early).await.is_ok();
    let mut killed = None;
    let mut stopped = false;
    loop {
        let chunk = tokio::select! {
            chunk = m.output.next() => chunk,
            () = m.stop.notified() => {
                stopped = true;
                break;
            }
        };
        match chunk {
            None | Some(Err(_)) => break,
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                if feeding {
                    // A caller that reads no more must not keep the stop
                    // from being seen.
                    tokio::select! {
                        written = m.feed.write_all(&message) => feeding = written.is_ok(),
                        () = m.stop.notified() => {
                            stopped = true;
                            break;
                        }
                    }
                }
            }
            Some(Ok(LogOutput::StdErr { message })) => {
                m.stderr.push(&message);
                if m.stderr.total() > flood {
                    killed = Some(KilledReason::OutputLimit);
                    break;
                }
            }
            Some(Ok(LogOutput::StdIn { .. })) => {}
        }
    }
    // The caller's stdout ends here: whatever comes after a stop is not
    // the program's to say.
    drop(m.feed);
    let destroyed = || {
        m.sandbox
            .destroyed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut limits_hit: Vec<KilledReason> = killed.into_iter().collect();
    if (killed.is_some() || stopped) && !destroyed() {
        // Counters first: a last resort below restarts the container, and a
        // restart starts them again from zero.
        limits_hit.extend(m.sandbox.limits_struck().await);
        stop_group(&m.sandbox, m.group, &mut m.output, &mut m.stderr).await;
    }
    drop(m.output);
    let code = if destroyed() {
        None
    } else {
        exit_code(&m.sandbox, &m.exec_id).await
    };
    let (exit_code, signal) = match (killed.is_some() || stopped, code) {
        (true, _) | (false, None) => (None, Some(libc::SIGKILL)),
        // Docker reports a signal death as 128 + signal.
        (false, Some(code)) if code > 128 && code <= 128 + 64 => (None, Some(code - 128)),
        (false, Some(code)) => (Some(code), None),
    };
    if !destroyed() {
        for hit in m.sandbox.limits_struck().await {
            if !limits_hit.contains(&hit) {
                limits_hit.push(hit);
            }
        }
    }
    if signal == Some(libc::SIGXFSZ) && !limits_hit.contains(&KilledReason::Disk) {
        limits_hit.push(KilledReason::Disk);
    }
    let _ = m.exit.send(Ok(ProcessExit {
        exit_code,
        signal,
        killed_reason: limits_hit.first().copied(),
        limits_hit,
        stderr: m.stderr.finish(),
    }));
}

/// Kills the program's process group, reading on while the kill goes in
/// (an unread stream can hold the engine up); a group that outlives it
/// takes the container down.
async fn stop_group(
    sandbox: &DockerSandbox,
    group: u32,
    output: &mut Output,
    stderr: &mut OutputCapture,
) {
    let kill = sandbox.plain(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("kill -KILL -{group}"),
    ]);
    let (_, drained) = tokio::join!(kill, drain(output, stderr, Duration::from_secs(2)));
    if drained.is_err() {
        if let Ok(docker) = sandbox.inner.client().await {
            let _ = docker
                .kill_container(
                    &sandbox.name,
                    Some(KillContainerOptions { signal: "SIGKILL" }),
                )
                .await;
        }
        *sandbox.counters.lock().await = Counters::default();
        let _ = drain(output, stderr, Duration::from_secs(5)).await;
    }
}

/// Reads the rest of the output for at most `within`, keeping stderr.
async fn drain(
    output: &mut Output,
    stderr: &mut OutputCapture,
    within: Duration,
) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(within, async {
        while let Some(chunk) = output.next().await {
            if let Ok(LogOutput::StdErr { message }) = chunk {
                stderr.push(&message);
            }
        }
    })
    .await
}

/// The exec's exit code once the engine has it (it lags the stream's end).
async fn exit_code(sandbox: &DockerSandbox, exec_id: &str) -> Option<i32> {
    let docker = sandbox.inner.client().await.ok()?;
    for _ in 0..100 {
        let inspected = docker.inspect_exec(exec_id).await.ok()?;
        if inspected.running != Some(true) {
            return inspected.exit_code.map(|code| code as i32);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
