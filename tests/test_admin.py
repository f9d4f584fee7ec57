"""The operator surface is safe by default: switching and unloading need a token from anywhere
but loopback, and model specs never show a secret. Driven in-process through httpx's ASGI
transport, which sets the client address a request comes from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.configs import make_settings
from tests.support import spec
from vllm_chill import FakeBackend, ModelSwitchMiddleware, StaticRegistry, VLLMModel

pytestmark = pytest.mark.anyio

REMOTE = ("203.0.113.7", 40000)  # a documentation address: only ever a value in the scope
LOOPBACK = ("127.0.0.1", 40000)


@asynccontextmanager
async def client(
    peer: tuple[str, int], models: list[VLLMModel] | None = None, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    proxy = ModelSwitchMiddleware(
        registry=StaticRegistry(models or [spec("alpha"), spec("beta")]),
        backend=FakeBackend(),
        settings=make_settings(**options),
    )
    transport = httpx.ASGITransport(app=proxy, client=peer)
    async with proxy.running(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@pytest.mark.parametrize("path", ["/proxy/models/switch", "/proxy/unload"])
async def test_remote_switch_and_unload_are_refused_without_a_token(path: str) -> None:
    async with client(REMOTE) as http:
        r = await http.post(path, json={"model": "alpha"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "admin_token_required"
        # Reading stays open.
        assert (await http.get("/proxy/status")).status_code == 200


async def test_loopback_may_switch_without_a_token() -> None:
    async with client(LOOPBACK) as http:
        r = await http.post("/proxy/models/switch", json={"model": "alpha"})
        assert r.status_code in (200, 202)


async def test_remote_switch_with_the_admin_token_is_allowed() -> None:
    async with client(REMOTE, admin_token="s3cret-admin") as http:
        refused = await http.post("/proxy/unload")
        assert refused.status_code == 401
        r = await http.post(
            "/proxy/models/switch",
            json={"model": "alpha"},
            headers={"authorization": "Bearer s3cret-admin"},
        )
        assert r.status_code in (200, 202)


async def test_model_specs_mask_secret_flag_values() -> None:
    model = spec(
        "alpha",
        extraArgs=["--api-key", "sk-hidden-1", "--hf-token=hf_hidden_2", "--max-num-seqs", "8"],
    )
    async with client(LOOPBACK, [model]) as http:
        text = (await http.get("/proxy/models")).text
        (entry,) = (await http.get("/proxy/models")).json()["data"]
    assert "sk-hidden-1" not in text and "hf_hidden_2" not in text
    assert entry["spec"]["extraArgs"] == [
        "--api-key",
        "***",
        "--hf-token=***",
        "--max-num-seqs",
        "8",
    ]
