"""Reading and changing a vLLM Deployment for a model: pure functions over the API's JSON.

The Deployment is the one place where the active model lives, so that several proxy replicas
agree on it. Two layers of annotations record it:

- on the pod template (`POD_MODEL_HASH`, `POD_MODEL`, `POD_SERVED_NAME`): what the pods run.
  A new hash is what rolls the pods, even when the args did not change (ConfigMap mode);
- on the Deployment (`ACTIVE_MODEL`, `TARGET_HASH`, `SWITCHED_BY`, `SWITCHED_AT`, ...): the
  last switch a proxy asked for and which proxy asked. Another replica reads this claim to
  follow a switch in progress instead of fighting it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_chill._model import VLLMModel
from vllm_chill.backends.kubernetes._args import (
    MODEL_FLAG,
    SERVED_NAME_FLAG,
    ArgsError,
    canonical_flag,
    has_managed_args,
    invocation,
    is_shell_script,
    rewrite_args,
    served_name_from_args,
)
from vllm_chill.backends.kubernetes._rollout import (
    ACTIVE_MODEL,
    EXTRA_ARGS,
    POD_MODEL,
    POD_MODEL_HASH,
    POD_SERVED_NAME,
    READY_HASH,
    SERVED_NAME,
    SWITCHED_AT,
    SWITCHED_BY,
    TARGET_HASH,
    evaluate,
    object_annotations,
    replicas,
    template_annotations,
)

Obj = dict[str, Any]


def _containers(deployment: Mapping[str, Any]) -> list[Obj]:
    spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    return list(spec.get("containers") or [])


def runs_vllm(container: Mapping[str, Any]) -> bool:
    """Whether a container looks like a vLLM server: it invokes vLLM (`vllm serve`, the API
    server module), runs a vLLM image (not vllm-chill's), or names a model in its args."""
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if invocation(command, args).style != "unknown":
        return True
    if any("vllm serve" in word or "vllm.entrypoints" in word for word in [*command, *args]):
        return True  # a shell script that starts vLLM (ConfigMap mode)
    image = str(container.get("image") or "").rsplit("/", 1)[-1].split(":", 1)[0].split("@")[0]
    if "vllm" in image and "chill" not in image:
        return True
    return any(canonical_flag(t) in (MODEL_FLAG, SERVED_NAME_FLAG) for t in args)


def pick_container(deployment: Mapping[str, Any], name: str | None) -> Obj:
    """The vLLM container: the one named (`--container`), else the only one, else the one
    that runs vLLM (see `runs_vllm`; among several, the one called `vllm` or like the
    Deployment). Anything else is refused: writing a model's flags into a sidecar would
    break the pod and leave vLLM as it was."""
    containers = _containers(deployment)
    if not containers:
        raise ArgsError("the Deployment's pod template has no container")
    names = ", ".join(str(c.get("name")) for c in containers)
    if name is not None:
        for container in containers:
            if container.get("name") == name:
                return container
        raise ArgsError(f"the Deployment has no container named {name!r} (it has {names})")
    if len(containers) == 1:
        return containers[0]
    deployment_name = (deployment.get("metadata") or {}).get("name")
    conventional = [c for c in containers if c.get("name") in ("vllm", deployment_name)]
    candidates = [c for c in containers if runs_vllm(c)]
    several = len(candidates) > 1
    if several:
        candidates = [c for c in candidates if c in conventional]
    elif not candidates:
        candidates = conventional
    if len(candidates) == 1:
        return candidates[0]
    which = "several of them look like" if several else "none of them looks like"
    raise ArgsError(
        f"the Deployment's pod has containers {names} and {which} the vLLM server; "
        "name it with --container"
    )


def _command_and_args(container: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    return [str(c) for c in container.get("command") or []], [
        str(a) for a in container.get("args") or []
    ]


def template_hash(deployment: Mapping[str, Any]) -> str | None:
    return template_annotations(deployment).get(POD_MODEL_HASH)


def served_name(deployment: Mapping[str, Any], container_name: str | None) -> str | None:
    """What the Deployment's pods answer to: from the args (the truth for args-based
    Deployments), else from the annotations vllm-chill wrote (ConfigMap-driven ones)."""
    try:
        container = pick_container(deployment, container_name)
    except ArgsError:
        container = {}
    command, args = _command_and_args(container)
    if not is_shell_script(command, args):
        name = served_name_from_args(args, command)
        if name:
            return name
    return template_annotations(deployment).get(POD_SERVED_NAME) or object_annotations(
        deployment
    ).get(SERVED_NAME)


def active_model_name(deployment: Mapping[str, Any]) -> str | None:
    """The VLLMModel (resource name) the Deployment runs, as far as vllm-chill knows."""
    return template_annotations(deployment).get(POD_MODEL) or object_annotations(deployment).get(
        ACTIVE_MODEL
    )


def previous_extra_args(deployment: Mapping[str, Any]) -> list[str]:
    try:
        value = json.loads(object_annotations(deployment).get(EXTRA_ARGS) or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def wanted_args(
    deployment: Mapping[str, Any], model: VLLMModel, container_name: str | None, *, configmap: bool
) -> list[str] | None:
    """The container args for `model`, or None when the args are left alone (a
    ConfigMap-driven Deployment whose args carry no model flags)."""
    container = pick_container(deployment, container_name)
    command, args = _command_and_args(container)
    if is_shell_script(command, args):
        if configmap:
            return None
        raise ArgsError(
            f"container {container.get('name')!r} runs a shell script; vllm-chill rewrites "
            "args-based Deployments only (or use --configmap with a script that reads it)"
        )
    if configmap and not has_managed_args(args, command):
        return None
    return rewrite_args(
        args, model, previous_extra=previous_extra_args(deployment), command=command
    )


def runs(
    deployment: Mapping[str, Any],
    model: VLLMModel,
    model_hash: str,
    container_name: str | None,
    *,
    configmap: bool,
) -> bool:
    """Whether the Deployment's template already is `model` (nothing to rewrite)."""
    if template_hash(deployment) != model_hash:
        return False
    args = wanted_args(deployment, model, container_name, configmap=configmap)
    if args is None:
        return True
    container = pick_container(deployment, container_name)
    return [str(a) for a in container.get("args") or []] == args


def claim_annotations(
    model: VLLMModel, model_hash: str, instance: str, now: datetime.datetime
) -> dict[str, str]:
    return {
        ACTIVE_MODEL: model.name,
        SERVED_NAME: model.served_model_name,
        TARGET_HASH: model_hash,
        SWITCHED_BY: instance,
        SWITCHED_AT: now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        EXTRA_ARGS: json.dumps(list(model.extra_args)),
    }


def template_patch(
    deployment: Mapping[str, Any],
    model: VLLMModel,
    model_hash: str,
    container_name: str | None,
    *,
    configmap: bool,
) -> Obj:
    """The `spec.template` merge patch that runs `model`.

    A merge patch replaces lists whole, so the containers go in complete, as read (with every
    field this client may not know), only the vLLM container's args changed. The write is
    conditional on the resourceVersion they were read at, so nothing concurrent is lost.
    """
    patch: Obj = {
        "metadata": {
            "annotations": {
                POD_MODEL_HASH: model_hash,
                POD_MODEL: model.name,
                POD_SERVED_NAME: model.served_model_name,
            }
        }
    }
    args = wanted_args(deployment, model, container_name, configmap=configmap)
    if args is not None:
        target = pick_container(deployment, container_name)
        spec = deployment["spec"]["template"]["spec"]
        containers = []
        for original in spec["containers"]:
            container = dict(original)
            if container.get("name") == target.get("name"):
                container["args"] = args
            containers.append(container)
        patch["spec"] = {"containers": containers}
    return patch


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class OtherSwitch:
    """A switch another proxy replica has in progress on the Deployment."""

    what: str  # "model-b (by proxy-2)", for progress messages
    target: str  # the model hash it claimed
    #: Rolled out; only its proxy's /v1/models check (the `ready-hash` mark) is missing.
    confirming: bool


def switch_by_other(
    deployment: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    instance: str,
    *,
    claim_timeout: float,
    now: datetime.datetime,
) -> OtherSwitch | None:
    """The switch another proxy has in progress, or None.

    In progress means: claimed and not rolled out yet (for at most `claim_timeout`, in case
    that proxy died between its writes), or rolled out and neither failed, scaled to zero,
    nor confirmed ready by its proxy (the `ready-hash` annotation).
    """
    notes = object_annotations(deployment)
    by = notes.get(SWITCHED_BY)
    target = notes.get(TARGET_HASH)
    if not by or by == instance or not target:
        return None
    what = f"{notes.get(SERVED_NAME) or notes.get(ACTIVE_MODEL) or '?'} (by {by})"
    if template_hash(deployment) != target:
        at = parse_time(notes.get(SWITCHED_AT))
        if at is not None and (now - at).total_seconds() < claim_timeout:
            return OtherSwitch(what, target, confirming=False)
        return None
    if replicas(deployment) == 0 or notes.get(READY_HASH) == target:
        return None
    rollout = evaluate(deployment, pods)
    if rollout.failure is not None:
        return None
    return OtherSwitch(what, target, confirming=rollout.complete)
