"""The `vllm-chill` command: `serve`, `check-models`, `sim-server`, `--version`.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT included), 1 for invalid manifests in
`check-models` or a failed shutdown, 2 for a bad flag, environment variable or
manifest given to `serve` (one line on stderr: `vllm-chill serve: error: argument --flag: ...`),
3 when the server fails to start (the port is taken, the Kubernetes API refuses the backend).
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import uvicorn

from vllm_chill import __version__
from vllm_chill._build import build_middleware
from vllm_chill._model import ModelValidationError
from vllm_chill._placement import GpuPool, fits_ever
from vllm_chill.middleware import ModelSwitchMiddleware
from vllm_chill.observability._logs import configure_logging, get_logger
from vllm_chill.registries._files import read_models
from vllm_chill.scheduler._switcher import demand_of
from vllm_chill.settings import (
    Parser,
    Settings,
    SettingsError,
    add_serve_arguments,
    one_line,
    settings_from_namespace,
)
from vllm_chill.settings._values import gpu_list

log = get_logger(__name__)

EXIT_INVALID = 1
EXIT_USAGE = 2
#: uvicorn's own status for an application whose lifespan startup failed.
EXIT_STARTUP_FAILED = 3
#: The application's shutdown raised (its log says why); everything was stopped regardless.
EXIT_SHUTDOWN_FAILED = 1


def _parser() -> Parser:
    parser = Parser(
        prog="vllm-chill",
        description="One OpenAI-compatible endpoint in front of many vLLM models: loads the one "
        "a request asks for, scales to zero when idle.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"vllm-chill {__version__}")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Every flag has an environment twin VLLM_CHILL_<FLAG> "
        "(e.g. --idle-timeout: VLLM_CHILL_IDLE_TIMEOUT); the flag wins. Durations: 250ms, 30s, "
        "5m, 1h30m or seconds.",
        allow_abbrev=False,
    )
    add_serve_arguments(serve)
    check = commands.add_parser(
        "check-models",
        help="validate VLLMModel manifests and print each model's vLLM command line",
        description="Validate VLLMModel YAML files or directories; exit 1 if any is invalid.",
    )
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.add_argument(
        "--gpus",
        type=gpu_list,
        metavar="LIST",
        help="also check that each model fits these GPUs (e.g. 0,1): its tensorParallelSize "
        "GPUs with its gpuMemoryUtilization free on each",
    )
    commands.add_parser(
        "sim-server",
        help="run one simulated vLLM server (python -m vllm_chill.backends.sim; see its --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "sim-server":  # its flags are vLLM's, parsed by the simulator
        from vllm_chill.backends.sim.__main__ import main as sim_main  # noqa: PLC0415 - only for this command

        return sim_main(args[1:])
    try:
        namespace, unknown = _parser().parse_known_args(args)
        if unknown:  # named by the subcommand's prog, not the top-level one argparse would use
            raise SettingsError(
                f"unrecognized arguments: {' '.join(unknown)}",
                prog=f"vllm-chill {namespace.subcommand}",
            )
        if namespace.subcommand == "check-models":
            return check_models(namespace.paths, namespace.gpus or ())
        settings = settings_from_namespace(namespace, os.environ)
    except SettingsError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve(settings)


def check_models(paths: Sequence[str], gpus: Sequence[str] = ()) -> int:
    try:
        models = read_models(paths)
    except ModelValidationError as exc:
        print(f"invalid: {exc.source}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {' '.join(problem.split())}", file=sys.stderr)
        return EXIT_INVALID
    capacity = GpuPool(tuple(gpus)) if gpus else None
    misfits = 0
    for model in models:
        command = ["vllm", "serve", model.model_name, *model.vllm_args(include_model=False)]
        print(f"{model.served_model_name} ({model.name})")
        print(f"  {shlex.join(command)}")
        demand = demand_of(model)
        if capacity is not None and not fits_ever(capacity, demand):
            misfits += 1
            print(f"  does not fit: needs {demand}, GPUs given: {','.join(gpus)}")
    if misfits:
        print(f"{misfits} of {len(models)} model(s) do not fit the GPUs given", file=sys.stderr)
        return EXIT_INVALID
    print(f"{len(models)} model(s) valid")
    return 0


def serve(settings: Settings) -> int:
    """Run the proxy until SIGTERM/SIGINT; the exit status (see the module docstring)."""
    configure_logging(
        settings.logging.level,
        settings.logging.format,
        secrets=settings.secrets(),
        access_log=settings.logging.access_log,
    )
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        if settings.models:  # fail on a bad manifest now, with exit 2, not as a startup failure
            read_models(settings.models)
        app = build_middleware(settings)
    except (ModelValidationError, SettingsError) as exc:
        flag = "" if isinstance(exc, SettingsError) else "argument --models: "
        print(f"vllm-chill serve: error: {flag}{one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    log.info("vllm-chill %s starting: %r", __version__, settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        loop="auto",
        http="auto",
        lifespan="on",
        access_log=settings.logging.access_log,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.server.shutdown_timeout),
    )
    server = _Server(config, app)
    with _signals_end(server):
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits 1 (cannot bind) or 3 (lifespan failed)
            return exc.code if isinstance(exc.code, int) else EXIT_STARTUP_FAILED
    if not server.started:
        return EXIT_STARTUP_FAILED
    lifespan = getattr(server, "lifespan", None)  # uvicorn's LifespanOn records a failure
    if getattr(lifespan, "shutdown_failed", False) or getattr(lifespan, "error_occurred", False):
        return EXIT_SHUTDOWN_FAILED
    return 0


class _Server(uvicorn.Server):
    """uvicorn, ending the status page's event streams as it begins to stop: it waits for
    open responses, and those never end by themselves."""

    def __init__(self, config: uvicorn.Config, app: ModelSwitchMiddleware) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.end_event_streams()
        await super().shutdown(sockets)


@contextmanager
def _signals_end(server: uvicorn.Server) -> Iterator[None]:
    """SIGTERM/SIGINT end the server gracefully, and the process with status 0.

    uvicorn handles them only while it serves; after its graceful shutdown it raises the signal
    again, to the handler that was in place before, which by default kills the process (status
    -15). Ours asks the server to exit: before uvicorn took over (still starting), that stops
    it as soon as it can; after, it is a no-op, and the shutdown we completed counts as success.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
