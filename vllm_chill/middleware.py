"""`ModelSwitchMiddleware`: the pure ASGI application in front of the models.

It owns the request path: routing, authentication, reading the model out of the body, asking
the switcher for a slot on a ready model, and relaying to it. No framework runs per request;
the few JSON answers it makes itself are built with the standard library.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.abc

from vllm_chill._model import VLLMModel
from vllm_chill.admin._events import stream_events
from vllm_chill.admin._page import is_ui, serve_page
from vllm_chill.admin._view import status_view
from vllm_chill.backends._base import Backend
from vllm_chill.http._asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    header,
    send_json,
    send_text,
)
from vllm_chill.http._errors import error_response
from vllm_chill.http._extract import (
    BadRequest,
    model_and_stream,
    model_from_json,
    model_from_multipart,
)
from vllm_chill.http._progress import STREAM_PATHS, HeldStream
from vllm_chill.http._upstream import (
    UpstreamAborted,
    UpstreamClient,
    UpstreamTimeout,
    UpstreamTransport,
    UpstreamUnavailable,
)
from vllm_chill.observability._logs import get_logger
from vllm_chill.observability._metrics import CONTENT_TYPE_LATEST, Metrics
from vllm_chill.observability._redact import mask_secret_args
from vllm_chill.registries._base import ModelRegistry
from vllm_chill.scheduler._core import ModelState
from vllm_chill.scheduler._refusals import NotRunning, Refused
from vllm_chill.scheduler._switcher import Lease, Switcher
from vllm_chill.settings._schema import Settings

log = get_logger(__name__)

#: POST paths whose JSON body names the model; any other POST /v1/* carrying
#: "model" is routed too.
MODEL_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/rerank",
        "/v1/score",
        "/v1/pooling",
        "/tokenize",
        "/detokenize",
        "/rerank",
        "/score",
        "/pooling",
        "/classify",
        "/v1/classify",
        "/v2/rerank",
        "/v2/embed",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)
#: vLLM's operator endpoints: never forwarded from clients.
OPERATOR_PATHS = frozenset(
    {
        "/sleep",
        "/wake_up",
        "/is_sleeping",
        "/collective_rpc",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/start_profile",
        "/stop_profile",
        "/scale_elastic_ep",
        "/is_scaling_elastic_ep",
        "/server_info",
        "/update_weights",
        "/init_weight_transfer",
        "/pause",
        "/resume",
        "/is_paused",
        "/release_kv_cache_memory",
        "/reset_encoder_cache",
        "/init_weight_transfer_engine",
        "/shutdown_weight_transfer_engine",
        "/start_weight_update",
        "/finish_weight_update",
        "/start_draft_weight_update",
        "/update_weight_version",
        "/weight_checker",
        "/weight_info",
        "/get_world_size",
        "/abort_requests",
        "/inference/v1/abort_requests",
        "/kv_event_sources",
    }
)
#: Whole trees of vLLM's operator endpoints (fault tolerance, checkpoints), wherever mounted.
OPERATOR_PREFIXES = ("/fault_tolerance/", "/v1/fault_tolerance/", "/checkpoint/", "/v1/checkpoint/")
#: Stored Responses API objects: they name no model, so they go to the model being served.
_RESPONSE_OBJECT = "/v1/responses/"
#: Paths this middleware answers itself even when it wraps an inner app.
_OWN_EXACT = frozenset({"/health", "/readyz", "/metrics", "/tokenize", "/detokenize"})

#: Longest the backend may take to stop (watches, child processes) at shutdown.
SHUTDOWN_TIMEOUT = 30.0


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _upstream_path(scope: Scope, route_path: str) -> str:
    """The path as the client encoded it (so `%3F` stays data), minus any mount prefix."""
    raw = scope.get("raw_path")
    if not raw:
        return route_path
    text = bytes(raw).decode("latin-1")
    root: str = scope.get("root_path", "")
    if root and text.startswith(root):
        text = text[len(root) :] or "/"
    return text


def _has_dot_segment(path: str) -> bool:
    return "/./" in path or "/../" in path or path.endswith(("/.", "/.."))


def _is_operator_path(path: str) -> bool:
    """Operator endpoints, also as a lenient router would match them: repeated and trailing
    slashes do not count."""
    if path in OPERATOR_PATHS or path.startswith(OPERATOR_PREFIXES):
        return True
    if "//" in path or path.endswith("/"):
        clean = "/" + "/".join(part for part in path.split("/") if part)
        return clean in OPERATOR_PATHS or (clean + "/").startswith(OPERATOR_PREFIXES)
    return False


def _is_hidden(path: str) -> bool:
    """Never answered, never passed on: vLLM's operator endpoints, and `/v1/` paths with dot
    segments (a lenient upstream router would resolve them to something else)."""
    return _is_operator_path(path) or (path.startswith("/v1/") and _has_dot_segment(path))


def _is_response_object(path: str) -> bool:
    return path.startswith(_RESPONSE_OBJECT) and path.count("/") <= 5


def _is_model_list(path: str) -> bool:
    return path == "/v1/models" or path.startswith("/v1/models/")


def _is_v1(path: str) -> bool:
    return path.startswith("/v1/")


def _is_admin(path: str) -> bool:
    return path.startswith("/proxy/")


_Handler = Callable[[Scope, Receive, "_Exchange", str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Route:
    """A row of the routing table: a path test, then the handler by method (`methods`), or
    one `handler` for every method. A method with no handler is answered 405
    (`other_methods="405"`) or passed to the inner app (`"inner"`)."""

    matches: Callable[[str], bool]
    methods: Mapping[str, _Handler] | None
    handler: _Handler | None = None
    other_methods: Literal["405", "inner"] = "inner"


def _peer(scope: Scope) -> str | None:
    """The client's address: what tells a client coming back after a 503 from a new one."""
    client = scope.get("client")
    return str(client[0]) if client else None


async def _shutting_down(send: Send) -> None:
    """The answer to a request that the server gave up waiting for as it stops."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(1):
        await error_response(
            send, 503, "not_ready", "vllm-chill is shutting down; retry shortly.", retry_after=5
        )


def _answer(exchange: _Exchange, held: HeldStream | None) -> Send:
    """Where the answer proper goes: through the held stream once its 200 went out."""
    return held.send if held is not None and held.started else exchange.send


def _from_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False  # an unknown peer is not trusted
    host = str(client[0])
    return host.startswith("127.") or host in ("::1", "localhost") or host.startswith("::ffff:127.")


def _public_spec(model: VLLMModel) -> dict[str, Any]:
    """The model's spec for API answers: values of secret flags in `extraArgs` masked."""
    spec = model.describe()
    if "extraArgs" in spec:
        spec["extraArgs"] = mask_secret_args(spec["extraArgs"])
    return spec


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class ModelSwitchMiddleware:
    """One OpenAI-compatible endpoint in front of many models; see the README."""

    def __init__(
        self,
        app: ASGIApp | None = None,
        *,
        registry: ModelRegistry,
        backend: Backend,
        settings: Settings | None = None,
        metrics: Metrics | None = None,
        transport: UpstreamTransport | None = None,
    ) -> None:
        """`settings` defaults to `Settings()`; of it the middleware uses the switching,
        limits, security and upstream groups (the backend and registry are built already).
        `transport` carries requests to the models' servers (default: vllm-chill's own
        HTTP/1.1 client, made from the upstream settings at start-up and closed at shutdown);
        one given here is used as it is and left open."""
        self.app = app
        self.registry = registry
        self.backend = backend
        self.settings = settings = settings or Settings()
        self.metrics = metrics or Metrics()
        self.switcher = Switcher(
            backend,
            registry,
            settings.switching,
            settings.limits,
            self.metrics,
            sleep=settings.sleep,
        )
        # Hot-path values, read once.
        self._max_wait = settings.switching.max_wait
        self._max_body_size = settings.limits.max_body_size
        self._upstream_timeout = settings.upstream.timeout
        # Held streaming completions get progress (vllm_chill/http/_progress.py).
        switching = settings.switching
        self._stream_keepalive = switching.stream_keepalive if self._max_wait > 0 else 0.0
        # Once its 200 went out, a held stream cannot be told to retry: it waits for the load
        # it asked for (the longest a load may take) on top of the hold it was promised.
        self._stream_hold = self._max_wait + switching.model_switch_timeout
        self._loading_note = switching.stream_loading_note
        self._loading_phase = self.switcher.loading_phase
        # Keys are kept and compared as SHA-256 digests: equal lengths, so the comparison's
        # time says nothing about a key's length either.
        self._api_keys = tuple(_digest(k.encode()) for k in settings.security.api_keys)
        admin = settings.security.admin_token
        self._admin_keys = (_digest(admin.encode()),) if admin else self._api_keys
        self._transport = transport
        self._upstream: UpstreamTransport | None = transport
        self._created = int(time.time())
        #: Set when the server is stopping: open event streams end.
        self._closing = anyio.Event()
        self._routes = self._route_table()
        self._admin_routes = self._admin_table()

    # --- ASGI entry -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            exchange = _Exchange(send)
            try:
                await self._http(scope, receive, exchange)
            except asyncio.CancelledError:
                # The server is stopping and gave up waiting for this request (a client held
                # for a load, say): answer it ourselves rather than leave it to the server's
                # plain-text 500.
                if not exchange.started:
                    await _shutting_down(send)
                raise
            except Exception:
                # A bug of ours: log it here, never show a traceback to the client.
                log.exception("internal error on %s %s", scope["method"], scope["path"][:200])
                if not exchange.started:
                    await error_response(
                        send, 500, "internal_error", "Internal error in vllm-chill (logged)."
                    )
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif kind == "websocket" and (self.app is None or _route_path(scope).startswith("/v1/")):
            await self._refuse_websocket(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)

    async def _refuse_websocket(self, receive: Receive, send: Send) -> None:
        """Websockets (vLLM's `/v1/realtime`) are not proxied: a clean refusal (the server
        answers the handshake with 403), never an error."""
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008, "reason": "not supported"})

    # --- lifespan -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ModelSwitchMiddleware]:
        """Start the registry, the backend and the switcher; stop them on exit.

        ASGI servers do this through `lifespan`; use it directly when the middleware is
        mounted inside a framework that does not forward lifespan to mounted apps."""
        self._closing = anyio.Event()  # started again: new event streams may stay open
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.registry.session())
            if self._transport is None:
                client = UpstreamClient(
                    connect_timeout=self.settings.upstream.connect_timeout,
                    timeout=self.settings.upstream.timeout,
                    upstream_api_key=self.settings.upstream.api_key,
                    strip_client_auth=bool(self._api_keys),
                )
                self._upstream = client
                stack.push_async_callback(client.aclose)
            tg = await stack.enter_async_context(anyio.create_task_group())
            await tg.start(self.switcher.run)
            log.info(
                "vllm-chill ready: %d models defined, %r",
                len(self.registry.models()),
                self.settings.switching,
            )
            try:
                yield self
            finally:
                self.end_event_streams()
                self.switcher.stop()
                with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_TIMEOUT):
                    await self.switcher.stopped.wait()
                tg.cancel_scope.cancel()  # only matters if the backend did not stop in time

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup = await receive()
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.running())
            except Exception as exc:
                log.error("start-up failed: %s", exc)
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            if self.app is None:
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
                await stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
            await self._inner_lifespan(scope, startup, receive, send, stack)

    async def _inner_lifespan(
        self, scope: Scope, startup: Message, receive: Receive, send: Send, stack: AsyncExitStack
    ) -> None:
        """Forward lifespan to the inner app; our own shutdown runs after the inner app's,
        before the server hears that shutdown completed."""
        assert self.app is not None
        replayed = False
        started = False
        deferred: list[Message] = []

        async def inner_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return startup
            return await receive()

        async def inner_send(message: Message) -> None:
            nonlocal started
            if message["type"].startswith("lifespan.shutdown"):
                deferred.append(message)
                return
            if message["type"] == "lifespan.startup.complete":
                started = True
            await send(message)

        try:
            await self.app(scope, inner_receive, inner_send)
        except Exception as exc:
            if started:
                raise
            # The inner app does not do lifespan (or broke at start): serve without it.
            log.debug("inner app does not handle lifespan: %s", exc)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            deferred.append({"type": "lifespan.shutdown.complete"})
        await stack.aclose()
        for message in deferred or [{"type": "lifespan.shutdown.complete"}]:
            await send(message)

    # --- routing --------------------------------------------------------------------------

    def _route_table(self) -> tuple[_Route, ...]:
        """The routing policy, in order: the first row whose path test holds answers."""
        return (
            _Route(MODEL_PATHS.__contains__, {"POST": self._proxy}, other_methods="405"),
            _Route(_is_hidden, None, handler=self._not_found_route),
            _Route(
                _is_response_object,
                {"GET": self._to_served_model, "POST": self._to_served_model},
                other_methods="405",
            ),
            _Route(_is_model_list, {"GET": self._list_models_route}, other_methods="405"),
            # Any other POST under /v1/ names its model in the body (vLLM grows new endpoints);
            # other methods there belong to the inner app, if any.
            _Route(_is_v1, {"POST": self._proxy}, other_methods="inner"),
            # The page's files hold no data: served without a token (its data calls need one).
            _Route(is_ui, {"GET": self._ui, "HEAD": self._ui}, other_methods="405"),
            _Route(_is_admin, None, handler=self._admin),
            _Route(
                _OWN_EXACT.__contains__,
                {"GET": self._service, "HEAD": self._service},
                other_methods="inner",
            ),
        )

    async def _http(self, scope: Scope, receive: Receive, exchange: _Exchange) -> None:
        path = _route_path(scope)
        method: str = scope["method"]
        for route in self._routes:
            if not route.matches(path):
                continue
            handler = route.handler if route.methods is None else route.methods.get(method)
            if handler is not None:
                await handler(scope, receive, exchange, path)
                return
            if route.other_methods == "405":
                await self._not_allowed(exchange.send)
                return
            break  # "inner": no later row matches this path either
        if self.app is not None:
            await self.app(scope, receive, exchange.send)
            return
        await self._not_found(exchange.send, path)

    async def _not_found_route(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        await self._not_found(exchange.send, path)

    async def _list_models_route(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        if self._authorized(scope, self._api_keys):
            await self._list_models(exchange.send, path[len("/v1/models/") :] or None)
        else:
            await self._unauthorized(exchange.send)

    # --- the proxied request --------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, exchange: _Exchange, path: str) -> None:
        send = exchange.send
        body = await self._client_body(scope, receive, send)
        if body is None:
            return
        content_type = header(scope, b"content-type") or b""
        stream = False
        try:
            if content_type.lower().startswith(b"multipart/form-data"):
                name = model_from_multipart(body, content_type)
            else:
                name, stream = model_and_stream(body)
        except BadRequest as exc:
            await error_response(send, 400, "invalid_request", exc.message, param=exc.param)
            return
        if name is None:
            if path in MODEL_PATHS:
                await error_response(
                    send,
                    400,
                    "invalid_request",
                    "You must provide a model parameter.",
                    param="model",
                )
            else:
                await self._not_found(send, path)
            return
        model = self.registry.get(name)
        if model is None:
            await self._model_not_found(send, name)
            return
        await self._serve(
            scope, receive, exchange, path=path, model=model, body=body, stream=stream
        )

    async def _to_served_model(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        """`GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`: the request names no
        model, so it goes to the model being served, if any (a stored response lives on the
        server that made it; another model's server answers 404)."""
        send = exchange.send
        if scope["method"] == "POST" and not path.endswith("/cancel"):
            await self._not_allowed(send)
            return
        body = await self._client_body(scope, receive, send)
        if body is None:
            return
        active = self.switcher.core.active
        model = (
            self.registry.get(active) if active and self.switcher.core.is_serving(active) else None
        )
        if model is None:
            await error_response(
                send, 404, "not_found", "No model is being served, so no stored response is."
            )
            return
        await self._serve(scope, receive, exchange, path=path, model=model, body=body)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        exchange: _Exchange,
        *,
        path: str,
        model: VLLMModel,
        body: bytes,
        stream: bool = False,
    ) -> None:
        """Hold (if allowed) until the model is ready, then relay; watch for the client
        leaving the whole time so that its wait or upstream request ends at once. A held
        streaming completion is answered at once and sent the load's progress (`HeldStream`)."""
        name = model.served_model_name
        started = time.monotonic()
        status = 499  # client closed request, unless we learn better
        held: HeldStream | None = None
        if stream and self._stream_keepalive and path in STREAM_PATHS:
            held = HeldStream(
                exchange.send,
                name,
                self._loading_phase,
                interval=self._stream_keepalive,
                note=self._loading_note and STREAM_PATHS[path],
            )
        task = exchange.arm(receive)
        try:
            try:
                lease = await self.switcher.acquire(
                    name,
                    self._max_wait if held is None else self._stream_hold,
                    _peer(scope),
                    None if held is None else held.start,
                )
            except Refused as refused:
                await self._refused(_answer(exchange, held), refused)
                status = 503
            else:
                send = _answer(exchange, held)
                status = await self._relay(scope, exchange, path, body, lease, send=send)
        except asyncio.CancelledError:
            # Our own interruption (the client left, or the switch cut the request) ends the
            # request here; any other cancellation (shutdown) goes on.
            if exchange.interrupted is None or task.uncancel() > 0:
                if held is not None and held.started and not held.answered:
                    await _shutting_down(held.send)  # as its error event
                raise
            if exchange.interrupted == "cut":
                status = await self._cut(exchange, name, _peer(scope), held)
        finally:
            if held is not None:
                held.stop()
            exchange.disarm()
        metrics = self.metrics.model(name)
        metrics.count(status)
        metrics.duration.observe(time.monotonic() - started)

    async def _cut(
        self, exchange: _Exchange, name: str, client: str | None, held: HeldStream | None
    ) -> int:
        """The switch's drain timeout ended this request. Before its response started the
        client gets the same 503 as any request for a switching model (a held stream: as its
        error event); after, the response is left unfinished, so the server aborts the
        connection rather than pass it off as whole."""
        log.warning("request cut by switch drain timeout model=%s", name)
        answering = held.answered if held is not None and held.started else exchange.started
        if answering:
            return 499  # counted as an unfinished response, like a client that left
        retry_after = self.switcher.promise(name, client)
        await error_response(
            _answer(exchange, held),
            503,
            "model_switching_in_progress",
            f"The request for model '{name}' was stopped: the model is being switched out and "
            f"the drain timeout passed. Retry in {retry_after} s.",
            type_="model_loading",
            retry_after=retry_after,
            model=name,
        )
        return 503

    async def _relay(
        self, scope: Scope, exchange: _Exchange, path: str, body: bytes, lease: Lease, *, send: Send
    ) -> int:
        """Forward the request on `lease` and relay the answer through `send` (the exchange's,
        or a held stream's)."""
        gauge = self.metrics.model(lease.model).in_flight
        gauge.inc()
        lease.on_cut = exchange.cut
        try:
            upstream = lease.upstream
            assert self._upstream is not None
            try:
                return await self._upstream.forward(
                    scope,
                    send,
                    base_url=upstream.base_url,
                    path=_upstream_path(scope, path),
                    body=body,
                )
            except UpstreamUnavailable as exc:
                log.warning("upstream unavailable model=%s: %s", lease.model, exc)
                await error_response(
                    send,
                    502,
                    "upstream_unavailable",
                    f"The server for model '{lease.model}' is not reachable.",
                )
                return 502
            except UpstreamTimeout as exc:
                log.warning("upstream timeout model=%s: %s", lease.model, exc)
                await error_response(
                    send,
                    504,
                    "upstream_timeout",
                    f"The server for model '{lease.model}' did not answer within "
                    f"{self._upstream_timeout:g}s.",
                )
                return 504
            except UpstreamAborted as exc:
                # Returning with the response unfinished makes the server close the connection:
                # the client sees a broken response, never a truncated one passed off as whole.
                log.warning("response aborted model=%s: %s", lease.model, exc)
                return 502
        finally:
            gauge.dec()
            self.switcher.finish(lease)

    async def _client_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The body of a client's request for a model, once its API key checks out; None when
        the request was answered already (401, 400, 413) or the client left."""
        if self._api_keys and not self._authorized(scope, self._api_keys):
            await self._unauthorized(send)
            return None
        return await self._read_body(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        limit = self._max_body_size
        declared = header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                await error_response(send, 400, "invalid_request", "Invalid Content-Length.")
                return None
            if too_big:
                await self._too_large(send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await self._too_large(send)
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # --- answers --------------------------------------------------------------------------

    async def _refused(self, send: Send, refused: Refused) -> None:
        """Every refusal of the switcher, answered the one way."""
        self.metrics.refusals.labels(refused.model, refused.code).inc()
        await error_response(
            send,
            refused.status,
            refused.code,
            refused.message,
            type_=refused.error_type,
            retry_after=refused.retry_after,
            **refused.details,
        )

    async def _model_not_found(self, send: Send, name: str) -> None:
        await error_response(
            send, 404, "model_not_found", f"The model '{name}' does not exist.", param="model"
        )

    async def _not_found(self, send: Send, path: str) -> None:
        await error_response(send, 404, "not_found", "Not found.")

    async def _not_allowed(self, send: Send) -> None:
        await error_response(send, 405, "method_not_allowed", "Method not allowed.")

    async def _too_large(self, send: Send) -> None:
        await error_response(
            send,
            413,
            "request_too_large",
            f"The request body is larger than {self._max_body_size} bytes.",
        )

    async def _unauthorized(self, send: Send) -> None:
        await error_response(
            send, 401, "invalid_api_key", "Missing or incorrect API key (Authorization: Bearer)."
        )

    def _authorized(self, scope: Scope, keys: tuple[bytes, ...]) -> bool:
        if not keys:
            return True
        value = header(scope, b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        presented = _digest(token)
        matched = False
        for key in keys:  # compare with every key: the time taken says nothing about which
            matched |= hmac.compare_digest(presented, key)
        return matched

    # --- service and admin endpoints ------------------------------------------------------

    async def _service(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        send = exchange.send
        if path == "/health":
            await send_text(send, 200, "OK", b"text/plain; charset=utf-8")
        elif path == "/readyz":
            ready = self.switcher.running and self.registry.ready()
            if ready:
                try:
                    with anyio.fail_after(5):
                        ready = await self.backend.check()
                except Exception:
                    ready = False
            await send_text(
                send,
                200 if ready else 503,
                "ready" if ready else "not ready",
                b"text/plain; charset=utf-8",
            )
        elif path == "/metrics":
            await send_text(send, 200, self.metrics.render().decode(), CONTENT_TYPE_LATEST.encode())
        else:
            await self._not_found(send, path)

    def _model_entry(self, model: VLLMModel) -> dict[str, Any]:
        """A `/v1/models` entry. While the model is loaded, vLLM's own entry for it (its real
        `max_model_len`, `root`, `permission`, ...) with our `state` added."""
        state = self.switcher.state_of(model.served_model_name)
        loaded = self.switcher.loaded.get(model.served_model_name)
        if state is ModelState.LOADED and loaded is not None and loaded.entry is not None:
            return {**loaded.entry, "id": model.served_model_name, "state": state.value}
        return {
            "id": model.served_model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm-chill",
            "root": model.model_name,
            "parent": None,
            "max_model_len": model.max_model_len,
            "permission": [],
            "state": state.value,
        }

    async def _list_models(self, send: Send, model_id: str | None) -> None:
        if model_id is None:
            data = [self._model_entry(m) for m in self.registry.models()]
            await send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())
            return
        model = self.registry.get(model_id)
        if model is None:
            await self._model_not_found(send, model_id[:256])
            return
        await send_json(send, 200, json.dumps(self._model_entry(model)).encode())

    def end_event_streams(self) -> None:
        """End every open `/proxy/events` stream now (clients reconnect). A server that waits
        for open responses before it stops calls this first; `vllm-chill serve` does."""
        self._closing.set()

    async def _ui(self, scope: Scope, receive: Receive, exchange: _Exchange, path: str) -> None:
        if not await serve_page(scope, exchange.send, path):
            await self._not_found(exchange.send, path)

    def _admin_table(self) -> dict[tuple[str, str], _Handler]:
        return {
            ("GET", "/proxy/status"): self._admin_status,
            ("GET", "/proxy/events"): self._admin_events,
            ("GET", "/proxy/models"): self._admin_models,
            ("POST", "/proxy/models/switch"): self._admin_switch,
            ("POST", "/proxy/unload"): self._admin_unload,
        }

    async def _admin(self, scope: Scope, receive: Receive, exchange: _Exchange, path: str) -> None:
        send = exchange.send
        keys = self._admin_keys
        if not self._authorized(scope, keys):
            await self._unauthorized(send)
            return
        method: str = scope["method"]
        if method == "POST" and not keys and not _from_loopback(scope):
            await error_response(
                send,
                403,
                "admin_token_required",
                "Switching and unloading from another machine needs --admin-token "
                "(or --api-key); without one they are allowed from loopback only.",
            )
            return
        handler = self._admin_routes.get((method, path))
        if handler is None:
            await self._not_found(send, path)
        else:
            await handler(scope, receive, exchange, path)

    async def _admin_status(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        await send_json(exchange.send, 200, json.dumps(self.switcher.status()).encode())

    async def _admin_events(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        await stream_events(
            receive,
            exchange.send,
            view=lambda: status_view(self.switcher, self.registry),
            changes=self.switcher.changes,
            closing=self._closing,
        )

    async def _admin_models(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        models = [
            {**self._model_entry(m), "name": m.name, "spec": _public_spec(m)}
            for m in self.registry.models()
        ]
        await send_json(exchange.send, 200, json.dumps({"object": "list", "data": models}).encode())

    async def _admin_unload(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        send = exchange.send
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        name: str | None = None
        if body.strip():
            try:
                name = model_from_json(body)
            except BadRequest as exc:
                await error_response(send, 400, "invalid_request", exc.message, param=exc.param)
                return
            if name is not None and self.registry.get(name) is None:
                await self._model_not_found(send, name)
                return
        if not self.switcher.running:
            await self._refused(send, NotRunning())
        elif name is not None and name not in self.switcher.core.residents:
            await send_json(send, 200, json.dumps({"status": "not_loaded", "model": name}).encode())
        elif self.switcher.request_unload(name):
            answer: dict[str, Any] = {"status": "unloading"}
            if name is not None:
                answer["model"] = name
            await send_json(send, 202, json.dumps(answer).encode())
        else:
            await error_response(
                send, 409, "load_in_progress", "A load is in progress; unload after it ends."
            )

    async def _admin_switch(
        self, scope: Scope, receive: Receive, exchange: _Exchange, path: str
    ) -> None:
        send = exchange.send
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        try:
            name = model_from_json(body)
        except BadRequest as exc:
            await error_response(send, 400, "invalid_request", exc.message, param=exc.param)
            return
        if name is None:
            await error_response(
                send, 400, "invalid_request", "You must provide a model parameter.", param="model"
            )
            return
        if self.registry.get(name) is None:
            await self._model_not_found(send, name)
            return
        if not self.switcher.running:
            await self._refused(send, NotRunning(name))
            return
        state = self.switcher.request_switch(name)
        status = 200 if state is ModelState.LOADED else 202
        await send_json(send, status, json.dumps({"model": name, "state": state.value}).encode())


class _Exchange:
    """One HTTP exchange: whether its response started and completed, and the interruption
    of a proxied request by the client leaving or by the switch cutting it.

    The interruption cancels the request's own asyncio task, but only while it is *armed*
    (between `arm` and `disarm`, which `_serve` brackets with the handler that absorbs it):
    a cancellation requested while the task waits inside that region is delivered at that
    await, inside the region, so it can never escape into the server's code.

    Everything else in vllm-chill is structured with anyio (task groups own every background
    task; cancel scopes bound every wait). This is the one place that uses plain asyncio, on
    purpose: the request runs in a task the ASGI server created, and anyio's first cancel scope
    in such a task sets up its per-task state (~7 µs of CPU per request); a task group costs
    ~30 µs. Measured side by side (docs/performance.md), the anyio version made the proxy's
    CPU per request at 64 connections noticeably worse. One plain watcher task remains, owned
    by the request: it ends by itself when the response completes (the server then reports
    `http.disconnect`), and `disarm` cancels it otherwise."""

    __slots__ = ("_send", "_task", "_watcher", "done", "interrupted", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.done = False
        #: Why the request was interrupted: "disconnect" or "cut"; None while it was not.
        self.interrupted: str | None = None
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            if not message.get("more_body", False):
                self.done = True
        else:
            self.started = True
        await self._send(message)

    def arm(self, receive: Receive) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called from a task
            raise RuntimeError("no current task")
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        return task

    def disarm(self) -> None:
        self._task = None
        watcher = self._watcher
        if watcher is not None:
            # Dropped first: a cancelled task keeps its CancelledError, whose traceback holds
            # the watcher's frame and so this exchange; holding the task here too would make a
            # reference cycle per request, left for the garbage collector.
            self._watcher = None
            if not watcher.done():
                watcher.cancel()

    def cut(self) -> None:
        """The switch's drain timeout passed with this request still in flight."""
        self._interrupt("cut")

    def _interrupt(self, why: str) -> None:
        if self._task is not None and self.interrupted is None and not self.done:
            self.interrupted = why
            self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        """The body was read already, so the next message can only be the client leaving
        (or, once the response is complete, the server saying so)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self._interrupt("disconnect")
