//! Egress: sandboxes have no network, only a unix socket to this proxy,
//! which opens `CONNECT host:port` tunnels to the hosts
//! `SANDBOX_EGRESS_ALLOW` lists and to nothing else.
//!
//! The proxy resolves names itself and refuses loopback, link-local,
//! unspecified and multicast addresses whatever the name, so an allowed
//! name cannot be pointed at the host's own services or at a cloud metadata
//! endpoint.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Where the proxy's socket appears inside every sandbox.
pub const SANDBOX_SOCKET: &str = "/run/bulkhead/egress.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: example.com's subdomains (not example.com itself).
    Subdomains(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    host: HostPattern,
    /// `None`: 80 and 443.
    port: Option<u16>,
}

/// The hosts sandboxes may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    rules: Vec<Rule>,
}

impl EgressPolicy {
    /// `host[:port]` entries separated by commas or spaces; `*.domain`
    /// allows a domain's subdomains. Without a port, 80 and 443.
    pub fn parse(spec: &str) -> Result<EgressPolicy, String> {
        let mut rules = Vec::new();
        for entry in spec
            .split([',', ' ', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let entry = entry.to_ascii_lowercase();
            let (host, port) = match entry.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                    let port = port
                        .parse::<u16>()
                        .map_err(|_| format!("{entry:?}: the port must be a number"))?;
                    (host.to_string(), Some(port))
                }
                _ => (entry.clone(), None),
            };
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            if host.is_empty() || host.contains('/') {
                return Err(format!("{entry:?} is not a host name"));
            }
            let host = match host.strip_prefix("*.") {
                Some(domain) if !domain.is_empty() => HostPattern::Subdomains(domain.to_string()),
                Some(_) => return Err(format!("{entry:?} is not a host name")),
                None => HostPattern::Exact(host),
            };
            rules.push(Rule { host, port });
        }
        Ok(EgressPolicy { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.rules.iter().any(|rule| {
            let port_ok = match rule.port {
                Some(p) => p == port,
                None => port == 80 || port == 443,
            };
            let host_ok = match &rule.host {
                HostPattern::Exact(name) => *name == host,
                HostPattern::Subdomains(domain) => host
                    .strip_suffix(domain.as_str())
                    .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
            };
            port_ok && host_ok
        })
    }
}

impl std::fmt::Display for EgressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> = self
            .rules
            .iter()
            .map(|rule| {
                let host = match &rule.host {
                    HostPattern::Exact(name) => name.clone(),
                    HostPattern::Subdomains(domain) => format!("*.{domain}"),
                };
                match rule.port {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        f.write_str(&entries.join(","))
    }
}

/// Addresses no sandbox may reach, whatever name leads there.
pub fn forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_address(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The proxy, serving on a unix socket until dropped.
#[derive(Debug)]
pub struct EgressProxy {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl EgressProxy {
    /// Binds `path` (replacing a stale socket) and serves.
    pub fn start(path: &Path, policy: Arc<EgressPolicy>) -> std::io::Result<EgressProxy> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        // Sandboxed programs run as other uids; the socket is their only way
        // out, and the policy is what guards it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let policy = Arc::clone(&policy);
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, &policy).await {
                        tracing::debug!(error = %e, "egress connection ended");
                    }
                });
            }
        });
        Ok(EgressProxy {
            path: path.to_path_buf(),
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

async fn refuse(stream: &mut UnixStream, status: &str, reason: &str) -> std::io::Result<()> {
    let body = format!("bulkhead egress: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

async fn serve(mut stream: UnixStream, policy: &EgressPolicy) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return refuse(
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
        return refuse(&mut stream, "400 Bad Request", "malformed request").await;
    };
    if !method.eq_ignore_ascii_case("CONNECT") {
        return refuse(
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
        return refuse(&mut stream, "400 Bad Request", "expected CONNECT host:port").await;
    };
    if !policy.allows(&host, port) {
        tracing::warn!(target: "audit", host, port, "egress refused: not in SANDBOX_EGRESS_ALLOW");
        return refuse(
            &mut stream,
            "403 Forbidden",
            &format!("{host}:{port} is not in SANDBOX_EGRESS_ALLOW"),
        )
        .await;
    }
    let addresses: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addresses) => addresses.collect(),
        Err(_) => {
            return refuse(
                &mut stream,
                "502 Bad Gateway",
                &format!("cannot resolve {host}"),
            )
            .await;
        }
    };
    let allowed: Vec<SocketAddr> = addresses
        .into_iter()
        .filter(|a| !forbidden_address(a.ip()))
        .collect();
    if allowed.is_empty() {
        tracing::warn!(target: "audit", host, port, "egress refused: resolves to a forbidden address");
        return refuse(
            &mut stream,
            "403 Forbidden",
            &format!("{host} resolves to a loopback, link-local or otherwise forbidden address"),
        )
        .await;
    }
    let upstream =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&allowed[..])).await;
    let mut upstream = match upstream {
        Ok(Ok(upstream)) => upstream,
        _ => {
            return refuse(
                &mut stream,
                "502 Bad Gateway",
                &format!("cannot connect to {host}:{port}"),
            )
            .await;
        }
    };
    tracing::info!(target: "audit", host, port, "egress tunnel opened");
    stream
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
    Ok(())
}

/// The program `http_fetch` runs inside a sandbox: one request through the
/// egress socket (a CONNECT tunnel, TLS for https), answered as a status
/// line, headers and the body on stdout. Needs python3 in the sandbox.
pub const FETCH_SCRIPT: &str = r#"
import http.client, json, socket, ssl, sys, urllib.parse
req = json.loads(sys.argv[1])
url = urllib.parse.urlsplit(req["url"])
tls = url.scheme == "https"
host = url.hostname
port = url.port or (443 if tls else 80)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect("/run/bulkhead/egress.sock")
except OSError as e:
    sys.exit("http_fetch: no egress from this sandbox (%s)" % e)
s.sendall(("CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (host, port, host, port)).encode())
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(1)
    if not chunk:
        break
    head += chunk
status = head.split(b"\r\n", 1)[0].decode(errors="replace")
if " 200 " not in status + " ":
    rest = s.recv(4096).decode(errors="replace").strip()
    sys.exit("http_fetch: refused: %s %s" % (status, rest))
if tls:
    s = ssl.create_default_context().wrap_socket(s, server_hostname=host)
conn = http.client.HTTPConnection(host, port, timeout=30)
conn.sock = s
path = url.path or "/"
if url.query:
    path += "?" + url.query
body = req.get("body")
conn.request(req.get("method", "GET"), path, body=body.encode() if body is not None else None, headers=req.get("headers") or {})
r = conn.getresponse()
print("HTTP %d %s" % (r.status, r.reason))
for k, v in r.getheaders():
    print("%s: %s" % (k, v))
print()
sys.stdout.flush()
sys.stdout.buffer.write(r.read())
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_matches_hosts_and_ports() {
        let policy = EgressPolicy::parse("api.github.com, *.pypi.org 10.1.2.3:8080").unwrap();
        assert!(policy.allows("api.github.com", 443));
        assert!(policy.allows("API.GitHub.com", 80));
        assert!(!policy.allows("api.github.com", 22));
        assert!(!policy.allows("github.com", 443));
        assert!(policy.allows("files.pypi.org", 443));
        assert!(!policy.allows("pypi.org", 443));
        assert!(!policy.allows("evilpypi.org", 443));
        assert!(policy.allows("10.1.2.3", 8080));
        assert!(!policy.allows("10.1.2.3", 443));
        assert!(EgressPolicy::parse("").unwrap().is_empty());
        assert!(EgressPolicy::parse("host:port").is_err());
        assert!(EgressPolicy::parse("http://x/").is_err());
    }

    #[test]
    fn loopback_and_metadata_addresses_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "fe80::1",
        ] {
            assert!(forbidden_address(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.5", "93.184.216.34", "2606:2800::1"] {
            assert!(!forbidden_address(ip.parse().unwrap()), "{ip}");
        }
    }
}
