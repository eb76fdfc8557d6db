"""What the per-row request fields cost the engine (issues 32 and 33), each measured side by
side with its plain counterpart in one run, as ratios (the VM drifts 10 to 30 % between
runs, so only ratios within a run are compared):

- penalties and logprobs: 8 greedy rows, half of them with presence, frequency and repetition
  penalties and logprobs (top 5), against 8 plain greedy rows; decode tokens/s of the batch.
- a constrained answer (a JSON schema) against a free answer on the same prompt, one row at a
  time; decode tokens/s of each.
- compiling a typical JSON schema: cold (a new schema) and cached (the same schema again),
  what a request pays in its submitting thread before it is queued.

    python bench/fields.py --model tiny [--max-tokens 128] [--pairs 30]
    python bench/fields.py --full-size --layers 1 --vision-layers 1 --device cpu \
        --dtype bfloat16 --max-tokens 32 --pairs 6     # the 7B's shapes, random weights

The machine's speed drifts within seconds, so each case runs `--pairs` back-to-back pairs
(baseline and case, the order alternating) and its ratio is the median of the pairs', given
with the middle half of them (the quartiles), so a run shows how far its noise reaches."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_bench_args, build_engine, describe_run, median,  # noqa: E402
                          percentile, print_table, setup)
from engine.types import (Conversation, GenerationRequest, Message, SamplingParams,  # noqa: E402
                          StructuredOutput)

GOAL_FIELDS_RATIO = 0.9        # issue 32: half the rows with penalties and logprobs / plain
GOAL_CONSTRAINED_RATIO = 0.9   # issue 33: a constrained answer / a free one
ROWS = 8
PROMPT = "List the shapes in the picture with their colours and counts."
# A typical extraction schema: strings, a number, an array of objects.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "count": {"type": "integer"},
        "shapes": {"type": "array", "items": {
            "type": "object",
            "properties": {"label": {"type": "string"},
                           "colour": {"type": "string", "enum": ["red", "green", "blue",
                                                                 "yellow", "other"]},
                           "bbox_2d": {"type": "array", "items": {"type": "integer"},
                                       "minItems": 4, "maxItems": 4}},
            "required": ["label", "colour", "bbox_2d"]}},
    },
    "required": ["summary", "count", "shapes"],
}
FIELDS = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logprobs=5)


@dataclass
class Batch:
    """A batch of requests submitted together: decode tokens and the decode window."""

    tokens: int          # output tokens after each row's first
    span_s: float        # the last row's first token to the last row's end
    texts: list[str]

    @property
    def tps(self) -> float:
        return self.tokens / self.span_s if self.span_s > 0 else 0.0


def request(max_tokens: int, text: str = PROMPT, **sampling: Any) -> GenerationRequest:
    """A text question, greedy unless `sampling` says otherwise."""
    sampling.setdefault("temperature", 0)
    return GenerationRequest(Conversation([Message("user", text)]),
                             SamplingParams(max_tokens=max_tokens, **sampling))


def run_batch(engine: Any, requests: list[GenerationRequest]) -> Batch:
    """Submit all at once; the decode window starts when every row has its first token."""
    handles = [engine.submit(r) for r in requests]
    done = [h.collect(timeout=600) for h in handles]
    firsts, ends, tokens = [], [], 0
    for req, (_, fin) in zip(requests, done):
        if fin.reason == "error":
            raise RuntimeError(f"request failed: {fin.error}")
        # the stats' times run from the request's arrival (time.monotonic)
        firsts.append(req.arrival_time + (fin.stats.ttft_s or 0.0))
        ends.append(req.arrival_time + fin.stats.total_s)
        tokens += max(fin.stats.output_tokens - 1, 0)
    return Batch(tokens, max(ends) - max(firsts), [t for t, _ in done])


def rows(max_tokens: int, mixed: bool) -> list[GenerationRequest]:
    """8 greedy fixed-length rows; with `mixed`, every other one has FIELDS."""
    return [request(max_tokens, ignore_eos=True, **(FIELDS if mixed and i % 2 == 0 else {}))
            for i in range(ROWS)]


def bench_fields(engine: Any, max_tokens: int, pairs: int) -> list[tuple[Batch, Batch]]:
    """`pairs` back-to-back pairs of batches (plain and mixed, the order alternating, so that
    each pair shares the machine's state of the moment)."""
    out = []
    for i in range(pairs):
        first, second = (False, True) if i % 2 == 0 else (True, False)
        runs = {mixed: run_batch(engine, rows(max_tokens, mixed)) for mixed in (first, second)}
        out.append((runs[False], runs[True]))
    return out


def bench_constrained(engine: Any, max_tokens: int, pairs: int) -> list[tuple[Batch, Batch]]:
    """`pairs` pairs of one answer each: under SCHEMA (it ends when it closes, within
    `max_tokens`: near a short budget every step plays its closing path), and free on the
    same prompt for as many tokens, so that both decode over the same lengths (the free one
    first in every other pair)."""
    spec = StructuredOutput(json=SCHEMA)
    length = None
    out = []
    for i in range(pairs):
        free = run_batch(engine, [request(length, ignore_eos=True)]) \
            if i % 2 and length else None
        constrained = run_batch(engine, [request(max_tokens, structured=spec)])
        json.loads(constrained.texts[0])      # it parses, or the bench fails
        length = constrained.tokens + 1
        if free is None or free.tokens != constrained.tokens:
            free = run_batch(engine, [request(length, ignore_eos=True)])
        out.append((free, constrained))
    return out


def bench_compile(engine: Any, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to prepare SCHEMA for a request (engine._constraint: compile, or the cache,
    and the shortest-answer check): cold with a schema never seen (a fresh title each time),
    then cached (the same schema again)."""
    cold, cached = [], []
    for i in range(repeats):
        schema = dict(SCHEMA, title=f"bench-{time.time_ns()}-{i}")
        req = request(256, structured=StructuredOutput(json=schema))
        prompt = engine.render(req)
        for times in (cold, cached):
            start = time.perf_counter()
            engine._constraint(req, prompt)
            times.append(time.perf_counter() - start)
    return cold, cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per row")
    parser.add_argument("--constrained-max-tokens", type=int, default=64,
                        help="the constrained answer's max_tokens (it closes before; a budget "
                             "this short keeps its closing path in play at every step)")
    parser.add_argument("--pairs", type=int, default=30,
                        help="back-to-back pairs per case (each ratio: their median)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="schema compilations timed, cold and cached")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="exit 1 when either ratio's median is below this")
    parser.set_defaults(max_batch=ROWS)
    args = parser.parse_args(argv)
    if args.max_tokens < 2 or args.repeats < 1 or args.pairs < 1:
        parser.error("--max-tokens must be at least 2, --repeats and --pairs at least 1")
    helper = setup(args)
    started = time.monotonic()
    engine = build_engine(args)
    try:
        print(describe_run(engine, helper))
        run_batch(engine, rows(8, True))                              # untimed: first use
        fields = bench_fields(engine, args.max_tokens, args.pairs)
        constrained = cold = cached = None
        if importlib.util.find_spec("llguidance") is None:   # a bare PyTorch image (gpu.sh)
            print("llguidance is not installed: the constrained line and compile times are "
                  "skipped")
        else:
            run_batch(engine, [request(args.constrained_max_tokens,
                                       structured=StructuredOutput(json=SCHEMA))])
            cold, cached = bench_compile(engine, args.repeats)
            constrained = bench_constrained(engine, args.constrained_max_tokens, args.pairs)
    finally:
        engine.close()
    ratios = report(fields, constrained, cold, cached, args)
    print(f"runtime: {time.monotonic() - started:.1f} s")
    if args.min_ratio is not None and min(ratios) < args.min_ratio:
        print(f"FAIL: a ratio below --min-ratio {args.min_ratio:g}")
        return 1
    return 0


def quartiles(ratios: list[float]) -> str:
    return f"{percentile(ratios, 25):.3f} .. {percentile(ratios, 75):.3f}"


def report(fields: list[tuple[Batch, Batch]], constrained: list[tuple[Batch, Batch]] | None,
           cold: list[float] | None, cached: list[float] | None,
           args: argparse.Namespace) -> list[float]:
    """The tables and verdicts; the ratios measured (the constrained one when it ran)."""
    lines = [(f"{ROWS} greedy rows, half with penalties + logprobs (top 5) / all plain",
              "penalties + logprobs", fields, GOAL_FIELDS_RATIO)]
    if constrained is not None:
        lines.append((f"1 row, JSON schema (max_tokens {args.constrained_max_tokens}) / free, "
                      "same prompt and length", "constrained / free", constrained,
                      GOAL_CONSTRAINED_RATIO))
    table, verdicts, ratios = [], [], []
    for case, what, pairs, goal in lines:
        each = [case_run.tps / base.tps for base, case_run in pairs]
        ratio = median(each)
        table.append([case, f"{median(b.tps for b, _ in pairs):.1f}",
                      f"{median(c.tps for _, c in pairs):.1f}", f"{ratio:.3f}", quartiles(each),
                      f">= {goal:g}"])
        verdicts.append(f"{what}: {ratio:.3f} (goal >= {goal:g}: "
                        f"{'met' if ratio >= goal else 'NOT met'})")
        ratios.append(ratio)
    print_table(f"Request fields: decode tok/s (medians), {args.max_tokens} tokens per row; "
                f"ratio: the median of {args.pairs} back-to-back pairs'",
                ["case", "baseline tok/s", "with the field tok/s", "ratio", "quartiles",
                 "goal"], table)
    if cold and cached:
        print_table("Compiling a typical JSON schema (engine._constraint: compile + shortest "
                    "answer)", ["case", "median ms", "max ms"],
                    [["cold (a new schema)", f"{median(cold) * 1000:.2f}",
                      f"{max(cold) * 1000:.2f}"],
                     ["cached (the same schema again)", f"{median(cached) * 1000:.3f}",
                      f"{max(cached) * 1000:.3f}"]])
    print("\n".join(verdicts))
    return ratios


if __name__ == "__main__":
    sys.exit(main())
