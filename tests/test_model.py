"""VLLMModel: validation, defaults, the argv it renders, its ConfigMap keys (SPEC §4, §5)."""

from __future__ import annotations

import pytest

from vllm_chill.model import (
    API_VERSION,
    FIELDS,
    KIND,
    MANAGED_FLAGS,
    ModelValidationError,
    VLLMModel,
    load_manifests,
)

MINIMAL = {"modelName": "org/model", "servedModelName": "served"}


def manifest(name: str, **spec: object) -> str:
    lines = [
        f"apiVersion: {API_VERSION}",
        f"kind: {KIND}",
        "metadata:",
        f"  name: {name}",
        "spec:",
        "  modelName: org/" + name,
        "  servedModelName: " + name,
    ]
    lines += [f"  {key}: {value}" for key, value in spec.items()]
    return "\n".join(lines) + "\n"


def test_defaults_are_applied() -> None:
    model = VLLMModel.from_spec(MINIMAL)
    assert model.name == "served"  # no metadata.name: the served name
    assert model.model_name == "org/model"
    assert model.tool_call_parser == ""
    assert model.reasoning_parser == ""
    assert model.tensor_parallel_size == 1
    assert model.max_model_len is None
    assert model.gpu_memory_utilization == 0.9
    assert model.enable_chunked_prefill is False
    assert model.max_num_batched_tokens is None
    assert model.max_num_seqs is None
    assert model.dtype == "auto"
    assert model.disable_custom_all_reduce is False
    assert model.enable_prefix_caching is True
    assert model.cpu_offload_gb == 0
    assert model.enable_auto_tool_choice is False
    assert model.extra_args == ()
    # ... and those are exactly the rules table's defaults.
    for rule in FIELDS:
        if not rule.required:
            assert getattr(model, rule.attr) == rule.default, rule.key


def test_minimal_spec_renders_the_default_flags() -> None:
    assert VLLMModel.from_spec(MINIMAL).vllm_args() == [
        "--model",
        "org/model",
        "--served-model-name",
        "served",
        "--tensor-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.9",
        "--dtype",
        "auto",
        "--enable-prefix-caching",
        "--cpu-offload-gb",
        "0",
    ]


def test_every_field_renders_its_flag_in_order() -> None:
    model = VLLMModel.from_spec(
        {
            "modelName": "Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8",
            "servedModelName": "qwen3-coder-30b-fp8",
            "toolCallParser": "qwen3_coder",
            "reasoningParser": "deepseek_r1",
            "tensorParallelSize": 2,
            "maxModelLen": 65536,
            "gpuMemoryUtilization": 0.92,
            "enableChunkedPrefill": True,
            "maxNumBatchedTokens": 8192,
            "maxNumSeqs": 64,
            "dtype": "bfloat16",
            "disableCustomAllReduce": True,
            "enablePrefixCaching": True,
            "cpuOffloadGB": 4,
            "enableAutoToolChoice": True,
            "extraArgs": ["--seed", "0"],
        }
    )
    assert model.vllm_args() == [
        "--model",
        "Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8",
        "--served-model-name",
        "qwen3-coder-30b-fp8",
        "--tool-call-parser",
        "qwen3_coder",
        "--reasoning-parser",
        "deepseek_r1",
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "65536",
        "--gpu-memory-utilization",
        "0.92",
        "--enable-chunked-prefill",
        "--max-num-batched-tokens",
        "8192",
        "--max-num-seqs",
        "64",
        "--dtype",
        "bfloat16",
        "--disable-custom-all-reduce",
        "--enable-prefix-caching",
        "--cpu-offload-gb",
        "4",
        "--enable-auto-tool-choice",
        "--seed",
        "0",
    ]
    without_model = model.vllm_args(include_model=False)
    assert "--model" not in without_model
    assert without_model == model.vllm_args()[2:]


def test_false_booleans_are_left_out_except_prefix_caching_which_is_negated() -> None:
    args = VLLMModel.from_spec(
        {
            **MINIMAL,
            "enableChunkedPrefill": False,
            "disableCustomAllReduce": False,
            "enableAutoToolChoice": False,
            "enablePrefixCaching": False,
        }
    ).vllm_args()
    assert "--no-enable-prefix-caching" in args
    assert "--enable-prefix-caching" not in args
    for flag in ("--enable-chunked-prefill", "--disable-custom-all-reduce"):
        assert flag not in args
    assert "--enable-auto-tool-choice" not in args
    # A boolean flag never carries a value word.
    assert "false" not in args
    assert "true" not in args


def test_empty_parsers_are_omitted() -> None:
    args = VLLMModel.from_spec({**MINIMAL, "toolCallParser": "", "reasoningParser": ""}).vllm_args()
    assert "--tool-call-parser" not in args
    assert "--reasoning-parser" not in args
    assert "" not in args


def test_shell_metacharacters_stay_single_argv_words() -> None:
    nasty = "{{ messages }}; rm -rf / && echo $HOME `id` | cat > /tmp/x"
    model = VLLMModel.from_spec(
        {
            "modelName": "/models/my model (v2)",
            "servedModelName": "my model; echo pwned",
            "extraArgs": ["--chat-template", nasty, "--override-generation-config", '{"a": 1}'],
        }
    )
    args = model.vllm_args()
    assert args[:4] == [
        "--model",
        "/models/my model (v2)",
        "--served-model-name",
        "my model; echo pwned",
    ]
    assert args[-4:] == ["--chat-template", nasty, "--override-generation-config", '{"a": 1}']


def test_extra_args_come_last_and_as_given() -> None:
    extra = ["--max-logprobs", "5", "--enable-prefix-caching"]
    args = VLLMModel.from_spec({**MINIMAL, "extraArgs": extra}).vllm_args()
    assert args[-3:] == extra


def test_every_rendered_flag_is_managed() -> None:
    """The Kubernetes backend replaces MANAGED_FLAGS in a Deployment; nothing may escape it."""
    everything_on = VLLMModel.from_spec(
        {
            **MINIMAL,
            "toolCallParser": "hermes",
            "reasoningParser": "deepseek_r1",
            "maxModelLen": 4096,
            "enableChunkedPrefill": True,
            "maxNumBatchedTokens": 2048,
            "maxNumSeqs": 8,
            "disableCustomAllReduce": True,
            "enableAutoToolChoice": True,
        }
    )
    everything_off = VLLMModel.from_spec({**MINIMAL, "enablePrefixCaching": False})
    for model in (everything_on, everything_off):
        flags = {a for a in model.vllm_args() if a.startswith("--")}
        assert flags <= MANAGED_FLAGS


def test_configmap_data_has_the_spec_keys() -> None:
    data = VLLMModel.from_spec(
        {**MINIMAL, "toolCallParser": "hermes", "maxModelLen": 8192, "enablePrefixCaching": False}
    ).configmap_data()
    assert data == {
        "MODEL_NAME": "org/model",
        "SERVED_MODEL_NAME": "served",
        "TOOL_CALL_PARSER": "hermes",
        "REASONING_PARSER": "",
        "TENSOR_PARALLEL_SIZE": "1",
        "MAX_MODEL_LEN": "8192",
        "GPU_MEMORY_UTILIZATION": "0.9",
        "ENABLE_CHUNKED_PREFILL": "false",
        "MAX_NUM_BATCHED_TOKENS": "",
        "MAX_NUM_SEQS": "",
        "DTYPE": "auto",
        "DISABLE_CUSTOM_ALL_REDUCE": "false",
        "ENABLE_PREFIX_CACHING": "false",
        "CPU_OFFLOAD_GB": "0",
        "ENABLE_AUTO_TOOL_CHOICE": "false",
    }
    assert all(isinstance(v, str) for v in data.values())


def test_one_error_names_every_invalid_field() -> None:
    spec = {
        "servedModelName": "",
        "toolCallParser": "nope",
        "tensorParallelSize": 0,
        "maxModelLen": 100,
        "gpuMemoryUtilization": 1.5,
        "enableChunkedPrefill": "yes",
        "dtype": "fp8",
        "cpuOffloadGB": -1,
        "extraArgs": "--foo",
        "maxModelLength": 4096,
    }
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_spec(spec, source="models.yaml")
    error = caught.value
    assert error.source == "models.yaml"
    named = " ".join(error.problems)
    for key in (
        "modelName",
        "servedModelName",
        "toolCallParser",
        "tensorParallelSize",
        "maxModelLen",
        "gpuMemoryUtilization",
        "enableChunkedPrefill",
        "dtype",
        "cpuOffloadGB",
        "extraArgs",
        "maxModelLength",
    ):
        assert f"spec.{key}:" in named, key
    assert len(error.problems) == 11
    assert str(error).startswith("models.yaml: invalid VLLMModel: ")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tensorParallelSize", True),  # YAML `true` is not the integer 1
        ("maxModelLen", "4096"),
        ("gpuMemoryUtilization", float("nan")),
        ("gpuMemoryUtilization", float("inf")),
        ("modelName", "   "),
        ("extraArgs", ["--seed", 0]),
    ],
)
def test_values_that_only_look_right_are_rejected(key: str, value: object) -> None:
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_spec({**MINIMAL, key: value})
    assert any(p.startswith(f"spec.{key}:") for p in caught.value.problems)


def test_whole_manifest_keeps_name_and_namespace() -> None:
    model = VLLMModel.from_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "my-model", "namespace": "ai-apps"},
            "spec": MINIMAL,
        }
    )
    assert (model.name, model.namespace, model.served_model_name) == (
        "my-model",
        "ai-apps",
        "served",
    )
    assert model.describe()["servedModelName"] == "served"
    assert model.describe()["dtype"] == "auto"


def test_wrong_api_version_kind_and_missing_spec_are_all_named() -> None:
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_manifest({"apiVersion": "v1", "kind": KIND, "metadata": {}})
    named = " ".join(caught.value.problems)
    assert "apiVersion" in named
    assert "metadata.name" in named
    assert "spec" in named


def test_multi_document_yaml_skips_other_kinds_and_empty_documents() -> None:
    text = (
        manifest("alpha", maxModelLen=4096)
        + "---\n"
        + "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: vllm\nspec: {}\n"
        + "---\n"
        + "---\n"
        + manifest("beta", dtype="bfloat16")
    )
    models = load_manifests(text, source="all.yaml")
    assert [(m.name, m.served_model_name) for m in models] == [("alpha", "alpha"), ("beta", "beta")]
    assert models[0].max_model_len == 4096
    assert models[1].dtype == "bfloat16"


def test_list_kind_is_unpacked() -> None:
    text = f"""
apiVersion: v1
kind: List
items:
  - apiVersion: {API_VERSION}
    kind: {KIND}
    metadata: {{name: one}}
    spec: {{modelName: org/one, servedModelName: one}}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {{name: unrelated}}
  - apiVersion: {API_VERSION}
    kind: {KIND}
    metadata: {{name: two}}
    spec: {{modelName: org/two, servedModelName: two, maxNumSeqs: 4}}
"""
    models = load_manifests(text)
    assert [m.name for m in models] == ["one", "two"]
    assert models[1].max_num_seqs == 4


def test_invalid_document_in_a_stream_names_its_source_and_problem() -> None:
    text = manifest("good") + "---\n" + manifest("bad", maxModelLen=1)
    with pytest.raises(ModelValidationError) as caught:
        load_manifests(text, source="models.yaml")
    assert caught.value.source == "models.yaml[1]"
    assert caught.value.problems == ["spec.maxModelLen: must be >= 512"]


def test_broken_yaml_is_a_validation_error() -> None:
    with pytest.raises(ModelValidationError) as caught:
        load_manifests("spec: [unclosed\n", source="broken.yaml")
    assert caught.value.source == "broken.yaml"
    assert "not valid YAML" in caught.value.problems[0]


def test_models_are_immutable_values() -> None:
    a = VLLMModel.from_spec(MINIMAL)
    b = VLLMModel.from_spec({**MINIMAL, "dtype": "auto"})  # the default, spelled out
    assert a == b
    assert hash(a) == hash(b)
    assert a != VLLMModel.from_spec({**MINIMAL, "dtype": "half"})
    with pytest.raises(AttributeError):
        a.dtype = "half"  # type: ignore[misc]
