"""The decision core and its driver under a storm: a stateful property test.

Hypothesis drives the real `Switcher` (and so the real `SwitchCore`) with a backend whose loads
succeed, fail or are reported lost at any step, clients that arrive held or not, finish, and
disconnect at any step, operator switches and unloads, and a clock moved by hand. After every
step the counts the core holds must equal what is really live; after the storm every model must
still be servable. This is what catches a leaked in-flight count: one is enough to wedge every
later switch in a drain that never ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vllm_chill import StaticRegistry, VLLMModel
from vllm_chill._placement import Capacity, GpuPool, Placement, SingleSlot
from vllm_chill.backends._base import LoadedModel, LoadError, LostCallback, ProgressCallback
from vllm_chill.observability._metrics import Metrics
from vllm_chill.scheduler._core import Phase
from vllm_chill.scheduler._refusals import Refused
from vllm_chill.scheduler._switcher import Lease, Switcher
from vllm_chill.settings import LimitsSettings, SwitchingSettings

MODELS = ("a", "b", "c")


@dataclass
class StormBackend:
    """Loads end when the test says so: successfully, with an error, or lost right after."""

    capacity: Capacity = field(default_factory=SingleSlot)
    pending: dict[str, asyncio.Future[str | None]] = field(default_factory=dict)
    loaded: str | None = None
    #: What it runs, loaded last at the end.
    resident: list[str] = field(default_factory=list)
    on_lost: LostCallback | None = None
    #: When set, the next successful load reports the model lost this many loop callbacks
    #: after it returned (0: before the released waiters even run).
    lose_after: int | None = None
    _monitor: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def session(self, on_lost: LostCallback) -> AsyncIterator[LoadedModel | None]:
        self.on_lost = on_lost
        yield None

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        name = model.served_model_name
        self.loaded = None
        gone = self.resident if self.capacity.single else [*replacing, name]
        self.resident = [m for m in self.resident if m not in gone]
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.pending[name] = future
        try:
            error = await future
        finally:
            self.pending.pop(name, None)
        if error is not None:
            raise LoadError(error)
        self.loaded = name
        self.resident.append(name)
        if self.lose_after is not None:
            self._lose_later(self.lose_after)
            self.lose_after = None
        return LoadedModel(name, "http://127.0.0.1:9")

    def _lose_later(self, hops: int) -> None:
        """Report the loss from a task of its own (as backends do: a watch, a process
        monitor), started `hops` loop callbacks from now."""
        loop = asyncio.get_running_loop()
        if hops == 0:
            self._monitor = loop.create_task(self._report_loss())
        else:
            loop.call_soon(self._lose_later, hops - 1)

    async def _report_loss(self) -> None:
        self.lose()

    async def unload(self, model: str | None = None) -> None:
        await asyncio.sleep(0)
        self.resident = [m for m in self.resident if model is not None and m != model]
        if model is None or model == self.loaded:
            self.loaded = None

    async def check(self) -> bool:
        return True

    def lose(self) -> None:
        """The model loaded last dies on its own."""
        if not self.resident:
            return
        name = self.resident.pop()
        if name == self.loaded:
            self.loaded = None
        if self.on_lost is not None:
            self.on_lost("simulated crash", model=name)


@dataclass
class Client:
    model: str
    task: asyncio.Task[None] | None = None
    lease: Lease | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = "waiting"


class SwitchStorm(RuleBasedStateMachine):
    """One slot: one model at a time."""

    capacity: Capacity = SingleSlot()
    #: Each model's `tensorParallelSize` and `gpuMemoryUtilization`.
    needs: dict[str, tuple[int, float | None]] = dict.fromkeys(MODELS, (1, None))
    max_concurrent_loads = 1

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 1000.0
        self.backend = StormBackend(capacity=self.capacity)
        registry = StaticRegistry(
            VLLMModel.from_spec(
                {
                    "modelName": f"org/{m}",
                    "servedModelName": m,
                    "tensorParallelSize": tp,
                    **({"gpuMemoryUtilization": share} if share else {}),
                }
            )
            for m, (tp, share) in self.needs.items()
        )
        switching = SwitchingSettings(
            model_switch_timeout=10_000,
            idle_timeout=30.0,
            drain_timeout=5.0,
            min_residency=2.0,
            quiet_gap=0.5,
            failure_backoff=3.0,
            failure_backoff_max=10.0,
            max_concurrent_loads=self.max_concurrent_loads,
        )
        self.switcher = Switcher(
            self.backend,
            registry,
            switching,
            LimitsSettings(max_waiting=6),
            Metrics(),
            clock=self.clock,
        )
        self.runner = self.loop.create_task(self.switcher.run())
        self.settle()
        assert self.switcher.running
        self.clients: list[Client] = []

    def clock(self) -> float:
        return self.now

    def inside(self, action: Callable[[], object]) -> None:
        """Run `action` on the event loop, as the request handlers and backends do."""

        async def call() -> None:
            action()

        self.loop.run_until_complete(call())

    def settle(self, steps: int = 40) -> None:
        async def spin() -> None:
            for _ in range(steps):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    async def serve(self, client: Client, hold: float) -> None:
        """What the middleware does with a request: a slot, the relay, the slot handed back."""
        try:
            lease = await self.switcher.acquire(client.model, hold)
        except Refused as refused:
            client.outcome = refused.code
            return
        client.lease = lease
        current = asyncio.current_task()
        assert current is not None

        def cut() -> None:
            current.cancel()

        lease.on_cut = cut
        client.outcome = "serving"
        try:
            await client.done.wait()
            client.outcome = "served"
        finally:
            self.switcher.finish(lease)

    def live(self) -> list[Client]:
        return [c for c in self.clients if c.task is not None and not c.task.done()]

    # --- rules ----------------------------------------------------------------------------

    @rule(model=st.sampled_from(MODELS), hold=st.booleans())
    def request(self, model: str, hold: bool) -> None:
        client = Client(model)
        client.task = self.loop.create_task(self.serve(client, 60.0 if hold else 0.0))
        self.clients.append(client)
        self.settle()

    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        serving = [c for c in self.live() if c.outcome == "serving"]
        if serving:
            data.draw(st.sampled_from(serving)).done.set()
            self.settle()

    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        live = self.live()
        if live:
            task = data.draw(st.sampled_from(live)).task
            assert task is not None
            task.cancel()
            self.settle()

    @precondition(lambda self: bool(self.backend.pending))
    @rule(ok=st.booleans(), lose_after=st.none() | st.integers(0, 4), data=st.data())
    def end_load(self, ok: bool, lose_after: int | None, data: st.DataObject) -> None:
        assert len(self.backend.pending) <= self.max_concurrent_loads
        model = data.draw(st.sampled_from(sorted(self.backend.pending)))
        future = self.backend.pending[model]
        # Lost a few loop steps after the load returned: perhaps before the released waiters
        # ran, perhaps while they make their leases.
        self.backend.lose_after = lose_after if ok else None
        future.set_result(None if ok else "CUDA out of memory")
        self.settle()

    @precondition(lambda self: bool(self.backend.pending))
    @rule()
    def every_load_succeeds(self) -> None:
        for future in list(self.backend.pending.values()):
            future.set_result(None)
        self.settle()

    @rule()
    def lose(self) -> None:
        self.inside(self.backend.lose)
        self.settle()

    @rule(seconds=st.sampled_from((0.1, 0.3, 0.6, 1.0, 2.5, 6.0, 40.0)))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.switcher.nudge()
        self.settle()

    @rule()
    def operator_unload(self) -> None:
        self.inside(self.switcher.request_unload)
        self.settle()

    @rule(model=st.sampled_from(MODELS))
    def operator_switch(self, model: str) -> None:
        self.inside(lambda: self.switcher.request_switch(model))
        self.settle()

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def counts_equal_what_is_live(self) -> None:
        core = self.switcher.core
        leases: dict[str, int] = {}
        for client in self.live():
            lease = client.lease
            if lease is not None and not lease.released:
                leases[lease.model] = leases.get(lease.model, 0) + 1
        held = {m: len(s) for m, s in self.switcher._leases.items() if s}
        assert core.inflight == leases == held
        assert core.waiting_total == sum(len(w) for w in core.waiters.values())
        assert core.waiting_total == len(self.switcher._waiters)

    @invariant()
    def phases_are_consistent(self) -> None:
        core = self.switcher.core
        for resident in core.residents.values():
            model = resident.model
            if resident.phase is Phase.DRAINING:
                # A drain always ends: by its deadline, or when what is in flight finishes.
                assert not resident.cut_sent or not core.inflight.get(model)
                assert core.next_deadline() is not None or not core.inflight.get(model)
            if resident.phase is Phase.READY:
                loaded = self.switcher.loaded.get(model)
                assert loaded is not None and loaded.served_model_name == model
        assert set(self.switcher.loaded) <= set(core.residents)

    # --- after the storm ------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            for client in self.live():
                client.done.set()
            self.settle()
            for client in self.live():
                assert client.task is not None
                client.task.cancel()
            self.settle()
            assert self.switcher.core.inflight == {}
            self.now += 1000  # past every back-off, window and promise
            self.switcher.nudge()
            self.settle()
            for model in MODELS:
                self.served_after_the_storm(model)
        finally:
            self.switcher.stop()
            self.loop.run_until_complete(asyncio.wait_for(self.runner, 10))
            self.loop.close()

    def served_after_the_storm(self, model: str) -> None:
        client = Client(model)
        client.task = self.loop.create_task(self.serve(client, 60.0))
        for _ in range(20):
            self.settle()
            if client.outcome == "serving":
                break
            for future in list(self.backend.pending.values()):
                future.set_result(None)
            self.now += 1.0
            self.switcher.nudge()
        assert client.outcome == "serving", (model, client.outcome, self.switcher.status())
        client.done.set()
        self.settle()
        assert client.outcome == "served"


SwitchStorm.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_switch_storm = SwitchStorm.TestCase


class PoolSwitchStorm(SwitchStorm):
    """Two GPUs: a and b share GPU 0 or 1 at 0.45 each, c needs both; two loads at a time."""

    capacity = GpuPool(("0", "1"))
    needs = {"a": (1, 0.45), "b": (1, 0.45), "c": (2, None)}
    max_concurrent_loads = 2

    @invariant()
    def the_gpus_are_never_over_committed(self) -> None:
        use = {"0": 0.0, "1": 0.0}
        for resident in self.switcher.core.residents.values():
            for unit in resident.placement.units:
                use[unit] += resident.placement.fraction
        assert all(share <= 1.0 + 1e-9 for share in use.values()), use


PoolSwitchStorm.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_switch_storm = PoolSwitchStorm.TestCase


def test_the_storm_machine_can_fail() -> None:
    """The invariants are live: a count leaked on purpose is caught."""
    machine = SwitchStorm()
    try:
        machine.switcher.core.inflight["a"] = 1
        with pytest.raises(AssertionError):
            machine.counts_equal_what_is_live()
    finally:
        machine.switcher.core.inflight.clear()
        machine.teardown()
