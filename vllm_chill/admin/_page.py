"""`GET /proxy/ui`: the status page, static files shipped in the package.

The files hold no data (the page reads `/proxy/events` and `/proxy/status` with the admin
token the operator types in), so they are served without a token. No build step, no CDN:
everything the page loads comes from here, and its Content-Security-Policy lets it load
nothing from anywhere else.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from vllm_chill.http._asgi import Scope, Send, send_response

UI_PATH = "/proxy/ui"

_TYPES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}
_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def is_ui(path: str) -> bool:
    return path == UI_PATH or path.startswith(UI_PATH + "/")


@cache
def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


async def serve_page(scope: Scope, send: Send, path: str) -> bool:
    """Answer a GET under `/proxy/ui`; False when no such file is shipped."""
    name = path[len(UI_PATH) :].lstrip("/") or "index.html"
    content_type = _TYPES.get(name)
    if content_type is None:
        return False
    body = _file(name)
    if name == "index.html":
        # Absolute links to the page's files, wherever the proxy is mounted.
        prefix = html.escape(scope.get("root_path", "") + UI_PATH)
        body = body.replace(b"{{ui}}", prefix.encode())
    headers = [
        (b"content-type", content_type),
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", _POLICY),
        (b"referrer-policy", b"no-referrer"),
    ]
    if scope["method"] == "HEAD":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True
    await send_response(send, 200, body, headers)
    return True
