"""PDF documents as pictures: each page rendered with pypdfium2 (a maintained binding of
PDFium, no system packages), so a document can be read like any other picture.

A page's size is the document's to claim (a 442-byte file can hold a 7000x7000 pt page, a
14000x14000 picture at 144 dpi), so every page is sized before it is rendered: at
RENDER_DPI when it fits the caller's pixel budget (the engine's max_pixels_limit), at the
dpi that fits otherwise. The page count is the document's claim too, so nothing loops over
more pages than the caller can use."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..config import DEFAULT_MAX_PIXELS_LIMIT
from ..errors import InvalidRequestError
from .geometry import MAX_RATIO

PDF_SUFFIX = ".pdf"
RENDER_DPI = 144           # 2x PDF points: text stays legible after the max_pixels resize

# PDFium is not thread-safe, not even across documents (pypdfium2's documentation), and the
# page and the API may render from several worker threads: every PDFium call holds this.
_PDFIUM = threading.RLock()


@dataclass(frozen=True)
class PageSizes:
    """What a PDF claims: its page count, and the rendered (width, height) of its first
    pages (as many as the caller could use), read without rendering anything."""

    count: int
    sizes: list[tuple[int, int]]


def _unreadable(path: Path) -> InvalidRequestError:
    return InvalidRequestError(f"Failed to load PDF: {path.name} is not a readable PDF.",
                               param="file")


def _open(path: Path):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(str(path))
    except Exception:   # pypdfium2 raises PdfiumError (a RuntimeError) for broken files
        raise _unreadable(path) from None


def _pixels(width_pt: float, height_pt: float, scale: float) -> tuple[int, int]:
    """The bitmap pypdfium2 renders at `scale` (it rounds each side up)."""
    return max(1, math.ceil(width_pt * scale)), max(1, math.ceil(height_pt * scale))


def page_scale(path: Path, number: int, width_pt: float, height_pt: float, max_pixels: int,
               dpi: int = RENDER_DPI) -> float:
    """The render scale for one page: dpi/72 when its picture fits `max_pixels`, else the
    largest scale that fits; a page no scale can make a valid picture of (aspect ratio over
    MAX_RATIO, as pictures are refused, or no size at all) is one clear line."""
    name = f"Page {number} of {path.name}"
    if not (math.isfinite(width_pt) and math.isfinite(height_pt)
            and width_pt > 0 and height_pt > 0):
        raise InvalidRequestError(f"Failed to load PDF: {name} has no size.", param="file")
    if max(width_pt, height_pt) / min(width_pt, height_pt) > MAX_RATIO:
        raise InvalidRequestError(
            f"{name} is {width_pt:g}x{height_pt:g} pt: the aspect ratio must be at most "
            f"{MAX_RATIO}.", param="file")
    scale = dpi / 72
    w, h = _pixels(width_pt, height_pt, scale)
    if w * h <= max_pixels:
        return scale
    scale = math.sqrt(max_pixels / (width_pt * height_pt))
    for _ in range(8):                  # ceil() can add a row or column: shrink until it fits
        w, h = _pixels(width_pt, height_pt, scale)
        if w * h <= max_pixels:
            return scale
        scale *= math.sqrt(max_pixels / (w * h)) * (1 - 1e-6)
    raise InvalidRequestError(
        f"{name} is {width_pt:g}x{height_pt:g} pt: it cannot be rendered within the limit of "
        f"{max_pixels:,} pixels per picture (see --max-pixels-limit).", param="file")


def _size_pages(pdf, path: Path, pages: int, max_pixels: int, dpi: int) -> list[tuple[int, int]]:
    """Rendered sizes of the first `pages` pages, from the page tree only."""
    out = []
    for i in range(pages):
        try:
            w, h = pdf.get_page_size(i)
        except Exception:   # the page tree claims a page it does not hold
            raise _unreadable(path) from None
        out.append(_pixels(w, h, page_scale(path, i + 1, w, h, max_pixels, dpi)))
    return out


def page_sizes(path: Path, max_pages: int, max_pixels: int = DEFAULT_MAX_PIXELS_LIMIT,
               dpi: int = RENDER_DPI) -> PageSizes:
    """The page count and the (width, height) `render_pages` gives each of the first
    `max_pages` pages, without rendering: the composer's meter needs no more than fit."""
    with _PDFIUM:
        pdf = _open(path)
        try:
            count = len(pdf)
            return PageSizes(count, _size_pages(pdf, path, min(count, max(0, max_pages)),
                                                max_pixels, dpi))
        finally:
            pdf.close()


def render_pages(path: Path, max_pages: int, max_pixels: int = DEFAULT_MAX_PIXELS_LIMIT,
                 dpi: int = RENDER_DPI) -> Iterator[Image.Image]:
    """Every page as an RGB picture of at most `max_pixels` (the engine's max_pixels_limit),
    one at a time, so the caller saves each before the next is rendered. Every check runs
    before the first page is rendered: no pages, more than `max_pages` (one clear line),
    a page no scale fits. A page that fits at `dpi` renders exactly as it always did."""
    with _PDFIUM:
        pdf = _open(path)
    try:
        with _PDFIUM:
            pages = len(pdf)
            if pages == 0:
                raise InvalidRequestError(f"Failed to load PDF: {path.name} has no pages.",
                                          param="file")
            if pages > max_pages:
                raise InvalidRequestError(
                    f"{path.name} has {pages} pages, but only {max_pages} more picture(s) fit "
                    f"in this chat: split the document or start a new chat.", param="file")
            _size_pages(pdf, path, pages, max_pixels, dpi)
        for i in range(pages):
            yield _render(pdf, path, i, max_pixels, dpi)
    finally:
        with _PDFIUM:
            pdf.close()


def _render(pdf, path: Path, index: int, max_pixels: int, dpi: int) -> Image.Image:
    """One page at the scale that fits, holding PDFium only while it renders."""
    with _PDFIUM:
        page = pdf[index]
        try:
            w, h = page.get_size()
            scale = page_scale(path, index + 1, w, h, max_pixels, dpi)
            return page.render(scale=scale).to_pil().convert("RGB")
        finally:
            page.close()
