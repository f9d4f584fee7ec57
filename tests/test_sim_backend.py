"""SimBackend: each load starts a real simulated vLLM on loopback; switches leave nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from openai import AsyncOpenAI

from vllm_chill._model import VLLMModel
from vllm_chill.backends._base import Backend, LoadedModel, LoadError
from vllm_chill.backends.sim._backend import SimBackend

pytestmark = pytest.mark.anyio

PHASES = ["starting server", "waiting for /health", "waiting for /v1/models"]


def model(served: str, *extra: str, max_model_len: int | None = None) -> VLLMModel:
    spec: dict[str, object] = {"modelName": f"org/{served}", "servedModelName": served}
    if extra:
        spec["extraArgs"] = list(extra)
    if max_model_len:
        spec["maxModelLen"] = max_model_len
    return VLLMModel.from_spec(spec)


@pytest.fixture
async def backend() -> AsyncIterator[SimBackend]:
    sim = SimBackend(load_time=0.05, tokens_per_second=0)
    async with sim.session(lambda reason, model=None: None) as adopted:
        assert adopted is None
        yield sim


async def answers(loaded: LoadedModel) -> str:
    async with AsyncOpenAI(base_url=f"{loaded.base_url}/v1", api_key="x", max_retries=0) as oai:
        reply = await oai.chat.completions.create(
            model=loaded.served_model_name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
        )
    return reply.model


async def refuses(base_url: str) -> bool:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        try:
            await http.get(f"{base_url}/health")
        except httpx.ConnectError:
            return True
    return False


async def test_is_a_backend() -> None:
    sim = SimBackend()
    assert isinstance(sim, Backend)
    assert await sim.check()


async def test_load_a_then_b_stops_a(backend: SimBackend) -> None:
    phases: list[str] = []
    with anyio.fail_after(10):
        a = await backend.load(model("a"), phases.append)
    assert phases == PHASES
    assert a.served_model_name == "a"
    assert a.base_url.startswith("http://127.0.0.1:")
    assert await answers(a) == "a"

    with anyio.fail_after(10):
        b = await backend.load(model("b"), lambda phase: None)
    assert await refuses(a.base_url)
    assert await answers(b) == "b"


async def test_model_limits_reach_the_server(backend: SimBackend) -> None:
    with anyio.fail_after(10):
        loaded = await backend.load(model("long", max_model_len=2048), lambda phase: None)
    async with httpx.AsyncClient(base_url=loaded.base_url, trust_env=False) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
    assert card["max_model_len"] == 2048
    assert card["root"] == "org/long"


async def test_unload_stops_the_server_and_is_idempotent(backend: SimBackend) -> None:
    with anyio.fail_after(10):
        loaded = await backend.load(model("a"), lambda phase: None)
        await backend.unload()
        await backend.unload()
    assert backend.server is None
    assert await refuses(loaded.base_url)


async def test_cancelled_load_leaves_no_server() -> None:
    backend = SimBackend(load_time=60)
    waiting = anyio.Event()

    def progress(phase: str) -> None:
        if phase == "waiting for /health":
            waiting.set()

    base_url = ""
    async with backend.session(lambda reason, model=None: None):
        with anyio.fail_after(10):  # fails fast, not after the 60 s load
            async with anyio.create_task_group() as tg:
                tg.start_soon(backend.load, model("slow"), progress)
                await waiting.wait()
                assert backend.server is not None
                base_url = backend.server.base_url
                tg.cancel_scope.cancel()
        assert backend.server is None
        assert await refuses(base_url)


async def test_fail_load_hook_raises_load_error_and_leaves_nothing(backend: SimBackend) -> None:
    phases: list[str] = []
    with anyio.fail_after(10), pytest.raises(LoadError) as caught:
        await backend.load(model("broken", "--sim-fail-load"), phases.append)
    assert caught.value.reason.startswith("simulated load failure")
    assert "broken" in caught.value.reason
    assert backend.server is None
    # The backend still works afterwards.
    with anyio.fail_after(10):
        loaded = await backend.load(model("fine"), lambda phase: None)
    assert await answers(loaded) == "fine"


async def test_api_key_is_required_by_servers_and_used_for_readiness() -> None:
    backend = SimBackend(load_time=0, api_key="upstream-key")
    async with backend.session(lambda reason, model=None: None):
        with anyio.fail_after(10):
            loaded = await backend.load(model("guarded"), lambda phase: None)
        async with httpx.AsyncClient(base_url=loaded.base_url, trust_env=False) as http:
            assert (await http.get("/v1/models")).status_code == 401
            authorized = await http.get(
                "/v1/models", headers={"Authorization": "Bearer upstream-key"}
            )
            assert authorized.status_code == 200


async def test_crash_reports_the_loss() -> None:
    lost: list[tuple[str, str | None]] = []
    backend = SimBackend(load_time=0)
    async with backend.session(lambda reason, model=None: lost.append((reason, model))):
        with anyio.fail_after(10):
            loaded = await backend.load(model("a"), lambda phase: None)
            await backend.crash("pod deleted")
        assert lost == [("pod deleted", "a")]
        assert await refuses(loaded.base_url)


async def test_stop_stops_the_loaded_server() -> None:
    backend = SimBackend(load_time=0)
    with anyio.fail_after(10):
        async with backend.session(lambda reason, model=None: None):
            loaded = await backend.load(model("a"), lambda phase: None)
    assert await refuses(loaded.base_url)
