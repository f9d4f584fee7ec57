"""What a held streaming request sees while its model loads.

A request for `/v1/chat/completions` or `/v1/completions` with `"stream": true` that is held
for a load (`--max-wait`) is answered at once: `200` with `text/event-stream`, then an SSE
comment, `: loading <model> (<phase>, <n>s)`, at once and every `--stream-keepalive`, so that
neither the client nor an ingress's idle timeout gives up on a silent connection (`<n>`: how
long the request has waited). With `--stream-loading-note`, chat completions get the same news
as `chat.completion.chunk` events whose delta carries `reasoning_content`: chat UIs show it as
the model's thinking, not as its answer. Once the model is ready its own stream follows, body
only (the head was sent already).

Whatever answer comes instead of a 2xx (a refusal of the switcher, the proxy's own 502/504, a
non-2xx answer of the model's server) carries an OpenAI error object already: it ends the
stream as one `data: {"error": {...}}` event, which the official clients raise as `APIError`.
So there is one wording of every error, the non-streaming one.

The ticker is one plain asyncio task owned by the request (see `_Exchange` in the middleware
for why not anyio): `start` makes it; `stop`, which the middleware calls on every path, and the
first message of the answer proper cancel it. A cancelled ticker writes nothing more: an ASGI
server's `send` waits, if at all, before it writes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from vllm_chill.http._asgi import Message, Send
from vllm_chill.http._errors import error_object
from vllm_chill.observability._logs import get_logger

log = get_logger(__name__)

#: The paths whose held streams get progress, and whether theirs are chat completions.
STREAM_PATHS = {"/v1/chat/completions": True, "/v1/completions": False}
#: With the note on: a note when the phase changes, else at most this often (comments between).
NOTE_EVERY = 10.0
#: Most of a non-2xx answer's body that is read to make its error event.
ERROR_BODY_LIMIT = 64 * 1024

_HEAD = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class HeldStream:
    """One held streaming request's answer: its progress while it waits, then the relay.

    `start` is the switcher's `on_hold` hook. After it, the answer goes through `send` (in
    place of the exchange's own): the upstream's head is dropped, its body passed on, and a
    non-2xx answer becomes the closing error event. `phase(model)` says what the load is doing.
    """

    __slots__ = (
        "_chunk_id",
        "_error",
        "_error_status",
        "_interval",
        "_last_note",
        "_last_phase",
        "_model",
        "_note",
        "_phase",
        "_retry_after",
        "_send",
        "_since",
        "_ticker",
        "answered",
        "started",
    )

    def __init__(
        self,
        send: Send,
        model: str,
        phase: Callable[[str], str],
        *,
        interval: float,
        note: bool,
    ) -> None:
        self._send = send
        self._model = model
        self._phase = phase
        self._interval = interval
        self._note = note
        #: Whether the 200 head was sent (the request was held).
        self.started = False
        #: Whether the answer proper (its head, dropped) came through `send`.
        self.answered = False
        self._since = 0.0
        self._ticker: asyncio.Task[None] | None = None
        self._last_phase: str | None = None
        self._last_note = 0.0
        self._chunk_id: str | None = None
        self._error: bytearray | None = None
        self._error_status = 0
        self._retry_after: int | None = None

    async def start(self) -> None:
        """The request is held: the 200 head and the first news now, then the ticker."""
        self.started = True
        self._since = time.monotonic()
        await self._send({"type": "http.response.start", "status": 200, "headers": list(_HEAD)})
        await self._news()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def stop(self) -> None:
        """No more news. Idempotent."""
        ticker = self._ticker
        if ticker is not None:
            self._ticker = None  # dropped first: the cancelled task's traceback holds `self`
            ticker.cancel()

    async def send(self, message: Message) -> None:
        """The answer proper, after `start`."""
        if message["type"] == "http.response.start":
            self.stop()
            self.answered = True
            status: int = message["status"]
            if not 200 <= status < 300:
                self._error = bytearray()
                self._error_status = status
                self._retry_after = _retry_after(message.get("headers", ()))
            return
        error = self._error
        if error is None:
            await self._send(message)
            return
        room = ERROR_BODY_LIMIT - len(error)
        if room > 0:
            error += message.get("body", b"")[:room]
        if not message.get("more_body", False):
            event = self._error_event(bytes(error))
            await self._send({"type": "http.response.body", "body": event, "more_body": False})

    # --- progress -------------------------------------------------------------------------

    async def _tick(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                await self._news()
        except Exception:  # never the task's cancellation: that is how it ends
            log.warning("loading progress of model=%s stopped", self._model, exc_info=True)

    async def _news(self) -> None:
        phase = _one_line(self._phase(self._model))
        now = time.monotonic()
        waited = int(now - self._since)
        if self._note and (phase != self._last_phase or now - self._last_note >= NOTE_EVERY):
            self._last_phase = phase
            self._last_note = now
            body = self._note_chunk(f"Loading model {self._model}\u2026 ({phase}, {waited}s)\n")
        else:
            body = f": loading {_one_line(self._model)} ({phase}, {waited}s)\n\n".encode()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    def _note_chunk(self, text: str) -> bytes:
        delta: dict[str, Any] = {"reasoning_content": text}
        if self._chunk_id is None:
            self._chunk_id = f"chatcmpl-loading-{uuid.uuid4().hex}"
            delta = {"role": "assistant", **delta}
        chunk = {
            "id": self._chunk_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    # --- the closing error ----------------------------------------------------------------

    def _error_event(self, body: bytes) -> bytes:
        error = _error_of(body, self._error_status, self._model)
        if self._retry_after is not None:
            error.setdefault("retry_after", self._retry_after)
        return b"data: " + json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n\n"


def _error_of(body: bytes, status: int, model: str) -> dict[str, Any]:
    """The OpenAI error object of a non-2xx answer. Ours and vLLM's carry one
    (`{"error": {...}}`, or vLLM's older `{"object": "error", "message": ...}`); any other
    body is described."""
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error
        if isinstance(data.get("message"), str):
            return {k: v for k, v in data.items() if k != "object"}
    text = " ".join(body[:200].decode("utf-8", "replace").split())
    message = f"The server for model '{model}' answered {status}" + (f": {text}" if text else ".")
    return error_object(status, "upstream_error", message)


def _retry_after(headers: Any) -> int | None:
    for name, value in headers:
        if bytes(name).lower() == b"retry-after":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _one_line(text: str) -> str:
    """An SSE comment ends at a line break: none may come from a phase or a name."""
    return text.replace("\r", " ").replace("\n", " ")
