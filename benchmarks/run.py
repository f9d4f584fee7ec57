"""The proxy benchmark (issue 6): the same load three ways in one run — straight to a fast
upstream, through nginx as a reverse proxy, and through vllm-chill — and a table of figures
and ratios.

    python benchmarks/run.py            # about 3 minutes: 3 interleaved rounds, medians
    python benchmarks/run.py --quick    # about a minute: one round, noisier
    python benchmarks/run.py --write-doc docs/performance.md --json results.json
    python benchmarks/run.py --variants native,aiohttp,httpx   # compare upstream clients

It installs nothing. It needs Debian's `nginx`, `wrk` and `gcc` (see `APT_LINE`), and the
project's virtual environment (uvicorn with uvloop and httptools). Everything listens
on 127.0.0.1 only; every process it starts is stopped when it ends.

What runs where (a machine with 2 or more CPUs): the server under test (nginx's one worker,
vllm-chill's one process, or for "direct" a second copy of the upstream) is pinned to CPU 1;
wrk, the Python clients and the upstream behind the proxies to CPU 0 (or the upstream to CPU 2
when there is one). CPU time is read from /proc/<pid>/stat (user + system, the process and its
children) before and after each run: CPU per request and per event stays meaningful on a busy
or shared machine, where throughput does not.

The upstream (`upstream.c`, built here with gcc) answers a fixed chat completion, or when the
body says `"stream": true`, 100 server-sent events, each its own send() and HTTP chunk, back
to back ("burst") or paced by the `X-Bench-Gap-Us` header ("paced": each event reaches the
proxy on its own, as tokens from vLLM do).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / ".build"
APT_LINE = "sudo apt-get update && sudo apt-get install -y nginx wrk gcc libc6-dev"
MODEL = "bench-model"
PATH = "/v1/chat/completions"
EVENTS = 100
PACED_GAP_US = 2000  # 64 streams x one event per 2 ms = 32,000 events/s offered
#: Time to first event: short streams with the events 2 ms apart, one at a time, so that the
#: first event is not measured behind a burst of the next 99 on a busy CPU.
TTFE_EVENTS = 5
TTFE_GAP_US = 2000
SLOW_GAP_US = 1_000_000  # the 1,000 held streams get one event a second
CLK_TCK = os.sysconf("SC_CLK_TCK")

VARIANTS = ("native", "aiohttp", "httpx")

MARK_START = "<!-- benchmark-results:start (written by benchmarks/run.py) -->"
MARK_END = "<!-- benchmark-results:end -->"


# --- processes -----------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """`nginx` lives in /usr/sbin, which is not on every user's PATH."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def check_tools() -> dict[str, str]:
    tools = {name: find_tool(name) for name in ("nginx", "wrk", "gcc")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        sys.exit(
            f"benchmarks/run.py needs {', '.join(missing)} (not found).\n"
            f"On Debian or Ubuntu:\n    {APT_LINE}\n"
            "(the benchmark starts its own nginx on a loopback port; the system service that "
            "the package starts is not used.)"
        )
    for module in ("uvicorn", "uvloop", "httptools", "aiohttp", "httpx"):
        try:
            importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            sys.exit(
                f"Python module {module!r} is missing: run this with the project's virtual "
                "environment (pip install -e '.[test]')."
            )
    return {name: path for name, path in tools.items() if path is not None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Cpus:
    """Where each party runs; empty lists mean no pinning."""

    server: list[int]
    client: list[int]
    upstream: list[int]
    note: str

    @classmethod
    def plan(cls, pin: bool) -> Cpus:
        available = sorted(os.sched_getaffinity(0))
        if not pin or len(available) < 2 or shutil.which("taskset") is None:
            return cls([], [], [], "not pinned (one CPU, no taskset, or --no-pin)")
        server, client = [available[1]], [available[0]]
        upstream = [available[2]] if len(available) > 2 else client
        note = f"server under test on CPU {server[0]}, load generator on CPU {client[0]}"
        note += f", upstream on CPU {upstream[0]}"
        return cls(server, client, upstream, note)


def pinned(cpus: list[int], argv: list[str]) -> list[str]:
    if not cpus:
        return argv
    return ["taskset", "-c", ",".join(map(str, cpus)), *argv]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 20000 if hard == resource.RLIM_INFINITY else min(hard, 20000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Processes:
    """Every child this run starts, stopped (by its own pid) on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.children.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.children):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until `url` answers 200; the run ends (its logs printed) if the server exits or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server of {url} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{url} did not answer within {timeout:.0f}s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx: master and worker)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree.extend(frontier)
    return tree


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            total += int(match.group(1)) if match else 0
    return total / 1024


# --- the servers ---------------------------------------------------------------------------


def build_upstream(gcc: str) -> Path:
    BUILD.mkdir(exist_ok=True)
    binary = BUILD / "upstream"
    source = HERE / "upstream.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run([gcc, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    upstream model {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)
    results: dict[str, float] = field(default_factory=dict)


def start_targets(
    procs: Processes,
    tmp: Path,
    tools: dict[str, str],
    cpus: Cpus,
    variants: list[str],
    baseline: Path | None,
) -> list[Target]:
    upstream_bin = build_upstream(tools["gcc"])
    up_port, direct_port, nginx_port = free_port(), free_port(), free_port()
    upstream = procs.start("upstream", pinned(cpus.upstream, [str(upstream_bin), str(up_port)]))
    wait_http(f"http://127.0.0.1:{up_port}/health", upstream)

    direct = procs.start(
        "upstream-direct", pinned(cpus.server, [str(upstream_bin), str(direct_port)])
    )
    targets = [Target("direct", f"http://127.0.0.1:{direct_port}", direct)]

    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port, upstream_port=up_port))
    nginx_argv = [tools["nginx"], "-p", str(tmp), "-e", str(tmp / "nginx-start.log")]
    nginx = procs.start("nginx", pinned(cpus.server, [*nginx_argv, "-c", str(conf)]))
    targets.append(Target("nginx", f"http://127.0.0.1:{nginx_port}", nginx))

    chills = [("vllm-chill" if v == "native" else f"vllm-chill ({v})", v, ROOT) for v in variants]
    if baseline is not None:
        chills.append((f"vllm-chill ({baseline.name})", "native", baseline))
    for name, variant, tree in chills:
        port = free_port()
        argv = [
            *(sys.executable, str(HERE / "chill_server.py"), "--port", str(port)),
            *("--upstream", f"http://127.0.0.1:{up_port}", "--model", MODEL),
            *("--client", variant, "--tree", str(tree)),
        ]
        log_name = "chill-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        proc = procs.start(log_name, pinned(cpus.server, argv))
        targets.append(Target(name, f"http://127.0.0.1:{port}", proc))

    for target in targets:
        wait_http(target.url + "/health", target.proc)
        target.pids = process_tree(target.proc.pid)
        if target.name == "nginx":  # nginx's master is a child of taskset's exec: same pid
            time.sleep(0.2)
            target.pids = process_tree(target.proc.pid)
    return targets


# --- the measurements ----------------------------------------------------------------------


def run_wrk(
    wrk: str,
    cpus: Cpus,
    target: Target,
    *,
    connections: int,
    seconds: float,
    stream: bool,
    gap_us: int = 0,
) -> dict[str, float]:
    env = {
        **os.environ,
        "BENCH_STREAM": "1" if stream else "0",
        "BENCH_GAP_US": str(gap_us),
        "BENCH_EVENTS": str(EVENTS),
        "BENCH_MODEL": MODEL,
    }
    argv = pinned(
        cpus.client,
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "wrk.lua"),
            target.url + PATH,
        ],
    )
    cpu_before = cpu_seconds(target.pids)
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    cpu = cpu_seconds(target.pids) - cpu_before
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"wrk failed against {target.name}:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    duration = raw["duration_us"] / 1e6
    requests = raw["requests"]
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors"))
    return {
        "requests": requests,
        "errors": errors + raw["timeouts"],
        "rps": requests / duration,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "cpu_s": cpu,
        "cpu_util": cpu / duration,
        "cpu_per_req_us": cpu / max(requests, 1) * 1e6,
        "events_per_s": requests * EVENTS / duration,
        "cpu_per_event_us": cpu / max(requests * EVENTS, 1) * 1e6,
    }


def run_client(cpus: Cpus, args: list[str], timeout: float) -> dict[str, float]:
    argv = pinned(cpus.client, [sys.executable, str(HERE / "clients.py"), *args])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        sys.exit(f"client failed: {' '.join(args)}\n{out.stdout}\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def hold_streams(cpus: Cpus, target: Target, streams: int) -> dict[str, float]:
    """RSS of the server while it relays `streams` slow streams at once."""
    argv = pinned(
        cpus.client,
        [
            sys.executable,
            str(HERE / "clients.py"),
            "hold",
            target.url + PATH,
            "--streams",
            str(streams),
            "--gap-us",
            str(SLOW_GAP_US),
            "--events",
            "120",
            "--hold-timeout",
            "60",
        ],
    )
    client = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        ready = client.stdout.readline().split()
        if len(ready) != 3 or ready[0] != "READY":
            sys.exit(f"hold client failed against {target.name}: {ready} {client.stderr}")
        peak = 0.0
        cpu_before = cpu_seconds(target.pids)
        for _ in range(6):  # a few samples over ~3 s of one event per second per stream
            peak = max(peak, rss_mb(target.pids))
            time.sleep(0.5)
        cpu = cpu_seconds(target.pids) - cpu_before
        client.stdin.write("close\n")
        client.stdin.flush()
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return {
        "held_ok": float(ready[1]),
        "held_failed": float(ready[2]),
        "rss_held_mb": peak,
        "held_cpu_util": cpu / 3.0,
    }


SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("ns1", {"connections": 1, "stream": False}),
    ("ns64", {"connections": 64, "stream": False}),
    ("burst", {"connections": 64, "stream": True}),
    ("paced", {"connections": 64, "stream": True, "gap_us": PACED_GAP_US}),
]


def measure(targets: list[Target], tools: dict[str, str], cpus: Cpus, args: Any) -> None:
    """Every figure for every target, interleaved (all targets see the same moment of a busy
    machine) and repeated `args.repeat` times; the median of the repeats is kept."""
    wrk = tools["wrk"]
    for target in targets:  # idle: started, one request served
        target.results["rss_idle_mb"] = rss_mb(target.pids)
    print(f"warming up ({len(targets)} targets)...", flush=True)
    for target in targets:
        run_wrk(wrk, cpus, target, connections=64, seconds=1, stream=False)
        run_wrk(wrk, cpus, target, connections=64, seconds=1, stream=True)

    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    firsts: dict[str, list[float]] = {t.name: [] for t in targets}
    for round_ in range(args.repeat):
        print(f"round {round_ + 1} of {args.repeat}", flush=True)
        for key, kw in SCENARIOS:
            for target in targets:
                print(f"  {key:6} {target.name}", flush=True)
                found = run_wrk(wrk, cpus, target, seconds=args.seconds, **kw)
                runs.setdefault((target.name, key), []).append(found)
        for target in targets:
            print(f"  ttfe   {target.name}", flush=True)
            found = run_client(
                cpus,
                [
                    *("ttfe", target.url + PATH, "--requests", str(args.ttfe_requests)),
                    *("--events", str(TTFE_EVENTS), "--gap-us", str(TTFE_GAP_US)),
                ],
                120,
            )
            firsts[target.name].extend(found["samples_us"])
    for target in targets:
        for key, _ in SCENARIOS:
            found_runs = runs[(target.name, key)]
            for name in found_runs[0]:
                target.results[f"{key}_{name}"] = statistics.median(r[name] for r in found_runs)
        samples = sorted(firsts[target.name])
        target.results["ttfe_p50_us"] = statistics.median(samples)
        target.results["ttfe_p99_us"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))]

    for target in targets:
        print(f"  hold   {target.name}", flush=True)
        target.results.update(hold_streams(cpus, target, 1000))


# --- the report ----------------------------------------------------------------------------


ROWS: list[tuple[str, str, str, str]] = [
    # key, label, format, better ("hi"/"lo")
    ("ns1_rps", "non-streaming, 1 connection: requests/s", "{:,.0f}", "hi"),
    ("ns1_p50_ms", "non-streaming, 1 connection: p50 latency (ms)", "{:.3f}", "lo"),
    ("ns1_p99_ms", "non-streaming, 1 connection: p99 latency (ms)", "{:.3f}", "lo"),
    ("ns1_cpu_per_req_us", "non-streaming, 1 connection: CPU per request (µs)", "{:.1f}", "lo"),
    ("ns64_rps", "non-streaming, 64 connections: requests/s", "{:,.0f}", "hi"),
    ("ns64_p50_ms", "non-streaming, 64 connections: p50 latency (ms)", "{:.2f}", "lo"),
    ("ns64_p99_ms", "non-streaming, 64 connections: p99 latency (ms)", "{:.2f}", "lo"),
    ("ns64_cpu_per_req_us", "non-streaming, 64 connections: CPU per request (µs)", "{:.1f}", "lo"),
    ("ns64_cpu_util", "non-streaming, 64 connections: CPU used (cores)", "{:.2f}", "lo"),
    ("burst_events_per_s", "SSE burst, 64 streams: events/s", "{:,.0f}", "hi"),
    ("burst_cpu_per_event_us", "SSE burst, 64 streams: CPU per event (µs)", "{:.2f}", "lo"),
    ("paced_events_per_s", "SSE paced (2 ms apart), 64 streams: events/s", "{:,.0f}", "hi"),
    ("paced_cpu_per_event_us", "SSE paced, 64 streams: CPU per event (µs)", "{:.2f}", "lo"),
    ("paced_cpu_util", "SSE paced, 64 streams: CPU used (cores)", "{:.2f}", "lo"),
    ("ttfe_p50_us", "time to first event, 1 connection: median (ms)", "ms", "lo"),
    ("ttfe_p99_us", "time to first event, 1 connection: p99 (ms)", "ms", "lo"),
    ("rss_idle_mb", "RSS idle (MB)", "{:.1f}", "lo"),
    ("rss_held_mb", "RSS holding 1,000 slow streams (MB)", "{:.1f}", "lo"),
]


def fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "—"
    if spec == "ms":
        return f"{value / 1000:.3f}"
    return spec.format(value)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}\N{MULTIPLICATION SIGN}"


def render_table(targets: list[Target]) -> str:
    """Every figure of every target, and vllm-chill's (this tree's, own client) as ratios."""
    by_name = {t.name: t.results for t in targets}
    chill = by_name["vllm-chill"]
    header = [
        "figure",
        *(t.name for t in targets),
        "vllm-chill \N{DIVISION SIGN} nginx",
        "vllm-chill \N{DIVISION SIGN} direct",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, spec, _ in ROWS:
        cells = [label, *(fmt(t.results.get(key), spec) for t in targets)]
        cells.append(ratio(chill.get(key), by_name["nginx"].get(key)))
        cells.append(ratio(chill.get(key), by_name["direct"].get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_targets(targets: list[Target]) -> str:
    """The issue's targets against the figures of this run."""
    by_name = {t.name: t.results for t in targets}
    nginx, direct = by_name["nginx"], by_name["direct"]
    chill = by_name["vllm-chill"]
    checks = [
        ("CPU per non-streaming request (64 conn.)", "ns64_cpu_per_req_us", "µs", 400, None),
        ("CPU per streamed event (paced)", "paced_cpu_per_event_us", "µs", 50, None),
        ("CPU per streamed event (burst)", "burst_cpu_per_event_us", "µs", 50, None),
        ("p99 latency added over nginx, 1 conn.", "ns1_p99_ms", "ms", 1.0, nginx),
        ("time to first event added over direct, median", "ttfe_p50_us", "ms", 1.0, direct),
        ("RSS holding 1,000 slow streams", "rss_held_mb", "MB", 100, None),
    ]
    lines = [
        "| figure | nginx | vllm-chill | target | met |",
        "|---|---|---|---|---|",
    ]
    for label, key, unit, limit, baseline in checks:
        value, ref = chill.get(key), nginx.get(key)
        if value is None:
            continue
        scale = 1 / 1000 if key.startswith("ttfe") else 1.0
        if baseline is not None:
            base = baseline.get(key, 0.0)
            value, ref = (value - base) * scale, ((ref or 0.0) - base) * scale
        shown = f"{value:.3f} {unit}" if unit == "ms" else f"{value:.1f} {unit}"
        ref_shown = (
            "—" if ref is None else (f"{ref:.3f} {unit}" if unit == "ms" else f"{ref:.1f} {unit}")
        )
        if baseline is nginx:
            ref_shown = "—"
        met = "yes" if value <= limit else "**no**"
        lines.append(f"| {label} | {ref_shown} | {shown} | ≤ {limit} {unit} | {met} |")
    return "\n".join(lines)


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    nginx = subprocess.run([tools["nginx"], "-v"], capture_output=True, text=True, check=False)
    wrk = subprocess.run([tools["wrk"], "-v"], capture_output=True, text=True, check=False)
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "vllm_chill", "benchmarks"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "python": platform.python_version(),
        "nginx": (nginx.stderr.strip().split("/")[-1] or "?"),
        "wrk": (wrk.stdout + wrk.stderr).split()[1] if (wrk.stdout + wrk.stderr).split() else "?",
        **{m: importlib.metadata.version(m) for m in ("uvicorn", "uvloop", "httptools")},
    }


def shown_command() -> str:
    """This run's command line, less where it wrote its output."""
    shown, skip = ["python", "benchmarks/run.py"], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--write-doc", "--json"):
            skip = True
        elif not arg.startswith(("--write-doc=", "--json=")):
            shown.append(arg)
    return " ".join(shown)


def render_markdown(info: dict[str, str], cpus: Cpus, targets: list[Target], args: Any) -> str:
    chill_held = next(t.results for t in targets if t.name == "vllm-chill")
    lines = [
        MARK_START,
        f"Run of `{shown_command()}` on {info['date']}, commit `{info['commit']}`.",
        "",
        f"- Machine: {info['machine']}; {cpus.note}.",
        f"- Python {info['python']}, uvicorn {info['uvicorn']}, uvloop {info['uvloop']}, "
        f"httptools {info['httptools']}; nginx {info['nginx']}; wrk {info['wrk']}.",
        f"- Each figure is the median of {args.repeat} interleaved rounds of {args.seconds:g} s "
        f"wrk runs (-t1); SSE responses carry {EVENTS} events; time to first event over "
        f"{args.repeat} x {args.ttfe_requests} streams of {TTFE_EVENTS} events "
        f"{TTFE_GAP_US / 1000:g} ms apart on one connection; "
        f"{int(chill_held.get('held_ok', 0))} of 1,000 slow streams held open through "
        "vllm-chill.",
        "",
        render_table(targets),
        "",
        "Against the targets of issue 6:",
        "",
        render_targets(targets),
        MARK_END,
    ]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if MARK_START in text and MARK_END in text:
        before = text[: text.index(MARK_START)]
        after = text[text.index(MARK_END) + len(MARK_END) :]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vllm-chill-bench-") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round of 2 s runs")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 3)")
    parser.add_argument("--repeat", type=int, help="rounds, interleaved (default 3)")
    parser.add_argument(
        "--variants",
        default="native",
        help="comma-separated upstream clients of vllm-chill to measure: native (its own), "
        "aiohttp, httpx (kept in benchmarks/ for the comparison)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also measure vllm-chill from this source tree (e.g. made with "
        "`git archive REV vllm_chill | tar -x -C DIR`), named after the directory",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--write-doc", type=Path, help="update the results block in this file")
    parser.add_argument("--json", type=Path, help="write all figures here as JSON")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.ttfe_requests = 100 if args.quick else 150
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        sys.exit(f"--variants takes {', '.join(VARIANTS)}")

    tools = check_tools()
    raise_nofile()
    cpus = Cpus.plan(not args.no_pin)
    if cpus.client:
        os.sched_setaffinity(0, cpus.client)
    print(f"CPUs: {cpus.note}", flush=True)
    with workspace() as tmp:
        procs = Processes(tmp)
        try:
            targets = start_targets(procs, tmp, tools, cpus, variants, args.baseline)
            measure(targets, tools, cpus, args)
        except BaseException:
            for log in sorted(tmp.glob("*.log")):
                sys.stderr.write(f"--- {log.name}\n{log.read_text()[-1500:]}\n")
            raise
        finally:
            procs.stop()
        for target in targets:
            errors = sum(v for k, v in target.results.items() if k.endswith("_errors"))
            if errors:
                print(f"WARNING: {target.name} had {errors:.0f} errors", file=sys.stderr)

    info = machine_info(tools)
    block = render_markdown(info, cpus, targets, args)
    print()
    print(render_table(targets))
    print()
    print(render_targets(targets))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "info": info,
                    "cpus": cpus.note,
                    "seconds": args.seconds,
                    "results": {t.name: t.results for t in targets},
                },
                indent=2,
            )
        )
    if args.write_doc:
        write_doc(args.write_doc, block)
        print(f"\nwrote {args.write_doc}")


if __name__ == "__main__":
    main()
