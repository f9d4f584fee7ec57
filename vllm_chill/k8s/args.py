"""Rewriting the vLLM container's args for a model, and reading the model back from them.

The operator owns the Deployment; vllm-chill owns only the flags a `VLLMModel` renders
(`MANAGED_FLAGS`) and the `extraArgs` it added last time. Everything else (`--port`, `--host`,
`--api-key`, `--download-dir`, ...) stays where the operator put it. Flags are recognised in
both `--flag value` and `--flag=value` forms, so an operator's style never causes a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..model import FIELDS, MANAGED_FLAGS, VLLMModel

MODEL_FLAG = "--model"
SERVED_NAME_FLAG = "--served-model-name"

_BOOL_FLAGS = frozenset(
    [f.flag for f in FIELDS if f.kind == "bool" and f.flag]
    + [f.negative_flag for f in FIELDS if f.negative_flag]
)
#: vLLM accepts several served names (`nargs="+"`); the first one is what clients see first.
_MULTI_VALUE_FLAGS = frozenset({SERVED_NAME_FLAG})
#: Old vLLM releases took an optional value after some boolean flags.
_BOOL_WORDS = frozenset({"true", "false", "True", "False", "1", "0"})
_SHELLS = frozenset({"sh", "bash", "ash", "dash", "zsh"})


class ArgsError(ValueError):
    """The container cannot be switched by rewriting its args."""


def flag_name(token: str) -> str | None:
    return token.split("=", 1)[0] if token.startswith("--") else None


def is_shell_script(command: Sequence[str], args: Sequence[str]) -> bool:
    """`sh -c "vllm serve ..."`: one opaque string that no args rewrite can change safely."""
    words = [*command, *args]
    for index, word in enumerate(words[:-1]):
        if word.rsplit("/", 1)[-1] in _SHELLS and words[index + 1] == "-c":
            return True
    return False


def _positional_model(args: Sequence[str]) -> bool:
    """`vllm serve <model> ...`: a first arg that is not a flag names the model."""
    return bool(args) and not args[0].startswith("-") and not any(c.isspace() for c in args[0])


def has_managed_args(args: Sequence[str]) -> bool:
    return _positional_model(args) or any(flag_name(t) in MANAGED_FLAGS for t in args)


def _remove_run(tokens: list[str], run: Sequence[str]) -> list[str]:
    """Remove the last occurrence of `run` as a contiguous run of tokens, if present."""
    size = len(run)
    if not size:
        return tokens
    for start in range(len(tokens) - size, -1, -1):
        if tokens[start : start + size] == list(run):
            return tokens[:start] + tokens[start + size :]
    return tokens


def rewrite_args(
    current: Sequence[str], model: VLLMModel, *, previous_extra: Sequence[str] = ()
) -> list[str]:
    """The container args that run `model`, keeping every flag vllm-chill does not manage.

    The model's flags go where the first managed flag was (or the positional model), else at
    the end. `previous_extra` (the `extraArgs` written last time) are removed first, so one
    model's extra flags never leak into the next. A flag in the model's `extraArgs` replaces the
    operator's flag of the same name, so none appears twice.
    """
    tokens = _remove_run(list(current), previous_extra)
    positional = _positional_model(tokens)
    overrides = {
        name
        for name in (flag_name(t) for t in model.extra_args)
        if name is not None and name not in MANAGED_FLAGS
    }
    kept: list[str] = []
    insert_at: int | None = 0 if positional else None
    index = 1 if positional else 0
    while index < len(tokens):
        token = tokens[index]
        name = flag_name(token)
        index += 1
        if name in MANAGED_FLAGS:
            if insert_at is None:
                insert_at = len(kept)
            if "=" in token:
                continue
            if name in _MULTI_VALUE_FLAGS:
                while index < len(tokens) and not tokens[index].startswith("-"):
                    index += 1
            elif name in _BOOL_FLAGS:
                if index < len(tokens) and tokens[index] in _BOOL_WORDS:
                    index += 1
            elif index < len(tokens):
                index += 1
            continue
        if name is not None and name in overrides:
            if "=" not in token and index < len(tokens) and not tokens[index].startswith("-"):
                index += 1
            continue
        kept.append(token)
    if positional:
        rendered = [model.model_name, *model.vllm_args(include_model=False)]
    else:
        rendered = model.vllm_args()
    at = len(kept) if insert_at is None else insert_at
    return kept[:at] + rendered + kept[at:]


def _flag_values(args: Sequence[str], flag: str) -> list[str] | None:
    for index, token in enumerate(args):
        if token == flag:
            values = []
            for value in args[index + 1 :]:
                if value.startswith("-"):
                    break
                values.append(value)
            return values
        if token.startswith(flag + "="):
            return [token.split("=", 1)[1]]
    return None


def model_name_from_args(args: Sequence[str]) -> str | None:
    values = _flag_values(args, MODEL_FLAG)
    if values:
        return values[0]
    return args[0] if _positional_model(args) else None


def served_name_from_args(args: Sequence[str]) -> str | None:
    """What vLLM answers to: the first `--served-model-name`, else the model itself."""
    values = _flag_values(args, SERVED_NAME_FLAG)
    if values:
        return values[0]
    return model_name_from_args(args)


def spec_from_args(args: Sequence[str]) -> dict[str, Any]:
    """A best-effort `VLLMModel` spec from a container's args (for the single-model mode)."""
    spec: dict[str, Any] = {}
    model_name = model_name_from_args(args)
    served = served_name_from_args(args)
    if model_name:
        spec["modelName"] = model_name
    if served:
        spec["servedModelName"] = served
    for rule in FIELDS:
        if rule.flag is None or rule.key in spec:
            continue
        if rule.kind == "bool":
            if any(flag_name(t) == rule.flag for t in args):
                spec[rule.key] = True
            elif rule.negative_flag and any(flag_name(t) == rule.negative_flag for t in args):
                spec[rule.key] = False
            continue
        values = _flag_values(args, rule.flag)
        if not values:
            continue
        try:
            spec[rule.key] = (
                int(values[0])
                if rule.kind == "int"
                else float(values[0])
                if rule.kind == "float"
                else values[0]
            )
        except ValueError:
            continue
    return spec


def model_hash(model: VLLMModel, configmap_data: Mapping[str, str] | None = None) -> str:
    """Identifies what a model puts into the pod; a new value rolls the pod."""
    payload = {
        "name": model.name,
        "args": model.vllm_args(),
        "configmap": dict(configmap_data) if configmap_data is not None else None,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:16]
