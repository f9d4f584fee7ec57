"""The real-vLLM tier (`-m vllm`): tests against vLLM itself, in a venv of its own.

Build it once with `python3 scripts/vllm_tier.py` (minutes; cached under
`$VLLM_CHILL_VLLM_TIER`, default `~/.cache/vllm-chill/vllm-tier`), then run
`python -m pytest -m vllm tests/vllm`. Unbuilt, the tier skips; under CI it fails instead.
"""

from __future__ import annotations

import pytest

from tests.vllm.vllm_helpers import Tier, find_tier


@pytest.fixture(scope="session")
def tier() -> Tier:
    return find_tier()
