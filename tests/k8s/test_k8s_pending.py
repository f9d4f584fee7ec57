"""Waiting pods judged over time: the autoscaler's Events, volumes, image pull retries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from vllm_chill.backends.kubernetes._pending import PendingPods, Verdict, autoscaler_event
from vllm_chill.backends.kubernetes._rollout import (
    PHASE_PULLING,
    PHASE_SCALING_UP,
    PHASE_SCHEDULING,
    PHASE_VOLUME,
)

INSUFFICIENT = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
UNBOUND = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unschedulable_pod(message: str = INSUFFICIENT, name: str = "vllm-1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                }
            ],
        },
    }


def pulling_pod(reason: str, message: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "vllm-1", "uid": "uid-vllm-1"},
        "status": {
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {"name": "vllm", "state": {"waiting": {"reason": reason, "message": message}}}
            ],
        },
    }


def event(
    reason: str, message: str, at: str, *, pod: str = "vllm-1", rv: str = "1", **more: Any
) -> dict[str, Any]:
    return {
        "metadata": {"resourceVersion": rv},
        "involvedObject": {"kind": "Pod", "name": pod, "uid": f"uid-{pod}"},
        "reason": reason,
        "message": message,
        "lastTimestamp": at,
        **more,
    }


def judge(
    pending: PendingPods, *pods: dict[str, Any], events: Sequence[dict[str, Any]] = ()
) -> Verdict:
    return pending.judge(pods, events)


def test_unschedulable_waits_for_the_grace_period_then_fails() -> None:
    clock = Clock()
    pending = PendingPods(unschedulable_grace=60, clock=clock)
    verdict = judge(pending, unschedulable_pod())
    assert verdict.failure is None and verdict.phase == PHASE_SCHEDULING
    assert verdict.recheck_in == 60 and verdict.follow == "vllm-1"
    clock.now += 59
    assert judge(pending, unschedulable_pod()).recheck_in == pytest.approx(1)
    clock.now += 1
    failure = judge(pending, unschedulable_pod()).failure
    assert failure is not None and INSUFFICIENT in failure and "after 60s" in failure


def test_a_scale_up_on_its_way_is_waited_for_and_a_refusal_fails_at_once() -> None:
    clock = Clock()
    pending = PendingPods(unschedulable_grace=1, clock=clock)
    up = event("TriggeredScaleUp", "pod triggered scale-up", "2025-01-01T00:00:01Z", rv="5")
    clock.now += 600
    verdict = judge(pending, unschedulable_pod(), events=[up])
    assert verdict.failure is None and verdict.phase == PHASE_SCALING_UP
    assert verdict.recheck_in is None  # nothing to time out: the switch timeout bounds it
    # the newest word counts: the autoscaler gave up (a max node group size reached)
    no = event("NotTriggerScaleUp", "max node group size reached", "2025-01-01T00:00:09Z")
    failure = judge(pending, unschedulable_pod(), events=[up, no]).failure
    assert failure is not None and "will not add a node: max node group size" in failure
    # same second: the later resourceVersion counts
    again = event("TriggeredScaleUp", "retrying", "2025-01-01T00:00:09Z", rv="7")
    no["metadata"]["resourceVersion"] = "6"
    assert judge(pending, unschedulable_pod(), events=[no, again]).failure is None


def test_karpenter_nominating_or_refusing_counts_like_the_cluster_autoscaler() -> None:
    pod = unschedulable_pod()
    nominated = event(
        "Nominated", "Pod should schedule on: nodeclaim/gpu-x", "2025-01-01T00:00:01Z"
    )
    assert autoscaler_event([nominated], pod) == (True, "Pod should schedule on: nodeclaim/gpu-x")
    refused = event(
        "FailedScheduling",
        "Failed to schedule pod, incompatible with nodepool",
        "2025-01-01T00:00:02Z",
        source={"component": "karpenter"},
    )
    scheduler = event("FailedScheduling", INSUFFICIENT, "2025-01-01T00:00:03Z")
    assert autoscaler_event([nominated, refused, scheduler], pod) == (
        False,
        "Failed to schedule pod, incompatible with nodepool",
    )
    other_pod = event("NotTriggerScaleUp", "no", "2025-01-01T00:00:04Z", pod="vllm-2")
    assert autoscaler_event([other_pod], pod) is None


def test_a_pod_waiting_for_its_volume_ignores_the_autoscaler_and_gets_the_grace_period() -> None:
    clock = Clock()
    pending = PendingPods(unschedulable_grace=30, clock=clock)
    no = event("NotTriggerScaleUp", "pod has unbound immediate PVCs", "2025-01-01T00:00:01Z")
    verdict = judge(pending, unschedulable_pod(UNBOUND), events=[no])
    assert verdict.failure is None and verdict.phase == PHASE_VOLUME
    clock.now += 30
    failure = judge(pending, unschedulable_pod(UNBOUND), events=[no]).failure
    assert failure is not None and "PersistentVolumeClaim is not bound" in failure


def test_without_readable_events_the_failure_says_what_permission_is_missing() -> None:
    clock = Clock()
    pending = PendingPods(unschedulable_grace=0, clock=clock)
    failure = pending.judge([unschedulable_pod()], [], events_readable=False).failure
    assert failure is not None and "allow list and watch on events" in failure


def test_a_transient_image_pull_error_gets_the_kubelets_retries_then_fails() -> None:
    clock = Clock()
    pending = PendingPods(image_pull_grace=60, clock=clock)
    blip = "failed to do request: dial tcp 1.2.3.4:443: i/o timeout"
    verdict = judge(pending, pulling_pod("ErrImagePull", blip))
    assert verdict.failure is None and verdict.phase == PHASE_PULLING
    clock.now += 30
    back_off = pulling_pod("ImagePullBackOff", 'Back-off pulling image "vllm/vllm-openai"')
    assert judge(pending, back_off).failure is None
    clock.now += 30
    failure = judge(pending, back_off).failure
    # the back-off's own message says nothing: the pull error it remembers does
    assert failure is not None and failure.startswith(f"ImagePullBackOff: {blip}")


@pytest.mark.parametrize(
    "message",
    [
        'failed to pull and unpack image "vllm/vllm-openai:nope": not found',
        "pull access denied, repository does not exist or may require authorization",
        "failed to authorize: 401 Unauthorized",
        "manifest unknown: manifest unknown",
    ],
)
def test_an_image_that_is_not_there_fails_at_once(message: str) -> None:
    pending = PendingPods(image_pull_grace=60, clock=Clock())
    failure = judge(pending, pulling_pod("ErrImagePull", message)).failure
    assert failure == f"ErrImagePull: {message} (container vllm, pod vllm-1)"


def test_a_pod_that_got_past_a_wait_starts_afresh_next_time() -> None:
    clock = Clock()
    pending = PendingPods(unschedulable_grace=10, clock=clock)
    judge(pending, unschedulable_pod())
    clock.now += 9
    judge(pending)  # scheduled (or gone)
    clock.now += 9
    assert judge(pending, unschedulable_pod()).recheck_in == 10
