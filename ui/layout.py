"""The Gradio Blocks page: header, chat, message box, buttons, settings and
examples, wired to ChatController. Building the page needs an engine but no
device code: this module never imports torch."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from gradio.utils import get_upload_folder

from engine.base import Engine
from engine.config import DEFAULT_MODEL
from engine.types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

from . import history, probs
from .callbacks import Callbacks, kept_settings, warn
from .chat import ChatController, Sampling
from .jsonmode import MODES, JsonMode

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
DEFAULT_SYSTEM = "You are a helpful assistant."
STORAGE_KEY = "qwenvl-chat-v1"
SETTINGS_KEY = "qwenvl-settings-v1"   # the JSON mode and the token probabilities' switch,
#                                       kept apart from the chat (Clear keeps them)
GENERATE = "generate"   # the one concurrency group of everything that runs the model
# The quick events that may say something on the page (a refused file, an empty message, a
# Save/Load JSON note, files left out of a kept chat): a warning reaches the page only from
# a queued event, so they are queued, in a group of their own that never waits behind the
# model. Unbounded, as they were unqueued: their slow parts (PDF pages) have their own bound.
SAID = "said"

LATEX = [{"left": "$$", "right": "$$", "display": True},
         {"left": "\\[", "right": "\\]", "display": True},
         {"left": "\\(", "right": "\\)", "display": False}]

# (picture in assets/, question): the page's examples, for any model.
EXAMPLES = [
    ("shapes.png", "How many shapes are there, and what colours are they?"),
    ("shapes.png", "Detect the shapes."),
    ("chart.png", "What does this chart show? Summarise the trend."),
    ("receipt.png", "Read this receipt: list the items and the total."),
    ("street_sign.jpg", "What does the sign say?"),
    ("diagram.png", "Explain this diagram step by step."),
]
# What the built-in tiny model answers right about assets/shapes.png (a red circle, a blue
# square, a green triangle, a yellow star), in the question forms it was trained on
# (tinylab/shapes.py); tests/test_ui.py asks each of the engine. Its detection boxes are
# still wrong, and it knows nothing about the other pictures.
TINY_EXAMPLES = [
    ("shapes.png", "How many shapes are there, and what colours are they?"),
    ("shapes.png", "Which shape is red?"),
    ("shapes.png", "What shape is the blue one?"),
]
# Task presets beside the message box: each puts its prompt into the box (files kept) and
# picks the JSON mode its answer needs: Detect's is Qwen2.5-VL's grounding list (ui/jsonmode.py),
# so its boxes always parse; the others answer in Markdown, HTML or prose.
PRESETS = [
    ("Detect", "Locate every object in the image and output the bbox coordinates in JSON "
               "format.", "boxes"),
    ("Read text", "Read all the text in the image and write it out as Markdown, keeping its "
                  "structure.", "off"),
    ("Parse document", "QwenVL HTML", "off"),
    ("Describe in detail", "Please provide a detailed description of this image", "off"),
]

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")

CSS = """
.qvl-header { display: flex; align-items: baseline; flex-wrap: wrap; gap: .25rem 1rem; }
.qvl-header h1 { margin: 0; font-size: 1.5rem; }
.qvl-header .qvl-serving { color: var(--body-text-color-subdued); font-size: .95rem; }
.qvl-warning { margin-top: .5rem; padding: .6rem .9rem; border-radius: 8px;
  border: 2px solid #d97706; background: #fef3c7; color: #7c2d12; font-size: .95rem; }
.qvl-warning b { color: #b91c1c; }
.qvl-warning code { color: inherit; background: rgba(124, 45, 18, .12); padding: 0 .25em;
  border-radius: 4px; }
.dark .qvl-warning { border-color: #f59e0b; background: #422006; color: #fde68a; }
.dark .qvl-warning b { color: #fca5a5; }
.dark .qvl-warning code { background: rgba(253, 230, 138, .16); }
.qvl-warning details { display: none; }
.qvl-warning summary { cursor: pointer; }
/* A phone: the banner in one line (tap for the rest), a shorter chat, the box in sight. */
@media (max-width: 640px) {
  .qvl-warning .qvl-full { display: none; }
  .qvl-warning details { display: block; }
  .qvl-warning { margin-top: .25rem; padding: .35rem .6rem; font-size: .9rem; }
  .qvl-header h1 { font-size: 1.25rem; }
  .qvl-header .qvl-serving { font-size: .8rem; }
  #qvl-chat { height: 42vh !important; min-height: 240px !important; }
}
/* A disabled Stop looks like the other buttons, faded (the theme fills it in dark mode). */
#qvl-stop[disabled] { background: var(--button-secondary-background-fill);
  border-color: var(--button-secondary-border-color); color: var(--body-text-color-subdued);
  box-shadow: none; }
#qvl-chat sub { color: var(--body-text-color-subdued); }
#qvl-buttons button { min-width: 0; }
#qvl-examples .gallery { display: grid; gap: .5rem;
  grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
#qvl-examples .gallery-item .container { display: flex; flex-direction: row; width: 100%;
  align-items: center; justify-content: space-between; gap: .5rem; }
#qvl-chat .image-frame img { max-height: 260px; width: auto; }
#qvl-chat .bot .image-frame img, #qvl-chat .bot img { max-height: 560px; max-width: 100%; }
#qvl-meter { font-size: .85rem; min-height: 0; }
#qvl-meter p { margin: 0; }
#qvl-presets button { min-width: 0; }
#qvl-json-mode { padding: .25rem .5rem; }
#qvl-json-note { color: #b45309; font-size: .9rem; min-height: 0; }
#qvl-json-note p { margin: 0; }
#qvl-json-mode .wrap { gap: .25rem .75rem; }
#qvl-examples .gallery-item p { font-size: .85rem; margin: 0; text-align: left; }
#qvl-examples .gallery-item img { max-height: 48px; max-width: 64px; object-fit: contain; }
#qvl-probs { max-height: 32vh; overflow-y: auto; padding: .4rem .6rem; border-radius: 8px;
  border: 1px solid var(--border-color-primary); }
#qvl-probs .qvl-probs-text { white-space: pre-wrap; overflow-wrap: anywhere; }
#qvl-probs .qvl-tok { border-radius: 3px; cursor: help; }
#qvl-probs .qvl-tok:hover { outline: 1px solid var(--color-accent); }
#qvl-probs .qvl-probs-note { color: var(--body-text-color-subdued); font-size: .9rem; }
"""

DOWNLOAD_JS = """
(text) => {
  if (!text) return;
  const blob = new Blob([text], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "qwen-vl-chat-" + new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-") + ".json";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
"""


@dataclass
class UIOptions:
    """Server-side knobs of the page."""

    concurrency: int = 8          # requests the UI hands to the engine at once (its batch size)
    max_queue: int = 32           # Gradio's waiting room beyond that
    browser_secret: str | None = None   # encrypts the chat kept in the browser; random if None
    feedback_file: Path | None = None   # likes and dislikes appended as JSON lines (opt-in)
    upload_ttl_s: int = 0               # uploads and the files made from them are deleted
    #                                     this long after they were written (0: kept)
    admit: Callable[[Any], Any] | None = None   # a page generation's per-client slot
    #                                             (its .release()), or an EngineError
    max_export_bytes: int = history.EXPORT_MAX_BYTES   # file bytes one Save JSON embeds


def upload_roots() -> tuple[Path, ...]:
    """Where the UI may read files from: Gradio's upload folder and assets/."""
    return (Path(get_upload_folder()).resolve(), ASSETS.resolve())


def header_html(engine: Engine) -> str:
    model = html.escape(engine.model_name)
    device = html.escape(engine.device_description)
    out = ("<div class='qvl-header'><h1>Qwen2.5-VL chat</h1>"
           f"<span class='qvl-serving' id='qvl-serving'>served by <b>{model}</b> on "
           f"<b>{device}</b> · context {engine.max_model_len} tokens · up to "
           f"{engine.limit_images} images per chat</span></div>")
    if engine.is_tiny:
        knows = html.escape(engine.tiny_knows or "it knows only the project's test pictures")
        full = (f"This server runs the project's test model, not Qwen2.5-VL-7B: {knows}. "
                f"Start the app with <code>--model {DEFAULT_MODEL}</code> on an NPU or GPU "
                "for real answers.")
        # The whole text on a wide screen; on a phone one line that opens to it (CSS).
        out += ("<div class='qvl-warning' id='qvl-tiny-warning'>"
                f"<div class='qvl-full'>⚠ <b>Built-in tiny model.</b> {full}</div>"
                f"<details><summary>⚠ <b>Built-in tiny model</b> <u>more</u></summary>{full}"
                "</details></div>")
    return out


def examples_for(engine: Engine) -> tuple[list[tuple[str, str]], str]:
    """The examples in the page's order, and their label: when the built-in trained model
    is serving, what it answers right comes first (the rest are for the real model)."""
    label = "Examples: click one, then press Enter"
    if not (engine.is_tiny and engine.tiny_trained):
        return list(EXAMPLES), label
    return (TINY_EXAMPLES + [e for e in EXAMPLES if e not in TINY_EXAMPLES],
            f"{label} (the built-in model answers the first {len(TINY_EXAMPLES)}; the others "
            "need the real model)")


@dataclass
class Page:
    """The page's components, for the event wiring."""

    state: Any
    chatbot: Any
    box: Any
    system_box: Any
    stop_btn: Any
    retry_btn: Any
    undo_btn: Any
    clear_btn: Any
    save_btn: Any
    load_btn: Any
    meter: Any
    presets: list[tuple[Any, str, str]]   # (button, prompt, JSON mode)
    json_inputs: list[Any]       # JSON mode, schema, fields (in that order)
    json_note: Any               # what is wrong with the schema or the fields
    schema_file: Any
    settings: Any                # what the browser keeps of them
    sampling: list[Any]          # max tokens, temperature, top-p, top-k, rep. penalty, seed,
    export_text: Any             # min pixels, max pixels (in that order)
    api_answer: Any
    api_btn: Any
    token_probs: Any             # the "Show token probabilities" switch
    probs_panel: Any             # the last answer's tokens, annotated (ui/probs.py)

    @property
    def busy_outputs(self) -> list[Any]:
        return [self.box, self.stop_btn, self.retry_btn, self.undo_btn, self.clear_btn,
                self.save_btn, self.load_btn]


def build_layout(engine: Engine, options: UIOptions) -> Page:
    """The components, inside an open gr.Blocks; no events."""
    max_tokens_cap = max(1, min(engine.max_model_len, 8192))
    start = Sampling.starting(engine.sampling_defaults())    # the model's generation_config
    state = gr.BrowserState(history.new_state(DEFAULT_SYSTEM), storage_key=STORAGE_KEY,
                            secret=options.browser_secret)
    gr.HTML(header_html(engine))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=420):
            chatbot = gr.Chatbot(
                elem_id="qvl-chat", show_label=False, height="62vh", min_height=360,
                buttons=["copy", "copy_all"], latex_delimiters=LATEX,
                feedback_options=("Like", "Dislike"), editable="user", layout="bubble",
                placeholder="**Drop an image or a video, ask a question.**<br>"
                            "Or pick an example below.")
            probs_panel = gr.HTML(probs.EMPTY_NOTE, visible=False, elem_id="qvl-probs")
            box = gr.MultimodalTextbox(
                elem_id="qvl-input", show_label=False, file_count="multiple",
                file_types=list(history.UPLOAD_SUFFIXES), sources=["upload"],
                placeholder="Ask about your images or videos (attach, drop or paste files; "
                            "Enter sends, Shift+Enter for a new line)",
                submit_btn=True, autofocus=True, lines=1, max_lines=8,
                max_plain_text_length=200_000)   # long pastes stay text, not a .txt file
            meter = gr.Markdown("", elem_id="qvl-meter")
            with gr.Row(elem_id="qvl-presets"):
                presets = [(gr.Button(label, size="sm", elem_id="qvl-preset-" +
                                      label.lower().replace(" ", "-")), prompt, mode)
                           for label, prompt, mode in PRESETS]
            json_inputs, schema_file, json_note = json_mode_inputs()
            with gr.Row(elem_id="qvl-buttons"):
                stop_btn = gr.Button("Stop", variant="stop", interactive=False,
                                     elem_id="qvl-stop", size="sm")
                retry_btn = gr.Button("Retry", elem_id="qvl-retry", size="sm")
                undo_btn = gr.Button("Undo", elem_id="qvl-undo", size="sm")
                clear_btn = gr.Button("Clear", elem_id="qvl-clear", size="sm")
                save_btn = gr.Button("Save JSON", elem_id="qvl-save", size="sm")
                load_btn = gr.UploadButton("Load JSON", file_types=[".json"],
                                           file_count="single", type="filepath",
                                           elem_id="qvl-load", size="sm")
            shown, label = examples_for(engine)
            examples = [[{"text": q, "files": [str(ASSETS / name)]}]
                        for name, q in shown if (ASSETS / name).is_file()]
            gr.Examples(examples=examples, inputs=[box], label=label, elem_id="qvl-examples",
                        examples_per_page=max(1, len(examples)))
        with gr.Column(scale=1, min_width=260):
            system_box = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=3,
                                    max_lines=10, elem_id="qvl-system")
            with gr.Accordion("Sampling", open=True):
                max_tokens = gr.Slider(1, max_tokens_cap, value=min(Sampling.max_tokens, max_tokens_cap),
                                       step=1, label="Max new tokens", elem_id="qvl-max-tokens")
                temperature = gr.Slider(0, 2, value=start.temperature, step=0.05, label="Temperature",
                                        info="0 = greedy", elem_id="qvl-temperature")
                top_p = gr.Slider(0.001, 1, value=start.top_p, step=0.001, label="Top-p", elem_id="qvl-top-p")
                top_k = gr.Slider(0, 200, value=start.top_k, step=1, label="Top-k", info="0 = off",
                                  elem_id="qvl-top-k")
                repetition_penalty = gr.Slider(0.8, 2, value=start.repetition_penalty, step=0.01,
                                               label="Repetition penalty", elem_id="qvl-repetition-penalty")
                seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random")
            with gr.Accordion("Image resolution", open=False):
                min_pixels = gr.Slider(28 * 28, 4096 * 28 * 28, value=DEFAULT_MIN_PIXELS,
                                       step=28 * 28, label="Min pixels per image",
                                       info="smaller images are scaled up")
                max_pixels = gr.Slider(28 * 28, 16384 * 28 * 28, value=DEFAULT_MAX_PIXELS,
                                       step=28 * 28, label="Max pixels per image",
                                       info="one token per 28x28 pixels")
            token_probs = gr.Checkbox(False, label="Show token probabilities",
                                      info="under the chat, each token of the answer: hover it "
                                           "for its probability and the likeliest alternatives",
                                      elem_id="qvl-token-probs")
    export_text = gr.Textbox(visible=False)
    api_answer = gr.Textbox(visible=False, label="Answer")
    api_btn = gr.Button(visible=False)

    settings = gr.BrowserState(kept_settings(JsonMode(), False), storage_key=SETTINGS_KEY,
                               secret=options.browser_secret)
    return Page(state, chatbot, box, system_box, stop_btn, retry_btn, undo_btn, clear_btn,
                save_btn, load_btn, meter, presets, json_inputs, json_note, schema_file, settings,
                [max_tokens, temperature, top_p, top_k, repetition_penalty,
                 seed, min_pixels, max_pixels],
                export_text, api_answer, api_btn, token_probs, probs_panel)


def json_mode_inputs() -> tuple[list[Any], Any, Any]:
    """The JSON mode beside the presets: the mode, then the schema (typed, or loaded from a
    .json file) or the field names, each shown only in its own mode, and a line saying what
    is wrong with them."""
    with gr.Group():
        mode = gr.Radio([(label, value) for label, value in MODES], value="off",
                        label="JSON mode", elem_id="qvl-json-mode",
                        info="the answer is held to JSON: it always parses")
        schema = gr.Code("", language="json", label="JSON schema", lines=6, max_lines=16,
                         interactive=True, visible=False, elem_id="qvl-json-schema")
        schema_file = gr.UploadButton("Load schema (.json)", file_types=[".json"],
                                      file_count="single", type="filepath", size="sm",
                                      visible=False, elem_id="qvl-json-schema-file")
        fields = gr.Textbox("", label="Fields", lines=1, max_lines=3, visible=False,
                            placeholder="name, total:number, items:list, paid:boolean",
                            info="comma-separated, all required; types: string (default), "
                                 "integer, number, boolean, list",
                            elem_id="qvl-json-fields")
        note = gr.Markdown("", elem_id="qvl-json-note")
    return [mode, schema, fields], schema_file, note


def wire_events(page: Page, cb: Callbacks, options: UIOptions, demo: gr.Blocks) -> None:
    """Which callback each component's event runs, and in which concurrency group: `said`
    for those that may warn (the chat's own events), `quiet` (unqueued, at once) for the
    others."""
    quiet = {"api_visibility": "undocumented", "queue": False}
    said = {"api_visibility": "undocumented", "concurrency_id": SAID,
            "concurrency_limit": None, "show_progress": "hidden"}
    run = {"api_visibility": "undocumented", "concurrency_id": GENERATE,
           "concurrency_limit": options.concurrency, "show_progress": "minimal"}
    st, chat, busy, jsons = page.state, page.chatbot, page.busy_outputs, page.json_inputs
    asked = [st] + page.sampling + jsons + [page.token_probs]      # what generate reads
    answered = [st, chat, page.probs_panel]
    submitted = page.box.submit(cb.on_submit, [st, page.box, page.system_box] + jsons,
                                [st, chat] + busy + [page.json_note], **said)
    submitted.then(cb.generate, asked, answered, **run) \
        .then(cb.on_idle, None, busy, **quiet)
    retried = page.retry_btn.click(cb.on_retry, [st, page.system_box], [st, chat] + busy,
                                   **said)
    retried.then(cb.generate, asked, answered, **run) \
        .then(cb.on_idle, None, busy, **quiet)
    edited = chat.edit(cb.on_edit, [st], [st, chat] + busy, **said)
    edited.then(cb.generate, asked, answered, **run) \
        .then(cb.on_idle, None, busy, **quiet)
    wire_json_mode(page, cb, demo)
    chat.like(cb.on_like, [st], [st], **said)
    page.box.change(cb.ctrl.composer_meter, [page.box, st, page.sampling[6], page.sampling[7],
                                             page.sampling[0]], [page.meter],
                    trigger_mode="always_last", **quiet)
    for button, prompt, mode in page.presets:
        button.click(lambda box, p=prompt, m=mode: (cb.preset(box, p), m), [page.box],
                     [page.box, page.json_inputs[0]], **quiet)
    page.stop_btn.click(cb.on_stop, None, None, **quiet)
    emptied = {"fn": cb.empty_probs, "inputs": None, "outputs": [page.probs_panel], **quiet}
    page.undo_btn.click(cb.on_undo, [st], [st, chat, page.box], **said).then(**emptied)
    page.clear_btn.click(cb.ctrl.clear, [st], [st, chat], **said).then(**emptied)
    chat.clear(cb.ctrl.clear, [st], [st, chat], **said).then(**emptied)   # its trash icon
    page.save_btn.click(cb.on_export, [st], [page.export_text], **said) \
        .then(None, [page.export_text], None, js=DOWNLOAD_JS, **quiet)
    page.load_btn.upload(cb.on_import, [page.load_btn, st], [st, chat, page.system_box],
                         **said).then(**emptied)
    page.api_btn.click(cb.api_chat, [page.box, page.system_box] + page.sampling[:6],
                       [page.api_answer], api_name="chat", concurrency_id=GENERATE,
                       concurrency_limit=options.concurrency)
    demo.load(cb.on_load, [st], [st, chat, page.system_box], **said)
    demo.unload(cb.on_unload)


def wire_json_mode(page: Page, cb: Callbacks, demo: gr.Blocks) -> None:
    """The JSON mode's inputs (shown by mode) and the token probabilities' switch (its panel
    shown with it): kept in the browser, restored on load."""
    quiet = {"api_visibility": "undocumented", "queue": False}
    mode, schema, fields = page.json_inputs
    kept = page.json_inputs + [page.token_probs]      # what the settings hold
    mode.change(cb.on_json_mode, kept, [schema, page.schema_file, fields,
                                        page.settings, page.json_note], **quiet)
    for box in (schema, fields):
        box.change(cb.on_json_text, kept, [page.settings, page.json_note],
                   trigger_mode="always_last", **quiet)
    page.token_probs.change(cb.on_token_probs, kept, [page.settings, page.probs_panel], **quiet)
    page.schema_file.upload(cb.on_schema_file, [page.schema_file], [schema, mode,
                                                                    page.json_note], **quiet)
    demo.load(cb.on_load_settings, [page.settings],
              [mode, schema, page.schema_file, fields, page.token_probs, page.probs_panel],
              **quiet)


def build_demo(engine: Engine, options: UIOptions | None = None) -> gr.Blocks:
    """The page; its queue is configured so every model call shares one concurrency group."""
    options = options or UIOptions()
    ctrl = ChatController(engine, upload_roots(), warn=warn,
                          feedback_file=options.feedback_file, admit=options.admit)
    cb = Callbacks(ctrl, engine.model_name, Path(get_upload_folder()) / "qwenvl-imports",
                   DEFAULT_SYSTEM, options.max_export_bytes)
    ttl = int(options.upload_ttl_s)
    with gr.Blocks(title="Qwen2.5-VL chat", fill_height=True,
                   delete_cache=(max(60, min(ttl, 3600)), ttl) if ttl > 0 else None) as demo:
        wire_events(build_layout(engine, options), cb, options, demo)
    ctrl.created = demo.upload_file_set.add    # pages, drawn boxes, imports: deleted alike
    demo.queue(default_concurrency_limit=4, max_size=options.max_queue)
    return demo


def browser_secret_from_env() -> str | None:
    """A fixed secret keeps stored chats readable across restarts (QWENVL_BROWSER_SECRET)."""
    return os.environ.get("QWENVL_BROWSER_SECRET") or None
