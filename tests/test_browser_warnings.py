"""The page's one-line refusals reach a real browser (headless Chromium), and nothing typed or
attached is lost: an empty message, a file that is no picture (its name shown as typed,
not read as HTML), a Load JSON of a file that is no chat export, and a Save JSON that
leaves a file out.
Gradio shows a warning only from a queued event, so these events are queued, in a group of
their own: they are checked here while another user's answer holds the page's only
generation slot (`--ui-concurrency 1`), and each line still comes at once.

The model is a scripted OpenAI-style server on loopback behind `app.py --backend remote`
that streams a long answer slowly until it is stopped."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from support import CHROMIUM, AppServer, chromium_page, openai_stub

ASSETS = Path(__file__).resolve().parent.parent / "assets"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (make browser) for the browser test")

from fastapi import Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from server.background import BackgroundServer  # noqa: E402

# A file name that reads differently as HTML ("fish&chips.png"): the warning shows it as
# typed. (Gradio's upload takes "<" and ">" out of names.)
AS_TEXT = "fish&amp;chips.png"


def slow_model():
    """Answers every question with "word word ...", one word per 50 ms, for up to a minute."""
    app = openai_stub("slow", 16384)

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        await req.json()

        async def gen():
            for _ in range(1200):
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0,
                         "model": "slow", "choices": [{"index": 0, "delta": {"content": "word "},
                                                       "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.05)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def served():
    with BackgroundServer(slow_model()) as backend:
        with AppServer("--backend", "remote", "--remote-url", f"{backend.url}/v1",
                       "--ui-concurrency", "1", "--max-export-mb", "0.001") as app:
            yield app


def warned(page, text: str) -> None:
    """Wait for a warning line on the page that contains `text`."""
    from playwright.sync_api import TimeoutError as Timeout

    try:
        page.locator("[data-testid=toast-text]", has_text=text).first.wait_for(timeout=10_000)
    except Timeout:
        shown = page.locator("[data-testid=toast-text]").all_inner_texts()
        raise AssertionError(f"no line with {text!r} on the page; it shows {shown}") from None


def box_text(page) -> str:
    return page.locator("#qvl-input textarea").input_value()


def generating(page) -> bool:
    return page.locator("#qvl-stop").is_enabled()


def saved_chat(path: Path) -> None:
    """A chat export holding one question about assets/shapes.png, as Save JSON writes it."""
    from ui import history

    state = history.new_state("be brief")
    state["turns"] = [history.user_turn("What is this?", [str(ASSETS / "shapes.png")]),
                      history.assistant_turn("Shapes.", "stop")]
    path.write_text(history.export_json(state, "slow"))


def test_refusals_reach_the_page_at_once_and_keep_the_box(served, tmp_path):
    bad_picture = tmp_path / AS_TEXT
    bad_picture.write_text("this is a text file, not an image\n")
    picture = tmp_path / "shapes.png"
    shutil.copy(ASSETS / "shapes.png", picture)
    not_a_chat = tmp_path / "notes.json"
    not_a_chat.write_text('{"turns": [')
    a_chat = tmp_path / "kept-chat.json"
    saved_chat(a_chat)

    with chromium_page(height=1100) as other:
        # Another user's long answer holds the one generation slot throughout.
        other.goto(served.url)
        other.locator("#qvl-input textarea").fill("Tell me a long story")
        other.locator("#qvl-input textarea").press("Enter")
        other.wait_for_function("() => document.querySelector('#qvl-chat').innerText"
                                ".includes('word word')")
        page = other.context.browser.new_page(viewport={"width": 1360, "height": 1100})
        page.set_default_timeout(20_000)
        page.goto(served.url)
        page.wait_for_selector("#qvl-input textarea")

        # 1. Whitespace only: one line, the box keeps it.
        page.locator("#qvl-input textarea").fill("   ")
        page.locator("#qvl-input textarea").press("Enter")
        warned(page, "The message is empty: type a question or add an image.")
        assert box_text(page) == "   "

        # 2. A text file named .png: not sent, its name shown as text; the question and the
        #    good picture stay in the box, nothing enters the chat.
        page.set_input_files("#qvl-input input[type=file]", [str(picture), str(bad_picture)])
        page.wait_for_function("() => document.querySelectorAll('#qvl-input img').length >= 1")
        page.locator("#qvl-input textarea").fill("What is in this picture?")
        page.locator("#qvl-input textarea").press("Enter")
        warned(page, f"Not sent: Failed to load image: {AS_TEXT} is not a readable image")
        warned(page, "Press Enter to send the rest without it.")
        assert box_text(page) == "What is in this picture?"
        assert page.locator("#qvl-input img").count() == 1
        assert page.locator("#qvl-chat [data-testid=user]").count() == 0

        # 3. Load JSON of a file that is no chat export: one line; the chat and box as they were.
        with page.expect_file_chooser() as chooser:
            page.click("#qvl-load")
        chooser.value.set_files(str(not_a_chat))
        warned(page, "Not a chat export: invalid JSON")
        assert box_text(page) == "What is in this picture?"
        assert page.locator("#qvl-chat [data-testid=user]").count() == 0

        # 4. A saved chat loads; Save JSON leaves its picture out (--max-export-mb 0.001), saying so.
        with page.expect_file_chooser() as chooser:
            page.click("#qvl-load")
        chooser.value.set_files(str(a_chat))
        page.wait_for_selector("#qvl-chat [data-testid=user] img")
        page.click("#qvl-save")
        warned(page, "1 file(s) were left out of the saved chat, which may embed at most")
        warned(page, "MB of files: shapes.png")
        assert box_text(page) == "What is in this picture?"

        # None of it waited behind the other user's answer, still streaming.
        assert generating(other)
        other.click("#qvl-stop")
        other.wait_for_function("() => document.querySelector('#qvl-stop').disabled")
