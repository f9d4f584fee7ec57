"""The quick start's flow through the proxy, against the API emulator and the simulated kubelet:
the official `openai` client asks for models by name; the args land in the Deployment; the
model named answers; a crash-looping model fails in seconds with its reason; idling scales to
zero."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest

from tests.configs import make_settings
from tests.servers import serve
from tests.support import chat
from vllm_chill import ModelSwitchMiddleware
from vllm_chill.backends.kubernetes._backend import K8sDeploymentBackend
from vllm_chill.registries._kubernetes import CRDRegistry

from .cluster import (
    BASE_ARGS,
    CRASH_LOOP,
    NEVER_READY,
    Cluster,
    model_manifest,
    simulated_cluster,
)

pytestmark = pytest.mark.anyio

MODELS = [
    model_manifest("qwen3-coder-30b-fp8"),
    model_manifest("deepseek-r1-fp8"),
    model_manifest("crashy"),
    model_manifest("stuck"),
]


@asynccontextmanager
async def proxy_on_cluster(**options: Any) -> AsyncIterator[tuple[Cluster, str]]:
    failures = {"crashy": CRASH_LOOP, "stuck": NEVER_READY}
    async with simulated_cluster(models=MODELS, failures=failures) as cluster:
        backend = K8sDeploymentBackend(
            cluster.api_client,
            namespace=cluster.namespace,
            deployment=cluster.deployment,
            configmap="vllm-config",
            upstream=cluster.upstream,
        )
        registry = CRDRegistry(cluster.api_client, cluster.namespace)
        options.setdefault("min_residency", 0)
        proxy = ModelSwitchMiddleware(
            registry=registry, backend=backend, settings=make_settings(**options)
        )
        async with serve(proxy) as url:
            yield cluster, url


async def test_switch_a_b_a_lands_args_and_answers_from_the_model_named() -> None:
    async with proxy_on_cluster(max_wait=30) as (cluster, url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=5)
        try:
            for name in ("qwen3-coder-30b-fp8", "deepseek-r1-fp8", "qwen3-coder-30b-fp8"):
                answer = await client.chat.completions.create(**chat(name, max_tokens=4))
                assert answer.model == name
                args = cluster.args()
                assert args[args.index("--served-model-name") + 1] == name
                for kept in BASE_ARGS:  # args vLLM's operator set are kept as they were
                    assert kept in args
                flags = [a for a in args if a.startswith("--") and "=" not in a]
                assert len(flags) == len(set(flags)), args  # no duplicated flag
                assert cluster.configmap_data()["SERVED_MODEL_NAME"] == name
                assert cluster.replicas() == 1
            listed = {m.id: m.model_extra["state"] for m in (await client.models.list()).data}  # type: ignore[index]
            assert listed["qwen3-coder-30b-fp8"] == "loaded"
            assert listed["deepseek-r1-fp8"] == "unloaded"
            await cluster.wait_for(
                lambda: cluster.model_status("qwen3-coder-30b-fp8").get("phase") == "Ready"
            )
            switch = cluster.model_status("qwen3-coder-30b-fp8")["lastSwitch"]
            assert switch["from"] == "deepseek-r1-fp8" and switch["result"] == "success"
        finally:
            await client.close()


async def test_a_first_request_gets_503_then_the_answer_with_max_wait_zero() -> None:
    async with proxy_on_cluster() as (_, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/chat/completions", json=chat("deepseek-r1-fp8", max_tokens=4))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_switching_in_progress"
        assert int(r.headers["retry-after"]) >= 1
        with anyio.fail_after(30):
            while (await http.get("/v1/models/deepseek-r1-fp8")).json()["state"] != "loaded":
                await anyio.sleep(0.05)
        r = await http.post("/v1/chat/completions", json=chat("deepseek-r1-fp8", max_tokens=4))
        assert r.status_code == 200 and r.json()["model"] == "deepseek-r1-fp8"


async def test_crash_loop_fails_in_seconds_with_its_reason_and_scales_to_zero() -> None:
    options = {"max_wait": 60, "model_switch_timeout": 120}
    async with (
        proxy_on_cluster(**options) as (cluster, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        started = anyio.current_time()
        r = await http.post("/v1/chat/completions", json=chat("crashy", max_tokens=4))
        took = anyio.current_time() - started
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "model_switch_failed"
        assert "CrashLoopBackOff" in error["message"]
        assert took < 30, "failed by the pod's reason, not by the 120s switch timeout"
        await cluster.wait_for(lambda: cluster.replicas() == 0)
        status = cluster.model_status("crashy")
        assert status["phase"] == "Failed"
        # Other models still load afterwards.
        r = await http.post("/v1/chat/completions", json=chat("deepseek-r1-fp8", max_tokens=4))
        assert r.status_code == 200 and r.json()["model"] == "deepseek-r1-fp8"


async def test_a_load_the_switch_timeout_stops_is_failed_in_the_model_status() -> None:
    """`kubectl describe` says why: not "scaled to zero" as if nothing had gone wrong."""
    async with (
        proxy_on_cluster(max_wait=30, model_switch_timeout=1.5) as (cluster, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        r = await http.post("/v1/chat/completions", json=chat("stuck", max_tokens=4))
        assert r.status_code == 503
        assert "did not become ready within 2s" in r.json()["error"]["message"]
        await cluster.wait_for(lambda: cluster.model_status("stuck").get("phase") == "Failed")
        await cluster.wait_for(lambda: cluster.replicas() == 0)
        status = cluster.model_status("stuck")
        assert "the load was stopped (--model-switch-timeout)" in status["message"]
        switch = status["lastSwitch"]
        assert switch["result"] == "failure" and switch["reason"] == status["message"]
        assert switch["durationSeconds"] >= 1.5
        # It stays Failed (the unload does not overwrite it), and others still load.
        r = await http.post("/v1/chat/completions", json=chat("deepseek-r1-fp8", max_tokens=4))
        assert r.status_code == 200
        assert cluster.model_status("stuck")["phase"] == "Failed"


async def test_idle_scales_the_deployment_to_zero_and_a_request_wakes_it() -> None:
    async with (
        proxy_on_cluster(max_wait=30, idle_timeout=0.5) as (cluster, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        r = await http.post("/v1/chat/completions", json=chat("qwen3-coder-30b-fp8", max_tokens=4))
        assert r.status_code == 200
        await cluster.wait_for(lambda: cluster.replicas() == 0)
        with anyio.fail_after(10):  # the unload returns once the pod is gone, too
            while (await http.get("/proxy/status")).json()["phase"] != "idle":
                await anyio.sleep(0.02)
        r = await http.post("/v1/chat/completions", json=chat("qwen3-coder-30b-fp8", max_tokens=4))
        assert r.status_code == 200 and r.json()["model"] == "qwen3-coder-30b-fp8"
        assert cluster.replicas() == 1
