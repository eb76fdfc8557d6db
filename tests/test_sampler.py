"""engine.sampler against transformers itself: a real `model.generate` call made with
generate_kwargs (the scores after its logits processors and the token it picks, step by
step, read through its public output_logits/output_scores), and the scores and tokens of
transformers' own logits processors, row by row, alone and in mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.core.sampler import RowSampler, RowSampling, process_logits, resolve, sample
from engine.inputs.validation import generate_kwargs
from engine.types import SamplingParams

V = 1000
EOS = (7, 11)

# Qwen2.5-VL-7B-Instruct's generation_config.json (engine/tiny.py uses the same values).
QWEN = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001,
        "top_k": 1}

CONFIGS = {
    "qwen": GenerationConfig(eos_token_id=list(EOS), pad_token_id=EOS[1], **QWEN),
    "bare": GenerationConfig(eos_token_id=list(EOS), pad_token_id=0),
    "sampling-no-top-k": GenerationConfig(eos_token_id=EOS[0], pad_token_id=0, do_sample=True,
                                          temperature=0.7, top_p=0.9),
    "greedy-penalty-min": GenerationConfig(eos_token_id=list(EOS), pad_token_id=0,
                                           do_sample=False, repetition_penalty=1.2,
                                           min_new_tokens=2),
}

PARAMS = {
    "defaults": SamplingParams(),
    "t0": SamplingParams(temperature=0),
    "t0.8": SamplingParams(temperature=0.8),
    "t0.8-k-off-p": SamplingParams(temperature=0.8, top_k=-1, top_p=0.95),
    "k0": SamplingParams(top_k=0),
    "t1.3-k20-pen-min": SamplingParams(temperature=1.3, top_k=20, repetition_penalty=1.3,
                                       min_tokens=3),
    "t1.3-k20-p1": SamplingParams(temperature=1.3, top_k=20, top_p=1.0),   # top-k alone
    "t1-p0.5-seed": SamplingParams(temperature=1.0, top_p=0.5, seed=3),
    "pen1": SamplingParams(repetition_penalty=1.0),
    "greedy-pen-min": SamplingParams(temperature=0, repetition_penalty=0.8, min_tokens=4),
    "ignore-eos-min": SamplingParams(ignore_eos=True, min_tokens=2),
}

STEPS = 12


@pytest.fixture(scope="module")
def model(tiny_random_model_dir):
    """The tiny model with random weights: its logits are spread over the vocabulary, so
    the warpers cut somewhere in the middle and sampling rarely picks the argmax."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_random_model_dir).eval()


def generate_steps(model, sp: SamplingParams, config: GenerationConfig, prompt: torch.Tensor,
                   seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """A real `model.generate` call made with generate_kwargs(sp, config), config being the
    model's generation_config, from torch's generator seeded with `seed`: each step's raw
    logits, its scores after generate's logits processors, and the token it picked."""
    model.generation_config = copy.deepcopy(config)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                             **generate_kwargs(sp, config, STEPS), output_scores=True,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return [x.float() for x in out.logits], [x.float() for x in out.scores], tokens


@pytest.mark.parametrize("config_name", CONFIGS)
def test_resolve_matches_generate(model, config_name):
    """resolve() does what a real generate call does, step by step on the model's own
    logits: the same scores after every processor and warper (penalty, min_tokens,
    temperature, top-k, top-p), and the same token from the same seed (greedy where generate
    is greedy, the same draw where it samples)."""
    config = CONFIGS[config_name]
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 800, (12,), generator=gen)
    eos = config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}   # as the engine core reads them
    for name, sp in PARAMS.items():
        seed = sp.seed if sp.seed is not None else 1234
        logits, scores, tokens = generate_steps(model, sp, config, prompt, seed)
        rs = resolve(sp, config, eos_ids)
        assert rs.seed == sp.seed
        assert len(tokens) > min(rs.min_tokens, STEPS - 1), name
        row = RowSampler(rs, prompt, vocab, "cpu")
        torch.manual_seed(seed)          # an unseeded row draws from torch's generator
        for step, (raw, expected, token) in enumerate(zip(logits, scores, tokens, strict=True)):
            assert torch.equal(process_logits(raw, [row]), expected), (name, step)
            assert sample(raw, [row]) == [token], (name, step)
            row.append(token)


def test_resolve_qwen_semantics():
    """The Qwen2.5-VL defaults, and how request fields override them."""
    qwen = CONFIGS["qwen"]
    rs = resolve(SamplingParams(), qwen, set(EOS))
    assert (rs.greedy, rs.argmax, rs.top_k, rs.top_p) == (False, True, 1, 0.001)
    assert rs.temperature == 0.1
    assert rs.repetition_penalty == 1.05 and rs.eos_ids == EOS
    # A temperature alone keeps the model's top_k=1: still the argmax.
    rs = resolve(SamplingParams(temperature=0.7), qwen, set(EOS))
    assert (rs.greedy, rs.argmax, rs.temperature) == (False, True, 0.7)
    rs = resolve(SamplingParams(temperature=0.7, top_k=-1, top_p=1.0), qwen, set(EOS))
    assert (rs.argmax, rs.top_k, rs.top_p) == (False, 0, 1.0)
    rs = resolve(SamplingParams(temperature=0, seed=5), qwen, set(EOS))
    assert (rs.greedy, rs.temperature, rs.top_k, rs.top_p, rs.seed) == (True, 1.0, 0, 1.0, 5)
    assert resolve(SamplingParams(ignore_eos=True), qwen, set(EOS)).eos_ids == ()
    # Fields unset in the request and the model's config take transformers' defaults.
    rs = resolve(SamplingParams(), GenerationConfig(do_sample=True), set())
    assert (rs.greedy, rs.temperature, rs.top_k, rs.top_p, rs.repetition_penalty) == (
        False, 1.0, 50, 1.0, 1.0)
    assert resolve(SamplingParams(), GenerationConfig(), set()).greedy


def hf_processors(rs: RowSampling, prompt_len: int) -> LogitsProcessorList:
    """transformers' processors for one row, in generate's order."""
    procs = LogitsProcessorList()
    if rs.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(rs.repetition_penalty))
    if rs.min_tokens and rs.eos_ids:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, rs.min_tokens, list(rs.eos_ids)))
    if not rs.greedy:
        if rs.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(rs.temperature))
        if rs.top_k:
            procs.append(TopKLogitsWarper(rs.top_k, min_tokens_to_keep=1))
        if rs.top_p < 1.0:
            procs.append(TopPLogitsWarper(rs.top_p, min_tokens_to_keep=1))
    return procs


def settings(greedy=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             min_tokens=0, eos_ids=EOS, seed=None) -> RowSampling:
    return RowSampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, min_tokens=min_tokens,
                       eos_ids=eos_ids, seed=seed)


MIXED = [
    settings(greedy=True, repetition_penalty=1.3),
    settings(greedy=True, min_tokens=4),
    settings(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, min_tokens=2, seed=1),
    settings(temperature=1.5, top_p=0.6, seed=2),
    settings(temperature=0.9, seed=3),
    settings(greedy=True, repetition_penalty=0.7, min_tokens=3, eos_ids=()),
    settings(temperature=2.0, top_k=5, repetition_penalty=1.1, seed=4),
]


def make_rows(rows_settings, prompts, reciprocal=None) -> list[RowSampler]:
    return [RowSampler(rs, p, V, "cpu", reciprocal)
            for rs, p in zip(rows_settings, prompts, strict=True)]


def random_prompts(gen: torch.Generator, n: int) -> list[torch.Tensor]:
    prompts = [torch.randint(0, V, (int(torch.randint(3, 40, (1,), generator=gen)),),
                             generator=gen) for _ in range(n)]
    prompts[0] = torch.cat([prompts[0], torch.tensor([V + 3, V])])   # ids past the vocabulary
    return prompts


def step_logits(gen: torch.Generator, batch: int) -> torch.Tensor:
    logits = torch.randn(batch, V, generator=gen) * 4
    logits[:, list(EOS)] += 6
    return logits


def test_mixed_batch_matches_transformers_step_by_step():
    """Every row of a mixed batch: scores equal to its transformers processors, greedy rows
    their argmax, seeded rows torch.multinomial's draw with a generator of that seed."""
    gen = torch.Generator().manual_seed(1)
    prompts = random_prompts(gen, len(MIXED))
    rows = make_rows(MIXED, prompts)
    procs = [hf_processors(rs, len(p)) for rs, p in zip(MIXED, prompts, strict=True)]
    hf_gens = [torch.Generator().manual_seed(rs.seed) if rs.seed is not None else None
               for rs in MIXED]
    ids = [p.clone() for p in prompts]
    for step in range(12):
        logits = step_logits(gen, len(rows))
        processed = process_logits(logits, rows)
        tokens = sample(logits, rows)
        for i, rs in enumerate(MIXED):
            expected = procs[i](ids[i][None], logits[i:i + 1].clone())
            assert torch.equal(processed[i:i + 1], expected), (step, i)
            if rs.greedy:
                want = int(expected.argmax())
            else:
                want = int(torch.multinomial(expected.softmax(-1), 1, generator=hf_gens[i]))
            assert tokens[i] == want, (step, i)
            if rs.min_tokens and rs.eos_ids and step < rs.min_tokens:
                assert tokens[i] not in EOS
            rows[i].append(tokens[i])
            ids[i] = torch.cat([ids[i], torch.tensor([tokens[i]])])


def test_rows_alone_equal_rows_in_batch():
    """A seeded or greedy row picks the same tokens alone as beside other rows, unseeded
    sampling rows (the shared default generator) included."""
    batch_settings = [MIXED[2], settings(temperature=1.0), MIXED[0], MIXED[3],
                      settings(temperature=1.2, top_p=0.8), MIXED[1], MIXED[6]]
    gen = torch.Generator().manual_seed(2)
    prompts = random_prompts(gen, len(batch_settings))
    batch = make_rows(batch_settings, prompts)
    alone = make_rows(batch_settings, prompts)
    for _ in range(10):
        logits = step_logits(gen, len(batch))
        in_batch = sample(logits, batch)
        for i, rs in enumerate(batch_settings):
            if rs.greedy or rs.seed is not None:
                token = sample(logits[i:i + 1], [alone[i]])[0]
                assert token == in_batch[i]
            else:
                token = in_batch[i]
            batch[i].append(in_batch[i])
            alone[i].append(token)


def test_seeded_rows_repeat():
    gen = torch.Generator().manual_seed(3)
    logits = [step_logits(gen, 1) for _ in range(8)]
    prompt = torch.arange(10)

    def run():
        row = RowSampler(settings(temperature=1.5, seed=42), prompt, V, "cpu")
        out = []
        for x in logits:
            out += sample(x, [row])
            row.append(out[-1])
        return out

    first = run()
    assert run() == first
    assert len(set(first)) > 1   # it does sample


def test_top_k_1_and_tiny_top_p_pick_the_argmax():
    gen = torch.Generator().manual_seed(4)
    rows = make_rows([settings(temperature=2.0, top_k=1), settings(temperature=1.5, top_p=1e-9),
                      settings(temperature=0.1, top_k=1, top_p=0.001, seed=9)],
                     [torch.arange(5)] * 3)
    assert rows[0].settings.argmax and not rows[1].settings.argmax
    for _ in range(20):
        logits = torch.randn(3, V, generator=gen)
        assert sample(logits, rows) == logits.argmax(-1).tolist()


def test_min_tokens_masks_every_eos_and_ignore_eos_does_not():
    qwen = CONFIGS["qwen"]
    logits = torch.zeros(4, V)
    logits[:, EOS[0]] = 9.0
    logits[:, EOS[1]] = 8.0
    logits[:, 100] = 7.0
    params = [SamplingParams(temperature=0, min_tokens=3),
              SamplingParams(temperature=1.0, top_k=-1, min_tokens=3),
              SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0)]
    rows = [RowSampler(resolve(sp, qwen, set(EOS)), torch.arange(3), V, "cpu") for sp in params]
    assert rows[2].settings.eos_ids == ()
    picks = []
    for _ in range(4):
        picks.append(sample(logits, rows))
        for row, token in zip(rows, picks[-1], strict=True):
            row.append(token)
    assert [p[0] for p in picks] == [100, 100, 100, EOS[0]]
    assert all(p[1] not in EOS for p in picks[:3])
    assert [p[2] for p in picks] == [EOS[0]] * 4
    assert [p[3] for p in picks] == [EOS[0]] * 4


def test_half_precision_and_inputs_untouched():
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, V, generator=gen) * 4).to(torch.bfloat16)
    greedy = make_rows([settings(greedy=True)] * 3, [torch.arange(4)] * 3)
    assert sample(logits, greedy) == logits.float().argmax(-1).tolist()
    mixed = make_rows(MIXED[:3], [torch.arange(4)] * 3)
    expected = [hf_processors(rs, 4)(torch.arange(4)[None], logits[i:i + 1].float())
                for i, rs in enumerate(MIXED[:3])]
    assert torch.equal(process_logits(logits, mixed), torch.cat(expected))
    full = logits.float()
    before = full.clone()
    sample(full, mixed)
    assert torch.equal(full, before)


def test_shape_mismatch_is_an_error():
    rows = make_rows([settings(greedy=True)], [torch.arange(3)])
    with pytest.raises(ValueError):
        sample(torch.zeros(2, V), rows)
    with pytest.raises(ValueError):
        sample(torch.zeros(1, V + 1), rows)


def test_reciprocal_division_path():
    """The CUDA flavour (multiply by the reciprocal, as PyTorch's CUDA division by a Python
    scalar does), run on CPU: scores within float rounding of transformers', same argmax."""
    gen = torch.Generator().manual_seed(6)
    prompts = random_prompts(gen, len(MIXED))
    rows = make_rows(MIXED, prompts, reciprocal=True)
    assert all(r.reciprocal for r in rows)
    logits = step_logits(gen, len(rows))
    processed = process_logits(logits, rows)
    for i, rs in enumerate(MIXED):
        expected = hf_processors(rs, len(prompts[i]))(prompts[i][None], logits[i:i + 1].clone())
        assert torch.equal(processed[i:i + 1].isinf(), expected.isinf())
        torch.testing.assert_close(processed[i:i + 1], expected, rtol=1e-6, atol=1e-6)
    tokens = sample(logits, rows)
    assert [tokens[i] for i, rs in enumerate(MIXED) if rs.greedy] == [
        int(processed[i].argmax()) for i, rs in enumerate(MIXED) if rs.greedy]
