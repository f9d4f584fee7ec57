"""Async access to the official synchronous `kubernetes` client.

Every call runs in a worker thread (the event loop never waits on the network) and returns the
API server's JSON as plain dicts: the client's generated models would drop fields they do not
know, and a read-modify-write through them could erase what a newer cluster added. Every error
becomes one `ApiError` with the HTTP status (0 when no answer came), so callers classify
failures by number instead of catching urllib3's many exception types.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

import anyio
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
#: (connect, read) seconds for ordinary calls; watches set their own read timeout.
REQUEST_TIMEOUT = (10.0, 30.0)

CONFLICT = 409
GONE = 410
FORBIDDEN = 403
NOT_FOUND = 404


class ApiError(Exception):
    """A Kubernetes API call failed. `status` is the HTTP status, 0 when none came back."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status or 'no answer'}: {reason}" if status else reason)

    @property
    def transient(self) -> bool:
        """Worth retrying unchanged: no answer, throttled, or a server-side failure."""
        return self.status in (0, 429) or self.status >= 500


def api_error(exc: BaseException) -> ApiError:
    """Translate what the sync client raises into an `ApiError` (message from the Status)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ApiException):
        reason = str(exc.reason or "")
        try:
            status = json.loads(exc.body or "")
            if isinstance(status, dict) and status.get("message"):
                reason = str(status["message"])
        except ValueError:
            pass
        return ApiError(int(exc.status or 0), reason or "API error")
    return ApiError(0, f"{type(exc).__name__}: {exc}")


# What a call can raise besides ApiException: connection refused/reset, timeouts, bad JSON.
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError, ValueError)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
    """Run one API call of the sync client in a worker thread; return the JSON body.

    Cancelling abandons the thread, which then ends within `REQUEST_TIMEOUT`. Writes must be
    conditional on a resourceVersion (see the backend) so an abandoned write cannot land
    over a newer state.
    """

    def run() -> Obj:
        try:
            response = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
            try:
                data = response.data
            finally:
                response.release_conn()
            body = json.loads(data) if data else {}
        except ApiException as exc:
            raise api_error(exc) from None
        except _NETWORK_ERRORS as exc:
            raise api_error(exc) from None
        if not isinstance(body, dict):
            raise ApiError(0, f"unexpected answer: {type(body).__name__}")
        return body

    return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)


class Backoff:
    """Capped exponential delays with jitter, so many replicas do not retry in lockstep."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography

    def reset(self) -> None:
        self._next = self.initial


def load_api_client(kubeconfig: str | None = None, *, context: str | None = None) -> Any:
    """An `ApiClient` for the cluster: `kubeconfig` when given, else the pod's service account
    when running in a cluster, else `KUBECONFIG` / `~/.kube/config`.

    It reads files (blocking): call it before serving, or through `anyio.to_thread`.
    """
    config: Any = k8s_config  # the loaders are untyped
    configuration = k8s_client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        # The client reads KUBECONFIG once, at import; read it now. Several paths may be
        # listed (os.pathsep), as kubectl allows. Never write refreshed tokens back.
        config.load_kube_config(
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    return k8s_client.ApiClient(configuration)


def namespace_from_pod(default: str = "default") -> str:
    """The namespace this pod runs in (the service account's), else `default`."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip() or default
    except OSError:
        return default
