"""The public API is what `__all__` says, and changes to it are deliberate.

Every exported name resolves (the lazily imported ones too); every module that is not part of
the API has a private name, so that `from vllm_chill.x import y` in a user's code means `x` is
public; and importing the package pulls in none of the heavy optional parts.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import vllm_chill

#: The public packages and modules, and exactly what each exports.
PUBLIC: dict[str, set[str]] = {
    "vllm_chill": {
        "Backend",
        "CRDRegistry",
        "FakeBackend",
        "FileRegistry",
        "K8sDeploymentBackend",
        "LoadError",
        "LoadedModel",
        "LocalProcessBackend",
        "ModelRegistry",
        "ModelSwitchMiddleware",
        "ModelValidationError",
        "Settings",
        "SimBackend",
        "StaticRegistry",
        "UpstreamTransport",
        "VLLMModel",
        "app",
        "load_manifests",
    },
    "vllm_chill.backends": {
        "Backend",
        "K8sDeploymentBackend",
        "LoadError",
        "LoadedModel",
        "LocalProcessBackend",
        "LostCallback",
        "ProgressCallback",
        "SimBackend",
        "SleepingBackend",
    },
    "vllm_chill.backends.kubernetes": {
        "ApiError",
        "K8sDeploymentBackend",
        "K8sDeploymentsBackend",
        "load_api_client",
        "model_from_deployment",
        "namespace_from_pod",
    },
    "vllm_chill.backends.local": {"CommandTemplate", "LocalProcessBackend"},
    "vllm_chill.backends.sim": {"SimApp", "SimBackend", "SimModelServer", "SimRequest", "SimStats"},
    "vllm_chill.registries": {
        "CRDRegistry",
        "DeploymentModelRegistry",
        "FileRegistry",
        "IndexedRegistry",
        "ModelRegistry",
        "StaticRegistry",
    },
    "vllm_chill.settings": {
        "OPTIONS",
        "BackendName",
        "KubernetesSettings",
        "LimitsSettings",
        "LocalSettings",
        "LoggingSettings",
        "Option",
        "Parser",
        "SecuritySettings",
        "ServerSettings",
        "Settings",
        "SettingsError",
        "SimSettings",
        "SleepSettings",
        "SwitchingSettings",
        "UpstreamSettings",
        "add_serve_arguments",
        "env_name",
        "one_line",
        "parse_duration",
        "parse_settings",
        "parse_size",
        "serve_parser",
        "settings_from_namespace",
    },
    "vllm_chill.testing": {"ASGIUpstream", "FakeBackend"},
}

#: Modules with public names but no `__all__` of their own: entry points and internal
#: packages whose contents are private modules.
PUBLIC_WITHOUT_ALL = {
    "vllm_chill.__main__",
    "vllm_chill.admin",
    "vllm_chill.backends.sim.__main__",
    "vllm_chill.cli",
    "vllm_chill.http",
    "vllm_chill.middleware",
    "vllm_chill.observability",
    "vllm_chill.scheduler",
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_each_public_module_exports_exactly_its_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert set(module.__all__) == PUBLIC[module_name]
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_every_other_module_has_a_private_name() -> None:
    modules = {
        info.name
        for info in pkgutil.walk_packages(vllm_chill.__path__, "vllm_chill.")
        if not any(part.startswith("_") and part != "__main__" for part in info.name.split("."))
    }
    assert modules | {"vllm_chill"} == set(PUBLIC) | PUBLIC_WITHOUT_ALL


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        vllm_chill.Nope


def test_importing_the_package_loads_no_backend_and_no_kubernetes_client() -> None:
    probe = "import json, sys, vllm_chill; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )
    protocols = {"vllm_chill.backends._base", "vllm_chill.backends._fake"}
    heavy = [
        name
        for name in loaded
        if name.split(".")[0] == "kubernetes"
        or (name.startswith("vllm_chill.backends.") and name not in protocols)
        or (name.startswith("vllm_chill.registries._") and name != "vllm_chill.registries._base")
    ]
    assert heavy == []


def test_the_kubernetes_backend_without_its_extra_is_a_one_line_error() -> None:
    """`pip install vllm-chill` leaves the kubernetes client out; asking for the backend says
    how to get it, in one line, with the usage-error status."""
    run_cli_without_kubernetes = (
        "import sys; sys.modules['kubernetes'] = None;"
        "from vllm_chill.cli import main;"
        "sys.argv = ['vllm-chill', 'serve', '--backend', 'kubernetes', '--deployment', 'vllm'];"
        "sys.exit(main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", run_cli_without_kubernetes],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vllm-chill serve: error: argument --backend: the Kubernetes backend needs the "
        "kubernetes client: pip install 'vllm-chill[kubernetes]'"
    ]
