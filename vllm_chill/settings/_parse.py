"""`vllm-chill serve`'s flags and their `VLLM_CHILL_*` environment twins, made from `Settings`.

Values are checked here, before anything starts, and every problem is one line that names the
flag (and the environment variable, when the value came from there): an operator reading
`kubectl logs` of a crash-looping pod sees what to fix.

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
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from vllm_chill.settings import _values as v
from vllm_chill.settings._schema import (
    ENV_PREFIX,
    GROUP_TITLES,
    Flag,
    Settings,
    flag_of,
    walk,
)
from vllm_chill.settings._values import SettingsError

#: Where Kubernetes mounts the pod's namespace (the default for `--namespace`).
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: vLLM's port in the Service that `--upstream` defaults to.
DEFAULT_UPSTREAM_PORT = 8000

_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://")
_SERVICE_LINK_NAME = re.compile(r"^VLLM_CHILL_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_\w+)$")
_DURATION_PARSERS = (v.parse_duration, v.positive_duration)


@dataclass(frozen=True)
class Option:
    """One flag of `vllm-chill serve`: where its value goes in `Settings`, and its default."""

    group: str | None
    name: str
    meta: Flag
    default: Any

    @property
    def flag(self) -> str:
        return self.meta.flag

    @property
    def env(self) -> str:
        return self.meta.env

    @property
    def dest(self) -> str:
        """The argparse destination, and the key of the collected values."""
        return self.name if self.group is None else f"{self.group}.{self.name}"

    @property
    def backends(self) -> frozenset[str]:
        return self.meta.backends

    def help_text(self) -> str:
        default = self.meta.default_text
        if default is None:
            default = _written(self.meta, self.default)
        suffix = f" (default {default})" if default else ""
        return f"{self.meta.help}{suffix} [env {self.env}]"


def _written(meta: Flag, value: Any) -> str:
    if value is None or value == ():
        return ""
    if meta.kind == "bool":
        return "on" if value else "off"
    if meta.parse in _DURATION_PARSERS:
        return v.format_duration(value)
    if meta.parse is v.parse_size:
        return v.format_size(value)
    if isinstance(value, str) and " " in value:
        return f"'{value}'"
    return f"{value:g}" if isinstance(value, float) else str(value)


OPTIONS: tuple[Option, ...] = tuple(
    Option(group, f.name, flag_of(f), f.default) for group, f in walk()
)
_BY_DEST = {option.dest: option for option in OPTIONS}


class Parser(argparse.ArgumentParser):
    """argparse, except that an error raises `SettingsError` (one line, no usage dump) instead of
    printing and exiting: the CLI prints it and exits 2, the env-configured app fails lifespan."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message, prog=self.prog)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags; each defaults to "not given" so that its environment twin can
    apply (see `settings_from_namespace`)."""
    groups: dict[str | None, Any] = {}
    for option in OPTIONS:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(GROUP_TITLES[option.group])
        if option.meta.kind == "bool":
            group.add_argument(
                option.flag,
                dest=option.dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=option.help_text(),
            )
        else:
            group.add_argument(
                option.flag,
                dest=option.dest,
                type=option.meta.parse,
                action="append" if option.meta.kind == "list" else "store",
                default=argparse.SUPPRESS,
                metavar=option.meta.metavar,
                help=option.help_text(),
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
    values: dict[str, Any] = {}  # dest -> value, for what was given
    sources: dict[str, str] = {}  # dest -> how to name it in an error
    warnings: list[str] = []

    def fail(dest: str, message: str) -> NoReturn:
        raise SettingsError(
            f"argument {sources.get(dest, _BY_DEST[dest].flag)}: {message}", prog=prog
        )

    for option in OPTIONS:
        kind = option.meta.kind
        if option.dest in given:
            value = given[option.dest]
            values[option.dest] = tuple(value) if kind == "list" else value
            sources[option.dest] = option.flag
            continue
        raw = environ.get(option.env, "")
        if not raw.strip():
            continue
        if option.env == "VLLM_CHILL_PORT" and _SERVICE_LINK.match(raw):
            continue  # a Kubernetes service link for a Service named vllm-chill, not ours
        sources[option.dest] = f"{option.flag} (from {option.env})"
        try:
            if kind == "bool":
                values[option.dest] = v.boolean(raw)
            elif kind == "list":
                items = [item for item in (i.strip() for i in raw.split(",")) if item]
                values[option.dest] = tuple(option.meta.parse(item) for item in items)
            else:
                values[option.dest] = option.meta.parse(raw)
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
        if not values.get("kubernetes.deployments"):
            raise SettingsError(
                "argument --backend: required (kubernetes, local or sim) unless --deployment "
                f"is given [env {_BY_DEST['backend'].env}]",
                prog=prog,
            )
        values["backend"] = "kubernetes"
        sources["backend"] = "--backend (implied by --deployment)"
    backend = values["backend"]

    for option in OPTIONS:
        if option.dest in sources and backend not in option.backends:
            warnings.append(f"{sources[option.dest]} is not used by the {backend} backend")

    if backend == "kubernetes":
        deployments = values.get("kubernetes.deployments") or ()
        if not deployments:
            fail("kubernetes.deployments", "required with the kubernetes backend")
        if len(set(deployments)) != len(deployments):
            fail("kubernetes.deployments", "a Deployment is listed twice")
        switching = values.get("kubernetes.enable_model_switch")
        if len(deployments) > 1 and not switching:
            fail(
                "kubernetes.deployments",
                "several Deployments need --enable-model-switch (without it each Deployment "
                "would only serve what it runs now)",
            )
        if values.get("models") and not switching:
            warnings.append(
                f"{sources['models']} is not used without --enable-model-switch: only the "
                "Deployment's current model is served"
            )
        if "kubernetes.namespace" not in values:
            values["kubernetes.namespace"] = _pod_namespace(pod_namespace_file) or "default"
        target = "upstream.target_host" in values or "upstream.target_port" in values
        if "upstream.urls" in values and target:
            fail(
                "upstream.urls",
                "not allowed with --target-host/--target-port (give one or the other)",
            )
        if target and len(deployments) > 1:
            fail("upstream.target_host", "not allowed with several Deployments: use --upstream")
        urls = values.get("upstream.urls")
        if urls is not None and len(urls) != len(deployments):
            fail(
                "upstream.urls",
                f"{len(urls)} given for {len(deployments)} Deployment(s): one per --deployment, "
                "in the same order",
            )
        if urls is None:
            port = values.get("upstream.target_port", DEFAULT_UPSTREAM_PORT)
            found = []
            for name in deployments:
                host = values.get("upstream.target_host") or (
                    f"{name}.{values['kubernetes.namespace']}.svc"
                )
                if ":" in host and not host.startswith("["):
                    host = f"[{host}]"  # an IPv6 address
                found.append(f"http://{host}:{port}")
            values["upstream.urls"] = tuple(found)
    else:
        if values.get("registry") == "kubernetes":
            if values.get("models"):
                fail("models", "not with --registry kubernetes (the models are its resources)")
            if "kubernetes.namespace" not in values:
                values["kubernetes.namespace"] = _pod_namespace(pod_namespace_file) or "default"
        elif not values.get("models"):
            fail("models", f"required with the {backend} backend (or --registry kubernetes)")
        values.pop("upstream.urls", None)

    return assemble(values, tuple(warnings))


def assemble(values: Mapping[str, Any], warnings: tuple[str, ...]) -> Settings:
    """`Settings` from `{"switching.idle_timeout": 0, "backend": "sim", ...}`."""
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        group, _, name = dest.rpartition(".")
        if group:
            groups.setdefault(group, {})[name] = value
        else:
            top[name] = value
    defaults = Settings()
    for group, fields in groups.items():
        top[group] = dataclasses.replace(getattr(defaults, group), **fields)
    return Settings(**top, warnings=warnings)


def _pod_namespace(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip() or None
    except OSError:
        return None
