"""Helpers for the local backend's tests: the stand-in server command, models for it, and a
recorder of every stand-in process started (from the backend's own log lines) that can tell
whether any of them is left."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from vllm_chill._model import VLLMModel

HERE = Path(__file__).parent
STANDIN = HERE / "standin_server.py"
REPO = HERE.parent.parent


def standin_command(template: str = "{model} {args} --host 127.0.0.1 --port {port}") -> str:
    """`--command` running the stand-in with this Python, followed by `template`."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} {template}"


def make_model(
    served: str, *extra: str, model_name: str | None = None, load_time: float = 0.2
) -> VLLMModel:
    spec: dict[str, Any] = {
        "modelName": model_name or f"org/{served}",
        "servedModelName": served,
        "extraArgs": ["--standin-load-time", str(load_time), *extra],
    }
    return VLLMModel.from_spec(spec)


# -- processes -------------------------------------------------------------------------------


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) of a process, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[2])


def is_live(pid: int) -> bool:
    """Exists and is not a zombie (a zombie holds no memory; its reaper may be PID 1)."""
    state = process_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def live_group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = process_state(int(entry.name))
            if state is not None and state[1] == pgid and state[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


@dataclass
class Started:
    """One stand-in as it reported itself: its pid, its supervisor (ppid), group, grandchild."""

    served: str
    pid: int
    ppid: int
    pgid: int
    grandchild: int | None

    def pids(self) -> list[int]:
        return [p for p in (self.pid, self.ppid, self.grandchild) if p is not None]

    def leftovers(self) -> list[int]:
        return sorted({*(p for p in self.pids() if is_live(p)), *live_group_members(self.pgid)})


_STARTED = re.compile(
    r"^\[(?P<served>.*)\] standin pid=(?P<pid>\d+) ppid=(?P<ppid>\d+) pgid=(?P<pgid>\d+) "
    r"grandchild=(?P<grandchild>\d+|None)$"
)


class Tracker(logging.Handler):
    """Records every stand-in the backend started, and every line it logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.started: list[Started] = []
        self.lines: list[str] = []
        self._events: dict[str, anyio.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        match = _STARTED.match(message)
        if match:
            grandchild = match["grandchild"]
            self.started.append(
                Started(
                    served=match["served"],
                    pid=int(match["pid"]),
                    ppid=int(match["ppid"]),
                    pgid=int(match["pgid"]),
                    grandchild=None if grandchild == "None" else int(grandchild),
                )
            )
            self.event(match["served"]).set()

    def event(self, served: str) -> anyio.Event:
        """Set once a stand-in serving `served` has started (printed its pids)."""
        return self._events.setdefault(served, anyio.Event())

    def of(self, served: str) -> Started:
        matches = [s for s in self.started if s.served == served]
        assert matches, f"no stand-in for {served!r} started"
        return matches[-1]

    def leftovers(self) -> dict[str, list[int]]:
        return {s.served: left for s in self.started if (left := s.leftovers())}


@dataclass
class LostRecorder:
    reasons: list[str] = field(default_factory=list)
    event: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, reason: str, *, model: str | None = None) -> None:
        self.reasons.append(reason)
        self.event.set()


@contextmanager
def tracked_processes() -> Iterator[Tracker]:
    """Every stand-in the local backend starts while this is open (read from its log);
    on exit, none may be left."""
    logger = logging.getLogger("vllm_chill.backends.local")
    handler = Tracker()
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    assert handler.leftovers() == {}, "processes left behind"
