"""Backends: how a model gets onto the GPUs.

`Backend` is the protocol the scheduler drives. The three shipped backends are imported on
first use: `SimBackend` (a simulated vLLM per load, no GPU), `LocalProcessBackend` (`vllm serve`
as a child process) and `K8sDeploymentBackend` (rolls a vLLM Deployment; needs the `kubernetes`
extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_chill._lazy import lazy_getattr
from vllm_chill.backends._base import (
    Backend,
    LoadedModel,
    LoadError,
    LostCallback,
    ProgressCallback,
    SleepingBackend,
)

if TYPE_CHECKING:
    from vllm_chill.backends.kubernetes import K8sDeploymentBackend
    from vllm_chill.backends.local import LocalProcessBackend
    from vllm_chill.backends.sim import SimBackend

__getattr__ = lazy_getattr(
    __name__,
    {
        "SimBackend": "vllm_chill.backends.sim",
        "LocalProcessBackend": "vllm_chill.backends.local",
        "K8sDeploymentBackend": "vllm_chill.backends.kubernetes",
    },
)

__all__ = [
    "Backend",
    "K8sDeploymentBackend",
    "LoadError",
    "LoadedModel",
    "LocalProcessBackend",
    "LostCallback",
    "ProgressCallback",
    "SimBackend",
    "SleepingBackend",
]
