"""K8sDeploymentBackend against kmock's API emulator and the simulated kubelet (cluster.py).

Every scenario drives the official `kubernetes` client over HTTP; the pods' simulated vLLM
servers take their served name from the args the backend wrote, so a request answered by the
right model proves the switch reached the Deployment.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

from tests.test_manifests import schema_errors
from vllm_chill._model import VLLMModel
from vllm_chill.backends._base import Backend, LoadedModel, LoadError, LostCallback
from vllm_chill.backends.kubernetes import K8sDeploymentBackend
from vllm_chill.backends.kubernetes._rollout import (
    ACTIVE_MODEL,
    PHASE_MODELS,
    PHASE_OLD_PODS,
    PHASE_PULLING,
    PHASE_SCALING_UP,
    PHASE_SCHEDULING,
    PHASE_STARTING,
    PHASE_UPDATING,
    PHASE_VOLUME,
    POD_MODEL_HASH,
    SWITCHED_BY,
)
from vllm_chill.registries import DeploymentModelRegistry

from .cluster import (
    BASE_ARGS,
    CRASH_LOOP,
    IMAGE_PULL,
    NO_SCALE_UP,
    OOM_KILLED,
    PROGRESS_DEADLINE,
    PULL_BLIP,
    READY_EARLY,
    SCALE_UP,
    UNSCHEDULABLE,
    VLLMMODELS,
    VOLUME_PENDING,
    WRONG_MODEL,
    Cluster,
    model_manifest,
    simulated_cluster,
)
from .emulator import CONFIGMAPS, DEPLOYMENTS, EVENTS

pytestmark = pytest.mark.anyio

#: What the scheduler would allow a switch; failures must come long before it.
SWITCH_TIMEOUT = 30.0
FAST = 10.0

A = model_manifest("model-a", maxModelLen=4096)
B = model_manifest("model-b", toolCallParser="hermes", extraArgs=["--trust-remote-code"])
BROKEN = model_manifest("broken")
MODEL_A = VLLMModel.from_manifest(A)
MODEL_B = VLLMModel.from_manifest(B)
MODEL_BROKEN = VLLMModel.from_manifest(BROKEN)
PHASES = [
    PHASE_UPDATING,
    PHASE_OLD_PODS,
    PHASE_SCHEDULING,
    PHASE_PULLING,
    PHASE_STARTING,
    PHASE_MODELS,
]


class Lost:
    """An `on_lost` callback that can be awaited."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._event = anyio.Event()

    def __call__(self, reason: str, *, model: str | None = None) -> None:
        self.reasons.append(reason)
        self._event.set()

    async def wait(self) -> str:
        with anyio.fail_after(FAST):
            await self._event.wait()
        return self.reasons[-1]


def make_backend(cluster: Cluster, **options: Any) -> K8sDeploymentBackend:
    return K8sDeploymentBackend(
        cluster.api_client,
        namespace=cluster.namespace,
        deployment=cluster.deployment,
        upstream=cluster.upstream,
        **options,
    )


@asynccontextmanager
async def started(
    cluster: Cluster, lost: LostCallback | None = None, **options: Any
) -> AsyncIterator[K8sDeploymentBackend]:
    backend = make_backend(cluster, **options)
    async with backend.session(lost or Lost()):
        try:
            yield backend
        finally:
            begun = time.monotonic()
    assert time.monotonic() - begun < FAST  # never waits on a blocked watch thread


async def load(
    backend: K8sDeploymentBackend, model: VLLMModel, phases: list[str] | None = None
) -> LoadedModel:
    with anyio.fail_after(SWITCH_TIMEOUT):
        return await backend.load(model, (phases if phases is not None else []).append)


async def answering_model(loaded: LoadedModel) -> str:
    """Ask the loaded model through the official OpenAI client; return who answered."""
    async with AsyncOpenAI(base_url=f"{loaded.base_url}/v1", api_key="unused") as client:
        reply = await client.chat.completions.create(
            model=loaded.served_model_name,
            messages=[{"role": "user", "content": "who are you?"}],
            max_tokens=3,
        )
    return reply.model


def spec_writes(cluster: Cluster) -> int:
    """PATCHes of the Deployment that change its spec (switches, scaling), refused or not."""
    patches = cluster.server.requests_to("PATCH", DEPLOYMENTS)
    return sum(1 for request in patches if "spec" in json.loads(request.body))


def last_switch(cluster: Cluster, name: str) -> dict[str, Any]:
    """The model's `status.lastSwitch`; the stored object must be what the CRD accepts."""
    obj = cluster.server.read(VLLMMODELS, cluster.namespace, name)
    assert obj is not None
    assert schema_errors(obj) == []
    return dict(obj["status"]["lastSwitch"])


def moment(text: str) -> datetime.datetime:
    assert text.endswith("Z")  # RFC 3339, in UTC
    return datetime.datetime.fromisoformat(text)


def pod_hash(cluster: Cluster) -> str:
    return str(
        cluster.get_deployment()["spec"]["template"]["metadata"]["annotations"][POD_MODEL_HASH]
    )


# -- switching ---------------------------------------------------------------------------------


async def test_it_is_a_backend() -> None:
    async with simulated_cluster() as cluster:
        assert isinstance(make_backend(cluster), Backend)


async def test_switch_a_b_a_rewrites_the_args_and_the_named_model_answers() -> None:
    async with simulated_cluster(models=[A, B]) as cluster, started(cluster) as backend:
        phases: list[str] = []
        loaded = await load(backend, MODEL_A, phases)
        assert loaded == LoadedModel("model-a", cluster.upstream)
        assert await answering_model(loaded) == "model-a"
        assert cluster.args() == [*MODEL_A.vllm_args(), *BASE_ARGS]
        assert cluster.replicas() == 1
        assert phases[0] == PHASE_UPDATING
        assert phases == sorted(phases, key=PHASES.index)  # forward only

        loaded = await load(backend, MODEL_B)
        assert await answering_model(loaded) == "model-b"
        assert cluster.args() == [*MODEL_B.vllm_args(), *BASE_ARGS]
        assert cluster.args().count("--trust-remote-code") == 1

        loaded = await load(backend, MODEL_A)
        assert await answering_model(loaded) == "model-a"
        # model-b's extraArgs did not stay behind
        assert cluster.args() == [*MODEL_A.vllm_args(), *BASE_ARGS]
        assert cluster.sim.started == ["model-a", "model-b", "model-a"]
        assert cluster.get_deployment()["metadata"]["annotations"][ACTIVE_MODEL] == "model-a"


async def test_progress_follows_the_pod_through_its_phases() -> None:
    # Slow steps, so that each state lasts long enough to be seen.
    async with (
        simulated_cluster(models=[A], step=0.3, load_time=0.3) as cluster,
        started(cluster) as backend,
    ):
        phases: list[str] = []
        await load(backend, MODEL_A, phases)
        assert phases == [
            PHASE_UPDATING,
            PHASE_SCHEDULING,
            PHASE_PULLING,
            PHASE_STARTING,
        ]


async def test_loading_the_running_model_again_does_not_roll_the_pod() -> None:
    async with simulated_cluster(models=[A]) as cluster, started(cluster) as backend:
        await load(backend, MODEL_A)
        patches = len(cluster.server.requests_to("PATCH", DEPLOYMENTS))
        await load(backend, MODEL_A)
        assert len(cluster.server.requests_to("PATCH", DEPLOYMENTS)) == patches
        assert cluster.sim.started == ["model-a"]


async def test_unload_scales_to_zero_and_a_request_wakes_the_same_model() -> None:
    async with simulated_cluster(models=[A]) as cluster, started(cluster) as backend:
        await load(backend, MODEL_A)
        template = pod_hash(cluster)
        await backend.unload()
        assert cluster.replicas() == 0
        await cluster.wait_for(lambda: not cluster.pods())
        await backend.unload()  # idempotent
        assert cluster.replicas() == 0

        loaded = await load(backend, MODEL_A)
        assert await answering_model(loaded) == "model-a"
        assert cluster.replicas() == 1
        assert pod_hash(cluster) == template  # woken, not rewritten
        assert cluster.args() == [*MODEL_A.vllm_args(), *BASE_ARGS]
        assert cluster.sim.started == ["model-a", "model-a"]


async def test_ready_needs_v1_models_to_list_the_model_not_just_a_ready_pod() -> None:
    slow = model_manifest("slow")
    async with (
        simulated_cluster(models=[slow], failures={"slow": READY_EARLY}, load_time=0.5) as cluster,
        started(cluster) as backend,
    ):
        phases: list[str] = []
        loaded = await load(backend, VLLMModel.from_manifest(slow), phases)
        assert PHASE_MODELS in phases
        assert await answering_model(loaded) == "slow"


async def test_a_cancelled_load_stops_promptly_and_unload_cleans_up() -> None:
    async with (
        simulated_cluster(models=[A], load_time=30.0) as cluster,
        started(cluster) as backend,
    ):
        with anyio.fail_after(FAST), anyio.move_on_after(0.5) as scope:
            await backend.load(MODEL_A, lambda phase: None)
        assert scope.cancelled_caught
        await backend.unload()
        assert cluster.replicas() == 0
        await cluster.wait_for(lambda: not cluster.pods())


# -- failing fast ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (CRASH_LOOP, "CrashLoopBackOff"),
        (IMAGE_PULL, "ImagePull"),  # "not found": no retry of the kubelet can fix it
        (NO_SCALE_UP, "the cluster autoscaler will not add a node"),
        (OOM_KILLED, "OOMKilled"),
        (PROGRESS_DEADLINE, "ProgressDeadlineExceeded"),
    ],
)
async def test_a_failing_pod_fails_the_load_in_seconds_with_its_reason_then_scales_to_zero(
    failure: str, reason: str
) -> None:
    async with (
        simulated_cluster(models=[BROKEN], failures={"broken": failure}) as cluster,
        started(cluster) as backend,
    ):
        begun = time.monotonic()
        with pytest.raises(LoadError) as caught:
            await load(backend, MODEL_BROKEN)
        assert time.monotonic() - begun < FAST  # the pod's reason, not the switch timeout
        assert reason in caught.value.reason
        assert cluster.replicas() == 0
        await cluster.wait_for(lambda: cluster.model_status("broken").get("phase") == "Failed")
        assert reason in cluster.model_status("broken")["message"]
        switch = last_switch(cluster, "broken")
        assert switch["result"] == "failure" and reason in switch["reason"]
        await cluster.wait_for(
            lambda: any(e["reason"] == "ModelLoadFailed" for e in cluster.events())
        )
        [event] = [e for e in cluster.events() if e["reason"] == "ModelLoadFailed"]
        assert event["type"] == "Warning"
        assert event["involvedObject"]["kind"] == "Deployment"
        assert reason in event["message"]


async def test_an_unschedulable_pod_without_an_autoscaler_fails_after_the_grace_period() -> None:
    async with (
        simulated_cluster(models=[BROKEN], failures={"broken": UNSCHEDULABLE}) as cluster,
        started(cluster, unschedulable_grace=0.5) as backend,
    ):
        begun = time.monotonic()
        with pytest.raises(LoadError) as caught:
            await load(backend, MODEL_BROKEN)
        assert 0.5 <= time.monotonic() - begun < FAST
        reason = caught.value.reason
        assert "Insufficient nvidia.com/gpu" in reason and "after 0.5s" in reason
        assert "no cluster autoscaler announced a node" in reason
        assert cluster.replicas() == 0


async def test_an_unschedulable_pod_waits_for_the_node_a_cluster_autoscaler_adds() -> None:
    slow = model_manifest("gpu-pool-at-zero")
    async with (
        simulated_cluster(
            models=[slow], failures={slow["metadata"]["name"]: SCALE_UP}, wait_time=0.8
        ) as cluster,
        started(cluster, unschedulable_grace=0.2) as backend,
    ):
        phases: list[str] = []
        begun = time.monotonic()
        loaded = await load(backend, VLLMModel.from_manifest(slow), phases)
        assert time.monotonic() - begun >= 0.8  # well past the grace period: a node was coming
        assert PHASE_SCALING_UP in phases
        assert await answering_model(loaded) == "gpu-pool-at-zero"


async def test_without_permission_to_read_events_the_grace_period_decides() -> None:
    slow = model_manifest("gpu-pool-at-zero")
    async with simulated_cluster(
        models=[slow], failures={"gpu-pool-at-zero": SCALE_UP}, wait_time=5.0
    ) as cluster:
        cluster.server.fail_next("GET", EVENTS, 403, times=1000)
        async with started(cluster, unschedulable_grace=0.5) as backend:
            with pytest.raises(LoadError) as caught:
                await load(backend, VLLMModel.from_manifest(slow))
        assert "allow list and watch on events" in caught.value.reason


async def test_a_pod_waiting_for_its_volume_to_bind_is_not_failed() -> None:
    model = model_manifest("on-a-new-volume")
    async with (
        simulated_cluster(models=[model], failures={"on-a-new-volume": VOLUME_PENDING}) as cluster,
        started(cluster, unschedulable_grace=5.0) as backend,
    ):
        phases: list[str] = []
        loaded = await load(backend, VLLMModel.from_manifest(model), phases)
        # the autoscaler's NotTriggerScaleUp is no verdict on a pod that waits for a volume
        assert PHASE_VOLUME in phases
        assert await answering_model(loaded) == "on-a-new-volume"


async def test_an_image_pull_that_fails_once_gets_the_kubelets_retry() -> None:
    model = model_manifest("registry-blip")
    async with (
        simulated_cluster(models=[model], failures={"registry-blip": PULL_BLIP}) as cluster,
        started(cluster) as backend,
    ):
        loaded = await load(backend, VLLMModel.from_manifest(model))
        assert await answering_model(loaded) == "registry-blip"


async def test_the_next_load_waits_until_the_unloaded_pod_has_terminated() -> None:
    async with (
        simulated_cluster(models=[A, B], linger=0.5) as cluster,
        started(cluster) as backend,
    ):
        await load(backend, MODEL_A)
        await backend.unload()
        await cluster.wait_for(lambda: bool(cluster.sim.terminating))  # holding its GPU
        phases: list[str] = []
        loaded = await load(backend, MODEL_A, phases)
        assert await answering_model(loaded) == "model-a"
        assert PHASE_OLD_PODS in phases
        assert cluster.sim.overlaps == 0  # no pod was created beside the terminating one
        await backend.unload()
        loaded = await load(backend, MODEL_B)
        assert await answering_model(loaded) == "model-b"
        assert cluster.sim.overlaps == 0


async def test_a_failed_models_status_stays_failed_until_it_is_loaded_again() -> None:
    async with simulated_cluster(models=[A, BROKEN], failures={"broken": CRASH_LOOP}) as cluster:
        async with started(cluster) as backend:
            with pytest.raises(LoadError):
                await load(backend, MODEL_BROKEN)
            await backend.unload()  # what the scheduler does after a failed load
            await load(backend, MODEL_A)  # and the next model replaces it
        # stop() flushed every status write
        status = cluster.model_status("broken")
        assert status["phase"] == "Failed" and "CrashLoopBackOff" in status["message"]
        assert cluster.model_status("model-a")["phase"] == "Ready"
        async with started(cluster) as backend:
            with pytest.raises(LoadError):
                await load(backend, MODEL_BROKEN)  # loaded again: Loading, then Failed again
        written = [
            json.loads(r.body)["status"]["phase"]
            for r in cluster.server.requests_to("PATCH", VLLMMODELS, subresource="status")
            if r.name == "broken"
        ]
        assert written[-1] == "Failed" and written.count("Failed") == 2
        assert "Unloaded" not in written


async def test_an_upstream_that_wants_another_api_key_fails_the_load_at_once() -> None:
    async with simulated_cluster(models=[A], api_key="the-key") as cluster:
        async with started(cluster) as backend:
            begun = time.monotonic()
            with pytest.raises(LoadError) as caught:
                await load(backend, MODEL_A)
            assert time.monotonic() - begun < FAST
            assert "401" in caught.value.reason and "--upstream-api-key" in caught.value.reason
            assert cluster.replicas() == 0
        async with started(cluster, upstream_api_key="wrong") as backend:
            with pytest.raises(LoadError, match="refused the key"):
                await load(backend, MODEL_A)
        async with started(cluster, upstream_api_key="the-key") as backend:
            loaded = await load(backend, MODEL_A)
            assert loaded.served_model_name == "model-a"


async def test_a_pod_that_loaded_another_model_under_the_served_name_fails_the_load() -> None:
    model = model_manifest("impostor")
    async with (
        simulated_cluster(models=[model], failures={"impostor": WRONG_MODEL}) as cluster,
        started(cluster, root_mismatch_timeout=0.5) as backend,
    ):
        with pytest.raises(LoadError) as caught:
            await load(backend, VLLMModel.from_manifest(model))
        assert "'org/something-else'" in caught.value.reason
        assert "'org/impostor'" in caught.value.reason


async def test_after_a_failure_another_model_loads() -> None:
    async with (
        simulated_cluster(models=[A, BROKEN], failures={"broken": CRASH_LOOP}) as cluster,
        started(cluster) as backend,
    ):
        with pytest.raises(LoadError):
            await load(backend, MODEL_BROKEN)
        loaded = await load(backend, MODEL_A)
        assert await answering_model(loaded) == "model-a"


# -- status and events -------------------------------------------------------------------------


async def test_status_and_events_follow_the_switches() -> None:
    async with simulated_cluster(models=[A, B]) as cluster, started(cluster) as backend:
        await load(backend, MODEL_A)
        await cluster.wait_for(lambda: cluster.model_status("model-a").get("phase") == "Ready")
        assert cluster.model_status("model-a")["lastUpdated"]
        await load(backend, MODEL_B)
        await cluster.wait_for(lambda: cluster.model_status("model-b").get("phase") == "Ready")
        await cluster.wait_for(lambda: cluster.model_status("model-a").get("phase") == "Unloaded")
        await backend.unload()
        await cluster.wait_for(lambda: cluster.model_status("model-b").get("phase") == "Unloaded")
        await cluster.wait_for(
            lambda: (
                {"SwitchingModel", "ModelReady", "ScaledToZero"}
                <= {e["reason"] for e in cluster.events()}
            )
        )


async def test_a_switch_records_in_the_models_status_from_what_when_and_how_long() -> None:
    async with (
        simulated_cluster(models=[A, B], load_time=0.3) as cluster,
        started(cluster) as backend,
    ):
        await load(backend, MODEL_A)
        await cluster.wait_for(lambda: "lastSwitch" in cluster.model_status("model-a"))
        first = last_switch(cluster, "model-a")
        assert "from" not in first and first["result"] == "success"  # it ran nothing before
        before = datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0)
        begun = time.monotonic()
        await load(backend, MODEL_B)
        took = time.monotonic() - begun
        after = datetime.datetime.now(tz=datetime.UTC)
        await cluster.wait_for(lambda: cluster.model_status("model-b").get("phase") == "Ready")
        switch = last_switch(cluster, "model-b")
        assert switch["from"] == "model-a"
        assert switch["result"] == "success" and switch["kind"] == "cold"
        assert "reason" not in switch
        assert 0.3 <= switch["durationSeconds"] <= round(took, 3)  # in milliseconds
        started_at, finished_at = moment(switch["startedAt"]), moment(switch["finishedAt"])
        assert before <= started_at <= finished_at <= after
        elapsed = (finished_at - started_at).total_seconds()
        assert abs(elapsed - switch["durationSeconds"]) <= 1.0  # whole seconds
        assert last_switch(cluster, "model-a") == first  # the replaced model's is its own
        await backend.unload()
        await cluster.wait_for(lambda: cluster.model_status("model-b").get("phase") == "Unloaded")
        assert last_switch(cluster, "model-b") == switch  # kept once it runs nowhere


async def test_a_failed_switch_records_its_reason_until_a_load_succeeds() -> None:
    async with (
        simulated_cluster(models=[A, BROKEN], failures={"broken": CRASH_LOOP}) as cluster,
        started(cluster) as backend,
    ):
        await load(backend, MODEL_A)
        with pytest.raises(LoadError) as caught:
            await load(backend, MODEL_BROKEN)
        await cluster.wait_for(lambda: cluster.model_status("broken").get("phase") == "Failed")
        switch = last_switch(cluster, "broken")
        assert switch["from"] == "model-a" and switch["result"] == "failure"
        assert switch["reason"] == cluster.model_status("broken")["message"]
        assert switch["reason"] == caught.value.reason and "CrashLoopBackOff" in switch["reason"]
        assert switch["durationSeconds"] > 0
        assert moment(switch["startedAt"]) <= moment(switch["finishedAt"])
        await backend.unload()
        del cluster.sim.failures["broken"]  # fixed: the next load of it works
        await load(backend, MODEL_BROKEN)
        await cluster.wait_for(lambda: cluster.model_status("broken").get("phase") == "Ready")
        again = last_switch(cluster, "broken")
        assert again["result"] == "success"
        assert "reason" not in again and "from" not in again  # scaled to zero after the failure


async def test_a_switch_the_api_refuses_is_recorded_as_failed() -> None:
    async with simulated_cluster(models=[A]) as cluster, started(cluster) as backend:
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 403)
        with pytest.raises(LoadError, match="refused") as caught:
            await load(backend, MODEL_A)
        await cluster.wait_for(lambda: cluster.model_status("model-a").get("phase") == "Failed")
        assert cluster.model_status("model-a")["message"] == caught.value.reason
        switch = last_switch(cluster, "model-a")
        assert switch["result"] == "failure" and switch["reason"] == caught.value.reason


async def test_forbidden_status_and_event_writes_are_logged_once_and_loads_carry_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_chill")
    async with simulated_cluster(models=[A, B]) as cluster:
        cluster.server.fail_next("PATCH", VLLMMODELS, 403, subresource="status", times=1000)
        cluster.server.fail_next("POST", EVENTS, 403, times=1000)
        async with started(cluster) as backend:
            await load(backend, MODEL_A)
            loaded = await load(backend, MODEL_B)
            assert await answering_model(loaded) == "model-b"
        # stop() flushed the queued writes; every one of them was refused
        assert len(cluster.server.requests_to("PATCH", VLLMMODELS, subresource="status")) >= 4
        assert cluster.model_status("model-a") == {}
        assert len(cluster.server.requests_to("POST", EVENTS)) >= 3
        assert cluster.events() == []
        forbidden = [
            r.getMessage() for r in caplog.records if "not allowed to write" in r.getMessage()
        ]
        assert len(forbidden) == 2  # once per kind of write, not once per write
        assert any("vllmmodels/status" in message for message in forbidden)
        assert any("events" in message for message in forbidden)


# -- the API misbehaving -------------------------------------------------------------------------


async def test_api_conflicts_and_server_errors_are_retried() -> None:
    async with simulated_cluster(models=[A]) as cluster, started(cluster) as backend:
        cluster.server.fail_next("GET", DEPLOYMENTS, 503)
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 409)
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 500)
        loaded = await load(backend, MODEL_A)
        assert await answering_model(loaded) == "model-a"
        assert spec_writes(cluster) == 3  # the refused two, then the one that landed
        assert cluster.args() == [*MODEL_A.vllm_args(), *BASE_ARGS]


async def test_a_refused_write_fails_the_load_with_the_apis_reason() -> None:
    async with simulated_cluster(models=[A]) as cluster, started(cluster) as backend:
        cluster.server.fail_next("PATCH", DEPLOYMENTS, 403)
        with pytest.raises(LoadError, match="refused"):
            await load(backend, MODEL_A)


async def test_dropped_and_expired_watches_are_resumed_and_relisted() -> None:
    async with (
        simulated_cluster(models=[A, B], load_time=0.5) as cluster,
        started(cluster) as backend,
    ):
        lists = len(cluster.server.requests_to("GET", DEPLOYMENTS))
        async with anyio.create_task_group() as tasks:
            result: list[LoadedModel] = []

            async def run() -> None:
                result.append(await load(backend, MODEL_A))

            tasks.start_soon(run)
            await cluster.wait_for(lambda: bool(cluster.pods()))
            cluster.server.compact()  # every resourceVersion so far is now too old
            cluster.server.drop_watches()
        assert await answering_model(result[0]) == "model-a"
        assert len(cluster.server.requests_to("GET", DEPLOYMENTS)) > lists  # it relisted
        # and the watches still work: the next switch is seen through them
        loaded = await load(backend, MODEL_B)
        assert await answering_model(loaded) == "model-b"


async def test_a_watch_refused_by_the_api_is_retried_with_backoff() -> None:
    async with simulated_cluster(models=[A]) as cluster:
        cluster.server.fail_next("GET", DEPLOYMENTS, 500, watch=True, times=2)
        async with started(cluster) as backend:
            await cluster.wait_for(
                lambda: len(cluster.server.requests_to("GET", DEPLOYMENTS, watch=True)) >= 3
            )
            loaded = await load(backend, MODEL_A)
            assert await answering_model(loaded) == "model-a"
            assert await backend.check()


# -- several proxy replicas ----------------------------------------------------------------------


async def test_two_replicas_racing_for_different_models_lose_no_update() -> None:
    async with simulated_cluster(models=[A, B]) as cluster:
        lost = {"proxy-1": Lost(), "proxy-2": Lost()}
        # Hold the first write back so both replicas read the same version before writing.
        cluster.server.delay_next("PATCH", DEPLOYMENTS, 1.0)
        results: dict[str, LoadedModel] = {}
        async with (
            started(cluster, lost["proxy-1"], instance_id="proxy-1") as one,
            started(cluster, lost["proxy-2"], instance_id="proxy-2") as two,
        ):

            async def run(backend: K8sDeploymentBackend, model: VLLMModel) -> None:
                results[backend.instance_id] = await load(backend, model)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(run, one, MODEL_A)
                tasks.start_soon(run, two, MODEL_B)

            # Both loads succeeded, one after the other; the loser followed the winner's
            # rollout instead of cutting it, then switched.
            assert set(results) == {"proxy-1", "proxy-2"}
            first, last = cluster.sim.started
            assert {first, last} == {"model-a", "model-b"}
            winner = "proxy-1" if first == "model-a" else "proxy-2"
            loser = "proxy-2" if winner == "proxy-1" else "proxy-1"
            assert "switched" in await lost[winner].wait()
            assert not lost[loser].reasons
            # No lost update: the Deployment holds exactly the loser's model.
            final = MODEL_A if last == "model-a" else MODEL_B
            assert cluster.args() == [*final.vllm_args(), *BASE_ARGS]
            notes = cluster.get_deployment()["metadata"]["annotations"]
            assert notes[SWITCHED_BY] == loser
            assert notes[ACTIVE_MODEL] == final.name
            assert await answering_model(results[loser]) == final.served_model_name
            # the delayed write of the winner or the loser's stale one was refused (409)
            assert spec_writes(cluster) >= 3


async def test_two_replicas_loading_the_same_model_share_one_rollout() -> None:
    async with (
        simulated_cluster(models=[A], load_time=0.5) as cluster,
        started(cluster, instance_id="proxy-1") as one,
        started(cluster, instance_id="proxy-2") as two,
    ):
        results: list[LoadedModel] = []

        async def run(backend: K8sDeploymentBackend) -> None:
            results.append(await load(backend, MODEL_A))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, one)
            await cluster.wait_for(lambda: bool(cluster.pods()))
            tasks.start_soon(run, two)
        assert results == [LoadedModel("model-a", cluster.upstream)] * 2
        assert cluster.sim.started == ["model-a"]

        def ready_writes() -> list[dict[str, Any]]:
            writes = cluster.server.requests_to("PATCH", VLLMMODELS, subresource="status")
            statuses = [json.loads(r.body)["status"] for r in writes]
            return [status for status in statuses if status["phase"] == "Ready"]

        await cluster.wait_for(lambda: len(ready_writes()) == 2)
        # The switch's record is its maker's; the replica that joined the rollout adds none.
        assert ["lastSwitch" in status for status in ready_writes()].count(True) == 1


async def test_an_idle_replica_does_not_cut_another_replicas_switch_short() -> None:
    async with (
        simulated_cluster(models=[A, B], load_time=1.0) as cluster,
        started(cluster, instance_id="proxy-1") as one,
        started(cluster, instance_id="proxy-2") as two,
    ):
        await load(one, MODEL_A)
        async with anyio.create_task_group() as tasks:
            result: list[LoadedModel] = []

            async def run() -> None:
                result.append(await load(two, MODEL_B))

            tasks.start_soon(run)
            await cluster.wait_for(lambda: cluster.sim.started == ["model-a", "model-b"])
            await one.unload()  # proxy-1's idle timer fires while proxy-2 loads
            assert cluster.replicas() == 1
        assert await answering_model(result[0]) == "model-b"
        await two.unload()
        assert cluster.replicas() == 0


async def test_a_restarted_proxy_adopts_the_ready_model_without_touching_it() -> None:
    async with simulated_cluster(models=[A]) as cluster:
        async with started(cluster, instance_id="before") as backend:
            await load(backend, MODEL_A)
        patches = len(cluster.server.requests_to("PATCH", DEPLOYMENTS))
        backend = make_backend(cluster, instance_id="after")
        async with backend.session(Lost()) as adopted:
            assert adopted == LoadedModel("model-a", cluster.upstream)
            assert await answering_model(adopted) == "model-a"
        assert len(cluster.server.requests_to("PATCH", DEPLOYMENTS)) == patches
        assert cluster.replicas() == 1  # ending the session never unloads


async def test_a_proxy_restarted_during_a_load_joins_the_rollout() -> None:
    async with simulated_cluster(models=[A, B], load_time=1.5) as cluster:
        backend = make_backend(cluster, instance_id="before")
        async with backend.session(Lost()), anyio.create_task_group() as tasks:
            tasks.start_soon(load, backend, MODEL_A)
            await cluster.wait_for(lambda: bool(cluster.pods()))
            tasks.cancel_scope.cancel()  # the proxy dies mid-load (no unload)
        generation = cluster.get_deployment()["metadata"]["generation"]

        async with started(cluster, instance_id="after") as restarted:
            loaded = await load(restarted, MODEL_A)
            assert await answering_model(loaded) == "model-a"
            # no second rollout: the spec was not written again
            assert cluster.get_deployment()["metadata"]["generation"] == generation
            assert cluster.sim.started == ["model-a"]
        # Its maker died before the end: a load that joined it does not claim the switch.
        assert cluster.model_status("model-a")["phase"] == "Ready"
        assert "lastSwitch" not in cluster.model_status("model-a")


async def test_a_proxy_restarted_during_a_load_adopts_nothing_and_waits_to_switch() -> None:
    async with simulated_cluster(models=[A, B], load_time=1.0) as cluster:
        backend = make_backend(cluster, instance_id="before")
        async with backend.session(Lost()), anyio.create_task_group() as tasks:
            tasks.start_soon(load, backend, MODEL_A)
            await cluster.wait_for(lambda: bool(cluster.pods()))
            tasks.cancel_scope.cancel()

        # The dead proxy will never confirm its rollout: wait that long for its confirmation.
        restarted = make_backend(cluster, instance_id="after", confirm_timeout=1.0)
        async with restarted.session(Lost()) as adopted:
            assert adopted is None  # mid-rollout: not adopted
            phases: list[str] = []
            loaded = await load(restarted, MODEL_B, phases)
            assert any("another replica" in phase for phase in phases)
            assert await answering_model(loaded) == "model-b"
            assert cluster.sim.started == ["model-a", "model-b"]


# -- the loaded model going away -----------------------------------------------------------------


async def test_scaled_to_zero_by_someone_else_is_reported_lost() -> None:
    async with simulated_cluster(models=[A]) as cluster:
        lost = Lost()
        async with started(cluster, lost) as backend:
            await load(backend, MODEL_A)
            cluster.patch_deployment({"spec": {"replicas": 0}})
            assert "scaled to zero" in await lost.wait()


async def test_a_pod_that_does_not_come_back_is_reported_lost() -> None:
    async with simulated_cluster(models=[A]) as cluster:
        lost = Lost()
        async with started(cluster, lost) as backend:
            await load(backend, MODEL_A)
            await cluster.sim.kill_pod()
            assert "no ready vLLM pod" in await lost.wait()
            # the next request's load joins the Deployment's model again
            cluster.sim.hold = False
            await cluster.sim.kill_pod(replace=True)
            loaded = await load(backend, MODEL_A)
            assert await answering_model(loaded) == "model-a"


async def test_our_own_switches_and_unloads_are_not_reported_lost() -> None:
    async with simulated_cluster(models=[A, B]) as cluster:
        lost = Lost()
        async with started(cluster, lost) as backend:
            await load(backend, MODEL_A)
            await load(backend, MODEL_B)
            await backend.unload()
            await load(backend, MODEL_A)
            await cluster.wait_for(lambda: cluster.sim.pod is not None and cluster.sim.pod.ready)
        assert lost.reasons == []


# -- ConfigMap mode ----------------------------------------------------------------------------


async def test_configmap_mode_writes_the_settings_and_rolls_the_pod() -> None:
    async with simulated_cluster(models=[A, B]) as cluster:
        async with started(cluster, configmap="vllm-config") as backend:
            await load(backend, MODEL_A)
            assert cluster.configmap_data() == {"UNRELATED": "kept", **MODEL_A.configmap_data()}
            assert cluster.args() == [*MODEL_A.vllm_args(), *BASE_ARGS]
            first = pod_hash(cluster)
            loaded = await load(backend, MODEL_B)
            assert cluster.configmap_data() == {"UNRELATED": "kept", **MODEL_B.configmap_data()}
            assert pod_hash(cluster) != first
            assert await answering_model(loaded) == "model-b"
        assert len(cluster.server.requests_to("PATCH", CONFIGMAPS)) == 2


async def test_a_configmap_driven_deployment_keeps_its_args_and_still_rolls() -> None:
    async with (
        simulated_cluster(models=[A, B], args=["--port", "8000"]) as cluster,
        started(cluster, configmap="vllm-config") as backend,
    ):
        loaded = await load(backend, MODEL_A)
        assert await answering_model(loaded) == "model-a"  # read from the ConfigMap
        loaded = await load(backend, MODEL_B)
        assert await answering_model(loaded) == "model-b"
        assert cluster.args() == ["--port", "8000"]
        assert cluster.sim.started == ["model-a", "model-b"]


async def test_a_missing_configmap_fails_the_load_with_its_name() -> None:
    async with (
        simulated_cluster(models=[A]) as cluster,
        started(cluster, configmap="nope") as backend,
    ):
        with pytest.raises(LoadError, match="ConfigMap ai-apps/nope not found"):
            await load(backend, MODEL_A)


# -- real Deployments ---------------------------------------------------------------------------


STRAY = [
    "-tp", "2", "--max_model_len=2048", "--no-enable-prefix-caching",
    "--device-memory-utilization", "0.5", "--no_enable_chunked_prefill",
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "head"),
    [(["vllm"], ["serve"]), (["vllm", "serve"], [])],
)
async def test_a_vllm_serve_deployment_keeps_serve_and_gets_the_model_positionally(
    command: list[str], head: list[str]
) -> None:
    args = [*head, "org/initial", "--served-model-name", "initial", *STRAY, *BASE_ARGS]
    async with (
        simulated_cluster(models=[A], command=command, args=args) as cluster,
        started(cluster) as backend,
    ):
        loaded = await load(backend, MODEL_A)
        # the pod runs model-a from org/model-a (its /v1/models root): no stray old model
        assert await answering_model(loaded) == "model-a"
        rendered = [MODEL_A.model_name, *MODEL_A.vllm_args(include_model=False)]
        assert cluster.args() == [*head, *rendered, *BASE_ARGS]
        assert cluster.container()["command"] == command


async def test_the_vllm_container_is_found_beside_a_sidecar() -> None:
    sidecar = {
        "name": "metrics",
        "image": "prom/statsd-exporter:v0.26.0",
        "args": ["--web.listen-address=:9102"],
    }
    async with (
        simulated_cluster(models=[A], container="server", sidecars=[sidecar]) as cluster,
        started(cluster) as backend,
    ):
        loaded = await load(backend, MODEL_A)
        assert await answering_model(loaded) == "model-a"
        assert cluster.container("metrics") == sidecar
        assert cluster.args() == [*MODEL_A.vllm_args(), *BASE_ARGS]


async def test_a_pod_whose_vllm_container_cannot_be_told_is_refused_at_start() -> None:
    sidecar = {"name": "metrics", "image": "prom/statsd-exporter:v0.26.0"}
    async with simulated_cluster(models=[A], container="server", sidecars=[sidecar]) as cluster:
        cluster.patch_deployment(
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                sidecar,
                                {"name": "server", "image": "registry.example/llm:1"},
                            ]
                        }
                    }
                }
            }
        )
        backend = make_backend(cluster)
        with pytest.raises(RuntimeError, match="--container"):
            async with backend.session(Lost()):
                pass
        async with started(cluster, container="server"):
            pass  # named: fine


# -- without --enable-model-switch -------------------------------------------------------------


async def test_single_model_mode_wakes_the_deployments_model_and_refuses_others() -> None:
    args = ["--model", "org/initial", "--served-model-name", "initial", *BASE_ARGS]
    async with simulated_cluster(models=[A], args=args) as cluster:
        registry = DeploymentModelRegistry(
            cluster.api_client, namespace=cluster.namespace, deployment=cluster.deployment
        )
        async with registry.session(), started(cluster, switch_models=False) as backend:
            assert await backend.deployed_model_name() == "initial"
            assert [m.served_model_name for m in registry.models()] == ["initial"]
            model = registry.get("initial")
            assert model is not None and model.model_name == "org/initial"
            loaded = await load(backend, model)
            assert await answering_model(loaded) == "initial"
            assert cluster.args() == args  # woken, never rewritten
            with pytest.raises(LoadError, match="model switching is disabled"):
                await load(backend, MODEL_A)
            await backend.unload()
            assert cluster.replicas() == 0


async def test_a_missing_deployment_is_a_configuration_error_at_start() -> None:
    async with simulated_cluster() as cluster:
        backend = K8sDeploymentBackend(
            cluster.api_client, namespace=cluster.namespace, deployment="nope"
        )
        with pytest.raises(RuntimeError, match="ai-apps/nope"):
            async with backend.session(Lost()):
                pass


async def test_the_deployment_object_keeps_fields_the_client_does_not_model() -> None:
    async with simulated_cluster(models=[A]) as cluster:
        cluster.patch_deployment(
            {
                "metadata": {"annotations": {"team.example/owner": "ml"}},
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    **cluster.get_deployment()["spec"]["template"]["spec"][
                                        "containers"
                                    ][0],
                                    "futureField": {"x": 1},
                                }
                            ]
                        }
                    }
                },
            }
        )
        async with started(cluster) as backend:
            await load(backend, MODEL_A)
        deployment = cluster.get_deployment()
        assert deployment["metadata"]["annotations"]["team.example/owner"] == "ml"
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["futureField"] == {"x": 1}
        assert container["envFrom"] == [{"configMapRef": {"name": "vllm-config"}}]
        assert cluster.server.read(DEPLOYMENTS, cluster.namespace, cluster.deployment) is not None
