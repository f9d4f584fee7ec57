"""Small helpers every part of the suite uses: a model from its served name, a chat body, a
free loopback port, a decision core with the tests' policy. One copy here; the test modules
import them from this module."""

from __future__ import annotations

import socket
from typing import Any

from vllm_chill import VLLMModel
from vllm_chill.scheduler._core import SwitchCore


def spec(served: str, model_name: str | None = None, **extra: Any) -> VLLMModel:
    """A model served as `served`; its `modelName` is `org/<served>` unless given."""
    return VLLMModel.from_spec(
        {"modelName": model_name or f"org/{served}", "servedModelName": served, **extra}
    )


def chat(model: Any, **extra: Any) -> dict[str, Any]:
    """A chat-completions body for `model` (any value: tests send wrong types on purpose);
    `extra` adds or overrides fields, e.g. `max_tokens=4`."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def free_port() -> int:
    """A loopback port that was free a moment ago (for a server in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def switch_core(**overrides: Any) -> SwitchCore:
    """A decision core with the policy the core tests assume (one slot, 5 s residency, 0.5 s
    quiet gap, 30 s first-load estimate, ...); `overrides` replace any field."""
    policy: dict[str, Any] = {
        "max_waiting": 100,
        "min_residency": 5.0,
        "quiet_gap": 0.5,
        "drain_timeout": 60.0,
        "idle_timeout": 300.0,
        "failure_backoff": 10.0,
        "failure_backoff_max": 300.0,
        "first_load_estimate": 30.0,
        "sleep_reserve": 0.02,
        "max_sleeping": 0,
        "sleep_memory": 0,
    }
    policy.update(overrides)
    return SwitchCore(**policy)
