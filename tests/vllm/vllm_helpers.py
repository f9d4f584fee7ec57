"""Helpers of the real-vLLM tier: where the tier lives, vLLM-side checks, the proxy process,
and the process trees it starts (read from /proc)."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "vllm_tier.py"
VLLM_SIDE = Path(__file__).with_name("vllm_side.py")
#: Environment of every vLLM this tier starts: a 1 GiB KV cache (on the CPU platform vLLM's
#: default sizes it from RAM), no model hub, no usage reports.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_tier_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Tier:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def vllm(self) -> Path:
        return self.root / "venv" / "bin" / "vllm"

    def model(self, name: str) -> Path:
        return self.root / "models" / name


def find_tier() -> Tier:
    """The built tier, or a skip (a failure under CI) saying how to build it."""
    script = _script()
    root: Path = script.tier_dir()
    if not script.models_ok(root):
        message = (
            f"the real-vLLM tier is not built in {root} "
            f"(build it with: python3 scripts/vllm_tier.py; ${script.ENV_VAR} moves it)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Tier(root)


def vllm_side(tier: Tier, command: str, payload: Any = None, timeout: float = 300) -> Any:
    """Run tests/vllm/vllm_side.py in vLLM's venv; its JSON answer."""
    result = subprocess.run(
        [str(tier.python), str(VLLM_SIDE), command],
        input=json.dumps(payload),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **VLLM_ENV, "VLLM_LOGGING_LEVEL": "ERROR"},
        cwd=REPO,
    )
    marker = "@@vllm-side@@"
    if result.returncode != 0 or marker not in result.stdout:
        raise AssertionError(
            f"vllm_side.py {command} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return json.loads(result.stdout.rsplit(marker, 1)[1])


# --- the proxy ------------------------------------------------------------------------------


class Proxy:
    """`vllm-chill serve` as a real process; its stderr is read as it comes."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "vllm_chill", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**os.environ, **env},
            cwd=REPO,
        )
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.base_url = self._wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1)
        self.http = httpx.Client(base_url=self.base_url, trust_env=False, timeout=60)
        #: Every process group of a model server this proxy started (for the final check).
        self.groups: set[int] = set()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        with self.popen.stderr:  # closed at EOF: no pipe is left open (warnings are errors)
            for line in self.popen.stderr:
                self.lines.append(line)
                self._new.put(line)
        self._new.put(None)

    def _wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} in:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"exited without {pattern!r}:\n{self.log()}")
            match = re.search(pattern, line)
            if match:
                return match

    def log(self, last: int = 150) -> str:
        return "".join(self.lines[-last:])

    def state(self, model: str) -> str:
        return str(self.http.get(f"/v1/models/{model}").json()["state"])

    def wait_state(self, model: str, states: set[str], timeout: float) -> tuple[str, float]:
        """Poll `/v1/models/{model}` until its state is one of `states`: (state, seconds)."""
        started = time.monotonic()
        while True:
            state = self.state(model)
            if state in states:
                return state, time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{model} still {state} after {timeout:.0f} s:\n{self.log()}")
            self.remember_groups()
            time.sleep(0.1)

    def chat(self, model: str) -> httpx.Response:
        return self.http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )

    def remember_groups(self) -> list[Proc]:
        tree = descendants(self.pid)
        # Never our own group or the proxy's: the fixture SIGKILLs the groups left at the end.
        ours = {os.getpgrp(), os.getpgid(self.pid)} if self.popen.poll() is None else set()
        self.groups.update(p.pgid for p in tree if p.pgid not in ours | {os.getpgrp()})
        return tree

    def stop(self) -> None:
        self.http.close()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(timeout=5)


# --- process trees --------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    started: float  # seconds since boot
    argv: tuple[str, ...] = field(compare=False)

    @property
    def served_name(self) -> str | None:
        argv = list(self.argv)
        for index, word in enumerate(argv[:-1]):
            if word == "--served-model-name":
                return argv[index + 1]
        return None


def processes() -> dict[int, Proc]:
    table: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = Proc(
            pid=int(entry.name),
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            state=fields[0],
            started=int(fields[19]) / CLOCK_TICKS,
            argv=tuple(w.decode(errors="replace") for w in raw.split(b"\0") if w),
        )
    return table


def alive(proc: Proc) -> bool:
    return proc.state not in ("Z", "X")


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    table = processes() if table is None else table
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if alive(child):
                found.append(child)
                todo.append(child.pid)
    return found


def served_names(tree: list[Proc], table: dict[int, Proc]) -> dict[int, str]:
    """pid -> the served model name of the model server the process belongs to (found in its
    own argv or an ancestor's: vLLM's EngineCore and Worker processes do not repeat it)."""
    names: dict[int, str] = {}
    for proc in tree:
        current: Proc | None = proc
        while current is not None:
            if current.served_name is not None:
                names[proc.pid] = current.served_name
                break
            current = table.get(current.ppid)
    return names


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def group_members(groups: set[int]) -> list[Proc]:
    return [p for p in processes().values() if p.pgid in groups and alive(p)]


class TreeWatcher:
    """Samples the proxy's process tree every 20 ms: which model servers were alive when."""

    def __init__(self, root: int) -> None:
        self.root = root
        #: (seconds since boot, served name -> pids alive then)
        self.samples: list[tuple[float, dict[str, set[int]]]] = []
        self.started: dict[int, tuple[str, float]] = {}  # pid -> (served name, start time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = uptime()
            table = processes()
            tree = descendants(self.root, table)
            names = served_names(tree, table)
            alive_now: dict[str, set[int]] = {}
            for pid, name in names.items():
                alive_now.setdefault(name, set()).add(pid)
                self.started.setdefault(pid, (name, table[pid].started))
            self.samples.append((now, alive_now))
            self._stop.wait(0.02)

    def overlaps(self) -> list[tuple[float, dict[str, set[int]]]]:
        """Samples in which the processes of two model servers were alive together."""
        return [s for s in self.samples if len(s[1]) > 1]

    def last_seen(self, pids: set[int]) -> float | None:
        """When any of `pids` was last seen alive."""
        seen = [t for t, alive_now in self.samples for p in alive_now.values() if p & pids]
        return max(seen) if seen else None

    def started_since(self, name: str, since: float) -> dict[int, float]:
        """pid -> start time of the processes of `name` that started at or after `since`."""
        return {p: t for p, (n, t) in self.started.items() if n == name and t >= since}
