"""`SimBackend`: each load starts a simulated vLLM server on a free loopback port.

It goes through the same motions as a process backend — start the server, wait for `/health`,
then for `/v1/models` to list the served name, over real HTTP — so the proxy exercises its real
paths without a GPU. Without `gpus`, one server at a time: loading a model stops the previous
one first. With `gpus` (simulated ones: nothing is allocated), a server per resident model, placed
by the scheduler as on a machine with those GPUs: several models at once, with no GPU.

Testing hooks:

- A model whose `extraArgs` contain `--sim-fail-load` starts, "loads" for `load_time`, then
  crashes (its server shuts down without ever becoming healthy), and `load` raises
  `LoadError("simulated load failure: ...")` — the way a vLLM that dies loading weights fails.
- `crash()` kills the loaded server and reports it through the `on_lost` callback given to
  `start`, the way a pod deletion or an OOM-killed process is reported.

The servers are asyncio-only (uvicorn). `api_key` makes every server require
`Authorization: Bearer <key>` on `/v1/*` like vLLM's `--api-key`; the backend sends it for its
own readiness checks, and the proxy must be given it as its upstream key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from vllm_chill._model import VLLMModel
from vllm_chill._placement import Capacity, GpuPool, Placement, SingleSlot
from vllm_chill.backends._base import LoadedModel, LoadError, LostCallback, ProgressCallback
from vllm_chill.backends._sleep_api import is_sleeping, post_sleep, post_wake
from vllm_chill.backends.sim._server import SimModelServer
from vllm_chill.observability._logs import get_logger
from vllm_chill.settings._schema import SimSettings

log = get_logger(__name__)

FAIL_LOAD_FLAG = "--sim-fail-load"
#: How long a started server may take beyond its load time to answer; generous, since it only
#: guards against a wedged event loop (the scheduler's switch timeout is the real bound).
READY_SLACK = 30.0
_POLL_FIRST, _POLL_MAX = 0.02, 0.25


class SimBackend:
    """Loads a model by starting a `SimModelServer` for its served name."""

    def __init__(
        self,
        *,
        load_time: float = SimSettings.load_time,
        tokens_per_second: float = SimSettings.tokens_per_second,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        gpus: Sequence[str] = (),
        wake_time: float = SimSettings.wake_time,
    ) -> None:
        self.load_time = load_time
        self.wake_time = wake_time
        #: Models whose server sleeps (vLLM's sleep mode): kept when another loads.
        self.asleep: set[str] = set()
        self.tokens_per_second = tokens_per_second
        self.host = host
        self.capacity: Capacity = GpuPool(tuple(gpus)) if gpus else SingleSlot()
        self._api_key = api_key
        self._servers: dict[str, SimModelServer] = {}
        #: Where each resident model was placed (for tests and `/proxy/status` checks).
        self.placements: dict[str, Placement] = {}
        self._on_lost: LostCallback | None = None

    @property
    def server(self) -> SimModelServer | None:
        """The server started last (loading or loaded), for tests that inspect what it
        received."""
        return next(reversed(self._servers.values()), None)

    @property
    def servers(self) -> dict[str, SimModelServer]:
        return dict(self._servers)

    @asynccontextmanager
    async def session(self, on_lost: LostCallback) -> AsyncIterator[LoadedModel | None]:
        """Nothing is adopted: a fresh process has no simulated server running. Leaving the
        session stops the server it started."""
        self._on_lost = on_lost
        try:
            yield None
        finally:
            with anyio.CancelScope(shield=True):
                await self.unload()
            self._on_lost = None

    async def check(self) -> bool:
        return True

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        name = model.served_model_name
        one_slot = isinstance(self.capacity, SingleSlot)
        for other in [
            n
            for n in self._servers
            if (one_slot and n not in self.asleep) or n in replacing or n == name
        ]:
            await self._stop_server(other)
        progress("starting server")
        server = SimModelServer(
            model.served_model_name,
            load_time=self.load_time,
            tokens_per_second=self.tokens_per_second,
            host=self.host,
            api_key=self._api_key,
            max_model_len=model.max_model_len or 8192,
            root=model.model_name,
            fail_load=FAIL_LOAD_FLAG in model.extra_args,
            # As the local backend starts a vLLM with sleep mode: in its development mode.
            dev_mode=bool(model.enable_sleep_mode),
            sleep_mode=bool(model.enable_sleep_mode),
            wake_time=self.wake_time,
        )
        # Recorded before it starts, so that whatever interrupts the load, `unload` (and the
        # cleanup below) finds it.
        self._servers[name] = server
        if placement is not None and not one_slot:
            self.placements[name] = placement
        try:
            base_url = await server.start()
            entry = await self._wait_until_serving(server, base_url, progress)
        except BaseException:
            await self._stop_server(name)
            raise
        log.info("simulated vLLM for %s ready at %s", model.served_model_name, base_url)
        return LoadedModel(model.served_model_name, base_url, entry=entry)

    async def unload(self, model: str | None = None) -> None:
        for name in [n for n in self._servers if model is None or n == model]:
            await self._stop_server(name)

    async def crash(self, reason: str = "simulated crash", *, model: str | None = None) -> None:
        """Testing hook: a loaded server (the last one started, by default) dies on its own,
        and the proxy is told."""
        name = model or next(reversed(self._servers), None)
        if name is None or name not in self._servers:
            return
        await self._stop_server(name)
        if self._on_lost is not None:
            self._on_lost(reason, model=name)

    async def sleep(self, model: str, level: int) -> int | None:
        """`POST /sleep?level=..&mode=wait` (requests in flight finish first), then
        `/is_sleeping` until it says so. The simulator holds no host memory worth counting."""
        server = self._servers[model]
        async with self._client(server) as client:
            await post_sleep(client, level)  # answers once asleep
            if not await is_sleeping(client):
                raise LoadError("/is_sleeping says it is awake after /sleep")
        self.asleep.add(model)
        return None

    async def wake(self, model: str, progress: ProgressCallback) -> LoadedModel:
        server = self._servers[model]
        progress("waking")
        async with self._client(server) as client:
            await post_wake(client)  # answers once awake
            if await is_sleeping(client):
                raise LoadError("/is_sleeping says it still sleeps after /wake_up")
            models = await client.get("/v1/models")
            if models.status_code != 200:
                raise LoadError(f"/v1/models answered {models.status_code} after the wake")
        self.asleep.discard(model)
        return LoadedModel(model, server.base_url)

    def _client(self, server: SimModelServer) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        return httpx.AsyncClient(
            base_url=server.base_url,
            headers=headers,
            timeout=self.wake_time + READY_SLACK,
            trust_env=False,
        )

    async def _stop_server(self, name: str) -> None:
        server = self._servers.pop(name, None)
        self.placements.pop(name, None)
        self.asleep.discard(name)
        if server is not None:
            await server.stop()  # shielded and bounded by SimModelServer itself

    async def _wait_until_serving(
        self, server: SimModelServer, base_url: str, progress: ProgressCallback
    ) -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        name = server.served_model_name
        limit = self.load_time + READY_SLACK
        try:
            with anyio.fail_after(limit):
                async with httpx.AsyncClient(
                    base_url=base_url, headers=headers, timeout=5.0, trust_env=False
                ) as client:
                    progress("waiting for /health")
                    await _poll(server, client, "/health", lambda r: r.status_code == 200)
                    progress("waiting for /v1/models")
                    listing: list[httpx.Response] = []

                    def listed(response: httpx.Response) -> bool:
                        if _lists(response, name):
                            listing.append(response)  # kept: its entry is vLLM's own word
                            return True
                        return False

                    await _poll(server, client, "/v1/models", listed)
                    return _entry(listing[0], name)
        except TimeoutError:
            raise LoadError(
                f"the simulated server for {name!r} did not become ready within {limit:g}s"
            ) from None


async def _poll(
    server: SimModelServer,
    client: httpx.AsyncClient,
    path: str,
    ok: Callable[[httpx.Response], bool],
) -> None:
    """GET `path` until `ok`, backing off; fail as soon as the server has gone away."""
    delay = _POLL_FIRST
    while True:
        if not server.running or (server.settled and not server.ready):
            raise LoadError(
                f"simulated load failure: the server for {server.served_model_name!r} crashed "
                f"while loading ({FAIL_LOAD_FLAG})"
                if server.fail_load
                else f"the simulated server for {server.served_model_name!r} exited while loading"
            )
        try:
            if ok(await client.get(path)):
                return
        except httpx.TransportError:
            pass  # not accepting yet, or going away: the next round tells
        if server.settled:
            await anyio.sleep(delay)
        else:
            with anyio.move_on_after(delay):
                await server.wait_ready()  # wakes at once when the load ends either way
        delay = min(delay * 2, _POLL_MAX)


def _entry(response: httpx.Response, name: str) -> dict[str, Any] | None:
    """The model's entry in a `/v1/models` answer that lists it."""
    data = response.json().get("data", [])
    return next((card for card in data if isinstance(card, dict) and card.get("id") == name), None)


def _lists(response: httpx.Response, name: str) -> bool:
    if response.status_code != 200:
        return False
    try:
        data = response.json().get("data", [])
        return any(isinstance(card, dict) and card.get("id") == name for card in data)
    except (ValueError, AttributeError):
        return False
