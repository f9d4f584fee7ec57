"""Backends: how a model gets onto the GPUs."""

from .base import Backend, LoadedModel, LoadError, LostCallback, ProgressCallback

__all__ = ["Backend", "LoadError", "LoadedModel", "LostCallback", "ProgressCallback"]
