"""PDF documents as pictures: each page rendered with pypdfium2 (a maintained binding of
PDFium, no system packages), so a document can be read like any other picture."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .errors import InvalidRequestError

PDF_SUFFIX = ".pdf"
RENDER_DPI = 144           # 2x PDF points: text stays legible after the max_pixels resize


def _open(path: Path):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(str(path))
    except Exception:   # pypdfium2 raises PdfiumError (a RuntimeError) for broken files
        raise InvalidRequestError(f"Failed to load PDF: {path.name} is not a readable PDF.",
                                  param="file") from None


def page_sizes(path: Path, dpi: int = RENDER_DPI) -> list[tuple[int, int]]:
    """(width, height) in pixels of every page as `render_pages` renders it (no rendering)."""
    pdf = _open(path)
    try:
        scale = dpi / 72
        return [(max(1, round(w * scale)), max(1, round(h * scale)))
                for w, h in (pdf.get_page_size(i) for i in range(len(pdf)))]
    finally:
        pdf.close()


def render_pages(path: Path, max_pages: int, dpi: int = RENDER_DPI) -> list[Image.Image]:
    """Every page as an RGB picture; more pages than `max_pages` is a clear error."""
    pdf = _open(path)
    try:
        pages = len(pdf)
        if pages == 0:
            raise InvalidRequestError(f"Failed to load PDF: {path.name} has no pages.",
                                      param="file")
        if pages > max_pages:
            raise InvalidRequestError(
                f"{path.name} has {pages} pages, but only {max_pages} more picture(s) fit in "
                f"this chat: split the document or start a new chat.", param="file")
        out = []
        for i in range(pages):
            page = pdf[i]
            try:
                out.append(page.render(scale=dpi / 72).to_pil().convert("RGB"))
            finally:
                page.close()
        return out
    finally:
        pdf.close()
