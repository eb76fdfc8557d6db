"""How much one user's long answer delays another user's short one: user B's
time to first token alone, and while user A streams a long answer, through the
streaming OpenAI API (/v1/chat/completions, stream=true), in one run.

    python bench/interference.py --model tiny [--long-tokens 1300] [--repeats 5]
                                 [--after-tokens 20] [--image] [--max-ratio 3]

B asks a short question (max_tokens 16, temperature 0, top_p 0.9, EOS ignored);
A asks for a long answer with other sampling settings (temperature 0.7, top_p
1.0, EOS ignored, --long-tokens tokens): their batch keys differ, so a worker
that batches only equal settings can never run them together. After one
untimed B (first connection, lazy initialisation), each round runs, in order:

  A alone  a long stream from A on an idle engine: A's tokens/s alone (from
           about --after-tokens tokens to its end, the stretch B lands in) and
           A's characters per token.
  alone    B's question on an idle engine; its TTFT (first content chunk).
  beside   a NEW long stream from A; once A's client has received about
           --after-tokens tokens, B sends the same question; B's TTFT, and A's
           tokens/s from B's request to the end of B's stream (or of A's, if
           that is earlier). The round then waits for both streams to end, so
           every round starts idle and every B lands beside a fresh A at the
           same point.

The server merges the tokens a tiny model makes within ~10 ms into one chunk,
so tokens are estimated from characters at each stream's
usage.completion_tokens per character; "about 20 tokens" means the first chunk
that brings A's text to 20 tokens' worth of characters, at the characters per
token of A's answers alone so far.

Reported: median TTFTs, ratio beside/alone (ratio of the medians; the goal is
at most 3x), A's tokens/s. Both streams are clients in one separate process
(as remote users are; see bench/api.py), the server is in this process on
127.0.0.1. Exit status 0 unless the run fails, or 1 when --max-ratio is given
and the ratio exceeds it."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.api import ClientProcess, StreamResult, stream_chat, stream_chunks  # noqa: E402
from bench.common import (add_bench_args, build_engine, describe_run, median,  # noqa: E402
                          print_table, ratio_exit, setup)

GOAL_MAX_RATIO = 3.0
SHORT_QUESTION = "What colour is the sky?"
LONG_QUESTION = "Write a long story about a lighthouse keeper."


@dataclass
class LongStream:
    """A's stream as its client saw it: each content chunk's arrival time and length.

    The server merges the tokens that arrive within ~10 ms into one chunk (a tiny model
    makes one every millisecond or so), so chunks are not tokens: token counts are
    estimated from the characters received, at the stream's usage.completion_tokens per
    character."""
    start: float
    chunk_times: list[float]
    chunk_chars: list[int]
    tokens: int                 # usage.completion_tokens
    finish_reason: str | None

    @property
    def tokens_per_char(self) -> float:
        chars = sum(self.chunk_chars)
        return self.tokens / chars if chars else 0.0

    def tokens_by(self, t: float) -> float:
        """Estimated tokens received by time t."""
        return sum(c for c, at in zip(self.chunk_chars, self.chunk_times) if at <= t) \
            * self.tokens_per_char

    def tps_between(self, t0: float, t1: float) -> float | None:
        """Estimated tokens/s of the chunks that arrived in (t0, t1]; None when fewer
        than two did."""
        inside = [c for c, at in zip(self.chunk_chars, self.chunk_times) if t0 < at <= t1]
        if len(inside) < 2 or t1 <= t0:
            return None
        return sum(inside) * self.tokens_per_char / (t1 - t0)

    def tps_after(self, tokens: int) -> float | None:
        """Estimated tokens/s from the chunk that brought the count to `tokens` to the last
        chunk: the stretch in which B lands in a round."""
        seen = 0
        for i, c in enumerate(self.chunk_chars):
            seen += c
            if seen * self.tokens_per_char >= tokens:
                return self.tps_between(self.chunk_times[i], self.chunk_times[-1])
        return None


@dataclass
class BesideRound:
    long: LongStream
    short: StreamResult
    sent: float                 # when B's request was sent (A's clock)

    @property
    def tokens_before(self) -> float:
        """A's tokens (estimated) received before B was sent."""
        return self.long.tokens_by(self.sent)

    @property
    def end(self) -> float:
        return self.sent + self.short.total_s

    def a_tps_beside(self) -> float | None:
        last = self.long.chunk_times[-1] if self.long.chunk_times else self.sent
        return self.long.tps_between(self.sent, min(self.end, last))


def _stream_long(http, base: str, body: dict, after_chars: int, ready: threading.Event,
                 out: dict) -> None:
    """A's stream, each content chunk timed; sets `ready` once `after_chars` characters
    have come (or at the end, if fewer come)."""
    start = time.monotonic()
    times: list[float] = []
    chars: list[int] = []
    tokens, finish = 0, None
    try:
        for obj in stream_chunks(http, base, body):
            if obj.get("choices"):
                choice = obj["choices"][0]
                content = choice.get("delta", {}).get("content")
                if content:
                    times.append(time.monotonic())
                    chars.append(len(content))
                    if after_chars and sum(chars) >= after_chars:
                        ready.set()
                finish = choice.get("finish_reason") or finish
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
        out["long"] = LongStream(start, times, chars, tokens, finish)
    except Exception as exc:       # reported by the parent
        out["error"] = f"long stream: {type(exc).__name__}: {exc}"
    finally:
        ready.set()


def _client_process(conn) -> None:
    """Child process: ("short", base, body) -> StreamResult; ("long", base, body) ->
    LongStream; ("beside", base, long_body, short_body, after_chars) -> BesideRound.
    Replies (result, error or None)."""
    import httpx

    with httpx.Client(timeout=600) as http_a, httpx.Client(timeout=600) as http_b:
        while True:
            job = conn.recv()
            if job is None:
                return
            kind, base, *rest = job
            try:
                if kind == "short":
                    conn.send((stream_chat(http_b, base, rest[0]), None))
                elif kind == "long":
                    out: dict = {}
                    _stream_long(http_a, base, rest[0], 0, threading.Event(), out)
                    conn.send((out.get("long"), out.get("error")))
                else:
                    long_body, short_body, after = rest
                    ready, out = threading.Event(), {}
                    a = threading.Thread(target=_stream_long, name="bench-user-a",
                                         args=(http_a, base, long_body, after, ready, out))
                    a.start()
                    ready.wait()
                    sent = time.monotonic()
                    short = stream_chat(http_b, base, short_body)
                    a.join()
                    if "error" in out:
                        conn.send((None, out["error"]))
                        continue
                    conn.send((BesideRound(out["long"], short, sent), None))
            except Exception as exc:
                conn.send((None, f"{kind}: {type(exc).__name__}: {exc}"))


class InterferenceClients(ClientProcess):
    """Users A and B as HTTP clients in one spawned process (ClientProcess's pattern,
    with its own jobs)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_process, args=(child,), daemon=True,
                                name="bench-interference-clients")
        self.proc.start()
        child.close()

    def job(self, *job):
        self.conn.send(job)
        result, error = self.conn.recv()
        if error:
            raise RuntimeError(error)
        return result


def bodies(model: str, args: argparse.Namespace, image_uri: str | None) -> tuple[dict, dict]:
    """(A's long request, B's short request)."""
    from bench.api import chat_body

    short = chat_body(model, args.short_tokens, image_uri, SHORT_QUESTION)
    short.update(temperature=0, top_p=0.9)
    long = chat_body(model, args.long_tokens, None, LONG_QUESTION)
    long.update(temperature=0.7, top_p=1.0)
    return long, short


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def tps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    parser.add_argument("--long-tokens", type=int, default=1300,
                        help="A's answer length (EOS ignored); long enough to last a few "
                             "seconds (default 1300: about 1.5-4 s on the tiny model)")
    parser.add_argument("--short-tokens", type=int, default=16, help="B's max_tokens")
    parser.add_argument("--after-tokens", type=int, default=20,
                        help="B is sent once A's client has received about this many tokens")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds (each: A alone, B alone, then B beside a new long stream "
                             "from A); medians reported")
    parser.add_argument("--image", action="store_true",
                        help="B's question carries assets/shapes.png (448x448) as a data: URI")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 when TTFT beside / alone exceeds this (for CI)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.after_tokens < 1 or args.short_tokens < 1:
        parser.error("--repeats, --after-tokens and --short-tokens must be positive")
    if args.long_tokens < args.after_tokens + 2:
        parser.error("--long-tokens must exceed --after-tokens by at least 2")

    from bench.api import ApiServer, image_data_uri, require_api

    require_api(parser)
    helper = setup(args)
    started = time.monotonic()
    engine = build_engine(args)
    server, clients = None, None
    try:
        print(describe_run(engine, helper))
        clients = InterferenceClients()
        server = ApiServer(engine).__enter__()
        base = server.base
        long_body, short_body = bodies(server.model_id(), args,
                                       image_data_uri() if args.image else None)
        clients.job("short", base, short_body)          # untimed: first connection, lazy init
        alone: list[float] = []
        longs: list[LongStream] = []
        beside: list[BesideRound] = []
        for r in range(args.repeats):
            a_alone: LongStream = clients.job("long", base, long_body)
            if not a_alone.chunk_times or not a_alone.tokens_per_char:
                raise RuntimeError("A's long answer came back without text")
            longs.append(a_alone)
            # B goes once A's text reaches this many characters: ~after_tokens tokens at the
            # characters per token of A's answers alone so far.
            per_char = sum(x.tokens for x in longs) / sum(sum(x.chunk_chars) for x in longs)
            after_chars = max(1, math.ceil(args.after_tokens / per_char))
            res: StreamResult = clients.job("short", base, short_body)
            alone.append(res.ttft_s if res.ttft_s is not None else res.total_s)
            rnd: BesideRound = clients.job("beside", base, long_body, short_body, after_chars)
            beside.append(rnd)
            b_ttft = rnd.short.ttft_s if rnd.short.ttft_s is not None else rnd.short.total_s
            a_tps, a_alone_tps = rnd.a_tps_beside(), a_alone.tps_after(args.after_tokens)
            print(f"  round {r + 1}: A alone {a_alone.chunk_times[-1] - a_alone.start:.2f} s "
                  f"({tps(a_alone_tps)} tok/s); B alone {ms(alone[-1])} ms; B beside "
                  f"{ms(b_ttft)} ms, sent after ~{rnd.tokens_before:.0f} of A's tokens "
                  f"({after_chars} characters), A {tps(a_tps)} tok/s meanwhile, A ended "
                  f"{rnd.long.chunk_times[-1] - rnd.sent:+.2f} s after B was sent", flush=True)
        ratio = report(args, alone, beside, longs)
    finally:
        if clients is not None:
            clients.close()
        if server is not None:
            server.__exit__(None, None, None)
        engine.close()
    return ratio_exit(started, ratio, args.max_ratio, "TTFT ratio")


def report(args: argparse.Namespace, alone: list[float], beside: list[BesideRound],
           longs: list[LongStream]) -> float:
    b_ttfts = [r.short.ttft_s if r.short.ttft_s is not None else r.short.total_s for r in beside]
    alone_s, beside_s = median(alone), median(b_ttfts)
    ratio = beside_s / alone_s if alone_s > 0 else float("inf")
    a_beside = [t for t in (r.a_tps_beside() for r in beside) if t is not None]
    a_beside_tps = median(a_beside) if a_beside else None
    a_alone = [t for t in (x.tps_after(args.after_tokens) for x in longs) if t is not None]
    a_alone_tps = median(a_alone) if a_alone else None
    print_table(f"Interference: B's TTFT ({args.short_tokens}-token question"
                f"{', with an image' if args.image else ''}) alone and beside A's "
                f"{args.long_tokens}-token answer, median of {len(alone)} rounds",
                ["B TTFT alone ms", "B TTFT beside ms", "ratio beside/alone",
                 "A tok/s alone", "A tok/s while B ran"],
                [[ms(alone_s), ms(beside_s), f"{ratio:.2f}x", tps(a_alone_tps),
                  tps(a_beside_tps)]])
    print(f"\nTTFT beside a long answer / alone: {ratio:.2f}x (goal <= {GOAL_MAX_RATIO:g}x: "
          f"{'met' if ratio <= GOAL_MAX_RATIO else 'NOT met'})")
    return ratio


if __name__ == "__main__":
    sys.exit(main())
