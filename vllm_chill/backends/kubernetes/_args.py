"""Rewriting the vLLM container's args for a model, and reading the model back from them.

The operator owns the Deployment; vllm-chill owns only the flags a `VLLMModel` renders and the
`extraArgs` it added last time. Everything else (`--port`, `--host`, `--api-key`,
`--download-dir`, ...) stays where the operator put it.

vLLM's parser accepts each flag under several spellings, and every one of them counts as the
managed flag, so none survives a rewrite to override the model's values (vLLM keeps the last):
`--flag value` and `--flag=value`; underscores (`--max_model_len`: vLLM turns `_` into `-` in a
flag's name); the `--no-...` form of every boolean (`--no-enable-prefix-caching`); and the
aliases `-tp` (`--tensor-parallel-size`) and `--device-memory-utilization`
(`--gpu-memory-utilization`).

Where the model goes depends on the container's entrypoint (`command`, else the image's):

- `vllm serve` (`command: [vllm]` with `args: [serve, <model>, ...]`, or `command: [vllm, serve]`
  with `args: [<model>, ...]`): the model is the positional argument after `serve`, which is
  kept. vLLM deprecates `--model` there, so a positional model is preferred when reading and
  always written, and a `--model` flag is dropped.
- `python3 -m vllm.entrypoints.openai.api_server` (the `vllm/vllm-openai` image's entrypoint):
  flags only, the model is `--model`.
- no `command` (the image's entrypoint, unknown here): a first arg that is not a flag is a
  positional model (an image whose entrypoint is `vllm serve`), else `--model`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_chill._model import FIELDS, MANAGED_FLAGS, VLLMModel

MODEL_FLAG = "--model"
SERVED_NAME_FLAG = "--served-model-name"

#: vLLM's other names for the flags a `VLLMModel` renders.
ALIASES: Mapping[str, str] = {
    "-tp": "--tensor-parallel-size",
    "--device-memory-utilization": "--gpu-memory-utilization",
}
#: Managed flags that take a value (`--max-model-len 4096`).
_VALUE_FLAGS = frozenset(f.flag for f in FIELDS if f.flag and f.kind != "bool")
#: Managed booleans: vLLM registers every boolean with its `--no-...` form as well.
_BOOL_FLAGS = frozenset(
    {f.flag for f in FIELDS if f.flag and f.kind == "bool"}
    | {"--no-" + f.flag[2:] for f in FIELDS if f.flag and f.kind == "bool"}
    | (MANAGED_FLAGS - _VALUE_FLAGS)
)
#: Every flag (in vLLM's canonical spelling) that vllm-chill replaces in a Deployment's args.
MANAGED = _VALUE_FLAGS | _BOOL_FLAGS
#: vLLM accepts several served names (`nargs="+"`); the first one is what clients see first.
_MULTI_VALUE_FLAGS = frozenset({SERVED_NAME_FLAG})
#: Old vLLM releases took an optional value after some boolean flags.
_BOOL_WORDS = frozenset({"true", "false", "True", "False", "1", "0"})
_SHELLS = frozenset({"sh", "bash", "ash", "dash", "zsh"})
_SERVE_MODULES = frozenset({"vllm.entrypoints.cli.main"})
_API_SERVER_MODULES = frozenset(
    {"vllm.entrypoints.openai.api_server", "vllm.entrypoints.api_server"}
)


class ArgsError(ValueError):
    """The container cannot be switched by rewriting its args."""


def canonical_flag(token: str) -> str | None:
    """The flag a token names, spelled as vLLM registers it (`--max_model_len=1` ->
    `--max-model-len`), or None for a token that is not a flag (a value, a negative number)."""
    if token.startswith("--"):
        name = token.split("=", 1)[0]
        # vLLM reads `_` as `-` in a flag's name, up to a `.` (after it: JSON keys).
        head, dot, tail = name[2:].partition(".")
        name = "--" + head.replace("_", "-") + dot + tail
    elif token.startswith("-") and len(token) > 1 and not _is_number(token):
        name = token.split("=", 1)[0]
    else:
        return None
    return ALIASES.get(name, name)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _is_flag(token: str) -> bool:
    return canonical_flag(token) is not None


def is_shell_script(command: Sequence[str], args: Sequence[str]) -> bool:
    """`sh -c "vllm serve ..."`: one opaque string that no args rewrite can change safely."""
    words = [*command, *args]
    for index, word in enumerate(words[:-1]):
        if word.rsplit("/", 1)[-1] in _SHELLS and words[index + 1] == "-c":
            return True
    return False


@dataclass(frozen=True)
class Invocation:
    """How a container runs vLLM: `head` (the leading args that name the program, such as
    `serve`, kept as they are), `rest` (flags and the positional model), and the style.

    `style` is "serve" (`vllm serve`: positional model), "api_server" (flags only) or
    "unknown" (the image's entrypoint, or a wrapper: a positional model if the first arg is
    not a flag)."""

    head: tuple[str, ...]
    rest: tuple[str, ...]
    style: str

    @property
    def positional(self) -> bool:
        """Whether `rest` starts with the positional model."""
        if self.style == "api_server" or not self.rest:
            return False
        first = self.rest[0]
        if self.style == "serve":
            return not _is_flag(first)
        return not first.startswith("-") and not any(c.isspace() for c in first)


def invocation(command: Sequence[str], args: Sequence[str]) -> Invocation:
    """Split a container's args into the program's words and the arguments vLLM parses."""
    command = [str(c) for c in command]
    args = [str(a) for a in args]
    words = [*command, *args]
    for index, word in enumerate(words):
        program = word.rsplit("/", 1)[-1]
        following = words[index + 1] if index + 1 < len(words) else None
        serve = (program == "vllm" or word in _SERVE_MODULES) and following == "serve"
        if serve or word in _API_SERVER_MODULES:
            end = index + 2 if serve else index + 1
            cut = max(0, end - len(command))
            return Invocation(
                tuple(args[:cut]), tuple(args[cut:]), "serve" if serve else "api_server"
            )
    return Invocation((), tuple(args), "unknown")


def _model_args(model: VLLMModel, positional: bool) -> list[str]:
    if positional:
        return [model.model_name, *model.vllm_args(include_model=False)]
    return model.vllm_args()


def has_managed_args(args: Sequence[str], command: Sequence[str] = ()) -> bool:
    call = invocation(command, args)
    return call.positional or any(canonical_flag(t) in MANAGED for t in call.rest)


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
    current: Sequence[str],
    model: VLLMModel,
    *,
    previous_extra: Sequence[str] = (),
    command: Sequence[str] = (),
) -> list[str]:
    """The container args that run `model`, keeping every flag vllm-chill does not manage.

    The program's own words (`serve`) stay first. The model's flags go where the first
    managed flag was (or the positional model), else at the end. `previous_extra` (the
    `extraArgs` written last time) are removed first, so one model's extra flags never leak
    into the next. A flag in the model's `extraArgs` replaces the operator's flag of the same
    name, so none appears twice.
    """
    call = invocation(command, current)
    tokens = _remove_run(list(call.rest), previous_extra)
    positional = Invocation(call.head, tuple(tokens), call.style).positional
    overrides = {
        name
        for name in (canonical_flag(t) for t in model.extra_args)
        if name is not None and name not in MANAGED
    }
    kept: list[str] = []
    # `vllm serve` takes the model first, whatever the args had.
    insert_at: int | None = 0 if positional or call.style == "serve" else None
    index = 1 if positional else 0
    while index < len(tokens):
        token = tokens[index]
        name = canonical_flag(token)
        index += 1
        if name in MANAGED:
            if insert_at is None:
                insert_at = len(kept)
            if "=" in token:
                continue
            if name in _MULTI_VALUE_FLAGS:
                while index < len(tokens) and not _is_flag(tokens[index]):
                    index += 1
            elif name in _BOOL_FLAGS:
                if index < len(tokens) and tokens[index] in _BOOL_WORDS:
                    index += 1
            elif index < len(tokens):
                index += 1  # the value, whatever it looks like (`--max-model-len -1`)
            continue
        if name is not None and name in overrides:
            if "=" not in token and index < len(tokens) and not _is_flag(tokens[index]):
                index += 1
            continue
        kept.append(token)
    rendered = _model_args(model, positional or call.style == "serve")
    at = len(kept) if insert_at is None else insert_at
    return [*call.head, *kept[:at], *rendered, *kept[at:]]


def _flag_values(tokens: Sequence[str], flag: str) -> list[str] | None:
    """The values of the last occurrence of `flag` (any spelling), as vLLM would keep."""
    found: list[str] | None = None
    for index, token in enumerate(tokens):
        if canonical_flag(token) != flag:
            continue
        if "=" in token:
            found = [token.split("=", 1)[1]]
            continue
        values = []
        for value in tokens[index + 1 :]:
            if _is_flag(value):
                break
            values.append(value)
            if flag not in _MULTI_VALUE_FLAGS:
                break
        found = values
    return found


def model_name_from_args(args: Sequence[str], command: Sequence[str] = ()) -> str | None:
    """The model vLLM loads: the positional one (what `vllm serve` prefers), else `--model`."""
    call = invocation(command, args)
    if call.positional:
        return call.rest[0]
    values = _flag_values(call.rest, MODEL_FLAG)
    return values[0] if values else None


def served_name_from_args(args: Sequence[str], command: Sequence[str] = ()) -> str | None:
    """What vLLM answers to: the first `--served-model-name`, else the model itself."""
    values = _flag_values(invocation(command, args).rest, SERVED_NAME_FLAG)
    if values:
        return values[0]
    return model_name_from_args(args, command)


def spec_from_args(args: Sequence[str], command: Sequence[str] = ()) -> dict[str, Any]:
    """A best-effort `VLLMModel` spec from a container's args (for the single-model mode)."""
    spec: dict[str, Any] = {}
    model_name = model_name_from_args(args, command)
    served = served_name_from_args(args, command)
    if model_name:
        spec["modelName"] = model_name
    if served:
        spec["servedModelName"] = served
    rest = invocation(command, args).rest
    for rule in FIELDS:
        if rule.flag is None or rule.key in spec:
            continue
        if rule.kind == "bool":
            negative = "--no-" + rule.flag[2:]
            for token in rest:  # the last one wins, as in vLLM's parser
                name = canonical_flag(token)
                if name == rule.flag:
                    spec[rule.key] = True
                elif name is not None and name in (negative, getattr(rule, "negative_flag", None)):
                    spec[rule.key] = False
            continue
        values = _flag_values(rest, rule.flag)
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
