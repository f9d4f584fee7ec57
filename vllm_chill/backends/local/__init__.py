"""The local backend: one `vllm serve` (or any command) as a supervised child process, on one
machine."""

from vllm_chill.backends.local._backend import LocalProcessBackend
from vllm_chill.backends.local._command import CommandTemplate

__all__ = ["CommandTemplate", "LocalProcessBackend"]
