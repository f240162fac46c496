//! Streamable HTTP servers: a real fastmcp server (the pinned one from
//! scripts/ensure-tools) on this machine's non-loopback address, which the
//! egress policy must name, since it refuses loopback whatever it says.

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bulkhead_mcp::{McpError, McpServerConfig, McpSession, NoSandbox};
use bulkhead_sandbox::egress::EgressPolicy;
use serde_json::json;
use support::arguments;

/// The test's server: `add`, `fail` (raises a ToolError: `isError`),
/// `sleep` (past the call timeout), `header` (what the test's header said).
/// It exits when its stdin closes, that is when the test binary does.
const SERVER: &str = r#"
import asyncio, os, sys, threading
from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_headers

def exit_with_parent():
    sys.stdin.read()
    os._exit(0)

threading.Thread(target=exit_with_parent, daemon=True).start()

mcp = FastMCP("bulkhead-test")

@mcp.tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b

@mcp.tool
def fail(reason: str) -> str:
    """Always fails, with the reason given."""
    raise ToolError(reason)

@mcp.tool
async def sleep(seconds: float) -> str:
    """Sleeps, then answers."""
    await asyncio.sleep(seconds)
    return "slept"

@mcp.tool
def header() -> str:
    """The X-Test-Key header the request carried."""
    return get_http_headers(include_all=True).get("x-test-key", "(none)")

mcp.run(transport="http", host=sys.argv[1], port=int(sys.argv[2]), path="/mcp",
        show_banner=False, log_level="warning")
"#;

struct FastMcp {
    address: Ipv4Addr,
    port: u16,
    _child: Child,
    _stdin: Mutex<ChildStdin>,
    _dir: tempfile::TempDir,
}

impl FastMcp {
    fn url(&self) -> url::Url {
        url::Url::parse(&format!("http://{}:{}/mcp", self.address, self.port)).unwrap()
    }

    fn policy(&self) -> EgressPolicy {
        EgressPolicy::parse(&format!("{}:{}", self.address, self.port)).unwrap()
    }
}

/// A port nobody listens on right now.
fn free_port(address: Ipv4Addr) -> u16 {
    TcpListener::bind((address, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One server for the whole binary, started on first use.
fn server() -> Option<&'static FastMcp> {
    static SERVER_ONCE: OnceLock<Option<FastMcp>> = OnceLock::new();
    SERVER_ONCE
        .get_or_init(|| {
            if !support::venv_ready() {
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let script = dir.path().join("server.py");
            std::fs::File::create(&script)
                .unwrap()
                .write_all(SERVER.as_bytes())
                .unwrap();
            let address = bulkhead_testing::outside_address();
            let port = free_port(address);
            let mut child = Command::new(support::mcp_venv().join("bin/python3"))
                .arg(&script)
                .args([address.to_string(), port.to_string()])
                .stdin(Stdio::piped())
                .spawn()
                .expect("the fastmcp server starts");
            let stdin = child.stdin.take().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while TcpStream::connect((address, port)).is_err() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("the fastmcp server exited ({status}) before listening");
                }
                assert!(
                    Instant::now() < deadline,
                    "the fastmcp server never listened"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(FastMcp {
                address,
                port,
                _child: child,
                _stdin: Mutex::new(stdin),
                _dir: dir,
            })
        })
        .as_ref()
}

fn config(server: &FastMcp) -> McpServerConfig {
    McpServerConfig::http("fast", server.url(), vec![])
        .unwrap()
        .with_timeouts(Duration::from_secs(30), Duration::from_secs(10))
        .unwrap()
}

fn session(config: McpServerConfig, policy: EgressPolicy) -> McpSession {
    McpSession::new(vec![config], policy).unwrap()
}

#[tokio::test]
async fn tools_are_listed_with_their_schemas_and_called() {
    let Some(server) = server() else { return };
    let session = session(config(server), server.policy());
    let tools = session.tools(&NoSandbox).await;
    let mut names: Vec<&str> = tools.iter().map(|t| t.qualified_name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["fast__add", "fast__fail", "fast__header", "fast__sleep"]
    );
    let add = tools.iter().find(|t| t.tool == "add").unwrap();
    assert_eq!(add.server, "fast");
    assert_eq!(add.description, "Adds two integers.");
    assert_eq!(add.input_schema["type"], "object");
    assert_eq!(add.input_schema["properties"]["a"]["type"], "integer");

    let output = session
        .call(&NoSandbox, "fast__add", arguments(json!({"a": 2, "b": 40})))
        .await
        .unwrap();
    assert_eq!(output.content, "42");
    assert!(!output.is_error);
}

#[tokio::test]
async fn an_is_error_result_is_output_not_an_error() {
    let Some(server) = server() else { return };
    let session = session(config(server), server.policy());
    let output = session
        .call(
            &NoSandbox,
            "fast__fail",
            arguments(json!({"reason": "the disk is on fire"})),
        )
        .await
        .unwrap();
    assert!(output.is_error);
    assert!(output.content.contains("the disk is on fire"), "{output:?}");
    // Bad arguments are the server's to refuse; the model reads why.
    let refused = session
        .call(&NoSandbox, "fast__add", arguments(json!({"a": "two"})))
        .await;
    match refused {
        Ok(output) => assert!(output.is_error, "{output:?}"),
        Err(error) => assert!(error.to_string().contains("fast"), "{error}"),
    }
}

#[tokio::test]
async fn the_allowlist_filters_the_tools_and_refuses_the_rest() {
    let Some(server) = server() else { return };
    let config = config(server).with_tools(["add"]).unwrap();
    let session = session(config, server.policy());
    let tools = session.tools(&NoSandbox).await;
    let names: Vec<&str> = tools.iter().map(|t| t.qualified_name.as_str()).collect();
    assert_eq!(names, ["fast__add"]);

    let error = session
        .call(&NoSandbox, "fast__fail", arguments(json!({"reason": "x"})))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        McpError::NotAllowed {
            server: "fast".into(),
            tool: "fail".into()
        }
    );
    for unknown in ["other__add", "add", "fast__"] {
        let error = session
            .call(&NoSandbox, unknown, serde_json::Map::new())
            .await
            .unwrap_err();
        assert_eq!(error, McpError::UnknownTool(unknown.into()));
    }
    // Allowed, but the server has no such tool.
    let config = McpServerConfig::http("fast", server.url(), vec![]).unwrap();
    let session = McpSession::new(vec![config], server.policy()).unwrap();
    let error = session
        .call(&NoSandbox, "fast__nosuch", serde_json::Map::new())
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "there is no MCP tool `fast__nosuch`");
}

#[tokio::test]
async fn a_call_past_its_timeout_fails_and_the_next_call_reconnects() {
    let Some(server) = server() else { return };
    let config = config(server)
        .with_timeouts(Duration::from_secs(30), Duration::from_secs(1))
        .unwrap();
    let session = session(config, server.policy());
    let started = Instant::now();
    let error = session
        .call(&NoSandbox, "fast__sleep", arguments(json!({"seconds": 30})))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, McpError::Timeout { .. }), "{error:?}");
    assert!(error.to_string().contains("within 1 s"), "{error}");

    let output = session
        .call(&NoSandbox, "fast__add", arguments(json!({"a": 1, "b": 1})))
        .await
        .unwrap();
    assert_eq!(output.content, "2");
}

#[tokio::test]
async fn headers_reach_the_server_and_stay_out_of_errors() {
    let Some(server) = server() else { return };
    let headers = vec![("X-Test-Key".to_string(), "s3cret-value".to_string())];
    let config = McpServerConfig::http("fast", server.url(), headers.clone()).unwrap();
    let session = session(config, server.policy());
    let output = session
        .call(&NoSandbox, "fast__header", serde_json::Map::new())
        .await
        .unwrap();
    assert_eq!(output.content, "s3cret-value");

    // Nobody listens there: the error says so, without the header.
    let url = url::Url::parse(&format!(
        "http://{}:{}/mcp?token=s3cret-query",
        server.address,
        free_port(server.address)
    ))
    .unwrap();
    let port = url.port().unwrap();
    let config = McpServerConfig::http("gone", url, headers).unwrap();
    let policy = EgressPolicy::parse(&format!("{}:{port}", server.address)).unwrap();
    let session = McpSession::new(vec![config], policy)
        .unwrap()
        .with_retry_backoff(Duration::from_millis(700));
    assert!(session.tools(&NoSandbox).await.is_empty());
    let error = session
        .call(&NoSandbox, "gone__add", serde_json::Map::new())
        .await
        .unwrap_err();
    // Within the back-off, the server is not tried again.
    assert!(matches!(error, McpError::BackingOff { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("the MCP server `gone` is unavailable"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let error = session
        .call(&NoSandbox, "gone__add", serde_json::Map::new())
        .await
        .unwrap_err();
    assert!(matches!(error, McpError::Unavailable { .. }), "{error:?}");
    assert!(!error.to_string().contains("s3cret"), "{error}");
}

#[tokio::test]
async fn the_egress_policy_decides_which_servers_are_reached() {
    let Some(server) = server() else { return };
    let refused = |policy: String, url: String| async move {
        let url = url::Url::parse(&url).unwrap();
        let config = McpServerConfig::http("fast", url, vec![]).unwrap();
        let session = McpSession::new(vec![config], EgressPolicy::parse(&policy).unwrap()).unwrap();
        assert!(session.tools(&NoSandbox).await.is_empty());
        let session = session.with_retry_backoff(Duration::ZERO);
        match session
            .call(&NoSandbox, "fast__add", serde_json::Map::new())
            .await
        {
            Err(McpError::EgressRefused { rule, .. }) => rule,
            other => panic!("{policy}: {other:?}"),
        }
    };
    let (address, port) = (server.address, server.port);
    let url = format!("http://{address}:{port}/mcp");
    // Not listed at all.
    let rule = refused(String::new(), url.clone()).await;
    assert_eq!(rule, "not in SANDBOX_EGRESS_ALLOW");
    // Listed on another port.
    let rule = refused(format!("{address}:{}", port + 1), url.clone()).await;
    assert_eq!(rule, "not in SANDBOX_EGRESS_ALLOW");
    // A name that leads to loopback, whatever the list says.
    let rule = refused(
        format!("localhost:{port}"),
        format!("http://localhost:{port}/mcp"),
    )
    .await;
    assert!(rule.contains("loopback"), "{rule}");
    // The message names the server and the rule, for the model.
    let config = McpServerConfig::http("fast", url::Url::parse(&url).unwrap(), vec![]).unwrap();
    let session = McpSession::new(vec![config], EgressPolicy::default()).unwrap();
    let error = session
        .call(&NoSandbox, "fast__add", serde_json::Map::new())
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "the MCP server `fast` at {address}:{port} is not allowed by the egress policy: not in SANDBOX_EGRESS_ALLOW"
        )
    );
}

/// A server that answers every POST with one SSE event that never ends.
fn flooding_server(address: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((address, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            std::thread::spawn(move || {
                let mut request = [0u8; 8192];
                let _ = std::io::Read::read(&mut stream, &mut request);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: ";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 << 10];
                // Until the client hangs up.
                while stream.write_all(&chunk).is_ok() {}
            });
        }
    });
    port
}

#[tokio::test]
async fn a_server_that_floods_its_answer_is_cut_off() {
    let address = bulkhead_testing::outside_address();
    let port = flooding_server(address);
    let url = url::Url::parse(&format!("http://{address}:{port}/mcp")).unwrap();
    let config = McpServerConfig::http("flood", url, vec![])
        .unwrap()
        .with_timeouts(Duration::from_secs(20), Duration::from_secs(5))
        .unwrap();
    let policy = EgressPolicy::parse(&format!("{address}:{port}")).unwrap();
    let session = McpSession::new(vec![config], policy)
        .unwrap()
        .with_retry_backoff(Duration::ZERO);
    let started = Instant::now();
    assert!(session.tools(&NoSandbox).await.is_empty());
    let error = session
        .call(&NoSandbox, "flood__anything", serde_json::Map::new())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        error.to_string(),
        "the MCP server `flood` sent a message larger than 4 MiB; it was stopped"
    );
}
