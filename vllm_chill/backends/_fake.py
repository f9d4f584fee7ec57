"""`FakeBackend`: an in-process backend for unit tests — no network, no processes.

Load time and failures are configurable per model; every call is recorded so that tests can
assert what the scheduler asked for. Loads can also be held open until a test releases them
(`gate`), which makes races reproducible without sleeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from vllm_chill._model import VLLMModel
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
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    loaded: str | None = None
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

    async def load(self, model: VLLMModel, progress: ProgressCallback) -> LoadedModel:
        name = model.served_model_name
        self.calls.append(("load", name))
        self.loaded = None
        progress("loading weights")
        await anyio.sleep(self.load_times.get(name, self.load_time))
        if self.gate is not None:
            await self.gate.wait()
        reason = self.failures.get(name)
        if reason is not None:
            raise LoadError(reason)
        self.loaded = name
        return LoadedModel(name, self.base_urls.get(name, self.base_url))

    async def unload(self) -> None:
        self.calls.append(("unload", self.loaded))
        self.loaded = None

    async def check(self) -> bool:
        return True

    def lose(self, reason: str = "simulated crash") -> None:
        """Pretend the loaded model died on its own."""
        self.loaded = None
        if self.on_lost is not None:
            self.on_lost(reason)

    @property
    def loads(self) -> list[str]:
        return [name for call, name in self.calls if call == "load" and name is not None]
