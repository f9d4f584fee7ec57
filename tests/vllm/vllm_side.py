"""Runs inside vLLM's own venv (never imported by pytest): vLLM's truth about our flags.

    <vllm venv>/bin/python tests/vllm/vllm_side.py facts   # registries and parser, as JSON
    <vllm venv>/bin/python tests/vllm/vllm_side.py check   # cases on stdin, verdicts on stdout

`check` reads `[{"id": ..., "argv": [...], "engine": bool, "dests": [...]}, ...]`, where `argv`
is what follows `vllm` on the command line (`serve MODEL --flag ...`), and answers `{id: {"ok":
bool, "stage": ..., "error": ..., "values": {dest: value}}}` (`values`: what vLLM's parser made
of the `dests` asked about, after its own validation). Each case goes through what
`vllm serve` does before it loads anything:

1. `parse`: the CLI parser of `vllm serve`, built the way `vllm.entrypoints.cli.main` builds it
   (a `FlexibleArgumentParser` with `ServeSubcommand().subparser_init`);
2. `validate`: `ServeSubcommand().validate` (`validate_parsed_serve_args`);
3. `api_server`: `validate_api_server_args`, which checks the tool-call and reasoning parser
   names against vLLM's registries, plus the same check for `--reasoning-parser` directly;
4. `engine` (when asked, and the model is a local directory): `AsyncEngineArgs.from_cli_args`
   and `create_engine_config`, the engine's own consistency checks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import vllm
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.launcher import validate_api_server_args
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager
from vllm.utils.argparse_utils import FlexibleArgumentParser


def serve_parser() -> tuple[argparse.ArgumentParser, Any]:
    top = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = top.add_subparsers(required=False, dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    return top, command


def registries() -> tuple[list[str], list[str]]:
    return (
        sorted(ToolParserManager.list_registered()),
        sorted(ReasoningParserManager.list_registered()),
    )


def facts() -> dict[str, Any]:
    top, _ = serve_parser()
    serve = next(
        parser
        for action in top._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, parser in action.choices.items()
        if name == "serve"
    )
    options: dict[str, Any] = {}
    for action in serve._actions:
        if not action.option_strings:
            continue
        options[action.dest] = {
            "flags": list(action.option_strings),
            "boolean_optional": isinstance(action, argparse.BooleanOptionalAction),
            "takes_value": action.nargs != 0,
            "choices": None if action.choices is None else sorted(map(str, action.choices)),
            "default": repr(action.default),
        }
    tools, reasoning = registries()
    return {
        "vllm": vllm.__version__,
        "tool_call_parsers": tools,
        "reasoning_parsers": reasoning,
        "options": options,
    }


def check(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    top, command = serve_parser()
    _, reasoning_names = registries()
    verdicts: dict[str, dict[str, Any]] = {}
    for case in cases:
        stage = "parse"
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = top.parse_args(case["argv"])
            stage = "validate"
            command.validate(args)
            if getattr(args, "model_tag", None) is not None:  # what ServeSubcommand.cmd does
                args.model = args.model_tag
            stage = "api_server"
            validate_api_server_args(args)
            reasoning = getattr(args, "reasoning_parser", None)
            if reasoning and reasoning not in reasoning_names:
                raise KeyError(f"invalid reasoning parser: {reasoning}")
            if case.get("engine") and Path(args.model).is_dir():
                stage = "engine"
                with contextlib.redirect_stderr(err):
                    AsyncEngineArgs.from_cli_args(args).create_engine_config()
        except SystemExit as exc:  # argparse's error(): the message went to stderr
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            message = lines[-1] if lines else f"exit {exc.code}"
            verdicts[case["id"]] = {"ok": False, "stage": stage, "error": message}
        except Exception as exc:
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
            verdicts[case["id"]] = {"ok": False, "stage": stage, "error": message}
        else:
            verdicts[case["id"]] = {"ok": True, "stage": "done", "error": ""}
        if stage != "parse":  # what vLLM understood, for the flags the case asks about
            verdicts[case["id"]]["values"] = {
                dest: _plain(getattr(args, dest, None)) for dest in case.get("dests", [])
            }
    return verdicts


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "facts":
        result: Any = facts()
    elif command == "check":
        result = check(json.load(sys.stdin))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.flush()
    # vLLM logs to stdout: the answer goes last, on one line of its own, after a marker.
    print("\n@@vllm-side@@" + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
