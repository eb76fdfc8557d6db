"""The engine honours vLLM's per-request fields end to end, through LocalEngine's public
interface on the tiny model: logprobs and prompt logprobs against torch.log_softmax of the
model's own forward pass, stop token ids and stop strings with vLLM's stop reasons and
text, special tokens, n choices sharing one prefill, and vLLM's refusals."""

from __future__ import annotations

import time

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.types import (Conversation, Finished, GenerationRequest, Message, SamplingParams,
                          TextDelta)

from support import tiny_engine_with

ROWS = 4
ATOL = 2e-4     # the engine's chunked prefill and decode steps against one forward pass


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """Four rows, prompts prefilled 8 tokens a step (so prompts span several chunks)."""
    eng = tiny_engine_with(tiny_model_dir, max_batch=ROWS, max_num_batched_tokens=8)
    yield eng
    eng.close()


def ask(text: str = "How many shapes are there?", **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0)
    return GenerationRequest(Conversation([Message("user", text)]), SamplingParams(**sampling))


def run(handle) -> tuple[str, list[int], list | None, Finished]:
    """A handle's whole text, token ids, logprobs (None when no delta had any) and end."""
    text, ids, lps, any_lps = "", [], [], False
    for event in handle.events(timeout=120):
        if isinstance(event, TextDelta):
            text += event.text
            ids += event.token_ids
            if event.logprobs is not None:
                any_lps = True
                lps += event.logprobs
        else:
            return text, ids, lps if any_lps else None, event
    raise AssertionError("no Finished event")


def forward_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's logits over `ids` in one forward pass: row t is the
    distribution of token t + 1."""
    model = engine.loaded.model
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]),
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_token_text(tok, text: str, token: int, before: list[int]) -> None:
    """vLLM's text of a logprob's token: the id decoded alone; for a piece of a UTF-8
    character, never a U+FFFD but the text it completes after the tokens before it (or "")."""
    alone = tok.decode([token])
    if not alone.endswith("\ufffd"):
        assert text == alone
    else:
        assert "\ufffd" not in text and tok.decode(before + [token]).endswith(text)


def assert_logprobs(engine, entries, targets: list[int], oracle: torch.Tensor, k: int) -> None:
    """Each entry (a TokenLogprob) against oracle rows: its token's logprob and rank, and
    the k most likely tokens, their logprobs and texts (each id decoded alone, as vLLM)."""
    tok = engine.tokenizer
    assert len(entries) == len(targets) == oracle.shape[0]
    for n, (entry, target, row) in enumerate(zip(entries, targets, oracle)):
        assert entry.token_id == target
        assert_token_text(tok, entry.token, target, targets[max(0, n - 4):n])
        assert entry.logprob == pytest.approx(row[target].item(), abs=ATOL)
        # vLLM's rank: the tokens at least as likely (near-ties either way)
        assert int((row > row[target] + ATOL).sum()) < entry.rank <= int(
            (row >= row[target] - ATOL).sum())
        top = row.topk(k)
        assert len(entry.top) == k
        assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=ATOL)
        for t, i in zip(entry.top, top.indices.tolist()):
            assert t.token_id == i or abs(row[t.token_id] - row[i]) < ATOL   # ties
            assert_token_text(tok, t.token, t.token_id, targets[max(0, n - 4):n])


def test_logprobs_equal_log_softmax_of_the_model_in_a_mixed_batch(engine):
    """A greedy row and a sampling row with penalties ask for logprobs beside a plain row:
    each token's logprob, rank and top k are those of the raw model distribution (vLLM's
    default: before penalties and temperature); the plain row gets none."""
    requests = [ask("Count the shapes.", max_tokens=14, ignore_eos=True, logprobs=3),
                ask("Name the colours.", max_tokens=14, ignore_eos=True, logprobs=2,
                    temperature=1.0, top_p=1.0, top_k=0, presence_penalty=1.5,
                    frequency_penalty=0.5, repetition_penalty=1.3, seed=5),
                ask("What is red?", max_tokens=14, ignore_eos=True)]
    handles = [engine.submit(r) for r in requests]
    results = [run(h) for h in handles]
    for req, (text, ids, lps, fin), k in zip(requests, results, (3, 2, None)):
        assert fin.reason == "length" and len(ids) == 14
        prompt = engine.render(req).inputs["input_ids"][0].tolist()
        assert fin.prompt_token_ids == prompt and fin.prompt_logprobs is None
        assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        if k is None:
            assert lps is None
            continue
        oracle = forward_logprobs(engine, prompt + ids)[len(prompt) - 1:-1]
        assert_logprobs(engine, lps, ids, oracle, k)
    greedy_ids = results[0][1]
    assert greedy_ids == forward_logprobs(engine, engine.render(requests[0]).inputs[
        "input_ids"][0].tolist() + greedy_ids)[-15:-1].argmax(-1).tolist()


def test_prompt_logprobs_equal_log_softmax_over_the_prompt_and_skip_the_prefix_cache(engine):
    """prompt_logprobs: None for the first token, then each prompt token's logprob and top
    k under the model; every position computed even when the prefix cache holds the
    prompt (a first identical request put it there), over several prefill chunks."""
    text = "Describe every shape and colour you can see in the picture, please."
    run(engine.submit(ask(text, max_tokens=3, ignore_eos=True)))
    req = ask(text, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    _, _, lps, fin = run(engine.submit(req))
    assert lps is None and fin.stats.cached_tokens == 0
    prompt = fin.prompt_token_ids
    assert prompt == engine.render(req).inputs["input_ids"][0].tolist() and len(prompt) > 24
    assert len(fin.prompt_logprobs) == len(prompt) and fin.prompt_logprobs[0] is None
    oracle = forward_logprobs(engine, prompt)[:-1]
    assert_logprobs(engine, fin.prompt_logprobs[1:], prompt[1:], oracle, 2)


def test_stop_token_ids_end_the_row_with_the_id_as_stop_reason(engine):
    _, answer, _, fin = run(engine.submit(ask(max_tokens=16, ignore_eos=True)))
    stop = answer[5]
    first = answer.index(stop)
    tok = engine.tokenizer
    for include in (False, True):
        text, ids, _, fin = run(engine.submit(ask(max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[stop],
                                                  include_stop_str_in_output=include)))
        assert (fin.reason, fin.stop_reason) == ("stop", stop)
        assert ids == answer[:first + 1]                        # the stop token is counted
        kept = answer[:first + 1] if include else answer[:first]   # its text only if asked
        assert text == tok.decode(kept, skip_special_tokens=True)


def test_eos_has_no_stop_reason_and_its_text_only_with_include_stop_str(engine):
    """The model's own end (<|im_end|>, the tokenizer's EOS): stop_reason None; its text
    is not in the answer even with special tokens shown, unless include_stop_str_in_output
    (vLLM's detokenizer)."""
    eos = engine.tokenizer.eos_token_id
    text, ids, _, fin = run(engine.submit(ask(max_tokens=60, skip_special_tokens=False)))
    assert (fin.reason, fin.stop_reason, ids[-1]) == ("stop", None, eos)
    assert "<|im_end|>" not in text
    text2, _, _, _ = run(engine.submit(ask(max_tokens=60, skip_special_tokens=False,
                                           include_stop_str_in_output=True)))
    assert text2 == text + "<|im_end|>"


def test_stop_strings_keep_or_cut_their_text_and_report_it(engine):
    full, _, _, _ = run(engine.submit(ask(max_tokens=20, ignore_eos=True)))
    stop = full[6:9]
    at = full.index(stop)
    cut, _, _, fin = run(engine.submit(ask(max_tokens=20, ignore_eos=True, stop=[stop])))
    assert (cut, fin.reason, fin.stop_reason) == (full[:at], "stop", stop)
    kept, _, _, fin = run(engine.submit(ask(max_tokens=20, ignore_eos=True, stop=[stop],
                                            include_stop_str_in_output=True)))
    assert (kept, fin.stop_reason) == (full[:at + len(stop)], stop)


def test_stop_strings_wait_for_min_tokens(engine):
    """A stop string completed within the first min_tokens tokens' text does not count
    (vLLM's detokenizer): the first one ending after that text does."""
    full, ids, _, _ = run(engine.submit(ask(max_tokens=20, ignore_eos=True)))
    stop = full[:3]
    head = engine.tokenizer.decode(ids[:5], skip_special_tokens=True)
    later = full.find(stop, len(head) - len(stop) + 1)
    text, _, _, fin = run(engine.submit(ask(max_tokens=20, ignore_eos=True, stop=[stop],
                                            min_tokens=5)))
    if later < 0:
        assert (text, fin.reason, fin.stop_reason) == (full, "length", None)
    else:
        assert (text, fin.reason, fin.stop_reason) == (full[:later], "stop", stop)
    cut, _, _, fin = run(engine.submit(ask(max_tokens=20, ignore_eos=True, stop=[stop])))
    assert (cut, fin.stop_reason) == ("", stop)


def test_skip_special_tokens_false_shows_them(engine):
    """Past an ignored EOS the answer holds special tokens: shown only when asked, as the
    tokenizer decodes them."""
    tok = engine.tokenizer
    shown, ids, _, _ = run(engine.submit(ask(max_tokens=30, ignore_eos=True,
                                             skip_special_tokens=False)))
    assert tok.eos_token_id in ids and "<|im_end|>" in shown
    assert shown == tok.decode(ids, skip_special_tokens=False)
    hidden, same, _, _ = run(engine.submit(ask(max_tokens=30, ignore_eos=True)))
    assert same == ids and "<|im_end|>" not in hidden
    assert hidden == tok.decode(ids, skip_special_tokens=True)


def test_n_choices_share_one_prefill_and_equal_lone_seeded_requests(engine):
    """n=3 with a seed: three handles; choice i is what a lone request with seed + i
    answers; the prompt is computed once (the others copy its KV), while each choice
    counts its prompt, as vLLM's child requests do."""
    sampling = dict(max_tokens=12, ignore_eos=True, temperature=1.0, top_p=1.0, top_k=0)
    text = "A one-off question about triangles and squares, asked three times?"
    before = engine.snapshot()
    handles = engine.submit_choices(ask(text, n=3, seed=11, **sampling))
    assert len(handles) == 3
    choices = [run(h) for h in handles]
    after = engine.snapshot()
    prompt_len = len(choices[0][3].prompt_token_ids)
    cached = sorted(c[3].stats.cached_tokens for c in choices)
    assert cached[1:] == [prompt_len, prompt_len]          # two copied the first one's KV
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == prompt_len - cached[0]
    assert after.prompt_tokens - before.prompt_tokens == 3 * prompt_len
    lone = [run(engine.submit(ask(text, seed=11 + i, **sampling)))[:2] for i in range(3)]
    assert [c[:2] for c in choices] == lone
    assert len({t for t, _ in lone}) > 1                   # the seeds really differ


def test_cancelling_one_choice_ends_only_that_one(engine):
    handles = engine.submit_choices(ask(n=3, seed=1, max_tokens=400, ignore_eos=True,
                                        temperature=1.0))
    deadline = time.monotonic() + 60
    while handles[1].tokens < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    handles[1].cancel()
    reasons = [run(h)[3].reason for h in handles]
    assert reasons == ["length", "cancelled", "length"]
    # the first choice (the one that prefills for the others) cancelled at once: the
    # others still answer, the same as without it
    sampling = dict(n=3, seed=4, max_tokens=10, ignore_eos=True, temperature=1.0, top_p=1.0)
    whole = [run(h)[:2] for h in engine.submit_choices(ask(**sampling))]
    handles = engine.submit_choices(ask(**sampling))
    handles[0].cancel()
    rest = [run(h) for h in handles]
    assert [r[3].reason for r in rest] == ["cancelled", "length", "length"]
    assert [r[:2] for r in rest[1:]] == whole[1:]


def test_a_greedy_row_is_unchanged_beside_rows_with_other_fields(engine):
    """The plain greedy answer, decoded in one batch with rows using penalties, logprobs,
    min_p, logit_bias, bad words and allowed tokens, equals model.generate's."""
    others = [ask("Colours?", max_tokens=40, ignore_eos=True, temperature=0.8, top_p=1.0,
                  presence_penalty=2.0, frequency_penalty=-1.0, logprobs=5, seed=-3),
              ask("Shapes?", max_tokens=40, ignore_eos=True, min_p=0.2, temperature=1.0,
                  logit_bias={300: 5.0, 25: -100}, bad_words=["red", "blue square"]),
              ask("Stars?", max_tokens=40, ignore_eos=True, allowed_token_ids=list(range(200, 400)),
                  prompt_logprobs=1, logprobs=0)]
    handles = [engine.submit(r) for r in others]
    req = ask("Which shapes are blue?", max_tokens=30, ignore_eos=True)
    text, ids, _, fin = run(engine.submit(req))
    assert all(run(h)[3].reason == "length" for h in handles)
    assert engine.snapshot().largest_batch == ROWS
    prepared = engine.render(req)
    with torch.inference_mode():
        out = engine.loaded.model.generate(**prepared.inputs, max_new_tokens=30, do_sample=False,
                                           eos_token_id=None, min_new_tokens=30)
    assert ids == out[0, prepared.inputs["input_ids"].shape[1]:].tolist()
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("sampling,param,message", [
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be in [-2, 2], got 2.5."),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
    ({"min_p": 1.5}, "min_p", "min_p must be in [0, 1], got 1.5."),
    ({"temperature": 2.5}, "temperature", "temperature must be in [0, 2], got 2.5."),
    ({"n": 0}, "n", "n must be at least 1, got 0."),
    ({"n": 2}, "n", "n must be 1 when using greedy sampling, got 2."),
    ({"n": ROWS + 1, "temperature": 1.0}, "n", f"n must be at most {ROWS}"),
    ({"logprobs": 21}, "logprobs", "Requested sample logprobs of 21, which is greater than "
                                   "max allowed: 20"),
    ({"logprobs": -1}, "logprobs", "Requested sample logprobs of 960"),
    ({"logprobs": -2}, "logprobs", "logprobs must be non-negative or -1, got -2."),
    ({"prompt_logprobs": 30}, "prompt_logprobs", "Requested prompt logprobs of 30"),
    ({"seed": 2 ** 64}, "seed", "seed must be a 64-bit integer"),
    ({"stop_token_ids": [5000]}, "stop_token_ids",
     "token_id(s) [5000] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: 960"),
    ({"logit_bias": {99999: 1.0}}, "logit_bias", "token_id(s) [99999] in logit_bias contain"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias",
     "logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc']"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "allowed_token_ids is not None and empty!"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids",
     "allowed_token_ids contains out-of-vocab token id!"),
    ({"bad_words": [""]}, "bad_words", "bad_words cannot contain an empty string."),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens",
     "truncate_prompt_tokens must be greater than or equal to -1"),
])
def test_bad_values_are_refused_naming_the_field(engine, sampling, param, message):
    with pytest.raises(InvalidRequestError) as info:
        engine.submit_choices(ask(**sampling))
    assert info.value.param == param and info.value.code == 400
    assert message in info.value.message


def test_any_64_bit_seed_is_accepted(engine):
    for seed in (-(2 ** 63), -5, 2 ** 63 - 1):
        _, ids, _, fin = run(engine.submit(ask(max_tokens=3, ignore_eos=True, temperature=1.0,
                                               seed=seed)))
        assert fin.reason == "length" and len(ids) == 3
