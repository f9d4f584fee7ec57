"""The Deployment's side of a switch: which container, which args, whose switch is running."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from vllm_chill._model import VLLMModel
from vllm_chill.backends.kubernetes._args import ArgsError
from vllm_chill.backends.kubernetes._deployment import (
    claim_annotations,
    pick_container,
    served_name,
    switch_by_other,
    template_patch,
    wanted_args,
)
from vllm_chill.backends.kubernetes._rollout import POD_MODEL_HASH, POD_SERVED_NAME, READY_HASH

NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)
MODEL = VLLMModel.from_spec({"modelName": "org/m", "servedModelName": "m"})


def deployment(
    *containers: dict[str, Any],
    annotations: dict[str, str] | None = None,
    template_annotations: dict[str, str] | None = None,
    replicas: int = 1,
    complete: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "vllm", "generation": 3, "annotations": annotations or {}},
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {"annotations": template_annotations or {}},
                "spec": {"containers": list(containers)},
            },
        },
        "status": {
            "observedGeneration": 3,
            "replicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1 if complete else 0,
        },
    }


def test_the_vllm_container_is_found_by_name_or_by_convention() -> None:
    sidecar = {"name": "proxy", "args": []}
    vllm = {"name": "vllm", "args": ["--model", "x"]}
    assert pick_container(deployment(sidecar, vllm), None) is vllm
    assert pick_container(deployment(sidecar, vllm), "proxy") is sidecar
    with pytest.raises(ArgsError, match="no container named 'nope'"):
        pick_container(deployment(sidecar, vllm), "nope")


@pytest.mark.parametrize(
    "server",
    [
        {"name": "server", "image": "vllm/vllm-openai:v0.10.1"},
        {"name": "server", "image": "registry.example/vllm:1", "args": ["--port", "8000"]},
        {"name": "server", "command": ["vllm"], "args": ["serve", "org/m"]},
        {"name": "server", "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"]},
        {"name": "server", "image": "registry.example/llm:1", "args": ["--model", "org/m"]},
    ],
)
def test_the_container_that_runs_vllm_is_picked_not_the_first(server: dict[str, Any]) -> None:
    sidecars = [
        {"name": "exporter", "image": "prom/statsd-exporter:v0.26.0", "args": ["--port=9102"]},
        {"name": "chill", "image": "ghcr.io/example/vllm-chill:0.2.0", "args": ["serve"]},
    ]
    assert pick_container(deployment(*sidecars, server), None) is server


def test_a_pod_whose_vllm_container_cannot_be_told_is_refused() -> None:
    one = {"name": "a", "image": "registry.example/llm:1"}
    two = {"name": "b", "image": "registry.example/other:1"}
    with pytest.raises(ArgsError, match="none of them looks like the vLLM server"):
        pick_container(deployment(one, two), None)
    both = [{**one, "image": "vllm/vllm-openai:v1"}, {**two, "image": "vllm/vllm-openai:v1"}]
    with pytest.raises(ArgsError, match="several of them"):
        pick_container(deployment(*both), None)
    # among several vLLM containers, the conventional name decides
    named = {**two, "name": "vllm", "image": "vllm/vllm-openai:v1"}
    assert pick_container(deployment(both[0], named), None) is named


def test_a_shell_script_cannot_be_rewritten_except_through_a_configmap() -> None:
    script = {"name": "vllm", "command": ["sh", "-c"], "args": ["vllm serve $MODEL_NAME"]}
    with pytest.raises(ArgsError, match="shell script"):
        wanted_args(deployment(script), MODEL, None, configmap=False)
    assert wanted_args(deployment(script), MODEL, None, configmap=True) is None


def test_a_configmap_driven_container_is_known_by_its_template_annotation() -> None:
    plain = {"name": "vllm", "args": ["--port", "8000"]}
    dep = deployment(plain, template_annotations={POD_SERVED_NAME: "m"})
    assert served_name(dep, None) == "m"
    patch = template_patch(dep, MODEL, "h1", None, configmap=True)
    assert "spec" not in patch  # args untouched; the annotation alone rolls the pod
    assert patch["metadata"]["annotations"][POD_MODEL_HASH] == "h1"


def test_the_template_patch_keeps_every_container_field() -> None:
    vllm = {"name": "vllm", "args": ["--port", "8000"], "futureField": 1, "image": "i"}
    patch = template_patch(deployment(vllm), MODEL, "h1", None, configmap=False)
    [container] = patch["spec"]["containers"]
    assert container == {**vllm, "args": ["--port", "8000", *MODEL.vllm_args()]}


def claimed(by: str, *, at: datetime.datetime = NOW, **more: str) -> dict[str, str]:
    """The annotations of a switch to MODEL (hash "h2") by proxy `by` at `at`."""
    notes = claim_annotations(MODEL, "h2", by, at)
    notes.update(more)
    return notes


CONTAINER = {"name": "vllm", "args": []}


@pytest.mark.parametrize(
    ("annotations", "template", "complete", "replicas", "expected"),
    [
        # claimed by another proxy, not rolled out yet
        (claimed("other"), "h1", False, 1, "claimed"),
        # ... for too long: that proxy died between its writes
        (
            claimed("other", at=NOW - datetime.timedelta(minutes=5)),
            "h1",
            False,
            1,
            None,
        ),
        (claimed("other"), "h2", False, 1, "rolling"),
        (claimed("other"), "h2", True, 1, "confirming"),
        ({**claimed("other"), READY_HASH: "h2"}, "h2", True, 1, None),
        (claimed("other"), "h2", False, 0, None),  # it failed: scaled down
        (claimed("me"), "h2", False, 1, None),  # our own
        ({}, "h2", False, 1, None),  # nobody's
    ],
)
def test_another_proxys_switch_is_in_progress_until_confirmed(
    annotations: dict[str, str],
    template: str,
    complete: bool,
    replicas: int,
    expected: str | None,
) -> None:
    dep = deployment(
        CONTAINER,
        annotations=annotations,
        template_annotations={POD_MODEL_HASH: template},
        replicas=replicas,
        complete=complete,
    )
    other = switch_by_other(dep, [], "me", claim_timeout=60.0, now=NOW)
    if expected is None:
        assert other is None
    else:
        assert other is not None
        assert other.what == "m (by other)"
        assert other.confirming is (expected == "confirming")
