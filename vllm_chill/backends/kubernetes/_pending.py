"""Pods that wait for something that may still come, judged over time.

Kubernetes reports some waits the same way whether they end in seconds or never:

- `Unschedulable`: no node fits the pod *now*. With a cluster autoscaler or Karpenter (GPU
  pools scaled to zero) a node is on its way; the autoscaler says so in an Event on the pod
  (`TriggeredScaleUp`, Karpenter's `Nominated`) or says it will not (`NotTriggerScaleUp`,
  Karpenter's `FailedScheduling`). A pod waiting for its PersistentVolumeClaim to bind looks
  unschedulable too. So: a scale-up on its way means wait (the switch timeout and the
  Deployment's progress deadline still bound it); a refusal fails the load at once; neither
  fails it after `unschedulable_grace` (no autoscaler, or Events we may not read).
- `ErrImagePull` / `ImagePullBackOff`: the kubelet retries the pull with back-off, so a
  registry blip heals by itself. The load fails at once only when the registry said the image
  is not there or not for us (not found, denied, unauthorized), else after `image_pull_grace`.

`PendingPods.judge()` is a pure function of the pods, their Events and the clock, apart from
remembering since when each wait has lasted.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_chill.backends.kubernetes._rollout import (
    PHASE_PULLING,
    PHASE_SCALING_UP,
    PHASE_SCHEDULING,
    PHASE_VOLUME,
    image_pull_waits,
    pod_name,
    unschedulable,
)
from vllm_chill.settings._schema import KubernetesSettings

Obj = Mapping[str, Any]

#: Event reasons on a pod saying a node is being added for it.
SCALE_UP = frozenset({"TriggeredScaleUp", "Nominated"})
#: Event reasons on a pod saying no node will be added for it.
NO_SCALE_UP = frozenset({"NotTriggerScaleUp"})
_KARPENTER = "karpenter"
#: Words of an image pull error that no retry can fix (lower case).
_PERMANENT_PULL = (
    "not found",
    "manifest unknown",
    "unauthorized",
    "denied",
    "does not exist",
    "invalid reference format",
    "403 forbidden",
)


@dataclass(frozen=True)
class Verdict:
    """What the waiting pods say: a `failure`, or the `phase` to report and when to look
    again (`recheck_in` seconds) even if nothing changes; `follow` names a pod waiting for a
    node, whose Events may say whether one is coming."""

    failure: str | None = None
    phase: str | None = None
    recheck_in: float | None = None
    follow: str | None = None


def _uid(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("uid") or pod_name(obj))


def _time(event: Obj) -> datetime.datetime:
    series = event.get("series") or {}
    meta = event.get("metadata") or {}
    for value in (
        series.get("lastObservedTime"),
        event.get("lastTimestamp"),
        event.get("eventTime"),
        meta.get("creationTimestamp"),
    ):
        if value:
            try:
                parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)
    return datetime.datetime.min.replace(tzinfo=datetime.UTC)


def _order(event: Obj) -> tuple[datetime.datetime, int]:
    version = str((event.get("metadata") or {}).get("resourceVersion") or "")
    return _time(event), int(version) if version.isdigit() else 0


def _is_karpenter(event: Obj) -> bool:
    source = (event.get("source") or {}).get("component") or ""
    return _KARPENTER in str(source) or _KARPENTER in str(event.get("reportingComponent") or "")


def autoscaler_event(events: Iterable[Obj], pod: Obj) -> tuple[bool, str] | None:
    """The latest word of a node autoscaler about `pod`: (a node is coming, its message)."""
    uid = (pod.get("metadata") or {}).get("uid")
    name = pod_name(pod)
    latest: Obj | None = None
    for event in events:
        involved = event.get("involvedObject") or event.get("regarding") or {}
        if involved.get("kind") not in (None, "Pod"):
            continue
        if uid and involved.get("uid") and involved.get("uid") != uid:
            continue
        if involved.get("name") != name:
            continue
        reason = event.get("reason")
        if (
            reason in SCALE_UP
            or reason in NO_SCALE_UP
            or (reason == "FailedScheduling" and _is_karpenter(event))
        ) and (latest is None or _order(event) >= _order(latest)):
            latest = event
    if latest is None:
        return None
    message = str(latest.get("message") or latest.get("note") or latest.get("reason"))
    return latest.get("reason") in SCALE_UP, message


def waits_for_volume(message: str) -> bool:
    lowered = message.lower()
    return "persistentvolumeclaim" in lowered or "volume" in lowered


def permanent_pull_error(message: str) -> bool:
    lowered = message.lower()
    return any(words in lowered for words in _PERMANENT_PULL)


class PendingPods:
    """Remembers since when each pod has waited, and judges the waits (module docstring)."""

    def __init__(
        self,
        *,
        unschedulable_grace: float = KubernetesSettings.unschedulable_grace,
        image_pull_grace: float = KubernetesSettings.image_pull_grace,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unschedulable_grace = unschedulable_grace
        self.image_pull_grace = image_pull_grace
        self._clock = clock
        self._since: dict[tuple[str, ...], float] = {}
        self._pull_errors: dict[tuple[str, ...], str] = {}

    def reset(self) -> None:
        self._since.clear()
        self._pull_errors.clear()

    def judge(
        self, pods: Iterable[Obj], events: Iterable[Obj], *, events_readable: bool = True
    ) -> Verdict:
        """Judge the waits of `pods` (the current template's), given their `events`."""
        now = self._clock()
        events = list(events)
        seen: set[tuple[str, ...]] = set()
        phase: str | None = None
        recheck: float | None = None
        follow: str | None = None

        def wait(key: tuple[str, ...], grace: float) -> float:
            seen.add(key)
            return grace - (now - self._since.setdefault(key, now))

        for pod in pods:
            name = pod_name(pod)
            message = unschedulable(pod)
            if message is not None:
                left = wait((_uid(pod), "scheduling"), self.unschedulable_grace)
                volume = waits_for_volume(message)
                said = None if volume else autoscaler_event(events, pod)
                follow = follow or name
                if said is not None and not said[0]:
                    return Verdict(
                        failure=f"Unschedulable: {message} (pod {name}); the cluster "
                        f"autoscaler will not add a node: {said[1]}"
                    )
                if said is not None:
                    phase = phase or PHASE_SCALING_UP
                    continue
                if left <= 0:
                    return Verdict(
                        failure=self._unschedulable(message, name, volume, events_readable)
                    )
                phase = phase or (PHASE_VOLUME if volume else PHASE_SCHEDULING)
                recheck = left if recheck is None else min(recheck, left)
            for container, reason, detail in image_pull_waits(pod):
                key = (_uid(pod), "pull", container)
                if reason == "ErrImagePull" and detail:
                    self._pull_errors[key] = detail
                error = self._pull_errors.get(key) or detail
                left = wait(key, self.image_pull_grace)
                where = f"container {container}, pod {name}"
                if permanent_pull_error(error):
                    return Verdict(failure=f"{reason}: {error} ({where})")
                if left <= 0:
                    return Verdict(
                        failure=f"{reason}: {error or 'the image could not be pulled'} ({where}; "
                        f"the kubelet's retries kept failing for {self.image_pull_grace:g}s)"
                    )
                phase = phase or PHASE_PULLING
                recheck = left if recheck is None else min(recheck, left)
        for gone in [k for k in self._since if k not in seen]:
            del self._since[gone]
            self._pull_errors.pop(gone, None)
        return Verdict(phase=phase, recheck_in=recheck, follow=follow)

    def _unschedulable(self, message: str, name: str, volume: bool, events_readable: bool) -> str:
        waited = f"still not scheduled after {self.unschedulable_grace:g}s"
        if volume:
            hint = "its PersistentVolumeClaim is not bound"
        elif events_readable:
            hint = "no cluster autoscaler announced a node for it"
        else:
            hint = (
                "no scale-up seen: the Events that would announce one could not be read "
                "(allow list and watch on events)"
            )
        return f"Unschedulable: {message} (pod {name}; {waited}; {hint})"
