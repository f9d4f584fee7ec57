"""The switch driver: runs the decision core's effects against a backend, with real time.

The core (`core.py`) decides; this module does the I/O: it runs loads and unloads as owned
tasks, wakes held requests, cancels drained-out requests, keeps the timer that fires the
core's deadlines, and feeds logs and metrics. All state changes happen on the event loop
thread, between awaits, so no lock is needed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from vllm_chill._model import VLLMModel
from vllm_chill._placement import Demand, Placement
from vllm_chill.backends._base import Backend, LoadedModel, LoadError, SleepingBackend
from vllm_chill.observability._logs import get_logger
from vllm_chill.observability._metrics import Metrics
from vllm_chill.registries._base import ModelRegistry
from vllm_chill.scheduler._changes import Changes
from vllm_chill.scheduler._core import (
    Admit,
    Busy,
    Cut,
    Effect,
    Hold,
    ModelState,
    Phase,
    PhaseChanged,
    Refuse,
    Reject,
    Release,
    StartLoad,
    StartSleep,
    StartUnload,
    StartWake,
    SwitchCore,
    SwitchRecord,
    TooMany,
)
from vllm_chill.scheduler._refusals import LoadFailed, ModelLoading, NotRunning, TooManyWaiting
from vllm_chill.settings._schema import LimitsSettings, SleepSettings, SwitchingSettings

log = get_logger(__name__)

#: Longest an unload may take before it is reported as failed (the state still moves on).
UNLOAD_TIMEOUT = 120.0


def demand_of(model: VLLMModel, *, can_sleep: bool = False) -> Demand:
    """What a model declares it needs: `tensorParallelSize` GPUs with `gpuMemoryUtilization`
    of each (vLLM pre-allocates exactly that share); unset, one whole GPU. It sleeps instead of
    stopping when it has `enableSleepMode` and the backend can put it to sleep."""
    return Demand(
        model.tensor_parallel_size or 1,
        model.gpu_memory_utilization or 1.0,
        can_sleep=can_sleep and bool(model.enable_sleep_mode),
    )


#: Where a container's memory limit is written (cgroup v2, then v1).
CGROUP_MEMORY_LIMITS = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)


def host_memory_share(share: float = 0.5) -> int:
    """`share` of the memory this process may use, in bytes: the machine's, or its
    container's limit when lower (0 where the system does not say). Reads two small files,
    once, while the switcher is built."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path, encoding="ascii") as limit_file:
                text = limit_file.read().strip()
        except OSError:
            continue
        if text.isdigit() and (not total or int(text) < total):
            total = int(text)
        break
    return int(total * share)


@dataclass(eq=False, slots=True)
class Lease:
    """An in-flight slot on a ready model.

    `on_cut`, set by whoever serves the request, is called when the switch's drain timeout
    passes with the request still in flight: it must end the request (the middleware cancels
    its relay). A plain callback rather than a cancel scope per request: entering and leaving
    an anyio scope costs more than the rest of the switch's request path together."""

    model: str
    upstream: LoadedModel
    released: bool = False
    on_cut: Callable[[], None] | None = None


@dataclass
class _Waiter:
    model: str
    event: anyio.Event = field(default_factory=anyio.Event)
    outcome: str | None = None  # "released" / "rejected"
    reason: str = ""
    #: Made when the waiter is released, so that its in-flight slot exists (and is released
    #: exactly once) whether or not the waiting task ever runs again.
    lease: Lease | None = None


class Switcher:
    def __init__(
        self,
        backend: Backend,
        registry: ModelRegistry,
        switching: SwitchingSettings,
        limits: LimitsSettings,
        metrics: Metrics,
        *,
        sleep: SleepSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        sleep = sleep or SleepSettings()
        self.sleep_settings = sleep
        self.can_sleep = isinstance(backend, SleepingBackend)
        self.backend = backend
        self.registry = registry
        self.switching = switching
        self.metrics = metrics
        self.clock = clock
        self.core = SwitchCore(
            max_waiting=limits.max_waiting,
            min_residency=switching.min_residency,
            quiet_gap=switching.quiet_gap,
            drain_timeout=switching.drain_timeout,
            idle_timeout=switching.idle_timeout,
            failure_backoff=switching.failure_backoff,
            failure_backoff_max=switching.failure_backoff_max,
            first_load_estimate=switching.first_load_estimate,
            sleep_reserve=sleep.reserve,
            max_sleeping=sleep.max_sleeping,
            sleep_memory=host_memory_share() if sleep.memory is None else sleep.memory,
            capacity=backend.capacity,
            max_loaded=switching.max_loaded,
            max_concurrent_loads=switching.max_concurrent_loads,
        )
        #: Where each ready model answers.
        self.loaded: dict[str, LoadedModel] = {}
        #: What each load in progress is doing, as its backend reports it.
        self.progress: dict[str, str] = {}
        #: Bumped whenever the state shown by `/proxy/status` moves (for event streams).
        self.changes = Changes()
        self._demands: dict[str, tuple[VLLMModel, Demand]] = {}
        self.running = False
        self._tg: TaskGroup | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._leases: dict[str, set[Lease]] = {}
        self._wake = anyio.Event()
        self._timer_at = math.inf
        self._was_active: tuple[set[str], set[str]] = (set(), set())
        self._stop_requested = False
        self.stopped = anyio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open a backend session, adopt what it already runs, and drive timers until `stop()`.

        Loads and unloads run in a task group inside the session: they end before it does, and
        held requests are answered before the backend takes its time to stop."""
        try:
            async with self.backend.session(self._on_lost) as loaded:
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        # A backend may learn its capacity as its session opens (the GPUs of
                        # its Deployments).
                        self.core.capacity = self.backend.capacity
                        found = [loaded] if isinstance(loaded, LoadedModel) else loaded or []
                        for model in found:
                            name = model.served_model_name
                            if self.registry.get(name) is None:
                                continue
                            self.loaded[name] = model
                            self._apply(self.core.adopt(name, self.clock(), model.placement))
                            log.info("adopted model=%s already loaded", name)
                        self.running = True
                        task_status.started()
                        await self._timer()
                        tg.cancel_scope.cancel()  # loads and unloads in progress end here
                finally:
                    self.running = False
                    self._tg = None
                    self._fail_all_waiters("the proxy is shutting down")
        finally:
            self.stopped.set()

    def stop(self) -> None:
        """Ask `run` to finish: in-progress loads are cancelled, held requests answered, the
        backend stopped. The caller waits on `stopped` (with its own timeout)."""
        self._stop_requested = True
        self._wake.set()

    def nudge(self) -> None:
        """Re-read the clock now (for a caller that drives `clock` by hand, as tests do)."""
        self._timer_at = -math.inf
        self._wake.set()

    async def _timer(self) -> None:
        while not self._stop_requested:
            deadline = self.core.next_deadline()
            self._timer_at = math.inf if deadline is None else deadline
            self._wake = anyio.Event()
            delay = self._timer_at - self.clock()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._wake.wait()
            if not self._stop_requested:
                self._apply(self.core.tick(self.clock()))

    # --- the request path -----------------------------------------------------------------

    async def acquire(
        self,
        model: str,
        hold: float,
        client: str | None = None,
        on_hold: Callable[[], Awaitable[None]] | None = None,
    ) -> Lease:
        """An in-flight slot on `model` once it is ready, or a `Refused` saying why not.
        `client` (the caller's address) lets a 503's promise be kept per client. `on_hold`
        is awaited when the request is to be held, before it waits (and counted waiting
        already: however it ends, the count is handed back once)."""
        if not self.running:
            raise NotRunning(model)
        # A model serving already has its need on record: no lookup on the common path.
        demand = None if self.core.is_serving(model) else self._demand(model)
        decision, effects = self.core.arrive(
            model, self.clock(), hold=hold > 0, client=client, demand=demand
        )
        if type(decision) is Admit:
            if effects:  # the common case has none, and no deadline moved earlier
                self._apply(effects)
            return self._lease(model)
        self._apply(effects)  # even with no effects: a switch may be due sooner now
        if isinstance(decision, Hold):
            return await self._hold(model, decision.waiter, hold, client, on_hold)
        if isinstance(decision, Busy):
            raise self._loading(model, decision.retry_after)
        if isinstance(decision, Refuse):
            raise LoadFailed(model, decision.retry_after, decision.reason)
        if isinstance(decision, TooMany):
            raise TooManyWaiting(model, decision.retry_after)
        raise AssertionError(decision)

    def _demand(self, name: str) -> Demand | None:
        """The model's need of the capacity, remembered per definition (a changed manifest
        is a new object, so a new need)."""
        model = self.registry.get(name)
        if model is None:
            return None
        known = self._demands.get(name)
        if known is None or known[0] is not model:
            known = self._demands[name] = (model, demand_of(model, can_sleep=self.can_sleep))
        return known[1]

    async def _hold(
        self,
        model: str,
        waiter_id: int,
        hold: float,
        client: str | None,
        on_hold: Callable[[], Awaitable[None]] | None = None,
    ) -> Lease:
        waiter = _Waiter(model)
        self._waiters[waiter_id] = waiter
        gauge = self.metrics.model(model).waiting
        gauge.inc()
        try:
            if on_hold is not None:
                await on_hold()
            with anyio.move_on_after(hold):
                await waiter.event.wait()
        except BaseException:
            # The client went away while held: forget it at once, or hand back its slot.
            if waiter.lease is not None:
                self.finish(waiter.lease)
            else:
                self._forget(model, waiter_id)
            raise
        finally:
            gauge.dec()
        if waiter.lease is not None:
            return waiter.lease
        if waiter.outcome == "rejected":
            raise LoadFailed(model, 1, waiter.reason)
        self._forget(model, waiter_id)
        raise self._loading(model, self.core.promise(model, self.clock(), client))

    def _forget(self, model: str, waiter_id: int) -> None:
        self._waiters.pop(waiter_id, None)
        self._apply(self.core.give_up(model, waiter_id, self.clock()))

    def _lease(self, model: str) -> Lease:
        """The in-flight slot the core just counted for `model`, or — should the model have
        gone in the meantime — that count handed back and a 503."""
        lease = self._make_lease(model)
        if lease is None:
            raise self._loading(model, self.core.promise(model, self.clock()))
        return lease

    def _make_lease(self, model: str) -> Lease | None:
        upstream = self.loaded.get(model)
        if upstream is None:
            self._apply(self.core.finish(model, self.clock()))
            return None
        lease = Lease(model, upstream)
        leases = self._leases.get(model)
        if leases is None:
            leases = self._leases[model] = set()
        leases.add(lease)
        return lease

    def finish(self, lease: Lease) -> None:
        """The request on `lease` ended, however it ended. Idempotent."""
        if lease.released:
            return
        lease.released = True
        leases = self._leases.get(lease.model)
        if leases is not None:
            leases.discard(lease)
        self._apply(self.core.finish(lease.model, self.clock()))

    def promise(self, model: str, client: str | None = None) -> int:
        """The Retry-After for a 503 about `model` answered now (remembered as a promise)."""
        return self.core.promise(model, self.clock(), client)

    def loading_phase(self, model: str) -> str:
        """What a request held for `model` waits on now: the `phase` its 503 would show
        ("ready" once the model serves)."""
        if self.core.is_serving(model):
            return "ready"
        return str(self._loading(model, 0).details["phase"])

    # --- operator actions -----------------------------------------------------------------

    def request_switch(self, model: str) -> ModelState:
        self._apply(self.core.request_switch(model, self.clock(), self._demand(model)))
        return self.core.state_of(model, self.clock())

    def request_unload(self, model: str | None = None) -> bool:
        """Unload every model, or just `model`; False when a load (of that model) is in
        progress: it is not interrupted."""
        loading = (Phase.LOADING, Phase.WAKING)
        if model is None:
            if any(r.phase in loading for r in self.core.residents.values()):
                return False
        elif self.core.phase_of(model) in loading:
            return False
        self._apply(self.core.request_unload(self.clock(), model))
        return True

    # --- effects --------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        if effects:
            self.changes.bump()
        for effect in effects:
            if isinstance(effect, Release):
                self._release(effect.model, effect.waiters)
            elif isinstance(effect, Reject):
                self._resolve(effect.waiters, "rejected", effect.reason)
            elif isinstance(effect, StartLoad):
                self._spawn(self._load, effect.model, effect.placement, effect.replacing)
            elif isinstance(effect, StartUnload):
                self._spawn(self._unload, effect.model, effect.reason)
            elif isinstance(effect, StartSleep):
                self.loaded.pop(effect.model, None)  # no new lease until it is awake again
                self._spawn(self._put_to_sleep, effect.model)
            elif isinstance(effect, StartWake):
                self._spawn(self._wake_up, effect.model)
            elif isinstance(effect, Cut):
                leases = self._leases.get(effect.model, ())
                log.warning(
                    "switch phase=cut model=%s requests=%d drain_timeout=%.0fs",
                    effect.model,
                    len(leases),
                    self.switching.drain_timeout,
                )
                # Each cut request's slot is handed back here and now, whether or not its task
                # has run since (a released waiter may not have): the drain can never wedge.
                for lease in list(leases):
                    if lease.on_cut is not None:
                        lease.on_cut()
                    self.finish(lease)
            elif isinstance(effect, PhaseChanged):
                self._on_phase(effect)
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._timer_at = deadline
            self._wake.set()

    def _spawn(self, func: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("switcher is not running")
        self._tg.start_soon(func, *args)

    def _release(self, model: str, waiter_ids: tuple[int, ...]) -> None:
        for waiter_id in waiter_ids:
            waiter = self._waiters.pop(waiter_id, None)
            lease = self._make_lease(model)
            if waiter is None:  # cannot happen: a waiter leaves the core before it leaves us
                if lease is not None:
                    self.finish(lease)
                continue
            if lease is None:
                waiter.outcome = "rejected"
                waiter.reason = f"model {model!r} went away as it became ready"
            else:
                waiter.outcome = "released"
                waiter.lease = lease
            waiter.event.set()

    def _resolve(self, waiter_ids: tuple[int, ...], outcome: str, reason: str) -> None:
        for waiter_id in waiter_ids:
            waiter = self._waiters.pop(waiter_id, None)
            if waiter is None:
                continue
            waiter.outcome = outcome
            waiter.reason = reason
            waiter.event.set()

    def _fail_all_waiters(self, reason: str) -> None:
        now = self.clock()
        for waiter_id, waiter in self._waiters.items():
            self.core.give_up(waiter.model, waiter_id, now)
            waiter.outcome = "rejected"
            waiter.reason = reason
            waiter.event.set()
        self._waiters.clear()

    def _on_phase(self, effect: PhaseChanged) -> None:
        core = self.core
        if effect.phase is Phase.DRAINING:
            inflight = core.inflight.get(effect.model or "", 0)
            eviction = next(
                (
                    e
                    for e in reversed(core.evictions)
                    if e.model == effect.model and e.for_model == effect.target
                ),
                None,
            )
            why = ""
            if eviction is not None:
                why = f" why={eviction.reason!r}"
                self.metrics.evictions.labels(eviction.reason).inc()
            log.info(
                "switch phase=draining model=%s next=%s in_flight=%d%s",
                effect.model,
                effect.target or "-",
                inflight,
                why,
            )
        serving = {
            r.model for r in core.residents.values() if r.phase in (Phase.READY, Phase.DRAINING)
        }
        resident = set(core.residents)
        if (serving, resident) != self._was_active:
            self._was_active = (serving, resident)
            known = [m.served_model_name for m in self.registry.models()]
            self.metrics.set_active(serving, resident, known)

    def _on_progress(self, model: str, started: float) -> Callable[[str], None]:
        def progress(phase: str) -> None:
            if self.core.phase_of(model) not in (Phase.LOADING, Phase.WAKING):
                return
            self.progress[model] = phase
            self.changes.bump()
            log.info(
                "switch phase=%r model=%s elapsed=%.1fs",
                phase,
                model,
                self.clock() - started,
            )

        return progress

    def _on_lost(self, reason: str, *, model: str | None = None) -> None:
        """A backend's word that a model went away on its own (`model` None: whatever one
        model it runs)."""
        if model is None:
            serving = [
                r.model
                for r in self.core.residents.values()
                if r.phase in (Phase.READY, Phase.DRAINING)
            ]
            if len(serving) != 1:
                return
            model = serving[0]
        if self.core.phase_of(model) not in (Phase.READY, Phase.DRAINING):
            return
        log.warning("switch phase=lost model=%s reason=%s", model, reason)
        self.loaded.pop(model, None)
        self._apply(self.core.lost(model, self.clock()))
        # Requests still relaying to the lost server end on their own (its connections are
        # gone, or the upstream timeout ends them); they no longer count against a reload.
        for lease in list(self._leases.get(model, ())):
            self.finish(lease)

    async def _load(self, name: str, placement: Placement, replacing: tuple[str, ...]) -> None:
        started = self.clock()
        self.progress[name] = "starting"
        previous = replacing[0] if replacing else None
        log.info(
            "switch phase=loading model=%s from=%s placement=%s",
            name,
            ",".join(replacing) or "-",
            placement,
        )
        for gone in replacing:
            self.loaded.pop(gone, None)
        if not replacing:
            self.metrics.scale_events.labels("up", "request").inc()
        error: str | None = None
        model = self.registry.get(name)
        try:
            if model is None:
                raise LoadError(f"model {name!r} is no longer defined")
            with anyio.fail_after(self.switching.model_switch_timeout):
                self.loaded[name] = await self.backend.load(
                    model,
                    self._on_progress(name, started),
                    placement=placement,
                    replacing=replacing,
                )
        except TimeoutError:
            error = (
                f"model {name!r} did not become ready within "
                f"{self.switching.model_switch_timeout:.0f}s (--model-switch-timeout); "
                f"last phase: {self.progress.get(name, 'starting')}"
            )
        except LoadError as exc:
            error = exc.reason
        except Exception as exc:
            log.exception("switch phase=error model=%s: backend raised", name)
            error = f"backend error: {type(exc).__name__}: {exc}"
        elapsed = self.clock() - started
        result = "failure" if error else "success"
        self.metrics.switches.labels(previous or "", name, result, "cold").inc()
        self.metrics.switch_duration.labels(name, result).observe(elapsed)
        if error:
            self.loaded.pop(name, None)
            log.error("switch phase=failed model=%s elapsed=%.1fs reason=%s", name, elapsed, error)
        else:
            log.info("switch phase=ready model=%s kind=cold elapsed=%.1fs", name, elapsed)
        self.progress.pop(name, None)
        self._apply(self.core.load_done(name, self.clock(), error))

    async def _put_to_sleep(self, name: str) -> None:
        started = self.clock()
        level = self.sleep_settings.level
        log.info("switch phase=sleeping model=%s level=%d", name, level)
        memory: int | None = None
        error: str | None = None
        backend = self.backend
        try:
            if not isinstance(backend, SleepingBackend):
                raise LoadError("the backend cannot put models to sleep")
            with anyio.fail_after(UNLOAD_TIMEOUT):
                memory = await backend.sleep(name, level)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, LoadError) else exc.reason
            log.error("switch phase=sleep-failed model=%s reason=%s; stopping it", name, error)
        else:
            held = f" host_memory={memory / 2**30:.1f}GiB" if memory else ""
            log.info(
                "switch phase=asleep model=%s elapsed=%.1fs%s", name, self.clock() - started, held
            )
            self.metrics.scale_events.labels("down", "sleep").inc()
        self._apply(self.core.sleep_done(name, self.clock(), memory, error))

    async def _wake_up(self, name: str) -> None:
        started = self.clock()
        self.progress[name] = "waking"
        log.info("switch phase=waking model=%s", name)
        error: str | None = None
        backend = self.backend
        try:
            if not isinstance(backend, SleepingBackend):
                raise LoadError("the backend cannot wake models")
            with anyio.fail_after(self.sleep_settings.wake_timeout):
                self.loaded[name] = await backend.wake(name, self._on_progress(name, started))
        except TimeoutError:
            error = f"not awake within {self.sleep_settings.wake_timeout:g}s (--wake-timeout)"
        except LoadError as exc:
            error = exc.reason
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        elapsed = self.clock() - started
        result = "failure" if error else "success"
        self.metrics.switches.labels("", name, result, "wake").inc()
        self.metrics.switch_duration.labels(name, result).observe(elapsed)
        if error:
            self.loaded.pop(name, None)
            log.error(
                "switch phase=wake-failed model=%s elapsed=%.1fs reason=%s; loading it cold",
                name,
                elapsed,
                error,
            )
        else:
            log.info("switch phase=ready model=%s kind=wake elapsed=%.2fs", name, elapsed)
        self.progress.pop(name, None)
        self._apply(self.core.wake_done(name, self.clock(), error))

    async def _unload(self, name: str, reason: str) -> None:
        started = self.clock()
        log.info("switch phase=unloading model=%s reason=%s", name, reason)
        try:
            with anyio.fail_after(UNLOAD_TIMEOUT):
                await self.backend.unload(name)
        except Exception as exc:
            log.error("switch phase=unload-failed model=%s reason=%s", name, exc)
        self.loaded.pop(name, None)
        if reason != "failed":
            self.metrics.scale_events.labels("down", reason).inc()
        log.info("switch phase=unloaded model=%s elapsed=%.1fs", name, self.clock() - started)
        self._apply(self.core.unload_done(name, self.clock()))

    # --- status ---------------------------------------------------------------------------

    def state_of(self, model: str) -> ModelState:
        return self.core.state_of(model, self.clock())

    def _loading(self, model: str, retry_after: int) -> ModelLoading:
        """The 503 for a model not serving yet, with what its load is doing and for how long
        (answered often during a load, so this reads the core directly)."""
        resident = self.core.residents.get(model)
        if resident is None or resident.phase not in (Phase.LOADING, Phase.WAKING):
            phase = "making room" if model in self.core.pending else "queued"
            return ModelLoading(model, retry_after, phase=phase, elapsed=0.0)
        phase = self.progress.get(model) or resident.phase.value
        return ModelLoading(model, retry_after, phase=phase, elapsed=self.clock() - resident.since)

    def status(self) -> dict[str, Any]:
        core = self.core
        now = self.clock()
        wall = time.time() - now  # monotonic -> wall clock, for the timeline's times
        switches = [_switch_entry(record, now, wall) for record in reversed(core.switches)]
        last = switches[0] if switches else None
        active = core.active
        return {
            "active_model": active,
            "state": core.state_of(active, now).value if active else "unloaded",
            "phase": core.phase.value,
            "progress": self.progress.get(active or "") or None,
            "phase_seconds": round(now - core.phase_since, 3),
            "switching_to": core.target,
            "models": {
                r.model: {
                    "phase": r.phase.value,
                    "placement": list(r.placement.units),
                    "gpu_fraction": r.placement.fraction,
                    "phase_seconds": round(now - r.since, 3),
                    "progress": self.progress.get(r.model),
                    "making_room_for": r.making_room_for,
                    "can_sleep": r.demand.can_sleep,
                    "host_memory_bytes": r.memory,
                }
                for r in core.residents.values()
            },
            "free_capacity": core.free_capacity(),
            "making_room": {
                m: {"placement": list(p.placement.units), "replacing": list(p.victims)}
                for m, p in core.pending.items()
            },
            "evictions": [
                {
                    "model": e.model,
                    "for": e.for_model,
                    "why": e.reason,
                    "seconds_ago": round(now - e.at, 3),
                }
                for e in reversed(core.evictions)
            ],
            "queued_models": list(core.queue),
            "requests_in_flight": dict(core.inflight),
            "requests_waiting": {m: len(w) for m, w in core.waiters.items()},
            "last_switch": last,
            "switches": switches,
            "load_seconds": {m: [round(d, 3) for d in ds] for m, ds in core.durations.items()},
            "wake_seconds": {m: [round(d, 3) for d in ds] for m, ds in core.wake_durations.items()},
            "failed_models": {
                m: {"reason": f.reason, "retry_in_seconds": round(f.until - now, 1)}
                for m, f in core.failures.items()
                if f.until > now
            },
        }


def _switch_entry(record: SwitchRecord, now: float, wall: float) -> dict[str, Any]:
    """A switch as `/proxy/status` shows it; `wall` turns the core's clock into epoch time."""
    finished = record.finished_at
    return {
        "number": record.number,
        "from": record.from_model,
        "to": record.to_model,
        "result": record.result or "in_progress",
        "kind": record.kind,
        "duration_seconds": round((finished or now) - record.started_at, 3),
        "seconds_ago": round(now - record.started_at, 3),
        "started_at": round(wall + record.started_at, 3),
        "finished_at": None if finished is None else round(wall + finished, 3),
        "error": record.error,
    }
