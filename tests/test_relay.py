"""The relay's own HTTP client and the interruption of a proxied request, end to end: a real
uvicorn proxy on loopback, simulated vLLM upstreams, and raw asyncio upstreams for the HTTP
framings and connection behaviours a library client used to handle for us."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from tests.configs import make_settings
from tests.servers import serve
from tests.support import chat, spec
from vllm_chill import FakeBackend, ModelSwitchMiddleware, StaticRegistry
from vllm_chill.backends.sim._server import SimModelServer

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def proxy_to(
    base_urls: dict[str, str], *, preloaded: str | None = None, **options: Any
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The proxy in front of one upstream per model; yields its URL and a client."""
    options.setdefault("min_residency", 0.0)
    backend = FakeBackend(base_urls=base_urls, preloaded=preloaded)
    proxy = ModelSwitchMiddleware(
        registry=StaticRegistry(spec(m) for m in base_urls),
        backend=backend,
        settings=make_settings(**options),
    )
    async with serve(proxy) as url, httpx.AsyncClient(timeout=30) as http:
        yield url, http


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_upstream(handler: Handler) -> AsyncIterator[str]:
    """A bare TCP server on loopback, answering with whatever bytes `handler` writes.

    Each connection is closed once its handler returns, and a handler still running when the
    server stops (one that stalls on purpose) is cancelled: asyncio's server closes neither.
    """
    connections: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            pass  # the server stopping: the end of this connection, not an error to log
        finally:
            connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in connections:
            task.cancel()
        with anyio.fail_after(5):
            await asyncio.gather(*connections)
            await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and Content-Length body); None when the client closed first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@asynccontextmanager
async def proxy_to_raw(handler: Handler) -> AsyncIterator[tuple[str, str, httpx.AsyncClient]]:
    """The proxy in front of a raw upstream for model "alpha", loaded."""
    async with (
        raw_upstream(handler) as upstream,
        proxy_to({"alpha": upstream}, preloaded="alpha") as (url, http),
    ):
        yield upstream, url, http


JSON_ANSWER = b'{"id":"x","object":"chat.completion","model":"alpha","choices":[]}'


def fixed(status_line: bytes, headers: list[bytes], body: bytes) -> bytes:
    return status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


# --- interrupting a proxied request -----------------------------------------------------------


async def test_drain_timeout_cuts_a_stream_and_the_switch_goes_on() -> None:
    async with AsyncExitStack() as stack:
        sims = {
            name: await stack.enter_async_context(
                SimModelServer(name, load_time=0, tokens_per_second=5)
            )
            for name in ("alpha", "beta")
        }
        url, http = await stack.enter_async_context(
            proxy_to({n: s.base_url for n, s in sims.items()}, max_wait=10, drain_timeout=0.5)
        )
        body = chat("alpha", stream=True, max_tokens=500)  # 100 s at 5 tokens/s
        with anyio.fail_after(20):
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                await anext(lines)
                switch = await http.post(url + "/proxy/models/switch", json={"model": "beta"})
                assert switch.status_code == 202
                with pytest.raises(httpx.HTTPError):  # cut: the stream ends unfinished
                    async for _ in lines:
                        pass
            await sims["alpha"].stats.wait_until(lambda st: st.disconnected == 1)
            answer = await http.post(url + "/v1/chat/completions", json=chat("beta"))
        assert answer.status_code == 200 and answer.json()["model"] == "beta"
        status = (await http.get(url + "/proxy/status")).json()
        assert status["requests_in_flight"] == {}
        metrics = (await http.get(url + "/metrics")).text
        assert 'vllm_chill_requests_total{model="alpha",status="499"} 1.0' in metrics


async def test_client_leaving_a_non_streaming_request_cancels_it_upstream() -> None:
    async with (
        SimModelServer("alpha", load_time=0, tokens_per_second=5) as sim,
        proxy_to({"alpha": sim.base_url}, preloaded="alpha") as (url, http),
    ):
        body = chat("alpha", max_tokens=500)  # answered only after 100 s
        with pytest.raises(httpx.ReadTimeout):
            await http.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        with anyio.fail_after(10):
            await sim.stats.wait_until(lambda st: st.disconnected == 1 and st.in_flight == 0)
        status = (await http.get(url + "/proxy/status")).json()
        assert status["requests_in_flight"] == {}
        # The proxy still serves, on a fresh upstream connection.
        quick = await http.post(url + "/v1/chat/completions", json=chat("alpha", max_tokens=1))
        assert quick.status_code == 200


# --- the upstream client ----------------------------------------------------------------------


async def test_keep_alive_connections_are_reused() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await read_request(reader) is not None:
            headers = [b"Content-Type: application/json", b"Content-Length: %d" % len(JSON_ANSWER)]
            writer.write(fixed(b"HTTP/1.1 200 OK", headers, JSON_ANSWER))
        writer.close()

    async with proxy_to_raw(handler) as (_upstream, url, http):
        for _ in range(5):
            r = await http.post(url + "/v1/chat/completions", json=chat("alpha"))
            assert r.status_code == 200 and r.content == JSON_ANSWER
    assert connections == 1


async def test_a_pooled_connection_the_upstream_dropped_is_retried_on_a_fresh_one() -> None:
    """The race every keep-alive client meets: the server closes an idle connection just as a
    request goes out on it. Nothing was answered, so the request is sent again once."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if await read_request(reader) is not None:
            headers = [b"Content-Length: %d" % len(JSON_ANSWER)]
            writer.write(fixed(b"HTTP/1.1 200 OK", headers, JSON_ANSWER))
            await read_request(reader)  # the next request on this connection: dropped unread
        writer.close()

    async with proxy_to_raw(handler) as (_upstream, url, http):
        for _ in range(3):
            r = await http.post(url + "/v1/chat/completions", json=chat("alpha"))
            assert r.status_code == 200 and r.content == JSON_ANSWER
    assert connections == 3


@pytest.mark.parametrize(
    "answer",
    [
        # chunked, with an interim 103 before the final answer
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        # no length at all: the body ends when the connection does
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world",
    ],
    ids=["chunked-after-103", "close-delimited"],
)
async def test_response_framings_are_relayed_whole(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with proxy_to_raw(handler) as (_upstream, url, http):
        for _ in range(2):  # the second on a fresh connection: the first was closed
            r = await http.post(url + "/v1/chat/completions", json=chat("alpha"))
            assert r.status_code == 200 and r.content == b"hello world"


async def test_an_upstream_that_answers_garbage_is_a_502() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        writer.close()

    async with proxy_to_raw(handler) as (_upstream, url, http):
        r = await http.post(url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unavailable"


async def test_the_request_reaches_the_upstream_reframed_with_its_own_headers() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request is not None
        seen.append(request)
        writer.write(fixed(b"HTTP/1.1 204 No Content", [b"X-Up: 1"], b""))
        await writer.drain()
        writer.close()

    async with proxy_to_raw(handler) as (upstream, url, http):
        r = await http.post(
            url + "/v1/chat/completions?a=%3F&b=2",
            content=b'{"model": "alpha"}',
            headers={"x-custom": "kept", "connection": "keep-alive, x-hop", "x-hop": "gone"},
        )
        assert r.status_code == 204 and r.headers["x-up"] == "1"
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?a=%3F&b=2 HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers[b"host"] == upstream.removeprefix("http://").encode()
    assert headers[b"x-custom"] == b"kept"
    assert b"x-hop" not in headers and b"connection" not in headers
    assert headers[b"content-length"] == b"18" and body == b'{"model": "alpha"}'


# --- errors at the edges of a switch --------------------------------------------------------


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 204 No Content"])
async def test_a_bodiless_answer_with_a_content_length_is_relayed_without_an_error(
    status_line: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(status_line + b"\r\nContent-Length: 42\r\nETag: x\r\n\r\n")
            await writer.drain()

    async with proxy_to_raw(handler) as (_upstream, url, http):
        for _ in range(2):
            r = await http.post(url + "/v1/chat/completions", json=chat("alpha"))
            assert r.status_code == int(status_line.split()[1]) and r.content == b""
    assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]


async def test_a_request_cut_before_its_answer_started_gets_an_openai_shaped_503() -> None:
    """The drain timeout cuts a request still waiting for its first byte: the client gets the
    switch's 503 with a Retry-After, never the server's plain-text 500."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with AsyncExitStack() as stack:
        alpha = await stack.enter_async_context(raw_upstream(silent))
        beta = await stack.enter_async_context(SimModelServer("beta", load_time=0))
        url, http = await stack.enter_async_context(
            proxy_to({"alpha": alpha, "beta": beta.base_url}, preloaded="alpha", drain_timeout=0.3)
        )
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                answers: list[httpx.Response] = []

                async def ask() -> None:
                    answers.append(
                        await http.post(url + "/v1/chat/completions", json=chat("alpha"))
                    )

                tg.start_soon(ask)
                await anyio.sleep(0.2)
                switch = await http.post(url + "/proxy/models/switch", json={"model": "beta"})
                assert switch.status_code == 202
        (answer,) = answers
        assert answer.status_code == 503
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]["code"] == "model_switching_in_progress"
        status = (await http.get(url + "/proxy/status")).json()
        assert status["requests_in_flight"] == {}


async def test_an_answer_that_stalls_after_it_started_is_aborted_by_the_upstream_timeout() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async with (
        raw_upstream(stalls) as upstream,
        proxy_to({"alpha": upstream}, preloaded="alpha", upstream_timeout=0.5) as (url, http),
    ):
        with anyio.fail_after(10):
            async with http.stream("POST", url + "/v1/chat/completions", json=chat("alpha")) as r:
                assert r.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in r.aiter_bytes():
                        pass
        status = (await http.get(url + "/proxy/status")).json()
        assert status["requests_in_flight"] == {}
