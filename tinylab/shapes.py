"""Synthetic pictures for the built-in tiny model (tinylab/train.py): flat shapes
(circle, square, triangle, star) in plain colours on a light background, with questions
and answers in plain English, and Qwen2.5-VL grounding JSON for "detect the shapes".

Everything is drawn from a `random.Random(seed)`, so a seed names a data set exactly.
Boxes in answers are in the RESIZED picture's pixels (engine/geometry's smart_resize with
the app's bounds, engine/types.py), as Qwen2.5-VL reports them.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from engine.inputs.geometry import resized_size
from engine.tiny import MODEL_MAX_PIXELS, MODEL_MIN_PIXELS

MIN_PIXELS = 224 * 224          # engine/types.py DEFAULT_MIN_PIXELS
MAX_PIXELS = 1280 * 28 * 28     # engine/types.py DEFAULT_MAX_PIXELS
# The tiny model's own processor (engine/tiny.py) then caps a picture at this many pixels
# (100 tokens): it was trained at that size, and a CPU trains and answers quickly there.

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 90, 220),
    "green": (40, 170, 70),
    "yellow": (240, 205, 30),
    "orange": (245, 130, 30),
    "purple": (140, 60, 190),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "star"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

COUNT_QUESTIONS = [
    "How many shapes are there, and what colours are they?",
    "How many shapes are there, and what colours are they?",
    "How many shapes are in this picture and what colours are they?",
    "Count the shapes and name their colours.",
    "How many shapes are there?",
    "Describe this image.",
]
DETECT_QUESTIONS = [
    "Detect the shapes.",
    "Detect the shapes and output their bounding boxes in JSON format.",
    "Detect all shapes in the image and return their locations as JSON.",
    "detect the shapes",
]


@dataclass
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]      # x1, y1, x2, y2 in the canvas' pixels

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


def _star(cx: float, cy: float, r: float, rot: float, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * inner
        a = rot + i * math.pi / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw(d: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill,
          outline: int = 0, inner: float = 0.45) -> tuple[int, int, int, int]:
    """Draw one shape inside `box` (optionally with a black outline `outline` px wide);
    return its tight bounding box."""
    x1, y1, x2, y2 = box
    line = {"outline": (0, 0, 0), "width": outline} if outline else {}
    if kind == "circle":
        d.ellipse(box, fill=fill, **line)
        return box
    if kind == "square":
        d.rectangle(box, fill=fill, **line)
        return box
    if kind == "triangle":
        pts = [((x1 + x2) / 2, y1), (x2, y2), (x1, y2)]
    else:
        s = x2 - x1
        pts = _star((x1 + x2) / 2, (y1 + y2) / 2 + s * 0.06, s / 2, 0.0, inner)
    d.polygon(pts, fill=fill, **line)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys)))


def _overlaps(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def draw_scene(rng: random.Random, n: int | None = None, size: tuple[int, int] | None = None,
               min_side: int = 320, max_side: int = 800) -> tuple[Image.Image, list[Shape]]:
    """A light canvas (320..800 px a side) with 1..4 non-overlapping shapes, each an eighth to a
    third of the canvas' shorter side (a little more now and then), squares a little
    stretched at times; colours and kinds may repeat, never both; a black outline on a
    third of the pictures."""
    w, h = size or (rng.randint(min_side, max_side), rng.randint(min_side, max_side))
    n = n or rng.randint(1, 4)
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    shapes: list[Shape] = []
    boxes: list[tuple[int, int, int, int]] = []
    short = min(w, h)
    outline = rng.choice([0, 0, 2, 3, 4])
    for _ in range(n):
        kind = rng.choice(SHAPES)
        taken = {(s.colour, s.kind) for s in shapes}
        colour = rng.choice([c for c in COLOUR_NAMES if (c, kind) not in taken])
        for _attempt in range(60):
            s = int(short * rng.uniform(1 / 8, 0.37))
            sy = int(s * rng.uniform(0.8, 1.0)) if kind == "square" and rng.random() < 0.3 else s
            x1, y1 = rng.randint(0, w - s - 1), rng.randint(0, h - sy - 1)
            box = (x1, y1, x1 + s, y1 + sy)
            if not any(_overlaps(box, b, 6) for b in boxes):
                break
        else:
            continue
        tight = _draw(d, kind, box, COLOURS[colour], outline, rng.uniform(0.38, 0.5))
        boxes.append(box)
        shapes.append(Shape(kind, colour, tight))
    return img, shapes


def scene(size: tuple[int, int], items: list[tuple[str, str, tuple[int, int, int, int]]],
          background=(250, 250, 250), outline: int = 0) -> tuple[Image.Image, list[Shape]]:
    """A picture with the given (kind, colour, box) shapes, for tests and demos."""
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    out = [Shape(kind, colour, _draw(d, kind, box, COLOURS[colour], outline)) for kind, colour, box in items]
    return img, out


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _one(word: str) -> str:
    """'one orange star', not 'an orange star': the article would have to be chosen a token
    before the colour it depends on, which the tiny model learns last (README: the tiny model's runs)."""
    return "one " + word


def model_size(size: tuple[int, int], min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a `size` picture as the tiny model sees it: resized with the app's
    bounds, then by the model's own processor."""
    return resized_size(size[0], size[1], [(min_pixels, max_pixels), (MODEL_MIN_PIXELS, MODEL_MAX_PIXELS)])


def answer_order(shapes: list[Shape]) -> list[int]:
    """Indices of `shapes` in the order every answer names them: by colour (COLOUR_NAMES'
    order), then by kind (SHAPES' order). Naming what is there in a fixed order asks the
    model for the set of (colour, kind) pairs in the picture and the pairs it has already
    named, not for positions; a scene never holds the same pair twice (draw_scene)."""
    return sorted(range(len(shapes)), key=lambda i: (COLOUR_NAMES.index(shapes[i].colour),
                                                     SHAPES.index(shapes[i].kind)))


def _ordered(shapes: list[Shape]) -> list[Shape]:
    return [shapes[i] for i in answer_order(shapes)]


def count_answer(shapes: list[Shape]) -> str:
    n = len(shapes)
    items = _join([_one(s.label) for s in _ordered(shapes)])
    return f"There is 1 shape: {items}." if n == 1 else f"There are {n} shapes: {items}."


def shape_of_colour_answer(shapes: list[Shape], colour: str) -> str:
    kinds = [s.kind for s in _ordered(shapes) if s.colour == colour]
    if not kinds:
        return f"There is no {colour} shape."
    if len(kinds) == 1:
        return f"The {colour} one is a {kinds[0]}."
    return f"There are {len(kinds)} {colour} shapes: " + _join([f"a {k}" for k in kinds]) + "."


def colour_of_shape_answer(shapes: list[Shape], kind: str) -> str:
    colours = [s.colour for s in _ordered(shapes) if s.kind == kind]
    if not colours:
        return f"There is no {kind}."
    if len(colours) == 1:
        return f"The {kind} is {colours[0]}."
    return f"There are {len(colours)} {PLURAL[kind]}: " + _join([_one(c) for c in colours]) + "."


def resized_boxes(shapes: list[Shape], size: tuple[int, int]) -> list[list[int]]:
    w, h = size
    rw, rh = model_size(size)
    sx, sy = rw / w, rh / h
    return [[round(s.box[0] * sx), round(s.box[1] * sy), round(s.box[2] * sx), round(s.box[3] * sy)]
            for s in shapes]


def detect_answer(shapes: list[Shape], size: tuple[int, int]) -> str:
    """Qwen2.5-VL's grounding JSON, boxes in the resized picture's pixels; each entry names
    its shape before its box (the same keys as Qwen's, in the other order), so the model
    decides what it points at before it writes where."""
    boxes = resized_boxes(shapes, size)
    rows = [f'\t{{"label": "{shapes[i].label}", "bbox_2d": [{", ".join(map(str, boxes[i]))}]}}'
            for i in answer_order(shapes)]
    return "```json\n[\n" + ",\n".join(rows) + "\n]\n```"


def second_picture_answer(shapes: list[Shape], which: str) -> str:
    return f"The shape in the {which} picture is {shapes[0].colour}."


@dataclass
class Example:
    """One training conversation: pictures in the first user turn, then (question, answer)
    turns about them."""
    images: list[Image.Image]
    turns: list[tuple[str, str]]
    task: str
    shapes: list[list[Shape]]
    tasks: list[str]        # each turn's kind (TASKS or "two")

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[0][1]


TASKS = ["count", "shape_of", "colour_of", "detect"]


def ask_about(rng: random.Random, task: str, img: Image.Image, shapes: list[Shape]) -> tuple[str, str]:
    """A question of kind `task` about one picture, and its answer."""
    if task == "count":
        return rng.choice(COUNT_QUESTIONS), count_answer(shapes)
    if task == "shape_of":
        colour = rng.choice([s.colour for s in shapes]) if rng.random() < 0.8 else rng.choice(COLOUR_NAMES)
        q = rng.choice([f"What shape is the {colour} one?", f"What shape is the {colour} one?",
                        f"Which shape is {colour}?"])
        return q, shape_of_colour_answer(shapes, colour)
    if task == "colour_of":
        kind = rng.choice([s.kind for s in shapes]) if rng.random() < 0.8 else rng.choice(SHAPES)
        q = rng.choice([f"Which colour is the {kind}?", f"What colour is the {kind}?",
                        f"Which colour is the {kind}?"])
        return q, colour_of_shape_answer(shapes, kind)
    return rng.choice(DETECT_QUESTIONS), detect_answer(shapes, img.size)


def _ask_second(rng: random.Random, which: str, shapes: list[Shape]) -> tuple[str, str]:
    q = rng.choice([f"What colour is the shape in the {which} picture?",
                    f"What colour is the shape in the {which} picture?",
                    f"Which colour is the shape in the {which} picture?"])
    return q, second_picture_answer(shapes, which)


def make_example(rng: random.Random, task: str | None = None, turns: int = 1, **scene) -> Example:
    """A conversation of `turns` questions (different kinds where possible) about fresh
    pictures; the first question is of kind `task` (drawn when None)."""
    task = task or rng.choices(TASKS + ["two"], weights=[4, 2, 2, 4, 2])[0]
    if task == "two":
        a, sa = draw_scene(rng, n=1, **scene)
        b, sb = draw_scene(rng, n=1, **scene)
        order = rng.sample(["first", "second"], 2)[:turns]
        qa = [_ask_second(rng, w, sa if w == "first" else sb) for w in order]
        return Example([a, b], qa, task, [sa, sb], [task] * len(qa))
    img, shapes = draw_scene(rng, **scene)
    kinds = [task] + rng.sample([t for t in TASKS if t != task], min(turns, len(TASKS)) - 1)
    return Example([img], [ask_about(rng, k, img, shapes) for k in kinds], task, [shapes], kinds)


# ---- scoring (tinylab/train.py --eval and tests) -------------------------------------

def parse_count(text: str) -> int | None:
    m = re.search(r"There (?:is|are) (\d+) shape", text)
    return int(m.group(1)) if m else None


def parse_colours(text: str) -> set[str]:
    return {c for c in COLOUR_NAMES if re.search(rf"\b{c}\b", text)}


def parse_detections(text: str) -> list[tuple[list[float], str]]:
    m = re.search(r"```json\s*(.*?)```", text, re.S)
    body = m.group(1) if m else text
    try:
        items = json.loads(body)
    except ValueError:
        items = [json.loads(x) for x in re.findall(r"\{[^{}]*\}", body) if _loads_ok(x)]
    out = []
    for it in items if isinstance(items, list) else []:
        if isinstance(it, dict) and isinstance(it.get("bbox_2d"), list) and len(it["bbox_2d"]) == 4:
            out.append(([float(v) for v in it["bbox_2d"]], str(it.get("label", ""))))
    return out


def _loads_ok(s: str) -> bool:
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_ious(pred: list[list[float]], truth: list[list[int]]) -> list[float]:
    """Per true box, its IoU with a distinct predicted box (greedy best-first matching)."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)),
                   reverse=True)
    used_p, best = set(), [0.0] * len(truth)
    done = set()
    for v, i, j in pairs:
        if i in used_p or j in done:
            continue
        used_p.add(i)
        done.add(j)
        best[j] = v
    return best
