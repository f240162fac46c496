//! Stdio servers: started with `Sandbox::spawn` and nothing else. This
//! crate has no other way to start a program, so an MCP server never runs
//! on the host.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bulkhead_sandbox::{ProcessExit, ProcessSpec, Sandbox};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::bounded::{BoundedLines, MAX_MESSAGE_BYTES, Overflow};
use crate::error::McpError;

/// How much of the end of a server's stderr goes into an error.
const STDERR_TAIL_CHARS: usize = 1500;

pub(crate) type Reader = BoundedLines<Pin<Box<dyn AsyncRead + Send>>>;
pub(crate) type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// A server's process in the sandbox: what keeps it alive, and how it
/// ended once it has.
pub(crate) struct Process {
    guard: Mutex<Option<Box<dyn Send + Sync>>>,
    /// How it ended, or why that cannot be known (the helper or sandboxd
    /// broke off).
    exit: watch::Receiver<Option<Result<ProcessExit, String>>>,
    watcher: tokio::task::AbortHandle,
}

impl Process {
    /// Kills the program (and what it started) now, even while calls still
    /// hold the connection.
    pub(crate) fn kill(&self) {
        let guard = self.guard.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guard);
    }

    /// How the program ended, if it has or does within `wait`: the end of
    /// stdout comes before the sandbox has reaped the program.
    pub(crate) async fn exit_within(&self, wait: Duration) -> Option<Result<ProcessExit, String>> {
        let mut exit = self.exit.clone();
        let ended = tokio::time::timeout(wait, exit.wait_for(Option::is_some)).await;
        match ended {
            Ok(Ok(exit)) => exit.clone(),
            _ => self.exit.borrow().clone(),
        }
    }

    /// The end of its stderr so far, once it has ended.
    pub(crate) fn stderr_tail(&self) -> Option<String> {
        self.exit
            .borrow()
            .as_ref()
            .and_then(|exit| exit.as_ref().ok())
            .map(|exit| tail(&exit.stderr.text))
            .filter(|tail| !tail.is_empty())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        self.watcher.abort();
    }
}

/// `code 1`, `signal 9`, `killed: oom`.
pub(crate) fn status(exit: &ProcessExit) -> String {
    match (exit.killed_reason, exit.exit_code, exit.signal) {
        (Some(reason), _, _) => format!("killed: {}", reason.as_str()),
        (None, Some(code), _) => format!("code {code}"),
        (None, None, Some(signal)) => format!("signal {signal}"),
        (None, None, None) => "unknown status".to_string(),
    }
}

pub(crate) fn tail(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() <= STDERR_TAIL_CHARS {
        return text.to_string();
    }
    let start = text
        .char_indices()
        .rev()
        .nth(STDERR_TAIL_CHARS - 1)
        .map_or(0, |(start, _)| start);
    format!("…{}", &text[start..])
}

/// Starts the server's program in the sandbox.
pub(crate) async fn spawn(
    server: &str,
    sandbox: &dyn Sandbox,
    command: &[String],
    env: &[(String, String)],
    overflow: Overflow,
) -> Result<(Reader, Writer, Process), McpError> {
    let spec = ProcessSpec {
        argv: command.to_vec(),
        env: env.to_vec(),
    };
    let process = sandbox
        .spawn(&spec)
        .await
        .map_err(|e| McpError::Unavailable {
            server: server.to_string(),
            reason: format!("could not start `{}`: {e}", command.join(" ")),
        })?;
    let (report, exit) = watch::channel(None);
    let exited = process.exited;
    let watcher = tokio::spawn(async move {
        let exit = exited.await.map_err(|e| e.to_string());
        let _ = report.send(Some(exit));
    })
    .abort_handle();
    let reader = BoundedLines::new(process.stdout, MAX_MESSAGE_BYTES, overflow);
    Ok((
        reader,
        process.stdin,
        Process {
            guard: Mutex::new(Some(process.guard)),
            exit,
            watcher,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_end() {
        assert_eq!(tail("  short\n"), "short");
        let long = format!("{}END", "é".repeat(STDERR_TAIL_CHARS));
        assert_eq!(
            tail(&"é".repeat(STDERR_TAIL_CHARS)).chars().count(),
            STDERR_TAIL_CHARS
        );
        let kept = tail(&long);
        assert!(kept.starts_with('…') && kept.ends_with("END"), "{kept}");
        assert_eq!(kept.chars().count(), STDERR_TAIL_CHARS + 1);
    }
}
