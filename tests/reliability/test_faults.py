"""Faults around a running proxy: an upstream that dies mid-stream or never answers, the proxy
restarting during a load, a thousand held clients leaving at once.

After each: no request hangs (every wait is under `fail_after`), no task or descriptor is left
(counted before and after, see `assert_no_leak`), and `/proxy/status` tells the truth.

Descriptor slack, where one is allowed while the proxy still runs: the proxy keeps idle
keep-alive connections to an upstream in its pool (that is the point of a pool), and both ends
of a loopback connection are descriptors of this one process. The tests that allow slack say
how many such connections they can leave; once the stack is closed, the count must be back
exactly where it started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import anyio
import pytest

from tests.support import chat, spec
from vllm_chill import FakeBackend
from vllm_chill.backends.sim._backend import SimBackend

from .helpers import (
    MODELS,
    NoReply,
    Snapshot,
    assert_no_leak,
    build_request,
    proxy_stack,
    send_raw,
)

pytestmark = pytest.mark.anyio

BODY = json.dumps(chat("alpha", max_tokens=2)).encode()


# --- the upstream dies mid-stream -------------------------------------------------------------


async def test_upstream_dying_mid_stream_aborts_the_response_and_the_next_reloads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    start = Snapshot.take()
    backend = SimBackend(load_time=0.05, tokens_per_second=20)
    models = [spec(m) for m in MODELS]
    async with (
        proxy_stack(models=models, backend=backend, max_wait=10) as stack,
        aiohttp.ClientSession() as http,
    ):
        url = stack.url + "/v1/chat/completions"
        async with http.post(url, json=chat("alpha", max_tokens=2)) as r:
            assert r.status == 200
        first_server = backend.server
        running = Snapshot.take()

        received = b""
        with anyio.fail_after(10):
            async with http.post(url, json=chat("alpha", stream=True, max_tokens=200)) as r:
                assert r.status == 200
                # The client sees a broken response (the chunked body never terminated), not
                # an answer that looks whole but stops early.
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for chunk in r.content.iter_any():
                        received += chunk
                        if received.count(b"data: ") == 2:
                            await backend.crash("the vLLM pod was deleted")
        assert b"data: [DONE]" not in received
        assert received.count(b"data: ") >= 2

        status = await stack.wait_status(lambda st: st["phase"] == "idle")
        assert status["active_model"] is None and status["requests_in_flight"] == {}
        with anyio.fail_after(10):
            async with http.post(url, json=chat("alpha", max_tokens=2)) as r:
                assert r.status == 200 and (await r.json())["model"] == "alpha"
        assert backend.server is not None and backend.server is not first_server  # reloaded
        status = await stack.status()
        assert (status["active_model"], status["phase"]) == ("alpha", "ready")
        assert status["requests_in_flight"] == {} and status["requests_waiting"] == {}
        # One pooled connection from the client and one from the proxy to the new server may
        # remain open: 2 connections x 2 ends.
        await assert_no_leak(running, fd_slack=4)
    await assert_no_leak(start)
    ours = [r for r in caplog.records if r.name.startswith("vllm_chill")]
    assert not [r for r in ours if r.exc_info or "internal error" in r.getMessage()]
    assert any("response aborted" in r.getMessage() for r in ours)


# --- the upstream accepts and never answers ---------------------------------------------------


@dataclass
class SilentServer:
    """Accepts connections, reads whatever comes, never writes a byte."""

    port: int = 0
    accepted: int = 0
    open: int = 0
    closed: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()
            if not self.open:
                self.closed.set()


@asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    silent = SilentServer()
    server = await asyncio.start_server(silent.handle, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    try:
        yield silent
    finally:
        server.close()
        await server.wait_closed()


async def test_upstream_that_never_answers_is_let_go_when_the_clients_give_up() -> None:
    start = Snapshot.take()
    async with silent_server() as silent:
        backend = FakeBackend(base_url=f"http://127.0.0.1:{silent.port}")
        async with proxy_stack(models=[spec("alpha")], backend=backend, max_wait=5) as stack:
            ready = await stack.post("/proxy/models/switch", {"model": "alpha"})
            assert ready.status in (200, 202)
            await stack.wait_status(lambda st: st["phase"] == "ready")
            running = Snapshot.take()

            async def impatient(_: int) -> None:
                # The client waits half a second for an answer, then hangs up.
                with pytest.raises(TimeoutError):
                    await send_raw(
                        stack.port,
                        build_request("POST", "/v1/chat/completions", body=BODY),
                        timeout=0.5,
                    )

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for i in range(20):
                        tg.start_soon(impatient, i)
                # Each upstream request was cancelled: the proxy closed every connection it
                # had opened to the silent server (none is kept: none finished).
                await silent.closed.wait()
            assert silent.accepted == 20 and silent.open == 0
            status = await stack.wait_status(lambda st: st["requests_in_flight"] == {})
            assert (status["active_model"], status["phase"]) == ("alpha", "ready")
            await assert_no_leak(running)
    await assert_no_leak(start)


async def test_upstream_timeout_answers_504_and_frees_the_model() -> None:
    """An upstream that accepts and never answers: after --upstream-timeout the client gets an
    OpenAI-shaped 504, the request stops counting in flight, so the model can idle out."""
    async with silent_server() as silent:
        backend = FakeBackend(base_url=f"http://127.0.0.1:{silent.port}")
        async with proxy_stack(
            models=[spec("alpha")], backend=backend, upstream_timeout=0.5, idle_timeout=1.0
        ) as stack:
            await stack.post("/proxy/models/switch", {"model": "alpha"})
            await stack.wait_status(lambda st: st["phase"] == "ready")
            with anyio.fail_after(10):
                reply = await send_raw(
                    stack.port, build_request("POST", "/v1/chat/completions", body=BODY)
                )
            assert reply.status == 504
            error = json.loads(reply.body)["error"]
            assert error["code"] == "upstream_timeout" and error["type"] == "timeout_error"
            await silent.closed.wait()
            final = await stack.wait_status(lambda st: st["phase"] == "idle", timeout=10)
            assert final["requests_in_flight"] == {}


# --- an upstream closing a kept-alive connection ----------------------------------------------


@dataclass
class ClosingUpstream:
    """Answers the first request of each connection, keep-alive; reads the second and closes
    without answering: a vLLM whose keep-alive timer (uvicorn's 5 s) fired just as the proxy
    reused the connection. Records what it received."""

    port: int = 0
    received: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for index in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.received.append("answered" if index == 0 else "dropped")
                if index == 1:
                    break
                body = b'{"model":"alpha"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_kept_alive_connection_closed_by_the_upstream_is_not_a_502() -> None:
    """The race the load test hit: the proxy picks a pooled connection as the upstream closes
    it. Nothing of the request was answered, so it goes again on a fresh connection."""
    start = Snapshot.take()
    upstream = ClosingUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        backend = FakeBackend(base_url=f"http://127.0.0.1:{upstream.port}")
        async with proxy_stack(models=[spec("alpha")], backend=backend, max_wait=5) as stack:
            head = build_request("POST", "/v1/chat/completions", body=BODY)
            for _ in range(3):
                reply = await send_raw(stack.port, head)
                assert reply.status == 200, reply
    finally:
        server.close()
        await server.wait_closed()
    assert upstream.received == ["answered", "dropped", "answered", "dropped", "answered"]
    await assert_no_leak(start)


# --- the proxy restarts during a load ---------------------------------------------------------


async def held_during_a_restart(port: int, outcomes: list[str]) -> None:
    """A client held for a model while the proxy shuts down: what did it get?"""
    try:
        reply = await send_raw(
            port, build_request("POST", "/v1/chat/completions", body=BODY), timeout=20
        )
    except NoReply:
        outcomes.append("disconnected")
    else:
        code = reply.json()["error"]["code"] if reply.status == 503 else reply.body.decode()
        outcomes.append(f"{reply.status} {code}")


async def test_proxy_restarting_during_a_load_lets_every_held_client_go_and_loads_again() -> None:
    start = Snapshot.take()
    models = [spec(m) for m in MODELS]
    outcomes: list[str] = []
    first = SimBackend(load_time=30, tokens_per_second=0)  # a load that will not finish
    with anyio.fail_after(20):
        async with anyio.create_task_group() as clients:
            async with proxy_stack(models=models, backend=first, max_wait=60) as stack:
                for _ in range(5):
                    clients.start_soon(held_during_a_restart, stack.port, outcomes)
                await stack.wait_status(lambda st: st["requests_waiting"] == {"alpha": 5})
                assert first.server is not None and first.server.running
                loading = first.server
            # The proxy is gone: the half-loaded model server went with it...
            assert not loading.running and first.server is None
        # ...and every held client was let go (how: see the next test), none hangs.
    assert len(outcomes) == 5

    second = SimBackend(load_time=0.05, tokens_per_second=0)  # the restarted proxy
    async with proxy_stack(models=models, backend=second, max_wait=10) as stack:
        reply = await send_raw(
            stack.port, build_request("POST", "/v1/chat/completions", body=BODY), timeout=10
        )
        assert reply.status == 200 and reply.json()["model"] == "alpha"
        status = await stack.status()
        assert (status["active_model"], status["phase"]) == ("alpha", "ready")
    await assert_no_leak(start)


async def test_clients_held_when_the_proxy_stops_get_a_503_not_a_500() -> None:
    outcomes: list[str] = []
    backend = FakeBackend(load_time=30)
    with anyio.fail_after(20):
        async with (
            anyio.create_task_group() as clients,
            proxy_stack(backend=backend, max_wait=60) as stack,
        ):
            clients.start_soon(held_during_a_restart, stack.port, outcomes)
            await stack.wait_status(lambda st: st["requests_waiting"] == {"alpha": 1})
    assert len(outcomes) == 1
    assert outcomes[0].startswith("503 "), outcomes


# --- a thousand held clients leave at once ----------------------------------------------------

CLIENTS = 1000


async def test_a_thousand_waiting_clients_disconnecting_at_once() -> None:
    start = Snapshot.take()
    gate = anyio.Event()
    async with proxy_stack(max_wait=120, max_waiting=CLIENTS + 100) as stack:
        backend = stack.backend
        assert isinstance(backend, FakeBackend)
        backend.gate = gate  # the load of alpha will not finish until the gate opens
        running = Snapshot.take()
        head = build_request("POST", "/v1/chat/completions", body=BODY)
        writers: list[asyncio.StreamWriter] = []
        try:
            with anyio.fail_after(30):
                for _ in range(CLIENTS):
                    _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
                    writers.append(writer)
                    writer.write(head)
                await stack.wait_status(lambda st: st["requests_waiting"] == {"alpha": CLIENTS})
        finally:
            for writer in writers:  # all at once: no await between the closes
                writer.close()
        with anyio.fail_after(10):
            status = await stack.wait_status(lambda st: st["requests_waiting"] == {})
        assert status["phase"] == "loading" and status["active_model"] == "alpha"
        metrics = (await stack.get("/metrics")).body.decode()
        assert 'vllm_chill_requests_waiting{model="alpha"} 0.0' in metrics

        gate.set()  # the load carries on for whoever comes next
        status = await stack.wait_status(lambda st: st["phase"] == "ready")
        assert status["active_model"] == "alpha" and status["requests_in_flight"] == {}
        reply = await send_raw(stack.port, head, timeout=10)
        assert reply.status == 200 and reply.json()["model"] == "alpha"
        await assert_no_leak(running, fd_slack=2)  # the proxy's pooled connection to alpha
    await assert_no_leak(start)
