"""A simulated cluster for the Kubernetes backend: API emulator + controller/kubelet simulator.

`simulated_cluster()` starts kmock's emulator (`emulator.ApiServer`) on a loopback port, fills
it with a vLLM Deployment like the one in `examples/`, its ConfigMap and some `VLLMModel`s,
and runs `KubeletSim`, which plays the Deployment controller, the scheduler and the kubelet
for that Deployment, entirely through the HTTP API:

- it watches the Deployment; on a template change it deletes the old pod first (strategy
  Recreate), creates a pod object from the template, and walks it through scheduling, image
  pull and container start, writing the pod's status as a kubelet would;
- the "container" (the one named `container`, "vllm" by default) is a `SimModelServer` whose
  served name and model (`root` in /v1/models) are READ FROM THE POD'S COMMAND AND ARGS, so a
  request answered by the right model proves that the args landed in the Deployment;
- with `linger`, a deleted pod stays Terminating that long (its server still holding the
  "GPU"): a pod created meanwhile is Unschedulable until it is gone (`overlaps` counts them);
- the scheduler's and the autoscaler's words about a pod are Events on the pod
  (`TriggeredScaleUp`, `NotTriggerScaleUp`), as cluster-autoscaler writes them;
- it writes the Deployment's status (observedGeneration, replicas, updated/ready/available,
  the Progressing condition) as the Deployment controller does;
- `replicas: 0` deletes the pod and stops its server.

All pods answer on one fixed loopback port: the vLLM Service's address (`cluster.upstream`).
Failures are injected per served name: `failures={"crashy": CRASH_LOOP, ...}`.

Others import it for end-to-end tests through the proxy::

    async with simulated_cluster(models=[...]) as cluster:
        backend = K8sDeploymentBackend(cluster.api_client, namespace=cluster.namespace,
                                       deployment=cluster.deployment, upstream=cluster.upstream)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import kmock
from anyio.abc import TaskGroup, TaskStatus
from kubernetes import client as k8s_client

from tests.support import free_port
from vllm_chill._model import API_GROUP, API_VERSION, KIND, PLURAL
from vllm_chill.backends.sim._server import SimModelServer

from .emulator import CONFIGMAPS, DEPLOYMENTS, PODS, ApiServer, now_iso

logger = logging.getLogger(__name__)

VLLMMODELS = kmock.resource(API_GROUP, API_VERSION.split("/")[1], PLURAL)

CRASH_LOOP = "crash-loop"
IMAGE_PULL = "image-pull"
UNSCHEDULABLE = "unschedulable"
#: Unschedulable; a cluster autoscaler announces a node, which is ready after `wait_time`.
SCALE_UP = "scale-up"
#: Unschedulable; the cluster autoscaler says no node group can host the pod.
NO_SCALE_UP = "no-scale-up"
#: Unschedulable until its PersistentVolumeClaim binds, after `wait_time`.
VOLUME_PENDING = "volume-pending"
#: One image pull fails with a network error; the kubelet's retry (after `wait_time`) works.
PULL_BLIP = "pull-blip"
#: The pod loads another model than its args say (`root` in /v1/models).
WRONG_MODEL = "wrong-model"
OOM_KILLED = "oom"
PROGRESS_DEADLINE = "progress-deadline"
NEVER_READY = "never-ready"
#: The pod reports Ready as soon as its server listens, before the model has loaded (a
#: readiness probe on a port, not on /health): only /v1/models tells the truth.
READY_EARLY = "ready-early"

UNSCHEDULABLE_MESSAGE = (
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
    "available: 3 No preemption victims found for incoming pod."
)
VOLUME_MESSAGE = (
    "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: "
    "0/3 nodes are available: 3 Preemption is not helpful for scheduling."
)
SCALE_UP_MESSAGE = "pod triggered scale-up: [{gpu-pool 0->1 (max: 2)}]"
NO_SCALE_UP_MESSAGE = (
    "pod didn't trigger scale-up: 1 max node group size reached, 2 Insufficient nvidia.com/gpu"
)
PULL_BLIP_MESSAGE = (
    'failed to pull and unpack image "docker.io/vllm/vllm-openai:v0.10.1": failed to copy: '
    "httpReadSeeker: failed open: failed to do request: Get "
    '"https://registry-1.docker.io/v2/vllm/vllm-openai/blobs/sha256:ab12": dial tcp: i/o timeout'
)

#: The unmanaged args of the initial Deployment, which every rewrite must keep.
BASE_ARGS = ["--port", "8000", "--host", "0.0.0.0", "--api-key=$(VLLM_API_KEY)"]


def model_manifest(name: str, served: str | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"modelName": f"org/{name}", "servedModelName": served or name, **spec},
    }


def vllm_deployment(
    namespace: str,
    name: str,
    *,
    args: Sequence[str],
    replicas: int = 0,
    command: Sequence[str] | None = None,
    container: str = "vllm",
    sidecars: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The vLLM Deployment as `examples/kubernetes-with-model-switching.yaml` has it; with
    `command` (`["vllm"]`, `["vllm", "serve"]`), `sidecars` before the vLLM container."""
    vllm: dict[str, Any] = {
        "name": container,
        "image": "vllm/vllm-openai:v0.10.1",
        "args": list(args),
        "envFrom": [{"configMapRef": {"name": "vllm-config"}}],
        "ports": [{"containerPort": 8000, "name": "http"}],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
    }
    if command is not None:
        vllm["command"] = list(command)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": 1800,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [*copy.deepcopy(list(sidecars)), vllm]},
            },
        },
    }


def _vllm_argv(command: Sequence[str], args: Sequence[str]) -> list[str]:
    """What vLLM's own parser gets: the words after `vllm serve`, with `_` read as `-`."""
    words = [*command, *args]
    for index, word in enumerate(words[:-1]):
        if word.rsplit("/", 1)[-1] == "vllm" and words[index + 1] == "serve":
            words = words[index + 2 :]
            break
    else:
        words = list(args)
    return [_dashes(word) for word in words]


def _dashes(word: str) -> str:
    """vLLM reads `--max_model_len` as `--max-model-len`."""
    if not word.startswith("--"):
        return word
    name, equals, value = word.partition("=")
    return name.replace("_", "-") + equals + value


def _last_value(argv: Sequence[str], flag: str) -> str | None:
    found = None
    for index, token in enumerate(argv):
        if token == flag and index + 1 < len(argv):
            found = str(argv[index + 1])
        elif token.startswith(flag + "="):
            found = token.split("=", 1)[1]
    return found


def model_name_in(args: Sequence[str], command: Sequence[str] = ()) -> str | None:
    """The simulator's own reading of vLLM's args (deliberately not the code under test's):
    the positional model (which vLLM prefers), else `--model`."""
    argv = _vllm_argv(command, args)
    if argv and not argv[0].startswith("-"):
        return str(argv[0])
    return _last_value(argv, "--model")


def served_name_in(args: Sequence[str], command: Sequence[str] = ()) -> str | None:
    argv = _vllm_argv(command, args)
    return _last_value(argv, "--served-model-name") or model_name_in(args, command)


@dataclass
class SimPod:
    name: str
    template_hash: str
    served: str | None
    root: str | None = None
    uid: str = ""
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    server: SimModelServer | None = None
    ready: bool = False


class KubeletSim:
    """Deployment controller + scheduler + kubelet for one Deployment, through the HTTP API."""

    def __init__(
        self,
        api_url: str,
        namespace: str,
        deployment: str,
        *,
        service_port: int,
        failures: Mapping[str, str] | None = None,
        load_time: float = 0.1,
        step: float = 0.01,
        wait_time: float = 0.5,
        linger: float = 0.0,
        container: str = "vllm",
        api_key: str | None = None,
    ) -> None:
        self._api = api_url
        self.namespace = namespace
        self.deployment = deployment
        self.service_port = service_port
        self.failures = dict(failures or {})
        self.load_time = load_time
        self.step = step
        #: How long a node takes to come (SCALE_UP), a volume to bind, a pull retry to work.
        self.wait_time = wait_time
        self.linger = linger
        self.container = container
        self.api_key = api_key
        self.pod: SimPod | None = None
        #: Pods deleted but still Terminating (with `linger`).
        self.terminating: dict[str, SimPod] = {}
        #: Pods created while another pod was still Terminating.
        self.overlaps = 0
        #: While set, no pod is created (a node is gone and nothing replaces the pod).
        self.hold = False
        #: Served names of every pod whose server started, in order.
        self.started: list[str] = []
        self._latest: dict[str, Any] | None = None
        self._deadline_exceeded: str | None = None  # template hash that timed out
        self._dirty: anyio.Event | None = None
        self._lock = anyio.Lock()
        self._http: httpx.AsyncClient | None = None
        self._tasks: TaskGroup | None = None

    # -- URLs -------------------------------------------------------------------------------

    @property
    def _deployments_url(self) -> str:
        return f"{self._api}/apis/apps/v1/namespaces/{self.namespace}/deployments"

    @property
    def _pods_url(self) -> str:
        return f"{self._api}/api/v1/namespaces/{self.namespace}/pods"

    # -- main loop --------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
            self._http = http
            try:
                async with anyio.create_task_group() as tasks:
                    self._tasks = tasks
                    self._dirty = anyio.Event()
                    await tasks.start(self._watch)
                    tasks.start_soon(self._reconcile_loop)
                    task_status.started()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._stop_server()
                    for pod in list(self.terminating.values()):
                        await self._stop_server(pod)

    async def _watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self._http is not None
        selector = f"metadata.name={self.deployment}"
        started = False
        while True:
            listing = (
                await self._http.get(self._deployments_url, params={"fieldSelector": selector})
            ).json()
            for item in listing.get("items") or []:
                self._saw(item)
            if not started:
                task_status.started()
                started = True
            params = {
                "watch": "true",
                "fieldSelector": selector,
                "resourceVersion": listing["metadata"]["resourceVersion"],
            }
            with contextlib.suppress(httpx.HTTPError):
                async with self._http.stream("GET", self._deployments_url, params=params) as resp:
                    async for line in resp.aiter_lines():
                        if line.strip():
                            event = json.loads(line)
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                self._saw(event["object"])
            await anyio.sleep(self.step)

    def _saw(self, deployment: dict[str, Any]) -> None:
        self._latest = deployment
        if self._dirty is not None:
            self._dirty.set()

    async def _reconcile_loop(self) -> None:
        while True:
            assert self._dirty is not None
            await self._dirty.wait()
            self._dirty = anyio.Event()
            if self._latest is not None:
                await self._reconcile(self._latest)

    async def _reconcile(self, deployment: dict[str, Any]) -> None:
        template = deployment["spec"]["template"]
        thash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        wanted = int(deployment["spec"].get("replicas", 1))
        pod = self.pod
        if pod is not None and (pod.template_hash != thash or wanted == 0):
            await self._delete_pod()
            if pod.template_hash != thash:
                # Recreate: the new template's pod waits until the old pods are gone. (The
                # same template scaled back up gets its pod at once, as a ReplicaSet does.)
                while self.terminating:
                    await anyio.sleep(self.step)
        if wanted >= 1 and self.pod is None and not self.hold:
            await self._create_pod(template, thash)
        await self._write_status()

    # -- pods -------------------------------------------------------------------------------

    async def _create_pod(self, template: dict[str, Any], thash: str) -> None:
        assert self._http is not None and self._tasks is not None
        meta = copy.deepcopy(template.get("metadata") or {})
        name = f"{self.deployment}-{thash[:8]}-{uuid.uuid4().hex[:5]}"
        labels = dict(meta.get("labels") or {}, **{"pod-template-hash": thash[:8]})
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": meta.get("annotations") or {},
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
            "status": {"phase": "Pending"},
        }
        if self.terminating:
            self.overlaps += 1
        response = await self._http.post(self._pods_url, json=body)
        response.raise_for_status()
        containers = body["spec"]["containers"]
        container = next((c for c in containers if c.get("name") == self.container), None)
        container = container or containers[0]
        command = container.get("command") or []
        args = container.get("args") or []
        served = served_name_in(args, command) or await self._env(container, "SERVED_MODEL_NAME")
        root = model_name_in(args, command) or await self._env(container, "MODEL_NAME")
        uid = str(response.json()["metadata"]["uid"])
        pod = SimPod(name=name, template_hash=thash, served=served, root=root, uid=uid)
        self.pod = pod
        self._tasks.start_soon(self._lifecycle, pod)

    async def _env(self, container: dict[str, Any], key: str) -> str | None:
        """A ConfigMap-driven container: vLLM reads its settings from its environment."""
        assert self._http is not None
        for source in container.get("envFrom") or []:
            name = (source.get("configMapRef") or {}).get("name")
            if name:
                response = await self._http.get(
                    f"{self._api}/api/v1/namespaces/{self.namespace}/configmaps/{name}"
                )
                if response.status_code == 200:
                    value = (response.json().get("data") or {}).get(key)
                    if value:
                        return str(value)
        return None

    async def _delete_pod(self) -> None:
        pod, self.pod = self.pod, None
        if pod is None:
            return
        pod.scope.cancel()
        assert self._http is not None and self._tasks is not None
        if self.linger > 0:
            # Terminating: the object stays (with a deletionTimestamp), its server too.
            self.terminating[pod.name] = pod
            await self._http.patch(
                f"{self._pods_url}/{pod.name}",
                json={"metadata": {"deletionTimestamp": now_iso()}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            self._tasks.start_soon(self._terminate, pod)
            return
        await self._stop_server(pod)
        await self._http.delete(f"{self._pods_url}/{pod.name}")

    async def _terminate(self, pod: SimPod) -> None:
        assert self._http is not None
        await anyio.sleep(self.linger)
        await self._stop_server(pod)
        await self._http.delete(f"{self._pods_url}/{pod.name}")
        self.terminating.pop(pod.name, None)

    async def _event(self, pod: SimPod, reason: str, message: str, component: str) -> None:
        """An Event about the pod, as the scheduler or a cluster autoscaler writes it."""
        assert self._http is not None
        now = now_iso()
        await self._http.post(
            f"{self._api}/api/v1/namespaces/{self.namespace}/events",
            json={
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{pod.name}.", "namespace": self.namespace},
                "involvedObject": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.name,
                    "namespace": self.namespace,
                    "uid": pod.uid,
                },
                "reason": reason,
                "message": message,
                "type": "Normal",
                "source": {"component": component},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            },
        )

    async def _stop_server(self, pod: SimPod | None = None) -> None:
        pod = pod or self.pod
        if pod is not None and pod.server is not None:
            server, pod.server = pod.server, None
            await server.stop()

    async def kill_pod(self, *, replace: bool = False) -> None:
        """The pod disappears (its node is lost); with `replace`, a new one is created."""
        self.hold = not replace
        async with self._lock:
            await self._delete_pod()
        await self._write_status()
        if replace and self._dirty is not None:
            self._dirty.set()

    async def _pod_status(self, pod: SimPod, status: dict[str, Any]) -> None:
        assert self._http is not None
        if self.pod is not pod:
            return
        await self._http.patch(
            f"{self._pods_url}/{pod.name}/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def _lifecycle(self, pod: SimPod) -> None:
        with pod.scope:
            failure = self.failures.get(pod.served or "")
            await anyio.sleep(self.step)
            if self.terminating:  # the old pod still holds the GPU
                await self._pod_status(pod, _unschedulable())
                while self.terminating:
                    await anyio.sleep(self.step)
            if failure in (UNSCHEDULABLE, SCALE_UP, NO_SCALE_UP, VOLUME_PENDING):
                volume = failure == VOLUME_PENDING
                await self._pod_status(pod, _unschedulable(VOLUME_MESSAGE if volume else None))
                await anyio.sleep(self.step)
                if failure == UNSCHEDULABLE:
                    return
                autoscaler = "cluster-autoscaler"
                if failure == SCALE_UP:
                    await self._event(pod, "TriggeredScaleUp", SCALE_UP_MESSAGE, autoscaler)
                else:  # the autoscaler cannot help a pod waiting for its volume either
                    await self._event(pod, "NotTriggerScaleUp", NO_SCALE_UP_MESSAGE, autoscaler)
                if failure == NO_SCALE_UP:
                    return
                await anyio.sleep(self.wait_time)  # the node joins / the volume binds
            await self._pod_status(pod, _waiting(pod, "ContainerCreating", ""))
            await anyio.sleep(self.step)
            if failure == IMAGE_PULL:
                message = 'failed to pull and unpack image "vllm/vllm-openai:nope": not found'
                await self._pod_status(pod, _waiting(pod, "ErrImagePull", message))
                await anyio.sleep(self.step)
                message = 'Back-off pulling image "vllm/vllm-openai:nope"'
                await self._pod_status(pod, _waiting(pod, "ImagePullBackOff", message))
                return
            if failure == PULL_BLIP:
                await self._pod_status(pod, _waiting(pod, "ErrImagePull", PULL_BLIP_MESSAGE))
                await anyio.sleep(self.step)
                message = 'Back-off pulling image "vllm/vllm-openai:v0.10.1"'
                await self._pod_status(pod, _waiting(pod, "ImagePullBackOff", message))
                await anyio.sleep(self.wait_time)  # the kubelet's retry
                await self._pod_status(pod, _waiting(pod, "ContainerCreating", ""))
                await anyio.sleep(self.step)
            root = "org/something-else" if failure == WRONG_MODEL else pod.root
            pod.server = SimModelServer(
                pod.served or "unnamed",
                load_time=self.load_time,
                port=self.service_port,
                root=root,
                api_key=self.api_key,
            )
            await pod.server.start()
            self.started.append(pod.served or "")
            await self._pod_status(pod, _running(pod, ready=False))
            if failure == CRASH_LOOP:
                await anyio.sleep(self.step)
                await self._stop_server(pod)
                await self._pod_status(pod, _crash_loop(pod))
                return
            if failure == OOM_KILLED:
                await anyio.sleep(self.step)
                await self._stop_server(pod)
                await self._pod_status(pod, _running(pod, ready=False, oom=True))
                return
            if failure == PROGRESS_DEADLINE:
                await anyio.sleep(self.step)
                self._deadline_exceeded = pod.template_hash
                await self._write_status()
                return
            if failure == NEVER_READY:
                return
            if failure == READY_EARLY:
                pod.ready = True
                await self._pod_status(pod, _running(pod, ready=True))
                await self._write_status()
                return
            if not await pod.server.wait_ready():
                return
            pod.ready = True
            await self._pod_status(pod, _running(pod, ready=True))
            await self._write_status()

    # -- the Deployment's status ------------------------------------------------------------

    async def _write_status(self) -> None:
        async with self._lock:
            deployment = self._latest
            if deployment is None or self._http is None:
                return
            pod = self.pod
            template = deployment["spec"]["template"]
            thash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
            updated = int(pod is not None and pod.template_hash == thash)
            available = int(bool(updated and pod is not None and pod.ready))
            wanted = int(deployment["spec"].get("replicas", 1))
            complete = updated >= wanted and available >= wanted
            if self._deadline_exceeded == thash and not complete:
                progressing = {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": f'ReplicaSet "{self.deployment}-{thash[:8]}" has timed out '
                    "progressing.",
                }
            else:
                progressing = {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                    "message": f'ReplicaSet "{self.deployment}-{thash[:8]}" is progressing.',
                }
            status = {
                "observedGeneration": deployment["metadata"].get("generation", 1),
                "replicas": int(pod is not None),
                "updatedReplicas": updated,
                "readyReplicas": available,
                "availableReplicas": available,
                "unavailableReplicas": max(0, wanted - available),
                "conditions": [
                    {
                        "type": "Available",
                        "status": "True" if available >= 1 else "False",
                        "reason": "MinimumReplicasAvailable"
                        if available
                        else "MinimumReplicasUnavailable",
                    },
                    progressing,
                ],
            }
            if deployment.get("status") == status:
                return
            response = await self._http.patch(
                f"{self._deployments_url}/{self.deployment}/status",
                json={"status": status},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            if response.status_code == 200:
                self._latest = response.json()


def _container_status(pod: SimPod, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.10.1",
        "ready": False,
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
        **extra,
    }


def _scheduled(*conditions: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()},
        *conditions,
    ]


def _unschedulable(message: str | None = None) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message or UNSCHEDULABLE_MESSAGE,
                "lastTransitionTime": now_iso(),
            }
        ],
    }


def _waiting(pod: SimPod, reason: str, message: str) -> dict[str, Any]:
    waiting = {"reason": reason, **({"message": message} if message else {})}
    return {
        "phase": "Pending",
        "conditions": _scheduled(),
        "containerStatuses": [_container_status(pod, {"waiting": waiting})],
    }


def _running(pod: SimPod, *, ready: bool, oom: bool = False) -> dict[str, Any]:
    extra: dict[str, Any] = {"ready": ready}
    if oom:
        extra["restartCount"] = 1
        extra["lastState"] = {
            "terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": now_iso()}
        }
    return {
        "phase": "Running",
        "conditions": _scheduled(
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
        ),
        "containerStatuses": [
            _container_status(pod, {"running": {"startedAt": now_iso()}}, **extra)
        ],
    }


def _crash_loop(pod: SimPod) -> dict[str, Any]:
    return {
        "phase": "Running",
        "conditions": _scheduled({"type": "Ready", "status": "False"}),
        "containerStatuses": [
            _container_status(
                pod,
                {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off 10s restarting failed container=vllm pod={pod.name}",
                    }
                },
                restartCount=3,
                lastState={"terminated": {"exitCode": 1, "reason": "Error"}},
            )
        ],
    }


@dataclass
class Cluster:
    server: ApiServer
    api_client: Any
    api_url: str
    upstream: str
    sim: KubeletSim
    namespace: str
    deployment: str
    configmap: str

    def get_deployment(self) -> dict[str, Any]:
        obj = self.server.read(DEPLOYMENTS, self.namespace, self.deployment)
        assert obj is not None
        return obj

    def container(self, name: str | None = None) -> dict[str, Any]:
        """A container of the Deployment's pod template: `name`, else the simulated vLLM."""
        containers = self.get_deployment()["spec"]["template"]["spec"]["containers"]
        wanted = name or self.sim.container
        return dict(next(c for c in containers if c.get("name") == wanted))

    def args(self) -> list[str]:
        return list(self.container().get("args") or [])

    def replicas(self) -> int:
        return int(self.get_deployment()["spec"]["replicas"])

    def configmap_data(self) -> dict[str, str]:
        obj = self.server.read(CONFIGMAPS, self.namespace, self.configmap)
        assert obj is not None
        return dict(obj.get("data") or {})

    def model_status(self, name: str) -> dict[str, Any]:
        obj = self.server.read(VLLMMODELS, self.namespace, name)
        assert obj is not None
        return dict(obj.get("status") or {})

    def events(self) -> list[dict[str, Any]]:
        return self.server.items(kmock.resource("", "v1", "events"), self.namespace)

    def pods(self) -> list[dict[str, Any]]:
        return self.server.items(PODS, self.namespace)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds, re-checking on every change the API server stores,
        and every 50 ms for what is not a stored change (a request it answered, say)."""
        with anyio.fail_after(timeout):
            while not predicate():
                changed = anyio.Event()

                def wake(*_: object, changed: anyio.Event = changed) -> None:
                    changed.set()

                self.server.on_change.append(wake)
                try:
                    with anyio.move_on_after(0.05):
                        await changed.wait()
                finally:
                    self.server.on_change.remove(wake)

    def patch_deployment(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Someone else (an operator, another tool) changes the Deployment."""
        return self.server.merge(DEPLOYMENTS, self.namespace, self.deployment, patch)

    def add_model(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest = copy.deepcopy(manifest)
        manifest["metadata"]["namespace"] = self.namespace
        return self.server.store(VLLMMODELS, manifest)


@contextlib.asynccontextmanager
async def simulated_cluster(
    *,
    namespace: str = "ai-apps",
    deployment: str = "vllm",
    models: Iterable[dict[str, Any]] = (),
    args: Sequence[str] | None = None,
    replicas: int = 0,
    failures: Mapping[str, str] | None = None,
    load_time: float = 0.1,
    step: float = 0.01,
    wait_time: float = 0.5,
    linger: float = 0.0,
    command: Sequence[str] | None = None,
    container: str = "vllm",
    sidecars: Sequence[dict[str, Any]] = (),
    api_key: str | None = None,
) -> AsyncIterator[Cluster]:
    """An API server with the vLLM Deployment, its ConfigMap and `models`, plus a kubelet.

    The Deployment starts at `replicas` with `command` and `args` (default: a model named
    "initial" plus `BASE_ARGS`) in its container `container`, after `sidecars`. The pods'
    servers require `api_key` when given.
    """
    async with ApiServer() as server, kmock.Server(server) as http:
        api_url = f"http://127.0.0.1:{http.port}"
        if args is None:
            args = ["--model", "org/initial", "--served-model-name", "initial", *BASE_ARGS]
        server.store(
            DEPLOYMENTS,
            vllm_deployment(
                namespace,
                deployment,
                args=args,
                replicas=replicas,
                command=command,
                container=container,
                sidecars=sidecars,
            ),
        )
        server.store(
            CONFIGMAPS,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "vllm-config", "namespace": namespace},
                "data": {"UNRELATED": "kept"},
            },
        )
        for manifest in models:
            stored = copy.deepcopy(manifest)
            stored["metadata"]["namespace"] = namespace
            server.store(VLLMMODELS, stored)
        port = free_port()
        sim = KubeletSim(
            api_url,
            namespace,
            deployment,
            service_port=port,
            failures=failures,
            load_time=load_time,
            step=step,
            wait_time=wait_time,
            linger=linger,
            container=container,
            api_key=api_key,
        )
        configuration = k8s_client.Configuration(host=api_url)
        api_client = k8s_client.ApiClient(configuration)
        try:
            async with anyio.create_task_group() as tasks:
                await tasks.start(sim.run)
                yield Cluster(
                    server=server,
                    api_client=api_client,
                    api_url=api_url,
                    upstream=f"http://127.0.0.1:{port}",
                    sim=sim,
                    namespace=namespace,
                    deployment=deployment,
                    configmap="vllm-config",
                )
                tasks.cancel_scope.cancel()
        finally:
            server.drop_watches()  # the HTTP server waits for open handlers when it stops
            api_client.close()  # type: ignore[no-untyped-call]
