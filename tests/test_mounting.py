"""The middleware inside other ASGI applications: wrapping one, and mounted in one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tests.configs import make_settings
from tests.servers import serve
from vllm_chill import FakeBackend, ModelSwitchMiddleware, StaticRegistry, VLLMModel
from vllm_chill.backends.sim._server import SimModelServer

pytestmark = pytest.mark.anyio


def registry() -> StaticRegistry:
    return StaticRegistry([VLLMModel.from_spec({"modelName": "org/m", "servedModelName": "m"})])


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello from the inner app at {request.url.path}")


async def test_wrapping_an_app_forwards_other_paths_and_lifespan() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("inner startup")
        yield
        events.append("inner shutdown")

    inner = Starlette(routes=[Route("/hello", hello)], lifespan=lifespan)
    async with SimModelServer("m", load_time=0, tokens_per_second=0) as sim:
        backend = FakeBackend(base_url=sim.base_url)
        proxy = ModelSwitchMiddleware(
            inner, registry=registry(), backend=backend, settings=make_settings(max_wait=5)
        )
        async with serve(proxy) as url, httpx.AsyncClient() as http:
            assert events == ["inner startup"]
            assert proxy.switcher.running  # our own start-up ran too
            r = await http.get(url + "/hello")
            assert r.text == "hello from the inner app at /hello"
            r = await http.post(
                url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 200 and r.json()["model"] == "m"
            assert (await http.get(url + "/metrics")).status_code == 200
            # Operator paths never reach the inner app or the upstream.
            assert (await http.post(url + "/sleep")).status_code == 404
        assert events == ["inner startup", "inner shutdown"]
        assert not proxy.switcher.running
        assert backend.calls[-1] == ("stop", None)


async def test_wrapping_an_app_without_lifespan_support() -> None:
    async def plain(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            raise RuntimeError("only http")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    proxy = ModelSwitchMiddleware(plain, registry=registry(), backend=FakeBackend())
    async with serve(proxy) as url, httpx.AsyncClient() as http:
        assert proxy.switcher.running
        assert (await http.get(url + "/other")).status_code == 204


async def test_mounted_under_a_prefix_with_running_in_the_host_lifespan() -> None:
    async with SimModelServer("m", load_time=0, tokens_per_second=0) as sim:
        proxy = ModelSwitchMiddleware(
            registry=registry(),
            backend=FakeBackend(base_url=sim.base_url),
            settings=make_settings(max_wait=5),
        )

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with proxy.running():
                yield

        host = Starlette(
            routes=[Route("/hello", hello), Mount("/llm", app=proxy)], lifespan=lifespan
        )
        async with serve(host) as url, httpx.AsyncClient() as http:
            r = await http.post(
                url + "/llm/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 200, r.text
            assert sim.stats.history[-1].path == "/v1/chat/completions"  # prefix removed
            listed = (await http.get(url + "/llm/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == ["m"]
            assert (await http.get(url + "/hello")).status_code == 200


async def test_requests_before_start_get_a_clear_503() -> None:
    proxy = ModelSwitchMiddleware(registry=registry(), backend=FakeBackend())
    async with serve(proxy, lifespan="off") as url, httpx.AsyncClient() as http:
        r = await http.post(url + "/v1/chat/completions", json={"model": "m"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"
        assert (await http.get(url + "/health")).status_code == 200
        with anyio.fail_after(5):
            assert (await http.get(url + "/readyz")).status_code == 503
