"""Shared pieces of the reliability suite.

- `send_raw`: an HTTP/1.1 client over a plain loopback socket, so that a test controls every
  byte (paths other clients would normalise, headers they would refuse, bodies sent slowly or
  with broken framing) and sees exactly what came back, including "nothing".
- `proxy_stack`: the proxy under test on a real uvicorn, in front of real simulated vLLM
  servers (one per model, behind the in-process `FakeBackend`) or any other backend.
- The checks every answer must pass: a success, or an error in OpenAI's shape, and never a
  5xx other than the documented ones.
- Counters of event-loop tasks and open file descriptors, to prove that nothing leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.configs import make_settings
from tests.servers import serve
from tests.support import spec
from vllm_chill import FakeBackend, ModelSwitchMiddleware, StaticRegistry, VLLMModel
from vllm_chill.backends._base import Backend
from vllm_chill.backends.sim._app import SimApp
from vllm_chill.backends.sim._server import SimModelServer
from vllm_chill.http._asgi import Receive, Scope, Send
from vllm_chill.registries._base import ModelRegistry

MODELS = ("alpha", "beta", "gamma")

#: vLLM's operator, development and RL endpoints (those of vLLM 0.32, and older names). Listed
#: here rather than imported from the middleware, so that dropping one there fails a test.
OPERATOR_PATHS = (
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
    "/pause",
    "/resume",
    "/is_paused",
    "/release_kv_cache_memory",
    "/reset_encoder_cache",
    "/init_weight_transfer_engine",
    "/shutdown_weight_transfer_engine",
    "/start_weight_update",
    "/finish_weight_update",
    "/update_weights",
    "/abort_requests",
    "/inference/v1/abort_requests",
    "/fault_tolerance/apply",
    "/fault_tolerance/status",
    "/v1/fault_tolerance/apply",
    "/checkpoint/save",
)

#: The only 5xx the proxy may answer by itself: (status, error code).
DOCUMENTED_5XX = frozenset(
    {
        (503, "model_switching_in_progress"),
        (503, "model_switch_failed"),
        (503, "too_many_waiting"),
        (503, "not_ready"),
        (502, "upstream_unavailable"),
        (504, "upstream_timeout"),
    }
)
#: What uvicorn itself answers to bytes that are not HTTP (before any application code runs).
SERVER_PARSE_ERROR = b"Invalid HTTP request received."


# --- the raw client ---------------------------------------------------------------------------


class NoReply(Exception):
    """The server closed the connection without answering."""


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    #: Request bytes that had been written when the answer's head arrived.
    sent_before_reply: int = 0

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in reversed(self.headers) if k == name), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


def build_request(
    method: str,
    target: str | bytes,
    *,
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    body: bytes | None = None,
    host: bytes = b"127.0.0.1",
) -> bytes:
    """Request head (and body, when given) as bytes; Content-Length added for a body unless
    the caller sets framing headers itself."""
    target_b = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + target_b + b" HTTP/1.1", b"host: " + host]
    names = set()
    for name, value in headers:
        n = name.encode("latin-1") if isinstance(name, str) else name
        v = value.encode("latin-1") if isinstance(value, str) else value
        names.add(n.lower())
        lines.append(n + b": " + v)
    if body is not None and not names & {b"content-length", b"transfer-encoding"}:
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(data: bytes, size: int) -> list[bytes]:
    """`data` in chunked transfer-coding, one element per chunk, ending with the last-chunk."""
    parts = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in _pieces(data, size)]
    return [*parts, b"0\r\n\r\n"]


def _pieces(data: bytes, size: int) -> Iterable[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def send_raw(
    port: int,
    head: bytes,
    parts: Iterable[bytes] = (),
    *,
    pause: float = 0.0,
    timeout: float = 10.0,
) -> Reply:
    """Write `head`, then each of `parts` (`pause` seconds apart), while reading the answer.

    Stops writing as soon as the answer is complete (a server may answer before it has read
    the whole body, e.g. 413). Raises `NoReply` if the server closes without answering and
    TimeoutError (from `fail_after`) if it neither answers nor closes within `timeout`."""
    with anyio.fail_after(timeout):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            sent = 0

            async def write() -> None:
                nonlocal sent
                try:
                    await stream.send(head)
                    sent += len(head)
                    for part in parts:
                        if pause:
                            await anyio.sleep(pause)
                        await stream.send(part)
                        sent += len(part)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # the server answered and closed: what it said is what counts

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                reply = await _read_reply(BufferedByteReceiveStream(stream), lambda: sent)
                tg.cancel_scope.cancel()
            return reply


async def _read_reply(buffered: BufferedByteReceiveStream, sent: Callable[[], int]) -> Reply:
    try:
        while True:
            head = await buffered.receive_until(b"\r\n\r\n", 1 << 20)
            written = sent()
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            if status != 100:  # an interim answer to `Expect: 100-continue`
                break
        headers = []
        for line in header_lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        reply = Reply(status, headers, b"", written)
        length = reply.header("content-length")
        if reply.header("transfer-encoding") == "chunked":
            body = bytearray()
            while True:
                size = int((await buffered.receive_until(b"\r\n", 1024)).split(b";")[0], 16)
                if size == 0:
                    await buffered.receive_until(b"\r\n", 1 << 16)
                    break
                body += await buffered.receive_exactly(size)
                await buffered.receive_exactly(2)
            reply.body = bytes(body)
        elif length is not None:
            reply.body = await buffered.receive_exactly(int(length))
        else:
            reply.body = await _until_eof(buffered)
        return reply
    except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        raise NoReply from None


async def _until_eof(buffered: BufferedByteReceiveStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await buffered.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return bytes(data)


# --- the checks -------------------------------------------------------------------------------


def openai_error(reply: Reply) -> dict[str, Any]:
    """The error object of an answer in OpenAI's shape; fails the test if it is not one."""
    assert (reply.header("content-type") or "").startswith("application/json"), reply
    body = json.loads(reply.body)
    assert isinstance(body, dict) and set(body) == {"error"}, reply
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], reply
    assert isinstance(error["type"], str) and error["type"], reply
    assert isinstance(error["code"], str) and error["code"], reply
    if reply.status == 503 or error["code"] == "too_many_waiting":
        retry = reply.header("retry-after")
        assert retry is not None and retry.isdigit() and int(retry) >= 1, reply
    return dict(error)


def check_reply(reply: Reply, *, from_upstream: bool) -> None:
    """Every answer: a success or a 4xx, or one of the documented 5xx; errors of the proxy's
    own in OpenAI's shape; never a traceback. What an upstream answered is relayed as is
    (vLLM's own 404 is `{"detail": ...}`), so only its status is checked."""
    assert b"Traceback" not in reply.body and b'File "' not in reply.body, reply
    if from_upstream:
        assert reply.status < 500, reply
        return
    if reply.status == 400 and reply.body == SERVER_PARSE_ERROR:
        return  # not HTTP: refused by the server before the proxy saw it
    if reply.status < 400:
        return
    error = openai_error(reply)
    if reply.status >= 500:
        assert (reply.status, error["code"]) in DOCUMENTED_5XX, reply
    else:
        assert reply.status in (400, 401, 404, 405, 409, 413), reply


def routed_path(path: str) -> str:
    """The route an upstream matches for the (already percent-decoded) path its server saw,
    with dot segments resolved as a normalising hop (nginx) in front of it would. Starlette,
    which vLLM uses, matches that exactly: a trailing slash only earns a redirect to the path
    without it, which the client then has to send through the proxy."""
    segments: list[str] = []
    parts = path.split("/")[1:]
    for segment in parts:  # RFC 3986 section 5.2.4, empty segments kept
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    trailing = "/" if parts and parts[-1] in (".", "..") else ""
    return "/" + "/".join(segments) + trailing


def loosely_routed_path(raw: str) -> str:
    """The same for a more lenient router: repeated and trailing slashes ignored."""
    return re.sub(r"/+", "/", routed_path(raw)).rstrip("/") or "/"


# --- the stack under test ---------------------------------------------------------------------


class RecordingSimApp(SimApp):
    """The simulated vLLM, also recording every path its server received into `seen` (shared
    by the sims of a stack, in arrival order): `stats.history` holds only the requests the sim
    has a route for, and a forwarded `/sleep` would not be among them."""

    def __init__(self, *args: Any, seen: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await super().__call__(scope, receive, send)


def recording_sim(
    name: str, seen: list[str], *, tokens_per_second: float = 0.0, api_key: str | None = None
) -> SimModelServer:
    """A simulated vLLM (ready at once) whose server records every path into `seen`."""
    sim = SimModelServer(name, load_time=0, tokens_per_second=tokens_per_second)
    sim.app = RecordingSimApp(name, tokens_per_second=tokens_per_second, api_key=api_key, seen=seen)
    return sim


class Stack:
    """A running proxy and what it stands in front of (a plain class: Hypothesis prints the
    fields of a dataclass argument in full, and this one is not worth reading)."""

    def __init__(
        self,
        url: str,
        proxy: ModelSwitchMiddleware,
        backend: Backend,
        sims: dict[str, SimModelServer] | None = None,
        seen: list[str] | None = None,
    ) -> None:
        self.url = url
        self.proxy = proxy
        self.backend = backend
        self.sims = sims or {}
        self.seen = seen if seen is not None else []

    def __repr__(self) -> str:  # Hypothesis prints its arguments; keep failures readable
        return f"Stack({self.url})"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def upstream_requests(self) -> int:
        return len(self.seen)

    def upstream_paths(self) -> list[str]:
        """Every path the upstreams' servers received, in order, routed by the sim or not."""
        return list(self.seen)

    async def status(self) -> dict[str, Any]:
        token = self.proxy.settings.security.admin_token
        headers = [("authorization", f"Bearer {token}")] if token else []
        reply = await send_raw(self.port, build_request("GET", "/proxy/status", headers=headers))
        assert reply.status == 200, reply
        result: dict[str, Any] = reply.json()
        return result

    async def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """Poll /proxy/status (the proxy's own word) until `predicate` holds."""
        with anyio.fail_after(timeout):
            while True:
                status = await self.status()
                if predicate(status):
                    return status
                await anyio.sleep(0.02)

    async def post(self, path: str, body: Any, **kw: Any) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = [("content-type", "application/json"), *kw.pop("headers", [])]
        return await send_raw(
            self.port, build_request("POST", path, headers=headers, body=data), **kw
        )

    async def get(self, path: str, **kw: Any) -> Reply:
        return await send_raw(
            self.port, build_request("GET", path, headers=kw.pop("headers", [])), **kw
        )


@asynccontextmanager
async def proxy_stack(
    *,
    models: Sequence[VLLMModel] | None = None,
    registry: ModelRegistry | None = None,
    backend: Backend | None = None,
    load_time: float = 0.0,
    tokens_per_second: float = 0.0,
    **options: Any,
) -> AsyncIterator[Stack]:
    """The proxy on a loopback uvicorn. Without `backend`: a `FakeBackend` whose models answer
    from one real `SimModelServer` each. Without `registry`: a `StaticRegistry` of `models`."""
    models = list(models or [spec(m) for m in MODELS])
    options.setdefault("min_residency", 0.0)
    async with AsyncExitStack() as stack:
        sims: dict[str, SimModelServer] = {}
        seen: list[str] = []
        if backend is None:
            for model in models:
                name = model.served_model_name
                sim = recording_sim(name, seen, tokens_per_second=tokens_per_second)
                await stack.enter_async_context(sim)
                sims[name] = sim
            backend = FakeBackend(
                load_time=load_time,
                base_urls={name: sim.base_url for name, sim in sims.items()},
            )
        proxy = ModelSwitchMiddleware(
            registry=registry or StaticRegistry(models),
            backend=backend,
            settings=make_settings(**options),
        )
        url = await stack.enter_async_context(serve(proxy))
        yield Stack(url, proxy, backend, sims, seen)


# --- resources --------------------------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at."""
    fds = {}
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            fds[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
    return fds


def describe_sockets(fds: dict[int, str]) -> dict[int, str]:
    """For socket descriptors: their TCP ends and state, from /proc/net (for failure messages)."""
    inodes = {t[8:-1]: fd for fd, t in fds.items() if t.startswith("socket:[")}
    found: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as rows:
                next(rows)
                for row in rows:
                    cols = row.split()
                    if cols[9] in inodes:
                        local, remote = (int(c.split(":")[1], 16) for c in cols[1:3])
                        found[inodes[cols[9]]] = f"tcp :{local} -> :{remote} state {cols[3]}"
        except OSError:
            pass
    return {fd: found.get(fd, target) for fd, target in fds.items()}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass(frozen=True)
class Snapshot:
    tasks: frozenset[asyncio.Task[Any]]
    fds: dict[int, str]

    @classmethod
    def take(cls) -> Snapshot:
        """The tasks (but the caller's own and the test runner's) and descriptors now."""
        current = asyncio.current_task()
        tasks = {t for t in asyncio.all_tasks() if t is not current and not _is_test_runner(t)}
        return cls(frozenset(tasks), open_fds())


def _is_test_runner(task: asyncio.Task[Any]) -> bool:
    """anyio's pytest runner runs each test and fixture step in a task of its own."""
    return "TestRunner" in getattr(task.get_coro(), "__qualname__", "")


def _describe_tasks(tasks: Iterable[asyncio.Task[Any]]) -> list[str]:
    return [f"{t.get_name()}: {t.get_coro()!r}" for t in tasks]


async def assert_no_leak(before: Snapshot, *, fd_slack: int = 0, timeout: float = 5.0) -> None:
    """Wait (bounded) until no more tasks run than at `before` (the test's own and the
    servers' tasks were counted then) and at most `fd_slack` more descriptors are open.

    Counts, not identities: a model reloaded after a crash runs in a new task, in place of the
    old one. Descriptors are counted after a full garbage collection: one held only by garbage
    (the Kubernetes client's connections can sit in exception/traceback cycles) is closed by
    the next collection and is not a leak; one that survives it is. On failure, the tasks and
    descriptors that are new are listed."""
    deadline = anyio.current_time() + timeout
    current = asyncio.current_task()
    baseline = before.tasks
    while True:
        gc.collect()
        tasks = {t for t in asyncio.all_tasks() if t is not current and not _is_test_runner(t)}
        fds = open_fds()
        if len(tasks) <= len(baseline) and len(fds) <= len(before.fds) + fd_slack:
            return
        if anyio.current_time() > deadline:
            extra_fds = describe_sockets(
                {fd: target for fd, target in fds.items() if fd not in before.fds}
            )
            raise AssertionError(
                f"tasks {len(baseline)} -> {len(tasks)}, new: {_describe_tasks(tasks - baseline)}; "
                f"fds {len(before.fds)} -> {len(fds)} (slack {fd_slack}), new: {extra_fds}"
            )
        await anyio.sleep(0.02)
