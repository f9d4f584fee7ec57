"""`vllm-chill serve` settings: flags, their `VLLM_CHILL_*` environment twins, defaults.

One table (`OPTIONS`) drives the argparse parser, the environment lookup and the help text, so
a flag cannot exist without its twin. Values are checked here, before anything starts, and every
problem is one line that names the flag (and the environment variable, when the value came from
there): an operator reading `kubectl logs` of a crash-looping pod sees what to fix.

Precedence: flag, then environment variable, then default. An empty environment variable counts
as unset (Kubernetes manifests often template empty values). Repeatable flags take
comma-separated environment values; booleans take 1/true/yes/on and 0/false/no/off, and have a
`--no-...` form so that a flag can turn off what the environment turned on.

Kubernetes injects `VLLM_CHILL_PORT=tcp://10.0.0.1:8080` into pods of a namespace that has a
Service named `vllm-chill` (service links); that value is recognised and ignored, as are the other
service-link variables (`VLLM_CHILL_SERVICE_HOST`, `VLLM_CHILL_PORT_8080_TCP`, ...).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NoReturn, cast
from urllib.parse import urlsplit

import pytimeparse2

from vllm_chill._options import DEFAULT_IMAGE_PULL_GRACE, DEFAULT_UNSCHEDULABLE_GRACE, ProxyOptions
from vllm_chill.backends.local._command import DEFAULT_COMMAND, CommandTemplate

ENV_PREFIX = "VLLM_CHILL_"
#: Where Kubernetes mounts the pod's namespace (the default for `--namespace`).
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: vLLM's port in the Service that `--upstream` defaults to.
DEFAULT_UPSTREAM_PORT = 8000
BACKENDS = ("kubernetes", "local", "sim")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

BackendName = Literal["kubernetes", "local", "sim"]
LogFormat = Literal["text", "json"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://")
_SERVICE_LINK_NAME = re.compile(r"^VLLM_CHILL_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_\w+)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}


class SettingsError(ValueError):
    """A bad command line or environment variable. `str()` is the one-line message; `prog` is the
    command it belongs to (for the CLI's `prog: error: message` line, exit status 2)."""

    def __init__(self, message: str, *, prog: str = "vllm-chill serve") -> None:
        super().__init__(one_line(message))
        self.prog = prog


def one_line(message: str) -> str:
    """Collapse a message (a YAML error spans lines) so that it stays one log/terminal line."""
    return " ".join(message.split())


# --- value parsers: each raises ArgumentTypeError with a message that never repeats secrets ---


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `30s`, `5m`, `1h30m` or plain seconds; never negative."""
    value = pytimeparse2.parse(text.strip()) if text.strip() else None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (use e.g. 250ms, 30s, 5m, 1h30m or seconds)"
        )
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    return float(value)


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be greater than 0")
    return value


def parse_size(text: str) -> int:
    """Bytes from `1048576`, `64MiB`, `500KB`, `1G` (K/M/G are binary, KB/MB/GB decimal)."""
    match = _SIZE.match(text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 1048576, 64MiB, 1GB)")
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: must be 1-65535")
    return value


def _listen_port(text: str) -> int:
    if text.strip() == "0":
        return 0  # any free port; uvicorn logs the one it got
    return _port(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be at least 1")
    return value


def _non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be 0 or more")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(choices)})"
            )
        return value

    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def _secret(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")  # and never echo the value
    return text.strip()


def _url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r} (use http://host:port)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r}: bad port") from None
    return text.strip().rstrip("/")


def _command(text: str) -> str:
    try:
        CommandTemplate.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _bool_env(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"invalid boolean {text!r} (use 1/true/yes/on or 0/false/no/off)"
    )


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One flag of `vllm-chill serve` and its environment twin."""

    flag: str
    dest: str
    help: str
    parse: Callable[[str], Any] = _text
    kind: Literal["value", "list", "bool"] = "value"
    metavar: str | None = None
    group: str = "proxy"
    #: Backends that use it; giving it with another backend logs a warning.
    backends: frozenset[str] = frozenset(BACKENDS)

    @property
    def env(self) -> str:
        return env_name(self.flag)


_K8S = frozenset({"kubernetes"})
OPTIONS: tuple[Option, ...] = (
    Option("--host", "host", "address to listen on (default 0.0.0.0)", metavar="ADDR"),
    Option(
        "--port",
        "port",
        "port to listen on; 0 picks a free one (default 8080)",
        _listen_port,
        metavar="PORT",
    ),
    Option(
        "--backend",
        "backend",
        "how models get onto the GPUs: kubernetes, local or sim "
        "(default kubernetes when --deployment is given, else required)",
        _choice(*BACKENDS),
        metavar="NAME",
        group="models",
    ),
    Option(
        "--models",
        "models",
        "VLLMModel YAML file or directory, reloaded on change (repeatable; env: comma-separated). "
        "Required with local and sim; default with kubernetes: the namespace's VLLMModel resources",
        kind="list",
        metavar="PATH",
        group="models",
    ),
    Option(
        "--enable-model-switch",
        "enable_model_switch",
        "kubernetes: switch models on demand; without it only the Deployment's current model is "
        "served (woken from zero, idled to zero) and other names get 404. local and sim always "
        "switch (default off)",
        kind="bool",
        group="models",
    ),
    Option(
        "--namespace",
        "namespace",
        "Kubernetes namespace (default: the pod's own, else 'default')",
        metavar="NS",
        group="kubernetes",
    ),
    Option(
        "--deployment",
        "deployment",
        "the vLLM Deployment (required with the kubernetes backend)",
        metavar="NAME",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--container",
        "container",
        "the vLLM container in the Deployment (default: the only one, else the one that runs vLLM)",
        metavar="NAME",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--unschedulable-grace",
        "unschedulable_grace",
        "how long the vLLM pod may stay unschedulable (no node fits, or its volume is unbound) "
        "before the load fails, unless a cluster autoscaler announced a node for it; "
        "NotTriggerScaleUp fails at once (default 1m)",
        parse_duration,
        metavar="DURATION",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--image-pull-grace",
        "image_pull_grace",
        "how long the kubelet may keep retrying a failed image pull before the load fails; "
        "not found or denied fail at once (default 1m)",
        parse_duration,
        metavar="DURATION",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--configmap",
        "configmap",
        "also write the model's settings into this ConfigMap",
        metavar="NAME",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--kubeconfig",
        "kubeconfig",
        "kubeconfig file (default: in-cluster config when present, else ~/.kube/config)",
        metavar="PATH",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--upstream",
        "upstream",
        "where the vLLM Service answers (default http://<deployment>.<namespace>.svc:8000)",
        _url,
        metavar="URL",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--target-host",
        "target_host",
        "host part of --upstream (instead of it)",
        metavar="HOST",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--target-port",
        "target_port",
        "port part of --upstream (instead of it; default 8000)",
        _port,
        metavar="PORT",
        group="kubernetes",
        backends=_K8S,
    ),
    Option(
        "--model-switch-timeout",
        "model_switch_timeout",
        "longest a load may take before it fails (default 5m)",
        _positive_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--idle-timeout",
        "idle_timeout",
        "unload (scale to zero) after this long with nothing in flight or waiting; 0 never "
        "(default 5m)",
        parse_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--max-wait",
        "max_wait",
        "hold a request for a loading model this long before answering 503; 0 answers at once "
        "(default 0)",
        parse_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--drain-timeout",
        "drain_timeout",
        "how long in-flight requests on the old model may run before a switch cuts them "
        "(default 2m)",
        parse_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--min-residency",
        "min_residency",
        "shortest serving window of a model in use while others wait; the window is 2.5x "
        "the model's load time when longer (default 5s)",
        parse_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--quiet-gap",
        "quiet_gap",
        "a model with nothing in flight and no request for this long gives way at once to "
        "a model that is waiting (default 0.5s)",
        parse_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--upstream-timeout",
        "upstream_timeout",
        "no response headers or body bytes from a model's server for this long: 504 "
        "upstream_timeout, or the response aborted once started (default 10m)",
        parse_duration,
        metavar="DURATION",
        group="switching",
    ),
    Option(
        "--max-waiting",
        "max_waiting",
        "most requests held waiting for loads, all models together; beyond it 503 "
        "too_many_waiting (default 1000)",
        _positive_int,
        metavar="N",
        group="switching",
    ),
    Option(
        "--max-body-size",
        "max_body_size",
        "largest request body accepted, e.g. 64MiB (default 64MiB)",
        parse_size,
        metavar="SIZE",
        group="proxy",
    ),
    Option(
        "--shutdown-timeout",
        "shutdown_timeout",
        "on SIGTERM, how long open requests (streams) may finish before they are cut "
        "(default 25s, inside Kubernetes' 30s grace period)",
        parse_duration,
        metavar="DURATION",
        group="proxy",
    ),
    Option(
        "--api-key",
        "api_keys",
        "clients must send 'Authorization: Bearer <key>' (repeatable; env: comma-separated)",
        _secret,
        kind="list",
        metavar="KEY",
        group="security",
    ),
    Option(
        "--admin-token",
        "admin_token",
        "bearer token required by /proxy/* (default: the --api-key keys)",
        _secret,
        metavar="TOKEN",
        group="security",
    ),
    Option(
        "--upstream-api-key",
        "upstream_api_key",
        "sent to vLLM as 'Authorization: Bearer' (vLLM's --api-key)",
        _secret,
        metavar="KEY",
        group="security",
    ),
    Option(
        "--command",
        "command",
        "local backend: command template with {model} {served_model_name} {args} {port} "
        f"(default '{DEFAULT_COMMAND}')",
        _command,
        metavar="TEMPLATE",
        group="local",
        backends=frozenset({"local"}),
    ),
    Option(
        "--sim-load-time",
        "sim_load_time",
        "sim backend: how long a simulated load takes (default 3s)",
        parse_duration,
        metavar="DURATION",
        group="sim",
        backends=frozenset({"sim"}),
    ),
    Option(
        "--sim-tokens-per-second",
        "sim_tokens_per_second",
        "sim backend: streaming speed; 0 as fast as possible (default 50)",
        _non_negative_number,
        metavar="N",
        group="sim",
        backends=frozenset({"sim"}),
    ),
    Option(
        "--log-level",
        "log_level",
        f"{', '.join(LOG_LEVELS)} (default info)",
        _choice(*LOG_LEVELS),
        metavar="LEVEL",
        group="logging",
    ),
    Option(
        "--log-format",
        "log_format",
        "text or json, one object per line (default text)",
        _choice(*LOG_FORMATS),
        metavar="FORMAT",
        group="logging",
    ),
    Option(
        "--access-log",
        "access_log",
        "log one line per HTTP request (default off: the metrics count requests)",
        kind="bool",
        group="logging",
    ),
)

_GROUPS = {
    "proxy": "listening",
    "models": "models and backend",
    "kubernetes": "kubernetes backend",
    "switching": "switching",
    "security": "authentication (values are never logged)",
    "local": "local backend",
    "sim": "simulator backend",
    "logging": "logging",
}
_SECRET_FIELDS = frozenset({"api_keys", "admin_token", "upstream_api_key"})


@dataclass(frozen=True)
class Settings:
    """Everything `vllm-chill serve` was told, resolved and checked. Durations are seconds."""

    backend: BackendName
    models: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 8080
    enable_model_switch: bool = False
    namespace: str = "default"
    deployment: str | None = None
    container: str | None = None
    unschedulable_grace: float = DEFAULT_UNSCHEDULABLE_GRACE
    image_pull_grace: float = DEFAULT_IMAGE_PULL_GRACE
    configmap: str | None = None
    kubeconfig: str | None = None
    #: kubernetes: the resolved vLLM Service URL (no trailing slash); None with other backends.
    upstream: str | None = None
    target_host: str | None = None
    target_port: int | None = None
    model_switch_timeout: float = 300.0
    idle_timeout: float = 300.0
    max_wait: float = 0.0
    drain_timeout: float = 120.0
    min_residency: float = ProxyOptions.min_residency
    quiet_gap: float = ProxyOptions.quiet_gap
    upstream_timeout: float = ProxyOptions.upstream_timeout
    max_waiting: int = 1000
    max_body_size: int = ProxyOptions.max_body_size
    shutdown_timeout: float = 25.0
    access_log: bool = False
    api_keys: tuple[str, ...] = ()
    admin_token: str | None = None
    upstream_api_key: str | None = None
    command: str = DEFAULT_COMMAND
    sim_load_time: float = 3.0
    sim_tokens_per_second: float = 50.0
    log_level: str = "info"
    log_format: LogFormat = "text"
    #: Things worth a warning once logging is configured (ignored flags, unknown variables).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:  # secrets never reach a log line through a repr
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    def secrets(self) -> tuple[str, ...]:
        """The secret values, for redaction from logs."""
        found = [*self.api_keys, self.admin_token, self.upstream_api_key]
        return tuple(s for s in found if s)

    def proxy_options(self) -> ProxyOptions:
        return ProxyOptions(
            model_switch_timeout=self.model_switch_timeout,
            idle_timeout=self.idle_timeout,
            max_wait=self.max_wait,
            drain_timeout=self.drain_timeout,
            max_waiting=self.max_waiting,
            min_residency=self.min_residency,
            quiet_gap=self.quiet_gap,
            upstream_timeout=self.upstream_timeout,
            max_body_size=self.max_body_size,
            api_keys=self.api_keys,
            admin_token=self.admin_token,
            upstream_api_key=self.upstream_api_key,
        )


# --- parsing --------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, except that an error raises `SettingsError` (one line, no usage dump) instead of
    printing and exiting: the CLI prints it and exits 2, the env-configured app fails lifespan."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message, prog=self.prog)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags; each defaults to "not given" so that its environment twin can
    apply (see `settings_from_namespace`)."""
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(_GROUPS[option.group])
        help_text = f"{option.help} [env {option.env}]"
        if option.kind == "bool":
            group.add_argument(
                option.flag,
                dest=option.dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                option.flag,
                dest=option.dest,
                type=option.parse,
                action="append" if option.kind == "list" else "store",
                default=argparse.SUPPRESS,
                metavar=option.metavar,
                help=help_text,
            )


def serve_parser(prog: str = "vllm-chill serve") -> Parser:
    parser = Parser(
        prog=prog,
        description="Serve the OpenAI-compatible proxy. Every flag has an environment twin "
        "VLLM_CHILL_<FLAG>; the flag wins.",
        allow_abbrev=False,
    )
    add_serve_arguments(parser)
    return parser


def parse_settings(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    pod_namespace_file: str = POD_NAMESPACE_FILE,
) -> Settings:
    """Flags (`argv`, without the `serve` word), then `VLLM_CHILL_*` in `environ`, then defaults.

    Raises `SettingsError` (one line naming the flag) on anything invalid; `--help` prints the
    help and raises `SystemExit(0)`. Blocking: reads the pod's namespace file.
    """
    parser = serve_parser()
    namespace = parser.parse_args(list(argv))
    return settings_from_namespace(
        namespace, environ, prog=parser.prog, pod_namespace_file=pod_namespace_file
    )


def settings_from_namespace(
    namespace: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    prog: str = "vllm-chill serve",
    pod_namespace_file: str = POD_NAMESPACE_FILE,
) -> Settings:
    """Complete parsed flags with their environment twins and the defaults, and check them."""
    given = vars(namespace)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dest -> how to name it in an error
    warnings: list[str] = []

    def fail(dest: str, message: str) -> NoReturn:
        raise SettingsError(f"argument {sources.get(dest, _flag_of(dest))}: {message}", prog=prog)

    for option in OPTIONS:
        if option.dest in given:
            value = given[option.dest]
            values[option.dest] = tuple(value) if option.kind == "list" else value
            sources[option.dest] = option.flag
            continue
        raw = environ.get(option.env, "")
        if not raw.strip():
            continue
        if option.env == "VLLM_CHILL_PORT" and _SERVICE_LINK.match(raw):
            continue  # a Kubernetes service link for a Service named vllm-chill, not ours
        sources[option.dest] = f"{option.flag} (from {option.env})"
        try:
            if option.kind == "bool":
                values[option.dest] = _bool_env(raw)
            elif option.kind == "list":
                items = [item for item in (i.strip() for i in raw.split(",")) if item]
                values[option.dest] = tuple(option.parse(item) for item in items)
            else:
                values[option.dest] = option.parse(raw)
        except argparse.ArgumentTypeError as exc:
            fail(option.dest, str(exc))
    known = {option.env for option in OPTIONS}
    warnings.extend(
        f"ignoring unknown environment variable {name}"
        for name in sorted(environ)
        if name.startswith(ENV_PREFIX)
        and name not in known
        and not _SERVICE_LINK_NAME.match(name)
        and environ[name].strip()
    )

    # backend: kubernetes when --deployment is given, else required
    if "backend" not in values:
        if "deployment" not in values:
            raise SettingsError(
                "argument --backend: required (kubernetes, local or sim) unless --deployment "
                f"is given [env {_env_of('backend')}]",
                prog=prog,
            )
        values["backend"] = "kubernetes"
        sources["backend"] = "--backend (implied by --deployment)"
    backend = cast(BackendName, values["backend"])

    for option in OPTIONS:
        if option.dest in sources and backend not in option.backends:
            warnings.append(f"{sources[option.dest]} is not used by the {backend} backend")

    if backend == "kubernetes":
        if "deployment" not in values:
            fail("deployment", "required with the kubernetes backend")
        if values.get("models") and not values.get("enable_model_switch"):
            warnings.append(
                f"{sources['models']} is not used without --enable-model-switch: only the "
                "Deployment's current model is served"
            )
        if "namespace" not in values:
            values["namespace"] = _pod_namespace(pod_namespace_file) or "default"
        if "upstream" in values and ("target_host" in values or "target_port" in values):
            fail("upstream", "not allowed with --target-host/--target-port (give one or the other)")
        if "upstream" not in values:
            host = values.get("target_host") or f"{values['deployment']}.{values['namespace']}.svc"
            port = values.get("target_port", DEFAULT_UPSTREAM_PORT)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"  # an IPv6 address
            values["upstream"] = f"http://{host}:{port}"
    else:
        if not values.get("models"):
            fail("models", f"required with the {backend} backend")
        values.pop("upstream", None)
        values.setdefault("namespace", "default")

    return Settings(**values, warnings=tuple(warnings))


def _flag_of(dest: str) -> str:
    return next(o.flag for o in OPTIONS if o.dest == dest)


def _env_of(dest: str) -> str:
    return next(o.env for o in OPTIONS if o.dest == dest)


def _pod_namespace(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip() or None
    except OSError:
        return None


def env_name(flag: str) -> str:
    """`--idle-timeout` → `VLLM_CHILL_IDLE_TIMEOUT`."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")
