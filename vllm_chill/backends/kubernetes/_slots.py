"""`K8sDeploymentsBackend`: several vLLM Deployments, each a slot that runs one model.

Each Deployment keeps everything a single one does (its args rewritten and its pod rolled for a
load, conditional writes and following the winner between proxy replicas, its models' status);
this only says which Deployment a model goes to. A slot's size is the GPU count of its vLLM
container's `nvidia.com/gpu` limit, read when the session opens (none declared: any model
fits); the scheduler places a model in the smallest free slot that has its
`tensorParallelSize` GPUs, or evicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import anyio

from vllm_chill._model import VLLMModel
from vllm_chill._placement import Capacity, Placement, Slots
from vllm_chill.backends._base import LoadedModel, LostCallback, ProgressCallback
from vllm_chill.backends.kubernetes._backend import K8sDeploymentBackend
from vllm_chill.observability._logs import get_logger

logger = get_logger(__name__)


class K8sDeploymentsBackend:
    """A slot per `K8sDeploymentBackend` (see the module docstring)."""

    def __init__(self, slots: Sequence[K8sDeploymentBackend]) -> None:
        names = [slot.deployment for slot in slots]
        if not names:
            raise ValueError("at least one Deployment is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"a Deployment is listed twice: {', '.join(names)}")
        self._slots = {slot.deployment: slot for slot in slots}
        self.capacity: Capacity = Slots(dict.fromkeys(names))
        #: What each slot runs (served name), as far as this proxy knows.
        self._models: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"K8sDeploymentsBackend({', '.join(self._slots)})"

    @asynccontextmanager
    async def session(self, on_lost: LostCallback) -> AsyncIterator[list[LoadedModel]]:
        """Every Deployment's session, nested; yields what each already runs, placed in its
        slot."""
        async with AsyncExitStack() as stack:
            adopted: list[LoadedModel] = []
            for name, slot in self._slots.items():
                found = await stack.enter_async_context(slot.session(self._lost(name, on_lost)))
                if found is not None:
                    self._models[name] = found.served_model_name
                    adopted.append(dataclasses.replace(found, placement=Placement((name,))))
            self.capacity = Slots({name: slot.gpus for name, slot in self._slots.items()})
            logger.info(
                "slots: %s",
                ", ".join(f"{n} ({s.gpus or 'any'} GPUs)" for n, s in self._slots.items()),
            )
            try:
                yield adopted
            finally:
                self._models.clear()

    def _lost(self, slot: str, on_lost: LostCallback) -> LostCallback:
        def lost(reason: str, *, model: str | None = None) -> None:
            served = self._models.pop(slot, None) or model
            on_lost(f"{reason} (Deployment {slot})", model=served)

        return lost

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        name = placement.units[0] if placement is not None else next(iter(self._slots))
        slot = self._slots[name]
        self._models.pop(name, None)  # what it ran is replaced, not lost
        loaded = await slot.load(model, progress)
        self._models[name] = model.served_model_name
        return dataclasses.replace(loaded, placement=Placement((name,)))

    async def unload(self, model: str | None = None) -> None:
        names = [n for n in self._slots if model is None or self._models.get(n) == model]
        for name in names:
            self._models.pop(name, None)
            await self._slots[name].unload()

    async def check(self) -> bool:
        results: list[bool] = []
        async with anyio.create_task_group() as tg:
            for slot in self._slots.values():

                async def one(slot: K8sDeploymentBackend = slot) -> None:
                    results.append(await slot.check())

                tg.start_soon(one)
        return all(results)
