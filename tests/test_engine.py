"""Engine behaviour on the tiny model: prompt rendering, streaming, cancel,
faults, limits and sampling fields."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from engine.config import EngineConfig
from engine.errors import EngineBusyError, InvalidRequestError
from engine.backends.local import LocalEngine
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                          RequestStats, SamplingParams, TextDelta)

ASSET = "assets/chart.png"


def ask(text: str = "Describe this image.", images=(), **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0)
    return GenerationRequest(Conversation([Message("user", text, [ImageInput(i) for i in images])]),
                             SamplingParams(**sampling))


def image_pad_count(engine: LocalEngine, prompt_ids) -> int:
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return int((prompt_ids == pad).sum())


class RecordingProcessor:
    """A model's processor that records each call (the calling thread's name, the pixel
    values it returns) and otherwise is the processor: an engine built on it shows what
    its prompt renderer did, with nothing of the engine patched."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.threads: list[str] = []
        self.pixels: list = []          # weak references to each call's pixel values

    def __call__(self, *args, **kwargs):
        import weakref

        self.threads.append(threading.current_thread().name)
        out = self.inner(*args, **kwargs)
        if "pixel_values" in out:
            self.pixels.append(weakref.ref(out["pixel_values"]))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def engine_recording_processor(engine: LocalEngine, **config) -> tuple[LocalEngine,
                                                                       RecordingProcessor]:
    """A second engine on `engine`'s model whose processor records its calls."""
    import dataclasses

    recording = RecordingProcessor(engine.loaded.processor)
    loaded = dataclasses.replace(engine.loaded, processor=recording)
    return LocalEngine(loaded, EngineConfig(log_stats_interval=0, **config)), recording


@pytest.mark.parametrize("size,min_px,max_px,expected", [
    ((448, 448), 224 * 224, 1280 * 28 * 28, 256),      # 448/28 = 16 -> 16*16
    ((640, 480), 224 * 224, 1280 * 28 * 28, 391),      # REFERENCE.md: 640x480 -> 391
    ((1920, 1080), 224 * 224, 1280 * 28 * 28, 1222),   # floor(1080/b/28)*floor(1920/b/28), b=1.44
    ((448, 448), 224 * 224, 256 * 28 * 28, 256),
    ((448, 448), 224 * 224, 64 * 28 * 28, 64),         # max_pixels shrinks it
    ((56, 56), 224 * 224, 1280 * 28 * 28, 64),         # min_pixels grows it to 224x224
])
def test_image_placeholder_count(random_engine, size, min_px, max_px, expected):
    img = Image.new("RGB", size, (200, 30, 30))
    req = GenerationRequest(Conversation([Message("user", "What is this?", [ImageInput(img)])]),
                            min_pixels=min_px, max_pixels=max_px)
    prepared = random_engine.render(req)
    n = image_pad_count(random_engine, prepared.inputs["input_ids"])
    assert n == expected
    grid = prepared.inputs["image_grid_thw"][0]
    assert n == int(grid.prod()) // 4
    assert n * 28 * 28 <= max_px and n * 28 * 28 >= min(min_px, max_px) * 0.5


def test_per_image_pixels_override(random_engine):
    img = Image.new("RGB", (448, 448))
    req = GenerationRequest(Conversation([Message("user", "x", [
        ImageInput(img), ImageInput(img, max_pixels=64 * 28 * 28)])]))
    prepared = random_engine.render(req)
    assert image_pad_count(random_engine, prepared.inputs["input_ids"]) == 256 + 64


def test_multi_turn_keeps_earlier_images(tiny_engine):
    conv = Conversation([
        Message("user", "What is in the chart?", [ImageInput(ASSET)]),
        Message("assistant", "A bar chart."),
        Message("user", "And this receipt?", [ImageInput("assets/receipt.png")]),
        Message("assistant", "A receipt."),
        Message("user", "Compare the two."),
    ], system="Be brief.")
    prepared = tiny_engine.render(GenerationRequest(conv))
    assert prepared.images == 2
    assert prepared.prompt_text.count("<|vision_start|>") == 2
    assert prepared.prompt_text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prepared.prompt_text.count("<|im_start|>assistant") == 3
    assert prepared.inputs["image_grid_thw"].shape[0] == 2


def test_streamed_deltas_equal_bare_generate(tiny_engine):
    req = ask(images=[ASSET], max_tokens=48, ignore_eos=True)
    prepared = tiny_engine.render(req)
    handle = tiny_engine.submit(req)
    deltas = [e for e in handle if isinstance(e, TextDelta)]
    fin = handle.finished
    assert fin.reason == "length" and fin.stats.output_tokens == 48
    assert all(d.text for d in deltas)

    model, tok = tiny_engine.loaded.model, tiny_engine.tokenizer
    with torch.inference_mode():
        out = model.generate(**prepared.inputs, max_new_tokens=48, do_sample=False,
                             eos_token_id=None, min_new_tokens=48)
    new = out[0, prepared.inputs["input_ids"].shape[1]:]
    bare = tok.decode(new, skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == bare
    assert len(deltas) > 1   # it really streamed


def test_stats_and_log_line(random_engine, caplog):
    caplog.set_level("INFO", logger="engine.requests")
    req = ask(images=[ASSET], max_tokens=8, ignore_eos=True)
    text, fin = random_engine.generate(req)
    s = fin.stats
    assert s.prompt_tokens > 256 and s.images == 1 and s.output_tokens == 8
    assert s.ttft_s is not None and 0 < s.ttft_s <= s.total_s
    assert s.input_tps > 0 and s.output_tps > 0
    line = next(r.getMessage() for r in caplog.records if req.request_id in r.getMessage())
    for field in ("prompt_tokens=", "images=1", "ttft=", "tokens/s=", "finish=length"):
        assert field in line


def test_cancel_stops_within_a_few_tokens_and_next_runs(tiny_engine):
    req = ask(max_tokens=4000, ignore_eos=True)
    handle = tiny_engine.submit(req)
    seen = 0
    for event in handle:
        if isinstance(event, TextDelta):
            seen += 1
            if seen == 3:
                handle.cancel()
    fin = handle.finished
    assert fin.reason == "cancelled"
    # counted on the device thread from the moment of the cancel (deltas can merge tokens)
    assert handle.tokens_at_cancel is not None and handle.tokens_at_cancel >= 3
    assert fin.stats.tokens_after_cancel is not None and fin.stats.tokens_after_cancel <= 3, \
        fin.stats
    assert fin.stats.output_tokens == handle.tokens_at_cancel + fin.stats.tokens_after_cancel
    text, fin2 = tiny_engine.generate(ask(max_tokens=5, ignore_eos=True))
    assert fin2.reason == "length" and fin2.stats.output_tokens == 5


def test_cancel_while_queued(tiny_engine):
    blocker = tiny_engine.submit(ask(max_tokens=4000, ignore_eos=True, top_k=3))
    queued = tiny_engine.submit(ask(max_tokens=5, seed=1))     # seeded: never batched
    queued.cancel()
    _, fin = queued.collect(timeout=30)
    assert fin.reason == "cancelled" and fin.stats.output_tokens == 0
    blocker.cancel()
    assert blocker.collect(timeout=30)[1].reason == "cancelled"


def test_exception_in_a_step_is_an_error_and_worker_survives(tiny_engine, monkeypatch):
    model = tiny_engine.loaded.model.model.language_model    # what every step runs
    real = model.forward
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        raise RuntimeError("injected fault")

    monkeypatch.setattr(model, "forward", boom)
    _, fin = tiny_engine.generate(ask(max_tokens=5), timeout=30)
    assert fin.reason == "error" and "injected fault" in fin.error.message
    monkeypatch.setattr(model, "forward", real)
    _, fin = tiny_engine.generate(ask(max_tokens=5, ignore_eos=True), timeout=30)
    assert fin.reason == "length" and calls["n"] == 1


def test_out_of_memory_frees_cache(tiny_engine, monkeypatch):
    freed = []
    monkeypatch.setattr(tiny_engine.device, "empty_cache", lambda: freed.append(1))
    monkeypatch.setattr(tiny_engine.loaded.model.model.language_model, "forward",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("NPU out of memory")))
    _, fin = tiny_engine.generate(ask(max_tokens=5), timeout=30)
    assert fin.reason == "error" and "ran out of memory" in fin.error.message
    assert freed == [1]


def test_busy_when_queue_full(tiny_engine):
    small = LocalEngine(tiny_engine.loaded, EngineConfig(max_queue=1, max_batch=1))
    try:
        running = small.submit(ask(max_tokens=4000, ignore_eos=True))
        deadline = time.monotonic() + 10
        while small.snapshot().running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = small.submit(ask(max_tokens=4))
        with pytest.raises(EngineBusyError, match="busy"):
            small.submit(ask(max_tokens=4))
        assert small.queue_position(waiting.request_id) == 1
        running.cancel()
        assert waiting.collect(timeout=30)[1].reason in ("stop", "length")
    finally:
        small.close()


def test_sampling_fields(tiny_engine):
    # ignore_eos + max_tokens gives exactly that many tokens
    _, fin = tiny_engine.generate(ask(max_tokens=17, ignore_eos=True))
    assert fin.stats.output_tokens == 17 and fin.reason == "length"
    # seed makes sampling repeatable
    a, _ = tiny_engine.generate(ask(max_tokens=20, temperature=1.5, top_k=50, top_p=1.0, seed=7))
    b, _ = tiny_engine.generate(ask(max_tokens=20, temperature=1.5, top_k=50, top_p=1.0, seed=7))
    assert a == b
    # a stop string cuts the answer before it, and is not included
    full, _ = tiny_engine.generate(ask(max_tokens=40, ignore_eos=True))
    stop = full[10:13]
    cut, fin = tiny_engine.generate(ask(max_tokens=40, ignore_eos=True, stop=[stop]))
    assert fin.reason == "stop" and cut == full[:full.index(stop)]


def test_ignore_eos_generates_past_a_forced_eos(tiny_engine, monkeypatch):
    """A model that wants to end at once still yields max_tokens tokens with ignore_eos."""
    eos = tiny_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = tiny_engine.loaded.model.lm_head               # the logits of every step
    real = head.forward

    def always_eos(*a, **k):
        logits = real(*a, **k)
        logits[..., :] = -1e9
        logits[..., eos] = 0
        return logits

    monkeypatch.setattr(head, "forward", always_eos)
    _, fin = tiny_engine.generate(ask(max_tokens=9, ignore_eos=True))
    assert fin.reason == "length" and fin.stats.output_tokens == 9
    _, fin = tiny_engine.generate(ask(max_tokens=9))
    assert fin.reason == "stop" and fin.stats.output_tokens == 1


def test_min_tokens_suppresses_eos(tiny_engine):
    _, fin = tiny_engine.generate(ask(max_tokens=30, min_tokens=30))
    assert fin.stats.output_tokens == 30


@pytest.mark.parametrize("sampling,message", [
    ({"temperature": -1.0}, "temperature must be non-negative, got -1.0."),
    ({"top_p": 2.0}, "top_p must be in (0, 1], got 2.0."),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
    ({"max_tokens": 10**9}, "cannot be greater than max_model_len=16384"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens must be less than or equal"),
])
def test_invalid_sampling(tiny_engine, sampling, message):
    with pytest.raises(InvalidRequestError) as info:
        tiny_engine.submit(ask(**sampling))
    assert message in info.value.message and info.value.code == 400


def test_limits_fire_before_the_device(tiny_engine, tmp_path, monkeypatch):
    generated = []
    monkeypatch.setattr(tiny_engine.loaded.model, "generate", lambda *a, **k: generated.append(1))
    text_png = tmp_path / "notes.png"
    text_png.write_text("this is not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(open(ASSET, "rb").read()[:2000])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    cases = [
        (ask(images=[ASSET] * 11), "At most 10 image(s) may be provided in one prompt."),
        (ask("   "), "The message is empty"),
        (ask(images=[str(text_png)]), "is not a readable image"),
        (ask(images=[str(truncated)]), "truncated or corrupt"),
        (ask(images=[str(bomb)]), "too large"),
        (ask(images=[str(tmp_path / "missing.png")]), "File not found"),
        (ask(images=["ftp://example.invalid/x.png"]), "Unsupported URL scheme 'ftp'"),
        (ask(images=["data:image/png;base64,@@@"]), "Invalid base64"),
    ]
    for req, message in cases:
        with pytest.raises(InvalidRequestError) as info:
            tiny_engine.submit(req)
        assert message in info.value.message, info.value.message
        assert "\n" not in info.value.message
    assert generated == []


def test_context_length_limit_in_vllm_words(tiny_engine):
    small = LocalEngine(tiny_engine.loaded, EngineConfig(max_model_len=300))
    try:
        with pytest.raises(InvalidRequestError, match=r"This model's maximum context length is 300 "
                           r"tokens\. However, your prompt contains at least \d+ input tokens"):
            small.submit(ask("word " * 400))
        with pytest.raises(InvalidRequestError, match=r"maximum context length is 300 tokens\. "
                           r"However, you requested \d+ tokens \(\d+ in the messages, 290 in the "
                           r"completion\)"):
            small.submit(ask("hello there", max_tokens=290))
        _, fin = small.generate(ask("hello", max_tokens=5, ignore_eos=True))
        assert fin.reason == "length"
        # cap_to_context (the API's choice, as vLLM 0.32): lowered to what fits beside the prompt
        req = ask("hello there", max_tokens=290, ignore_eos=True, cap_to_context=True)
        prompt_tokens = small.render(req).prompt_tokens
        _, fin = small.generate(req)
        assert fin.reason == "length" and fin.stats.output_tokens == 300 - prompt_tokens
    finally:
        small.close()


def test_no_empty_deltas_and_one_finished(tiny_engine):
    events = list(tiny_engine.submit(ask(images=[ASSET], max_tokens=30)))
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    # a delta may carry only token ids (an EOS, whose text is not shown), never nothing
    assert all(e.text or e.token_ids for e in events if isinstance(e, TextDelta))


def test_concurrent_requests_all_complete(tiny_engine):
    results = {}

    def run(i):
        results[i] = tiny_engine.generate(ask(f"question {i}", max_tokens=12, ignore_eos=True),
                                          timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    assert all(fin.reason == "length" and fin.stats.output_tokens == 12
               for _, fin in results.values())


def write_video(path, frames: int = 12) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), i * 20, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_input_and_fake_video(tiny_engine, tmp_path):
    from engine.types import VideoInput

    clip = tmp_path / "clip.mp4"
    write_video(clip)
    req = GenerationRequest(Conversation([Message("user", "What happens?", videos=[VideoInput(str(clip))])]),
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    prepared = tiny_engine.render(req)
    pad = tiny_engine.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert prepared.videos == 1 and int((prepared.inputs["input_ids"] == pad).sum()) > 0
    _, fin = tiny_engine.generate(req)
    assert fin.reason == "length" and fin.stats.videos == 1
    # a video sent as a data: URI is decoded to frames and its temp copy removed at once
    import base64
    import glob
    import tempfile

    pattern = f"{tempfile.gettempdir()}/qwenvl-video-*"
    before = set(glob.glob(pattern))
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    prepared = tiny_engine.render(GenerationRequest(Conversation(
        [Message("user", "And now?", videos=[VideoInput(uri)])])))
    assert prepared.videos == 1 and set(glob.glob(pattern)) == before
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video at all")
    with pytest.raises(InvalidRequestError, match="is not a readable video"):
        tiny_engine.submit(GenerationRequest(Conversation([Message("user", "x", videos=[VideoInput(str(fake))])])))


def test_waiting_deltas_are_merged_for_a_slow_consumer():
    from engine.stream import RequestHandle

    handle = RequestHandle("r")
    for piece in ("a", "b", "", "c"):
        handle.push(TextDelta(piece))
    handle.push(Finished("length", RequestStats(output_tokens=3)))
    events = list(handle)
    assert [type(e).__name__ for e in events] == ["TextDelta", "Finished"]
    assert events[0].text == "abc"


def test_incremental_detokenizer_fast_path_matches_full_decoding(tiny_engine):
    """The per-token cache (byte-level BPE) gives the same text as decoding the whole
    answer, and never emits half a character, also for multi-byte text split across tokens."""
    from engine.core.output import IncrementalDetokenizer, TokenPieces

    tok = tiny_engine.tokenizer
    pieces = TokenPieces(tok)
    assert pieces.enabled
    text = "Héllo wörld! 你好，世界 🙂🚀 naïve café — ½ ∑x² <|im_end|> plain ascii again."
    ids = tok(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "want tokens that split characters"
    gen = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, len(tok), (300,), generator=gen).tolist()
    for seq in (ids, random_ids):
        fast, slow = IncrementalDetokenizer(tok, pieces), IncrementalDetokenizer(tok)
        fast_parts = [fast.add(i) for i in seq] + [fast.flush()]
        slow_parts = [slow.add(i) for i in seq] + [slow.flush()]
        expected = tok.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        joined = "".join(fast_parts)
        assert joined == "".join(slow_parts) and expected.startswith(joined)
        rest = expected[len(joined):]     # only an unfinished character is held back, as vLLM
        assert rest == "" or rest.endswith("\ufffd")
        if seq is ids:
            assert fast_parts == slow_parts
            assert not any("\ufffd" in p for p in fast_parts)


def test_an_unfinished_character_at_the_end_emits_nothing(tiny_engine):
    """vLLM emits nothing for a UTF-8 character cut by the end of the answer; no U+FFFD."""
    from engine.core.output import IncrementalDetokenizer, TokenPieces

    tok = tiny_engine.tokenizer
    ids = tok("ok 🙂", add_special_tokens=False).input_ids
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok, TokenPieces(tok))
    text = "".join(detok.add(i) for i in ids[:cut]) + detok.flush()
    assert "\ufffd" not in text and text.rstrip() == "ok"


def test_consumer_is_woken_for_each_token_of_a_slow_model_and_nothing_is_lost():
    """Tokens further apart than the notify interval (a 7B model's) each reach a waiting
    consumer at once; a burst (a tiny model's) is merged, and everything arrives."""
    from engine.stream import RequestHandle

    handle = RequestHandle("r")
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(
        e.text for e in handle if isinstance(e, TextDelta)), daemon=True)
    reader.start()
    expected = ""
    for piece in ("one ", "two "):
        time.sleep(handle.notify_interval_s * 2)
        handle.push(TextDelta(piece))
        expected += piece
        deadline = time.monotonic() + 2
        while "".join(got) != expected and time.monotonic() < deadline:
            time.sleep(0.001)
        assert "".join(got) == expected, "a lone token was held back"
    for i in range(200):
        handle.push(TextDelta(f"{i},"))
    handle.push(Finished("length", RequestStats(output_tokens=202)))
    reader.join(5)
    assert "".join(got) == "one two " + "".join(f"{i}," for i in range(200))
    assert len(got) < 2 + 200, "a burst should be merged into fewer deltas"


def test_first_token_goes_out_at_once_and_the_rest_in_batches(tiny_engine, monkeypatch):
    """The device thread decodes and hands over text at most every notify interval, except
    the first token (time to first token) and a row's end, which go out at once."""
    from engine.stream import RequestHandle

    first_alone, _ = tiny_engine.generate(ask("x", max_tokens=1, ignore_eos=True), timeout=60)
    whole, _ = tiny_engine.generate(ask("x", max_tokens=6, ignore_eos=True), timeout=60)
    monkeypatch.setattr(RequestHandle, "notify_interval_s", 3600.0)
    pushed = []
    real_push = RequestHandle.push
    monkeypatch.setattr(RequestHandle, "push",
                        lambda self, event: (pushed.append(event), real_push(self, event)))
    _, fin = tiny_engine.generate(ask("x", max_tokens=6, ignore_eos=True), timeout=60)
    deltas = [e.text for e in pushed if isinstance(e, TextDelta) and e.text]
    assert fin.reason == "length" and pushed[-1] is fin
    assert deltas[0] == first_alone                 # the first token on its own, at once
    assert len(deltas) == 2 and "".join(deltas) == whole   # the other five at the end


def test_a_finished_request_frees_its_pictures_without_the_cycle_collector(tiny_engine):
    """The leak under concurrent image requests: a reference cycle (handle -> cancel callback
    -> work item -> handle) kept every finished request's pixel tensors until Python's rare
    full collection. With the collector off, they must go as soon as the request ends."""
    import gc

    from PIL import Image

    from engine.types import Conversation, GenerationRequest, ImageInput, Message, SamplingParams

    engine, recording = engine_recording_processor(tiny_engine)
    gc.collect()
    gc.disable()
    try:
        for color in ("red", "blue", "green"):
            req = GenerationRequest(Conversation([Message("user", "What?", images=[
                ImageInput(Image.new("RGB", (320, 240), color))])]),
                SamplingParams(max_tokens=2, temperature=0))
            engine.generate(req, timeout=60)
        time.sleep(0.1)
        seen = recording.pixels
        alive = sum(ref() is not None for ref in seen[:-1])   # the last batch may linger
    finally:
        gc.enable()
        engine.close()
    assert len(seen) == 3 and alive == 0, f"{alive} finished requests still hold their pixels"


def test_periodic_engine_line_reports_running_waiting_and_throughput(tiny_engine):
    """vLLM-style engine line: what runs and waits, and tokens/s since the last line;
    nothing while idle."""
    from engine.core.stats import StatsLogger

    from engine.types import Conversation, GenerationRequest, Message, SamplingParams

    stats = StatsLogger(tiny_engine.snapshot, interval_s=0)    # no thread: lines on demand
    assert stats.line() is None
    long = tiny_engine.submit(GenerationRequest(Conversation([Message("user", "Go on")]),
                                                SamplingParams(max_tokens=400, temperature=0,
                                                               ignore_eos=True)))
    deadline = time.monotonic() + 30
    while long.tokens < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    line = stats.line()
    assert line is not None and "running=1 waiting=0" in line
    used = float(line.split("kv_cache=")[1].split("%")[0])     # 1 of 8 rows, partly filled
    assert 0 < used < 100 / tiny_engine.snapshot().kv_rows
    assert float(line.split("generation_tokens/s=")[1].split()[0]) > 0
    assert float(line.split("prompt_tokens/s=")[1].split()[0]) > 0
    long.cancel()
    long.collect(timeout=30)
    while tiny_engine.snapshot().running and time.monotonic() < deadline:
        time.sleep(0.01)    # the batch is cleared just after its last row is released
    done = stats.line()
    assert done is not None and "finished=1" in done and "running=0" in done
    assert "kv_cache=0.0%" in done and "prefix_cache_hit_rate=" in done
    assert stats.line() is None


def test_the_snapshot_follows_requests_rows_and_caches(tiny_model_dir):
    """The engine's public snapshot: on a one-row engine a running request and a waiting
    one, its KV row back after both, the prefix cache hit by a follow-up turn exactly as
    much as the turn's cached tokens, and the picture caches by a picture sent again."""
    from support import tiny_engine_with

    engine = tiny_engine_with(tiny_model_dir, max_batch=1, max_model_len=2048)
    try:
        idle = engine.snapshot()
        assert (idle.running, idle.waiting, idle.kv_rows, idle.kv_free_rows) == (0, 0, 1, 1)
        assert idle.kv_usage == 0 and idle.steps_run == 0 and idle.requests_finished == 0
        assert idle.prefix_cache_queries == idle.prefix_cache_hits == 0
        assert idle.decode_captured is False and idle.decode_replays == 0   # the CPU: eager

        long = engine.submit(ask("Go on", max_tokens=2000, ignore_eos=True))
        deadline = time.monotonic() + 30
        while long.tokens < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        short = engine.submit(ask("Hi", max_tokens=3, ignore_eos=True))
        busy = engine.snapshot()
        assert (busy.running, busy.waiting, busy.kv_free_rows) == (1, 1, 0)
        assert 0 < busy.kv_usage < 1 and busy.steps_run >= 2 and busy.largest_batch == 1
        assert busy.generation_tokens >= 3 and busy.prompt_tokens > 0
        long.cancel()
        assert short.collect(timeout=60)[1].reason == "length"
        assert long.collect(timeout=60)[1].reason == "cancelled"
        while engine.snapshot().running and time.monotonic() < deadline:
            time.sleep(0.01)
        after = engine.snapshot()
        assert (after.running, after.waiting, after.kv_free_rows, after.kv_usage) == (0, 0, 1, 0)
        assert after.requests_finished == 2 and after.steps_run > busy.steps_run

        first = ask("What is in the picture?", images=["assets/shapes.png"], max_tokens=8,
                    ignore_eos=True)
        answer, _ = engine.generate(first, timeout=60)
        before = engine.snapshot()
        follow_up = GenerationRequest(Conversation([
            first.conversation.messages[0], Message("assistant", answer),
            Message("user", "And the colours?")]),
            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        _, fin = engine.generate(follow_up, timeout=60)
        now = engine.snapshot()
        assert fin.stats.cached_tokens > 0
        assert now.prefix_cache_hits - before.prefix_cache_hits == fin.stats.cached_tokens
        assert now.prefix_cache_queries - before.prefix_cache_queries == fin.stats.prompt_tokens
        assert now.prefix_cache_bytes > 0 and now.requests_finished == 4
        assert now.picture_cache_hits == before.picture_cache_hits + 1    # not decoded again
        assert now.pixel_cache_hits == before.pixel_cache_hits + 1        # nor processed
        assert engine.cache_stats() == now.caches() and "pixel_cache_hits" in now.caches()
    finally:
        engine.close()
