"""Every setting of vllm-chill, once: its default, its flag, its help text, how it is parsed.

`Settings` groups them in small frozen dataclasses (switching, limits, security, upstream,
kubernetes, local, sim, logging, server). The library takes them typed
(`ModelSwitchMiddleware(settings=Settings(switching=SwitchingSettings(max_wait=30)))`); the
`vllm-chill serve` flags and their `VLLM_CHILL_*` environment twins are generated from the
metadata beside each default (`_parse.py`), so a setting cannot exist without its flag, its
variable and its help line, and a default is never written twice.

Durations are seconds (floats), sizes bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from vllm_chill.settings import _values as v

ENV_PREFIX = "VLLM_CHILL_"
BACKENDS = ("kubernetes", "local", "sim")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

BackendName = Literal["kubernetes", "local", "sim"]
REGISTRIES = ("files", "kubernetes")
RegistryName = Literal["files", "kubernetes"]
LogFormat = Literal["text", "json"]

_ALL = frozenset(BACKENDS)
_K8S = frozenset({"kubernetes"})
MiB = 1024 * 1024


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line and in the environment."""

    flag: str
    help: str
    parse: Callable[[str], Any] = v.text
    kind: Literal["value", "list", "bool"] = "value"
    metavar: str | None = None
    #: Backends that use it; giving it with another backend logs a warning.
    backends: frozenset[str] = _ALL
    #: Never shown: not in a repr, a log line or an error message.
    secret: bool = False
    #: What `--help` says the default is; None: written from the default value; "": nothing.
    default_text: str | None = None

    @property
    def env(self) -> str:
        return env_name(self.flag)


def env_name(flag: str) -> str:
    """`--idle-timeout` → `VLLM_CHILL_IDLE_TIMEOUT`."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


def setting(
    default: Any,
    flag: str,
    help: str,
    *,
    parse: Callable[[str], Any] = v.text,
    kind: Literal["value", "list", "bool"] = "value",
    metavar: str | None = None,
    backends: frozenset[str] = _ALL,
    secret: bool = False,
    default_text: str | None = None,
) -> Any:
    """A dataclass field with its flag beside its default."""
    meta = Flag(flag, help, parse, kind, metavar, backends, secret, default_text)
    return field(default=default, metadata={"flag": meta})


def flag_of(f: dataclasses.Field[Any]) -> Flag:
    meta = f.metadata["flag"]
    assert isinstance(meta, Flag)
    return meta


class _Group:
    """A frozen group of settings whose repr masks secrets (a repr reaches log lines)."""

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if "flag" in f.metadata and flag_of(f).secret and value:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, kw_only=True, repr=False)
class ServerSettings(_Group):
    """Where `vllm-chill serve` listens (an ASGI server of your own decides this instead)."""

    host: str = setting("0.0.0.0", "--host", "address to listen on", metavar="ADDR")
    port: int = setting(
        8080, "--port", "port to listen on; 0 picks a free one", parse=v.listen_port, metavar="PORT"
    )
    shutdown_timeout: float = setting(
        25.0,
        "--shutdown-timeout",
        "on SIGTERM, how long open requests (streams) may finish before they are cut",
        parse=v.parse_duration,
        metavar="DURATION",
        default_text="25s, inside Kubernetes' 30s grace period",
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class SwitchingSettings(_Group):
    """When models are loaded, kept, drained and unloaded (README, "Switch policy")."""

    model_switch_timeout: float = setting(
        300.0,
        "--model-switch-timeout",
        "longest a load may take before it fails",
        parse=v.positive_duration,
        metavar="DURATION",
    )
    idle_timeout: float = setting(
        300.0,
        "--idle-timeout",
        "unload (scale to zero) after this long with nothing in flight or waiting; 0 never",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    max_wait: float = setting(
        0.0,
        "--max-wait",
        "hold a request for a loading model this long before answering 503; 0 answers at once",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    stream_keepalive: float = setting(
        2.0,
        "--stream-keepalive",
        "a held streaming completion is answered 200 at once and sent an SSE comment with the "
        "load's progress this often until its model answers; 0 holds it silently",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    stream_loading_note: bool = setting(
        False,
        "--stream-loading-note",
        "held streaming chat completions also get that progress as reasoning_content chunks, "
        "which chat UIs show as thinking",
        kind="bool",
    )
    drain_timeout: float = setting(
        120.0,
        "--drain-timeout",
        "how long in-flight requests on the old model may run before a switch cuts them",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    min_residency: float = setting(
        5.0,
        "--min-residency",
        "shortest serving window of a model in use while others wait; the window is 2.5x "
        "the model's load time when longer",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    quiet_gap: float = setting(
        0.5,
        "--quiet-gap",
        "a model with nothing in flight and no request for this long gives way at once to "
        "a model that is waiting",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    first_load_estimate: float = setting(
        30.0,
        "--first-load-estimate",
        "how long a model's load is assumed to take until one was measured: the first "
        "Retry-After, and how long the official clients keep retrying",
        parse=v.positive_duration,
        metavar="DURATION",
    )
    failure_backoff: float = setting(
        10.0,
        "--failure-backoff",
        "after a failed load, how long the model answers model_switch_failed before it is tried "
        "again; doubles per consecutive failure",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    failure_backoff_max: float = setting(
        300.0,
        "--failure-backoff-max",
        "the longest that pause grows to",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    max_loaded: int = setting(
        0,
        "--max-loaded",
        "most models loaded at once, whatever fits; 0 as many as the GPUs hold",
        parse=v.non_negative_int,
        metavar="N",
        default_text="0: as many as fit",
    )
    max_concurrent_loads: int = setting(
        1,
        "--max-concurrent-loads",
        "loads in progress at once (they never share a GPU)",
        parse=v.positive_int,
        metavar="N",
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class SleepSettings(_Group):
    """vLLM's sleep mode, for models with `enableSleepMode` (local and sim backends): a model
    that gives way sleeps instead of stopping, and comes back in seconds."""

    level: int = setting(
        1,
        "--sleep-level",
        "vLLM sleep level: 1 moves the weights to host memory (a wake reloads nothing); 2 drops "
        "them too (less host memory, a slower wake)",
        parse=v.sleep_level,
        metavar="N",
        backends=frozenset({"local", "sim"}),
    )
    reserve: float = setting(
        0.02,
        "--sleep-reserve",
        "share of each of its GPUs a sleeping model still holds (its CUDA context), counted "
        "when placing others",
        parse=v.gpu_share,
        metavar="SHARE",
        backends=frozenset({"local", "sim"}),
    )
    max_sleeping: int = setting(
        0,
        "--max-sleeping",
        "most models asleep at once; beyond it the least recently used is stopped; 0 no limit",
        parse=v.non_negative_int,
        metavar="N",
        backends=frozenset({"local", "sim"}),
        default_text="0: no limit",
    )
    memory: int | None = setting(
        None,
        "--sleep-memory",
        "host memory the sleeping models may hold together, measured from their processes "
        "once asleep; beyond it the least recently used is stopped",
        parse=v.parse_size,
        metavar="SIZE",
        backends=frozenset({"local", "sim"}),
        default_text="half of the machine's memory",
    )
    wake_timeout: float = setting(
        60.0,
        "--wake-timeout",
        "a wake that takes longer fails: the process is stopped and the model loads cold",
        parse=v.positive_duration,
        metavar="DURATION",
        backends=frozenset({"local", "sim"}),
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class LimitsSettings(_Group):
    """Bounds on what one client, or all of them, can make the proxy hold."""

    max_waiting: int = setting(
        1000,
        "--max-waiting",
        "most requests held waiting for loads, all models together; beyond it 503 too_many_waiting",
        parse=v.positive_int,
        metavar="N",
    )
    max_body_size: int = setting(
        64 * MiB,
        "--max-body-size",
        "largest request body accepted, e.g. 64MiB",
        parse=v.parse_size,
        metavar="SIZE",
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class SecuritySettings(_Group):
    """Who may use the proxy. Values are never logged, nor shown in errors."""

    api_keys: tuple[str, ...] = setting(
        (),
        "--api-key",
        "clients must send 'Authorization: Bearer <key>' (repeatable; env: comma-separated)",
        parse=v.secret,
        kind="list",
        metavar="KEY",
        secret=True,
        default_text="",
    )
    admin_token: str | None = setting(
        None,
        "--admin-token",
        "bearer token required by /proxy/*",
        parse=v.secret,
        metavar="TOKEN",
        secret=True,
        default_text="the --api-key keys",
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class UpstreamSettings(_Group):
    """The models' vLLM servers: where (kubernetes), how patiently, with which key."""

    urls: tuple[str, ...] = setting(
        (),
        "--upstream",
        "kubernetes: where each Deployment's vLLM Service answers, in the order of --deployment "
        "(repeatable; env: comma-separated)",
        parse=v.url,
        kind="list",
        metavar="URL",
        backends=_K8S,
        default_text="http://<deployment>.<namespace>.svc:8000",
    )
    target_host: str | None = setting(
        None,
        "--target-host",
        "kubernetes: host part of --upstream (instead of it)",
        metavar="HOST",
        backends=_K8S,
    )
    target_port: int | None = setting(
        None,
        "--target-port",
        "kubernetes: port part of --upstream (instead of it)",
        parse=v.port,
        metavar="PORT",
        backends=_K8S,
        default_text="8000",
    )
    connect_timeout: float = setting(
        10.0,
        "--upstream-connect-timeout",
        "longest to open a connection to a model's server before 502 upstream_unavailable",
        parse=v.positive_duration,
        metavar="DURATION",
    )
    timeout: float = setting(
        600.0,
        "--upstream-timeout",
        "no response headers or body bytes from a model's server for this long: 504 "
        "upstream_timeout, or the response aborted once started",
        parse=v.parse_duration,
        metavar="DURATION",
    )
    api_key: str | None = setting(
        None,
        "--upstream-api-key",
        "sent to vLLM as 'Authorization: Bearer' (vLLM's --api-key)",
        parse=v.secret,
        metavar="KEY",
        secret=True,
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class KubernetesSettings(_Group):
    """The vLLM Deployment that the kubernetes backend rewrites and rolls."""

    enable_model_switch: bool = setting(
        False,
        "--enable-model-switch",
        "kubernetes: switch models on demand; without it only the Deployment's current model is "
        "served (woken from zero, idled to zero) and other names get 404. local and sim always "
        "switch",
        kind="bool",
    )
    namespace: str = setting(
        "default",
        "--namespace",
        "Kubernetes namespace",
        metavar="NS",
        default_text="the pod's own, else 'default'",
    )
    deployments: tuple[str, ...] = setting(
        (),
        "--deployment",
        "the vLLM Deployment (required with the kubernetes backend); repeat it for several: "
        "each runs one model, and as many models as Deployments are served at once "
        "(env: comma-separated)",
        kind="list",
        metavar="NAME",
        backends=_K8S,
        default_text="",
    )
    container: str | None = setting(
        None,
        "--container",
        "the vLLM container in the Deployment",
        metavar="NAME",
        backends=_K8S,
        default_text="the only one, else the one that runs vLLM",
    )
    unschedulable_grace: float = setting(
        60.0,
        "--unschedulable-grace",
        "how long the vLLM pod may stay unschedulable (no node fits, or its volume is unbound) "
        "before the load fails, unless a cluster autoscaler announced a node for it; "
        "NotTriggerScaleUp fails at once",
        parse=v.parse_duration,
        metavar="DURATION",
        backends=_K8S,
    )
    image_pull_grace: float = setting(
        60.0,
        "--image-pull-grace",
        "how long the kubelet may keep retrying a failed image pull before the load fails; "
        "not found or denied fail at once",
        parse=v.parse_duration,
        metavar="DURATION",
        backends=_K8S,
    )
    configmap: str | None = setting(
        None,
        "--configmap",
        "also write the model's settings into this ConfigMap",
        metavar="NAME",
        backends=_K8S,
    )
    kubeconfig: str | None = setting(
        None,
        "--kubeconfig",
        "kubeconfig file (the kubernetes backend, or --registry kubernetes)",
        metavar="PATH",
        default_text="in-cluster config when present, else ~/.kube/config",
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class LocalSettings(_Group):
    """The local backend: a `vllm serve` child process per loaded model."""

    gpus: tuple[str, ...] | None = setting(
        None,
        "--gpus",
        "local and sim backends: the GPUs models are placed on, e.g. 0,1,2,3 ('none': no GPU "
        "accounting, one model at a time); each model's process gets CUDA_VISIBLE_DEVICES",
        parse=v.gpu_list,
        metavar="LIST",
        backends=frozenset({"local", "sim"}),
        default_text="CUDA_VISIBLE_DEVICES when set, else the GPUs nvidia-smi -L lists, else none",
    )

    command: str = setting(
        "vllm serve {model} {args} --host 127.0.0.1 --port {port}",
        "--command",
        "local backend: command template with {model} {served_model_name} {args} "
        "{extra_args} {port}",
        metavar="TEMPLATE",
        backends=frozenset({"local"}),
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class SimSettings(_Group):
    """The simulator backend: OpenAI-shaped answers, no GPU."""

    load_time: float = setting(
        3.0,
        "--sim-load-time",
        "sim backend: how long a simulated load takes",
        parse=v.parse_duration,
        metavar="DURATION",
        backends=frozenset({"sim"}),
    )
    wake_time: float = setting(
        0.5,
        "--sim-wake-time",
        "sim backend: how long a sleeping model (enableSleepMode) takes to wake",
        parse=v.parse_duration,
        metavar="DURATION",
        backends=frozenset({"sim"}),
    )
    tokens_per_second: float = setting(
        50.0,
        "--sim-tokens-per-second",
        "sim backend: streaming speed; 0 as fast as possible",
        parse=v.non_negative_number,
        metavar="N",
        backends=frozenset({"sim"}),
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class LoggingSettings(_Group):
    level: str = setting(
        "info", "--log-level", ", ".join(LOG_LEVELS), parse=v.choice(*LOG_LEVELS), metavar="LEVEL"
    )
    format: LogFormat = setting(
        "text",
        "--log-format",
        "text or json, one object per line",
        parse=v.choice(*LOG_FORMATS),
        metavar="FORMAT",
    )
    access_log: bool = setting(
        False,
        "--access-log",
        "log one line per HTTP request",
        kind="bool",
        default_text="off: the metrics count requests",
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class Settings(_Group):
    """Everything vllm-chill is told. Each group has its defaults; replace what you need:
    `Settings(switching=SwitchingSettings(idle_timeout=0))`."""

    server: ServerSettings = field(default_factory=ServerSettings)
    backend: BackendName | None = setting(
        None,
        "--backend",
        "how models get onto the GPUs: kubernetes, local or sim",
        parse=v.choice(*BACKENDS),
        metavar="NAME",
        default_text="kubernetes when --deployment is given, else required",
    )
    registry: RegistryName | None = setting(
        None,
        "--registry",
        "where models are defined: files (--models) or kubernetes (the VLLMModel resources of "
        "--namespace; with the local backend, a GPU pod that runs its own warm pool)",
        parse=v.choice(*REGISTRIES),
        metavar="NAME",
        default_text="files when --models is given, else kubernetes",
    )
    models: tuple[str, ...] = setting(
        (),
        "--models",
        "VLLMModel YAML file or directory, reloaded on change (repeatable; env: comma-separated). "
        "Required with local and sim; with kubernetes the namespace's VLLMModel resources",
        kind="list",
        metavar="PATH",
        default_text="",
    )
    switching: SwitchingSettings = field(default_factory=SwitchingSettings)
    sleep: SleepSettings = field(default_factory=SleepSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    sim: SimSettings = field(default_factory=SimSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    #: Things worth a warning once logging is configured (ignored flags, unknown variables).
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def secrets(self) -> tuple[str, ...]:
        """The secret values, for redaction from logs."""
        found: list[str] = []
        for group, f in walk():
            if flag_of(f).secret:
                value = getattr(self if group is None else getattr(self, group), f.name)
                found.extend(value if isinstance(value, tuple) else [value])
        return tuple(s for s in found if s)


GROUP_TITLES = {
    None: "models and backend",
    "server": "listening",
    "kubernetes": "kubernetes backend",
    "upstream": "model servers (upstream)",
    "switching": "switching",
    "sleep": "sleep mode (models with enableSleepMode)",
    "limits": "limits",
    "security": "authentication (values are never logged)",
    "local": "local backend",
    "sim": "simulator backend",
    "logging": "logging",
}


def walk() -> Iterator[tuple[str | None, dataclasses.Field[Any]]]:
    """Every setting that has a flag, in `--help` order: (its group's attribute on `Settings`,
    or None for a top-level one; its field)."""
    for f in dataclasses.fields(Settings):
        group_type = f.default_factory
        if "flag" in f.metadata:
            yield None, f
        elif isinstance(group_type, type) and issubclass(group_type, _Group):
            for inner in dataclasses.fields(group_type):
                yield f.name, inner
