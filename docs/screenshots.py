"""The screenshots in README.md and docs/, taken from the current page, so they cannot go stale.

    make screenshots                    # or: .venv/bin/python docs/screenshots.py

Starts `app.py --model tiny` on a free loopback port (the built-in model, as `make run`
serves it without an accelerator), drives the page in Debian's headless Chromium with
Playwright (as tests/test_browser.py does), asks the built-in model what it was trained
to answer about assets/shapes.png, and writes:

- docs/screenshot.png: the page after "How many shapes are there, and what colours are
  they?" and the follow-up "Which colour is the star?";
- docs/grounding.png: the answer to "Detect the shapes.", its boxes drawn on the picture
  (the built-in model's boxes are still wrong: the picture shows the drawing, not a
  right answer);
- docs/pdf-pages.png: a two-page PDF in a question, each page a picture;
- docs/json-mode.png: JSON mode with a schema typed in, and the answer held to it, shown
  formatted (the built-in model's values are mostly wrong: the picture shows that the
  answer parses and obeys the schema, which the script checks);
- docs/token-probs.png: the count answer with "Show token probabilities" on, each token in
  the panel under the chat shaded by how unlikely it was (hovering one shows its tooltip,
  which a screenshot cannot).

An answer the screenshots present as right is checked first: a wrong one stops the script
with exit code 1 and the old file stays. Needs the dev requirements (Playwright) and
/usr/bin/chromium (`make browser`).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image, ImageDraw

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
SHAPES = ROOT / "assets" / "shapes.png"
sys.path.insert(0, str(ROOT / "tests"))

from support import CHROMIUM, AppServer, chromium_page  # noqa: E402

if TYPE_CHECKING:
    from playwright.sync_api import Page

COUNT = "How many shapes are there, and what colours are they?"
FOLLOW_UP = "Which colour is the star?"
DETECT = "Detect the shapes."
SCHEMA_TEXT = """{
  "type": "object",
  "required": ["count", "colours"],
  "properties": {
    "count": {"type": "integer", "minimum": 1, "maximum": 4},
    "colours": {"type": "array", "minItems": 1, "maxItems": 4,
                "items": {"enum": ["red", "blue", "green", "yellow", "purple"]}}
  }
}"""
ANSWER_TIMEOUT_MS = 120_000
BOT, USER = "#qvl-chat [data-testid=bot]", "#qvl-chat [data-testid=user]"


class WrongAnswer(Exception):
    """The built-in model did not answer as the screenshot's caption says."""


def expect(answer: str, pattern: str, what: str) -> None:
    """Stop before a screenshot could show an answer that is not right."""
    if not re.search(pattern, answer, re.IGNORECASE):
        raise WrongAnswer(f"{what}: expected /{pattern}/, the model answered {answer!r}")


def answers(page: Page) -> list[str]:
    return page.locator(BOT).all_inner_texts()


def ask(page: Page, text: str, files: Sequence[Path] = ()) -> str:
    """Attach `files`, send `text` with the page's own settings, wait for the whole answer."""
    done = len(answers(page))
    finished = page.inner_text("#qvl-chat").count("tokens/s")
    if files:
        page.set_input_files("#qvl-input input[type=file]", [str(f) for f in files])
        for f in files:   # the token meter names each file once it is attached
            page.wait_for_function("name => document.querySelector('#qvl-meter').innerText"
                                   ".includes(name)", arg=f.name)
    page.locator("#qvl-input textarea").fill(text)
    page.locator("#qvl-input textarea").press("Enter")
    # An answer is finished when its stats line is there and the box takes input again.
    page.wait_for_function("n => document.querySelector('#qvl-chat').innerText"
                           ".split('tokens/s').length > n + 1", arg=finished, timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('#qvl-stop').disabled"
                           " && !document.querySelector('#qvl-input textarea').disabled")
    page.wait_for_function("() => [...document.querySelectorAll('#qvl-chat img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    return "\n".join(answers(page)[done:])     # the answer, its stats line, its drawn boxes


def fresh_chat(page: Page, url: str) -> None:
    """A new page with an empty chat (the chat is kept in the browser: clear it)."""
    page.goto(url)
    page.wait_for_selector("#qvl-input textarea")
    page.evaluate("() => localStorage.clear()")
    page.reload()
    page.wait_for_selector("#qvl-input textarea")


def scroll_chat_to_top(page: Page) -> None:
    for _ in range(2):   # the chatbot scrolls itself down once more after the last image loads
        page.evaluate("() => { const log = document.querySelector('#qvl-chat [role=log]');"
                      " if (log) log.scrollTop = 0; }")
        page.wait_for_timeout(300)


def two_page_pdf(folder: Path) -> Path:
    """A PDF of two pages, one flat shape on each, as the built-in model's pictures look."""
    pages = []
    for colour, draw in (((40, 90, 220), "rectangle"), ((220, 40, 40), "ellipse")):
        page = Image.new("RGB", (600, 600), (250, 250, 250))
        getattr(ImageDraw.Draw(page), draw)([180, 180, 420, 420], fill=colour)
        pages.append(page)
    path = folder / "two-pages.pdf"
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=144)
    return path


def chat_screenshot(page: Page, url: str) -> None:
    fresh_chat(page, url)
    answer = ask(page, COUNT, [SHAPES])
    expect(answer, r"There are 4 shapes", "the count")
    for colour in ("red", "blue", "green", "yellow"):
        expect(answer, rf"\b{colour}\b", f"the colour {colour}")
    expect(ask(page, FOLLOW_UP), r"\byellow\b", "the star's colour")
    scroll_chat_to_top(page)
    page.screenshot(path=str(DOCS / "screenshot.png"), full_page=True)


def clip_of(page: Page, selector: str, margin: int = 8) -> dict:
    """The page's rectangle around every message `selector` finds (an answer can be several:
    its text, its stats line, its picture with the boxes drawn)."""
    boxes = [box for box in (m.bounding_box() for m in page.locator(selector).all())
             if box and box["width"] and box["height"]]
    left = min(b["x"] for b in boxes) - margin
    top = min(b["y"] for b in boxes) - margin
    right = max(b["x"] + b["width"] for b in boxes) + margin
    bottom = max(b["y"] + b["height"] for b in boxes) + margin
    return {"x": max(left, 0), "y": max(top, 0), "width": right - max(left, 0),
            "height": bottom - max(top, 0)}


def grounding_screenshot(page: Page, url: str) -> None:
    fresh_chat(page, url)
    expect(ask(page, DETECT, [SHAPES]), r'"bbox_2d"', "grounding JSON")
    if page.locator(f"{BOT} img").count() < 1:
        raise WrongAnswer("the detection answer has no picture with its boxes drawn")
    scroll_chat_to_top(page)
    page.screenshot(path=str(DOCS / "grounding.png"), clip=clip_of(page, BOT))


def json_mode_screenshot(page: Page, url: str) -> None:
    import jsonschema

    fresh_chat(page, url)
    page.check("#qvl-json-mode input[value=schema]")
    page.locator("#qvl-json-schema .cm-content").click()
    page.keyboard.insert_text(SCHEMA_TEXT)
    ask(page, COUNT, [SHAPES])
    shown = page.locator(f"{BOT} pre code").last.inner_text()
    try:
        jsonschema.validate(json.loads(shown), json.loads(SCHEMA_TEXT))
    except (ValueError, jsonschema.ValidationError) as exc:
        raise WrongAnswer(f"the JSON-mode answer does not obey its schema: {exc}") from None
    scroll_chat_to_top(page)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(DOCS / "json-mode.png"), full_page=True,
                    clip=clip_of(page, "#qvl-chat, #qvl-json-schema"))


def token_probs_screenshot(page: Page, url: str) -> None:
    fresh_chat(page, url)
    page.check("#qvl-token-probs input")
    expect(ask(page, COUNT, [SHAPES]), r"There are 4 shapes", "the count")
    page.wait_for_selector("#qvl-probs .qvl-tok")
    scroll_chat_to_top(page)
    page.screenshot(path=str(DOCS / "token-probs.png"), clip=clip_of(page, f"{BOT}, #qvl-probs"))


def pdf_screenshot(page: Page, url: str, folder: Path) -> None:
    fresh_chat(page, url)
    ask(page, COUNT, [two_page_pdf(folder)])   # only the question and its pages are shown
    pictures = page.locator(f"{USER} img").count()
    if pictures < 2:
        raise WrongAnswer(f"the PDF's two pages are not two pictures ({pictures})")
    scroll_chat_to_top(page)
    page.screenshot(path=str(DOCS / "pdf-pages.png"), clip=clip_of(page, USER))


def main() -> int:
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing: install Debian's chromium (make browser)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, AppServer() as server, \
            chromium_page(width=1360, height=1250) as page:
        page.set_default_timeout(30_000)
        try:
            chat_screenshot(page, server.url)
            page.set_viewport_size({"width": 1360, "height": 2000})   # a chat that needs no scrolling
            grounding_screenshot(page, server.url)
            pdf_screenshot(page, server.url, Path(tmp))
            page.set_viewport_size({"width": 1360, "height": 900})   # a short chat, the box in view
            json_mode_screenshot(page, server.url)
            token_probs_screenshot(page, server.url)
        except WrongAnswer as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for name in ("screenshot.png", "grounding.png", "pdf-pages.png", "json-mode.png",
                 "token-probs.png"):
        print(DOCS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
