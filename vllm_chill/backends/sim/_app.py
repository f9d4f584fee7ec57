"""A pure ASGI app that answers like one vLLM OpenAI server (`vllm serve`).

It is the upstream of the simulator backend, of the tests and of the benchmarks, so it is plain
ASGI (no framework on the hot path) and it behaves the way the proxy must cope with: 503 on
`/health` while "loading", SSE streams paced at a token rate, vLLM's error shapes and status
codes, `--api-key` checks on `/v1/*` only, and connections that drop mid-stream when the
server is stopped (as they do when a vLLM pod is killed).

`SimStats` counts what the server saw (including clients that went away mid-generation) so that
proxy tests can assert, without sleeping, that a disconnect really reached the upstream.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from vllm_chill.backends.sim import _protocol as p
from vllm_chill.backends.sim._protocol import RequestError

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


@dataclass(frozen=True)
class SimRequest:
    """One request as the simulated vLLM received it (headers lower-cased, body verbatim)."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)  # may carry an API key
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass
class SimStats:
    """What the server has seen. Tests await conditions on it with `wait_until`."""

    requests_total: int = 0
    in_flight: int = 0
    #: Generations that ran to the end (the response was fully sent).
    completed: int = 0
    #: Generations cut short because the client disconnected.
    disconnected: int = 0
    #: Generations cut short because the server was stopped.
    aborted: int = 0
    history: deque[SimRequest] = field(default_factory=lambda: deque(maxlen=256))
    _waiters: set[anyio.Event] = field(default_factory=set, repr=False)

    def changed(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    async def wait_until(self, predicate: Callable[[SimStats], bool]) -> None:
        """Return once `predicate(self)` holds. Callers bound it (`anyio.fail_after`)."""
        while not predicate(self):
            waiter = anyio.Event()
            self._waiters.add(waiter)
            try:
                await waiter.wait()
            finally:
                self._waiters.discard(waiter)


@dataclass
class _Call:
    scope: Scope
    receive: Receive
    send: Send
    body: bytes


@dataclass
class _Progress:
    started: bool = False  # response headers sent
    finishing: bool = False  # last bytes being sent: a disconnect now is not a cut
    done: bool = False
    disconnected: bool = False


Handler = Callable[["SimApp", _Call], Awaitable[None]]


class SimApp:
    """The ASGI callable. `ready` is flipped by whoever owns it once the "model" has loaded."""

    def __init__(
        self,
        served_model_name: str,
        *,
        tokens_per_second: float = 50.0,
        max_model_len: int = 8192,
        api_key: str | None = None,
        root: str | None = None,
        dev_mode: bool = False,
        sleep_mode: bool = False,
        wake_time: float = 0.5,
    ) -> None:
        """`dev_mode` is vLLM's `VLLM_SERVER_DEV_MODE=1`: only then do `/sleep`, `/wake_up`
        and `/is_sleeping` exist; `sleep_mode` is `--enable-sleep-mode`; a wake takes
        `wake_time`."""
        self.served_model_name = served_model_name
        self.tokens_per_second = tokens_per_second
        self.max_model_len = max_model_len
        self.root = root or served_model_name
        self.ready = False
        self.dev_mode = dev_mode
        self.sleep_mode = sleep_mode
        self.wake_time = wake_time
        self.sleeping = False
        #: Each `/sleep` call's query: (level, mode), for tests.
        self.sleep_calls: list[tuple[int, str]] = []
        self.stats = SimStats()
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else None
        self._created = p.now()
        self._closing = False
        self._generations: set[anyio.CancelScope] = set()

    def close(self) -> None:
        """Cut every generation in flight and refuse new requests: the server is going away."""
        self._closing = True
        for scope in list(self._generations):
            scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        # vLLM's --api-key guards /v1/* only; /health, /tokenize etc. stay open.
        if self._expected_auth is not None and path.startswith("/v1") and method != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected_auth):
                await _send_json(send, 401, {"error": "Unauthorized"})
                return
        route = _ROUTES.get(path)
        if route is None and self.dev_mode:
            route = _DEV_ROUTES.get(path)
        if route is None:
            await _send_json(send, 404, {"detail": "Not Found"})
            return
        route_method, handler = route
        if method != route_method:
            await _send_json(
                send, 405, {"detail": "Method Not Allowed"}, [(b"allow", route_method.encode())]
            )
            return
        body = await _read_body(receive) if method == "POST" else b""
        stats = self.stats
        stats.requests_total += 1
        stats.in_flight += 1
        stats.history.append(
            SimRequest(
                method,
                path,
                tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
                body,
            )
        )
        stats.changed()
        try:
            if self._closing:
                await _send_json(send, 503, p.error_body("The server is shutting down.", 503))
            elif not self.ready and path != "/health":
                await _send_json(send, 503, p.error_body("The model is still loading.", 503))
            elif self.sleeping and path not in _AWAKE_OR_ASLEEP:
                await _send_json(send, 503, p.error_body("The model is sleeping.", 503))
            else:
                await handler(self, _Call(scope, receive, send, body))
        except RequestError as exc:
            await _send_json(send, exc.status, exc.body)
        finally:
            stats.in_flight -= 1
            stats.changed()

    # --- helpers shared by the handlers -------------------------------------------------------

    def _check_model(self, model: Any) -> None:
        """vLLM accepts a missing `model` (it means the served one) and 404s any other name."""
        if model is None or model == self.served_model_name:
            return
        if not isinstance(model, str):
            raise RequestError(400, "model must be a string.", param="model")
        raise RequestError(404, f"The model `{model}` does not exist.", param="model")

    def _request(self, call: _Call) -> dict[str, Any]:
        request = p.expect_object(call.body)
        self._check_model(request.get("model"))
        return request

    async def _pace(self, start: float, step: int) -> None:
        if self.tokens_per_second > 0:
            await anyio.sleep_until(start + step / self.tokens_per_second)
        else:
            await anyio.lowlevel.checkpoint()

    async def _generate(self, call: _Call, work: Callable[[_Progress], Awaitable[None]]) -> None:
        """Run a generation while watching for the client leaving or the server closing, and
        account for how it ended."""
        progress = _Progress()
        async with anyio.create_task_group() as tg:
            self._generations.add(tg.cancel_scope)
            try:
                tg.start_soon(_watch_disconnect, call.receive, tg.cancel_scope, progress)
                await work(progress)
                progress.done = True
                tg.cancel_scope.cancel()
            finally:
                self._generations.discard(tg.cancel_scope)
        if progress.done:
            self.stats.completed += 1
        elif progress.disconnected:
            self.stats.disconnected += 1
        else:
            self.stats.aborted += 1
            if not progress.started:
                await _send_json(call.send, 503, p.error_body("The server is shutting down.", 503))
            # else: return without finishing the body, so the connection drops mid-stream.

    # --- endpoints ------------------------------------------------------------------------------

    async def _models(self, call: _Call) -> None:
        card = {
            "id": self.served_model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": self.root,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{self.served_model_name}",
                    "object": "model_permission",
                    "created": self._created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        await _send_json(call.send, 200, {"object": "list", "data": [card]})

    async def _health(self, call: _Call) -> None:
        await send_status(call.send, 200 if self.ready else 503)

    async def _sleep(self, call: _Call) -> None:
        """vLLM's `POST /sleep?level=1|2&mode=abort|wait|keep`: `abort` (the default) cuts the
        requests in flight, `wait` lets them finish first."""
        query = parse_qs(call.scope.get("query_string", b"").decode("latin-1"))
        level = int(query.get("level", ["1"])[0])
        mode = query.get("mode", ["abort"])[0]
        self.sleep_calls.append((level, mode))
        if not self.sleep_mode:
            raise RequestError(400, "Sleep mode is not enabled (--enable-sleep-mode).")
        if mode not in ("abort", "wait", "keep"):
            raise RequestError(400, f"Invalid mode {mode!r}.", param="mode")
        if mode == "abort":
            for scope in list(self._generations):
                scope.cancel()
        elif mode == "wait":  # each request that ends says so through the stats
            await self.stats.wait_until(lambda _: not self._generations)
        self.sleeping = True
        await send_status(call.send, 200)

    async def _wake_up(self, call: _Call) -> None:
        if self.sleeping:
            await anyio.sleep(self.wake_time)
        self.sleeping = False
        await send_status(call.send, 200)

    async def _is_sleeping(self, call: _Call) -> None:
        await _send_json(call.send, 200, {"is_sleeping": self.sleeping})

    async def _version(self, call: _Call) -> None:
        await _send_json(call.send, 200, {"version": "0.0.0+vllm-chill-sim"})

    async def _chat(self, call: _Call) -> None:
        request = self._request(call)
        messages = request.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise RequestError(
                400, "messages must be a non-empty list of objects.", param="messages"
            )
        prompt = p.chat_prompt(messages)
        prompt_tokens = len(p.tokenize(prompt))
        count = p.max_tokens(request, prompt_tokens, self.max_model_len)
        tokens = p.completion_tokens(prompt, count)
        rid, created, model = p.random_id("chatcmpl"), p.now(), self.served_model_name

        if not request.get("stream"):

            async def whole(progress: _Progress) -> None:
                if self.tokens_per_second > 0:
                    await anyio.sleep(count / self.tokens_per_second)
                progress.finishing = progress.started = True
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": "".join(tokens),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                }
                choice = {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
                body = {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": p.usage(prompt_tokens, count),
                    "prompt_logprobs": None,
                    "kv_transfer_params": None,
                }
                await _send_json(call.send, 200, body)

            await self._generate(call, whole)
            return

        with_usage, continuous = p.include_usage(request)

        chunk = partial(
            _sse_event,
            kind="chat.completion.chunk",
            rid=rid,
            created=created,
            model=model,
            prompt_tokens=prompt_tokens,
        )

        async def stream(progress: _Progress) -> None:
            send = call.send
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            progress.started = True
            start = anyio.current_time()
            first = {"role": "assistant", "content": ""}
            await _chunk(send, chunk([_delta(first, None)], 0 if continuous else None))
            for i, token in enumerate(tokens, 1):
                await self._pace(start, i)
                finish = "length" if i == count else None
                await _chunk(
                    send, chunk([_delta({"content": token}, finish)], i if continuous else None)
                )
            progress.finishing = True
            if with_usage:
                await _chunk(send, chunk([], count))
            await _done(send)

        await self._generate(call, stream)

    async def _completions(self, call: _Call) -> None:
        request = self._request(call)
        prompts = p.prompts_of(request.get("prompt"))
        prompt_tokens = sum(n for _, n in prompts)
        count = p.max_tokens(request, max(n for _, n in prompts), self.max_model_len)
        answers = [p.completion_tokens(text, count) for text, _ in prompts]
        completion_total = count * len(prompts)
        rid, created, model = p.random_id("cmpl"), p.now(), self.served_model_name

        if not request.get("stream"):

            async def whole(progress: _Progress) -> None:
                if self.tokens_per_second > 0:
                    await anyio.sleep(count / self.tokens_per_second)
                progress.finishing = progress.started = True
                choices = [
                    {
                        "index": index,
                        "text": "".join(tokens),
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                    for index, tokens in enumerate(answers)
                ]
                body = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": choices,
                    "usage": p.usage(prompt_tokens, completion_total),
                    "kv_transfer_params": None,
                }
                await _send_json(call.send, 200, body)

            await self._generate(call, whole)
            return

        with_usage, continuous = p.include_usage(request)

        chunk = partial(
            _sse_event,
            kind="text_completion",
            rid=rid,
            created=created,
            model=model,
            prompt_tokens=prompt_tokens,
        )

        async def stream(progress: _Progress) -> None:
            send = call.send
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            progress.started = True
            start = anyio.current_time()
            for i in range(count):
                await self._pace(start, i + 1)
                finish = "length" if i + 1 == count else None
                for index, tokens in enumerate(answers):
                    choice = {
                        "index": index,
                        "text": tokens[i],
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                    done = (i + 1) * len(answers) if continuous else None
                    await _chunk(send, chunk([choice], done))
            progress.finishing = True
            if with_usage:
                await _chunk(send, chunk([], completion_total))
            await _done(send)

        await self._generate(call, stream)

    async def _embeddings(self, call: _Call) -> None:
        request = self._request(call)
        inputs = p.embedding_inputs(request.get("input"))
        dimensions = p.optional_int(request, "dimensions", minimum=1)
        if dimensions is None:
            dimensions = p.DEFAULT_EMBEDDING_DIMENSIONS
        elif dimensions > p.MAX_EMBEDDING_DIMENSIONS:
            raise RequestError(400, "dimensions is larger than the model's.", param="dimensions")
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise RequestError(
                400, "encoding_format must be float or base64.", param="encoding_format"
            )
        data = [
            {
                "index": index,
                "object": "embedding",
                "embedding": p.encode_embedding(p.embedding(raw, dimensions), encoding),
            }
            for index, (raw, _) in enumerate(inputs)
        ]
        prompt_tokens = sum(n for _, n in inputs)
        body = {
            "id": p.random_id("embd"),
            "object": "list",
            "created": p.now(),
            "model": self.served_model_name,
            "data": data,
            "usage": p.usage(prompt_tokens, 0),
        }
        await _send_json(call.send, 200, body)

    async def _tokenize(self, call: _Call) -> None:
        request = self._request(call)
        if isinstance(request.get("prompt"), str):
            text = request["prompt"]
        elif isinstance(request.get("messages"), list):
            text = p.chat_prompt([m for m in request["messages"] if isinstance(m, dict)])
        else:
            raise RequestError(400, "prompt (a string) or messages (a list) is required.")
        tokens = p.tokenize(text)
        body = {
            "count": len(tokens),
            "max_model_len": self.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
        await _send_json(call.send, 200, body)

    async def _detokenize(self, call: _Call) -> None:
        request = self._request(call)
        tokens = request.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < 256 for t in tokens
        ):
            raise RequestError(400, "tokens must be a list of token ids (0-255).", param="tokens")
        await _send_json(call.send, 200, {"prompt": p.detokenize(tokens)})

    async def _transcribe(self, call: _Call) -> None:
        async def replay() -> Message:
            return {"type": "http.request", "body": call.body, "more_body": False}

        try:
            form = await Request(call.scope, replay).form()
        except (HTTPException, ValueError) as exc:
            raise RequestError(400, f"Invalid multipart body: {exc}") from None
        try:
            self._check_model(form.get("model"))
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "file is required (multipart form field).", param="file")
            audio = await upload.read()
        finally:
            await form.close()
        text = "".join(p.completion_tokens(audio.hex(), 8))
        await _send_json(call.send, 200, {"text": text})


_ROUTES: dict[str, tuple[str, Handler]] = {
    "/health": ("GET", SimApp._health),
    "/version": ("GET", SimApp._version),
    "/v1/models": ("GET", SimApp._models),
    "/v1/chat/completions": ("POST", SimApp._chat),
    "/v1/completions": ("POST", SimApp._completions),
    "/v1/embeddings": ("POST", SimApp._embeddings),
    "/tokenize": ("POST", SimApp._tokenize),
    "/detokenize": ("POST", SimApp._detokenize),
    "/v1/audio/transcriptions": ("POST", SimApp._transcribe),
    "/v1/audio/translations": ("POST", SimApp._transcribe),
}
#: vLLM's development routes: they exist only with `VLLM_SERVER_DEV_MODE=1`.
_DEV_ROUTES: dict[str, tuple[str, Handler]] = {
    "/sleep": ("POST", SimApp._sleep),
    "/wake_up": ("POST", SimApp._wake_up),
    "/is_sleeping": ("GET", SimApp._is_sleeping),
}
#: What still answers while the model sleeps.
_AWAKE_OR_ASLEEP = frozenset({"/health", "/version", "/v1/models", *_DEV_ROUTES})


def _sse_event(
    choices: list[dict[str, Any]],
    done: int | None,
    *,
    kind: str,
    rid: str,
    created: int,
    model: str,
    prompt_tokens: int,
) -> bytes:
    """One server-sent event of a streamed answer; `done` (tokens so far) adds usage."""
    obj: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if done is not None:
        obj["usage"] = p.usage(prompt_tokens, done)
    return b"data: " + p.dumps(obj) + b"\n\n"


def _delta(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    return choice


async def _watch_disconnect(
    receive: Receive, scope: anyio.CancelScope, progress: _Progress
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not progress.finishing:
                progress.disconnected = True
                scope.cancel()
            return


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _done(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def send_status(send: Send, status: int) -> None:
    """An empty-bodied answer, like vLLM's `/health`."""
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


async def _send_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = p.dumps(obj)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode()), *(headers or ())],
        }
    )
    await send({"type": "http.response.body", "body": body})
