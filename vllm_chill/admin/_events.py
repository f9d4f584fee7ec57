"""`GET /proxy/events`: the status page's picture as a server-sent event stream.

Events: `status` (the whole picture, see `_view.py`) on connect, at once after each change of
the switcher's state, and when a look every `refresh` seconds finds something else changed (a
count of requests, a failure's back-off over; only while there is something to watch); `switch`
(one timeline entry) when a switch starts and when it ends. A stream with nothing new for
`heartbeat` seconds gets a comment, which keeps proxies in between from closing it. Each stream
ends after `max_age` seconds (clients reconnect: EventSource does so by itself, after the
`retry:` it was given), so that no server waits long on an open stream when it shuts down;
`vllm-chill serve` ends them at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio

from vllm_chill.admin._view import is_watched, without_clock
from vllm_chill.http._asgi import Receive, Send
from vllm_chill.scheduler._changes import Changes

#: Seconds between looks at the picture while there is something to watch.
REFRESH = 1.0
#: Most seconds a stream goes without a byte.
HEARTBEAT = 15.0
#: Seconds a stream lasts before the client is asked to reconnect.
MAX_AGE = 60.0
#: After a change, how long to let a burst of changes settle into one picture.
SETTLE = 0.05
#: What a client waits before reconnecting (milliseconds, the SSE `retry:` field).
RECONNECT_MS = 500

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer
]


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _switch_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (entry["number"], entry["result"])


async def stream_events(
    receive: Receive,
    send: Send,
    *,
    view: Callable[[], dict[str, Any]],
    changes: Changes,
    closing: anyio.Event,
    refresh: float = REFRESH,
    heartbeat: float = HEARTBEAT,
    max_age: float = MAX_AGE,
) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_HEADERS)})

    async def body(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def until_gone(scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def until_closing(scope: anyio.CancelScope) -> None:
        await closing.wait()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(until_gone, tg.cancel_scope)
        tg.start_soon(until_closing, tg.cancel_scope)
        with anyio.move_on_after(max_age):
            seen = changes.version
            picture = view()
            shown = without_clock(picture)
            known = {_switch_key(s) for s in picture["switches"]}
            await body(f"retry: {RECONNECT_MS}\n\n".encode() + _event("status", picture))
            quiet_since = anyio.current_time()
            while True:
                watched = is_watched(picture)
                if await changes.wait(seen, refresh if watched else heartbeat) != seen:
                    await anyio.sleep(SETTLE)
                    seen = changes.version
                elif not watched:
                    picture = view()  # nothing to watch: only a change shows anything new
                    await body(b": keep-alive\n\n")
                    continue
                picture = view()
                now_shown = without_clock(picture)
                if now_shown == shown:  # nothing the page does not count on by itself
                    if anyio.current_time() - quiet_since >= heartbeat:
                        await body(b": keep-alive\n\n")
                        quiet_since = anyio.current_time()
                    continue
                shown = now_shown
                chunks = []
                for entry in reversed(picture["switches"]):  # oldest first
                    key = _switch_key(entry)
                    if key not in known:
                        known.add(key)
                        chunks.append(_event("switch", entry))
                if len(known) > 4 * len(picture["switches"]) + 8:
                    known = {_switch_key(s) for s in picture["switches"]}
                chunks.append(_event("status", picture))
                await body(b"".join(chunks))
                quiet_since = anyio.current_time()
        tg.cancel_scope.cancel()
    # The stream ends cleanly: the client reconnects.
    with anyio.CancelScope(shield=True), anyio.move_on_after(1):
        await send({"type": "http.response.body", "body": b"", "more_body": False})
