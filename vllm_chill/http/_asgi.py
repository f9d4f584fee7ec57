"""ASGI types and the few response helpers the proxy needs (no framework on the request path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_response(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, body: bytes) -> None:
    await send_response(send, status, body, [(b"content-type", b"application/json")])


async def send_text(send: Send, status: int, text: str, content_type: bytes) -> None:
    await send_response(send, status, text.encode(), [(b"content-type", content_type)])


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (names in ASGI are lower-case)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
