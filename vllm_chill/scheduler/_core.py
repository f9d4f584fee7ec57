"""The switch decision core: a pure state machine, no I/O, no clock of its own.

Every input is a method call carrying `now`; every output is a decision for the caller and a
list of effects for the driver (`switcher.py`) to carry out. That makes each choice — start a
load, hold, answer 503, drain, cut, unload — testable deterministically without sleeping.

The policy it implements is written once, with its numbers, in the README ("Switch policy");
the rule numbers below refer to it. In short: a model that is not being used gives way at once
(rule 3), a used one keeps serving for a window that grows with its load time (rule 4), and
every 503 is a promise kept per client until that client comes back (rule 5).

Several models can be resident at once when the capacity allows (`_placement.py`): a model that
fits beside the others loads at once; one that does not evicts the cheapest set of resident
models (idle first, least recently used first) under the same rules, drained before its load.
With one slot (no GPU accounting, or one Deployment) that is exactly the switch of one model.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

from vllm_chill._placement import (
    Capacity,
    Demand,
    Placement,
    SingleSlot,
    fits_ever,
    overlaps,
    plan_eviction,
)

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
#: Evictions remembered for `/proxy/status`.
EVICTIONS_KEPT = 20
#: Switches kept for the status page's timeline.
SWITCHES_KEPT = 20
#: Retry-After for the first wake of a sleeping model, before one was measured (vLLM's own
#: figures: 0.1-0.8 s for small models, 3-6 s for 30B-235B).
FIRST_WAKE_ESTIMATE = 5.0


class Phase(StrEnum):
    """A resident model's phase (IDLE: nothing resident, for the one-slot view)."""

    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"  # serves
    DRAINING = "draining"  # finishes its in-flight requests before it gives way or unloads
    UNLOADING = "unloading"  # the backend is unloading it
    SLEEPING = "sleeping"  # going to sleep (vLLM's sleep mode): its weights move to host RAM
    ASLEEP = "asleep"  # its process is kept; it holds only a reserve of its GPUs
    WAKING = "waking"  # its weights come back to its GPUs


#: For the per-request paths: an enum member looked up on its class costs ~0.3 µs a time.
_READY = Phase.READY


class ModelState(StrEnum):
    """What `/v1/models` reports for each model."""

    LOADED = "loaded"
    LOADING = "loading"
    SLEEPING = "sleeping"
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
    """Load `model` at `placement`; the models in `replacing` were drained to make room and
    are stopped as part of this load (on one slot: the switch from the previous model)."""

    model: str
    placement: Placement
    replacing: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartUnload:
    model: str
    reason: str  # "idle", "requested" or "failed" (cleanup after a failed load)


@dataclass(frozen=True)
class StartSleep:
    """Put `model` to sleep (it drained): its process stays, its GPU memory is freed."""

    model: str


@dataclass(frozen=True)
class StartWake:
    """Wake the sleeping `model` on the GPUs it is bound to."""

    model: str
    placement: Placement


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


Effect = StartLoad | StartUnload | StartSleep | StartWake | Release | Reject | Cut | PhaseChanged


@dataclass
class Failure:
    reason: str
    at: float
    until: float
    count: int


@dataclass(frozen=True)
class Eviction:
    """Why a resident model was chosen to give way, for `/proxy/status` and the log."""

    model: str
    for_model: str
    at: float
    reason: str  # "idle", "least recently used", "its window ended", "operator switch"


@dataclass
class Resident:
    """A model that holds capacity: loading, serving, draining or unloading."""

    model: str
    placement: Placement
    phase: Phase
    since: float
    demand: Demand = field(default_factory=Demand)
    #: Host memory its sleeping process holds (bytes), when the backend measured it.
    memory: int | None = None
    #: When it became ready, the end of its serving window, when a request for it last
    #: arrived or ended, and from which client.
    ready_at: float = 0.0
    serve_until: float = 0.0
    last_used: float = -math.inf
    last_user: str | None = None
    #: The idle timer counts from here (the end of its last request).
    last_activity: float = 0.0
    drain_deadline: float = math.inf
    cut_sent: bool = False
    unload_reason: str = "idle"
    #: DRAINING to make room: the model that loads in its place once it drained.
    making_room_for: str | None = None
    #: READY and chosen to make room, its turn not over yet: when it gives way.
    gives_way_at: float = math.inf


@dataclass
class Pending:
    """A model whose place is reserved while the models it replaces drain."""

    placement: Placement
    victims: tuple[str, ...]
    #: It wakes (it is asleep there) rather than loads.
    wake: bool = False
    demand: Demand = field(default_factory=Demand)
    #: Victims that could sleep but must stop: the reserve they would keep is needed.
    stop: frozenset[str] = frozenset()


@dataclass
class SwitchRecord:
    """One switch (a load or a wake), for `/proxy/status` and the status page's timeline."""

    from_model: str | None
    to_model: str
    started_at: float
    finished_at: float | None = None
    result: str | None = None  # "success" / "failure"
    kind: str = "cold"  # "cold" (a load) or "wake" (a sleeping model woken)
    #: Why it failed.
    error: str | None = None
    #: Its place in the order of switches since start-up (1, 2, ...).
    number: int = 0

    def end(self, now: float, error: str | None) -> None:
        self.finished_at = now
        self.result = "failure" if error else "success"
        self.error = error


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
    #: Share of each of its GPUs a sleeping model still holds (its CUDA context).
    sleep_reserve: float
    #: Most models asleep at once (0: no limit), and the host memory they may hold together
    #: (bytes; 0: no limit): over either, the least recently used sleeper is stopped for real.
    max_sleeping: int
    sleep_memory: int
    #: Where models can run; one slot unless told otherwise.
    capacity: Capacity = field(default_factory=SingleSlot)
    #: Most models resident at once (0: as many as the capacity holds).
    max_loaded: int = 0
    #: Loads in progress at once; they never share a GPU.
    max_concurrent_loads: int = 1

    residents: dict[str, Resident] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, dict[int, None]] = field(default_factory=dict)
    waiting_total: int = 0
    #: Models asked for and not resident, in the order of their first request, with their need.
    queue: OrderedDict[str, Demand] = field(default_factory=OrderedDict)
    failures: dict[str, Failure] = field(default_factory=dict)
    #: Per model and client (its address, or a running number when unknown), the 503 answers
    #: whose clients have not come back yet: (when the client was told to come back, when the
    #: promise lapses). A client that asks again replaces its own promise.
    promises: dict[str, OrderedDict[object, tuple[float, float]]] = field(default_factory=dict)
    durations: dict[str, deque[float]] = field(default_factory=dict)
    wake_durations: dict[str, deque[float]] = field(default_factory=dict)
    unload_durations: deque[float] = field(default_factory=lambda: deque(maxlen=DURATION_SAMPLES))
    #: The latest switches, oldest first.
    switches: deque[SwitchRecord] = field(default_factory=lambda: deque(maxlen=SWITCHES_KEPT))
    evictions: deque[Eviction] = field(default_factory=lambda: deque(maxlen=EVICTIONS_KEPT))
    #: Models an operator asked for, with the models serving at that moment: the switch does
    #: not wait for their windows or promises (rule 10).
    forced: dict[str, frozenset[str]] = field(default_factory=dict)
    #: When a queued model that waits for others' windows may take their place (for `tick`).
    blocked_until: dict[str, float] = field(default_factory=dict)
    _next_waiter: int = 0
    _next_anonymous: int = 0

    # --- the one-slot view (the switch of one model; `/proxy/status`) --------------------

    @property
    def last_switch(self) -> SwitchRecord | None:
        return self.switches[-1] if self.switches else None

    def _record(self, record: SwitchRecord) -> None:
        last = self.last_switch
        record.number = last.number + 1 if last else 1
        self.switches.append(record)

    def _end_switch(self, model: str, now: float, error: str | None) -> None:
        """The switch to `model` in progress ended (loads of several models may overlap)."""
        for record in reversed(self.switches):
            if record.to_model == model and record.finished_at is None:
                record.end(now, error)
                return

    @property
    def active(self) -> str | None:
        """The resident model that was made resident last (on one slot: the only one)."""
        if not self.residents:
            return None
        return next(reversed(self.residents))

    @property
    def phase(self) -> Phase:
        resident = self.residents.get(self.active or "")
        return resident.phase if resident is not None else Phase.IDLE

    @property
    def phase_since(self) -> float:
        resident = self.residents.get(self.active or "")
        return resident.since if resident is not None else 0.0

    @property
    def target(self) -> str | None:
        """While the active model drains to make room: the model that loads next."""
        resident = self.residents.get(self.active or "")
        return resident.making_room_for if resident is not None else None

    @property
    def serve_until(self) -> float:
        resident = self.residents.get(self.active or "")
        return resident.serve_until if resident is not None else 0.0

    # --- queries --------------------------------------------------------------------------

    def phase_of(self, model: str) -> Phase:
        resident = self.residents.get(model)
        return resident.phase if resident is not None else Phase.IDLE

    def state_of(self, model: str, now: float) -> ModelState:
        resident = self.residents.get(model)
        if resident is not None:
            if resident.phase in (Phase.READY, Phase.DRAINING):
                return ModelState.LOADED
            if resident.phase in (Phase.LOADING, Phase.WAKING):
                return ModelState.LOADING
            if resident.phase in (Phase.SLEEPING, Phase.ASLEEP):
                return ModelState.SLEEPING
        failure = self.failures.get(model)
        if failure is not None and now < failure.until:
            return ModelState.FAILED
        return ModelState.UNLOADED

    def is_serving(self, model: str) -> bool:
        """Whether a request for `model` would be admitted right now (the fast path)."""
        resident = self.residents.get(model)
        return resident is not None and resident.phase is _READY

    def fits(self, demand: Demand) -> bool:
        """Whether a model with this need can ever run here."""
        return fits_ever(self.capacity, demand)

    def free_capacity(self) -> dict[str, float]:
        return self.capacity.describe_free(self._used())

    def estimate(self, model: str) -> float:
        """Expected load time: the longest of the recent loads, the first-load estimate when
        none is known; for a sleeping model, the same of its wakes."""
        resident = self.residents.get(model)
        if resident is not None and resident.phase in (Phase.ASLEEP, Phase.WAKING):
            wakes = self.wake_durations.get(model)
            return max(wakes) if wakes else FIRST_WAKE_ESTIMATE
        samples = self.durations.get(model)
        return max(samples) if samples else self.first_load_estimate

    def unload_estimate(self) -> float:
        return max(self.unload_durations) if self.unload_durations else 0.0

    def load_remaining(self, model: str, now: float) -> float:
        """Seconds until the load of `model` in progress should end. Past its estimate the
        answer grows with the time already taken (rule 6): a load that overruns is not about
        to end, and "retry in 1 s" would only burn the client's retries."""
        resident = self.residents.get(model)
        elapsed = now - (resident.since if resident is not None else now)
        expected = self.estimate(model)
        if elapsed < expected:
            return expected - elapsed
        return max(RETRY_FLOOR, OVERRUN_RETRY_SHARE * elapsed)

    def retry_after(self, model: str, now: float, client: str | None = None) -> int:
        """Seconds until `model` is expected to serve (rule 6)."""
        resident = self.residents.get(model)
        if resident is not None:
            if resident.phase is _READY:
                return 1
            if resident.phase in (Phase.LOADING, Phase.WAKING):
                return _whole_seconds(self.load_remaining(model, now))
        if self.capacity.single:
            return self._retry_after_one_slot(model, now, client)
        return self._retry_after_pool(model, now, client)

    def _retry_after_one_slot(self, model: str, now: float, client: str | None) -> int:
        """What is left of the current phase, the models ahead of it (each loaded, and served
        for a window if somebody waits for it), then its own load."""
        left = 0.0
        phase = self.phase
        active = self.active
        #: Whether the next model to load must first wait for the active one to unload.
        unload_first = phase in (Phase.LOADING, Phase.READY)
        if phase is Phase.LOADING and active is not None:
            left = self.load_remaining(active, now) + self._expected_window(active)
        elif phase is _READY and active is not None:
            left = max(self._expected_switch(self.residents[active], now, client) - now, 0.0)
        elif phase is Phase.DRAINING:
            left = self.unload_estimate()
        elif phase is Phase.UNLOADING:
            left = max(self.unload_estimate() - (now - self.phase_since), 0.0)
        for queued in [*self.pending, *self.queue]:
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

    def _retry_after_pool(self, model: str, now: float, client: str | None) -> int:
        """Loads run one after another (`max_concurrent_loads` aside): what is left of the
        loads in progress and ahead in the queue, the wait for the models it replaces to give
        way and drain, then its own load."""
        left = sum(
            self.load_remaining(r.model, now)
            for r in self.residents.values()
            if r.phase in (Phase.LOADING, Phase.WAKING)
        ) / max(self.max_concurrent_loads, 1)
        pending = self.pending.get(model)
        if pending is not None:
            return _whole_seconds(left + self.unload_estimate() + self.estimate(model))
        for ahead in [*self.pending, *self.queue]:
            if ahead == model:
                break
            left += self.estimate(ahead) / max(self.max_concurrent_loads, 1)
        demand = self.queue.get(model, Demand())
        asleep = self.residents.get(model)
        if asleep is not None and asleep.phase is Phase.ASLEEP:
            return _whole_seconds(left + self.estimate(model))  # it wakes where it sleeps
        if self.capacity.place(demand, self._used()) is None:
            victims = self._plan(model, demand, now)
            if victims is not None:
                give_way = max(
                    (self._expected_switch(self.residents[v], now, client) for v in victims[1]),
                    default=now,
                )
                left = max(left, give_way - now) + self.unload_estimate()
        return _whole_seconds(left + self.estimate(model))

    def next_deadline(self) -> float | None:
        """When `tick` has something to do next, or None when only an event can change things."""
        deadlines = list(self.blocked_until.values())
        for resident in self.residents.values():
            if resident.phase is _READY:
                if self.idle_timeout > 0 and self._idle(resident):
                    deadlines.append(self._idle_at(resident))
            elif (
                resident.phase is Phase.DRAINING
                and not resident.cut_sent
                and self.inflight.get(resident.model)
            ):
                deadlines.append(resident.drain_deadline)
        return min(deadlines) if deadlines else None

    # --- events ---------------------------------------------------------------------------

    def arrive(
        self,
        model: str,
        now: float,
        *,
        hold: bool,
        client: str | None = None,
        demand: Demand | None = None,
    ) -> tuple[Decision, list[Effect]]:
        """A request for `model` (known to the registry) arrived from `client` (its address,
        when known: it is what tells a client coming back from a new one). `demand` is what
        the model needs of the capacity (default: what it was loaded with when resident, else
        one whole GPU)."""
        resident = self.residents.get(model)
        if resident is not None and resident.phase is _READY:
            resident.last_user = client
            if not self.queue and not self.promises:  # the common case: nothing to weigh
                self.inflight[model] = self.inflight.get(model, 0) + 1
                return _ADMIT, []
            if now < resident.gives_way_at:
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
        need = demand or (resident.demand if resident is not None else Demand())
        if not self.fits(need):
            free = ", ".join(f"{unit}={share:g}" for unit, share in self.free_capacity().items())
            return Refuse(
                f"model '{model}' needs {need}, more than this capacity has ({free})",
                _whole_seconds(self.failure_backoff_max),
            ), []
        effects = []
        self._redeem(model, now, client)
        self._want(model, need)
        self._pump(now, effects)
        if self.is_serving(model) and model not in self.queue:
            # It was asked for as its turn ended, and nothing needs its place any more.
            self.inflight[model] = self.inflight.get(model, 0) + 1
            return _ADMIT, effects
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
        for resident in self.residents.values():
            resident.last_activity = max(resident.last_activity, now)
        return []

    def finish(self, model: str, now: float) -> list[Effect]:
        """An admitted or released request ended (completed, failed, cut or disconnected)."""
        count = self.inflight.get(model, 0) - 1
        if count > 0:
            self.inflight[model] = count
        else:
            self.inflight.pop(model, None)
        resident = self.residents.get(model)
        if resident is not None:
            resident.last_activity = max(resident.last_activity, now)
            resident.last_used = now
        if not self.queue and not self.pending and (resident is None or resident.phase is _READY):
            return []  # nothing waits on it: only the idle timer can act, and `tick` runs that
        effects: list[Effect] = []
        self._pump(now, effects)
        return effects

    def load_done(self, model: str, now: float, error: str | None = None) -> list[Effect]:
        """The backend finished loading `model` (error None) or failed with `error`."""
        resident = self.residents.get(model)
        if resident is None or resident.phase != Phase.LOADING:
            return []
        effects: list[Effect] = []
        duration = now - resident.since
        waiters = tuple(self.waiters.pop(model, {}))
        self.waiting_total -= len(waiters)
        self._end_switch(model, now, error)
        resident.last_activity = now
        if error is None:
            self.durations.setdefault(model, deque(maxlen=DURATION_SAMPLES)).append(duration)
            self.failures.pop(model, None)
            self._set_phase(resident, Phase.READY, now, effects)
            self._begin_serving(
                resident, now, max(self.min_residency, SERVE_WINDOW_FACTOR * duration)
            )
            if waiters:
                self.inflight[model] = self.inflight.get(model, 0) + len(waiters)
                effects.append(Release(model, waiters))
        else:
            previous = self.failures.get(model)
            count = previous.count + 1 if previous else 1
            backoff = min(self.failure_backoff * 2 ** (count - 1), self.failure_backoff_max)
            self.failures[model] = Failure(error, now, now + backoff, count)
            self.promises.pop(model, None)
            if waiters:
                effects.append(Reject(model, waiters, error))
            # Whatever the failed load left behind is removed before its capacity is reused.
            resident.unload_reason = "failed"
            self._set_phase(resident, Phase.UNLOADING, now, effects)
            effects.append(StartUnload(model, "failed"))
        self._pump(now, effects)
        return effects

    def sleep_done(
        self, model: str, now: float, memory: int | None = None, error: str | None = None
    ) -> list[Effect]:
        """The backend put `model` to sleep, its process holding `memory` bytes of host RAM
        (when measured), or failed to (`error`): then it is stopped for real."""
        resident = self.residents.get(model)
        if resident is None or resident.phase is not Phase.SLEEPING:
            return []
        effects: list[Effect] = []
        if error is None:
            resident.memory = memory
            self._set_phase(resident, Phase.ASLEEP, now, effects)
            self._keep_sleep_budget(now, effects)
        else:
            resident.unload_reason = "sleep failed"
            self._set_phase(resident, Phase.UNLOADING, now, effects)
            effects.append(StartUnload(model, "sleep failed"))
        self._pump(now, effects)
        return effects

    def wake_done(self, model: str, now: float, error: str | None = None) -> list[Effect]:
        """The backend woke `model` (error None). A wake that failed stops the process, and the
        model then loads cold, its waiters still waiting."""
        resident = self.residents.get(model)
        if resident is None or resident.phase is not Phase.WAKING:
            return []
        effects: list[Effect] = []
        duration = now - resident.since
        self._end_switch(model, now, error)
        resident.last_activity = now
        if error is None:
            self.wake_durations.setdefault(model, deque(maxlen=DURATION_SAMPLES)).append(duration)
            self._set_phase(resident, Phase.READY, now, effects)
            # Rule 4 with the wake's cost: a cheap switch buys a short window.
            self._begin_serving(
                resident, now, max(self.min_residency, SERVE_WINDOW_FACTOR * duration)
            )
            waiters = tuple(self.waiters.pop(model, {}))
            self.waiting_total -= len(waiters)
            if waiters:
                self.inflight[model] = self.inflight.get(model, 0) + len(waiters)
                effects.append(Release(model, waiters))
        else:
            resident.unload_reason = "wake failed"
            self._set_phase(resident, Phase.UNLOADING, now, effects)
            effects.append(StartUnload(model, "wake failed"))
            self.queue[model] = resident.demand  # loads cold once the process is gone
            self.queue.move_to_end(model, last=False)
        self._pump(now, effects)
        return effects

    def unload_done(self, model: str, now: float) -> list[Effect]:
        resident = self.residents.get(model)
        if resident is None or resident.phase != Phase.UNLOADING:
            return []
        effects: list[Effect] = []
        self.unload_durations.append(now - resident.since)
        del self.residents[model]
        effects.append(PhaseChanged(model, Phase.IDLE))
        self._pump(now, effects)
        return effects

    def lost(self, model: str, now: float) -> list[Effect]:
        """A resident model went away on its own (process died, pod deleted, another replica
        switched). Its in-flight requests fail on their own; the next request reloads."""
        resident = self.residents.get(model)
        alive = (Phase.READY, Phase.DRAINING, Phase.SLEEPING, Phase.ASLEEP)
        if resident is None or resident.phase not in alive:
            return []
        effects: list[Effect] = []
        del self.residents[model]
        for pending in self.pending.values():
            if model in pending.victims:  # already gone: nothing to stop for it
                pending.victims = tuple(v for v in pending.victims if v != model)
        effects.append(PhaseChanged(model, Phase.IDLE))
        self._pump(now, effects)
        return effects

    def adopt(self, model: str, now: float, placement: Placement | None = None) -> list[Effect]:
        """At start-up the backend reported `model` already loaded and ready (at `placement`,
        default: wherever it fits)."""
        if model in self.residents:
            return []
        where = placement or self.capacity.place(Demand(), self._used())
        if where is None:
            return []
        effects: list[Effect] = []
        resident = self.residents[model] = Resident(model, where, Phase.READY, now)
        self._set_phase(resident, Phase.READY, now, effects)
        self._begin_serving(resident, now, self.min_residency)
        resident.last_activity = now
        return effects

    def request_switch(self, model: str, now: float, demand: Demand | None = None) -> list[Effect]:
        """An operator asked for `model` (`POST /proxy/models/switch`): clears its back-off,
        and its switch overrides serving windows and promises (rule 10)."""
        self.failures.pop(model, None)
        effects: list[Effect] = []
        resident = self.residents.get(model)
        if resident is not None and resident.phase in (_READY, Phase.LOADING):
            return effects
        need = demand or self.queue.get(model) or Demand()
        if not self.fits(need):
            return effects
        self._want(model, need)
        serving = frozenset(m for m, r in self.residents.items() if r.phase is _READY)
        self.forced[model] = self.forced.get(model, frozenset()) | serving
        self._pump(now, effects)
        return effects

    def request_unload(self, now: float, model: str | None = None) -> list[Effect]:
        """An operator asked to unload now (`POST /proxy/unload`): every serving model (or just
        `model`) drains, then unloads; a sleeping one stops.

        Models still queued load afterwards (their clients asked for them); a load in progress
        is not interrupted (the caller reports the conflict)."""
        effects: list[Effect] = []
        if model is not None:
            resident = self.residents.get(model)
            if resident is not None and resident.phase is _READY:
                self._begin_drain(resident, None, now, effects, reason="requested")
            elif resident is not None and resident.phase is Phase.ASLEEP:
                resident.unload_reason = "requested"
                self._set_phase(resident, Phase.UNLOADING, now, effects)
                effects.append(StartUnload(resident.model, "requested"))
            self._pump(now, effects)
            return effects
        for waiting, pending in list(self.pending.items()):
            # Its place was being made: it goes back to the head of the queue.
            del self.pending[waiting]
            self.queue[waiting] = pending.demand
            self.queue.move_to_end(waiting, last=False)
            for victim in pending.victims:
                resident = self.residents.get(victim)
                if resident is not None and resident.phase is Phase.DRAINING:
                    resident.making_room_for = None
                    resident.unload_reason = "requested"
        for resident in self.residents.values():
            if resident.phase is _READY:
                self._begin_drain(resident, None, now, effects, reason="requested")
            elif resident.phase is Phase.ASLEEP:  # its host memory is freed too
                resident.unload_reason = "requested"
                self._set_phase(resident, Phase.UNLOADING, now, effects)
                effects.append(StartUnload(resident.model, "requested"))
        self._pump(now, effects, place=False)
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Timers: end of a serving window or quiet gap, drain timeout, idle timeout."""
        effects: list[Effect] = []
        self._pump(now, effects)
        return effects

    # --- the policy -----------------------------------------------------------------------

    def _held(self, resident: Resident) -> Placement | None:
        """What a resident holds of the capacity: all of its place, or while it sleeps only
        the reserve for its CUDA context."""
        if resident.phase is Phase.ASLEEP:
            return self.capacity.while_asleep(resident.placement, self.sleep_reserve)
        return resident.placement

    def _used(self, *, but: str | None = None) -> list[Placement]:
        held = (self._held(r) for r in self.residents.values() if r.model != but)
        return [p for p in held if p is not None]

    def _want(self, model: str, demand: Demand) -> None:
        resident = self.residents.get(model)
        if resident is not None and resident.phase in (Phase.LOADING, Phase.WAKING):
            return
        if model not in self.queue and model not in self.pending:
            self.queue[model] = demand

    def _idle(self, resident: Resident) -> bool:
        """Nothing in flight on it and nobody waiting for it; on one slot, nobody waiting at
        all (a waiting model is a switch, not an idle timeout)."""
        if self.inflight.get(resident.model) or self.waiters.get(resident.model):
            return False
        return not (self.capacity.single and (self.queue or self.waiting_total))

    def _idle_at(self, resident: Resident) -> float:
        """When a ready model unloads if nothing happens: the idle timeout after its last
        request, and not before the clients it told to come back had their chance."""
        at = resident.last_activity + self.idle_timeout
        pending = self.promises.get(resident.model)
        if pending:
            promised = min(
                max(lapse for _, lapse in pending.values()),
                resident.ready_at + MAX_PROMISE_HOLD,
            )
            at = max(at, promised)
        return at

    def _begin_serving(self, resident: Resident, now: float, window: float) -> None:
        resident.ready_at = now
        resident.serve_until = now + window
        resident.last_used = now  # whoever it was loaded for is about to use it
        resident.last_user = None
        resident.gives_way_at = math.inf

    def _expected_window(self, model: str) -> float:
        """How long `model`, once loaded, is expected to keep its place before the next
        switch: its serving window if somebody waits for it, else nothing (it gives way at
        once)."""
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
            if self.is_serving(model) or pending[oldest][0] <= now + 1:
                del pending[oldest]
        if not pending:
            del self.promises[model]

    def _promised_until(self, resident: Resident, now: float) -> float:
        """The latest outstanding promise for a resident model, capped (rule 5)."""
        pending = self.promises.get(resident.model)
        if not pending:
            return 0.0
        latest = max(lapse for _, lapse in pending.values())
        if latest <= now:
            del self.promises[resident.model]
            return 0.0
        return min(latest, resident.ready_at + MAX_PROMISE_HOLD)

    def _expected_switch(self, resident: Resident, now: float, client: str | None) -> float:
        """When a ready model is expected to give way, as `client` asks for another: like
        `_hold_until`, except that a model someone else used within the quiet gap is expected
        to stay in use for its whole window (a Retry-After assumes its users carry on). The
        client that used it last is moving on: its switch comes at once."""
        in_use = self.inflight.get(resident.model) or (
            now < resident.last_used + self.quiet_gap
            and (client is None or client != resident.last_user)
        )
        if in_use:
            return max(resident.serve_until, self._promised_until(resident, now))
        return self._hold_until(resident, now)

    def _hold_until(self, resident: Resident, now: float) -> float:
        """When a ready model may give way to a waiting one (rules 3-5)."""
        if self.inflight.get(resident.model):
            until = resident.serve_until  # in use: it serves out its window
        else:
            # Quiet: it gives way once the quiet gap has passed, or at the end of its window.
            until = min(resident.serve_until, resident.last_used + self.quiet_gap)
        return max(until, self._promised_until(resident, now))

    def _candidates(self, claimed: set[str], but: str | None = None) -> list[Resident]:
        """Models that could give way, the cheapest first: idle before busy, then least
        recently used; sleeping ones last (they hold little, and stopping them loses a cheap
        wake)."""
        ready = [
            r
            for r in self.residents.values()
            if r.phase in (_READY, Phase.ASLEEP) and r.model not in claimed and r.model != but
        ]
        ready.sort(
            key=lambda r: (r.phase is Phase.ASLEEP, bool(self.inflight.get(r.model)), r.last_used)
        )
        return ready

    def _frees(
        self, resident: Resident, *, sleep: bool = True
    ) -> tuple[Placement | None, Placement | None]:
        """What giving way frees of a resident's place, and what it keeps: a model that goes
        to sleep keeps the reserve; a sleeping one that is stopped frees its reserve."""
        held = self._held(resident)
        if sleep and resident.phase is _READY and resident.demand.can_sleep:
            kept = self.capacity.while_asleep(resident.placement, self.sleep_reserve)
            if kept is not None and held is not None and held.fraction > kept.fraction:
                return Placement(held.units, held.fraction - kept.fraction), kept
        return held, None

    def _plan(
        self,
        model: str,
        demand: Demand,
        now: float,
        reserved: list[Placement] | None = None,
        claimed: set[str] | None = None,
        *,
        sleep: bool = True,
    ) -> tuple[Placement, tuple[str, ...]] | None:
        """Where `model` goes and which ready models give way for it; None when even all of
        them together do not make room (loads, drains or reservations hold the rest). With
        `sleep`, models that can sleep are counted as keeping their reserve."""
        claimed = claimed or set()
        waking = self.residents.get(model)
        capacity = self.capacity
        if waking is not None and waking.phase is Phase.ASLEEP:
            capacity = self.capacity.within(waking.placement)  # it wakes where it sleeps
        candidates = self._candidates(claimed, but=model)
        names = {r.model for r in candidates}
        kept = [
            p
            for r in self.residents.values()
            if r.model not in names and r.model != model
            for p in [self._held(r)]
            if p is not None
        ]
        kept += reserved or []
        freeable: list[tuple[str, Placement]] = []
        for candidate in candidates:
            frees, keeps = self._frees(candidate, sleep=sleep)
            if keeps is not None:
                kept.append(keeps)
            if frees is not None:
                freeable.append((candidate.model, frees))
            else:
                freeable.append((candidate.model, Placement(())))
        plan = plan_eviction(capacity, demand, kept, freeable)
        if plan is None:
            return None
        placement, victims = plan
        if self.max_loaded:
            # The cap counts models on GPUs: make room in numbers too, with the next cheapest.
            resident = self._on_gpus() - len(claimed) + len(self.pending) + 1
            extra = [r.model for r in candidates if r.model not in victims and r.phase is _READY]
            while resident - len(victims) > self.max_loaded and extra:
                victims = (*victims, extra.pop(0))
            if resident - len(victims) > self.max_loaded:
                return None
        return placement, victims

    def _pump(self, now: float, effects: list[Effect], *, place: bool = True) -> None:
        """Advance as far as the state allows; called after every event."""
        self._drop_failed_from_queue(now, effects)
        on_its_way = (Phase.LOADING, Phase.WAKING)
        for model in [m for m in self.queue if self.phase_of(m) in on_its_way]:
            del self.queue[model]  # on its way: its waiters are released when it is ready
        claimed = self._place_queue(now, effects) if place else set()
        self._serve_queued_ready(claimed, effects)
        self._idle_unloads(now, effects, claimed)
        self._drains(now, effects)

    def _serve_queued_ready(self, claimed: set[str], effects: list[Effect]) -> None:
        """A ready model can be in the queue: asked for once its turn was over (rule 4), it
        queues to load again after the models it gives way to. While it is still chosen to
        give way it stays queued; once nothing needs its place any more, it simply serves its
        waiters now."""
        for model in list(self.queue):
            resident = self.residents.get(model)
            if resident is None or resident.phase is not _READY or model in claimed:
                continue
            del self.queue[model]
            self.forced.pop(model, None)
            waiters = tuple(self.waiters.pop(model, {}))
            if waiters:
                self.waiting_total -= len(waiters)
                self.inflight[model] = self.inflight.get(model, 0) + len(waiters)
                effects.append(Release(model, waiters))

    def _place_queue(self, now: float, effects: list[Effect]) -> set[str]:
        """Start what fits; choose, and when their turn is over drain, what must give way.

        Strictly in queue order where room must be made: a model behind may only take room
        that nobody ahead of it needs, so no model waits for more than one turn of each model
        ahead of it (rule 2). Returns the ready models claimed by a switch still waiting."""
        for resident in self.residents.values():
            resident.gives_way_at = math.inf
        self.blocked_until.clear()
        reserved = [p.placement for p in self.pending.values()]
        claimed = {victim for p in self.pending.values() for victim in p.victims}
        loading = [
            r.placement for r in self.residents.values() if r.phase in (Phase.LOADING, Phase.WAKING)
        ]
        loads = len(loading) + len(self.pending)
        for model, demand in list(self.queue.items()):
            sleeper = self.residents.get(model)
            if sleeper is not None and sleeper.phase is not Phase.ASLEEP:
                continue  # still draining or unloading from before: it loads once gone
            if loads >= self.max_concurrent_loads:
                break
            count = self._on_gpus() - len(claimed) + len(self.pending)
            if not self.max_loaded or count < self.max_loaded:
                if sleeper is not None:  # it wakes where it sleeps, if its place is free
                    capacity = self.capacity.within(sleeper.placement)
                    need = Demand(len(sleeper.placement.units), sleeper.placement.fraction)
                    used = [*self._used(but=model), *reserved]
                    placement = sleeper.placement if capacity.place(need, used) else None
                else:
                    placement = self.capacity.place(demand, [*self._used(), *reserved])
                if placement is not None and not any(overlaps(placement, p) for p in loading):
                    del self.queue[model]
                    self.forced.pop(model, None)
                    if sleeper is not None:
                        self._start_wake(sleeper, now, effects)
                    else:
                        self._start_load(model, placement, (), now, effects, demand=demand)
                    loading.append(placement)
                    loads += 1
                    continue
            need = demand
            if sleeper is not None:
                need = Demand(len(sleeper.placement.units), sleeper.placement.fraction)
            plan = self._plan(model, need, now, reserved, claimed)
            stop: frozenset[str] = frozenset()
            if plan is None:
                # The reserves sleeping models keep may be what is missing: stop them instead.
                plan = self._plan(model, need, now, reserved, claimed, sleep=False)
                if plan is not None:
                    stop = frozenset(plan[1])
            if plan is None:
                break  # nothing can make room yet: loads and drains must end first
            placement, victims = plan
            reserved.append(placement)
            if not victims:
                continue  # it fits, on a GPU a load in progress uses: once that load ends
            overridden = self.forced.get(model, frozenset())
            residents = [self.residents[v] for v in victims]
            forced = all(r.model in overridden for r in residents)
            give_way = max(
                now
                if r.model in overridden or r.phase is Phase.ASLEEP
                else self._hold_until(r, now)
                for r in residents
            )
            claimed.update(victims)
            if now < give_way:
                self.blocked_until[model] = give_way
                for resident in residents:
                    resident.gives_way_at = min(resident.gives_way_at, give_way)
                continue
            del self.queue[model]
            self.forced.pop(model, None)
            for resident in residents:
                self.promises.pop(resident.model, None)  # its turn is over
                self.evictions.append(
                    Eviction(resident.model, model, now, self._why(resident, now, forced))
                )
                if resident.phase is Phase.ASLEEP:  # stopped for real: its reserve is needed
                    resident.unload_reason = "switch"
                    resident.making_room_for = model
                    self._set_phase(resident, Phase.UNLOADING, now, effects)
                    effects.append(StartUnload(resident.model, "switch"))
                else:
                    self._begin_drain(resident, model, now, effects, reason="switch")
            self.pending[model] = Pending(
                placement, victims, wake=sleeper is not None, demand=demand, stop=stop
            )
            loads += 1
        return claimed

    def _on_gpus(self) -> int:
        """Models counted against `max_loaded`: all but the sleeping ones."""
        return sum(r.phase is not Phase.ASLEEP for r in self.residents.values())

    def _why(self, resident: Resident, now: float, forced: bool) -> str:
        if resident.phase is Phase.ASLEEP:
            return "asleep, least recently used"
        if forced:
            return "operator switch"
        if self.inflight.get(resident.model):
            return "its window ended"
        if len(self.residents) == 1:
            return "not in use"
        return "idle, least recently used"

    def _idle_unloads(self, now: float, effects: list[Effect], claimed: set[str]) -> None:
        if self.idle_timeout <= 0:
            return
        for resident in list(self.residents.values()):
            if resident.phase is not _READY or resident.model in claimed:
                continue
            if not self._idle(resident) or now < self._idle_at(resident):
                continue
            self._promised_until(resident, now)  # drops lapsed promises
            if now < self._idle_at(resident):
                continue
            self._begin_drain(resident, None, now, effects, reason="idle")

    def _drains(self, now: float, effects: list[Effect]) -> None:
        """Cut what overstays its drain; unload what drained; load what was made room for."""
        for resident in list(self.residents.values()):
            if resident.phase is not Phase.DRAINING:
                continue
            if self.inflight.get(resident.model):
                if now >= resident.drain_deadline and not resident.cut_sent:
                    resident.cut_sent = True
                    effects.append(Cut(resident.model))
                continue
            target = resident.making_room_for
            pending = self.pending.get(target) if target is not None else None
            sleeps = (
                resident.demand.can_sleep
                and resident.unload_reason in ("idle", "switch")
                and (pending is None or resident.model not in pending.stop)
            )
            if sleeps:
                # Kept for a wake in seconds instead of a load in minutes.
                self._set_phase(resident, Phase.SLEEPING, now, effects)
                effects.append(StartSleep(resident.model))
            elif pending is None or pending.wake:
                # A wake starts no process that could replace it: it is stopped first.
                self._set_phase(resident, Phase.UNLOADING, now, effects)
                effects.append(StartUnload(resident.model, resident.unload_reason))
        loading = [
            r.placement for r in self.residents.values() if r.phase in (Phase.LOADING, Phase.WAKING)
        ]
        for model, pending in list(self.pending.items()):
            if not all(self._made_room(victim) for victim in pending.victims):
                continue
            if any(overlaps(pending.placement, p) for p in loading):
                continue  # loads never share a GPU: it starts when that one is done
            sleeper = self.residents.get(model)
            if sleeper is not None and sleeper.phase is not Phase.ASLEEP:
                continue  # its own old process is still going away: it loads once gone
            replaced = tuple(v for v in pending.victims if self.phase_of(v) is Phase.DRAINING)
            for victim in replaced:
                del self.residents[victim]
            for victim in pending.victims:
                if victim in self.residents:
                    self.residents[victim].making_room_for = None
            del self.pending[model]
            # Requests for the old models that arrived while draining stay queued behind.
            if pending.wake and sleeper is not None:
                self._start_wake(sleeper, now, effects)
            else:
                self._start_load(
                    model, pending.placement, replaced, now, effects, demand=pending.demand
                )
            loading.append(pending.placement)

    def _made_room(self, victim: str) -> bool:
        """Whether a model chosen to give way is out of the way: gone, asleep, or drained and
        about to be replaced by the load."""
        resident = self.residents.get(victim)
        if resident is None or resident.phase is Phase.ASLEEP:
            return True
        if resident.phase is not Phase.DRAINING or self.inflight.get(victim):
            return False
        target = self.pending.get(resident.making_room_for or "")
        return not resident.demand.can_sleep or (target is not None and victim in target.stop)

    def _begin_drain(
        self,
        resident: Resident,
        target: str | None,
        now: float,
        effects: list[Effect],
        *,
        reason: str,
    ) -> None:
        resident.making_room_for = target
        resident.unload_reason = reason
        resident.drain_deadline = now + self.drain_timeout
        resident.cut_sent = False
        resident.gives_way_at = math.inf
        self._set_phase(resident, Phase.DRAINING, now, effects)

    def _start_load(
        self,
        model: str,
        placement: Placement,
        replacing: tuple[str, ...],
        now: float,
        effects: list[Effect],
        *,
        demand: Demand,
    ) -> None:
        resident = Resident(model, placement, Phase.LOADING, now, demand=demand)
        self.residents[model] = resident
        previous = replacing[0] if replacing else None
        self._record(SwitchRecord(previous, model, now))
        self._set_phase(resident, Phase.LOADING, now, effects)
        effects.append(StartLoad(model, placement, replacing))

    def _start_wake(self, resident: Resident, now: float, effects: list[Effect]) -> None:
        self._record(SwitchRecord(None, resident.model, now, kind="wake"))
        resident.making_room_for = None
        self._set_phase(resident, Phase.WAKING, now, effects)
        effects.append(StartWake(resident.model, resident.placement))

    def _keep_sleep_budget(self, now: float, effects: list[Effect]) -> None:
        """Over `max_sleeping` or `sleep_memory`, the least recently used sleepers stop."""
        asleep = sorted(
            # Not one that is about to wake: room is being made for it.
            (
                r
                for r in self.residents.values()
                if r.phase is Phase.ASLEEP and r.model not in self.pending
            ),
            key=lambda r: r.last_used,
        )
        memory = sum(r.memory or 0 for r in asleep)
        while asleep and (
            (self.max_sleeping and len(asleep) > self.max_sleeping)
            or (self.sleep_memory and memory > self.sleep_memory)
        ):
            oldest = asleep.pop(0)
            memory -= oldest.memory or 0
            oldest.unload_reason = "sleep budget"
            self._set_phase(oldest, Phase.UNLOADING, now, effects)
            effects.append(StartUnload(oldest.model, "sleep budget"))

    def _drop_failed_from_queue(self, now: float, effects: list[Effect]) -> None:
        """Queued models in failure back-off would only fail again: fail their waiters now."""
        for model in [m for m in self.queue if m in self.failures]:
            failure = self.failures[model]
            if now >= failure.until:
                continue
            del self.queue[model]
            self.forced.pop(model, None)
            waiters = tuple(self.waiters.pop(model, {}))
            if waiters:
                self.waiting_total -= len(waiters)
                effects.append(Reject(model, waiters, failure.reason))

    def _set_phase(
        self, resident: Resident, phase: Phase, now: float, effects: list[Effect]
    ) -> None:
        resident.phase = phase
        resident.since = now
        effects.append(PhaseChanged(resident.model, phase, resident.making_room_for))


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
