"""Greedy answers of a fixed set of requests, through the engine's public interface only, so a
refactor can show that behaviour did not change: text, one picture, two pictures, a video,
and a follow-up turn served through the prefix cache, on the built-in tiny model and on its
random build (long answers), each with its prompt and output token counts.

    python bench/identity.py --out before.json      # before the change
    python bench/identity.py --compare before.json  # after it: exit 1 if any answer differs
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.factory import create_engine  # noqa: E402
from engine.types import (Conversation, GenerationRequest, ImageInput, Message,  # noqa: E402
                          SamplingParams, VideoInput)

SHAPES = str(ROOT / "assets" / "shapes.png")
CHART = str(ROOT / "assets" / "chart.png")


def clip(folder: Path) -> str:
    """A 2-second clip of a red square crossing a white canvas (deterministic)."""
    import av
    import numpy as np

    path = folder / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(20):
            frame = np.full((240, 320, 3), 255, dtype=np.uint8)
            frame[90:150, 10 + 14 * i:70 + 14 * i] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def requests(video: str) -> list[tuple[str, list[Message]]]:
    user = Message
    ask = "How many shapes are there, and what colours are they?"
    return [
        ("text", [user("user", "Count the shapes and name their colours.")]),
        ("one picture", [user("user", ask, images=[ImageInput(SHAPES)])]),
        ("two pictures", [user("user", "What colour is the shape in the second picture?",
                               images=[ImageInput(SHAPES), ImageInput(CHART)])]),
        ("a video", [user("user", "What moves in this video?", videos=[VideoInput(video)])]),
        ("follow-up turn (prefix cache)", [
            user("user", ask, images=[ImageInput(SHAPES)]),
            Message("assistant", "{first answer}"),
            user("user", "Detect the shapes.")]),
    ]


def run(model: str, max_tokens: int, video: str) -> dict:
    engine = create_engine(EngineConfig(model=model, device="cpu", warmup=False))
    out: dict = {}
    first = ""
    try:
        for name, messages in requests(video):
            for m in messages:
                if m.text == "{first answer}":
                    m.text = first
            request = GenerationRequest(Conversation(messages),
                                        SamplingParams(max_tokens=max_tokens, temperature=0.0))
            text, fin = engine.generate(request, timeout=600)
            if name == "one picture":
                first = text
            out[name] = {"text": text, "finish": fin.reason,
                         "prompt_tokens": fin.stats.prompt_tokens,
                         "output_tokens": fin.stats.output_tokens}
        out["cache"] = {k: v for k, v in engine.cache_stats().items() if "hit" in k}
    finally:
        engine.close()
    return out


def same(before: dict | None, after: dict | None) -> bool:
    """Equal records; cache figures an engine has added since are not compared."""
    if before is None or after is None:
        return before == after
    return all(after.get(key) == value for key, value in before.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the answers to this JSON file")
    p.add_argument("--compare", type=Path, help="compare with answers written before")
    args = p.parse_args(argv)
    from engine.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        video = clip(folder)
        random_dir = build_tiny(folder / "tiny-random", trained=False)
        answers = {"tiny": run("tiny", 64, video), "tiny-random": run(str(random_dir), 48, video)}
    if args.out:
        args.out.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        rows = [(model, name, same(before[model].get(name), answers[model].get(name)))
                for model in answers for name in answers[model]]
        for model, name, equal in rows:
            print(f"{'same' if equal else 'DIFFERENT':9} {model:12} {name}")
        print(f"{sum(s for *_, s in rows)} of {len(rows)} identical")
        return 0 if all(s for *_, s in rows) else 1
    if not args.out:
        print(json.dumps(answers, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
