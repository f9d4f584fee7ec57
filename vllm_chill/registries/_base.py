"""The `ModelRegistry` protocol: where models are defined.

Lookups are synchronous and served from memory: they sit on the per-request path, which must
not do I/O. Registries that read from disk or from Kubernetes refresh their cache in the
background and tell listeners when it changed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, runtime_checkable

from vllm_chill._model import VLLMModel

ChangeListener = Callable[[], None]


@runtime_checkable
class ModelRegistry(Protocol):
    def session(self) -> AbstractAsyncContextManager[None]:
        """Load the initial set of models on entry (a source that cannot be read fails here,
        before anything serves) and keep it current until the `async with` ends."""
        ...

    def get(self, served_model_name: str) -> VLLMModel | None:
        """The model clients call `served_model_name`, or None. No I/O."""
        ...

    def models(self) -> Sequence[VLLMModel]:
        """Every defined model, in a stable order. No I/O."""
        ...

    def ready(self) -> bool:
        """Whether the source of models is reachable (for `/readyz`)."""
        ...


class ListenerSet:
    """The subscribe/notify half that every registry shares."""

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self) -> None:
        for listener in list(self._listeners):
            listener()


def index_models(models: Iterable[VLLMModel]) -> dict[str, VLLMModel]:
    """Index by served name; a duplicate served name is a configuration error."""
    index: dict[str, VLLMModel] = {}
    for model in models:
        other = index.get(model.served_model_name)
        if other is not None and other != model:
            raise ValueError(
                f"servedModelName {model.served_model_name!r} is defined twice "
                f"({other.name!r} and {model.name!r})"
            )
        index[model.served_model_name] = model
    return dict(sorted(index.items()))


class IndexedRegistry:
    """The in-memory half every registry shares: the index by served name that lookups read
    without I/O, and listeners told of every change (`subscribe`: tests and embedding
    applications wait on it). Subclasses fill `_index`, call `_listeners.notify()` when it
    changed, and define `session` when they have something to watch, and `ready`."""

    def __init__(self) -> None:
        self._index: dict[str, VLLMModel] = {}
        self._listeners = ListenerSet()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        yield

    def get(self, served_model_name: str) -> VLLMModel | None:
        return self._index.get(served_model_name)

    def models(self) -> Sequence[VLLMModel]:
        return list(self._index.values())

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        return self._listeners.subscribe(listener)


class StaticRegistry(IndexedRegistry):
    """A fixed list of models, for libraries and tests."""

    def __init__(self, models: Iterable[VLLMModel]) -> None:
        super().__init__()
        self._index = index_models(models)

    def ready(self) -> bool:
        return True
