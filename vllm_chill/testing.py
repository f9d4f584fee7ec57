"""In-process stand-ins for testing code that uses vllm-chill: no sockets, no processes.

- `FakeBackend`: loads take the time (and fail with the reason) a test sets.
- `ASGIUpstream`: a transport for `ModelSwitchMiddleware(transport=...)` that hands each request
  to an ASGI app in the same process instead of opening a connection — for example a
  `vllm_chill.backends.sim.SimApp` per model — so a whole proxy runs inside a test's event loop,
  driven through `httpx.ASGITransport`.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

import anyio

from vllm_chill.backends._fake import FakeBackend
from vllm_chill.http._asgi import ASGIApp, Message, Scope, Send
from vllm_chill.http._upstream import HOP_BY_HOP, UpstreamAborted, UpstreamUnavailable

__all__ = ["ASGIUpstream", "FakeBackend"]

_DROP_FROM_REQUEST = HOP_BY_HOP | {b"host", b"content-length"}


class ASGIUpstream:
    """Base URL -> ASGI app. The request reaches the app as the real client would send it
    (the client's headers less hop-by-hop ones, the body with its length); the app's answer is
    relayed message by message, so streams stay streams."""

    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self._apps = dict(apps)

    async def forward(
        self,
        scope: Scope,
        send: Send,
        *,
        base_url: str,
        path: str,
        body: bytes,
    ) -> int:
        app = self._apps.get(base_url)
        if app is None:
            raise UpstreamUnavailable(f"no app for {base_url}")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROP_FROM_REQUEST]
        headers.append((b"content-length", str(len(body)).encode()))
        request: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": scope["method"],
            "scheme": "http",
            "path": unquote(path),
            "raw_path": path.encode("latin-1"),
            "query_string": scope.get("query_string", b""),
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("upstream", 80),
        }
        done = anyio.Event()
        body_sent = False
        status = 0

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def relay(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [
                        (k, v) for k, v in message.get("headers", []) if k.lower() not in HOP_BY_HOP
                    ],
                }
            await send(message)

        try:
            await app(request, receive, relay)
        except Exception as exc:
            if not status:
                raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from None
            raise UpstreamAborted(f"{type(exc).__name__}: {exc}") from None
        finally:
            done.set()
        if not status:
            raise UpstreamUnavailable("the app sent no response")
        return status

    async def aclose(self) -> None:
        pass
