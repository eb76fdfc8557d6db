"""Model resolution: auto, tiny, local folders, hub and ModelScope ids, without a network."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from engine.model import loader
from engine.config import DEFAULT_MODEL, EngineConfig, add_engine_args
from engine.model.device import Device
from engine.errors import ModelLoadError

CPU = Device("cpu")
GPU = Device("cuda", 0, torch.bfloat16)


@pytest.fixture(autouse=True)
def tiny_cache(monkeypatch, tiny_model_dir):
    monkeypatch.setattr("engine.tiny.ensure_tiny", lambda cache_dir=None: tiny_model_dir)


def test_auto_on_cpu_serves_tiny_with_warning(caplog):
    caplog.set_level(logging.WARNING, logger="engine.loader")
    name, path, tiny = loader.resolve_model("auto", CPU)
    assert tiny and name == "tiny" and (path / "config.json").is_file()
    assert any("TINY Qwen2.5-VL" in r.getMessage() and DEFAULT_MODEL in r.getMessage()
               for r in caplog.records)


def test_auto_on_gpu_uses_cached_7b(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "_hub_cached", lambda repo: tmp_path if repo == DEFAULT_MODEL else None)
    assert loader.resolve_model("auto", GPU) == (DEFAULT_MODEL, tmp_path, False)


def test_auto_on_gpu_falls_back_to_tiny_when_download_fails(monkeypatch, caplog):
    monkeypatch.setattr(loader, "_hub_cached", lambda repo: None)

    def offline(*a, **k):
        raise ModelLoadError("Cannot load model: the download failed (offline)")

    monkeypatch.setattr(loader, "download", offline)
    caplog.set_level(logging.WARNING, logger="engine.loader")
    name, _, tiny = loader.resolve_model("auto", GPU)
    assert tiny and name == "tiny"
    assert any("download failed" in r.getMessage() for r in caplog.records)


def test_named_hub_model_downloads_with_chosen_source(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(loader, "_hub_cached", lambda repo: None)
    monkeypatch.setattr(loader, "download",
                        lambda repo, ms, rev=None: calls.append((repo, ms)) or tmp_path)
    assert loader.resolve_model("Qwen/Qwen2.5-VL-3B-Instruct", GPU, modelscope=True)[1] == tmp_path
    assert calls == [("Qwen/Qwen2.5-VL-3B-Instruct", True)]


def test_hub_download_failure_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def fail(*a, **k):
        raise OSError("We couldn't connect to the hub.\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelLoadError, match=r"Cannot load model 'Org/Missing'.*couldn't connect") as info:
        loader.download("Org/Missing", modelscope=False)
    assert "\n" not in info.value.message


def test_modelscope_without_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_modelscope(name, *a, **k):
        if name == "modelscope":
            raise ImportError("No module named 'modelscope'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_modelscope)
    with pytest.raises(ModelLoadError, match="pip install modelscope"):
        loader.download(DEFAULT_MODEL, modelscope=True)


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        loader.resolve_model(str(tmp_path / "missing"), CPU)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        loader.resolve_model(str(tmp_path), CPU)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="Cannot load model"):
        loader.load_model(EngineConfig(model=str(tmp_path)), CPU)


def test_local_tiny_folder_is_recognised(tiny_model_dir):
    loaded = loader.load_model(EngineConfig(model=str(tiny_model_dir)), CPU)
    assert loaded.is_tiny and type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Qwen2_5_VLProcessor"
    assert loaded.processor.tokenizer.padding_side == "left"


def test_modelscope_env_var_sets_the_flag(monkeypatch):
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "True")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args([]).modelscope is True
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args([]).modelscope is False
