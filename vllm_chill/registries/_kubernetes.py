"""`CRDRegistry`: the namespace's `VLLMModel` custom resources, listed, watched and cached.

Lookups are served from memory; an `Informer` keeps the cache in step with the API server
(resuming watches, relisting after 410 Gone, backing off on errors), so a change made with
`kubectl apply` is live within one watch event and the request path never waits on the API.

The API server validates objects against the CRD's schema, but a CRD installed from an older
release, or one edited by hand, may let through objects the proxy cannot use. Those are
skipped with a warning and, where RBAC allows, a `Failed` status that says why, so the operator
sees it in `kubectl get vllmmodels` rather than only in the proxy's log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from kubernetes import client as k8s_client

from vllm_chill._model import API_GROUP, API_VERSION, KIND, PLURAL, ModelValidationError, VLLMModel
from vllm_chill.backends.kubernetes._api import Obj
from vllm_chill.backends.kubernetes._reporting import Reporter
from vllm_chill.backends.kubernetes._watch import Informer
from vllm_chill.observability._logs import get_logger
from vllm_chill.registries._base import IndexedRegistry

logger = get_logger(__name__)

#: Prefix of the `Failed` messages this registry writes, so it can clear them once fixed.
INVALID_PREFIX = "invalid VLLMModel: "


class CRDRegistry(IndexedRegistry):
    """`ModelRegistry` over `VLLMModel` resources in one namespace.

    `start()` returns after the first list attempt: with the API unreachable, the registry
    starts empty, `ready()` is False, and it keeps retrying in the background. `start()` and
    `stop()` must run in the same task (as ASGI lifespan does); `async with` does both.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        watch_timeout: float = 300.0,
        write_status: bool = True,
    ) -> None:
        self._namespace = namespace
        self._write_status = write_status
        custom = k8s_client.CustomObjectsApi(api_client)
        self._informer = Informer(
            f"VLLMModels in {namespace}",
            custom.list_namespaced_custom_object,
            API_GROUP,
            API_VERSION.split("/", 1)[1],
            namespace,
            PLURAL,
            on_change=self._rebuild,
            watch_timeout=watch_timeout,
        )
        self._reporter = Reporter(api_client, namespace, instance="vllm-chill-registry")
        super().__init__()
        self._problems: dict[str, str] = {}
        self._sent: dict[str, tuple[str, str]] = {}
        self._in_session = False

    # -- ModelRegistry -------------------------------------------------------------------

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Lists the namespace's VLLMModels and watches them (and reports their status) until
        the session ends."""
        if self._in_session:
            raise RuntimeError("CRDRegistry already has a session open")
        self._in_session = True
        try:
            async with anyio.create_task_group() as task_group:
                await task_group.start(self._reporter.run)
                await task_group.start(self._informer.run)
                if self._informer.synced:
                    logger.info(
                        "%d VLLMModel(s) in namespace %s: %s",
                        len(self._index),
                        self._namespace,
                        ", ".join(self._index) or "none",
                    )
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._reporter.flush(2.0)
                    task_group.cancel_scope.cancel()
        finally:
            self._in_session = False

    def ready(self) -> bool:
        return self._informer.ready

    # -- cache -----------------------------------------------------------------------------

    def _rebuild(self) -> None:
        index: dict[str, VLLMModel] = {}
        owners: dict[str, str] = {}
        problems: dict[str, str] = {}
        for obj in self._informer.objects():
            name = str(obj["metadata"]["name"])
            try:
                model = VLLMModel.from_manifest(_complete(obj), source=f"VLLMModel {name!r}")
            except ModelValidationError as exc:
                problems[name] = "; ".join(exc.problems)
                continue
            owner = owners.get(model.served_model_name)
            if owner is not None:
                problems[name] = (
                    f"servedModelName {model.served_model_name!r} is already used by "
                    f"VLLMModel {owner!r}"
                )
                continue
            owners[model.served_model_name] = name
            index[model.served_model_name] = model
        self._report(problems)
        old, self._index = self._index, dict(sorted(index.items()))
        if list(old.values()) != list(self._index.values()):
            _log_changes(old, self._index)
            self._listeners.notify()

    def _report(self, problems: dict[str, str]) -> None:
        for name, problem in problems.items():
            if self._problems.get(name) != problem:
                logger.warning("skipping VLLMModel %r in %s: %s", name, self._namespace, problem)
        for name in self._problems.keys() - problems.keys():
            if name in self._informer.cache:
                logger.info("VLLMModel %r in %s is valid again", name, self._namespace)
        self._problems = problems
        if not self._write_status:
            return
        for obj in self._informer.objects():
            name = str(obj["metadata"]["name"])
            status = obj.get("status") or {}
            current = (status.get("phase"), status.get("message") or "")
            if name in problems:
                wanted = ("Failed", INVALID_PREFIX + problems[name])
            elif current[0] == "Failed" and str(current[1]).startswith(INVALID_PREFIX):
                wanted = ("Pending", "")
            else:
                continue
            # Once per wanted status: our own write comes back as a watch event.
            if current != wanted and self._sent.get(name) != wanted:
                self._sent[name] = wanted
                self._reporter.model_status(
                    name, "Failed" if name in problems else "Pending", wanted[1]
                )


def _complete(obj: Obj) -> Obj:
    """List items of some API servers omit apiVersion/kind; the manifest rules need them."""
    return {"apiVersion": API_VERSION, "kind": KIND, **obj}


def _log_changes(old: dict[str, VLLMModel], new: dict[str, VLLMModel]) -> None:
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(k for k in new.keys() & old.keys() if new[k] != old[k])
    logger.info(
        "VLLMModels changed: added %s, changed %s, removed %s",
        added or "none",
        changed or "none",
        removed or "none",
    )
