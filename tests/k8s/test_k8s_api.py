"""Connecting to the cluster: kubeconfig and in-cluster detection, and error translation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s_client

from vllm_chill.backends.kubernetes import load_api_client, namespace_from_pod
from vllm_chill.backends.kubernetes._api import ApiError, call

from .cluster import simulated_cluster
from .emulator import DEPLOYMENTS

pytestmark = pytest.mark.anyio


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "sim", "cluster": {"server": server}}],
                "users": [{"name": "me", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "me"}}],
                "current-context": "sim",
            }
        )
    )
    return path


async def test_a_kubeconfig_file_reaches_its_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with simulated_cluster() as cluster:
        api = load_api_client(str(kubeconfig(tmp_path / "config", cluster.api_url)))
        try:
            apps = k8s_client.AppsV1Api(api)
            deployment = await call(apps.read_namespaced_deployment, "vllm", "ai-apps")
            assert deployment["metadata"]["name"] == "vllm"
            [request] = [r for r in cluster.server.requests_to("GET", DEPLOYMENTS) if r.name]
            assert request.headers["Authorization"] == "Bearer not-a-real-token"
        finally:
            api.close()


async def test_kubeconfig_env_is_used_when_no_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with simulated_cluster() as cluster:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "env", cluster.api_url)))
        api = load_api_client(None)
        try:
            core = k8s_client.CoreV1Api(api)
            configmap = await call(core.read_namespaced_config_map, "vllm-config", "ai-apps")
            assert configmap["data"] == {"UNRELATED": "kept"}
        finally:
            api.close()


async def test_api_errors_carry_the_status_and_the_servers_message() -> None:
    async with simulated_cluster() as cluster:
        apps = k8s_client.AppsV1Api(cluster.api_client)
        with pytest.raises(ApiError) as caught:
            await call(apps.read_namespaced_deployment, "nope", "ai-apps")
        assert caught.value.status == 404
        assert 'deployments "nope" not found' in caught.value.reason
        assert not caught.value.transient


async def test_an_unreachable_api_is_a_transient_error_without_a_status() -> None:
    configuration = k8s_client.Configuration(host="http://127.0.0.1:9")
    configuration.retries = False
    api = k8s_client.ApiClient(configuration)
    try:
        with pytest.raises(ApiError) as caught:
            await call(k8s_client.AppsV1Api(api).read_namespaced_deployment, "vllm", "ai-apps")
        assert caught.value.status == 0
        assert caught.value.transient
    finally:
        api.close()  # type: ignore[no-untyped-call]


def test_the_namespace_defaults_outside_a_pod() -> None:
    assert namespace_from_pod("fallback") == "fallback"
