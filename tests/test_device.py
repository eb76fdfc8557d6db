"""Device selection against a fake `torch_npu` (the real one needs the CANN
toolkit and must never be installed in a dev or CI venv)."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import threading
import types

import pytest
import torch

from engine.model import device as devmod
from engine.model.device import NPU_ALLOC_ENV, Device, select_device


class FakeNpu:
    """Records what the engine asks of torch.npu, and from which thread."""

    def __init__(self, available: bool = True) -> None:
        self.available = available
        self.set_device_threads: list[str] = []
        self.compile_modes: list[dict] = []
        self.emptied = 0

    def is_available(self) -> bool:
        return self.available

    def set_device(self, index: int) -> None:
        self.set_device_threads.append(threading.current_thread().name)

    def set_compile_mode(self, **kwargs) -> None:
        self.compile_modes.append(kwargs)

    def empty_cache(self) -> None:
        self.emptied += 1

    def get_device_name(self, index: int = 0) -> str:
        return "Ascend910B3"


@pytest.fixture
def fake_npu(monkeypatch):
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    npu = FakeNpu()
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.delenv(NPU_ALLOC_ENV, raising=False)
    return npu


def test_auto_picks_npu_and_sets_it_up(fake_npu):
    dev = select_device("auto")
    assert dev.kind == "npu" and dev.dtype == torch.bfloat16
    import os
    assert os.environ[NPU_ALLOC_ENV] == "max_split_size_mb:256"
    assert fake_npu.compile_modes == [{"jit_compile": False}]
    assert "Ascend910B3" in dev.describe()


def test_user_allocator_setting_is_kept(fake_npu, monkeypatch):
    monkeypatch.setenv(NPU_ALLOC_ENV, "expandable_segments:True")
    select_device("npu")
    import os
    assert os.environ[NPU_ALLOC_ENV] == "expandable_segments:True"


def test_dtype_override_for_atlas_300i(fake_npu):
    assert select_device("npu", "float16").dtype == torch.float16


def test_worker_thread_binds_the_npu(fake_npu):
    """NPU contexts are per thread: the generation thread must call set_device itself."""
    from engine.core.engine_core import EngineCore

    text_config = types.SimpleNamespace(vocab_size=8)
    model = types.SimpleNamespace(
        generation_config=types.SimpleNamespace(eos_token_id=[2], pad_token_id=0),
        config=types.SimpleNamespace(get_text_config=lambda: text_config))
    runner = types.SimpleNamespace(model=model, device=Device("npu", 0, torch.bfloat16),
                                   kv=types.SimpleNamespace(rows=1), prepare=lambda: None)
    tok = types.SimpleNamespace(decode=lambda ids, **k: "")
    worker = EngineCore(runner, tok)
    try:
        for _ in range(200):
            if "engine-core" in fake_npu.set_device_threads:
                break
            threading.Event().wait(0.01)
        assert "engine-core" in fake_npu.set_device_threads
    finally:
        worker.close()


def test_empty_cache_on_npu(fake_npu):
    Device("npu", 0, torch.bfloat16).empty_cache()
    assert fake_npu.emptied == 1


def test_missing_torch_npu_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)   # "not installed"
    dev = select_device("auto")
    assert dev.kind == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RuntimeError, match="no usable Ascend NPU"):
        select_device("npu")


def test_broken_torch_npu_falls_back_with_warning(monkeypatch, tmp_path, caplog):
    """What an installed torch-npu without CANN does: the import itself fails."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delenv(NPU_ALLOC_ENV, raising=False)
    caplog.set_level(logging.WARNING, logger="engine.device")
    dev = select_device("auto")
    assert dev.kind in ("cuda", "cpu")
    assert any("libhccl.so" in r.getMessage() and "CANN" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("exc", ["OSError('driver missing')", "RuntimeError('init failed')"])
def test_torch_npu_raising_oserror_or_runtimeerror(monkeypatch, tmp_path, exc):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"raise {exc}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert devmod.import_torch_npu() is None
    assert select_device("auto").kind in ("cuda", "cpu")


def test_cpu_defaults_and_bad_names():
    dev = select_device("cpu")
    assert dev.kind == "cpu" and dev.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        select_device("cpu", "int3")
