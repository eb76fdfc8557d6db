"""The captured decode step without a GPU or an NPU: a fake `torch.npu`/`torch.cuda` graph
API whose graphs behave as real ones do. Capture records every operator with the tensors
it ran on; replay runs them again and writes each result into the tensor captured for it,
so, as with a real graph, only the static inputs' contents change between replays, any
host-side value read during capture stays frozen, and output tensors keep their memory.
A step that is not capturable (a shape or a host value taken from an input) gives wrong
tokens here, and the oracle test below fails."""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.backends.local as local
from engine.core.graphs import FallbackToEager, GraphedDecode, decode_step_for
from engine.core.runner import EagerDecode
from engine.model.device import Device
from support import tiny_engine_with

from tests.test_scheduler import Run, expected, request


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _write_into(captured, fresh) -> None:
    if isinstance(captured, torch.Tensor):
        if captured.untyped_storage().data_ptr() != fresh.untyped_storage().data_ptr():
            captured.copy_(fresh)       # a view or an in-place result already holds it
    elif isinstance(captured, (tuple, list)):
        for c, f in zip(captured, fresh):
            _write_into(c, f)


class FakeGraph:
    def __init__(self) -> None:
        self.ops: list = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        with torch.inference_mode():
            for func, args, kwargs, out in self.ops:
                _write_into(out, func(*args, **kwargs))


class FakeStream:
    def wait_stream(self, other) -> None:
        pass


class FakeGraphApi:
    """What engine.graphs asks of torch.cuda / torch.npu."""

    def __init__(self) -> None:
        self.captured: list[FakeGraph] = []
        self.NPUGraph = FakeGraph

    def graph_pool_handle(self):
        return object()

    def Stream(self):                     # noqa: N802  (torch's spelling)
        return FakeStream()

    def current_stream(self):
        return FakeStream()

    @contextlib.contextmanager
    def stream(self, s):
        yield

    @contextlib.contextmanager
    def graph(self, g: FakeGraph, pool=None):
        self.captured.append(g)
        with _Recorder(g.ops):
            yield

    def synchronize(self) -> None:
        pass


@pytest.fixture
def fake_api():
    return FakeGraphApi()


@pytest.fixture
def built_steps():
    """The decode steps the engine under test was given: the test's own objects."""
    return []


def engine_capturing_with(api, model_dir, monkeypatch, built_steps):
    """A tiny engine whose decode step is captured through `api` (a fake graph API)."""
    def captured(runner, enforce_eager, npu_graphs, max_batch, max_len):
        step = FallbackToEager(GraphedDecode(runner, api, max_batch, max_len),
                               EagerDecode(runner))
        built_steps.append(step)
        return step

    monkeypatch.setattr(local, "decode_step_for", captured)
    return tiny_engine_with(model_dir, max_model_len=1024, max_batch=4)


@pytest.fixture
def graphed_engine(tiny_model_dir, monkeypatch, fake_api, built_steps):
    eng = engine_capturing_with(fake_api, tiny_model_dir, monkeypatch, built_steps)
    yield eng
    eng.close()


def test_buckets_are_captured_before_serving(graphed_engine, built_steps, fake_api):
    [step] = built_steps
    graphed_engine.generate(request("Warm", max_tokens=2), timeout=60)
    assert step.captured and graphed_engine.snapshot().decode_captured
    assert step.graphed.batch_sizes == [1, 2, 4] and step.graphed.kv_lens == [512, 1024]
    assert len(fake_api.captured) == 6          # every (batch, KV length) pair, at start
    assert step.batch_size_for(3) == 4 and step.kv_len_for(513) == 1024


def test_captured_step_gives_generates_tokens_in_a_batch(graphed_engine, fake_api):
    reqs = [request("One", max_tokens=30), request("Two words", size=(224, 224), max_tokens=20),
            request("Three", max_tokens=25, repetition_penalty=1.2)]
    refs = [expected(graphed_engine, r) for r in reqs]
    first = Run(graphed_engine, reqs[0])
    first.wait_tokens(3)
    runs = [first] + [Run(graphed_engine, r) for r in reqs[1:]]
    assert [r.result() for r in runs] == refs
    replays = graphed_engine.snapshot().decode_replays
    assert replays >= 29                                  # every step after prefill
    assert sum(g.replays for g in fake_api.captured) == replays


def test_npu_graphs_only_behind_the_flag(monkeypatch, fake_api):
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", fake_api, raising=False)
    runner = types.SimpleNamespace(device=Device("npu", 0, torch.bfloat16))
    assert isinstance(decode_step_for(runner, False, False, 8, 4096), EagerDecode)  # by default
    step = decode_step_for(runner, False, True, 8, 4096)
    assert isinstance(step, FallbackToEager) and step.graphed.api is fake_api
    assert isinstance(decode_step_for(runner, True, True, 8, 4096), EagerDecode)  # --enforce-eager


def test_failed_capture_falls_back_to_eager(tiny_model_dir, monkeypatch, built_steps):
    """A capture that fails leaves the engine serving, eager, with the same answers."""
    class Broken:
        def graph_pool_handle(self):
            raise RuntimeError("capture is not supported here")

    eng = engine_capturing_with(Broken(), tiny_model_dir, monkeypatch, built_steps)
    try:
        req = request("Still here", max_tokens=12)
        assert Run(eng, req).result() == expected(eng, req)
        [step] = built_steps
        figures = eng.snapshot()
        assert not step.captured and step.batch_size_for(3) == 3
        assert figures.decode_captured is False and figures.decode_replays == 0
        assert figures.steps_run >= 11
    finally:
        eng.close()
