"""`DeploymentModelRegistry`: the one model a Deployment runs, for serving without switching.

Without `--enable-model-switch` the proxy serves only what the vLLM Deployment already runs
(waking it from zero, idling it to zero); every other name is unknown (404). This registry
reads that model from the Deployment's args and follows edits to them through a watch, so an
operator's `kubectl edit` is picked up without restarting the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from kubernetes import client as k8s_client

from vllm_chill._model import VLLMModel
from vllm_chill.backends.kubernetes._backend import model_from_deployment
from vllm_chill.backends.kubernetes._watch import Informer
from vllm_chill.observability._logs import get_logger
from vllm_chill.registries._base import IndexedRegistry

logger = get_logger(__name__)


class DeploymentModelRegistry(IndexedRegistry):
    """`ModelRegistry` holding the model the Deployment's container args name.

    Pair it with `K8sDeploymentBackend(..., switch_models=False)`. `start()`/`stop()` must
    run in the same task; `async with` does both.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        deployment: str,
        container: str | None = None,
        watch_timeout: float = 300.0,
    ) -> None:
        apps = k8s_client.AppsV1Api(api_client)
        self._name = deployment
        self._container = container
        self._informer = Informer(
            f"Deployment {namespace}/{deployment}",
            apps.list_namespaced_deployment,
            namespace,
            field_selector=f"metadata.name={deployment}",
            on_change=self._rebuild,
            watch_timeout=watch_timeout,
        )
        super().__init__()
        self._model: VLLMModel | None = None
        self._in_session = False

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Watches the Deployment until the session ends."""
        if self._in_session:
            raise RuntimeError("DeploymentModelRegistry already has a session open")
        self._in_session = True
        try:
            async with anyio.create_task_group() as task_group:
                await task_group.start(self._informer.run)
                try:
                    yield
                finally:
                    task_group.cancel_scope.cancel()
        finally:
            self._in_session = False

    def ready(self) -> bool:
        return self._informer.ready

    def _rebuild(self) -> None:
        deployment = self._informer.get(self._name)
        model = model_from_deployment(deployment, self._container) if deployment else None
        if model != self._model:
            if model is None:
                logger.warning("the Deployment %s names no model in its args", self._name)
            else:
                logger.info("serving the Deployment's model %s", model.served_model_name)
            self._model = model
            self._index = {model.served_model_name: model} if model is not None else {}
            self._listeners.notify()
