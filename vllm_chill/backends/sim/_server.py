"""`SimModelServer`: one simulated vLLM (`SimApp`) served by a real uvicorn on loopback.

It is embedded in processes that already run an event loop and their own HTTP server (the
proxy, the tests), so it must not touch process-wide state: it binds its own socket (port 0
gives a free port, known before `start` returns), leaves signal handlers alone, and leaves
logging configuration alone (uvicorn's `log_config`/`log_level`/`access_log` options would
reconfigure the host's `uvicorn.*` loggers). It needs asyncio, as uvicorn does.

Lifecycle: `start` binds and begins answering at once (`/health` is 503), the model becomes
"loaded" after `load_time` (`/health` 200), and `stop` cuts open streams, shuts uvicorn down and
always returns within a few seconds. With `fail_load=True` the server instead shuts itself down
when the load time is over, as a vLLM that crashes while loading weights does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn

from vllm_chill.backends.sim._app import SimApp, SimStats
from vllm_chill.observability._logs import get_logger

log = get_logger(__name__)

#: How long `stop` lets uvicorn shut down gracefully before forcing it, and then cancelling it.
STOP_GRACE = 2.0


if TYPE_CHECKING:
    _HTTPProtocol = asyncio.Protocol
else:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol as _HTTPProtocol


class _QuietHTTPProtocol(_HTTPProtocol):
    """uvicorn's HTTP protocol without access-log lines: in a host that logs `uvicorn.access`,
    the sim's requests would otherwise be indistinguishable from the host's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access_log = False


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its SIGINT/SIGTERM handlers, which belong to the host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class SimModelServer:
    """A simulated `vllm serve` for one served model name, on a real loopback port."""

    def __init__(
        self,
        served_model_name: str,
        *,
        load_time: float = 3.0,
        tokens_per_second: float = 50.0,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        max_model_len: int = 8192,
        root: str | None = None,
        fail_load: bool = False,
        dev_mode: bool = False,
        sleep_mode: bool = False,
        wake_time: float = 0.5,
    ) -> None:
        self.served_model_name = served_model_name
        self.load_time = load_time
        self.fail_load = fail_load
        self._host = host
        self._port = port
        self.app = SimApp(
            served_model_name,
            tokens_per_second=tokens_per_second,
            max_model_len=max_model_len,
            api_key=api_key,
            root=root,
            dev_mode=dev_mode,
            sleep_mode=sleep_mode,
            wake_time=wake_time,
        )
        self._base_url: str | None = None
        self._server: _EmbeddedServer | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._settled: anyio.Event | None = None  # ready, or stopped before ready

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("SimModelServer is not started")
        return self._base_url

    @property
    def ready(self) -> bool:
        """Whether the simulated model has loaded (`/health` answers 200)."""
        return self.app.ready

    @property
    def settled(self) -> bool:
        """Whether the load is over: the model is ready, or the server exited before that."""
        return self._settled is not None and self._settled.is_set()

    @property
    def running(self) -> bool:
        """Whether the server is started and has not exited (by `stop` or a simulated crash)."""
        return self._task is not None and not self._task.done()

    @property
    def stats(self) -> SimStats:
        return self.app.stats

    async def start(self) -> str:
        """Bind, start serving in a task this object owns, and return the base URL."""
        if self._task is not None:
            raise RuntimeError("SimModelServer can only be started once")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets
        # that say they are TCP, and with Nagle on, every answer on a kept-alive connection
        # (headers and body are two writes) waited ~40 ms for the peer's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            # Listening now (not when uvicorn gets to it) means early clients queue instead of
            # being refused, so the URL is usable as soon as it is returned.
            sock.listen(2048)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        port = sock.getsockname()[1]
        host = f"[{self._host}]" if family == socket.AF_INET6 else self._host
        self._base_url = f"http://{host}:{port}"
        config = uvicorn.Config(
            self.app,
            interface="asgi3",
            lifespan="off",
            http=_QuietHTTPProtocol,
            ws="none",
            proxy_headers=False,
            log_config=None,
            timeout_graceful_shutdown=1,
        )
        self._sock = sock
        self._server = _EmbeddedServer(config)
        self._settled = anyio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(self._server, sock, self._settled), name=f"sim-vllm {self._base_url}"
        )
        return self._base_url

    async def wait_ready(self) -> bool:
        """Wait until the model has loaded (True) or the server exited before that (False)."""
        if self._settled is None:
            raise RuntimeError("SimModelServer is not started")
        await self._settled.wait()
        return self.ready

    async def stop(self) -> None:
        """Stop serving; open streams are cut. Idempotent, bounded in time, shielded from
        cancellation so that a cancelled caller still leaves no server behind."""
        task, server = self._task, self._server
        if task is None or server is None:
            return
        with anyio.CancelScope(shield=True):
            self.app.close()
            server.should_exit = True
            await asyncio.wait({task}, timeout=STOP_GRACE)
            if not task.done():
                server.force_exit = True
                await asyncio.wait({task}, timeout=1)
            if not task.done():
                log.warning("simulated vLLM %s did not shut down; cancelling it", self._base_url)
                task.cancel()
                await asyncio.wait({task}, timeout=1)
            if self._sock is not None:
                self._sock.close()
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("simulated vLLM %s failed", self._base_url, exc_info=task.exception())

    async def __aenter__(self) -> SimModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(
        self, server: _EmbeddedServer, sock: socket.socket, settled: anyio.Event
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._load, server, settled)
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
        finally:
            settled.set()

    async def _load(self, server: _EmbeddedServer, settled: anyio.Event) -> None:
        await anyio.sleep(self.load_time)
        if self.fail_load:
            log.warning("simulated vLLM %s: simulated load failure", self.served_model_name)
            self.app.close()
            server.should_exit = True
        else:
            self.app.ready = True
        settled.set()
