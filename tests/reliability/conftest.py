"""Fixtures of the reliability suite (see docs/reliability.md).

`anyio_backend` is module-scoped here so that a module can share one running proxy across its
tests (and across the many examples of a Hypothesis property): starting a stack costs far more
than a request, and a long-lived server is also the more hostile setting — whatever an example
breaks stays broken for the next ones.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "load: the bounded load test (about 20 s; deselect with -m 'not load')"
    )


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"
