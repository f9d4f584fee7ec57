"""The switch decision core, driven event by event with an explicit clock: no sleeping."""

from __future__ import annotations

import random

import pytest

from vllm_chill.scheduler.core import (
    DEFAULT_LOAD_ESTIMATE,
    Admit,
    Busy,
    Cut,
    Hold,
    ModelState,
    Phase,
    Refuse,
    Reject,
    Release,
    StartLoad,
    StartUnload,
    SwitchCore,
    TooMany,
)


def make(**kw: float) -> SwitchCore:
    defaults = dict(
        max_waiting=100,
        min_residency=5.0,
        drain_timeout=60.0,
        idle_timeout=300.0,
        failure_backoff=10.0,
        failure_backoff_max=300.0,
    )
    defaults.update(kw)
    return SwitchCore(**defaults)  # type: ignore[arg-type]


def loads(effects: list) -> list[str]:
    return [e.model for e in effects if isinstance(e, StartLoad)]


def ready(core: SwitchCore, model: str, now: float) -> list:
    """Request `model` from idle (a held request, so no Retry-After promise), finish its
    load at `now`, and finish the released request."""
    decision, effects = core.arrive(model, now - 1, hold=True)
    assert isinstance(decision, Hold)
    assert loads(effects) == [model]
    effects = core.load_done(model, now)
    assert Release(model, (decision.waiter,)) in effects
    return effects + core.finish(model, now)


# --- basic decisions ------------------------------------------------------------------------


def test_request_from_idle_starts_one_load_and_answers_busy_with_default_estimate() -> None:
    core = make()
    decision, effects = core.arrive("a", 0.0, hold=False)
    assert decision == Busy(retry_after=int(DEFAULT_LOAD_ESTIMATE))
    assert loads(effects) == ["a"]
    assert core.state_of("a", 0.0) is ModelState.LOADING
    # A second request joins the load: no second StartLoad.
    decision, effects = core.arrive("a", 10.0, hold=False)
    assert decision == Busy(retry_after=20)
    assert loads(effects) == []


def test_held_requests_join_the_load_and_are_released_together() -> None:
    core = make()
    holds = []
    for i in range(3):
        decision, _ = core.arrive("a", float(i), hold=True)
        assert isinstance(decision, Hold)
        holds.append(decision.waiter)
    effects = core.load_done("a", 4.0)
    released = [e for e in effects if isinstance(e, Release)]
    assert released == [Release("a", tuple(holds))]
    assert core.inflight["a"] == 3
    assert core.waiting_total == 0
    assert core.state_of("a", 4.0) is ModelState.LOADED


def test_ready_model_admits_and_counts_in_flight() -> None:
    core = make()
    ready(core, "a", 5.0)
    decision, effects = core.arrive("a", 6.0, hold=True)
    assert decision == Admit() and effects == []
    assert core.inflight["a"] == 1
    core.finish("a", 7.0)
    assert "a" not in core.inflight


def test_retry_after_comes_from_measured_load_durations() -> None:
    core = make(idle_timeout=10.0)
    ready(core, "a", 12.0)  # asked at 11 (ready() asks 1s before), so load took 1s
    core.tick(100.0)  # idle unload
    core.unload_done(101.0)
    decision, _ = core.arrive("a", 200.0, hold=False)
    assert decision == Busy(retry_after=1)
    core.load_done("a", 207.0)  # 7s this time: mean of 1 and 7 = 4
    core.tick(400.0)
    core.unload_done(401.0)
    decision, _ = core.arrive("a", 500.0, hold=False)
    assert decision == Busy(retry_after=4)
    # 1.5s into the load: 2.5s left -> 3
    decision, _ = core.arrive("a", 501.5, hold=False)
    assert decision == Busy(retry_after=3)


def test_retry_after_is_never_below_one() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)
    decision, _ = core.arrive("a", 500.0, hold=False)  # far past the estimate
    assert decision == Busy(retry_after=1)


def test_queued_model_retry_after_includes_the_loads_ahead() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)  # loading a, estimate 30
    decision, _ = core.arrive("b", 10.0, hold=False)
    assert decision == Busy(retry_after=20 + 30)


# --- switching, draining, residency ---------------------------------------------------------


def test_switch_waits_for_residency_then_drains_then_loads() -> None:
    core = make(min_residency=5.0)
    ready(core, "a", 10.0)
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()
    decision, effects = core.arrive("b", 12.0, hold=False)
    assert isinstance(decision, Busy)
    assert loads(effects) == []  # a is resident until 15
    assert core.next_deadline() == 15.0
    # Still resident: a keeps serving.
    assert core.arrive("a", 13.0, hold=False)[0] == Admit()
    effects = core.tick(15.0)
    assert core.phase is Phase.DRAINING and core.target == "b"
    assert loads(effects) == []  # two requests of a still in flight
    # While draining, new requests for a queue behind b instead of being admitted.
    decision, _ = core.arrive("a", 16.0, hold=False)
    assert isinstance(decision, Busy)
    core.finish("a", 17.0)
    effects = core.finish("a", 18.0)
    assert effects and loads(effects) == ["b"]
    assert StartLoad("b", "a") in effects
    assert list(core.queue) == ["a"]  # a comes back after b


def test_drain_timeout_cuts_in_flight_requests_once() -> None:
    core = make(min_residency=0.0, drain_timeout=60.0)
    ready(core, "a", 0.0)
    core.arrive("a", 1.0, hold=False)
    core.arrive("b", 2.0, hold=False)
    assert core.phase is Phase.DRAINING
    assert core.next_deadline() == 62.0
    assert core.tick(61.0) == []
    effects = core.tick(62.0)
    assert effects == [Cut("a")]
    assert core.tick(63.0) == []  # not again
    assert core.next_deadline() is None  # waits for the cut request to finish
    effects = core.finish("a", 63.5)
    assert loads(effects) == ["b"]


def test_promised_retry_after_extends_the_residency_so_the_client_finds_its_model() -> None:
    core = make(min_residency=1.0)
    decision, _ = core.arrive("a", 0.0, hold=False)
    assert decision == Busy(retry_after=30)  # the client will come back at ~30
    core.load_done("a", 3.0)  # loaded much faster than promised
    core.arrive("b", 4.0, hold=False)
    # a stays until the promise (30) + grace, not just 1s of residency.
    assert core.phase is Phase.READY
    assert core.next_deadline() == pytest.approx(35.0)
    assert core.arrive("a", 31.0, hold=False)[0] == Admit()
    core.finish("a", 32.0)
    core.tick(35.0)
    assert core.active == "b" and core.phase is Phase.LOADING


def test_promise_hold_is_capped() -> None:
    core = make(min_residency=1.0)
    core.durations["a"] = __import__("collections").deque([500.0])
    core.arrive("a", 0.0, hold=False)  # promised 500s
    core.load_done("a", 2.0)
    assert core.residency_until == pytest.approx(62.0)


def test_request_for_another_model_during_a_load_queues_fifo() -> None:
    core = make(min_residency=0.0)
    core.arrive("a", 0.0, hold=True)
    core.arrive("c", 1.0, hold=False)
    core.arrive("b", 2.0, hold=False)
    core.arrive("c", 3.0, hold=False)
    assert list(core.queue) == ["c", "b"]
    effects = core.load_done("a", 4.0)
    assert loads(effects) == []  # a serves the request it was loaded for
    effects = core.finish("a", 4.5)
    # nothing in flight on a, nobody promised to come back, residency 0: straight to c
    assert loads(effects) == ["c"]
    effects = core.load_done("c", 5.0)
    assert loads(effects) == []  # c's clients were told to come back: it waits for them
    deadline = core.next_deadline()
    assert deadline is not None and 5.0 < deadline <= 5.0 + 60
    assert loads(core.tick(deadline)) == ["b"]


def test_every_model_is_served_under_constant_competition() -> None:
    """No model waits forever: four models hammered in random order all get loaded,
    and each load serves every request held for it."""
    rng = random.Random(7)
    core = make(min_residency=2.0, max_waiting=10_000)
    now = 0.0
    served: dict[str, int] = {}
    held: dict[int, str] = {}
    loading_since: float | None = None
    for _ in range(5000):
        now += 0.1
        model = rng.choice("abcd")
        decision, effects = core.arrive(model, now, hold=True)
        if isinstance(decision, Hold):
            held[decision.waiter] = model
        elif isinstance(decision, Admit):
            served[model] = served.get(model, 0) + 1
            effects += core.finish(model, now)
        effects += core.tick(now)
        for effect in effects:
            if isinstance(effect, StartLoad):
                loading_since = now
            if isinstance(effect, Release):
                for waiter in effect.waiters:
                    assert held.pop(waiter) == effect.model
                    served[effect.model] = served.get(effect.model, 0) + 1
                for _ in effect.waiters:
                    core.finish(effect.model, now)
        if core.phase is Phase.LOADING and loading_since is not None and now - loading_since >= 3:
            for effect in core.load_done(core.active or "", now):
                if isinstance(effect, Release):
                    for waiter in effect.waiters:
                        assert held.pop(waiter) == effect.model
                        served[effect.model] = served.get(effect.model, 0) + 1
                    for _ in effect.waiters:
                        core.finish(effect.model, now)
    assert set(served) == set("abcd")
    # Nobody has been waiting longer than a full round of the four models.
    oldest = min(held) if held else None
    assert oldest is None or len(held) < 4 * 200


def test_switch_rate_is_bounded_by_time_under_alternating_clients() -> None:
    """Two clients alternate as fast as they can between two models with zero load time:
    each switch still costs at least min_residency, so switches <= elapsed / residency."""
    core = make(min_residency=5.0)
    now = 0.0
    switches = 0
    served = {"a": 0, "b": 0}
    for _ in range(20_000):
        now += 0.01
        for model in ("a", "b"):
            decision, effects = core.arrive(model, now, hold=False)
            if isinstance(decision, Admit):
                served[model] += 1
                effects += core.finish(model, now)
            effects += core.tick(now)
            for effect in effects:
                if isinstance(effect, StartLoad):
                    switches += 1
                    effects2 = core.load_done(effect.model, now)  # instant load
                    assert not [e for e in effects2 if isinstance(e, StartLoad)]
    elapsed = now
    assert switches <= elapsed / 5.0 + 1
    assert served["a"] > 1000 and served["b"] > 1000


# --- failures -------------------------------------------------------------------------------


def test_failed_load_rejects_waiters_at_once_cleans_up_and_backs_off() -> None:
    core = make(failure_backoff=10.0)
    w1 = core.arrive("a", 0.0, hold=True)[0]
    w2 = core.arrive("a", 1.0, hold=True)[0]
    assert isinstance(w1, Hold) and isinstance(w2, Hold)
    effects = core.load_done("a", 2.0, error="CrashLoopBackOff: exit 1")
    assert Reject("a", (w1.waiter, w2.waiter), "CrashLoopBackOff: exit 1") in effects
    assert StartUnload("a", "failed") in effects  # nothing left half-loaded
    assert core.state_of("a", 3.0) is ModelState.FAILED
    # Within the back-off: refused with the reason, no new load.
    decision, effects = core.arrive("a", 5.0, hold=True)
    assert decision == Refuse("CrashLoopBackOff: exit 1", retry_after=7)
    assert loads(effects) == []
    core.unload_done(6.0)
    # After it: retried.
    decision, effects = core.arrive("a", 12.5, hold=False)
    assert isinstance(decision, Busy) and loads(effects) == ["a"]
    # A second failure doubles the back-off.
    core.load_done("a", 13.0, error="again")
    core.unload_done(13.5)
    assert core.failures["a"].until == pytest.approx(33.0)


def test_failure_backoff_is_capped() -> None:
    core = make(failure_backoff=10.0, failure_backoff_max=25.0)
    now = 0.0
    for _ in range(6):
        core.arrive("a", now, hold=False)
        core.load_done("a", now, error="x")
        core.unload_done(now)
        now = core.failures["a"].until
    assert core.failures["a"].until - core.failures["a"].at == 25.0


def test_after_a_failure_the_next_queued_model_loads() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)
    waiter = core.arrive("b", 1.0, hold=True)[0]
    effects = core.load_done("a", 2.0, error="boom")
    assert loads(effects) == []  # first the clean-up
    effects = core.unload_done(3.0)
    assert loads(effects) == ["b"]
    effects = core.load_done("b", 4.0)
    assert isinstance(waiter, Hold)
    assert Release("b", (waiter.waiter,)) in effects


def test_queued_model_in_backoff_fails_its_waiters_instead_of_loading() -> None:
    core = make(min_residency=0)
    core.arrive("a", 0.0, hold=False)
    core.load_done("a", 1.0, error="bad")
    core.unload_done(1.5)
    ready(core, "b", 3.0)
    core.arrive("b", 3.5, hold=False)  # b busy so the switch drains
    # a is in back-off, so it is refused without queueing
    decision, _ = core.arrive("a", 4.0, hold=True)
    assert isinstance(decision, Refuse)
    assert list(core.queue) == []


def test_explicit_switch_clears_the_backoff() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)
    core.load_done("a", 1.0, error="bad")
    core.unload_done(1.5)
    effects = core.request_switch("a", 2.0)
    assert loads(effects) == ["a"]


# --- idle -----------------------------------------------------------------------------------


def test_idle_unload_counts_from_the_end_of_the_last_request() -> None:
    core = make(idle_timeout=60.0)
    ready(core, "a", 0.0)
    core.arrive("a", 10.0, hold=False)
    # A long stream: nothing unloads while it runs, whatever the time.
    assert core.next_deadline() is None
    assert core.tick(1000.0) == []
    core.finish("a", 1000.0)
    assert core.next_deadline() == 1060.0
    assert core.tick(1059.0) == []
    effects = core.tick(1060.0)
    assert StartUnload("a", "idle") in effects
    assert core.phase is Phase.UNLOADING
    core.unload_done(1061.0)
    assert core.phase is Phase.IDLE and core.active is None


def test_idle_timeout_zero_never_unloads() -> None:
    core = make(idle_timeout=0.0)
    ready(core, "a", 0.0)
    assert core.next_deadline() is None
    assert core.tick(10**9) == []


def test_request_during_unload_reloads_afterwards() -> None:
    core = make(idle_timeout=1.0)
    ready(core, "a", 0.0)
    core.tick(5.0)
    assert core.phase is Phase.UNLOADING
    decision, effects = core.arrive("a", 5.5, hold=True)
    assert isinstance(decision, Hold) and loads(effects) == []
    effects = core.unload_done(6.0)
    assert loads(effects) == ["a"]


def test_waiter_that_gives_up_is_forgotten_at_once() -> None:
    core = make(max_waiting=2)
    w1 = core.arrive("a", 0.0, hold=True)[0]
    core.arrive("a", 0.0, hold=True)
    assert isinstance(core.arrive("a", 0.0, hold=True)[0], TooMany)
    assert isinstance(w1, Hold)
    core.give_up("a", w1.waiter, 1.0)
    assert core.waiting_total == 1
    assert isinstance(core.arrive("a", 1.0, hold=True)[0], Hold)
    # giving up twice is harmless
    core.give_up("a", w1.waiter, 1.0)
    assert core.waiting_total == 2


def test_too_many_waiting_carries_a_retry_after() -> None:
    core = make(max_waiting=0)
    decision, effects = core.arrive("a", 0.0, hold=True)
    assert decision == TooMany(retry_after=30)
    assert loads(effects) == ["a"]  # the load still starts for the next attempt


# --- lost models, adoption, operator actions ------------------------------------------------


def test_lost_model_is_reloaded_by_the_next_request() -> None:
    core = make()
    ready(core, "a", 0.0)
    core.arrive("a", 1.0, hold=False)
    core.lost(2.0)
    assert core.state_of("a", 2.0) is ModelState.UNLOADED
    core.finish("a", 2.5)  # its in-flight request ends on its own
    decision, effects = core.arrive("a", 3.0, hold=False)
    assert isinstance(decision, Busy) and loads(effects) == ["a"]


def test_lost_is_ignored_while_loading() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)
    assert core.lost(1.0) == []
    assert core.phase is Phase.LOADING


def test_adopted_model_serves_immediately() -> None:
    core = make()
    core.adopt("a", 0.0)
    assert core.arrive("a", 0.1, hold=False)[0] == Admit()


def test_requested_unload_drains_first() -> None:
    core = make()
    ready(core, "a", 0.0)
    core.arrive("a", 1.0, hold=False)
    effects = core.request_unload(2.0)
    assert not [e for e in effects if isinstance(e, StartUnload)]
    assert isinstance(core.arrive("a", 2.5, hold=False)[0], Busy)  # not admitted any more
    effects = core.finish("a", 3.0)
    assert StartUnload("a", "requested") in effects
    effects = core.unload_done(4.0)
    assert loads(effects) == ["a"]  # the request at 2.5 wanted it back


def test_explicit_switch_overrides_residency() -> None:
    core = make(min_residency=100.0)
    ready(core, "a", 0.0)
    effects = core.request_switch("b", 1.0)
    assert loads(effects) == ["b"]


def test_stale_load_done_is_ignored() -> None:
    core = make()
    assert core.load_done("x", 1.0) == []
    assert core.unload_done(1.0) == []
