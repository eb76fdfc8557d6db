"""How Qwen2.5-VL sizes a picture, without torch: the front ends need it to count a
picture's tokens before sending (the composer's meter) and to map the model's grounding
coordinates, which are pixels of the resized picture, back onto the original."""

from __future__ import annotations

import math

PATCH = 28            # pixels per image token side (14-pixel patches, merged 2x2)
MAX_RATIO = 200       # qwen_vl_utils refuses a longer side over 200 times the shorter


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = PATCH) -> tuple[int, int]:
    """(height, width) as qwen_vl_utils' smart_resize computes it: multiples of `factor`,
    the pixel count within [min_pixels, max_pixels], the aspect ratio kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_size(width: int, height: int, bounds: list[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) of the picture the model saw: smart_resize with each (min, max)
    bounds in turn (ours, then the model's processor's or a remote server's own, which
    leave a picture already within theirs as it is)."""
    w, h = width, height
    for lo, hi in bounds:
        h, w = smart_resize(h, w, lo, hi)
    return w, h


def image_tokens(width: int, height: int, min_pixels: int, max_pixels: int,
                 then: list[tuple[int, int]] = ()) -> int:
    """The tokens one picture of this size costs at these bounds (and the model's after)."""
    w, h = resized_size(width, height, [(min_pixels, max_pixels), *then])
    return (h // PATCH) * (w // PATCH)
