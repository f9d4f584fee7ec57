"""The switch decision core: a pure state machine, no I/O, no clock of its own.

Every input is a method call carrying `now`; every output is a decision for the caller and a
list of effects for the driver (`switcher.py`) to carry out. That makes each choice — start a
load, hold, answer 503, drain, cut, unload — testable deterministically without sleeping.

The switch policy (also in the README, "Switch policy"):

1. One model is active at a time, and one load runs at a time. Requests for the loading model
   join its load.
2. Models wanted while another is active queue in FIFO order of their first request. When the
   active model is ready and something else is queued, the active model keeps serving until
   its *residency* ends: at least `min_residency` after it became ready, and long enough for
   the clients who were told `Retry-After: N` during its load to come back (capped). This is the
   batch: a loaded model serves the requests it was loaded for before the next switch, and it
   bounds the switch rate to one per `load time + min_residency`, whatever the clients do.
3. Then the switch is committed: new requests for the active model queue behind the models
   already waiting (so a busy model cannot starve the others), its in-flight requests drain for
   up to `drain_timeout`, the rest are cut, and the next queued model loads.
4. A failed load fails its held waiters at once with the reason; the model then refuses new
   requests with the same reason for a back-off (doubling per consecutive failure), so a broken
   model is never retried in a tight loop. An explicit switch clears the back-off.
5. With nothing in flight, waiting or queued, the active model unloads after `idle_timeout`
   counted from the end of the last request — a long stream keeps its model.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

#: Retry-After when nothing is known about a model's load time (SPEC §3.2).
DEFAULT_LOAD_ESTIMATE = 30.0
#: A residency kept open for clients told to come back is never longer than this.
MAX_PROMISE_HOLD = 60.0
#: Slack added to a promised retry time: clients retry a little after Retry-After.
PROMISE_GRACE = 5.0
#: Load durations remembered per model for the estimate.
DURATION_SAMPLES = 5


class Phase(StrEnum):
    IDLE = "idle"  # nothing loaded
    LOADING = "loading"  # `active` is being loaded
    READY = "ready"  # `active` serves
    DRAINING = "draining"  # `active` finishes its in-flight requests before a switch/unload
    UNLOADING = "unloading"  # the backend is unloading


#: For the per-request paths: an enum member looked up on its class costs ~0.3 µs a time.
_READY = Phase.READY


class ModelState(StrEnum):
    """What `/v1/models` reports for each model."""

    LOADED = "loaded"
    LOADING = "loading"
    UNLOADED = "unloaded"
    FAILED = "failed"


# --- decisions returned to the caller of `arrive` -------------------------------------------


@dataclass(frozen=True)
class Admit:
    """Serve now; the request is counted in flight until `finish`."""


@dataclass(frozen=True)
class Hold:
    """Wait for the model; the driver resolves `waiter` through Release/Reject effects."""

    waiter: int


@dataclass(frozen=True)
class Busy:
    """Answer 503 `model_switching_in_progress` now."""

    retry_after: int


@dataclass(frozen=True)
class Refuse:
    """Answer 503 `model_switch_failed` (the model is in failure back-off)."""

    reason: str
    retry_after: int


@dataclass(frozen=True)
class TooMany:
    """Answer 503 `too_many_waiting`."""

    retry_after: int


Decision = Admit | Hold | Busy | Refuse | TooMany
_ADMIT = Admit()


# --- effects for the driver ------------------------------------------------------------------


@dataclass(frozen=True)
class StartLoad:
    model: str
    previous: str | None


@dataclass(frozen=True)
class StartUnload:
    model: str
    reason: str  # "idle", "requested" or "failed" (cleanup after a failed load)


@dataclass(frozen=True)
class Release:
    """These waiters now hold an in-flight slot on `model`."""

    model: str
    waiters: tuple[int, ...]


@dataclass(frozen=True)
class Reject:
    """These waiters' load failed."""

    model: str
    waiters: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Cut:
    """Drain timed out: cancel the in-flight requests on `model`."""

    model: str


@dataclass(frozen=True)
class PhaseChanged:
    """For logs and metrics: one line per switch phase."""

    model: str | None
    phase: Phase
    target: str | None = None


Effect = StartLoad | StartUnload | Release | Reject | Cut | PhaseChanged


@dataclass
class Failure:
    reason: str
    at: float
    until: float
    count: int


@dataclass
class SwitchRecord:
    """The last switch, for `/proxy/status`."""

    from_model: str | None
    to_model: str
    started_at: float
    finished_at: float | None = None
    result: str | None = None  # "success" / "failure"


@dataclass
class SwitchCore:
    """The state machine. All methods are synchronous and must be called from one thread."""

    max_waiting: int = 1000
    min_residency: float = 5.0
    drain_timeout: float = 120.0
    idle_timeout: float = 300.0
    failure_backoff: float = 10.0
    failure_backoff_max: float = 300.0

    phase: Phase = Phase.IDLE
    active: str | None = None
    #: During DRAINING: the model to load next, or None to unload.
    target: str | None = None
    unload_reason: str = "idle"
    phase_since: float = 0.0
    residency_until: float = 0.0
    drain_deadline: float = math.inf
    cut_sent: bool = False
    last_activity: float = 0.0
    inflight: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, dict[int, None]] = field(default_factory=dict)
    waiting_total: int = 0
    queue: OrderedDict[str, None] = field(default_factory=OrderedDict)
    failures: dict[str, Failure] = field(default_factory=dict)
    promises: dict[str, float] = field(default_factory=dict)
    durations: dict[str, deque[float]] = field(default_factory=dict)
    last_switch: SwitchRecord | None = None
    _next_waiter: int = 0

    # --- queries --------------------------------------------------------------------------

    def state_of(self, model: str, now: float) -> ModelState:
        if model == self.active:
            if self.phase in (Phase.READY, Phase.DRAINING):
                return ModelState.LOADED
            if self.phase == Phase.LOADING:
                return ModelState.LOADING
        failure = self.failures.get(model)
        if failure is not None and now < failure.until:
            return ModelState.FAILED
        return ModelState.UNLOADED

    def is_serving(self, model: str) -> bool:
        """Whether a request for `model` would be admitted right now (the fast path)."""
        return self.phase == Phase.READY and model == self.active

    def estimate(self, model: str) -> float:
        samples = self.durations.get(model)
        if not samples:
            return DEFAULT_LOAD_ESTIMATE
        return sum(samples) / len(samples)

    def retry_after(self, model: str, now: float) -> int:
        """Seconds until `model` is expected to serve: what is left of the current phase,
        then the loads queued ahead of it, then its own load."""
        left = 0.0
        if self.phase == Phase.LOADING and self.active is not None:
            left += max(self.estimate(self.active) - (now - self.phase_since), 1.0)
            if self.active == model:
                return _whole_seconds(left)
        elif self.phase == Phase.READY and self.queue:
            left += max(self.residency_until - now, 0.0)
        for queued in self.queue:
            left += self.estimate(queued)
            if queued == model:
                return _whole_seconds(left)
        return _whole_seconds(left + self.estimate(model))

    def next_deadline(self) -> float | None:
        """When `tick` has something to do next, or None when only an event can change things."""
        if self.phase is _READY:
            if self.queue:
                return self.residency_until
            if self.idle_timeout > 0 and self._idle(self.active):
                return self.last_activity + self.idle_timeout
        elif self.phase == Phase.DRAINING and not self.cut_sent:
            return self.drain_deadline
        return None

    # --- events ---------------------------------------------------------------------------

    def arrive(self, model: str, now: float, *, hold: bool) -> tuple[Decision, list[Effect]]:
        """A request for `model` (known to the registry) arrived."""
        if self.phase is _READY and model == self.active:
            self.inflight[model] = self.inflight.get(model, 0) + 1
            return _ADMIT, []
        failure = self.failures.get(model)
        if failure is not None and now < failure.until:
            return Refuse(failure.reason, _whole_seconds(failure.until - now)), []
        effects: list[Effect] = []
        self._want(model)
        self._pump(now, effects)
        if not hold:
            return Busy(self.promise(model, now)), effects
        if self.waiting_total >= self.max_waiting:
            return TooMany(self.retry_after(model, now)), effects
        waiter = self._next_waiter
        self._next_waiter += 1
        self.waiters.setdefault(model, {})[waiter] = None
        self.waiting_total += 1
        return Hold(waiter), effects

    def promise(self, model: str, now: float) -> int:
        """The Retry-After for a 503 answered now; remembered so that the model, once loaded,
        stays long enough for that client to come back."""
        seconds = self.retry_after(model, now)
        deadline = now + seconds + PROMISE_GRACE
        if deadline > self.promises.get(model, 0.0):
            self.promises[model] = deadline
        return seconds

    def give_up(self, model: str, waiter: int, now: float) -> list[Effect]:
        """A held waiter timed out or its client disconnected: forget it at once."""
        slot = self.waiters.get(model)
        if slot is None or waiter not in slot:
            return []
        del slot[waiter]
        if not slot:
            del self.waiters[model]
        self.waiting_total -= 1
        self.last_activity = max(self.last_activity, now)
        return []

    def finish(self, model: str, now: float) -> list[Effect]:
        """An admitted or released request ended (completed, failed, cut or disconnected)."""
        count = self.inflight.get(model, 0) - 1
        if count > 0:
            self.inflight[model] = count
        else:
            self.inflight.pop(model, None)
        self.last_activity = max(self.last_activity, now)
        if self.phase is _READY and not self.queue:
            return []  # nothing queued: only the idle timer can act, and `tick` runs that
        effects: list[Effect] = []
        self._pump(now, effects)
        return effects

    def load_done(self, model: str, now: float, error: str | None = None) -> list[Effect]:
        """The backend finished loading `model` (error None) or failed with `error`."""
        if self.phase != Phase.LOADING or model != self.active:
            return []
        effects: list[Effect] = []
        duration = now - self.phase_since
        waiters = tuple(self.waiters.pop(model, {}))
        self.waiting_total -= len(waiters)
        if self.last_switch is not None and self.last_switch.to_model == model:
            self.last_switch.finished_at = now
            self.last_switch.result = "failure" if error else "success"
        if error is None:
            self.durations.setdefault(model, deque(maxlen=DURATION_SAMPLES)).append(duration)
            self.failures.pop(model, None)
            self._set_phase(Phase.READY, now, effects)
            promised = self.promises.pop(model, 0.0)
            self.residency_until = max(
                now + self.min_residency, min(promised, now + MAX_PROMISE_HOLD)
            )
            if waiters:
                self.inflight[model] = self.inflight.get(model, 0) + len(waiters)
                effects.append(Release(model, waiters))
            self.last_activity = now
        else:
            previous = self.failures.get(model)
            count = previous.count + 1 if previous else 1
            backoff = min(self.failure_backoff * 2 ** (count - 1), self.failure_backoff_max)
            self.failures[model] = Failure(error, now, now + backoff, count)
            self.promises.pop(model, None)
            if waiters:
                effects.append(Reject(model, waiters, error))
            # Whatever the failed load left behind is removed before anything else loads.
            self._set_phase(Phase.UNLOADING, now, effects)
            effects.append(StartUnload(model, "failed"))
            self.last_activity = now
        self._pump(now, effects)
        return effects

    def unload_done(self, now: float) -> list[Effect]:
        if self.phase != Phase.UNLOADING:
            return []
        effects: list[Effect] = []
        self.active = None
        self._set_phase(Phase.IDLE, now, effects)
        self._pump(now, effects)
        return effects

    def lost(self, now: float) -> list[Effect]:
        """The loaded model went away on its own (process died, pod deleted, another replica
        switched). Its in-flight requests fail on their own; the next request reloads."""
        if self.phase not in (Phase.READY, Phase.DRAINING):
            return []
        effects: list[Effect] = []
        self.active = None
        self.target = None
        self._set_phase(Phase.IDLE, now, effects)
        self._pump(now, effects)
        return effects

    def adopt(self, model: str, now: float) -> list[Effect]:
        """At start-up the backend reported `model` already loaded and ready."""
        if self.phase != Phase.IDLE:
            return []
        effects: list[Effect] = []
        self.active = model
        self._set_phase(Phase.READY, now, effects)
        self.residency_until = now
        self.last_activity = now
        return effects

    def request_switch(self, model: str, now: float) -> list[Effect]:
        """An operator asked for `model` (`POST /proxy/models/switch`): clears its back-off."""
        self.failures.pop(model, None)
        effects: list[Effect] = []
        if (self.phase == Phase.READY and model == self.active) or (
            self.phase == Phase.LOADING and model == self.active
        ):
            return effects
        self._want(model)
        if self.phase == Phase.READY:
            self.residency_until = now  # an operator's word overrides the residency
        self._pump(now, effects)
        return effects

    def request_unload(self, now: float) -> list[Effect]:
        """An operator asked to unload now (`POST /proxy/unload`): drain, then unload.

        Models still queued load afterwards (their clients asked for them); a load in progress
        is not interrupted (the caller reports the conflict)."""
        effects: list[Effect] = []
        if self.phase == Phase.READY:
            self._begin_drain(None, now, effects, reason="requested")
            self._pump(now, effects)
        elif self.phase == Phase.DRAINING:
            self.target = None
            self.unload_reason = "requested"
            self._pump(now, effects)
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Timers: residency end, drain timeout, idle timeout."""
        effects: list[Effect] = []
        self._pump(now, effects)
        return effects

    # --- the policy -----------------------------------------------------------------------

    def _want(self, model: str) -> None:
        if model == self.active and self.phase == Phase.LOADING:
            return
        if model not in self.queue:
            self.queue[model] = None

    def _idle(self, model: str | None) -> bool:
        return (
            not self.queue
            and not self.waiting_total
            and (model is None or not self.inflight.get(model))
        )

    def _pump(self, now: float, effects: list[Effect]) -> None:
        """Advance as far as the state allows; called after every event."""
        if self.phase == Phase.IDLE:
            self._drop_failed_from_queue(now, effects)
            if self.queue:
                model, _ = self.queue.popitem(last=False)
                self._start_load(model, None, now, effects)
            return
        if self.phase == Phase.READY:
            self._drop_failed_from_queue(now, effects)
            self.queue.pop(self.active or "", None)
            if self.queue:
                if now < self.residency_until:
                    return
                target = next(iter(self.queue))
                self._begin_drain(target, now, effects, reason="switch")
            elif (
                self.idle_timeout > 0
                and self._idle(self.active)
                and now >= self.last_activity + self.idle_timeout
            ):
                self._begin_drain(None, now, effects, reason="idle")
            else:
                return
        if self.phase == Phase.DRAINING:
            active = self.active
            if active is None:  # cannot happen: DRAINING always has an active model
                self._set_phase(Phase.IDLE, now, effects)
                return
            if self.inflight.get(active):
                if now >= self.drain_deadline and not self.cut_sent:
                    self.cut_sent = True
                    effects.append(Cut(active))
                return
            if self.target is None:
                self._set_phase(Phase.UNLOADING, now, effects)
                effects.append(StartUnload(active, self.unload_reason))
            else:
                # Requests for the old model that arrived while draining stay queued behind.
                target = self.target
                self.queue.pop(target, None)
                self._start_load(target, active, now, effects)

    def _begin_drain(
        self, target: str | None, now: float, effects: list[Effect], *, reason: str
    ) -> None:
        self.target = target
        self.unload_reason = reason
        self.drain_deadline = now + self.drain_timeout
        self.cut_sent = False
        self._set_phase(Phase.DRAINING, now, effects)

    def _start_load(
        self, model: str, previous: str | None, now: float, effects: list[Effect]
    ) -> None:
        self.active = model
        self.target = None
        self.last_switch = SwitchRecord(previous, model, now)
        self._set_phase(Phase.LOADING, now, effects)
        effects.append(StartLoad(model, previous))

    def _drop_failed_from_queue(self, now: float, effects: list[Effect]) -> None:
        """Queued models in failure back-off would only fail again: fail their waiters now."""
        for model in [m for m in self.queue if m in self.failures]:
            failure = self.failures[model]
            if now >= failure.until:
                continue
            del self.queue[model]
            waiters = tuple(self.waiters.pop(model, {}))
            if waiters:
                self.waiting_total -= len(waiters)
                effects.append(Reject(model, waiters, failure.reason))

    def _set_phase(self, phase: Phase, now: float, effects: list[Effect]) -> None:
        self.phase = phase
        self.phase_since = now
        effects.append(PhaseChanged(self.active, phase, self.target))


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
