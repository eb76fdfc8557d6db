"""The page's event handlers: each turns Gradio's values into a ChatController call
and its result into component updates (the wiring is in layout.py)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from engine.errors import EngineError

from . import display, history, probs
from .chat import ChatController, RefusedFiles, Sampling
from .jsonmode import MAX_SCHEMA_CHARS, JsonMode

BUSY_OUTPUTS = 7   # the message box, Stop, Retry, Undo, Clear, Save and Load
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]!|~#])")


def warn(text: str) -> None:
    """One line on the page, as Gradio's warning toast. The toast renders HTML and the line
    may quote file names or a saved chat's contents, so it is shown as plain text. It reaches
    the page only from a queued event (layout.py wires every event that warns so)."""
    gr.Warning(html.escape(text, quote=False))


def json_note(problem: str | None) -> str:
    """The line under the JSON mode: what is wrong with its schema or fields (the text may
    quote what the user typed, so it is shown as plain text), or nothing."""
    if not problem:
        return ""
    return "⚠ " + MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(problem, quote=False))


def kept_settings(json_mode: JsonMode, token_probs: Any) -> dict:
    """What the browser keeps of the page's settings: the JSON mode's and whether token
    probabilities are shown (read back by `Callbacks.on_load_settings`)."""
    return {**json_mode.settings(), "token_probs": token_probs is True}


@dataclass
class Callbacks:
    ctrl: ChatController
    model_name: str
    imports_dir: Path
    default_system: str
    max_export_bytes: int = history.EXPORT_MAX_BYTES

    @staticmethod
    def buttons(busy: bool) -> list[Any]:
        return [gr.update(interactive=not busy), gr.update(interactive=busy)] + \
               [gr.update(interactive=not busy)] * (BUSY_OUTPUTS - 2)

    def on_submit(self, raw: Any, message: Any, system: str, mode: Any, schema: Any,
                  fields: Any, request: gr.Request):
        """The message into the chat, or refused with the box kept as it is. A JSON mode
        whose schema is none is refused first, in the line under the JSON mode, next to what
        is wrong; any other refusal is one warning line (`warn`)."""
        problem = JsonMode.from_values(mode, schema, fields).problem()
        if problem is not None:
            return [gr.skip()] * (2 + BUSY_OUTPUTS) + [json_note(problem)]
        try:
            st, shown, accepted = self.ctrl.add_user_turn(raw, message, system, request)
        except RefusedFiles as exc:   # an unreadable file leaves the box; the rest stays
            them = "it" if len(exc.names) == 1 else "them"
            rest = f" Press Enter to send the rest without {them}." \
                if exc.box["text"].strip() or exc.box["files"] else ""
            warn(f"Not sent: {exc.message}{rest}")
            return [gr.skip(), gr.skip(), exc.box] + [gr.skip()] * BUSY_OUTPUTS
        except EngineError as exc:    # e.g. a PDF with more pages than fit: the box keeps it
            warn(exc.message)
            return [gr.skip(), gr.skip()] + [gr.skip()] * (BUSY_OUTPUTS + 1)
        if not accepted:   # whitespace only: nothing to send, the box keeps its text
            warn("The message is empty: type a question or add an image.")
            return [st, shown] + [gr.skip()] * (BUSY_OUTPUTS + 1)
        ui = self.buttons(True)
        ui[0] = gr.MultimodalTextbox(value=None, interactive=False)
        return [st, shown] + ui + [""]

    def on_retry(self, raw: Any, system: str, request: gr.Request):
        st, shown = self.ctrl.prepare_retry(raw, system, request)
        return [st, shown] + self.buttons(history.pending_user_turn(st) is not None)

    async def generate(self, raw: Any, max_new: Any, temp: Any, p: Any, k: Any, rep: Any,
                       seed_value: Any, min_px: Any, max_px: Any, mode: Any, schema: Any,
                       fields: Any, token_probs: Any, request: gr.Request):
        sampling = Sampling.from_values(max_new, temp, p, k, rep, seed_value, min_px, max_px)
        sampling.json_mode = JsonMode.from_values(mode, schema, fields)
        sampling.token_probs = token_probs is True
        async for step in self.ctrl.steps(raw, sampling, request):
            yield (gr.skip() if step.state is None else step.state), step.shown, \
                (gr.skip() if step.probs is None else step.probs)

    def on_edit(self, raw: Any, data: gr.EditData, request: gr.Request):
        """An edited question reruns from there (its pictures stay)."""
        st, shown, rerun = self.ctrl.edit(raw, data.index, data.value, request)
        return [st, shown] + self.buttons(rerun)

    def on_like(self, raw: Any, data: gr.LikeData, request: gr.Request):
        return self.ctrl.rate(raw, data.index, data.liked, request)

    @staticmethod
    def preset(box: Any, prompt: str) -> dict:
        """A task preset's prompt into the message box; the attached files stay."""
        files = box.get("files") if isinstance(box, dict) else None
        return {"text": prompt, "files": list(files or [])}

    @staticmethod
    def on_json_mode(mode: Any, schema: Any, fields: Any, token_probs: Any = False) -> list[Any]:
        """The chosen mode's own inputs shown, what is wrong with them said, and all three
        kept in the browser (with the token probabilities' setting)."""
        kept = JsonMode.from_values(mode, schema, fields)
        return [gr.update(visible=kept.mode == "schema"), gr.update(visible=kept.mode == "schema"),
                gr.update(visible=kept.mode == "fields")] + \
            Callbacks.on_json_text(*kept.values(), token_probs)

    @staticmethod
    def on_json_text(mode: Any, schema: Any, fields: Any, token_probs: Any = False) -> list[Any]:
        """As the schema or the fields are typed: kept, and checked (an empty one is not
        pointed out until Enter)."""
        kept = JsonMode.from_values(mode, schema, fields)
        typed = kept.schema if kept.mode == "schema" else kept.fields
        problem = kept.problem() if typed.strip() else None
        return [kept_settings(kept, token_probs), json_note(problem)]

    @staticmethod
    def on_token_probs(mode: Any, schema: Any, fields: Any, token_probs: Any) -> list[Any]:
        """"Show token probabilities" switched: kept in the browser, the panel shown or
        hidden (the next answer fills it)."""
        kept = kept_settings(JsonMode.from_values(mode, schema, fields), token_probs)
        return [kept, gr.update(visible=kept["token_probs"])]

    @staticmethod
    def on_load_settings(raw: Any) -> list[Any]:
        """The settings as the browser kept them: the JSON mode, each input shown in its own
        mode, and the token probabilities' switch with its panel. One event sets them all,
        so the change events they fire all write back what was kept."""
        kept = JsonMode.from_settings(raw)
        shown = isinstance(raw, dict) and raw.get("token_probs") is True
        return [kept.mode, gr.update(value=kept.schema, visible=kept.mode == "schema"),
                gr.update(visible=kept.mode == "schema"),
                gr.update(value=kept.fields, visible=kept.mode == "fields"),
                shown, gr.update(visible=shown)]

    @staticmethod
    def empty_probs() -> str:
        """The probability panel once the answer it showed has left the chat."""
        return probs.EMPTY_NOTE

    def on_schema_file(self, path: str | None) -> list[Any]:
        """A .json file's text into the schema box (JSON schema mode chosen); a file that is
        not a schema is still shown, to be fixed there, and the line under it says why."""
        if not path or not history.inside_roots(Path(path), self.ctrl.upload_roots):
            return [gr.skip(), gr.skip(), gr.skip()]
        name = Path(path).name
        too_long = f"{name} is too long for a schema: at most {MAX_SCHEMA_CHARS:,} characters."
        try:
            with open(path, "rb") as f:
                data = f.read(4 * MAX_SCHEMA_CHARS + 1)      # UTF-8: at most 4 bytes a character
            text = None if len(data) > 4 * MAX_SCHEMA_CHARS else data.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "it is not UTF-8 text"
            return [gr.skip(), gr.skip(), json_note(f"Cannot read {name}: {why}.")]
        if text is None or len(text) > MAX_SCHEMA_CHARS:
            return [gr.skip(), gr.skip(), json_note(too_long)]
        problem = JsonMode("schema", text).problem()
        return [text, "schema", json_note(f"{name}: {problem}" if problem else None)]

    def on_idle(self) -> list[Any]:
        return self.buttons(False)

    def on_stop(self, request: gr.Request):
        self.ctrl.stop(request)

    def on_undo(self, raw: Any):
        st, shown, restored = self.ctrl.undo(raw)
        return st, shown, (gr.skip() if restored is None else restored)

    def on_load(self, raw: Any):
        st = self.ctrl.load(raw)
        return st, display.render(st), st["system"] or self.default_system

    def on_export(self, raw: Any) -> str:
        left_out: list[str] = []
        text = history.export_json(self.ctrl.load(raw), self.model_name,
                                   max_bytes=self.max_export_bytes, left_out=left_out)
        if left_out:
            warn(f"{len(left_out)} file(s) were left out of the saved chat, which may embed "
                 f"at most {self.max_export_bytes / 2**20:g} MB of files: "
                 f"{', '.join(left_out[:3])}")
        return text

    def on_import(self, path: str | None, raw: Any):
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        if not history.inside_roots(Path(path), self.ctrl.upload_roots):
            self.ctrl.note_dropped([Path(path).name])
            return gr.skip(), gr.skip(), gr.skip()
        left_out: list[str] = []
        try:
            st = history.import_json(Path(path).read_bytes(), self.imports_dir, left_out)
        except EngineError as exc:
            warn(exc.message)
            return gr.skip(), gr.skip(), gr.skip()
        except OSError as exc:
            warn(f"Cannot read the file: {exc.strerror or exc}")
            return gr.skip(), gr.skip(), gr.skip()
        self.ctrl.track([f["path"] for t in st["turns"] for f in t.get("files", [])])
        if left_out:
            warn(f"{len(left_out)} file(s) of the saved chat were not in it: "
                 f"{', '.join(left_out[:3])}")
        return st, display.render(st), st["system"]

    async def api_chat(self, message: Any, system_prompt: str, max_new_tokens: Any,
                       temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any,
                       seed: Any, request: gr.Request):
        """One question (text and images or videos) to the model; streams the answer."""
        sampling = Sampling.from_values(max_new_tokens, temperature, top_p, top_k,
                                        repetition_penalty, seed)
        try:
            async for text in self.ctrl.answer_once(message, system_prompt, sampling, request):
                yield text
        except EngineError as exc:
            raise gr.Error(exc.message, print_exception=False) from None

    def on_unload(self, request: gr.Request):
        self.ctrl.disconnect(request)

