"""A GPU pod that runs its own warm pool: the local backend, with its models read from the
namespace's `VLLMModel` resources (`--registry kubernetes`), against the API emulator."""

from __future__ import annotations

import json

import anyio
import pytest

from tests.k8s.cluster import model_manifest, simulated_cluster
from tests.local.local_helpers import Tracker, standin_command
from tests.reliability.helpers import proxy_stack
from tests.support import chat
from vllm_chill._build import build_middleware
from vllm_chill.backends.local._backend import LocalProcessBackend
from vllm_chill.registries._kubernetes import CRDRegistry
from vllm_chill.settings import SettingsError, parse_settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_the_local_backend_serves_the_namespaces_vllmmodels(tracker: Tracker) -> None:
    manifests = [
        model_manifest("coder", extraArgs=["--standin-load-time", "0.1"], enableSleepMode=True),
        model_manifest("chat", extraArgs=["--standin-load-time", "0.1"]),
    ]
    async with simulated_cluster(models=manifests) as cluster:
        registry = CRDRegistry(cluster.api_client, cluster.namespace)
        backend = LocalProcessBackend(standin_command(), grace_period=1.0)
        async with proxy_stack(registry=registry, backend=backend, max_wait=30) as stack:
            with anyio.fail_after(60):
                for name in ("coder", "chat", "coder"):
                    reply = await stack.post("/v1/chat/completions", chat(name))
                    assert reply.status == 200 and json.loads(reply.body)["model"] == name
                status = json.loads((await stack.get("/proxy/status")).body)
                assert status["last_switch"]["kind"] == "wake"  # coder slept, then woke
                # The Deployment was never touched: the pod runs the models itself.
                assert cluster.replicas() == 0


def test_the_warm_pool_is_chosen_on_the_command_line() -> None:
    argv = ["--backend", "local", "--registry", "kubernetes", "--namespace", "ai-apps"]
    settings = parse_settings(argv, {}, pod_namespace_file="/nonexistent")
    assert (settings.registry, settings.kubernetes.namespace) == ("kubernetes", "ai-apps")
    from kubernetes import client as k8s_client  # noqa: PLC0415

    offline = k8s_client.ApiClient(k8s_client.Configuration(host="http://127.0.0.1:9"))
    app = build_middleware(settings, api_client=offline)
    assert isinstance(app.registry, CRDRegistry)
    assert isinstance(app.backend, LocalProcessBackend)
    with pytest.raises(SettingsError, match=r"^argument --models: required with the local"):
        parse_settings(["--backend", "local"], {}, pod_namespace_file="/nonexistent")
    with pytest.raises(SettingsError, match=r"^argument --models: not with --registry"):
        parse_settings([*argv, "--models", "m.yaml"], {}, pod_namespace_file="/nonexistent")
