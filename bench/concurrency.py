"""Several users sharing one device: N concurrent streaming clients, each
sending requests back to back, against our engine with batching (max_batch 8)
and without (max_batch 1), and through the HTTP API when it is available.
Prints aggregate output tokens/s, p50/p95 time to first token and the mean
batch size per level, and the batching speedup at 2, 4 and 8 clients.

    python bench/concurrency.py --model tiny --clients 1,2,4,8 [--max-tokens 64]
                                [--requests-per-client 4 | --duration 10] [--image]

One engine serves every target; between levels its worker's max_batch is
switched (a second engine would add a second device thread, and on a CPU a
second OpenMP thread team slows every op of the first; see
docs/performance.md). Engine clients are threads in this process (as the web
UI's callbacks are); HTTP clients are threads in a separate process (as remote
users are)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_bench_args, bench_request, build_engine, describe_run,  # noqa: E402
                          percentile, print_table, setup)

GOAL_SPEEDUP_AT_8 = {False: 3.0, True: 2.0}   # text prompts; an image each (the goals)


@dataclass
class LevelResult:
    clients: int
    mode: str
    tokens: int = 0
    requests: int = 0
    wall_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    steps: int = 0           # decode steps in this level, and the rows they decoded
    rows: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_batch(self) -> float:
        """Rows per decode step: how many users shared each step on average."""
        return self.rows / self.steps if self.steps else float("nan")


def engine_client(engine, max_tokens: int, image: bool):
    """One streamed request on the engine: (ttft_s, output tokens). TTFT is the engine's
    first-token time (queueing and preprocessing included), as in bench/overhead.py."""
    from engine.types import TextDelta

    start = time.monotonic()
    first = None
    for event in engine.submit(bench_request(max_tokens, image)):
        if isinstance(event, TextDelta):
            if first is None:
                first = time.monotonic() - start
        else:
            if event.reason == "error":
                raise RuntimeError(str(event.error))
            ttft = event.stats.ttft_s if event.stats.ttft_s is not None else first
            return (ttft if ttft is not None else time.monotonic() - start,
                    event.stats.output_tokens)
    raise RuntimeError("stream ended without Finished")


def run_level(one_request, clients: int, mode: str, worker, requests_per_client: int,
              duration: float | None) -> LevelResult:
    """`clients` threads in this process, each sending requests back to back (a closed
    loop), as the web UI's callbacks do."""
    result = LevelResult(clients, mode)
    lock = threading.Lock()
    before = (worker.steps_run, worker.rows_decoded)
    start = time.monotonic()
    stop_at = start + duration if duration else None

    def client() -> None:
        done = 0
        while (done < requests_per_client) if stop_at is None else (time.monotonic() < stop_at):
            try:
                ttft, tokens = one_request()
            except Exception as exc:    # counted and printed, never hidden
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                return
            done += 1
            with lock:
                result.ttfts.append(ttft)
                result.tokens += tokens
                result.requests += 1

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.monotonic() - start
    result.steps = worker.steps_run - before[0]
    result.rows = worker.rows_decoded - before[1]
    return result


def run_http_level(client_proc, server, body: dict, clients: int, mode: str, worker,
                   requests_per_client: int, duration: float | None) -> LevelResult:
    """The same closed loop over HTTP, the clients in a separate process."""
    before = (worker.steps_run, worker.rows_decoded)
    results, errors, wall = client_proc.run(server.base, body, clients, requests_per_client,
                                            duration)
    return LevelResult(clients, mode, tokens=sum(r.tokens for r in results),
                       requests=len(results), wall_s=wall,
                       ttfts=[r.ttft_s if r.ttft_s is not None else r.total_s for r in results],
                       steps=worker.steps_run - before[0],
                       rows=worker.rows_decoded - before[1], errors=errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per level instead of a fixed number of requests")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every level this many times (interleaved); medians reported")
    parser.add_argument("--image", action="store_true",
                        help="add the 448x448 assets/shapes.png to every prompt (default: text "
                             "only; on a CPU the image's prefill does not batch, see "
                             "docs/performance.md)")
    parser.add_argument("--no-http", dest="http", action="store_false")
    parser.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                        help="skip the max_batch=1 comparison")
    parser.set_defaults(max_batch=8)
    args = parser.parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not levels or min(levels) < 1 or args.requests_per_client < 1:
        parser.error("--clients and --requests-per-client must be positive")
    helper = setup(args)
    engine = build_engine(args)
    worker = engine.scheduler
    sizes = [engine.config.max_batch] + ([1] if args.unbatched and engine.config.max_batch > 1
                                         else [])
    server, client_proc = None, None
    try:
        print(describe_run(engine, helper))
        one = (lambda: engine_client(engine, args.max_tokens, args.image))
        one()      # untimed: lazy initialisation
        # (label, max_batch, run(n clients) -> LevelResult)
        targets = [(f"engine, max_batch {size}", size,
                    lambda n, m=f"engine, max_batch {size}": run_level(
                        one, n, m, worker, args.requests_per_client, args.duration))
                   for size in sizes]
        if args.http:
            from bench.api import (ApiServer, ClientProcess, api_unavailable_reason, chat_body,
                                   image_data_uri)

            reason = api_unavailable_reason()
            if reason:
                print(f"note: {reason}")
            else:
                client_proc = ClientProcess()
                server = ApiServer(engine).__enter__()
                body = chat_body(server.model_id(), args.max_tokens,
                                 image_data_uri() if args.image else None)
                client_proc.run(server.base, body)     # untimed: first connection
                targets += [(f"HTTP, max_batch {size}", size,
                             lambda n, m=f"HTTP, max_batch {size}": run_http_level(
                                 client_proc, server, body, n, m, worker,
                                 args.requests_per_client, args.duration))
                            for size in sizes]
        results: dict[tuple[str, int], list[LevelResult]] = {}
        for _ in range(args.rounds):
            for n in levels:
                for mode, size, run in targets:
                    worker.max_batch = size     # rows decoding at once, read at admission; engine idle
                    res = run(n)
                    results.setdefault((mode, n), []).append(res)
                    # a line per level as it ends, so a run cut short still says something
                    print(f"  {n} client(s), {mode}: {res.tps:.1f} tok/s, mean batch "
                          f"{res.mean_batch:.2f}, {res.requests} requests, {len(res.errors)} "
                          f"errors, {res.wall_s:.1f} s", flush=True)
                    for err in res.errors[:3]:
                        print(f"error ({mode}, {n} clients): {err}")
        worker.max_batch = engine.config.max_batch
        report(results, levels, [t[0] for t in targets], args)
    finally:
        if client_proc is not None:
            client_proc.close()
        if server is not None:
            server.__exit__(None, None, None)
        engine.close()
    return 0


def _median_result(runs: list[LevelResult]) -> LevelResult:
    return sorted(runs, key=lambda r: r.tps)[len(runs) // 2]


def report(results: dict[tuple[str, int], list[LevelResult]], levels: list[int],
           modes: list[str], args: argparse.Namespace) -> dict[tuple[str, int], float]:
    rows = []
    tps: dict[tuple[str, int], float] = {}
    for n in levels:
        for mode in modes:
            runs = results[(mode, n)]
            r = _median_result(runs)
            ttfts = [t for run in runs for t in run.ttfts]
            tps[(mode, n)] = r.tps
            rows.append([str(n), mode, f"{r.tps:.1f}", f"{percentile(ttfts, 50) * 1000:.0f}",
                         f"{percentile(ttfts, 95) * 1000:.0f}", f"{r.mean_batch:.2f}",
                         str(sum(run.requests for run in runs)),
                         str(sum(len(run.errors) for run in runs))])
    amount = (f"{args.duration:g} s per level" if args.duration
              else f"{args.requests_per_client} requests per client")
    print_table(f"Concurrency: {args.max_tokens} output tokens per request, {amount}, "
                f"{'image + text' if args.image else 'text-only'} prompts",
                ["clients", "target", "aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms",
                 "mean batch", "requests", "errors"], rows)
    base = levels[0]
    rows = []
    for mode in modes:
        one = tps[(mode, base)]
        rows.append([mode] + [f"{tps[(mode, n)] / one:.2f}x" if one else "n/a"
                              for n in levels[1:]])
    if len(levels) > 1:
        print_table(f"Speedup: aggregate tok/s relative to {base} client(s) on the same target",
                    ["target"] + [f"{n} clients" for n in levels[1:]], rows)
    goal = GOAL_SPEEDUP_AT_8[bool(args.image)]
    if 8 in levels and base == 1:
        for mode in modes:
            if "max_batch 1" in mode:
                continue
            speedup = tps[(mode, 8)] / tps[(mode, 1)] if tps[(mode, 1)] else 0.0
            print(f"\n{mode}: 8 clients get {speedup:.2f}x the single-client aggregate tok/s "
                  f"(goal >= {goal:g}x: {'met' if speedup >= goal else 'NOT met'})")
    return tps


if __name__ == "__main__":
    sys.exit(main())
