"""kmock's `KubernetesEmulator`, taught the API-server semantics the Kubernetes backend relies on.

kmock stores objects and serves list/watch/patch over real HTTP, but on purpose it keeps no
resourceVersion, never refuses a stale write, and ignores selectors. The backend is built on
exactly those guarantees (optimistic concurrency, watch resumption, 410 Gone), so this subclass
adds them, still on kmock's object store (`server.objects[...]` works for assertions) and still
behind kmock's request DSL, so a test can inject any answer with kmock's own syntax before the
emulation sees the request::

    server[kmock.method.PATCH, kmock.resource("apps", "v1", "deployments")][:1] << 409 << {...}

What it emulates:
- a global, increasing `metadata.resourceVersion`; `uid`, `creationTimestamp`, `generation`
  (bumped when `spec` changes, as for Deployments and custom resources);
- writes conditional on `metadata.resourceVersion` (merge patch or PUT): 409 Conflict;
- JSON merge patch, JSON patch; a strategic merge patch is treated as a merge patch (lists are
  replaced whole) — the code under test sends merge patches only;
- the `status` subresource (writes to the object ignore `status`, writes to `/status` change
  nothing else), for the resources in `STATUS_SUBRESOURCE`;
- list/watch with `labelSelector`, `fieldSelector` (any dotted path: `metadata.name=...`,
  `involvedObject.name=...`), `resourceVersion`
  (resumption from an event log; 410 Gone once the log was compacted), `timeoutSeconds`,
  bookmarks on timeout;
- `drop_watches()` ends every open watch stream, `compact()` expires every resourceVersion seen
  so far (the next resumption gets 410 Gone, as after etcd compaction).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import apps, rendering

Obj = dict[str, Any]

STATUS_SUBRESOURCE = frozenset({"deployments", "pods", "vllmmodels", "replicasets"})
GENERATION = frozenset({"deployments", "vllmmodels", "replicasets"})
LOG_LIMIT = 10_000

DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
PODS = kmock.resource("", "v1", "pods")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
EVENTS = kmock.resource("", "v1", "events")


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_error(code: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details={})


def status_body(code: int, reason: str, message: str) -> Obj:
    """A `Status` object, for answers injected through the DSL."""
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


# -- selectors -------------------------------------------------------------------------------


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses (`a in (x,y),b=c`)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    for term in _split_selector(selector or ""):
        if " notin " in term:
            key, values = term.split(" notin ", 1)
            if labels.get(key.strip()) in _set_values(values):
                return False
        elif " in " in term:
            key, values = term.split(" in ", 1)
            if labels.get(key.strip()) not in _set_values(values):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _set_values(text: str) -> set[str]:
    return {v.strip() for v in text.strip().strip("()").split(",") if v.strip()}


def field_selector_matches(selector: str | None, obj: Obj) -> bool:
    """`metadata.name=x`, `involvedObject.kind=Pod,involvedObject.name=y`, `reason!=z`: any
    dotted path of the object, as the API server allows for the fields it indexes."""
    for term in _split_selector(selector or ""):
        negate = "!=" in term
        key, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if not _:
            raise status_error(400, "BadRequest", f"field selector {term!r} is not supported")
        current: Any = obj
        for part in key.strip().split("."):
            current = current.get(part) if isinstance(current, dict) else None
        matched = ("" if current is None else str(current)) == value.strip()
        if matched == negate:
            return False
    return True


# -- the emulator ------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """See the module docstring."""

    _rv: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, kmock.resource, Obj]] = attrs.field(factory=list, init=False)
    _floor: int = attrs.field(default=0, init=False)
    _watchers: set[asyncio.Queue[tuple[int, kmock.resource, Obj] | None]] = attrs.field(
        factory=set, init=False
    )
    #: Called (synchronously) after every stored change: (resource, event).
    on_change: list[Callable[[kmock.resource, Obj], None]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock maps no action to PUT; a replace is a conditional write like a patch.
        self.fallback[kmock.method.PUT] << self._serve_replace

    async def _handle(self, request: rendering.Request) -> Any:
        # Skip KubernetesEmulator's own pre-mutation: state changes happen in the fallbacks
        # below, so an answer injected through the DSL leaves the stored objects untouched.
        return await apps.RawHandler._handle(self, request)

    # -- store helpers (also for tests and the cluster simulator) -----------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def read(self, resource: kmock.resource, namespace: str | None, name: str) -> Obj | None:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def items(self, resource: kmock.resource, namespace: str | None = None) -> list[Obj]:
        return [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in self._objects.items()
            if res == resource and not obj.deleted and (namespace is None or ns == namespace)
        ]

    def store(self, resource: kmock.resource, obj: Obj) -> Obj:
        """Create or overwrite an object directly (test set-up), with a watch event."""
        meta = obj.setdefault("metadata", {})
        existing = self.read(resource, meta.get("namespace"), meta["name"])
        if existing is None:
            return self._create(resource, meta.get("namespace"), obj)
        meta["resourceVersion"] = existing["metadata"]["resourceVersion"]
        return self._write(resource, existing, obj, subresource=None, force_status=True)

    def merge(self, resource: kmock.resource, namespace: str | None, name: str, patch: Obj) -> Obj:
        """Merge-patch an object directly (another actor's write), with a watch event."""
        old = self.read(resource, namespace, name)
        if old is None:
            raise KeyError(name)
        return self._write(resource, old, _merge_patch(old, patch), subresource=None)

    def drop_watches(self) -> None:
        """End every open watch stream (as an API server restart or a load balancer does)."""
        for queue in list(self._watchers):
            queue.put_nowait(None)

    def compact(self) -> None:
        """Expire every resourceVersion handed out so far: resumptions get 410 Gone."""
        self._floor = self._rv + 1
        self._log.clear()

    def fail_next(
        self,
        method: str,
        resource: kmock.resource,
        code: int,
        *,
        times: int = 1,
        subresource: str | None = None,
        reason: str | None = None,
        watch: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with a Kubernetes error status."""
        wanted = kmock.method(method)

        def matches(request: rendering.Request) -> bool:
            return (
                request.method == wanted
                and request.resource == resource
                and request.subresource == subresource
                and (request.params.get("watch") == "true") == watch
            )

        reason = reason or {409: "Conflict", 403: "Forbidden", 410: "Gone"}.get(code, "Failure")
        body = status_body(code, reason, f"injected {code} for {method} {resource.plural}")
        self[self._claim(matches, times)] << code << body

    def delay_next(self, method: str, resource: kmock.resource, seconds: float) -> None:
        """Hold the next matching request for `seconds` before it is served normally."""
        wanted = kmock.method(method)

        def matches(request: rendering.Request) -> bool:
            return (
                request.method == wanted
                and request.resource == resource
                and request.subresource is None
            )

        async def pause() -> None:
            await asyncio.sleep(seconds)

        self[self._claim(matches, 1)] >> pause

    def _claim(
        self, matches: Callable[[rendering.Request], bool], times: int
    ) -> Callable[[rendering.Request], bool]:
        """A kmock filter for the next `times` requests that `matches`, counted from now.

        kmock re-evaluates filters over every request it has seen (and its slices count
        requests other reactions answered), so the filter remembers which requests it took:
        only the request being handled (the last one) can be taken.
        """
        taken: set[int] = set()

        def claim(request: rendering.Request) -> bool:
            if request.id in taken:
                return True
            current = request.id == len(self._requests) - 1
            if not current or len(taken) >= times or not matches(request):
                return False
            taken.add(request.id)
            return True

        return claim

    def requests_to(
        self,
        method: str,
        resource: kmock.resource,
        *,
        watch: bool = False,
        subresource: str | None = None,
    ) -> list[rendering.Request]:
        wanted = kmock.method(method)
        return [
            r
            for r in self
            if r.method == wanted
            and r.resource == resource
            and r.subresource == subresource
            and (r.params.get("watch") == "true") == watch
        ]

    # -- mutations ---------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, resource: kmock.resource, kind: str, obj: Obj) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self._log.append((rv, resource, event))
        if len(self._log) > LOG_LIMIT:
            dropped = self._log[: len(self._log) - LOG_LIMIT]
            del self._log[: len(dropped)]
            self._floor = dropped[-1][0] + 1
        for queue in list(self._watchers):
            queue.put_nowait((rv, resource, event))
        for callback in list(self.on_change):
            callback(resource, event)

    def _create(self, resource: kmock.resource, namespace: str | None, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise status_error(422, "Invalid", "metadata.name: Required value")
        if namespace is not None:
            meta["namespace"] = namespace
        if self.read(resource, namespace, name) is not None:
            raise status_error(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        meta["resourceVersion"] = self._next_rv()
        if resource.plural in GENERATION:
            meta["generation"] = 1
        key = (resource, namespace, name)
        if key in self._objects:
            self._objects[key].history.append(obj)
        else:
            self._objects[key] = obj
        self._emit(resource, "ADDED", obj)
        return copy.deepcopy(obj)

    def _write(
        self,
        resource: kmock.resource,
        old: Obj,
        new: Obj,
        *,
        subresource: str | None,
        force_status: bool = False,
    ) -> Obj:
        """Store `new` in place of `old`, with the API server's bookkeeping."""
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv not in (None, "") and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            name = old["metadata"]["name"]
            raise status_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
            )
        new = copy.deepcopy(new)
        if resource.plural in STATUS_SUBRESOURCE and not force_status:
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
            else:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for key in ("name", "namespace", "uid", "creationTimestamp"):
            if key in old["metadata"]:
                meta[key] = old["metadata"][key]
        if resource.plural in GENERATION:
            generation = old["metadata"].get("generation", 1)
            if new.get("spec") != old.get("spec"):
                generation += 1
            meta["generation"] = generation
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)  # a no-op write keeps its resourceVersion, as Kubernetes does
        meta["resourceVersion"] = self._next_rv()
        address = (resource, old["metadata"].get("namespace"), old["metadata"]["name"])
        self._objects[address].history.append(new)
        self._emit(resource, "MODIFIED", new)
        return copy.deepcopy(new)

    def remove(self, resource: kmock.resource, namespace: str | None, name: str) -> Obj:
        old = self.read(resource, namespace, name)
        if old is None:
            raise status_error(404, "NotFound", f'{resource.plural} "{name}" not found')
        old["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[(resource, namespace, name)].delete()
        self._emit(resource, "DELETED", old)
        return old

    # -- the fallbacks (the emulation proper) -----------------------------------------------

    def _existing(self, request: rendering.Request) -> Obj:
        assert request.resource is not None and request.name is not None
        obj = self.read(request.resource, request.namespace, request.name)
        if obj is None:
            raise status_error(
                404, "NotFound", f'{request.resource.plural} "{request.name}" not found'
            )
        return obj

    def _matching(self, request: rendering.Request, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        if not field_selector_matches(request.params.get("fieldSelector"), obj):
            return False
        return label_selector_matches(request.params.get("labelSelector"), meta.get("labels") or {})

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        items = [obj for obj in self.items(request.resource) if self._matching(request, obj)]
        return {
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        return self._existing(request)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        data = json.loads(request.body or b"{}")
        return self._create(request.resource, request.namespace, data)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        old = self._existing(request)
        body = json.loads(request.body or b"{}")
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type == "application/json-patch+json" or isinstance(body, list):
            try:
                new = jsonpatch.apply_patch(old, body, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise status_error(422, "Invalid", f"json patch test failed: {exc}") from None
        elif content_type == "application/apply-patch+yaml":
            raise status_error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        else:
            new = _merge_patch(old, body)
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            new.setdefault("metadata", {})["resourceVersion"] = wanted
        return self._write(request.resource, old, new, subresource=request.subresource)

    async def _serve_replace(self, request: rendering.Request) -> rendering.Payload:
        if request.resource is None or request.name is None:
            raise kmock.KubernetesEndpointNotFoundError()
        old = self._existing(request)
        new = json.loads(request.body or b"{}")
        return self._write(request.resource, old, new, subresource=request.subresource)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None and request.name is not None
        return self.remove(request.resource, request.namespace, request.name)

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        assert request.resource is not None
        resource = request.resource
        yield b""  # send the headers now, as the API server does
        params = request.params
        timeout = float(params.get("timeoutSeconds") or 0) or None
        since = params.get("resourceVersion") or ""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        queue: asyncio.Queue[tuple[int, kmock.resource, Obj] | None] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            # Snapshot synchronously after registering: nothing can interleave on this loop.
            backlog: Iterable[Obj]
            last = self._rv
            if since in ("", "0"):
                backlog = [
                    {"type": "ADDED", "object": obj}
                    for obj in self.items(resource)
                    if self._matching(request, obj)
                ]
            elif int(since) < self._floor:
                yield {
                    "type": "ERROR",
                    "object": status_body(
                        410, "Expired", f"too old resource version: {since} ({self._floor})"
                    ),
                }
                return
            else:
                backlog = [
                    copy.deepcopy(event)
                    for rv, res, event in self._log
                    if rv > int(since)
                    and res == resource
                    and self._matching(request, event["object"])
                ]
            for event in backlog:
                yield event
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    # aiohttp does not cancel a handler whose client left: look now and then.
                    item = await asyncio.wait_for(queue.get(), min(remaining or 0.5, 0.5))
                except TimeoutError:
                    if _disconnected(request):
                        return
                    continue
                if item is None:
                    return  # dropped: no bookmark, like a cut connection
                rv, res, event = item
                if rv <= last or res != resource or not self._matching(request, event["object"]):
                    continue
                yield event
            if params.get("allowWatchBookmarks") == "true":
                yield {
                    "type": "BOOKMARK",
                    "object": {"metadata": {"resourceVersion": str(self._rv)}},
                }
        finally:
            self._watchers.discard(queue)


def _disconnected(request: rendering.Request) -> bool:
    raw = request._raw_request
    transport = raw.transport if raw is not None else None
    return transport is None or transport.is_closing()


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result
