"""VLLMModel `status` and Kubernetes Events, written in the background and best effort.

What an operator sees in `kubectl get vllmmodels` and `kubectl describe` must never slow down
or fail a model switch: writes go through a bounded queue to one background task, in order
(Loading is never written after Ready), and any failure is logged. A Role without the
`vllmmodels/status` or `events` permission is a legitimate choice, so a 403 is logged once per
kind of write and the proxy carries on.

A switch's outcome (`status.lastSwitch`, see `Switch`) travels in the same write as the
`Ready` or `Failed` phase that ends it.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from kubernetes import client as k8s_client

from vllm_chill._model import API_GROUP, API_VERSION, KIND, PLURAL
from vllm_chill.backends.kubernetes._api import (
    FORBIDDEN,
    MERGE_PATCH,
    NOT_FOUND,
    ApiError,
    Obj,
    call,
)
from vllm_chill.observability._logs import get_logger

logger = get_logger(__name__)

Phase = Literal["Pending", "Loading", "Ready", "Failed", "Unloaded"]
EventType = Literal["Normal", "Warning"]
SwitchResult = Literal["success", "failure"]

COMPONENT = "vllm-chill"
_MAX_MESSAGE = 1024
_QUEUE_SIZE = 256


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def now_iso() -> str:
    return rfc3339(_utcnow())


@dataclasses.dataclass
class Switch:
    """A switch to a model, begun when it is made; `status()` is its `status.lastSwitch`."""

    #: The model the Deployment ran until the switch (its VLLMModel name), if it ran one.
    from_model: str | None = None
    #: "cold": new vLLM pods (the `kind` of `/proxy/status`'s last_switch).
    kind: str = "cold"
    started_at: datetime.datetime = dataclasses.field(default_factory=_utcnow)
    started: float = dataclasses.field(default_factory=time.monotonic)

    def status(self, result: SwitchResult, reason: str | None = None) -> Obj:
        """`status.lastSwitch` for the switch ending now. Every key is written, null for
        none: a merge patch keeps what it does not name, and the previous switch's `from` or
        `reason` must not outlive it."""
        return {
            "from": self.from_model,
            "result": result,
            "kind": self.kind,
            "startedAt": rfc3339(self.started_at),
            "finishedAt": now_iso(),
            "durationSeconds": round(time.monotonic() - self.started, 3),
            "reason": reason[:_MAX_MESSAGE] if reason else None,
        }


def model_reference(name: str, namespace: str, uid: str | None = None) -> Obj:
    ref: Obj = {"apiVersion": API_VERSION, "kind": KIND, "name": name, "namespace": namespace}
    if uid:
        ref["uid"] = uid
    return ref


def object_reference(obj: Obj, *, api_version: str, kind: str) -> Obj:
    meta = obj.get("metadata") or {}
    ref: Obj = {
        "apiVersion": api_version,
        "kind": kind,
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    if meta.get("uid"):
        ref["uid"] = meta["uid"]
    return ref


_Job = Callable[[], Awaitable[None]]


class Reporter:
    """Queues status writes and Events; `run()` (owned by the caller's task group) sends them.

    The queue exists only while `run()` does: it is opened when `run()` starts and closed when
    it stops (however it stops), so a write outside a run is dropped, and a reporter that never
    ran holds nothing open.
    """

    def __init__(
        self, api_client: Any, namespace: str, *, instance: str, deployment: str | None = None
    ) -> None:
        """`deployment`: where the models it reports on run (`status.deployment`)."""
        self._custom = k8s_client.CustomObjectsApi(api_client)
        self._core = k8s_client.CoreV1Api(api_client)
        self._namespace = namespace
        self._instance = instance
        self._deployment = deployment
        self._send: MemoryObjectSendStream[_Job] | None = None
        self._forbidden: set[str] = set()
        self._pending = 0
        self._idle: anyio.Event | None = None

    # -- enqueue (never blocks, never raises) -------------------------------------------------

    def model_status(
        self, name: str, phase: Phase, message: str = "", *, last_switch: Obj | None = None
    ) -> None:
        """Set `status` of the VLLMModel `name` (skipped if it is not a custom resource);
        `last_switch` (`Switch.status()`) replaces its `lastSwitch`, else that is kept."""
        message = message[:_MAX_MESSAGE]
        self._enqueue(lambda: self._write_status(name, phase, message, last_switch))

    def event(
        self, involved: Obj, reason: str, message: str, *, type_: EventType = "Normal"
    ) -> None:
        self._enqueue(lambda: self._write_event(involved, reason, message[:_MAX_MESSAGE], type_))

    def _enqueue(self, job: _Job) -> None:
        if self._send is None:
            logger.debug("status/event reporter not running; dropping a write")
            return
        try:
            self._send.send_nowait(job)
            self._pending += 1
        except anyio.WouldBlock:
            logger.debug("status/event queue full; dropping a write")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    # -- background ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[_Job](_QUEUE_SIZE)
        with send, receive:  # closed when the reporter stops: later writes drop
            self._send = send
            try:
                task_status.started()
                async for job in receive:
                    try:
                        await job()
                    except Exception:  # best effort: a failed write must not take the proxy down
                        logger.exception("writing a status or an Event failed")
                    finally:
                        self._pending -= 1
                        if not self._pending:
                            self._wake_flush()
            finally:
                self._send = None
                # What was still queued is dropped with the queue: nothing is pending any more.
                self._pending = 0
                self._wake_flush()

    def _wake_flush(self) -> None:
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    async def flush(self, limit: float = 5.0) -> None:
        """Wait (bounded) until everything queued so far was written; for tests and shutdown."""
        with anyio.move_on_after(limit):
            while self._pending:
                if self._idle is None:
                    self._idle = anyio.Event()
                await self._idle.wait()

    async def _write_status(
        self, name: str, phase: Phase, message: str, last_switch: Obj | None
    ) -> None:
        # Where it runs (a merge patch with null removes it once it runs nowhere).
        where = None if phase == "Unloaded" else self._deployment
        status: Obj = {
            "phase": phase,
            "message": message,
            "deployment": where,
            "lastUpdated": now_iso(),
        }
        if last_switch is not None:
            status["lastSwitch"] = last_switch
        body = {"status": status}
        try:
            await call(
                self._custom.patch_namespaced_custom_object_status,
                API_GROUP,
                API_VERSION.split("/", 1)[1],
                self._namespace,
                PLURAL,
                name,
                body,
                field_manager=COMPONENT,
                _content_type=MERGE_PATCH,
            )
        except ApiError as exc:
            if exc.status == NOT_FOUND:
                logger.debug("no VLLMModel %r in %s to write a status to", name, self._namespace)
            else:
                self._report_failure("vllmmodels/status", exc)

    async def _write_event(
        self, involved: Obj, reason: str, message: str, type_: EventType
    ) -> None:
        timestamp = now_iso()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{involved.get('name') or COMPONENT}.",
                "namespace": self._namespace,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        }
        try:
            await call(self._core.create_namespaced_event, self._namespace, body)
        except ApiError as exc:
            self._report_failure("events", exc)

    def _report_failure(self, what: str, exc: ApiError) -> None:
        if exc.status == FORBIDDEN:
            if what not in self._forbidden:
                self._forbidden.add(what)
                logger.warning(
                    "not allowed to write %s in namespace %s (%s); carrying on without them",
                    what,
                    self._namespace,
                    exc.reason,
                )
            return
        logger.warning("writing %s failed: %s", what, exc)

    async def aclose(self) -> None:
        """Stop accepting writes; `run()` ends once it has sent what was already queued."""
        if self._send is not None:
            await self._send.aclose()
