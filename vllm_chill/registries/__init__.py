"""Registries: where the proxy learns which models exist and how to serve them.

`ModelRegistry` is the protocol; `StaticRegistry` holds a fixed list. `FileRegistry` (a folder
of `VLLMModel` manifests, reloaded on change), `CRDRegistry` (`VLLMModel` custom resources in a
namespace) and `DeploymentModelRegistry` (the model a vLLM Deployment already runs) are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_chill._lazy import lazy_getattr
from vllm_chill.registries._base import IndexedRegistry, ModelRegistry, StaticRegistry

if TYPE_CHECKING:
    from vllm_chill.registries._deployment import DeploymentModelRegistry
    from vllm_chill.registries._files import FileRegistry
    from vllm_chill.registries._kubernetes import CRDRegistry

__getattr__ = lazy_getattr(
    __name__,
    {
        "FileRegistry": "vllm_chill.registries._files",
        "CRDRegistry": "vllm_chill.registries._kubernetes",
        "DeploymentModelRegistry": "vllm_chill.registries._deployment",
    },
)

__all__ = [
    "CRDRegistry",
    "DeploymentModelRegistry",
    "FileRegistry",
    "IndexedRegistry",
    "ModelRegistry",
    "StaticRegistry",
]
