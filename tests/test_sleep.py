"""vLLM's sleep mode through the whole proxy, on the simulator: a model with `enableSleepMode`
sleeps when it gives way and wakes in a fraction of its load time; one without is stopped."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from tests.reliability.helpers import proxy_stack
from tests.support import chat, spec
from vllm_chill.backends.sim import SimBackend
from vllm_chill.scheduler._refusals import ModelLoading

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LOAD = 1.5
WAKE = 0.2


async def test_a_sleeping_model_wakes_in_its_wake_time_and_keeps_its_server() -> None:
    sleepy = spec("sleepy", enableSleepMode=True)
    plain = spec("plain")
    backend = SimBackend(load_time=LOAD, tokens_per_second=0, wake_time=WAKE)
    async with proxy_stack(models=[sleepy, plain], backend=backend, max_wait=30) as stack:
        with anyio.fail_after(30):
            assert (await stack.post("/v1/chat/completions", chat("sleepy"))).status == 200
            first = backend.servers["sleepy"]
            assert (await stack.post("/v1/chat/completions", chat("plain"))).status == 200
            # sleepy gave way by sleeping (its requests had finished: mode=wait), not stopping.
            assert first.app.sleep_calls == [(1, "wait")]
            assert first.app.sleeping and backend.servers["sleepy"] is first
            listed = json.loads((await stack.get("/v1/models")).body)["data"]
            assert {m["id"]: m["state"] for m in listed} == {
                "sleepy": "sleeping",
                "plain": "loaded",
            }
            started = time.monotonic()
            reply = await stack.post("/v1/chat/completions", chat("sleepy"))
            took = time.monotonic() - started
            assert reply.status == 200
            assert took < WAKE + 1.0 < LOAD, took  # a wake, not a load
            assert backend.servers["sleepy"] is first and not first.app.sleeping
            assert "plain" not in backend.servers  # no sleep mode: stopped as before
            status = json.loads((await stack.get("/proxy/status")).body)
            assert status["last_switch"]["kind"] == "wake"
            assert status["last_switch"]["to"] == "sleepy"
            metrics = (await stack.get("/metrics")).body.decode()
            assert (
                'vllm_chill_model_switches_total{from_model="",kind="wake",result="success",'
                'to_model="sleepy"} 1.0' in metrics
            )


async def test_while_it_wakes_the_503_says_waking_with_the_measured_wake_time() -> None:
    sleepy = spec("sleepy", enableSleepMode=True)
    backend = SimBackend(load_time=0.3, tokens_per_second=0, wake_time=1.5)
    async with proxy_stack(models=[sleepy, spec("plain")], backend=backend, max_wait=30) as held:
        with anyio.fail_after(30):
            for name in ("sleepy", "plain"):
                assert (await held.post("/v1/chat/completions", chat(name))).status == 200
            async with anyio.create_task_group() as tg:
                tg.start_soon(held.post, "/v1/chat/completions", chat("sleepy"))  # wakes it
                while held.proxy.switcher.core.phase_of("sleepy").value != "waking":
                    await anyio.sleep(0.01)
                status = json.loads((await held.get("/proxy/status")).body)
                assert status["models"]["sleepy"]["phase"] == "waking"
                assert status["models"]["sleepy"]["progress"] == "waking"
                assert status["last_switch"]["kind"] == "wake"
                # What a client that is not held is told meanwhile: its 503 says waking, and
                # Retry-After is the first wake's estimate, not a load's.
                with pytest.raises(ModelLoading) as refused:
                    await held.proxy.switcher.acquire("sleepy", 0)
                assert refused.value.details["phase"] == "waking"
                assert refused.value.retry_after <= 5


async def test_the_simulators_sleep_routes_follow_vllm() -> None:
    """Only in vLLM's development mode; `mode=abort` cuts what is in flight, `wait` lets it
    finish; `/health` stays 200 while asleep."""
    import httpx  # noqa: PLC0415

    from vllm_chill.backends.sim import SimModelServer  # noqa: PLC0415

    plain = SimModelServer("m", load_time=0, tokens_per_second=0, sleep_mode=True)
    dev = SimModelServer(
        "m", load_time=0, tokens_per_second=5, sleep_mode=True, dev_mode=True, wake_time=0.1
    )
    async with plain, dev, httpx.AsyncClient(trust_env=False, timeout=10) as http:
        await plain.wait_ready()
        await dev.wait_ready()
        assert (await http.post(f"{plain.base_url}/sleep")).status_code == 404
        assert (await http.get(f"{plain.base_url}/is_sleeping")).status_code == 404
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}

        cut: list[bool] = []

        async def stream() -> None:
            try:
                async with http.stream(
                    "POST", f"{dev.base_url}/v1/chat/completions", json={**body, "stream": True}
                ) as answer:
                    async for _ in answer.aiter_bytes():
                        pass
            except httpx.RemoteProtocolError:
                cut.append(True)  # the answer ended mid-stream

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            await dev.stats.wait_until(lambda s: s.in_flight == 1)
            assert (await http.post(f"{dev.base_url}/sleep?level=1")).status_code == 200
        assert dev.stats.aborted == 1 and cut == [True]  # the default mode, abort, cut it
        assert (await http.get(f"{dev.base_url}/is_sleeping")).json() == {"is_sleeping": True}
        assert (await http.get(f"{dev.base_url}/health")).status_code == 200
        asleep = await http.post(f"{dev.base_url}/v1/chat/completions", json=body)
        assert asleep.status_code == 503
        assert (await http.post(f"{dev.base_url}/wake_up")).status_code == 200
        assert (await http.get(f"{dev.base_url}/is_sleeping")).json() == {"is_sleeping": False}
        assert dev.app.sleep_calls == [(1, "abort")]
