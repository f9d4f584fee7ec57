"""VLLMModel: validation, the argv it renders (unset renders nothing), its ConfigMap keys."""

from __future__ import annotations

import pytest

from vllm_chill._model import (
    API_VERSION,
    FIELDS,
    KIND,
    MANAGED_FLAGS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    VLLM_REASONING_PARSERS,
    VLLM_TOOL_CALL_PARSERS,
    FieldRule,
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


def test_unset_fields_are_none() -> None:
    model = VLLMModel.from_spec(MINIMAL)
    assert model.name == "served"  # no metadata.name: the served name
    assert model.model_name == "org/model"
    assert model.served_model_name == "served"
    for rule in FIELDS:
        if not rule.required:
            assert getattr(model, rule.attr) is None, rule.key
    assert model.extra_args == ()


def test_minimal_spec_renders_only_the_model_and_its_name() -> None:
    """Unset means vLLM's own default: no flag, no value of ours in its place."""
    assert VLLMModel.from_spec(MINIMAL).vllm_args() == [
        "--model",
        "org/model",
        "--served-model-name",
        "served",
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
            "enableSleepMode": True,
            "extraArgs": ["--max-logprobs", "5"],
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
        "--enable-sleep-mode",
        "--max-logprobs",
        "5",
    ]
    without_model = model.vllm_args(include_model=False)
    assert "--model" not in without_model
    assert without_model == model.vllm_args()[2:]


def test_false_turns_off_what_vllm_turns_on_by_default() -> None:
    """Prefix caching and chunked prefill are on in vLLM unless `--no-...` says otherwise."""
    args = VLLMModel.from_spec(
        {**MINIMAL, "enableChunkedPrefill": False, "enablePrefixCaching": False}
    ).vllm_args()
    assert args[4:] == ["--no-enable-chunked-prefill", "--no-enable-prefix-caching"]


def test_true_renders_the_positive_flag() -> None:
    args = VLLMModel.from_spec(
        {**MINIMAL, "enableChunkedPrefill": True, "enablePrefixCaching": True}
    ).vllm_args()
    assert args[4:] == ["--enable-chunked-prefill", "--enable-prefix-caching"]


def test_false_renders_nothing_for_flags_that_are_off_by_default() -> None:
    args = VLLMModel.from_spec(
        {
            **MINIMAL,
            "disableCustomAllReduce": False,
            "enableAutoToolChoice": False,
            "enableSleepMode": False,
        }
    ).vllm_args()
    assert args == VLLMModel.from_spec(MINIMAL).vllm_args()
    # A boolean flag never carries a value word.
    assert "false" not in args
    assert "true" not in args


@pytest.mark.parametrize("rule", [r for r in FIELDS if not r.required], ids=lambda r: str(r.key))
def test_an_unset_field_renders_no_flag(rule: FieldRule) -> None:
    args = VLLMModel.from_spec(MINIMAL).vllm_args()
    assert rule.flag not in args
    assert rule.negative_flag is None or rule.negative_flag not in args


def test_the_parsers_are_those_vllm_registers() -> None:
    # Names people run today (vLLM 0.32's registries), and the ones this resource always took.
    for name in ("hermes", "mistral", "llama3_json", "qwen3_coder", "granite", "internlm2"):
        assert name in TOOL_CALL_PARSERS
    for name in ("qwen3_xml", "openai", "deepseek_v31", "kimi_k2", "glm45", "llama4_pythonic"):
        assert name in VLLM_TOOL_CALL_PARSERS
    for name in ("deepseek_r1", "qwen3", "openai_gptoss", "deepseek_v3", "glm45", "granite"):
        assert name in VLLM_REASONING_PARSERS
    assert "internlm2" not in VLLM_TOOL_CALL_PARSERS  # vLLM calls it internlm
    assert TOOL_CALL_PARSERS[0] == REASONING_PARSERS[0] == ""
    for names in (TOOL_CALL_PARSERS, REASONING_PARSERS):
        assert len(set(names)) == len(names)


@pytest.mark.parametrize("parser", VLLM_TOOL_CALL_PARSERS)
def test_every_vllm_tool_call_parser_renders_as_itself(parser: str) -> None:
    model = VLLMModel.from_spec({**MINIMAL, "toolCallParser": parser})
    assert model.vllm_args()[4:6] == ["--tool-call-parser", parser]


@pytest.mark.parametrize("parser", VLLM_REASONING_PARSERS)
def test_every_vllm_reasoning_parser_renders_as_itself(parser: str) -> None:
    model = VLLMModel.from_spec({**MINIMAL, "reasoningParser": parser})
    assert model.vllm_args()[4:] == ["--reasoning-parser", parser]


def test_internlm2_is_accepted_and_rendered_as_vllms_internlm() -> None:
    model = VLLMModel.from_spec({**MINIMAL, "toolCallParser": "internlm2"})
    assert model.vllm_args()[4:] == ["--tool-call-parser", "internlm", "--enable-auto-tool-choice"]
    assert model.configmap_data()["TOOL_CALL_PARSER"] == "internlm"
    assert model == VLLMModel.from_spec({**MINIMAL, "toolCallParser": "internlm"})


@pytest.mark.parametrize("name", ["internlm3", "Hermes", "llama3-json", "qwen3-coder", "nope"])
def test_unknown_parsers_are_still_rejected(name: str) -> None:
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_spec({**MINIMAL, "toolCallParser": name, "reasoningParser": name})
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "spec.toolCallParser",
        "spec.reasoningParser",
    ]


def test_auto_tool_choice_without_a_parser_is_rejected() -> None:
    """vLLM exits at start: `--enable-auto-tool-choice requires --tool-call-parser`."""
    for spec in ({}, {"toolCallParser": ""}):
        with pytest.raises(ModelValidationError) as caught:
            VLLMModel.from_spec({**MINIMAL, **spec, "enableAutoToolChoice": True})
        assert caught.value.problems == [
            "spec.enableAutoToolChoice: requires a toolCallParser "
            "(vLLM refuses to start without one)"
        ]


def test_a_bad_parser_is_the_one_problem_named_with_auto_tool_choice() -> None:
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_spec({**MINIMAL, "toolCallParser": "nope", "enableAutoToolChoice": True})
    assert [p.split(":")[0] for p in caught.value.problems] == ["spec.toolCallParser"]


def test_a_parser_turns_auto_tool_choice_on_unless_it_is_false() -> None:
    """vLLM loads a tool-call parser and never uses it without --enable-auto-tool-choice."""
    implied = VLLMModel.from_spec({**MINIMAL, "toolCallParser": "hermes"})
    assert implied.vllm_args()[4:] == ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    assert implied.enable_auto_tool_choice is True
    assert implied.describe()["enableAutoToolChoice"] is True
    assert implied.configmap_data()["ENABLE_AUTO_TOOL_CHOICE"] == "true"
    explicit = {**MINIMAL, "toolCallParser": "hermes", "enableAutoToolChoice": True}
    assert implied == VLLMModel.from_spec(explicit)
    off = VLLMModel.from_spec(
        {**MINIMAL, "toolCallParser": "hermes", "enableAutoToolChoice": False}
    )
    assert off.vllm_args()[4:] == ["--tool-call-parser", "hermes"]
    assert off.configmap_data()["ENABLE_AUTO_TOOL_CHOICE"] == "false"
    # No parser (or the empty one): nothing implied.
    for spec in (MINIMAL, {**MINIMAL, "toolCallParser": ""}):
        assert VLLMModel.from_spec(spec).enable_auto_tool_choice is None


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
            "enableSleepMode": True,
        }
    )
    everything_off = VLLMModel.from_spec(
        {**MINIMAL, "enablePrefixCaching": False, "enableChunkedPrefill": False}
    )
    for model in (everything_on, everything_off):
        flags = {a for a in model.vllm_args() if a.startswith("--")}
        assert flags <= MANAGED_FLAGS


def test_configmap_data_has_every_key_and_unset_is_empty() -> None:
    data = VLLMModel.from_spec(
        {**MINIMAL, "toolCallParser": "hermes", "maxModelLen": 8192, "enablePrefixCaching": False}
    ).configmap_data()
    assert data == {
        "MODEL_NAME": "org/model",
        "SERVED_MODEL_NAME": "served",
        "TOOL_CALL_PARSER": "hermes",
        "REASONING_PARSER": "",
        "TENSOR_PARALLEL_SIZE": "",
        "MAX_MODEL_LEN": "8192",
        "GPU_MEMORY_UTILIZATION": "",
        "ENABLE_CHUNKED_PREFILL": "",
        "MAX_NUM_BATCHED_TOKENS": "",
        "MAX_NUM_SEQS": "",
        "DTYPE": "",
        "DISABLE_CUSTOM_ALL_REDUCE": "",
        "ENABLE_PREFIX_CACHING": "false",
        "CPU_OFFLOAD_GB": "",
        "ENABLE_AUTO_TOOL_CHOICE": "true",  # turned on by the parser
    }
    assert all(isinstance(v, str) for v in data.values())


def test_configmap_data_writes_set_values_as_vllm_reads_them() -> None:
    data = VLLMModel.from_spec(
        {
            **MINIMAL,
            "tensorParallelSize": 2,
            "gpuMemoryUtilization": 0.85,
            "enableChunkedPrefill": True,
            "dtype": "bfloat16",
            "disableCustomAllReduce": False,
            "cpuOffloadGB": 0,
        }
    ).configmap_data()
    assert (data["TENSOR_PARALLEL_SIZE"], data["GPU_MEMORY_UTILIZATION"]) == ("2", "0.85")
    assert (data["ENABLE_CHUNKED_PREFILL"], data["DISABLE_CUSTOM_ALL_REDUCE"]) == ("true", "false")
    assert (data["DTYPE"], data["CPU_OFFLOAD_GB"]) == ("bfloat16", "0")


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
        ("extraArgs", ["--max-logprobs", 5]),
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
    assert model.describe() == {"modelName": "org/model", "servedModelName": "served"}


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
    b = VLLMModel.from_spec({**MINIMAL})
    assert a == b
    assert hash(a) == hash(b)
    # Unset and vLLM's default spelled out are different specs (one renders `--dtype auto`).
    assert a != VLLMModel.from_spec({**MINIMAL, "dtype": "auto"})
    assert a != VLLMModel.from_spec({**MINIMAL, "dtype": "half"})
    with pytest.raises(AttributeError):
        a.dtype = "half"  # type: ignore[misc]
