"""`python -m vllm_chill.backends.sim`: a simulated `vllm serve` process.

It takes vLLM's `serve` command line so that it can stand in for vLLM in the local backend's
command template, e.g.
`python -m vllm_chill.backends.sim {model} {args} --host 127.0.0.1 --port {port}`:
the model (positional, or `--model`), `--served-model-name` (the first name is served),
`--host`, `--port`, `--api-key` and `--max-model-len` are honoured, and every other vLLM flag
is accepted and ignored. `--model` wins over a positional model: this parser cannot know which
vLLM flags take values, so in `--model m --dtype auto` the word `auto` looks positional. For the
same reason, a positional model must come before any ignored flag.

Its own flags: `--sim-load-time` (seconds, or `250ms`/`3s`/`1m`), `--sim-tokens-per-second`
(0: as fast as possible), and `--sim-fail-load` (never become healthy; exit 1 once the load time
is over, as a vLLM that crashes while loading weights does — for testing load failures).

Exit status: 0 after SIGTERM or SIGINT, 1 when it cannot bind or on a simulated load failure,
2 on a bad command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import anyio

from vllm_chill.backends.sim._server import SimModelServer
from vllm_chill.settings import parse_duration
from vllm_chill.settings._values import non_negative_number as _non_negative


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_chill.backends.sim",
        description="A simulated vLLM OpenAI server (accepts and ignores other vLLM flags).",
        allow_abbrev=False,  # a vLLM flag must never be mistaken for an abbreviation of ours
    )
    parser.add_argument("model_tag", nargs="?", help="the model (as in `vllm serve MODEL`)")
    parser.add_argument("--model", dest="model_flag")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--sim-load-time", type=parse_duration, default=3.0)
    parser.add_argument("--sim-tokens-per-second", type=_non_negative, default=50.0)
    parser.add_argument("--sim-fail-load", action="store_true")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--sim-wake-time", type=parse_duration, default=0.5)
    return parser


def _say(level: str, message: str) -> None:
    """A line in vLLM's log format, so that log scrapers and humans recognise it."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"{level} {stamp} [sim] {message}", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace, model: str, served: str) -> int:
    server = SimModelServer(
        served,
        load_time=args.sim_load_time,
        tokens_per_second=args.sim_tokens_per_second,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
        root=model,
        fail_load=args.sim_fail_load,
        # As vLLM: the sleep routes exist only in its development mode.
        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1",
        sleep_mode=args.enable_sleep_mode,
        wake_time=args.sim_wake_time,
    )
    exit_code = 0
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            url = await server.start()
        except OSError as exc:
            _say("ERROR", f"cannot listen on {args.host}:{args.port}: {exc}")
            return 1
        _say(
            "INFO",
            f"vLLM API server (vllm-chill simulator) for model {model!r} served as {served!r} "
            f"on {url}; loading for {args.sim_load_time:g}s",
        )
        try:
            async with anyio.create_task_group() as tg:

                async def until_signal() -> None:
                    async for signum in signals:
                        _say("INFO", f"received {signal.Signals(signum).name}, shutting down")
                        break
                    tg.cancel_scope.cancel()

                tg.start_soon(until_signal)
                if await server.wait_ready():
                    _say("INFO", "Application startup complete.")
                    await anyio.sleep_forever()
                _say(
                    "ERROR", "EngineCore failed to start: simulated load failure (--sim-fail-load)"
                )
                exit_code = 1
                tg.cancel_scope.cancel()
        finally:
            await server.stop()
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args, _ignored_vllm_flags = _parser().parse_known_args(argv)
    model = args.model_flag or args.model_tag
    if not model:
        _parser().error("a model is required (positional MODEL or --model)")
    served = args.served_model_name[0] if args.served_model_name else model
    logging.basicConfig(
        level=logging.WARNING,
        format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )
    use_uvloop = importlib.util.find_spec("uvloop") is not None
    result: int = anyio.run(
        _serve, args, model, served, backend="asyncio", backend_options={"use_uvloop": use_uvloop}
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
