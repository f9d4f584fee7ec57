"""The `VLLMModel` resource: one validated model and the vLLM flags it renders.

The same rules live in three places that must agree: this module, the CRD's OpenAPI schema in
`manifests/crds/vllmmodel.yaml`, and the tests that check the examples against both. The table
`FIELDS` is the single Python source of those rules, so validation, flag rendering and the
ConfigMap keys cannot drift apart inside the package.

A field left unset renders no flag, so vLLM's own default applies (vLLM turns prefix caching and
chunked prefill on by itself, picks its own memory fraction, ...). A boolean renders its flag
when true; when false, the `--no-...` form for the ones vLLM turns on by default, and nothing for
the ones that are off by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

API_GROUP = "vllm.efortin.github.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "VLLMModel"
PLURAL = "vllmmodels"

#: The tool-call parsers vLLM registers (`ToolParserManager`, `vllm/tool_parsers/__init__.py`
#: of vLLM 0.32), in vLLM's spelling.
VLLM_TOOL_CALL_PARSERS = (
    "apertus",
    "cohere_command3",
    "cohere_command4",
    "deepseek_v3",
    "deepseek_v31",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_v41",
    "dots",
    "ernie45",
    "functiongemma",
    "gemma4",
    "gigachat3",
    "glm45",
    "glm47",
    "granite",
    "granite-20b-fc",
    "granite4",
    "hermes",
    "hf",
    "hunyuan_a13b",
    "hy_v3",
    "hy_v4",
    "inkling",
    "internlm",
    "jamba",
    "k2_horizon",
    "kimi_k2",
    "kimi_k3",
    "lfm2",
    "ling3",
    "llama3_json",
    "llama4_json",
    "llama4_pythonic",
    "longcat",
    "mimo",
    "minicpm5",
    "minimax_m2",
    "minimax_m3",
    "mistral",
    "muse_glimmer",
    "olmo3",
    "openai",
    "phi4_mini_json",
    "plamo3",
    "poolside_v1",
    "pythonic",
    "qwen3_coder",
    "qwen3_json",
    "qwen3_xml",
    "seed_oss",
    "step3",
    "step3p5",
    "xlam",
)
#: Names this resource has always accepted that vLLM spells differently: accepted as written,
#: rendered (and stored) as vLLM's name.
TOOL_CALL_PARSER_RENAMES: Mapping[str, str] = {"internlm2": "internlm"}
#: `""` means no parser (the flag is left out).
TOOL_CALL_PARSERS = ("", *VLLM_TOOL_CALL_PARSERS, *TOOL_CALL_PARSER_RENAMES)

#: The reasoning parsers vLLM registers (`ReasoningParserManager`, `vllm/reasoning/__init__.py`
#: of vLLM 0.32).
VLLM_REASONING_PARSERS = (
    "cohere_command3",
    "cohere_command4",
    "deepseek_r1",
    "deepseek_v3",
    "deepseek_v4",
    "deepseek_v41",
    "ernie45",
    "gemma4",
    "glm45",
    "glm47",
    "granite",
    "granite_thinking_parser",
    "hf",
    "holo2",
    "hunyuan_a13b",
    "hy_v3",
    "hy_v4",
    "inkling",
    "k2_horizon",
    "kimi_k2",
    "kimi_k3",
    "ling3",
    "mimo",
    "minicpmv",
    "minimax_m2",
    "minimax_m2_append_think",
    "minimax_m3",
    "mistral",
    "muse_glimmer",
    "nemotron_v3",
    "olmo3",
    "openai_gptoss",
    "plamo3",
    "poolside_v1",
    "qwen3",
    "seed_oss",
    "step3",
    "step3p5",
)
REASONING_PARSERS = ("", *VLLM_REASONING_PARSERS)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

FieldKind = Literal["str", "int", "float", "bool"]


@dataclass(frozen=True)
class FieldRule:
    """One spec field: its type, its rule, and how it becomes a vLLM flag and a ConfigMap key.

    No field has a default: unset is `None` and renders nothing.
    """

    key: str  # camelCase name in the manifest
    attr: str  # snake_case attribute on VLLMModel
    kind: FieldKind
    flag: str | None
    configmap_key: str | None
    required: bool = False
    choices: tuple[str, ...] | None = None
    #: Accepted values that are stored and rendered under another name.
    renames: Mapping[str, str] = field(default_factory=dict, hash=False)
    minimum: float | None = None
    maximum: float | None = None
    # Booleans: `flag` when true; `negative_flag` when false (None: nothing when false).
    negative_flag: str | None = None


FIELDS: tuple[FieldRule, ...] = (
    FieldRule("modelName", "model_name", "str", "--model", "MODEL_NAME", required=True),
    FieldRule(
        "servedModelName",
        "served_model_name",
        "str",
        "--served-model-name",
        "SERVED_MODEL_NAME",
        required=True,
    ),
    FieldRule(
        "toolCallParser",
        "tool_call_parser",
        "str",
        "--tool-call-parser",
        "TOOL_CALL_PARSER",
        choices=TOOL_CALL_PARSERS,
        renames=TOOL_CALL_PARSER_RENAMES,
    ),
    FieldRule(
        "reasoningParser",
        "reasoning_parser",
        "str",
        "--reasoning-parser",
        "REASONING_PARSER",
        choices=REASONING_PARSERS,
    ),
    FieldRule(
        "tensorParallelSize",
        "tensor_parallel_size",
        "int",
        "--tensor-parallel-size",
        "TENSOR_PARALLEL_SIZE",
        minimum=1,
    ),
    FieldRule(
        "maxModelLen", "max_model_len", "int", "--max-model-len", "MAX_MODEL_LEN", minimum=512
    ),
    FieldRule(
        "gpuMemoryUtilization",
        "gpu_memory_utilization",
        "float",
        "--gpu-memory-utilization",
        "GPU_MEMORY_UTILIZATION",
        minimum=0.1,
        maximum=1.0,
    ),
    FieldRule(
        "enableChunkedPrefill",
        "enable_chunked_prefill",
        "bool",
        "--enable-chunked-prefill",
        "ENABLE_CHUNKED_PREFILL",
        negative_flag="--no-enable-chunked-prefill",
    ),
    FieldRule(
        "maxNumBatchedTokens",
        "max_num_batched_tokens",
        "int",
        "--max-num-batched-tokens",
        "MAX_NUM_BATCHED_TOKENS",
        minimum=1,
    ),
    FieldRule("maxNumSeqs", "max_num_seqs", "int", "--max-num-seqs", "MAX_NUM_SEQS", minimum=1),
    FieldRule("dtype", "dtype", "str", "--dtype", "DTYPE", choices=DTYPES),
    FieldRule(
        "disableCustomAllReduce",
        "disable_custom_all_reduce",
        "bool",
        "--disable-custom-all-reduce",
        "DISABLE_CUSTOM_ALL_REDUCE",
    ),
    FieldRule(
        "enablePrefixCaching",
        "enable_prefix_caching",
        "bool",
        "--enable-prefix-caching",
        "ENABLE_PREFIX_CACHING",
        negative_flag="--no-enable-prefix-caching",
    ),
    FieldRule(
        "cpuOffloadGB", "cpu_offload_gb", "int", "--cpu-offload-gb", "CPU_OFFLOAD_GB", minimum=0
    ),
    FieldRule(
        "enableAutoToolChoice",
        "enable_auto_tool_choice",
        "bool",
        "--enable-auto-tool-choice",
        "ENABLE_AUTO_TOOL_CHOICE",
    ),
    FieldRule("enableSleepMode", "enable_sleep_mode", "bool", "--enable-sleep-mode", None),
)

FIELDS_BY_KEY = {f.key: f for f in FIELDS}
#: Every flag vLLM receives from a VLLMModel; the Kubernetes backend replaces exactly these in a
#: Deployment's args and keeps the rest (`--port`, `--host`, `--api-key`, ...).
MANAGED_FLAGS = frozenset(
    [f.flag for f in FIELDS if f.flag] + [f.negative_flag for f in FIELDS if f.negative_flag]
)
#: What `enableAutoToolChoice: true` without a tool-call parser is refused with (vLLM exits at
#: start with "--enable-auto-tool-choice requires --tool-call-parser").
AUTO_TOOL_CHOICE_NEEDS_PARSER = "requires a toolCallParser (vLLM refuses to start without one)"


class ModelValidationError(ValueError):
    """A manifest broke one or more rules; `problems` names every invalid field at once."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid VLLMModel: " + "; ".join(problems))


@dataclass(frozen=True)
class VLLMModel:
    """One validated model spec. Immutable, so it can be shared by the registry and backends."""

    name: str
    model_name: str
    served_model_name: str
    # Everything below: None when the manifest leaves it unset (no flag, vLLM's default).
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    disable_custom_all_reduce: bool | None = None
    enable_prefix_caching: bool | None = None
    cpu_offload_gb: int | None = None
    enable_auto_tool_choice: bool | None = None
    enable_sleep_mode: bool | None = None
    extra_args: tuple[str, ...] = ()
    namespace: str | None = None
    #: The manifest's `spec` as written (for `/proxy/models`); not part of equality.
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_spec(
        cls,
        spec: Mapping[str, Any],
        *,
        name: str | None = None,
        namespace: str | None = None,
        source: str = "spec",
    ) -> VLLMModel:
        """Validate a `spec` mapping and collect every problem.

        A tool-call parser without `enableAutoToolChoice` turns auto tool choice on (vLLM would
        load the parser and never use it); `enableAutoToolChoice: false` keeps it off.
        """
        if not isinstance(spec, Mapping):
            raise ModelValidationError(source, ["spec: must be a mapping"])
        problems: list[str] = []
        values: dict[str, Any] = {}
        for rule in FIELDS:
            raw = spec.get(rule.key)
            if raw is None:
                if rule.required:
                    problems.append(f"spec.{rule.key}: required")
                continue
            value, problem = _check(rule, raw)
            if problem:
                problems.append(f"spec.{rule.key}: {problem}")
            else:
                values[rule.attr] = value
        extra = spec.get("extraArgs")
        extra_args: tuple[str, ...] = ()
        if extra is not None:
            if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
                problems.append("spec.extraArgs: must be a list of strings")
            else:
                extra_args = tuple(extra)
        parser = values.get("tool_call_parser")
        auto_tool_choice = values.get("enable_auto_tool_choice")
        if auto_tool_choice and not parser and "toolCallParser" not in _failed(problems):
            problems.append(f"spec.enableAutoToolChoice: {AUTO_TOOL_CHOICE_NEEDS_PARSER}")
        elif parser and auto_tool_choice is None:
            values["enable_auto_tool_choice"] = True
        known = {*FIELDS_BY_KEY, "extraArgs"}
        problems.extend(f"spec.{key}: unknown field" for key in spec if key not in known)
        if name is not None and (not isinstance(name, str) or not name):
            problems.append("metadata.name: must be a non-empty string")
        if problems:
            raise ModelValidationError(source, problems)
        return cls(
            name=name or str(values["served_model_name"]),
            namespace=namespace,
            extra_args=extra_args,
            spec=dict(spec),
            **values,
        )

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], *, source: str = "manifest") -> VLLMModel:
        """Build from a whole `VLLMModel` object (apiVersion, kind, metadata, spec)."""
        if not isinstance(manifest, Mapping):
            raise ModelValidationError(source, ["manifest: must be a mapping"])
        problems = []
        if manifest.get("kind") != KIND:
            problems.append(f"kind: must be {KIND!r}")
        if manifest.get("apiVersion") != API_VERSION:
            problems.append(f"apiVersion: must be {API_VERSION!r}")
        metadata = manifest.get("metadata") or {}
        if not isinstance(metadata, Mapping) or not metadata.get("name"):
            problems.append("metadata.name: required")
            metadata = {}
        spec = manifest.get("spec")
        if not isinstance(spec, Mapping):
            problems.append("spec: required mapping")
        else:
            try:
                model = cls.from_spec(
                    spec,
                    name=metadata.get("name"),
                    namespace=metadata.get("namespace"),
                    source=source,
                )
            except ModelValidationError as exc:
                problems.extend(exc.problems)
            else:
                if not problems:
                    return model
        raise ModelValidationError(source, problems)

    def vllm_args(self, *, include_model: bool = True) -> list[str]:
        """The vLLM command-line flags, one list element per argv word (never a shell string).

        `include_model=False` leaves out `--model` for templates that pass it positionally
        (`vllm serve {model} {args}`).
        """
        args: list[str] = []
        for rule in FIELDS:
            value = getattr(self, rule.attr)
            if rule.flag is None or (rule.flag == "--model" and not include_model):
                continue
            if value is None or value == "":
                continue
            if rule.kind == "bool":
                if value:
                    args.append(rule.flag)
                elif rule.negative_flag:
                    args.append(rule.negative_flag)
            else:
                args.extend((rule.flag, _render(value)))
        args.extend(self.extra_args)
        return args

    def configmap_data(self) -> dict[str, str]:
        """The ConfigMap keys, for Deployments that build vLLM's command from them.

        Values are vLLM's (`internlm2` is written `internlm`); an unset field is `""`, which such
        a command must read as "leave the flag out".
        """
        data: dict[str, str] = {}
        for rule in FIELDS:
            if rule.configmap_key is None:
                continue
            value = getattr(self, rule.attr)
            data[rule.configmap_key] = "" if value is None else _render(value)
        return data

    def describe(self) -> dict[str, Any]:
        """The fields that are set, in manifest (camelCase) keys, for API answers.

        Values are the effective ones: vLLM's parser name, and `enableAutoToolChoice` turned on
        by a tool-call parser.
        """
        out: dict[str, Any] = {
            rule.key: getattr(self, rule.attr)
            for rule in FIELDS
            if getattr(self, rule.attr) is not None
        }
        if self.extra_args:
            out["extraArgs"] = list(self.extra_args)
        return out


def _failed(problems: list[str]) -> set[str]:
    """The spec keys that already have a problem."""
    return {p.split(":", 1)[0].removeprefix("spec.") for p in problems}


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check(rule: FieldRule, raw: Any) -> tuple[Any, str | None]:
    """Type-check and range-check one value; return (value, problem)."""
    if rule.kind == "str":
        if not isinstance(raw, str):
            return None, "must be a string"
        if rule.required and not raw.strip():
            return None, "must not be empty"
        if rule.choices is not None and raw not in rule.choices:
            allowed = ", ".join(repr(c) for c in rule.choices)
            return None, f"must be one of {allowed}"
        return rule.renames.get(raw, raw), None
    if rule.kind == "bool":
        if not isinstance(raw, bool):
            return None, "must be a boolean"
        return raw, None
    value: int | float
    if rule.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            return None, "must be an integer"
        value = raw
    else:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            return None, "must be a number"
        value = float(raw)
    if rule.minimum is not None and value < rule.minimum:
        return None, f"must be >= {_render(rule.minimum)}"
    if rule.maximum is not None and value > rule.maximum:
        return None, f"must be <= {_render(rule.maximum)}"
    return value, None


def load_manifests(text: str, *, source: str = "<string>") -> list[VLLMModel]:
    """Parse one or many YAML documents; documents of other kinds are skipped.

    Every VLLMModel document is validated; the first invalid one raises with all its problems.
    """
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ModelValidationError(source, [f"not valid YAML: {exc}"]) from None
    return models_from_documents(documents, source=source)


def models_from_documents(documents: Iterable[Any], *, source: str) -> list[VLLMModel]:
    models = []
    for index, doc in enumerate(documents):
        if doc is None:
            continue
        where = f"{source}[{index}]"
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            models.extend(models_from_documents(doc.get("items") or [], source=where))
            continue
        if isinstance(doc, Mapping) and doc.get("kind") not in (None, KIND):
            continue
        models.append(VLLMModel.from_manifest(doc, source=where))
    return models
