"""Several models at once: placement and eviction in the decision core, with an explicit clock.

The capacity here is two or four GPUs shared by fractions (`GpuPool`) or exclusive slots
(`Slots`); one slot is covered by `test_switch_core.py`.
"""

from __future__ import annotations

import pytest

from tests.support import switch_core
from vllm_chill._placement import (
    Capacity,
    Demand,
    GpuPool,
    Placement,
    SingleSlot,
    Slots,
    plan_eviction,
)
from vllm_chill.scheduler._core import (
    Admit,
    Busy,
    Cut,
    Effect,
    Failure,
    Hold,
    Phase,
    Refuse,
    Release,
    StartLoad,
    StartUnload,
    StartWake,
    SwitchCore,
)

HALF = Demand(1, 0.45)
WHOLE = Demand(1, 1.0)
PAIR = Demand(2, 1.0)


def pool(*gpus: str, capacity: Capacity | None = None, **kw: float) -> SwitchCore:
    """The tests' core on `gpus` (default two), with no idle timeout unless given."""
    return switch_core(
        **{"idle_timeout": 0.0, **kw}, capacity=capacity or GpuPool(gpus or ("0", "1"))
    )


def started(effects: list[Effect]) -> dict[str, StartLoad]:
    return {e.model: e for e in effects if isinstance(e, StartLoad)}


def serve(core: SwitchCore, model: str, demand: Demand, now: float) -> StartLoad:
    """Ask for `model` (a held request), finish its load at `now`, end the request."""
    decision, effects = core.arrive(model, now - 1, hold=True, demand=demand)
    assert isinstance(decision, Hold), decision
    load = started(effects)[model]
    effects = core.load_done(model, now)
    assert Release(model, (decision.waiter,)) in effects
    core.finish(model, now)
    return load


def gpu_use(core: SwitchCore) -> dict[str, float]:
    use: dict[str, float] = {}
    for resident in core.residents.values():
        for unit in resident.placement.units:
            use[unit] = use.get(unit, 0.0) + resident.placement.fraction
    return use


# --- placement ------------------------------------------------------------------------------


def test_two_small_models_share_one_gpu_and_keep_the_other_whole() -> None:
    core = pool("0", "1")
    a = serve(core, "a", HALF, 10.0)
    b = serve(core, "b", HALF, 20.0)
    assert a.placement == Placement(("0",), 0.45)
    assert b.placement == Placement(("0",), 0.45)  # best fit: GPU 1 stays whole
    assert a.replacing == b.replacing == ()
    assert core.is_serving("a") and core.is_serving("b")
    assert core.free_capacity() == {"0": pytest.approx(0.1), "1": 1.0}


def test_a_whole_gpu_model_loads_beside_them_without_evicting() -> None:
    core = pool("0", "1")
    serve(core, "a", HALF, 10.0)
    serve(core, "b", HALF, 20.0)
    c = serve(core, "c", WHOLE, 30.0)
    assert c.placement == Placement(("1",)) and c.replacing == ()
    assert {m: r.phase for m, r in core.residents.items()} == dict.fromkeys("abc", Phase.READY)


def test_a_tensor_parallel_model_evicts_the_idle_ones_least_recently_used_first() -> None:
    core = pool("0", "1")
    serve(core, "a", HALF, 10.0)
    serve(core, "b", HALF, 20.0)
    serve(core, "c", WHOLE, 30.0)
    decision, effects = core.arrive("d", 40.0, hold=True, demand=PAIR)
    assert isinstance(decision, Hold)
    # Every resident must go for two whole GPUs; nothing was in flight, so at once.
    load = started(effects)["d"]
    assert load.placement == Placement(("0", "1"))
    assert set(load.replacing) == {"a", "b", "c"}
    assert [e.model for e in core.evictions] == ["a", "b", "c"]  # oldest use first


def test_the_smallest_set_of_victims_makes_room() -> None:
    core = pool("0", "1")
    serve(core, "a", HALF, 10.0)
    serve(core, "b", HALF, 20.0)
    serve(core, "c", WHOLE, 30.0)
    # A whole GPU: either c alone (GPU 1), or a and b together (GPU 0). The least recently
    # used go first, a then b, and that is enough: c, the most recent, stays.
    _, effects = core.arrive("e", 40.0, hold=False, demand=WHOLE)
    load = started(effects)["e"]
    assert set(load.replacing) == {"a", "b"} and load.placement == Placement(("0",))
    assert core.is_serving("c")


def test_one_victim_suffices_when_it_frees_enough() -> None:
    core = pool("0", "1")
    serve(core, "a", HALF, 10.0)
    serve(core, "b", HALF, 20.0)
    serve(core, "c", WHOLE, 30.0)
    # 0.45 more: a alone frees enough on GPU 0.
    _, effects = core.arrive("f", 40.0, hold=False, demand=HALF)
    assert started(effects)["f"].replacing == ("a",)
    assert core.is_serving("b") and core.is_serving("c")


def test_an_idle_model_goes_before_a_busy_one_even_if_used_more_recently() -> None:
    core = pool("0", "1")
    serve(core, "a", WHOLE, 10.0)
    serve(core, "b", WHOLE, 20.0)
    assert core.arrive("a", 30.0, hold=False)[0] == Admit()  # a busy from now on
    _, effects = core.arrive("c", 31.0, hold=False, demand=WHOLE)
    assert started(effects)["c"].replacing == ("b",)  # b idle, though used after a


def test_a_model_that_never_fits_is_refused_with_a_reason() -> None:
    core = pool("0", "1")
    decision, effects = core.arrive("huge", 0.0, hold=True, demand=Demand(4, 1.0))
    assert isinstance(decision, Refuse) and effects == []
    assert "needs 4 GPUs" in decision.reason and "0=1, 1=1" in decision.reason
    assert core.queue == {} and core.waiting_total == 0


# --- draining, windows, starvation ------------------------------------------------------------


def test_a_busy_model_is_drained_never_killed_mid_request() -> None:
    core = pool("0", min_residency=5.0)
    serve(core, "a", WHOLE, 10.0)
    assert core.arrive("a", 20.0, hold=False)[0] == Admit()  # a long request on a
    decision, effects = core.arrive("b", 21.0, hold=True, demand=WHOLE)
    assert isinstance(decision, Hold)
    assert started(effects) == {}  # a is in use and past its window: it drains first
    assert core.phase_of("a") is Phase.DRAINING
    assert core.tick(50.0) == []  # still running, inside the drain timeout
    effects = core.finish("a", 55.0)  # it ended on its own
    assert started(effects)["b"].replacing == ("a",)
    assert not [e for e in effects if isinstance(e, Cut)]


def test_a_busy_model_serves_out_its_window_before_it_gives_way() -> None:
    core = pool("0", min_residency=5.0)
    serve(core, "a", WHOLE, 10.0)  # ready at 10: window until max(5, 2.5 x 1s) = 15
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()
    _, effects = core.arrive("b", 12.0, hold=False, demand=WHOLE)
    assert started(effects) == {} and core.phase_of("a") is Phase.READY
    assert core.next_deadline() == 15.0
    effects = core.tick(15.0)
    assert core.phase_of("a") is Phase.DRAINING


def test_a_drain_that_overstays_is_cut() -> None:
    core = pool("0", drain_timeout=10.0, min_residency=0.0)
    serve(core, "a", WHOLE, 10.0)
    core.arrive("a", 20.0, hold=False)
    core.arrive("b", 21.0, hold=False, demand=WHOLE)
    assert core.phase_of("a") is Phase.DRAINING
    assert core.tick(31.0) == [Cut("a")]
    assert started(core.finish("a", 31.5))["b"].replacing == ("a",)


def test_room_made_for_a_waiting_model_is_not_taken_by_one_behind_it() -> None:
    """No starvation: a TP=2 model waits for a busy one's window; a small model asked for
    meanwhile may not slip into the GPU being freed for it."""
    core = pool("0", "1", min_residency=5.0)
    serve(core, "a", WHOLE, 10.0)
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()  # a busy on GPU 0 until 15
    decision, effects = core.arrive("big", 12.0, hold=False, demand=PAIR)
    assert isinstance(decision, Busy) and started(effects) == {}
    _, effects = core.arrive("small", 12.5, hold=False, demand=HALF)
    # GPU 1 is free, but it is part of big's place: small waits its turn.
    assert started(effects) == {}
    core.tick(15.0)  # a's window ends: it drains for big
    effects = core.finish("a", 16.0)
    assert started(effects)["big"].placement == Placement(("0", "1"))
    assert "small" in core.queue


def test_loads_one_at_a_time_by_default_and_never_on_a_shared_gpu() -> None:
    core = pool("0", "1")
    _, effects = core.arrive("a", 0.0, hold=False, demand=HALF)
    assert list(started(effects)) == ["a"]
    _, effects = core.arrive("b", 1.0, hold=False, demand=WHOLE)
    assert started(effects) == {}  # one load at a time
    effects = core.load_done("a", 5.0)
    assert list(started(effects)) == ["b"]

    parallel = pool("0", "1", max_concurrent_loads=2)
    _, first = parallel.arrive("a", 0.0, hold=False, demand=HALF)
    _, second = parallel.arrive("b", 0.1, hold=False, demand=HALF)
    _, third = parallel.arrive("c", 0.2, hold=False, demand=WHOLE)
    assert started(first)["a"].placement.units == ("0",)
    # b would share GPU 0 with a's load in progress: not while a loads. c gets GPU 1.
    assert started(second) == {}
    assert started(third)["c"].placement.units == ("1",)
    assert list(started(parallel.load_done("a", 3.0))) == ["b"]


def test_max_loaded_caps_the_count_whatever_fits() -> None:
    core = pool("0", "1", "2", "3", max_loaded=2)
    serve(core, "a", HALF, 10.0)
    serve(core, "b", HALF, 20.0)
    _, effects = core.arrive("c", 30.0, hold=False, demand=HALF)
    assert started(effects)["c"].replacing == ("a",)


def test_each_resident_model_idles_out_on_its_own_timer() -> None:
    core = pool("0", "1", idle_timeout=100.0)
    serve(core, "a", WHOLE, 10.0)
    serve(core, "b", WHOLE, 50.0)
    assert core.next_deadline() == 110.0
    effects = core.tick(110.0)
    assert StartUnload("a", "idle") in effects and core.is_serving("b")
    core.unload_done("a", 111.0)
    assert core.next_deadline() == 150.0
    assert StartUnload("b", "idle") in core.tick(150.0)


def test_a_victim_lost_while_draining_lets_the_load_go_on() -> None:
    core = pool("0", min_residency=0.0)
    serve(core, "a", WHOLE, 10.0)
    core.arrive("a", 20.0, hold=False)
    core.arrive("b", 21.0, hold=False, demand=WHOLE)
    assert core.phase_of("a") is Phase.DRAINING
    effects = core.lost("a", 22.0)
    assert started(effects)["b"].replacing == ()
    core.finish("a", 23.0)  # the cut request's count comes back later: harmless
    assert core.inflight == {}


def test_a_failed_load_frees_its_place_only_once_cleaned_up() -> None:
    core = pool("0")
    core.arrive("a", 0.0, hold=False, demand=WHOLE)
    core.arrive("b", 1.0, hold=False, demand=WHOLE)
    effects = core.load_done("a", 2.0, error="CUDA out of memory")
    assert StartUnload("a", "failed") in effects and started(effects) == {}
    assert list(started(core.unload_done("a", 3.0))) == ["b"]


def test_exclusive_slots_take_the_smallest_that_fits() -> None:
    core = pool(capacity=Slots({"big": 4, "small": 1}), min_residency=0.0)
    _, effects = core.arrive("tiny", 0.0, hold=False, demand=Demand(1, 0.2))
    assert started(effects)["tiny"].placement == Placement(("small",))
    core.load_done("tiny", 1.0)
    _, effects = core.arrive("tp2", 2.0, hold=False, demand=Demand(2))
    assert started(effects)["tp2"].placement == Placement(("big",))


# --- the placement rules on their own ---------------------------------------------------------


def test_placement_prefers_the_fullest_gpu_that_fits() -> None:
    gpus = GpuPool(("0", "1", "2"))
    used = [Placement(("1",), 0.5)]
    assert gpus.place(Demand(1, 0.5), used) == Placement(("1",), 0.5)
    assert gpus.place(Demand(2, 1.0), used) == Placement(("0", "2"))
    assert gpus.place(Demand(3, 1.0), used) is None
    assert SingleSlot().place(Demand(8), []) == Placement(("0",))
    assert SingleSlot().place(Demand(1), [Placement(("0",))]) is None


def test_eviction_plans_are_minimal() -> None:
    gpus = GpuPool(("0", "1"))
    candidates = [
        ("old", Placement(("0",), 0.3)),
        ("mid", Placement(("1",), 1.0)),
        ("new", Placement(("0",), 0.3)),
    ]
    plan = plan_eviction(gpus, Demand(1, 1.0), [], candidates)
    # old alone is not enough; old + mid is, but then old can be given back: mid alone.
    assert plan == (Placement(("1",)), ("mid",))
    assert plan_eviction(gpus, Demand(3), [], candidates) is None


# --- Retry-After with several models ------------------------------------------------------------


def test_retry_after_counts_the_wait_for_a_busy_model_to_give_way() -> None:
    core = pool("0", min_residency=5.0)
    serve(core, "a", WHOLE, 10.0)  # window until 15
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()
    decision, _ = core.arrive("b", 12.0, hold=False, demand=WHOLE)
    # 3 s of a's window, then b's first load (30 s, nothing measured yet)
    assert decision == Busy(retry_after=33)


def test_retry_after_counts_the_load_in_progress_when_loads_go_one_at_a_time() -> None:
    core = pool("0", "1")
    core.arrive("a", 0.0, hold=False, demand=WHOLE)  # loading on GPU 0, 30 s estimated
    decision, effects = core.arrive("b", 10.0, hold=False, demand=WHOLE)
    assert started(effects) == {}  # GPU 1 is free, but one load at a time
    assert decision == Busy(retry_after=20 + 30)


# --- found in review ----------------------------------------------------------------------------


def test_a_request_held_as_its_models_turn_ends_loads_it_again_after_the_switch() -> None:
    """Asked for once its window ended, a model queues behind the one it gives way to: its
    held request is served when it comes back, not stranded."""
    core = pool("0", min_residency=5.0)
    serve(core, "a", WHOLE, 10.0)  # window until 15
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()  # in flight on a
    core.arrive("b", 12.0, hold=False, demand=WHOLE)  # waits for a's window
    decision, _ = core.arrive("a", 16.0, hold=True, demand=WHOLE)  # a's turn is over
    assert isinstance(decision, Hold)
    assert "a" in core.queue
    effects = core.finish("a", 16.5)  # a drained: b loads in its place
    assert started(effects)["b"].replacing == ("a",)
    core.load_done("b", 40.0)
    # Nobody uses b: after the quiet gap it gives way to a, which was waiting.
    effects = core.tick(45.0) + core.tick(200.0)
    loads = [e for e in effects if isinstance(e, StartLoad)]
    assert [e.model for e in loads] == ["a"]
    released = core.load_done("a", 210.0)
    assert Release("a", (decision.waiter,)) in released
    assert core.waiting_total == 0


def test_a_model_asked_for_as_its_turn_ends_is_served_if_nothing_needs_its_place() -> None:
    core = pool("0", min_residency=5.0)
    serve(core, "a", WHOLE, 10.0)
    assert core.arrive("a", 11.0, hold=False)[0] == Admit()
    _, _ = core.arrive("b", 12.0, hold=False, demand=WHOLE)
    core.failures["b"] = Failure("gone", 12.5, 1000.0, 1)  # b cannot load any more
    assert core.arrive("a", 16.0, hold=True, demand=WHOLE)[0] == Admit()
    assert core.queue == {} and core.waiting_total == 0


def test_the_sleep_budget_never_stops_the_model_being_woken() -> None:
    sleeper = Demand(1, 0.9, can_sleep=True)
    core = pool("0", max_sleeping=1, min_residency=0.0, quiet_gap=0.0)
    serve(core, "a", sleeper, 10.0)
    core.arrive("b", 20.0, hold=True, demand=sleeper)
    core.sleep_done("a", 21.0)
    core.load_done("b", 30.0)
    core.finish("b", 30.0)
    core.arrive("a", 40.0, hold=True, demand=sleeper)  # b sleeps for a to wake
    effects = core.sleep_done("b", 41.0)
    # Two asleep for a moment; the one to go is not a, which wakes now.
    assert [e for e in effects if isinstance(e, StartWake)] == [
        StartWake("a", Placement(("0",), 0.9))
    ]
    assert not [e for e in effects if isinstance(e, StartLoad)]
    assert core.phase_of("a") is Phase.WAKING


# --- what an operator asks for (the status page's buttons) ----------------------------------


def test_unloading_one_model_leaves_the_others_serving() -> None:
    core = pool("0", "1")
    serve(core, "a", HALF, 10.0)
    serve(core, "b", HALF, 20.0)
    core.arrive("a", 21.0, hold=False)  # a request in flight on "a": it drains, not cut
    effects = core.request_unload(22.0, "a")
    assert core.phase_of("a") is Phase.DRAINING and core.is_serving("b")
    assert not any(isinstance(e, StartUnload) for e in effects)
    assert StartUnload("a", "requested") in core.finish("a", 23.0)
    assert core.phase_of("b") is Phase.READY
    core.unload_done("a", 24.0)
    assert set(core.residents) == {"b"}


def test_unloading_a_model_that_is_loading_or_not_resident_changes_nothing() -> None:
    core = pool("0", "1")
    serve(core, "a", HALF, 10.0)
    core.arrive("b", 11.0, hold=True, demand=HALF)
    assert core.request_unload(12.0, "b") == [] and core.phase_of("b") is Phase.LOADING
    assert core.request_unload(12.0, "nobody") == []
    assert core.phase_of("a") is Phase.READY


def test_every_switch_is_kept_in_order_with_its_outcome() -> None:
    core = pool("0", "1", max_concurrent_loads=2)
    serve(core, "a", HALF, 10.0)
    core.arrive("b", 11.0, hold=True, demand=HALF)
    core.arrive("c", 11.5, hold=True, demand=WHOLE)  # loads beside "b", on the other GPU
    core.load_done("c", 14.0, "boom")  # the later load ends first: each record its own
    core.load_done("b", 15.0)
    records = [(r.number, r.to_model, r.result, r.error) for r in core.switches]
    assert records == [
        (1, "a", "success", None),
        (2, "b", "success", None),
        (3, "c", "failure", "boom"),
    ]
    assert core.last_switch is not None and core.last_switch.to_model == "c"
    assert [r.finished_at for r in core.switches] == [10.0, 15.0, 14.0]
