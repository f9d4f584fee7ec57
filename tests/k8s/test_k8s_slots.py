"""Several vLLM Deployments behind one proxy: each is a slot that runs one model, sized by its
container's `nvidia.com/gpu` limit; models are served side by side, and one that finds no free
slot evicts the least recently used idle one. Against the API emulator, with a simulated
kubelet per Deployment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from tests.configs import make_settings
from tests.servers import serve
from tests.support import chat, free_port
from vllm_chill import ModelSwitchMiddleware
from vllm_chill._build import build_middleware
from vllm_chill.backends.kubernetes import K8sDeploymentBackend, K8sDeploymentsBackend
from vllm_chill.registries._kubernetes import CRDRegistry
from vllm_chill.settings import SettingsError, parse_settings

from .cluster import BASE_ARGS, Cluster, KubeletSim, model_manifest, simulated_cluster
from .emulator import DEPLOYMENTS

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = [
    model_manifest("small-a"),
    model_manifest("small-b"),
    model_manifest("small-c"),
    model_manifest("tp2", tensorParallelSize=2),
]


@asynccontextmanager
async def second_deployment(
    cluster: Cluster, name: str, gpus: int
) -> AsyncIterator[tuple[KubeletSim, str]]:
    """Another vLLM Deployment in the cluster (`gpus` in its limit), with its own kubelet and
    Service address."""
    first = cluster.get_deployment()
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": {"app": name}},
        "spec": {
            **first["spec"],
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
        },
    }
    containers = [dict(c) for c in first["spec"]["template"]["spec"]["containers"]]
    deployment["spec"]["template"] = {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": containers},
    }
    vllm = containers[0]
    vllm["args"] = ["--model", "org/initial", "--served-model-name", "initial", *BASE_ARGS]
    vllm["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    cluster.server.store(DEPLOYMENTS, deployment)
    port = free_port()
    sim = KubeletSim(cluster.api_url, cluster.namespace, name, service_port=port, load_time=0.1)
    async with anyio.create_task_group() as tasks:
        await tasks.start(sim.run)
        yield sim, f"http://127.0.0.1:{port}"
        tasks.cancel_scope.cancel()


@asynccontextmanager
async def two_slots(**options: Any) -> AsyncIterator[tuple[Cluster, KubeletSim, str]]:
    """Deployment `vllm` (1 GPU) and `vllm-big` (2 GPUs) behind one proxy."""
    async with (
        simulated_cluster(models=MODELS) as cluster,
        second_deployment(cluster, "vllm-big", gpus=2) as (big, big_upstream),
    ):
        slots = [
            K8sDeploymentBackend(
                cluster.api_client,
                namespace=cluster.namespace,
                deployment=deployment,
                upstream=upstream,
            )
            for deployment, upstream in (("vllm", cluster.upstream), ("vllm-big", big_upstream))
        ]
        options.setdefault("min_residency", 0)
        proxy = ModelSwitchMiddleware(
            registry=CRDRegistry(cluster.api_client, cluster.namespace),
            backend=K8sDeploymentsBackend(slots),
            settings=make_settings(**options),
        )
        async with serve(proxy) as url:
            yield cluster, big, url


def args_of(cluster: Cluster, deployment: str) -> list[str]:
    obj = cluster.server.read(DEPLOYMENTS, cluster.namespace, deployment)
    assert obj is not None
    return list(obj["spec"]["template"]["spec"]["containers"][0]["args"])


def served_by(cluster: Cluster, deployment: str) -> str:
    args = args_of(cluster, deployment)
    return args[args.index("--served-model-name") + 1]


async def test_two_deployments_serve_two_models_at_once_and_a_third_evicts_the_lru_one() -> None:
    async with (
        two_slots(max_wait=30) as (cluster, _, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        with anyio.fail_after(60):
            for name in ("small-a", "small-b"):
                r = await http.post("/v1/chat/completions", json=chat(name, max_tokens=4))
                assert r.status_code == 200 and r.json()["model"] == name
            # One per Deployment: the smallest slot that fits first, then the other.
            assert served_by(cluster, "vllm") == "small-a"
            assert served_by(cluster, "vllm-big") == "small-b"
            states = {m["id"]: m["state"] for m in (await http.get("/v1/models")).json()["data"]}
            assert states["small-a"] == states["small-b"] == "loaded"
            # Both answer, each from its own Deployment, with no switch in between.
            for name in ("small-a", "small-b"):
                r = await http.post("/v1/chat/completions", json=chat(name, max_tokens=4))
                assert r.status_code == 200 and r.json()["model"] == name

            # A third model: no slot is free; small-a is the least recently used idle one.
            r = await http.post("/v1/chat/completions", json=chat("small-c", max_tokens=4))
            assert r.status_code == 200 and r.json()["model"] == "small-c"
            assert served_by(cluster, "vllm") == "small-c"
            assert served_by(cluster, "vllm-big") == "small-b"
            status = (await http.get("/proxy/status")).json()
            assert {m: v["placement"] for m, v in status["models"].items()} == {
                "small-b": ["vllm-big"],
                "small-c": ["vllm"],
            }
            assert status["evictions"][0]["model"] == "small-a"
            # `kubectl get vllm` shows each model's state and the Deployment it runs in.
            await cluster.wait_for(lambda: cluster.model_status("small-c").get("phase") == "Ready")
            assert cluster.model_status("small-c")["deployment"] == "vllm"
            assert cluster.model_status("small-b")["deployment"] == "vllm-big"
            # `kubectl describe`: each switch comes from what its Deployment ran before.
            assert cluster.model_status("small-c")["lastSwitch"]["from"] == "small-a"
            assert "from" not in cluster.model_status("small-b")["lastSwitch"]
            await cluster.wait_for(
                lambda: cluster.model_status("small-a").get("phase") == "Unloaded"
            )
            assert "deployment" not in cluster.model_status("small-a")

            # A TP=2 model fits only the 2-GPU Deployment: small-b gives way there.
            r = await http.post("/v1/chat/completions", json=chat("tp2", max_tokens=4))
            assert r.status_code == 200 and r.json()["model"] == "tp2"
            assert served_by(cluster, "vllm-big") == "tp2"
            assert served_by(cluster, "vllm") == "small-c"


async def test_a_restarted_proxy_adopts_what_each_deployment_runs() -> None:
    async with (
        two_slots(max_wait=30) as (cluster, big, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        for name in ("small-a", "small-b"):
            assert (
                await http.post("/v1/chat/completions", json=chat(name, max_tokens=4))
            ).status_code == 200
        slots = [
            K8sDeploymentBackend(
                cluster.api_client, namespace=cluster.namespace, deployment=d, upstream=u
            )
            for d, u in (
                ("vllm", cluster.upstream),
                ("vllm-big", f"http://127.0.0.1:{big.service_port}"),
            )
        ]
        restarted = ModelSwitchMiddleware(
            registry=CRDRegistry(cluster.api_client, cluster.namespace),
            backend=K8sDeploymentsBackend(slots),
        )
        async with serve(restarted) as again, httpx.AsyncClient(base_url=again) as second:
            states = {m["id"]: m["state"] for m in (await second.get("/v1/models")).json()["data"]}
            assert states["small-a"] == states["small-b"] == "loaded"
            status = (await second.get("/proxy/status")).json()
            assert {m: v["placement"] for m, v in status["models"].items()} == {
                "small-a": ["vllm"],
                "small-b": ["vllm-big"],
            }


def test_several_deployments_from_the_command_line() -> None:
    base = ["--enable-model-switch", "--namespace", "ai-apps"]
    settings = parse_settings(
        [*base, "--deployment", "vllm", "--deployment", "vllm-big"],
        {},
        pod_namespace_file="/nonexistent",
    )
    assert settings.kubernetes.deployments == ("vllm", "vllm-big")
    assert settings.upstream.urls == (
        "http://vllm.ai-apps.svc:8000",
        "http://vllm-big.ai-apps.svc:8000",
    )
    from kubernetes import client as k8s_client  # noqa: PLC0415

    offline = k8s_client.ApiClient(k8s_client.Configuration(host="http://127.0.0.1:9"))
    app = build_middleware(settings, api_client=offline)
    assert isinstance(app.backend, K8sDeploymentsBackend)
    single = build_middleware(
        parse_settings([*base, "--deployment", "vllm"], {}, pod_namespace_file="/nonexistent"),
        api_client=offline,
    )
    assert isinstance(single.backend, K8sDeploymentBackend)  # one Deployment: as before


TWO = ["--enable-model-switch", "--deployment", "a", "--deployment", "b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--deployment", "a", "--deployment", "b"],
            "argument --deployment: several Deployments need --enable-model-switch",
        ),
        (
            ["--enable-model-switch", "--deployment", "a", "--deployment", "a"],
            "argument --deployment: a Deployment is listed twice",
        ),
        (
            [*TWO, "--upstream", "http://a:8000"],
            "argument --upstream: 1 given for 2 Deployment(s)",
        ),
        (
            [*TWO, "--target-host", "10.0.0.1"],
            "argument --target-host: not allowed with several Deployments",
        ),
    ],
)
def test_several_deployments_are_checked_before_anything_starts(
    argv: list[str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings(argv, {}, pod_namespace_file="/nonexistent")
    assert str(caught.value).startswith(message)


def test_one_configmap_is_not_shared_by_several_deployments() -> None:
    settings = parse_settings([*TWO, "--configmap", "c"], {}, pod_namespace_file="/nonexistent")
    with pytest.raises(SettingsError, match=r"^argument --configmap: not with several"):
        build_middleware(settings, api_client=object())
