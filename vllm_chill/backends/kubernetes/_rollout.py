"""What a Deployment and its pods say about a rollout: done, failed (and why), or where it is.

Pure functions over the API server's JSON, so every rule is testable without a cluster.
"Done" is what `kubectl rollout status` means; "failed" is the pod's or the Deployment's own
reason, found as soon as Kubernetes reports it, so a crash-looping model fails in seconds
instead of at the switch timeout. A pod that waits for something that may still come (a node
from a cluster autoscaler, a volume, the kubelet's next image pull) is not failed here: see
`pending.py`, which judges those waits over time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_chill._model import API_GROUP

Obj = Mapping[str, Any]

PREFIX = f"{API_GROUP}/"
#: On the Deployment: the model vllm-chill last asked for, and who asked.
ACTIVE_MODEL = PREFIX + "active-model"
SERVED_NAME = PREFIX + "served-model-name"
TARGET_HASH = PREFIX + "model-hash"
SWITCHED_BY = PREFIX + "switched-by"
SWITCHED_AT = PREFIX + "switched-at"
EXTRA_ARGS = PREFIX + "extra-args"
#: The model hash whose load its proxy saw through to /v1/models (ends a switch in progress).
READY_HASH = PREFIX + "ready-hash"
#: On the pod template (and so on every pod): what the pods run. A new value rolls the pods.
POD_MODEL_HASH = PREFIX + "model-hash"
POD_MODEL = PREFIX + "model"
POD_SERVED_NAME = PREFIX + "served-model-name"

#: Container waiting reasons that will not resolve by waiting.
FATAL_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "InvalidImageName",
        "ErrImageNeverPull",
    }
)
#: Image pulls that failed; the kubelet retries them (with back-off), so they are judged over
#: time (`pending.py`), except when the registry said the image is not there for us.
PULL_WAITING = frozenset({"ErrImagePull", "ImagePullBackOff"})

PHASE_UPDATING = "updating deployment"
PHASE_OLD_PODS = "waiting for the previous pod to stop"
PHASE_SCHEDULING = "waiting for pod to be scheduled"
PHASE_SCALING_UP = "waiting for the cluster autoscaler to add a node"
PHASE_VOLUME = "waiting for the pod's volume"
PHASE_PULLING = "pulling image"
PHASE_STARTING = "container starting"
PHASE_MODELS = "waiting for /v1/models"


@dataclass(frozen=True)
class Rollout:
    """One look at a rollout. `failure` is the reason it cannot succeed, or None."""

    complete: bool
    failure: str | None
    phase: str
    replicas: int

    @property
    def settled(self) -> bool:
        return self.complete or self.failure is not None or self.replicas == 0


def object_annotations(obj: Obj | None) -> Mapping[str, str]:
    return ((obj or {}).get("metadata") or {}).get("annotations") or {}


def template_annotations(deployment: Obj | None) -> Mapping[str, str]:
    template = ((deployment or {}).get("spec") or {}).get("template") or {}
    return (template.get("metadata") or {}).get("annotations") or {}


def replicas(deployment: Obj) -> int:
    value = (deployment.get("spec") or {}).get("replicas")
    return 1 if value is None else int(value)


def label_selector(deployment: Obj) -> str:
    """The Deployment's `spec.selector` as a label selector string for list/watch."""
    selector = (deployment.get("spec") or {}).get("selector") or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = ",".join(expression.get("values") or [])
        if operator == "In":
            terms.append(f"{key} in ({values})")
        elif operator == "NotIn":
            terms.append(f"{key} notin ({values})")
        elif operator == "Exists":
            terms.append(str(key))
        elif operator == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def _condition(obj: Obj, kind: str) -> Mapping[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition  # type: ignore[no-any-return]
    return None


def current_pods(deployment: Obj, pods: Iterable[Obj]) -> list[Obj]:
    """Pods of the Deployment's current template that are not being deleted."""
    wanted = template_annotations(deployment).get(POD_MODEL_HASH)
    result = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        if wanted is not None and object_annotations(pod).get(POD_MODEL_HASH) != wanted:
            continue
        result.append(pod)
    return result


def pod_name(pod: Obj) -> str:
    return str((pod.get("metadata") or {}).get("name") or "?")


def unschedulable(pod: Obj) -> str | None:
    """The scheduler's message when it found no node for the pod (yet), else None."""
    scheduled = _condition(pod, "PodScheduled")
    if (
        scheduled is not None
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
    ):
        return str(scheduled.get("message") or "no node fits the pod")
    return None


def _container_statuses(pod: Obj) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]


def image_pull_waits(pod: Obj) -> list[tuple[str, str, str]]:
    """(container, reason, message) of each container whose image pull failed for now."""
    waits = []
    for container in _container_statuses(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in PULL_WAITING:
            waits.append(
                (
                    str(container.get("name") or "?"),
                    str(waiting["reason"]),
                    str(waiting.get("message") or ""),
                )
            )
    return waits


def pod_failure(pod: Obj) -> str | None:
    """The pod's own reason it will not become ready, in the words `kubectl` shows."""
    name = pod_name(pod)
    containers = _container_statuses(pod)
    for container in containers:
        for state in (container.get("lastState") or {}, container.get("state") or {}):
            terminated = state.get("terminated") or {}
            if terminated.get("reason") == "OOMKilled":
                code = terminated.get("exitCode", 137)
                return (
                    f"OOMKilled: container {container.get('name')} ran out of memory "
                    f"(exit code {code}, pod {name})"
                )
    for container in containers:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in FATAL_WAITING:
            message = waiting.get("message") or ""
            detail = f": {message}" if message else ""
            return f"{reason}{detail} (container {container.get('name')}, pod {name})"
    return None


def _pod_phase(pod: Obj) -> str:
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is None or scheduled.get("status") != "True":
        return PHASE_SCHEDULING
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses or any("running" not in (c.get("state") or {}) for c in statuses):
        return PHASE_PULLING
    return PHASE_STARTING


def evaluate(deployment: Obj, pods: Iterable[Obj]) -> Rollout:
    """Where the Deployment's rollout stands, from its status and its pods."""
    wanted = replicas(deployment)
    meta = deployment.get("metadata") or {}
    status = deployment.get("status") or {}
    observed = int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    pods = list(pods)
    current = current_pods(deployment, pods)

    failure: str | None = None
    if observed:
        progressing = _condition(deployment, "Progressing")
        if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
            failure = (
                f"ProgressDeadlineExceeded: {progressing.get('message') or 'rollout timed out'}"
            )
        replica_failure = _condition(deployment, "ReplicaFailure") or {}
        if failure is None and replica_failure.get("status") == "True":
            failure = (
                f"ReplicaFailure ({replica_failure.get('reason')}): "
                f"{replica_failure.get('message') or ''}"
            ).rstrip(": ")
    if failure is None and wanted > 0:
        for pod in current:
            failure = pod_failure(pod)
            if failure is not None:
                break

    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    complete = observed and updated >= wanted and total <= updated and available >= updated

    if not observed:
        phase = PHASE_UPDATING
    elif complete:
        phase = PHASE_MODELS
    elif not current:
        others = [p for p in pods if p not in current]
        phase = PHASE_OLD_PODS if others else PHASE_SCHEDULING
    else:
        phase = min((_pod_phase(p) for p in current), key=_PHASE_ORDER.index)
    return Rollout(complete=complete, failure=failure, phase=phase, replicas=wanted)


_PHASE_ORDER = [PHASE_SCHEDULING, PHASE_PULLING, PHASE_STARTING]
