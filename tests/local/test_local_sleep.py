"""Sleep mode on one machine: the local backend puts a model with `enableSleepMode` to sleep
instead of stopping it, and wakes the same process. The stand-in server implements vLLM's sleep
API (and, as vLLM, only in its development mode) and records every `/sleep` call."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import pytest

from tests.local.local_helpers import Tracker, is_live, standin_command
from tests.reliability.helpers import Stack, proxy_stack
from tests.support import chat
from vllm_chill._model import VLLMModel
from vllm_chill.backends.local._backend import LocalProcessBackend

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LOAD = 1.5
WAKE = 0.3


def model(served: str, *, sleeps: bool) -> VLLMModel:
    spec: dict[str, Any] = {
        "modelName": f"org/{served}",
        "servedModelName": served,
        "extraArgs": ["--standin-load-time", str(LOAD), "--standin-wake-time", str(WAKE)],
    }
    if sleeps:
        spec["enableSleepMode"] = True
    return VLLMModel.from_spec(spec)


async def standin(stack: Stack, served: str) -> dict[str, Any]:
    """What the model's stand-in reports about itself (its pid, its sleep calls)."""
    base_url = stack.proxy.switcher.loaded[served].base_url
    async with httpx.AsyncClient(trust_env=False) as http:
        info: dict[str, Any] = (await http.get(f"{base_url}/v1/models")).json()["standin"]
    return info


async def test_a_b_a_wakes_the_same_process_after_its_requests_finished(tracker: Tracker) -> None:
    models = [model("sleepy", sleeps=True), model("plain", sleeps=False)]
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with proxy_stack(models=models, backend=backend, max_wait=30) as stack:
        with anyio.fail_after(60):
            assert (await stack.post("/v1/chat/completions", chat("sleepy"))).status == 200
            first = await standin(stack, "sleepy")
            assert first["dev_mode"] is True  # started with VLLM_SERVER_DEV_MODE=1
            assert (await stack.post("/v1/chat/completions", chat("plain"))).status == 200
            plain = await standin(stack, "plain")
            assert plain["dev_mode"] is False  # no sleep mode: environment as before
            listed = json.loads((await stack.get("/v1/models")).body)["data"]
            states = {m["id"]: m["state"] for m in listed}
            assert states == {"sleepy": "sleeping", "plain": "loaded"}
            assert is_live(first["pid"])

            started = time.monotonic()
            assert (await stack.post("/v1/chat/completions", chat("sleepy"))).status == 200
            took = time.monotonic() - started
            again = await standin(stack, "sleepy")
            assert again["pid"] == first["pid"]  # woken, not restarted
            assert took < WAKE + 1.0, took
            # One /sleep, with mode=wait, when nothing was in flight on it.
            assert again["sleep_calls"] == [[1, "wait", 0]]
            assert not is_live(plain["pid"])  # the model without sleep mode was stopped
            status = json.loads((await stack.get("/proxy/status")).body)
            assert status["last_switch"]["kind"] == "wake"


async def test_the_sleep_budget_stops_the_least_recently_used_sleeper(tracker: Tracker) -> None:
    models = [model(name, sleeps=True) for name in ("one", "two", "three")]
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with proxy_stack(models=models, backend=backend, max_wait=30, max_sleeping=1) as stack:
        with anyio.fail_after(60):
            pids = {}
            for name in ("one", "two", "three"):
                assert (await stack.post("/v1/chat/completions", chat(name))).status == 200
                pids[name] = (await standin(stack, name))["pid"]
            # one slept when two came, two when three came: over the budget of one sleeper,
            # the least recently used (one) was stopped for real.
            core = stack.proxy.switcher.core
            with anyio.fail_after(10):
                while "one" in core.residents:
                    await anyio.sleep(0.02)
            assert core.phase_of("two").value == "asleep"
            assert not is_live(pids["one"]) and is_live(pids["two"])


async def test_no_sleep_route_is_reachable_through_the_proxy(tracker: Tracker) -> None:
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with proxy_stack(models=[model("sleepy", sleeps=True)], backend=backend) as stack:
        for method, path in (
            ("POST", "/sleep?level=1&mode=abort"),
            ("POST", "/wake_up"),
            ("GET", "/is_sleeping"),
            ("POST", "/collective_rpc"),
        ):
            if method == "GET":
                reply = await stack.get(path)
            else:
                reply = await stack.post(path, {"model": "sleepy"})
            assert reply.status == 404, (path, reply.status)
