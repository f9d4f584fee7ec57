"""Prometheus metrics, one registry per middleware so that several instances (and
tests) never collide. Label children are resolved once per model and cached: the per-request
path must not pay for label lookups."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SWITCH_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900)


@dataclass
class ModelMetrics:
    """The label children of one model, resolved once."""

    name: str
    requests: Counter
    duration: Histogram
    in_flight: Gauge
    waiting: Gauge
    by_status: dict[int, Counter] = field(default_factory=dict)

    def count(self, status: int) -> None:
        """One request answered with `status`."""
        counter = self.by_status.get(status)
        if counter is None:
            counter = self.by_status[status] = self.requests.labels(self.name, str(status))
        counter.inc()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vllm_chill_requests",
            "Requests answered, by model and HTTP status.",
            ["model", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "vllm_chill_request_duration_seconds",
            "Time from request to the end of the response, by model.",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "vllm_chill_requests_in_flight",
            "Requests being served, by model.",
            ["model"],
            registry=r,
        )
        self.waiting = Gauge(
            "vllm_chill_requests_waiting",
            "Requests held while their model loads, by model.",
            ["model"],
            registry=r,
        )
        self.switches = Counter(
            "vllm_chill_model_switches",
            "Model loads (kind cold) and wakes from sleep (kind wake), by previous model, new "
            "model and result.",
            ["from_model", "to_model", "result", "kind"],
            registry=r,
        )
        self.switch_duration = Histogram(
            "vllm_chill_switch_duration_seconds",
            "Time a load took, by model and result.",
            ["model", "result"],
            buckets=_SWITCH_BUCKETS,
            registry=r,
        )
        self.active_model = Gauge(
            "vllm_chill_active_model",
            "1 for each model loaded and ready, else 0.",
            ["model"],
            registry=r,
        )
        self.refusals = Counter(
            "vllm_chill_refusals",
            "Requests vllm-chill answered itself instead of the model (503 while it loads or "
            "waits for its turn, after a failed load, with too many waiting; while starting or "
            "stopping), by model and error code.",
            ["model", "code"],
            registry=r,
        )
        self.resident = Gauge(
            "vllm_chill_model_resident",
            "1 for each model holding GPU capacity (loading, ready, draining, asleep or "
            "unloading).",
            ["model"],
            registry=r,
        )
        self.evictions = Counter(
            "vllm_chill_evictions",
            "Models that gave way to make room for another, by why they were chosen.",
            ["reason"],
            registry=r,
        )
        self.scale_events = Counter(
            "vllm_chill_scale_events",
            "Scale-ups from zero and scale-downs to zero.",
            ["direction", "reason"],
            registry=r,
        )
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        found = self._models.get(name)
        if found is None:
            found = ModelMetrics(
                name=name,
                requests=self.requests,
                duration=self.request_duration.labels(name),
                in_flight=self.in_flight.labels(name),
                waiting=self.waiting.labels(name),
            )
            self._models[name] = found
        return found

    def count_request(self, name: str, status: int) -> None:
        self.model(name).count(status)

    def set_active(self, serving: set[str], resident: set[str], known: list[str]) -> None:
        for name in {*known, *serving, *resident}:
            self.active_model.labels(name).set(1 if name in serving else 0)
            self.resident.labels(name).set(1 if name in resident else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
