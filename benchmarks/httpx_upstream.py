"""The httpx upstream client that vllm-chill used before aiohttp, kept behind the same small
interface as `vllm_chill.http._upstream.UpstreamClient` so that the benchmark can compare the two
under the same load (`python benchmarks/run.py --variants aiohttp,httpx`). Benchmark-only code.
"""

from __future__ import annotations

import logging

import httpx

from vllm_chill.http._asgi import Scope, Send
from vllm_chill.http._upstream import HOP_BY_HOP, UpstreamUnavailable

log = logging.getLogger("vllm_chill.http._upstream")

_DROP_FROM_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_DROP_FROM_RESPONSE = HOP_BY_HOP | {b"date", b"server"}


class HttpxUpstreamClient:
    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        upstream_api_key: str | None = None,
        strip_client_auth: bool = False,
    ) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
            follow_redirects=False,
            trust_env=False,
        )
        self._auth = (
            (b"authorization", b"Bearer " + upstream_api_key.encode()) if upstream_api_key else None
        )
        # The client's key for the proxy is not the upstream's: never pass it on.
        self._drop = _DROP_FROM_REQUEST | (
            {b"authorization"} if (upstream_api_key or strip_client_auth) else set()
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = self._drop
        named: set[bytes] | None = None
        for key, value in raw:
            if key == b"connection":
                named = {v.strip().lower() for v in value.split(b",")}
        if named:
            drop = drop | named
        headers = [(k, v) for k, v in raw if k not in drop]
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
        query: bytes = scope.get("query_string", b"")
        url = base_url + path + ("?" + query.decode("latin-1") if query else "")
        headers = self.request_headers(scope)
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            response_headers = [
                (k, v) for k, v in response.headers.raw if k.lower() not in _DROP_FROM_RESPONSE
            ]
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response_headers,
                }
            )
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError as exc:
                # The upstream died mid-answer; end the client's response rather than hang it.
                log.warning("upstream ended mid-response url=%s error=%s", path, exc)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
        return response.status_code
