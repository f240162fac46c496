//! The proxy: a folder of unix sockets, one per sandbox (its *gate*), all
//! applying one policy. A sandbox sees only its own gate, mounted at
//! [`super::SANDBOX_SOCKET`]; so whatever arrives on a gate comes from that
//! sandbox, and its refusals can be put on the record of the operation
//! that was running there.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use super::policy::{EgressPolicy, Refused};
use crate::{EgressRefusal, ExecResult, SandboxError};

/// Serves gates in one folder.
#[derive(Debug)]
pub struct EgressProxy {
    folder: PathBuf,
    policy: Arc<EgressPolicy>,
}

impl EgressProxy {
    /// Gates are made in `folder` (created if absent).
    pub fn new(folder: &Path, policy: Arc<EgressPolicy>) -> std::io::Result<EgressProxy> {
        std::fs::create_dir_all(folder)?;
        remove_stale_gates(folder);
        Ok(EgressProxy {
            folder: folder.to_path_buf(),
            policy,
        })
    }

    pub fn folder(&self) -> &Path {
        &self.folder
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// A gate with a fresh name, for a sandbox made in this process.
    pub fn open_local_gate(&self) -> std::io::Result<EgressGate> {
        // Unique, not secret: a sandbox only ever sees its own gate.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        self.open_gate(&format!(
            "gate-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Binds `<folder>/<file_name>` (replacing a stale socket) and serves
    /// it until the gate is dropped. Needs a tokio runtime.
    pub fn open_gate(&self, file_name: &str) -> std::io::Result<EgressGate> {
        if file_name.contains('/') || file_name.starts_with('.') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid gate name {file_name:?}"),
            ));
        }
        let path = self.folder.join(file_name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        // Sandboxed programs run as other uids; the gate is their only way
        // out, and the policy is what guards it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let inode = std::fs::metadata(&path)?.ino();
        let refusals: Arc<Mutex<Vec<EgressRefusal>>> = Arc::default();
        let task = tokio::spawn({
            let policy = Arc::clone(&self.policy);
            let refusals = Arc::clone(&refusals);
            let gate = file_name.to_string();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let policy = Arc::clone(&policy);
                    let refusals = Arc::clone(&refusals);
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, &policy, &gate, &refusals).await {
                            tracing::debug!(error = %e, "egress connection ended");
                        }
                    });
                }
            }
        });
        Ok(EgressGate {
            path,
            inode,
            task,
            refusals,
        })
    }
}

/// Gates a process that died left behind: sockets nobody listens on.
fn remove_stale_gates(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_socket = entry.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        });
        if is_socket
            && path.extension().is_some_and(|e| e == "sock")
            && std::os::unix::net::UnixStream::connect(&path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The name of the gate a server opens for a sandbox that sandboxd makes
/// (the remote backend): both sides derive it from the scope and the
/// sandbox id, so sandboxd can mount it without being told. A digest, so
/// that long scopes and ids still fit a socket path (108 bytes).
pub fn remote_gate_name(scope: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{scope}\0{id}").as_bytes());
    format!("sandbox-{}.sock", hex::encode(&digest[..12]))
}

/// One sandbox's socket to the proxy; closed and removed when dropped.
#[derive(Debug)]
pub struct EgressGate {
    path: PathBuf,
    inode: u64,
    task: tokio::task::JoinHandle<()>,
    refusals: Arc<Mutex<Vec<EgressRefusal>>>,
}

impl EgressGate {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file name inside the proxy's folder.
    pub fn file_name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// The refusals since the last call: the caller puts them on the record
    /// of the operation that just ran in the sandbox.
    pub fn take_refusals(&self) -> Vec<EgressRefusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Runs one operation of a sandbox and puts on its record the refusals its
/// programs met at the sandbox's gate (none without a gate).
pub async fn attributed(
    gate: Option<&EgressGate>,
    operation: impl std::future::Future<Output = Result<ExecResult, SandboxError>>,
) -> Result<ExecResult, SandboxError> {
    let Some(gate) = gate else {
        return operation.await;
    };
    // Whatever is left belongs to no operation now running.
    drop(gate.take_refusals());
    let mut result = operation.await?;
    result.egress_refusals.extend(gate.take_refusals());
    Ok(result)
}

impl Drop for EgressGate {
    fn drop(&mut self) {
        self.task.abort();
        // A gate of the same name opened since (the sandbox made again)
        // owns the path now.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn respond(stream: &mut UnixStream, status: &str, reason: &str) -> std::io::Result<()> {
    let body = format!("bulkhead egress: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

async fn serve(
    mut stream: UnixStream,
    policy: &EgressPolicy,
    gate: &str,
    refusals: &Mutex<Vec<EgressRefusal>>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "request head too large",
            )
            .await;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;
        match read {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return Ok(()),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return respond(&mut stream, "400 Bad Request", "malformed request").await;
    };
    if !method.eq_ignore_ascii_case("CONNECT") {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "only CONNECT tunnels are served",
        )
        .await;
    }
    let Some((host, port)) = target.rsplit_once(':').and_then(|(h, p)| {
        Some((
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse::<u16>().ok()?,
        ))
    }) else {
        return respond(&mut stream, "400 Bad Request", "expected CONNECT host:port").await;
    };
    // Every refusal: one audit line naming the gate, the destination, the
    // address and the rule; on the record of the sandbox's operation; and
    // a clear error to the program.
    let record = |refused: Refused| {
        let address = refused.address.map(|a| a.to_string());
        tracing::warn!(
            target: "audit",
            gate,
            host = host.as_str(),
            port,
            address = address.as_deref().unwrap_or("-"),
            rule = refused.rule.as_str(),
            "egress refused"
        );
        let message = match &address {
            Some(address) if *address != host => {
                format!("{host}:{port} ({address}) refused: {}", refused.rule)
            }
            _ => format!("{host}:{port} refused: {}", refused.rule),
        };
        refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(EgressRefusal {
                host: host.clone(),
                port,
                address,
                rule: refused.rule,
            });
        message
    };
    if !policy.allows(&host, port) {
        let refused = Refused {
            address: None,
            rule: "not in SANDBOX_EGRESS_ALLOW".into(),
        };
        let message = record(refused);
        return respond(&mut stream, "403 Forbidden", &message).await;
    }
    // Resolved once: the addresses judged are the addresses connected to.
    let addresses: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addresses) => addresses.collect(),
        Err(_) => {
            return respond(
                &mut stream,
                "502 Bad Gateway",
                &format!("cannot resolve {host}"),
            )
            .await;
        }
    };
    if let Err(refused) = policy.check(&host, port, &addresses) {
        let message = record(refused);
        return respond(&mut stream, "403 Forbidden", &message).await;
    }
    let upstream =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addresses[..])).await;
    let mut upstream = match upstream {
        Ok(Ok(upstream)) => upstream,
        _ => {
            return respond(
                &mut stream,
                "502 Bad Gateway",
                &format!("cannot connect to {host}:{port}"),
            )
            .await;
        }
    };
    let address = upstream
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    tracing::info!(target: "audit", gate, host, port, address, "egress tunnel opened");
    stream
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
    Ok(())
}
