"""`FakeBackend`: an in-process backend for unit tests — no network, no processes.

Load time and failures are configurable per model; every call is recorded so that tests can
assert what the scheduler asked for. Loads can also be held open until a test releases them
(`gate`), which makes races reproducible without sleeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from vllm_chill._model import VLLMModel
from vllm_chill._placement import Capacity, Placement, SingleSlot
from vllm_chill.backends._base import LoadedModel, LoadError, LostCallback, ProgressCallback


@dataclass
class FakeBackend:
    load_time: float = 0.0
    #: served name -> reason: loads of these models fail with LoadError(reason).
    failures: dict[str, str] = field(default_factory=dict)
    #: served name -> load time, overriding `load_time`.
    load_times: dict[str, float] = field(default_factory=dict)
    #: Where the "loaded" model answers (tests point it at a real loopback server).
    base_url: str = "http://127.0.0.1:9"
    #: served name -> base URL, overriding `base_url` (one real upstream per model).
    base_urls: dict[str, str] = field(default_factory=dict)
    #: What a new session reports as already loaded.
    preloaded: str | None = None
    #: When set, loads wait for this event before finishing.
    gate: anyio.Event | None = None
    #: Where models can run (one slot unless a test gives GPUs or slots).
    capacity: Capacity = field(default_factory=SingleSlot)
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    #: The model loaded last (None once it is unloaded), and where each resident one is.
    loaded: str | None = None
    placements: dict[str, Placement] = field(default_factory=dict)
    on_lost: LostCallback | None = None

    @asynccontextmanager
    async def session(self, on_lost: LostCallback) -> AsyncIterator[LoadedModel | None]:
        """Recorded as ("start", None) and ("stop", None) in `calls`."""
        self.on_lost = on_lost
        self.calls.append(("start", None))
        adopted = None
        if self.preloaded is not None:
            self.loaded = self.preloaded
            adopted = LoadedModel(self.preloaded, self.base_urls.get(self.preloaded, self.base_url))
        try:
            yield adopted
        finally:
            self.calls.append(("stop", None))

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        name = model.served_model_name
        self.calls.append(("load", name))
        self.loaded = None
        for gone in [*replacing, name] if not self.capacity.single else list(self.placements):
            self.placements.pop(gone, None)
        self.placements[name] = placement or Placement(("0",))
        progress("loading weights")
        await anyio.sleep(self.load_times.get(name, self.load_time))
        if self.gate is not None:
            await self.gate.wait()
        reason = self.failures.get(name)
        if reason is not None:
            self.placements.pop(name, None)
            raise LoadError(reason)
        self.loaded = name
        return LoadedModel(name, self.base_urls.get(name, self.base_url))

    async def unload(self, model: str | None = None) -> None:
        self.calls.append(("unload", model or self.loaded))
        for name in [n for n in self.placements if model is None or n == model]:
            del self.placements[name]
        if model is None or model == self.loaded:
            self.loaded = None

    async def check(self) -> bool:
        return True

    def lose(self, reason: str = "simulated crash", *, model: str | None = None) -> None:
        """Pretend a loaded model (default: the one loaded last) died on its own."""
        name = model or self.loaded
        if name is not None:
            self.placements.pop(name, None)
        if name == self.loaded:
            self.loaded = None
        if self.on_lost is not None:
            self.on_lost(reason, model=name)

    @property
    def loads(self) -> list[str]:
        return [name for call, name in self.calls if call == "load" and name is not None]
