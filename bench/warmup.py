"""Does the warm-up at start help the first user? Time to first token of the
first request (an image question) in a fresh process, without warm-up, after a
2-token text-only request, and after the engine's warm-up (`LocalEngine.warmup`,
a 2-token request with a small image, so the vision tower runs once too), each
against the second request as the steady state.

    python bench/warmup.py --model tiny [--max-tokens 16]
    python bench/warmup.py --full-size

Each variant runs in its own process: lazy initialisation (kernels, allocator,
libraries) happens once per process, so only a fresh one shows it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_bench_args, bench_request, print_table  # noqa: E402

VARIANTS = {"none": "no warm-up", "text": "text-only warm-up",
            "engine": "engine warm-up (with an image)"}


def first_request(engine, max_tokens: int) -> dict[str, float]:
    """TTFT (the engine's first-token time, preprocessing included) and total of one
    image request."""
    from engine.types import Finished

    start = time.monotonic()
    fin = None
    for event in engine.submit(bench_request(max_tokens)):
        if isinstance(event, Finished):
            fin = event
    total = time.monotonic() - start
    ttft = fin.stats.ttft_s if fin is not None and fin.stats.ttft_s is not None else total
    return {"ttft_s": ttft, "total_s": total}


def child(args: argparse.Namespace) -> int:
    """One fresh process: load, warm up as asked, time the first and second request."""
    from bench.common import build_engine, setup

    setup(args)
    start = time.monotonic()
    engine = build_engine(args, warmup=False)
    load_s = time.monotonic() - start
    start = time.monotonic()
    if args.variant != "none":   # "text": the engine's warm-up before 2026-11-27
        engine.warmup(with_image=args.variant == "engine")
    warm_s = time.monotonic() - start
    try:
        first = first_request(engine, args.max_tokens)
        second = first_request(engine, args.max_tokens)
    finally:
        engine.close()
    print("RESULT " + json.dumps({"load_s": load_s, "warmup_s": warm_s, "first": first,
                                  "second": second}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--variants", default="none,text,engine",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        return child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants takes a comma-separated list of {', '.join(VARIANTS)}")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for variant in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--variant", variant]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{variant}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            return 1
        r = json.loads(line[len("RESULT "):])
        rows.append([VARIANTS[variant], f"{r['load_s']:.2f}", f"{r['warmup_s']:.2f}",
                     f"{r['first']['ttft_s'] * 1000:.1f}", f"{r['first']['total_s'] * 1000:.1f}",
                     f"{r['second']['ttft_s'] * 1000:.1f}", f"{r['second']['total_s'] * 1000:.1f}"])
    print_table(f"First request (image + text, {args.max_tokens} tokens) in a fresh process",
                ["variant", "load s", "warm-up s", "1st TTFT ms", "1st total ms",
                 "2nd TTFT ms", "2nd total ms"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
