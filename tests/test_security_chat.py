"""Security round 2 (issue 30), the chat the browser keeps: one table per finding, each
row a size the probe used, each failing on the code before the fix.

- Save JSON embedded a file once per mention (3000 mentions of one picture: 145 MB);
- kept and imported chats named any number of files (20000 written on import; 12000
  resolved on every page load);
- the boxes parser was quadratic (the old box-token regex, a json.loads per "}") and a
  deeply nested ```json block raised RecursionError;
- boxes were drawn on pictures over the engine's picture limit (decoded at full size);
- a 2 MB answer was sent to the tab whole;
- a Markdown image or <img> in an answer loaded from anywhere without a click.

Everything runs in-process on files under tmp_path: nothing leaves the machine. Memory is
the peak resident size during the call (VmHWM after resetting it), less the size before.
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from markdown_it import MarkdownIt
from PIL import Image

from ui import display, grounding, history
from support import measured

RSS_LIMIT_MB = 300


# --------------------------------------------------------------------------- helpers




@pytest.fixture
def uploads(tmp_path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


def asset(folder: Path, name: str = "asset.png", size: int = 36_000) -> Path:
    """A file the size of the probe's asset (its 3000 copies made 145 MB)."""
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


def chat_naming(path: Path, times: int, per_turn: int | None = None) -> dict:
    """A kept chat naming one file `times` times (in one turn, or `per_turn` per turn)."""
    per_turn = per_turn or times
    entry = {"path": str(path), "name": path.name}
    turns = []
    for start in range(0, times, per_turn):
        turns += [{"role": "user", "text": "what is it?",
                   "files": [entry] * min(per_turn, times - start)},
                  {"role": "assistant", "text": "a picture", "finish": "stop"}]
    return {"system": "", "turns": turns}


# --------------------------------------------------------------------------- 1. Save JSON
@pytest.mark.parametrize("times", [3000, 12000])
def test_an_export_embeds_each_file_once(uploads, times):
    path = asset(uploads)
    state = chat_naming(path, times)          # as the browser may send it, before any cap
    doc, seconds, grew = measured(history.export_json, state, "tiny")
    parsed = json.loads(doc)
    assert len(parsed["files"]) == 1
    assert len(doc) < 2 * path.stat().st_size + 100 * times    # one copy, plus the names
    assert seconds < 1 and grew < RSS_LIMIT_MB
    refs = {f["ref"] for t in parsed["turns"] if t["role"] == "user" for f in t["files"]}
    assert refs == {"f1"}
    # Through the page (the kept chat is cleaned first) it is smaller still.
    small = history.export_json(history.clean_state(state, [uploads]), "tiny")
    assert len(small) < 2 * path.stat().st_size + 10_000


@pytest.mark.parametrize("budget, kept", [(0, 0), (40_000, 1), (80_000, 2), (10**9, 3)])
def test_an_export_is_bounded_by_what_it_embeds(uploads, budget, kept):
    paths = [asset(uploads, f"{n}.png") for n in range(3)]
    state = history.new_state()
    state["turns"] = [history.user_turn("one", paths[:2]), history.assistant_turn("ok", "stop"),
                      history.user_turn("two", [paths[2], paths[0]])]
    left_out: list[str] = []
    doc = json.loads(history.export_json(state, max_bytes=budget, left_out=left_out))
    assert len(doc["files"]) == kept
    assert sum(len(base64.b64decode(v.split(",", 1)[1])) for v in doc["files"].values()) <= budget
    assert left_out == [p.name for p in paths[kept:]]         # each named once, for one line
    omitted = [f["name"] for t in doc["turns"] if t["role"] == "user" for f in t["files"]
               if f.get("omitted")]
    assert sorted(set(omitted)) == sorted(p.name for p in paths[kept:])


def test_export_then_import_keeps_text_and_files(uploads, tmp_path):
    a, b = asset(uploads, "a.png", 5000), asset(uploads, "b.jpg", 7000)
    state = history.new_state("sys")
    state["turns"] = [history.user_turn("first", [a, b, a]),
                      history.assistant_turn("shapes", "stop", {"output_tokens": 2}),
                      history.user_turn("again", [b])]
    dest = tmp_path / "imports"
    loaded = history.import_json(history.export_json(state, "tiny"), dest)
    assert loaded["system"] == "sys"
    assert [t["text"] for t in loaded["turns"]] == ["first", "shapes", "again"]
    files = [f for t in loaded["turns"] if t["role"] == "user" for f in t["files"]]
    assert [f["name"] for f in files] == ["a.png", "b.jpg", "a.png", "b.jpg"]
    assert [Path(f["path"]).read_bytes() for f in files] == \
        [a.read_bytes(), b.read_bytes(), a.read_bytes(), b.read_bytes()]
    assert len({f["path"] for f in files}) == 2                 # each distinct file once
    assert sum(1 for p in dest.rglob("*") if p.is_file()) == 2


def test_an_old_export_with_inline_data_still_imports(uploads, tmp_path):
    data = "data:image/png;base64," + base64.b64encode(asset(uploads).read_bytes()).decode()
    old = {"format": "qwen-vl-chat", "version": 1, "model": "tiny", "system": "s", "turns": [
        {"role": "user", "text": "q", "files": [{"name": "a.png", "data": data},
                                                {"name": "a.png", "data": data},
                                                {"name": "gone.png", "missing": True}]},
        {"role": "assistant", "text": "a", "finish": "stop", "rating": "like"}]}
    left_out: list[str] = []
    loaded = history.import_json(json.dumps(old), tmp_path / "imports", left_out)
    assert [t["text"] for t in loaded["turns"]] == ["q", "a"]
    assert loaded["turns"][1]["rating"] == "like"
    files = loaded["turns"][0]["files"]
    assert [f["name"] for f in files] == ["a.png", "a.png"] and left_out == ["gone.png"]
    assert Path(files[0]["path"]).read_bytes() == (uploads / "asset.png").read_bytes()
    assert sum(1 for p in (tmp_path / "imports").rglob("*") if p.is_file()) == 1


# --------------------------------------------------------------------------- 2. files per chat
def export_doc(entries: int, per_turn: int, distinct: bool) -> str:
    """An export naming `entries` files ("empty" ones as the probe's, or all different)."""
    turns = []
    for start in range(0, entries, per_turn):
        files = [{"name": f"{n}.png", "data": "data:image/png;base64," + (
            base64.b64encode(str(n).encode()).decode() if distinct else "")}
            for n in range(start, min(entries, start + per_turn))]
        turns += [{"role": "user", "text": "q", "files": files},
                  {"role": "assistant", "text": "a", "finish": "stop"}]
    return json.dumps({"format": "qwen-vl-chat", "version": 1, "turns": turns})


@pytest.mark.parametrize("per_turn, distinct", [(20000, False), (20000, True), (50, False),
                                                (50, True)],
                         ids=["one-turn-same", "one-turn-distinct", "spread-same",
                              "spread-distinct"])
def test_an_import_of_20000_entries_writes_few_files_quickly(tmp_path, per_turn, distinct):
    doc = export_doc(20000, per_turn, distinct)
    dest = tmp_path / "imports"
    state, seconds, grew = measured(history.import_json, doc, dest)
    written = sum(1 for p in dest.rglob("*") if p.is_file())
    assert seconds < 1 and grew < RSS_LIMIT_MB
    assert written == (min(history.MAX_FILES_PER_TURN if per_turn > 50 else
                           history.MAX_FILES_PER_CHAT, 20000) if distinct else 1)
    per_turn_kept = [len(t["files"]) for t in state["turns"] if t["role"] == "user"]
    assert max(per_turn_kept) <= history.MAX_FILES_PER_TURN
    assert sum(per_turn_kept) <= history.MAX_FILES_PER_CHAT
    assert per_turn_kept[-1] > 0                    # the newest turns keep their files


def test_an_import_nested_deeply_is_one_clear_line(tmp_path):
    from engine.errors import InvalidRequestError

    doc = '{"format": "qwen-vl-chat", "turns": ' + "[" * 100_000 + "]" * 100_000 + "}"
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        history.import_json(doc, tmp_path / "imports")
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("times, per_turn, distinct", [(12000, None, False), (20000, 50, False),
                                                       (20000, 50, True)],
                         ids=["12000-one-asset", "20000-spread", "20000-distinct-paths"])
def test_a_page_load_bounds_the_files_a_kept_chat_names(uploads, times, per_turn, distinct):
    path = asset(uploads)
    state = chat_naming(path, times, per_turn)
    if distinct:
        for t, turn in enumerate(state["turns"][::2]):
            turn["files"] = [{"path": str(uploads / f"{t}-{n}.png"), "name": "x.png"}
                             for n in range(len(turn["files"]))]
    clean, seconds, grew = measured(history.clean_state, state, [uploads])
    assert seconds < 0.2 and grew < RSS_LIMIT_MB
    kept = [len(t["files"]) for t in clean["turns"] if t["role"] == "user"]
    assert max(kept) <= history.MAX_FILES_PER_TURN
    assert sum(kept) <= history.MAX_FILES_PER_CHAT and kept[-1] > 0


def test_a_question_carries_at_most_the_caps_and_a_repeated_file_costs_once(uploads):
    path = asset(uploads)
    assert len(history.user_turn("q", [path] * 100)["files"]) == history.MAX_FILES_PER_TURN
    state = history.new_state()
    state["turns"] = [history.user_turn("q", [path] * 16), history.assistant_turn("a", "stop")] * 4
    assert history.file_room(state) == 0
    assert history.user_turn("more", [path], history.file_room(state))["files"] == []
    state["turns"] = state["turns"][:2]
    assert history.file_room(state) == history.MAX_FILES_PER_TURN
    # Normal chats are unchanged: a few files, named as sent.
    small = history.clean_state({"turns": [history.user_turn("q", [path, path])]}, [uploads])
    assert [f["path"] for f in small["turns"][0]["files"]] == [str(path), str(path)]


# --------------------------------------------------------------------------- 3. boxes parser
def token_flood(kb: int) -> str:
    """The old box tokens' worst case: labels that never reach a box."""
    unit = "<|object_ref_start|>label<|object_ref_end|> "
    return unit * (kb * 1000 // len(unit))


def box_list(n: int, close: bool = True) -> str:
    body = ",".join('{"bbox_2d": [1, 2, 30, 40], "label": "x"}' for _ in range(n))
    return "```json\n[" + body + ("]\n```" if close else ', {"bbox_2d": [5')


PARSER_CASES = [  # name, answer, marks expected
    ("230KB-tokens", token_flood(230), 0),
    ("390KB-tokens", token_flood(390), 0),
    ("390KB-starts", "<|object_ref_start|>" * 19_500, 0),
    ("300000-boxes", box_list(300_000), grounding.MAX_MARKS),
    ("300000-boxes-cut", box_list(300_000, close=False), grounding.MAX_MARKS),
    ("5000-deep", "```json\n" + "[" * 5000 + "]" * 5000 + "\n```", 0),
    ("5000-deep-after-a-box", "```json\n[" + '{"bbox_2d": [1, 2, 3, 4], "label": "a"}, '
     + '{"x": ' * 5000 + "1" + "}" * 5000 + "]\n```", 1),
    ("300000-braces", "```json\n[" + "}" * 300_000, 0),
]


@pytest.mark.parametrize("answer, marks", [c[1:] for c in PARSER_CASES],
                         ids=[c[0] for c in PARSER_CASES])
def test_the_boxes_parser_is_linear_and_never_raises(answer, marks):
    found, seconds, grew = measured(grounding.parse, answer)
    assert len(found) == marks
    assert seconds < 0.5 and grew < RSS_LIMIT_MB


WELL_FORMED = [  # answer, (label, box, point, text) of each mark
    ('```json\n[\n  {"bbox_2d": [10, 20, 30, 40], "label": "cat"},\n  {"bbox_2d": [50, 60, 5, 6],'
     ' "label": "dog"}\n]\n```', [("cat", (10, 20, 30, 40), None, None),
                                  ("dog", (5, 6, 50, 60), None, None)]),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "text_content": "STOP", "label": "sign"}]\n```',
     [("sign", (1, 2, 3, 4), None, "STOP")]),
    ('[{"point_2d": [7, 8], "label": "centre"}]', [("centre", None, (7, 8), None)]),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [9, 9, 1',
     [("a", (1, 2, 3, 4), None, None)]),
    ("<|object_ref_start|>red car<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|> and "
     "<|object_ref_start|> bus <|object_ref_end|> <|box_start|>( 5 , 6 ) , ( 7.5 , 8 )<|box_end|>"
     " <|box_start|>(9,9),(10,10)<|box_end|>",
     [("red car", (1, 2, 3, 4), None, None), ("bus", (5, 6, 7.5, 8), None, None),
      ("", (9, 9, 10, 10), None, None)]),
    ("Nothing here [1, 2] {3}.", []),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "x}]\\"["}]\n```\n```json\n'
     '[{"point_2d": [1.5, -2], "label": null}]\n```',
     [('x}]"[', (1, 2, 3, 4), None, None), ("", None, (1.5, -2), None)]),
]


@pytest.mark.parametrize("answer, expected", WELL_FORMED)
def test_well_formed_answers_read_as_before(answer, expected):
    got = [(m.label, m.box, m.point, m.text) for m in grounding.parse(answer)]
    assert got == [(label, tuple(map(float, box)) if box else None,
                    tuple(map(float, point)) if point else None, text)
                   for label, box, point, text in expected]


ADVERSARIAL = [
    "", "```", "```json", "```json\n[", "[{", '"bbox_2d"', '{"bbox_2d": [1e999, 2, 3, 4]}',
    '```json\n[{"bbox_2d": [' + "9" * 5000 + ', 1, 2, 3]}]```',             # over int's digits
    '```json\n[{"bbox_2d": [' + "9" * 400 + ', 1, 2, 3], "label": "big"}]```',   # over a float
    "```json\n[" + '"\\' * 10000, "```json\n[" + "{" * 100_000, "```json\n" + "[" * 100_000,
    "<|box_start|>" * 10000 + "(1,2),(3,4)", "<|box_end|>(" * 10000, "\\" * 10000 + "```",
    '```json\n[{"label": {"a": [[[[[[[[]]]]]]]]}, "bbox_2d": [1, 2, 3, 4]}]```',
    "```json\n[NaN, Infinity, -Infinity, {\"point_2d\": [NaN, 1]}]```",
    "\udcff```json\n[\"\udcff\"]```"]


def test_adversarial_answers_never_raise():
    for answer in ADVERSARIAL:
        marks, seconds, _ = measured(grounding.parse, answer)
        assert isinstance(marks, list) and seconds < 0.5, answer[:80]


# --------------------------------------------------------------------------- 4. drawing limit
def png(path: Path, width: int, height: int, pixels: bool) -> Path:
    """A greyscale PNG of zeros, written row by row (nothing held at full size), or only its
    header (`pixels` False: IHDR claims the size, no image data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with path.open("wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                   8, 0, 0, 0, 0)))
        if pixels:
            squeeze, row = zlib.compressobj(1), bytes(width + 1)     # filter byte + a row
            data = [squeeze.compress(row) for _ in range(height)] + [squeeze.flush()]
            fh.write(chunk(b"IDAT", b"".join(data)))
        fh.write(chunk(b"IEND", b""))
    return path


BOX = '```json\n[{"bbox_2d": [10, 10, 50, 50], "label": "thing"}]\n```'
DRAW_CASES = [  # name, width, height, decodable, max_pixels, drawn
    ("20000x10000-header-only", 20_000, 10_000, False, 64_000_000, 0),
    ("9000x8000-over-64Mpx", 9_000, 8_000, True, 64_000_000, 0),
    ("100x100-over-a-small-limit", 100, 100, True, 5_000, 0),
    ("100x100-within", 100, 100, True, 64_000_000, 1),
]


@pytest.mark.parametrize("width, height, pixels, limit, drawn", [c[1:] for c in DRAW_CASES],
                         ids=[c[0] for c in DRAW_CASES])
def test_boxes_are_drawn_only_on_pictures_within_the_limit(tmp_path, width, height, pixels,
                                                           limit, drawn):
    picture = png(tmp_path / "big.png", width, height, pixels)
    bounds = [(224 * 224, 1280 * 28 * 28)]
    out, seconds, grew = measured(grounding.annotate, BOX, [str(picture)], bounds,
                                  tmp_path / "figures", limit)
    assert len(out) == drawn
    assert seconds < 1 and grew < RSS_LIMIT_MB
    if drawn:
        assert Image.open(out[0]).size == (width, height)


# --------------------------------------------------------------------------- 5. long answers
def answer_state(text: str) -> dict:
    state = history.new_state()
    state["turns"] = [history.user_turn("q", []), history.assistant_turn(text, "stop")]
    return state


LONG_CASES = [  # name, answer
    ("2MB-prose", "word " * 400_000),
    ("2MB-in-a-code-fence", "Here:\n```python\n" + "x = 1  # a line of code\n" * 85_000),
    ("5MB-one-line", "x" * 5_000_000),
    ("2MB-tilde-fence", "~~~~\n" + "```\n" * 500_000),
]


@pytest.mark.parametrize("answer", [c[1] for c in LONG_CASES], ids=[c[0] for c in LONG_CASES])
def test_a_long_answer_is_shown_cut_with_a_note(answer):
    (messages, owners), seconds, grew = measured(display.render_indexed, answer_state(answer))
    [shown_answer] = [m["content"] for m, i in zip(messages, owners) if i == 1]
    assert len(shown_answer) <= display.MAX_SHOWN_CHARS + 300
    assert "Save JSON" in shown_answer and f"{len(answer):,}" in shown_answer
    assert seconds < 0.5 and grew < RSS_LIMIT_MB
    rendered = MarkdownIt("commonmark", {"html": True}).render(shown_answer)
    note = rendered.rindex("Save JSON")
    assert rendered.rfind("</pre>") < note and rendered.rfind("<pre>") < rendered.rfind("</pre>") \
        or "<pre>" not in rendered                                 # the fence was closed
    streamed = display.render(answer_state("x"), answer)[-1]["content"]
    assert len(streamed) <= display.MAX_SHOWN_CHARS + 300


CHAT_CASES = [  # name, turns, text of each turn
    ("400-turns-of-200KB-prose", 400, "word " * 40_000),
    ("400-turns-of-bangs", 400, "![" * 100_000),
    ("400-turns-of-tags", 400, "<a " * 66_000),
]


@pytest.mark.parametrize("turns, text", [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_a_long_chat_is_shown_newest_first_within_a_budget(turns, text):
    state = history.new_state()
    state["turns"] = [history.user_turn(text, []) if n % 2 == 0 else
                      history.assistant_turn(text, "stop") for n in range(turns)]
    messages, seconds, grew = measured(display.render, state, "still writing")
    total = sum(len(m["content"]) for m in messages if isinstance(m["content"], str))
    assert total <= display.MAX_SHOWN_CHAT_CHARS + 300 * turns
    assert seconds < 0.5 and grew < RSS_LIMIT_MB
    assert messages[-1]["content"] == "still writing"
    assert "Save JSON" in messages[-2]["content"]            # the newest answer, cut
    assert messages[0]["content"] == display.EARLIER_NOTE    # the oldest: a one-line note
    assert len(messages) == turns + 1                         # every turn still has its message


def test_a_normal_answer_is_shown_as_it_is():
    text = "An answer with **bold**, `code`, $$x^2$$ and\n```python\nprint(1)\n```\n" * 100
    assert display.render(answer_state(text))[1]["content"] == text


# --------------------------------------------------------------------------- 6. remote images
LOADS = {"img": ("src", "srcset"), "image": ("href", "xlink:href"), "video": ("src", "poster"),
         "audio": ("src",), "source": ("src", "srcset"), "input": ("src",), "iframe": ("src",),
         "embed": ("src",), "object": ("data",), "track": ("src",)}


class Loads(html.parser.HTMLParser):
    """The URLs a page would fetch by itself from rendered HTML (any tag's style and
    background too)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            value = value or ""
            if name in LOADS.get(tag, ()) or name == "background":
                self.urls += [c.split()[0] for c in value.split(",") if c.split()] \
                    if name == "srcset" else [value]
            if name == "style" and "url(" in value:
                self.urls.append(value)
        if tag in ("style", "link", "base", "meta"):
            self.urls.append(tag)


def remote(url: str) -> bool:
    url = url.strip()
    return url in ("style", "link", "base", "meta") or "url(" in url or (
        not url.startswith("data:") and (bool(urlsplit(url).scheme) or url.startswith("//")))


def remote_loads(markdown: str) -> list[str]:
    """What a browser would fetch from elsewhere, by itself, for this Markdown (rendered by
    markdown-it, CommonMark with raw HTML, as a stand-in for the chatbot's renderer)."""
    parser = Loads()
    parser.feed(MarkdownIt("commonmark", {"html": True}).render(markdown))
    return [u for u in parser.urls if remote(u)]


REMOTE_CASES = [  # name, answer
    ("markdown", "Look: ![](http://127.0.0.1:9/x?d=SECRET) done"),
    ("markdown-title", '![chart](http://127.0.0.1:9/c.png "title")'),
    ("markdown-angle", "![a](<http://127.0.0.1:9/a b.png>)"),
    ("reference", "![logo][l]\n\n[l]: http://127.0.0.1:9/logo.png"),
    ("shortcut", "![l]\n\n[l]: http://127.0.0.1:9/logo.png"),
    ("bang-bang", "!![x](http://127.0.0.1:9/x)"),
    ("nested-link", "[![x](http://127.0.0.1:9/x)](http://127.0.0.1:9/y)"),
    ("protocol-relative", "![x](//127.0.0.1:9/x)"),
    ("entity", "![x](&#x2F;&#x2F;127.0.0.1:9/x)"),
    ("img", '<img src="http://127.0.0.1:9/x?d=1" alt="cat">'),
    ("img-upper", "<IMG SRC=http://127.0.0.1:9/x>"),
    ("img-entity", '<img src="&#104;ttp://127.0.0.1:9/x">'),
    ("img-srcset", '<img srcset="/a.png 1x, http://127.0.0.1:9/b.png 2x">'),
    ("img-in-a-title", '<b title="x\n\n<img src=http://127.0.0.1:9/x>">bold</b>'),
    ("bang-before-img", "!<img src=http://127.0.0.1:9/x>"),
    ("video-poster", "<video poster=http://127.0.0.1:9/p.png></video>"),
    ("style", '<div style="background:url(http://127.0.0.1:9/x)">hi</div>'),
    ("style-tag", "<style>p{background:url(http://127.0.0.1:9/x)}</style>"),
    ("in-a-fence", "```\n![x](http://127.0.0.1:9/x)\n```\n<img src=http://127.0.0.1:9/y>"),
    # Floods of what the guards look for: each still answered within the time bound.
    ("bang-flood", "![" * 30_000 + "![x](http://127.0.0.1:9/x)"),
    ("tag-flood", "<a " * 20_000 + "\n\n<img src=http://127.0.0.1:9/x>"),
    ("img-flood", "<img src=http://127.0.0.1:9/x>" * 5_000),
    ("quote-flood", '<a b="' * 20_000 + '">\n\n<img src=http://127.0.0.1:9/x>'),
    ("backslash-flood", "\\" * 50_000 + "![a](http://127.0.0.1:9/x)"),
]


@pytest.mark.parametrize("answer", [c[1] for c in REMOTE_CASES], ids=[c[0] for c in REMOTE_CASES])
def test_nothing_in_an_answer_loads_from_elsewhere_without_a_click(answer):
    assert remote_loads(answer)                     # the case is real: it would load
    state = answer_state(answer)
    state["turns"][0]["text"] = answer              # an imported chat's question too
    messages, seconds, _ = measured(display.render, state, answer)     # kept and streaming
    assert seconds < 0.2
    for message in messages:
        if isinstance(message["content"], str):
            assert remote_loads(message["content"]) == [], message["content"][:300]


@pytest.mark.parametrize("answer, link", [
    ("![cat](http://127.0.0.1:9/cat.png)", "http://127.0.0.1:9/cat.png"),
    ('<img src="http://127.0.0.1:9/x?d=1" alt="cat">', "http://127.0.0.1:9/x?d=1")])
def test_a_remote_image_becomes_a_link_to_click(answer, link):
    shown_answer = display.render(answer_state(answer))[1]["content"]
    rendered = MarkdownIt("commonmark", {"html": True}).render(shown_answer)
    assert f'<a href="{link}">image: cat</a>' in rendered


@pytest.mark.parametrize("answer", [
    "![plot](/gradio_api/file=/tmp/gradio/x/plot.png)", "![dot](data:image/png;base64,iVBORw0=)",
    '<img src="/gradio_api/file=a.png" alt="a">', "[a link](http://127.0.0.1:9/page)",
    '<a href="http://127.0.0.1:9/">site</a>', "x < y and y > z, a<b", "plain **text**"])
def test_local_images_links_and_text_are_unchanged(answer):
    assert display.render(answer_state(answer))[1]["content"] == answer
