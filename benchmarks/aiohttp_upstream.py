"""The aiohttp upstream client that vllm-chill used before its own (vllm_chill/http/_upstream.py),
kept behind the same small interface so that the benchmark can compare them under the same
load (`python benchmarks/run.py --variants native,aiohttp,httpx`). Benchmark-only code.
"""

from __future__ import annotations

import logging

import aiohttp
from yarl import URL

from vllm_chill.http._asgi import Scope, Send
from vllm_chill.http._upstream import HOP_BY_HOP, UpstreamUnavailable

log = logging.getLogger("vllm_chill.http._upstream")

_DROP_FROM_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_DROP_FROM_RESPONSE = HOP_BY_HOP | {b"date", b"server"}
#: aiohttp adds these unless told not to; the client's own values are forwarded instead.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class AiohttpUpstreamClient:
    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        upstream_api_key: str | None = None,
        strip_client_auth: bool = False,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._auth = ("Authorization", "Bearer " + upstream_api_key) if upstream_api_key else None
        # The client's key for the proxy is not the upstream's: never pass it on.
        self._drop = _DROP_FROM_REQUEST | (
            {b"authorization"} if (upstream_api_key or strip_client_auth) else set()
        )

    def _open(self) -> aiohttp.ClientSession:
        # Created lazily, inside the running loop that will use it.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, connect=self._connect_timeout
            ),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            trust_env=False,
        )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request_headers(self, scope: Scope) -> list[tuple[str, str]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = self._drop
        for key, value in raw:
            if key == b"connection":  # headers the client named as hop-by-hop
                drop = drop | {v.strip().lower() for v in value.split(b",")}
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k not in drop]
        if self._auth is not None:
            headers.append(self._auth)
        return headers

    async def forward(
        self,
        scope: Scope,
        send: Send,
        *,
        base_url: str,
        path: str,
        body: bytes,
    ) -> int:
        """Relay the request; return the upstream's status. Raises `UpstreamUnavailable`
        before any byte was sent to the client, never after."""
        session = self._session or self._open()
        query: bytes = scope.get("query_string", b"")
        url = base_url + path + ("?" + query.decode("latin-1") if query else "")
        headers = self.request_headers(scope)
        try:
            response = await session.request(
                scope["method"],
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k, v)
                        for k, v in response.raw_headers
                        if k.lower() not in _DROP_FROM_RESPONSE
                    ],
                }
            )
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The upstream died mid-answer; end the client's response rather than hang it.
                log.warning("upstream ended mid-response path=%s error=%s", path, exc)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.release()
        return response.status
