//! A program hosted by sandboxd, its stdio over one upgraded connection
//! (see [`crate::stdio`]). Dropping the guard closes the connection, which
//! is sandboxd's cue to kill the program.

use std::sync::Arc;

use bulkhead_sandbox::{ProcessExit, ProcessSpec, SandboxError, SandboxProcess};
use reqwest::header;
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::{RemoteSandbox, SLACK, refusal};
use crate::stdio::{self, CHUNK, CLOSE_STDIN, EXIT, Ending, PROTOCOL, ProcessRequest, STDIN};

/// Owns the connection's two tasks (and with them its two halves), and the
/// sandbox while the program runs.
struct Guard {
    tasks: [AbortHandle; 2],
    _sandbox: Arc<RemoteSandbox>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub(super) async fn spawn(
    sandbox: Arc<RemoteSandbox>,
    spec: &ProcessSpec,
) -> Result<SandboxProcess, SandboxError> {
    spec.validate()?;
    let inner = &sandbox.inner;
    let body = ProcessRequest {
        limits: sandbox.limits.clone(),
        spec: spec.clone(),
    };
    // No request timeout: reqwest's would also bound the upgraded stream.
    let request = inner
        .http
        .post(inner.endpoint(&["sandboxes", &sandbox.id, "processes"]))
        .bearer_auth(inner.config.token.expose_secret())
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .json(&body)
        .send();
    let response = tokio::time::timeout(SLACK, request)
        .await
        .map_err(|_| {
            SandboxError::Unavailable(format!(
                "sandboxd did not start the program within {}s",
                SLACK.as_secs()
            ))
        })?
        .map_err(|e| inner.unreachable(e))?;
    let status = response.status();
    if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        let body = response.bytes().await.unwrap_or_default();
        return Err(refusal(status, &body));
    }
    let connection = response.upgrade().await.map_err(|e| {
        SandboxError::Unavailable(format!("sandboxd's upgrade broke off: {}", e.without_url()))
    })?;
    let (mut reader, mut writer) = tokio::io::split(connection);

    let (stdin, mut from_caller) = tokio::io::duplex(CHUNK);
    let outbound = tokio::spawn(async move {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            match from_caller.read(&mut buffer).await {
                Ok(0) | Err(_) => {
                    let _ = stdio::write_frame(&mut writer, CLOSE_STDIN, &[]).await;
                    // The write half stays with the task (and the
                    // connection open) until the guard ends it.
                    std::future::pending::<()>().await;
                }
                Ok(n) => {
                    if stdio::write_frame(&mut writer, STDIN, &buffer[..n])
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });

    let (mut to_caller, stdout) = tokio::io::duplex(CHUNK);
    let (exit_sender, exit) = oneshot::channel::<Result<ProcessExit, SandboxError>>();
    let inbound = tokio::spawn(async move {
        let mut feeding = true;
        let ending = loop {
            match stdio::read_frame(&mut reader).await {
                Ok(Some((stdio::STDOUT, bytes))) => {
                    // A caller that reads no more still learns the exit.
                    if feeding {
                        feeding = to_caller.write_all(&bytes).await.is_ok();
                    }
                }
                Ok(Some((EXIT, json))) => {
                    break match serde_json::from_slice::<Ending>(&json) {
                        Ok(Ending::Exited(exit)) => Ok(exit),
                        Ok(Ending::Unknown(message)) => {
                            Err(SandboxError::Unavailable(format!("sandboxd: {message}")))
                        }
                        Err(e) => Err(SandboxError::Unavailable(format!(
                            "sandboxd sent an unreadable exit: {e}"
                        ))),
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    break Err(SandboxError::Unavailable(
                        "the connection to sandboxd broke off before the program's exit".into(),
                    ));
                }
            }
        };
        drop(to_caller);
        let _ = exit_sender.send(ending);
    });

    Ok(SandboxProcess {
        stdin: Box::pin(stdin),
        stdout: Box::pin(stdout),
        exited: Box::pin(async move {
            exit.await.unwrap_or_else(|_| {
                Err(SandboxError::Unavailable(
                    "the program was stopped before its exit was known".into(),
                ))
            })
        }),
        guard: Box::new(Guard {
            tasks: [outbound.abort_handle(), inbound.abort_handle()],
            _sandbox: sandbox,
        }),
    })
}
