"""Bulkhead side by side with the tutorials' FastAPI service, in one run.

Called by `bench/run` (which makes the virtual environment). Measures both
services with wrk, the servers pinned to one half of the cores and the load
generator to the other, then Bulkhead alone with its front door (keys,
limits, metrics, traces) on and off, its OpenAI-compatible API against
the mock model it calls (`--openai` for that part alone), its LangGraph
Agent Server API against LangGraph's own in-memory server with the same
langgraph-sdk workload (`--langgraph` for that part alone), on PostgreSQL,
under 10,000
concurrent streaming runs, in its sandboxes and as an image. Writes
bench/results/run-<commit>-<time>.{json,md} and PNG plots, and prints the
Markdown table. Not part of the test suite: nothing here asserts.
"""

import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BULKHEAD = ROOT / "target" / "release" / "bulkhead"
STREAM_LOAD = ROOT / "target" / "release" / "stream-load"
SANDBOX_BENCH = ROOT / "target" / "release" / "examples" / "sandbox_bench"
REFERENCE = Path(os.environ.get("BULKHEAD_REFERENCE_DIR", ROOT / "bench" / "reference" / "fastapi-agent"))
VENV = Path(os.environ.get("BULKHEAD_BENCH_VENV", ROOT / "bench" / ".venv"))
LANGGRAPH_DIR = ROOT / "bench" / "langgraph"
LANGGRAPH_VENV = Path(os.environ.get("BULKHEAD_LANGGRAPH_VENV", ROOT / "bench" / ".venv-langgraph"))

CONNECTIONS = [1, 4, 16, 64, 256]
HEADLINE = 64
SWEEP_SECONDS = int(os.environ.get("BENCH_SWEEP_SECONDS", "4"))
HEADLINE_SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
STARTS = int(os.environ.get("BENCH_STARTS", "7"))
STREAM_RUNS = int(os.environ.get("BENCH_STREAM_RUNS", "10000"))
LANGGRAPH_SECONDS = float(os.environ.get("BENCH_LANGGRAPH_SECONDS", "10"))
LANGGRAPH_CONCURRENCY = [int(c) for c in os.environ.get("BENCH_LANGGRAPH_CONCURRENCY", "1,4,16,64").split(",")]
LANGGRAPH_HEADLINE = 16

# The targets of PRODUCT.md.
TARGETS = {
    "agent_rps_ratio": 20.0,
    "agent_p99_ratio": 0.1,
    "ready_ms": 30.0,
    "idle_rss_mb": 15.0,
    "image_mb": 15.0,
    "container_healthy_ms": 1000.0,
    "sandbox_namespace_p50_ms": 10.0,
    "sandbox_docker_warm_p50_ms": 60.0,
    "sandbox_docker_cold_ms": 400.0,
    "stream_rss_mb": 300.0,
    "front_door_cost_pct": 5.0,
    "openai_added_p50_ms": 1.0,
    "openai_added_p99_ms": 5.0,
}

WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d}}\\n",
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def cpu_split():
    cores = os.cpu_count() or 1
    if cores == 1:
        return "0", "0"
    half = cores // 2
    server = "0" if half == 1 else f"0-{half - 1}"
    load = str(half) if cores - half == 1 else f"{half}-{cores - 1}"
    return server, load


SERVER_CPUS, LOAD_CPUS = cpu_split()


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except ValueError:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def rss_kb(pid, field="VmRSS"):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Server:
    """A service under test, pinned to the server cores."""

    ready_path = "/ready"

    def __init__(self, name, argv, env, port, cwd=None, log=None):
        """`log`: a file for the server's stdout and stderr (for chatty
        servers, whose stderr would fill an unread pipe); by default stdout
        is dropped and stderr kept for the error message."""
        self.name, self.port = name, port
        self.started = time.perf_counter()
        self.log = log
        out = open(log, "wb") if log else None
        self.process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPUS, *argv],
            env=env,
            cwd=cwd,
            stdout=out or subprocess.DEVNULL,
            stderr=out or subprocess.PIPE,
            preexec_fn=raise_nofile,
        )
        if out:
            out.close()

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=30.0):
        """Seconds from spawn to the first 200 from /ready."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if get(self.base + self.ready_path, timeout=0.5) == 200:
                return time.perf_counter() - self.started
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            time.sleep(0.0005)
        raise RuntimeError(f"{self.name} not ready within {timeout}s")

    def output(self):
        if self.log:
            return Path(self.log).read_bytes().decode(errors="replace")[-2000:]
        return self.process.stderr.read().decode()[-2000:]

    def rss_mb(self, field="VmRSS"):
        return rss_kb(self.process.pid, field) / 1024

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bulkhead(database_url=None, extra=None):
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bulkhead-bench-"))
    # mkdtemp makes it 0700; the sandboxes' host uid must traverse it.
    data.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "AGENT_MODE": "development",
        "LOG_LEVEL": "warn",
        "DATABASE_URL": database_url or f"sqlite://{data}/bulkhead.db",
        "SANDBOX_ROOT": str(data / "sandboxes"),
        "SECRETS_DIR": str(data / "no-secrets"),
    }
    env.update(extra or {})
    server = Server("bulkhead", [str(BULKHEAD), "serve"], env, port, cwd=data)
    server.data = data
    return server


def reference():
    port = free_port()
    env = {"PATH": f"{VENV}/bin:" + os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    argv = [
        str(VENV / "bin" / "uvicorn"), "app:app", "--app-dir", str(REFERENCE),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]
    return Server("fastapi", argv, env, port)


def wrk(server, path, connections, seconds, headers=None, body=None):
    if body is not None:
        method, body = "POST", "'" + json.dumps(body) + "'"
    else:
        method, body = ("POST", '\'{"message": "hello"}\'') if path == "/agent" else ("GET", "nil")
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(method=method, body=body, headers=extra))
    threads = 1 if connections < 4 else min(2, os.cpu_count() or 1)
    output = subprocess.run(
        ["taskset", "-c", LOAD_CPUS, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
         "--timeout", "10s", "-s", script.name, server.base + path],
        capture_output=True, text=True, check=True,
    ).stdout
    os.unlink(script.name)
    line = next(l for l in output.splitlines() if l.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON "):])
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {
        "connections": connections,
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "errors": errors,
        "non_2xx": raw["status"],
    }


def measure_service(make, label):
    log(f"{label}: start to /ready, {STARTS} starts")
    starts = []
    for _ in range(STARTS):
        server = make()
        try:
            starts.append(server.wait_ready() * 1000)
        finally:
            server.stop()
            if hasattr(server, "data"):
                shutil.rmtree(server.data, ignore_errors=True)
    server = make()
    try:
        server.wait_ready()
        time.sleep(1.0)
        idle = server.rss_mb()
        result = {"ready_ms": statistics.median(starts), "ready_ms_all": starts, "idle_rss_mb": idle}
        for path in ["/health", "/agent"]:
            sweep = []
            for connections in CONNECTIONS:
                seconds = HEADLINE_SECONDS if connections == HEADLINE else SWEEP_SECONDS
                log(f"{label}: {path} at {connections} connections, {seconds}s")
                point = wrk(server, path, connections, seconds)
                if connections == HEADLINE:
                    point["rss_mb"] = server.rss_mb()
                sweep.append(point)
            result[path.strip("/")] = sweep
        result["peak_rss_mb"] = server.rss_mb("VmHWM")
        return result
    finally:
        server.stop()
        if hasattr(server, "data"):
            shutil.rmtree(server.data, ignore_errors=True)


def headline(result, path):
    return next(p for p in result[path] if p["connections"] == HEADLINE)


def postgres_url():
    try:
        admin = subprocess.run([str(ROOT / "scripts" / "ensure-postgres")], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        log(f"no PostgreSQL ({error}); skipping the PostgreSQL figures")
        return None, None
    name = f"bench_{int(time.time())}"
    subprocess.run(["psql", admin, "-qc", f"create database {name}"], check=True)
    return admin, admin.rsplit("/", 1)[0] + "/" + name


def measure_postgres():
    admin, url = postgres_url()
    if not url:
        return None
    server = bulkhead(database_url=url)
    try:
        server.wait_ready()
        log(f"bulkhead on PostgreSQL: /agent at {HEADLINE} connections")
        return wrk(server, "/agent", HEADLINE, HEADLINE_SECONDS)
    finally:
        server.stop()
        subprocess.run(["psql", admin, "-qc", f"drop database if exists {url.rsplit('/', 1)[1]}"])


class TraceSink:
    """An OTLP/HTTP endpoint that takes span batches and drops them: what a
    collector costs the server is the export, not the collector."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def measure_front_door():
    """`/agent` with a key, limits counted, metrics and traces exported,
    beside the same server with all of it off; alternated, best of two."""
    sink = TraceSink()
    data = Path(tempfile.mkdtemp(prefix="bulkhead-bench-keys-"))
    database = f"sqlite://{data}/keys.db"
    made = subprocess.run(
        [str(BULKHEAD), "keys", "create", "--name", "bench", "--rpm", "100000000"],
        env={"PATH": os.environ["PATH"], "DATABASE_URL": database, "SECRETS_DIR": str(data / "none")},
        capture_output=True, text=True, check=True, cwd=data,
    )
    key = made.stdout.strip()
    keyed = {"Authorization": f"Bearer {key}"}
    variants = {
        "off": ({"AUTH_MODE": "none", "ENABLE_METRICS": "false"}, None),
        # The door without the trace export, to tell the two costs apart.
        "no_traces": ({"AUTH_MODE": "keys", "ENABLE_METRICS": "true"}, keyed),
        "on": ({"AUTH_MODE": "keys", "ENABLE_METRICS": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url},
               keyed),
    }
    runs = {name: [] for name in variants}
    try:
        for _ in range(2):
            for name, (extra, headers) in variants.items():
                server = bulkhead(database_url=database if headers else None, extra=extra)
                try:
                    server.wait_ready()
                    log(f"bulkhead, front door {name}: /agent at {HEADLINE} connections")
                    wrk(server, "/agent", HEADLINE, 2, headers)  # warm-up
                    runs[name].append(wrk(server, "/agent", HEADLINE, HEADLINE_SECONDS, headers))
                finally:
                    server.stop()
                    shutil.rmtree(server.data, ignore_errors=True)
    finally:
        sink.stop()
        shutil.rmtree(data, ignore_errors=True)
    best = {name: max(points, key=lambda p: p["rps"]) for name, points in runs.items()}
    cost = lambda name: 100.0 * (1 - best[name]["rps"] / max(best["off"]["rps"], 1e-9))
    best["cost_pct"] = cost("on")
    best["cost_without_traces_pct"] = cost("no_traces")
    return best


def measure_streams():
    log(f"bulkhead: {STREAM_RUNS} concurrent streaming runs, mock model latency 1 s")
    server = bulkhead(extra={"MOCK_MODEL_LATENCY_MS": "1000", "DATABASE_MAX_CONNECTIONS": "4"})
    try:
        server.wait_ready()
        peak = {"rss": 0.0}
        load = subprocess.Popen(
            ["taskset", "-c", LOAD_CPUS, str(STREAM_LOAD), server.base, str(STREAM_RUNS), "180"],
            stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile,
        )
        while load.poll() is None:
            peak["rss"] = max(peak["rss"], server.rss_mb())
            time.sleep(0.05)
        report = json.loads(load.stdout.read())
        report["peak_rss_mb"] = max(peak["rss"], server.rss_mb("VmHWM"))
        return report
    finally:
        server.stop()
        shutil.rmtree(server.data, ignore_errors=True)


def measure_sandboxes():
    log("sandbox latency per backend")
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        subprocess.run([str(SANDBOX_BENCH), str(BULKHEAD), str(out), "100"], check=True,
                       stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["results"]
    except (OSError, subprocess.CalledProcessError) as error:
        log(f"sandbox benchmark failed: {error}")
        return []
    finally:
        out.unlink(missing_ok=True)
    return rows


def docker_ok():
    return shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def measure_image():
    if not docker_ok():
        log("no Docker Engine: skipping the image figures")
        return None
    log("image: build, size, container start to healthy")
    subprocess.run(["docker", "build", "-q", "-t", "bulkhead:bench", str(ROOT)], check=True,
                   stdout=subprocess.DEVNULL)
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", "bulkhead:bench"],
                              capture_output=True, text=True, check=True).stdout)
    to_health, to_healthy = [], []
    for _ in range(3):
        name = f"bulkhead-bench-{os.getpid()}-{time.time_ns()}"
        port = free_port()
        started = time.perf_counter()
        subprocess.run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
                        "--tmpfs", "/data:uid=65532,gid=65532", "-e", "AGENT_MODE=development",
                        "bulkhead:bench"], check=True, stdout=subprocess.DEVNULL)
        try:
            answered = healthy = None
            while time.perf_counter() - started < 30 and (answered is None or healthy is None):
                now = time.perf_counter() - started
                if answered is None and get(f"http://127.0.0.1:{port}/health", 0.2) == 200:
                    answered = now
                if healthy is None:
                    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", name],
                                           capture_output=True, text=True).stdout.strip()
                    if state == "healthy":
                        healthy = now
                time.sleep(0.01)
            to_health.append((answered or 30) * 1000)
            to_healthy.append((healthy or 30) * 1000)
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    return {
        "size_mb": size / 1e6,
        "start_to_health_answer_ms": statistics.median(to_health),
        "start_to_healthy_status_ms": statistics.median(to_healthy),
    }


def verdict(value, target, lower_is_better=True):
    if value is None:
        return "not measured"
    ok = value <= target if lower_is_better else value >= target
    return "met" if ok else "**missed**"


def table(results):
    b, r = results["bulkhead"], results["fastapi"]
    b_agent, r_agent = headline(b, "agent"), headline(r, "agent")
    b_health, r_health = headline(b, "health"), headline(r, "health")
    rows = []

    def row(figure, bulk, ref, ratio, target, state):
        rows.append(f"| {figure} | {bulk} | {ref} | {ratio} | {target} | {state} |")

    rps_ratio = b_agent["rps"] / max(r_agent["rps"], 1e-9)
    p99_ratio = b_agent["p99_ms"] / max(r_agent["p99_ms"], 1e-9)
    row("`/agent` req/s (64 conn., SQLite)", f"{b_agent['rps']:,.0f}", f"{r_agent['rps']:,.0f}",
        f"{rps_ratio:.1f}×", "≥ 20×", verdict(rps_ratio, TARGETS["agent_rps_ratio"], False))
    row("`/agent` p50 / p99", f"{b_agent['p50_ms']:.2f} / {b_agent['p99_ms']:.2f} ms",
        f"{r_agent['p50_ms']:.2f} / {r_agent['p99_ms']:.2f} ms", f"p99 {p99_ratio:.2f}×", "p99 ≤ 0.1×",
        verdict(p99_ratio, TARGETS["agent_p99_ratio"]))
    row("`/agent` errors", b_agent["errors"], r_agent["errors"], "", "0",
        verdict(b_agent["errors"], 0))
    row("`/health` req/s (64 conn.)", f"{b_health['rps']:,.0f}", f"{r_health['rps']:,.0f}",
        f"{b_health['rps'] / max(r_health['rps'], 1e-9):.1f}×", "", "")
    row("`/health` p50 / p99", f"{b_health['p50_ms']:.2f} / {b_health['p99_ms']:.2f} ms",
        f"{r_health['p50_ms']:.2f} / {r_health['p99_ms']:.2f} ms", "", "", "")
    row("start to `/ready` (median)", f"{b['ready_ms']:.1f} ms", f"{r['ready_ms']:.0f} ms",
        f"{b['ready_ms'] / max(r['ready_ms'], 1e-9):.2f}×", "≤ 30 ms", verdict(b["ready_ms"], TARGETS["ready_ms"]))
    row("resident memory, idle", f"{b['idle_rss_mb']:.1f} MB", f"{r['idle_rss_mb']:.1f} MB",
        f"{b['idle_rss_mb'] / max(r['idle_rss_mb'], 1e-9):.2f}×", "≤ 15 MB",
        verdict(b["idle_rss_mb"], TARGETS["idle_rss_mb"]))
    row("resident memory, `/agent` load (peak)", f"{b['peak_rss_mb']:.1f} MB", f"{r['peak_rss_mb']:.1f} MB",
        "", "", "")
    lg = results.get("langgraph")
    if lg:
        for phase, call in (("wait", "runs.wait"), ("stream", "runs.stream")):
            b_lg = langgraph_point(lg, "bulkhead", phase, LANGGRAPH_HEADLINE)
            g_lg = langgraph_point(lg, "langgraph", phase, LANGGRAPH_HEADLINE)
            if b_lg and g_lg:
                row(f"LangGraph SDK: thread + `{call}`, {LANGGRAPH_HEADLINE} workers: runs/s, p50 / p99",
                    f"{b_lg['rps']:,.0f}, {b_lg['p50_ms']:.1f} / {b_lg['p99_ms']:.1f} ms", "",
                    f"LangGraph in-memory: {g_lg['rps']:,.0f}, {g_lg['p50_ms']:.0f} / {g_lg['p99_ms']:.0f} ms "
                    f"({b_lg['rps'] / max(g_lg['rps'], 1e-9):.1f}×)", "", f"{b_lg['errors']} errors")
        row("resident memory, LangGraph SDK load (peak, process tree)",
            f"{max(p['peak_rss_mb'] for p in lg['bulkhead']):.1f} MB", "",
            f"LangGraph in-memory: {max(p['peak_rss_mb'] for p in lg['langgraph']):.1f} MB", "", "")
    pg = results.get("postgres")
    if pg:
        row("`/agent` on PostgreSQL req/s, p50 / p99", f"{pg['rps']:,.0f}, {pg['p50_ms']:.2f} / {pg['p99_ms']:.2f} ms",
            "", "", "", f"{pg['errors']} errors")
    door = results.get("front_door")
    if door:
        row("`/agent` with key, limits, metrics, traces: req/s, p99",
            f"{door['on']['rps']:,.0f}, {door['on']['p99_ms']:.2f} ms",
            "", f"off: {door['off']['rps']:,.0f}, {door['off']['p99_ms']:.2f} ms",
            "cost < 5 %", f"cost {door['cost_pct']:.1f} % "
            + verdict(door["cost_pct"], TARGETS["front_door_cost_pct"])
            + f" (without traces: {door['cost_without_traces_pct']:.1f} %)")
    facade = results.get("openai")
    if facade:
        for connections, best in facade.items():
            target = "p50 ≤ 1 ms, p99 ≤ 5 ms added" if connections == "1" else ""
            state = (verdict(best["added_p50_ms"], TARGETS["openai_added_p50_ms"]) + " / "
                     + verdict(best["added_p99_ms"], TARGETS["openai_added_p99_ms"])) if connections == "1" else ""
            row(f"`/v1/chat/completions` through an agent vs straight to the model ({connections} conn.)",
                f"{best['bulkhead']['rps']:,.0f} req/s, {best['bulkhead']['p50_ms']:.2f} / {best['bulkhead']['p99_ms']:.2f} ms",
                "", f"model alone: {best['direct']['rps']:,.0f} req/s, {best['direct']['p50_ms']:.2f} / "
                f"{best['direct']['p99_ms']:.2f} ms; added {best['added_p50_ms']:+.2f} / {best['added_p99_ms']:+.2f} ms",
                target, state)
    streams = results.get("streams")
    if streams:
        row(f"{streams['runs']:,} concurrent streaming runs (1 s model)",
            f"{streams['completed']:,} done, {streams['errors']} errors, {streams['wall_ms'] / 1000:.1f} s",
            "", "", "all, 0 errors", verdict(streams["errors"], 0))
        row("resident memory, streaming runs (peak)", f"{streams['peak_rss_mb']:.0f} MB", "", "", "≤ 300 MB",
            verdict(streams["peak_rss_mb"], TARGETS["stream_rss_mb"]))
    for item in results.get("sandboxes", []):
        target, key = "", None
        if item["backend"] == "namespace" and item["operation"].startswith("true"):
            target, key = "p50 ≤ 10 ms", "sandbox_namespace_p50_ms"
        elif item["backend"] == "docker" and item["operation"].startswith("true"):
            target, key = "p50 ≤ 60 ms", "sandbox_docker_warm_p50_ms"
        elif item["backend"] == "docker" and "cold" in item["operation"]:
            target, key = "≤ 400 ms", "sandbox_docker_cold_ms"
        row(f"sandbox {item['backend']}: {item['operation']}",
            f"p50 {item['p50_ms']:.1f} / p99 {item['p99_ms']:.1f} ms", "", "", target,
            verdict(item["p50_ms"], TARGETS[key]) if key else "")
    image = results.get("image")
    if image:
        row("image size", f"{image['size_mb']:.1f} MB", "", "", "≤ 15 MB", verdict(image["size_mb"], TARGETS["image_mb"]))
        row("container start to `/health` answering", f"{image['start_to_health_answer_ms']:.0f} ms", "", "", "", "")
        row("container start to `healthy`", f"{image['start_to_healthy_status_ms']:.0f} ms", "", "", "≤ 1 s",
            verdict(image["start_to_healthy_status_ms"], TARGETS["container_healthy_ms"]))
    head = [
        f"Run {results['commit']} at {results['time']} on {results['cores']} cores "
        f"(servers on CPU {SERVER_CPUS}, load on CPU {LOAD_CPUS}).",
        "",
        "| figure | Bulkhead | FastAPI reference | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def plots(results, stem):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return []
    written = []
    for path in ["agent", "health"]:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name, style, color in [("bulkhead", "o-", "tab:blue"), ("fastapi", "s--", "tab:orange")]:
            sweep = results[name][path]
            x = [p["connections"] for p in sweep]
            left.plot(x, [p["rps"] for p in sweep], style, color=color, label=name)
            right.plot(x, [p["p99_ms"] for p in sweep], style, color=color, label=f"{name} p99")
            right.plot(x, [p["p50_ms"] for p in sweep], style, color=color, alpha=0.4, label=f"{name} p50")
        for axis, label in [(left, "requests per second"), (right, "latency (ms)")]:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("connections")
            axis.set_ylabel(label)
            axis.grid(True, alpha=0.3)
            axis.legend()
        right.set_yscale("log")
        figure.suptitle(f"/{path}: Bulkhead vs FastAPI reference ({results['commit']}, {results['cores']} cores)")
        figure.tight_layout()
        out = RESULTS / f"{stem}-{path}.png"
        figure.savefig(out, dpi=100)
        plt.close(figure)
        written.append(str(out.relative_to(ROOT)))
    return written


CHAT_REQUEST = {"model": "default", "messages": [{"role": "user", "content": "hello"}]}


class MockModel(Server):
    """`bulkhead mock-model`, the model both sides of the comparison call."""

    def __init__(self):
        port = free_port()
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        super().__init__("mock-model", [str(BULKHEAD), "mock-model", "--port", str(port)], env, port)

    def wait_ready(self, timeout=30.0):
        deadline = time.perf_counter() + timeout
        while get(self.base + "/health", timeout=0.5) != 200:
            if time.perf_counter() > deadline or self.process.poll() is not None:
                raise RuntimeError("the mock model did not start")
            time.sleep(0.01)


def measure_openai():
    """What the OpenAI facade adds: the same chat request sent straight to
    the mock model server, and through a Bulkhead agent whose model is that
    server (the run recorded in SQLite, as every run is). One run, side by
    side, at 1 connection (latency) and 64 (throughput), best of two."""
    mock = MockModel()
    server = None
    try:
        mock.wait_ready()
        server = bulkhead(extra={"MODEL_ENDPOINT": f"{mock.base}/v1", "MODEL_MAX_RETRIES": "0"})
        server.wait_ready()
        result = {}
        for connections in (1, HEADLINE):
            points = {"direct": [], "bulkhead": []}
            for _ in range(2):
                for name, target in (("direct", mock), ("bulkhead", server)):
                    log(f"openai: chat completion {name} at {connections} connections")
                    wrk(target, "/v1/chat/completions", connections, 2, body=CHAT_REQUEST)  # warm-up
                    points[name].append(wrk(target, "/v1/chat/completions", connections,
                                            HEADLINE_SECONDS, body=CHAT_REQUEST))
            best = {name: min(p, key=lambda point: point["p50_ms"]) for name, p in points.items()}
            best["added_p50_ms"] = best["bulkhead"]["p50_ms"] - best["direct"]["p50_ms"]
            best["added_p99_ms"] = best["bulkhead"]["p99_ms"] - best["direct"]["p99_ms"]
            result[str(connections)] = best
        return result
    finally:
        if server:
            server.stop()
            shutil.rmtree(server.data, ignore_errors=True)
        mock.stop()


def openai_rows(facade):
    lines = ["| `POST /v1/chat/completions` | conn. | req/s | p50 | p99 |", "|---|---|---|---|---|"]
    for connections, best in facade.items():
        for name, label in (("direct", "straight to the mock model"), ("bulkhead", "through a Bulkhead agent")):
            point = best[name]
            lines.append(f"| {label} | {connections} | {point['rps']:,.0f} | {point['p50_ms']:.2f} ms "
                         f"| {point['p99_ms']:.2f} ms |")
        lines.append(f"| added by Bulkhead | {connections} | | {best['added_p50_ms']:+.2f} ms "
                     f"| {best['added_p99_ms']:+.2f} ms |")
    one = facade["1"]
    lines.append("")
    lines.append(f"added at 1 connection: p50 {one['added_p50_ms']:.2f} ms (target ≤ "
                 f"{TARGETS['openai_added_p50_ms']:.0f} ms: "
                 f"{verdict(one['added_p50_ms'], TARGETS['openai_added_p50_ms'])}), p99 "
                 f"{one['added_p99_ms']:.2f} ms (target ≤ {TARGETS['openai_added_p99_ms']:.0f} ms: "
                 f"{verdict(one['added_p99_ms'], TARGETS['openai_added_p99_ms'])})")
    return "\n".join(lines)


def openai_only():
    """`bench/run --openai`: only the facade's overhead."""
    print(openai_rows(measure_openai()))


def front_door_only():
    """`bench/run --front-door`: only the front door's cost, for a quick
    look; the full run has it too."""
    door = measure_front_door()
    print(f"| `/agent`, 64 conn. | req/s | p50 | p99 |\n|---|---|---|---|")
    labels = {"off": "all off", "no_traces": "key, limits, metrics", "on": "key, limits, metrics, traces"}
    for name in ["off", "no_traces", "on"]:
        point = door[name]
        print(f"| {labels[name]} | {point['rps']:,.0f} | {point['p50_ms']:.2f} ms | {point['p99_ms']:.2f} ms |")
    print(f"\ncost of keys, limits, metrics and traces: {door['cost_pct']:.1f} % of req/s "
          f"(target < {TARGETS['front_door_cost_pct']:.0f} %: "
          f"{verdict(door['cost_pct'], TARGETS['front_door_cost_pct'])}); "
          f"without exporting traces: {door['cost_without_traces_pct']:.1f} %")


# --- The LangGraph Agent Server API, Bulkhead's and LangGraph's own -------

def tree_pids(pid):
    """The process and all its descendants."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children.get(current, []))
    return pids


def tree_rss_mb(pid):
    """Resident memory of the process tree: the sum of each process's RSS."""
    return sum(rss_kb(p) for p in tree_pids(pid)) / 1024


def tree_cpu_s(pid):
    """CPU time (user + system) the process tree has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class LangGraphServer(Server):
    """LangGraph's own Agent Server in its in-memory mode, as its docs start
    it for local use: `langgraph dev` (langgraph-cli[inmem]), in a fresh
    project folder holding the echo graph and its langgraph.json, with no
    browser, no hot reload (a file watcher and a process that is not the
    server's), and nothing sent out: no LangSmith tracing, no CLI analytics,
    no version check. It keeps its state in memory and flushes it to
    `.langgraph_api/` in that folder every 10 s, as `langgraph dev` does."""

    ready_path = "/ok"

    def __init__(self):
        port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="langgraph-bench-"))
        for name in ("echo_graph.py", "langgraph.json"):
            shutil.copy(LANGGRAPH_DIR / name, self.data / name)
        env = {
            "PATH": f"{LANGGRAPH_VENV}/bin:" + os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "LANGSMITH_TRACING": "false",
            "LANGCHAIN_TRACING_V2": "false",
            # langgraph_cli.analytics: no anonymous usage report per command.
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            # langgraph_api.cli: no PyPI query for a newer langgraph-api.
            "LANGGRAPH_NO_VERSION_CHECK": "true",
        }
        argv = [str(LANGGRAPH_VENV / "bin" / "langgraph"), "dev", "--no-browser", "--no-reload",
                "--host", "127.0.0.1", "--port", str(port)]
        super().__init__("langgraph", argv, env, port, cwd=self.data, log=self.data / "server.log")


def langgraph_sides():
    """The two servers of the comparison: how to start each, and the
    assistant the workload names (Bulkhead's only agent is `default`; the
    echo graph is `agent` in its langgraph.json)."""
    return {
        "bulkhead": (lambda: bulkhead(extra={"AUTH_MODE": "none"}), "default"),
        "langgraph": (LangGraphServer, "agent"),
    }


def langgraph_workload(server, assistant, phase, concurrency):
    """One point: bench/langgraph/workload.py on the load cores against a
    server, sampling the server tree's memory meanwhile."""
    import threading

    argv = ["taskset", "-c", LOAD_CPUS, str(LANGGRAPH_VENV / "bin" / "python"),
            str(LANGGRAPH_DIR / "workload.py"), "--url", server.base, "--assistant", assistant,
            "--phases", phase, "--concurrency", str(concurrency),
            "--seconds", str(LANGGRAPH_SECONDS), "--warmup", "2"]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    pid = server.process.pid
    peak, done = [tree_rss_mb(pid)], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_before = tree_cpu_s(pid)
    try:
        output = subprocess.run(argv, env=env, capture_output=True, text=True,
                                timeout=LANGGRAPH_SECONDS + 180, preexec_fn=raise_nofile)
    finally:
        done.set()
        sampler.join()
    server_cpu = tree_cpu_s(pid) - cpu_before
    if output.returncode != 0:
        raise RuntimeError(f"workload against {server.name} failed: {output.stderr[-2000:]}")
    point = json.loads(output.stdout)["phases"][phase]
    point["rss_after_mb"] = tree_rss_mb(pid)
    point["peak_rss_mb"] = max(peak[0], point["rss_after_mb"])
    point["server_cpu_s"] = server_cpu
    # Server CPU per iteration, over all the iterations that ended (warm-up
    # included, as in the CPU time): comparable even where the load
    # generator, not the server, is the limit.
    point["server_cpu_ms_per_run"] = 1000 * server_cpu / max(point["completed_with_warmup"], 1)
    return point


def measure_langgraph():
    """The same langgraph-sdk workload against Bulkhead (its LangGraph API,
    the in-process mock model, SQLite) and LangGraph's in-memory server
    (the echo graph): per phase (`runs.wait`, `runs.stream`) and number of
    concurrent workers, a fresh server of each, one after the other."""
    sides = langgraph_sides()
    result = {"seconds_per_point": LANGGRAPH_SECONDS, "concurrency": LANGGRAPH_CONCURRENCY,
              **{name: [] for name in sides}}
    for phase in ("wait", "stream"):
        for concurrency in LANGGRAPH_CONCURRENCY:
            for name, (make, assistant) in sides.items():
                server = make()
                try:
                    ready = server.wait_ready(timeout=120)
                    time.sleep(1.0)
                    idle = tree_rss_mb(server.process.pid)
                    log(f"langgraph API: {name}, runs.{phase}, {concurrency} workers, {LANGGRAPH_SECONDS:g}s")
                    point = langgraph_workload(server, assistant, phase, concurrency)
                    point.update(phase=phase, ready_ms=ready * 1000, idle_rss_mb=idle)
                    result[name].append(point)
                finally:
                    server.stop()
                    shutil.rmtree(server.data, ignore_errors=True)
    return result


def langgraph_point(result, name, phase, concurrency):
    return next((p for p in result[name] if p["phase"] == phase and p["concurrency"] == concurrency), None)


def langgraph_rows(result):
    """The side-by-side table of `bench/run --langgraph`."""
    ms = lambda v: "–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")
    lines = [
        "| SDK call | workers | Bulkhead runs/s | Bulkhead p50 / p99 | LangGraph runs/s | LangGraph p50 / p99 "
        "| runs/s ratio | errors (B / LG) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    calls = {"wait": "`threads.create` + `runs.wait`", "stream": "`threads.create` + `runs.stream` (values)"}
    for phase in ("wait", "stream"):
        for concurrency in result["concurrency"]:
            b = langgraph_point(result, "bulkhead", phase, concurrency)
            g = langgraph_point(result, "langgraph", phase, concurrency)
            if not b or not g:
                continue
            lines.append(
                f"| {calls[phase]} | {concurrency} | {b['rps']:,.1f} | {ms(b['p50_ms'])} / {ms(b['p99_ms'])} ms "
                f"| {g['rps']:,.1f} | {ms(g['p50_ms'])} / {ms(g['p99_ms'])} ms "
                f"| {b['rps'] / max(g['rps'], 1e-9):,.1f}× | {b['errors']} / {g['errors']} |")
    lines += ["", "| | Bulkhead | LangGraph (in-memory) |", "|---|---|---|"]
    both = {name: result[name] for name in ("bulkhead", "langgraph")}
    pick = lambda name, key, f: f(p[key] for p in both[name])
    lines.append(f"| start to ready (median) | {ms(statistics.median(p['ready_ms'] for p in both['bulkhead']))} ms "
                 f"| {ms(statistics.median(p['ready_ms'] for p in both['langgraph']))} ms |")
    lines.append(f"| resident memory, idle (process tree, 1 s after ready, largest) "
                 f"| {pick('bulkhead', 'idle_rss_mb', max):.1f} MB | {pick('langgraph', 'idle_rss_mb', max):.1f} MB |")
    lines.append(f"| resident memory after the load (largest over the points) "
                 f"| {pick('bulkhead', 'rss_after_mb', max):.1f} MB | {pick('langgraph', 'rss_after_mb', max):.1f} MB |")
    lines.append(f"| resident memory, peak during the load "
                 f"| {pick('bulkhead', 'peak_rss_mb', max):.1f} MB | {pick('langgraph', 'peak_rss_mb', max):.1f} MB |")
    for phase in ("wait", "stream"):
        b = langgraph_point(result, "bulkhead", phase, LANGGRAPH_HEADLINE)
        g = langgraph_point(result, "langgraph", phase, LANGGRAPH_HEADLINE)
        if b and g:
            lines.append(f"| server CPU per iteration, {phase}, {LANGGRAPH_HEADLINE} workers "
                         f"| {b['server_cpu_ms_per_run']:.2f} ms | {g['server_cpu_ms_per_run']:.2f} ms |")
            lines.append(f"| load generator's CPU, {phase}, {LANGGRAPH_HEADLINE} workers (share of its core) "
                         f"| {100 * b['client_cpu_share']:.0f} % | {100 * g['client_cpu_share']:.0f} % |")
    return "\n".join(lines)


def langgraph_only():
    """`bench/run --langgraph`: only the LangGraph API comparison."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    started = time.time()
    result = measure_langgraph()
    result.update(commit=commit, time=stamp, cores=os.cpu_count(), server_cpus=SERVER_CPUS,
                  load_cpus=LOAD_CPUS, seconds=round(time.time() - started))
    stem = f"langgraph-{commit}-{stamp}"
    markdown = (f"Run {commit} at {stamp} on {result['cores']} cores (servers on CPU {SERVER_CPUS}, "
                f"the SDK workload on CPU {LOAD_CPUS}), {LANGGRAPH_SECONDS:g} s per point after a 2 s "
                f"warm-up, in {result['seconds']} s.\n\n" + langgraph_rows(result) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)
    log(f"written: bench/results/{stem}.json and .md")


def main():
    if "--front-door" in sys.argv[1:]:
        raise_nofile()
        front_door_only()
        return
    if "--openai" in sys.argv[1:]:
        raise_nofile()
        openai_only()
        return
    if "--langgraph" in sys.argv[1:]:
        raise_nofile()
        langgraph_only()
        return
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = {
        "commit": commit,
        "time": stamp,
        "cores": os.cpu_count(),
        "server_cpus": SERVER_CPUS,
        "load_cpus": LOAD_CPUS,
        "targets": TARGETS,
    }
    started = time.time()
    results["fastapi"] = measure_service(reference, "fastapi")
    results["bulkhead"] = measure_service(bulkhead, "bulkhead")
    results["front_door"] = measure_front_door()
    results["openai"] = measure_openai()
    results["langgraph"] = measure_langgraph()
    results["postgres"] = measure_postgres()
    results["streams"] = measure_streams()
    results["sandboxes"] = measure_sandboxes()
    results["image"] = measure_image()
    results["seconds"] = round(time.time() - started)
    stem = f"run-{commit}-{stamp}"
    results["plots"] = plots(results, stem)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    markdown = table(results)
    if results.get("langgraph"):
        markdown += "\nThe LangGraph Agent Server API, the same langgraph-sdk workload:\n\n"
        markdown += langgraph_rows(results["langgraph"]) + "\n"
    (RESULTS / f"{stem}.md").write_text(markdown)
    (RESULTS / "latest.md").write_text(markdown)
    print(markdown)
    log(f"written: bench/results/{stem}.json, .md and {len(results['plots'])} plots in {results['seconds']} s")


if __name__ == "__main__":
    main()
