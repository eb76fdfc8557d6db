from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in tiny Qwen2.5-VL folder (engine/tiny.py, trained weights), built once per
    test session."""
    from engine.tiny import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory):
    """The tiny model with its random initial weights (`python -m engine.tiny DIR --random`):
    long, prompt-dependent answers, for tests of stopping, cancelling and queueing (the
    trained model ends its short answers at once)."""
    from engine.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-random") / "tiny-random", trained=False)


@pytest.fixture(scope="session")
def random_engine(tiny_random_model_dir):
    """A LocalEngine on the random tiny build, whose processor keeps the real model's bounds
    (the trained one caps pictures at 100 tokens): for token counts and vLLM's rendering."""
    from engine.config import EngineConfig
    from engine.backends.local import LocalEngine

    engine = LocalEngine.from_config(EngineConfig(model=str(tiny_random_model_dir), device="cpu",
                                                  warmup=False))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """A LocalEngine on the tiny model (CPU), shared by the engine tests."""
    from engine.config import EngineConfig
    from engine.backends.local import LocalEngine

    engine = LocalEngine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu",
                                                  warmup=False))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def app_factory(tiny_engine):
    """`make(*flags)`: the web app's FastAPI app for app.py's flags, on the shared engine."""
    import app

    def make(*flags: str):
        args = app.build_parser().parse_args(list(flags))
        return app.create_app(tiny_engine, args)[0]
    return make
