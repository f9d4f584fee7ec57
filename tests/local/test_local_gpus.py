"""Several models at once on one machine: the local backend places real child processes on
GPUs as their manifests declare, and each process is told its GPUs in `CUDA_VISIBLE_DEVICES`.

There are no GPUs here: the stand-in server reports the `CUDA_VISIBLE_DEVICES` it was started
with, and the proxy's own `/proxy/status` is sampled all along to check that no GPU is ever
promised beyond its capacity.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from tests.local.local_helpers import Tracker, standin_command
from tests.reliability.helpers import Stack, proxy_stack
from tests.support import chat
from vllm_chill._model import VLLMModel
from vllm_chill.backends.local._backend import LocalProcessBackend
from vllm_chill.backends.local._gpus import discover_gpus

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def gpu_model(served: str, *, tp: int = 1, fraction: float | None = None) -> VLLMModel:
    spec: dict[str, Any] = {
        "modelName": f"org/{served}",
        "servedModelName": served,
        "tensorParallelSize": tp,
        "extraArgs": ["--standin-load-time", "0.2"],
    }
    if fraction is not None:
        spec["gpuMemoryUtilization"] = fraction
    return VLLMModel.from_spec(spec)


async def devices_of(stack: Stack, served: str) -> str | None:
    """The `CUDA_VISIBLE_DEVICES` the model's process was started with."""
    loaded = stack.proxy.switcher.loaded[served]
    async with httpx.AsyncClient(trust_env=False) as http:
        listing = (await http.get(f"{loaded.base_url}/v1/models")).json()
    devices: str | None = listing["standin"]["cuda_visible_devices"]
    return devices


@asynccontextmanager
async def sampled_use(stack: Stack) -> AsyncIterator[list[dict[str, float]]]:
    """Each GPU's promised share, read from `/proxy/status` every 20 ms while the block runs."""
    samples: list[dict[str, float]] = []

    async def sample() -> None:
        async with httpx.AsyncClient(base_url=stack.url, trust_env=False) as http:
            while True:
                status = (await http.get("/proxy/status")).json()
                use: dict[str, float] = {}
                for model in status["models"].values():
                    for gpu in model["placement"]:
                        use[gpu] = use.get(gpu, 0.0) + model["gpu_fraction"]
                samples.append(use)
                await anyio.sleep(0.02)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        yield samples
        tg.cancel_scope.cancel()


async def test_models_share_two_gpus_as_their_manifests_declare(tracker: Tracker) -> None:
    models = [
        gpu_model("small-a", fraction=0.45),
        gpu_model("small-b", fraction=0.45),
        gpu_model("whole"),
        gpu_model("pair", tp=2),
    ]
    backend = LocalProcessBackend(standin_command(), grace_period=1.0, gpus=("0", "1"))
    async with (
        proxy_stack(models=models, backend=backend, max_wait=30) as stack,
        sampled_use(stack) as samples,
    ):
        with anyio.fail_after(60):
            # Two models at 0.45 run side by side on one GPU; the other stays whole.
            for served in ("small-a", "small-b"):
                assert (await stack.post("/v1/chat/completions", chat(served))).status == 200
            assert await devices_of(stack, "small-a") == "0"
            assert await devices_of(stack, "small-b") == "0"
            # A model needing a whole GPU gets the other one; nobody is evicted.
            assert (await stack.post("/v1/chat/completions", chat("whole"))).status == 200
            assert await devices_of(stack, "whole") == "1"
            listed = json.loads((await stack.get("/v1/models")).body)["data"]
            states = {m["id"]: m["state"] for m in listed}
            assert states == {"small-a": "loaded", "small-b": "loaded", "whole": "loaded",
                              "pair": "unloaded"}  # fmt: skip

            # A long answer is in flight on `whole` when a TP=2 model asks for both GPUs.
            streamed: list[str] = []

            async def long_answer() -> None:
                body = chat("whole", stream=True, standin_chunk_delay=0.7)
                async with (
                    httpx.AsyncClient(base_url=stack.url, timeout=30, trust_env=False) as http,
                    http.stream("POST", "/v1/chat/completions", json=body) as answer,
                ):
                    assert answer.status_code == 200
                    async for line in answer.aiter_lines():
                        if line.startswith("data: "):
                            streamed.append(line[6:])

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_answer)
                await anyio.sleep(0.3)  # the stream has started
                reply = await stack.post("/v1/chat/completions", chat("pair"), timeout=30)
                assert reply.status == 200
                # `pair` was only started once the stream on `whole` had ended, complete.
                assert streamed[-1] == "[DONE]" and len(streamed) == 4
            assert await devices_of(stack, "pair") == "0,1"
            status = json.loads((await stack.get("/proxy/status")).body)
            assert set(status["models"]) == {"pair"}
            assert {e["model"] for e in status["evictions"]} == {"small-a", "small-b", "whole"}
    assert samples, "the status was never sampled"
    for use in samples:
        assert all(share <= 1.0 + 1e-9 for share in use.values()), use


async def test_without_gpus_one_model_runs_at_a_time_and_its_environment_is_untouched(
    tracker: Tracker,
) -> None:
    models = [gpu_model("first", tp=4), gpu_model("second", fraction=0.3)]
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with proxy_stack(models=models, backend=backend, max_wait=30) as stack:
        with anyio.fail_after(60):
            assert (await stack.post("/v1/chat/completions", chat("first"))).status == 200
            assert await devices_of(stack, "first") is None  # TP 4, yet no GPU accounting
            assert (await stack.post("/v1/chat/completions", chat("second"))).status == 200
            assert set(stack.proxy.switcher.loaded) == {"second"}


async def test_a_model_that_can_never_fit_is_refused_with_the_reason(tracker: Tracker) -> None:
    backend = LocalProcessBackend(standin_command(), grace_period=1.0, gpus=("0", "1"))
    async with proxy_stack(models=[gpu_model("huge", tp=4)], backend=backend) as stack:
        reply = await stack.post("/v1/chat/completions", chat("huge"))
        assert reply.status == 503
        error = json.loads(reply.body)["error"]
        assert error["code"] == "model_switch_failed"
        assert "needs 4 GPUs" in error["message"] and "0=1, 1=1" in error["message"]


def test_gpus_come_from_cuda_visible_devices_then_nvidia_smi(tmp_path: Any) -> None:
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ("2", "3")
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == ()
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\n"
        "echo 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n"
    )
    fake.chmod(0o755)
    assert discover_gpus({}, nvidia_smi=str(fake)) == ("0", "1")
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert discover_gpus({}, nvidia_smi=str(broken)) == ()
    assert discover_gpus({}, nvidia_smi=str(tmp_path / "absent")) == ()
