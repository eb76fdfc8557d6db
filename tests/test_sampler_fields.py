"""engine.sampler's vLLM fields (presence/frequency penalties, min_p, logit_bias,
allowed_token_ids, bad words, stop_token_ids under min_tokens, 64-bit seeds) and logprobs,
against transformers' own logits processors (and, for the penalties transformers lacks,
the OpenAI formula written out) and torch.log_softmax: one row inside a batch of rows
with other settings at a time, step by step."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.core.sampler import (
    RowSampler,
    RowSampling,
    bad_words_token_ids,
    process_logits,
    prompt_logprobs,
    resolve,
    sample,
    token_logprobs,
)
from engine.types import SamplingParams

V = 1000
EOS = (7, 11)
BARE = GenerationConfig(eos_token_id=list(EOS), pad_token_id=0)
STEPS = 12

# Row 3's logits are pushed toward these tokens step by step, so its bad words' prefixes
# are generated and their last tokens come up for banning.
PUSHED = {0: 10, 1: 20, 2: 30, 3: 40, 4: 50, 5: 3}


def settings(greedy=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             min_tokens=0, eos_ids=EOS, seed=None, **new) -> RowSampling:
    return RowSampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, min_tokens=min_tokens,
                       eos_ids=eos_ids, seed=seed, **new)


ALLOWED = tuple(sorted({*range(100, 160), *EOS, 500}))
BATCH = [
    settings(greedy=True, presence_penalty=0.5, frequency_penalty=0.3,
             logit_bias=((5, 3.0), (17, -100.0), (900, 6.0))),
    settings(temperature=0.8, top_k=30, min_p=0.1, repetition_penalty=1.2, seed=11),
    settings(temperature=1.2, allowed_token_ids=ALLOWED, min_tokens=2, seed=-7),
    settings(greedy=True, bad_words_ids=((3,), (10, 20), (30, 40, 50))),
    # generate's fields only
    settings(temperature=0.9, top_p=0.8, repetition_penalty=1.1, min_tokens=3, seed=3),
    settings(min_p=0.05, top_p=0.9, frequency_penalty=-0.5, presence_penalty=1.0,
             logit_bias=((42, 7.5),), bad_words_ids=((42,), (8, 9)), stop_token_ids=(600,),
             min_tokens=3, seed=2 ** 63 - 1),
    settings(greedy=True),
]


def uses_new_fields(rs: RowSampling) -> bool:
    return bool(rs.presence_penalty or rs.frequency_penalty or rs.min_p or rs.logit_bias
                or rs.allowed_token_ids is not None or rs.bad_words_ids or rs.stop_token_ids)


def oracle(rs: RowSampling, prompt: torch.Tensor, generated: list[int], raw: torch.Tensor,
           ) -> torch.Tensor:
    """One row's scores from transformers' processors: in generate's order for a row with
    generate's fields only, in vLLM v1's order otherwise. Bad words and the frequency and
    presence penalties see the generated tokens only, as in vLLM."""
    ids = torch.cat([prompt, torch.tensor(generated, dtype=torch.long)])[None]
    out_ids = torch.tensor(generated, dtype=torch.long)[None]
    x = raw[None].float().clone()
    stops = [*rs.eos_ids, *rs.stop_token_ids]
    min_new = (MinNewTokensLengthLogitsProcessor(len(prompt), rs.min_tokens, stops)
               if rs.min_tokens and stops else None)
    penalty = (RepetitionPenaltyLogitsProcessor(rs.repetition_penalty)
               if rs.repetition_penalty != 1.0 else None)
    if not uses_new_fields(rs):
        for proc in (penalty, min_new):
            x = proc(ids, x) if proc else x
    else:
        if rs.allowed_token_ids is not None:
            others = sorted(set(range(V)) - set(rs.allowed_token_ids))
            x = SuppressTokensLogitsProcessor(others)(ids, x)
        if rs.bad_words_ids:
            x = NoBadWordsLogitsProcessor([list(w) for w in rs.bad_words_ids])(out_ids, x)
        x = min_new(ids, x) if min_new else x
        if rs.logit_bias:
            x = SequenceBiasLogitsProcessor({(t,): b for t, b in rs.logit_bias})(ids, x)
        x = penalty(ids, x) if penalty else x
        counts = torch.bincount(out_ids[0], minlength=V).float()
        x = x - rs.frequency_penalty * counts               # OpenAI's formula, vLLM's order
        x = x - rs.presence_penalty * (counts > 0).float()
    if rs.greedy:
        return x
    warpers = LogitsProcessorList()
    if rs.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(rs.temperature))
    if rs.min_p:
        warpers.append(MinPLogitsWarper(rs.min_p))
    if rs.top_k:
        warpers.append(TopKLogitsWarper(rs.top_k))
    if rs.top_p < 1.0:
        warpers.append(TopPLogitsWarper(rs.top_p))
    return warpers(ids, x)


def generate_only(rs: RowSampling) -> RowSampling:
    """The same row without the fields transformers' generate lacks."""
    return settings(greedy=rs.greedy, temperature=rs.temperature, top_k=rs.top_k, top_p=rs.top_p,
                    repetition_penalty=rs.repetition_penalty, min_tokens=rs.min_tokens,
                    eos_ids=rs.eos_ids, seed=rs.seed)


def step_logits(gen: torch.Generator, step: int) -> torch.Tensor:
    logits = torch.randn(len(BATCH), V, generator=gen) * 4
    logits[:, list(EOS)] += 6
    logits[:, [600, 42, 9]] += 8
    logits[3, PUSHED.get(step, 0)] += 40
    return logits


def prompts(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, V, (int(torch.randint(3, 30, (1,), generator=gen)),), generator=gen)
            for _ in BATCH]


def test_each_row_of_a_mixed_batch_matches_transformers():
    """Every row's scores equal its own processors' (torch.equal), step by step; greedy rows
    pick their argmax and seeded rows torch.multinomial's draw from a generator of that
    seed; and each new field does change its row's scores (so a missing one fails)."""
    gen = torch.Generator().manual_seed(7)
    prompt = prompts(gen)
    rows = [RowSampler(rs, p, V, "cpu") for rs, p in zip(BATCH, prompt, strict=True)]
    draws = [torch.Generator().manual_seed(rs.seed) if rs.seed is not None else None
             for rs in BATCH]
    generated: list[list[int]] = [[] for _ in BATCH]
    changed = [False] * len(BATCH)
    for step in range(STEPS):
        logits = step_logits(gen, step)
        processed = process_logits(logits, rows)
        tokens = sample(logits, rows)
        for i, rs in enumerate(BATCH):
            expected = oracle(rs, prompt[i], generated[i], logits[i])
            assert torch.equal(processed[i:i + 1], expected), (step, i)
            plain = oracle(generate_only(rs), prompt[i], generated[i], logits[i])
            changed[i] |= not torch.equal(expected, plain)
            if rs.argmax:
                want = int(expected.argmax())
            else:
                want = int(torch.multinomial(expected.softmax(-1), 1, generator=draws[i]))
            assert tokens[i] == want, (step, i)
            rows[i].append(tokens[i])
            generated[i].append(tokens[i])
    assert changed == [uses_new_fields(rs) for rs in BATCH]
    assert all(t in ALLOWED for t in generated[2])
    assert generated[3][0] == 10 and generated[3][1] != 20          # bad word (10, 20)
    assert generated[3][2:4] == [30, 40] and generated[3][4] != 50  # (30, 40, 50)
    assert 3 not in generated[3] and 42 not in generated[5]
    assert not {600, *EOS} & set(generated[5][:3])


def test_rows_alone_equal_rows_in_batch():
    """A seeded or greedy row picks the same tokens alone as beside rows with other
    settings; a plain greedy row beside penalised ones takes the raw argmax."""
    gen = torch.Generator().manual_seed(8)
    prompt = prompts(gen)
    batch = [RowSampler(rs, p, V, "cpu") for rs, p in zip(BATCH, prompt, strict=True)]
    alone = [RowSampler(rs, p, V, "cpu") for rs, p in zip(BATCH, prompt, strict=True)]
    for step in range(STEPS):
        logits = step_logits(gen, step)
        in_batch = sample(logits, batch)
        assert in_batch[6] == int(logits[6].argmax())
        for i in range(len(BATCH)):
            token = sample(logits[i:i + 1], [alone[i]])[0]
            assert token == in_batch[i], (step, i)
            batch[i].append(token)
            alone[i].append(token)


@pytest.mark.parametrize("seed", [-2 ** 63, -5, 0, 2 ** 63 - 1, 2 ** 64 - 1])
def test_64_bit_seeds_draw_as_torch_generators_do(seed):
    """Any 64-bit seed, negative included, draws what torch.multinomial draws from a
    generator given that seed, and draws the same again."""
    rs = resolve(SamplingParams(temperature=1.0, top_k=-1, seed=seed), BARE, set(EOS))
    assert rs.seed == seed
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(1, V, generator=gen) for _ in range(6)]
    runs = []
    for _ in range(2):
        row = RowSampler(rs, torch.arange(4), V, "cpu")
        runs.append([sample(x, [row])[0] for x in logits])
    ref = torch.Generator().manual_seed(seed)
    assert runs[0] == runs[1] == [int(torch.multinomial(x.softmax(-1), 1, generator=ref))
                                  for x in logits]


def test_resolve_carries_vllm_fields():
    sp = SamplingParams(temperature=0.7, presence_penalty=0.4, frequency_penalty=-1.5, min_p=0.2,
                        logit_bias={3: 150.0, 9: -0.5, 4: -300.0}, allowed_token_ids=[9, 2, 9],
                        stop_token_ids=[12, 5], seed=-1)
    rs = resolve(sp, BARE, set(EOS), bad_words_ids=[[1, 2], [3]])
    assert (rs.presence_penalty, rs.frequency_penalty, rs.min_p) == (0.4, -1.5, 0.2)
    assert rs.logit_bias == ((3, 100.0), (4, -100.0), (9, -0.5))      # vLLM clamps to [-100, 100]
    assert rs.allowed_token_ids == (2, 9) and rs.bad_words_ids == ((1, 2), (3,))
    assert rs.stop_token_ids == (5, 12)
    assert rs.seed is None                                            # vLLM: seed -1 is no seed
    greedy = resolve(SamplingParams(temperature=0, min_p=0.5), BARE, set(EOS))
    assert greedy.greedy and greedy.min_p == 0.0                      # greedy ignores min_p
    assert resolve(SamplingParams(), BARE, set(EOS)).allowed_token_ids is None


def test_min_tokens_masks_stop_token_ids():
    logits = torch.zeros(1, V)
    logits[0, 600] = 9.0
    logits[0, 100] = 8.0
    rs = resolve(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[600]), BARE, set())
    row = RowSampler(rs, torch.arange(3), V, "cpu")
    picks = []
    for _ in range(3):
        picks += sample(logits, [row])
        row.append(picks[-1])
    assert picks == [100, 100, 600]


def test_bad_words_token_ids_as_vllm_tokenizes_them():
    """vLLM 0.32's SamplingParams.update_from_tokenizer on the tiny tokenizer gave these:
    each word bare and with a leading space, the spaced form only when it is another word
    of as many tokens; repeated words once."""
    from engine.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    words = ["is", " red", "color", "cat", "is", "  The end"]
    assert bad_words_token_ids(tokenizer, words) == [
        [588], [273], [668], [311], [66, 316, 362], [66, 314], [271, 368, 264], [298, 368, 264]]
    with pytest.raises(ValueError, match="bad_words entries must tokenize to at least one token"):
        bad_words_token_ids(tokenizer, ["  "])


def expected_logprobs(raw: torch.Tensor, token: int, k: int):
    lp = torch.log_softmax(raw.float(), dim=-1)
    return lp, float(lp[token]), int((lp >= lp[token]).sum()), lp.sort(descending=True).values[:k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_equal_log_softmax(dtype):
    """The chosen token's raw logprob, its rank (vLLM's: tokens at least as likely) and
    the top k, for the rows that asked; None for the rest."""
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(5, V, generator=gen) * 3).to(dtype)
    want = [3, None, 0, 20, 5]
    tokens = [int(t) for t in torch.randint(0, V, (5,), generator=gen)]
    tokens[4] = int(logits[4].float().argmax())
    out = token_logprobs(logits, want, tokens)
    assert out[1] is None
    for i, k in enumerate(want):
        if k is None:
            continue
        lp, chosen, rank, top = expected_logprobs(logits[i], tokens[i], k)
        got = out[i]
        assert (got.token_id, got.logprob, got.rank) == (tokens[i], chosen, rank)
        assert [v for _, v in got.top] == top.tolist()
        assert all(lp[t] == v for t, v in got.top) and len({t for t, _ in got.top}) == k
    assert out[4].top[0][1] == out[4].logprob   # the argmax (ties in bfloat16 share its rank)
    assert token_logprobs(logits, [None] * 5, tokens) == [None] * 5


@pytest.mark.parametrize("want", [
    [5, None, 5, None, 5, None], [None, 2, 2, 2, None, None], [None, None, None, None, None, 4],
    [3, 3, None, None, None, 3], [None, 1, None, None, 1, None]])
def test_token_logprobs_of_any_set_of_asking_rows(want):
    """Whichever rows ask (evenly spaced ones are read as a view, others copied), each gets
    its own row's figures."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(len(want), V, generator=gen) * 3
    tokens = [int(t) for t in logits.argmax(-1)]
    out = token_logprobs(logits, want, tokens)
    for i, k in enumerate(want):
        if k is None:
            assert out[i] is None
            continue
        _, chosen, rank, top = expected_logprobs(logits[i], tokens[i], k)
        assert (out[i].logprob, out[i].rank) == (chosen, rank)
        assert [v for _, v in out[i].top] == top.tolist()


def test_rank_counts_ties_as_vllm_does():
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    assert token_logprobs(logits, [1], [0])[0].rank == 2
    assert token_logprobs(logits, [1], [2])[0].rank == 3


def test_prompt_logprobs_equal_log_softmax():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(7, V, generator=gen) * 3
    targets = torch.randint(0, V, (7,), generator=gen)
    out = prompt_logprobs(logits, targets, 4)
    assert len(out) == 7
    for t, got in enumerate(out):
        _, chosen, rank, top = expected_logprobs(logits[t], int(targets[t]), 4)
        assert (got.token_id, got.logprob, got.rank) == (int(targets[t]), chosen, rank)
        assert [v for _, v in got.top] == top.tolist()
    assert prompt_logprobs(logits[:0], [], 4) == []
