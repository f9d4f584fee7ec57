"""Args rewriting: the model's flags replace the managed ones; the operator's stay put."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_chill._model import MANAGED_FLAGS, VLLMModel
from vllm_chill.backends.kubernetes._args import (
    MANAGED,
    canonical_flag,
    has_managed_args,
    invocation,
    model_hash,
    model_name_from_args,
    rewrite_args,
    served_name_from_args,
    spec_from_args,
)


def model(served: str = "qwen", **spec: object) -> VLLMModel:
    return VLLMModel.from_spec({"modelName": f"org/{served}", "servedModelName": served, **spec})


QWEN = model(
    "qwen3-coder-30b-fp8",
    maxModelLen=32768,
    toolCallParser="qwen3_coder",
    enableAutoToolChoice=True,
)


def test_managed_flags_are_replaced_and_the_operators_flags_stay_in_place() -> None:
    current = [
        "--model", "old/model", "--served-model-name", "old",
        "--port", "8000",
        "--max-model-len", "4096", "--enable-chunked-prefill",
        "--api-key", "$(KEY)", "--host", "0.0.0.0",
    ]  # fmt: skip
    assert rewrite_args(current, QWEN) == [
        *QWEN.vllm_args(),
        "--port", "8000", "--api-key", "$(KEY)", "--host", "0.0.0.0",
    ]  # fmt: skip


def test_equals_forms_and_several_served_names_leave_no_duplicate() -> None:
    current = [
        "--port=8000",
        "--model=old/model",
        "--served-model-name", "old", "alias",
        "--gpu-memory-utilization=0.5",
        "--no-enable-prefix-caching",
        "--enable-chunked-prefill", "true",
        "--download-dir=/models",
    ]  # fmt: skip
    assert rewrite_args(current, QWEN) == [
        "--port=8000",
        *QWEN.vllm_args(),
        "--download-dir=/models",
    ]


def test_model_flags_are_appended_when_the_args_have_none() -> None:
    assert rewrite_args(["--port", "8000"], QWEN) == ["--port", "8000", *QWEN.vllm_args()]


def test_a_positional_model_stays_positional() -> None:
    result = rewrite_args(["old/model", "--port", "8000", "--dtype", "half"], QWEN)
    assert result == [QWEN.model_name, *QWEN.vllm_args(include_model=False), "--port", "8000"]
    assert "--model" not in result


def test_the_previous_models_extra_args_do_not_leak_into_the_next() -> None:
    first = model("a", extraArgs=["--trust-remote-code", "--kv-cache-dtype", "fp8"])
    args = rewrite_args(["--port", "8000"], first)
    second = model("b")
    assert rewrite_args(args, second, previous_extra=first.extra_args) == [
        "--port", "8000", *second.vllm_args()
    ]  # fmt: skip


def test_an_extra_arg_replaces_the_operators_flag_of_the_same_name() -> None:
    m = model("a", extraArgs=["--max-log-len=100", "--trust-remote-code"])
    result = rewrite_args(["--max-log-len", "10", "--trust-remote-code", "--port", "8000"], m)
    assert result == ["--port", "8000", *m.vllm_args()]


def test_rewriting_twice_changes_nothing() -> None:
    once = rewrite_args(["--port", "8000", "--model", "x"], QWEN)
    assert rewrite_args(once, QWEN, previous_extra=QWEN.extra_args) == once


# -- every spelling vLLM accepts for a managed flag ---------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ["-tp", "4"],
        ["-tp=4"],
        ["--tensor_parallel_size", "4"],
        ["--max_model_len=2048"],
        ["--max-model-len", "-1"],
        ["--device-memory-utilization", "0.5"],
        ["--device_memory_utilization=0.5"],
        ["--no-enable-prefix-caching"],
        ["--no_enable_prefix_caching"],
        ["--enable_chunked_prefill"],
        ["--no-enable-chunked-prefill"],
        ["--no-disable-custom-all-reduce"],
        ["--no-enable-auto-tool-choice"],
        ["--served_model_name", "old", "alias"],
        ["--tool_call_parser=hermes"],
    ],
)
def test_every_spelling_of_a_managed_flag_is_replaced(spelling: list[str]) -> None:
    """vLLM keeps the last value of a flag: one that survived the rewrite after the model's
    flags would override them."""
    result = rewrite_args(["--port", "8000", *spelling, "--host", "0.0.0.0"], QWEN)
    assert result == ["--port", "8000", *QWEN.vllm_args(), "--host", "0.0.0.0"]


def test_canonical_flags() -> None:
    assert canonical_flag("--max_model_len=1") == "--max-model-len"
    assert canonical_flag("-tp") == "--tensor-parallel-size"
    assert canonical_flag("--device-memory-utilization") == "--gpu-memory-utilization"
    assert (
        canonical_flag("--limit_mm_per_prompt.image_count") == "--limit-mm-per-prompt.image_count"
    )
    assert canonical_flag("-1") is None and canonical_flag("org/model") is None
    assert MANAGED_FLAGS <= MANAGED
    assert {"--no-enable-chunked-prefill", "--no-enable-prefix-caching"} <= MANAGED


# -- entrypoints ---------------------------------------------------------------------------------


def test_vllm_serve_with_the_subcommand_in_the_args_keeps_serve() -> None:
    current = ["serve", "old/model", "--served-model-name", "old", "--port", "8000"]
    assert rewrite_args(current, QWEN, command=["vllm"]) == [
        "serve", QWEN.model_name, *QWEN.vllm_args(include_model=False), "--port", "8000",
    ]  # fmt: skip


def test_vllm_serve_in_the_command_gets_the_model_positionally() -> None:
    current = ["old/model", "--port", "8000"]
    assert rewrite_args(current, QWEN, command=["/usr/local/bin/vllm", "serve"]) == [
        QWEN.model_name, *QWEN.vllm_args(include_model=False), "--port", "8000",
    ]  # fmt: skip


def test_vllm_serve_with_the_deprecated_model_flag_gets_the_positional_model() -> None:
    current = ["serve", "--port", "8000", "--model", "old/model", "--dtype", "half"]
    assert rewrite_args(current, QWEN, command=["vllm"]) == [
        "serve", QWEN.model_name, *QWEN.vllm_args(include_model=False), "--port", "8000",
    ]  # fmt: skip
    # both: vLLM's parser would take the positional; neither survives
    both = ["serve", "old/pos", "--model", "old/flag"]
    assert rewrite_args(both, QWEN, command=["vllm"]) == [
        "serve", QWEN.model_name, *QWEN.vllm_args(include_model=False),
    ]  # fmt: skip


def test_the_api_server_module_takes_model_as_a_flag() -> None:
    command = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    result = rewrite_args(["--port", "8000", "--model", "old"], QWEN, command=command)
    assert result == ["--port", "8000", *QWEN.vllm_args()]
    # the image's entrypoint (no command): flags stay flags
    assert rewrite_args(["--model", "old", "--port", "8000"], QWEN) == [
        *QWEN.vllm_args(), "--port", "8000",
    ]  # fmt: skip


def test_a_wrapper_before_vllm_serve_is_kept() -> None:
    current = ["vllm", "serve", "old/model", "--port", "8000"]
    assert rewrite_args(current, QWEN, command=["tini", "--"]) == [
        "vllm", "serve", QWEN.model_name, *QWEN.vllm_args(include_model=False), "--port", "8000",
    ]  # fmt: skip
    assert invocation(["tini", "--"], current).head == ("vllm", "serve")


@pytest.mark.parametrize(
    ("command", "args", "model", "served"),
    [
        (["vllm"], ["serve", "org/pos", "--model", "org/flag"], "org/pos", "org/pos"),
        (["vllm", "serve"], ["org/pos", "--served_model_name", "x", "y"], "org/pos", "x"),
        (["vllm"], ["serve", "--model=org/flag"], "org/flag", "org/flag"),
        ([], ["--model", "org/a", "--model", "org/b"], "org/b", "org/b"),  # the last one wins
        (["python3", "-m", "vllm.entrypoints.openai.api_server"], ["--model", "m"], "m", "m"),
    ],
)
def test_the_model_is_read_as_vllm_reads_it(
    command: list[str], args: list[str], model: str, served: str
) -> None:
    assert model_name_from_args(args, command) == model
    assert served_name_from_args(args, command) == served
    assert has_managed_args(args, command)


def test_a_spec_is_read_from_any_spelling() -> None:
    args = ["serve", "org/x", "-tp", "2", "--max_model_len=2048", "--no-enable-prefix-caching"]
    spec = spec_from_args(args, ["vllm"])
    assert spec == {
        "modelName": "org/x",
        "servedModelName": "org/x",
        "tensorParallelSize": 2,
        "maxModelLen": 2048,
        "enablePrefixCaching": False,
    }


unmanaged_flag = st.sampled_from(["--port", "--host", "--api-key", "--download-dir", "--tokenizer"])
unmanaged_value = st.from_regex(r"[a-z0-9./$()]{1,8}", fullmatch=True)
managed_flag = st.sampled_from(sorted({*MANAGED, "-tp", "--device-memory-utilization"}))


@given(
    unmanaged=st.lists(st.tuples(unmanaged_flag, unmanaged_value, st.booleans()), max_size=5),
    managed=st.lists(st.tuples(managed_flag, unmanaged_value, st.booleans()), max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_any_mix_keeps_unmanaged_args_in_order_and_renders_the_model_once(
    unmanaged: list[tuple[str, str, bool]],
    managed: list[tuple[str, str, bool]],
    order: object,
) -> None:
    def words(flag: str, value: str, equals: bool) -> list[str]:
        return [f"{flag}={value}"] if equals else [flag, value]

    groups = [("u", words(*item)) for item in unmanaged] + [
        (
            "m",
            [flag] if flag.startswith(("--enable", "--disable", "--no-")) else words(flag, v, eq),
        )
        for flag, v, eq in managed
    ]
    order.shuffle(groups)  # type: ignore[attr-defined]
    current = [word for _, group in groups for word in group]
    result = rewrite_args(current, QWEN)
    kept = [word for kind, group in groups if kind == "u" for word in group]
    rendered = QWEN.vllm_args()
    start = next((i for i in range(len(result)) if result[i : i + len(rendered)] == rendered), -1)
    assert start >= 0
    assert result[:start] + result[start + len(rendered) :] == kept


@pytest.mark.parametrize(
    ("args", "served"),
    [
        (["--model", "org/x", "--served-model-name", "x", "alias"], "x"),
        (["--served-model-name=y", "--model=org/y"], "y"),
        (["--model", "org/z", "--port", "8000"], "org/z"),
        (["org/p", "--port", "8000"], "org/p"),
        (["--port", "8000"], None),
    ],
)
def test_served_name_is_read_from_the_args(args: list[str], served: str | None) -> None:
    assert served_name_from_args(args) == served


def test_a_spec_is_read_back_from_rendered_args() -> None:
    spec = spec_from_args(QWEN.vllm_args())
    assert VLLMModel.from_spec(spec, name=QWEN.name) == QWEN


def test_the_hash_changes_with_what_reaches_the_pod() -> None:
    same = model(
        "qwen3-coder-30b-fp8",
        maxModelLen=32768,
        toolCallParser="qwen3_coder",
        enableAutoToolChoice=True,
    )
    assert model_hash(QWEN) == model_hash(same)
    assert model_hash(QWEN) != model_hash(model("other"))
    assert model_hash(QWEN) != model_hash(QWEN, QWEN.configmap_data())
