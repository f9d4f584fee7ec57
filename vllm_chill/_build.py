"""Build the middleware that `Settings` describe: a registry, a backend, the options.

Backends are imported here, on use (hence the `noqa: PLC0415`), so that
`vllm-chill serve --backend sim` never imports the `kubernetes` client (slow to import, and not
needed on a laptop).
"""

from __future__ import annotations

from dataclasses import fields
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
    options = settings.proxy_options()
    return ModelSwitchMiddleware(
        app,
        registry=registry,
        backend=backend,
        **{f.name: getattr(options, f.name) for f in fields(options)},
    )


def build_parts(settings: Settings, *, api_client: Any = None) -> tuple[ModelRegistry, Backend]:
    if settings.backend == "sim":
        from vllm_chill.backends.sim._backend import SimBackend  # noqa: PLC0415

        sim = SimBackend(
            load_time=settings.sim_load_time,
            tokens_per_second=settings.sim_tokens_per_second,
            api_key=settings.upstream_api_key,
        )
        return _file_registry(settings), sim
    if settings.backend == "local":
        from vllm_chill.backends.local._backend import LocalProcessBackend  # noqa: PLC0415

        local = LocalProcessBackend(settings.command, api_key=settings.upstream_api_key)
        return _file_registry(settings), local
    return _kubernetes(settings, api_client)


def _file_registry(settings: Settings, namespace: str | None = None) -> ModelRegistry:
    if not settings.models:
        raise SettingsError(f"argument --models: required with the {settings.backend} backend")
    from vllm_chill.registries._files import FileRegistry  # noqa: PLC0415

    return FileRegistry(settings.models, namespace=namespace)


def _kubernetes(settings: Settings, api_client: Any) -> tuple[ModelRegistry, Backend]:
    if settings.deployment is None or settings.upstream is None:
        raise SettingsError("argument --deployment: required with the kubernetes backend")
    try:
        from vllm_chill.backends.kubernetes._backend import K8sDeploymentBackend  # noqa: PLC0415
    except ImportError as exc:  # the `kubernetes` extra is not installed
        raise SettingsError(f"argument --backend: {exc}") from None

    if api_client is None:
        api_client = load_kubernetes_client(settings)
    backend = K8sDeploymentBackend(
        api_client,
        namespace=settings.namespace,
        deployment=settings.deployment,
        container=settings.container,
        configmap=settings.configmap,
        unschedulable_grace=settings.unschedulable_grace,
        image_pull_grace=settings.image_pull_grace,
        upstream=settings.upstream,
        upstream_api_key=settings.upstream_api_key,
        switch_models=settings.enable_model_switch,
    )
    registry: ModelRegistry
    if not settings.enable_model_switch:
        # Only what the Deployment runs now is served; other names are unknown (404).
        from vllm_chill.registries._deployment import DeploymentModelRegistry  # noqa: PLC0415

        registry = DeploymentModelRegistry(
            api_client,
            namespace=settings.namespace,
            deployment=settings.deployment,
            container=settings.container,
        )
    elif settings.models:
        registry = _file_registry(settings, settings.namespace)
    else:
        from vllm_chill.registries._kubernetes import CRDRegistry  # noqa: PLC0415

        registry = CRDRegistry(api_client, settings.namespace)
    return registry, backend


def load_kubernetes_client(settings: Settings) -> Any:
    """The API client for `--kubeconfig` (or in-cluster config); blocking, it reads files.

    A missing or broken configuration is the operator's to fix: a `SettingsError`."""
    from vllm_chill.backends.kubernetes._api import load_api_client  # noqa: PLC0415

    try:
        return load_api_client(settings.kubeconfig)
    except Exception as exc:
        where = settings.kubeconfig or "in-cluster config, KUBECONFIG or ~/.kube/config"
        raise SettingsError(
            f"argument --kubeconfig: cannot load the Kubernetes configuration ({where}): {exc}"
        ) from exc
