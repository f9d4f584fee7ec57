"""Several models at once through the whole proxy, on the simulator's GPUs: what `/v1/models`,
`/proxy/status` and `/metrics` show while models share GPUs and when one evicts the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.reliability.helpers import proxy_stack
from tests.support import chat
from vllm_chill.backends.sim import SimBackend
from vllm_chill.registries._files import read_models

pytestmark = [pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "four-gpus"


@pytest.mark.anyio
async def test_the_four_gpu_example_loads_three_models_then_evicts_them_for_the_big_one() -> None:
    models = read_models([EXAMPLE])
    backend = SimBackend(load_time=0.1, tokens_per_second=0, gpus=("0", "1", "2", "3"))
    async with proxy_stack(models=models, backend=backend, max_wait=20) as stack:
        with anyio.fail_after(30):
            for served in ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "qwen3-coder-30b-fp8"):
                assert (await stack.post("/v1/chat/completions", chat(served))).status == 200
            listed = json.loads((await stack.get("/v1/models")).body)["data"]
            assert {m["id"]: m["state"] for m in listed} == {
                "qwen2.5-7b-instruct": "loaded",
                "llama-3.1-8b-instruct": "loaded",
                "qwen3-coder-30b-fp8": "loaded",
                "deepseek-r1-distill-70b": "unloaded",
            }
            status = json.loads((await stack.get("/proxy/status")).body)
            placed = {m: (v["placement"], v["gpu_fraction"]) for m, v in status["models"].items()}
            assert placed == {
                "qwen2.5-7b-instruct": (["0"], 0.45),
                "llama-3.1-8b-instruct": (["0"], 0.45),
                "qwen3-coder-30b-fp8": (["1", "2"], 1.0),
            }
            assert status["free_capacity"] == {"0": 0.1, "1": 0.0, "2": 0.0, "3": 1.0}
            # All four GPUs: every idle model gives way, least recently used first.
            reply = await stack.post("/v1/chat/completions", chat("deepseek-r1-distill-70b"))
            assert reply.status == 200
            status = json.loads((await stack.get("/proxy/status")).body)
            assert list(status["models"]) == ["deepseek-r1-distill-70b"]
            assert [e["model"] for e in reversed(status["evictions"])] == [
                "qwen2.5-7b-instruct",
                "llama-3.1-8b-instruct",
                "qwen3-coder-30b-fp8",
            ]
            # The simulated servers of the evicted models are gone; the big one has every GPU.
            assert list(backend.servers) == ["deepseek-r1-distill-70b"]
            assert backend.placements["deepseek-r1-distill-70b"].units == ("0", "1", "2", "3")
            metrics = (await stack.get("/metrics")).body.decode()
            assert 'vllm_chill_evictions_total{reason="idle, least recently used"} 3.0' in metrics
            assert 'vllm_chill_model_resident{model="deepseek-r1-distill-70b"} 1.0' in metrics
            assert 'vllm_chill_model_resident{model="qwen3-coder-30b-fp8"} 0.0' in metrics


def test_check_models_says_which_models_do_not_fit_the_gpus_given() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_chill", "check-models", "--gpus", "0,1", str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "does not fit: needs 4 GPUs (whole), GPUs given: 0,1" in result.stdout
    assert "1 of 4 model(s) do not fit the GPUs given" in result.stderr
    fits = subprocess.run(
        [sys.executable, "-m", "vllm_chill", "check-models", "--gpus", "0,1,2,3", str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fits.returncode == 0 and "does not fit" not in fits.stdout
