"""What a conversation costs the second time: a follow-up question in a chat
about pictures, and a picture re-sent in a new chat, each beside its cold first
time, through the streaming OpenAI API (/v1/chat/completions, stream=true), in
one run.

    python bench/followup.py --model tiny [--pictures 4] [--size 1280x960]
                             [--repeats 3] [--max-tokens 16] [--max-ratio 0.25]

Every request is greedy (temperature 0, EOS ignored, --max-tokens tokens). After
one untimed request (first connection, lazy initialisation, the first prefill of
that size: --pictures pictures of --size of its own, so no picture measured
below has been seen), each round runs, in order:

  turn 1     a new chat: one user message with --pictures new pictures of --size
             and a question; its TTFT (first content chunk).
  turn 2     the same chat, as an OpenAI client sends it: the whole history (the
             turn-1 user message with the same pictures as data: URIs, the
             assistant's turn-1 answer text as it came back) and a new text-only
             question; its TTFT. Without a conversation cache the server
             decodes, encodes and prefills the pictures again.
  first time a new chat with one more new picture (never sent before) and a
             question; its TTFT.
  re-sent    another new chat with that same picture and a different question;
             its TTFT.

Each round draws new pictures (a different seed), so every "turn 1" and "first
time" is cold even for an engine that caches pictures or prefixes across chats.
The pictures are deterministic PNGs from --seed: a smooth random colour field,
random shapes and a light grain (so decoding costs about what a photo costs).

Reported: median TTFTs, the ratios turn 2 / turn 1 and re-sent / first time
(ratios of the medians; the goal for turn 2 / turn 1 is at most 0.25x, about
1.10x was measured before the conversation cache). The clients are in one
separate process (as remote users are; see bench/api.py), the server is in this
process on 127.0.0.1. Exit status 0 unless the run fails, or 1 when --max-ratio
is given and turn 2 / turn 1 exceeds it."""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.api import ClientProcess, StreamResult, chat_body  # noqa: E402
from bench.common import (add_bench_args, build_engine, describe_run, median,  # noqa: E402
                          print_table, ratio_exit, setup)
from bench.preprocess import parse_sizes  # noqa: E402

GOAL_MAX_RATIO = 0.25
BEFORE_RATIO = 1.10         # turn 2 / turn 1 measured before the conversation cache
QUESTION_1 = "What do these pictures have in common? Compare them."
QUESTION_2 = "Which of the pictures you just described is the most colourful, and why?"
FIRST_QUESTION = "Describe this picture."
RESENT_QUESTION = "What shapes can you see in this picture, and what colours are they?"
WARMUP_QUESTION = "What are these?"


# --------------------------------------------------------------------------- pictures
def picture_png(seed: int, width: int, height: int) -> bytes:
    """A deterministic PNG, distinct for every seed: a smooth colour field (random
    8x6 colours, upscaled), 12 random rectangles and ellipses, and a light grain."""
    import numpy as np
    from PIL import Image, ImageDraw

    seed %= 2 ** 32
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8), "RGB")
    img = field.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rnd.randrange(width), rnd.randrange(height)
        x1 = min(width, x0 + rnd.randint(width // 20 + 1, width // 3 + 2))
        y1 = min(height, y0 + rnd.randint(height // 20 + 1, height // 3 + 2))
        colour = tuple(rnd.randrange(256) for _ in range(3))
        (draw.rectangle if rnd.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(img, dtype=np.int16)
    grain = rng.integers(-6, 7, size=pixels.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_tokens(width: int, height: int) -> int:
    """Image tokens of one picture at the engine's default per-image bounds."""
    from engine.inputs import geometry
    from engine.types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    return geometry.image_tokens(width, height, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


# --------------------------------------------------------------------------- requests
def user_message(uris: list[str], text: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def chat(model: str, max_tokens: int, messages: list[dict]) -> dict:
    """chat_body's settings (stream with usage, temperature 0, EOS ignored) with `messages`."""
    body = chat_body(model, max_tokens, None, "")
    body["messages"] = messages
    return body


def ask(clients: ClientProcess, base: str, body: dict) -> StreamResult:
    """One streamed request from the client process; raises on an error."""
    results, errors, _ = clients.run(base, body)
    if errors or not results:
        raise RuntimeError(f"request failed: {'; '.join(errors) or 'no result'}")
    return results[0]


def ttft(res: StreamResult) -> float:
    return res.ttft_s if res.ttft_s is not None else res.total_s


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    parser.add_argument("--pictures", type=int, default=4,
                        help="pictures in the chat's first message (default 4)")
    parser.add_argument("--size", default="1280x960",
                        help="WIDTHxHEIGHT of every measured picture (default 1280x960)")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="tokens per answer (EOS ignored; default 16)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, each with new pictures; medians reported (default 3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the pictures: the warm-up uses seed + i, round r (from 1) "
                             "seed + 1000 r + i (default 0)")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 when TTFT turn 2 / turn 1 exceeds this (for CI)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.pictures < 1 or args.max_tokens < 1:
        parser.error("--repeats, --pictures and --max-tokens must be positive")
    if args.pictures >= 1000:
        parser.error("--pictures must be below 1000")
    try:
        ((width, height),) = parse_sizes(args.size)
        if width < 1 or height < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")

    from bench.api import ApiServer, require_api

    require_api(parser)
    helper = setup(args)
    started = time.monotonic()
    engine = build_engine(args)
    server, clients = None, None
    try:
        print(describe_run(engine, helper))
        print(f"pictures: {args.pictures} x {width}x{height} in turn 1 "
              f"({image_tokens(width, height)} image tokens each at the default bounds), "
              f"1 more for the re-send; {args.max_tokens}-token greedy answers", flush=True)
        clients = ClientProcess()
        server = ApiServer(engine).__enter__()
        base, model = server.base, server.model_id()
        # Untimed: the first connection, lazy initialisation and the first prefill of this
        # size, on pictures of its own (seeds no round uses).
        warm = [png_uri(picture_png(args.seed + i, width, height)) for i in range(args.pictures)]
        ask(clients, base, chat(model, args.max_tokens, [user_message(warm, WARMUP_QUESTION)]))
        rounds: list[tuple[float, float, float, float]] = []
        for r in range(args.repeats):
            seed = args.seed + 1000 * (r + 1)
            uris = [png_uri(picture_png(seed + i, width, height)) for i in range(args.pictures)]
            single = png_uri(picture_png(seed + args.pictures, width, height))
            first_msg = user_message(uris, QUESTION_1)
            turn1 = ask(clients, base, chat(model, args.max_tokens, [first_msg]))
            history = [first_msg, {"role": "assistant", "content": turn1.text},
                       {"role": "user", "content": QUESTION_2}]
            turn2 = ask(clients, base, chat(model, args.max_tokens, history))
            first = ask(clients, base, chat(model, args.max_tokens,
                                            [user_message([single], FIRST_QUESTION)]))
            resent = ask(clients, base, chat(model, args.max_tokens,
                                             [user_message([single], RESENT_QUESTION)]))
            rounds.append((ttft(turn1), ttft(turn2), ttft(first), ttft(resent)))
            t1, t2, f, s = rounds[-1]
            print(f"  round {r + 1}: turn 1 {ms(t1)} ms, turn 2 {ms(t2)} ms ({t2 / t1:.2f}x); "
                  f"picture first time {ms(f)} ms, re-sent {ms(s)} ms ({s / f:.2f}x)", flush=True)
        ratio = report(args, width, height, rounds)
    finally:
        if clients is not None:
            clients.close()
        if server is not None:
            server.__exit__(None, None, None)
        engine.close()
    return ratio_exit(started, ratio, args.max_ratio, "TTFT turn 2 / turn 1")


def report(args: argparse.Namespace, width: int, height: int,
           rounds: list[tuple[float, float, float, float]]) -> float:
    t1, t2, f, s = (median(col) for col in zip(*rounds))
    ratio = t2 / t1 if t1 > 0 else float("inf")
    resend = s / f if f > 0 else float("inf")
    n = args.pictures
    print_table(f"Follow-ups: TTFT cold and again ({n} x {width}x{height} pictures, "
                f"{args.max_tokens}-token answers), median of {len(rounds)} rounds",
                ["case", "cold ms", "again ms", "ratio again/cold"],
                [[f"chat about {n} picture{'s' if n > 1 else ''}: turn 1 -> turn 2",
                  ms(t1), ms(t2), f"{ratio:.2f}x"],
                 ["1 picture in a new chat: first time -> re-sent", ms(f), ms(s),
                  f"{resend:.2f}x"]])
    print(f"\nTTFT turn 2 / turn 1: {ratio:.2f}x (goal <= {GOAL_MAX_RATIO:g}x: "
          f"{'met' if ratio <= GOAL_MAX_RATIO else 'NOT met'}; before the conversation cache: "
          f"about {BEFORE_RATIO:.2f}x)")
    print(f"TTFT picture re-sent / first time: {resend:.2f}x")
    return ratio


if __name__ == "__main__":
    sys.exit(main())
