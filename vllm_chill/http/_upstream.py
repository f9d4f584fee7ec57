"""Forwarding one request to the loaded model's server and streaming the answer back.

The response body is relayed chunk by chunk as it arrives (server-sent events are never
buffered; what has already arrived when the client is ready goes in one piece), status and
end-to-end headers are kept, hop-by-hop headers are dropped. Keep-alive connections are pooled
per upstream and reused last-in first-out.

This is a small HTTP/1.1 client of its own, an asyncio protocol around httptools' parser (the
one uvicorn uses), rather than httpx or aiohttp: the proxy only ever sends one kind of request
(the client's own, re-framed with a Content-Length) and relays whatever comes back, and that
needs neither library's request model. Measured on the benchmark's machine (see
docs/performance.md), httpx's pool bookkeeping cost milliseconds per request under load and
aiohttp's request machinery ~200-300 µs of CPU per request; this path costs ~20 µs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from vllm_chill.http._asgi import Scope, Send
from vllm_chill.observability._logs import get_logger

log = get_logger(__name__)

#: RFC 9110 section 7.6.1 hop-by-hop headers, plus those a proxy must set itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_DROP_FROM_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_DROP_FROM_RESPONSE = HOP_BY_HOP | {b"date", b"server"}

#: Idle pooled connections are closed after this long.
KEEPALIVE_TIMEOUT = 30.0
#: Reading from the upstream pauses while this much of its answer waits for a slow client.
READ_HIGH_WATER = 256 * 1024


class UpstreamUnavailable(Exception):
    """No response byte came back (connect refused, reset before headers)."""


class UpstreamTimeout(Exception):
    """The upstream sent no response headers within the upstream timeout (nothing was sent
    to the client yet)."""


class UpstreamAborted(Exception):
    """The upstream died or went silent mid-answer, after the response started: the client's
    response must be aborted, not completed as if it were whole."""


class _Silent(Exception):
    """No byte from the upstream for the upstream timeout."""


class _Broken(Exception):
    """The connection failed; `received` says whether any byte of the response came."""

    def __init__(self, reason: str, *, received: bool) -> None:
        super().__init__(reason)
        self.received = received


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time. The parser's callbacks fill in the
    response; the request's task waits on a future only when nothing is there yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.closed = False
        self.idle_since = 0.0
        self._active = False
        self._reset()

    def _reset(self) -> None:
        self.received = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        #: Why the connection failed; a connection found closed fails its next request at once.
        self.failure: str | None = "connection closed" if self.closed else None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._informational = False
        self._head_only = False

    # --- the request's side ---------------------------------------------------------------

    def send_request(self, head: bytes, body: bytes, *, head_only: bool) -> None:
        assert self._transport is not None
        self._reset()
        self._active = True
        self._head_only = head_only
        if self.closed:  # closed by the server after we picked it: `read_head` says so
            return
        if body:
            self._transport.writelines((head, body))
        else:
            self._transport.write(head)

    async def read_head(self) -> None:
        while not self.head_done:
            if self.failure is not None:
                raise _Broken(self.failure, received=self.received)
            await self._wait()

    async def read_body(self) -> bytes | None:
        """What has arrived of the body since the last call; None once it is complete."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                if self._paused and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return data
            if self.complete:
                return None
            if self.failure is not None:
                raise _Broken(self.failure, received=True)
            await self._wait()

    def finished(self) -> bool:
        """Whether the connection can carry another request."""
        self._active = False
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        self.closed = True
        self._active = False
        if self._transport is not None:
            self._transport.close()

    async def _wait(self) -> None:
        """Until the parser has something new; `_Silent` after the upstream timeout. A timer
        handle per wait rather than `asyncio.timeout`: it costs a fraction as much per event."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:  # nothing was asked: a confused server; do not reuse it
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.failure = f"invalid response: {type(exc).__name__}: {exc}"
            self.close()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and not self.complete:
            if self.head_done and self._until_close():
                self.complete = True  # the body was delimited by the close
            elif self.failure is None:
                self.failure = f"connection closed: {exc}" if exc else "connection closed"
        self._wake()

    def pause_writing(self) -> None:  # the request body is written at once; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 1xx: an interim answer; the final one follows
            self._informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        if self._head_only:  # a HEAD answer has no body, whatever its headers say
            self.complete = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()

    def _until_close(self) -> bool:
        """Whether the body has no length of its own and so ends when the connection does."""
        if self.status in (204, 304):
            return False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_Silent())


#: Statuses whose answer has no body: a Content-Length on them describes another response,
#: and the ASGI server would wait for that many bytes.
_NO_BODY = frozenset({204, 304})


class _Origin:
    """Where one base URL points, parsed once, and its pool of idle connections."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnavailable(f"unsupported upstream URL {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl_context if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.host_line = b"host: " + parts.netloc.rpartition("@")[2].encode("idna") + b"\r\n"
        self.idle: list[_Connection] = []


class UpstreamTransport(Protocol):
    """How a request reaches the loaded model's server: the seam for other transports (an
    in-memory one for tests is `vllm_chill.testing.ASGIUpstream`). `forward` relays the answer
    through `send` as it arrives and returns its status; before anything was sent it raises
    `UpstreamUnavailable` or `UpstreamTimeout`, after it `UpstreamAborted`."""

    async def forward(
        self,
        scope: Scope,
        send: Send,
        *,
        base_url: str,
        path: str,
        body: bytes,
    ) -> int: ...

    async def aclose(self) -> None: ...


class UpstreamClient:
    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        timeout: float = 600.0,
        upstream_api_key: str | None = None,
        strip_client_auth: bool = False,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._auth = (
            b"authorization: Bearer " + upstream_api_key.encode("latin-1") + b"\r\n"
            if upstream_api_key
            else b""
        )
        # The client's key for the proxy is not the upstream's: never pass it on.
        self._drop = _DROP_FROM_REQUEST | (
            {b"authorization"} if (upstream_api_key or strip_client_auth) else set()
        )
        self._origins: dict[str, _Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            for conn in origin.idle:
                conn.close()
            origin.idle.clear()

    # --- the request ----------------------------------------------------------------------

    def _head(
        self,
        scope: Scope,
        origin: _Origin,
        path: str,
        body: bytes,
    ) -> bytes:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = self._drop
        for key, value in raw:
            if key == b"connection":  # headers the client named as hop-by-hop
                drop = drop | {v.strip().lower() for v in value.split(b",")}
        query: bytes = scope.get("query_string", b"")
        target = origin.prefix + path.encode("latin-1") + (b"?" + query if query else b"")
        lines = [scope["method"].encode("ascii"), b" ", target, b" HTTP/1.1\r\n", origin.host_line]
        for key, value in raw:
            if key not in drop:
                lines += (key, b": ", value, b"\r\n")
        if self._auth:
            lines.append(self._auth)
        lines.append(b"content-length: %d\r\n\r\n" % len(body))
        return b"".join(lines)

    async def forward(
        self,
        scope: Scope,
        send: Send,
        *,
        base_url: str,
        path: str,
        body: bytes,
    ) -> int:
        """Relay the request; return the upstream's status. Raises `UpstreamUnavailable` or
        `UpstreamTimeout` before any byte was sent to the client, `UpstreamAborted` after."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = _Origin(base_url, self._ssl_context(base_url))
        head = self._head(scope, origin, path, body)
        head_only = scope["method"] == "HEAD"
        conn, reused = await self._acquire(origin)
        try:
            try:
                conn.send_request(head, body, head_only=head_only)
                await conn.read_head()
            except _Silent:
                raise UpstreamTimeout(f"no response within {self._timeout:g}s") from None
            except _Broken as exc:
                # A pooled connection the server closed while we picked it: nothing of the
                # request was processed, so send it once more on a fresh connection.
                if not reused or exc.received:
                    raise UpstreamUnavailable(str(exc)) from None
                conn.close()
                conn = await self._connect(origin)
                conn.send_request(head, body, head_only=head_only)
                try:
                    await conn.read_head()
                except _Silent:
                    raise UpstreamTimeout(f"no response within {self._timeout:g}s") from None
                except _Broken as again:
                    raise UpstreamUnavailable(str(again)) from None
            headers = [(k, v) for k, v in conn.headers if k.lower() not in _DROP_FROM_RESPONSE]
            if conn.status in _NO_BODY:
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            await send({"type": "http.response.start", "status": conn.status, "headers": headers})
            await self._relay_body(conn, send, path)
        finally:
            if conn.finished() and not self._closed:
                conn.idle_since = time.monotonic()
                origin.idle.append(conn)
                self._schedule_sweep()
            else:
                conn.close()  # unfinished (the client left, an error): the upstream stops too
        return conn.status

    async def _relay_body(self, conn: _Connection, send: Send, path: str) -> None:
        try:
            chunk = await conn.read_body()
            while chunk is not None:
                if conn.complete:
                    # The last piece: end the response with it rather than with an empty one.
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await conn.read_body()
        except _Broken as exc:
            raise UpstreamAborted(f"the upstream ended mid-response: {exc}") from None
        except _Silent:
            raise UpstreamAborted(
                f"the upstream sent nothing for {self._timeout:g}s mid-response"
            ) from None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # --- the pool -------------------------------------------------------------------------

    def _ssl_context(self, base_url: str) -> ssl.SSLContext | None:
        if not base_url.startswith("https:"):
            return None
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _acquire(self, origin: _Origin) -> tuple[_Connection, bool]:
        idle = origin.idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_TIMEOUT:
                return conn, True
            conn.close()
        return await self._connect(origin), False

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._timeout),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from None
        return conn

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(KEEPALIVE_TIMEOUT / 2, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than the keep-alive timeout."""
        self._sweeper = None
        deadline = time.monotonic() - KEEPALIVE_TIMEOUT
        pending = False
        for origin in self._origins.values():
            keep = []
            for conn in origin.idle:
                if not conn.closed and conn.idle_since > deadline:
                    keep.append(conn)
                else:
                    conn.close()
            origin.idle[:] = keep
            pending = pending or bool(keep)
        if pending and not self._closed:
            self._schedule_sweep()
