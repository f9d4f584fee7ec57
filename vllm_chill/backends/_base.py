"""The `Backend` protocol: how a model gets onto the GPUs.

The switch scheduler never talks to Kubernetes or processes directly; it opens a session and
calls three operations inside it, reacting to what they report. A backend declares its
`capacity` (one slot, GPUs shared by fractions, or Deployments); the scheduler places models in
it and tells each load where it goes and which drained models it replaces. Every backend must be
cancellation-safe: the scheduler wraps `load` in `--model-switch-timeout` and cancels it when
the timeout fires, and then calls `unload` so that nothing is left half-loaded.

A session is an async context manager, so that whatever a backend runs in the background (watches,
output readers, exit watchers) lives in a task group that opens and closes in one place, nested
in the caller's: no "start and stop from the same task" rule to remember.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from vllm_chill._model import VLLMModel
from vllm_chill._placement import Capacity, Placement


@dataclass(frozen=True)
class LoadedModel:
    """Where a ready model answers. `served_model_name` is what clients ask for."""

    served_model_name: str
    base_url: str  # e.g. "http://127.0.0.1:8001" — the proxy appends the request path
    #: The server's own `/v1/models` entry for the model, as seen when it became ready
    #: (vLLM's `max_model_len`, `root`, ...), when the backend read it.
    entry: Mapping[str, Any] | None = field(default=None, compare=False)
    #: Where it runs, for a model found running at start-up by a backend of several slots.
    placement: Placement | None = field(default=None, compare=False)


class LoadError(Exception):
    """A load failed; `reason` is what the operator needs to read (CrashLoopBackOff, the last
    lines of a crashed process, ...). It reaches clients in `model_switch_failed` errors."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


#: Called by a backend with a short human-readable phase ("scaling up", "pulling image",
#: "waiting for /health", ...). Shown in 503 bodies, `/proxy/status` and the switch log lines.
ProgressCallback = Callable[[str], None]


class LostCallback(Protocol):
    """Called by a backend when a loaded model went away on its own (process died, pod
    deleted, another proxy replica switched the Deployment), with the reason, and the model
    when the backend runs several (None: the one it runs). May be called from the event loop
    only; backends running threads must hop back with `anyio.from_thread`."""

    def __call__(self, reason: str, *, model: str | None = None) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Loads models where the scheduler places them. See the module docstring."""

    #: Where models can run: `SingleSlot()` for a backend that runs one model at a time.
    capacity: Capacity

    def session(
        self, on_lost: LostCallback
    ) -> AbstractAsyncContextManager[LoadedModel | Sequence[LoadedModel] | None]:
        """Connect and start background work for the length of the `async with`; it yields
        what is loaded and ready right now (so that a restarted proxy does not reload a model
        that is already up): one model or None, or, for a backend of several slots, each
        with its `placement`. Leaving it stops the background work; it must not unload
        a Kubernetes model (other replicas may use it), while a process backend stops its
        children. `load`, `unload` and `check` are called only inside a session."""
        ...

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        """Load `model` at `placement` (one of `capacity`'s); return once it is ready to serve.
        The models in `replacing` were drained to make room: stop them first. A backend of one
        slot replaces whatever it runs.

        Raises `LoadError` with the reason on failure, as soon as the failure is known."""
        ...

    async def unload(self, model: str | None = None) -> None:
        """Unload `model`, or everything when None (scale to zero / stop the process).
        Idempotent."""
        ...

    async def check(self) -> bool:
        """Whether the backend's control plane is reachable (for `/readyz`)."""
        ...


@runtime_checkable
class SleepingBackend(Backend, Protocol):
    """A backend that can put a model to sleep (vLLM's sleep mode) and wake it: the process is
    kept, its GPU memory freed, and the next switch to it takes seconds instead of a load."""

    async def sleep(self, model: str, level: int) -> int | None:
        """Put the drained `model` to sleep (`/sleep?level=..&mode=wait`) and return once it
        is asleep, with the host memory its process then holds (bytes), when known. Raises on
        failure (the scheduler then stops it for real)."""
        ...

    async def wake(self, model: str, progress: ProgressCallback) -> LoadedModel:
        """Wake the sleeping `model` and return once it answers again. Raises on failure (the
        scheduler then stops it and loads it cold)."""
        ...
