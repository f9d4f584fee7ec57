"""The kustomize tree in `manifests/`: every overlay must build, every object it renders must be
valid Kubernetes, and each overlay must be a working install.

`single` and `warm-pool` must render exactly the objects of the `kubectl apply -f` quick start
(the CRD, `manifests/examples/` and the example file), compared as parsed objects: the example
files keep their comments and stay the documented way in; this keeps the two from drifting.
`two-slots` must name both of its vLLM Deployments in the proxy's flags, with an upstream that
reaches each one's pods, and let the proxy patch both.

The overlays are rendered by `kubectl kustomize` (kubectl's built-in kustomize). Without kubectl
these tests are skipped, or fail where `CI` is set.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

import vllm_chill
from tests.test_manifests import CLUSTER_EXAMPLE, CRD_PATH, EXAMPLES, K8S_VERSIONS, ROOT
from tests.test_manifests import schema_errors as model_schema_errors
from vllm_chill._model import API_GROUP, API_VERSION, KIND, VLLMModel
from vllm_chill.settings import Settings, parse_settings

MANIFESTS = ROOT / "manifests"
OVERLAYS_DIR = MANIFESTS / "overlays"
WARM_POOL_EXAMPLE = ROOT / "examples" / "kubernetes-warm-pool.yaml"
#: kustomize reads this name; `kubectl apply -f DIR`, the file registry and test_manifests' scan
#: of *.yaml skip it, so every kustomization under manifests/ has it.
KUSTOMIZATION = "Kustomization"
#: The file extensions `kubectl apply -f DIR` reads.
APPLY_F_SUFFIXES = (".yaml", ".yml", ".json")
KUBECTL_TIMEOUT_S = 30

Obj = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace ("" when cluster-scoped), name
Call = tuple[str, str, str, str | None]  # verb, API group, resource, name (None: any)


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in MANIFESTS.rglob(KUSTOMIZATION))


OVERLAYS = sorted(path.parent.name for path in OVERLAYS_DIR.glob(f"*/{KUSTOMIZATION}"))


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl is not on PATH: the kustomize overlays cannot be rendered"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{message} (CI is set: install kubectl, it ships kustomize)")
        pytest.skip(message)
    return found


def kustomize(directory: Path) -> list[Obj]:
    try:
        done = subprocess.run(
            [kubectl(), "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"kubectl kustomize {directory} took over {KUBECTL_TIMEOUT_S}s")
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), directory
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Each overlay's objects, rendered once for the module (tests copy what they change)."""
    return {name: kustomize(OVERLAYS_DIR / name) for name in OVERLAYS}


def key(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def by_key(objs: Iterable[Obj]) -> dict[Key, Obj]:
    """The objects by kind, namespace and name; a name used twice is an error even when both
    objects are equal (kustomize refuses that too)."""
    out: dict[Key, Obj] = {}
    for obj in objs:
        assert key(obj) not in out, f"{key(obj)} twice"
        out[key(obj)] = obj
    return out


def applied_with_f(paths: Sequence[Path]) -> dict[Key, Obj]:
    """What `kubectl apply -f` of these files and folders creates: one object per key (a later
    one replaces an equal earlier one, as a second apply does; a different one is an error)."""
    out: dict[Key, Obj] = {}
    for path in paths:
        files = (
            sorted(p for p in path.iterdir() if p.suffix in APPLY_F_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        for file in files:
            for doc in yaml.safe_load_all(file.read_text()):
                if doc is None:
                    continue
                assert out.get(key(doc), doc) == doc, f"{file}: {key(doc)} differs from before"
                out[key(doc)] = doc
    return out


def assert_same_objects(got: Mapping[Key, Obj], want: Mapping[Key, Obj]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == want[k], k


def find(objs: Iterable[Obj], kind: str, name: str) -> Obj:
    [found] = [obj for obj in objs if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def containers(deployment: Mapping[str, Any]) -> list[Obj]:
    found: list[Obj] = deployment["spec"]["template"]["spec"]["containers"]
    return found


# -- the tree -------------------------------------------------------------------------------


def test_the_documented_overlays_exist() -> None:
    assert {"single", "two-slots", "warm-pool"} <= set(OVERLAYS)


def test_every_kustomization_is_named_without_an_extension() -> None:
    """A kustomization.yaml in manifests/examples/ would be applied by `kubectl apply -f` (and
    refused: no such kind on a server); anywhere under manifests/, test_manifests would take it
    for a Kubernetes object."""
    for name in ("kustomization.yaml", "kustomization.yml"):
        assert not list(MANIFESTS.rglob(name))
    assert MANIFESTS / "crds" in kustomization_dirs()
    assert EXAMPLES in kustomization_dirs()


def test_the_examples_kustomization_lists_every_model_file() -> None:
    """`kubectl apply -f manifests/examples/` applies every file there; the overlays must too."""
    listed = yaml.safe_load((EXAMPLES / KUSTOMIZATION).read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in EXAMPLES.glob("*.y*ml"))


@pytest.mark.parametrize(
    "directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(MANIFESTS))
)
def test_every_kustomization_builds(directory: Path) -> None:
    assert kustomize(directory)


# -- every overlay --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for obj in rendered[overlay]:
        if obj.get("apiVersion") == API_VERSION and obj.get("kind") == KIND:
            assert model_schema_errors(obj) == [], key(obj)
            VLLMModel.from_manifest(obj, source=f"{overlay}: {key(obj)}")
        else:
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{overlay}: {key(obj)} on Kubernetes {version}: {exc}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_two_objects_share_a_kind_and_name(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Kind, namespace and name, whatever the API version: kustomize keys by all four."""
    by_key(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_one_existing_namespace(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    used = {o["metadata"]["namespace"] for o in objs if "namespace" in o["metadata"]}
    assert namespaces == used == {"ai-apps"}
    cluster_scoped = {o["kind"] for o in objs if "namespace" not in o["metadata"]}
    assert cluster_scoped == {"Namespace", "CustomResourceDefinition"}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_and_each_service_reaches_one_deployment(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        # No Deployment's selector takes another one's pods.
        for other in deployments:
            if other is not deployment:
                labels = other["spec"]["template"]["metadata"]["labels"]
                assert not selects(deployment["spec"]["selector"]["matchLabels"], labels)
        account = pod["spec"].get("serviceAccountName")
        if account is not None:
            assert ("ServiceAccount", account) in names
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names
        for container in containers(deployment):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref is not None and not ref.get("optional"):
                    assert ("ConfigMap", ref["name"]) in names
    for service in (o for o in objs if o["kind"] == "Service"):
        reached = [
            d["metadata"]["name"]
            for d in deployments
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(reached) == 1, (service["metadata"]["name"], reached)
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in names
        for subject in binding["subjects"]:
            assert (subject["kind"], subject["name"]) in names


# -- the overlays are the apply -f quick start ----------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "example"),
    [("single", CLUSTER_EXAMPLE), ("warm-pool", WARM_POOL_EXAMPLE)],
    ids=["single", "warm-pool"],
)
def test_overlay_renders_the_objects_of_the_apply_f_quick_start(
    rendered: dict[str, list[Obj]], overlay: str, example: Path
) -> None:
    """kubectl apply -f manifests/crds/vllmmodel.yaml, -f manifests/examples/, -f <example>."""
    quick_start = applied_with_f([CRD_PATH, EXAMPLES, example])
    assert_same_objects(by_key(rendered[overlay]), quick_start)


# -- the proxy's flags, Services and RBAC ---------------------------------------------------


def proxy_settings(deployment: Mapping[str, Any], pod_namespace_file: Path) -> Settings | None:
    """The settings of a pod running `vllm-chill serve` (its command, or its image's entrypoint
    with args), as parsed in that pod; None for other pods."""
    [container] = containers(deployment)
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:1] == ["vllm-chill"]:
        argv = argv[1:]
    elif "command" in container or "vllm-chill" not in container["image"]:
        return None
    assert argv[:1] == ["serve"], argv
    pod_namespace_file.write_text(deployment["metadata"]["namespace"])
    return parse_settings(argv[1:], {}, pod_namespace_file=str(pod_namespace_file))


def proxies(objs: Iterable[Obj]) -> list[tuple[Obj, Settings]]:
    found = []
    with tempfile.TemporaryDirectory() as scratch:
        for obj in objs:
            if obj["kind"] != "Deployment":
                continue
            settings = proxy_settings(obj, Path(scratch) / "namespace")
            if settings is not None:
                found.append((obj, settings))
    return found


def allowed(
    objs: Sequence[Obj],
    deployment: Mapping[str, Any],
    verb: str,
    group: str,
    resource: str,
    name: str | None = None,
) -> bool:
    """Whether the pod's ServiceAccount may do this in its namespace, through a RoleBinding."""
    namespace = deployment["metadata"]["namespace"]
    account = deployment["spec"]["template"]["spec"].get("serviceAccountName", "default")
    for binding in objs:
        if binding["kind"] != "RoleBinding" or binding["metadata"]["namespace"] != namespace:
            continue
        if not any(
            (s["kind"], s["name"], s.get("namespace")) == ("ServiceAccount", account, namespace)
            for s in binding["subjects"]
        ):
            continue
        ref = binding["roleRef"]
        role = find(objs, ref["kind"], ref["name"])
        for rule in role.get("rules", []):
            names = rule.get("resourceNames")
            if (
                {group, "*"} & set(rule["apiGroups"])
                and {resource, "*"} & set(rule["resources"])
                and {verb, "*"} & set(rule["verbs"])
                and (not names or name in names)
            ):
                return True
    return False


def needs(settings: Settings) -> list[Call]:
    """The calls vllm-chill makes with these settings (README, "RBAC"): verb, group, resource,
    name (None: any, as list and watch need)."""
    out: list[Call] = []
    models: list[Call] = [(verb, API_GROUP, "vllmmodels", None) for verb in ("list", "watch")]
    if settings.backend != "kubernetes":
        return models if settings.registry == "kubernetes" else []
    k8s = settings.kubernetes
    for deployment in k8s.deployments:
        out += [(verb, "apps", "deployments", deployment) for verb in ("get", "patch")]
    out += [(verb, "apps", "deployments", None) for verb in ("list", "watch")]
    out += [(verb, "", "pods", None) for verb in ("list", "watch")]
    if k8s.configmap:
        out += [(verb, "", "configmaps", k8s.configmap) for verb in ("get", "patch")]
    if k8s.enable_model_switch and not settings.models:
        out += models
        out.append(("patch", API_GROUP, "vllmmodels/status", None))
    out += [(verb, "", "events", None) for verb in ("create", "list", "watch")]
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_proxy_may_make_its_calls_and_reaches_its_deployments(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    [(proxy, settings)] = proxies(objs)
    assert settings.kubernetes.namespace == proxy["metadata"]["namespace"]
    for call in needs(settings):
        assert allowed(objs, proxy, *call), (overlay, call)
    # Least privilege: nothing on a Deployment the proxy does not drive.
    others = [
        o["metadata"]["name"]
        for o in objs
        if o["kind"] == "Deployment"
        and o["metadata"]["name"] not in settings.kubernetes.deployments
    ]
    for other in others:
        assert not allowed(objs, proxy, "patch", "apps", "deployments", other), other
    if settings.backend != "kubernetes":
        return
    # Each Deployment's upstream is a Service of that Deployment's pods, on vLLM's port.
    assert len(settings.upstream.urls) == len(settings.kubernetes.deployments)
    for name, url in zip(settings.kubernetes.deployments, settings.upstream.urls, strict=True):
        parts = urlsplit(url)
        assert parts.hostname is not None
        host = parts.hostname.split(".")
        assert host[1:] in (
            [],
            [settings.kubernetes.namespace],
            [settings.kubernetes.namespace, "svc"],
        )
        service = find(objs, "Service", host[0])
        deployment = find(objs, "Deployment", name)
        assert selects(
            service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]
        )
        [port] = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
        [vllm] = containers(deployment)
        assert port["targetPort"] in {p["name"] for p in vllm["ports"]}


def gpus(deployment: Mapping[str, Any]) -> int:
    [container] = containers(deployment)
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def test_two_slots_drives_a_one_gpu_and_a_two_gpu_deployment(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["two-slots"]
    [(_, settings)] = proxies(objs)
    assert settings.kubernetes.deployments == ("vllm-1gpu", "vllm-2gpu")
    assert settings.upstream.urls == ("http://vllm-1gpu:8000", "http://vllm-2gpu:8000")
    assert settings.kubernetes.enable_model_switch
    assert settings.kubernetes.configmap is None  # refused with several Deployments
    assert gpus(find(objs, "Deployment", "vllm-1gpu")) == 1
    assert gpus(find(objs, "Deployment", "vllm-2gpu")) == 2
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "Service"} == {
        "vllm-1gpu",
        "vllm-2gpu",
        "vllm-chill",
    }
    assert not [o for o in objs if o["kind"] == "ConfigMap"]


def as_slot(deployment: Mapping[str, Any], name: str) -> Obj:
    """single's `vllm` Deployment as two-slots makes a slot of it: renamed, its pods labelled
    with the slot's name, its own cache claim, no ConfigMap."""
    slot = copy.deepcopy(dict(deployment))
    instance = {"app.kubernetes.io/instance": name}
    slot["metadata"]["name"] = name
    for labels in (
        slot["metadata"]["labels"],
        slot["spec"]["selector"]["matchLabels"],
        slot["spec"]["template"]["metadata"]["labels"],
    ):
        labels.update(instance)
    pod = slot["spec"]["template"]["spec"]
    del pod["containers"][0]["envFrom"]
    [cache] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    claim = cache["persistentVolumeClaim"]
    claim["claimName"] += name.removeprefix("vllm")
    return slot


def test_two_slots_differs_from_single_only_where_its_patches_say(
    rendered: dict[str, list[Obj]],
) -> None:
    """Strategy, probes, volumes, tolerations...: each slot is single's vLLM Deployment."""
    single, two = by_key(rendered["single"]), by_key(rendered["two-slots"])
    vllm = single["Deployment", "ai-apps", "vllm"]
    for name, count in (("vllm-1gpu", 1), ("vllm-2gpu", 2)):
        want = as_slot(vllm, name)
        containers(want)[0]["resources"]["limits"]["nvidia.com/gpu"] = count
        assert two["Deployment", "ai-apps", name] == want, name
    changed = {
        ("Deployment", "ai-apps", "vllm-chill"),  # its flags
        ("Role", "ai-apps", "vllm-chill"),  # its Deployments, no ConfigMap
    }
    shared = set(single) & set(two)
    assert changed <= shared
    for k in shared - changed:
        assert single[k] == two[k], k
    proxy = copy.deepcopy(two["Deployment", "ai-apps", "vllm-chill"])
    containers(proxy)[0]["args"] = containers(single["Deployment", "ai-apps", "vllm-chill"])[0][
        "args"
    ]
    assert proxy == single["Deployment", "ai-apps", "vllm-chill"]


# -- the README's own overlay ---------------------------------------------------------------


def readme_overlay() -> str:
    readme = (ROOT / "README.md").read_text()
    [block] = re.findall(r"```yaml\n(# my-overlay/kustomization\.yaml.*?)```", readme, re.S)
    return str(block)


def test_the_readme_overlay_moves_everything_to_its_namespace(tmp_path: Path) -> None:
    """Namespace, image and GPUs changed as the README shows: nothing is left in ai-apps (the
    proxy's --namespace included) and the result is still valid."""
    (tmp_path / "vllm-chill").symlink_to(ROOT)  # the checkout beside the overlay
    overlay = tmp_path / "my-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(readme_overlay())
    objs = kustomize(overlay)
    assert "ai-apps" not in yaml.safe_dump_all(objs)
    [(proxy, settings)] = proxies(objs)
    assert settings.kubernetes.namespace == "team-a"
    assert (
        containers(proxy)[0]["image"] == f"registry.example.com/vllm-chill:{vllm_chill.__version__}"
    )
    assert gpus(find(objs, "Deployment", "vllm")) == 2
    for call in needs(settings):
        assert allowed(objs, proxy, *call), call
    for obj in objs:
        if obj["kind"] != KIND:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
