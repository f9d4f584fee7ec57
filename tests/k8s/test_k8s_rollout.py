"""Rollout evaluation: `kubectl rollout status` semantics and the pod's own failure reasons."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_chill.backends.kubernetes._rollout import (
    PHASE_MODELS,
    PHASE_PULLING,
    PHASE_SCHEDULING,
    PHASE_STARTING,
    PHASE_UPDATING,
    POD_MODEL_HASH,
    evaluate,
    image_pull_waits,
    label_selector,
    pod_failure,
    unschedulable,
)


def deployment(
    *,
    replicas: int = 1,
    generation: int = 2,
    observed: int = 2,
    updated: int = 1,
    total: int = 1,
    available: int = 1,
    conditions: list[dict[str, Any]] | None = None,
    template_hash: str = "h2",
) -> dict[str, Any]:
    return {
        "metadata": {"name": "vllm", "generation": generation},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {POD_MODEL_HASH: template_hash}}},
        },
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": updated,
            "replicas": total,
            "availableReplicas": available,
            "conditions": conditions or [],
        },
    }


def pod(
    *,
    template_hash: str = "h2",
    conditions: list[dict[str, Any]] | None = None,
    containers: list[dict[str, Any]] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "vllm-abc", "annotations": {POD_MODEL_HASH: template_hash}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "status": {"conditions": conditions or [], "containerStatuses": containers or []},
    }


SCHEDULED = {"type": "PodScheduled", "status": "True"}


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"name": "vllm", "state": {"waiting": {"reason": reason, "message": message}}}


@pytest.mark.parametrize(
    ("changes", "complete"),
    [
        ({}, True),
        ({"observed": 1}, False),  # the controller has not seen the new spec yet
        ({"updated": 0}, False),  # no replica of the new template
        ({"total": 2}, False),  # an old replica is still terminating
        ({"available": 0}, False),  # the new replica is not available yet
    ],
)
def test_complete_means_what_kubectl_rollout_status_means(
    changes: dict[str, Any], complete: bool
) -> None:
    assert evaluate(deployment(**changes), []).complete is complete


def test_progress_deadline_exceeded_is_a_failure_once_observed() -> None:
    timed_out = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "vllm-1" has timed out progressing.',
        }
    ]
    failure = evaluate(deployment(available=0, conditions=timed_out), []).failure
    assert failure is not None and failure.startswith("ProgressDeadlineExceeded: ReplicaSet")
    # Before the controller observed the new generation, the condition is about the old one.
    assert evaluate(deployment(observed=1, conditions=timed_out), []).failure is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (waiting("CrashLoopBackOff", "back-off 10s"), "CrashLoopBackOff: back-off 10s"),
        (
            waiting("CreateContainerConfigError", 'configmap "c" not found'),
            "CreateContainerConfigError",
        ),
        (waiting("InvalidImageName"), "InvalidImageName"),
        (
            {
                "name": "vllm",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
            },
            "OOMKilled: container vllm ran out of memory",
        ),
    ],
)
def test_a_pods_own_reason_is_the_failure(status: dict[str, Any], expected: str) -> None:
    failure = pod_failure(pod(conditions=[SCHEDULED], containers=[status]))
    assert failure is not None and failure.startswith(expected)


def test_an_unschedulable_pod_is_not_a_failure_by_itself() -> None:
    """A cluster autoscaler may be adding a node: `pending.py` judges it over time."""
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
    }
    assert pod_failure(pod(conditions=[condition])) is None
    assert unschedulable(pod(conditions=[condition])) == message
    assert unschedulable(pod(conditions=[SCHEDULED])) is None


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff"])
def test_a_failed_image_pull_is_not_a_failure_by_itself(reason: str) -> None:
    """The kubelet retries it: `pending.py` judges it over time."""
    failing = pod(conditions=[SCHEDULED], containers=[waiting(reason, "i/o timeout")])
    assert pod_failure(failing) is None
    assert image_pull_waits(failing) == [("vllm", reason, "i/o timeout")]


@pytest.mark.parametrize("reason", ["ContainerCreating", "PodInitializing"])
def test_transient_waiting_reasons_are_not_failures(reason: str) -> None:
    assert pod_failure(pod(conditions=[SCHEDULED], containers=[waiting(reason)])) is None


def test_pods_of_an_older_template_or_being_deleted_do_not_fail_the_rollout() -> None:
    crashing = [waiting("CrashLoopBackOff")]
    old = pod(template_hash="h1", conditions=[SCHEDULED], containers=crashing)
    going = pod(deleting=True, conditions=[SCHEDULED], containers=crashing)
    assert evaluate(deployment(available=0), [old, going]).failure is None
    assert evaluate(deployment(available=0), [pod(containers=crashing)]).failure is not None


def test_phases_follow_the_pod() -> None:
    not_ready = deployment(available=0, updated=1)
    assert evaluate(deployment(observed=1), []).phase == PHASE_UPDATING
    assert evaluate(not_ready, [pod()]).phase == PHASE_SCHEDULING
    creating = pod(conditions=[SCHEDULED], containers=[waiting("ContainerCreating")])
    assert evaluate(not_ready, [creating]).phase == PHASE_PULLING
    running = pod(conditions=[SCHEDULED], containers=[{"name": "vllm", "state": {"running": {}}}])
    assert evaluate(not_ready, [running]).phase == PHASE_STARTING
    assert evaluate(deployment(), [running]).phase == PHASE_MODELS


def test_label_selector_from_match_labels_and_expressions() -> None:
    dep = {
        "spec": {
            "selector": {
                "matchLabels": {"app": "vllm", "tier": "gpu"},
                "matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["a", "b"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                ],
            }
        }
    }
    assert label_selector(dep) == "app=vllm,tier=gpu,env in (a,b),!canary"
