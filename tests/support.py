"""Small helpers every part of the suite uses: a model from its served name, a chat body, a
free loopback port. One copy here; the test modules import them from this module."""

from __future__ import annotations

import socket
from typing import Any

from vllm_chill import VLLMModel


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
