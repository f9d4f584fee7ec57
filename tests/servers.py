"""Running ASGI apps on real loopback uvicorn servers inside a test's event loop."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import anyio
import uvicorn

from vllm_chill.http._asgi import ASGIApp


class _Embedded(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # signals belong to pytest
        yield


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp, *, lifespan: Literal["auto", "on", "off"] = "on"
) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port (lifespan included); yield its base URL."""
    # IPPROTO_TCP (not 0) so that asyncio turns Nagle off, as it does for its own sockets:
    # with Nagle, every answer on a kept-alive connection waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, lifespan=lifespan, log_config=None, timeout_graceful_shutdown=2, ws="none"
        )
        server = _Embedded(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:
                    if server.should_exit:
                        raise RuntimeError("server failed to start")
                    await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
                tg.cancel_scope.deadline = anyio.current_time() + 10  # bounded shutdown
    finally:
        sock.close()
