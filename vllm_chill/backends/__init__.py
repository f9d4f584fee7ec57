"""Backends: how a model gets onto the GPUs (SPEC §1, §5-§7)."""

from .base import Backend, LoadedModel, LoadError, LostCallback, ProgressCallback

__all__ = ["Backend", "LoadError", "LoadedModel", "LostCallback", "ProgressCallback"]
