""""Show token probabilities" in a real browser (headless Chromium) on the built-in model:
switched on, the panel under the chat shows the finished answer, each token a span whose
tooltip (its title) gives its probability and the likeliest alternatives; the panel reads
exactly the answer, the chat's Copy still copies the plain answer, Undo empties it, and the
switch is kept across a reload. The panel is saved to test-output/token-probs.png."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from support import CHROMIUM, AppServer, chromium_page

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (make browser) for the browser test")

TITLE = re.compile(r"^p=(?:[01]\.\d\d|\d\.\de-\d\d)(?: \(rank \d+\))?"
                   r"(?: · alternatives: '.*' (?:[01]\.\d\d|\d\.\de-\d\d))?$")


@pytest.fixture(scope="module")
def page(tiny_model_dir):
    with AppServer("--model", str(tiny_model_dir)) as server, \
            chromium_page(height=1100) as pg:
        pg.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        pg.goto(server.url)
        pg.wait_for_selector("#qvl-input textarea")
        yield pg


def test_hovering_a_token_shows_its_probability_and_alternatives(page):
    assert page.locator("#qvl-probs").count() == 0 or not page.is_visible("#qvl-probs")
    page.check("#qvl-token-probs input")
    page.wait_for_selector("#qvl-probs .qvl-probs-note")          # shown, waiting for an answer
    page.set_input_files("#qvl-input input[type=file]", str(ROOT / "assets" / "shapes.png"))
    page.wait_for_selector("#qvl-input img")
    page.locator("#qvl-input textarea").fill("How many shapes are there, and what colours "
                                             "are they?")
    page.locator("#qvl-input textarea").press("Enter")
    page.wait_for_selector("#qvl-probs .qvl-tok", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#qvl-stop').disabled")

    token = page.locator("#qvl-probs .qvl-tok").first
    token.hover()
    title = token.get_attribute("title")
    assert token.inner_text() == "There"
    assert TITLE.match(title), title
    assert len(title.split(" · alternatives: ")[1].split(", ")) == 4     # 5 asked, less itself
    titles = page.eval_on_selector_all("#qvl-probs .qvl-tok", "s => s.map(e => e.title)")
    assert all(TITLE.match(t) for t in titles[:-1]), titles
    assert titles[-1].endswith("'<|im_end|>' " + titles[-1].rsplit("'<|im_end|>' ")[1])

    bot = page.locator("#qvl-chat [data-testid=bot]").first
    bot.hover()
    page.locator("#qvl-chat button[aria-label='Copy message']").last.click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith("There are 4 shapes") and "<span" not in copied   # plain text
    shown = page.eval_on_selector("#qvl-probs .qvl-probs-text", "e => e.textContent")
    assert shown == copied.partition("\n<sub>")[0]               # the answer (the copy of the
    #                                                         answer's group ends in its stats)
    OUTPUT.mkdir(exist_ok=True)
    page.locator("#qvl-probs").screenshot(path=str(OUTPUT / "token-probs.png"))

    page.click("#qvl-undo")                     # the answer leaves the chat, and the panel
    page.wait_for_selector("#qvl-probs .qvl-probs-note")
    page.reload()                                                # the switch is kept
    page.wait_for_function("() => document.querySelector('#qvl-token-probs input')?.checked")
    page.wait_for_selector("#qvl-probs .qvl-probs-note")


def test_token_texts_are_shown_as_text_by_the_panel(page):
    """Token texts that are markup, templates or line breaks: the panel (a gr.HTML, as on
    the page) shows them as they are, and runs or loads nothing."""
    import gradio as gr

    from engine.types import TokenLogprob, TopLogprob
    from support import free_port
    from ui import probs

    text = "a ${1+1} {{value}} <img src=x onerror=alert(1)> &amp; `x` \\n \r\n\tend"
    tokens = [TokenLogprob(text[:9], 1, -0.1, top=[TopLogprob("<b>${2*3}", 2, -2.0)]),
              TokenLogprob(text[9:], 3, -0.2)]
    with gr.Blocks() as demo:
        panel = gr.HTML("", elem_id="qvl-probs")
        gr.Button("go", elem_id="go").click(lambda: probs.annotate(text, tokens), None, panel)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.click("#go")
        page.wait_for_selector("#qvl-probs .qvl-tok")
        assert page.eval_on_selector("#qvl-probs .qvl-probs-text", "e => e.textContent") == text
        assert page.locator("#qvl-probs img, #qvl-probs b").count() == 0
        assert page.eval_on_selector_all("#qvl-probs .qvl-tok", "s => s.map(e => e.title)") \
            == ["p=0.90 · alternatives: '<b>${2*3}' 0.14", "p=0.82"]
    finally:
        demo.close()
