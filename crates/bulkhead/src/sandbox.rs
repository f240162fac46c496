//! `bulkhead sandbox exec`: one command in a fresh sandbox with the
//! configured limits, its output, and its record.

use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_sandbox::{Backend, Operation};
use bulkhead_server::Config;
use bulkhead_server::config::SandboxBackendKind;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Run one command in a fresh sandbox; exit with its exit code.
    Exec {
        /// `namespace` or `docker` (default: SANDBOX_BACKEND).
        #[arg(long)]
        backend: Option<String>,
        /// Print one JSON object (the result and its limits) instead of the
        /// output followed by a summary on stderr.
        #[arg(long)]
        json: bool,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

pub async fn run(command: SandboxCommand, config: &Config) -> ExitCode {
    let SandboxCommand::Exec {
        backend,
        json,
        command,
    } = command;
    let kind = match backend.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => config.sandbox.backend,
        Some("namespace") => SandboxBackendKind::Namespace,
        Some("docker") => SandboxBackendKind::Docker,
        Some("remote") => SandboxBackendKind::Remote,
        Some(other) => {
            eprintln!(
                "bulkhead sandbox: unknown backend {other:?} (expected namespace, docker or remote)"
            );
            return ExitCode::from(2);
        }
    };
    let backend: Arc<dyn Backend> = match bulkhead_server::sandbox::backend(kind, &config.sandbox) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("bulkhead sandbox: {e}");
            return ExitCode::from(125);
        }
    };
    let id = format!("exec-{}", std::process::id());
    let limits = &config.sandbox.limits;
    let sandbox = match backend.create(&id, limits).await {
        Ok(sandbox) => sandbox,
        Err(e) => {
            eprintln!("bulkhead sandbox: {e}");
            return ExitCode::from(125);
        }
    };
    let result = sandbox
        .run(&Operation::Exec {
            argv: command.clone(),
            timeout: None,
        })
        .await;
    let _ = sandbox.destroy().await;
    let result = match result {
        Ok(result) => result,
        Err(e) => {
            eprintln!("bulkhead sandbox: {e}");
            return ExitCode::from(125);
        }
    };
    if json {
        let mut object = serde_json::to_value(&result).unwrap_or_default();
        object["backend"] = backend.name().into();
        object["command"] = serde_json::json!(command);
        object["limits"] = serde_json::to_value(limits).unwrap_or_default();
        object["truncated"] = (result.stdout.truncated || result.stderr.truncated).into();
        println!("{object}");
    } else {
        use std::io::Write;
        let _ = std::io::stdout().write_all(result.stdout.text.as_bytes());
        let _ = std::io::stderr().write_all(result.stderr.text.as_bytes());
        let status = match (result.exit_code, result.signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "unknown".into(),
        };
        eprintln!(
            "[sandbox {}: {status}{}, {} ms, stdout {} bytes{}, stderr {} bytes{}]",
            backend.name(),
            result
                .killed_reason
                .map(|r| format!(", stopped: {}", r.as_str()))
                .unwrap_or_default(),
            result.duration_ms,
            result.stdout.total_bytes,
            if result.stdout.truncated {
                " (truncated)"
            } else {
                ""
            },
            result.stderr.total_bytes,
            if result.stderr.truncated {
                " (truncated)"
            } else {
                ""
            },
        );
    }
    ExitCode::from(result.shell_status().clamp(0, 255) as u8)
}
