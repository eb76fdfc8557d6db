"""Picking the engine for a config without importing torch first: a UI in
front of a remote vLLM server needs no local model, and no torch."""

from __future__ import annotations

from .base import Engine
from .config import EngineConfig


def create_engine(config: EngineConfig) -> Engine:
    """The engine for a config: local unless a remote backend is configured."""
    if config.backend == "remote":
        from .backends.remote import RemoteEngine

        return RemoteEngine(config)
    from .backends.local import LocalEngine

    return LocalEngine.from_config(config)
