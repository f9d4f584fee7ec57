"""What a user measures of the switch policy, on the simulator.

    python benchmarks/switching.py                      # ~70 s
    python benchmarks/switching.py --write-doc docs/performance.md

Three measurements, each against the real proxy (`ModelSwitchMiddleware` with its switcher)
in front of simulated vLLM servers on loopback that take a set time to load:

(a) one user, A -> B -> A: from the first request for the new model to its first answer,
    minus the load time, for a client held by the proxy (`max_wait`), one that retries every
    100 ms after a 503, and one that sleeps each Retry-After;
(b) two clients alternating for 60 s, each wanting its own model continuously and retrying
    after exactly the Retry-After it was given (as the official openai client does): number
    of switches, serving fraction (share of the wall clock with a model serving) and the
    longest a client waited, for 1 s and 10 s loads;
(c) from (b): every Retry-After given against when the model really became ready;
(d) (b) again with one simulated GPU (`--gpus 0`) and both models at
    `gpuMemoryUtilization: 0.45`: they fit side by side, so both stay loaded;
(e) one user, held, A -> B -> A with 10 s loads, where A has `enableSleepMode` (a 0.5 s wake):
    the time to the first answer of each switch, warm (A woken) against cold (B loaded).

"Each client's model serving" is the share of the wall clock during which the model a client
wants is serving, averaged over the clients: what each user gets.

Load times are learnt before measuring (each model is loaded once), as they are in a proxy
that has been up for a while; the first load of a model is always announced as 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vllm_chill import ModelSwitchMiddleware, StaticRegistry, VLLMModel
from vllm_chill.backends.sim._backend import SimBackend
from vllm_chill.scheduler._core import Phase
from vllm_chill.settings import Settings, SwitchingSettings

MARK_START = "<!-- switching-results:start (written by benchmarks/switching.py) -->"
MARK_END = "<!-- switching-results:end -->"
MODELS = ("alpha", "beta")


def spec(name: str, share: float | None = None, *, sleeps: bool = False) -> VLLMModel:
    extra: dict[str, Any] = {"gpuMemoryUtilization": share} if share else {}
    if sleeps:
        extra["enableSleepMode"] = True
    return VLLMModel.from_spec({"modelName": f"org/{name}", "servedModelName": name, **extra})


def body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@dataclass
class Timeline:
    """When each model became ready (sampled from the switcher's own phase)."""

    ready_since: dict[str, list[float]] = field(default_factory=dict)
    serving: float = 0.0
    #: Per model, how long it was serving.
    per_model: dict[str, float] = field(default_factory=dict)
    switches: int = 0


@asynccontextmanager
async def proxy(
    load_time: float,
    users: int = 1,
    max_wait: float = 0.0,
    gpus: tuple[str, ...] = (),
    sleepers: tuple[str, ...] = (),
    wake_time: float = 0.5,
) -> AsyncIterator[tuple[list[httpx.AsyncClient], Any]]:
    """The proxy in front of simulated servers; one HTTP client per user, each from an address
    of its own (the proxy tells users apart by address). With `gpus`, the models take 0.45 of
    a GPU each; `sleepers` have `enableSleepMode`."""
    share = 0.45 if gpus else None
    app = ModelSwitchMiddleware(
        registry=StaticRegistry(spec(m, share, sleeps=m in sleepers) for m in MODELS),
        backend=SimBackend(
            load_time=load_time, tokens_per_second=0, gpus=gpus, wake_time=wake_time
        ),
        settings=Settings(switching=SwitchingSettings(max_wait=max_wait)),
    )
    async with app.running(), AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app, client=(f"10.0.0.{i + 1}", 40000)),
                    base_url="http://proxy",
                    timeout=120,
                )
            )
            for i in range(users)
        ]
        yield clients, app


async def until_answered(
    http: httpx.AsyncClient, model: str, *, poll: float | None
) -> tuple[float, list[tuple[float, int]]]:
    """Ask for `model` until it answers; returns the time taken and the 503s (when, Retry-After).
    `poll` None: sleep the Retry-After; else retry after `poll` seconds."""
    started = time.monotonic()
    refusals: list[tuple[float, int]] = []
    while True:
        r = await http.post("/v1/chat/completions", json=body(model))
        if r.status_code == 200:
            return time.monotonic() - started, refusals
        assert r.status_code == 503, r.text
        retry_after = int(r.headers["retry-after"])
        refusals.append((time.monotonic(), retry_after))
        await asyncio.sleep(retry_after if poll is None else poll)


async def single_user(load_time: float) -> dict[str, float]:
    results: dict[str, float] = {}
    for label, max_wait, poll in (
        ("held", 60.0, None),
        ("retrying every 100 ms", 0.0, 0.1),
        ("sleeping each Retry-After (the openai client)", 0.0, None),
    ):
        async with proxy(load_time, max_wait=max_wait) as ([http], _):
            for model in MODELS:  # learn the load times
                await until_answered(http, model, poll=0.05)
            switches = [
                await until_answered(http, m, poll=poll) for m in ("alpha", "beta", "alpha")
            ]
        results[label] = max(took for took, _ in switches) - load_time
    return results


async def warm_and_cold(load_time: float, wake_time: float) -> dict[str, float]:
    """A -> B -> A held by the proxy, A with sleep mode: each switch's time to first answer."""
    async with proxy(load_time, max_wait=60.0, sleepers=("alpha",), wake_time=wake_time) as (
        [http],
        _,
    ):
        await until_answered(http, "alpha", poll=None)  # the first load of each: learnt
        cold, _ = await until_answered(http, "beta", poll=None)
        warm, _ = await until_answered(http, "alpha", poll=None)
        again, _ = await until_answered(http, "beta", poll=None)
    return {"load": load_time, "wake": wake_time, "cold": max(cold, again), "warm": warm}


async def sample(app: Any, timeline: Timeline, stop: asyncio.Event) -> None:
    core = app.switcher.core
    last = time.monotonic()
    was_loading: set[str] = set()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        ready = [r for r in core.residents.values() if r.phase is Phase.READY]
        if ready:
            timeline.serving += now - last
        for resident in ready:
            model = resident.model
            timeline.per_model[model] = timeline.per_model.get(model, 0.0) + now - last
            readies = timeline.ready_since.setdefault(model, [])
            if not readies or readies[-1] < resident.ready_at:  # the switcher's clock is ours
                readies.append(resident.ready_at)
        loading = {m for m, r in core.residents.items() if r.phase is Phase.LOADING}
        timeline.switches += len(loading - was_loading)
        was_loading = loading
        last = now


async def alternating(
    load_time: float, seconds: float, gpus: tuple[str, ...] = ()
) -> dict[str, Any]:
    async with proxy(load_time, users=len(MODELS), gpus=gpus) as (clients, app):
        for http, model in zip(clients, MODELS, strict=True):  # learn the load times
            await until_answered(http, model, poll=0.05)
        timeline = Timeline()
        stop = asyncio.Event()
        waits: list[float] = []
        refusals: list[tuple[str, float, int]] = []

        started = time.monotonic()

        async def user(http: httpx.AsyncClient, model: str) -> None:
            while time.monotonic() - started < seconds:
                took, refused = await until_answered(http, model, poll=None)
                if refused:
                    waits.append(took)
                refusals.extend((model, at, ra) for at, ra in refused)
                await asyncio.sleep(0.05)  # continuous use: the next request right away

        sampler = asyncio.create_task(sample(app, timeline, stop))
        await asyncio.gather(*(user(h, m) for h, m in zip(clients, MODELS, strict=True)))
        elapsed = time.monotonic() - started
        stop.set()
        await sampler
    errors = []
    for model, at, retry_after in refusals:
        readies = [t for t in timeline.ready_since.get(model, []) if t >= at - 0.05]
        if readies:
            errors.append(at + retry_after - readies[0])
    return {
        "load": load_time,
        "gpus": gpus,
        "seconds": elapsed,
        "switches": timeline.switches,
        "serving": timeline.serving / elapsed,
        "each": statistics.mean(timeline.per_model.get(m, 0.0) for m in MODELS) / elapsed,
        "longest_wait": max(waits, default=0.0),
        "retry_after_error": errors,
    }


def table(single: dict[str, float], runs: list[dict[str, Any]], sleep: dict[str, float]) -> str:
    lines = [
        "| one user, A→B→A, 1 s loads | switch latency minus the load time (worst of 3) |",
        "|---|---|",
    ]
    for label, extra in single.items():
        lines.append(f"| {label} | {extra:.2f} s |")
    lines += [
        "",
        "| two clients alternating | switches | serving fraction | each client's model serving"
        " | longest wait | Retry-After minus actual ready: median / worst early / worst late"
        " | 503s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        errors = run["retry_after_error"]
        median = statistics.median(errors) if errors else 0.0
        early = min(errors, default=0.0)
        late = max(errors, default=0.0)
        where = ", both on one GPU at 0.45" if run["gpus"] else ""
        lines.append(
            f"| {run['load']:g} s loads, {run['seconds']:.0f} s{where} | {run['switches']} | "
            f"{run['serving']:.2f} | {run['each']:.2f} | {run['longest_wait']:.1f} s | "
            f"{median:+.1f} s / {early:+.1f} s / {late:+.1f} s | {len(errors)} |"
        )
    lines += [
        "",
        f"| one user, A→B→A held, {sleep['load']:g} s loads, A sleeps (wake {sleep['wake']:g} s)"
        " | time to first answer |",
        "|---|---|",
        f"| cold switch (B loaded; worst of 2) | {sleep['cold']:.2f} s |",
        f"| warm switch (A woken) | {sleep['warm']:.2f} s |",
    ]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    text = path.read_text()
    start, end = text.index(MARK_START), text.index(MARK_END)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.write_text(
        text[: start + len(MARK_START)] + f"\n\nMeasured {stamp}.\n\n{block}\n\n" + text[end:]
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of run (b)")
    parser.add_argument("--write-doc", type=Path, help="update the results block in this file")
    args = parser.parse_args()
    single, sleep, *runs = await asyncio.gather(
        single_user(1.0),
        warm_and_cold(10.0, 0.5),
        alternating(1.0, args.seconds),
        alternating(10.0, args.seconds),
        alternating(10.0, args.seconds, gpus=("0",)),
    )
    block = table(single, runs, sleep)
    print(block)
    if args.write_doc:
        write_doc(args.write_doc, block)


if __name__ == "__main__":
    asyncio.run(main())
