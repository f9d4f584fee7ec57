"""The simulator: `SimBackend` starts a simulated vLLM OpenAI server per load, so that the
whole product runs with no GPU and no cluster. The same server is the tests' and benchmarks'
stand-in for a GPU; `python -m vllm_chill.backends.sim` runs one as a process."""

from vllm_chill.backends.sim._app import SimApp, SimRequest, SimStats
from vllm_chill.backends.sim._backend import SimBackend
from vllm_chill.backends.sim._server import SimModelServer

__all__ = ["SimApp", "SimBackend", "SimModelServer", "SimRequest", "SimStats"]
