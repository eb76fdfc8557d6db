"""A stand-in for `qwen_vl_utils.process_vision_info`, images only, for
machines without qwen-vl-utils (it imports torchvision and requests at import
time; a bare GPU image with PyTorch has neither).

It applies qwen_vl_utils' resize rule (sides rounded to multiples of 28,
pixels kept within min/max_pixels, aspect ratio at most 200) to images the
engine has already loaded and checked, so the image token counts, and hence
the benchmark's work, are the same. Videos are refused."""

from __future__ import annotations

import sys
import types
from typing import Any

from PIL import Image

from engine.inputs import geometry

FACTOR = 28                 # patch 14 x spatial merge 2
MAX_RATIO = 200
DEFAULT_MIN_PIXELS = 4 * FACTOR * FACTOR
DEFAULT_MAX_PIXELS = 16384 * FACTOR * FACTOR


def smart_resize(height: int, width: int, factor: int = FACTOR,
                 min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) in qwen_vl_utils' signature, from the engine's one implementation."""
    return geometry.smart_resize(height, width, min_pixels, max_pixels, factor)


def fetch_image(ele: dict[str, Any]) -> Image.Image:
    image = ele.get("image", ele.get("image_url"))
    if not isinstance(image, Image.Image):
        raise ValueError("the benchmark fallback takes PIL images only (the engine loads them)")
    image = image.convert("RGB")
    width, height = image.size
    h, w = smart_resize(height, width, min_pixels=ele.get("min_pixels", DEFAULT_MIN_PIXELS),
                        max_pixels=ele.get("max_pixels", DEFAULT_MAX_PIXELS))
    return image.resize((w, h))


def process_vision_info(conversations: list, return_video_kwargs: bool = False):
    """(images or None, None[, video kwargs]) like qwen_vl_utils for image-only messages."""
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    images = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for ele in content:
                if "video" in ele or ele.get("type") == "video":
                    raise ValueError("videos need qwen-vl-utils (not installed here)")
                if "image" in ele or "image_url" in ele:
                    images.append(fetch_image(ele))
    result = (images or None, None)
    return (*result, {"fps": []}) if return_video_kwargs else result


def ensure_process_vision_info() -> str:
    """Make `from qwen_vl_utils import process_vision_info` work; says which one is used."""
    try:
        import qwen_vl_utils  # noqa: F401
        return "qwen_vl_utils"
    except Exception:       # ImportError, or torchvision missing inside it
        sys.modules.pop("qwen_vl_utils", None)
    module = types.ModuleType("qwen_vl_utils")
    module.process_vision_info = process_vision_info
    module.smart_resize = smart_resize
    module.__doc__ = "bench.vision_fallback standing in for qwen-vl-utils (images only)"
    sys.modules["qwen_vl_utils"] = module
    return "bench fallback (qwen-vl-utils not installed; same resize rule, images only)"
