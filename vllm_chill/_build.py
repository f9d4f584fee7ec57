"""Build the middleware that `Settings` describe: a registry, a backend, the options.

Backends are imported here, on use (hence the `noqa: PLC0415`), so that
`vllm-chill serve --backend sim` never imports the `kubernetes` client (slow to import, and not
needed on a laptop).
"""

from __future__ import annotations

import os
from typing import Any

from vllm_chill.backends._base import Backend
from vllm_chill.http._asgi import ASGIApp
from vllm_chill.middleware import ModelSwitchMiddleware
from vllm_chill.registries._base import ModelRegistry
from vllm_chill.settings import Settings, SettingsError


def build_middleware(
    settings: Settings, app: ASGIApp | None = None, *, api_client: Any = None
) -> ModelSwitchMiddleware:
    """The middleware for `settings`, not started (ASGI lifespan or `running()` starts it).

    With the kubernetes backend, `api_client` is used when given; otherwise it is loaded from
    `settings.kubeconfig` / the pod's service account, which reads files (blocking): async
    callers load it in a worker thread first (`vllm_chill.backends.kubernetes.load_api_client`).
    Raises `ValueError` (`SettingsError` included) for settings that cannot work.
    """
    registry, backend = build_parts(settings, api_client=api_client)
    return ModelSwitchMiddleware(app, registry=registry, backend=backend, settings=settings)


def build_parts(settings: Settings, *, api_client: Any = None) -> tuple[ModelRegistry, Backend]:
    if settings.backend == "sim":
        from vllm_chill.backends.sim._backend import SimBackend  # noqa: PLC0415

        sim = SimBackend(
            load_time=settings.sim.load_time,
            tokens_per_second=settings.sim.tokens_per_second,
            api_key=settings.upstream.api_key,
            gpus=settings.local.gpus or (),  # simulated GPUs: only the ones given
            wake_time=settings.sim.wake_time,
        )
        return _registry(settings, api_client), sim
    if settings.backend == "local":
        from vllm_chill.backends.local._backend import LocalProcessBackend  # noqa: PLC0415
        from vllm_chill.backends.local._gpus import discover_gpus  # noqa: PLC0415

        gpus = settings.local.gpus
        if gpus is None:
            gpus = discover_gpus(os.environ)
        try:
            local = LocalProcessBackend(
                settings.local.command, api_key=settings.upstream.api_key, gpus=gpus
            )
        except ValueError as exc:  # the template names what is wrong with it
            raise SettingsError(f"argument --command: {exc}") from None
        return _registry(settings, api_client), local
    if settings.backend == "kubernetes":
        return _kubernetes(settings, api_client)
    raise SettingsError("argument --backend: required (kubernetes, local or sim)")


def _registry(settings: Settings, api_client: Any) -> ModelRegistry:
    """Files, or (`--registry kubernetes`) the namespace's VLLMModel resources: the warm pool
    of a GPU pod that runs the local backend."""
    if settings.registry != "kubernetes":
        return _file_registry(settings)
    try:
        from vllm_chill.registries._kubernetes import CRDRegistry  # noqa: PLC0415
    except ImportError as exc:  # the `kubernetes` extra is not installed
        raise SettingsError(f"argument --registry: {exc}") from None
    if api_client is None:
        api_client = load_kubernetes_client(settings)
    return CRDRegistry(api_client, settings.kubernetes.namespace)


def _file_registry(settings: Settings, namespace: str | None = None) -> ModelRegistry:
    if not settings.models:
        raise SettingsError(f"argument --models: required with the {settings.backend} backend")
    from vllm_chill.registries._files import FileRegistry  # noqa: PLC0415

    return FileRegistry(settings.models, namespace=namespace)


def _kubernetes(settings: Settings, api_client: Any) -> tuple[ModelRegistry, Backend]:
    k8s = settings.kubernetes
    if not k8s.deployments:
        raise SettingsError("argument --deployment: required with the kubernetes backend")
    if len(k8s.deployments) > 1 and k8s.configmap:
        raise SettingsError(
            "argument --configmap: not with several Deployments (each would overwrite it)"
        )
    try:
        from vllm_chill.backends.kubernetes._backend import K8sDeploymentBackend  # noqa: PLC0415
        from vllm_chill.backends.kubernetes._slots import K8sDeploymentsBackend  # noqa: PLC0415
    except ImportError as exc:  # the `kubernetes` extra is not installed
        raise SettingsError(f"argument --backend: {exc}") from None

    if api_client is None:
        api_client = load_kubernetes_client(settings)
    urls = settings.upstream.urls or (None,) * len(k8s.deployments)
    slots = [
        K8sDeploymentBackend(
            api_client,
            namespace=k8s.namespace,
            deployment=deployment,
            container=k8s.container,
            configmap=k8s.configmap,
            unschedulable_grace=k8s.unschedulable_grace,
            image_pull_grace=k8s.image_pull_grace,
            upstream=url,
            upstream_api_key=settings.upstream.api_key,
            switch_models=k8s.enable_model_switch,
        )
        for deployment, url in zip(k8s.deployments, urls, strict=True)
    ]
    # One Deployment is exactly the single-slot backend; several are slots of one.
    backend: Backend = slots[0] if len(slots) == 1 else K8sDeploymentsBackend(slots)
    registry: ModelRegistry
    if not k8s.enable_model_switch:
        # Only what the Deployment runs now is served; other names are unknown (404).
        from vllm_chill.registries._deployment import DeploymentModelRegistry  # noqa: PLC0415

        registry = DeploymentModelRegistry(
            api_client,
            namespace=k8s.namespace,
            deployment=k8s.deployments[0],
            container=k8s.container,
        )
    elif settings.models:
        registry = _file_registry(settings, k8s.namespace)
    else:
        from vllm_chill.registries._kubernetes import CRDRegistry  # noqa: PLC0415

        registry = CRDRegistry(api_client, k8s.namespace)
    return registry, backend


def load_kubernetes_client(settings: Settings) -> Any:
    """The API client for `--kubeconfig` (or in-cluster config); blocking, it reads files.

    A missing or broken configuration is the operator's to fix: a `SettingsError`."""
    from vllm_chill.backends.kubernetes._api import load_api_client  # noqa: PLC0415

    try:
        return load_api_client(settings.kubernetes.kubeconfig)
    except Exception as exc:
        where = settings.kubernetes.kubeconfig or "in-cluster config, KUBECONFIG or ~/.kube/config"
        raise SettingsError(
            f"argument --kubeconfig: cannot load the Kubernetes configuration ({where}): {exc}"
        ) from exc
