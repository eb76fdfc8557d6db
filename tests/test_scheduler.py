"""The scheduler against its oracle: with greedy decoding every request's text equals
`model.generate` alone on the same inputs (through `generate_kwargs`, the translation
the old one-generate-per-batch worker used): alone, joining a running batch mid-way,
beside rows with other sampling settings, beside rows with pictures of other sizes, next
to rows that are cancelled or stop on a stop string, and with a chunked prefill. Seeded
sampling gives the same text alone and in a batch."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from engine.backends.local import LocalEngine
from support import tiny_engine_with
from engine.inputs.validation import generate_kwargs
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                          SamplingParams, TextDelta)


def request(text: str, *, size: tuple[int, int] | None = None, colour=(200, 40, 40),
            max_tokens: int = 24, **sampling) -> GenerationRequest:
    images = [ImageInput(Image.new("RGB", size, colour))] if size else []
    sampling.setdefault("temperature", 0)
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(Conversation([Message("user", text, images=images)]),
                             SamplingParams(max_tokens=max_tokens, **sampling))


def oracle(engine: LocalEngine, req: GenerationRequest) -> tuple[str, int]:
    """model.generate alone on the request's own inputs: (text, generated tokens)."""
    prompt = engine.render(req)
    model = engine.loaded.model
    kwargs = generate_kwargs(req.sampling, model.generation_config, prompt.max_new_tokens)
    with torch.inference_mode():
        out = model.generate(**prompt.inputs, **kwargs)
    new = out[0, prompt.inputs["input_ids"].shape[1]:].tolist()
    text = engine.tokenizer.decode(new, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    return text, len(new)


def expected(engine: LocalEngine, req: GenerationRequest) -> tuple[str, int]:
    """What the request must give: the oracle's, cut at a stop string, and without an
    unfinished UTF-8 character at the end (a stream never emits one, as vLLM's)."""
    text, tokens = oracle(engine, req)
    text = text.rstrip("\ufffd")
    hits = [i for i in (text.find(s) for s in req.sampling.stop) if i >= 0]
    return (text[:min(hits)] if hits else text), tokens


class Run:
    """A submitted request, its text collected on a thread as it streams."""

    def __init__(self, engine: LocalEngine, req: GenerationRequest) -> None:
        self.handle = engine.submit(req)
        self.text = ""
        self.finished: Finished | None = None
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        for event in self.handle.events(timeout=120):
            if isinstance(event, TextDelta):
                self.text += event.text
            elif isinstance(event, Finished):
                self.finished = event

    def wait_tokens(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.handle.tokens < n and self.finished is None:
            assert time.monotonic() < deadline, "no tokens came"
            time.sleep(0.002)

    def result(self) -> tuple[str, int]:
        self.thread.join(120)
        assert self.finished is not None, "the request never finished"
        assert self.finished.reason != "error", self.finished.error
        return self.text, self.finished.stats.output_tokens


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = tiny_engine_with(tiny_model_dir, max_model_len=4096)
    yield eng
    eng.close()


def test_alone_text_and_image_equal_generate(engine):
    for req in (request("Tell me a story."), request("What is this?", size=(224, 224)),
                request("Describe.", size=(300, 180), max_tokens=40)):
        assert Run(engine, req).result() == expected(engine, req)


def test_joining_mid_way_beside_other_settings_and_picture_sizes(engine):
    long = request("Write a long answer.", size=(448, 336), max_tokens=160)
    others = [request("Hi", max_tokens=20),
              request("What colour?", size=(224, 224), colour=(20, 20, 200), max_tokens=30),
              request("Penalised", max_tokens=30, repetition_penalty=1.3),
              request("At least", max_tokens=30, min_tokens=10, ignore_eos=False),
              request("Sampled", max_tokens=30, temperature=1.0, top_p=0.9, seed=7)]
    refs = [expected(engine, r) for r in [long] + others[:4]]
    seeded_alone = Run(engine, others[4]).result()
    first = Run(engine, long)
    first.wait_tokens(10)
    runs = []
    for req in others:                   # each joins a batch that is already decoding
        runs.append(Run(engine, req))
        runs[-1].wait_tokens(2)
    assert first.handle.tokens < 160, "the long answer ended before the others joined"
    assert [first.result()] + [r.result() for r in runs[:4]] == refs
    assert runs[4].result() == seeded_alone
    assert engine.snapshot().largest_batch >= 3


def test_cancelled_and_stopped_neighbours_leave_the_others_exact(engine):
    keep = request("Keep going", size=(224, 224), max_tokens=60)
    ref = expected(engine, keep)
    probe_text, _ = oracle(engine, request("Stop me", max_tokens=40))
    stop = probe_text[8:11] or "e"        # a string the greedy answer reaches
    stopped = request("Stop me", max_tokens=40, stop=[stop])
    stopped_ref = expected(engine, stopped)
    cancelled = Run(engine, request("Cancel me", max_tokens=400))
    kept = Run(engine, keep)
    stops = Run(engine, stopped)
    cancelled.wait_tokens(3)
    cancelled.handle.cancel()
    cancelled.thread.join(30)
    assert cancelled.finished.reason == "cancelled"
    assert cancelled.finished.stats.tokens_after_cancel <= 2     # stops within a step or two
    assert stops.result()[0] == stopped_ref[0] and stops.finished.reason == "stop"
    assert kept.result() == ref


def test_chunked_prefill_equals_generate(tiny_model_dir):
    eng = tiny_engine_with(tiny_model_dir, max_model_len=2048, max_num_batched_tokens=16)
    try:
        req = request("Look at this picture carefully.", size=(336, 224), max_tokens=20)
        running = Run(eng, request("Beside it", max_tokens=120))
        running.wait_tokens(2)
        assert Run(eng, req).result() == expected(eng, req)
        running.result()
    finally:
        eng.close()


def test_rows_are_freed_and_the_kv_store_empties(engine):
    runs = [Run(engine, request(f"Question {i}", max_tokens=8)) for i in range(12)]
    assert all(r.result()[1] == 8 for r in runs)      # more requests than rows: all served
    after = engine.snapshot()
    assert after.running == after.waiting == 0
    assert after.kv_free_rows == after.kv_rows and after.kv_usage == 0
