"""The Kubernetes backend: loads a model by rewriting a vLLM Deployment's args from its
`VLLMModel` resource and rolling the pod.

Importing this package imports the `kubernetes` client but does nothing else (no network,
no threads); everything starts in the backend's session.
"""

try:
    import kubernetes  # noqa: F401 - only to say what is missing, in one line
except ImportError:  # pragma: no cover - the test environment has the extra
    raise ImportError(
        "the Kubernetes backend needs the kubernetes client: pip install 'vllm-chill[kubernetes]'"
    ) from None

from vllm_chill.backends.kubernetes._api import ApiError, load_api_client, namespace_from_pod
from vllm_chill.backends.kubernetes._backend import K8sDeploymentBackend, model_from_deployment
from vllm_chill.backends.kubernetes._slots import K8sDeploymentsBackend

__all__ = [
    "ApiError",
    "K8sDeploymentBackend",
    "K8sDeploymentsBackend",
    "load_api_client",
    "model_from_deployment",
    "namespace_from_pod",
]
