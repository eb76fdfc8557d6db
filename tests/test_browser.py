"""The page in a real browser (Playwright driving Debian's headless Chromium):
upload an image, ask, watch the answer stream in, Stop a long answer and see
generation end on the engine, Retry, reload and find the chat still there.
A screenshot of the finished chat goes to test-output/chat.png."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from support import CHROMIUM, AppServer, chromium_page

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
OUTPUT = ROOT / "test-output"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (make browser) for the browser test")

@pytest.fixture(scope="module")
def server(tiny_random_model_dir):
    """The app on the random-weight tiny model: it writes until told to stop, so Stop can
    be seen ending a long answer."""
    with AppServer("--model", str(tiny_random_model_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    with chromium_page() as pg:
        yield pg


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's number box (the value is committed on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def bot_texts(page) -> list[str]:
    return page.locator("#qvl-chat [data-testid=bot]").all_inner_texts()


def send(page, text: str) -> None:
    page.locator("#qvl-input textarea").fill(text)
    page.locator("#qvl-input textarea").press("Enter")


def wait_idle(page) -> None:
    """The answer is complete when Stop is disabled again and the box takes input."""
    page.wait_for_function(
        "() => document.querySelector('#qvl-stop').disabled"
        " && !document.querySelector('#qvl-input textarea').disabled")


def test_chat_in_a_browser(server, page):
    page.goto(server.url)
    page.wait_for_selector("#qvl-input textarea")
    assert "tiny" in page.inner_text("#qvl-serving")
    assert page.locator("#qvl-tiny-warning").is_visible()
    set_number(page, "qvl-temperature", 0)       # greedy: the tiny model then writes until told to stop
    set_number(page, "qvl-max-tokens", 300)

    # 1. An image and a question; the answer streams in.
    page.set_input_files("#qvl-input input[type=file]", str(ASSETS / "chart.png"))
    page.wait_for_selector("#qvl-input img")
    send(page, "What does this chart show?")
    page.wait_for_selector("#qvl-chat [data-testid=user] img")
    lengths = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        texts = bot_texts(page)
        if texts:
            lengths.add(len(texts[0]))
        if "tokens/s" in page.inner_text("#qvl-chat"):
            break
        time.sleep(0.02)
    wait_idle(page)
    assert len({n for n in lengths if n > 0}) >= 2, f"no streaming seen: {sorted(lengths)}"
    first = server.wait_requests(1)[0]
    assert first[2] == "length" and first[1] == 300

    # 2. A long answer, stopped half-way: generation ends on the engine.
    set_number(page, "qvl-max-tokens", 8000)
    send(page, "Now tell me everything about it, in detail.")
    page.wait_for_function("() => { const b = document.querySelectorAll('#qvl-chat [data-testid=bot]');"
                           " return b.length >= 3 && b[b.length - 1].innerText.length > 40; }")
    page.click("#qvl-stop")
    clicked = time.monotonic()
    _, tokens, reason = server.wait_requests(2)[1]
    took = time.monotonic() - clicked
    assert reason == "cancelled", f"the answer was not stopped on the engine: finish={reason}"
    assert 0 < tokens < 8000 and took < 5
    page.wait_for_function("() => document.querySelector('#qvl-chat').innerText.includes('(stopped)')")
    wait_idle(page)

    # 3. Retry the stopped answer with a short limit: it is replaced, not added.
    set_number(page, "qvl-max-tokens", 40)
    users_before = page.locator("#qvl-chat [data-testid=user]").count()
    page.click("#qvl-retry")
    _, tokens, reason = server.wait_requests(3)[2]
    assert reason == "length" and tokens == 40
    page.wait_for_function("() => !document.querySelector('#qvl-chat').innerText.includes('(stopped)')")
    wait_idle(page)
    assert page.locator("#qvl-chat [data-testid=user]").count() == users_before
    before_reload = bot_texts(page)
    assert len(before_reload) >= 4     # answer + stats, twice

    # 4. Reload: the conversation comes back from the browser's storage.
    page.reload()
    page.wait_for_selector("#qvl-chat [data-testid=user] img")
    page.wait_for_function("n => document.querySelectorAll('#qvl-chat [data-testid=bot]').length >= n",
                           arg=len(before_reload))
    assert bot_texts(page) == before_reload
    assert "What does this chart show?" in page.inner_text("#qvl-chat")

    # 5. Save as JSON, clear, load it back.
    OUTPUT.mkdir(exist_ok=True)
    with page.expect_download() as download:
        page.click("#qvl-save")
    saved = OUTPUT / "chat.json"
    download.value.save_as(saved)
    doc = json.loads(saved.read_text())
    assert [t["role"] for t in doc["turns"]] == ["user", "assistant"] * 2
    ref = doc["turns"][0]["files"][0]["ref"]          # each distinct file embedded once
    assert doc["files"][ref].startswith("data:image/png;base64,")
    page.click("#qvl-clear")
    page.wait_for_function("() => !document.querySelector('#qvl-chat [data-testid=bot]')")
    with page.expect_file_chooser() as chooser:
        page.click("#qvl-load")
    chooser.value.set_files(str(saved))
    page.wait_for_function("n => document.querySelectorAll('#qvl-chat [data-testid=bot]').length >= n",
                           arg=len(before_reload))
    assert bot_texts(page) == before_reload

    # The screenshot: a tall window, the chat scrolled to its start.
    page.set_viewport_size({"width": 1360, "height": 1400})
    page.wait_for_function("() => [...document.querySelectorAll('#qvl-chat img')].every(i => i.complete)")
    for _ in range(2):   # the chat's autoscroll may move it once more as the layout settles
        page.evaluate("() => { document.querySelector('#qvl-chat [role=log]').scrollTop = 0; }")
        page.wait_for_timeout(300)
    page.screenshot(path=str(OUTPUT / "chat.png"), full_page=True)


def _contrast(page, selector: str) -> float:
    """WCAG contrast ratio of an element's text colour against its banner's background."""
    return page.evaluate("""sel => {
        const el = document.querySelector(sel);
        const banner = el.closest('.qvl-warning');
        const rgb = c => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
        const lum = ([r, g, b]) => {
            const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
            return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
        };
        const a = lum(rgb(getComputedStyle(el).color));
        const b = lum(rgb(getComputedStyle(banner).backgroundColor));
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    }""", selector)


def test_on_a_phone_the_banner_is_one_line_and_the_box_in_sight(server, page):
    """A 390x844 phone: the tiny model's banner is one line that opens to the whole text, and
    the message box is on the first screen, without scrolling."""
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.goto(server.url)
        page.wait_for_selector("#qvl-input textarea")
        page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
        rect = page.evaluate("sel => document.querySelector(sel).getBoundingClientRect().toJSON()",
                             "#qvl-tiny-warning")
        box = page.evaluate("sel => document.querySelector(sel).getBoundingClientRect().toJSON()",
                            "#qvl-input")
        assert rect["height"] < 60, f"the banner is {rect['height']} px tall on a phone"
        assert page.evaluate("() => window.scrollY") == 0 and 0 < box["top"] and \
            box["bottom"] <= 844, f"the message box is at {box['top']}..{box['bottom']}"
        assert "the project's test model" not in page.inner_text("#qvl-tiny-warning")
        page.click("#qvl-tiny-warning summary")
        assert "the project's test model" in page.inner_text("#qvl-tiny-warning")
    finally:
        page.set_viewport_size({"width": 1360, "height": 1000})


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_a_disabled_stop_looks_disabled_in_both_themes(server, page, theme):
    """While nothing runs, Stop is filled like the other buttons and its text is dimmer, not
    the theme's coloured fill (which looked pressable in the dark theme)."""
    page.goto(f"{server.url}?__theme={theme}")
    page.wait_for_selector("#qvl-stop[disabled]")
    look = page.evaluate("""() => ['#qvl-stop', '#qvl-retry'].map(sel => {
        const s = getComputedStyle(document.querySelector(sel));
        return {fill: s.backgroundColor, text: s.color, opacity: Number(s.opacity)};
    })""")
    stop, retry = look
    assert stop["fill"] == retry["fill"], f"{theme}: disabled Stop is filled {stop['fill']}"
    assert stop["text"] != retry["text"] and stop["opacity"] <= 0.6, look


def test_the_header_and_the_log_name_the_same_device(server, page):
    """The header's device is what the log says it loaded on (it said 1 CPU thread where the
    log said 2)."""
    import re

    page.goto(server.url)
    device = re.search(r" on (.+?) · context", page.inner_text("#qvl-serving")).group(1)
    said = [line.strip() for line in server.lines if " on CPU (" in line or "device: " in line]
    assert said and all(device in line for line in said), (device, said)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_the_tiny_banner_is_readable_in_both_themes(server, page, theme):
    page.goto(f"{server.url}?__theme={theme}")
    page.wait_for_selector("#qvl-tiny-warning")
    for part in ("#qvl-tiny-warning", "#qvl-tiny-warning code", "#qvl-tiny-warning b"):
        assert _contrast(page, part) >= 4.5, f"{part} is hard to read in the {theme} theme"


@pytest.fixture(scope="module")
def trained_server(tiny_model_dir):
    """The app on the trained tiny model, as `make run` serves it without an accelerator."""
    with AppServer("--model", str(tiny_model_dir)) as srv:
        yield srv


def test_the_shapes_example_in_the_browser(trained_server, page):
    """What a new user of `make run` sees first: click each of the page's first examples (what
    the built-in model answers), press Enter, get the right answer; then the Detect example's
    boxes drawn on the picture. The screenshot goes to test-output/shapes.png (docs/shapes.png
    is a copy of it)."""
    from test_ui import right_about_shapes_png
    from ui.layout import TINY_EXAMPLES

    page.set_viewport_size({"width": 1360, "height": 1300})
    page.goto(trained_server.url)
    page.wait_for_selector("#qvl-input textarea")
    assert "trained only on pictures" in page.inner_text("#qvl-tiny-warning")
    # The page's own settings: the tiny model's generation_config (top_k 1, no repetition
    # penalty), the settings the held-out accuracy was measured with.
    assert page.locator("#qvl-top-k input[type=number]").input_value() == "1"
    examples = page.locator("#qvl-examples .gallery-item")
    detect = examples.filter(has_text="Detect the shapes.")
    for k, example in enumerate([examples.nth(i) for i in range(len(TINY_EXAMPLES))] + [detect]):
        example.click()
        page.wait_for_selector("#qvl-input img")
        page.locator("#qvl-input textarea").press("Enter")
        page.wait_for_function("n => document.querySelector('#qvl-chat').innerText"
                               ".split('tokens/s').length > n", arg=k + 1, timeout=60_000)
        wait_idle(page)
    answers = bot_texts(page)[0:2 * len(TINY_EXAMPLES):2]     # each answer, then its stats
    for (_, question), answer in zip(TINY_EXAMPLES, answers, strict=True):
        assert right_about_shapes_png(question, answer), (question, answer)
    # The detection answer's boxes are drawn on the picture beside it.
    assert page.locator("#qvl-chat [data-testid=bot] img").count() >= 1
    OUTPUT.mkdir(exist_ok=True)
    page.wait_for_function("() => [...document.querySelectorAll('#qvl-chat img')].every(i => i.complete)")
    for _ in range(2):
        page.evaluate("() => { document.querySelector('#qvl-chat [role=log]').scrollTop = 0; }")
        page.wait_for_timeout(300)
    page.screenshot(path=str(OUTPUT / "shapes.png"), full_page=True)
