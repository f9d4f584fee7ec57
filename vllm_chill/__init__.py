"""vllm-chill: one OpenAI-compatible endpoint in front of many vLLM models.

Importing this package has no side effects (no network, no threads). Backends with heavy
dependencies (Kubernetes, processes, the simulator) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_chill._lazy import lazy_getattr
from vllm_chill._model import ModelValidationError, VLLMModel, load_manifests
from vllm_chill.backends import Backend, LoadedModel, LoadError
from vllm_chill.backends._fake import FakeBackend
from vllm_chill.http._upstream import UpstreamTransport
from vllm_chill.middleware import ModelSwitchMiddleware
from vllm_chill.registries import ModelRegistry, StaticRegistry
from vllm_chill.settings import Settings

if TYPE_CHECKING:
    from vllm_chill._envapp import EnvConfiguredApp
    from vllm_chill.backends.kubernetes import K8sDeploymentBackend
    from vllm_chill.backends.local import LocalProcessBackend
    from vllm_chill.backends.sim import SimBackend
    from vllm_chill.registries import CRDRegistry, FileRegistry

    app: EnvConfiguredApp

__version__ = "0.1.0"

__getattr__ = lazy_getattr(
    __name__,
    {
        "SimBackend": "vllm_chill.backends.sim",
        "LocalProcessBackend": "vllm_chill.backends.local",
        "K8sDeploymentBackend": "vllm_chill.backends.kubernetes",
        "CRDRegistry": "vllm_chill.registries",
        "FileRegistry": "vllm_chill.registries",
        "app": "vllm_chill._envapp",
    },
)

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
    "Settings",
    "SimBackend",
    "StaticRegistry",
    "UpstreamTransport",
    "VLLMModel",
    "app",
    "load_manifests",
]
