"""List + watch through the sync client, without ever blocking the event loop.

`Informer` keeps a cache of one kind of object (filtered by selectors) in step with the API
server, the way client-go's informers do: list, then watch from the list's resourceVersion,
resume from the last event's resourceVersion when a stream ends, relist on 410 Gone, back off
(capped, exponential) on errors. Readers wait for changes on a `Notifier` instead of polling.

A watch stream is read one line per worker-thread hop, so cancelling the reader abandons at
most one blocked `recv`; `_Stream.abort()` then shuts the socket down so that thread returns at
once. Server-side `timeoutSeconds` and a client read timeout bound every stream as well.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
from anyio.abc import TaskStatus
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import watch as k8s_watch

from vllm_chill.backends.kubernetes._api import GONE, ApiError, Backoff, Obj, api_error, call
from vllm_chill.observability._logs import get_logger

logger = get_logger(__name__)


class Notifier:
    """Wakes every waiter on each change. Take `waiter()` *before* reading the state, then
    wait on it: a change in between is never missed."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self.version = 0

    def waiter(self) -> anyio.Event:
        if self._event is None:
            self._event = anyio.Event()
        return self._event

    def notify(self) -> None:
        self.version += 1
        if self._event is not None:
            self._event.set()
            self._event = None


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


class _Stream:
    """One watch response, opened and read from worker threads, abortable from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: Any = None
        self._lines: Iterator[str] | None = None
        self._aborted = False

    def open(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            response = fn(*args, **kwargs)
        except ApiException as exc:
            raise api_error(exc) from None
        except Exception as exc:
            raise api_error(exc) from None
        with self._lock:
            if self._aborted:  # cancelled while connecting: nobody will read it
                response.close()
                return
            self._response = response
            self._lines = _iter_lines(response)

    def next_line(self) -> str | None:
        """The next line, or None at the end of the stream."""
        if self._lines is None:
            return None
        try:
            return next(self._lines)
        except StopIteration:
            return None
        except Exception as exc:
            if self._aborted:
                return None
            raise api_error(exc) from None

    def abort(self) -> None:
        """Unblock a reader stuck in `recv` (never blocks itself)."""
        with self._lock:
            self._aborted = True
            response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            response, self._response = self._response, None
        if response is not None:
            try:
                response.close()
            except Exception:  # already broken by abort(): nothing left to release
                logger.debug("closing a watch stream failed", exc_info=True)


class Informer:
    """A cache of the objects one list call returns, kept current by watching.

    `list_fn` is a sync client method such as `CoreV1Api.list_namespaced_pod`; `args` and
    `kwargs` are its positional arguments and filters (`label_selector`, `field_selector`).
    `ready` says whether the last list or watch request succeeded.
    """

    def __init__(
        self,
        what: str,
        list_fn: Callable[..., Any],
        *args: Any,
        notifier: Notifier | None = None,
        on_change: Callable[[], None] | None = None,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        **kwargs: Any,
    ) -> None:
        self.what = what
        self._list_fn = list_fn
        self._args = args
        self._kwargs = kwargs
        self.notifier = notifier or Notifier()
        self._on_change = on_change
        self._watch_timeout = watch_timeout
        self._backoff = backoff or Backoff()
        self.cache: dict[str, Obj] = {}
        #: True once a list succeeded; never goes back (the cache stays usable).
        self.synced = False
        #: Whether the last request to the API server succeeded.
        self.ready = False
        #: Watch events applied so far (for the tests and the spin guard).
        self.events = 0
        self._failures = 0
        #: Whether a list or watch request got an answer or an error yet.
        self.attempted = False

    def get(self, name: str) -> Obj | None:
        return self.cache.get(name)

    def objects(self) -> list[Obj]:
        return [self.cache[name] for name in sorted(self.cache)]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List and watch until cancelled. Reports started after the first list attempt."""
        started = False
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                if not started:
                    task_status.started()
                    started = True
                opened = time.monotonic()
                events = self.events
                version = await self._watch(version)
                if self.events == events and time.monotonic() - opened < 1.0:
                    # A stream that ends at once, empty, is a misbehaving proxy or server:
                    # do not spin on it.
                    await anyio.sleep(self._backoff.next())
            except _Gone:
                logger.info("%s: watch expired (410 Gone), listing again", self.what)
                version = None
            except ApiError as exc:
                self._failed(exc)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(self._backoff.next())
                if exc.status == GONE:
                    version = None
            except Exception:  # a bug or a garbled answer must not end the watching
                logger.exception("%s: watching failed; listing again", self.what)
                self.ready = False
                version = None
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(self._backoff.next())

    def _failed(self, exc: ApiError) -> None:
        self.attempted = True
        self.ready = False
        self._failures += 1
        # Say it once per outage, not once per retry.
        log = logger.warning if self._failures == 1 else logger.debug
        log("%s: Kubernetes API error (%s); retrying with backoff", self.what, exc)
        self.notifier.notify()

    def _succeeded(self) -> None:
        if self._failures:
            logger.info("%s: Kubernetes API reachable again", self.what)
        self._failures = 0
        self.attempted = True
        self.ready = True
        self._backoff.reset()

    def _changed(self) -> None:
        self.notifier.notify()
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                logger.exception("%s: change listener failed", self.what)

    async def _list(self) -> str:
        body = await call(self._list_fn, *self._args, **self._kwargs)
        items = body.get("items") or []
        cache: dict[str, Obj] = {}
        for item in items:
            name = _name(item)
            if name:
                cache[name] = item
        self.cache = cache
        self.synced = True
        self._succeeded()
        self._changed()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> str:
        """Follow one watch stream; return the resourceVersion to resume from."""
        stream = _Stream()
        timeout = max(1, round(self._watch_timeout))
        kwargs = dict(
            self._kwargs,
            watch=True,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(10.0, timeout + 30.0),
        )
        if version:
            kwargs["resource_version"] = version
        try:
            await anyio.to_thread.run_sync(
                stream.open, self._list_fn, self._args, kwargs, abandon_on_cancel=True
            )
            self._succeeded()
            while True:
                line = await anyio.to_thread.run_sync(stream.next_line, abandon_on_cancel=True)
                if line is None:
                    return version
                if line.strip():
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise ApiError(0, "a watch event was not JSON") from None
                    version = self._apply(event, version)
        finally:
            stream.abort()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await anyio.to_thread.run_sync(stream.close, abandon_on_cancel=True)

    def _apply(self, event: Mapping[str, Any], version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == GONE:
                raise _Gone()
            raise ApiError(code, str(obj.get("message") or "watch error"))
        new_version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        self.events += 1
        if kind == "BOOKMARK":
            return new_version
        name = _name(obj)
        if not name:
            return new_version
        if kind == "DELETED":
            self.cache.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.cache[name] = obj
        else:
            return new_version
        self._changed()
        return new_version


def _iter_lines(response: Any) -> Iterator[str]:
    """The client's own line splitter (it handles chunks that split a line)."""
    lines: Iterator[str] = k8s_watch.iter_resp_lines(response)  # type: ignore[no-untyped-call]
    return lines


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


class PodEvents:
    """The Events about one pod, watched only while it matters (a pod waiting for a node).

    `run()` belongs to the owner's task group; `follow(name)` starts watching that pod's
    Events (and stops watching the previous pod's), `follow(None)` stops. Changes wake the
    `notifier` like any other informer's.
    """

    def __init__(
        self,
        list_fn: Callable[..., Any],
        namespace: str,
        *,
        notifier: Notifier,
        watch_timeout: float = 300.0,
    ) -> None:
        self._list_fn = list_fn
        self._namespace = namespace
        self._notifier = notifier
        self._watch_timeout = watch_timeout
        self._wanted: str | None = None
        self._informer: Informer | None = None
        self._scope: anyio.CancelScope | None = None
        self._changed = anyio.Event()

    @property
    def following(self) -> str | None:
        return self._wanted

    @property
    def readable(self) -> bool:
        """False once listing them failed (typically 403: the Role does not allow it)."""
        informer = self._informer
        return informer is None or informer.synced or not informer.attempted

    def events(self) -> list[Obj]:
        return self._informer.objects() if self._informer is not None else []

    def follow(self, pod: str | None) -> None:
        if pod != self._wanted:
            self._wanted = pod
            self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tasks:
            task_status.started()
            while True:
                await self._changed.wait()
                self._changed = anyio.Event()
                if self._scope is not None:
                    self._scope.cancel()
                self._scope = self._informer = None
                if self._wanted is None:
                    continue
                informer = Informer(
                    f"Events of pod {self._namespace}/{self._wanted}",
                    self._list_fn,
                    self._namespace,
                    field_selector=f"involvedObject.kind=Pod,involvedObject.name={self._wanted}",
                    notifier=self._notifier,
                    watch_timeout=self._watch_timeout,
                )
                scope = anyio.CancelScope()
                self._informer, self._scope = informer, scope
                tasks.start_soon(_run_in, scope, informer)


async def _run_in(scope: anyio.CancelScope, informer: Informer) -> None:
    with scope:
        await informer.run()
