//! What the MCP tests share: the pinned test servers (scripts/ensure-tools,
//! scripts/ensure-images), and the rule that under `CI=true` nothing skips.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The venv scripts/ensure-tools makes with mcp-server-time and fastmcp,
/// under /usr so that the namespace sandbox sees it.
pub fn mcp_venv() -> PathBuf {
    let base = std::env::var_os("BULKHEAD_TEST_MCP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/bulkhead-test-mcp"));
    base.join("venv")
}

/// Whether a test can run: when `missing` says what is absent, the test is
/// skipped with that reason, except under `CI=true`, where it fails.
pub fn available(missing: Option<String>) -> bool {
    let Some(missing) = missing else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{missing} (CI=true: nothing may skip)");
    }
    eprintln!("skipped: {missing}");
    false
}

/// The test servers' venv, if it is there (see [`available`]).
pub fn venv_ready() -> bool {
    let python = mcp_venv().join("bin/python3");
    available(
        (!python.exists())
            .then(|| format!("{} is missing: run scripts/ensure-tools", python.display())),
    )
}

/// Processes on this machine whose command line contains `needle`
/// (sandboxed ones included: they share the kernel's /proc).
pub fn processes_with(needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| {
            String::from_utf8_lossy(cmdline)
                .replace('\0', " ")
                .contains(needle)
        })
        .count()
}

/// Waits up to `within` for no process to match `needle`.
pub async fn gone(needle: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if processes_with(needle) == 0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn arguments(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        other => panic!("arguments must be an object, not {other}"),
    }
}
