"""OpenAI-shaped error answers: `{"error": {"message", "type", "code", "param"}}`.

Every refusal the proxy makes goes through `error_response`, so clients (and the official
`openai` client's exception mapping) always see the same shape, and no traceback can leak.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_chill.http._asgi import Send, send_response

#: OpenAI's `type` for each HTTP status we answer with.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_object(
    status: int,
    code: str,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The `error` object itself: `type` defaults to OpenAI's for `status`."""
    error: dict[str, Any] = {
        "message": message,
        "type": type_ or _TYPES.get(status, "api_error"),
        "code": code,
        "param": param,
    }
    error.update(extra)
    return error


def error_body(
    status: int,
    code: str,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> bytes:
    error = error_object(status, code, message, type_=type_, param=param, **extra)
    return json.dumps({"error": error}, separators=(",", ":")).encode()


async def error_response(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    retry_after: int | None = None,
    type_: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> None:
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    body = error_body(status, code, message, type_=type_, param=param, **extra)
    await send_response(send, status, body, headers)
