"""The status page's picture of the proxy: every defined model with its state, where it runs
and its counts, the queue, the latest switches, load times.

One JSON object, built from the switcher's status and the registry. It is what each
`event: status` of `/proxy/events` carries; the page renders it as it comes.
"""

from __future__ import annotations

import time
from typing import Any

from vllm_chill._placement import Capacity, GpuPool, SingleSlot, Slots
from vllm_chill.registries._base import ModelRegistry
from vllm_chill.scheduler._switcher import Switcher


def status_view(switcher: Switcher, registry: ModelRegistry) -> dict[str, Any]:
    status = switcher.status()
    residents: dict[str, Any] = status["models"]
    failed: dict[str, Any] = status["failed_models"]
    inflight: dict[str, int] = status["requests_in_flight"]
    waiting: dict[str, int] = status["requests_waiting"]
    load_seconds: dict[str, list[float]] = status["load_seconds"]
    wake_seconds: dict[str, list[float]] = status["wake_seconds"]
    making_room: dict[str, Any] = status["making_room"]
    kind = _capacity_kind(switcher.core.capacity)
    accounted = kind != "single"
    models = []
    for model in registry.models():
        name = model.served_model_name
        resident = residents.get(name)
        pending = making_room.get(name)
        placement = (resident or pending or {}).get("placement") or [] if accounted else []
        models.append(
            {
                "id": name,
                "name": model.name,
                "model": model.model_name,
                "state": switcher.state_of(name).value,
                "phase": resident["phase"] if resident else ("making room" if pending else None),
                "progress": resident["progress"] if resident else None,
                "phase_seconds": resident["phase_seconds"] if resident else None,
                "placement": placement,
                "gpu_fraction": resident["gpu_fraction"] if resident else None,
                "replacing": pending["replacing"] if pending else [],
                "in_flight": inflight.get(name, 0),
                "waiting": waiting.get(name, 0),
                "failure": failed.get(name),
                "load_seconds": load_seconds.get(name, []),
                "wake_seconds": wake_seconds.get(name, []),
            }
        )
    return {
        "server_time": round(time.time(), 3),
        "running": switcher.running,
        "models": models,
        "queue": status["queued_models"],
        "capacity": kind,
        "free_capacity": status["free_capacity"] if accounted else {},
        "switches": status["switches"],
        "evictions": status["evictions"],
    }


def _capacity_kind(capacity: Capacity) -> str:
    """What the places models run in are: "gpus", "deployments", or "single" (one model at a
    time, nothing to show of where)."""
    if isinstance(capacity, GpuPool):
        return "gpus"
    if isinstance(capacity, Slots):
        return "deployments"
    if isinstance(capacity, SingleSlot) and capacity.name != SingleSlot.name:
        return "deployments"  # one Deployment, named
    return "single"


def is_watched(view: dict[str, Any]) -> bool:
    """Whether the picture can change without a change of the switcher's state: counts of
    requests, a failure's back-off running out. Then streams look at it every second; an idle
    proxy's picture changes only with the switcher's state."""
    return bool(view["queue"]) or any(
        m["phase"] is not None or m["failure"] or m["in_flight"] or m["waiting"]
        for m in view["models"]
    )


#: What moves with the clock alone; the page counts these on by itself between events.
_CLOCK_FIELDS = frozenset(
    {"server_time", "phase_seconds", "duration_seconds", "seconds_ago", "retry_in_seconds"}
)


def without_clock(value: Any) -> Any:
    """The picture less what moves with the clock: two pictures that differ only there show
    the same thing."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k not in _CLOCK_FIELDS}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value
