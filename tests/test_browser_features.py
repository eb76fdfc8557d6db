"""The composer's features in a real browser (headless Chromium): the token meter counts an
attached picture, the Detect preset asks for boxes and the answer's boxes appear drawn on
the picture in the chat, a two-page PDF becomes two pictures, an edited question reruns.

The model is a scripted OpenAI-style server on loopback behind `app.py --backend remote`
that looks at the picture it receives (already resized, as the model would see it), finds
the red rectangle on it and answers its box in Qwen2.5-VL's grounding JSON; any other
question is echoed back, so an edit can be seen reaching the model. Screenshots go to
test-output/ (docs/grounding.png and docs/pdf-pages.png, which the README shows, are copies
of them)."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from support import CHROMIUM, AppServer, chromium_page, openai_stub

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "test-output"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (make browser) for the browser test")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from server.background import BackgroundServer  # noqa: E402

RED_BOX = (420, 150, 700, 380)       # on a 900x600 picture (x2, y2 exclusive)


def red_pixels(picture: Image.Image) -> tuple[int, int, int, int]:
    px = picture.convert("RGB").load()
    pts = [(x, y) for y in range(0, picture.height) for x in range(0, picture.width)
           if px[x, y][0] > 200 and px[x, y][1] < 60 and px[x, y][2] < 60]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _chunk(content=None, finish=None, role=None) -> dict:
    delta = {"role": role, "content": ""} if role else ({"content": content}
                                                        if content is not None else {})
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0,
            "model": "seeing", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def seeing_model() -> FastAPI:
    app = openai_stub("seeing", 16384)
    app.state.asked = []

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        content = body["messages"][-1]["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
        app.state.asked.append(text)
        pictures = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
        if "bbox" in text and pictures:
            data = base64.b64decode(pictures[-1].split(",", 1)[1])
            x1, y1, x2, y2 = red_pixels(Image.open(io.BytesIO(data)))
            answer = ("```json\n" + json.dumps([{"bbox_2d": [x1, y1, x2, y2],
                                                 "label": "red rectangle"}]) + "\n```")
        else:
            answer = f"You asked: {text}"

        async def gen():
            for event in (_chunk(role="assistant"), _chunk(answer), _chunk("", "stop"),
                          {"id": "x", "choices": [], "usage": {"prompt_tokens": 9,
                                                               "completion_tokens": 3}}):
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def served():
    model = seeing_model()
    with BackgroundServer(model) as backend:
        with AppServer("--backend", "remote", "--remote-url", f"{backend.url}/v1") as app:
            yield app, model.state.asked


@pytest.fixture(scope="module")
def page(served):
    with chromium_page(height=1100) as pg:
        yield pg


def wait_idle(page) -> None:
    page.wait_for_function(
        "() => document.querySelector('#qvl-stop').disabled"
        " && !document.querySelector('#qvl-input textarea').disabled")


def bot_images(page) -> int:
    return page.locator("#qvl-chat [data-testid=bot] img").count()


def test_boxes_meter_pdf_and_edit_in_a_browser(served, page, tmp_path):
    app, asked = served
    picture = Image.new("RGB", (900, 600), (236, 240, 244))
    picture.paste((255, 0, 0), RED_BOX)
    picture_path = tmp_path / "red.png"
    picture.save(picture_path)
    pages = [Image.new("RGB", (420, 594), c) for c in ((250, 250, 250), (200, 220, 250))]
    pdf_path = tmp_path / "two-pages.pdf"
    pages[0].save(pdf_path, save_all=True, append_images=pages[1:])
    DOCS.mkdir(exist_ok=True)

    page.goto(app.url)
    page.wait_for_selector("#qvl-input textarea")

    # 1. The meter counts the attached picture before anything is sent: 900x600 -> 672 tokens.
    page.set_input_files("#qvl-input input[type=file]", str(picture_path))
    page.wait_for_selector("#qvl-input img")
    page.wait_for_function("() => document.querySelector('#qvl-meter').innerText"
                           ".includes('red.png: 672 tokens')")

    # 2. The Detect preset fills the box; the answer's box is drawn on the picture.
    page.click("#qvl-preset-detect")
    page.wait_for_function("() => document.querySelector('#qvl-input textarea').value"
                           ".includes('bbox')")
    page.locator("#qvl-input textarea").press("Enter")
    page.wait_for_function("() => document.querySelectorAll("
                           "'#qvl-chat [data-testid=bot] img').length >= 1", timeout=30_000)
    wait_idle(page)
    page.wait_for_function("() => [...document.querySelectorAll('#qvl-chat img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    src = page.locator("#qvl-chat [data-testid=bot] img").first.get_attribute("src")
    drawn = Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")
    assert drawn.size == picture.size                       # drawn on the original
    from ui.grounding import COLOURS
    outline = tuple(int(COLOURS[0][i:i + 2], 16) for i in (1, 3, 5))   # the first box colour
    x1, y1, x2, y2 = RED_BOX
    assert drawn.getpixel((x1, (y1 + y2) // 2)) == outline  # the left edge, on the pixels
    assert drawn.getpixel((x2 - 1, (y1 + y2) // 2)) == outline
    page.locator("#qvl-chat").screenshot(path=str(DOCS / "grounding.png"))

    # 3. A two-page PDF becomes two pictures in the question.
    users_with_images = page.locator("#qvl-chat [data-testid=user] img").count()
    page.set_input_files("#qvl-input input[type=file]", str(pdf_path))
    page.wait_for_function("() => document.querySelector('#qvl-meter').innerText"
                           ".includes('2 pages')")
    page.locator("#qvl-input textarea").fill("Summarise the document")
    page.locator("#qvl-input textarea").press("Enter")
    page.wait_for_function("n => document.querySelectorAll('#qvl-chat [data-testid=user] img')"
                           ".length >= n + 2", arg=users_with_images)
    wait_idle(page)
    assert asked[-1] == "Summarise the document"
    page.locator("#qvl-chat").screenshot(path=str(DOCS / "pdf-pages.png"))

    # 4. Edit the question: it reruns with the new text, its pages kept.
    question = page.locator("#qvl-chat [data-testid=user]", has_text="Summarise the document")
    question.last.hover()
    edit = page.locator("#qvl-chat button[aria-label='Edit']")
    edit.last.click()
    box = page.locator("#qvl-chat textarea.edit-textarea")    # the question's text comes first
    box.first.fill("Summarise it in one line")
    page.locator("#qvl-chat button[aria-label='Submit']").last.click()
    deadline = time.monotonic() + 20
    while asked[-1] != "Summarise it in one line" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asked[-1] == "Summarise it in one line"
    page.wait_for_function("() => document.querySelector('#qvl-chat').innerText"
                           ".includes('You asked: Summarise it in one line')")
    wait_idle(page)
    assert page.locator("#qvl-chat [data-testid=user] img").count() == users_with_images + 2
