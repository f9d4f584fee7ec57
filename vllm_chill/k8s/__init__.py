"""Kubernetes: `VLLMModel` custom resources and the vLLM Deployment backend.

Importing this package imports the `kubernetes` client but does nothing else (no network,
no threads); everything starts in the objects' `start()`.
"""

from .api import ApiError, load_api_client, namespace_from_pod
from .backend import K8sDeploymentBackend, model_from_deployment
from .crd_registry import CRDRegistry
from .single import DeploymentModelRegistry

__all__ = [
    "ApiError",
    "CRDRegistry",
    "DeploymentModelRegistry",
    "K8sDeploymentBackend",
    "load_api_client",
    "model_from_deployment",
    "namespace_from_pod",
]
