//! The program `http_fetch` runs inside a sandbox.

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
