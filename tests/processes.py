"""Server processes for end-to-end tests: `vllm-chill serve` and friends as real children,
their stderr read as it comes (to find the port, and to show with a failure)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Generous bounds: they prove "fails fast / exits", not speed.
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0


def env_for(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CHILL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Process:
    """A server process whose stderr is read as it comes (to find its port, and for failures)."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.popen = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(env),
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        with self.popen.stderr:  # the pipe is this thread's: closed when the process ends it
            for line in self.popen.stderr:
                self.lines.append(line)
                self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} in:\n{self.log}") from None
            if line is None:
                raise AssertionError(
                    f"exited ({self.popen.wait()}) without {pattern!r}:\n{self.log}"
                )
            match = re.search(pattern, line)
            if match:
                return match

    def base_url(self) -> str:
        return self.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1)

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(timeout=EXIT_TIMEOUT)
        self.join()
        return code

    def join(self) -> None:
        """Wait for the reader to reach the end of stderr (and close the pipe)."""
        self._reader.join(timeout=5)

    @property
    def log(self) -> str:
        return "".join(self.lines)


@contextmanager
def running(args: list[str], env: Mapping[str, str] | None = None) -> Iterator[Process]:
    process = Process(args, env or {})
    try:
        yield process
    except BaseException:
        print(process.log)  # shown by pytest with the failure
        raise
    finally:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()
        process.join()
