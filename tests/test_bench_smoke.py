"""The benchmark scripts run end to end on the tiny model with tiny settings,
batched rows give the same greedy text as the same requests run alone, the
batch-gathering wait never delays a lone request, and preprocessing runs on
the caller's thread."""

from __future__ import annotations

import re
import threading

import pytest

from engine.config import EngineConfig
from engine.backends.local import LocalEngine
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                          SamplingParams, TextDelta)

from bench import (concurrency, fields, followup, interference, overhead, preprocess, soak,
                   streams, warmup)
from bench.api import api_unavailable_reason
from tests.test_engine import engine_recording_processor

HTTP = api_unavailable_reason() is None


def _common(tiny_model_dir) -> list[str]:
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--no-warmup", "--quiet"]


def test_overhead_runs_and_paths_agree(tiny_model_dir, capsys):
    assert overhead.main(_common(tiny_model_dir) + ["--max-tokens", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "same greedy text on every path: yes" in out
    rows = {name: line for line in out.splitlines()
            for name in ("bare generate", "our engine", "our HTTP API") if f"| {name} |" in
            re.sub(r"\|\s+", "| ", line)}
    assert {"bare generate", "our engine"} <= rows.keys()
    assert ("our HTTP API" in rows) == HTTP
    assert re.search(r"engine output tok/s / bare, median of the per-round ratios: \d+\.\d+", out)
    assert re.search(r"\| +our engine \|( +[-+\d.]+ \|){6}", out)   # incl. the paired ratio
    assert "fraction of bound" in out and "n/a" in out      # CPU: no bandwidth figure


def test_overhead_bandwidth_fraction_when_given(tiny_model_dir, capsys):
    args = _common(tiny_model_dir) + ["--max-tokens", "4", "--repeats", "1", "--no-http",
                                      "--no-image", "--bandwidth-gbs", "100"]
    assert overhead.main(args) == 0
    out = capsys.readouterr().out
    assert "100 GB/s (--bandwidth-gbs)" in out
    assert re.search(r"\| +our engine \| +[\d.,]+ \| +[\d.,]+ \| +[\d.]+% \|", out)


def test_concurrency_runs_both_modes(tiny_model_dir, capsys):
    args = _common(tiny_model_dir) + ["--clients", "1,2", "--max-tokens", "8",
                                      "--requests-per-client", "1", "--image"]
    assert concurrency.main(args) == 0
    out = capsys.readouterr().out
    for target in ["engine, max_batch 8", "engine, max_batch 1"] + (
            ["HTTP, max_batch 8", "HTTP, max_batch 1"] if HTTP else []):
        assert re.search(rf"\| +2 \| +{re.escape(target)} \| +[\d.,]+ \|", out), target
    assert "### Speedup" in out and "| errors |" in out
    assert not re.search(r"^error \(", out, re.M)


@pytest.mark.skipif(not HTTP, reason="bench/interference.py needs the HTTP API")
def test_interference_runs_and_max_ratio_fails_the_run(tiny_model_dir, capsys):
    args = _common(tiny_model_dir) + ["--long-tokens", "48", "--after-tokens", "4",
                                      "--short-tokens", "2", "--repeats", "1", "--image"]
    assert interference.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"round 1: A alone [\d.]+ s .*; B alone [\d.]+ ms; B beside [\d.]+ ms", out)
    assert re.search(r"^\|( +[\d.,]+ \|){2} +[\d.]+x \|( +([\d.,]+|n/a) \|){2}$", out, re.M)
    assert re.search(r"TTFT beside a long answer / alone: [\d.]+x \(goal <= 3x: (met|NOT met)\)",
                     out)
    assert interference.main(args + ["--max-ratio", "1e-9"]) == 1
    assert re.search(r"FAIL: TTFT ratio [\d.]+x exceeds --max-ratio 1e-09",
                     capsys.readouterr().out)


@pytest.mark.skipif(not HTTP, reason="bench/followup.py needs the HTTP API")
def test_followup_runs_and_max_ratio_fails_the_run(tiny_model_dir, capsys):
    args = _common(tiny_model_dir) + ["--pictures", "2", "--size", "160x120", "--repeats", "1",
                                      "--max-tokens", "2"]
    assert followup.main(args) == 0
    out = capsys.readouterr().out
    assert "pictures: 2 x 160x120 in turn 1 (" in out
    assert re.search(r"round 1: turn 1 [\d.]+ ms, turn 2 [\d.]+ ms \([\d.]+x\); picture first "
                     r"time [\d.]+ ms, re-sent [\d.]+ ms \([\d.]+x\)", out)
    assert re.search(r"^\| +chat about 2 pictures: turn 1 -> turn 2 \|( +[\d.]+ \|){2} "
                     r"+[\d.]+x \|$", out, re.M)
    assert re.search(r"^\| +1 picture in a new chat: first time -> re-sent \|( +[\d.]+ \|){2} "
                     r"+[\d.]+x \|$", out, re.M)
    assert re.search(r"TTFT turn 2 / turn 1: [\d.]+x \(goal <= 0.25x: (met|NOT met)", out)
    assert followup.main(args + ["--max-ratio", "1e-9"]) == 1
    assert re.search(r"FAIL: TTFT turn 2 / turn 1 [\d.]+x exceeds --max-ratio 1e-09",
                     capsys.readouterr().out)


def test_soak_runs_both_modes(capsys):
    assert soak.main(["--mode", "rounds", "--clients", "2", "--rounds", "2",
                      "--requests-per-round", "4"]) == 0
    assert soak.main(["--mode", "load", "--clients", "4", "--phase-seconds", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"(PASS|FAIL): rounds: RSS growth round 2 -> round 2: [-+]\d+ MB", out)
    assert re.search(r"(PASS|FAIL): load: RSS growth phase 1 -> phase 2: [-+]\d+ MB", out)
    assert re.search(r"round +2: rss \d+ MB .* ok 4", out)


def test_fields_runs_and_reports_its_ratios(tiny_model_dir, capsys):
    """bench/fields.py: penalties + logprobs against plain rows, a constrained answer against
    a free one, and compile times; --min-ratio fails the run."""
    args = _common(tiny_model_dir) + ["--max-tokens", "8", "--constrained-max-tokens", "40",
                                      "--repeats", "1", "--pairs", "2"]
    assert fields.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| +8 greedy rows, half with penalties \+ logprobs \(top 5\) / all plain "
                     r"\|( +[\d.,]+ \|){3} +[\d.]+ \.\. [\d.]+ \| +>= 0.9 \|", out)
    assert re.search(r"\| +1 row, JSON schema \(max_tokens 40\) / free, same prompt and length "
                     r"\|( +[\d.,]+ \|){3} +[\d.]+ \.\. [\d.]+ \| +>= 0.9 \|", out)
    assert re.search(r"\| +cold \(a new schema\) \| +[\d.]+ \| +[\d.]+ \|", out)
    assert re.search(r"\| +cached \(the same schema again\) \| +[\d.]+ \| +[\d.]+ \|", out)
    assert re.search(r"^penalties \+ logprobs: [\d.]+ \(goal >= 0.9: (met|NOT met)\)$", out, re.M)
    assert fields.main(args + ["--min-ratio", "1e9"]) == 1
    assert "FAIL: a ratio below --min-ratio 1e+09" in capsys.readouterr().out


@pytest.mark.skipif(not HTTP, reason="bench/streams.py needs the HTTP API")
def test_streams_runs_through_the_server(tiny_model_dir, capsys):
    """bench/streams.py: 8 streaming clients against 1 and a constrained stream against a free
    one, through `python -m server` in a subprocess."""
    args = ["--model", str(tiny_model_dir), "--max-tokens", "8", "--requests-per-client", "1",
            "--constrained-max-tokens", "40", "--pairs", "1"]
    assert streams.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| +8 text clients / 1, 8 tokens each, aggregate \|( +[\d.,]+ \|){2} "
                     r"+[\d.]+x \| +>= 3x \|", out)
    assert re.search(r"\| +1 client, JSON schema \(max_tokens 40\) / free, same prompt and "
                     r"length, decode \|( +[\d.,]+ \|){3} +>= 0.9 \|", out)
    assert re.search(r"^8 clients / 1: [\d.]+ \(goal >= 3: (met|NOT met)\)$", out, re.M)


def test_preprocess_counts_image_tokens(capsys):
    assert preprocess.main(["--sizes", "448x448,1280x720", "--bounds", "0,1",
                            "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # Qwen's rule: one token per 28x28 after resizing to multiples of 28 within the bounds.
    assert re.search(r"\| +448x448 \| +engine default [^|]+\| +448x448 \| +256 \|", out)
    assert re.search(r"\| +1280x720 \| +engine default [^|]+\| +1288x728 \| +1196 \|", out)
    assert re.search(r"\| +1280x720 \| +low [^|]+\| +588x336 \| +252 \|", out)


def test_warmup_child_reports_first_request(tiny_model_dir, capsys):
    assert warmup.main(_common(tiny_model_dir) + ["--variant", "engine", "--max-tokens", "4"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT "))
    assert '"first": {"ttft_s":' in line and '"second"' in line


def test_full_size_config_reads_the_7b_weight_bytes():
    """The random full-size model has the real 7B's shapes: ~14.1 GB of bf16 weights read per
    decoded token (REFERENCE.md: about 14.2 GB), 8.29B parameters in all."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    from bench.common import decode_weight_bytes, full_size_config
    from engine import tiny

    config = full_size_config(tiny.build_tokenizer())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert model.dtype == torch.bfloat16
    assert 14.0e9 < decode_weight_bytes(model) < 14.3e9
    assert 8.2e9 < sum(p.numel() for p in model.parameters()) < 8.4e9


# ----------------------------------------------------------------- engine behaviour
@pytest.fixture
def patient_engine(tiny_model_dir):
    """A fresh engine per test, so no test sees another's requests or counters."""
    engine = LocalEngine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu",
                                                  warmup=False, max_batch=8,
                                                  log_stats_interval=0))
    yield engine
    engine.close()


def _mixed_requests() -> list[GenerationRequest]:
    """Different prompt lengths (so rows are left-padded), images or none, and
    different max_tokens (rows stop at different steps)."""
    specs = [("Describe this image.", ["assets/shapes.png"], 12),
             ("What is in the chart? Answer in one short sentence, please.", ["assets/chart.png"], 7),
             ("Hello there, how are you today?", [], 16),
             ("Total?", ["assets/receipt.png"], 10)]
    return [GenerationRequest(Conversation([Message("user", q, images=[ImageInput(p) for p in imgs])]),
                              SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for q, imgs, n in specs]


def test_batched_rows_give_the_same_greedy_text_as_alone(patient_engine):
    engine = patient_engine
    alone = [engine.generate(r, timeout=120) for r in _mixed_requests()]
    handles = [engine.submit(r) for r in _mixed_requests()]
    together = [h.collect(timeout=120) for h in handles]
    assert engine.snapshot().largest_batch >= 2
    for (text_a, fin_a), (text_b, fin_b), req in zip(alone, together, _mixed_requests()):
        assert fin_b.reason == fin_a.reason == "length"
        assert fin_b.stats.output_tokens == req.sampling.max_tokens
        assert text_b == text_a


def _short(text: str = "Hi", n: int = 4) -> GenerationRequest:
    return GenerationRequest(Conversation([Message("user", text)]),
                             SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def test_preprocessing_runs_on_the_callers_thread(tiny_engine):
    """Images are decoded and processed by the thread that calls submit, never by the
    device thread, so a big image does not stall generation for everyone."""
    engine, recording = engine_recording_processor(tiny_engine, max_batch=8)
    try:
        req = GenerationRequest(Conversation([Message("user", "Describe.", images=[
            ImageInput("assets/shapes.png")])]), SamplingParams(max_tokens=2, temperature=0))
        events = list(engine.submit(req).events(timeout=60))
    finally:
        engine.close()
    seen = recording.threads
    assert isinstance(events[-1], Finished) and events[-1].reason != "error"
    assert seen == [threading.current_thread().name]
    assert all(isinstance(e, TextDelta) for e in events[:-1])


def test_a_short_answer_ends_while_its_batch_runs_on(patient_engine):
    """A row that is done is released at once (its Finished event), not when the
    longest row of its batch ends."""
    engine = patient_engine
    long = engine.submit(_short("long", n=3000))
    short = engine.submit(_short("short", n=4))
    text, fin = short.collect(timeout=60)
    assert fin.reason == "length" and fin.stats.output_tokens == 4
    assert long.finished is None and long.tokens < 3000, "the short answer waited for the batch"
    long.cancel()
    assert long.collect(timeout=60)[1].reason == "cancelled"
    assert engine.snapshot().largest_batch == 2
