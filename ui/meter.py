"""The composer's token meter: what the attached pictures will cost before anything is
sent, from their sizes alone (smart_resize at the current bounds, one token per 28x28
pixels), against the context length, with a warning for what will not fit; and, for a
question about a picture when the model would see none, a note saying so."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from engine.config import EngineConfig
from engine.errors import EngineError
from engine.inputs.documents import PDF_SUFFIX, page_sizes
from engine.inputs.geometry import image_tokens

from . import history
from .history import State

CHARS_PER_TOKEN = 3          # a rough English/Chinese average, for text not yet tokenized
ROTATED = (5, 6, 7, 8)       # EXIF orientations that swap width and height
# Words of a question about a picture (the task presets' prompts among them).
ABOUT_A_PICTURE = re.compile(r"\b(?:pictures?|images?|photos?|photographs?|videos?|this|these|"
                             r"shapes?|charts?|diagrams?|detect|locate|bbox|qwenvl html)\b",
                             re.IGNORECASE)
NO_PICTURE = ("🖼 **No picture in this chat:** the model will not see one with this "
              "question. Attach a picture (or pick an example) to ask about it.")
NO_PICTURE_SEEN = ("🖼 **No picture the model can see in this chat:** the files above belong "
                   "to a message that failed (or are no longer on the server). Attach a "
                   "picture to ask about it.")


@dataclass
class Item:
    name: str
    tokens: int | None          # None: not known before sending (a video)
    pictures: int = 1
    note: str = ""


@dataclass
class Measure:
    items: list[Item] = field(default_factory=list)
    chat_tokens: int = 0        # what the chat so far costs (the last request, or an estimate)
    chat_pictures: int = 0
    text_tokens: int = 0
    chat_media_seen: int = 0    # the chat's pictures and videos the model sees (answered ones)
    asks_about_picture: bool = False
    chat_files: int = 0         # files the chat's questions name, seen by the model or not

    @property
    def new_tokens(self) -> int:
        return sum(i.tokens or 0 for i in self.items)

    @property
    def total(self) -> int:
        return self.chat_tokens + self.text_tokens + self.new_tokens

    @property
    def pictures(self) -> int:
        return self.chat_pictures + sum(i.pictures for i in self.items if i.tokens is not None)


def picture_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header only."""
    with Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(0x0112) in ROTATED:
            w, h = h, w
    return w, h


def _pdf_item(name: str, path: str, lo: int, hi: int, then: list[tuple[int, int]],
              max_pages: int, max_pixels_limit: int) -> Item:
    """A PDF's pages as the chat will render them; only the first `max_pages` are sized (a
    document may claim a million pages), the rest are counted, which the limit warns of."""
    pdf = page_sizes(Path(path), max_pages, max_pixels_limit)
    note = f"{pdf.count:,} page{'s' if pdf.count != 1 else ''}"
    if len(pdf.sizes) < pdf.count:
        note += f", the first {len(pdf.sizes)} counted"
    return Item(name, sum(image_tokens(w, h, lo, hi, then) for w, h in pdf.sizes), pdf.count,
                note)


def _item(path: str, lo: int, hi: int, then: list[tuple[int, int]], max_pages: int,
          max_pixels_limit: int) -> Item:
    name = Path(path).name
    try:
        if path.lower().endswith(PDF_SUFFIX):
            return _pdf_item(name, path, lo, hi, then, max_pages, max_pixels_limit)
        if history.media_kind(path) == "video":
            return Item(name, None, 0, "video: counted when sent")
        w, h = picture_size(path)
        return Item(name, image_tokens(w, h, lo, hi, then), 1, f"{w}x{h}")
    except (OSError, ValueError, EngineError):
        return Item(name, None, 0, "not readable")


def measure(state: State, text: str, files: list[str], lo: int, hi: int,
            then: list[tuple[int, int]] = (), *, limit_images: int = EngineConfig.limit_images,
            max_pixels_limit: int = EngineConfig.max_pixels_limit) -> Measure:
    """`then`: the resizes the model applies after ours (Engine.model_pixel_bounds);
    `limit_images` and `max_pixels_limit` (the engine's): the most PDF pages sized and the
    picture budget they are rendered within, as the chat will render them."""
    out = Measure(items=[_item(f, lo, hi, then, limit_images, max_pixels_limit)
                         for f in files],
                  text_tokens=len(text) // CHARS_PER_TOKEN)
    out.chat_pictures = sum(1 for t in state["turns"] if t["role"] == "user"
                            for f in t["files"] if history.media_kind(f["path"]) == "image")
    out.chat_media_seen = history.media_seen(state)
    out.asks_about_picture = ABOUT_A_PICTURE.search(text) is not None
    out.chat_files = history.files_in(state)
    last = next((t for t in reversed(state["turns"]) if t["role"] == "assistant"
                 and t.get("stats")), None)
    if last is not None:
        stats = last["stats"]
        out.chat_tokens = int(stats.get("prompt_tokens") or 0) + int(
            stats.get("output_tokens") or 0)
    else:
        for t in state["turns"]:
            out.chat_tokens += len(t["text"]) // CHARS_PER_TOKEN
            if t["role"] == "user":
                out.chat_tokens += sum(
                    _item(f["path"], lo, hi, then, limit_images, max_pixels_limit).tokens or 0
                    for f in t["files"] if Path(f["path"]).is_file())
    return out


def describe(m: Measure, max_model_len: int, limit_images: int, max_tokens: int) -> str:
    """One or two lines of markdown for the page: empty while nothing is attached, unless
    the question is about a picture and the model would see none."""
    if not m.items:
        if m.asks_about_picture and not m.chat_media_seen:
            return NO_PICTURE_SEEN if m.chat_files else NO_PICTURE
        return ""
    parts = [f"**{i.name}**: {i.tokens:,} tokens ({i.note})" if i.tokens is not None
             else f"**{i.name}**: {i.note}" for i in m.items]
    line = (f"🧮 {' · '.join(parts)} — this message ≈ {m.new_tokens + m.text_tokens:,}, "
            f"with the chat ≈ {m.total:,} of {max_model_len:,} tokens")
    warnings = []
    if m.pictures > limit_images:
        warnings.append(f"{m.pictures} pictures in this chat, at most {limit_images} fit")
    if m.total >= max_model_len:
        warnings.append("the prompt alone is longer than the context")
    elif m.total + max_tokens > max_model_len:
        warnings.append(f"only {max_model_len - m.total:,} tokens are left for the answer "
                        f"(max new tokens is {max_tokens:,})")
    if warnings:
        line += "\n\n⚠ **Will not fit:** " + "; ".join(warnings) + \
                ". Remove a picture, lower *Max pixels per image*, or start a new chat."
    return line
