"""Image preprocessing cost by image size and min/max pixels: what
`PromptRenderer.prepare` (load and check the image, Qwen's resize, chat
template, processor) costs on the caller's thread before a request reaches
the device, and how many image tokens the result holds.

    python bench/preprocess.py [--sizes 448x448,1280x720,1920x1080,4000x3000] [--repeats 3]

No model is loaded: this is CPU work, identical for the tiny and the real
model (same processor settings). Images are synthetic; "data URI" adds the
base64 + JPEG decode an API request pays."""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_processor, median, print_table  # noqa: E402
from bench.vision_fallback import ensure_process_vision_info  # noqa: E402

DEFAULT_SIZES = "448x448,1280x720,1920x1080,4000x3000"
# (label, min_pixels, max_pixels)
PIXEL_BOUNDS = [
    ("engine default 224²..1280·28²", 224 * 224, 1280 * 28 * 28),
    ("low 224²..256·28²", 224 * 224, 256 * 28 * 28),
    ("processor default 56²..16384·28²", 56 * 56, 16384 * 28 * 28),
]


def synthetic_image(width: int, height: int):
    """A deterministic photo-like test image: gradients plus noise (noise makes JPEG
    decoding cost about what a real photo costs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 10007 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     ((x + y) * 127 // max(1, width + height))], axis=-1)
    noise = rng.integers(0, 48, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"), "RGB")


def jpeg_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        sizes.append((int(w), int(h)))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated WxH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bounds", default="all",
                        help="'all' or comma-separated indexes into the pixel-bound list (0,1,2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        bounds = PIXEL_BOUNDS if args.bounds == "all" else [
            PIXEL_BOUNDS[int(i)] for i in args.bounds.split(",")]
    except (ValueError, IndexError):
        parser.error("--sizes takes WxH[,WxH...]; --bounds takes 'all' or indexes 0..2")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    helper = ensure_process_vision_info()

    from engine import tiny
    from engine.config import EngineConfig
    from engine.inputs.prompt import PromptRenderer
    from engine.inputs.stage import InputStage
    from engine.types import Conversation, GenerationRequest, ImageInput, Message, SamplingParams

    processor = build_processor(tiny.build_tokenizer())
    renderer = PromptRenderer(processor, InputStage(EngineConfig(max_model_len=1 << 20)),
                              max_model_len=1 << 20)
    print(f"image processor: {type(processor.image_processor).__name__} | vision helper: "
          f"{helper} | torch threads: {torch.get_num_threads()}")

    def request(source, lo: int, hi: int) -> GenerationRequest:
        return GenerationRequest(
            Conversation([Message("user", "Describe this image.", images=[ImageInput(source)])]),
            SamplingParams(max_tokens=1), min_pixels=lo, max_pixels=hi)

    def timed(source, lo: int, hi: int) -> tuple[float, int, tuple[int, int]]:
        times, tokens, grid = [], 0, (0, 0)
        renderer.prepare(request(source, lo, hi))     # untimed first call
        for _ in range(args.repeats):
            start = time.perf_counter()
            prompt = renderer.prepare(request(source, lo, hi))
            times.append(time.perf_counter() - start)
            thw = prompt.inputs["image_grid_thw"][0].tolist()
            tokens = int(thw[0] * thw[1] * thw[2]) // 4
            grid = (thw[2] * 14, thw[1] * 14)
        return median(times), tokens, grid

    rows = []
    for w, h in sizes:
        image = synthetic_image(w, h)
        uri = jpeg_data_uri(image)
        for label, lo, hi in bounds:
            t_pil, tokens, (rw, rh) = timed(image, lo, hi)
            t_uri, _, _ = timed(uri, lo, hi)
            rows.append([f"{w}x{h}", label, f"{rw}x{rh}", str(tokens), f"{t_pil * 1000:.1f}",
                         f"{t_uri * 1000:.1f}", f"{len(uri) / 1e6:.2f}"])
    print_table(f"Image preprocessing on the caller's thread (median of {args.repeats})",
                ["image", "min..max pixels", "resized to", "image tokens", "prepare ms (PIL)",
                 "prepare ms (JPEG data URI)", "data URI MB"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
