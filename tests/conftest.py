from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL folder (engine/tiny.py), built once per test session."""
    from engine.tiny import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("tiny-cache"))
