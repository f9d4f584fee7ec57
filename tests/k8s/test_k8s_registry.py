"""CRDRegistry: VLLMModel resources listed, watched and cached through the official client."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from vllm_chill._model import VLLMModel
from vllm_chill.registries import CRDRegistry
from vllm_chill.registries._base import ModelRegistry

from .cluster import VLLMMODELS, Cluster, model_manifest, simulated_cluster

pytestmark = pytest.mark.anyio

A = model_manifest("model-a", maxModelLen=4096)
B = model_manifest("model-b")


@asynccontextmanager
async def running(cluster: Cluster, **options: Any) -> AsyncIterator[CRDRegistry]:
    registry = CRDRegistry(cluster.api_client, cluster.namespace, **options)
    async with registry.session():
        try:
            yield registry
        finally:
            begun = time.monotonic()
    assert time.monotonic() - begun < 5.0  # a watch blocked in a thread does not hold it


async def changed(registry: CRDRegistry, action: Callable[[], object]) -> None:
    """Run `action` and wait until the registry tells its listeners about a change."""
    event = anyio.Event()
    unsubscribe = registry.subscribe(event.set)
    try:
        action()
        with anyio.fail_after(10):
            await event.wait()
    finally:
        unsubscribe()


def served(registry: CRDRegistry) -> list[str]:
    return [m.served_model_name for m in registry.models()]


async def test_lists_the_namespaces_models() -> None:
    async with simulated_cluster(models=[B, A]) as cluster, running(cluster) as registry:
        assert isinstance(registry, ModelRegistry)
        assert registry.ready()
        assert served(registry) == ["model-a", "model-b"]
        model = registry.get("model-a")
        assert model is not None
        assert model.vllm_args() == VLLMModel.from_manifest(A).vllm_args()
        assert model.namespace == cluster.namespace
        assert registry.get("nope") is None


async def test_additions_changes_and_deletions_arrive_through_the_watch() -> None:
    async with simulated_cluster(models=[A]) as cluster, running(cluster) as registry:
        await changed(registry, lambda: cluster.add_model(B))
        assert served(registry) == ["model-a", "model-b"]

        await changed(
            registry,
            lambda: cluster.server.merge(
                VLLMMODELS, cluster.namespace, "model-b", {"spec": {"maxModelLen": 8192}}
            ),
        )
        model = registry.get("model-b")
        assert model is not None and model.max_model_len == 8192

        await changed(
            registry, lambda: cluster.server.remove(VLLMMODELS, cluster.namespace, "model-a")
        )
        assert served(registry) == ["model-b"]


async def test_an_invalid_object_is_skipped_with_a_warning_and_a_failed_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_chill")
    # The emulator does not enforce the CRD's schema, like a cluster with an outdated CRD.
    bad = model_manifest("bad", gpuMemoryUtilization=2.0, dtype="int3")
    async with simulated_cluster(models=[A, bad]) as cluster, running(cluster) as registry:
        assert served(registry) == ["model-a"]
        [warning] = [r.getMessage() for r in caplog.records if "'bad'" in r.getMessage()]
        assert "spec.gpuMemoryUtilization" in warning and "spec.dtype" in warning
        await cluster.wait_for(lambda: cluster.model_status("bad").get("phase") == "Failed")
        assert "spec.gpuMemoryUtilization" in cluster.model_status("bad")["message"]

        await changed(
            registry,
            lambda: cluster.server.merge(
                VLLMMODELS,
                cluster.namespace,
                "bad",
                {"spec": {"gpuMemoryUtilization": 0.5, "dtype": "auto"}},
            ),
        )
        assert served(registry) == ["bad", "model-a"]
        await cluster.wait_for(lambda: cluster.model_status("bad").get("phase") == "Pending")


async def test_a_duplicate_served_name_keeps_the_first_and_fails_the_other() -> None:
    copy = model_manifest("model-a-copy", served="model-a")
    async with simulated_cluster(models=[A, copy]) as cluster, running(cluster) as registry:
        assert served(registry) == ["model-a"]
        model = registry.get("model-a")
        assert model is not None and model.name == "model-a"
        await cluster.wait_for(
            lambda: (
                "already used by VLLMModel 'model-a'"
                in cluster.model_status("model-a-copy").get("message", "")
            )
        )


async def test_expired_and_dropped_watches_relist_and_keep_following() -> None:
    async with simulated_cluster(models=[A]) as cluster, running(cluster) as registry:
        lists = len(cluster.server.requests_to("GET", VLLMMODELS))
        cluster.server.compact()
        cluster.server.drop_watches()
        await changed(registry, lambda: cluster.add_model(B))
        assert served(registry) == ["model-a", "model-b"]
        assert len(cluster.server.requests_to("GET", VLLMMODELS)) > lists
        assert registry.ready()


async def test_an_unreachable_api_at_start_is_retried_until_it_answers() -> None:
    async with simulated_cluster(models=[A]) as cluster:
        cluster.server.fail_next("GET", VLLMMODELS, 503, times=2)
        async with running(cluster) as registry:
            assert not registry.ready()
            assert served(registry) == []
            event = anyio.Event()
            registry.subscribe(event.set)
            with anyio.fail_after(10):
                await event.wait()
            assert served(registry) == ["model-a"]
            assert registry.ready()


async def test_writes_no_status_when_told_not_to() -> None:
    bad = model_manifest("bad", gpuMemoryUtilization=2.0)
    async with (
        simulated_cluster(models=[bad]) as cluster,
        running(cluster, write_status=False) as registry,
    ):
        assert served(registry) == []
    assert not cluster.server.requests_to("PATCH", VLLMMODELS, subresource="status")
