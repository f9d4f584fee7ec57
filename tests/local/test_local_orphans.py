"""No model server outlives the proxy, even when the proxy is killed with SIGKILL and never
gets to clean up: a real proxy-like process (`orphan_driver.py`) loads a stand-in that has a
grandchild and ignores SIGTERM, and is then killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.local.local_helpers import HERE, REPO, Started, standin_command

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("signum", "loop"),
    [
        (signal.SIGKILL, "asyncio"),
        (signal.SIGKILL, "uvloop"),
        (signal.SIGTERM, "asyncio"),  # Python's default SIGTERM: dies without cleaning up
        (signal.SIGINT, "uvloop"),  # Ctrl-C: the event loop is torn down without stop()
    ],
    ids=["sigkill-asyncio", "sigkill-uvloop", "sigterm-asyncio", "sigint-uvloop"],
)
async def test_no_process_outlives_a_killed_proxy(signum: signal.Signals, loop: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = await anyio.open_process(
        [sys.executable, str(HERE / "orphan_driver.py"), loop, standin_command()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    async with driver:
        assert driver.stdout is not None
        with anyio.fail_after(30):
            line = await BufferedByteReceiveStream(driver.stdout).receive_until(b"\n", 65536)
        info = json.loads(line)
        standin = Started(
            served="orphan",
            pid=info["pid"],
            ppid=info["ppid"],
            pgid=info["pgid"],
            grandchild=info["grandchild_pid"],
        )
        assert standin.grandchild is not None
        assert set(standin.leftovers()) >= {standin.pid, standin.ppid, standin.grandchild}
        driver.send_signal(signum)
        await driver.wait()
    # Not our children: no event tells us they died, so poll, with a generous bound.
    with anyio.fail_after(10):
        while standin.leftovers():
            await anyio.sleep(0.05)
