"""Random storms against the decision core with several models on shared GPUs.

Hypothesis drives arrivals, held waits, give-ups, finished requests, loads that succeed or
fail, unloads, losses and the clock in any order; after every step the GPUs are never
over-committed, loads never share a GPU, and every request counted in flight or waiting is
one the driver still holds. At the end, with every request finished and time run forward,
nothing is left queued or half-switched.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vllm_chill._placement import EPSILON, Demand, GpuPool
from vllm_chill.scheduler._core import (
    Admit,
    Cut,
    Effect,
    Hold,
    Phase,
    Reject,
    Release,
    StartLoad,
    SwitchCore,
)

GPUS = ("0", "1", "2")
RESERVE = 0.02
DEMANDS = {
    "a": Demand(1, 0.45, can_sleep=True),
    "b": Demand(1, 0.45),
    "c": Demand(1, 0.3),
    "d": Demand(1, 1.0, can_sleep=True),
    "e": Demand(2, 1.0, can_sleep=True),
    "f": Demand(3, 1.0),
}
MODELS = sorted(DEMANDS)


class PoolStorm(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.core = SwitchCore(
            max_waiting=8,
            min_residency=2.0,
            quiet_gap=0.5,
            drain_timeout=5.0,
            idle_timeout=30.0,
            failure_backoff=3.0,
            failure_backoff_max=10.0,
            first_load_estimate=5.0,
            sleep_reserve=RESERVE,
            max_sleeping=2,
            sleep_memory=0,
            capacity=GpuPool(GPUS),
            max_concurrent_loads=2,
        )
        #: What the driver holds: admitted requests per model, held waiters by id.
        self.admitted: dict[str, int] = {}
        self.held: dict[int, str] = {}

    # --- the driver's side of the effects -------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            event(type(effect).__name__)  # --hypothesis-show-statistics: what the storms reach
            if isinstance(effect, StartLoad) and effect.replacing:
                event(f"a load replacing {len(effect.replacing)} model(s)")
            if isinstance(effect, Release):
                assert self.core.is_serving(effect.model)
                for waiter in effect.waiters:
                    assert self.held.pop(waiter) == effect.model
                    self.admitted[effect.model] = self.admitted.get(effect.model, 0) + 1
            elif isinstance(effect, Reject):
                for waiter in effect.waiters:
                    assert self.held.pop(waiter) == effect.model
            elif isinstance(effect, Cut):
                # The switcher ends every cut request and hands its count back at once.
                for _ in range(self.admitted.pop(effect.model, 0)):
                    self.apply(self.core.finish(effect.model, self.now))

    # --- rules ----------------------------------------------------------------------------

    @rule(model=st.sampled_from(MODELS), hold=st.booleans(), client=st.sampled_from("xyz"))
    def request(self, model: str, hold: bool, client: str) -> None:
        decision, effects = self.core.arrive(
            model, self.now, hold=hold, client=client, demand=DEMANDS[model]
        )
        if isinstance(decision, Admit):
            self.admitted[model] = self.admitted.get(model, 0) + 1
        elif isinstance(decision, Hold):
            self.held[decision.waiter] = model
        self.apply(effects)

    @rule(model=st.sampled_from(MODELS))
    def finish(self, model: str) -> None:
        if self.admitted.get(model):
            self.admitted[model] -= 1
            if not self.admitted[model]:
                del self.admitted[model]
            self.apply(self.core.finish(model, self.now))

    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        if self.held:
            waiter = data.draw(st.sampled_from(sorted(self.held)))
            model = self.held.pop(waiter)
            self.apply(self.core.give_up(model, waiter, self.now))

    @rule(model=st.sampled_from(MODELS), ok=st.booleans())
    def load_ends(self, model: str, ok: bool) -> None:
        if self.core.phase_of(model) is Phase.LOADING:
            self.apply(self.core.load_done(model, self.now, None if ok else "boom"))

    @rule(model=st.sampled_from(MODELS), ok=st.booleans(), memory=st.sampled_from([None, 5]))
    def sleep_ends(self, model: str, ok: bool, memory: int | None) -> None:
        if self.core.phase_of(model) is Phase.SLEEPING:
            self.apply(self.core.sleep_done(model, self.now, memory, None if ok else "boom"))

    @rule(model=st.sampled_from(MODELS), ok=st.booleans())
    def wake_ends(self, model: str, ok: bool) -> None:
        if self.core.phase_of(model) is Phase.WAKING:
            self.apply(self.core.wake_done(model, self.now, None if ok else "boom"))

    @rule(model=st.sampled_from(MODELS))
    def unload_ends(self, model: str) -> None:
        if self.core.phase_of(model) is Phase.UNLOADING:
            self.apply(self.core.unload_done(model, self.now))

    @rule(model=st.sampled_from(MODELS))
    def lose(self, model: str) -> None:
        self.apply(self.core.lost(model, self.now))

    @rule(seconds=st.sampled_from([0.1, 0.6, 2.5, 6.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.core.tick(self.now))

    @rule(model=st.sampled_from(MODELS))
    def operator_switch(self, model: str) -> None:
        self.apply(self.core.request_switch(model, self.now, DEMANDS[model]))

    @rule(model=st.sampled_from([None, *MODELS]))
    def operator_unload(self, model: str | None) -> None:
        loading = (Phase.LOADING, Phase.WAKING)
        if model is None and any(r.phase in loading for r in self.core.residents.values()):
            return  # refused with 409 by the switcher, as a load is never interrupted
        if model is not None and self.core.phase_of(model) in loading:
            return
        self.apply(self.core.request_unload(self.now, model))

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def the_timeline_shows_only_switches_under_way_as_in_progress(self) -> None:
        switches = self.core.switches
        numbers = [record.number for record in switches]
        assert numbers == sorted(set(numbers))
        for record in switches:
            if record.finished_at is None:
                phase = self.core.phase_of(record.to_model)
                assert phase is (Phase.WAKING if record.kind == "wake" else Phase.LOADING)
        under_way = [r for r in switches if r.finished_at is None]
        assert len({r.to_model for r in under_way}) == len(under_way)

    @invariant()
    def gpus_are_never_over_committed(self) -> None:
        """What runs fits; and so does what will run once the drains for the models waiting
        on them end (their places are reserved)."""
        now = dict.fromkeys(GPUS, 0.0)
        then = dict.fromkeys(GPUS, 0.0)
        leaving = {v for p in self.core.pending.values() for v in p.victims}
        stopping = {v for p in self.core.pending.values() for v in p.stop}
        for resident in self.core.residents.values():
            demand = DEMANDS[resident.model]
            units = resident.placement.units
            assert len(units) == len(set(units)) == demand.gpus
            assert resident.placement.fraction == demand.fraction
            asleep = resident.phase is Phase.ASLEEP
            if asleep or resident.phase is Phase.SLEEPING:
                assert demand.can_sleep
            share = RESERVE if asleep else resident.placement.fraction
            # A model leaving to sleep keeps its reserve; a woken one will hold all its share.
            waking = resident.model in self.core.pending
            later = resident.placement.fraction if waking else share
            if resident.model in leaving:
                sleeps = demand.can_sleep and resident.model not in stopping
                goes_to_sleep = resident.phase in (Phase.DRAINING, Phase.SLEEPING, Phase.ASLEEP)
                later = RESERVE if sleeps and goes_to_sleep else 0
            for unit in units:
                now[unit] += share
                then[unit] += later
        for model, pending in self.core.pending.items():
            if model in self.core.residents:
                continue  # a sleeper that wakes: counted above, with all its share
            for unit in pending.placement.units:
                then[unit] += pending.placement.fraction
        for use in (now, then):
            assert all(share <= 1.0 + EPSILON for share in use.values()), (now, then)

    @invariant()
    def loads_never_share_a_gpu(self) -> None:
        seen: set[str] = set()
        for resident in self.core.residents.values():
            if resident.phase is Phase.LOADING:
                assert seen.isdisjoint(resident.placement.units)
                seen.update(resident.placement.units)
        loading = sum(r.phase is Phase.LOADING for r in self.core.residents.values())
        assert loading + len(self.core.pending) <= self.core.max_concurrent_loads

    @invariant()
    def every_count_is_one_the_driver_holds(self) -> None:
        core = self.core
        assert core.inflight == self.admitted
        assert core.waiting_total == len(self.held) == sum(len(w) for w in core.waiters.values())
        giving_way = (Phase.DRAINING, Phase.SLEEPING, Phase.ASLEEP, Phase.UNLOADING, Phase.IDLE)
        for pending in core.pending.values():
            for victim in pending.victims:
                assert core.phase_of(victim) in giving_way

    # --- after the storm --------------------------------------------------------------------

    def teardown(self) -> None:
        for model in list(self.admitted):
            while self.admitted.get(model):
                self.finish(model)
        for _ in range(40):
            for model in MODELS:
                self.load_ends(model, ok=True)
                self.wake_ends(model, ok=True)
                self.sleep_ends(model, ok=True, memory=None)
                self.unload_ends(model)
            self.advance(31.0)
            if not self.core.queue and not self.core.pending:
                break
        core = self.core
        assert not core.pending, core.pending
        assert set(core.queue) <= set(core.failures), core.queue
        assert all(r.phase is not Phase.DRAINING for r in core.residents.values())
        asleep = [r for r in core.residents.values() if r.phase is Phase.ASLEEP]
        assert len(asleep) <= core.max_sleeping


PoolStorm.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_storm = PoolStorm.TestCase
