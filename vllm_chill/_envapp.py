"""`vllm_chill.app`: the proxy configured from `VLLM_CHILL_*` environment variables.

For `uvicorn vllm_chill:app` (and gunicorn, hypercorn, ...). Importing it does nothing: the
environment is read, and the middleware built, at lifespan startup, so a configuration error
fails the server's startup with the same one-line message `vllm-chill serve` prints (uvicorn then
exits). Until startup completed (or when it failed, or the server runs without lifespan), HTTP
requests are answered 503 in OpenAI's error shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AsyncExitStack

import anyio

from vllm_chill._build import build_middleware, load_kubernetes_client
from vllm_chill.http._asgi import Receive, Scope, Send
from vllm_chill.http._errors import error_response
from vllm_chill.middleware import ModelSwitchMiddleware
from vllm_chill.observability._logs import configure_logging, get_logger
from vllm_chill.settings import OPTIONS, Settings, one_line, parse_settings

log = get_logger(__name__)

_NOT_STARTED = (
    "vllm-chill is not configured: the server did not run ASGI lifespan startup "
    "(run uvicorn with --lifespan on), or startup failed (see the server log)."
)


#: Settings of the HTTP server itself, which `vllm-chill serve` passes to uvicorn.
_SERVER_ONLY = tuple(
    o.env for o in OPTIONS if o.group == "server" or o.dest == "logging.access_log"
)


class EnvConfiguredApp:
    """An ASGI app that builds `ModelSwitchMiddleware` from the environment at lifespan startup.

    `environ` defaults to `os.environ` as it is at startup. `configure_logging` applies
    `VLLM_CHILL_LOG_LEVEL`/`_LOG_FORMAT` to the process's logging (uvicorn's loggers included);
    turn it off when embedding this app in a process that configures logging itself.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, configure_logging: bool = True
    ) -> None:
        self._environ = environ
        self._configure_logging = configure_logging
        self.settings: Settings | None = None
        self.middleware: ModelSwitchMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        middleware = self.middleware
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif middleware is not None:
            await middleware(scope, receive, send)
        elif scope["type"] == "http":
            await error_response(send, 503, "not_ready", _NOT_STARTED, retry_after=5)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        async with AsyncExitStack() as stack:
            try:
                middleware = await self._build()
                await stack.enter_async_context(middleware.running())
            except Exception as exc:
                text = one_line(str(exc)) or type(exc).__name__
                # A configuration problem is its message; anything else gets its traceback.
                log.error("start-up failed: %s", text, exc_info=not isinstance(exc, ValueError))
                await send({"type": "lifespan.startup.failed", "message": text})
                return
            self.middleware = middleware
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            self.middleware = None
            try:
                await stack.aclose()
            except Exception as exc:
                log.exception("shutdown failed")
                await send({"type": "lifespan.shutdown.failed", "message": one_line(str(exc))})
                return
        await send({"type": "lifespan.shutdown.complete"})

    async def _build(self) -> ModelSwitchMiddleware:
        environ = os.environ if self._environ is None else self._environ
        settings = await anyio.to_thread.run_sync(parse_settings, [], environ)
        if self._configure_logging:
            configure_logging(
                settings.logging.level, settings.logging.format, secrets=settings.secrets()
            )
        for warning in settings.warnings:
            log.warning("%s", warning)
        for name in _SERVER_ONLY:
            value = environ.get(name, "").strip()
            if value and not value.startswith("tcp://"):  # not a Kubernetes service link
                log.warning("%s is for `vllm-chill serve`; here the ASGI server decides", name)
        api_client = None
        if settings.backend == "kubernetes" or settings.registry == "kubernetes":
            api_client = await anyio.to_thread.run_sync(load_kubernetes_client, settings)
        self.settings = settings
        log.info("configured from the environment: %r", settings)
        return build_middleware(settings, api_client=api_client)


app = EnvConfiguredApp()
