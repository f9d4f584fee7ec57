"""vllm-chill: one OpenAI-compatible endpoint in front of many vLLM models.

Importing this package has no side effects (no network, no threads). Backends with heavy
dependencies (Kubernetes, processes, the simulator) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .backends.base import Backend, LoadedModel, LoadError
from .backends.fake import FakeBackend
from .middleware import ModelSwitchMiddleware
from .model import ModelValidationError, VLLMModel, load_manifests
from .options import ProxyOptions
from .registry import ModelRegistry, StaticRegistry

if TYPE_CHECKING:
    from .backends.local import LocalProcessBackend
    from .backends.sim import SimBackend
    from .envapp import EnvConfiguredApp
    from .file_registry import FileRegistry
    from .k8s.backend import K8sDeploymentBackend
    from .k8s.crd_registry import CRDRegistry

    app: EnvConfiguredApp

__version__ = "0.1.0"

_LAZY = {
    "SimBackend": ("vllm_chill.backends.sim", "SimBackend"),
    "LocalProcessBackend": ("vllm_chill.backends.local", "LocalProcessBackend"),
    "K8sDeploymentBackend": ("vllm_chill.k8s.backend", "K8sDeploymentBackend"),
    "CRDRegistry": ("vllm_chill.k8s.crd_registry", "CRDRegistry"),
    "FileRegistry": ("vllm_chill.file_registry", "FileRegistry"),
    "app": ("vllm_chill.envapp", "app"),
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'vllm_chill' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


__all__ = [
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
    "ProxyOptions",
    "SimBackend",
    "StaticRegistry",
    "VLLMModel",
    "app",
    "load_manifests",
]
