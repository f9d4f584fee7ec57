"""The `--command` template: splitting, placeholders, what is appended, and every mistake
refused up front with a message naming it."""

from __future__ import annotations

import pytest

from vllm_chill._model import VLLMModel
from vllm_chill.backends.local._backend import LocalProcessBackend
from vllm_chill.backends.local._command import DEFAULT_COMMAND, CommandTemplate

MODEL = VLLMModel.from_spec(
    {
        "modelName": "Qwen/Qwen3-8B",
        "servedModelName": "qwen3",
        "maxModelLen": 8192,
        "extraArgs": ["--threads", "7"],
    }
)
FLAGS = MODEL.vllm_args(include_model=False)


def test_the_default_runs_vllm_serve_with_the_model_positional() -> None:
    argv = CommandTemplate.parse(DEFAULT_COMMAND).render(MODEL, 8123)
    assert argv == [
        "vllm",
        "serve",
        "Qwen/Qwen3-8B",
        *FLAGS,
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]
    assert "--served-model-name" in FLAGS and "--max-model-len" in FLAGS and "--model" not in FLAGS


def test_without_args_and_port_both_are_appended() -> None:
    argv = CommandTemplate.parse("vllm serve {model}").render(MODEL, 9000)
    assert argv == ["vllm", "serve", "Qwen/Qwen3-8B", *FLAGS, "--port", "9000"]


def test_without_model_the_flags_name_it() -> None:
    argv = CommandTemplate.parse("/opt/vllm/bin/vllm serve --port={port}").render(MODEL, 1)
    assert argv == ["/opt/vllm/bin/vllm", "serve", "--port=1", *MODEL.vllm_args()]
    assert argv[argv.index("--model") + 1] == "Qwen/Qwen3-8B"


def test_extra_args_passes_only_the_models_extra_args() -> None:
    template = CommandTemplate.parse(
        "llama-server -m '/models/{model}.gguf' --alias {served_model_name} {extra_args}"
    )
    argv = template.render(MODEL, 5555)
    assert argv == [
        "llama-server",
        "-m",
        "/models/Qwen/Qwen3-8B.gguf",
        "--alias",
        "qwen3",
        "--threads",
        "7",
        "--port",
        "5555",
    ]


def test_quoting_and_literal_braces() -> None:
    template = CommandTemplate.parse(
        """env "A=b c" prog --json '{{"port": {port}}}' --name="x {served_model_name}" {args}"""
    )
    argv = template.render(MODEL, 42)
    assert argv == [
        "env",
        "A=b c",
        "prog",
        "--json",
        '{"port": 42}',
        "--name=x qwen3",
        *MODEL.vllm_args(),
    ]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("vllm serve {modle} {args}", r"unknown placeholder \{modle\}"),
        ("vllm serve {} {args}", r"unknown placeholder \{\}"),
        ("vllm serve {model.name}", r"unknown placeholder \{model.name\}"),
        ("vllm serve {model} --x={args}", r"\{args\} must be a word of its own"),
        ("prog {extra_args}x", r"\{extra_args\} must be a word of its own"),
        ("vllm serve {port!r}", r"\{port\} takes no format spec"),
        ("vllm serve {port:>5}", r"\{port\} takes no format spec"),
        ("vllm serve }", r"Single '\}'"),
        ("vllm serve {model", r"expected '\}'"),
        ("vllm serve 'unclosed", r"No closing quotation"),
        ("   ", r"it is empty"),
        ("{args} --port {port}", r"must start with a program"),
    ],
)
def test_mistakes_are_refused_with_a_message_naming_them(command: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as failure:
        CommandTemplate.parse(command)
    assert "\n" not in str(failure.value)  # one line, for the CLI's exit-2 message
    with pytest.raises(ValueError, match=message):
        LocalProcessBackend(command)
