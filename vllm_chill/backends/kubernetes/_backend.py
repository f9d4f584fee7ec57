"""`K8sDeploymentBackend`: switch models by rewriting a vLLM Deployment.

A load rewrites the vLLM container's args (and, with a ConfigMap, the ConfigMap), scales to
one replica, and waits until the rollout is complete as `kubectl rollout status` means it
*and* the upstream's `/v1/models` lists the served name with the model's `modelName` as its
`root`. It learns about the rollout from watches of the Deployment and its pods; it fails as
soon as a pod reports why it cannot run, then scales to zero. Waits that may still end well
(an unschedulable pod while a cluster autoscaler adds a node, a volume binding, the kubelet
retrying an image pull) are judged over time (`pending.py`), following the waiting pod's
Events. An upstream that answers 401/403 fails the load at once: the upstream key is wrong.

After `unload()` the pod may stay Terminating for a while, holding its GPUs: the next load
waits until no pod of the Deployment is left before it scales up again. A failed load leaves
the model's `Failed` status (and its reason) in place until that model is loaded again.

The load that made a switch writes its outcome to the model's `status.lastSwitch` (from which
model, success or failure and why, when, how long), with the `Ready` or `Failed` phase. A load
that joins a rollout it did not start (another replica's, or one found at start) leaves it to
the switch's maker, so that two replicas never overwrite each other's record.

Several proxy replicas may share the Deployment. Every write is a merge patch carrying the
resourceVersion it was computed from, so a concurrent write makes it fail with 409 and it is
recomputed from a fresh read: no update is ever lost. A replica that finds another replica's
switch in progress (the Deployment's `switched-by` claim, see `deployment.py`) follows it: it
waits until that switch has failed, been scaled to zero, or been confirmed ready by its proxy
(the `ready-hash` annotation, written once `/v1/models` lists the model), then makes its own
switch; its load simply takes longer. It never cuts another replica's switch short, which
would only make both fail, and neither does `unload()`. Replicas with different models in
demand therefore take turns, one full load each; the winner learns of the loss via `on_lost`.

`start()` adopts a model that is already up and ready (a restarted proxy does not reload it).
A rollout still in progress at start is not adopted: `start()` returns None, and the first
request for that model joins the rollout (no second rollout), while a request for another
model waits for it as for any switch by another replica.
"""

from __future__ import annotations

import datetime
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import anyio
import httpx
from kubernetes import client as k8s_client

from vllm_chill._model import ModelValidationError, VLLMModel
from vllm_chill._placement import Capacity, Placement, SingleSlot
from vllm_chill.backends._base import LoadedModel, LoadError, LostCallback, ProgressCallback
from vllm_chill.backends.kubernetes._api import (
    CONFLICT,
    MERGE_PATCH,
    NOT_FOUND,
    ApiError,
    Backoff,
    Obj,
    call,
)
from vllm_chill.backends.kubernetes._args import (
    ArgsError,
    model_hash,
    model_name_from_args,
    spec_from_args,
)
from vllm_chill.backends.kubernetes._deployment import (
    OtherSwitch,
    active_model_name,
    claim_annotations,
    pick_container,
    runs,
    served_name,
    switch_by_other,
    template_hash,
    template_patch,
)
from vllm_chill.backends.kubernetes._pending import PendingPods
from vllm_chill.backends.kubernetes._reporting import (
    EventType,
    Reporter,
    Switch,
    SwitchResult,
    object_reference,
)
from vllm_chill.backends.kubernetes._rollout import (
    PHASE_MODELS,
    PHASE_OLD_PODS,
    PHASE_UPDATING,
    READY_HASH,
    current_pods,
    evaluate,
    label_selector,
    object_annotations,
    replicas,
)
from vllm_chill.backends.kubernetes._watch import Informer, Notifier, PodEvents
from vllm_chill.observability._logs import get_logger
from vllm_chill.settings._schema import KubernetesSettings

logger = get_logger(__name__)

#: How long a claim (written, not yet rolled out) by another replica is honoured.
CLAIM_TIMEOUT_S = 60.0
#: How long another replica's rolled-out switch may stay unconfirmed (its proxy checks
#: /v1/models within seconds of the rollout; longer means that proxy is gone).
CONFIRM_TIMEOUT_S = 15.0
#: Bounds on the retries of one write when the API answers 409 or 5xx.
_WRITE_ATTEMPTS = 8
_START_READ_TIMEOUT_S = 30.0
#: How long a load waits for the previous pods to go (Terminating) before it scales up anyway.
OLD_POD_TIMEOUT_S = 120.0
#: How long `/v1/models` may list the served name for another model (`root`) before the load
#: fails: long enough for a Service to stop routing to a pod that just went away.
ROOT_MISMATCH_TIMEOUT_S = 10.0
_TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})


class K8sDeploymentBackend:
    """`Backend` over one vLLM Deployment. See the module docstring.

    `switch_models=False` is the mode without `--enable-model-switch`: the Deployment's args
    are never changed; `load()` only wakes the model it already runs (scale to one) and
    refuses any other. `start()`/`stop()` must run in the same task (as ASGI lifespan does).
    """

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        deployment: str,
        container: str | None = None,
        configmap: str | None = None,
        upstream: str | None = None,
        upstream_api_key: str | None = None,
        field_manager: str = "vllm-chill",
        switch_models: bool = True,
        instance_id: str | None = None,
        watch_timeout: float = 300.0,
        claim_timeout: float = CLAIM_TIMEOUT_S,
        confirm_timeout: float = CONFIRM_TIMEOUT_S,
        unschedulable_grace: float = KubernetesSettings.unschedulable_grace,
        image_pull_grace: float = KubernetesSettings.image_pull_grace,
        old_pod_timeout: float = OLD_POD_TIMEOUT_S,
        root_mismatch_timeout: float = ROOT_MISMATCH_TIMEOUT_S,
    ) -> None:
        #: One Deployment: one model at a time, placed on it (by its name).
        self.capacity: Capacity = SingleSlot(deployment)
        #: The vLLM container's `nvidia.com/gpu` limit, read when the session opens.
        self.gpus: int | None = None
        self._apps = k8s_client.AppsV1Api(api_client)
        self._core = k8s_client.CoreV1Api(api_client)
        self._namespace = namespace
        self._name = deployment
        self._container = container
        self._configmap = configmap
        self._upstream = (upstream or f"http://{deployment}.{namespace}.svc:8000").rstrip("/")
        #: The upstream's `/v1/models` entry for the model it was last seen listing.
        self._entry: dict[str, Any] | None = None
        self._upstream_api_key = upstream_api_key
        self._field_manager = field_manager
        self._switch_models = switch_models
        self._instance = instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self._watch_timeout = watch_timeout
        self._claim_timeout = claim_timeout
        self._confirm_timeout = confirm_timeout
        self._notifier = Notifier()
        self._deployments = Informer(
            f"Deployment {namespace}/{deployment}",
            self._apps.list_namespaced_deployment,
            namespace,
            field_selector=f"metadata.name={deployment}",
            notifier=self._notifier,
            on_change=self._check_lost,
            watch_timeout=watch_timeout,
        )
        self._pods: Informer | None = None
        self._pod_events = PodEvents(
            self._core.list_namespaced_event,
            namespace,
            notifier=self._notifier,
            watch_timeout=watch_timeout,
        )
        self._pending = PendingPods(
            unschedulable_grace=unschedulable_grace, image_pull_grace=image_pull_grace
        )
        self._old_pod_timeout = old_pod_timeout
        self._root_mismatch_timeout = root_mismatch_timeout
        #: Models whose last load failed here: their `Failed` status stays until they load.
        self._failed: set[str] = set()
        self._reporter = Reporter(
            api_client, namespace, instance=self._instance, deployment=deployment
        )
        self._http: httpx.AsyncClient | None = None
        self._in_session = False
        self._on_lost: LostCallback | None = None
        self._loaded: LoadedModel | None = None
        self._loaded_hash: str | None = None
        self._loading = False
        #: The switch the load in progress makes (`status.lastSwitch`); None once it joined
        #: a rollout it did not start.
        self._current_switch: Switch | None = None
        #: Other proxies' switches seen rolled out but unconfirmed: hash -> monotonic time.
        self._confirming: dict[str, float] = {}
        #: A load cut short by its caller (the scheduler's --model-switch-timeout), and after
        #: how long: the unload that follows says so in the model's status.
        self._stopped_load: tuple[VLLMModel, float] | None = None

    def __repr__(self) -> str:  # the upstream key never reaches a log through a repr
        return (
            f"K8sDeploymentBackend(namespace={self._namespace!r}, deployment={self._name!r}, "
            f"configmap={self._configmap!r}, upstream={self._upstream!r})"
        )

    @property
    def instance_id(self) -> str:
        """This proxy's name in the Deployment's `switched-by` annotation."""
        return self._instance

    @property
    def upstream(self) -> str:
        return self._upstream

    @property
    def deployment(self) -> str:
        return self._name

    # -- Backend ----------------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, on_lost: LostCallback) -> AsyncIterator[LoadedModel | None]:
        """Reads the Deployment, starts the watches and the status reporter, and yields the
        model it already runs when that model is ready (a restarted proxy adopts it). Leaving
        the session stops the watches; the Deployment is left as it is, since other replicas
        may be serving from it."""
        if self._in_session:
            raise RuntimeError("K8sDeploymentBackend already has a session open")
        deployment = await self._read_at_start()
        try:
            container = pick_container(deployment, self._container)
        except ArgsError as exc:
            raise RuntimeError(f"Deployment {self._namespace}/{self._name}: {exc}") from None
        self.gpus = gpu_limit(container)
        self._pods = Informer(
            f"pods of Deployment {self._namespace}/{self._name}",
            self._core.list_namespaced_pod,
            self._namespace,
            label_selector=label_selector(deployment),
            notifier=self._notifier,
            watch_timeout=self._watch_timeout,
        )
        self._in_session = True
        self._on_lost = on_lost
        try:
            async with (
                httpx.AsyncClient(timeout=5.0) as http,
                anyio.create_task_group() as task_group,
            ):
                self._http = http
                await task_group.start(self._reporter.run)
                await task_group.start(self._deployments.run)
                await task_group.start(self._pods.run)
                await task_group.start(self._pod_events.run)
                try:
                    yield await self._adopt(self._deployments.get(self._name) or deployment)
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._reporter.flush(2.0)
                    task_group.cancel_scope.cancel()
        finally:
            self._on_lost = None
            self._in_session = False
            self._http = None

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        """One Deployment is one slot: the load rewrites its args, replacing what it ran."""
        self._require_started()
        self._loaded = None  # what we replace is not "lost"
        self._loaded_hash = None
        self._loading = True
        self._failed.discard(model.name)
        self._stopped_load = None
        self._pending.reset()
        self._current_switch = Switch()
        started = time.monotonic()
        try:
            loaded = await self._load(model, progress)
        except LoadError as exc:
            if model.name not in self._failed:  # not reported by `_fail` (refused, changed...)
                self._mark_failed(model, exc.reason)
            raise
        except anyio.get_cancelled_exc_class():
            self._stopped_load = (model, time.monotonic() - started)
            raise
        finally:
            self._loading = False
            self._pod_events.follow(None)
        self._loaded = loaded
        elapsed = time.monotonic() - started
        logger.info("model %s is ready (%.1fs)", model.served_model_name, elapsed)
        self._reporter.model_status(
            model.name,
            "Ready",
            f"serving as {model.served_model_name}",
            last_switch=self._switch_status("success"),
        )
        self._event("ModelReady", f"{model.served_model_name} is ready ({elapsed:.0f}s)")
        return loaded

    async def unload(self, model: str | None = None) -> None:
        """Scale to zero (whatever `model` says: the Deployment runs one), unless another proxy
        replica is in the middle of a switch: cutting it short would only fail its load; that
        replica idles its own model later."""
        self._require_started()
        self._loaded = None
        self._loaded_hash = None
        stopped, self._stopped_load = self._stopped_load, None
        deployment, scaled = await self._scale_to_zero(
            only_if_hash=None, strict=True, yield_to_others=True
        )
        if deployment is not None and scaled:
            # Already at zero (a failed load scaled it down): nothing changed, and the
            # model's `Failed` status must stay as it is.
            name = active_model_name(deployment)
            if stopped is not None and name == stopped[0].name and name not in self._failed:
                # The scheduler gave up on its load (a proxy that stops does not unload).
                stuck, took = stopped
                reason = (
                    f"not ready after {took:.0f}s: the load was stopped (--model-switch-timeout)"
                )
                self._mark_failed(stuck, reason)
                self._event(
                    "ModelLoadFailed", f"{stuck.served_model_name}: {reason}", type_="Warning"
                )
            elif name and name not in self._failed:
                self._reporter.model_status(name, "Unloaded", "scaled to zero")
            self._event("ScaledToZero", "scaled the vLLM Deployment to zero")

    async def check(self) -> bool:
        return self._deployments.ready

    # -- for the CLI's single-model mode (no --enable-model-switch) ---------------------------

    async def deployed_model_name(self) -> str | None:
        """The served name of the model the Deployment runs (args, else annotations)."""
        return served_name(await self._read(), self._container)

    async def deployed_model(self) -> VLLMModel | None:
        """A `VLLMModel` for what the Deployment runs, read from its args (best effort)."""
        return model_from_deployment(await self._read(), self._container)

    # -- loading ----------------------------------------------------------------------------

    def _hash(self, model: VLLMModel) -> str:
        data = model.configmap_data() if self._configmap else None
        return model_hash(model, data)

    async def _load(self, model: VLLMModel, progress: ProgressCallback) -> LoadedModel:
        progress(PHASE_UPDATING)
        self._reporter.model_status(model.name, "Loading", PHASE_UPDATING)
        backoff = Backoff(0.2, 5.0)
        attempts = 0
        stale: set[str] = set()
        followed: str | None = None
        waited_for_old_pods = False
        while True:
            try:
                deployment = await self._read()
                if self._joinable(deployment, model):
                    logger.info(
                        "the Deployment already runs %s; waiting for it", model.served_model_name
                    )
                    self._current_switch = None  # not ours: its maker records it
                    expected = template_hash(deployment)
                    break
                other = self._switch_in_progress(deployment)
                if other is not None:
                    if other.what != followed:
                        followed = other.what
                        message = f"waiting for another replica's switch to {other.what}"
                        logger.info("%s before switching to %s", message, model.served_model_name)
                        progress(message)
                        self._reporter.model_status(model.name, "Pending", message)
                    await self._follow()
                    attempts = 0
                    continue
                if replicas(deployment) == 0 and not waited_for_old_pods:
                    waited_for_old_pods = True
                    if await self._wait_old_pods_gone(progress):
                        continue  # read again: the Deployment may have changed meanwhile
                stale = {_uid(p) for p in self._pod_objects()}
                expected = await self._switch(deployment, model)
                break
            except _Superseded:
                continue
            except ArgsError as exc:
                raise LoadError(str(exc)) from None
            except ApiError as exc:
                attempts += 1
                if exc.status == NOT_FOUND:
                    raise LoadError(
                        f"Deployment {self._namespace}/{self._name} not found"
                    ) from None
                if exc.status != CONFLICT and not exc.transient:
                    raise LoadError(f"the Kubernetes API refused the switch: {exc}") from None
                if attempts >= _WRITE_ATTEMPTS:
                    raise LoadError(f"could not update the Deployment: {exc}") from None
                if exc.status != CONFLICT:
                    await anyio.sleep(backoff.next())
        return await self._wait_ready(model, expected, stale, progress)

    def _live_pods(self) -> list[Obj]:
        return [
            p
            for p in self._pod_objects()
            if (p.get("status") or {}).get("phase") not in _TERMINAL_POD_PHASES
        ]

    async def _wait_old_pods_gone(self, progress: ProgressCallback) -> bool:
        """Before scaling up from zero: wait (bounded) until the previous pods are gone, so a
        Terminating pod's GPUs are free for the next one. True if there was anything to wait
        for."""
        if not self._live_pods():
            return False
        names = ", ".join(sorted(_name(p) for p in self._live_pods()))
        logger.info("waiting for the previous pod(s) %s to stop before scaling up", names)
        progress(PHASE_OLD_PODS)
        with anyio.move_on_after(self._old_pod_timeout):
            while self._live_pods():
                waiter = self._notifier.waiter()
                if not self._live_pods():
                    break
                await waiter.wait()
            return True
        logger.warning(
            "the previous pod(s) %s still exist after %.0fs; scaling up anyway",
            names,
            self._old_pod_timeout,
        )
        return True

    def _joinable(self, deployment: Obj, model: VLLMModel) -> bool:
        if replicas(deployment) < 1:
            return False
        if not self._switch_models:
            return served_name(deployment, self._container) == model.served_model_name
        return runs(
            deployment,
            model,
            self._hash(model),
            self._container,
            configmap=self._configmap is not None,
        )

    def _switch_in_progress(self, deployment: Obj) -> OtherSwitch | None:
        other = switch_by_other(
            deployment,
            self._pod_objects(),
            self._instance,
            claim_timeout=self._claim_timeout,
            now=_now(),
        )
        if other is None or not other.confirming:
            return other
        # Rolled out, not confirmed: its proxy is checking /v1/models, or is gone. Give it
        # `confirm_timeout` from when this proxy first saw it so, then go ahead.
        since = self._confirming.setdefault(other.target, time.monotonic())
        if time.monotonic() - since >= self._confirm_timeout:
            logger.info("the switch to %s was never confirmed; going ahead", other.what)
            return None
        return other

    async def _follow(self) -> None:
        """Wait for the next change (or a few seconds, for the claim's expiry) before looking
        at another replica's switch again."""
        waiter = self._notifier.waiter()
        with anyio.move_on_after(min(5.0, self._claim_timeout, self._confirm_timeout)):
            await waiter.wait()

    async def _switch(self, deployment: Obj, model: VLLMModel) -> str | None:
        """Write the switch; return the template hash the rollout will carry."""
        rv = deployment["metadata"]["resourceVersion"]
        previous = active_model_name(deployment)
        if not self._switch_models:
            current = served_name(deployment, self._container)
            if current != model.served_model_name:
                raise LoadError(
                    f"the Deployment serves {current!r}, not {model.served_model_name!r}, "
                    "and model switching is disabled (--enable-model-switch)"
                )
            await self._patch_deployment(
                {"metadata": {"resourceVersion": rv}, "spec": {"replicas": 1}}
            )
            self._event("WakingUp", f"scaling up to serve {model.served_model_name}")
            return template_hash(deployment)

        wanted = self._hash(model)
        claim = claim_annotations(model, wanted, self._instance, _now())
        configmap = self._configmap is not None
        patch = template_patch(deployment, model, wanted, self._container, configmap=configmap)
        if self._configmap is None:
            await self._patch_deployment(
                {
                    "metadata": {"resourceVersion": rv, "annotations": claim},
                    "spec": {"replicas": 1, "template": patch},
                }
            )
        else:
            # The Deployment is the lock: claim it first, so that only the claim's holder
            # writes the ConfigMap, then roll the pods onto it.
            claimed = await self._patch_deployment(
                {"metadata": {"resourceVersion": rv, "annotations": claim}}
            )
            await self._write_configmap(model, claim)
            await self._roll(claimed, claim, patch)
        logger.info(
            "switching the Deployment %s/%s to %s (was %s)",
            self._namespace,
            self._name,
            model.served_model_name,
            previous or "nothing",
        )
        if (
            previous
            and previous != model.name
            and previous not in self._failed
            and replicas(deployment) >= 1  # at zero, it was already Unloaded (or Failed)
        ):
            self._reporter.model_status(previous, "Unloaded", f"replaced by {model.name}")
        if self._current_switch is not None:
            self._current_switch.from_model = previous if replicas(deployment) >= 1 else None
        self._event("SwitchingModel", f"switching to {model.served_model_name}")
        return wanted

    async def _write_configmap(self, model: VLLMModel, claim: Mapping[str, str]) -> None:
        assert self._configmap is not None
        for _ in range(_WRITE_ATTEMPTS):
            try:
                current = await call(
                    self._core.read_namespaced_config_map, self._configmap, self._namespace
                )
            except ApiError as exc:
                if exc.status == NOT_FOUND:
                    raise LoadError(
                        f"ConfigMap {self._namespace}/{self._configmap} not found"
                    ) from None
                raise
            body = {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "data": model.configmap_data(),
            }
            try:
                await call(
                    self._core.patch_namespaced_config_map,
                    self._configmap,
                    self._namespace,
                    body,
                    field_manager=self._field_manager,
                    _content_type=MERGE_PATCH,
                )
                return
            except ApiError as exc:
                if exc.status != CONFLICT:
                    raise
            await self._check_claim(claim)
        raise ApiError(CONFLICT, "the ConfigMap kept changing")

    async def _roll(self, claimed: Obj, claim: Mapping[str, str], patch: Obj) -> None:
        rv = claimed["metadata"]["resourceVersion"]
        for _ in range(_WRITE_ATTEMPTS):
            try:
                await self._patch_deployment(
                    {
                        "metadata": {"resourceVersion": rv},
                        "spec": {"replicas": 1, "template": patch},
                    }
                )
                return
            except ApiError as exc:
                if exc.status != CONFLICT:
                    raise
            rv = (await self._check_claim(claim))["metadata"]["resourceVersion"]
        raise ApiError(CONFLICT, "the Deployment kept changing")

    async def _check_claim(self, claim: Mapping[str, str]) -> Obj:
        """Between the writes of a ConfigMap switch: is the claim still ours?"""
        deployment = await self._read()
        notes = (deployment.get("metadata") or {}).get("annotations") or {}
        if any(notes.get(key) != value for key, value in claim.items()):
            raise _Superseded()
        return deployment

    async def _wait_ready(
        self,
        model: VLLMModel,
        expected: str | None,
        stale: set[str],
        progress: ProgressCallback,
    ) -> LoadedModel:
        last_phase = PHASE_UPDATING
        models_backoff = Backoff(0.1, 2.0)
        mismatch_since: float | None = None
        while True:
            waiter = self._notifier.waiter()
            deployment = self._deployments.get(self._name)
            if deployment is None or not _ours(deployment, expected):
                # The cache may lag behind our own write; only a fresh read can tell.
                try:
                    fresh = await self._read()
                except ApiError as exc:
                    if exc.status == NOT_FOUND:
                        raise LoadError(
                            f"Deployment {self._namespace}/{self._name} was deleted"
                        ) from None
                    fresh = None  # the API is down for now: look again after a while
                if fresh is not None and not _ours(fresh, expected):
                    raise LoadError(
                        "the Deployment was changed by someone else during the load (it now "
                        f"runs {served_name(fresh, self._container)!r} with "
                        f"{replicas(fresh)} replica(s))"
                    )
                with anyio.move_on_after(1.0):
                    await waiter.wait()
                continue
            pods = [p for p in self._pod_objects() if _uid(p) not in stale]
            rollout = evaluate(deployment, pods)
            if rollout.failure is not None:
                await self._fail(model, rollout.failure, expected)
            verdict = self._pending.judge(
                current_pods(deployment, pods),
                self._pod_events.events(),
                events_readable=self._pod_events.readable,
            )
            self._pod_events.follow(verdict.follow)
            if verdict.failure is not None:
                await self._fail(model, verdict.failure, expected)
            delay = verdict.recheck_in
            phase = verdict.phase or rollout.phase
            if rollout.complete:
                phase = PHASE_MODELS
                try:
                    listed, root = await self._listing(model.served_model_name)
                except _Refused as exc:
                    await self._fail(model, self._refused(exc.status), expected)
                if listed and (root is None or same_model(root, model.model_name)):
                    self._loaded_hash = expected
                    if object_annotations(deployment).get(READY_HASH) != expected:
                        await self._confirm(expected)
                    return LoadedModel(model.served_model_name, self._upstream, entry=self._entry)
                if listed:
                    # Another model under our served name: an old pod the Service still
                    # routes to for a moment, or a pod that loaded something else.
                    now = time.monotonic()
                    mismatch_since = now if mismatch_since is None else mismatch_since
                    if now - mismatch_since >= self._root_mismatch_timeout:
                        await self._fail(
                            model,
                            f"the upstream serves {model.served_model_name!r} from {root!r}, "
                            f"not from {model.model_name!r}: the vLLM pod loaded another model",
                            expected,
                        )
                delay = models_backoff.next()
            if phase != last_phase:
                last_phase = phase
                progress(phase)
                self._reporter.model_status(model.name, "Loading", phase)
            if delay is None:
                await waiter.wait()
            else:
                with anyio.move_on_after(delay):
                    await waiter.wait()

    async def _confirm(self, ready_hash: str | None) -> None:
        """Mark the hash ready on the Deployment, ending the switch for other replicas.

        One annotation key, merged without a resourceVersion: it cannot undo anyone's
        write, and a mark for a template that is gone by now is simply ignored."""
        if ready_hash is None:
            return
        body = {"metadata": {"annotations": {READY_HASH: ready_hash}}}
        try:
            await self._patch_deployment(body)
        except ApiError as exc:
            logger.warning("could not mark the model ready on the Deployment: %s", exc)

    async def _fail(self, model: VLLMModel, reason: str, expected: str | None) -> NoReturn:
        logger.warning(
            "loading %s failed: %s; scaling the Deployment to zero",
            model.served_model_name,
            reason,
        )
        self._pod_events.follow(None)
        self._mark_failed(model, reason)
        self._event("ModelLoadFailed", f"{model.served_model_name}: {reason}", type_="Warning")
        with anyio.CancelScope(shield=True), anyio.move_on_after(15.0):
            await self._scale_to_zero(only_if_hash=expected, strict=False)
        raise LoadError(reason)

    def _mark_failed(self, model: VLLMModel, reason: str) -> None:
        """The `Failed` status (with the reason, in `lastSwitch` too), kept until it loads."""
        self._failed.add(model.name)
        self._reporter.model_status(
            model.name, "Failed", reason, last_switch=self._switch_status("failure", reason)
        )

    def _switch_status(self, result: SwitchResult, reason: str | None = None) -> Obj | None:
        switch = self._current_switch
        return None if switch is None else switch.status(result, reason)

    async def _listing(self, served: str) -> tuple[bool, str | None]:
        """Whether the upstream's `/v1/models` lists `served`, and the `root` (the model it
        loaded) it gives for it. Any error: not listed yet. 401/403 raise `_Refused`: waiting
        cannot fix a wrong key."""
        assert self._http is not None
        headers = {}
        if self._upstream_api_key:
            headers["Authorization"] = f"Bearer {self._upstream_api_key}"
        try:
            response = await self._http.get(f"{self._upstream}/v1/models", headers=headers)
            if response.status_code in (401, 403):
                raise _Refused(response.status_code)
            if response.status_code != 200:
                return False, None
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("GET %s/v1/models: %s", self._upstream, type(exc).__name__)
            return False, None
        data = body.get("data") if isinstance(body, dict) else None
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict) and item.get("id") == served:
                self._entry = item
                root = item.get("root")
                return True, root if isinstance(root, str) and root else None
        return False, None

    def _refused(self, status: int) -> str:
        if self._upstream_api_key:
            problem = (
                "it refused the key vllm-chill sends (--upstream-api-key), which is not the "
                "key vLLM was started with (its --api-key)"
            )
        else:
            problem = (
                "vLLM requires an API key (its --api-key) and vllm-chill sends none: give "
                "vllm-chill the same key (--upstream-api-key)"
            )
        return f"the upstream answered {status} to GET /v1/models: {problem}"

    # -- unloading ---------------------------------------------------------------------------

    async def _scale_to_zero(
        self, *, only_if_hash: str | None, strict: bool, yield_to_others: bool = False
    ) -> tuple[Obj | None, bool]:
        """replicas: 0, conditional on the version read; with `only_if_hash`, only while the
        Deployment still runs that template (another writer's model is left alone); with
        `yield_to_others`, not while another replica's switch is in progress. Returns the
        Deployment (None: left alone) and whether this call scaled it down."""
        backoff = Backoff(0.2, 2.0)
        error: ApiError | None = None
        for _ in range(_WRITE_ATTEMPTS):
            try:
                deployment = await self._read()
                if replicas(deployment) == 0:
                    return deployment, False
                if only_if_hash is not None and template_hash(deployment) != only_if_hash:
                    return None, False
                if yield_to_others:
                    other = self._switch_in_progress(deployment)
                    if other is not None:
                        logger.info("not scaling to zero: %s is switching", other.what)
                        return None, False
                rv = deployment["metadata"]["resourceVersion"]
                scaled = await self._patch_deployment(
                    {"metadata": {"resourceVersion": rv}, "spec": {"replicas": 0}}
                )
                return scaled, True
            except ApiError as exc:
                error = exc
                if exc.status == NOT_FOUND:
                    return None, False
                if exc.status != CONFLICT and not exc.transient:
                    break
                if exc.status != CONFLICT:
                    await anyio.sleep(backoff.next())
        logger.warning("could not scale the Deployment to zero: %s", error)
        if strict:
            raise LoadError(f"could not scale the Deployment to zero: {error}")
        return None, False

    # -- watching what is loaded --------------------------------------------------------------

    async def _adopt(self, deployment: Obj) -> LoadedModel | None:
        """What `start()` returns: the model the Deployment serves now, if it is ready."""
        served = served_name(deployment, self._container)
        if replicas(deployment) < 1 or not served:
            return None
        rollout = evaluate(deployment, self._pod_objects())
        if not rollout.complete or rollout.failure is not None:
            logger.info(
                "the Deployment is rolling out %s; not adopting it until a request asks for it",
                served,
            )
            return None
        try:
            listed, root = await self._listing(served)
        except _Refused as exc:
            logger.warning("not adopting %s: %s", served, self._refused(exc.status))
            return None
        if not listed:
            logger.info("the Deployment runs %s but /v1/models does not list it yet", served)
            return None
        try:
            container = pick_container(deployment, self._container)
        except ArgsError:
            container = {}
        loads = model_name_from_args(
            [str(a) for a in container.get("args") or []],
            [str(c) for c in container.get("command") or []],
        )
        if root is not None and loads is not None and not same_model(root, loads):
            logger.warning(
                "not adopting %s: /v1/models says it was loaded from %r, not %r",
                served,
                root,
                loads,
            )
            return None
        logger.info("the Deployment already serves %s; adopting it", served)
        self._loaded = LoadedModel(served, self._upstream, entry=self._entry)
        self._loaded_hash = template_hash(deployment)
        return self._loaded

    def _check_lost(self) -> None:
        """On every Deployment change: did the loaded model go away without us?"""
        loaded = self._loaded
        if loaded is None or self._loading or self._on_lost is None:
            return
        deployment = self._deployments.get(self._name)
        reason: str | None = None
        if deployment is None:
            reason = "the Deployment was deleted"
        elif replicas(deployment) == 0:
            reason = "the Deployment was scaled to zero by someone else"
        elif (
            template_hash(deployment) != self._loaded_hash
            or served_name(deployment, self._container) != loaded.served_model_name
        ):
            now_serving = served_name(deployment, self._container)
            reason = (
                f"the Deployment now runs {now_serving!r} "
                "(switched by another replica or an operator)"
            )
        else:
            status = deployment.get("status") or {}
            generation = (deployment.get("metadata") or {}).get("generation") or 0
            observed = int(status.get("observedGeneration") or 0) >= int(generation)
            if observed and not int(status.get("availableReplicas") or 0):
                reason = "no ready vLLM pod is left"
        if reason is not None:
            logger.warning("model %s is no longer loaded: %s", loaded.served_model_name, reason)
            self._loaded = None
            self._loaded_hash = None
            self._on_lost(reason)

    # -- API helpers ----------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._in_session:
            raise RuntimeError("K8sDeploymentBackend has no session open")

    def _pod_objects(self) -> list[Obj]:
        return self._pods.objects() if self._pods is not None else []

    async def _read(self) -> Obj:
        return await call(self._apps.read_namespaced_deployment, self._name, self._namespace)

    async def _read_at_start(self) -> Obj:
        """A missing Deployment or a missing permission is a configuration error (raised);
        an unreachable API is retried for a while, since the proxy may start first."""
        backoff = Backoff(0.5, 5.0)
        deadline = time.monotonic() + _START_READ_TIMEOUT_S
        while True:
            try:
                return await self._read()
            except ApiError as exc:
                if not exc.transient or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cannot read Deployment {self._namespace}/{self._name}: {exc}"
                    ) from None
                logger.warning("reading the Deployment failed (%s); retrying", exc)
                await anyio.sleep(backoff.next())

    async def _patch_deployment(self, body: Obj) -> Obj:
        return await call(
            self._apps.patch_namespaced_deployment,
            self._name,
            self._namespace,
            body,
            field_manager=self._field_manager,
            _content_type=MERGE_PATCH,
        )

    def _event(self, reason: str, message: str, *, type_: EventType = "Normal") -> None:
        deployment = self._deployments.get(self._name) or {
            "metadata": {"name": self._name, "namespace": self._namespace}
        }
        involved = object_reference(deployment, api_version="apps/v1", kind="Deployment")
        self._reporter.event(involved, reason, message, type_=type_)


class _Superseded(Exception):
    """Another writer took the Deployment between our writes: start over from a fresh read."""


class _Refused(Exception):
    """The upstream answered 401/403: the API key is wrong or missing."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def same_model(root: str, model_name: str) -> bool:
    """Whether vLLM's `root` in `/v1/models` is `model_name`: the same string, or (offline
    mode, `HF_HUB_OFFLINE`) the local snapshot vLLM resolved that hub model to."""
    if root.rstrip("/") == model_name.rstrip("/"):
        return True
    return f"models--{model_name.strip('/').replace('/', '--')}/" in root + "/"


def _ours(deployment: Obj, expected: str | None) -> bool:
    return template_hash(deployment) == expected and replicas(deployment) >= 1


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "?")


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def model_from_deployment(deployment: Obj, container: str | None = None) -> VLLMModel | None:
    """The model a Deployment runs, from its args (flags parsed best effort)."""
    try:
        picked = pick_container(deployment, container)
    except ArgsError:
        picked = {}
    args = [str(a) for a in picked.get("args") or []]
    command = [str(c) for c in picked.get("command") or []]
    served = served_name(deployment, container)
    if not served:
        return None
    spec = spec_from_args(args, command)
    spec.setdefault("servedModelName", served)
    spec.setdefault("modelName", spec.get("modelName") or served)
    name = active_model_name(deployment) or served
    try:
        return VLLMModel.from_spec(spec, name=name, source="Deployment args")
    except ModelValidationError:
        return VLLMModel(name=name, model_name=str(spec["modelName"]), served_model_name=served)


def gpu_limit(container: Mapping[str, Any]) -> int | None:
    """The container's `nvidia.com/gpu` limit (or request), None when it declares none."""
    resources = container.get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get("nvidia.com/gpu")
        if value is not None:
            try:
                return int(str(value))
            except ValueError:
                return None
    return None
