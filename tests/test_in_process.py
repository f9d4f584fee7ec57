"""The whole proxy inside the test's event loop: clients through `httpx.ASGITransport`, models
as in-process simulated vLLM apps through `vllm_chill.testing.ASGIUpstream`. No socket, no
server: what the end-to-end tests check over loopback, at a fraction of the cost."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import openai
import pytest

from tests.configs import make_settings
from tests.support import spec
from vllm_chill import ModelSwitchMiddleware, StaticRegistry
from vllm_chill.backends.sim._app import SimApp
from vllm_chill.testing import ASGIUpstream, FakeBackend

pytestmark = pytest.mark.anyio

MODELS = ("alpha", "beta")


@asynccontextmanager
async def in_process(
    **options: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend, ModelSwitchMiddleware]]:
    apps = {}
    for name in MODELS:
        app = SimApp(name, tokens_per_second=0, root=f"org/{name}")
        app.ready = True
        apps[f"http://{name}.models"] = app
    backend = FakeBackend(base_urls={n: f"http://{n}.models" for n in MODELS})
    proxy = ModelSwitchMiddleware(
        registry=StaticRegistry(spec(m) for m in MODELS),
        backend=backend,
        transport=ASGIUpstream(apps),
        settings=make_settings(**options),
    )
    async with (
        proxy.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://proxy") as c,
    ):
        yield c, backend, proxy


async def test_a_held_request_is_answered_by_the_model_it_names() -> None:
    async with in_process(max_wait=10) as (_, backend, proxy):
        # The official client brings its own httpx: give it the same in-process transport.
        http = openai.DefaultAsyncHttpxClient(transport=httpx2.ASGITransport(app=proxy))
        sdk = openai.AsyncOpenAI(base_url="http://proxy/v1", api_key="x", http_client=http)
        for model in ("alpha", "beta", "alpha"):
            answer = await sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert answer.model == model
        assert backend.loads == ["alpha", "beta", "alpha"]


async def test_a_stream_is_relayed_event_by_event() -> None:
    async with in_process(max_wait=10) as (http, _, _):
        body = {
            "model": "beta",
            "stream": True,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert {c["model"] for c in chunks} == {"beta"}


async def test_not_held_the_first_request_gets_the_loading_503() -> None:
    async with in_process() as (http, _, _):
        r = await http.post("/v1/chat/completions", json={"model": "alpha", "messages": []})
        assert r.status_code == 503 and r.headers["retry-after"] == "30"
        assert r.json()["error"]["code"] == "model_switching_in_progress"
