"""What every benchmark shares: the engine under test (the tiny model, a local
model, or a randomly initialised model with the real Qwen2.5-VL-7B shapes built
directly on the accelerator), the request they all send, the memory-bandwidth
bound of decoding, percentiles and Markdown tables.

Nothing here imports gradio, fastapi, uvicorn or qwen_vl_utils, so the
`--full-size` path runs on a bare PyTorch GPU image (bench/gpu.sh)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig, add_engine_args  # noqa: E402
from engine.types import (Conversation, GenerationRequest, ImageInput, Message,  # noqa: E402
                          SamplingParams)

from bench.vision_fallback import ensure_process_vision_info  # noqa: E402

BENCH_IMAGE = ROOT / "assets" / "shapes.png"     # 448x448: 256 image tokens
BENCH_PROMPT = "Describe this image in detail."

# Qwen/Qwen2.5-VL-7B-Instruct config.json, as shapes (the weights are random).
FULL_SIZE_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
    max_position_embeddings=128000, rms_norm_eps=1e-6, use_cache=True, use_sliding_window=False,
    sliding_window=32768, max_window_layers=28, attention_dropout=0.0, initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                     "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False)
FULL_SIZE_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
    out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
    hidden_act="silu", initializer_range=0.02)

# Peak memory bandwidth in GB/s, by a substring of the device name (first match wins).
KNOWN_BANDWIDTH_GBS: list[tuple[str, float | None, str]] = [
    ("H200", 4800.0, "NVIDIA H200: 4.8 TB/s HBM3e"),
    ("H100 NVL", 3900.0, "NVIDIA H100 NVL: 3.9 TB/s"),
    ("H100 PCIe", 2000.0, "NVIDIA H100 PCIe: 2.0 TB/s"),
    ("H100", 3350.0, "NVIDIA H100 SXM: 3.35 TB/s HBM3"),
    ("A100-SXM4-80GB", 2039.0, "NVIDIA A100 80GB SXM: 2.04 TB/s"),
    ("A100", 1555.0, "NVIDIA A100 40GB: 1.56 TB/s"),
    ("910B4", None, "Ascend 910B4 (32 GB): no reliable figure, pass --bandwidth-gbs"),
    ("910B", 1600.0, "Ascend 910B (64 GB HBM2e): about 1.6 TB/s, the commonly cited figure"),
]


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The engine's own flags (defaulting to the tiny model) plus the full-size model's."""
    add_engine_args(parser)
    parser.set_defaults(model="tiny")
    g = parser.add_argument_group("benchmark model")
    g.add_argument("--full-size", action="store_true",
                   help="a randomly initialised model with the real Qwen2.5-VL-7B shapes, built "
                        "on the device in bf16 (no download); ignores --model")
    g.add_argument("--layers", type=int, default=None,
                   help="with --full-size: text decoder layers (default 28; fewer for a dry run)")
    g.add_argument("--vision-layers", type=int, default=None,
                   help="with --full-size: vision blocks (default 32)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU); default: torch's choice")
    g.add_argument("--quiet", action="store_true",
                   help="hide the engine's warnings (per-request log lines are always hidden)")


def setup(args: argparse.Namespace) -> str:
    """Logging, thread count and the vision helper; returns which vision helper is in use."""
    logging.basicConfig(level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("engine.requests").setLevel(logging.WARNING)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
        args.cpu_threads = args.threads      # the engine's device thread uses the same count
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return ensure_process_vision_info()


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    return replace(EngineConfig.from_namespace(args), **overrides)


def build_engine(args: argparse.Namespace, **overrides: Any):
    """The engine under test: LocalEngine.from_config, or the full-size random model
    wrapped in the same LoadedModel and LocalEngine, so our whole path is measured."""
    from engine.backends.local import LocalEngine

    config = engine_config(args, **overrides)
    if not getattr(args, "full_size", False):
        return LocalEngine.from_config(config)
    from engine.model.device import select_device

    device = select_device(config.device, config.dtype)
    loaded = build_full_size_model(device, args.layers, args.vision_layers,
                                   config.attn_implementation)
    engine = LocalEngine(loaded, config)
    if config.warmup:
        engine.warmup()
    return engine


def build_processor(tokenizer: Any) -> Any:
    """The Qwen2.5-VL processor (the real image-processor settings) around `tokenizer`.

    Without torchvision (a bare PyTorch image) transformers falls back to the PIL
    image processor, and the video processor cannot be built, so the processor is
    made without one: image and text prompts only."""
    import importlib.util

    from transformers import Qwen2_5_VLProcessor

    from engine import tiny

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    else:   # the class transformers would fall back to, without its warning
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
        patch_size=14, temporal_patch_size=2, merge_size=2)
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2)
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor,
                                   chat_template=tiny.CHAT_TEMPLATE)
    except ImportError:
        pass

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=None, chat_template=tiny.CHAT_TEMPLATE)


def full_size_config(tokenizer: Any, layers: int | None = None,
                     vision_layers: int | None = None) -> Any:
    """Qwen2.5-VL-7B's config with the tiny tokenizer's special-token ids.

    The shapes (and so the bytes and FLOPs per token) are the real model's; only the
    ids of the special tokens differ (the tiny byte-level BPE has ~900 tokens), and
    every id it produces is a valid row of the 152064-row embedding."""
    from transformers import Qwen2_5_VLConfig

    from engine import tiny

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    text = dict(FULL_SIZE_TEXT, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if layers:
        text.update(num_hidden_layers=layers, max_window_layers=layers)
    vision = dict(FULL_SIZE_VISION)
    if vision_layers:
        vision["depth"] = vision_layers
        vision["fullatt_block_indexes"] = [i for i in FULL_SIZE_VISION["fullatt_block_indexes"]
                                           if i < vision_layers] or [vision_layers - 1]
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_full_size_model(device: Any, layers: int | None = None,
                          vision_layers: int | None = None, attn: str = "sdpa") -> Any:
    """A LoadedModel holding a random Qwen2.5-VL with the 7B shapes, created on the device
    in its dtype (bf16 on an accelerator): initialising 8B parameters on the CPU and
    moving them would take minutes."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine import tiny
    from engine.model.loader import LoadedModel

    tokenizer = tiny.build_tokenizer()
    tokenizer.padding_side = "left"
    processor = build_processor(tokenizer)
    config = full_size_config(tokenizer, layers, vision_layers)
    start = time.monotonic()
    torch.manual_seed(0)
    with torch.device(device.torch_device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=device.dtype, attn_implementation=attn or "sdpa")
    model.eval()
    # Rows past the tokenizer's ids get zero weights so greedy decoding only produces
    # ids the tokenizer can decode; the matmul still reads every row.
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer):] = 0
    model.generation_config = tiny.build_generation_config(tokenizer)
    if device.kind == "cuda":
        torch.cuda.synchronize()
    n_layers = config.text_config.num_hidden_layers
    depth = config.vision_config.depth
    name = "Qwen2.5-VL-7B shapes, random weights" + (
        "" if (n_layers, depth) == (28, 32) else f" ({n_layers} text layers, {depth} vision blocks)")
    print(f"built {name} on {device.describe()} in {time.monotonic() - start:.1f}s", flush=True)
    return LoadedModel(model=model, processor=processor, name=name, path=Path("<random>"),
                       is_tiny=False, device=device)


# --------------------------------------------------------------------------- requests
def bench_request(max_tokens: int, image: bool = True, text: str = BENCH_PROMPT,
                  request_id: str | None = None) -> GenerationRequest:
    """The request every benchmark sends: greedy, exactly `max_tokens` tokens."""
    images = [ImageInput(BENCH_IMAGE)] if image else []
    req = GenerationRequest(Conversation([Message("user", text, images=images)]),
                            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    if request_id:
        req.request_id = request_id
    return req


def bench_messages(image: bool = True, text: str = BENCH_PROMPT) -> list[dict]:
    """The same request as Qwen chat messages, as a bare transformers script writes them."""
    from engine.types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    content: list[dict] = []
    if image:
        from PIL import Image

        content.append({"type": "image", "image": Image.open(BENCH_IMAGE).convert("RGB"),
                        "min_pixels": DEFAULT_MIN_PIXELS, "max_pixels": DEFAULT_MAX_PIXELS})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- bandwidth
def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights read for one decoded token: the decoder layers, the final norm
    and lm_head. Not the vision tower (prefill only) and not the input embedding
    (one row is looked up per token); the KV cache is left out too (small at these
    lengths). For the real 7B this is about 14.2 GB in bf16."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    skip = {id(p) for p in embed.parameters()}
    total = sum(p.numel() * p.element_size() for p in lm.parameters() if id(p) not in skip)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) not in skip:
        total += head.weight.numel() * head.weight.element_size()
    return total


def device_bandwidth(device: Any, override_gbs: float | None) -> tuple[float | None, str]:
    """(GB/s or None, where the figure comes from)."""
    if override_gbs:
        return float(override_gbs), "--bandwidth-gbs"
    if device.kind == "cpu":
        return None, "CPU: pass --bandwidth-gbs"
    name = device.describe()
    for key, gbs, note in KNOWN_BANDWIDTH_GBS:
        if key in name:
            return gbs, note
    return None, f"unknown device {name!r}: pass --bandwidth-gbs"


# --------------------------------------------------------------------------- statistics
def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), numpy's default; nan when empty."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a Markdown table, so results paste into docs as they are."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    lines = [f"\n### {title}\n",
             "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def describe_run(engine: Any, vision_helper: str) -> str:
    import torch
    import transformers

    cfg, worker = engine.config, engine.scheduler
    return (f"model: {engine.model_name} | device: {engine.device_description} | "
            f"torch {torch.__version__}, transformers {transformers.__version__} | "
            f"vision helper: {vision_helper} | image processor: "
            f"{type(engine.loaded.processor.image_processor).__name__} | engine: "
            f"{cfg.attn_implementation} attention, max_batch {worker.max_batch}, KV cache "
            f"{engine.kv.rows} rows x {engine.kv.row_len - 1} tokens, decode step "
            f"{'captured' if getattr(engine.runner.decode_step, 'captured', False) else 'eager'}")


def ratio_exit(started: float, ratio: float, limit: float | None, what: str) -> int:
    """Print the runtime; exit code 1 when `ratio` exceeds `limit` (--max-ratio), else 0."""
    import time

    print(f"runtime: {time.monotonic() - started:.1f} s")
    if limit is not None and not ratio <= limit:
        print(f"FAIL: {what} {ratio:.2f}x exceeds --max-ratio {limit:g}")
        return 1
    return 0
