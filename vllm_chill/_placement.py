"""Where a model can run: the capacity the scheduler fills, and the rule that places a model.

Pure functions of what is declared, no I/O: a model's `Demand` comes from its `VLLMModel`
(`tensorParallelSize` GPUs, each with `gpuMemoryUtilization` of its memory: vLLM pre-allocates
exactly that fraction, so the budget is declared, not guessed), and the capacity from the
operator (`--gpus`, or one Deployment per slot). Three shapes:

- `SingleSlot`: no GPU accounting; one model at a time, whatever it asks for.
- `GpuPool`: GPUs of capacity 1.0 each, shared by fractions; a model needs `gpus` distinct GPUs
  with at least `fraction` free on each.
- `Slots`: exclusive slots (Kubernetes Deployments) of a known GPU count each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

#: Fractions are summed as floats; this much over 1.0 still counts as fitting (0.45 + 0.55).
EPSILON = 1e-9


@dataclass(frozen=True)
class Demand:
    """What one model needs: `gpus` distinct GPUs with `fraction` of each."""

    gpus: int = 1
    fraction: float = 1.0
    #: It can sleep (vLLM's sleep mode) instead of stopping when it gives way.
    can_sleep: bool = False

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"a model needs at least one GPU, not {self.gpus}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"a GPU fraction is in (0, 1], not {self.fraction}")

    def __str__(self) -> str:
        share = "whole" if self.fraction >= 1 else f"{self.fraction:g} of each"
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} ({share})"


@dataclass(frozen=True)
class Placement:
    """Where a model runs: the units it holds (GPU ids in order, or one slot's name) and the
    share of each."""

    units: tuple[str, ...]
    fraction: float = 1.0

    def __str__(self) -> str:
        share = "" if self.fraction >= 1 else f" x{self.fraction:g}"
        return ",".join(self.units) + share


class Capacity(Protocol):
    """Places a demand beside what is already placed; None when it does not fit now."""

    def place(self, demand: Demand, used: Iterable[Placement]) -> Placement | None: ...

    def describe_free(self, used: Iterable[Placement]) -> dict[str, float]: ...

    @property
    def single(self) -> bool:
        """Whether at most one model can ever be resident (the switch of one slot)."""
        ...

    def while_asleep(self, placement: Placement, reserve: float) -> Placement | None:
        """What a model placed at `placement` still holds while it sleeps: `reserve` of each
        of its GPUs (its CUDA context), or nothing where nothing is accounted."""
        ...

    def within(self, placement: Placement) -> Capacity:
        """The capacity of `placement`'s units alone: where a sleeping model wakes."""
        ...


def fits_ever(capacity: Capacity, demand: Demand) -> bool:
    """Whether `demand` fits the capacity when nothing else runs."""
    return capacity.place(demand, ()) is not None


def overlaps(a: Placement, b: Placement) -> bool:
    return not set(a.units).isdisjoint(b.units)


@dataclass(frozen=True)
class SingleSlot:
    """No GPU accounting: one model at a time, whatever it asks for."""

    name: str = "0"

    @property
    def single(self) -> bool:
        return True

    def place(self, demand: Demand, used: Iterable[Placement]) -> Placement | None:
        return None if any(True for _ in used) else Placement((self.name,))

    def while_asleep(self, placement: Placement, reserve: float) -> Placement | None:
        return None  # no accounting: a sleeping model lets the next one load

    def within(self, placement: Placement) -> Capacity:
        return self

    def describe_free(self, used: Iterable[Placement]) -> dict[str, float]:
        return {self.name: 0.0 if any(True for _ in used) else 1.0}


@dataclass(frozen=True)
class GpuPool:
    """GPUs of capacity 1.0 each, in the operator's order (`--gpus 0,1,2,3`)."""

    gpus: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError("a GPU pool needs at least one GPU")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"a GPU is listed twice in {','.join(self.gpus)}")

    @property
    def single(self) -> bool:
        return False

    def free(self, used: Iterable[Placement]) -> dict[str, float]:
        free = dict.fromkeys(self.gpus, 1.0)
        for placement in used:
            for unit in placement.units:
                if unit in free:
                    free[unit] -= placement.fraction
        return free

    def describe_free(self, used: Iterable[Placement]) -> dict[str, float]:
        return {gpu: round(max(share, 0.0), 6) for gpu, share in self.free(used).items()}

    def while_asleep(self, placement: Placement, reserve: float) -> Placement | None:
        return Placement(placement.units, reserve) if reserve > 0 else None

    def within(self, placement: Placement) -> Capacity:
        return GpuPool(placement.units)

    def place(self, demand: Demand, used: Iterable[Placement]) -> Placement | None:
        """Best fit that keeps whole GPUs whole: among the GPUs with room, the fullest first,
        so that a later model needing whole GPUs (tensor parallel) still finds them."""
        free = self.free(used)
        order = {gpu: i for i, gpu in enumerate(self.gpus)}
        room = [g for g in self.gpus if free[g] + EPSILON >= demand.fraction]
        if len(room) < demand.gpus:
            return None
        room.sort(key=lambda g: (free[g], order[g]))
        chosen = sorted(room[: demand.gpus], key=order.__getitem__)
        return Placement(tuple(chosen), demand.fraction)


@dataclass(frozen=True)
class Slots:
    """Exclusive slots, each with its GPU count (None: not known, any model fits)."""

    sizes: Mapping[str, int | None]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("at least one slot is needed")

    @property
    def single(self) -> bool:
        return len(self.sizes) == 1

    def describe_free(self, used: Iterable[Placement]) -> dict[str, float]:
        taken = {unit for placement in used for unit in placement.units}
        return {name: 0.0 if name in taken else 1.0 for name in self.sizes}

    def while_asleep(self, placement: Placement, reserve: float) -> Placement | None:
        return placement  # a Deployment runs one model, asleep or not

    def within(self, placement: Placement) -> Capacity:
        return Slots({u: self.sizes.get(u) for u in placement.units})

    def place(self, demand: Demand, used: Iterable[Placement]) -> Placement | None:
        """The smallest free slot that has enough GPUs, in the operator's order on a tie."""
        taken = {unit for placement in used for unit in placement.units}
        fitting = [
            (size if size is not None else 1 << 30, i, name)
            for i, (name, size) in enumerate(self.sizes.items())
            if name not in taken and (size is None or size >= demand.gpus)
        ]
        if not fitting:
            return None
        return Placement((min(fitting)[2],))


def plan_eviction(
    capacity: Capacity,
    demand: Demand,
    kept: Sequence[Placement],
    candidates: Sequence[tuple[str, Placement]],
) -> tuple[Placement, tuple[str, ...]] | None:
    """The victims whose removal lets `demand` fit beside `kept`, and where it then goes.

    `candidates` come in the order they should go (idle first, least recently used first).
    They are taken in that order until the model fits; then each one taken is given back, the
    most valuable first, if the model still fits without removing it: the set is minimal, and
    made of the cheapest victims. None when even removing every candidate is not enough."""
    chosen: list[tuple[str, Placement]] = []
    rest = list(candidates)
    placement = capacity.place(demand, [*kept, *(p for _, p in rest)])
    while placement is None:
        if not rest:
            return None
        chosen.append(rest.pop(0))
        placement = capacity.place(demand, [*kept, *(p for _, p in rest)])
    for victim in reversed(list(chosen)):
        trial = [c for c in chosen if c is not victim]
        others = [*kept, *(p for _, p in rest), victim[1]]
        spared = capacity.place(demand, others)
        if spared is not None:
            chosen = trial
            rest.append(victim)
            placement = spared
    return placement, tuple(name for name, _ in chosen)
