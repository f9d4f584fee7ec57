"""What the simulated vLLM says: its toy tokenizer, its deterministic text and vectors, and the
exact JSON shapes vLLM's OpenAI server answers with.

Kept apart from the ASGI plumbing so the shapes can be read (and compared with vLLM's) in one
place. Everything here is pure and synchronous.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import time
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

#: Words the simulator "generates"; one word is one completion token.
WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
    "simulated", "tokens", "stream", "from", "vllm", "chill", "through", "one", "endpoint",
    "and", "many", "models", "share", "gpus", "when", "idle", "they", "scale", "to", "zero",
    "again", "today",
)  # fmt: skip

#: vLLM answers `"max_tokens"`-less requests with the rest of the context; a sim would then
#: stream thousands of tokens, so it uses a small default like most OpenAI-compatible servers.
DEFAULT_MAX_TOKENS = 16
DEFAULT_EMBEDDING_DIMENSIONS = 32
MAX_EMBEDDING_DIMENSIONS = 4096


class RequestError(Exception):
    """A request the real vLLM would refuse; carries vLLM's status and error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, status, param=param)


_ERROR_TYPES = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError"}


def error_body(message: str, status: int, *, param: str | None = None) -> dict[str, Any]:
    """vLLM's `ErrorResponse`: OpenAI's shape with the HTTP status as `code`."""
    kind = _ERROR_TYPES.get(status, "ServiceUnavailableError" if status == 503 else "Error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def dumps(obj: Any) -> bytes:
    """Compact JSON, like pydantic's `model_dump_json` that vLLM uses."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- tokenizer: UTF-8 bytes, so /tokenize and /detokenize round-trip any text -----------------


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def detokenize(tokens: Sequence[int]) -> str:
    return bytes(tokens).decode(errors="replace")


def chat_prompt(messages: Sequence[Any]) -> str:
    """A stand-in for a chat template: what the messages would look like as one prompt."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "\n".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        lines.append(f"{message.get('role', 'user')}: {content or ''}")
    return "\n".join(lines) + "\nassistant:"


def completion_tokens(prompt: str, count: int) -> list[str]:
    """The same prompt always gets the same answer, so tests can compare streamed with whole."""
    offset = zlib.crc32(prompt.encode())
    return [("" if i == 0 else " ") + WORDS[(offset + i * 7) % len(WORDS)] for i in range(count)]


def embedding(data: bytes, dimensions: int) -> list[float]:
    """A unit vector derived from the input's hash, rounded to float32 like a real model's."""
    raw = hashlib.shake_256(data).digest(4 * dimensions)
    values = [
        int.from_bytes(raw[i : i + 4], "little") / 0x7FFFFFFF - 1.0 for i in range(0, len(raw), 4)
    ]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return array.array("f", (v / norm for v in values)).tolist()


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(array.array("f", vector).tobytes()).decode()
    return vector


# --- request validation: the handful of checks vLLM makes that clients can observe -------------


def expect_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    return parsed


def optional_int(request: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(400, f"{key} must be an integer >= {minimum}, got {value!r}.", param=key)
    return value


def max_tokens(request: dict[str, Any], prompt_tokens: int, max_model_len: int) -> int:
    """Honour `max_tokens`/`max_completion_tokens`, refusing what overflows the context as vLLM
    does (the error text is vLLM's, which clients sometimes parse)."""
    requested = optional_int(request, "max_completion_tokens", minimum=1)
    if requested is None:
        requested = optional_int(request, "max_tokens", minimum=1)
    if requested is None:
        requested = max(1, min(DEFAULT_MAX_TOKENS, max_model_len - prompt_tokens))
    if prompt_tokens + requested > max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the messages, "
            f"{requested} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
    return requested


def include_usage(request: dict[str, Any]) -> tuple[bool, bool]:
    """(`include_usage`, `continuous_usage_stats`) from `stream_options`."""
    options = request.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object.", param="stream_options")
    return bool(options.get("include_usage")), bool(options.get("continuous_usage_stats"))


def prompts_of(value: Any) -> list[tuple[str, int]]:
    """A completions `prompt` (str, [str], [int] or [[int]]) as (text, token count) pairs."""
    if isinstance(value, str):
        return [(value, len(tokenize(value)))]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [(p, len(tokenize(p))) for p in value]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [(repr(value), len(value))]
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in value):
            return [(repr(p), len(p)) for p in value]
    raise RequestError(
        400, "prompt must be a string, a list of strings or a list of token ids.", param="prompt"
    )


def embedding_inputs(value: Any) -> list[tuple[bytes, int]]:
    """An embeddings `input` as (hashable bytes, token count) pairs."""
    single_ids = isinstance(value, list) and value and all(isinstance(t, int) for t in value)
    if isinstance(value, str) or single_ids:
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(400, "input must be a non-empty string or list.", param="input")
    out: list[tuple[bytes, int]] = []
    for item in value:
        if isinstance(item, str):
            out.append((item.encode(), len(tokenize(item))))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            out.append((dumps(item), len(item)))
        else:
            raise RequestError(400, "input items must be strings or token id lists.", param="input")
    return out


def usage(prompt_tokens: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }
