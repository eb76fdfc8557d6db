"""Beam search (vLLM's use_beam_search) in the local engine, through LocalEngine's public
interface on the trained tiny model, whose answers end with EOS, so ended beams compete with
live ones.

Oracles:
- transformers' own beam search where its rules and vLLM's agree: without EOS (ignore_eos,
  and `generate` kept off the EOS ids by min_new_tokens), both keep the n best continuations by
  cumulative logprob at every step and rank the equal-length survivors alike whatever the
  length penalty; they differ once EOS counts (transformers takes an EOS only among its n best
  candidates and scores by answer length; vLLM sets aside every EOS among each beam's 2n
  candidates and counts the prompt in the length), so there:
- a brute-force transcription of vLLM 0.32's online beam search loop
  (vllm/entrypoints/generate/beam_search/online.py) over the HF model's full forward pass,
  one beam at a time: no KV cache and no engine code."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from engine.base import Engine
from engine.core.beam import next_candidates, plan_rows
from engine.errors import InvalidRequestError
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                          SamplingParams, TextDelta)

from support import tiny_engine_with

ROWS = 4
QUESTION = "How many shapes are there, and what colours are they?"
PICTURE = "assets/shapes.png"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """Four rows, prompts prefilled 8 tokens a step (so prompts span several chunks)."""
    eng = tiny_engine_with(tiny_model_dir, max_batch=ROWS, max_num_batched_tokens=8)
    yield eng
    eng.close()


def ask(images=(), **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0)
    return GenerationRequest(Conversation([Message("user", QUESTION,
                                                   [ImageInput(i) for i in images])]),
                             SamplingParams(**sampling))


def answers(handles, whole: bool = True) -> list[tuple[str, list[int], Finished]]:
    """Each handle's text, token ids and end; `whole`: the answer comes in one delta, as a
    beam search's does (nothing streams before its end)."""
    out = []
    for handle in handles:
        events = list(handle.events(timeout=120))
        assert isinstance(events[-1], Finished)
        deltas = [e for e in events if isinstance(e, TextDelta)]
        assert len(deltas) <= 1 or not whole, "a beam search streamed before its end"
        out.append(("".join(d.text for d in deltas), [i for d in deltas for i in d.token_ids],
                    events[-1]))
    return out


def model_logprobs(engine, inputs: dict, ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's logits for the token after `ids` (the prompt and an
    answer so far), in one forward pass over all of them with the prompt's pictures."""
    plen = inputs["input_ids"].shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for k, v in extra.items():   # per-token inputs (mm_token_type_ids): answer tokens are text
        if isinstance(v, torch.Tensor) and v.shape == (1, plen):
            extra[k] = torch.cat([v, v.new_zeros(1, len(ids) - plen)], dim=1)
    with torch.inference_mode():
        logits = engine.loaded.model(input_ids=torch.tensor([ids]),
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     **extra).logits[0, -1]
    return logits.float().log_softmax(-1)


def vllm_beam_search(engine, inputs: dict, width: int, max_tokens: int, *,
                     ignore_eos: bool = False, include_stop: bool = False,
                     length_penalty: float = 1.0) -> list[tuple[list[int], str, int | None]]:
    """vLLM 0.32's beam search at temperature 0, written out over the model: the answers
    (token ids, finish reason, stop reason), best first."""
    eos = engine.tokenizer.eos_token_id
    prompt = inputs["input_ids"][0].tolist()
    live, ended = [(prompt, 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in live:
            top = model_logprobs(engine, inputs, tokens).topk(2 * width)
            for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
                if token == eos and not ignore_eos:
                    ended.append((tokens + [token] if include_stop else tokens, cum + logprob,
                                  "stop", eos))
                else:
                    candidates.append((cum + logprob, tokens + [token]))
        candidates.sort(key=lambda c: -c[0])
        live = [(tokens, cum) for cum, tokens in candidates[:width]]
    ended += [(tokens, cum, "length", None) for tokens, cum in live]

    def score(beam) -> float:   # vllm.beam_search.get_beam_search_score
        tokens, cum = beam[0], beam[1]
        return cum / ((len(tokens) - (tokens[-1] == eos)) ** length_penalty)
    best = sorted(ended, key=score, reverse=True)[:width]
    return [(tokens[len(prompt):], reason, stop) for tokens, _, reason, stop in best]


def test_width_one_is_the_greedy_answer(engine):
    """n=1 without EOS keeps the most likely token each step: the greedy answer, as
    model.generate gives it."""
    req = ask(n=1, use_beam_search=True, ignore_eos=True, max_tokens=16)
    [(text, ids, fin)] = answers(engine.submit_choices(req))
    inputs = engine.render(req).inputs
    with torch.inference_mode():
        out = engine.loaded.model.generate(**inputs, do_sample=False, max_new_tokens=16,
                                           min_new_tokens=16)
    assert ids == out[0, inputs["input_ids"].shape[1]:].tolist()
    assert fin.reason == "length" and text == engine.tokenizer.decode(ids,
                                                                      skip_special_tokens=True)


@pytest.mark.parametrize("width,max_tokens,images,length_penalty", [
    (2, 12, (), 1.0), (3, 16, (), 0.5), (3, 16, (PICTURE,), 1.0)])
def test_beams_equal_transformers_beam_search_without_eos(engine, width, max_tokens, images,
                                                          length_penalty):
    req = ask(images, n=width, use_beam_search=True, ignore_eos=True, max_tokens=max_tokens,
              length_penalty=length_penalty)
    got = answers(engine.submit_choices(req))
    inputs = engine.render(req).inputs
    with torch.inference_mode():
        out = engine.loaded.model.generate(
            **inputs, num_beams=width, num_return_sequences=width, do_sample=False,
            max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            length_penalty=length_penalty, early_stopping=False)
    expected = out[:, inputs["input_ids"].shape[1]:].tolist()
    # the rules agree only while no beam takes an EOS id, which generate may not take here
    assert not set(engine.core.eos_ids) & {t for _, ids, _ in got for t in ids}
    assert [ids for _, ids, _ in got] == expected
    assert len({text for text, _, _ in got}) == width
    assert all(fin.reason == "length" and len(ids) == max_tokens for _, ids, fin in got)


@pytest.mark.parametrize("settings,images", [
    (dict(n=2, max_tokens=20), ()),
    (dict(n=3, max_tokens=20, length_penalty=0.0), ()),
    (dict(n=2, max_tokens=20, length_penalty=2.0, include_stop_str_in_output=True,
          skip_special_tokens=False), ()),
    (dict(n=2, max_tokens=26), (PICTURE,)),
])
def test_beams_equal_vllms_algorithm_over_the_model(engine, settings, images):
    """Ended and live beams ranked together by vLLM's score; an ended beam's answer has no
    EOS (its token only with include_stop_str_in_output, never in the text), finish "stop"
    and the EOS id as stop reason; a live one "length"."""
    req = ask(images, use_beam_search=True, **settings)
    got = answers(engine.submit_choices(req))
    expected = vllm_beam_search(
        engine, engine.render(req).inputs, settings["n"], settings["max_tokens"],
        include_stop=settings.get("include_stop_str_in_output", False),
        length_penalty=settings.get("length_penalty", 1.0))
    assert [(ids, fin.reason, fin.stop_reason) for _, ids, fin in got] == expected
    eos = engine.tokenizer.eos_token_id
    for text, ids, fin in got:
        shown = ids[:-1] if ids and ids[-1] == eos else ids
        assert text == engine.tokenizer.decode(shown, skip_special_tokens=settings.get(
            "skip_special_tokens", True))
        assert "<|im_end|>" not in text
        assert fin.stats.output_tokens == len(ids)
    if not images:   # the ended beams' rules are exercised
        assert "stop" in [fin.reason for _, _, fin in got]


def test_answer_logprobs_are_the_steps_candidates(engine):
    """Each answer token's logprob is the model's; its top entries are the first of the 2n
    candidates vLLM asked for at that step (so at most 2n, whatever logprobs asks)."""
    req = ask(n=2, use_beam_search=True, max_tokens=8, ignore_eos=True, logprobs=5)
    inputs = engine.render(req).inputs
    prompt = inputs["input_ids"][0].tolist()
    for handle in engine.submit_choices(req):
        [delta, fin] = list(handle.events(timeout=120))
        assert fin.reason == "length" and len(delta.logprobs) == len(delta.token_ids) == 8
        for n, (entry, token) in enumerate(zip(delta.logprobs, delta.token_ids)):
            oracle = model_logprobs(engine, inputs, prompt + delta.token_ids[:n])
            top = oracle.topk(4)
            assert entry.token_id == token and entry.token == engine.tokenizer.decode([token])
            assert entry.logprob == pytest.approx(oracle[token].item(), abs=2e-4)
            assert [t.token_id for t in entry.top] == top.indices.tolist()
            assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=2e-4)


def test_a_cancel_ends_every_beam_and_frees_their_rows(engine):
    handles = engine.submit_choices(ask(n=3, use_beam_search=True, ignore_eos=True,
                                        max_tokens=2000))
    deadline = time.monotonic() + 60
    while handles[0].tokens < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    handles[1].cancel()
    start = time.monotonic()
    ends = [fin.reason for _, _, fin in answers(handles)]
    assert ends == ["cancelled"] * 3 and time.monotonic() - start < 5
    early = engine.submit_choices(ask(n=3, use_beam_search=True, max_tokens=2000))
    early[2].cancel()                         # before (or during) its prefill
    assert [fin.reason for _, _, fin in answers(early)] == ["cancelled"] * 3
    snap = engine.snapshot()
    assert snap.kv_free_rows == snap.kv_rows and snap.running == 0
    assert answers(engine.submit_choices(ask(n=2, use_beam_search=True, max_tokens=4)))


def test_greedy_rows_are_unchanged_beside_a_beam_search(engine):
    """A greedy request decoded in the same steps as a 3-beam search: both answer what they
    answer alone."""
    beam_req = ask(n=3, use_beam_search=True, ignore_eos=True, max_tokens=30)
    greedy_req = GenerationRequest(Conversation([Message("user", "Which shapes are blue?")]),
                                   SamplingParams(temperature=0, ignore_eos=True, max_tokens=30))
    before = engine.snapshot().steps_run
    beams_alone = answers(engine.submit_choices(beam_req))
    greedy_alone = answers([engine.submit(greedy_req)], whole=False)
    apart = engine.snapshot().steps_run - before
    beams = engine.submit_choices(beam_req)
    greedy = engine.submit(greedy_req)
    together = answers([greedy], whole=False) + answers(beams)
    assert engine.snapshot().steps_run - before - apart < apart * 0.75   # they shared steps
    assert [a[:2] for a in together] == [a[:2] for a in greedy_alone + beams_alone]


def test_candidates_add_the_drawn_token_above_the_greedy_temperature():
    """vLLM's sub-request returns its sampled token's logprob first, then the top 2n: at
    temperature 0 the top alone (the sample is the first of them); hotter, the drawn token
    (rank and logprob of the raw distribution) may lie outside them."""
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    logprobs = logits.log_softmax(-1)
    for row, cands in zip(logprobs, next_candidates(logits, 2, 0.0)):
        top = row.topk(4)
        assert [c[0] for c in cands] == top.indices.tolist()
        assert [c[1] for c in cands] == pytest.approx(top.values.tolist())
        assert [c[2] for c in cands] == [1, 2, 3, 4]
    outside = 0
    for row, cands in zip(logprobs, next_candidates(logits, 2, 100.0)):
        token, logprob, rank = cands[0]
        assert logprob == pytest.approx(row[token].item())
        assert rank == int((row >= row[token]).sum())
        assert [c[0] for c in cands[1:]] == [t for t in row.topk(4).indices.tolist()
                                             if t != token]
        outside += rank > 4
    assert outside > 20


def test_rows_are_reused_and_copied_only_where_needed():
    """plan_rows on random steps: every new beam's row ends up holding its parent's KV, a
    copy's source is never overwritten, and a parent's row is copied only for the children
    beyond the rows that hold it."""
    rng = random.Random(0)
    for _ in range(500):
        rows = rng.randint(1, 8)
        holds = [rng.randrange(rows) for _ in range(rows)]
        live = sorted(set(holds))
        parents = [rng.choice(live) for _ in range(rng.randint(1, rows))]
        plan = plan_rows(holds, parents)
        content = list(holds)
        for row, source in plan:
            if source is not None:
                content[row] = holds[source]
        assert [content[row] for row, _ in plan] == parents
        assert len({row for row, _ in plan}) == len(plan)
        assert not {s for _, s in plan if s is not None} & {r for r, s in plan if s is not None}
        copies = sum(s is not None for _, s in plan)
        assert copies == sum(max(0, parents.count(p) - holds.count(p)) for p in set(parents))


def test_beam_search_is_refused_beyond_the_rows_and_by_engines_without_it(engine):
    with pytest.raises(InvalidRequestError) as info:
        engine.submit_choices(ask(n=ROWS + 1, use_beam_search=True))
    assert info.value.param == "use_beam_search" and info.value.code == 400
    assert f"at most {ROWS}" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        engine.submit_choices(ask(n=2, use_beam_search=True, length_penalty=math.nan))
    assert info.value.param == "length_penalty"

    class Plain(Engine):
        def submit(self, request, policy=None):
            raise AssertionError("never reached")

        def health(self) -> bool:
            return True

    with pytest.raises(InvalidRequestError) as info:
        Plain().submit_choices(ask(n=2, use_beam_search=True))
    assert info.value.param == "use_beam_search" and info.value.code == 400
