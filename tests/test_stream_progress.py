"""Held streaming completions: answered 200 at once, kept alive with the load's progress, then
the model's own stream; errors as an OpenAI error event. End to end over loopback uvicorn with
the simulated backend (real load phases) or the in-process FakeBackend (set load times and
upstreams), read by a raw httpx stream (arrival times) and by the official `openai` client.

The acceptance check ("a held streaming request during a 20 s load receives bytes at least every
5 s") is about the interval, not the load's length: here the interval is 1 s and the loads are
a few seconds, and every gap between received bytes must stay within the interval plus slack.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import openai
import pytest

from tests.reliability.helpers import (
    Reply,
    Snapshot,
    Stack,
    assert_no_leak,
    chunked,
    openai_error,
    proxy_stack,
)
from tests.support import chat, spec
from tests.test_relay import Handler, raw_upstream, read_request
from vllm_chill import FakeBackend
from vllm_chill.backends.sim._backend import FAIL_LOAD_FLAG, SimBackend

pytestmark = pytest.mark.anyio

#: The keep-alive interval in these tests, and how late a tick may come on a busy machine.
INTERVAL = 1.0
SLACK = 1.0


@dataclass
class Received:
    """A streamed answer as it arrived: its head, when it came, and each chunk with its time
    (seconds since the request was sent)."""

    status: int
    headers: httpx.Headers
    head_at: float
    chunks: list[tuple[float, bytes]]

    @property
    def body(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def gaps(self) -> list[float]:
        times = [self.head_at, *(t for t, _ in self.chunks)]
        return [b - a for a, b in itertools.pairwise(times)]

    def comments(self) -> list[str]:
        return [text for kind, text in events(self.body) if kind == "comment"]

    def data(self) -> list[str]:
        return [text for kind, text in events(self.body) if kind == "data"]


def events(body: bytes) -> list[tuple[str, str]]:
    """("comment", text) and ("data", text) in order, from an SSE body."""
    found = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith(":"):
                found.append(("comment", line[1:].strip()))
            elif line.startswith("data: "):
                found.append(("data", line.removeprefix("data: ")))
    return found


async def stream_raw(url: str, path: str, body: dict[str, Any]) -> Received:
    async with httpx.AsyncClient(timeout=60) as http:
        sent = time.monotonic()
        async with http.stream("POST", url + path, json=body) as response:
            head_at = time.monotonic() - sent
            chunks = [(time.monotonic() - sent, c) async for c in response.aiter_raw() if c]
    return Received(response.status_code, response.headers, head_at, chunks)


def content_of(data: list[str]) -> str:
    """The text of a stream's chunks (chat deltas or completion texts), up to `[DONE]`."""
    assert data[-1] == "[DONE]", data[-3:]
    text = []
    for event in data[:-1]:
        chunk = json.loads(event)
        for choice in chunk["choices"]:
            if chunk["object"] == "chat.completion.chunk":
                text.append(choice["delta"].get("content") or "")
            else:
                text.append(choice["text"])
    return "".join(text)


def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)


async def openai_stream(stack: Stack, **body: Any) -> tuple[str, list[str]]:
    """A streamed chat completion read by the official client: its content and the
    `reasoning_content` of its deltas."""
    async with client(stack) as oai:
        stream = await oai.chat.completions.create(**body, stream=True)
        content, reasoning = [], []
        async for chunk in stream:
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                extra = choice.delta.model_extra or {}
                if extra.get("reasoning_content"):
                    reasoning.append(extra["reasoning_content"])
    return "".join(content), reasoning


async def whole_answer(stack: Stack, body: dict[str, Any]) -> str:
    async with client(stack) as oai:
        answer = await oai.chat.completions.create(**body)
    return answer.choices[0].message.content or ""


@asynccontextmanager
async def sim_stack(load_time: float, **options: Any) -> AsyncIterator[Stack]:
    models = [spec("alpha"), spec("broken", extraArgs=[FAIL_LOAD_FLAG])]
    backend = SimBackend(load_time=load_time, tokens_per_second=0)
    options.setdefault("max_wait", 60)
    options.setdefault("stream_keepalive", INTERVAL)
    async with proxy_stack(models=models, backend=backend, **options) as stack:
        yield stack


async def raw_and_openai(
    stack: Stack, body: dict[str, Any]
) -> tuple[Received, tuple[str, list[str]]]:
    """Two clients held for the same load at once: a raw stream (its arrival times) and the
    official client (what it makes of the stream)."""
    raw: list[Received] = []
    read: list[tuple[str, list[str]]] = []

    async def by_raw() -> None:
        raw.append(await stream_raw(stack.url, "/v1/chat/completions", {**body, "stream": True}))

    async def by_openai() -> None:
        read.append(await openai_stream(stack, **body))

    async with anyio.create_task_group() as tg:
        tg.start_soon(by_raw)
        tg.start_soon(by_openai)
    return raw[0], read[0]


def assert_regular(received: Received) -> None:
    assert received.status == 200
    assert received.head_at < INTERVAL, received.head_at  # answered at once, not after the load
    late = [round(gap, 2) for gap in received.gaps() if gap > INTERVAL + SLACK]
    assert late == [], received.gaps()


# --- a held stream during a load ---------------------------------------------------------------


async def test_a_held_stream_gets_bytes_every_interval_then_the_models_stream() -> None:
    load = 6.0
    body = chat("alpha", max_tokens=8)
    with anyio.fail_after(40):
        async with sim_stack(load) as stack:
            received, read = await raw_and_openai(stack, body)
            expected = await whole_answer(stack, body)

    assert received.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert received.headers["cache-control"] == "no-cache"
    assert received.headers["x-accel-buffering"] == "no"
    assert_regular(received)
    assert received.chunks[-1][0] >= load  # the tokens came after the load
    comments = received.comments()
    assert len(comments) >= load / INTERVAL - 1, comments
    assert all(c.startswith("loading alpha (") and c.endswith("s)") for c in comments), comments
    # The phases are the backend's own, as /proxy/status shows them.
    assert any("waiting for /health" in c for c in comments), comments
    assert content_of(received.data()) == expected
    # The official client reads the same stream as a normal one.
    assert read == (expected, [])
    assert expected


async def test_a_held_completions_stream_gets_comments_too() -> None:
    body = {"model": "alpha", "prompt": "once upon", "max_tokens": 6, "stream": True}
    with anyio.fail_after(30):
        async with sim_stack(2.5, stream_loading_note=True) as stack:
            received = await stream_raw(stack.url, "/v1/completions", body)
            async with client(stack) as oai:
                whole = await oai.completions.create(
                    model="alpha", prompt="once upon", max_tokens=6
                )
    assert_regular(received)
    assert len(received.comments()) >= 2
    # No note on /v1/completions: every data event is the model's own.
    assert content_of(received.data()) == whole.choices[0].text


async def test_the_loading_note_is_reasoning_content_the_openai_client_parses() -> None:
    body = chat("alpha", max_tokens=8)
    with anyio.fail_after(30):
        async with sim_stack(3.0, stream_loading_note=True) as stack:
            received, read = await raw_and_openai(stack, body)
            expected = await whole_answer(stack, body)

    content, reasoning = read
    assert content == expected
    assert reasoning, "no loading note"
    assert all(
        r.startswith("Loading model alpha\u2026 (") and r.endswith("s)\n") for r in reasoning
    )
    assert_regular(received)
    notes = [json.loads(d) for d in received.data() if "chatcmpl-loading-" in d]
    assert notes and all(n["object"] == "chat.completion.chunk" for n in notes)
    assert notes[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(set(n["choices"][0]["delta"]) <= {"role", "reasoning_content"} for n in notes)
    # A note when the phase changes; comments keep the connection alive in between.
    phases = [r.split("(", 1)[1].rsplit(",", 1)[0] for r in reasoning]
    assert len(phases) == len(set(phases)), phases
    model_data = [d for d in received.data() if "chatcmpl-loading-" not in d]
    assert content_of(model_data) == expected


# --- errors after the 200 ----------------------------------------------------------------------


def error_event(received: Received) -> dict[str, Any]:
    """The stream's closing error event (it must be its last data event)."""
    last = json.loads(received.data()[-1])
    assert set(last) == {"error"}, last
    error: dict[str, Any] = last["error"]
    assert {"message", "type", "code"} <= set(error)
    return error


async def test_a_failed_load_ends_the_stream_with_an_error_the_openai_client_raises() -> None:
    body = chat("broken", max_tokens=4)
    with anyio.fail_after(30):
        async with sim_stack(1.5) as stack:
            raw: list[Received] = []
            raised: list[openai.APIError] = []

            async def by_raw() -> None:
                raw.append(
                    await stream_raw(stack.url, "/v1/chat/completions", {**body, "stream": True})
                )

            async def by_openai() -> None:
                with pytest.raises(openai.APIError) as info:
                    await openai_stream(stack, **body)
                raised.append(info.value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(by_raw)
                tg.start_soon(by_openai)
            # The failure's back-off: the next stream is refused at once, the usual 503.
            async with httpx.AsyncClient() as http:
                again = await http.post(
                    stack.url + "/v1/chat/completions", json={**body, "stream": True}
                )

    received = raw[0]
    assert_regular(received)
    error = error_event(received)
    assert error["code"] == "model_switch_failed"
    assert error["message"].startswith("Model 'broken' failed to load: simulated load failure")
    assert error["model"] == "broken"
    assert "[DONE]" not in received.data()
    [exc] = raised
    assert exc.message == error["message"]
    assert isinstance(exc.body, dict) and exc.body["code"] == "model_switch_failed"
    assert again.status_code == 503 and "retry-after" in again.headers
    assert again.json()["error"]["code"] == "model_switch_failed"


async def test_a_non_2xx_answer_of_the_model_ends_the_stream_with_its_error() -> None:
    with anyio.fail_after(30):
        async with sim_stack(1.5) as stack:
            received = await stream_raw(
                stack.url,
                "/v1/chat/completions",
                {"model": "alpha", "messages": [], "stream": True},
            )
    assert_regular(received)
    error = error_event(received)
    assert "messages must be a non-empty list" in error["message"]


@asynccontextmanager
async def fake_stack(backend: FakeBackend, **options: Any) -> AsyncIterator[Stack]:
    options.setdefault("stream_keepalive", 0.5)
    async with proxy_stack(models=[spec("alpha")], backend=backend, **options) as stack:
        yield stack


async def test_an_unreachable_model_server_ends_the_stream_with_upstream_unavailable() -> None:
    backend = FakeBackend(load_time=1.0, base_url="http://127.0.0.1:9")
    with anyio.fail_after(20):
        async with fake_stack(backend, max_wait=10) as stack:
            received = await stream_raw(
                stack.url, "/v1/chat/completions", chat("alpha", stream=True)
            )
    assert received.status == 200
    error = error_event(received)
    assert error["code"] == "upstream_unavailable"
    assert error["message"] == "The server for model 'alpha' is not reachable."


async def test_a_held_stream_waits_past_max_wait_for_its_load() -> None:
    """A 200 that went out cannot be taken back for a 503 the client would retry: the stream
    waits for its load, past --max-wait."""
    with anyio.fail_after(30):
        async with sim_stack(4.0, max_wait=1) as stack:
            received = await stream_raw(
                stack.url, "/v1/completions", {"model": "alpha", "prompt": "x", "stream": True}
            )
    assert_regular(received)
    assert len(received.comments()) >= 3
    assert content_of(received.data())  # the model's tokens, no error event


async def test_a_load_that_runs_past_the_switch_timeout_ends_the_stream_with_its_error() -> None:
    with anyio.fail_after(20):
        async with fake_stack(
            FakeBackend(load_time=30), max_wait=1, model_switch_timeout=2
        ) as stack:
            received = await stream_raw(
                stack.url, "/v1/completions", {"model": "alpha", "prompt": "x", "stream": True}
            )
    assert received.status == 200
    assert len(received.comments()) >= 3
    error = error_event(received)
    assert error["code"] == "model_switch_failed"
    assert "did not become ready within 2s (--model-switch-timeout)" in error["message"]


# --- a switch cutting a held stream ------------------------------------------------------------

#: How long the model's server below keeps its answer back: far past what each test waits.
UPSTREAM_DELAY = 10.0

CUT_MESSAGE = re.compile(
    r"The request for model 'alpha' was stopped: the model is being switched out and the "
    r"drain timeout passed\. Retry in (\d+) s\."
)


def slow_upstream(prelude: bytes, ends: list[str]) -> Handler:
    """A model's server that reads each request, writes `prelude` (when empty: not even its
    head) and keeps the rest back for UPSTREAM_DELAY. `ends` records how each exchange ended:
    "closed" when the proxy closed the connection first, "kept waiting" otherwise."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        writer.write(prelude)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), UPSTREAM_DELAY)  # until the proxy closes
        except TimeoutError:
            ends.append("kept waiting")  # the connection closes with no (whole) answer
        else:
            ends.append("closed")

    return handler


@asynccontextmanager
async def cut_stack(prelude: bytes, ends: list[str]) -> AsyncIterator[Stack]:
    """One slot for "alpha" (answered by `slow_upstream`) and "beta"; a switch cuts what is
    still in flight 0.5 s into its drain."""
    async with raw_upstream(slow_upstream(prelude, ends)) as alpha:
        backend = FakeBackend(load_time=0.5, base_urls={"alpha": alpha})
        async with proxy_stack(
            models=[spec("alpha"), spec("beta")],
            backend=backend,
            max_wait=10,
            stream_keepalive=0.5,
            drain_timeout=0.5,
        ) as stack:
            yield stack


async def switch_to_beta(stack: Stack) -> None:
    reply = await stack.post("/proxy/models/switch", {"model": "beta"})
    assert reply.status == 202, reply


async def after_the_switch(stack: Stack, before: Snapshot) -> None:
    """Nothing counted in flight or waiting any more, beta serving, nothing leaked."""
    await stack.wait_status(
        lambda st: st["requests_in_flight"] == {} and st["requests_waiting"] == {}
    )
    await stack.wait_status(lambda st: st["active_model"] == "beta" and st["phase"] == "ready")
    await assert_no_leak(before, fd_slack=4)


async def test_a_switch_cutting_a_held_stream_before_its_answer_ends_it_with_the_503() -> None:
    """The model was ready but its server had not answered yet: the stream ends with the 503 a
    non-streaming request cut with it gets, as its error event, which the client raises."""
    ends: list[str] = []
    raw: list[Received] = []
    raised: list[openai.APIError] = []
    plain: list[Reply] = []
    with anyio.fail_after(20):
        async with cut_stack(b"", ends) as stack:
            before = Snapshot.take()

            async def by_raw() -> None:
                raw.append(
                    await stream_raw(stack.url, "/v1/chat/completions", chat("alpha", stream=True))
                )

            async def by_openai() -> None:
                with pytest.raises(openai.APIError) as info:
                    await openai_stream(stack, **chat("alpha"))
                raised.append(info.value)

            async def not_streaming() -> None:
                plain.append(await stack.post("/v1/chat/completions", chat("alpha")))

            async with anyio.create_task_group() as tg:
                for ask in (by_raw, by_openai, not_streaming):
                    tg.start_soon(ask)
                # All three relayed (the model is ready), none answered yet.
                await stack.wait_status(lambda st: st["requests_in_flight"] == {"alpha": 3})
                await switch_to_beta(stack)
            await after_the_switch(stack, before)

    assert ends == ["closed"] * 3  # the proxy gave up on the model's server at the cut
    [answer] = plain
    assert answer.status == 503
    expected = openai_error(answer)
    assert expected["code"] == "model_switching_in_progress"
    [received] = raw
    assert_regular(received)
    assert len(received.comments()) >= 2  # the load, then the wait for the model's answer
    assert len(received.data()) == 1  # the error event alone: no [DONE]
    error = error_event(received)
    assert error["retry_after"] >= 1
    # The same error as the non-streaming request's, but for the seconds to wait.
    match = CUT_MESSAGE.fullmatch(error["message"])
    assert match and int(match[1]) == error["retry_after"], error
    assert CUT_MESSAGE.fullmatch(expected["message"]), expected
    unlike = {"message", "retry_after"}
    assert {k: v for k, v in error.items() if k not in unlike} == {
        k: v for k, v in expected.items() if k not in unlike
    }
    assert error["type"] == "model_loading" and error["model"] == "alpha"
    [exc] = raised
    assert CUT_MESSAGE.fullmatch(exc.message), exc.message
    assert isinstance(exc.body, dict) and exc.body["code"] == "model_switching_in_progress"


async def test_a_switch_cutting_a_held_stream_after_its_answer_started_aborts_it() -> None:
    """The model's stream had started: the client's stream breaks off, with no error event and
    no `[DONE]`, never a clean end passed off as the whole answer."""
    first = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"alpha",'
        b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    )
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    prelude = head + b"\r\n" + b"".join(chunked(first, 64)[:-1])  # no last-chunk
    ends: list[str] = []
    body = bytearray()
    with anyio.fail_after(20):
        async with cut_stack(prelude, ends) as stack:
            before = Snapshot.take()
            async with (
                httpx.AsyncClient(timeout=15) as http,
                http.stream(
                    "POST", stack.url + "/v1/chat/completions", json=chat("alpha", stream=True)
                ) as response,
            ):
                assert response.status_code == 200
                chunks = response.aiter_raw()
                while first not in body:  # the comments of the load, then the model's stream
                    body += await chunks.__anext__()
                await switch_to_beta(stack)
                with pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in chunks:
                        body += chunk
            await after_the_switch(stack, before)

    assert ends == ["closed"]
    assert body.endswith(first), bytes(body[-300:])  # nothing of ours after the model's bytes
    assert b"[DONE]" not in body and b'"error"' not in body


# --- what does not change ----------------------------------------------------------------------


async def test_non_streaming_and_unheld_requests_are_answered_as_before() -> None:
    with anyio.fail_after(30):
        async with proxy_stack(load_time=0.5, max_wait=5, stream_keepalive=0.5) as stack:
            # Held, not streaming: the model's own JSON answer after the load.
            reply = await stack.post("/v1/chat/completions", chat("alpha"))
            assert reply.status == 200
            assert reply.header("content-type") == "application/json"
            # Streaming, admitted at once: the model's own head, nothing of ours.
            received = await stream_raw(
                stack.url, "/v1/chat/completions", chat("alpha", stream=True)
            )
            assert received.status == 200
            assert "x-accel-buffering" not in received.headers
            assert received.comments() == []
        async with proxy_stack(load_time=5, max_wait=0.3) as stack:
            # Held, not streaming, and the hold runs out: the 503.
            reply = await stack.post("/v1/chat/completions", chat("alpha"))
            assert reply.status == 503 and reply.header("retry-after")
            assert reply.json()["error"]["code"] == "model_switching_in_progress"
        async with proxy_stack(load_time=5, max_wait=0) as stack:
            # Streaming without --max-wait: the 503 at once.
            reply = await stack.post("/v1/chat/completions", chat("alpha", stream=True))
            assert reply.status == 503 and reply.header("retry-after")
            assert reply.header("content-type") == "application/json"


async def test_streams_refused_at_once_or_with_progress_off_are_answered_as_before() -> None:
    with anyio.fail_after(30):
        async with proxy_stack(load_time=5, max_wait=5, max_waiting=1) as stack:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stack.post, "/v1/chat/completions", chat("alpha"))
                await stack.wait_status(lambda st: st["requests_waiting"] == {"alpha": 1})
                reply = await stack.post("/v1/chat/completions", chat("alpha", stream=True))
                tg.cancel_scope.cancel()
            assert reply.status == 503 and reply.header("retry-after")
            assert reply.json()["error"]["code"] == "too_many_waiting"
        async with proxy_stack(load_time=1, max_wait=5, stream_keepalive=0) as stack:
            # --stream-keepalive 0: held silently; the head is the model's, after the load.
            received = await stream_raw(
                stack.url, "/v1/chat/completions", chat("alpha", stream=True)
            )
            assert received.status == 200
            assert received.head_at >= 1
            assert "x-accel-buffering" not in received.headers
            assert received.comments() == []


# --- the client leaving ------------------------------------------------------------------------


async def test_a_client_leaving_a_held_stream_hands_its_wait_back_once() -> None:
    with anyio.fail_after(30):
        async with proxy_stack(load_time=2.0, max_wait=30, stream_keepalive=0.2) as stack:
            before = Snapshot.take()
            async with (
                httpx.AsyncClient(timeout=10) as http,
                http.stream(
                    "POST", stack.url + "/v1/chat/completions", json=chat("alpha", stream=True)
                ) as response,
            ):
                assert response.status_code == 200
                chunks = response.aiter_raw()
                first = await chunks.__anext__()
                assert first.startswith(b": loading alpha (")
                await stack.wait_status(lambda st: st["requests_waiting"] == {"alpha": 1})
                await chunks.__anext__()  # the ticker runs
            # Left: no longer counted waiting, and the ticker is gone with the request.
            status = await stack.wait_status(lambda st: st["requests_waiting"] == {})
            assert status["requests_in_flight"] == {}
            metrics = (await stack.get("/metrics")).body.decode()
            assert 'vllm_chill_requests_waiting{model="alpha"} 0.0' in metrics
            await stack.wait_status(lambda st: st["phase"] == "ready")
            await assert_no_leak(before, fd_slack=4)
            # A later request works.
            content, _ = await openai_stream(stack, **chat("alpha", max_tokens=4))
            assert content
            status = await stack.status()
            assert status["requests_waiting"] == {} and status["requests_in_flight"] == {}


async def test_a_held_stream_still_open_when_the_server_stops_ends_with_an_error() -> None:
    received: list[Received] = []

    async def read(url: str) -> None:
        received.append(await stream_raw(url, "/v1/chat/completions", chat("alpha", stream=True)))

    with anyio.fail_after(30):
        async with (
            anyio.create_task_group() as tg,
            fake_stack(FakeBackend(load_time=60), max_wait=60) as stack,
        ):
            tg.start_soon(read, stack.url)
            await stack.wait_status(lambda st: st["requests_waiting"] == {"alpha": 1})
            # Leaving the stack stops the server: it gives up on the held stream after its
            # graceful timeout, and the stream ends with the shutdown's error, not a cut.
    error = error_event(received[0])
    assert error["code"] == "not_ready"
    assert error["retry_after"] == 5
