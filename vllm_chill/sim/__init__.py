"""A simulated vLLM OpenAI server: the sim backend's upstream, and the tests' and
benchmarks' stand-in for a GPU. `python -m vllm_chill.sim` runs one as a process."""

from .app import SimApp, SimRequest, SimStats
from .server import SimModelServer

__all__ = ["SimApp", "SimModelServer", "SimRequest", "SimStats"]
