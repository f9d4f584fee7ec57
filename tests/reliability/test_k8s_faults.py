"""Kubernetes faults through the whole proxy: `ModelSwitchMiddleware` + `CRDRegistry` +
`K8sDeploymentBackend`, the official client against the simulated cluster of `tests/k8s`
(kmock's API emulator and a simulated kubelet whose pods are simulated vLLMs).

A pod deleted under a ready model, the API answering 500/409/503/403, watches dropped and
expired (410), the proxy restarting during a load, a GPU pool scaled to zero that a cluster
autoscaler scales up, a failed load whose reason must stay in the model's status. After each:
no request hangs, `/proxy/status` and `/v1/models` tell the truth, no task is left. Every API
call the proxy made is then checked against the example's Role: the RBAC of
`examples/kubernetes-with-model-switching.yaml` is not only small (`test_security.py`) but
enough.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from tests.k8s.cluster import CRASH_LOOP, SCALE_UP, Cluster, model_manifest, simulated_cluster
from tests.k8s.emulator import DEPLOYMENTS
from tests.support import chat
from vllm_chill.backends.kubernetes import K8sDeploymentBackend
from vllm_chill.registries import CRDRegistry

from .helpers import Reply, Snapshot, Stack, assert_no_leak, openai_error, proxy_stack

pytestmark = pytest.mark.anyio

A = model_manifest("model-a")
B = model_manifest("model-b")
BROKEN = model_manifest("broken")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kubernetes-with-model-switching.yaml"

#: Every API request any test of this module made, for the RBAC check at the end.
API_CALLS: list[tuple[str, str, str, str, bool]] = []
#: Calls the proxy makes when the Role allows them and does without otherwise: the Events of
#: a pod waiting for a node say whether a cluster autoscaler adds one; without them, a grace
#: period decides (tests/k8s/test_k8s_backend.py).
OPTIONAL_CALLS = frozenset({("", "events", "list"), ("", "events", "watch")})


@asynccontextmanager
async def proxy_on(
    cluster: Cluster,
    *,
    configmap: bool = False,
    backend_options: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[Stack]:
    backend = K8sDeploymentBackend(
        cluster.api_client,
        namespace=cluster.namespace,
        deployment=cluster.deployment,
        configmap=cluster.configmap if configmap else None,
        upstream=cluster.upstream,
        confirm_timeout=1.0,
        **(backend_options or {}),
    )
    registry = CRDRegistry(cluster.api_client, cluster.namespace)
    async with proxy_stack(registry=registry, backend=backend, **options) as stack:
        yield stack


@asynccontextmanager
async def cluster_with(*models: dict[str, Any], **kw: Any) -> AsyncIterator[Cluster]:
    async with simulated_cluster(models=models, **kw) as cluster:
        try:
            yield cluster
        finally:
            API_CALLS.extend(_calls(cluster))


def _calls(cluster: Cluster) -> list[tuple[str, str, str, str, bool]]:
    """(api group, resource[/subresource], verb, name, is watch) of every request the proxy
    made: the official client's, not the simulated kubelet's (httpx)."""
    calls = []
    for request in cluster.server:
        resource = request.resource
        agent = request.headers.get("User-Agent") or request.headers.get("user-agent") or ""
        if resource is None or agent.startswith("python-httpx"):
            continue  # discovery and the like, and the kubelet's own writes
        plural = (resource.plural or "") + (
            f"/{request.subresource}" if request.subresource else ""
        )
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        watch = request.params.get("watch") == "true"
        verb = {
            "GET": "watch" if watch else ("get" if request.name else "list"),
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete",
        }[method.upper()]
        calls.append((resource.group or "", plural, verb, request.name or "", watch))
    return calls


async def ask(stack: Stack, model: str, timeout: float = 20) -> Reply:
    with anyio.fail_after(timeout):
        return await stack.post("/v1/chat/completions", chat(model, max_tokens=2), timeout=timeout)


async def states(stack: Stack) -> dict[str, str]:
    return {m["id"]: m["state"] for m in (await stack.get("/v1/models")).json()["data"]}


# --- a pod deleted under a ready model --------------------------------------------------------


async def test_a_pod_deleted_under_a_ready_model_is_noticed_and_the_next_request_reloads() -> None:
    start = Snapshot.take()
    async with cluster_with(A, B) as cluster, proxy_on(cluster, max_wait=15) as stack:
        assert (await ask(stack, "model-a")).status == 200
        await cluster.sim.kill_pod()  # the node is gone; nothing replaces the pod
        status = await stack.wait_status(lambda st: st["phase"] == "idle", timeout=15)
        assert status["active_model"] is None and status["requests_in_flight"] == {}
        assert (await states(stack))["model-a"] == "unloaded"
        cluster.sim.hold = False  # the cluster can schedule pods again...
        await cluster.sim.kill_pod(replace=True)  # ...and its ReplicaSet controller acts
        reply = await ask(stack, "model-a")
        assert reply.status == 200 and reply.json()["model"] == "model-a"
        status = await stack.status()
        assert (status["active_model"], status["phase"]) == ("model-a", "ready")
        assert cluster.replicas() == 1 and len(cluster.pods()) == 1
    await assert_no_leak(start, timeout=10)


# --- the API misbehaving ----------------------------------------------------------------------


async def test_api_errors_during_a_switch_are_retried_behind_a_held_request() -> None:
    start = Snapshot.take()
    async with (
        cluster_with(A, B) as cluster,
        proxy_on(cluster, configmap=True, max_wait=20) as stack,
    ):
        cluster.server.fail_next("GET", DEPLOYMENTS, 503)
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 409)
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 500)
        reply = await ask(stack, "model-a")
        assert reply.status == 200 and reply.json()["model"] == "model-a"
        status = await stack.status()
        assert status["last_switch"]["result"] == "success"
        assert (await states(stack)) == {"model-a": "loaded", "model-b": "unloaded"}
        assert cluster.configmap_data()["SERVED_MODEL_NAME"] == "model-a"
    await assert_no_leak(start, timeout=10)


async def test_a_refused_write_fails_the_request_at_once_with_the_reason() -> None:
    start = Snapshot.take()
    async with cluster_with(A, B) as cluster, proxy_on(cluster, max_wait=20) as stack:
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 403)
        with anyio.fail_after(10):  # well before max_wait: the failure is known at once
            reply = await ask(stack, "model-a")
        error = openai_error(reply)
        assert reply.status == 503 and error["code"] == "model_switch_failed"
        assert "refused" in error["message"] or "403" in error["message"], error
        status = await stack.wait_status(lambda st: st["phase"] == "idle")
        assert "model-a" in status["failed_models"]
        assert (await states(stack))["model-a"] == "failed"
        # and another model still loads
        assert (await ask(stack, "model-b")).status == 200
    await assert_no_leak(start, timeout=10)


async def test_dropped_and_expired_watches_during_a_load_lose_nothing() -> None:
    start = Snapshot.take()
    async with (
        cluster_with(A, B, load_time=0.5) as cluster,
        proxy_on(cluster, max_wait=20) as stack,
    ):
        async with anyio.create_task_group() as tg:
            replies: list[Reply] = []

            async def request() -> None:
                replies.append(await ask(stack, "model-a"))

            tg.start_soon(request)
            await cluster.wait_for(lambda: bool(cluster.pods()))
            cluster.server.compact()  # every resourceVersion so far: 410 Gone on resume
            cluster.server.drop_watches()
        assert replies[0].status == 200 and replies[0].json()["model"] == "model-a"
        # The registry's watch came back too: a model added now is served.
        cluster.add_model(model_manifest("model-c"))
        with anyio.fail_after(10):
            while "model-c" not in await states(stack):
                await anyio.sleep(0.05)
        reply = await ask(stack, "model-c")
        assert reply.status == 200 and reply.json()["model"] == "model-c"
        status = await stack.status()
        assert (status["active_model"], status["phase"]) == ("model-c", "ready")
    await assert_no_leak(start, timeout=10)


# --- the proxy restarting during a load -------------------------------------------------------


async def test_the_proxy_restarting_during_a_load_lets_its_client_go_and_the_next_serves() -> None:
    start = Snapshot.take()
    async with cluster_with(A, B, load_time=1.0) as cluster:
        outcomes: list[int | str] = []

        async def held(stack: Stack) -> None:
            try:
                outcomes.append((await ask(stack, "model-b")).status)
            except Exception as exc:  # the connection closed: an outcome too
                outcomes.append(type(exc).__name__)

        with anyio.fail_after(20):
            async with (
                anyio.create_task_group() as clients,
                proxy_on(cluster, max_wait=60) as first,
            ):
                clients.start_soon(held, first)
                await cluster.wait_for(lambda: bool(cluster.pods()))
        assert len(outcomes) == 1  # let go, not hung

        async with proxy_on(cluster, max_wait=20) as second:
            reply = await ask(second, "model-b")
            assert reply.status == 200 and reply.json()["model"] == "model-b"
            status = await second.status()
            assert (status["active_model"], status["phase"]) == ("model-b", "ready")
            assert cluster.replicas() == 1
    await assert_no_leak(start, timeout=10)


# --- Kubernetes as it really behaves -----------------------------------------------------------


async def test_a_gpu_pool_scaled_to_zero_serves_the_first_request_once_its_node_is_up() -> None:
    """The pod is Unschedulable until the cluster autoscaler's node joins (TriggeredScaleUp):
    the load waits for it, well past the grace period for pods nobody scales up for."""
    start = Snapshot.take()
    async with (
        cluster_with(A, failures={"model-a": SCALE_UP}, wait_time=1.0) as cluster,
        proxy_on(cluster, max_wait=20, backend_options={"unschedulable_grace": 0.3}) as stack,
    ):
        reply = await ask(stack, "model-a")
        assert reply.status == 200 and reply.json()["model"] == "model-a"
        assert (await stack.status())["last_switch"]["result"] == "success"
    await assert_no_leak(start, timeout=10)


async def test_a_failed_loads_reason_stays_in_the_models_status_after_the_cleanup() -> None:
    """`kubectl get vllm` must still say why a model failed after the proxy scaled to zero
    and moved on to another model."""
    start = Snapshot.take()
    async with cluster_with(A, BROKEN, failures={"broken": CRASH_LOOP}) as cluster:
        async with proxy_on(cluster, max_wait=15) as stack:
            reply = await ask(stack, "broken")
            assert reply.status == 503 and openai_error(reply)["code"] == "model_switch_failed"
            await stack.wait_status(lambda st: st["phase"] == "idle")
            assert (await ask(stack, "model-a")).status == 200
        # the proxy stopped: every status write it queued has been made
        status = cluster.model_status("broken")
        assert status["phase"] == "Failed", status
        assert "CrashLoopBackOff" in status["message"]
        assert cluster.model_status("model-a")["phase"] == "Ready"
    await assert_no_leak(start, timeout=10)


# --- the RBAC of the example is enough for all of the above -----------------------------------


def _role_rules() -> list[dict[str, Any]]:
    if not EXAMPLE.exists():
        pytest.skip("examples/kubernetes-with-model-switching.yaml does not exist yet")
    documents = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    return [rule for d in documents if d["kind"] == "Role" for rule in d["rules"]]


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str, name: str) -> bool:
    for rule in rules:
        if (
            group in rule["apiGroups"]
            and resource in rule["resources"]
            and verb in rule["verbs"]
            and (not rule.get("resourceNames") or name in rule["resourceNames"])
        ):
            return True
    return False


def test_the_example_role_allows_exactly_the_api_calls_made_above() -> None:
    """Runs after the scenarios above (file order): everything they made the proxy do (the
    simulated kubelet's own calls left out) must be allowed, and everything allowed used."""
    if not API_CALLS:
        pytest.skip("run with the scenarios above")
    rules = _role_rules()
    # The test cluster's own Deployment is called "vllm" like the example's; its namespace
    # differs in nothing the Role names.
    refused = sorted(
        {
            call
            for call in API_CALLS
            if not _allowed(rules, *call[:4]) and call[:3] not in OPTIONAL_CALLS
        },
    )
    assert refused == [], json.dumps(refused, indent=1)
    used = {(group, resource, verb) for group, resource, verb, _, _ in API_CALLS}
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # Least privilege the other way round: nothing is granted that the proxy never used.
    assert granted <= used, f"granted but never used: {sorted(granted - used)}"
