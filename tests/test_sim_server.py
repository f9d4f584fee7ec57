"""The simulated vLLM server, driven over real loopback HTTP by the official `openai` client."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.support import free_port
from vllm_chill.backends.sim import SimModelServer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
MODEL = "sim-model"


@pytest.fixture
async def server() -> AsyncIterator[SimModelServer]:
    async with SimModelServer(MODEL, load_time=0, tokens_per_second=0) as sim:
        with anyio.fail_after(5):
            assert await sim.wait_ready()
        yield sim


@pytest.fixture
async def http(server: SimModelServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as client:
        yield client


@pytest.fixture
async def client(server: SimModelServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0) as oai:
        yield oai


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking vLLM's framing on the way."""
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    return [frame.removeprefix("data: ") for frame in frames[:-1]]


async def test_health_is_503_while_loading_then_200_with_empty_body() -> None:
    async with (
        SimModelServer(MODEL, load_time=1.0) as sim,
        httpx.AsyncClient(base_url=sim.base_url, trust_env=False) as http,
    ):
        loading = await http.get("/health")
        assert loading.status_code == 503
        assert not sim.ready
        models = await http.get("/v1/models")
        assert models.status_code == 503
        assert models.json()["error"]["code"] == 503
        with anyio.fail_after(10):
            assert await sim.wait_ready()
        healthy = await http.get("/health")
        assert healthy.status_code == 200
        assert healthy.content == b""


async def test_models_lists_the_served_name_like_vllm(client: AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "vllm"
    assert models[0].model_extra is not None
    assert models[0].model_extra["max_model_len"] == 8192


async def test_chat_completion_whole_and_streamed_say_the_same(client: AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me about foxes"}
    ]
    whole = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=7,
    )
    assert whole.model == MODEL
    assert whole.object == "chat.completion"
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 7
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 7
    assert choice.message.content and len(choice.message.content.split()) == 7

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {MODEL}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert len(content_chunks) == 1 + 7  # the role chunk, then one chunk per token
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == choice.message.content


async def test_stream_without_usage_option_has_no_usage_chunk(http: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    assert len(chunks) == 1 + 16  # the default max_tokens


async def test_completions_whole_streamed_and_several_prompts(client: AsyncOpenAI) -> None:
    whole = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert whole.model == MODEL
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 5

    stream = await client.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {MODEL}
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) == 5
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5

    several = await client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.usage is not None
    assert several.usage.completion_tokens == 6


async def test_embeddings_are_deterministic_unit_vectors(
    client: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    # The openai client asks for base64 by default and decodes it.
    first = await client.embeddings.create(model=MODEL, input=["alpha", "beta"])
    assert first.model == MODEL
    assert [d.index for d in first.data] == [0, 1]
    alpha, beta = first.data[0].embedding, first.data[1].embedding
    assert alpha != beta
    assert math.isclose(sum(v * v for v in alpha), 1.0, rel_tol=1e-5)

    again = await http.post(
        "/v1/embeddings", json={"model": MODEL, "input": "alpha", "encoding_format": "float"}
    )
    assert again.json()["data"][0]["embedding"] == alpha

    raw = await http.post(
        "/v1/embeddings",
        json={"input": "alpha", "encoding_format": "base64", "dimensions": 8},
    )
    assert len(base64.b64decode(raw.json()["data"][0]["embedding"])) == 8 * 4


async def test_other_model_names_get_vllms_404(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(
            model="not-served", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": "The model `not-served` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "max_tokens": 0}'),
        ("/v1/completions", b'{"prompt": 42}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}'),
        ("/v1/embeddings", b'{"input": []}'),
        ("/detokenize", b'{"tokens": [-1]}'),
    ],
)
async def test_bad_requests_get_openai_shaped_400(
    http: httpx.AsyncClient, path: str, body: bytes
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400
    assert error["type"] == "BadRequestError"
    assert error["message"]


async def test_unknown_path_and_wrong_method_like_fastapi(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v1/nope")).status_code == 404
    wrong = await http.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


async def test_tokenize_and_detokenize_round_trip(http: httpx.AsyncClient) -> None:
    tokens = await http.post("/tokenize", json={"model": MODEL, "prompt": "héllo"})
    assert tokens.status_code == 200
    assert tokens.json()["count"] == len(tokens.json()["tokens"])
    text = await http.post("/detokenize", json={"model": MODEL, "tokens": tokens.json()["tokens"]})
    assert text.json() == {"prompt": "héllo"}
    wrong = await http.post("/tokenize", json={"model": "other", "prompt": "x"})
    assert wrong.status_code == 404


async def test_audio_transcription_reads_the_multipart_model_field(client: AsyncOpenAI) -> None:
    result = await client.audio.transcriptions.create(
        model=MODEL, file=("clip.wav", b"RIFF....WAVEfmt fake audio")
    )
    assert result.text
    with pytest.raises(openai.NotFoundError):
        await client.audio.transcriptions.create(model="other", file=("clip.wav", b"x"))


async def test_api_key_guards_v1_only_like_vllm() -> None:
    async with SimModelServer(MODEL, load_time=0, api_key="s3cret") as sim:
        with anyio.fail_after(5):
            await sim.wait_ready()
        async with httpx.AsyncClient(base_url=sim.base_url, trust_env=False) as http:
            assert (await http.get("/health")).status_code == 200
            refused = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert refused.status_code == 401
            assert "s3cret" not in refused.text
        async with AsyncOpenAI(base_url=f"{sim.base_url}/v1", api_key="wrong") as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        async with AsyncOpenAI(base_url=f"{sim.base_url}/v1", api_key="s3cret") as good:
            assert [m.id async for m in good.models.list()] == [MODEL]


async def test_client_disconnect_mid_stream_reaches_the_server() -> None:
    async with (
        SimModelServer(MODEL, load_time=0, tokens_per_second=20) as sim,
        httpx.AsyncClient(base_url=sim.base_url, trust_env=False) as http,
    ):
        with anyio.fail_after(10):
            await sim.wait_ready()
            body = {"prompt": "x", "max_tokens": 1000, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # one token, then hang up
            await sim.stats.wait_until(lambda s: s.disconnected == 1 and s.in_flight == 0)
        assert sim.stats.completed == 0


async def test_stop_cuts_open_streams_promptly_and_frees_the_port() -> None:
    sim = SimModelServer(MODEL, load_time=0, tokens_per_second=5)
    url = await sim.start()
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            with anyio.fail_after(10):
                await sim.wait_ready()
                body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}
                async with http.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}
                ) as response:
                    lines = response.aiter_lines()
                    assert (await anext(lines)).startswith("data: ")
                    with anyio.fail_after(5):  # fails fast, not after a 200 s stream
                        await sim.stop()
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for _ in lines:
                            pass
            assert sim.stats.aborted == 1
            assert not sim.running
            with pytest.raises(httpx.ConnectError):
                await http.get("/health")
    finally:
        await sim.stop()


async def test_fail_load_exits_instead_of_becoming_healthy() -> None:
    async with SimModelServer(MODEL, load_time=0.1, fail_load=True) as sim:
        with anyio.fail_after(10):
            assert not await sim.wait_ready()
        assert not sim.ready


async def wait_healthy(url: str, process: anyio.abc.Process) -> None:
    """Poll like a process backend must: the child is another process, there is no event."""
    async with httpx.AsyncClient(trust_env=False) as http:
        delay = 0.05
        while True:
            assert process.returncode is None, "the simulator exited while starting"
            try:
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)


def sim_command(port: int, *extra: str) -> list[str]:
    # Shaped like the local backend's template, with vLLM flags the simulator must ignore.
    return [
        sys.executable, "-m", "vllm_chill.backends.sim", "org/Some-Model",
        "--served-model-name", "some-model", "--dtype", "auto", "--enable-prefix-caching",
        "--tensor-parallel-size", "1", "--max-model-len", "4096",
        "--sim-load-time", "200ms", "--sim-tokens-per-second", "0",
        "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


async def test_python_m_vllm_chill_sim_serves_until_sigterm() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with await anyio.open_process(sim_command(port), cwd=REPO, env=child_env()) as process:
        try:
            with anyio.fail_after(30):
                await wait_healthy(url, process)
            async with AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as oai:
                models = [m async for m in oai.models.list()]
                assert [m.id for m in models] == ["some-model"]
                assert models[0].model_extra is not None
                assert models[0].model_extra["root"] == "org/Some-Model"
                assert models[0].model_extra["max_model_len"] == 4096
                reply = await oai.chat.completions.create(
                    model="some-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )
                assert reply.model == "some-model"
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
        assert process.stderr is not None
        stderr = b"".join([chunk async for chunk in process.stderr])
        assert b"Application startup complete." in stderr


async def test_python_m_vllm_chill_sim_fail_load_exits_1() -> None:
    command = sim_command(free_port(), "--sim-fail-load")
    with anyio.fail_after(30):
        result = await anyio.run_process(command, cwd=REPO, env=child_env(), check=False)
    assert result.returncode == 1
    assert b"simulated load failure" in result.stderr
