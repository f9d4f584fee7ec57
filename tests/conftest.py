"""Shared fixtures. Async tests use anyio's pytest plugin on asyncio."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (the default, in pyproject) runs the real-vLLM tier in one process: each of
    its vLLM servers takes a core and gigabytes while it starts. The rest of the suite mostly
    waits on sockets and timers: one worker more than there are CPUs keeps them busy (on 2
    cores: 2 min 10 s with 3 workers, 2 min 40 s with 2, 4 min 35 s in one process)."""
    selected = str(config.option.markexpr)
    if "vllm" in selected and "not vllm" not in selected:
        return 0
    return (os.cpu_count() or 1) + 1
