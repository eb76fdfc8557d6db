"""Boxes and points in Qwen2.5-VL's answers, drawn on the picture they are about.

Qwen2.5-VL answers a grounding question with absolute pixel coordinates in the picture
*as the processor resized it* (smart_resize within the request's min/max pixels), in one
of these forms (the Qwen cookbooks):

- a ```json list of {"bbox_2d": [x1, y1, x2, y2], "label": ...} (text spotting adds
  "text_content"), often cut short by max tokens: the list is read up to its last whole entry;
- {"point_2d": [x, y], "label": ...};
- the older <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>;
- an answer that is one JSON value (the page's JSON mode): its marks under any key.

`parse` finds them, `to_original` maps them from the resized picture onto the original,
and `annotate` draws a labelled copy (the original stays untouched). No torch here.

An answer is user-shaped (a prompt can steer it, a remote server can send anything), so
`parse` is linear in its length and never raises: the box tokens are found with str.find,
a JSON list is read entry by entry with raw_decode from a moving index, an entry nesting
deeper than MAX_DEPTH ends the list (checked by a linear pre-scan, before decoding), and
reading stops at MAX_MARKS marks. `annotate` decodes only pictures whose header is within
the engine's picture limit."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

from engine.inputs.geometry import resized_size
from engine.inputs.media import MediaPolicy

COLOURS = ["#1f6feb", "#f58231", "#3cb44b", "#e6194b", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#469990", "#9a6324"]
MAX_MARKS = 200          # marks read from one answer; the rest of it is not looked at
MAX_ENTRIES = 8 * MAX_MARKS   # JSON list entries read (most are marks; other entries are rare)
MAX_DEPTH = 16           # nesting of one JSON entry; a deeper one ends the list there
MAX_LABEL_CHARS = 120    # of a label as drawn on the picture

REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START = "<|box_start|>"
_NUM = r"(-?\d+(?:\.\d+)?)"
# What follows <|box_start|>: only spaces, digits and punctuation, so the regions two box
# tokens' matches look at never overlap and the scan stays linear.
BOX_BODY = re.compile(rf"\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)"
                      r"\s*<\|box_end\|>")
FENCE = "```"
JSON_WS = re.compile(r"[ \t\n\r]*")           # the whitespace JSON allows between tokens
JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')     # what decides a JSON value's nesting
_DECODER = json.JSONDecoder()


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
        try:
            return tuple(float(v) for v in value)
        except OverflowError:         # an integer too large for a float: not a coordinate
            return None
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


# ----------------------------------------------------------------------------- old tokens
def _label_before(text: str, box: int, floor: int) -> str:
    """The label of the box token at `box`: the text between <|object_ref_start|> and the
    <|object_ref_end|> just before it (only whitespace between), never before `floor` (the
    end of the previous box). The earliest start after `floor` is taken, as the old
    `(?P<label>.*?)` regex did, but found with str.find instead of backtracking."""
    j = box
    while j > floor and text[j - 1].isspace():
        j -= 1
    end = j - len(REF_END)
    if end < floor or not text.startswith(REF_END, end):
        return ""
    start = text.find(REF_START, floor, end)
    return text[start + len(REF_START):end].strip() if start >= 0 else ""


def _token_boxes(text: str) -> list[Mark]:
    """<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
    marks in order, at most MAX_MARKS; one pass with str.find (linear in the answer)."""
    marks: list[Mark] = []
    floor = 0
    pos = text.find(BOX_START)
    while pos >= 0 and len(marks) < MAX_MARKS:
        m = BOX_BODY.match(text, pos + len(BOX_START))
        if m is None:
            pos = text.find(BOX_START, pos + len(BOX_START))
            continue
        marks.append(Mark(_label_before(text, pos, floor),
                          box=tuple(float(v) for v in m.groups())))
        floor = m.end()
        pos = text.find(BOX_START, floor)
    return marks


# ----------------------------------------------------------------------------- JSON lists
def _bodies(text: str) -> Iterator[str]:
    """The insides of the answer's ``` fences (an unclosed last one runs to the end), or the
    whole answer when it has no fence but names boxes or points."""
    pos = text.find(FENCE)
    if pos < 0:
        if '"bbox_2d"' in text or '"point_2d"' in text:
            yield text
        return
    while pos >= 0:
        start = pos + len(FENCE)
        if text.startswith("json", start):
            start += len("json")
        end = text.find(FENCE, start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        pos = text.find(FENCE, end + len(FENCE))


def _entry_end(body: str, start: int) -> int | None:
    """Just past the array or object opening at `start`, found by counting brackets outside
    strings (a linear pre-scan, so nothing deeper than MAX_DEPTH reaches the decoder);
    None when it never closes or nests deeper."""
    depth, in_string, escaped = 0, False, -1
    for m in JSON_SPECIAL.finditer(body, start):
        at = m.start()
        if at == escaped:
            continue
        c = body[at]
        if in_string:
            if c == "\\":
                escaped = at + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return None
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return at + 1
    return None


def _decode_at(body: str, at: int) -> tuple[Any, int] | None:
    """The JSON value at `at` and the index after it; None when there is none (a truncated or
    too deeply nested entry ends the list)."""
    try:
        if body[at] in "[{":
            end = _entry_end(body, at)
            if end is None:
                return None
            value, used = _DECODER.raw_decode(body[at:end])
            return (value, at + used) if used == end - at else None
        return _DECODER.raw_decode(body, at)
    except (ValueError, RecursionError):
        return None


def _entries(body: str) -> Iterator[Any]:
    """The entries of the JSON list in `body`, one at a time, up to the last whole one (an
    answer cut short by max tokens), as the cookbook's repair reads it: one pass with
    raw_decode from a moving index, at most MAX_ENTRIES."""
    start = body.find("[")
    if start < 0:
        start = body.find("{")
        if start < 0:
            return
        body = "[" + body[start:]
        start = 0
    body = body[start:].strip()
    at = JSON_WS.match(body, 1).end()
    for _ in range(MAX_ENTRIES):
        if at >= len(body):
            return
        found = _decode_at(body, at)
        if found is None:
            return
        value, at = found
        yield value
        at = JSON_WS.match(body, at).end()
        if not body.startswith(",", at):
            return                      # "]" closes the list; anything else ends it too
        at = JSON_WS.match(body, at + 1).end()


# ----------------------------------------------------------------------------- whole JSON
def _json_marks(text: str) -> list[Mark]:
    """The marks anywhere in an answer that is one JSON value (a JSON-mode answer: boxes may
    sit under any key, as a user's schema puts them), in document order; [] when the answer
    is not JSON. json.loads is linear and refuses deep nesting (RecursionError); the walk
    is iterative and does not look inside a mark."""
    if text.lstrip()[:1] not in ("[", "{"):
        return []
    try:
        stack = [json.loads(text)]
    except (ValueError, RecursionError):
        return []
    marks: list[Mark] = []
    while stack and len(marks) < MAX_MARKS:
        value = stack.pop()
        mark = _mark(value)
        if mark is not None:
            marks.append(mark)
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return marks


def parse(text: str) -> list[Mark]:
    """Every box and point in an answer, in order (at most MAX_MARKS). Linear in the answer's
    length and never raises: an answer is whatever the model (or a remote server) sent."""
    if not isinstance(text, str):
        return []
    marks = _token_boxes(text) or _json_marks(text)
    if marks:
        return marks
    for body in _bodies(text):
        for entry in _entries(body):
            mark = _mark(entry)
            if mark is not None:
                marks.append(mark)
                if len(marks) >= MAX_MARKS:
                    return marks
    return marks


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
        if len(label) > MAX_LABEL_CHARS:       # drawn text costs time and room: keep it short
            label = label[:MAX_LABEL_CHARS - 1] + "…"
        if label:
            left, top, right, bottom = canvas.textbbox((0, 0), label, font=font)
            tw, th = right - left, bottom - top
            tx = min(max(anchor[0], 0), max(0, out.width - tw - 6))
            ty = anchor[1] - th - 6 if anchor[1] - th - 6 >= 0 else anchor[1]
            canvas.rectangle((tx, ty, tx + tw + 6, ty + th + 6), fill=colour)
            canvas.text((tx + 3 - left, ty + 3 - top), label, fill="white", font=font)
    return out


def _open_within(path: str, max_pixels: int) -> Image.Image | None:
    """The picture at `path`, decoded only when its header's size is within `max_pixels`
    (the engine's picture limit: a picture the engine refused is never decoded here)."""
    try:
        with Image.open(path) as img:
            width, height = img.size            # read from the header: nothing decoded yet
            if width * height > max_pixels:
                return None
            img.load()
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def annotate(answer: str, pictures: list[str], bounds: list[tuple[int, int]],
             out_dir: Path, max_pixels: int = MediaPolicy.max_image_pixels) -> list[str]:
    """Draw the answer's marks on each picture (paths of the originals) and save the copies
    in `out_dir`; returns their paths ([] when the answer holds no marks). A picture over
    `max_pixels` (pass the engine's limit) or that cannot be read is left out."""
    marks = parse(answer)
    if not marks or not pictures:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for path in pictures:
        original = _open_within(path, max_pixels)
        if original is None:
            continue
        try:
            resized = resized_size(original.width, original.height, bounds)
        except (ValueError, ZeroDivisionError):     # an aspect ratio the model refuses
            continue
        drawn = draw(original, to_original(marks, resized, original.size))
        target = out_dir / f"{Path(path).stem}-boxes-{abs(hash((answer, path))) % 10**10}.png"
        drawn.save(target)
        saved.append(str(target))
    return saved
