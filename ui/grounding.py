"""Boxes and points in Qwen2.5-VL's answers, drawn on the picture they are about.

Qwen2.5-VL answers a grounding question with absolute pixel coordinates in the picture
*as the processor resized it* (smart_resize within the request's min/max pixels), in one
of these forms (the Qwen cookbooks):

- a ```json list of {"bbox_2d": [x1, y1, x2, y2], "label": ...} (text spotting adds
  "text_content"), often cut short by max tokens: the list is read up to its last whole entry;
- {"point_2d": [x, y], "label": ...};
- the older <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>.

`parse` finds them, `to_original` maps them from the resized picture onto the original,
and `annotate` draws a labelled copy (the original stays untouched). No torch here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from engine.geometry import resized_size

COLOURS = ["#1f6feb", "#f58231", "#3cb44b", "#e6194b", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#469990", "#9a6324"]
FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)
OLD_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?\s*"
    r"<\|box_start\|>\s*\(\s*(?P<x1>-?\d+(?:\.\d+)?)\s*,\s*(?P<y1>-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(?P<x2>-?\d+(?:\.\d+)?)\s*,\s*(?P<y2>-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>", re.S)
MAX_MARKS = 200


@dataclass(frozen=True)
class Mark:
    """One box (x1, y1, x2, y2) or point (x, y), in some picture's pixels."""

    label: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    text: str | None = None          # text spotting: what is written inside the box


def _numbers(value: Any, n: int) -> tuple[float, ...] | None:
    if isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    return None


def _mark(entry: Any) -> Mark | None:
    if not isinstance(entry, dict):
        return None
    label = str(entry.get("label") or entry.get("text_content") or "").strip()
    text = entry.get("text_content")
    box = _numbers(entry.get("bbox_2d"), 4)
    if box is not None:
        x1, y1, x2, y2 = box
        return Mark(label, box=(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)),
                    text=str(text) if text is not None else None)
    point = _numbers(entry.get("point_2d"), 2)
    if point is not None:
        return Mark(label, point=point)
    return None


def _whole_entries(body: str) -> list[Any]:
    """The JSON list in `body`, or as much of it as ends in a whole entry (a truncated
    answer), closed again, as the cookbook repairs it."""
    start = body.find("[")
    if start < 0:
        start = body.find("{")
        if start < 0:
            return []
        body = "[" + body[start:]
        start = 0
    body = body[start:].strip()
    try:
        data = json.loads(body)
        return data if isinstance(data, list) else [data]
    except ValueError:
        pass
    end = body.rfind("}")
    while end > 0:
        try:
            data = json.loads(body[:end + 1] + "]")
            return data if isinstance(data, list) else []
        except ValueError:
            end = body.rfind("}", 0, end)
    return []


def parse(text: str) -> list[Mark]:
    """Every box and point in an answer, in order (at most MAX_MARKS)."""
    marks: list[Mark] = []
    for m in OLD_BOX.finditer(text):
        coords = tuple(float(m.group(k)) for k in ("x1", "y1", "x2", "y2"))
        marks.append(Mark((m.group("label") or "").strip(), box=coords))
    if not marks:
        bodies = FENCE.findall(text) or ([text] if '"bbox_2d"' in text or '"point_2d"' in text
                                        else [])
        for body in bodies:
            marks += [m for m in map(_mark, _whole_entries(body)) if m is not None]
    return marks[:MAX_MARKS]


def to_original(marks: list[Mark], resized: tuple[int, int],
                original: tuple[int, int]) -> list[Mark]:
    """Marks in the resized picture's pixels -> the original's (clamped to the picture)."""
    sx, sy = original[0] / resized[0], original[1] / resized[1]

    def x(v: float) -> float:
        return min(max(v * sx, 0.0), original[0])

    def y(v: float) -> float:
        return min(max(v * sy, 0.0), original[1])

    out = []
    for m in marks:
        if m.box is not None:
            x1, y1, x2, y2 = m.box
            out.append(replace(m, box=(x(x1), y(y1), x(x2), y(y2))))
        elif m.point is not None:
            out.append(replace(m, point=(x(m.point[0]), y(m.point[1]))))
    return out


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:             # an old Pillow without scalable default fonts
        return ImageFont.load_default()


def draw(picture: Image.Image, marks: list[Mark]) -> Image.Image:
    """A copy of the picture with each mark drawn and labelled, sized to be readable."""
    out = picture.convert("RGB")
    canvas = ImageDraw.Draw(out)
    side = max(out.size)
    width = max(2, side // 250)
    font = _font(max(12, side // 40))
    for i, m in enumerate(marks):
        colour = COLOURS[i % len(COLOURS)]
        if m.box is not None:
            x1, y1, x2, y2 = m.box
            canvas.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            anchor = (x1, y1)
        else:
            r = max(4, side // 120)
            px, py = m.point
            canvas.ellipse((px - r, py - r, px + r, py + r), fill=colour, outline="white")
            anchor = (px + r, py - r)
        label = m.label if not m.text or m.text == m.label else f"{m.label}: {m.text}"
        if label:
            left, top, right, bottom = canvas.textbbox((0, 0), label, font=font)
            tw, th = right - left, bottom - top
            tx = min(max(anchor[0], 0), max(0, out.width - tw - 6))
            ty = anchor[1] - th - 6 if anchor[1] - th - 6 >= 0 else anchor[1]
            canvas.rectangle((tx, ty, tx + tw + 6, ty + th + 6), fill=colour)
            canvas.text((tx + 3 - left, ty + 3 - top), label, fill="white", font=font)
    return out


def annotate(answer: str, pictures: list[str], bounds: list[tuple[int, int]],
             out_dir: Path) -> list[str]:
    """Draw the answer's marks on each picture (paths of the originals) and save the copies
    in `out_dir`; returns their paths ([] when the answer holds no marks)."""
    marks = parse(answer)
    if not marks or not pictures:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for path in pictures:
        try:
            with Image.open(path) as img:
                img.load()
                original = img.copy()
        except (OSError, ValueError):
            continue
        resized = resized_size(original.width, original.height, bounds)
        drawn = draw(original, to_original(marks, resized, original.size))
        target = out_dir / f"{Path(path).stem}-boxes-{abs(hash((answer, path))) % 10**10}.png"
        drawn.save(target)
        saved.append(str(target))
    return saved
