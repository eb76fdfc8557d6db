"""Boxes and points from Qwen2.5-VL's answers, drawn on the original picture.

A scripted engine plays the model: it sees each picture at the size the model would (the
request's smart_resize; a remote server's own bounds after ours), finds the red rectangle
drawn on it, and answers its coordinates in one of Qwen2.5-VL's grounding formats. The
chat then draws the answer's boxes on the original picture, and the test checks that they
land on the rectangle's pixels, for several picture sizes and pixel bounds (scaled up to
min_pixels and down to max_pixels), local and remote."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image

from engine.base import Engine
from engine.inputs.geometry import resized_size, smart_resize
from engine.stream import RequestHandle
from engine.types import Finished, RequestStats, TextDelta
from ui import grounding, history
from ui.chat import ChatController, Sampling

RED = (255, 0, 0)


def red_box(picture: Image.Image) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the red pixels (inclusive), in this picture's pixels."""
    px = picture.convert("RGB").load()
    xs, ys = [], []
    for y in range(picture.height):
        for x in range(picture.width):
            r, g, b = px[x, y]
            if r > 200 and g < 60 and b < 60:
                xs.append(x)
                ys.append(y)
    return min(xs), min(ys), max(xs), max(ys)


def answer_in(fmt: str, box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = box
    if fmt == "json":
        return ("Here it is:\n```json\n" + json.dumps([{"bbox_2d": [x1, y1, x2, y2],
                                                       "label": "red square"}]) + "\n```")
    if fmt == "truncated":
        whole = json.dumps({"bbox_2d": [x1, y1, x2, y2], "label": "red square"})
        return f'```json\n[\n  {whole},\n  {{"bbox_2d": [10, 20, 3'      # cut by max tokens
    if fmt == "spotting":
        return "```json\n" + json.dumps([{"bbox_2d": [x1, y1, x2, y2],
                                          "text_content": "STOP", "label": "sign"}]) + "\n```"
    if fmt == "point":
        return json.dumps([{"point_2d": [(x1 + x2) // 2, (y1 + y2) // 2], "label": "centre"}])
    if fmt == "old":
        return (f"<|object_ref_start|>red square<|object_ref_end|><|box_start|>({x1},{y1}),"
                f"({x2},{y2})<|box_end|>")
    raise ValueError(fmt)


class SeeingEngine(Engine):
    """Answers where the red rectangle is, in the pixels of the picture the model sees."""

    model_name, device_description, max_model_len = "scripted", "none", 16384

    def __init__(self, fmt: str, remote_bounds: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.remote_bounds = remote_bounds or []
        self.seen: list[tuple[int, int]] = []

    def health(self) -> bool:
        return True

    def model_pixel_bounds(self) -> list[tuple[int, int]]:
        return self.remote_bounds

    def submit(self, request, policy=None):
        image = request.conversation.messages[-1].images[0]
        picture = Image.open(image.source).convert("RGB")
        for lo, hi in [(request.min_pixels, request.max_pixels)] + self.remote_bounds:
            h, w = smart_resize(picture.height, picture.width, lo, hi)
            picture = picture.resize((w, h), Image.NEAREST)
        self.seen.append(picture.size)
        handle = RequestHandle(request.request_id)
        handle.push(TextDelta(answer_in(self.fmt, red_box(picture))))
        handle.push(Finished("stop", RequestStats(output_tokens=5)))
        return handle


def picture_file(tmp_path, size, box, name="pic.png") -> str:
    img = Image.new("RGB", size, (240, 240, 235))
    img.paste(RED, box)                    # PIL boxes: x2, y2 exclusive
    path = tmp_path / name
    img.save(path)
    return str(path)


def ask(ctrl: ChatController, path: str, sampling: Sampling) -> dict:
    state, _, ok = ctrl.add_user_turn(None, {"text": "Detect the red square.",
                                             "files": [path]}, None)
    assert ok

    async def go():
        return [s async for s, _ in ctrl.respond(state, sampling) if s is not None][-1]

    return asyncio.run(go())["turns"][-1]


CASES = [  # picture size, red box (x1, y1, x2 excl, y2 excl), min_pixels, max_pixels
    ((640, 480), (100, 120, 300, 260), 224 * 224, 1280 * 28 * 28),          # as it is
    ((200, 150), (20, 30, 120, 100), 224 * 224, 1280 * 28 * 28),            # scaled up
    ((1920, 1080), (800, 300, 1300, 900), 224 * 224, 1280 * 28 * 28),       # scaled down
    ((1000, 1000), (100, 600, 500, 950), 224 * 224, 256 * 28 * 28),         # far down
    ((333, 777), (50, 500, 300, 700), 512 * 28 * 28, 1024 * 28 * 28),       # up, odd sizes
]


@pytest.mark.parametrize("fmt", ["json", "truncated", "spotting", "old"])
@pytest.mark.parametrize("size, box, lo, hi", CASES)
def test_boxes_land_on_the_original_pixels(tmp_path, fmt, size, box, lo, hi):
    engine = SeeingEngine(fmt)
    ctrl = ChatController(engine, (tmp_path.resolve(),))
    turn = ask(ctrl, picture_file(tmp_path, size, box), Sampling(min_pixels=lo, max_pixels=hi))
    assert engine.seen[0] != size or (lo, hi) == CASES[0][2:]   # the model saw a resized copy
    [figure] = turn["figures"]
    drawn = Image.open(figure["path"]).convert("RGB")
    assert drawn.size == size                                      # the original's size
    [mark] = grounding.to_original(grounding.parse(turn["text"]),
                                   resized_size(*size, [(lo, hi)]), size)
    tolerance = max(size) / min(engine.seen[0]) + 2    # one resized pixel, in original pixels
    for got, want in zip(mark.box, (box[0], box[1], box[2] - 1, box[3] - 1)):
        assert abs(got - want) <= tolerance, (mark.box, box)
    colour = grounding.COLOURS[0]
    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    left, mid = round(mark.box[0]), round((mark.box[1] + mark.box[3]) / 2)
    assert drawn.getpixel((left, mid)) == rgb                      # the outline is there
    assert Image.open(picture_file(tmp_path, size, box, "again.png")).tobytes() == \
        Image.open(str(tmp_path / "pic.png")).tobytes()            # the original untouched


@pytest.mark.parametrize("size, box, lo, hi", CASES[:3])
def test_remote_bounds_are_applied_after_ours(tmp_path, size, box, lo, hi):
    """A remote vLLM started with a smaller max_pixels resizes our pictures again."""
    remote = [(224 * 224, 300 * 28 * 28)]
    engine = SeeingEngine("json", remote)
    ctrl = ChatController(engine, (tmp_path.resolve(),))
    turn = ask(ctrl, picture_file(tmp_path, size, box), Sampling(min_pixels=lo, max_pixels=hi))
    [mark] = grounding.to_original(grounding.parse(turn["text"]),
                                   resized_size(*size, [(lo, hi)] + remote), size)
    tolerance = max(size) / min(engine.seen[0]) + 2
    for got, want in zip(mark.box, (box[0], box[1], box[2] - 1, box[3] - 1)):
        assert abs(got - want) <= tolerance, (mark.box, box)
    assert len(turn["figures"]) == 1


def test_points_and_several_entries_and_labels():
    text = ('```json\n[{"point_2d": [10, 20], "label": "a"}, {"bbox_2d": [30, 40, 5, 6], '
            '"label": "b"}, {"nothing": 1}]\n```')
    marks = grounding.parse(text)
    assert marks[0].point == (10.0, 20.0) and marks[0].label == "a"
    assert marks[1].box == (5.0, 6.0, 30.0, 40.0)          # corners put in order
    assert len(marks) == 2
    assert grounding.parse("No boxes here, just text [1, 2].") == []
    assert grounding.parse('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "x"}') != []
    scaled = grounding.to_original(marks, (100, 100), (200, 50))
    assert scaled[0].point == (20.0, 10.0) and scaled[1].box == (10.0, 3.0, 60.0, 20.0)


def test_a_point_is_drawn_and_a_follow_up_uses_the_earlier_picture(tmp_path):
    engine = SeeingEngine("point")
    ctrl = ChatController(engine, (tmp_path.resolve(),))
    path = picture_file(tmp_path, (640, 480), (100, 100, 200, 200))
    turn = ask(ctrl, path, Sampling())
    assert len(turn["figures"]) == 1
    state = history.new_state()
    state["turns"] = [history.user_turn("look", [path]), history.assistant_turn("ok", "stop"),
                      history.user_turn("now find it", [])]
    assert history.pictures_for(state, len(state["turns"])) == [path]


def test_figures_survive_the_browser_round_trip_and_tampering(tmp_path):
    inside = tmp_path / "qwenvl-figures" / "x.png"
    state = {"turns": [{"role": "user", "text": "q", "files": []},
                       {"role": "assistant", "text": "a", "finish": "stop", "rating": "like",
                        "figures": [{"path": str(inside), "name": "x.png"},
                                    {"path": "/etc/passwd", "name": "passwd"}]}]}
    dropped: list[str] = []
    clean = history.clean_state(state, [tmp_path], dropped)
    assert clean["turns"][1]["figures"] == [{"path": str(inside), "name": "x.png"}]
    assert clean["turns"][1]["rating"] == "like" and dropped == ["passwd"]
