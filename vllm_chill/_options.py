"""Tunables of the switch scheduler and the proxy, shared by the library API and the CLI.

Durations are seconds (floats). `ModelSwitchMiddleware(**options)` accepts these field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024 * 1024

#: Kubernetes: how long a vLLM pod may wait for a node (without an autoscaler's word) or for its
#: volume, and how long the kubelet may retry a failed image pull, before the load fails.
DEFAULT_UNSCHEDULABLE_GRACE = 60.0
DEFAULT_IMAGE_PULL_GRACE = 60.0


@dataclass(frozen=True)
class ProxyOptions:
    #: Longest a load may take before it fails (`--model-switch-timeout`).
    model_switch_timeout: float = 300.0
    #: Unload after this long with nothing in flight or waiting; 0 never (`--idle-timeout`).
    idle_timeout: float = 300.0
    #: How long a request for a loading model is held before a 503; 0 answers at once.
    max_wait: float = 0.0
    #: How long in-flight requests on the old model may run before a switch cuts them.
    drain_timeout: float = 120.0
    #: Bound on requests held waiting (all models together); beyond it: `too_many_waiting`.
    max_waiting: int = 1000
    #: The shortest serving window of a model that is being used while others wait; the
    #: window grows with the model's load time (README, "Switch policy").
    min_residency: float = 5.0
    #: A model with nothing in flight and no request for this long gives way at once to a
    #: queued switch (README, "Switch policy").
    quiet_gap: float = 0.5
    #: First pause after a failed load before the same model is tried again; doubles per
    #: consecutive failure up to `failure_backoff_max`.
    failure_backoff: float = 10.0
    failure_backoff_max: float = 300.0
    #: Largest request body accepted (`request_too_large` beyond it).
    max_body_size: int = 64 * MiB
    #: Client keys (`--api-key`); empty: no authentication.
    api_keys: tuple[str, ...] = ()
    #: Bearer token for `/proxy/*` (`--admin-token`).
    admin_token: str | None = None
    #: Sent upstream as `Authorization: Bearer` (`--upstream-api-key`).
    upstream_api_key: str | None = field(default=None, repr=False)
    #: Seconds to open a connection to the upstream before `upstream_unavailable`.
    upstream_connect_timeout: float = 10.0
    #: No response headers, or no body bytes, from the upstream for this long: 504
    #: `upstream_timeout` (or an aborted response once it started). Generous, since a long
    #: non-streaming generation sends its headers only at the end.
    upstream_timeout: float = 600.0

    def __repr__(self) -> str:  # secrets never reach a log line through a repr
        hidden = {"api_keys", "admin_token", "upstream_api_key"}
        parts = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in hidden and value:
                value = "***"
            parts.append(f"{name}={value!r}")
        return f"ProxyOptions({', '.join(parts)})"
