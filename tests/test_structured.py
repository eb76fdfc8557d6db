"""Constrained decoding's pieces (engine.structured) on the tiny model's tokenizer: every
answer a random sampler writes under a constraint parses and validates, within its token
budget; malformed and hostile constraints are refused quickly."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from transformers import AutoTokenizer

from engine.errors import InvalidRequestError
from engine.structured.compiler import GrammarCompiler
from engine.structured.row import (ClosingTokens, RowGrammar, apply_mask, opening_path,
                                   shortest_answer, step_mask)
from engine.tiny import ensure_tiny
from engine.types import StructuredOutput
from tests.structured_cases import FORMS, random_case

VOCAB = 1000   # the tiny model's lm_head is larger than its tokenizer, as the 7B's is


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_tiny())


@pytest.fixture(scope="module")
def eos(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="module")
def compiler(tokenizer, eos):
    return GrammarCompiler(tokenizer, VOCAB, [eos])


@pytest.fixture(scope="module")
def closers(tokenizer, eos):
    return ClosingTokens.of(tokenizer, eos)


def write(compiler, closers, tokenizer, spec, max_tokens, rng, temperature=1.0, eos=True):
    """An answer sampled from random logits under the constraint, as the engine steps a row;
    with `eos`, it must end with EOS within `max_tokens` (EOS counted, as vLLM counts it)."""
    grammar = compiler.compile(spec)
    closers = closers.for_kind(spec.kind())
    path = opening_path(grammar, closers)      # as the engine gives it each row
    shortest = len(path)
    row = RowGrammar(grammar, closers, max_tokens, path)
    end = closers.eos
    out: list[int] = []
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for _ in range(max_tokens):
        logits = apply_mask(torch.randn(1, VOCAB, generator=gen) * 3,
                            step_mask([row], VOCAB, torch.device("cpu")))
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
        token = row.settle(token)
        if token == end:
            return tokenizer.decode(out), shortest
        assert row.accept(token), tokenizer.decode(out + [token])
        out.append(token)
    assert not eos, f"no EOS within {max_tokens} tokens: {tokenizer.decode(out)!r}"
    return tokenizer.decode(out), shortest


@pytest.mark.parametrize("form", FORMS)
def test_every_constrained_answer_parses_and_validates(form, compiler, closers, tokenizer):
    rng = random.Random(f"structured-{form}")
    for i in range(100):
        fields, check = random_case(form, rng)
        spec = StructuredOutput(**fields)
        shortest = shortest_answer(compiler.compile(spec), closers.for_kind(spec.kind()))
        assert shortest is not None, fields
        # the engine refuses a max_tokens below the shortest answer less its EOS (tested
        # through the API); one that leaves the EOS no room may end without it
        max_tokens = max(rng.choice([48, 96, 200]), shortest - 1)
        text, _ = write(compiler, closers, tokenizer, spec, max_tokens, rng,
                        temperature=rng.choice([0, 0.7, 1.0, 1.5]),
                        eos=max_tokens >= shortest)
        try:
            check(text)
        except Exception as exc:
            raise AssertionError(f"case {i}: {fields} gave {text!r}: {exc}") from exc


def test_a_tight_budget_still_closes(compiler, closers, tokenizer):
    """Budgets just above the shortest answer: the closing path takes over in time."""
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "integer"}, "minItems": 4,
                    "maxItems": 4}, "label": {"type": "string"}},
        "required": ["bbox_2d", "label"]}}
    spec = StructuredOutput(json=schema)
    rng = random.Random(7)
    for budget in (4, 10, 30, 31, 40, 60):
        for _ in range(20):
            text, _ = write(compiler, closers, tokenizer, spec, budget, rng)
            assert isinstance(json.loads(text), list)


@pytest.mark.parametrize("spec, closed", [
    (StructuredOutput(json={"type": "object", "properties": {
        "count": {"type": "integer"}, "colours": {"type": "array", "minItems": 2,
                                                  "items": {"type": "string"}}},
        "required": ["count", "colours"]}),
     lambda text: len(json.loads(text)["colours"]) >= 2),
    (StructuredOutput(regex=r"(red|green|blue)(, (red|green|blue))+"),
     lambda text: re.fullmatch(r"(red|green|blue)(, (red|green|blue))+", text)),
    (StructuredOutput(grammar='start: "The answer is " /[a-z]+/ "."'),
     lambda text: re.fullmatch(r"The answer is [a-z]+\.", text))])
def test_a_budget_of_the_shortest_answer_ends_with_eos(spec, closed, compiler, closers,
                                                        tokenizer):
    """max_tokens equal to the shortest answer (EOS counted, as vLLM counts it), and one or
    two more: every answer closes and ends with EOS inside the budget (`write` fails
    otherwise), so a forced close finishes as "stop", not "length". One token less leaves
    the EOS no room: the answer still closes, on the budget's last token."""
    shortest = shortest_answer(compiler.compile(spec), closers.for_kind(spec.kind()))
    rng = random.Random(9)
    for budget in (shortest - 1, shortest, shortest + 1, shortest + 2):
        for _ in range(15):
            text, _ = write(compiler, closers, tokenizer, spec, budget, rng, temperature=1.5,
                            eos=budget >= shortest)
            assert closed(text), text


def test_no_free_whitespace(compiler, closers, tokenizer):
    """vLLM's JSON grammar lets a weak model write whitespace forever; ours allows none."""
    rng = random.Random(3)
    for _ in range(30):
        text, _ = write(compiler, closers, tokenizer, StructuredOutput(json_object=True), 64, rng)
        assert not any(c in text for c in "\n\t\r"), text
        json.loads(text)


@pytest.mark.parametrize("spec, words", [
    (StructuredOutput(regex="((("), "regex"),
    (StructuredOutput(json="{not json"), "not valid JSON"),
    (StructuredOutput(json=[1, 2]), "JSON object"),
    (StructuredOutput(grammar="start: undefined_rule"), "grammar"),
    (StructuredOutput(choice=()), "choice"),
    (StructuredOutput(regex="a", choice=("b",)), "exactly one"),
    (StructuredOutput(json={"type": "object"}, json_object=True), "exactly one"),
])
def test_malformed_constraints_are_refused_quickly(compiler, spec, words):
    started = time.monotonic()
    with pytest.raises(InvalidRequestError, match=words) as info:
        compiler.compile(spec)
    assert time.monotonic() - started < 1.0
    assert info.value.param == "structured_outputs"


def _deep(levels: int) -> dict:
    schema: dict = {"type": "object", "properties": {}}
    node = schema
    for _ in range(levels):
        child = {"type": "object", "properties": {}}
        node["properties"]["a"] = child
        node = child
    return schema


@pytest.mark.parametrize("spec", [
    StructuredOutput(json={"type": "string", "enum": [f"item{i}" for i in range(100_000)]}),
    StructuredOutput(json=_deep(200)),
    StructuredOutput(json={"type": "object", "properties": {
        f"p{i}": {"type": "string", "enum": [f"v{i}-{j}" for j in range(200)]}
        for i in range(300)}}),
    StructuredOutput(regex="(a|b|c|d|e|f|g|h){1,2000}(x{1,500}){1,500}"),
    StructuredOutput(choice=tuple(f"c{i}" for i in range(5000))),
])
def test_hostile_constraints_are_refused_or_bounded(compiler, spec):
    """Huge enums, deep nesting, wide objects, exploding repetitions: refused, or compiled,
    within two seconds either way (xgrammar took 217 s over the first)."""
    started = time.monotonic()
    try:
        compiler.compile(spec)
    except InvalidRequestError as exc:
        assert exc.param == "structured_outputs"
    assert time.monotonic() - started < 2.0


def test_compiled_grammars_are_cached(tokenizer, eos):
    compiler = GrammarCompiler(tokenizer, VOCAB, [eos])
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    first = compiler.compile(StructuredOutput(json=schema))
    again = compiler.compile(StructuredOutput(json=json.dumps(schema)))
    assert again is first and (compiler.hits, compiler.misses) == (1, 1)


def test_cache_stays_within_its_budget(tokenizer, eos):
    compiler = GrammarCompiler(tokenizer, VOCAB, [eos], cache_chars=2000)
    for i in range(50):
        compiler.compile(StructuredOutput(regex=f"a{{{i + 1}}}"))
    assert compiler.cached_chars() <= 2000


def test_step_masks_from_bytes_and_from_words_agree(compiler, closers, tokenizer):
    """The CPU's mask (llguidance's byte per token) and an accelerator's (its bitmask words,
    unpacked by tensor operations, run here on the CPU) forbid the same tokens, for a batch
    of constrained and free rows, along answers; and the masked logits keep every allowed
    token's value."""
    rng = random.Random(11)
    cpu = torch.device("cpu")
    specs = [StructuredOutput(json_object=True), StructuredOutput(regex=r"[a-c]{2,5}\d+"),
             StructuredOutput(choice=("red", "green", "blue"))]
    rows = [None] + [RowGrammar(compiler.compile(s), closers.for_kind(s.kind()), 64)
                     for s in specs]
    for _ in range(6):
        from_bytes = step_mask(rows, VOCAB, cpu)
        from_words = step_mask(rows, VOCAB, cpu, packed=True)
        assert from_bytes.shape == (len(rows), VOCAB) and from_bytes.dtype == torch.bool
        assert torch.equal(from_bytes, from_words)
        assert not from_bytes[0].any()                    # the free row
        for i, row in enumerate(rows[1:], 1):             # a lone row: the same mask
            assert torch.equal(step_mask([row], VOCAB, cpu)[0], from_bytes[i])
        logits = torch.randn(len(rows), VOCAB)
        masked = apply_mask(logits, from_bytes)
        assert torch.equal(masked[~from_bytes], logits[~from_bytes])
        assert torch.isneginf(masked[from_bytes]).all()
        for row, forbidden in zip(rows[1:], from_bytes[1:]):
            allowed = torch.nonzero(~forbidden).flatten().tolist()
            if allowed and not row.stopped:
                assert row.accept(rng.choice(allowed))


def test_a_mask_shorter_than_the_logits_forbids_the_rest(tokenizer, eos, closers):
    """Logits wider than the grammar's vocabulary (an lm_head padded past the tokenizer):
    the extra tokens are forbidden, on both paths."""
    narrow = GrammarCompiler(tokenizer, VOCAB - 40, [eos])
    row = RowGrammar(narrow.compile(StructuredOutput(json_object=True)), closers, 64)
    for packed in (False, True):
        forbidden = step_mask([row, None], VOCAB, torch.device("cpu"), packed=packed)
        assert forbidden[0, VOCAB - 40:].all() and not forbidden[1].any()
