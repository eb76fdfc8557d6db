"""Structured outputs through the engine on the built-in tiny model: random constraints with
random sampling all parse and validate; a constrained row leaves the free rows beside it as
they were; a greedy answer that already obeys a constraint is unchanged by it."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError
from engine.types import (Conversation, GenerationRequest, Message, SamplingParams,
                          StructuredOutput)
from tests.structured_cases import FORMS, random_case

QUESTIONS = ["How many shapes are there? Answer in JSON.", "What colours do you see?",
             "Describe the picture.", "List the shapes."]


def _request(question: str, **sampling) -> GenerationRequest:
    return GenerationRequest(Conversation([Message("user", question)]), SamplingParams(**sampling))


@pytest.mark.parametrize("form", FORMS)
def test_random_constraints_all_parse(tiny_engine, form):
    """100 requests per form, sent 10 at a time (so constrained rows share steps), with
    random constraints, temperatures, top-p and seeds."""
    rng = random.Random(f"engine-{form}")
    cases = []
    for i in range(100):
        fields, check = random_case(form, rng)
        sampling = dict(max_tokens=rng.choice([64, 128]), temperature=rng.choice([0, 0.8, 1.3]),
                        top_k=rng.choice([None, 0, 20]), top_p=rng.choice([None, 0.9]),
                        seed=rng.randrange(2**32), structured=StructuredOutput(**fields))
        cases.append((_request(rng.choice(QUESTIONS), **sampling), check, fields))
    for start in range(0, len(cases), 10):
        batch = cases[start:start + 10]
        handles = []
        for req, _, fields in batch:
            try:
                handles.append(tiny_engine.submit(req))
            except InvalidRequestError as exc:   # a budget below the shortest answer
                assert "too few" in str(exc), (fields, exc)
                handles.append(None)
        for handle, (req, check, fields) in zip(handles, batch):
            if handle is None:
                continue
            text, finished = handle.collect(timeout=120)
            assert finished.reason == "stop", finished     # EOS inside the budget
            try:
                check(text)
            except Exception as exc:
                raise AssertionError(f"{fields} with {req.sampling} gave {text!r}") from exc


def _greedy(engine, question: str, **extra) -> str:
    return engine.generate(_request(question, max_tokens=24, temperature=0, **extra),
                           timeout=60)[0]


def test_a_constrained_row_leaves_free_rows_unchanged(tiny_engine):
    alone = [_greedy(tiny_engine, q) for q in QUESTIONS]
    schema = {"type": "object", "properties": {"count": {"type": "integer"}},
              "required": ["count"]}
    constrained = [tiny_engine.submit(_request(q, max_tokens=24, temperature=1.0, seed=i,
                                               structured=StructuredOutput(json=schema)))
                   for i, q in enumerate(QUESTIONS)]
    free = [tiny_engine.submit(_request(q, max_tokens=24, temperature=0)) for q in QUESTIONS]
    assert [h.collect(timeout=60)[0] for h in free] == alone
    for handle in constrained:
        assert handle.collect(timeout=60)[0].startswith('{"count":')


def test_an_answer_that_obeys_the_constraint_is_unchanged(tiny_engine):
    for question in QUESTIONS:
        free = _greedy(tiny_engine, question)
        for spec in (StructuredOutput(regex=re.escape(free) if free else "x?"),
                     StructuredOutput(choice=(free or "x", free + " and more"))):
            assert _greedy(tiny_engine, question, structured=spec) == free, (spec, free)


def test_a_budget_below_the_shortest_answer_is_refused(tiny_engine):
    schema = {"type": "object", "properties": {"colours": {"type": "array", "minItems": 3,
              "items": {"type": "string", "enum": ["red", "green"]}}}, "required": ["colours"]}
    started = time.monotonic()
    with pytest.raises(InvalidRequestError, match="too few") as info:
        tiny_engine.submit(_request("x", max_tokens=5, structured=StructuredOutput(json=schema)))
    assert info.value.param == "max_tokens" and time.monotonic() - started < 1


def test_n_choices_each_follow_the_constraint(tiny_engine):
    req = _request("What colours?", max_tokens=40, temperature=1.2, top_k=0, seed=5, n=3,
                   structured=StructuredOutput(choice=("red", "green", "blue")))
    texts = [h.collect(timeout=60)[0] for h in tiny_engine.submit_choices(req)]
    assert len(texts) == 3 and all(t in ("red", "green", "blue") for t in texts)


def test_the_engine_runs_without_llguidance(tiny_model_dir):
    """bench/gpu.sh runs on a bare PyTorch image, without llguidance: the engine still
    serves free requests, and a constraint is refused with one line naming what is missing."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["llguidance"] = None            # as if it were not installed
        from engine.backends.local import LocalEngine
        from engine.config import EngineConfig
        from engine.errors import InvalidRequestError
        from engine.types import (Conversation, GenerationRequest, Message, SamplingParams,
                                  StructuredOutput)
        engine = LocalEngine.from_config(EngineConfig(model={str(tiny_model_dir)!r},
                                                      device="cpu", warmup=False))
        def ask(**extra):
            return GenerationRequest(Conversation([Message("user", "What colours?")]),
                                     SamplingParams(max_tokens=4, temperature=0, **extra))
        text, finished = engine.generate(ask(), timeout=60)
        print("free:", finished.reason)
        try:
            engine.submit(ask(structured=StructuredOutput(json_object=True)))
        except InvalidRequestError as exc:
            print("refused:", exc.param, exc)
        engine.close()
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "free: length" in done.stdout
    assert "refused: structured_outputs This server was installed without llguidance" \
        in done.stdout
