"""JSON mode and the Detect preset in a real browser (headless Chromium), on the built-in
model with constrained decoding: a question asked with a JSON schema (a broken one typed
first is refused in one line, the message kept in the box; then one loaded from a file)
answers JSON that parses and obeys the schema, shown formatted with a copy button that
copies it, and the mode and the schema come back after a reload; the Detect preset picks the
grounding schema and the boxes of its answer are the ones drawn on the picture. The JSON-mode
chat is saved to test-output/json-mode.png."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from support import CHROMIUM, AppServer, chromium_page

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
OUTPUT = ROOT / "test-output"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (make browser) for the browser test")

SCHEMA = {"type": "object", "required": ["count", "colours"], "properties": {
    "count": {"type": "integer", "minimum": 0, "maximum": 10},
    "colours": {"type": "array", "maxItems": 4,
                "items": {"enum": ["red", "blue", "green", "yellow", "purple", "orange"]}}}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with AppServer("--model", str(tiny_model_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    with chromium_page(height=1100) as pg:
        pg.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        pg.goto(server.url)
        pg.wait_for_selector("#qvl-input textarea")
        yield pg


def wait_idle(page) -> None:
    page.wait_for_function(
        "() => document.querySelector('#qvl-stop').disabled"
        " && !document.querySelector('#qvl-input textarea').disabled")


def last_json(page) -> str:
    """The text of the last answer's ```json code block, as the page shows it."""
    return page.locator("#qvl-chat [data-testid=bot] pre code").last.inner_text()


def ask(page, text: str, picture: Path | None = None) -> None:
    if picture is not None:
        page.set_input_files("#qvl-input input[type=file]", str(picture))
        page.wait_for_selector("#qvl-input img")
    page.locator("#qvl-input textarea").fill(text)
    page.locator("#qvl-input textarea").press("Enter")


def test_a_json_mode_answer_parses_and_obeys_its_schema(server, page, tmp_path):
    import jsonschema
    from ui import display

    page.check("#qvl-json-mode input[value=schema]")
    editor = page.locator("#qvl-json-schema .cm-content")
    editor.wait_for()
    editor.click()
    page.keyboard.insert_text('{"type": "object", "properties": ')        # cut short
    question = "How many shapes are there, and what colours are they?"
    ask(page, question, ASSETS / "shapes.png")
    page.wait_for_function("() => document.querySelector('#qvl-json-note').innerText"
                           ".includes('The JSON schema is not valid JSON')")
    assert "Expecting value (line 1, column 33)." in page.inner_text("#qvl-json-note")
    assert page.locator("#qvl-input textarea").input_value() == question   # nothing lost
    assert page.locator("#qvl-input img").count() == 1
    assert page.locator("#qvl-chat [data-testid=user]").count() == 0

    schema_file = tmp_path / "shapes-schema.json"
    schema_file.write_text(json.dumps(SCHEMA, indent=2))
    with page.expect_file_chooser() as chooser:
        page.click("#qvl-json-schema-file")
    chooser.value.set_files(str(schema_file))
    page.wait_for_function("() => document.querySelector('#qvl-json-schema .cm-content')"
                           ".innerText.includes('maxItems')")
    page.wait_for_function("() => !document.querySelector('#qvl-json-note').innerText.trim()")
    page.locator("#qvl-input textarea").press("Enter")
    page.wait_for_selector("#qvl-chat [data-testid=bot] pre code", timeout=30_000)
    wait_idle(page)
    shown = last_json(page)
    answer = json.loads(shown)
    jsonschema.validate(answer, SCHEMA)
    compact = json.dumps(answer, separators=(",", ":"))                # as the model wrote it
    assert "```json\n" + shown.strip() + "\n```" == display.json_block(compact)   # formatted
    page.locator("#qvl-chat [data-testid=bot] .copy_code_button").last.click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert json.loads(copied) == answer
    OUTPUT.mkdir(exist_ok=True)
    page.locator("#qvl-chat").screenshot(path=str(OUTPUT / "json-mode.png"))

    page.reload()                                   # the mode and its schema are kept
    page.wait_for_function("() => document.querySelector('#qvl-json-mode input[value=schema]')"
                           "?.checked && document.querySelector('#qvl-json-schema .cm-content')"
                           "?.innerText.includes('maxItems')")


def test_the_detect_preset_draws_the_boxes_of_its_constrained_answer(server, page, tmp_path,
                                                                     tiny_model_dir):
    import jsonschema
    from engine.types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
    from ui import display, grounding
    from ui.jsonmode import GROUNDING_SCHEMA

    page.locator("#qvl-clear").click()
    page.wait_for_function("() => !document.querySelector('#qvl-chat [data-testid=bot]')")
    picture = tmp_path / "shapes-to-detect.png"     # another name: the file input changes
    shutil.copy(ASSETS / "shapes.png", picture)
    page.set_input_files("#qvl-input input[type=file]", str(picture))
    page.wait_for_selector("#qvl-input img")
    page.click("#qvl-preset-detect")
    page.wait_for_function("() => document.querySelector('#qvl-json-mode input[value=boxes]')"
                           ".checked && document.querySelector('#qvl-input textarea').value"
                           ".includes('bbox')")
    page.locator("#qvl-json-schema").wait_for(state="hidden")       # only the chosen mode's
    page.locator("#qvl-input textarea").press("Enter")
    page.wait_for_selector("#qvl-chat [data-testid=bot] img", timeout=30_000)
    wait_idle(page)
    shown = last_json(page)
    boxes = json.loads(shown)
    jsonschema.validate(boxes, GROUNDING_SCHEMA)
    # Held to the schema's key order (the built-in model by itself writes "label" first) and
    # shown as the page formats a JSON answer.
    assert all(list(box) == ["bbox_2d", "label"] for box in boxes)
    compact = json.dumps(boxes, separators=(",", ":"))
    assert "```json\n" + shown.strip() + "\n```" == display.json_block(compact)
    page.wait_for_function("() => [...document.querySelectorAll('#qvl-chat img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    src = page.locator("#qvl-chat [data-testid=bot] img").first.get_attribute("src")
    drawn = Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")

    # The same boxes drawn here, from the JSON the page shows, at the model's resize (the
    # page's default bounds, then the built-in model's own processor bounds).
    size = json.loads((tiny_model_dir / "processor_config.json").read_text())
    size = size.get("image_processor", size)["size"]
    bounds = [(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
              (size["shortest_edge"], size["longest_edge"])]
    expected = grounding.annotate(shown, [str(picture)], bounds, tmp_path / "drawn")
    assert len(expected) == 1
    original = Image.open(picture).convert("RGB")
    assert list(drawn.getdata()) == list(Image.open(expected[0]).convert("RGB").getdata())
    assert list(drawn.getdata()) != list(original.getdata())
