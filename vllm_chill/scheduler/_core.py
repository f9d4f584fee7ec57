"""The switch decision core: a pure state machine, no I/O, no clock of its own.

Every input is a method call carrying `now`; every output is a decision for the caller and a
list of effects for the driver (`switcher.py`) to carry out. That makes each choice — start a
load, hold, answer 503, drain, cut, unload — testable deterministically without sleeping.

The policy it implements is written once, with its numbers, in the README ("Switch policy");
the rule numbers below refer to it. In short: a model that is not being used gives way at once
(rule 3), a used one keeps serving for a window that grows with its load time (rule 4), and
every 503 is a promise kept per client until that client comes back (rule 5).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

#: Load (and unload) durations remembered per model; the estimate is the longest of them, so
#: that a client told to come back usually finds the model ready (rule 6).
DURATION_SAMPLES = 3
#: Once a load runs past its estimate, clients are told to come back after this share of the
#: time it has taken so far, and never sooner than `RETRY_FLOOR` (rule 6).
OVERRUN_RETRY_SHARE = 0.25
RETRY_FLOOR = 2.0
#: Under contention a used model serves for this many times its own load time (rule 4): the
#: time spent serving is then at least 2.5 / 3.5 ≈ 71 % of the wall clock, whatever the load time.
SERVE_WINDOW_FACTOR = 2.5
#: A promise (a 503's Retry-After) protects its model this much past the promised time.
PROMISE_GRACE = 5.0
#: Promises never keep a model from giving way for longer than this after it became ready.
MAX_PROMISE_HOLD = 60.0
#: Outstanding promises remembered per model (a bound on memory under a 503 storm).
MAX_PROMISES = 10_000


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
    """The state machine. All methods are synchronous and must be called from one thread.

    The policy's parameters have no defaults here: they are the switching settings (their
    defaults and meaning are written once, in `vllm_chill.settings`), passed in by the switcher.
    """

    max_waiting: int
    #: The shortest serving window of a used model under contention (rule 4).
    min_residency: float
    #: A model with nothing in flight and no request for this long is not "in use" (rule 3).
    quiet_gap: float
    drain_timeout: float
    idle_timeout: float
    failure_backoff: float
    failure_backoff_max: float
    #: Retry-After for the first load of a model whose load time is not known yet.
    first_load_estimate: float

    phase: Phase = Phase.IDLE
    active: str | None = None
    #: During DRAINING: the model to load next, or None to unload.
    target: str | None = None
    unload_reason: str = "idle"
    phase_since: float = 0.0
    #: When the active model became ready, the end of its serving window, and when a request
    #: for it last arrived or ended.
    ready_at: float = 0.0
    serve_until: float = 0.0
    last_used: float = -math.inf
    #: The address of the last client of the active model, when known.
    last_user: str | None = None
    #: READY with a queue: when the switch may commit (kept for `next_deadline`).
    switch_at: float = math.inf
    drain_deadline: float = math.inf
    cut_sent: bool = False
    last_activity: float = 0.0
    inflight: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, dict[int, None]] = field(default_factory=dict)
    waiting_total: int = 0
    queue: OrderedDict[str, None] = field(default_factory=OrderedDict)
    failures: dict[str, Failure] = field(default_factory=dict)
    #: Per model and client (its address, or a running number when unknown), the 503 answers
    #: whose clients have not come back yet: (when the client was told to come back, when the
    #: promise lapses). A client that asks again replaces its own promise.
    promises: dict[str, OrderedDict[object, tuple[float, float]]] = field(default_factory=dict)
    durations: dict[str, deque[float]] = field(default_factory=dict)
    unload_durations: deque[float] = field(default_factory=lambda: deque(maxlen=DURATION_SAMPLES))
    last_switch: SwitchRecord | None = None
    _next_waiter: int = 0
    _next_anonymous: int = 0

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
        """Expected load time: the longest of the recent loads, 30 s when none is known."""
        samples = self.durations.get(model)
        return max(samples) if samples else self.first_load_estimate

    def unload_estimate(self) -> float:
        return max(self.unload_durations) if self.unload_durations else 0.0

    def load_remaining(self, model: str, now: float) -> float:
        """Seconds until the load of `model` in progress should end. Past its estimate the
        answer grows with the time already taken (rule 6): a load that overruns is not about
        to end, and "retry in 1 s" would only burn the client's retries."""
        elapsed = now - self.phase_since
        expected = self.estimate(model)
        if elapsed < expected:
            return expected - elapsed
        return max(RETRY_FLOOR, OVERRUN_RETRY_SHARE * elapsed)

    def retry_after(self, model: str, now: float, client: str | None = None) -> int:
        """Seconds until `model` is expected to serve: what is left of the current phase, the
        models ahead of it (each loaded, and served for a window if somebody waits for it),
        then its own load."""
        left = 0.0
        phase = self.phase
        active = self.active
        #: Whether the next model to load must first wait for the active one to unload.
        unload_first = phase in (Phase.LOADING, Phase.READY)
        if phase is Phase.LOADING and active is not None:
            left = self.load_remaining(active, now)
            if active == model:
                return _whole_seconds(left)
            left += self._expected_window(active)
        elif phase is _READY and active is not None:
            if model == active:
                return 1
            left = max(self._expected_switch(now, client) - now, 0.0)
        elif phase is Phase.DRAINING:
            left = self.unload_estimate()
        elif phase is Phase.UNLOADING:
            left = max(self.unload_estimate() - (now - self.phase_since), 0.0)
        for queued in self.queue:
            if unload_first:
                left += self.unload_estimate()
            unload_first = True
            left += self.estimate(queued)
            if queued == model:
                return _whole_seconds(left)
            left += self._expected_window(queued)
        if unload_first:
            left += self.unload_estimate()
        return _whole_seconds(left + self.estimate(model))

    def next_deadline(self) -> float | None:
        """When `tick` has something to do next, or None when only an event can change things."""
        if self.phase is _READY:
            if self.queue:
                return self.switch_at
            if self.idle_timeout > 0 and self._idle(self.active):
                return self._idle_at()
        elif self.phase == Phase.DRAINING and not self.cut_sent:
            return self.drain_deadline
        return None

    # --- events ---------------------------------------------------------------------------

    def arrive(
        self, model: str, now: float, *, hold: bool, client: str | None = None
    ) -> tuple[Decision, list[Effect]]:
        """A request for `model` (known to the registry) arrived from `client` (its address,
        when known: it is what tells a client coming back from a new one)."""
        if self.phase is _READY and model == self.active:
            self.last_user = client
            if not self.queue and not self.promises:  # the common case: nothing to weigh
                self.inflight[model] = self.inflight.get(model, 0) + 1
                return _ADMIT, []
            if not self.queue or now < self.switch_at:
                self.inflight[model] = self.inflight.get(model, 0) + 1
                self._redeem(model, now, client)
                effects: list[Effect] = []
                if self.queue:
                    self._pump(now, effects)  # in use now: the switch may wait longer
                return _ADMIT, effects
            # Its turn is over: the switch commits before this request, which queues.
        failure = self.failures.get(model)
        if failure is not None and now < failure.until:
            return Refuse(failure.reason, _whole_seconds(failure.until - now)), []
        effects = []
        self._redeem(model, now, client)
        self._want(model)
        self._pump(now, effects)
        if not hold:
            return Busy(self.promise(model, now, client)), effects
        if self.waiting_total >= self.max_waiting:
            return TooMany(self.promise(model, now, client)), effects
        waiter = self._next_waiter
        self._next_waiter += 1
        self.waiters.setdefault(model, {})[waiter] = None
        self.waiting_total += 1
        return Hold(waiter), effects

    def promise(self, model: str, now: float, client: str | None = None) -> int:
        """The Retry-After for a 503 answered now to `client`. Remembered until that client
        comes back or the promised time plus a grace passes: a model that loads keeps serving
        until its promised clients returned (rule 5)."""
        seconds = self.retry_after(model, now, client)
        pending = self.promises.get(model)
        if pending is None:
            pending = self.promises[model] = OrderedDict()
        key: object = client
        if client is None:
            key = self._next_anonymous = self._next_anonymous + 1  # unknown: each its own
        pending.pop(key, None)
        pending[key] = (now + seconds, now + seconds + PROMISE_GRACE)
        if len(pending) > MAX_PROMISES:
            pending.popitem(last=False)
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
        if model == self.active:
            self.last_used = now
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
            self._begin_serving(now, max(self.min_residency, SERVE_WINDOW_FACTOR * duration))
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
        self.unload_durations.append(now - self.phase_since)
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
        self._begin_serving(now, self.min_residency)
        self.last_activity = now
        return effects

    def request_switch(self, model: str, now: float) -> list[Effect]:
        """An operator asked for `model` (`POST /proxy/models/switch`): clears its back-off."""
        self.failures.pop(model, None)
        effects: list[Effect] = []
        if self.phase in (Phase.READY, Phase.LOADING) and model == self.active:
            return effects
        self._want(model)
        if self.phase == Phase.READY:
            # An operator's word overrides the serving window and the promises.
            self.serve_until = now
            self.last_used = -math.inf
            self.promises.pop(self.active or "", None)
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
        """Timers: end of a serving window or quiet gap, drain timeout, idle timeout."""
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

    def _idle_at(self) -> float:
        """When the ready model unloads if nothing happens: the idle timeout after the last
        request, and not before the clients it told to come back had their chance."""
        at = self.last_activity + self.idle_timeout
        pending = self.promises.get(self.active or "")
        if pending:
            promised = min(
                max(lapse for _, lapse in pending.values()), self.ready_at + MAX_PROMISE_HOLD
            )
            at = max(at, promised)
        return at

    def _begin_serving(self, now: float, window: float) -> None:
        self.ready_at = now
        self.serve_until = now + window
        self.last_used = now  # whoever it was loaded for is about to use it
        self.last_user = None
        self.switch_at = math.inf

    def _expected_window(self, model: str) -> float:
        """How long `model`, once loaded, is expected to keep the GPU before the next switch:
        its serving window if somebody waits for it, else nothing (it gives way at once)."""
        if self.waiters.get(model) or self.promises.get(model):
            return max(self.min_residency, SERVE_WINDOW_FACTOR * self.estimate(model))
        return 0.0

    def _redeem(self, model: str, now: float, client: str | None) -> None:
        """A request for `model` arrived from `client`: that client's promise is kept (rule 5).

        From an unknown address, a guess: once the model serves, any request redeems the oldest
        promise; while it loads, only one that is due (a client back when it was told)."""
        pending = self.promises.get(model)
        if pending is None:
            return
        if client is not None:
            pending.pop(client, None)
        elif pending:
            oldest = next(iter(pending))
            if (self.phase is _READY and model == self.active) or pending[oldest][0] <= now + 1:
                del pending[oldest]
        if not pending:
            del self.promises[model]

    def _promised_until(self, model: str, now: float) -> float:
        """The latest outstanding promise for the active model, capped (rule 5)."""
        pending = self.promises.get(model)
        if not pending:
            return 0.0
        latest = max(lapse for _, lapse in pending.values())
        if latest <= now:
            del self.promises[model]
            return 0.0
        return min(latest, self.ready_at + MAX_PROMISE_HOLD)

    def _expected_switch(self, now: float, client: str | None) -> float:
        """When a switch away from the ready active model is expected, as `client` asks for
        another: like `_hold_until`, except that a model someone else used within the quiet
        gap is expected to stay in use for its whole window (a Retry-After assumes its users
        carry on). The client that used it last is moving on: its switch comes at once."""
        active = self.active or ""
        in_use = self.inflight.get(active) or (
            now < self.last_used + self.quiet_gap and (client is None or client != self.last_user)
        )
        if in_use:
            return max(self.serve_until, self._promised_until(active, now))
        return self._hold_until(now)

    def _hold_until(self, now: float) -> float:
        """When a switch away from the ready active model may commit (rules 3-5)."""
        active = self.active or ""
        if self.inflight.get(active):
            until = self.serve_until  # in use: it serves out its window
        else:
            # Quiet: it gives way once the quiet gap has passed, or at the end of its window.
            until = min(self.serve_until, self.last_used + self.quiet_gap)
        return max(until, self._promised_until(active, now))

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
                until = self._hold_until(now)
                if now < until:
                    self.switch_at = until
                    return
                self.switch_at = math.inf
                self.promises.pop(self.active or "", None)  # its turn is over
                target = next(iter(self.queue))
                self._begin_drain(target, now, effects, reason="switch")
            elif self.idle_timeout > 0 and self._idle(self.active) and now >= self._idle_at():
                self._promised_until(self.active or "", now)  # drops lapsed promises
                if now < self._idle_at():
                    return
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
