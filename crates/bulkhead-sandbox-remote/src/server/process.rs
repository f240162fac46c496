//! `POST /v1/scopes/{scope}/sandboxes/{id}/processes`: hosts a program in
//! the sandbox and carries its stdio over the upgraded connection (see
//! [`crate::stdio`]). The program is started before the answer, so a
//! refusal is an ordinary JSON error; after the 101, the connection is
//! the program's life: when the client goes away, the program is killed.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use bulkhead_sandbox::{ProcessExit, Sandbox, SandboxError, SandboxProcess};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ApiError, Daemon, MAX_BODY_BYTES};
use crate::stdio::{self, CHUNK, CLOSE_STDIN, EXIT, Ending, PROTOCOL, ProcessRequest, STDIN};

/// How long a program whose client went away has to be reported gone.
const GRACE: Duration = Duration::from_secs(30);

pub(super) async fn start(
    State(daemon): State<Arc<Daemon>>,
    Path((scope, id)): Path<(String, String)>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let wants_stdio = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case(PROTOCOL));
    // Present only on an HTTP/1.1 request that asks for an upgrade.
    let upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    let Some(upgrade) = upgrade.filter(|_| wants_stdio) else {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("a hosted program's stdio needs an HTTP/1.1 upgrade to {PROTOCOL}"),
        ));
    };
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "the request body is too large or broke off",
            )
        })?;
    let asked: ProcessRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("invalid process request: {e}"),
        )
    })?;
    asked.spec.validate()?;
    let sandbox = daemon.sandbox(&scope, &id, &asked.limits).await?;
    let process = sandbox.spawn(&asked.spec).await?;
    // argv may carry secrets as well as env: only the program's name.
    let program = asked.spec.argv[0].clone();
    tracing::info!(scope, id, program, "hosted program started");
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => carry(TokioIo::new(upgraded), process, &scope, &id, sandbox).await,
            // Dropping the process kills it.
            Err(e) => tracing::warn!(scope, id, error = %e, "the client did not take the upgrade"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .map_err(|e| {
            tracing::error!(error = %e, "cannot build the upgrade answer");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "sandboxd could not answer (see its log)",
            )
        })
}

/// Carries stdin and stdout until the program ends or the client goes
/// away, then tells the client how it ended. Holding `sandbox` keeps it
/// from being reaped as idle meanwhile.
async fn carry(
    connection: TokioIo<hyper::upgrade::Upgraded>,
    process: SandboxProcess,
    scope: &str,
    id: &str,
    sandbox: Arc<dyn Sandbox>,
) {
    let (mut reader, mut writer) = tokio::io::split(connection);
    let SandboxProcess {
        mut stdin,
        mut stdout,
        exited,
        guard,
    } = process;
    // Ends when the client is gone (the connection closed or broke).
    let inbound = async {
        loop {
            match stdio::read_frame(&mut reader).await {
                Ok(Some((STDIN, bytes))) => {
                    // A program that reads no more: its bytes are dropped,
                    // and the frames still read, to see the client go.
                    let _ = stdin.write_all(&bytes).await;
                }
                Ok(Some((CLOSE_STDIN, _))) => {
                    let _ = stdin.shutdown().await;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    };
    tokio::pin!(inbound);
    // Ends when the program's stdout does; an error when the client is
    // gone.
    let outbound = async {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            match stdout.read(&mut buffer).await {
                Ok(0) | Err(_) => return Ok::<(), std::io::Error>(()),
                Ok(n) => stdio::write_frame(&mut writer, stdio::STDOUT, &buffer[..n]).await?,
            }
        }
    };
    let client_gone = tokio::select! {
        () = &mut inbound => true,
        sent = outbound => sent.is_err(),
    };
    let mut exited = exited;
    let ending = if client_gone {
        drop(guard);
        tracing::info!(
            scope,
            id,
            "the client of a hosted program went away: killed"
        );
        tokio::time::timeout(GRACE, &mut exited).await.ok()
    } else {
        // stdout is closed; the program may still run (and the client
        // still go away).
        tokio::select! {
            ending = &mut exited => Some(ending),
            () = &mut inbound => {
                drop(guard);
                tracing::info!(scope, id, "the client of a hosted program went away: killed");
                tokio::time::timeout(GRACE, &mut exited).await.ok()
            }
        }
    };
    let ending = match ending {
        Some(Ok(exit)) => {
            log_exit(scope, id, &exit);
            Ending::Exited(exit)
        }
        Some(Err(e)) => {
            tracing::warn!(scope, id, error = %e, "a hosted program's end is unknown");
            Ending::Unknown(unknown(e))
        }
        None => {
            tracing::warn!(scope, id, "a hosted program was not reported gone in time");
            Ending::Unknown("sandboxd did not learn how the program ended".into())
        }
    };
    if !client_gone && let Ok(json) = serde_json::to_vec(&ending) {
        let _ = stdio::write_frame(&mut writer, EXIT, &json).await;
        let _ = writer.shutdown().await;
    }
    drop(sandbox);
}

fn log_exit(scope: &str, id: &str, exit: &ProcessExit) {
    tracing::info!(
        scope,
        id,
        exit_code = exit.exit_code,
        signal = exit.signal,
        killed = exit.killed_reason.map(|r| r.as_str()),
        stderr_bytes = exit.stderr.total_bytes,
        "hosted program ended"
    );
}

fn unknown(error: SandboxError) -> String {
    match error {
        SandboxError::Io(_) => "sandboxd hit an I/O error (see its log)".into(),
        other => other.to_string(),
    }
}
