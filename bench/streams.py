"""Streaming through the real server (issues 32 and 33): `python -m server` on a loopback
port (bench/soak.py's ServerProcess), its streaming clients in another process (bench/api.py's
ClientProcess), as remote users are. Two ratios, each measured side by side in one run:

- 8 concurrent streaming clients with text questions against 1 client: aggregate output
  tokens/s (goal: at least 3x);
- a constrained answer (response_format json_schema) against a free answer on the same
  prompt and of the same length, one client: decode tokens/s after the first content chunk
  (goal: at least 0.9).

    python bench/streams.py [--max-tokens 64] [--pairs 8] [--server-arg=--max-batch --server-arg=8]

The machine's speed drifts within seconds, so each case runs `--pairs` back-to-back pairs
and its ratio is the median of the pairs'."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.api import ClientProcess, StreamResult, chat_body, require_api  # noqa: E402
from bench.common import print_table  # noqa: E402
from bench.fields import GOAL_CONSTRAINED_RATIO, PROMPT, SCHEMA  # noqa: E402
from bench.soak import ServerProcess  # noqa: E402

GOAL_CLIENTS_RATIO = 3.0
CLIENTS = 8


def tps(results: list[StreamResult], wall: float) -> float:
    """Aggregate output tokens/s of a level."""
    return sum(r.tokens for r in results) / wall if wall > 0 else 0.0


def decode_tps(results: list[StreamResult]) -> float:
    """Tokens after the first content chunk per second, over the results."""
    tokens = sum(max(r.tokens - 1, 0) for r in results)
    span = sum(r.total_s - (r.ttft_s or 0.0) for r in results)
    return tokens / span if span > 0 else 0.0


def check(errors: list[str], what: str) -> None:
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} errors, the first: {errors[0]}")


def clients_pair(clients: ClientProcess, base: str, body: dict, requests_per_client: int,
                 flip: bool) -> tuple[float, float]:
    """(1 client's tok/s, 8 clients' aggregate tok/s), back to back (8 first when `flip`)."""
    out = {}
    for n in ((CLIENTS, 1) if flip else (1, CLIENTS)):
        results, errors, wall = clients.run(base, body, n, requests_per_client)
        check(errors, f"{n} clients")
        out[n] = tps(results, wall)
    return out[1], out[CLIENTS]


def constrained_pair(clients: ClientProcess, base: str, body: dict) -> tuple[float, float, int]:
    """(free decode tok/s, constrained decode tok/s, tokens): a constrained answer (it
    parses), then a free one of its length on the same prompt."""
    (held,), errors, _ = clients.run(base, body)
    check(errors, "constrained")
    json.loads(held.text)
    plain = dict(body, max_tokens=held.tokens, ignore_eos=True)
    plain.pop("response_format")
    (free,), errors, _ = clients.run(base, plain)
    check(errors, "free")
    return decode_tps([free]), decode_tps([held]), held.tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per text answer")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--constrained-max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8,
                        help="back-to-back pairs per case (each ratio: their median)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra argument for `python -m server` (repeatable)")
    parser.add_argument("--warmup", action="store_true", help="let the server warm up")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="exit 1 when the constrained ratio is below this, or the clients' "
                             "ratio below 3 times it")
    args = parser.parse_args(argv)
    require_api(parser)
    started = time.monotonic()
    clients = ClientProcess()
    try:
        with ServerProcess(args.model, args.warmup, args.server_arg, {}, 120) as server:
            model = server.model_id()
            body = chat_body(model, args.max_tokens, None, text=PROMPT)
            schema_body = dict(chat_body(model, args.constrained_max_tokens, None, text=PROMPT),
                               ignore_eos=False, response_format={
                                   "type": "json_schema",
                                   "json_schema": {"name": "shapes", "schema": SCHEMA}})
            clients.run(server.base, body, CLIENTS)            # untimed: first use
            clients.run(server.base, schema_body)
            many, constrained = [], []
            for i in range(args.pairs):
                many.append(clients_pair(clients, server.base, body, args.requests_per_client,
                                         flip=i % 2 == 1))
                free, held, tokens = constrained_pair(clients, server.base, schema_body)
                constrained.append((free, held))
            print(f"constrained answers: {tokens} tokens")
    finally:
        clients.close()
    ratios = report(many, constrained, args)
    print(f"runtime: {time.monotonic() - started:.1f} s")
    if args.min_ratio is not None and (ratios[0] < GOAL_CLIENTS_RATIO * args.min_ratio
                                       or ratios[1] < args.min_ratio):
        print(f"FAIL: a ratio below --min-ratio {args.min_ratio:g}")
        return 1
    return 0


def report(many: list[tuple[float, float]], constrained: list[tuple[float, float]],
           args: argparse.Namespace) -> tuple[float, float]:
    clients_ratio = statistics.median(e / o for o, e in many)
    held_ratio = statistics.median(h / f for f, h in constrained)
    print_table(f"Streaming through `python -m server` (model {args.model}): tok/s (medians); "
                f"ratio: the median of {args.pairs} back-to-back pairs'",
                ["case", "baseline tok/s", "tok/s", "ratio", "goal"],
                [[f"{CLIENTS} text clients / 1, {args.max_tokens} tokens each, aggregate",
                  f"{statistics.median(o for o, _ in many):.1f}",
                  f"{statistics.median(e for _, e in many):.1f}", f"{clients_ratio:.2f}x",
                  f">= {GOAL_CLIENTS_RATIO:g}x"],
                 [f"1 client, JSON schema (max_tokens {args.constrained_max_tokens}) / free, "
                  "same prompt and length, decode",
                  f"{statistics.median(f for f, _ in constrained):.1f}",
                  f"{statistics.median(h for _, h in constrained):.1f}", f"{held_ratio:.3f}",
                  f">= {GOAL_CONSTRAINED_RATIO:g}"]])
    for what, ratio, goal in (("8 clients / 1", clients_ratio, GOAL_CLIENTS_RATIO),
                              ("constrained / free", held_ratio, GOAL_CONSTRAINED_RATIO)):
        print(f"{what}: {ratio:.3f} (goal >= {goal:g}: {'met' if ratio >= goal else 'NOT met'})")
    return clients_ratio, held_ratio


if __name__ == "__main__":
    sys.exit(main())
