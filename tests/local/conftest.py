"""Fixtures for the local process backend's tests: every stand-in process a test starts is
recorded, and none may be left when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.local.local_helpers import LostRecorder, Tracker, standin_command, tracked_processes
from vllm_chill.backends.local._backend import LocalProcessBackend


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    """Every stand-in started during the test; after the test, none may be left."""
    with tracked_processes() as handler:
        yield handler


@pytest.fixture
def lost() -> LostRecorder:
    return LostRecorder()


@pytest.fixture
async def backend(tracker: Tracker, lost: LostRecorder) -> AsyncIterator[LocalProcessBackend]:
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with backend.session(lost) as adopted:
        assert adopted is None
        yield backend
