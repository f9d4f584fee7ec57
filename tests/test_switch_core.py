"""The switch decision core, driven event by event with an explicit clock: no sleeping."""

from __future__ import annotations

import random

import pytest

from tests.support import switch_core
from vllm_chill._placement import Placement
from vllm_chill.scheduler._core import (
    Admit,
    Busy,
    Cut,
    Effect,
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

FIRST_LOAD_ESTIMATE = 30.0
#: Where a model runs when there is one slot (no GPU accounting).
SLOT = Placement(("0",))


def make(**kw: float) -> SwitchCore:
    return switch_core(**{"first_load_estimate": FIRST_LOAD_ESTIMATE, **kw})


def loads(effects: list[Effect]) -> list[str]:
    return [e.model for e in effects if isinstance(e, StartLoad)]


def ready(core: SwitchCore, model: str, now: float) -> list[Effect]:
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
    assert decision == Busy(retry_after=int(FIRST_LOAD_ESTIMATE))
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
    core.unload_done("a", 101.0)
    decision, _ = core.arrive("a", 200.0, hold=False)
    assert decision == Busy(retry_after=1)
    core.load_done("a", 207.0)  # 7s this time: the estimate is the longest recent load
    core.tick(400.0)
    core.unload_done("a", 401.0)
    decision, _ = core.arrive("a", 500.0, hold=False)
    assert decision == Busy(retry_after=7)
    # 1.5s into the load: 5.5s left -> 6
    decision, _ = core.arrive("a", 501.5, hold=False)
    assert decision == Busy(retry_after=6)


def test_retry_after_grows_once_a_load_runs_past_its_estimate() -> None:
    """A first load is estimated at 30s; one that takes longer must not answer
    "Retry-After: 1" from then on: the client would burn its retries in seconds."""
    core = make()
    assert core.arrive("a", 0.0, hold=False)[0] == Busy(retry_after=30)
    assert core.arrive("a", 29.5, hold=False)[0] == Busy(retry_after=1)
    # Past the estimate: never below the floor, and a quarter of the time taken so far.
    assert core.arrive("a", 31.0, hold=False)[0] == Busy(retry_after=8)
    assert core.arrive("a", 39.0, hold=False)[0] == Busy(retry_after=10)
    assert core.arrive("a", 100.0, hold=False)[0] == Busy(retry_after=25)


def test_openai_style_retries_find_a_first_load_of_forty_seconds() -> None:
    """A client that sleeps exactly Retry-After between attempts (the openai client does, up
    to 60s) gets the model within 4 retries when its first load takes 40s."""
    core = make()
    now, attempts = 0.0, 0
    while True:
        attempts += 1
        decision, _ = core.arrive("a", now, hold=False)
        if isinstance(decision, Admit):
            break
        assert isinstance(decision, Busy)
        now += decision.retry_after + 0.05
        if core.phase is Phase.LOADING and now >= 40.0:
            core.load_done("a", 40.0)
    assert attempts - 1 <= 4


def test_queued_model_retry_after_includes_the_loads_ahead() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)  # loading a, estimate 30, a's client waits for it
    decision, _ = core.arrive("b", 10.0, hold=False)
    # 20s of a's load, a's serving window (2.5 x 30s), then b's own 30s load
    assert decision == Busy(retry_after=20 + 75 + 30)


# --- switching, draining, serving windows ---------------------------------------------------


def test_switch_away_from_an_idle_model_starts_at_once() -> None:
    """A user done with a, asking for b: b loads straight away; no residency to sit out."""
    core = make(min_residency=5.0, quiet_gap=0.5)
    ready(core, "a", 10.0)  # its request finished at 10
    decision, effects = core.arrive("b", 10.6, hold=True)
    assert isinstance(decision, Hold)
    assert core.phase is Phase.LOADING and core.active == "b"
    assert StartLoad("b", SLOT, ("a",)) in effects


def test_switch_waits_only_for_the_quiet_gap_after_the_last_request() -> None:
    core = make(min_residency=5.0, quiet_gap=0.5)
    ready(core, "a", 10.0)
    core.arrive("b", 10.1, hold=False)
    assert core.phase is Phase.READY
    assert core.next_deadline() == pytest.approx(10.5)
    assert core.tick(10.4) == []
    effects = core.tick(10.5)
    assert loads(effects) == ["b"]


def test_a_used_model_serves_its_window_then_drains_then_loads() -> None:
    core = make(min_residency=5.0)
    ready(core, "a", 10.0)  # a 1s load: window max(5, 2.5 x 1) = 5s
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()
    decision, effects = core.arrive("b", 12.0, hold=False)
    assert isinstance(decision, Busy)
    assert decision.retry_after == 3 + 30  # rest of a's window, then b's load
    assert loads(effects) == []  # a is in use until 15
    assert core.next_deadline() == 15.0
    # Still in its window: a keeps serving.
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
    assert StartLoad("b", SLOT, ("a",)) in effects
    assert list(core.queue) == ["a"]  # a comes back after b


def test_a_request_after_the_window_queues_behind_the_waiting_model() -> None:
    core = make(min_residency=5.0)
    ready(core, "a", 10.0)
    core.arrive("a", 11.0, hold=False)
    core.arrive("b", 12.0, hold=False)
    # The timer is late: a request for a at 16 does not extend a's turn.
    decision, _ = core.arrive("a", 16.0, hold=False)
    assert isinstance(decision, Busy)
    assert core.phase is Phase.DRAINING and core.target == "b"


def test_retry_after_for_the_user_who_moves_on_is_the_load_not_the_window() -> None:
    """One user done with a asks for b: told about b's load, not a's serving window. Another
    user asking for b while a's user is still at it is told about the window too."""
    core = make(min_residency=5.0, quiet_gap=0.5)
    core.durations["b"] = __import__("collections").deque([1.0])
    ready(core, "a", 10.0)
    assert core.arrive("a", 10.1, hold=False, client="10.0.0.1")[0] == Admit()
    core.finish("a", 10.2)
    other = core.retry_after("b", 10.3, "10.0.0.2")
    assert core.arrive("b", 10.3, hold=False, client="10.0.0.1")[0] == Busy(retry_after=2)
    assert other == 6  # the rest of a's window (to 15), then b's 1 s load


def test_the_serving_window_grows_with_the_load_time() -> None:
    core = make(min_residency=5.0)
    decision, _ = core.arrive("a", 0.0, hold=True)
    core.load_done("a", 20.0)  # a 20s load: window 50s
    assert core.serve_until == pytest.approx(70.0)
    assert isinstance(decision, Hold)
    core.arrive("b", 21.0, hold=False)
    assert core.next_deadline() == pytest.approx(70.0)  # a's held request is in flight
    core.finish("a", 30.0)
    # Nobody used it since 30: it gives way after the quiet gap, not at 70.
    assert core.next_deadline() == pytest.approx(30.5)


def test_drain_timeout_cuts_in_flight_requests_once() -> None:
    core = make(min_residency=0.0, drain_timeout=60.0)
    ready(core, "a", 0.0)  # a 1s load: a 2.5s window
    core.arrive("a", 1.0, hold=False)
    core.arrive("b", 3.0, hold=False)
    assert core.phase is Phase.DRAINING
    assert core.next_deadline() == 63.0
    assert core.tick(62.0) == []
    effects = core.tick(63.0)
    assert effects == [Cut("a")]
    assert core.tick(64.0) == []  # not again
    assert core.next_deadline() is None  # waits for the cut request to finish
    effects = core.finish("a", 64.5)
    assert loads(effects) == ["b"]


def test_promise_keeps_the_model_until_its_client_comes_back() -> None:
    core = make(min_residency=1.0)
    decision, _ = core.arrive("a", 0.0, hold=False)
    assert decision == Busy(retry_after=30)  # the client will come back at ~30
    core.load_done("a", 3.0)  # loaded much faster than promised
    core.arrive("b", 4.0, hold=False)
    # a waits for the client it told to come back (30 + grace), not just its window.
    assert core.phase is Phase.READY
    assert core.next_deadline() == pytest.approx(35.0)
    # The client comes back early: its promise is kept, nobody else was promised a.
    assert core.arrive("a", 6.0, hold=False)[0] == Admit()
    assert "a" not in core.promises
    effects = core.finish("a", 7.0)
    assert loads(effects) == []  # in its window (2.5 x 3s): the quiet gap first
    assert loads(core.tick(7.5)) == ["b"]


def test_promises_are_kept_per_client() -> None:
    """Three clients told to come back: the model stays until all three did."""
    core = make(min_residency=1.0, quiet_gap=0.5)
    for t in (0.0, 0.1, 0.2):
        core.arrive("a", t, hold=False)
    core.load_done("a", 2.0)
    core.arrive("b", 2.5, hold=False)
    for t in (3.0, 4.0):
        assert core.arrive("a", t, hold=False)[0] == Admit()
        core.finish("a", t)
        assert core.tick(t + 0.6) == []  # one client has not come back yet
    assert core.arrive("a", 5.0, hold=False)[0] == Admit()
    core.finish("a", 5.0)
    assert loads(core.tick(5.5)) == ["b"]


def test_a_client_that_comes_back_as_told_during_the_load_counts_once() -> None:
    core = make(min_residency=1.0, quiet_gap=0.5)
    core.durations["a"] = __import__("collections").deque([10.0])
    assert core.arrive("a", 0.0, hold=False)[0] == Busy(retry_after=10)
    # Back when told; the load overran: told again.
    assert core.arrive("a", 10.0, hold=False)[0] == Busy(retry_after=3)
    core.load_done("a", 12.0)
    core.arrive("b", 12.2, hold=False)
    assert core.arrive("a", 13.0, hold=False)[0] == Admit()  # back once more: all kept
    core.finish("a", 13.1)
    assert loads(core.tick(13.6)) == ["b"]


def test_promises_of_a_client_that_ignores_retry_after_lapse_soon_after_the_load() -> None:
    core = make(min_residency=1.0, quiet_gap=0.5)
    core.durations["a"] = __import__("collections").deque([10.0])
    for t in range(10):  # asking every second although told to come back at 10
        assert isinstance(core.arrive("a", float(t), hold=False)[0], Busy)
    core.load_done("a", 10.0)
    core.arrive("b", 10.2, hold=False)
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= 10.0 + 5.0 + 1.0


def test_a_client_polling_from_one_address_holds_one_promise() -> None:
    """A user retrying every 100 ms during a 1 s load, then getting its answer: the model
    gives way to the next one at once, not when the 30 s it was first told have passed."""
    core = make(min_residency=1.0, quiet_gap=0.5)
    for i in range(10):
        decision, _ = core.arrive("a", i / 10, hold=False, client="10.0.0.1")
        assert isinstance(decision, Busy)
    core.load_done("a", 1.0)
    assert core.arrive("a", 1.05, hold=False, client="10.0.0.1")[0] == Admit()
    assert "a" not in core.promises
    core.finish("a", 1.1)
    core.arrive("b", 1.2, hold=False, client="10.0.0.1")
    assert loads(core.tick(1.6)) == ["b"]


def test_promises_from_different_addresses_are_each_kept() -> None:
    core = make(min_residency=1.0, quiet_gap=0.5)
    for i, client in enumerate(("10.0.0.1", "10.0.0.2")):
        core.arrive("a", i / 10, hold=False, client=client)
    core.load_done("a", 1.0)
    assert core.arrive("a", 1.05, hold=False, client="10.0.0.1")[0] == Admit()
    core.finish("a", 1.1)
    core.arrive("b", 1.2, hold=False, client="10.0.0.1")
    assert core.tick(1.7) == []  # 10.0.0.2 has not come back yet
    assert core.arrive("a", 3.0, hold=False, client="10.0.0.2")[0] == Admit()
    core.finish("a", 3.1)
    assert loads(core.tick(3.6)) == ["b"]


def test_idle_unload_waits_for_clients_told_to_come_back() -> None:
    core = make(idle_timeout=1.0)
    assert core.arrive("a", 0.0, hold=False, client="10.0.0.1")[0] == Busy(retry_after=30)
    core.load_done("a", 0.5)
    assert core.next_deadline() == pytest.approx(35.0)  # not 1.5: the client was told 30
    assert core.tick(2.0) == []
    assert core.arrive("a", 30.0, hold=False, client="10.0.0.1")[0] == Admit()
    core.finish("a", 30.1)
    assert core.next_deadline() == pytest.approx(31.1)


def test_held_clients_need_no_promise() -> None:
    core = make(min_residency=1.0, quiet_gap=0.5)
    decision, _ = core.arrive("a", 0.0, hold=True)
    assert isinstance(decision, Hold)
    core.load_done("a", 1.0)
    core.finish("a", 1.2)
    core.arrive("b", 1.3, hold=False)
    assert loads(core.tick(1.7)) == ["b"]


def test_promise_hold_is_capped() -> None:
    core = make(min_residency=1.0)
    core.durations["a"] = __import__("collections").deque([500.0])
    core.arrive("a", 0.0, hold=False)  # promised 500s
    core.load_done("a", 2.0)
    core.finish("a", 2.0)
    core.arrive("b", 2.5, hold=False)
    assert core.next_deadline() == pytest.approx(62.0)


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
    assert loads(effects) == []  # the quiet gap
    effects = core.tick(5.0)
    # nothing in flight on a, nobody promised to come back: straight to c
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
    held: dict[int, tuple[str, float]] = {}
    loading_since: float | None = None
    longest_wait = 0.0
    for _ in range(5000):
        now += 0.1
        model = rng.choice("abcd")
        decision, effects = core.arrive(model, now, hold=True)
        if isinstance(decision, Hold):
            held[decision.waiter] = (model, now)
        elif isinstance(decision, Admit):
            served[model] = served.get(model, 0) + 1
            effects += core.finish(model, now)
        effects += core.tick(now)
        if core.phase is Phase.LOADING and loading_since is not None and now - loading_since >= 3:
            effects += core.load_done(core.active or "", now)
        for effect in effects:
            if isinstance(effect, StartLoad):
                loading_since = now
            if isinstance(effect, Release):
                for waiter in effect.waiters:
                    name, since = held.pop(waiter)
                    assert name == effect.model
                    longest_wait = max(longest_wait, now - since)
                    served[effect.model] = served.get(effect.model, 0) + 1
                for _ in effect.waiters:
                    core.finish(effect.model, now)
    assert set(served) == set("abcd")
    # One turn of each model ahead: at most 3 x (3s load + 7.5s window) + its own load.
    assert longest_wait <= 3 * (3 + 7.5) + 3 + 1


def test_alternating_clients_are_served_most_of_the_time_whatever_the_load_time() -> None:
    """Two clients each want their own model continuously. Each switch costs a load, so a
    model in use serves for 2.5 x its load time: serving stays above 2/3 of the wall clock,
    and the switch rate stays bounded."""
    for load in (2.0, 10.0, 60.0):
        core = make(min_residency=5.0)
        now, serving, switches = 0.0, 0.0, 0
        step = 0.05
        retry_at = {"a": 0.0, "b": 0.0}
        load_ends: float | None = None
        while now < 100 * load:
            if load_ends is not None and now >= load_ends:
                core.load_done(core.active or "", now)
                load_ends = None
            for model in ("a", "b"):
                if now < retry_at[model]:
                    continue
                decision, effects = core.arrive(model, now, hold=False)
                if isinstance(decision, Admit):
                    effects += core.finish(model, now + step / 2)
                else:
                    assert isinstance(decision, Busy)
                    retry_at[model] = now + decision.retry_after
                for effect in effects:
                    if isinstance(effect, StartLoad):
                        switches += 1
                        load_ends = now + load
            for effect in core.tick(now):
                if isinstance(effect, StartLoad):
                    switches += 1
                    load_ends = now + load
            if core.phase is Phase.READY:
                serving += step
            now += step
        assert serving / now >= 2 / 3, (load, serving / now)
        assert switches <= now / (3.5 * load) + 2, (load, switches)


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
    core.unload_done("a", 6.0)
    # After it: retried.
    decision, effects = core.arrive("a", 12.5, hold=False)
    assert isinstance(decision, Busy) and loads(effects) == ["a"]
    # A second failure doubles the back-off.
    core.load_done("a", 13.0, error="again")
    core.unload_done("a", 13.5)
    assert core.failures["a"].until == pytest.approx(33.0)


def test_failure_backoff_is_capped() -> None:
    core = make(failure_backoff=10.0, failure_backoff_max=25.0)
    now = 0.0
    for _ in range(6):
        core.arrive("a", now, hold=False)
        core.load_done("a", now, error="x")
        core.unload_done("a", now)
        now = core.failures["a"].until
    assert core.failures["a"].until - core.failures["a"].at == 25.0


def test_after_a_failure_the_next_queued_model_loads() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)
    waiter = core.arrive("b", 1.0, hold=True)[0]
    effects = core.load_done("a", 2.0, error="boom")
    assert loads(effects) == []  # first the clean-up
    effects = core.unload_done("a", 3.0)
    assert loads(effects) == ["b"]
    effects = core.load_done("b", 4.0)
    assert isinstance(waiter, Hold)
    assert Release("b", (waiter.waiter,)) in effects


def test_queued_model_in_backoff_fails_its_waiters_instead_of_loading() -> None:
    core = make(min_residency=0)
    core.arrive("a", 0.0, hold=False)
    core.load_done("a", 1.0, error="bad")
    core.unload_done("a", 1.5)
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
    core.unload_done("a", 1.5)
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
    core.unload_done("a", 1061.0)
    assert core.state_of("a", 1061.0) is ModelState.UNLOADED and core.active is None


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
    effects = core.unload_done("a", 6.0)
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
    core.lost("a", 2.0)
    assert core.state_of("a", 2.0) is ModelState.UNLOADED
    core.finish("a", 2.5)  # its in-flight request ends on its own
    decision, effects = core.arrive("a", 3.0, hold=False)
    assert isinstance(decision, Busy) and loads(effects) == ["a"]


def test_lost_is_ignored_while_loading() -> None:
    core = make()
    core.arrive("a", 0.0, hold=False)
    assert core.lost("a", 1.0) == []
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
    effects = core.unload_done("a", 4.0)
    assert loads(effects) == ["a"]  # the request at 2.5 wanted it back


def test_explicit_switch_overrides_residency() -> None:
    core = make(min_residency=100.0)
    ready(core, "a", 0.0)
    effects = core.request_switch("b", 1.0)
    assert loads(effects) == ["b"]


def test_stale_load_done_is_ignored() -> None:
    core = make()
    assert core.load_done("x", 1.0) == []
    assert core.unload_done("x", 1.0) == []
